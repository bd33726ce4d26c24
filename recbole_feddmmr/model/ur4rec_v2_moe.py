"""UR4RecV2MoE: a SASRec backbone and three experts fused by an item-centric router.

Score of candidate item i for a user with sequence representation ``s``::

    score(i) = w_seq(i) * s . r_i + w_vis(i) * s . vis_emb(i) + w_sem(i) * s . sem_emb(i)

with ``r_i`` the item's ID representation, the experts reading the user's memory,
and ``w = softmax`` of the router over the experts that are live for (user, i):
an expert is off where the dataset lacks its modality, the item lacks the
feature, or the user's memory holds no slot of that modality.

Loss: BPR of the positive against ``train_neg_num`` uniformly sampled negatives
(never the positive), SSM (softmax cross-entropy over the positive and those
negatives), or full-softmax CE over all items; plus ``load_balance_weight *
sum_e (mean router weight_e - 1/E)^2`` over the E experts the dataset enables; with CE, plus
``expert_loss_weight`` times each content expert's own CE over the items it scores (its score alone, not
weighted by the router), so that a content expert learns to rank on its own, and ``sequential_loss_weight``
times the sequential expert's own CE, so that the backbone learns to rank on its own as with the experts off.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType
from torch import Tensor, nn

from recbole_feddmmr.errors import ConfigError
from recbole_feddmmr.memory import ItemFeatures, LocalDynamicMemory, MemoryReadout, MemoryWrites, RecentHistoryMemory
from recbole_feddmmr.model.dropout import fast_dropout, keyed_dropout
from recbole_feddmmr.model.layers import (
    ContentExpert,
    ItemCentricRouter,
    Routing,
    SASRecBackbone,
    candidate_dot,
)
from recbole_feddmmr.model.losses import (
    PredictionPoints,
    TrainingLoss,
    balance_penalty,
    bpr_loss,
    full_softmax_loss,
    gbce_beta,
    gbce_loss,
    sample_by_weight,
    sample_negatives,
    sampled_softmax_loss,
    surprise_of,
)

EXPERTS = ("sequential", "visual", "semantic")


class ExpertVectors(NamedTuple):
    """Each expert's user vectors [B, H] and candidate vectors [U, H] (``None`` where it is live nowhere)."""

    users: list[Tensor | None]
    candidates: list[Tensor | None]


# CE: softmax over the whole catalogue (RecBole's SASRec and BERT4Rec train so); SSM: sampled softmax with the
# logQ correction; gBCE: generalised BCE over sampled negatives (gSASRec); BPR: the seed's pairwise loss
LOSS_TYPES = ("CE", "SSM", "gBCE", "BPR")


def item_feature_table(dataset, id_field: str, value_field: str | None, expected_dim: int) -> Tensor | None:
    """``[n_items, D]`` float table of ``value_field`` from RecBole's feature of ``id_field`` (row = item id).

    ``id_field`` is an alias of the item id (``alias_of_item_id``), so RecBole has
    already remapped it to the internal ids. This is what RecBole's ``preload_weight`` builds, done
    per value field because ``preload_weight`` allows one value field per id field and the model reads
    two (text and visual) from one ``.itememb``. ``None`` when the dataset has no such field.
    """
    if not value_field or value_field not in dataset.field2source or id_field not in dataset.field2source:
        return None
    feat = dataset.field2feats(id_field)[0]
    values = feat[value_field]  # a tensor once RecBole has built its Interaction, a column of arrays before
    values = torch.as_tensor(
        values if isinstance(values, Tensor) else np.stack(values), dtype=torch.float32
    )  # [rows, D]
    if values.dim() != 2 or values.size(1) != expected_dim:
        raise ConfigError(
            f"feature field '{value_field}' has dimension {tuple(values.shape[1:])}, "
            f"the model expects {expected_dim}: fix the .itememb file or set the matching *_dim option"
        )
    table = torch.zeros(dataset.item_num, expected_dim)
    table[torch.as_tensor(feat[id_field]).long()] = values
    return table


