"""Count the tensor operations of one energy + forces call, by kind and by place in the code.

Run: ``.venv/bin/python benchmarks/count_kernels.py [--preset small|paper] [--molecule dha.xyz]``.

On a GPU each non-view ATen operation is (at least) one kernel launch, and a call of the fused
SE3Set path is bound by their number, not by arithmetic (see the H100 figures in
``benchmarks/README.md``). This script runs the call once on the CPU under a
``TorchDispatchMode`` that sees every ATen operation, forward and backward, and reports how many
there are, of which kind, and which line of ``se3set_ase`` issued them ("backward" for the ones the
autograd engine runs). It is the measure for work that fuses kernels: fewer operations here means
fewer launches there. It also adds up the floating-point work of the matrix products (2 per
multiply-add), which bounds the call's time on a CPU, where the call is bound by arithmetic:
``--gemm-threads N`` times one large float32 mm on N threads and prints the time those products
need at that rate at best. Random weights (the counts do not depend on them), float32.

``--compiled`` counts instead the operations of the graph that ``compile=True`` compiles
(:func:`se3set_ase.model.compiled.trace_energy_and_forces`), in both layouts of its per-edge
Clebsch-Gordan products (batched matmuls, CUDA's default; unrolled into element-wise sums, the
CPU's), the unrolled one also with the CPU's inverse tables (:mod:`se3set_ase.model.segments`: no
scatter-add of features): the compiler fuses the element-wise operations, so what stays one kernel
each are the matrix products (and, on a CPU with two threads, the scatter-adds).
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from se3set_ase.fragment import Fragmenter, FragmentSettings  # noqa: E402
from se3set_ase.model import ModelConfig, SE3SetModel  # noqa: E402
from se3set_ase.model.network import energy_and_forces  # noqa: E402

# operations that launch no kernel (views, metadata, allocation without fill)
NO_KERNEL = {"view", "slice", "as_strided", "transpose", "t", "unsqueeze", "squeeze", "select",
             "expand", "permute", "_reshape_alias", "detach", "alias", "_unsafe_view", "split",
             "narrow", "unbind", "lift_fresh", "empty", "empty_strided", "empty_like", "result_type",
             "_local_scalar_dense", "split_with_sizes", "unsafe_split"}


# helpers of fused.py called from many places: their operations are counted where they were called
THIN_HELPERS = {"_mm", "concat", "_lin_cols", "_linear"}


def matmul_flops(name: str, args) -> int:
    """Floating-point operations (2 per multiply-add) of a matrix product, 0 for other operations."""
    if name == "mm":
        a, b = args[0], args[1]
        return 2 * a.shape[0] * a.shape[1] * b.shape[1]
    if name == "addmm":
        a, b = args[1], args[2]
        return 2 * a.shape[0] * a.shape[1] * b.shape[1]
    if name == "bmm":
        a, b = args[0], args[1]
        return 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
    return 0


def gemm_rate(threads: int, n: int = 1024, repeats: int = 10) -> float:
    """This machine's float32 matrix-multiply rate (GFLOP/s) on one large square mm: an upper bound
    for the rate the network's many smaller products reach."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.by_op: Counter = Counter()
        self.by_site: Counter = Counter()
        self.flops = {"forward": 0, "backward": 0}
        self.flops_by_site: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name not in NO_KERNEL:
            ours = [f for f in traceback.extract_stack() if "se3set_ase" in f.filename]
            if not ours or ours[-1].name == "energy_and_forces":
                site = "backward (autograd.grad)" if ours else "other"
            else:
                k = len(ours) - 1
                while k > 0 and ours[k].name in THIN_HELPERS:
                    k -= 1
                site = f"{Path(ours[k].filename).name}:{ours[k].lineno} {ours[k].name}"
            self.by_op[name] += 1
            self.by_site[site] += 1
            fl = matmul_flops(name, args)
            self.flops["backward" if site.startswith("backward") else "forward"] += fl
            if fl:
                self.flops_by_site[site] += fl
        return func(*args, **(kwargs or {}))


