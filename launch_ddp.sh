#!/usr/bin/env bash
# Launch train.py under torchrun: one process per visible GPU (nccl), or 2 gloo
# processes on CPU when there is no GPU. With no argument it runs the demo.
#
#   ./launch_ddp.sh [hparams/xxx.yaml] [--key=value ...]     # every other argument goes to train.py
#   ./launch_ddp.sh --max-restarts 3 ...                     # restart the group when a worker dies
#
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT on every node
# (or RDZV_ENDPOINT=host:port for an elastic c10d rendezvous). NPROC_PER_NODE
# overrides the number of processes per node. On one node the checks run once,
# in one process, before torchrun starts the workers. PYTHON names the interpreter
# (default: the python3 first on PATH, that is the active environment's).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"
max_restarts=0
train_args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --max-restarts|--max_restarts) max_restarts="$2"; shift 2 ;;
        --max-restarts=*|--max_restarts=*) max_restarts="${1#*=}"; shift ;;
        *) train_args+=("$1"); shift ;;
    esac
done

gpus=$("$python" -c "import torch; print(torch.cuda.device_count())")
if [[ "$gpus" -gt 0 ]]; then
    nproc="${NPROC_PER_NODE:-$gpus}"
    backend=nccl
else
    nproc="${NPROC_PER_NODE:-2}"
    backend=gloo
    # Two CPU processes share the cores: one thread each avoids oversubscription.
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi

nnodes="${NNODES:-1}"
if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
    rendezvous=(--rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="${RDZV_ID:-wavlm}")
elif [[ "$nnodes" -gt 1 ]]; then
    rendezvous=(--node-rank="${NODE_RANK:?set NODE_RANK on every node}"
                --master-addr="${MASTER_ADDR:?set MASTER_ADDR to node 0\'s address}"
                --master-port="${MASTER_PORT:-29500}")
else
    rendezvous=(--standalone)
fi

if [[ "$nnodes" -eq 1 && -z "${RDZV_ENDPOINT:-}" ]]; then
    # The checks (settings, manifests, output folder, global batch) once, in one process,
    # before any worker starts: an error is printed once, as the last line, with exit code 2.
    # The workers reuse the manifests' check (manifest_check_file), also after a restart.
    # With several nodes each node's workers check instead (rank 0 decides for all).
    "$python" "$here/train.py" "${train_args[@]}" --check_only --world_size="$nproc" || exit $?
    export WAVLM_RECIPE_CHECKED=1
fi

exec "$python" -m torch.distributed.run --nnodes="$nnodes" --nproc-per-node="$nproc" \
    --max-restarts="$max_restarts" "${rendezvous[@]}" \
    "$here/train.py" "${train_args[@]}" --distributed_backend="$backend"
