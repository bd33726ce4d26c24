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

from recbole_feddmmr.analysis import memory_table, recommend
from recbole_feddmmr.errors import ConfigError, run_cli


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
