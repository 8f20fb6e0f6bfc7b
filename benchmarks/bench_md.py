"""Milliseconds per MD step through the calculator: eager vs ``compile=True``, same run.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_md.py [MODEL] [--data FILE] [--steps N]``
(default: the shipped ``gfn2_ac_ala3_nhme`` from the first frame of its data file, 500 K Langevin,
400 steps of 0.5 fs). A per-call benchmark on one geometry (``bench_speed.py``) hides what MD
does to a compiled path: the implicit cross tokens' Verlet list changes every few tens of steps,
and a graph compiled per token list would recompile each time. This script runs the same Langevin
trajectory (same velocities and noise seeds) with both calculators, and reports ms per step after
a warm-up, the number of token-list changes seen, the number of graphs compiled, and the largest
force difference on the first steps (before the chaotic trajectories part).
Timings are machine-dependent; compare the two columns of one run only.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from se3set_ase import SE3SetCalculator  # noqa: E402

DEFAULT_MODEL = "gfn2_ac_ala3_nhme"
DEFAULT_DATA = Path("/work/shared/data/gfn2/Ac-Ala3-NHMe.extxyz")


def run(calc, atoms0, steps: int, warmup: int, temperature: float, seed: int):
    """Langevin MD with ``calc``: (ms per step after warm-up, forces of the first 3 steps,
    number of distinct token lists met)."""
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    atoms = atoms0.copy()
    atoms.calc = calc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=np.random.default_rng(seed))
    dyn = Langevin(atoms, timestep=0.5 * units.fs, temperature_K=temperature, friction=0.01 / units.fs,
                   rng=np.random.default_rng(seed + 1))
    lists = []  # token lists met: the fragmenter hands out the same tensor while a list holds
    inner = calc._energy_and_forces

    def counting(hg):
        if not lists or hg.token_anchor is not lists[-1]:
            lists.append(hg.token_anchor)
        return inner(hg)

    calc._energy_and_forces = counting
    first = []
    t0 = None
    for step in range(steps):
        if step == warmup:
            t0 = time.perf_counter()
        dyn.run(1)
        if step < 3:
            first.append(atoms.get_forces().copy())
    ms = 1000 * (time.perf_counter() - t0) / (steps - warmup)
    return ms, first, len(lists)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="model name or .pt path")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="extxyz file; its first frame starts the MD")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--warmup", type=int, default=5, help="steps not timed (the compile happens in step 1)")
    ap.add_argument("--temperature", type=float, default=500.0)
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.steps <= args.warmup:
        ap.error("--steps must exceed --warmup")
    import ase.io

    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    atoms = ase.io.read(args.data, index=0)
    print(f"# {args.model}: {atoms.get_chemical_formula()} ({len(atoms)} atoms) from {args.data}, "
          f"Langevin {args.temperature:g} K, dt 0.5 fs, {args.steps} steps ({args.warmup} untimed), "
          f"{args.dtype}, 1 torch thread, torch {torch.__version__}")
    eager = SE3SetCalculator(args.model, device="cpu", dtype=dtype, skin=1.0)
    t0 = time.perf_counter()
    comp = SE3SetCalculator(args.model, device="cpu", dtype=dtype, compile=True, skin=1.0)
    ms_e, f_e, lists_e = run(eager, atoms, args.steps, args.warmup, args.temperature, args.seed)
    t1 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager would make the figure a lie
        ms_c, f_c, lists_c = run(comp, atoms, args.steps, args.warmup, args.temperature, args.seed)
    total_c = time.perf_counter() - t1
    d = max(float(np.abs(a - b).max() / np.abs(a).max()) for a, b in zip(f_e, f_c))
    print(f"eager     {ms_e:8.1f} ms/step   token lists met {lists_e}")
    print(f"compiled  {ms_c:8.1f} ms/step   token lists met {lists_c}, graphs compiled "
          f"{comp.compiled.compilations}, whole compiled run {total_c:.0f} s incl. compiling")
    print(f"ratio     {ms_e / ms_c:8.2f}x   max|dF|/max|F| over the first 3 steps {d:.1e}  (eager run took {t1 - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
