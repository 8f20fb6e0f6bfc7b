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
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
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
    args = ap.parse_args()
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


if __name__ == "__main__":
    main()
