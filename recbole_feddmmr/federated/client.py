"""A federated client: local training on its own users' sequences; only an update and summaries leave it."""

from __future__ import annotations

from collections.abc import Collection, Iterator
from functools import partial

import numpy as np
import torch
from sklearn.cluster import KMeans
from torch import Tensor, nn

from recbole_feddmmr.data import SequenceWindows
from recbole_feddmmr.federated.aggregation import sparse_row_updates, sum_ready_upload
from recbole_feddmmr.federated.attacks import poison
from recbole_feddmmr.federated.contracts import FederatedModel
from recbole_feddmmr.federated.messages import ClientResult, FitInstructions, LocalSettings
from recbole_feddmmr.federated.privacy import clip_update
from recbole_feddmmr.federated.state import ClientStateStore, Residents
from recbole_feddmmr.trainer import train_steps


def local_optimizer(
    params: dict[str, Tensor], settings: LocalSettings, row_tables: Collection[str]
) -> torch.optim.Optimizer:
    """A client's fresh optimizer for one round (elementwise, so one over stacked client copies is each
    client's own). ``row_tables`` (the per-item tables) get no weight decay: the optimizer would decay every
    row, so a row the client never scored would count as changed, and its sparse upload would become the
    whole table (and row-wise aggregation would count every client on every row)."""
    groups = [
        {"params": [p for name, p in params.items() if name not in row_tables], "weight_decay": settings.weight_decay},
        {"params": [p for name, p in params.items() if name in row_tables], "weight_decay": 0.0},
    ]
    groups = [group for group in groups if group["params"]]
    if settings.local_optimizer == "sgd":
        return torch.optim.SGD(groups, lr=settings.local_lr)
    return torch.optim.Adam(groups, lr=settings.local_lr)


def proximal_term(params: dict[str, Tensor], global_params: dict[str, Tensor], mu: float) -> Tensor:
    """FedProx's ``mu / 2 * ||w - w_global||^2`` over the shared parameters (one client's or, under vmap, each's)."""
    return mu / 2 * sum(((params[name] - value) ** 2).sum() for name, value in global_params.items())


def shared_parameters(model: FederatedModel) -> dict[str, Tensor]:
    """What the server aggregates: the model's trainable parameters (detached copies). Buffers, such as the
    users' memories, and the model's per-user state (e.g. the user embedding, one row per user) are
    private: each client trains its own users' rows, which never leave it (see ``state.py``)."""
    private = set(model.per_user_state)
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad and name not in private}


def load_parameters(model: nn.Module, params: dict[str, Tensor]) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in params:
                p.copy_(params[name])


