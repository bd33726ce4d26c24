"""Recommend with a trained model: a user's top-k next items, why (expert shares), and what its memory holds.

    python -m recbole_feddmmr.recommend --checkpoint saved/UR4RecV2MoE-ml-100k-....pth --user 196 [--k 10] [--json]

The model reads the user's whole history (every interaction of the dataset, oldest first, the latest
``MAX_ITEM_LIST_LENGTH`` of them) and ranks every item for the next step; the user's own items are left
out unless ``--no-exclude-seen``. For UR4RecV2MoE each item also gets the router's weight of each expert
(sequential / visual / semantic; they sum to 1), and the memory entries the experts read for this user
are listed (the ``memory_top_k_eval`` highest-utility slots of LocalDynamicMemory, with their titles,
utility and surprise). Any checkpoint :func:`recbole_feddmmr.load_checkpoint` reads works, RecBole's
models run through the plugin included (they have no experts and no memory).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import pandas as pd
import torch
from recbole.data.interaction import Interaction

from recbole_feddmmr.errors import ConfigError, run_cli
from recbole_feddmmr.model.ur4rec_v2_moe import EXPERTS  # the router's columns, in order


def user_id_of(dataset, user: str | int) -> int:
    """RecBole's internal id of ``user``: its token as in the .inter file (e.g. ``"196"``), or the id itself (int)."""
    if isinstance(user, int):
        if not 0 < user < dataset.user_num:
            raise ConfigError(f"user id {user} is outside 1..{dataset.user_num - 1}")
        return user
    try:
        return int(dataset.token2id(dataset.uid_field, str(user)))
    except ValueError:
        example = dataset.id2token(dataset.uid_field, 1)
        raise ConfigError(
            f"unknown user '{user}' in dataset {dataset.dataset_name} (users are the .inter file's "
            f"{dataset.uid_field} tokens, e.g. '{example}')"
        ) from None


def item_titles(dataset, item_ids) -> list[str] | None:
    """The items' titles, when the .item file has a title column."""
    title_field = next((f for f in ("movie_title", "title", "name") if f in dataset.field2source), None)
    if title_field is None or dataset.item_feat is None:
        return None
    titles = dataset.item_feat[title_field][item_ids]  # token sequences -> words
    return [" ".join(dataset.id2token(title_field, row[row > 0])) for row in titles.numpy()]


def item_frame(dataset, item_ids: torch.Tensor, **columns) -> pd.DataFrame:
    """A table of items ``item_ids`` [n]: item token, title (when the .item file has one), then ``columns``."""
    table = pd.DataFrame({"item": dataset.id2token(dataset.iid_field, item_ids)})
    titles = item_titles(dataset, item_ids)
    if titles is not None:
        table["title"] = titles
    for name, values in columns.items():
        table[name] = values
    return table


def memory_table(model, dataset, user: str | int) -> pd.DataFrame:
    """One user's memory, highest utility first: item token, title (if the .item file has one), utility, ...

    ``user`` is the user's token as in the .inter file (e.g. ``"196"``) or RecBole's internal id (int).
    """
    memory = getattr(model, "memory", None)
    if not hasattr(memory, "user_table"):
        raise ConfigError(f"{type(model).__name__} has no LocalDynamicMemory (set memory_type=dynamic)")
    columns = memory.user_table(user_id_of(dataset, user))
    item_ids = columns.pop("item_id").cpu()
    return item_frame(dataset, item_ids, **{name: values.cpu().numpy() for name, values in columns.items()})


