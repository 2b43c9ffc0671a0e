#!/usr/bin/env bash
# Every GPU check of the speed work as one command, for a lent H100/H200
# (carry .whl: bash ../shared/device/wheels.sh), and its rehearsal on CPU.
#
#   bash bench/gpu_checks.sh "$OUT"             # on the GPU machine
#   bash bench/gpu_checks.sh /tmp/checks --cpu  # here: the same commands at toy size on CPU
#
# The checks run most valuable first, each with a time limit, under one deadline
# (BUDGET_S, default 540 s): what ran before a limit is kept. Writes 8 files (the
# most a device run returns): checks.log (everything printed, each command and its
# exit status), status.txt (one line per check, then the tables), flex_options.json,
# bench_8x15.json, profile.txt, max_batch_15.json, bench_4x30.json, max_batch_30.json.
set -uo pipefail
out="$(mkdir -p "${1:-results/gpu}" && cd "${1:-results/gpu}" && pwd)"
mode="${2:---gpu}"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
work="$(mktemp -d)"
log="$out/checks.log"
: > "$log"
: > "$out/status.txt"
deadline=$((SECONDS + ${BUDGET_S:-540}))

step() {  # step NAME SECONDS COMMAND...: run one check within its limit and the deadline
    local name="$1" limit="$2" left=$((deadline - SECONDS))
    shift 2
    ((left < limit)) && limit=$left
    if ((limit < 20)); then
        echo "$name skipped: deadline" | tee -a "$out/status.txt" >> "$log"
        return
    fi
    echo "### $name (limit ${limit} s): $*" >> "$log"
    local start=$SECONDS
    timeout "$limit" "$@" >> "$log" 2>&1
    echo "$name exit $? after $((SECONDS - start)) s" | tee -a "$out/status.txt" >> "$log"
}

if [[ "$mode" == "--cpu" ]]; then
    common=(--tiny --device cpu --precision bf16 --warmup 1 --steps 2)
    size=(--batch 2 --seconds 1)
    long=(--batch 1 --seconds 2)
    parity=(--tiny --device cpu)
    probe=(--device cpu --frames 64 --batch 2 --repeats 2)
    variants="stock,peer,fast+compile,ceiling+cnn,ceiling+cnn+graphs"   # flex trains on CUDA only
    best=fast+compile
    export NPROC_PER_NODE=1
    device=cpu
    demo_limit=300   # 2 cores compile the demo's layers for minutes
else
    if [[ -d .whl ]]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl || exit 1
        export PYTHONPATH="/tmp/site:$PWD"
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv >> "$log"
    common=()
    size=(--batch 8 --seconds 15)
    long=(--batch 4 --seconds 30)
    parity=()
    probe=()
    # Most valuable first (a time limit keeps the rows measured): the baselines, the recipe's
    # default, the ceiling, the Triton kernel in compiled layers, then CUDA graphs of each.
    variants="stock,peer,fast+compile+cnn,ceiling+cnn,triton+compile+cnn,fast+compile+cnn+graphs"
    variants="$variants,triton+compile+cnn+graphs,ceiling+cnn+graphs,fast+compile"
    best=fast+compile+cnn
    device=cuda
    demo_limit=90
fi
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR="$work/inductor"  # shared by the steps: compile once per graph
python3 -c "import torch, transformers, speechbrain; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'speechbrain', speechbrain.__version__)" >> "$log" 2>&1
model=(--model_dir "$work/model")

