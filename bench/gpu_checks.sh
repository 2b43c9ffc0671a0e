#!/usr/bin/env bash
# Every GPU check of the speed issue as one command, for a lent H100/H200
# (../shared/device/README.md: carry .whl), and its rehearsal on CPU.
#
#   bash bench/gpu_checks.sh "$OUT"             # on the GPU machine
#   bash bench/gpu_checks.sh /tmp/checks --cpu  # here: the same commands at toy size on CPU
#
# Writes at most 8 files (the most a device run returns): checks.log (everything
# printed, with each command and its exit status), status.txt (one line per
# command), bench_8x15.json, bench_4x30.json, bench_ddp.json, profile.txt and
# launch.log (the training runs through launch_ddp.sh).
set -uo pipefail
out="$(mkdir -p "${1:-results/gpu}" && cd "${1:-results/gpu}" && pwd)"
mode="${2:---gpu}"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
work="$(mktemp -d)"
log="$out/checks.log"
: > "$log"
: > "$out/status.txt"

step() {  # step NAME SECONDS COMMAND...: run one check with a time limit, record its exit status
    local name="$1" limit="$2"
    shift 2
    echo "### $name: $*" >> "$log"
    timeout "$limit" "$@" >> "$log" 2>&1
    echo "$name exit $?" | tee -a "$out/status.txt" >> "$log"
}

if [[ "$mode" == "--cpu" ]]; then
    size=(--tiny --device cpu --precision fp32 --batch 2 --seconds 1 --warmup 1 --steps 2)
    long=(--tiny --device cpu --precision fp32 --batch 1 --seconds 2 --warmup 1 --steps 2)
    parity=(--tiny --device cpu)
    half=fp32            # fp16 needs CUDA: the rehearsal runs the same command in fp32
    device=cpu
    export NPROC_PER_NODE=1
else
    if [[ -d .whl ]]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl || exit 1
        export PYTHONPATH="/tmp/site:$PWD"
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$log"
    size=(--batch 8 --seconds 15)
    long=(--batch 4 --seconds 30)
    parity=()
    half=fp16
    device=cuda:0
fi
export PYTHONUNBUFFERED=1
python3 -c "import torch, transformers, speechbrain; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'speechbrain', speechbrain.__version__)" >> "$log" 2>&1
model=(--model_dir "$work/model")

# 0. Parity with stock HF in fp32 (eager SDPA path and compiled layers): outputs and gradients.
step parity 240 python3 bench/parity.py "${parity[@]}"

# 1. Throughput at 8 x 15 s bf16, CNN frozen: stock, fast, fast+compile, with a profile of one step each.
step bench_8x15 300 python3 bench/throughput.py "${size[@]}" "${model[@]}" \
    --profile "$out/profile.txt" --out "$out/bench_8x15.json"

# 2. Training through launch_ddp.sh (nccl at world size 1 on a GPU), in parallel:
#    bf16, fp16 with the grad scaler, compile on; LayerDrop 0.1 synced in each.
demo=(--debug --debug_batches=4 --debug_epochs=1 --noprogressbar --layerdrop=0.1 --layerdrop_mode=synced)
declare -A runs=(
    [bf16]="--precision=bf16"
    [half]="--precision=$half"
    [bf16_compile]="--precision=bf16 --compile_layers=True --pad_frames_to=64"
)
pids=()
for name in "${!runs[@]}"; do
    # shellcheck disable=SC2086  # the run's flags are words
    timeout 300 ./launch_ddp.sh "${demo[@]}" ${runs[$name]} --output_folder="$work/$name" \
        --wavlm_source="$work/wavlm-small-$name" > "$work/$name.log" 2>&1 &
    pids+=("$!:$name")
done
# Two gloo ranks sharing the one GPU: the DDP code path on CUDA tensors (not a timing).
timeout 300 python3 -m torch.distributed.run --standalone --nproc-per-node=2 train.py "${demo[@]}" \
    --device="$device" --distributed_backend=gloo --precision=bf16 \
    --output_folder="$work/gloo2" --wavlm_source="$work/wavlm-small-gloo2" > "$work/gloo2.log" 2>&1 &
pids+=("$!:gloo2")
for entry in "${pids[@]}"; do
    wait "${entry%%:*}"
    rc=$?
    name="${entry#*:}"
    { echo "### launch $name (exit $rc)"; cat "$work/$name.log"; } >> "$out/launch.log"
    ddp_line=$(grep -o "DDP wraps the encoder with .*" "$work/$name.log" | head -1)
    echo "launch_$name exit $rc; ${ddp_line:-no DDP line}; $(grep -c 'test WER' "$work/$name.log") test WER line(s)" \
        | tee -a "$out/status.txt" >> "$log"
done

# 3. Memory at 4 x 30 s, then DDP (world size 1) with LayerDrop 0.1.
step bench_4x30 200 python3 bench/throughput.py "${long[@]}" "${model[@]}" --out "$out/bench_4x30.json"
step bench_ddp 200 python3 bench/throughput.py "${size[@]}" "${model[@]}" --layerdrop 0.1 --ddp \
    --variants fast,fast+compile --out "$out/bench_ddp.json"
grep -h "^|\|^batch\|torch " "$log" >> "$out/status.txt"
rm -rf "$work"
cat "$out/status.txt"
