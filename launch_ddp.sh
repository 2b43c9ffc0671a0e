#!/usr/bin/env bash
# Launch train.py under torchrun: one process per visible GPU (nccl), or 2 gloo
# processes on CPU when there is no GPU. With no argument it runs the demo.
#
#   ./launch_ddp.sh [hparams/xxx.yaml] [--key=value ...]     # every other argument goes to train.py
#   ./launch_ddp.sh --max-restarts 3 ...                     # restart the group when a worker dies
#
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT on every node
# (or RDZV_ENDPOINT=host:port for an elastic c10d rendezvous). Under SLURM (srun, one
# task per node) they come from SLURM's environment when unset: the node count, the
# node rank, the first host of the node list (scontrol, else python-hostlist), a port
# from the job id. NPROC_PER_NODE overrides the processes per node (default: the GPUs
# SLURM gives the task, else the visible GPUs). On one node the checks run once, in
# one process, before torchrun starts the workers. PYTHON names the interpreter
# (default: the python3 first on PATH, that is the active environment's).
#
# SIGTERM or SIGUSR1 (SLURM sends them to every process of the job step before a
# preemption or the time limit; a user may send them to this script alone) make the
# workers save a checkpoint at the next optimizer step and stop; during the checks or
# before step 1 they stop with nothing to save. The script then exits with status 75
# and, under SLURM, requeues the job when it may. Exit statuses: 0 done, 2 a check
# refused the run, 75 preempted (rerun to resume), other: a worker failed (torchrun's
# report above). The workers end within seconds when this script or torchrun is killed.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"
PREEMPTED=75
max_restarts=0
train_args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --max-restarts|--max_restarts) max_restarts="$2"; shift 2 ;;
        --max-restarts=*|--max_restarts=*) max_restarts="${1#*=}"; shift ;;
        *) train_args+=("$1"); shift ;;
    esac
done

fail() { echo "error: $*" >&2; exit 2; }

