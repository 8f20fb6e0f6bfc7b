"""Fragmentation cost: cold (perception + fragmentation + tensors) vs cached per MD step.

Run: ``.venv/bin/python benchmarks/bench_fragment.py [--steps 200]``. Molecules: aspirin and DHA
(built from SMILES with RDKit, seeded) and Ac-(Ala)36-NHMe (372 atoms, ~ the size of MD22's
nanotube). "cached" is the mean time of ``Fragmenter(...)(numbers, positions)`` on jittered
geometries of the same topology (distance matrix, connectivity key, cross tokens, tensors).
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
        frames = [r + rng.normal(scale=0.01, size=r.shape) for _ in range(args.steps)]
        for preset in ("md17", "md22"):
            settings = FragmentSettings.preset(preset)
            cold = []
            for _ in range(args.cold_repeats):
                fr = Fragmenter(settings)
                t0 = time.perf_counter()
                hg = fr(z, r)
                cold.append(time.perf_counter() - t0)
            fr(z, frames[0])  # warm
            tokens = []
            t0 = time.perf_counter()
            for x in frames:
                hg = fr(z, x)
            dt = (time.perf_counter() - t0) / len(frames)
            tokens.append(hg.num_tokens)
            assert fr.misses == 1, "topology changed under 0.01 Å jitter"
            rows.append((name, len(z), f"{settings.mode}", min(cold) * 1e3, dt * 1e3, hg.num_tokens,
                         int(hg.v2e_src.numel())))
    print(f"{'molecule':<16}{'atoms':>6}  {'mode':<9}{'cold ms':>9}{'cached ms/step':>16}{'tokens':>8}{'v2e':>8}")
    for name, n, mode, c, s, m, e in rows:
        print(f"{name:<16}{n:>6}  {mode:<9}{c:>9.2f}{s:>16.3f}{m:>8}{e:>8}")


if __name__ == "__main__":
    main()
