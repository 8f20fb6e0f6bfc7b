"""Bond topology: distance-based connectivity and RDKit bond-order perception.

Connectivity: atoms i, j are bonded when d_ij <= 1.3 (R_cov,i + R_cov,j) with RDKit's covalent
radii, the criterion of RDKit's ``DetermineConnectivity`` (xyz2mol), except that a hydrogen keeps
only its nearest partner (:func:`monovalent_hydrogens`). It is computed here with numpy
so that :class:`~se3set_ase.fragment.Fragmenter` can key its cache on it each MD step without
calling RDKit; perception then feeds exactly these bonds to ``rdDetermineBonds.DetermineBondOrders``
with the given total charge (formal charges are placed where valences require them).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .. import elements
from .errors import FragmentationError, check_close_pairs, check_elements, distance_matrix, as_arrays


@dataclass(frozen=True)
class Topology:
    """A molecule's bond graph: what everything discrete in the fragmentation is derived from.

    ``bonds``: sorted tuple of ``(i, j, order)`` with ``i < j`` and Kekulé integer orders 1/2/3
    (all 1 when ``connectivity_only``). ``formal_charges``: per atom, from the perception.
    """

    numbers: tuple[int, ...]
    bonds: tuple[tuple[int, int, int], ...]
    charge: int = 0
    formal_charges: tuple[int, ...] = field(default=())
    connectivity_only: bool = False

    def __post_init__(self):
        if not self.formal_charges:
            object.__setattr__(self, "formal_charges", (0,) * len(self.numbers))

    @property
    def key(self) -> tuple:
        """Hashable identity of the topology."""
        return (self.numbers, self.bonds, self.charge, self.formal_charges, self.connectivity_only)

    @property
    def num_atoms(self) -> int:
        return len(self.numbers)

    def pairs(self) -> np.ndarray:
        """Bonded pairs as an int array (B, 2)."""
        return np.array([(i, j) for i, j, _ in self.bonds], dtype=np.int64).reshape(-1, 2)


def threshold_matrix(z: np.ndarray, factor: float = elements.CONNECTIVITY_FACTOR) -> np.ndarray:
    rc = elements.covalent_radii(z)
    return factor * (rc[:, None] + rc[None, :])


def connectivity(z: np.ndarray, d: np.ndarray, previous: np.ndarray | None = None) -> np.ndarray:
    """Boolean adjacency (N, N) from a distance matrix with +inf diagonal (hydrogen monovalent,
    see :func:`monovalent_hydrogens`).

    ``previous``: the adjacency of the step before (same atoms), for hysteresis along a
    trajectory: its bonds hold up to the usual threshold (``CONNECTIVITY_FACTOR``), a new bond
    needs ``FORMING_FACTOR`` (:func:`hysteresis_adjacency`)."""
    if previous is None:
        adj = d <= threshold_matrix(z)
    else:
        adj = hysteresis_adjacency(d, threshold_matrix(z), threshold_matrix(z, elements.FORMING_FACTOR), previous)
    return monovalent_hydrogens(adj, d, np.flatnonzero(z == 1))


def hysteresis_adjacency(d: np.ndarray, thr_break: np.ndarray, thr_form: np.ndarray,
                         previous: np.ndarray) -> np.ndarray:
    """Bonds with hysteresis: a pair bonded in ``previous`` stays bonded while d <= thr_break, a
    pair that was not bonds only when d <= thr_form (< thr_break). Thermal fluctuations across one
    threshold then change nothing; a real reaction crosses both."""
    return np.where(previous, d <= thr_break, d <= thr_form)


def monovalent_hydrogens(adj: np.ndarray, d: np.ndarray, hydrogens: np.ndarray) -> np.ndarray:
    """Hydrogen is monovalent: an H within bonding distance of several atoms keeps only the
    nearest as its bond partner (``adj`` changed in place and returned).

    The distance criterion alone bonds a proton of a short hydrogen bond to its acceptor too
    (H...N 1.3 Å is inside 1.3 x (0.31 + 0.71) Å; GFN2-xTB's AT-AT base pairs reach 1.34 Å at
    300 K), and no valid bond orders exist for that graph. With this rule the bond graph stays
    that of the molecule until the proton is nearer the acceptor than the donor (a transfer).
    ``hydrogens``: indices of the H atoms."""
    if hydrogens.size == 0:
        return adj
    for i in hydrogens[adj[hydrogens].sum(axis=1) > 1]:
        partners = np.flatnonzero(adj[i])
        if partners.size < 2:
            # an H before this one kept another partner and dropped this H (three H atoms within
            # bonding distance of each other): nothing left to choose from
            continue
        far = partners[partners != partners[np.argmin(d[i, partners])]]
        adj[i, far] = False
        adj[far, i] = False
    return adj


def monovalent_hydrogen_pairs(mask: np.ndarray, i: np.ndarray, j: np.ndarray, n: int, hydrogens: np.ndarray,
                              distances) -> bool:
    """:func:`monovalent_hydrogens` on an adjacency given as bonded flags ``mask`` (B,) of pairs
    ``i`` < ``j`` (B,) sorted by (i, j) (changed in place), for ``n`` atoms: the same H atoms in the
    same order, each keeping the same partner (the nearest, the lowest index on a tie).
    ``distances(k)``: the distances (Å) of pairs ``k``, as :func:`~.errors.distance_matrix` has
    them. Returns whether some H had several partners (only then is ``mask`` changed)."""
    if hydrogens.size == 0:
        return False
    degree = np.bincount(i[mask], minlength=n) + np.bincount(j[mask], minlength=n)
    several = hydrogens[degree[hydrogens] > 1]
    for h in several:
        # this H's bonds now, by partner index: (a, h) with a < h come first in (i, j) order
        k = np.flatnonzero(mask & ((i == h) | (j == h)))
        if k.size < 2:  # dropped by an earlier H, as in :func:`monovalent_hydrogens`
            continue
        nearest = k[np.argmin(distances(k))]
        mask[k[k != nearest]] = False
    return bool(several.size)


def _charge_int(charge) -> int:
    c = float(charge)
    if not np.isfinite(c) or c != round(c):
        raise FragmentationError(f"the total charge must be an integer, got {charge!r}")
    return int(round(c))


def _formula(z: Sequence[int]) -> str:
    counts: dict[str, int] = {}
    for x in z:
        s = elements.symbol(x)
        counts[s] = counts.get(s, 0) + 1
    order = sorted(counts, key=lambda s: (s not in ("C",), s not in ("H",), s))
    return "".join(f"{s}{counts[s] if counts[s] > 1 else ''}" for s in order)


def _rdkit_mol(z, r, pairs, orders=None, formal_charges=None):
    from rdkit import Chem

    mol = Chem.RWMol()
    for k, zz in enumerate(z):
        atom = Chem.Atom(int(zz))
        atom.SetNoImplicit(True)
        if formal_charges is not None:
            atom.SetFormalCharge(int(formal_charges[k]))
        mol.AddAtom(atom)
    types = {1: Chem.BondType.SINGLE, 2: Chem.BondType.DOUBLE, 3: Chem.BondType.TRIPLE}
    for b, (i, j) in enumerate(pairs):
        mol.AddBond(int(i), int(j), types[1 if orders is None else int(orders[b])])
    if r is not None:
        conf = Chem.Conformer(len(z))
        for k in range(len(z)):
            conf.SetAtomPosition(k, r[k].tolist())
        mol.AddConformer(conf, assignId=True)
    return mol


def _suspect_atoms(z, pairs, charge) -> str:
    """Hints for a failed bond-order assignment (for the error message only)."""
    from rdkit import Chem

    pt = Chem.GetPeriodicTable()
    n = len(z)
    deg = np.bincount(pairs.reshape(-1), minlength=n) if len(pairs) else np.zeros(n, np.int64)
    nbrs: list[list[int]] = [[] for _ in range(n)]
    for i, j in pairs:
        nbrs[i].append(int(j))
        nbrs[j].append(int(i))
    deficit = np.zeros(n, dtype=np.int64)
    notes = []
    for i, zz in enumerate(z):
        vl = sorted(v for v in pt.GetValenceList(int(zz)) if v >= 0)
        if deg[i] == 0 and n > 1:
            notes.append(f"{elements.symbol(zz)}{i} (no bonded neighbour)")
        elif vl and deg[i] > vl[-1]:
            notes.append(f"{elements.symbol(zz)}{i} ({deg[i]} bonded neighbours)")
        elif vl:
            deficit[i] = min(v for v in vl if v >= deg[i]) - deg[i]
    for i in range(n):
        # an open valence with no unsaturated neighbour cannot become a multiple bond
        if deficit[i] > 0 and not any(deficit[j] > 0 for j in nbrs[i]):
            notes.append(f"{elements.symbol(z[i])}{i} (open valence, no multiple bond possible)")
    electrons = int(np.sum(z)) - int(charge)
    parity = f"{electrons} electrons (odd: a radical, or the charge is wrong)" if electrons % 2 \
        else f"{electrons} electrons"
    atoms = ", ".join(dict.fromkeys(notes))
    return f"{parity}" + (f"; suspect atoms: {atoms}" if atoms else "")


def topology_from_pairs(z: np.ndarray, r: np.ndarray | None, pairs: np.ndarray, charge: int,
                        connectivity_only: bool = False) -> Topology:
    """Assign bond orders (RDKit) to given connectivity ``pairs`` (B, 2), i < j."""
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
    numbers = tuple(int(x) for x in z)
    if connectivity_only:
        bonds = tuple((int(i), int(j), 1) for i, j in pairs)
        return Topology(numbers, bonds, charge, (0,) * len(z), True)
    if r is None:
        raise FragmentationError("bond-order perception needs positions")
    from rdkit.Chem import rdDetermineBonds

    mol = _rdkit_mol(z, r, pairs)
    try:
        rdDetermineBonds.DetermineBondOrders(mol, charge=charge, allowChargedFragments=True,
                                             embedChiral=False)
        radicals = [f"{a.GetSymbol()}{a.GetIdx()}" for a in mol.GetAtoms() if a.GetNumRadicalElectrons()]
        if radicals:
            raise ValueError(f"unpaired electrons left on {', '.join(radicals)}")
    except ValueError as exc:
        where = f" The structure has {_suspect_atoms(z, pairs, charge)}."
        raise FragmentationError(
            f"could not assign bond orders to {_formula(z)} ({len(z)} atoms) with total charge "
            f"{charge:+d} (RDKit: {exc}).{where} Pass the correct total charge (charge=..., or "
            f"atoms.info['charge']), supply bonds=..., or use connectivity_only=True to fragment "
            f"on single bonds only."
        ) from None
    from rdkit import Chem

    Chem.Kekulize(mol, clearAromaticFlags=True)
    bmap = {}
    for b in mol.GetBonds():
        i, j = sorted((b.GetBeginAtomIdx(), b.GetEndAtomIdx()))
        order = b.GetBondTypeAsDouble()
        if order not in (1.0, 2.0, 3.0):
            raise FragmentationError(f"unexpected bond order {order} between atoms {i} and {j}")
        bmap[(i, j)] = int(order)
    bonds = tuple((i, j, bmap[(i, j)]) for i, j in sorted(bmap))
    fc = tuple(a.GetFormalCharge() for a in mol.GetAtoms())
    return Topology(numbers, bonds, charge, fc, False)


def perceive_bonds(numbers, positions, charge=0, connectivity_only: bool = False) -> Topology:
    """Perceive the bond topology of a molecule from 3-D coordinates (Å).

    Connectivity from distances (see module docstring), bond orders and formal charges from RDKit
    ``DetermineBondOrders`` with the total ``charge``. Raises :class:`StructureError` for bad input
    and :class:`FragmentationError` (naming suspect atoms) when no valid bond orders exist; with
    ``connectivity_only=True`` every bond is single and RDKit is not called.
    """
    z, r = as_arrays(numbers, positions)
    check_elements(z)
    d = distance_matrix(r)
    check_close_pairs(z, d)
    charge = _charge_int(charge)
    pairs = np.argwhere(np.triu(connectivity(z, d), 1))
    return topology_from_pairs(z, r, pairs, charge, connectivity_only)


def topology_from_bonds(numbers, bonds, charge=0, positions=None) -> Topology:
    """A :class:`Topology` from user bonds: a Topology, pairs ``(i, j)`` (orders perceived by RDKit
    from ``positions``) or triples ``(i, j, order)`` (Kekulé orders 1/2/3 used as given)."""
    z = np.asarray(numbers, dtype=np.int64)
    charge = _charge_int(charge)
    if isinstance(bonds, Topology):
        if bonds.numbers != tuple(int(x) for x in z):
            raise FragmentationError("the given Topology's atomic numbers do not match the structure")
        return bonds
    rows = [tuple(b) for b in bonds]
    if rows and any(len(b) not in (2, 3) for b in rows):
        raise FragmentationError("bonds must be (i, j) pairs or (i, j, order) triples")
    if rows and len({len(b) for b in rows}) != 1:
        raise FragmentationError("bonds must be all pairs or all triples, not a mix")
    n = len(z)
    seen = {}
    for b in rows:
        i, j = int(b[0]), int(b[1])
        if not (0 <= i < n and 0 <= j < n) or i == j:
            raise FragmentationError(f"invalid bond {b}: atom indices must differ and lie in [0, {n})")
        o = 1
        if len(b) == 3:
            if float(b[2]) not in (1.0, 2.0, 3.0):
                raise FragmentationError(
                    f"invalid bond order {b[2]} for bond ({i}, {j}): use Kekulé orders 1, 2 or 3")
            o = int(b[2])
        key = (min(i, j), max(i, j))
        if key in seen and seen[key] != o:
            raise FragmentationError(f"bond {key} given twice with different orders")
        seen[key] = o
    if rows and len(rows[0]) == 2:
        pairs = np.array(sorted(seen), dtype=np.int64).reshape(-1, 2)
        r = None if positions is None else np.asarray(positions, dtype=np.float64)
        return topology_from_pairs(z, r, pairs, charge)
    bonds_t = tuple((i, j, o) for (i, j), o in sorted(seen.items()))
    return Topology(tuple(int(x) for x in z), bonds_t, charge, (0,) * n, False)
