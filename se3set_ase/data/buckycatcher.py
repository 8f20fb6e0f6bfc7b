"""The MD22 buckyball catcher, C60@C60H28 (148 atoms): how the shipped geometry is built.

``geometries/buckyball-catcher.xyz`` is the output of
``python -m se3set_ase.data.geometries buckyball-catcher`` (about 15 min on one core), which relaxes
:func:`initial_guess`; :func:`se3set_ase.data.systems.build_system` reads that file.

Why not ETKDG + MMFF as for the other built-ins: MMFF94 keeps corannulene flat (bowl depth
0.01 Å against ~0.9 Å measured), so no force field in RDKit can wrap the pincers around C60.
The construction therefore only uses MMFF for a rough, open catcher and lets GFN2-xTB (with its
D4 dispersion) make the bowls and close them on the ball:

1. catcher: :data:`BUCKYCATCHER_SMILES`, ETKDG (seed 1) and MMFF with the two corannulene hub
   rings held 13-14.5 Å apart (the open pincer; free MMFF folds it to 10 Å);
2. C60: ideal truncated icosahedron (all bonds 1.42 Å), centred on the line from the tether's
   eight-membered ring through the midpoint of the two hubs, at the first point where no catcher
   atom is closer than 3.0 Å to a C60 atom;
3. GFN2-xTB (tblite) + L-BFGS to fmax 0.03 eV/Å.

The result (checked in the tests): both bowls concave towards C60 (depth 0.55 Å), hub centroid
to C60 centre 6.5-6.6 Å, closest catcher-C60 contact 2.9 Å.
"""
from __future__ import annotations

import itertools

import numpy as np

from .systems import BUCKYCATCHER_SMILES

HUB_DISTANCE_A = (13.0, 14.5)  # MMFF restraint on every hub-atom pair of the two corannulenes
MIN_CONTACT_A = 3.0


def c60(bond: float = 1.42) -> np.ndarray:
    """Buckminsterfullerene as an ideal truncated icosahedron, (60, 3) Å, centred at the origin.

    Vertices: the even permutations of (0, ±1, ±3φ), (±1, ±(2+φ), ±2φ), (±φ, ±2, ±(2φ+1)),
    which have edge length 2, scaled to ``bond``."""
    phi = (1 + 5 ** 0.5) / 2
    seeds = [(0.0, 1.0, 3 * phi), (1.0, 2 + phi, 2 * phi), (phi, 2.0, 2 * phi + 1)]
    points = set()
    for v in seeds:
        for perm in ((0, 1, 2), (1, 2, 0), (2, 0, 1)):
            for signs in itertools.product((1, -1), repeat=3):
                points.add(tuple(round(s * v[k], 9) for s, k in zip(signs, perm)))
    return np.array(sorted(points)) * (bond / 2)


def catcher_rings(mol) -> tuple[list[int], list[int], list[int]]:
    """Atom indices of the two corannulene hub (5-membered) rings and the tether's 8-ring."""
    rings = mol.GetRingInfo().AtomRings()
    hubs = [list(r) for r in rings if len(r) == 5]
    cot = [list(r) for r in rings if len(r) == 8]
    if len(hubs) != 2 or len(cot) != 1:
        raise RuntimeError("buckycatcher SMILES: expected two 5-rings and one 8-ring")
    return hubs[0], hubs[1], cot[0]


def initial_guess(seed: int = 1):
    """ase.Atoms: open MMFF catcher (atoms 0-87, RDKit order of the SMILES with H added)
    and the ideal C60 (atoms 88-147) in its cleft (steps 1-2 of the module docstring)."""
    from ase import Atoms
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(Chem.MolFromSmiles(BUCKYCATCHER_SMILES))
    if AllChem.EmbedMolecule(mol, randomSeed=seed) != 0:
        raise RuntimeError(f"ETKDG failed for the buckycatcher (seed {seed})")
    hub1, hub2, cot = catcher_rings(mol)
    ff = AllChem.MMFFGetMoleculeForceField(mol, AllChem.MMFFGetMoleculeProperties(mol))
    for i in hub1:
        for j in hub2:
            ff.MMFFAddDistanceConstraint(i, j, False, *HUB_DISTANCE_A, 100.0)
    ff.Minimize(maxIts=20000)
    x = mol.GetConformer().GetPositions()
    mid = 0.5 * (x[hub1].mean(0) + x[hub2].mean(0))
    up = mid - x[cot].mean(0)
    up /= np.linalg.norm(up)
    ball = c60()
    for t in np.arange(-3.0, 15.0, 0.25):
        centre = mid + t * up
        if np.linalg.norm(x[:, None] - (ball + centre)[None], axis=-1).min() > MIN_CONTACT_A:
            break
    else:
        raise RuntimeError("no place for C60 in the catcher's cleft")
    symbols = [a.GetSymbol() for a in mol.GetAtoms()] + ["C"] * 60
    return Atoms(symbols, np.concatenate([x, ball + centre]))