def client_generator(seed: int, round_idx: int, client_id: int, device: torch.device) -> torch.Generator:
    """The random stream of one client in one round (its negatives). It depends on nothing but
    (seed, round, client), so every execution backend, in any order, draws the same numbers."""
    state = int(np.random.SeedSequence([seed, round_idx, client_id]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator(device=device).manual_seed(state)


def memory_prototypes(
    features: Tensor, num_prototypes: int = 5, seed: int = 0, min_entries: int = 5
) -> tuple[Tensor, Tensor]:
    """A client's memory features [n, D] -> (k-means centres [k, D], entries per centre [k]).

    A centre is sent only if it averages at least ``min_entries`` memory entries: k = min(K, n // min_entries)
    clusters, and a cluster that k-means left with fewer entries is dropped. So no prototype is one item's
    feature row (which would tell the server an item the user has seen), and a client with fewer than
    ``min_entries`` entries sends none.
    """
    min_entries = max(1, min_entries)
    clusters = min(num_prototypes, len(features) // min_entries)
    if clusters == 0:
        return torch.zeros(0, features.size(1)), torch.zeros(0)
    if clusters == 1:
        return features.double().mean(dim=0, keepdim=True).float(), torch.tensor([float(len(features))])
    # one k-means++ start (scikit-learn's default): every client runs this every round, and a few dozen
    # memory entries need no restarts (the server's merge, once a round, keeps 4)
    kmeans = KMeans(n_clusters=clusters, n_init=1, random_state=seed)
    labels = kmeans.fit_predict(features.double().numpy())
    counts = torch.bincount(torch.as_tensor(labels), minlength=clusters).float()
    keep = counts >= min_entries
    return torch.as_tensor(kmeans.cluster_centers_).float()[keep], counts[keep]


class FedMemClient:
    """One client of the simulation: its users and their training windows.

    Its private state (its users' memory slots and per-user parameter rows) lives in the client state
    store and is resident in the simulation's model only while it trains; what it returns
    (:class:`ClientResult`) holds only a parameter update, a sample count and k-means summaries of its
    memory.
    """

    def __init__(
        self, client_id: int, user_ids: Tensor, windows: SequenceWindows, window_index: Tensor | None = None
    ) -> None:
        """``window_index``: the client's windows if already known (see :meth:`SequenceWindows.windows_of_groups`)."""
        self.client_id = client_id
        self.user_ids = user_ids
        self.window_index = windows.windows_of(user_ids) if window_index is None else window_index  # [w]
        self.num_samples = int(windows.target_mask[self.window_index].sum())

    def steps_per_epoch(self, windows: SequenceWindows, settings: LocalSettings) -> int:
        per_batch = windows.windows_per_batch_for(settings.local_batch_size)
        return -(-len(self.window_index) // per_batch)

    def epoch_batches(
        self,
        windows: SequenceWindows,
        round_idx: int,
        local_epoch: int,
        settings: LocalSettings,
        residents: Residents,
    ) -> list[tuple[Tensor, ...]]:
        """This client's batches of one local epoch, in order (shuffled by seed, round and epoch), with user
        ids turned into the resident rows of the model."""
        per_batch = windows.windows_per_batch_for(settings.local_batch_size)
        epoch_idx = round_idx * settings.local_epochs + local_epoch
        batches = windows.epoch(epoch_idx, subset=self.window_index, windows_per_batch=per_batch)
        return [(residents.rows(user_ids), *rest) for user_ids, *rest in batches]

    def prototypes(self, model: FederatedModel, settings: LocalSettings, residents: Residents) -> tuple[Tensor, Tensor]:
        """k-means centres [k, D] of this client's memory entries and their sizes [k] (empty without a memory)."""
        memory = model.prototype_memory()
        if not settings.num_prototypes or memory is None:
            return torch.zeros(0, 0), torch.zeros(0)
        entries = memory.entry_features(residents.rows(self.user_ids)).cpu()  # [n, Fv + Ft]
        if entries.size(1) == 0:  # the memory stores no feature modality (experts off): nothing to summarise
            return torch.zeros(0, 0), torch.zeros(0)
        return memory_prototypes(entries, settings.num_prototypes, settings.seed, settings.prototype_min_entries)

    def result(
        self,
        model: FederatedModel,
        settings: LocalSettings,
        residents: Residents,
        update: dict[str, Tensor],
        mean_loss: float,
        global_params: dict[str, Tensor] | None = None,
    ) -> ClientResult:
        """What this client sends up after training ``model`` (its users resident): the dense update
        ``update`` (local - global) cut to the changed rows of the item tables, its memory's prototypes,
        its sample count and loss. Every backend builds a client's message here."""
        attack = settings.attack
        if attack is not None and attack.on and self.client_id in attack.malicious:  # a malicious client's upload
            update = poison(update, global_params or {}, model.per_item_parameters, attack)
        weight = None
        if settings.clip_norm is not None:  # user-level DP: a bounded upload, and every client weighs the same
            update, weight = clip_update(update, settings.clip_norm), 1.0
        if settings.secure_aggregation:  # dense, weighted, no prototype: what the server can only sum
            upload_weight = self.num_samples if weight is None else weight
            weighted, row_weights = sum_ready_upload(
                update, upload_weight, settings.aggregation, model.per_item_parameters
            )
            return ClientResult(
                weighted, self.num_samples, torch.zeros(0, 0), torch.zeros(0), mean_loss=mean_loss,
                client_id=self.client_id, weight=upload_weight, sum_ready=True, row_weights=row_weights,
            )  # fmt: skip
        message, changed_rows = sparse_row_updates(update, model.per_item_parameters)
        centres, counts = self.prototypes(model, settings, residents)
        return ClientResult(
            message,
            self.num_samples,
            centres,
            counts,
            mean_loss=mean_loss,
            client_id=self.client_id,
            changed_rows=changed_rows,
            weight=weight,
        )

    def fit(
        self, model: FederatedModel, instructions: FitInstructions, windows: SequenceWindows, residents: Residents
    ) -> ClientResult:
        """Train ``model`` from the round's global parameters on this client's windows -> its update and
        prototypes.

        ``residents``: this client's users, whose private rows the client state store made resident in
        ``model``; the optimizer trains those per-user rows too (they stay with the client).
        """
        global_params, settings, round_idx = instructions.parameters, instructions.settings, instructions.round_idx
        load_parameters(model, global_params)
        model.train()
        trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
        optimizer = local_optimizer(trainable, settings, model.per_item_parameters)
        proximal = None
        if settings.fedprox_mu > 0:
            proximal = partial(proximal_term, dict(model.named_parameters()), global_params, settings.fedprox_mu)

        generator = client_generator(settings.seed, round_idx, self.client_id, windows.user_ids.device)
        loss_func = partial(model.calculate_window_loss, generator=generator)
        loss_sum, steps = 0.0, 0
        for local_epoch in range(settings.local_epochs):
            batches = self.epoch_batches(windows, round_idx, local_epoch, settings, residents)
            clock = instructions.clock_at(local_epoch)  # train_steps adds the step index
            total = train_steps(model, optimizer, batches, loss_func, extra_loss=proximal, memory_clock=clock)
            loss_sum += sum(total) if isinstance(total, tuple) else total or 0.0
            steps += len(batches)
        update = {
            name: p.detach() - global_params[name] for name, p in model.named_parameters() if name in global_params
        }
        return self.result(model, settings, residents, update, loss_sum / steps if steps else 0.0, global_params)


def train_in_turn(
    model: FederatedModel,
    clients: list[FedMemClient],
    instructions: FitInstructions,
    windows: SequenceWindows,
    store: ClientStateStore,
) -> Iterator[ClientResult]:
    """Train ``clients`` one after another on ``model``, each with only its own private rows resident, and
    yield each one's result: the sequential backend, and what a Ray actor does with its shard."""
    for client in clients:
        residents = store.load(model, [client])  # the model holds this client's private rows only
        result = client.fit(model, instructions, windows, residents)
        store.save(model, [client])
        yield result
