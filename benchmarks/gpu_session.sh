#!/usr/bin/env bash
# Everything a session lent a GPU runs, in one call, writing results under ${OUT:-gpu_out}/.
# Usage on the device machine (repository root):  bash benchmarks/gpu_session.sh
# The machine has torch (CUDA), e3nn, h5py, pytest but no ase/rdkit and no network. Before the
# first device call, here (with network):
#   .venv/bin/python benchmarks/gpu_prepare.py [--paper dha]
# writes .whl/site.tar.xz (RDKit and ASE for the device's Python 3.12, pruned to what se3set_ase
# loads: 11 MiB instead of 35 MB of wheels) and .gpu/data/ (MD17 aspirin, stachyose's first frame,
# with --paper dha the GFN2 DHA frames), lists both in .git/info/exclude and checks that everything
# that travels fits in 64 MiB (the tracked files are ~43 MB since the models ship). Call the
# device with carry [".whl", ".gpu"]. (Older sessions carried pip-downloaded wheels in .whl/;
# those still install if no site.tar.xz is there.)
# Each step has its own time limit so that a slow one cannot starve the rest. A session has 15
# minutes of device time, a machine's start takes 1-2 of them: the default steps fit in one call
# with timeout_s=600.
#   1. the whole test suite with CUDA present (-n 16, ~280 s on the H100: calculator CUDA float32 vs
#      CPU float64, CUDA graphs, compile=True on CUDA, deterministic resume on CUDA, ...)
#   2. with PROFILE=1: gpu_profile.py: kernels and GPU time per call, TF32 and bfloat16 products, training samples/s
#   3. gpu_profile.py --sections compile: the compiled + CUDA-graph path, small preset (~2.5 min;
#      COMPILE_PRESETS=paper COMPILE_S=420 for the paper preset, whose compile takes ~3.7 min)
#   4. with BENCH=1: bench_speed.py --device cuda (all molecules, plain vs fused vs CUDA graph)
#   5. with FIT=1: fit on CUDA (aspirin, small preset): a run cut by --max-time, then --resume on CUDA
#   6. with PAPER=aspirin or PAPER=dha: the paper preset trained on the H100 for PAPER_S seconds
#      (default 420) on the shipped model's split (md17_aspirin: 800/50/50; gfn2_dha: 1800/100/100,
#      blocks of 20; seed 0), batch 32, lr PAPER_LR (default 5e-3: benchmarks/results/lr_experiment_*),
#      cosine over PAPER_EPOCHS (default 24 aspirin, 10 dha): the
#      model file comes back in 15 MB parts ($OUT/<name>_paper.pt.part-*; `cat` them together),
#      with the log. A paper checkpoint (weights + EMA + Adam moments, ~100 MB) cannot come back
#      through $OUT, so the run must end inside the call. Needs .gpu/data/DHA.extxyz for dha.
#   7. with TRAIN_COMPILED_S=<seconds per run>: bench_train_compiled.py --device cuda, paper preset,
#      DHA, one run per BATCH[:MEMORY_BUDGET] in TRAIN_RUNS (default "8:0.3 32:0.3"): the compiled
#      training step (fit --compile [--memory-budget]) against the eager one in the same run,
#      samples/s, saved and peak memory (a budget compiles once, then TorchInductor's disk cache
#      serves the other batch sizes). The eager step's figures print before the compile starts, so
#      a compile that outlasts its timeout still leaves them; TRAIN_PRESET=small for a shorter compile
#   with WARM_S=<seconds>, after step 1: the graphs of step 3 (calculator, COMPILE_PRESETS) and of
#      step 7 (training, TRAIN_PRESET, the first run's memory budget) compiled at the same time in
#      two processes (gpu_profile.py --sections warm, bench_train_compiled.py --compile-only), which
#      fills TorchInductor's disk cache: steps 3 and 7 then load them in seconds, so that one call
#      can time both (e.g. WARM_S=330 TESTS_S=0 COMPILE_PRESETS=paper COMPILE_S=120
#      TRAIN_COMPILED_S=120 TRAIN_RUNS="8:0.3" bash benchmarks/gpu_session.sh; on this project's
#      CPUs the paper preset's training graph compiles in 23-29 min, its inference graph in ~4 min on
#      the H100's host: the first GPU run says whether 330 s is enough)
#   with COMPILE_LAYOUTS=matmul,unrolled (steps 3 and WARM_S): the compiled graph with its per-edge
#      Clebsch-Gordan products as batched matmuls (CUDA's default) and unrolled into element-wise sums
#      (the CPU's default: 356 fewer batched-matmul kernels per paper-preset DHA call, 991 -> 635 GEMMs),
#      each timed; WARM_S compiles them in parallel processes. Default: "default" (the device's own)
# TESTS="tests/x.py ..." picks the test files of step 1; TESTS_S=0 skips step 1, COMPILE_S=0 step 3.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if [ -f .whl/site.tar.xz ] && [ -z "${NO_WHL:-}" ]; then   # made by benchmarks/gpu_prepare.py
    python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import gpu_prepare; gpu_prepare.extract('.whl/site.tar.xz', '/tmp/site')" \
        && export PYTHONPATH=/tmp/site:$PWD || exit 1
