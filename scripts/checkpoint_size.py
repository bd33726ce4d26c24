"""Size of a UR4RecV2MoE model's saved weights on a dataset, and of the memory in them.

    python scripts/checkpoint_size.py --dataset ml-100k

The memory holds every user's slots (item ids, times, counts, surprise; the items' features stay in the
catalogue). A RecBole checkpoint adds the optimizer state and the config to these bytes.
"""

from __future__ import annotations

import sys
from pathlib import Path

# the checkout this script belongs to, before any installed copy of the package (which may be older)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import io

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    args = parser.parse_args()
    from recbole_feddmmr.quick_start import prepare_run

    settings = {"state": "ERROR", "show_progress": False}
    _, _, model = prepare_run("UR4RecV2MoE", args.dataset, config_dict=settings)
    state = model.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    memory = sum(t.numel() * t.element_size() for name, t in state.items() if name.startswith("memory."))
    print(f"{args.dataset}: weights {buffer.tell() / 1e6:.2f} MB, of which memory {memory / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
