"""The matrix products of one compiled energy + forces call, timed alone at their own shapes and
strides: how much of the call they are, measured on this machine in this run.

Run: ``OMP_NUM_THREADS=2 .venv/bin/python benchmarks/mm_floor.py [--preset paper] [--molecule DHA]
[--threads 2] [--rounds 5] [--rows 25] [--no-compile] [--alternatives]``

The graph that ``compile=True`` compiles on the CPU (:func:`se3set_ase.model.compiled.trace_energy_and_forces`,
the CPU's layout: unrolled Clebsch-Gordan products, inverse tables) is traced with the sizes as
constants, so every ``mm``, ``addmm``, ``bmm`` and ``baddbmm`` in it has concrete shapes and
strides (the backward's products read transposed views: they are timed as such). Each distinct
product is run alone on random tensors of that layout (median of repeats) and weighed by how often
the graph calls it. TorchInductor leaves these products to ATen (MKL on these wheels), so their sum
is what a call spends in them if nothing else ran, whatever the compiler does with the rest.

Unless ``--no-compile``, the compiled call (``CompiledEnergyForces``, minutes to compile) is timed
in the same process, in rounds alternated with the isolated products (medians on both sides), so
the ratio of the two does not move with this machine's speed, which does (the same compiled call
took 148.6-177.6 ms within one evening). The isolated pass calls each product from Python (a few
microseconds of dispatch and an output allocation each), where the compiled call's C++ wrapper
calls them directly: it slightly overstates the products' share. ``--alternatives`` also times the
2-D products (mm, addmm; bmm left out) as linears with a constant weight: through ATen, MKL's
packed weights (how TorchInductor's ``freezing`` packs a float32 linear's weight) and oneDNN's
linear, each given a contiguous input and the weight pre-transposed. A 1024^3 product gives the
large-matrix rate of the same run (``count_kernels.gemm_rate``: best of 10). Random weights, float32.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_speed import make_model, molecules, timeit  # noqa: E402
from count_kernels import gemm_rate  # noqa: E402
from se3set_ase.fragment import Fragmenter, FragmentSettings  # noqa: E402
from se3set_ase.model.compiled import CompiledEnergyForces, table_widths, trace_energy_and_forces  # noqa: E402
from se3set_ase.model.fused import unrolled_products  # noqa: E402

aten = torch.ops.aten
CPU = torch.device("cpu")
PRODUCTS = {aten.mm.default: "mm", aten.addmm.default: "addmm", aten.bmm.default: "bmm",
            aten.baddbmm.default: "baddbmm"}


def product_flops(name: str, shapes: list[tuple[int, ...]]) -> int:
    """Floating-point operations (2 per multiply-add) of one product, from its tensor arguments'
    shapes in call order."""
    a, b = shapes[-2], shapes[-1]  # addmm / baddbmm: (bias, a, b)
    if name in ("mm", "addmm"):
        return 2 * a[0] * a[1] * b[1]
    return 2 * a[0] * a[1] * a[2] * b[2]


def graph_products(model, hg) -> Counter:
    """The products of the compiled CPU graph for ``hg``: (op, ((shape, stride, dtype) of each
    tensor argument), the other arguments) -> how many times one call runs it."""
    static = hg.to("cpu", model.dtype)
    with unrolled_products(True):
        graph = trace_energy_and_forces(model, static, symbolic_sizes=False, widths=table_widths(static))
    found: Counter = Counter()
    for node in graph.graph.nodes:
        if node.op != "call_function" or node.target not in PRODUCTS:
            continue
        layout, rest = [], []
        for arg in node.args:
            if isinstance(arg, torch.fx.Node):
                val = arg.meta["val"]
                layout.append((tuple(int(s) for s in val.shape), tuple(int(s) for s in val.stride()), val.dtype))
            else:
                rest.append(arg)
        found[(node.target, tuple(layout), tuple(rest), tuple(sorted(node.kwargs.items())))] += 1
    return found


def strided(shape: tuple[int, ...], stride: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A random tensor with this shape, these strides and this dtype."""
    t = torch.empty_strided(shape, stride, dtype=dtype)
    t.as_strided((t.untyped_storage().nbytes() // t.element_size(),), (1,)).normal_()
    return t


def median_time(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` on the CPU over ``repeats`` calls after two (``bench_speed.timeit``)."""
    return timeit(fn, CPU, repeats, warmup=2) / 1e3


class Products:
    """The graph's distinct products on random tensors of their layouts, each callable alone."""

    def __init__(self, found: Counter):
        self.items = []  # (name, count, flops, shapes, fn, (a, b, bias) for the alternatives)
        for (target, layout, rest, kwargs), count in found.items():
            tensors = [strided(shape, stride, dtype) for shape, stride, dtype in layout]
            name = PRODUCTS[target]
            shapes = [shape for shape, _stride, _dtype in layout]

            def fn(target=target, tensors=tensors, rest=rest, kwargs=dict(kwargs)):
                return target(*tensors, *rest, **kwargs)

            self.items.append((name, count, product_flops(name, shapes), shapes, fn, tensors))
        self.items.sort(key=lambda it: -it[1] * it[2])

    def time_each(self, repeats: int) -> list[float]:
        """Seconds per call of each distinct product (median of ``repeats``)."""
        return [median_time(fn, repeats) for _n, _c, _f, _s, fn, _t in self.items]

    def time_all(self) -> float:
        """Seconds for one pass over every product as often as one call runs it."""
        t0 = time.perf_counter()
        for _n, count, _f, _s, fn, _t in self.items:
            for _ in range(count):
                fn()
        return time.perf_counter() - t0


def alternative_times(items, repeats: int) -> tuple[float, float, float]:
    """Total seconds per call of the 2-D products (mm, addmm) through ATen's ``mm``, MKL's packed
    weights and oneDNN's linear, the second operand taken as a constant weight (bmm left out)."""
    aten_s = mkl_s = dnn_s = 0.0
    for name, count, _f, shapes, fn, tensors in items:
        if name not in ("mm", "addmm"):
            continue
        a, b = tensors[-2], tensors[-1]
        m = a.shape[0]
        wt = b.t().contiguous()  # (N, K), a linear's weight
        bias = tensors[0] if name == "addmm" and tensors[0].dim() == 1 else torch.zeros(wt.shape[0])
        packed = torch.ops.mkl._mkl_reorder_linear_weight(wt, m)
        x = a.contiguous()
        aten_s += count * median_time(fn, repeats)
        mkl_s += count * median_time(lambda: torch.ops.mkl._mkl_linear(x, packed, wt, bias, m), repeats)
        dnn_s += count * median_time(lambda: torch.ops.mkldnn._linear_pointwise(x, wt, bias, "none", [], ""), repeats)
    return aten_s, mkl_s, dnn_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--molecule", default="DHA", help="aspirin, Ac-Ala3-NHMe, DHA or stachyose")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5, help="alternated rounds of call and isolated products")
    ap.add_argument("--calls", type=int, default=5, help="compiled calls (and passes over the products) per round")
    ap.add_argument("--repeats", type=int, default=15, help="timings per distinct product")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--no-compile", action="store_true", help="only the isolated products")
    ap.add_argument("--alternatives", action="store_true", help="also MKL packed weights and oneDNN's linear")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    atoms, frag = {name: (a, f) for name, a, f in molecules()}[args.molecule]
    model = make_model(args.preset, frag, torch.device("cpu")).requires_grad_(False)
    hg = Fragmenter(FragmentSettings.preset(frag))(atoms).to("cpu", torch.float32)
    found = graph_products(model, hg)
    prods = Products(found)
    n_calls = sum(found.values())
    flops = sum(count * f for _n, count, f, _s, _fn, _t in prods.items)
    print(f"# {args.preset} preset, {args.molecule} ({len(atoms)} atoms), {args.threads} thread(s), float32: "
          f"{n_calls} matrix products per compiled energy + forces call ({len(prods.items)} distinct), "
          f"{flops / 1e9:.2f} GFLOP", flush=True)
    each = prods.time_each(args.repeats)
    total = sum(t * it[1] for t, it in zip(each, prods.items))
    rate = gemm_rate(args.threads)
    print(f"# alone, each at its own layout: {total * 1e3:.1f} ms per call, {flops / total / 1e9:.0f} GFLOP/s; "
          f"one 1024^3 product: {rate:.0f} GFLOP/s (at that rate: {flops / rate / 1e6:.1f} ms)")
    print(f"{'ms/call':>8} {'count':>5}  {'op':7} {'GFLOP/s':>7}  shapes")
    for t, (name, count, f, shapes, _fn, _t) in sorted(zip(each, prods.items), key=lambda r: -r[0] * r[1][1])[:args.rows]:
        print(f"{t * count * 1e3:8.2f} {count:5d}  {name:7} {f / t / 1e9:7.0f}  {' x '.join(str(list(s)) for s in shapes)}")
    if args.alternatives:
        a_s, m_s, d_s = alternative_times(prods.items, args.repeats)
        print(f"# 2-D products (mm, addmm) as constant-weight linears: ATen {a_s * 1e3:.1f} ms, "
              f"MKL packed weights {m_s * 1e3:.1f} ms ({a_s / m_s:.3f}x), oneDNN linear {d_s * 1e3:.1f} ms ({a_s / d_s:.3f}x)")
    if args.no_compile:
        return
    t0 = time.perf_counter()
    call = CompiledEnergyForces(model)
    call(hg)
    print(f"# compiled in {time.perf_counter() - t0:.0f} s; rounds of {args.calls} calls and {args.calls} passes "
          "over the isolated products, alternated (medians)", flush=True)
    for _ in range(3):
        call(hg)
    calls, alone = [], []
    for r in range(args.rounds):
        ts = []
        for _ in range(args.calls):
            t0 = time.perf_counter()
            call(hg)
            ts.append(time.perf_counter() - t0)
        calls.append(statistics.median(ts))
        alone.append(statistics.median(prods.time_all() for _ in range(args.calls)))
        print(f"round {r + 1}: call {calls[-1] * 1e3:.1f} ms, its products alone {alone[-1] * 1e3:.1f} ms "
              f"({alone[-1] / calls[-1]:.0%}), the rest {(calls[-1] - alone[-1]) * 1e3:.1f} ms", flush=True)
    share = statistics.median(p / c for p, c in zip(alone, calls))
    rest = statistics.median(c - p for p, c in zip(alone, calls))
    print(f"# medians over the rounds: compiled call {statistics.median(calls) * 1e3:.1f} ms; its matrix products "
          f"alone {statistics.median(alone) * 1e3:.1f} ms, {share:.0%} of the call in the same round; the rest "
          f"{rest * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
