#!/usr/bin/env bash
# Installs recbole_feddmmr and everything it needs, offline-capable apart from PyPI.
#
#   bash scripts/install.sh          # runtime
#   bash scripts/install.sh --dev    # runtime + pytest/ruff + the Flower integration (its tests run in CI)
#   bash scripts/install.sh --flower # runtime + the Flower integration (recbole_feddmmr.flower)
#
# Why a script and not only `pip install .`: RecBole 1.2.1's wheel pins
# ray<=2.6.3, which has no wheels for Python 3.12 and breaks on numpy 2. We need
# modern ray[tune] (>= 2.40), so RecBole is installed with --no-deps and its real
# requirements (minus the ray pin) come from requirements.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# torch: keep an existing torch >= 2.6 (e.g. a CUDA build on a GPU machine);
# otherwise take 2.13.0, whose CPU wheel these machines keep on disk.
if ! "$PY" -c 'import sys, torch; v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(v < (2, 6))' 2>/dev/null; then
    "$PY" -m pip install torch==2.13.0
fi
"$PY" -m pip install -r requirements.txt
"$PY" -m pip install --no-deps recbole==1.2.1
if [[ "${1:-}" == "--dev" ]]; then
    "$PY" -m pip install -r requirements-dev.txt
elif [[ "${1:-}" == "--flower" ]]; then
    "$PY" -m pip install -r requirements-flower.txt
fi
# Non-editable on purpose: the properties must travel with the installed package.
"$PY" -m pip install --no-deps .
