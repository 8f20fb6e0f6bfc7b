"""Shared argument handling for the examples: which model, structure and device."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from ase.io import read

from se3set_ase import SE3SetCalculator

HERE = Path(__file__).resolve().parent


def parse(description: str, steps: int) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default="md17_ethanol.pt", help="shipped model name or path")
    p.add_argument("--structure", default=str(HERE / "ethanol.xyz"), help="starting geometry")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--float32", action="store_true", help="float32 (default: float64 on CPU, float32 on CUDA)")
    return p.parse_args()


def setup(args: argparse.Namespace):
    """Atoms with an SE3Set calculator attached, as the arguments ask."""
    atoms = read(args.structure)
    atoms.calc = SE3SetCalculator(args.model, device=args.device,
                                  dtype=torch.float32 if args.float32 else None)
    print(f"{args.model} on {atoms.calc.device} ({atoms.calc.dtype}), {len(atoms)} atoms "
          f"{atoms.get_chemical_formula()}")
    return atoms
