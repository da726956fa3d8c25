#!/usr/bin/env bash
# A whole secured deployment on 127.0.0.1: CA + SuperLink certificate, SuperNode keys
# registered with a SuperLink that requires SuperNode authentication, two SuperNodes
# (each with its own state-dir = its own privacy ledger), and `flwr run` of 2 rounds of
# tiny_bert with sample-level DP. Usage:
#
#   deploy/local-demo.sh OUT [HYDRA_OVERRIDES...]
#
# OUT gets: run/ (the server's run directory: privacy_report.*, metrics.jsonl, ...),
# devices/<node>/ (each SuperNode's state-dir: its ledger), pki/ (certificates, keys),
# procs/ (logs and pid files), flwr/ (FLWR_HOME), demo_summary.json.
# Every process started here is stopped by its process id when the script exits.
set -euo pipefail

[[ $# -ge 1 ]] || { echo "usage: $0 OUT [HYDRA_OVERRIDES...]" >&2; exit 2; }
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
shift
EXTRA=("$@")
DEPLOY="$ROOT/deploy/fedpriv-deploy.sh"

# Flower's tools: from $FEDPRIV_BIN, else next to this Python, else PATH.
PY=${PYTHON:-$( [[ -x "$ROOT/.venv/bin/python" ]] && echo "$ROOT/.venv/bin/python" || command -v python3 )}
export FEDPRIV_BIN=${FEDPRIV_BIN:-$(dirname "$PY")}
[[ -x "$FEDPRIV_BIN/flower-superlink" ]] || { echo "local-demo: flower-superlink not in $FEDPRIV_BIN (make venv, or set FEDPRIV_BIN)" >&2; exit 3; }
for tool in openssl ssh-keygen; do
    command -v $tool >/dev/null || { echo "local-demo: $tool is missing (Debian/Ubuntu: apt-get install -y openssl openssh-client)" >&2; exit 3; }
done

export FLWR_HOME="$OUT/flwr"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

PROCS="$OUT/procs"
mkdir -p "$PROCS"
cleanup() { "$DEPLOY" stop "$PROCS" >/dev/null 2>&1 || true; }
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
LINK_PORT=$(free_port)
LINK="127.0.0.1:$LINK_PORT"
started=$(date +%s)

"$DEPLOY" certs "$OUT/pki" 127.0.0.1 localhost
"$DEPLOY" superlink "$PROCS" 127.0.0.1 "$LINK_PORT" "$OUT/pki"
"$DEPLOY" connection fedpriv-local "$LINK" "$OUT/pki/ca.crt"

for _ in $(seq 1 60); do  # the SuperLink answers once its HTTPS port is up
    "$FEDPRIV_BIN/flwr" supernode list fedpriv-local >/dev/null 2>&1 && break
    kill -0 "$(cat "$PROCS/superlink.pid")" 2>/dev/null || { cat "$PROCS/superlink.log" >&2; exit 1; }
    sleep 1
done

for i in 0 1; do
    "$DEPLOY" node-key "$OUT/pki" "supernode-$i"
    "$DEPLOY" register "$OUT/pki/supernode-$i.pub" fedpriv-local
    "$DEPLOY" supernode "$PROCS" "supernode-$i" "$LINK" "$(free_port)" \
        "partition-id=$i num-partitions=2 client-id=\"device-$i\" state-dir=\"$OUT/devices/supernode-$i\"" \
        "$OUT/pki/ca.crt" "$OUT/pki/supernode-$i"
done

OVERRIDES="model=tiny_bert num_clients=2 rounds=2 privacy=sample data.train_size=400 data.test_size=80 train.batch_size=32 hydra.run.dir=$OUT/run ${EXTRA[*]:-}"
(cd "$ROOT" && timeout 270 "$FEDPRIV_BIN/flwr" run . fedpriv-local --stream \
    --run-config "overrides=\"$OVERRIDES\"") 2>&1 | tee "$PROCS/flwr-run.log"

[[ -f "$OUT/run/privacy_report.json" ]] || { echo "local-demo: no report in $OUT/run" >&2; exit 1; }
wall=$(( $(date +%s) - started ))
"$PY" - "$OUT" "$wall" <<'EOF'
import json, pathlib, sys
out, wall = pathlib.Path(sys.argv[1]), int(sys.argv[2])
report = json.loads((out / "run/privacy_report.json").read_text())
rounds = [json.loads(line) for line in (out / "run/metrics.jsonl").read_text().splitlines()]
ledgers = sorted(str(p.relative_to(out)) for p in (out / "devices").glob("*/*/ledger.json"))
summary = {
    "wall_s": wall,
    "round_wall_s": [r["wall_s"] for r in rounds],
    "accuracy": [r["accuracy"] for r in rounds],
    "clients": {c["client_id"]: {"epsilon": c["epsilon"], "budget_epsilon": c["budget_epsilon"],
                                 "rounds_participated": c["rounds_participated"]}
                for c in report["sample_level"]["clients"]},
    "ledgers_on_devices": ledgers,
    "ledgers_under_run_dir": sorted(str(p.relative_to(out)) for p in (out / "run").rglob("ledger.json")),
}
(out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
EOF
echo "local-demo: done in ${wall}s; report $OUT/run/privacy_report.md"
