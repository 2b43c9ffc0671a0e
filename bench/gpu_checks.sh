#!/usr/bin/env bash
# The GPU measurements of the speed issue, as one command for a lent H100/H200
# (see ../shared/device/README.md): run from the project root with .whl carried.
#   bash bench/gpu_checks.sh "$OUT"
# Writes (8 files, the most a device run returns) throughput JSON + tables for batch 8 x 15 s and 4 x 30 s (stock, fast,
# fast+compile, bf16, CNN frozen) and a 2-rank gloo DDP smoke run on the GPU.
set -uo pipefail
out="${1:-results/gpu}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt"
python3 bench/throughput.py --batch 8 --seconds 15 --out "$out/bench_8x15.json" | tee "$out/bench_8x15.txt"
python3 bench/throughput.py --batch 4 --seconds 30 --variants stock,fast --out "$out/bench_4x30.json" \
    | tee "$out/bench_4x30.txt"
python3 bench/throughput.py --batch 8 --seconds 15 --layerdrop 0.1 --ddp --variants fast \
    --out "$out/bench_ddp_layerdrop.json" | tee "$out/bench_ddp_layerdrop.txt"
# Two gloo ranks sharing the GPU: the DDP code path on CUDA (not a timing).
NPROC_PER_NODE=2 timeout 300 python3 -m torch.distributed.run --standalone --nproc-per-node=2 train.py \
    --debug --debug_batches=5 --device=cuda:0 --distributed_backend=gloo --precision=bf16 \
    --layerdrop=0.5 --output_folder=/tmp/ddp_smoke --noprogressbar > "$out/ddp_smoke.log" 2>&1
echo "ddp smoke exit $?" | tee -a "$out/ddp_smoke.log"
