"""Fragmentation cost: cold (perception + fragmentation + tensors) vs cached per MD step, with the
dense distance matrix and with the pair list, measured in the same run.

Run: ``.venv/bin/python benchmarks/bench_fragment.py [--steps 200] [--molecules DHA,stachyose]``.
Molecules: aspirin, DHA and stachyose (the issue's two, 56 and 87 atoms) (built from SMILES with RDKit,
seeded) and Ac-(Ala)36-NHMe (372 atoms, ~ the size of MD22's
nanotube). "dense" and "pairs" are the mean time of ``Fragmenter(...)(numbers, positions)`` per step
of a path of the same topology (connectivity key, cross tokens, tensors), with the per-step work done
on the dense (N, N) distance matrix and on the Verlet pair list (``Fragmenter.pair_list_min_atoms``
and ``pair_list_trajectory_min_atoms`` set above N or to 0); ``*`` marks the one a default
Fragmenter takes there. Each is timed ``--repeats`` times, alternating, and the fastest is shown; the
two give the same hypergraph at every step (checked, untimed). Two paths:

- ``osc`` (the path of the 2026-11-25 figures): every coordinate oscillates about the minimum,
  amplitude 0.05 Å, random phase, period 10-40 steps (a C-H stretch at 0.5 fs steps has ~20), i.e.
  up to ~0.03 Å per step; the pair list built at the minimum is never rebuilt.
- ``MD500K``: Langevin MD on RDKit's MMFF94 at 500 K (MD22 was sampled at 400-500 K), 0.5 fs
  steps, after 200 fs of equilibration: some atom moves 0.15 Å in ~5 steps and 0.47 Å in 10 fs, as
  in GFN2-xTB MD of DHA (/work/shared/data/gfn2), so the pair list (skin 1 Å) is rebuilt every
  ~15-20 steps and the cross tokens change every step.

Modes: explicit (md17), implicit (md22, no skin: the cross tokens every step) and implicit with
``skin=1`` Å (the calculator's with CUDA graphs: the token list kept for many steps). "rebuilds"
counts the steps where the index tensors were rebuilt (the token list changed), "lists" the
pair-list builds along the path and "list ms" the time of one build.
"""
from __future__ import annotations

import argparse
import time
import zlib

import numpy as np
import torch

from se3set_ase import elements
from se3set_ase.fragment import Fragmenter, FragmentSettings
from se3set_ase.fragment.pairs import PairList

MOLECULES = {
    "aspirin": "CC(=O)Oc1ccccc1C(=O)O",
    "DHA": "CC/C=C\\C/C=C\\C/C=C\\C/C=C\\C/C=C\\C/C=C\\CCC(=O)O",
    # the SMILES of /work/shared/data/gfn2/make_gfn2.py (MD22's stachyose, 87 atoms)
    "stachyose": ("OC[C@H]1O[C@H](OC[C@H]2O[C@H](OC[C@H]3O[C@@H](O[C@]4(CO)O[C@H](CO)[C@@H](O)"
                  "[C@@H]4O)[C@H](O)[C@@H](O)[C@@H]3O)[C@H](O)[C@@H](O)[C@H]2O)[C@H](O)[C@@H](O)[C@H]1O"),
    "Ac-Ala36-NHMe": "CC(=O)" + "N[C@@H](C)C(=O)" * 36 + "NC",
}
MODES = {"explicit": ("md17", 0.0), "implicit": ("md22", 0.0), "impl+skin1": ("md22", 1.0)}
TENSORS = ("numbers", "positions", "token_anchor", "token_edge", "token_switched", "v2e_src", "v2e_dst", "batch")


def build(smiles: str, seed: int = 42):
    """Atomic numbers (N,) and MMFF-minimised positions (N, 3) Å of a SMILES."""
    mol = build_mol(smiles, seed)
    z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()])
    return z, mol.GetConformer().GetPositions()