elif [ -d .whl ] && [ -z "${NO_WHL:-}" ]; then   # NO_WHL=1: use the installed ase/rdkit
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
PY=${PY:-python3}
COMPILE_LAYOUTS=${COMPILE_LAYOUTS:-default}
export PYTHONUNBUFFERED=1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
$PY -m se3set_ase.cli info > "$OUT/info.txt" 2>&1
[ "${TESTS_S:-330}" != 0 ] && timeout "${TESTS_S:-330}" $PY -m pytest -q -rs -p no:cacheprovider -n 16 ${TESTS:-tests} \
    > "$OUT/tests_cuda.txt" 2>&1; grep -v Warning "$OUT/tests_cuda.txt" | tail -5
# after the tests: the model-card tests would see the shared stachyose file changed
if [ -f .gpu/data/stachyose0.extxyz ] && [ ! -f /work/shared/data/gfn2/stachyose.extxyz ]; then
    mkdir -p /work/shared/data/gfn2 && cp .gpu/data/stachyose0.extxyz /work/shared/data/gfn2/stachyose.extxyz
fi   # bench_speed.py reads stachyose from the shared data path
if [ "${WARM_S:-0}" != 0 ]; then
    FIRST=${TRAIN_RUNS:-8:0.3}; FIRST=${FIRST%% *}
    WB=(); [ "${FIRST#*:}" != "$FIRST" ] && WB=(--memory-budget "${FIRST#*:}")
    if [ "${COMPILE_S:-200}" != 0 ]; then   # one process per layout, all at once
        for LAY in ${COMPILE_LAYOUTS//,/ }; do
            timeout "$WARM_S" $PY benchmarks/gpu_profile.py --sections warm --presets "${COMPILE_PRESETS:-small}" \
                --layouts "$LAY" > "$OUT/warm_calculator_$LAY.txt" 2>&1 &
        done
    fi
    [ "${TRAIN_COMPILED_S:-0}" != 0 ] && timeout "$WARM_S" $PY benchmarks/bench_train_compiled.py --device cuda \
        --preset "${TRAIN_PRESET:-paper}" --batch "${FIRST%%:*}" "${WB[@]}" --compile-only > "$OUT/warm_training.txt" 2>&1 &
    wait
    tail -n 2 "$OUT"/warm_*.txt 2>/dev/null
fi
[ -n "${PROFILE:-}" ] && timeout 100 $PY benchmarks/gpu_profile.py --sections profile,tf32,train --batches 8,32 2>&1 \
    | grep -v USDT | tee "$OUT/gpu_profile.txt"
[ "${COMPILE_S:-200}" != 0 ] && timeout "${COMPILE_S:-200}" $PY benchmarks/gpu_profile.py --sections compile --presets "${COMPILE_PRESETS:-small}" \
    --layouts "$COMPILE_LAYOUTS" 2>&1 | grep -v USDT | tee "$OUT/gpu_compile.txt"
[ -n "${BENCH:-}" ] && timeout 190 $PY benchmarks/bench_speed.py --device cuda 2>&1 | tee "$OUT/bench_speed_cuda.txt"
export SE3SET_CACHE_DIR=/tmp/h5cache
DATA=${DATA:-.gpu/data}
if [ -n "${PAPER:-}" ]; then
    case $PAPER in
        aspirin) NAME=md17_aspirin; SPLIT=(--train-size 800 --valid-size 50 --test-size 50); EP=24
                 PDATA=$(ls "$DATA"/aspirin.extxyz* | head -1) ;;
        dha) NAME=gfn2_dha; SPLIT=(--train-size 1800 --valid-size 100 --test-size 100 --split-block 20); EP=10
             PDATA=$(ls "$DATA"/DHA.extxyz* | head -1) ;;
        *) echo "PAPER must be aspirin or dha"; exit 2 ;;
    esac
    PS=${PAPER_S:-420}
    { date +%T; timeout $((PS + ${PAPER_GRACE_S:-90})) $PY -m se3set_ase.cli fit "$PDATA" --preset paper "${SPLIT[@]}" --batch-size 32 \
          --epochs "${PAPER_EPOCHS:-$EP}" --lr "${PAPER_LR:-5e-3}" --warmup-steps 50 --seed 0 --device "${DEVICE:-cuda}" --out-dir "/tmp/runs/${NAME}_paper" \
          -o "/tmp/${NAME}_paper.pt" --max-time "${PS}s" --no-progress; date +%T; } 2>&1 | tee "$OUT/fit_paper.txt" | tail -25
    split -b 15M "/tmp/${NAME}_paper.pt" "$OUT/${NAME}_paper.pt.part-"
    cp "/tmp/runs/${NAME}_paper/log.csv" "$OUT/fit_paper_log.csv" 2>/dev/null
