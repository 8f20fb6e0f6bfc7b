"""A/B timing of the compiled energy + forces call on the CPU, layout variants in one process.

Run: ``OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_compiled.py [--presets small,paper]
[--molecule DHA] [--threads 2] [--calls 20] [--variants default,matmul]``

Variants (``VARIANTS``): ``default`` is what ``compile=True`` does on the CPU (per-edge
Clebsch-Gordan products unrolled into element-wise sums, :func:`se3set_ase.model.fused.unrolled_products`;
the graph's wrapper generated as C++, ``compiled.CPU_INDUCTOR_OPTIONS``); ``python-wrapper`` is the
default with that wrapper in Python, as before 2026-12-07; ``v2e-only`` unrolls only the V2E
products; ``matmul`` is the eager layout (batched matmuls), which the compiled path used before
2026-12-06; ``scatter`` is the default with the gathers' backward and the sums along the index
lists as scatter-adds (ATen's ``index_put``), as before the inverse tables of
:mod:`se3set_ase.model.segments` (2026-12-07); ``scalar-constants`` is the default with the
traced graph's 0-d constants left 0-d, over which Dynamo restarted its trace once per compile, as
before 2026-12-07's fifth session (the script says when a compile restarted); ``bf16-matmul`` is
the default with the linear maps' matrix products in bfloat16 (opt-in,
``CompiledEnergyForces(matmul_dtype=torch.bfloat16)``: faster on CPUs with AVX512-BF16, not the
issue's 1e-5, the force error column says how far); ``freezing``, ``serial-loops``, ``grouped``, ``static``, ``autotune``, ``fp-contract``,
``memory-planning``, ``aggressive-fusion``, ``chunk64`` and ``dynamic-threads`` are TorchInductor
options and layouts that were measured and not adopted (``benchmarks/README.md``; measured against
the Python-wrapper default of their day, their options now apply over the C++ wrapper). For each
preset the same model (random weights as in
``bench_speed.py``, float32, frozen) is compiled once per variant, the wall time of each compile is
printed (TorchInductor's disk cache makes a repeated compile of the same graph much faster, and
variants share many kernels: only a first run on a fresh machine gives cold figures), and then the
compiled graphs and the eager fused call are timed in alternation on the same hypergraph, so that a
busy machine slows all alike: the ratios of the medians are the figures. Forces are compared with a
float64 copy of the model (the issue's accuracy bound: max|dF| / max|F| <= 1e-5), and each variant's
energies and forces with the first variant's (equal to the bit, or how far apart). One 1024^3
float32 product (best of 10) is timed just before and just after each preset's timed calls: this machine's
matrix-product rate moved by 40 % within one hour (144 and 201 GFLOP/s), and the paper preset's call moves with it
(``mm_floor.py``), so an absolute figure is read beside it.
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
from count_kernels import gemm_rate  # noqa: E402
from se3set_ase.fragment import Fragmenter, FragmentSettings  # noqa: E402
from se3set_ase.model import compiled  # noqa: E402
from se3set_ase.model.compiled import CompiledEnergyForces, dynamo_restarts  # noqa: E402
from se3set_ase.model import fused  # noqa: E402
from se3set_ase.model.fused import fused_energy_and_forces  # noqa: E402


def rel_force_error(f: torch.Tensor, ref: torch.Tensor) -> float:
    return float((f.double() - ref.double()).abs().max() / ref.double().abs().max())


# name -> (unroll_products, fused.UNROLL_SHARED_PRODUCTS, fused.GROUP_SHARED_PRODUCTS, TorchInductor options)
VARIANTS = {
    "default": (True, True, None, None),  # what compile=True does on the CPU: every per-edge CG product unrolled
    "v2e-only": (True, False, None, None),  # only the V2E products unrolled (a smaller graph)
    "matmul": (False, True, None, None),  # the eager layout, as compiled before 2026-12-06: batched matmuls
    # default layout, Inductor's freezing: the frozen weights constant-folded and, for the matrix
    # products with a constant weight, prepacked for oneDNN
    "freezing": (True, True, None, {"freezing": True}),
    # default layout, TorchInductor's loops serial (one thread, plain stores: the scatter-adds fused
    # into them, not left to ATen), ATen's matrix products still on torch's threads
    "serial-loops": (True, True, None, {"cpp.threads": 1}),
    # default layout, the E2V products' Y = attr @ W^T of all paths that read one attribute block
    # in one matmul (3 per product instead of one per path)
    "grouped": (True, True, True, None),
    # default layout, traced and compiled for this hypergraph's sizes (``dynamic=False``: every loop
    # bound a constant; a new token list would need a new compile): see :class:`StaticShapes`
    "static": (True, True, None, None),
    # default layout, freezing + max-autotune: each matrix product with a constant weight timed as
    # ATen's and as TorchInductor's own C++ GEMM template (prepacked weight, fused epilogue)
    "autotune": (True, True, None, {"freezing": True, "max_autotune": True,
                                    "max_autotune_gemm_backends": "CPP,ATEN"}),
    # default layout, TorchInductor's pooled memory planning: the intermediates carved out of one
    # pool instead of one allocation each (the Python wrapper's ~1,300 allocations per call); with
    # torch 2.13 the paper preset's graph fails to compile (RecursionError in the memory planner)
    "memory-planning": (True, True, None, {"memory_planning": True}),
    # default layout, TorchInductor's aggressive fusion: nodes fused also when they share no memory
    # reads (fewer, larger loops)
    "aggressive-fusion": (True, True, None, {"aggressive_fusion": True}),
    # default layout, TorchInductor's loops parallel from 64 elements per thread (default 512): the
    # many loops over ~1,000 incidences or ~300 tokens split over both cores
    "chunk64": (True, True, None, {"cpp.min_chunk_size": 64}),
    # default layout, the number of threads of each parallel loop chosen at run time from its size
    "dynamic-threads": (True, True, None, {"cpp.dynamic_threads": True}),
    # default layout, the graph's wrapper (buffer allocation, views, one call per loop and per ATen
    # kernel) in Python, as compile=True had it before 2026-12-07 (the default now generates it as
    # C++, compiled at -O1 apart from the loops: compiled.CPU_INDUCTOR_OPTIONS). Every other
    # variant's options are applied over that default.
    "python-wrapper": (True, True, None, {"cpp_wrapper": False, "cpp_wrapper_build_separate": False}),
    # default layout, the gathers' backward and the sums over incidences and tokens as scatter-adds
    # (ATen's index_put with two threads), as compile=True had them before the inverse tables of
    # se3set_ase.model.segments (``CompiledEnergyForces(segment_tables=False)``)
    "scatter": (True, True, None, None),
    # default layout, the traced graph's 0-d constants (average degrees, energy scale) left 0-d, as
    # before 2026-12-07 (fifth session): Dynamo reads them as floats and restarts its whole trace
    # once per compile to specialise them (``compiled._no_scalar_constants``); the same kernels
    "scalar-constants": (True, True, None, None),
    # default layout, the linear maps' matrix products in bfloat16 (``CompiledEnergyForces(
    # matmul_dtype=torch.bfloat16)``, opt-in: not the numerics, the force error is printed)
    "bf16-matmul": (True, True, None, None),
    # default layout, the C++ loops built with -ffp-contract=fast (TorchInductor's default: off): the
    # compiler may fuse a multiply and an add into one FMA instruction (the unrolled CG products and
    # the segment sums are chains of them); rounds differently, inside the 1e-5 bound
    "fp-contract": (True, True, None, {"cpp.enable_floating_point_contract_flag": "fast"}),
}
# the variants compiled without inverse tables
SCATTER_VARIANTS = {"scatter"}


class StaticShapes(CompiledEnergyForces):
    """The compiled call traced with this hypergraph's sizes as constants and compiled with
    ``dynamic=False``: what symbolic sizes cost the generated loops (A/B only; ``compile=True``
    keeps symbolic sizes, which serve every token list of a molecule)."""

    symbolic_sizes = False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="small,paper")
    ap.add_argument("--molecule", default="DHA", help="aspirin, Ac-Ala3-NHMe, DHA or stachyose")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--variants", default="default,matmul",
                    help=f"comma-separated, from: {', '.join(VARIANTS)}")
    args = ap.parse_args()
    variants = args.variants.split(",")
    torch.set_num_threads(args.threads)
    mols = {name: (atoms, frag) for name, atoms, frag in molecules()}
    atoms, frag = mols[args.molecule]
    print(f"# {args.molecule} ({len(atoms)} atoms), {args.threads} thread(s), float32, torch {torch.__version__}")
    print("# ms per energy + forces call (median, calls alternated), compile wall time, "
          "max|dF|/max|F| against a float64 copy of the model")
    print("| preset | variant | compile s | ms per call | eager fused / this | max|dF|/max|F| |")
    print("|---|---|---|---|---|---|")
    for preset in args.presets.split(","):
        model = make_model(preset, frag, torch.device("cpu")).requires_grad_(False)
        hg = Fragmenter(FragmentSettings.preset(frag))(atoms).to("cpu", torch.float32)
        model64 = make_model(preset, frag, torch.device("cpu"), dtype=torch.float64)
        model64.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in model.state_dict().items()})
        _e64, f64, _ = fused_energy_and_forces(model64.requires_grad_(False), hg.to("cpu", torch.float64))

        calls, compile_s = {"eager": lambda: fused_energy_and_forces(model, hg)}, {}
        for name in variants:
            unroll, shared, group, options = VARIANTS[name]
            fused.UNROLL_SHARED_PRODUCTS, fused.GROUP_SHARED_PRODUCTS = shared, group
            t0 = time.perf_counter()
            cls = StaticShapes if name == "static" else CompiledEnergyForces
            c = cls(model, unroll_products=unroll, inductor_options=options,
                    segment_tables=name not in SCATTER_VARIANTS,
                    matmul_dtype=torch.bfloat16 if name == "bf16-matmul" else None)
            keep = compiled._no_scalar_constants
            if name == "scalar-constants":
                compiled._no_scalar_constants = lambda graph: None
            try:
                with dynamo_restarts() as restarts:
                    c(hg)
            finally:
                compiled._no_scalar_constants = keep
            compile_s[name] = time.perf_counter() - t0
            if restarts:
                print(f"#   {preset} ({name}): Dynamo restarted its trace {len(restarts)} time(s) "
                      f"({'; '.join(restarts)})", flush=True)
            calls[name] = lambda c=c: c(hg)
            print(f"#   {preset}: compiled ({name}) in {compile_s[name]:.0f} s", flush=True)
        fused.UNROLL_SHARED_PRODUCTS, fused.GROUP_SHARED_PRODUCTS = True, None

        times: dict[str, list[float]] = {k: [] for k in calls}
        for fn in calls.values():
            fn()
        rate_before = gemm_rate(args.threads)
        for _ in range(args.calls):
            for key, fn in calls.items():
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
        ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        print(f"#   {preset}: one 1024^3 float32 product at {rate_before:.0f} GFLOP/s before the timed calls, "
              f"{gemm_rate(args.threads):.0f} after (this machine's large-matrix rate)", flush=True)
        print(f"| {preset} | eager fused | - | {ms['eager']:.1f} | 1.00x | "
              f"{rel_force_error(calls['eager']()[1], f64):.1e} |")
        out = {name: calls[name]()[:2] for name in variants}  # energies, forces
        for name in variants:
            err = rel_force_error(out[name][1], f64)
            print(f"| {preset} | {name} | {compile_s[name]:.0f} | {ms[name]:.1f} | {ms['eager'] / ms[name]:.2f}x | "
                  f"{err:.1e} |", flush=True)
        (e0, f0) = out[variants[0]]
        for name in variants[1:]:
            e, f = out[name]
            same = torch.equal(e, e0) and torch.equal(f, f0)
            print(f"#   {preset}: {name} against {variants[0]}: energies and forces "
                  + ("equal to the bit" if same else f"differ, max|dF|/max|F| {rel_force_error(f, f0):.1e}"))


if __name__ == "__main__":
    main()