def build_mol(smiles: str, seed: int = 42):
    """The RDKit molecule (with H) of a SMILES, embedded (seeded) and MMFF-minimised."""
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
    return mol


def mmff_path(mol, steps: int, rng: np.random.Generator, temperature: float = 500.0, dt: float = 0.5,
              friction: float = 0.01, equilibrate: int = 400) -> list[np.ndarray]:
    """Positions (Å) of ``steps`` consecutive steps of Langevin MD (BAOAB) on RDKit's MMFF94 from
    the minimum of ``mol``: ``temperature`` K (MD22 sampled at 400-500 K), ``dt`` fs, ``friction``
    1/fs, after ``equilibrate`` steps. Real thermal motion: an atom moves ~0.15 Å in a few steps."""
    from rdkit.Chem import AllChem

    ff = AllChem.MMFFGetMoleculeForceField(mol, AllChem.MMFFGetMoleculeProperties(mol), nonBondedThresh=9.0)
    mass = np.array([a.GetMass() for a in mol.GetAtoms()])[:, None]  # amu
    accel = 4.184e-4 / mass  # (kcal/mol/Å) / amu -> Å/fs^2
    kt = 0.0019872041 * temperature  # kcal/mol
    sigma = np.sqrt(kt * accel)  # thermal velocity per component, Å/fs

    def force(x):  # CalcGrad(pos) uses state left by the last CalcEnergy: the energy at pos first
        p = x.ravel().tolist()
        ff.CalcEnergy(p)
        return -np.array(ff.CalcGrad(p)).reshape(-1, 3)

    x = np.array(ff.Positions()).reshape(-1, 3)
    v = sigma * rng.normal(size=x.shape)
    c1 = np.exp(-friction * dt)
    f = force(x)
    frames = []
    for t in range(equilibrate + steps):
        v += 0.5 * dt * accel * f
        x += 0.5 * dt * v
        v = c1 * v + np.sqrt(1 - c1 * c1) * sigma * rng.normal(size=x.shape)
        x += 0.5 * dt * v
        f = force(x)
        v += 0.5 * dt * accel * f
        if t >= equilibrate:
            frames.append(x.copy())
    return frames


def md_like_path(r: np.ndarray, steps: int, rng: np.random.Generator,
                 amplitude: float = 0.05) -> list[np.ndarray]:
    """Positions (Å) of ``steps`` frames oscillating smoothly about ``r`` (the ``osc`` path)."""
    phase = rng.uniform(0, 2 * np.pi, size=r.shape)
    period = rng.uniform(10, 40, size=r.shape)
    return [r + amplitude * np.sin(2 * np.pi * t / period + phase) for t in range(steps)]


def fragmenter(settings: FragmentSettings, skin: float, pairs: bool) -> Fragmenter:
    fr = Fragmenter(settings, skin=skin)
    fr.pair_list_min_atoms = 0 if pairs else 1 << 62
    fr.pair_list_trajectory_min_atoms = 0 if pairs else 1 << 62
    return fr


def run_path(fr: Fragmenter, z, frames) -> tuple[float, int, int]:
    """Mean seconds per step along ``frames`` (after a warm call), index-tensor rebuilds, pair-list builds."""
    fr(z, frames[0])
    rebuilds, lists, last, last_list = 0, 0, None, fr._pairs
    t0 = time.perf_counter()
    for x in frames:
        hg = fr(z, x)
        if last is not None and hg.token_anchor is not last:
            rebuilds += 1
        last = hg.token_anchor
        if fr._pairs is not last_list:
            lists += 1
            last_list = fr._pairs
    dt = (time.perf_counter() - t0) / len(frames)
    assert fr.misses == 1, "topology changed along the path"
    return dt, rebuilds, lists


