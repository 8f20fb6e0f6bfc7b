"""Element tables used by the fragmentation (no torch, no RDKit import).

- ``BO_RADII``: the per-element radii (Å) of the empirical bond-order formulas (SimpleExp, Lendvay)
  of the SE3Set method. They define the set of supported elements: a structure with any other
  element is rejected with a clear error.
- ``COVALENT_RADII``: RDKit's periodic-table covalent radii (``GetRcovalent``), used for the
  distance-based connectivity d_ij <= ``CONNECTIVITY_FACTOR`` * (R_i + R_j), the same criterion as
  RDKit's ``rdDetermineBonds.DetermineConnectivity`` (xyz2mol). Values are copied here so that the
  cheap per-step connectivity check needs numpy only.
"""
from __future__ import annotations

import numpy as np

SYMBOLS: dict[int, str] = {
    1: "H", 3: "Li", 5: "B", 6: "C", 7: "N", 8: "O", 9: "F", 14: "Si", 15: "P", 16: "S",
    17: "Cl", 33: "As", 34: "Se", 35: "Br", 52: "Te", 53: "I",
}
NUMBERS: dict[str, int] = {s: z for z, s in SYMBOLS.items()}

#: Empirical bond-order radii r_el (Å), keyed by atomic number.
BO_RADII: dict[int, float] = {
    1: 0.31, 3: 1.28, 5: 0.84, 6: 0.76, 7: 0.71, 8: 0.66, 9: 0.57, 14: 1.11, 15: 1.07,
    16: 1.05, 17: 1.02, 33: 1.19, 34: 1.20, 35: 1.20, 52: 1.38, 53: 1.39,
}

#: RDKit covalent radii (Å) for the supported elements.
COVALENT_RADII: dict[int, float] = {
    1: 0.31, 3: 1.28, 5: 0.84, 6: 0.76, 7: 0.71, 8: 0.66, 9: 0.57, 14: 1.11, 15: 1.07,
    16: 1.05, 17: 1.02, 33: 1.19, 34: 1.20, 35: 1.20, 52: 1.38, 53: 1.39,
}

#: Bond criterion factor: bonded when d_ij <= 1.3 (R_cov,i + R_cov,j).
CONNECTIVITY_FACTOR = 1.3

#: Along a trajectory (hysteresis, :func:`se3set_ase.fragment.bonds.connectivity`): a bond the
#: previous step did not have forms only when d_ij <= 1.1 (R_cov,i + R_cov,j); one it had breaks
#: only beyond ``CONNECTIVITY_FACTOR``. At 1.3 alone, the two carbons next to the N of a purine's
#: five-membered ring (1-3 pair, 2.12 +- 0.03 Å at 300 K in GFN2-xTB AT-AT; threshold 1.976 Å)
#: "bond" in a thermal fluctuation, a three-membered ring no bond orders exist for.
FORMING_FACTOR = 1.1

#: Atomic numbers supported by the fragmentation, ascending.
SUPPORTED_NUMBERS: tuple[int, ...] = tuple(sorted(BO_RADII))

# Lookup arrays indexed by atomic number (NaN for unsupported elements).
_MAXZ = 119
_BO_RADII_ARRAY = np.full(_MAXZ, np.nan)
_COV_RADII_ARRAY = np.full(_MAXZ, np.nan)
for _z, _r in BO_RADII.items():
    _BO_RADII_ARRAY[_z] = _r
for _z, _r in COVALENT_RADII.items():
    _COV_RADII_ARRAY[_z] = _r

_ALL_SYMBOLS = (
    "X H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge As "
    "Se Br Kr Rb Sr Y Zr Nb Mo Tc Ru Rh Pd Ag Cd In Sn Sb Te I Xe Cs Ba La Ce Pr Nd Pm Sm Eu Gd "
    "Tb Dy Ho Er Tm Yb Lu Hf Ta W Re Os Ir Pt Au Hg Tl Pb Bi Po At Rn Fr Ra Ac Th Pa U Np Pu Am "
    "Cm Bk Cf Es Fm Md No Lr Rf Db Sg Bh Hs Mt Ds Rg Cn Nh Fl Mc Lv Ts Og"
).split()


def symbol(z: int) -> str:
    """Chemical symbol of atomic number ``z`` (any element, ``"Z<z>"`` if out of range)."""
    z = int(z)
    return _ALL_SYMBOLS[z] if 0 <= z < len(_ALL_SYMBOLS) else f"Z{z}"


def supported_symbols() -> str:
    """Comma-separated symbols of the supported elements (for error messages)."""
    return ", ".join(SYMBOLS[z] for z in SUPPORTED_NUMBERS)


def is_supported(z: int) -> bool:
    return int(z) in BO_RADII


def bo_radii(numbers: np.ndarray) -> np.ndarray:
    """Empirical bond-order radii of ``numbers`` (NaN where unsupported)."""
    return _BO_RADII_ARRAY[np.asarray(numbers, dtype=np.int64)]


def covalent_radii(numbers: np.ndarray) -> np.ndarray:
    """Covalent radii of ``numbers`` (NaN where unsupported)."""
    return _COV_RADII_ARRAY[np.asarray(numbers, dtype=np.int64)]