# ---- SLURM: node count, node rank and head node from the job's environment ----
if [[ -n "${SLURM_JOB_ID:-}" && -z "${NNODES:-}" && -z "${RDZV_ENDPOINT:-}" ]]; then
    nodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
    if [[ "$nodes" -gt 1 ]]; then
        [[ -n "${SLURM_NODEID:-}" ]] || fail "SLURM job $SLURM_JOB_ID has $nodes nodes but SLURM_NODEID is unset: start launch_ddp.sh with srun, one task per node (srun --ntasks-per-node=1)"
        [[ "$SLURM_NODEID" -lt "$nodes" ]] || fail "SLURM_NODEID=$SLURM_NODEID is not below the job's node count $nodes: start launch_ddp.sh with srun, one task per node"
        nodelist="${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}"
        [[ -n "$nodelist" ]] || fail "SLURM job $SLURM_JOB_ID has $nodes nodes but no SLURM_JOB_NODELIST to find the head node in: set MASTER_ADDR"
        if [[ -z "${MASTER_ADDR:-}" ]]; then
            if command -v scontrol >/dev/null 2>&1; then
                MASTER_ADDR="$(scontrol show hostnames "$nodelist" | head -n 1)"
            else
                MASTER_ADDR="$("$python" -c 'import sys, hostlist; print(hostlist.expand_hostlist(sys.argv[1])[0])' "$nodelist" 2>/dev/null)" \
                    || fail "cannot read the head node from SLURM_JOB_NODELIST=$nodelist: no scontrol here and no python-hostlist (pip install -e '.[slurm]'), or set MASTER_ADDR"
            fi
        fi
        export NNODES="$nodes" NODE_RANK="$SLURM_NODEID" MASTER_ADDR
        export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
    fi
    if [[ -z "${NPROC_PER_NODE:-}" && -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
        export NPROC_PER_NODE="$SLURM_GPUS_ON_NODE"
    fi
fi

# torch's count of GPUs; 0 without asking it where the machine has no GPU device node
# (NVIDIA's, ROCm's or WSL's): a CPU machine saves a torch import (seconds) per launch.
if compgen -G "/dev/nvidia[0-9]*" >/dev/null || [[ -e /dev/kfd || -e /dev/dxg ]]; then
    gpus=$("$python" -c "import torch; print(torch.cuda.device_count())")
else
    gpus=0
fi
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
if [[ -n "${NODE_RANK:-}" && "$NODE_RANK" -ge "$nnodes" ]]; then
    fail "NODE_RANK=$NODE_RANK is not below NNODES=$nnodes: node ranks run from 0 to NNODES-1"
fi
if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
    rendezvous=(--rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="${RDZV_ID:-${SLURM_JOB_ID:-wavlm}}")
elif [[ "$nnodes" -gt 1 ]]; then
    rendezvous=(--node-rank="${NODE_RANK:?set NODE_RANK on every node}"
                --master-addr="${MASTER_ADDR:?set MASTER_ADDR to node 0\'s address}"
                --master-port="${MASTER_PORT:-29500}")
else
    rendezvous=(--standalone)
fi

# Everything this launch starts holds the output folder as one run (wavlm_ddp/faults/run_lock.py);
# another launch is another run, also inside one SLURM allocation.
export WAVLM_RUN_ID="${WAVLM_RUN_ID:-${SLURM_JOB_ID:+slurm-$SLURM_JOB_ID-}$(hostname)-$$-$(date +%s)}"
export WAVLM_LAUNCHER_PID=$$

# ---- Stop requests ----
# A stop signal is written into a file that every worker reads whenever it asks
# whether to stop (also before its own handlers exist), and the workers tell this
# script through another file that they stopped for it. The children start with TERM
# and USR1 ignored (torchrun would die of USR1 or kill the workers on TERM; the workers
# install their own handlers), and die with this script (setpriv's parent-death
# signal, where util-linux has it; the workers also watch for it themselves).
scratch="$(mktemp -d "${TMPDIR:-/tmp}/wavlm-launch.XXXXXX")" \
    || fail "cannot create a temporary folder in ${TMPDIR:-/tmp}: set TMPDIR to a writable folder"
trap 'rm -rf "$scratch"' EXIT
export WAVLM_STOP_FILE="$scratch/stop" WAVLM_PREEMPT_MARKER="$scratch/preempted"
# Where the file cannot be written (a full or cleaned TMPDIR), the signal goes to the
# processes that torchrun started instead; nothing here may end this script.
stop_requested() {
    { echo "SIG$1" > "$WAVLM_STOP_FILE"; } 2>/dev/null \
        || { [[ -n "$child" ]] && pkill "-$1" -P "$child" 2>/dev/null; } || true
}
child=""
trap 'stop_requested TERM' TERM
trap 'stop_requested USR1' USR1
trap 'if [[ -n "$child" ]]; then kill -INT "$child" 2>/dev/null || true; else exit 130; fi' INT
with_parent=()
if setpriv --pdeathsig KILL true 2>/dev/null; then with_parent=(setpriv --pdeathsig KILL --); fi

# run_child CMD...: CMD in the background (this script's traps run while it works); its status in $status.
run_child() {
    ( trap '' TERM USR1; exec ${with_parent[@]+"${with_parent[@]}"} "$@" ) &
    child=$!
    status=0
    while true; do
        wait "$child" && status=0 || status=$?
        kill -0 "$child" 2>/dev/null || break  # wait was only interrupted by a signal
    done
    local reaped=0
    wait "$child" 2>/dev/null || reaped=$?
    if [[ "$reaped" -ne 127 ]]; then status=$reaped; fi  # the status that the interrupted wait missed
    child=""
}

preempted() {
    echo "preempted: the workers stopped at a safe point; the same command resumes the run (exit $PREEMPTED)" >&2
    if [[ -n "${SLURM_JOB_ID:-}" && "${SLURM_NODEID:-0}" -eq 0 ]] && command -v scontrol >/dev/null 2>&1; then
        scontrol requeue "$SLURM_JOB_ID" && echo "requeued SLURM job $SLURM_JOB_ID" >&2 \
            || echo "SLURM job $SLURM_JOB_ID could not be requeued (submit it with --requeue): rerun it yourself" >&2
    fi
    exit "$PREEMPTED"
}

if [[ "$nnodes" -eq 1 && -z "${RDZV_ENDPOINT:-}" ]]; then
    # The checks (settings, output folder, data, global batch) once, in one process,
    # before any worker starts: an error is printed once, as the last line, with exit code 2.
    # The workers reuse the data check (manifest_check_file), also after a restart.
    # With several nodes each node's workers check instead (rank 0 decides for all).
    run_child "$python" "$here/train.py" ${train_args[@]+"${train_args[@]}"} --check_only --world_size="$nproc"
    if [[ "$status" -eq "$PREEMPTED" ]]; then preempted; fi
    if [[ "$status" -ne 0 ]]; then exit "$status"; fi
    export WAVLM_RECIPE_CHECKED=1
fi
if [[ -e "$WAVLM_STOP_FILE" ]]; then preempted; fi  # asked after the check's last look: no worker starts

# torchrun leaves TERM to the workers (it handles INT, HUP and QUIT by stopping them):
# its --signals-to-handle, read from the environment, so that an older torchrun without
# the option still starts.
export PET_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT
run_child "$python" -m torch.distributed.run --nnodes="$nnodes" --nproc-per-node="$nproc" \
    --max-restarts="$max_restarts" "${rendezvous[@]}" \
    "$here/train.py" ${train_args[@]+"${train_args[@]}"} --distributed_backend="$backend"
# Preempted only when the workers finished cleanly after saying so: a group that failed
# after a marker was written (and was not restarted into success) reports the failure.
if [[ "$status" -eq 0 && -e "$WAVLM_PREEMPT_MARKER" ]]; then preempted; fi
exit "$status"