fi
if [ "${TRAIN_COMPILED_S:-0}" != 0 ]; then
    for RUN in ${TRAIN_RUNS:-8:0.3 32:0.3}; do
        BUDGET=(); [ "${RUN#*:}" != "$RUN" ] && BUDGET=(--memory-budget "${RUN#*:}")
        timeout "$TRAIN_COMPILED_S" $PY benchmarks/bench_train_compiled.py --device cuda --preset "${TRAIN_PRESET:-paper}" --batch "${RUN%%:*}" \
            "${BUDGET[@]}" 2>&1 | grep -v Warning | tee -a "$OUT/bench_train_compiled_cuda.txt"
    done
fi
[ -z "${FIT:-}" ] && exit 0
FIT=(fit "$(ls "$DATA"/aspirin.extxyz* | head -1)" --preset small --train-size 800 --valid-size 50 --test-size 50 --batch-size 4
     --epochs 300 --lr 2e-3 --warmup-steps 100 --seed 0 --device cuda --out-dir /tmp/runs/aspirin_cuda
     -o "$OUT/md17_aspirin_cuda.pt" --no-progress)
{ date +%T; timeout 110 $PY -m se3set_ase.cli "${FIT[@]}" --max-time 75s; date +%T
  timeout 80 $PY -m se3set_ase.cli fit "$(ls "$DATA"/aspirin.extxyz* | head -1)" --out-dir /tmp/runs/aspirin_cuda --resume \
      --device cuda --max-time 130s --no-progress -o "$OUT/md17_aspirin_cuda.pt"; date +%T
  cp /tmp/runs/aspirin_cuda/*.csv "$OUT/" 2>/dev/null; } 2>&1 | tee "$OUT/fit_cuda.txt" | tail -40
