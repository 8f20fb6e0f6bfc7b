"""What bfloat16 matrix products (``matmul_dtype=torch.bfloat16``) cost a trained model in accuracy.

Run: ``OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bf16_error.py [MODEL] [--data FILE] [--frames 20]
[--steps 400]`` (default: the shipped ``gfn2_dha`` on the first frames of its GFN2-xTB data).

Two figures, float32 model, eager network (the compiled graph gives the same numbers to rounding):

1. forces on data frames: mean and max |F - F_ref| (meV/Å) with float32 products and with
   bfloat16 products, F_ref from the same model in float64, beside the model's own test force MAE
   from its metadata (what the model gets wrong against the reference method);
2. NVE energy conservation: velocity Verlet, 0.5 fs, started from the first frame at 300 K (same
   velocities for both), max |E_tot - E_tot(0)| (meV) over ``--steps`` steps, float32 products
   against bfloat16 products.

Speed is measured elsewhere (``bench_compiled.py --variants default,bf16-matmul``); it pays only on
CPUs with AVX512-BF16 or AMX, and on GPUs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from se3set_ase import SE3SetCalculator  # noqa: E402
from se3set_ase.fragment import Fragmenter  # noqa: E402
from se3set_ase.model import energy_and_forces, load_model  # noqa: E402
from se3set_ase.model.fused import matmul_dtype  # noqa: E402
from se3set_ase.registry import resolve_model  # noqa: E402

DEFAULT_DATA = Path("/work/shared/data/gfn2/DHA.extxyz")


def force_errors(m32, m64, frames) -> dict[str, np.ndarray]:
    """Per frame: mean |F - F_float64| (meV/Å) with float32 and with bfloat16 products, for the
    same model in float32 (``m32``) and float64 (``m64``), both frozen."""
    fragmenter = Fragmenter.for_model(m32)
    out: dict[str, list] = {"float32": [], "bfloat16": [], "bfloat16 max": []}
    for atoms in frames:
        hg = fragmenter(atoms)
        _, f_ref, _ = energy_and_forces(m64, hg.to("cpu", torch.float64))
        _, f32, _ = energy_and_forces(m32, hg.to("cpu", torch.float32))
        with matmul_dtype(torch.bfloat16):
            _, f16, _ = energy_and_forces(m32, hg.to("cpu", torch.float32))
        out["float32"].append(float((f32.double() - f_ref).abs().mean()) * 1e3)
        out["bfloat16"].append(float((f16.double() - f_ref).abs().mean()) * 1e3)
        out["bfloat16 max"].append(float((f16.double() - f_ref).abs().max()) * 1e3)
    return {k: np.array(v) for k, v in out.items()}


def nve_drift(path: Path, atoms0, steps: int, low: torch.dtype | None) -> float:
    """max |E_tot - E_tot(0)| (meV) of velocity Verlet (0.5 fs) from ``atoms0`` at 300 K."""
    from ase import units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary, ZeroRotation
    from ase.md.verlet import VelocityVerlet

    atoms = atoms0.copy()
    atoms.calc = SE3SetCalculator(str(path), device="cpu", dtype=torch.float32, matmul_dtype=low)
    MaxwellBoltzmannDistribution(atoms, temperature_K=300.0, rng=np.random.default_rng(0))
    Stationary(atoms)
    ZeroRotation(atoms)
    dyn = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    e0 = atoms.get_total_energy()
    worst = 0.0
    for _ in range(steps):
        dyn.run(1)
        worst = max(worst, abs(atoms.get_total_energy() - e0))
    return worst * 1e3


def main() -> None:
    import ase.io

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="gfn2_dha", help="model name or .pt path")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="extxyz file of the model's molecule")
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--steps", type=int, default=400)
    args = ap.parse_args()
    path = resolve_model(args.model)
    m32, meta = load_model(path, dtype=torch.float32, device="cpu")
    m64, _ = load_model(path, dtype=torch.float64, device="cpu")
    frames = ase.io.read(args.data, index=f":{args.frames}")
    print(f"# {args.model} on {len(frames)} frames of {args.data}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s); eager network, float32 model")
    mae = (meta.get("metrics") or {}).get("test", {}).get("forces_mae_meV_A")
    err = force_errors(m32.requires_grad_(False), m64.requires_grad_(False), frames)
    print("| products | mean |F - F(float64)| meV/Å | max over atoms and frames meV/Å |")
    print("|---|---|---|")
    print(f"| float32 | {err['float32'].mean():.4f} | - |")
    print(f"| bfloat16 | {err['bfloat16'].mean():.3f} | {err['bfloat16 max'].max():.2f} |")
    shown = f"{mae:.2f} meV/Å" if mae is not None else "not recorded"
    print(f"# the model's test force MAE against its reference method (metadata): {shown}")
    print(f"# NVE, velocity Verlet 0.5 fs, {args.steps} steps from frame 0 at 300 K, max |E_tot - E_tot(0)|:")
    for name, low in (("float32", None), ("bfloat16", torch.bfloat16)):
        print(f"|   {name} products | {nve_drift(path, frames[0], args.steps, low):.2f} meV |", flush=True)


if __name__ == "__main__":
    main()
