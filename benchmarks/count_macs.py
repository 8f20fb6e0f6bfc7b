"""Matrix-product work of one energy + forces call, in total and per linear map of the network.

Run: ``.venv/bin/python benchmarks/count_macs.py [--preset paper] [--molecule DHA]``

Counts, for the fused network as the compiled CPU path traces it (per-edge Clebsch-Gordan products
unrolled, random weights as in ``bench_speed.py``, float32): the FLOPs of all matrix products of the
forward and of forward + the backward that gives the forces (``torch.utils.flop_counter``), and the
forward multiply-adds of each fused linear map (the calls of ``fused._mm``, attributed to the
``IrrepsLinear`` or shared-weight tensor product that issued them, summed over the blocks). Counts
depend on the hypergraph's sizes only, not on the machine: the numbers a call's matrix products
cannot go below without changing the architecture.
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_speed import make_model, molecules  # noqa: E402
from se3set_ase.fragment import Fragmenter, FragmentSettings  # noqa: E402
from se3set_ase.model import fused  # noqa: E402
from se3set_ase.model.fused import fused_energy_and_forces, unrolled_products  # noqa: E402


def macs_per_linear(model, hg) -> collections.Counter:
    """Forward multiply-adds of ``fused._mm`` per issuing module name (block index dropped)."""
    names = {id(m): (n.split(".", 2)[-1] if n.startswith("blocks.") else n) for n, m in model.named_modules()}
    current, macs = ["(other)"], collections.Counter()
    lin_cols, tp_shared, mm = fused._lin_cols, fused._tp_shared, fused._mm

    def named(fn, prefix=""):
        def wrapper(ctx, module, *args, **kwargs):
            previous, current[0] = current[0], prefix + names[id(module)]
            try:
                return fn(ctx, module, *args, **kwargs)
            finally:
                current[0] = previous
        return wrapper

    def counted_mm(x, w, bias=None):
        macs[current[0]] += x.shape[0] * x.shape[1] * x.shape[2] * w.shape[1]
        return mm(x, w, bias)

    fused._lin_cols, fused._tp_shared, fused._mm = named(lin_cols), named(tp_shared, "attr @ W^T of "), counted_mm
    try:
        with torch.no_grad():
            fused.fused_forward(model, hg)
    finally:
        fused._lin_cols, fused._tp_shared, fused._mm = lin_cols, tp_shared, mm
    return macs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--molecule", default="DHA", help="aspirin, Ac-Ala3-NHMe, DHA or stachyose")
    args = ap.parse_args()
    atoms, frag = {name: (a, f) for name, a, f in molecules()}[args.molecule]
    model = make_model(args.preset, frag, torch.device("cpu")).requires_grad_(False)
    hg = Fragmenter(FragmentSettings.preset(frag))(atoms).to("cpu", torch.float32)
    print(f"# {args.preset} preset, {args.molecule}: {hg.num_atoms} atoms, {hg.num_tokens} tokens, "
          f"{hg.v2e_src.shape[0]} atom-token incidences")
    with unrolled_products(True):
        with FlopCounterMode(display=False) as fwd:
            per_linear = macs_per_linear(model, hg)  # one forward, counted both ways
        with FlopCounterMode(display=False) as both:
            fused_energy_and_forces(model, hg)
    print(f"matrix-product GFLOP per call: forward {fwd.get_total_flops() / 1e9:.2f}, "
          f"forward + forces backward {both.get_total_flops() / 1e9:.2f}")
    print(f"forward GMAC through the fused linear maps: {sum(per_linear.values()) / 1e9:.2f}, of which:")
    for name, n in per_linear.most_common():
        print(f"  {name:32s} {n / 1e6:9.1f} MMAC")


if __name__ == "__main__":
    main()
