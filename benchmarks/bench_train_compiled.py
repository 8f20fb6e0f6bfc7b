"""Training step: eager fused network vs one compiled graph (``fit --compile``), same run.

Run: ``OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_train_compiled.py [--preset small]
[--batch 8] [--molecule DHA] [--device cpu|cuda]``.

The step is what ``fit`` does: energies and forces of a batch (copies of one molecule, positions
jittered by 0.02 Å, so each copy has its own token list), forces with ``create_graph``, an L2 energy
+ 100 x L2 force loss, backward, AdamW step. Printed per path: ms per step (median, the two paths
alternated), samples/s, the memory autograd keeps for the backward (distinct storages saved, MiB:
on any device; on CUDA also the allocator's peak), and the compiled step's error against the eager
one: energies, forces, and the parameter gradients (max |dg| / max |g| over parameters). Random
weights, float32. The eager step is timed alone first and printed at once (a compile that runs out
of time then still leaves it); the first compiled call traces and compiles (its time is printed;
TorchInductor's disk cache makes a rerun faster).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_speed import jittered_graphs, make_model, molecules  # noqa: E402
from se3set_ase.fragment import Fragmenter, FragmentSettings  # noqa: E402
from se3set_ase.hypergraph import collate  # noqa: E402
from se3set_ase.model.compiled_training import CompiledTrainingForces  # noqa: E402
from se3set_ase.model.fused import fused_energy_and_forces  # noqa: E402


def saved_mib(run) -> float:
    """MiB of the distinct storages autograd saves for the backward while ``run()`` builds the graph."""
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    del out
    return sum(seen.values()) / 2 ** 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--molecule", default="DHA")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--memory-budget", type=float, default=None,
                    help="the compiled graph's activation memory budget (0-1; default: the partitioner's own)")
    ap.add_argument("--inductor-options", default=None,
                    help='TorchInductor options for the compiled step, JSON (e.g. \'{"cpp_wrapper": true, '
                         '"cpp_wrapper_build_separate": true}\'); default: the training graph\'s own')
    ap.add_argument("--compile-only", action="store_true",
                    help="compile the step (one call, its time printed) and stop: fills TorchInductor's disk cache "
                         "for a later run (gpu_session.sh compiles this beside the calculator's graph)")
    args = ap.parse_args()
    device = torch.device(args.device)

    name, atoms, frag = {m[0]: m for m in molecules()}[args.molecule]
    model = make_model(args.preset, frag, device)
    batch = collate(jittered_graphs(Fragmenter(FragmentSettings.preset(frag)), atoms, n=args.batch)).to(device, torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-9)  # a step that barely moves the weights
    f_ref = torch.zeros_like(batch.positions)
    options = json.loads(args.inductor_options) if args.inductor_options else None
    compiled = CompiledTrainingForces(model, memory_budget=args.memory_budget, inductor_options=options)
    paths = {"eager": lambda hg: fused_energy_and_forces(model, hg, training=True), "compiled": compiled}

    def loss_of(e, f):
        return e.pow(2).mean() + 100.0 * (f - f_ref).pow(2).mean()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def grads(fn):
        opt.zero_grad(set_to_none=True)
        e, f, _ = fn(batch)
        loss_of(e, f).backward()
        return e.detach(), f.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def step(fn):
        opt.zero_grad(set_to_none=True)
        e, f, _ = fn(batch)
        loss_of(e, f).backward()
        opt.step()

    def peak_mib(fn) -> float:
        """The CUDA allocator's peak (MiB) over one training step."""
        torch.cuda.reset_peak_memory_stats(device)
        step(fn)
        sync()
        return torch.cuda.max_memory_allocated(device) / 2 ** 20

    print(f"# {' '.join(sys.argv)}")
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"# preset {args.preset}, {args.batch} x {name} ({atoms.get_global_number_of_atoms()} atoms): "
          f"{batch.num_tokens} tokens, {batch.v2e_src.numel()} incidences in the batch; float32, random weights")
    if args.compile_only:
        t0 = time.perf_counter()
        grads(compiled)
        sync()
        print(f"compiled step (trace + compile): {time.perf_counter() - t0:.1f} s; failed: {compiled.failed}", flush=True)
        return
    # the eager step first, alone: its figures come back even if the compile then runs out of time
    step(paths["eager"])
    alone = []
    for _ in range(args.repeats):
        sync()
        t = time.perf_counter()
        step(paths["eager"])
        sync()
        alone.append(time.perf_counter() - t)
    ms_alone = statistics.median(alone) * 1e3
    print(f"eager step before compiling: {ms_alone:.1f} ms/step, {1e3 * args.batch / ms_alone:.1f} samples/s"
          + (f", peak {peak_mib(paths['eager']):.0f} MiB" if device.type == "cuda" else ""), flush=True)
    t0 = time.perf_counter()
    e1, f1, g1 = grads(compiled)
    sync()
    print(f"first compiled step (trace + compile): {time.perf_counter() - t0:.1f} s")
    e0, f0, g0 = grads(paths["eager"])
    g_err = max(float((g1[n] - g).abs().max() / g.abs().max()) for n, g in g0.items() if float(g.abs().max()) > 0)
    print(f"compiled vs eager: max|dE|/max|E| {float((e1 - e0).abs().max() / e0.abs().max()):.2e}, "
          f"max|dF|/max|F| {float((f1 - f0).abs().max() / f0.abs().max()):.2e}, gradients {g_err:.2e}; "
          f"parameters with a gradient: {len(g0)} eager, {len(g1)} compiled")

    times: dict[str, list[float]] = {k: [] for k in paths}
    for k, fn in paths.items():  # warm-up
        step(fn)
    for _ in range(args.repeats):
        for k, fn in paths.items():
            sync()
            t = time.perf_counter()
            step(fn)
            sync()
            times[k].append(time.perf_counter() - t)
    print(f"{'path':10s} {'ms/step':>9s} {'samples/s':>10s} {'saved MiB':>10s}" + ("  peak MiB" if device.type == "cuda" else ""))
    ms = {}
    for k, fn in paths.items():
        ms[k] = statistics.median(times[k]) * 1e3
        mem = saved_mib(lambda: fn(batch))
        peak = f"  {peak_mib(fn):8.0f}" if device.type == "cuda" else ""
        print(f"{k:10s} {ms[k]:9.1f} {1e3 * args.batch / ms[k]:10.1f} {mem:10.1f}{peak}")
    print(f"speed-up compiled/eager: {ms['eager'] / ms['compiled']:.2f}x")


if __name__ == "__main__":
    main()