def check_same(settings, skin, z, r, frames) -> None:
    """The dense and the pair-list path give the same hypergraph at every step (untimed)."""
    dense, pairs = fragmenter(settings, skin, False), fragmenter(settings, skin, True)
    for x in [r] + frames:
        a, b = dense(z, x), pairs(z, x)
        assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in TENSORS), "dense and pair-list paths differ"


def list_build_ms(fr: Fragmenter, z, r, repeats: int = 20) -> float:
    radii = elements.covalent_radii(z)
    reach = fr._pair_reach(radii)
    t0 = time.perf_counter()
    for _ in range(repeats):
        PairList(r, radii, reach, fr.pair_skin)
    return (time.perf_counter() - t0) / repeats * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--cold-repeats", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each path (alternating); the fastest is shown")
    ap.add_argument("--molecules", default=",".join(MOLECULES), help=f"comma-separated, of {', '.join(MOLECULES)}")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    names = [m for m in args.molecules.split(",") if m]
    unknown = sorted(set(names) - set(MOLECULES))
    if unknown:
        ap.error(f"unknown molecule(s) {', '.join(unknown)}; choose from {', '.join(MOLECULES)}")
    for name in names:
        smi = MOLECULES[name]
        mol = build_mol(smi)
        z, r = np.array([a.GetAtomicNum() for a in mol.GetAtoms()]), mol.GetConformer().GetPositions()
        seed = zlib.crc32(name.encode())  # each molecule its own paths, whichever --molecules run
        paths = {"osc": md_like_path(r, args.steps, np.random.default_rng([0, seed])),
                 "MD500K": mmff_path(mol, args.steps, np.random.default_rng([1, seed]))}
        for mode, (preset, skin) in MODES.items():
            settings = FragmentSettings.preset(preset)
            cold = []
            for _ in range(args.cold_repeats):
                fr = Fragmenter(settings, skin=skin)
                t0 = time.perf_counter()
                hg = fr(z, r)
                cold.append(time.perf_counter() - t0)
            for path, frames in paths.items():
                check_same(settings, skin, z, r, frames)
                best = {False: np.inf, True: np.inf}
                for _ in range(args.repeats):
                    for pairs in (False, True):
                        fr = fragmenter(settings, skin, pairs)
                        fr(z, r)
                        dt, rebuilds, lists = run_path(fr, z, frames)
                        best[pairs] = min(best[pairs], dt)
                hg = fr(z, frames[-1])
                default = len(z) >= Fragmenter.pair_list_trajectory_min_atoms  # the path is a trajectory
                rows.append((name, len(z), mode, path, min(cold) * 1e3, best[False] * 1e3, best[True] * 1e3, default,
                             hg.num_tokens, int(hg.v2e_src.numel()), rebuilds, lists, list_build_ms(fr, z, r)))
    print(f"{'molecule':<15}{'atoms':>5}  {'mode':<11}{'path':<7}{'cold ms':>8}{'dense ms/step':>14}"
          f"{'pairs ms/step':>14}{'speed-up':>9}{'tokens':>7}{'v2e':>7}{'rebuilds':>9}{'lists':>6}{'list ms':>8}")
    for name, n, mode, path, c, sd, sp, default, m, e, nb, nl, lb in rows:
        dense, pairs = f"{sd:.3f}" + ("" if default else "*"), f"{sp:.3f}" + ("*" if default else "")
        print(f"{name:<15}{n:>5}  {mode:<11}{path:<7}{c:>8.2f}{dense:>14}{pairs:>14}{sd / sp:>8.1f}x{m:>7}{e:>7}"
              f"{nb:>9}{nl:>6}{lb:>8.2f}")
    print(f"(* the path a default Fragmenter takes on these trajectories: the pair list from "
          f"pair_list_trajectory_min_atoms = {Fragmenter.pair_list_trajectory_min_atoms} atoms, skin "
          f"{Fragmenter.pair_skin} Å; --steps {args.steps}, 1 torch thread)")


if __name__ == "__main__":
    main()
