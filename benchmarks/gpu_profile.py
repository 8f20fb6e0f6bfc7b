"""Where the time of an SE3Set force call and training step goes on a GPU, and what fusing buys.

Run: ``python benchmarks/gpu_profile.py [--device cuda] [--sections profile,tf32,train,compile]``.

profile  kernels per energy + forces call (fused eager path, paper and small presets, DHA), the
         sum of their GPU times, and the 12 kernels that take most of it: tells launch-bound
         (many short kernels) from arithmetic-bound; with the CUDA-graph replay time beside it.
tf32     the CUDA-graph replay with TF32 matrix products allowed, and with the linear maps'
         products in bfloat16 (``matmul_dtype=torch.bfloat16``), each with its force error
         against full float32 (the issue asks to show the error before using it).
train    training samples/s of the fused path at batch 8, 32, 128 DHA copies (paper preset),
         and the kernels of one batch-32 step.
compile  the compiled graph of :mod:`se3set_ase.model.compiled` (TorchInductor, Triton kernels
         on CUDA), called directly and replayed from a CUDA graph as the calculator does with
         ``compile=True``, with its error against the fused path.
warm     only compiles what ``compile`` times (its compile time is printed), filling TorchInductor's
         disk cache: ``gpu_session.sh`` runs it beside the training step's compile, so that one
         call of a few minutes compiles both and the timed sections then find them in the cache.

``--layouts`` (``warm`` and ``compile``): how the compiled graph writes the per-edge
Clebsch-Gordan products: ``default`` (CompiledEnergyForces' choice for the device: batched
matmuls on CUDA), ``matmul`` or ``unrolled`` (element-wise sums that the compiler fuses, the CPU's
default: no batched-matmul kernels, fewer launches; measured on the CPU, 1.06x there), e.g.
``--layouts matmul,unrolled`` times both in one run.

Weights are random (speed does not depend on training); the zero-initialised output layer is
randomised so that forces are not trivially zero. Times are medians of repeated calls.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speed import jittered_graphs, make_model, molecules, sync, timeit, train_step  # noqa: E402

from se3set_ase.fragment import Fragmenter  # noqa: E402
from se3set_ase.hypergraph import collate  # noqa: E402
from se3set_ase.model.compiled import CompiledEnergyForces  # noqa: E402
from se3set_ase.model.fused import fused_energy_and_forces, matmul_dtype  # noqa: E402
from se3set_ase.model.graphed import GraphedEnergyForces  # noqa: E402


def kernel_table(fn, device, calls: int = 3, top: int = 12) -> None:
    """Profile ``calls`` calls of fn; print kernels per call, GPU (or CPU op) time per call, top kernels."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(calls):
            fn()
        sync(device)
    if device.type == "cuda":
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        total_us = sum(e.device_time for e in kernels)
        by_name: dict[str, list[float]] = {}
        for e in kernels:
            by_name.setdefault(e.name, []).append(e.device_time)
        print(f"  {len(kernels) / calls:.0f} kernels per call, {total_us / calls / 1e3:.2f} ms of GPU time per call, "
              f"mean {total_us / max(len(kernels), 1):.1f} us per kernel")
        rows = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]
        for name, ts in rows:
            print(f"    {sum(ts) / calls / 1e3:7.3f} ms  {len(ts) / calls:6.0f}x  {name[:110]}")
    else:
        ops = [e for e in prof.key_averages()]
        print(f"  {sum(e.count for e in ops) / calls:.0f} profiled ops per call (CPU)")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sections", default="profile,tf32,train,compile")
    ap.add_argument("--presets", default="paper,small")
    ap.add_argument("--batches", default="8,32,128")
    ap.add_argument("--layouts", default="default",
                    help="compiled graph's CG products: default, matmul, unrolled (comma-separated)")
    args = ap.parse_args()
    device = torch.device(args.device)
    sections = args.sections.split(",")
    cuda = device.type == "cuda"
    unroll_of = {"default": None, "matmul": False, "unrolled": True}
    layouts = args.layouts.split(",")
    if any(lay not in unroll_of for lay in layouts):
        ap.error(f"--layouts: each of {sorted(unroll_of)}, got {args.layouts!r}")
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(f"# device: {name}; torch {torch.__version__}; float32", flush=True)
    dha = next(a for n, a, _ in molecules() if n == "DHA")

    for preset in args.presets.split(","):
        model = make_model(preset, "md22", device)
        for p in model.parameters():
            p.requires_grad_(False)
        fr = Fragmenter(model.config.fragment)
        hg = fr(dha).to(device, torch.float32)
        _, f_ref, _ = fused_energy_and_forces(model, hg)
        print(f"\n## {preset} preset, DHA ({len(dha)} atoms, {hg.num_tokens} tokens, {hg.v2e_src.shape[0]} incidences)",
              flush=True)
        if "warm" in sections:
            for lay in layouts:
                t0 = time.perf_counter()
                CompiledEnergyForces(model, unroll_products=unroll_of[lay])(hg)
                sync(device)
                print(f"warm ({lay} layout): compiled in {time.perf_counter() - t0:.0f} s", flush=True)
        if "profile" in sections:
            t = timeit(lambda: fused_energy_and_forces(model, hg), device, 10)
            print(f"fused eager: {t:.2f} ms per call", flush=True)
            kernel_table(lambda: fused_energy_and_forces(model, hg), device)
            if cuda:
                graphed = GraphedEnergyForces(model)
                graphed(fr(dha))
                t = timeit(lambda: graphed(fr(dha)), device, 30)
                print(f"CUDA graph replay (calculator path): {t:.2f} ms per call", flush=True)
        if "tf32" in sections and cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            try:
                graphed = GraphedEnergyForces(model)
                _, f_tf, _ = graphed(fr(dha))
                t = timeit(lambda: graphed(fr(dha)), device, 30)
                print(f"CUDA graph replay, TF32 matmuls: {t:.2f} ms per call, max|dF|/max|F| vs float32 {rel(f_tf, f_ref):.1e}",
                      flush=True)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = False
                torch.backends.cudnn.allow_tf32 = False
            try:
                with matmul_dtype(torch.bfloat16):  # read when the graph is captured
                    graphed = GraphedEnergyForces(model)
                    _, f_bf, _ = graphed(fr(dha))
                    t = timeit(lambda: graphed(fr(dha)), device, 30)
                print(f"CUDA graph replay, bfloat16 products: {t:.2f} ms per call, max|dF|/max|F| vs float32 "
                      f"{rel(f_bf, f_ref):.1e}", flush=True)
            except Exception as exc:  # noqa: BLE001  (reported)
                print(f"bfloat16 products: failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        for lay in (layouts if "compile" in sections else []):
            t0 = time.perf_counter()
            try:
                comp = CompiledEnergyForces(model, unroll_products=unroll_of[lay])
                _, f_c, _ = comp(hg)
            except Exception as exc:  # noqa: BLE001  (reported)
                print(f"{lay} layout: compile failed: {type(exc).__name__}: {str(exc)[:400]}", flush=True)
            else:
                print(f"compiled ({lay} layout): compiling took {time.perf_counter() - t0:.0f} s, max|dF|/max|F| vs fused {rel(f_c, f_ref):.1e}",
                      flush=True)
                t = timeit(lambda: comp(hg), device, 10)
                print(f"compiled ({lay}), eager launch: {t:.2f} ms per call", flush=True)
                if cuda:  # the calculator's compile=True on CUDA: the compiled graph, replayed
                    try:
                        graphed = GraphedEnergyForces(model, compiled=comp)
                        _, f_g, _ = graphed(fr(dha))
                        print(f"compiled ({lay}) + CUDA graph: max|dF|/max|F| vs fused {rel(f_g, f_ref):.1e}", flush=True)
                        t = timeit(lambda: graphed(fr(dha)), device, 30)
                        print(f"compiled ({lay}) + CUDA graph replay (calculator path): {t:.2f} ms per call", flush=True)
                        kernel_table(lambda: graphed(fr(dha)), device)
                    except Exception as exc:  # noqa: BLE001
                        print(f"CUDA graph of the compiled graph failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)

    if "train" in sections:
        print("\n## training step, paper preset, fused path: forces with create_graph, loss backward, AdamW", flush=True)
        model = make_model("paper", "md22", device)
        graphs = jittered_graphs(Fragmenter(model.config.fragment), dha)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
        for bs in [int(b) for b in args.batches.split(",")]:
            batch = collate([graphs[k % 8] for k in range(bs)]).to(device, torch.float32)
            step = train_step(model, batch, opt)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            try:
                ms = timeit(step, device, 5, warmup=1, budget_s=40.0)
            except torch.OutOfMemoryError:
                print(f"batch {bs:4d}: out of GPU memory", flush=True)
                break
            peak = f"  peak {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB" if cuda else ""
            print(f"batch {bs:4d}: {ms:8.1f} ms/step {1000.0 * bs / ms:8.1f} samples/s{peak}", flush=True)
            if bs == 32 or bs == int(args.batches.split(",")[0]) and len(args.batches.split(",")) == 1:
                kernel_table(step, device, calls=2)


if __name__ == "__main__":
    main()