# 0. FlexAttention kernel options that fit this GPU's shared memory, fastest first
#    (FLEX=1: measured 2026-11-30 on an H200, flex was slower than SDPA; see RESULTS.md).
flex=()
if [[ "$mode" != "--cpu" && "${FLEX:-0}" == 1 ]]; then
    variants="$variants,flex+compile,flex+compile+cnn"
    step flex_options 100 python3 bench/flex_options.py "${probe[@]}" --out "$out/flex_options.json"
    options=$(python3 -c "import json; r = json.load(open('$out/flex_options.json'))
print(json.dumps(r['best']) if any('median_s' in c for c in r['candidates']) else 'none')" 2>/dev/null)
    if [[ -z "$options" || "$options" == none ]]; then
        variants="stock,peer,fast+compile,fast+compile+cnn,ceiling+cnn"   # no flex kernel compiled here
    elif [[ "$options" != "null" ]]; then
        flex=(--flex_kernel_options "$options")
    fi
    echo "flex kernel options: ${options:-none}" | tee -a "$out/status.txt" >> "$log"
fi

# 1. Throughput at 8 x 15 s bf16, CNN frozen: stock, the peer patch, this recipe's paths, the ceiling.
step bench_8x15 280 env TORCH_LOGS=cudagraphs python3 bench/throughput.py "${common[@]}" "${size[@]}" "${model[@]}" "${flex[@]}" \
    --variants "$variants" --profile "$out/profile.txt" --out "$out/bench_8x15.json"

# 2. The Triton kernel against the materialised bias (fp32, and bf16 on a GPU: Triton's interpreter
#    has no bf16 dot products), then parity with stock HF in fp32: outputs and gradients of every
#    path (flex: on CUDA only).
if [[ "$mode" == "--cpu" ]]; then
    step gated_parity 100 env TRITON_INTERPRET=1 python3 bench/gated_parity.py --tiny --repeats 1
else
    step gated_parity 100 python3 bench/gated_parity.py
fi
[[ "${SKIP_PARITY:-0}" == 1 ]] || step parity 110 python3 bench/parity.py "${parity[@]}" "${flex[@]}"

# 2b. The recipe with CUDA graphs through launch_ddp.sh on the demo (cuda_graphs: LayerDrop 0,
#     a 12 s global batch that one GPU holds without accumulation; frames padded to 512 so that
#     few shapes repeat and replay; TORCH_LOGS prints each graph recorded or skipped, and why).
#     The CPU refuses cuda_graphs, so only on CUDA.
if [[ "$device" == cuda ]]; then
    step launch_demo_graphs 100 env TORCH_LOGS=cudagraphs ./launch_ddp.sh --debug --debug_batches=12 \
        --debug_epochs=1 --noprogressbar --layerdrop=0 --precision=bf16 --compile_layers=True \
        --pad_frames_to=512 --cuda_graphs=True --global_batch_seconds=12 --test_search='{mode: greedy}' \
        --output_folder="$work/demo_graphs" --wavlm_source="$work/wavlm-small"
fi

# 3. The largest batch that fits an 80 GB card and this one, checkpointing off and on, 15 s utterances.
if [[ "$device" == cuda ]]; then
    step max_batch_15 130 python3 bench/throughput.py --max_batch --batch 16 --seconds 15 --steps 3 \
        "${model[@]}" "${flex[@]}" --variants "$best" --out "$out/max_batch_15.json"
fi

# 4. Memory and speed at 4 x 30 s: stock against the best path.
step bench_4x30 80 python3 bench/throughput.py "${common[@]}" "${long[@]}" "${model[@]}" "${flex[@]}" \
    --variants "stock,$best" --out "$out/bench_4x30.json"

# 5. The recipe itself through launch_ddp.sh with the large recipe's speed settings on the demo
#    (nccl at world size 1; synced LayerDrop 0.1 and DDP with find_unused_parameters; the demo's
#    CNN trains, so compile_cnn, which compiles a frozen CNN, stays off; the test set is decoded
#    greedily: the GPU machine has no flashlight-text for the beam search).
step launch_demo "$demo_limit" ./launch_ddp.sh --debug --debug_batches=4 --debug_epochs=1 --noprogressbar \
    --layerdrop=0.1 --precision=bf16 --compile_layers=True --pad_frames_to=64 \
    --attention=sdpa --activation_checkpointing=True --test_search='{mode: greedy}' \
    --output_folder="$work/demo" --wavlm_source="$work/wavlm-small"

# 6. The same search at 30 s utterances.
if [[ "$device" == cuda ]]; then
    step max_batch_30 120 python3 bench/throughput.py --max_batch --batch 8 --seconds 30 --steps 3 \
        "${model[@]}" "${flex[@]}" --variants "$best" --out "$out/max_batch_30.json"
fi

grep -h "^|\|^batch\|largest batch\|^torch " "$log" >> "$out/status.txt"
rm -rf "$work"
cat "$out/status.txt"
