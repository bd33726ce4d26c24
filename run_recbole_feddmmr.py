"""Train and evaluate a model (UR4RecV2MoE by default, or any RecBole model) on a dataset.

    python run_recbole_feddmmr.py --dataset ml-100k
    python run_recbole_feddmmr.py --model SASRec --dataset ml-100k --epochs=20
    python run_recbole_feddmmr.py -d ml-100k --config_files "my.yaml other.yaml" --learning_rate=0.0005

``--key=value`` arguments override any config entry, as in RecBole.
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", default="UR4RecV2MoE", help="model name (plugin first, then RecBole)")
    parser.add_argument("-d", "--dataset", default="ml-100k", help="dataset name under dataset_atomic/")
    parser.add_argument("--config_files", default=None, help="space-separated yaml files")
    # everything else is a RecBole --key=value override, read by Config from sys.argv
    args, _ = parser.parse_known_args(argv)
    from recbole_feddmmr.quick_start import run_recbole_feddmmr

    config_files = args.config_files.split() if args.config_files else None
    return run_recbole_feddmmr(model=args.model, dataset=args.dataset, config_file_list=config_files)


if __name__ == "__main__":
    main()
