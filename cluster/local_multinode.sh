#!/usr/bin/env bash
# A multi-node Ray cluster on one machine, with fake GPUs, to try the cluster profile
# without hardware: a head without GPUs and two "GPU" workers labelled by size.
#
#   bash cluster/local_multinode.sh start   # starts the nodes (ports 6390+)
#   bash cluster/local_multinode.sh status
#   bash cluster/local_multinode.sh stop
#
# Then point a driver at it: RAY_AUTH_MODE=token RAY_ADDRESS=127.0.0.1:6390 .venv/bin/python ...
# (Ray's token authentication is on: every node and driver reads the token from
# ~/.ray/auth_token, which `start` creates when there is none).
# The fake GPUs are Ray resources only: pools that need CUDA will not run on them; the
# mock and CPU engines will (set num_gpus: 1 with engine: mock to see placement).
set -euo pipefail
cd "$(dirname "$0")/.."
RAY=.venv/bin/ray
PORT=${ORCH_LOCAL_RAY_PORT:-6390}
export RAY_USAGE_STATS_ENABLED=0
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
# Workers (pools, ingress, Serve's proxy) at normal priority: see orch/pools/priority.py.
export RAY_worker_niceness=${RAY_worker_niceness:-0}
case "${1:-}" in
  start)
    "$RAY" get-auth-token --generate >/dev/null  # one token for every node (kept if it exists)
    "$RAY" start --head --node-ip-address=127.0.0.1 --port="$PORT" --num-cpus=2 --num-gpus=0 \
      --include-dashboard=false --disable-usage-stats
    "$RAY" start --address="127.0.0.1:$PORT" --node-ip-address=127.0.0.1 --num-cpus=1 --num-gpus=1 \
      --resources='{"gpu_large": 1}'
    "$RAY" start --address="127.0.0.1:$PORT" --node-ip-address=127.0.0.1 --num-cpus=1 --num-gpus=1 \
      --resources='{"gpu_small": 1}'
    echo "cluster up at 127.0.0.1:$PORT"
    ;;
  status)
    "$RAY" status --address="127.0.0.1:$PORT"
    ;;
  stop)
    "$RAY" stop --force
    ;;
  *)
    echo "usage: $0 start|status|stop" >&2
    exit 2
    ;;
esac