def count_compiled(model, hg, preset: str, molecule: str) -> None:
    """Operations of the traced energy + forces graph, per CG layout: all, matrix products, scatters."""
    from se3set_ase.model.compiled import table_widths, trace_energy_and_forces
    from se3set_ase.model.fused import unrolled_products

    print(f"# {preset} preset, {molecule}: {hg.num_atoms} atoms, {hg.num_tokens} tokens, "
          f"{hg.v2e_src.shape[0]} v2e edges; the graph compile=True traces")
    for label, unroll, tables in (("batched-matmul CG products, scatter-adds (CUDA's default)", False, False),
                                  ("unrolled CG products, scatter-adds", True, False),
                                  ("unrolled CG products, inverse tables (the CPU's default)", True, True)):
        with unrolled_products(unroll):
            graph = trace_energy_and_forces(model, hg, widths=table_widths(hg) if tables else None)
        ops = Counter(str(n.target).split(".")[1] for n in graph.graph.nodes
                      if n.op == "call_function" and str(n.target).startswith("aten."))
        gemms = {k: v for k, v in ops.items() if k in ("mm", "addmm", "bmm", "baddbmm")}
        scatters = sum(v for k, v in ops.items() if k.startswith(("index_put", "scatter", "index_add")))
        print(f"{label}: {sum(ops.values())} ATen operations, {sum(gemms.values())} matrix products "
              f"({', '.join(f'{v} {k}' for k, v in sorted(gemms.items()))}), {scatters} scatter-adds")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--molecule", default=str(ROOT / "tests" / "data" / "dha.xyz"))
    ap.add_argument("--fragment", default="md22", help="fragment preset (md22: implicit, md17: explicit)")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--gemm-threads", type=int, default=0,
                    help="also time one large float32 mm on this many threads and print the lower bound "
                         "on a call's CPU time that the matrix products alone set (0: skip)")
    ap.add_argument("--cpu-layout", action="store_true",
                    help="count the CPU's choices of se3set_ase.model.fused (default: the GPU's, e.g. "
                         "GROUP_SHARED_PRODUCTS, since the counts stand for kernel launches)")
    ap.add_argument("--compiled", action="store_true",
                    help="count the traced graph of compile=True per CG layout instead (no compile)")
    args = ap.parse_args()
    import ase.io

    import se3set_ase.model.fused as fused

    fused.GROUP_SHARED_PRODUCTS = None if args.cpu_layout else True

    atoms = ase.io.read(args.molecule)
    torch.manual_seed(0)
    model = SE3SetModel(ModelConfig.preset(args.preset, fragment=FragmentSettings.preset(args.fragment)), torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    hg = Fragmenter(model.config.fragment)(atoms).to("cpu", torch.float32)
    if args.compiled:
        count_compiled(model, hg, args.preset, Path(args.molecule).name)
        return
    energy_and_forces(model, hg)  # warm the caches (CG tensors, layouts) first, as every later call finds them
    mode = _Count()
    with mode:
        energy_and_forces(model, hg)
    total = sum(mode.by_op.values())
    back = mode.by_site["backward (autograd.grad)"]
    print(f"# {args.preset} preset, {Path(args.molecule).name}: {len(atoms)} atoms, {hg.num_tokens} tokens, "
          f"{hg.v2e_src.shape[0]} v2e edges")
    print(f"operations per energy + forces call: {total} ({total - back} forward, {back} backward)")
    fl = mode.flops
    total_fl = fl["forward"] + fl["backward"]
    print(f"matrix-product work per call: {total_fl / 1e9:.2f} GFLOP ({fl['forward'] / 1e9:.2f} forward, "
          f"{fl['backward'] / 1e9:.2f} backward)")
    if args.gemm_threads:
        rate = gemm_rate(args.gemm_threads)
        print(f"float32 GEMM rate, {args.gemm_threads} thread(s), 1024^3 mm: {rate:.1f} GFLOP/s -> the matrix "
              f"products alone need >= {total_fl / rate / 1e6:.0f} ms per call on this CPU")
    print("\nby kind:")
    for k, v in mode.by_op.most_common(args.top):
        print(f"  {v:6d}  {k}")
    print("\nby place (forward) / backward:")
    for k, v in mode.by_site.most_common(args.top):
        print(f"  {v:6d}  {k}")
    print("\nmatrix-product GFLOP by place (forward) / backward:")
    for k, v in mode.flops_by_site.most_common(args.top):
        print(f"  {v / 1e9:6.2f}  {k}")


if __name__ == "__main__":
    main()
