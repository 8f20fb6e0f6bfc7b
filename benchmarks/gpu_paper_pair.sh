#!/usr/bin/env bash
# Issue 10's two paper-preset trainings (md17_aspirin, gfn2_dha) at once on one GPU, in one device
# call: each run is bound by kernel launches, not by GPU time, so two processes share an H100 at
# little cost to either (fourth H100 session: both finished in ~300 s, benchmarks/README.md).
# Needs .whl/ and .gpu/data/ as described in gpu_session.sh; results under $OUT/aspirin, $OUT/dha.
# Usage (device machine, repository root):  bash benchmarks/gpu_paper_pair.sh   [PAPER_S=410]
# At the measured ~16 s (aspirin) and ~38 s (DHA) per epoch side by side, gpu_session.sh's default
# epochs (24 aspirin, 10 DHA) end inside PAPER_S=410.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD NO_WHL=1 TESTS_S=0 COMPILE_S=0 PAPER_S=${PAPER_S:-410} PAPER_GRACE_S=60
OUT0=${OUT:-gpu_out}
mkdir -p "$OUT0"
OUT=$OUT0/aspirin PAPER=aspirin bash benchmarks/gpu_session.sh > $OUT0/aspirin.log 2>&1 &
OUT=$OUT0/dha PAPER=dha bash benchmarks/gpu_session.sh > $OUT0/dha.log 2>&1 &
sleep 120; nvidia-smi > $OUT0/nvidia-smi-during.txt 2>&1
wait
for run in aspirin dha; do   # few files come back from a device call: one archive of logs per run
    echo "== $run"; tail -n 6 "$OUT0/$run.log"
    tar -cf "$OUT0/${run}_logs.tar" --exclude='*.part-*' -C "$OUT0" "$run.log" "$run" \
        && rm -f "$OUT0/$run.log" "$OUT0/$run"/*.txt "$OUT0/$run"/*.csv
done   # left: nvidia-smi-during.txt, <run>_logs.tar, the model parts <run>/<name>_paper.pt.part-*
