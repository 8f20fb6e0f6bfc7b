"""Time MACE-small's ASE calculator (random weights) on molecules: the speed anchor measured in
the same run as ``bench_speed.py``.

Runs in the MACE virtual environment (mace-torch pins e3nn 0.4.4, this project needs e3nn 0.6;
``benchmarks/mace_side_by_side.py --setup`` builds ``.venv-mace``)::

    OMP_NUM_THREADS=1 .venv-mace/bin/python benchmarks/mace_speed.py tests/data/dha.xyz --threads 1

``bench_speed.py --mace`` calls it with the same molecules and threads. The model is the anchors'
MACE-small (``../shared/anchors/speed_h100_2026-11-23.md``): hidden irreps 64x0e, 2 interactions,
r_max 5 Å, correlation 3, max_ell 3, 8 Bessel functions, radial MLP [64, 64, 64], float32, random
weights (speed does not depend on training). Prints one JSON line per molecule:
{"molecule", "atoms", "params", "threads", "ms"} with ms the median energy + forces call (a fresh
position each call, so the calculator recomputes: neighbour list, batch, network, forces).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


def mace_small(elements: list[int]):
    import torch
    from e3nn import o3
    from mace import modules

    torch.manual_seed(0)
    return modules.ScaleShiftMACE(
        r_max=5.0, num_bessel=8, num_polynomial_cutoff=5, max_ell=3,
        interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
        interaction_cls_first=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
        num_interactions=2, num_elements=len(elements), hidden_irreps=o3.Irreps("64x0e"),
        MLP_irreps=o3.Irreps("16x0e"), atomic_energies=np.zeros(len(elements)), avg_num_neighbors=10.0,
        atomic_numbers=elements, correlation=3, gate=torch.nn.functional.silu,
        radial_MLP=[64, 64, 64], atomic_inter_scale=1.0, atomic_inter_shift=0.0,
    ).float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("molecules", nargs="+", help="structure files (ASE-readable)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    import ase.io
    import torch
    from mace.calculators import MACECalculator

    torch.set_num_threads(args.threads)
    model = mace_small([1, 6, 7, 8])
    calc = MACECalculator(models=model, device="cpu", default_dtype="float32")
    params = sum(p.numel() for p in model.parameters())
    rng = np.random.default_rng(0)
    for path in args.molecules:
        atoms = ase.io.read(path)
        atoms.calc = calc
        start = atoms.positions.copy()
        ts = []
        for k in range(args.repeats + 2):
            atoms.positions = start + rng.normal(scale=0.01, size=start.shape)
            t0 = time.perf_counter()
            atoms.get_forces()
            if k >= 2:  # two warm-up calls
                ts.append(time.perf_counter() - t0)
        print(json.dumps({"molecule": path, "atoms": len(atoms), "params": params, "threads": args.threads,
                          "ms": statistics.median(ts) * 1e3}), flush=True)


if __name__ == "__main__":
    main()
