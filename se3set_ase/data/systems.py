"""Built-in systems for `se3set-ase sample`: the MD17 molecules and the MD22 systems.

Molecules with a SMILES are embedded with RDKit (ETKDG, seed) and relaxed with MMFF, exactly as
/work/shared/data/gfn2/make_gfn2.py does for Ac-Ala3-NHMe, DHA and stachyose (same SMILES)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import DataError

__all__ = ["BUILTIN_SMILES", "SHIPPED_GEOMETRIES", "GFN2_MAX_Z", "build_system", "builtin_names",
           "BUCKYCATCHER_SMILES", "build_double_walled_nanotube"]

#: tblite's GFN2-xTB parametrisation covers H..Rn
GFN2_MAX_Z = 86

BUILTIN_SMILES = {
    # MD17 (the ten molecules of MD17 / revised MD17)
    "aspirin": "CC(=O)Oc1ccccc1C(=O)O",
    "benzene": "c1ccccc1",
    "ethanol": "CCO",
    "malonaldehyde": "O/C=C\\C=O",  # MD17's malonaldehyde is the H-bonded cis enol
    "naphthalene": "c1ccc2ccccc2c1",
    "salicylic_acid": "O=C(O)c1ccccc1O",
    "toluene": "Cc1ccccc1",
    "uracil": "O=c1cc[nH]c(=O)[nH]1",
    "paracetamol": "CC(=O)Nc1ccc(O)cc1",
    "azobenzene": "c1ccc(cc1)/N=N/c1ccccc1",
    # MD22, the three with a SMILES (identical to make_gfn2.py)
    "Ac-Ala3-NHMe": "CC(=O)N[C@@H](C)C(=O)N[C@@H](C)C(=O)N[C@@H](C)C(=O)NC",
    "DHA": "CC/C=C\\C/C=C\\C/C=C\\C/C=C\\C/C=C\\C/C=C\\CCC(=O)O",
    "stachyose": "OC[C@H]1O[C@H](OC[C@H]2O[C@H](OC[C@H]3O[C@@H](O[C@]4(CO)O[C@H](CO)[C@@H](O)"
                 "[C@@H]4O)[C@H](O)[C@@H](O)[C@@H]3O)[C@H](O)[C@@H](O)[C@H]2O)[C@H](O)[C@@H](O)[C@H]1O",
}
#: MD22 systems without a SMILES route (name -> number of atoms): read from their shipped GFN2-xTB
#: minima, made by ``python -m se3set_ase.data.geometries`` (see that module)
SHIPPED_GEOMETRIES = {"AT-AT": 60, "AT-AT-CG-CG": 118, "buckyball-catcher": 148,
                      "double-walled_nanotube": 370}

# DNA bases as in MD22 (no sugar, N9/N1 hydrogens): A C5H5N5, T C5H6N2O2, G C5H5N5O, C C4H5N3O.
# Atom map numbers mark the Watson-Crick hydrogen-bond partners (donor heavy atom : acceptor).
BASE_SMILES = {
    "A": "[NH2:1]c1[n:2]cnc2[nH]cnc12",            # N6 (donor), N1 (acceptor)
    "T": "Cc1c[nH]c(=O)[nH:2]c1=[O:1]",           # O4 (acceptor), N3 (donor)
    "G": "[NH2:3]c1[nH:2]c(=[O:1])c2nc[nH]c2n1",  # N2, N1 (donors), O6 (acceptor)
    "C": "[NH2:1]c1cc[nH]c(=[O:3])[n:2]1",         # N4 (donor), N3, O2 (acceptors)
}
# base pair -> (map number in first base, map number in second base, heavy-atom distance Å)
WC_CONTACTS = {("A", "T"): [(1, 1, 2.95), (2, 2, 2.85)],
               ("G", "C"): [(1, 1, 2.90), (2, 2, 2.90), (3, 3, 2.85)]}
STACKS = {"AT-AT": ["AT", "AT"], "AT-AT-CG-CG": ["AT", "AT", "GC", "GC"]}


def _norm(s: str) -> str:
    return s.lower().replace("-", "").replace("_", "").replace(" ", "")


def builtin_names() -> list[str]:
    return list(BUILTIN_SMILES) + list(SHIPPED_GEOMETRIES)


def _lookup(name: str) -> str | None:
    key = _norm(name)
    aliases = {"salicylic": "salicylic_acid", "buckyballcatcher": "buckyball-catcher",
               "doublewallednanotube": "double-walled_nanotube", "nanotube": "double-walled_nanotube"}
    for n in builtin_names():
        if _norm(n) == key:
            return n
    return aliases.get(key)


def check_elements(numbers, what: str) -> None:
    numbers = np.asarray(numbers)
    bad = sorted({int(z) for z in numbers if z < 1 or z > GFN2_MAX_Z})
    if bad:
        from ase.data import chemical_symbols

        names = ", ".join(f"{chemical_symbols[z] if 0 < z < len(chemical_symbols) else '?'} (Z={z})"
                          for z in bad)
        raise DataError(f"{what}: element(s) {names} not covered by GFN2-xTB (tblite covers "
                        f"Z = 1..{GFN2_MAX_Z}, H..Rn)")


def embed_smiles(smiles: str, seed: int = 1234, what: str | None = None):
    """ase.Atoms from a SMILES: RDKit AddHs, ETKDG embedding (randomSeed=seed), MMFF relaxation."""
    from ase import Atoms
    from rdkit import Chem, RDLogger
    from rdkit.Chem import AllChem

    what = what or f"SMILES {smiles!r}"
    RDLogger.DisableLog("rdApp.*")
    try:
        mol0 = Chem.MolFromSmiles(smiles)
    finally:
        RDLogger.EnableLog("rdApp.*")
    if mol0 is None:
        raise DataError(f"{what}: not a valid SMILES, an existing structure file or a built-in "
                        f"name (built-in: {', '.join(builtin_names())})")
    check_elements([a.GetAtomicNum() for a in mol0.GetAtoms()], what)
    mol = Chem.AddHs(mol0)
    if AllChem.EmbedMolecule(mol, randomSeed=seed) != 0:
        raise DataError(f"{what}: RDKit could not embed a 3D structure (seed {seed}); pass a "
                        f"structure file instead")
    AllChem.MMFFOptimizeMolecule(mol)
    return Atoms([a.GetSymbol() for a in mol.GetAtoms()], mol.GetConformer().GetPositions())


def build_system(system: str, seed: int = 1234):
    """(atoms, name) for SYSTEM: a built-in name, an existing structure file or a SMILES.

    SMILES molecules are embedded with ETKDG (``seed``) and relaxed with MMFF. AT-AT,
    AT-AT-CG-CG, the buckyball catcher and the double-walled nanotube are read from shipped
    GFN2-xTB minima (:mod:`se3set_ase.data.geometries`): for these four ``seed`` does not apply."""
    import ase.io

    name = _lookup(system)
    if name in BUILTIN_SMILES:
        return embed_smiles(BUILTIN_SMILES[name], seed, what=name), name
    if name in SHIPPED_GEOMETRIES:
        from .geometries import read_geometry

        return read_geometry(name), name
    p = Path(system).expanduser()
    if p.is_file():
        try:
            atoms = ase.io.read(str(p), index=0)
        except Exception as e:
            raise DataError(f"{p}: cannot read a structure ({type(e).__name__}: {e})") from None
        if len(atoms) == 0:
            raise DataError(f"{p}: no atoms")
        check_elements(atoms.numbers, str(p))
        atoms = atoms.__class__(atoms.numbers, atoms.positions)  # plain molecule, no cell/calc
        return atoms, p.stem
    if system.lower().endswith((".xyz", ".extxyz", ".pdb", ".mol", ".sdf", ".traj", ".cif")):
        raise DataError(f"{system}: no such structure file")
    return embed_smiles(system, seed), system


def _embed_base(letter: str, seed: int):
    """(numbers, positions, {map number: atom index}) of one base, ETKDG + MMFF."""
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(Chem.MolFromSmiles(BASE_SMILES[letter]))
    if AllChem.EmbedMolecule(mol, randomSeed=seed) != 0:
        raise DataError(f"RDKit could not embed base {letter}")
    AllChem.MMFFOptimizeMolecule(mol)
    tags = {a.GetAtomMapNum(): a.GetIdx() for a in mol.GetAtoms() if a.GetAtomMapNum()}
    return (np.array([a.GetAtomicNum() for a in mol.GetAtoms()]),
            mol.GetConformer().GetPositions(), tags)


def _plane(x: np.ndarray):
    c = x.mean(axis=0)
    n = np.linalg.svd(x - c)[2][2]
    return c, n


def _rotation(v: np.ndarray) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.from_rotvec(v).as_matrix()


def build_base_pair(pair: str, seed: int = 1234):
    """Watson-Crick pair (e.g. "AT", "GC"): both bases embedded, the second placed as a rigid body
    so that its H-bond partners sit at the target heavy-atom distances, coplanar with the first.
    Returns (numbers, positions) with the pair centred in the xy plane."""
    from scipy.optimize import least_squares

    b1, b2 = pair[0], pair[1]
    z1, x1, t1 = _embed_base(b1, seed)
    z2, x2, t2 = _embed_base(b2, seed)
    contacts = WC_CONTACTS[(b1, b2)]
    c1, n1 = _plane(x1[z1 > 1])
    x1 = x1 - c1
    c2 = x2[z2 > 1].mean(axis=0)
    x2 = x2 - c2
    # start: second base beside the first, 6 Å away along the direction of the contacts
    d = np.mean([x1[t1[a]] for a, _, _ in contacts], axis=0)
    d = d / (np.linalg.norm(d) + 1e-12)

    other = (z1[:, None] > 1) & (z2[None, :] > 1)
    for a, b, _ in contacts:
        other[t1[a], t2[b]] = False

    def place(p):
        return x2 @ _rotation(p[:3]).T + p[3:]

    def resid(p):
        y = place(p)
        r = [np.linalg.norm(x1[t1[a]] - y[t2[b]]) - dist for a, b, dist in contacts]
        r += list(0.5 * ((y[z2 > 1]) @ n1))  # coplanar with base 1
        dd = np.linalg.norm(x1[:, None] - y[None], axis=-1)
        r.append(5.0 * max(0.0, 1.7 - dd.min()))  # no clash
        # heavy atoms that are not H-bond partners stay >= 3.2 Å apart (picks the WC geometry)
        r += list(2.0 * np.clip(3.2 - dd[other], 0.0, None))
        return np.array(r)

    best = None
    rng = np.random.default_rng(seed)
    for _ in range(12):
        p0 = np.concatenate([rng.normal(scale=np.pi, size=3), 6.0 * d])
        sol = least_squares(resid, p0)
        if best is None or sol.cost < best.cost:
            best = sol
    y = place(best.x)
    numbers = np.concatenate([z1, z2])
    pos = np.concatenate([x1, y])
    # frame: centroid at 0, pair plane = xy
    c, n = _plane(pos[numbers > 1])
    pos = pos - c
    e3 = n / np.linalg.norm(n)
    e1 = np.cross(e3, [1.0, 0, 0] if abs(e3[0]) < 0.9 else [0, 1.0, 0])
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(e3, e1)
    return numbers, pos @ np.stack([e1, e2, e3]).T


def build_base_stack(pairs: list[str], seed: int = 1234, rise: float = 3.38, twist_deg: float = 36.0):
    """B-DNA-like stack of Watson-Crick pairs (MD22 AT-AT: 2 x AT = 60 atoms; AT-AT-CG-CG:
    AT, AT, GC, GC = 118 atoms): pair k rotated by k*twist about z and lifted by k*rise."""
    from ase import Atoms

    nums, poss = [], []
    cache: dict[str, tuple] = {}
    for k, pr in enumerate(pairs):
        if pr not in cache:
            cache[pr] = build_base_pair(pr, seed)
        z, x = cache[pr]
        a = np.deg2rad(twist_deg * k)
        rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
        nums.append(z)
        poss.append(x @ rot.T + [0.0, 0.0, rise * k])
    return Atoms(numbers=np.concatenate(nums), positions=np.concatenate(poss))


# ---------------------------------------------------------------------------------------------
# MD22 buckyball catcher (C120H28, 148 atoms)

#: Sygula's buckycatcher C60H28: a tetrabenzocyclooctatetraene (tetraphenylene) tether whose two
#: opposite benzo rings (on the same face of the tub-shaped COT) are fused to a corannulene rim
#: bond, i.e. two benzocorannulene pincers. RDKit formula C60H28 (checked in the tests).
BUCKYCATCHER_SMILES = ("c1ccc2c(c1)-c1cc3c(cc1-c1ccccc1-c1cc4c(cc1-2)c1ccc2ccc5ccc6ccc4c4c6c5c2c14)"
                       "c1ccc2ccc4ccc5ccc3c3c5c4c2c13")


# ---------------------------------------------------------------------------------------------
# MD22 double-walled nanotube (370 atoms)

#: (n, rings) of the inner and outer (n, n) armchair tubes; C-H bond length of the end caps (Å)
DWNT_INNER = (10, 6)
DWNT_OUTER = (15, 5)
CH_BOND = 1.09


def _armchair_segment(n: int, levels: int) -> np.ndarray:
    """C positions of an (n, n) tube with `levels` rings of 2n atoms, axis = z through the origin,
    centred at z = 0."""
    from ase.build import nanotube

    t = nanotube(n, n, length=levels // 2 + 2, bond=1.42)
    x = t.positions.copy()
    zr = np.round(x[:, 2], 2)
    zs = np.unique(zr)  # the first and last level are cut by the periodic cell: skip the first
    x = x[(zr >= zs[1]) & (zr <= zs[levels])]
    if len(x) != 2 * n * levels:
        raise DataError(f"nanotube: ({n},{n}) segment has {len(x)} C, expected {2 * n * levels}")
    x[:, :2] -= x[:, :2].mean(axis=0)
    x[:, 2] -= 0.5 * (x[:, 2].min() + x[:, 2].max())
    return x


def _cap_with_h(c: np.ndarray) -> np.ndarray:
    """H positions (CH_BOND Å from C, along minus the sum of the unit C-C bond vectors) for every
    C with fewer than 3 C neighbours within 1.75 Å."""
    d = np.linalg.norm(c[:, None] - c[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    hs = []
    for i in range(len(c)):
        nb = np.flatnonzero(d[i] < 1.75)
        if len(nb) >= 3:
            continue
        if len(nb) != 2:
            raise DataError(f"nanotube: end carbon {i} has {len(nb)} C neighbours")
        u = sum((c[i] - c[j]) / d[i, j] for j in nb)
        hs.append(c[i] + CH_BOND * u / np.linalg.norm(u))
    return np.array(hs)


def build_double_walled_nanotube(seed: int = 1234):
    """MD22-like double-walled carbon nanotube, 370 atoms, H-capped: C270H100.

    Inner (10,10) armchair tube with 6 rings of 20 C (120 C, 6.2 Å long), outer (15,15) armchair
    tube with 5 rings of 30 C (150 C, 4.9 Å long), both from ``ase.build.nanotube`` (C-C 1.42 Å),
    coaxial (z axis) and centred at the same point; wall spacing 10.17 - 6.78 = 3.39 Å. Every end
    carbon (2 C neighbours) gets one H at 1.09 Å along the outward bisector: 2 x 20 + 2 x 30 = 100 H.
    MD22's system is C266H104 (also 370 atoms); with clean armchair/zigzag H-capped ends that exact
    formula needs a 2.7 Å (armchair (11,11)@(15,15)) or 3.1 Å (zigzag, Klein edge) wall spacing,
    so the closest 370-atom system at ~3.4 Å spacing is built instead.
    This is the ideal (unrelaxed) start; the built-in ``double-walled_nanotube`` is its GFN2-xTB
    minimum, shipped in ``geometries/`` (:mod:`se3set_ase.data.geometries`). `seed` is unused,
    the geometry is deterministic.
    """
    from ase import Atoms

    del seed
    parts = [_armchair_segment(n, lv) for n, lv in (DWNT_INNER, DWNT_OUTER)]
    cs, hs = [], []
    for c in parts:
        cs.append(c)
        hs.append(_cap_with_h(c))
    c, h = np.concatenate(cs), np.concatenate(hs)
    return Atoms(numbers=[6] * len(c) + [1] * len(h), positions=np.concatenate([c, h]))
