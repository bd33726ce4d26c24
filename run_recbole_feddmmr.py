"""Train and evaluate a model (UR4RecV2MoE by default, or any RecBole model) on a dataset.

    python run_recbole_feddmmr.py --dataset ml-100k
    python run_recbole_feddmmr.py --model SASRec --dataset ml-100k --epochs=20
    python run_recbole_feddmmr.py -d ml-100k --config_files "my.yaml other.yaml" --learning_rate=0.0005

``--key=value`` (or ``--key value``) arguments override any config entry, as in RecBole. At the end the
run prints a summary (best epoch, validation and test metrics) and where it wrote its checkpoint, log,
TensorBoard events and ``<log name>.results.json``.
"""

from __future__ import annotations

import argparse
import sys

from recbole_feddmmr.config import parse_overrides
from recbole_feddmmr.errors import run_cli


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", default="UR4RecV2MoE", help="model name (plugin first, then RecBole)")
    parser.add_argument("-d", "--dataset", default="ml-100k", help="dataset name under dataset_atomic/")
    parser.add_argument("--config_files", default=None, help="space-separated yaml files")
    args, settings = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    parse_overrides(settings)  # a malformed setting fails here, before RecBole's stack is imported
    from recbole_feddmmr.quick_start import run_recbole_feddmmr

    config_files = args.config_files.split() if args.config_files else None
    return run_recbole_feddmmr(model=args.model, dataset=args.dataset, config_file_list=config_files, cmd_args=settings)


def cli() -> None:
    """The ``recbole-feddmmr`` console script: :func:`main`, with deliberate errors as one line."""
    run_cli(main)


if __name__ == "__main__":
    cli()
