"""Fragmentation cost: cold (perception + fragmentation + tensors) vs cached per MD step.

Run: ``.venv/bin/python benchmarks/bench_fragment.py [--steps 200]``. Molecules: aspirin and DHA
(built from SMILES with RDKit, seeded) and Ac-(Ala)36-NHMe (372 atoms, ~ the size of MD22's
nanotube). "cached" is the mean time of ``Fragmenter(...)(numbers, positions)`` per step of a
smooth MD-like path of the same topology (distance matrix, connectivity key, cross tokens,
tensors): every coordinate oscillates about the minimum, amplitude 0.05 Å, random phase, period 10-40
steps (a C-H stretch at 0.5 fs steps has ~20), i.e. up to ~0.03 Å per step. "rebuilds" counts
the steps where the implicit cross-token list changed and its index tensors were rebuilt.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from se3set_ase.fragment import Fragmenter, FragmentSettings

MOLECULES = {
    "aspirin": "CC(=O)Oc1ccccc1C(=O)O",
    "DHA": "CC/C=C\\C/C=C\\C/C=C\\C/C=C\\C/C=C\\C/C=C\\CCC(=O)O",
    "Ac-Ala36-NHMe": "CC(=O)" + "N[C@@H](C)C(=O)" * 36 + "NC",
}


def build(smiles: str, seed: int = 42):
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    params = AllChem.ETKDGv3()
    params.randomSeed = seed
    if AllChem.EmbedMolecule(mol, params) != 0:
        params.useRandomCoords = True
        if AllChem.EmbedMolecule(mol, params) != 0:
            raise RuntimeError(f"embedding failed for {smiles}")
    AllChem.MMFFOptimizeMolecule(mol, maxIters=200)
    z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()])
    return z, mol.GetConformer().GetPositions()


def md_like_path(r: np.ndarray, steps: int, rng: np.random.Generator,
                 amplitude: float = 0.05) -> list[np.ndarray]:
    """Positions (Å) of ``steps`` frames oscillating smoothly about ``r`` (see module docstring)."""
    phase = rng.uniform(0, 2 * np.pi, size=r.shape)
    period = rng.uniform(10, 40, size=r.shape)
    return [r + amplitude * np.sin(2 * np.pi * t / period + phase) for t in range(steps)]


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--cold-repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    rows = []
    for name, smi in MOLECULES.items():
        z, r = build(smi)
        frames = md_like_path(r, args.steps, rng)
        for preset in ("md17", "md22"):
            settings = FragmentSettings.preset(preset)
            cold = []
            for _ in range(args.cold_repeats):
                fr = Fragmenter(settings)
                t0 = time.perf_counter()
                hg = fr(z, r)
                cold.append(time.perf_counter() - t0)
            fr(z, frames[0])  # warm
            rebuilds, last = 0, None
            t0 = time.perf_counter()
            for x in frames:
                hg = fr(z, x)
                if last is not None and hg.token_anchor is not last:
                    rebuilds += 1
                last = hg.token_anchor
            dt = (time.perf_counter() - t0) / len(frames)
            assert fr.misses == 1, "topology changed along the path"
            rows.append((name, len(z), f"{settings.mode}", min(cold) * 1e3, dt * 1e3, hg.num_tokens,
                         int(hg.v2e_src.numel()), rebuilds))
    print(f"{'molecule':<16}{'atoms':>6}  {'mode':<9}{'cold ms':>9}{'cached ms/step':>16}{'tokens':>8}"
          f"{'v2e':>8}{'rebuilds':>10}")
    for name, n, mode, c, s, m, e, nb in rows:
        print(f"{name:<16}{n:>6}  {mode:<9}{c:>9.2f}{s:>16.3f}{m:>8}{e:>8}{nb:>10}")


if __name__ == "__main__":
    main()
