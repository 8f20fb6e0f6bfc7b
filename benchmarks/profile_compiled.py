"""Where the time of one compiled energy + forces call goes on the CPU (``torch.profiler``).

Run: ``OMP_NUM_THREADS=2 .venv/bin/python benchmarks/profile_compiled.py [--preset paper]
[--molecule DHA] [--threads 2] [--kernels] [--rows 30]``

Compiles the call as ``compile=True`` does (random weights as in ``bench_speed.py``, float32),
times 10 calls (median), then profiles 5 and prints the operations by self CPU time: ATen's
``mm``/``addmm`` (the linear maps), ``index_put`` (scatter-adds TorchInductor leaves to ATen with
two threads, see ``se3set_ase/model/compiled.py``) and the graph's own C++ loops, which the
profiler books as the self time of ``Call CompiledFxGraph``. ``--kernels`` makes TorchInductor
mark each of its loops (``cpp.enable_kernel_profile``), so they are listed one by one; that
changes the generated code (a new compile, minutes) and slows the call a little.
``--cprofile`` lists instead what Python sees of 10 calls (``cProfile``, by own time): the graph's
Python wrapper (``call``: buffer allocation, tensor views, size checks, one Python call per loop
and per ATen kernel) against the kernels it calls.
``--perf SECONDS`` samples instead both threads of this process with Linux ``perf`` (``perf record
-g -p``, 2000 Hz) while it calls the graph for that long, and sums the samples by thread and library
and by kind: MKL's matrix-product kernels (and, apart, its packing and output-scaling passes),
TorchInductor's loops, the OpenMP runtime (libgomp, whose symbols the wheel strips: its hot
addresses are ``pause`` spin loops, ``objdump -d``, i.e. a thread waiting for work or at a barrier)
and the rest. perf samples a thread only while it is on a CPU,
so the shares are of the call's time times the threads while both keep their cores (they did here:
each thread had about half of the samples). The graph's C++ wrapper calls ATen's kernels outside
``torch.profiler``'s view, which this sees; needs ``perf`` on the PATH and
``kernel.perf_event_paranoid`` <= 2.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_speed import make_model, molecules  # noqa: E402
from se3set_ase.fragment import Fragmenter, FragmentSettings  # noqa: E402
from se3set_ase.model.compiled import CompiledEnergyForces  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--molecule", default="DHA", help="aspirin, Ac-Ala3-NHMe, DHA or stachyose")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kernels", action="store_true", help="list TorchInductor's loops one by one")
    ap.add_argument("--rows", type=int, default=30)
    ap.add_argument("--cprofile", action="store_true", help="Python's view: the wrapper's own time vs its kernels")
    ap.add_argument("--perf", type=float, default=0.0, metavar="SECONDS",
                    help="sample both threads with Linux perf for this long, by library and kind")
    args = ap.parse_args()
    if args.perf and shutil.which("perf") is None:
        raise SystemExit("--perf needs Linux perf on the PATH (Debian: apt install linux-perf)")
    torch.set_num_threads(args.threads)
    if args.kernels:
        import torch._inductor.config as inductor_config

        inductor_config.cpp.enable_kernel_profile = True
    atoms, frag = {name: (a, f) for name, a, f in molecules()}[args.molecule]
    model = make_model(args.preset, frag, torch.device("cpu")).requires_grad_(False)
    hg = Fragmenter(FragmentSettings.preset(frag))(atoms).to("cpu", torch.float32)
    t0 = time.perf_counter()
    call = CompiledEnergyForces(model)
    call(hg)
    print(f"# {args.preset} preset, {args.molecule} ({len(atoms)} atoms), {args.threads} thread(s): "
          f"compiled in {time.perf_counter() - t0:.0f} s", flush=True)
    for _ in range(3):
        call(hg)
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        call(hg)
        times.append(time.perf_counter() - t0)
    if args.perf:
        print(f"# median of 10 calls: {statistics.median(times) * 1e3:.1f} ms; perf samples of {args.perf:.0f} s of calls:")
        perf_samples(call, hg, args.perf, args.rows)
        return
    if args.cprofile:
        import cProfile
        import pstats

        print(f"# median of 10 calls: {statistics.median(times) * 1e3:.1f} ms; cProfile of 10 calls "
              "(divide the times by 10 for one call; cProfile adds ~1 us per Python-level call):")
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(10):
            call(hg)
        prof.disable()
        pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(args.rows)
        return
    print(f"# median of 10 calls: {statistics.median(times) * 1e3:.1f} ms; profile of 5 calls "
          "(divide the times by 5 for one call):")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            call(hg)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))


# what a sampled symbol is, by its name (first match): MKL's matrix-product kernels, its other
# passes of a product (packing the operands, scaling the output by beta), TorchInductor's loops
KINDS = [("MKL sgemm compute kernels", re.compile(r"sgemm_(kernel|pst)")),
         ("MKL packing (scopy)", re.compile(r"mkl_blas.*scopy")),
         ("MKL output scaling (mscale)", re.compile(r"mkl_blas.*mscale")),
         ("MKL other", re.compile(r"mkl_")),
         ("TorchInductor loops", re.compile(r"cpp_fused_"))]


def perf_samples(call, hg, seconds: float, rows: int) -> None:
    """Call the graph for ``seconds`` while ``perf record`` samples this process; print the samples
    by thread and library, by kind (``KINDS``; the OpenMP runtime by its library) and the top
    symbols."""
    with tempfile.TemporaryDirectory() as tmp:
        data = f"{tmp}/perf.data"
        with open(f"{tmp}/perf.err", "w") as err:
            rec = subprocess.Popen(["perf", "record", "-F", "2000", "-g", "-p", str(os.getpid()), "-o", data,
                                    "--", "sleep", str(seconds)], stdout=subprocess.DEVNULL, stderr=err)
            time.sleep(0.5)
            n, t0 = 0, time.perf_counter()
            while rec.poll() is None:
                call(hg)
                n += 1
            elapsed = time.perf_counter() - t0
        if rec.returncode != 0 or n == 0:
            raise SystemExit(f"perf record failed (exit {rec.returncode}, {n} calls sampled): "
                             f"{open(f'{tmp}/perf.err').read()[-500:]}")
        rep = subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort", "pid,dso,sym", "-g", "none",
                              "--percent-limit", "0", "--stdio"], capture_output=True, text=True)
        if rep.returncode != 0:
            raise SystemExit(f"perf report failed: {rep.stderr[-500:]}")
        report = rep.stdout
    print(f"# {n} calls in {elapsed:.1f} s ({elapsed / n * 1e3:.1f} ms per call, perf attached)")
    # "  20.25%  32149:python  libtorch_cpu.so  [.] mkl_blas_def_sgemm_kernel_0_zen"
    line = re.compile(r"^\s*([\d.]+)%\s+(\d+):.*?\s+(\S+)\s+\[(.)\]\s+(.*)$")
    by_thread: dict[tuple[str, str], float] = defaultdict(float)
    by_kind: dict[str, float] = defaultdict(float)
    by_sym: dict[str, float] = defaultdict(float)
    for row in report.splitlines():
        m = line.match(row)
        if not m:
            continue
        pct, tid, dso, sym = float(m.group(1)), m.group(2), m.group(3), m.group(5).strip()
        by_thread[(tid, dso)] += pct
        kind = next((k for k, rx in KINDS if rx.search(sym)), None)
        if kind is None:
            kind = "OpenMP runtime (libgomp: waiting for work, barriers)" if "libgomp" in dso else f"other: {dso}"
        by_kind[kind] += pct
        by_sym[sym[:110]] += pct
    print(f"% of samples by kind (both threads; {sum(by_kind.values()):.2f} % of the samples read from perf's report):")
    for kind, pct in sorted(by_kind.items(), key=lambda kv: -kv[1])[:rows]:
        print(f"{pct:6.2f}  {kind}")
    print("% by thread and library:")
    for (tid, dso), pct in sorted(by_thread.items(), key=lambda kv: -kv[1])[:12]:
        print(f"{pct:6.2f}  thread {tid}  {dso}")
    print("% by symbol:")
    for sym, pct in sorted(by_sym.items(), key=lambda kv: -kv[1])[:rows]:
        print(f"{pct:6.2f}  {sym}")


if __name__ == "__main__":
    main()