class UR4RecV2MoE(SequentialRecommender):
    """FedDMMR's recommender (centralised view; federation only ever sees its parameters and loss)."""

    input_type = InputType.POINTWISE
    loss_names = ("rec_loss", "balance_loss")  # the parts of calculate_loss, as the epoch log names them

    def __init__(self, config, dataset) -> None:
        super().__init__(config, dataset)
        self.item_emb_dim = config["item_emb_dim"]
        self.user_emb_dim = config["user_emb_dim"]
        self.hidden_dim = config["sasrec_hidden_dim"]
        self.loss_type = config["loss_type"]
        self.train_neg_num = config["train_neg_num"]
        self.load_balance_weight = config["load_balance_weight"]
        # the router reads the item ID embedding, which is also the sequential expert's output embedding; detached,
        # the router's losses (its share of the fused CE, the balance loss) no longer move that table
        self.router_detached_items = bool(config["router_detached_items"])
        self.eval_user_chunk = config["eval_user_chunk"] or 256
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        self.negative_distribution = config["train_neg_distribution"]
        if self.negative_distribution not in ("uniform", "popularity"):
            raise ConfigError(
                f"train_neg_distribution must be uniform or popularity, got {self.negative_distribution!r}"
            )
        if self.loss_type != "CE" and not 1 <= self.train_neg_num <= self.n_items - 2:
            raise ConfigError(
                f"train_neg_num must be in 1..{self.n_items - 2} (the other items), got {self.train_neg_num}"
            )
        # popularity sampling draws an item by its training interactions (+1, so that none has probability 0)
        counts = torch.zeros(self.n_items)
        if self.negative_distribution == "popularity":
            counter = dataset.item_counter
            counts[torch.as_tensor(list(counter.keys()), dtype=torch.long)] = torch.as_tensor(
                list(counter.values()), dtype=torch.float32
            )
            counts[1:] += 1.0
        self.register_buffer("negative_weights", counts, persistent=False)  # [n_items] (popularity only)
        # an item with no training interaction (e.g. one added after the training data was collected) is left
        # out of the training softmax: otherwise CE would push its score down with no evidence against it
        unseen = None
        if config["exclude_unseen_items"]:
            if self.loss_type != "CE":
                raise ConfigError("exclude_unseen_items applies to loss_type CE (the full-catalogue softmax)")
            unseen = torch.ones(self.n_items, dtype=torch.bool)
            unseen[torch.as_tensor(list(dataset.item_counter.keys()), dtype=torch.long)] = False
        self.register_buffer("unseen_items", unseen, persistent=False)  # [n_items] bool, or None
        # each content expert's own CE, so that it ranks by itself where the sequential expert cannot (an item
        # with an untrained ID); without it a content expert is trained only as a minor part of the mixture.
        # The sequential expert's own CE: the backbone keeps the full training signal it has with the experts off,
        # however much of the fit the content experts take (docs/results.md, "Experts off under reordered ties")
        for name in ("expert_loss_weight", "sequential_loss_weight"):
            value = config[name] or 0.0
            if value < 0:
                raise ConfigError(f"{name} must be >= 0, got {value}")
            if value and self.loss_type != "CE":
                raise ConfigError(f"{name} applies to loss_type CE (each expert's full-catalogue softmax)")
            setattr(self, name, value)
        # the weight of each expert's own CE, in EXPERTS' order
        self.own_loss_weights = (self.sequential_loss_weight, self.expert_loss_weight, self.expert_loss_weight)
        self.gbce_beta = gbce_beta(self.train_neg_num, self.n_items - 1, config["gbce_t"])
        dropout = config["dropout"]
        # in training, each input item of a sequence is dropped (its input vector zeroed, its position kept) with
        # this probability: BERT4Rec's masking as a regulariser of the causal backbone (the targets are unchanged)
        self.input_item_dropout = config["input_item_dropout"] or 0.0
        if not 0.0 <= self.input_item_dropout < 1.0:
            raise ConfigError(f"input_item_dropout must be in [0, 1), got {self.input_item_dropout}")

        self.item_embedding = nn.Embedding(self.n_items, self.item_emb_dim, padding_idx=0)
        self.item_proj = nn.Linear(self.item_emb_dim, self.hidden_dim)  # ID embedding -> hidden size
        self.backbone = SASRecBackbone(
            self.hidden_dim,
            config["sasrec_num_blocks"],
            config["sasrec_num_heads"],
            config["sasrec_inner_dim"],
            self.max_seq_length,  # MAX_ITEM_LIST_LENGTH positions
            dropout,
        )
        if self.user_emb_dim:
            self.user_embedding = nn.Embedding(dataset.user_num, self.user_emb_dim)
            self.user_proj = nn.Linear(self.user_emb_dim, self.hidden_dim, bias=False)
        # parameters with one row per user (row = user id): a user's row is trained by that user's data alone
        self.per_user_parameters: tuple[str, ...] = ("user_embedding.weight",) if self.user_emb_dim else ()
        # parameters with one row per item (row = item id): a training step changes only the rows of the items
        # it scored, which lets federated aggregation average a row over the clients that changed it
        self.per_item_parameters: tuple[str, ...] = ("item_embedding.weight",)

        id_field = config["feature_id_field"]
        self.item_features = ItemFeatures(
            visual=item_feature_table(dataset, id_field, config["visual_feature_field"], config["visual_dim"]),
            text=item_feature_table(dataset, id_field, config["text_feature_field"], config["text_dim"]),
        )
        # the content experts: the visual one reads CLIP features with one head, the semantic one SBERT features
        self.visual_expert = ContentExpert(config["visual_dim"], self.hidden_dim, 1, dropout)
        self.semantic_expert = ContentExpert(config["text_dim"], self.hidden_dim, config["semantic_num_heads"], dropout)
        self.backbone_feature_proj = nn.ModuleDict(
            {
                name: nn.Linear(dim, self.hidden_dim, bias=False)
                for name, dim, present in (
                    ("text", config["text_dim"], self.item_features.has_text),
                    ("visual", config["visual_dim"], self.item_features.has_visual),
                )
                if present and config["backbone_item_features"]
            }
        )
        self.router = ItemCentricRouter(self.item_emb_dim, config["router_hidden_dim"], len(EXPERTS), dropout)
        self.memory_type = config["memory_type"]
        self.memory_top_k = config["memory_top_k"]
        self.memory_top_k_eval = config["memory_top_k_eval"] or self.memory_top_k
        self.time_field = config["TIME_FIELD"]
        if self.memory_type == "history":
            self.memory = RecentHistoryMemory(self.item_features, top_k=self.memory_top_k)
        elif self.memory_type == "dynamic":
            if self.time_field not in dataset.field2source:
                raise ConfigError(
                    f"memory_type=dynamic needs interaction times: the dataset has no TIME_FIELD '{self.time_field}' "
                    "(load it in load_col, or use memory_type=history)"
                )
            self.memory = LocalDynamicMemory(
                dataset.user_num,
                self.item_features,
                capacity=config["memory_capacity"],
                surprise_threshold=config["memory_surprise_threshold"],
                utility_alpha=config["memory_utility_alpha"],
                utility_beta=config["memory_utility_beta"],
                recency_decay=config["memory_recency_decay"],
                num_global_prototypes=config["num_memory_prototypes"] if config["enable_prototype_aggregation"] else 0,
            )
        else:
            raise ConfigError(f"memory_type must be 'history' or 'dynamic', got {self.memory_type!r}")
        self.register_buffer(
            "expert_enabled",
            torch.tensor([True, self.item_features.has_visual, self.item_features.has_text]),
            persistent=False,
        )  # [X]
        # the router and the expert modules exist whatever the data; with no content expert live the router is unused
        self.content_experts_on = bool(self.expert_enabled[1:].any())

        self.apply(self._init_weights)
        self.logger.info(f"UR4RecV2MoE live experts: {', '.join(self.live_experts)}" + self._off_reason(id_field))

    # ------------------------------------------------------------------ setup
    @property
    def per_user_state(self) -> tuple[str, ...]:
        """State-dict names of every tensor with one row per user (dim 0 = user id): the users' private state
        (the per-user parameters and LocalDynamicMemory's slots)."""
        memory = tuple(f"memory.{name}" for name in getattr(self.memory, "per_user_buffers", ()))
        return self.per_user_parameters + memory

    @property
    def live_experts(self) -> list[str]:
        return [name for name, on in zip(EXPERTS, self.expert_enabled.tolist(), strict=True) if on]

    def _off_reason(self, feature_id_field: str | None) -> str:
        off = [name for name, on in zip(EXPERTS, self.expert_enabled.tolist(), strict=True) if not on]
        if not off:
            return ""
        if not feature_id_field:
            return f" (off, switched off by the config, feature_id_field is not set: {', '.join(off)})"
        return f" (off, no item features of that modality in the dataset: {', '.join(off)})"

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=0.02)
            if module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()

    # ---------------------------------------------------------------- scoring
    def sequence_item_repr(self, item_seq: Tensor) -> Tensor:
        """Backbone input of ``item_seq`` [B, L] -> [B, L, H]: projected ID embedding (+ projected item features),
        in training with ``input_item_dropout`` of the items zeroed.

        With ``backbone_item_features`` the history items' text / visual features are added, so
        ``seq_repr`` carries the content of what the user met; a missing feature adds nothing.
        """
        item_repr = self.item_proj(self.item_embedding(item_seq))  # [B, L, H]
        for name, projection in self.backbone_feature_proj.items():
            item_repr = item_repr + projection(getattr(self.item_features, name)[item_seq])
        if self.training and self.input_item_dropout:
            # one mask entry per (sequence, position), drawn as dropout's masks are (keyed in federated steps)
            kept = fast_dropout(item_repr.new_ones(*item_seq.shape, 1), self.input_item_dropout, True) != 0  # [B, L, 1]
            item_repr = item_repr * kept
        return item_repr

    def encode_sequence(self, item_seq: Tensor, item_seq_len: Tensor, user_ids: Tensor | None = None) -> Tensor:
        """``item_seq`` [B, L] right-padded, ``item_seq_len`` [B] -> seq_repr [B, H]."""
        seq_repr = self.backbone(self.sequence_item_repr(item_seq), item_seq_len)  # [B, H]
        if self.user_emb_dim and user_ids is not None:
            seq_repr = seq_repr + self.user_proj(self.user_embedding(user_ids))
        return seq_repr

    def score_candidates(
        self,
        seq_repr: Tensor,
        memory: MemoryReadout,
        candidates: Tensor | None = None,
        *,
        all_items: bool = False,
    ) -> tuple[Tensor, Routing | None]:
        """Scores and router weights of candidates for each user (see :meth:`_score`)."""
        scores, routing, _ = self._score(seq_repr, memory, candidates, all_items=all_items)
        return scores, routing

    def _score(
        self,
        seq_repr: Tensor,
        memory: MemoryReadout,
        candidates: Tensor | None = None,
        *,
        all_items: bool = False,
    ) -> tuple[Tensor, Routing | None, ExpertVectors | None]:
        """Scores, router weights and each expert's vectors of candidates for each user.

        ``candidates``: [B, C] item ids per user, or ``None`` for all items (shared, [N]).
        Item-only work runs once per distinct candidate of the batch, or with
        ``all_items`` once per item of the catalogue (a fixed shape, as ``torch.func.vmap`` needs).
        -> final scores [B, C] (or [B, N]), the router's :class:`Routing` and the experts' :class:`ExpertVectors`
        (both ``None`` with the experts off: the sequential expert's weight is 1).
        """
        whole_catalogue = candidates is None or all_items  # items = every item id, in order
        if candidates is None:
            items, index = torch.arange(self.n_items, device=seq_repr.device), None  # [N], shared by all users
        elif all_items:
            items, index = torch.arange(self.n_items, device=seq_repr.device), candidates  # [N], [B, C]
        else:
            # item-only work runs once per distinct item of the batch, then is gathered per user
            items, index = torch.unique(candidates, return_inverse=True)  # [U], [B, C]
        features = self.item_features
        item_id_emb = self.item_embedding(items)  # [U, E]
        sequential_candidates = self.item_proj(item_id_emb)  # [U, H]
        if not self.content_experts_on:  # the sequential expert alone: its weight is 1, no router
            return candidate_dot(sequential_candidates, seq_repr, index), None, None  # [B, C]
        # each expert as (user vector [B, H], candidate vector [U, H]); None: not live for anyone here
        users: list[Tensor | None] = [seq_repr, None, None]
        candidates: list[Tensor | None] = [sequential_candidates, None, None]
        live_items = torch.ones(len(items), dtype=torch.bool, device=seq_repr.device)  # [U]
        live_users = torch.ones(seq_repr.size(0), dtype=torch.bool, device=seq_repr.device)  # [B]
        item_live, user_live = [live_items, ~live_items, ~live_items], [live_users, ~live_users, ~live_users]
        if self.unseen_items is not None:  # an item never trained on has an untrained ID: the content experts score it
            item_live[0] = ~self.unseen_items[items]
        user_memory = {"visual": (memory.visual, memory.visual_mask), "semantic": (memory.text, memory.text_mask)}

        for slot, name in ((1, "visual"), (2, "semantic")):
            memory_feats, memory_mask = user_memory[name]
            if not self.expert_enabled[slot] or memory_feats is None:
                continue
            available = features.visual_available if name == "visual" else features.text_available
            item_live[slot], user_live[slot] = available[items], memory_mask.any(dim=1)  # [U], [B]
            expert = self.visual_expert if name == "visual" else self.semantic_expert
            table = features.visual if name == "visual" else features.text  # [n_items, F]
            # the whole catalogue is the table itself: no [n_items, F] copy per step
            feature = table if whole_catalogue else table[items]  # [U, F]
            users[slot] = expert.user_vector(seq_repr, memory_feats.to(seq_repr.dtype), memory_mask)  # [B, H]
            candidates[slot] = expert.candidate_vector(feature)  # [U, H]

        router_input = item_id_emb.detach() if self.router_detached_items else item_id_emb  # [U, E]
        routing = self.router(
            router_input, torch.stack(item_live, dim=1), torch.stack(user_live, dim=1), index, items
        )  # item_live [U, X], user_live [B, X]
        return routing.score(users, candidates), routing, ExpertVectors(users, candidates)  # [B, C]

    # ----------------------------------------------------------------- memory
    def read_memory(
        self, user_ids: Tensor, item_seq: Tensor, item_seq_len: Tensor, times: Tensor | None
    ) -> MemoryReadout:
        """The memory the experts read for samples whose input is ``item_seq`` [B, L] and target time ``times`` [B].

        LocalDynamicMemory shows only slots whose interaction time is strictly before the target's, so a
        sample never sees its own target or anything later; the history stand-in reads the input itself.
        """
        if isinstance(self.memory, RecentHistoryMemory):
            return self.memory.retrieve(user_ids, item_seq, item_seq_len)
        if times is None:
            raise ValueError("LocalDynamicMemory reads need the target's time (TIME_FIELD) of every sample")
        top_k = self.memory_top_k if self.training else self.memory_top_k_eval
        return self.memory.retrieve_multimodal_memory(user_ids, top_k=top_k, before=times)

    def set_memory_clock(self, step: int) -> None:
        """Set LocalDynamicMemory's training clock (the step its reads see and its writes are stamped from)."""
        if isinstance(self.memory, LocalDynamicMemory):
            self.memory.step.fill_(step)

    def write_memory(self, writes: MemoryWrites | None, step: int | None = None) -> int:
        """Offer a training step's positives to LocalDynamicMemory (written if their surprise passes the
        threshold), at memory step ``step`` (default: the next step) -> number of interactions written.

        The training step calls it after its optimizer step (:func:`recbole_feddmmr.trainer.train_steps`,
        centralised and federated alike), with the ``memory_writes`` of the loss it just took.
        """
        if writes is None or not isinstance(self.memory, LocalDynamicMemory):
            return 0
        users, items, surprises, times = writes
        return self.memory.add_batch(users, items, surprises, times, step=step)

    def prototype_memory(self) -> LocalDynamicMemory | None:
        """The memory a federated client summarises into prototypes (LocalDynamicMemory), or ``None``."""
        return self.memory if isinstance(self.memory, LocalDynamicMemory) else None

    @property
    def writes_memory(self) -> bool:
        """Whether a training loss now returns its positives as memory writes (:meth:`write_memory`)."""
        return self.training and isinstance(self.memory, LocalDynamicMemory)

    # ------------------------------------------------------- RecBole interface
    def _target_times(self, interaction) -> Tensor | None:
        return interaction[self.time_field] if self.time_field in interaction else None

    def _read_batch(self, interaction) -> tuple[Tensor, Tensor, Tensor, Tensor, MemoryReadout]:
        user_ids = interaction[self.USER_ID]
        item_seq = interaction[self.ITEM_SEQ]  # [B, L]
        item_seq_len = interaction[self.ITEM_SEQ_LEN]  # [B]
        memory = self.read_memory(user_ids, item_seq, item_seq_len, self._target_times(interaction))
        return user_ids, item_seq, item_seq_len, self.encode_sequence(item_seq, item_seq_len, user_ids), memory

    def _loss(
        self,
        seq_repr: Tensor,
        memory: MemoryReadout,
        positives: Tensor,
        negatives: Tensor | None = None,
        weight: Tensor | None = None,
        all_items: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """``seq_repr`` [P, H] and memory of P prediction points, ``positives`` [P] -> (rec loss, weighted lb loss,
        surprise [P] of the positives, see :func:`surprise_of`, or ``None`` when the memory is not written).

        ``negatives`` [P, N] (BPR / SSM; drawn here when ``None``); ``weight`` [P] 0 for padded points.
        """
        experts = None
        if self.loss_type == "CE":
            scores, routing, experts = self._score(seq_repr, memory)  # [P, n_items]
            surprise = None
            if self.writes_memory:  # negatives = every item but the positive and the padding item 0
                raw = scores.detach()
                positive_score = raw.gather(1, positives[:, None]).squeeze(1)  # [P]
                mean_negative = (raw.sum(dim=1) - positive_score - raw[:, 0]) / (self.n_items - 2)  # [P]
                surprise = 1.0 - torch.sigmoid(positive_score - mean_negative)
            rec_loss = full_softmax_loss(scores, positives, weight, self.unseen_items)
        else:
            if negatives is None:
                negatives = self.sample_negatives(positives)  # [P, N]
            candidates = torch.cat([positives[:, None], negatives], dim=1)  # [P, 1 + N]
            scores, routing = self.score_candidates(seq_repr, memory, candidates, all_items=all_items)
            valid = None if self.negative_distribution == "uniform" else negatives != positives[:, None]  # [P, N]
            if self.loss_type == "BPR":
                rec_loss = bpr_loss(scores, weight, valid)
            elif self.loss_type == "SSM":
                rec_loss = sampled_softmax_loss(scores, weight, self.log_expected_draws(negatives), valid)
            else:  # gBCE
                rec_loss = gbce_loss(scores, self.gbce_beta, weight, valid)
            surprise = surprise_of(scores.detach()) if self.writes_memory else None
        if routing is None:  # the sequential expert alone: nothing to balance
            return rec_loss, scores.new_zeros(()), surprise
        if any(self.own_loss_weights) and experts is not None:
            rec_loss = rec_loss + self.own_expert_loss(experts, routing, positives, weight)
        lb_loss = balance_penalty(*routing.load_balance(self.expert_enabled, weight))
        return rec_loss, self.load_balance_weight * lb_loss, surprise

    def own_expert_loss(
        self, experts: ExpertVectors, routing: Routing, positives: Tensor, weight: Tensor | None = None
    ) -> Tensor:
        """Sum over the live experts of ``own_loss_weights[e]`` x expert e's own full-catalogue CE (its score
        alone, not weighted by the router), ``experts`` of P points scored against all items, ``positives`` [P],
        ``weight`` [P] -> [].

        Expert e's softmax runs over the items it can score (``routing.item_live[:, e]``; the items left out of
        the main softmax stay out), on its points whose user has memory of its modality and whose positive has
        its feature. For the sequential expert that is every item with a trained ID and every point.
        """
        total = positives.new_zeros((), dtype=experts.users[0].dtype)
        for e, expert_weight in enumerate(self.own_loss_weights):
            if not expert_weight or experts.users[e] is None:
                continue
            scores = experts.users[e] @ experts.candidates[e].T  # [P, n_items]
            excluded = ~routing.item_live[:, e]  # [n_items]
            if self.unseen_items is not None:
                excluded = excluded | self.unseen_items
            point_weight = routing.user_live[:, e] & routing.item_live[positives, e]  # [P]
            point_weight = point_weight.to(scores.dtype) * (1.0 if weight is None else weight)
            total = total + expert_weight * full_softmax_loss(scores, positives, point_weight, excluded)
        return total

    def sample_negatives(self, positives: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``train_neg_num`` negatives per positive [P] -> [P, N]: uniform over the other items (never the
        positive), or by popularity (``train_neg_distribution``; a draw may be the positive, which the loss
        leaves out)."""
        if self.negative_distribution == "uniform":
            return sample_negatives(positives, self.n_items, self.train_neg_num, generator)
        return sample_by_weight(positives, self.negative_weights, self.train_neg_num, generator)

    def log_expected_draws(self, negatives: Tensor) -> Tensor:
        """``log(N q_j)`` of each sampled negative [P, N], for the sampled softmax's logQ correction."""
        if self.negative_distribution == "uniform":  # q = 1 / (n_items - 2): the same for every negative
            return negatives.new_full(
                negatives.shape, math.log(self.train_neg_num / (self.n_items - 2)), dtype=torch.float
            )
        probability = self.negative_weights / self.negative_weights.sum()  # [n_items]
        return torch.log(self.train_neg_num * probability[negatives])

    @staticmethod
    def _writes(users: Tensor, positives: Tensor, surprise: Tensor | None, times: Tensor | None) -> MemoryWrites | None:
        return None if surprise is None else MemoryWrites(users, positives, surprise, times)

    def training_loss(self, interaction) -> TrainingLoss:
        """RecBole's per-sample batch -> its :class:`TrainingLoss` (losses and the memory writes it implies)."""
        user_ids, _, _, seq_repr, memory = self._read_batch(interaction)
        positives, times = interaction[self.ITEM_ID], self._target_times(interaction)
        rec_loss, lb_loss, surprise = self._loss(seq_repr, memory, positives)
        return TrainingLoss(rec_loss, lb_loss, self._writes(user_ids, positives, surprise, times))

    def calculate_loss(self, interaction) -> tuple[Tensor, Tensor]:
        """RecBole's interface: (recommendation loss, weighted load-balance loss) of a per-sample batch.

        It also makes the batch's memory writes right away, so a model trained by RecBole's own Trainer
        fills its memory too. (Writing before the backward pass is safe: memory reads are copies.) The
        plugin's trainer uses the window loss instead and writes after each optimizer step.
        """
        loss = self.training_loss(interaction)
        self.write_memory(loss.memory_writes)
        return loss.losses

    def prediction_points(
        self,
        user_ids: Tensor,
        windows: Tensor,
        targets: Tensor,
        target_mask: Tensor,
        target_times: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> PredictionPoints:
        """The parameter-free inputs of the window loss: every marked position of ``windows`` [B, L] as a
        prediction point, with its memory read and, with a ``generator``, its negatives drawn.

        ``targets`` [B, L] the item that follows each position, ``target_mask`` [B, L] which positions are
        training targets, ``target_times`` [B, L] the time of each target (needed by LocalDynamicMemory).
        """
        row, position = target_mask.nonzero(as_tuple=True)  # [P], [P]
        users, positives = user_ids[row], targets[row, position]  # [P], [P]
        times = None if target_times is None else target_times[row, position]  # [P]
        # without a generator the loss draws the negatives from the global generator after the backbone's
        # dropout, as before this split, so centralised runs keep their random stream
        negatives = dropout_key = None
        if generator is not None and self.loss_type != "CE":
            negatives = self.sample_negatives(positives, generator)  # [P, N]
        if generator is not None:  # the step's dropout masks come from the same stream: any backend draws them alike
            dropout_key = torch.randint(2**31, (), generator=generator, device=generator.device)
        memory = self.read_memory(users, windows[row], position + 1, times)
        return PredictionPoints(row, position, users, positives, times, memory, negatives, None, dropout_key)

    def points_loss(
        self, windows: Tensor, points: PredictionPoints, *, all_items: bool = False
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The window loss at ``points`` (see :meth:`prediction_points`) of ``windows`` [B, L], in one backbone
        pass -> (rec loss, weighted lb loss, surprise [P] or ``None``). With ``all_items`` and padded points
        it is a pure function of the parameters (``torch.func`` can vmap it).
        """
        with keyed_dropout(points.dropout_key):
            hidden = self.backbone.all_positions(self.sequence_item_repr(windows))  # [B, L, H]
            seq_repr = hidden[points.rows, points.positions]  # [P, H]
            if self.user_emb_dim:
                seq_repr = seq_repr + self.user_proj(self.user_embedding(points.users))
            return self._loss(seq_repr, points.memory, points.positives, points.negatives, points.weight, all_items)

    def calculate_window_loss(
        self,
        user_ids: Tensor,
        windows: Tensor,
        targets: Tensor,
        target_mask: Tensor,
        target_times: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> TrainingLoss:
        """The same loss over every marked position of whole sequence windows, in one backbone pass.

        ``windows`` [B, L] items (right-padded), ``targets`` [B, L] the item that follows each
        position, ``target_mask`` [B, L] which positions are training targets, ``target_times`` [B, L]
        the time of each target (needed by LocalDynamicMemory). Position t is the
        prediction point of a sample whose input is ``windows[:, :t + 1]``: exactly RecBole's
        sample for that target whenever the window starts at the user's first item.
        Negatives come from ``generator`` (default: torch's global generator). The memory writes are
        returned, not made: the training step makes them after its optimizer step.
        """
        points = self.prediction_points(user_ids, windows, targets, target_mask, target_times, generator=generator)
        rec_loss, lb_loss, surprise = self.points_loss(windows, points)
        return TrainingLoss(rec_loss, lb_loss, self._writes(points.users, points.positives, surprise, points.times))

    def predict(self, interaction) -> Tensor:
        """Score of each row's ``item_id`` -> [B]."""
        _, _, _, seq_repr, memory = self._read_batch(interaction)
        scores, _ = self.score_candidates(seq_repr, memory, interaction[self.ITEM_ID][:, None])
        return scores[:, 0]

    def full_sort_predict(self, interaction) -> Tensor:
        """Scores of every item for every user of the batch -> [B, n_items] (users in chunks to bound memory)."""
        _, _, _, seq_repr, memory = self._read_batch(interaction)
        chunks = []
        for start in range(0, seq_repr.size(0), self.eval_user_chunk):
            part = slice(start, start + self.eval_user_chunk)
            chunk_memory = MemoryReadout(*(None if t is None else t[part] for t in memory))
            chunks.append(self.score_candidates(seq_repr[part], chunk_memory)[0])
        return torch.cat(chunks, dim=0)

    def router_weights_for(self, interaction) -> Tensor:
        """Router weights of every item for the batch's users, [B, n_items, X] (analysis, e.g. expert usage)."""
        _, _, _, seq_repr, memory = self._read_batch(interaction)
        scores, routing = self.score_candidates(seq_repr, memory)  # [B, n_items]
        if routing is None:  # the sequential expert alone: weight 1
            return torch.stack([torch.ones_like(scores), torch.zeros_like(scores), torch.zeros_like(scores)], dim=-1)
        return routing.dense()
