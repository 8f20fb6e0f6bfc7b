#!/usr/bin/env bash
# Everything a session lent a GPU should run, in order, writing results under ${OUT:-gpu_out}/.
# Usage (on the GPU machine, repository root): bash benchmarks/gpu_session.sh
#   1. CUDA tests (calculator CUDA float32 vs CPU float64, and the rest of the suite on a GPU box)
#   2. bench_speed.py --device cuda: H100 ms per force call (DHA, stachyose), train samples/s, peak MiB
#   3. paper-preset training of md17_aspirin and gfn2_DHA (resumable; checkpoints under OUT/runs)
set -euo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PY:-.venv/bin/python}
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
$PY -m se3set_ase.cli info > "$OUT/info.txt"
$PY -m pytest -q tests/test_calculator.py tests/test_model.py tests/test_fused.py 2>&1 | tee "$OUT/tests_cuda.txt"
$PY benchmarks/bench_speed.py --device cuda 2>&1 | tee "$OUT/bench_speed_cuda.txt"
export SE3SET_CACHE_DIR="$OUT/h5cache"
DATA=${DATA:-../shared/data}
$PY -m se3set_ase.cli fit "$DATA/md17/aspirin.extxyz" --preset paper --train-size 800 --valid-size 50 \
    --test-size 50 --batch-size 8 --epochs 300 --lr 5e-4 --device cuda --max-time "${MAX_TIME:-20m}" \
    --out-dir "$OUT/runs/md17_aspirin_paper" -o "$OUT/md17_aspirin_paper.pt" --no-progress 2>&1 | tail -20
$PY -m se3set_ase.cli fit "$DATA/gfn2/DHA.extxyz" --preset paper --train-size 1800 --valid-size 100 \
    --test-size 100 --batch-size 8 --epochs 100 --lr 5e-4 --device cuda --max-time "${MAX_TIME:-20m}" \
    --out-dir "$OUT/runs/gfn2_dha_paper" -o "$OUT/gfn2_dha_paper.pt" --no-progress 2>&1 | tail -20
