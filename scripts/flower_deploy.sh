#!/usr/bin/env bash
# FedDMMR's Flower app deployed on this machine: a SuperLink and NODES SuperNodes started as local processes
# (insecure, loopback only), the app submitted with `flwr run`, everything stopped at the end.
# Needs the flower extra (bash scripts/install.sh --flower). docs/flower.md, "Deployment".
#
#   bash scripts/flower_deploy.sh DATASET OUT.json [NODES] [CONFIG_JSON]
#
# CONFIG_JSON: the run's settings as a JSON object ('{"rounds": 50, "eval_every": 25}'); OUT.json gets what the
# ServerApp wrote (as `python -m recbole_feddmmr.flower`'s --out). Logs go next to OUT.json (OUT.deploy/).
set -euo pipefail
cd "$(dirname "$0")/.."
DATASET=${1:?usage: flower_deploy.sh DATASET OUT.json [NODES] [CONFIG_JSON]}
OUT=$(realpath -m "${2:?usage: flower_deploy.sh DATASET OUT.json [NODES] [CONFIG_JSON]}")
NODES=${3:-2}
CONFIG_JSON=${4:-"{}"}
LOGS="${OUT%.json}.deploy"
mkdir -p "$LOGS"
export FLWR_HOME="$LOGS/flwr-home"  # the CLI's SuperLink connection and installed apps, this run's own
mkdir -p "$FLWR_HOME"
free_port() { python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
LINK_PORT=$(free_port)
PIDS=()
# each process leads its own process group (setsid), so that stopping it stops what it started (SuperExec,
# ServerApp and ClientApp processes) too
stop_all() { for pid in "${PIDS[@]}"; do kill -- "-$pid" 2>/dev/null || true; done; }
trap stop_all EXIT

# no dependency installation at run time: the apps are the installed package's, and nothing is downloaded
setsid flower-superlink --insecure --disable-runtime-dependency-installation --port "$LINK_PORT" \
    --database "$LOGS/superlink.db" > "$LOGS/superlink.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do grep -q "Starting Flower SuperExec" "$LOGS/superlink.log" && break; sleep 0.2; done
for ((i = 0; i < NODES; i++)); do
    setsid flower-supernode --insecure --superlink "127.0.0.1:$LINK_PORT" --port "$(free_port)" \
        --node-config "partition-id=$i num-partitions=$NODES" > "$LOGS/supernode$i.log" 2>&1 &
    PIDS+=($!)
done
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "local-deployment"

[superlink.local-deployment]
address = "127.0.0.1:$LINK_PORT"
insecure = true
TOML
rm -f "$OUT"
flwr run flower_app local-deployment --stream \
    --run-config "dataset='$DATASET' out='$OUT' num-supernodes=$NODES config-json='$CONFIG_JSON'" \
    > "$LOGS/run.log" 2>&1
if [[ ! -f "$OUT" ]]; then
    echo "error: the deployed run wrote no $OUT; logs in $LOGS" >&2
    tail -20 "$LOGS/run.log" >&2
    exit 1
fi
echo "wrote $OUT (logs in $LOGS)"