def user_history(dataset, user_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every interaction of ``user_id`` in ``dataset`` (all splits), oldest first -> (item ids [n], times [n]);
    without a time field, in the file's order with times 0, 1, ..."""
    feat = dataset.inter_feat
    mine = torch.nonzero(feat[dataset.uid_field] == user_id).squeeze(1)  # [n]
    items = feat[dataset.iid_field][mine]
    if not dataset.time_field:  # no times: the file's order, numbered
        return items, torch.arange(items.numel(), dtype=torch.float64)
    times = feat[dataset.time_field][mine].double()
    order = torch.argsort(times, stable=True)
    return items[order], times[order]


def recommend(model, dataset, user: str | int, k: int = 10, exclude_seen: bool = True) -> pd.DataFrame:
    """The ``k`` items ``model`` ranks first for ``user`` after the user's whole history (the next item, as a
    deployed recommender would be asked; the memory shows everything written before now): item token, title
    (if the .item file has one), score and, for UR4RecV2MoE, the router's weight of each expert for that
    item (they sum to 1). ``exclude_seen``: the user's own items are never recommended."""
    user_id = user_id_of(dataset, user)
    items, times = user_history(dataset, user_id)
    max_len = model.max_seq_length
    sequence = items[-max_len:]  # [L'] the latest items the model can read
    device = next(model.parameters()).device
    item_seq = torch.zeros(1, max_len, dtype=torch.long)
    item_seq[0, : sequence.numel()] = sequence
    fields = {
        model.USER_ID: torch.tensor([user_id]),
        model.ITEM_SEQ: item_seq,  # [1, L] right-padded, as RecBole's sequences
        model.ITEM_SEQ_LEN: torch.tensor([sequence.numel()]),
    }
    if dataset.time_field:  # the prediction time: after the last interaction, so the whole memory is visible
        fields[dataset.time_field] = (times[-1:] + 1) if times.numel() else torch.zeros(1, dtype=torch.float64)
    interaction = Interaction(fields).to(device)
    model.eval()
    with torch.no_grad():
        scores = model.full_sort_predict(interaction).view(-1).float().cpu()  # [n_items]
        scores[0] = float("-inf")  # the padding item
        if exclude_seen:
            scores[items] = float("-inf")
        k = min(k, int(torch.isfinite(scores).sum()))
        top_scores, top_items = scores.topk(k)  # [k]
        shares = {}
        if hasattr(model, "router_weights_for"):
            weights = model.router_weights_for(interaction)[0, top_items.to(device)].float().cpu()  # [k, X]
            shares = {expert: weights[:, column].numpy() for column, expert in enumerate(EXPERTS[: weights.size(1)])}
    return item_frame(dataset, top_items, score=top_scores.numpy(), **shares)


def memory_read(model, dataset, user: str) -> pd.DataFrame | None:
    """The slots of ``user``'s LocalDynamicMemory the experts read at a prediction (highest utility first);
    ``None`` for a model without one."""
    if not hasattr(getattr(model, "memory", None), "user_table"):
        return None
    return memory_table(model, dataset, user).head(model.memory_top_k_eval)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m recbole_feddmmr.recommend",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, help="a .pth the plugin saved (saved/ by default)")
    parser.add_argument("--user", required=True, help="the user's token as in the .inter file, e.g. 196")
    parser.add_argument("--k", type=int, default=10, help="items to recommend (default 10)")
    parser.add_argument(
        "--exclude-seen",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="leave out the items the user has interacted with (default: yes)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: the checkpoint's, if available)")
    args = parser.parse_args(argv)
    if args.k < 1:
        raise ConfigError(f"--k must be >= 1, got {args.k}")

    from recbole_feddmmr.quick_start import load_checkpoint

    config, model, dataset, *_ = load_checkpoint(args.checkpoint, device=args.device)
    items = recommend(model, dataset, args.user, args.k, exclude_seen=args.exclude_seen)
    memory = memory_read(model, dataset, args.user)
    result = {
        "checkpoint": args.checkpoint,
        "model": config["model"],
        "dataset": config["dataset"],
        "user": args.user,
        "exclude_seen": args.exclude_seen,
        "items": items.to_dict(orient="records"),
        "memory": None if memory is None else memory.to_dict(orient="records"),
    }
    if args.json:
        json.dump(result, sys.stdout, indent=1, default=float)
        print()
        return result
    with pd.option_context("display.width", 160, "display.max_colwidth", 50, "display.float_format", "{:.4f}".format):
        seen = "the user's own items left out" if args.exclude_seen else "the user's own items included"
        print(f"top {len(items)} for user {args.user} ({config['model']} on {config['dataset']}; {seen}):")
        print(items.to_string(index=False))
        if memory is not None:
            print(f"\nmemory the experts read for user {args.user} ({len(memory)} entries, highest utility first):")
            print(memory.to_string(index=False) if len(memory) else "(empty)")
    return result


if __name__ == "__main__":
    run_cli(main)
