"""Errors raised by the fragmentation, and validation of input structures.

Every check raises before any work is done, so a failure never leaves a partial result.
"""
from __future__ import annotations

import numpy as np

from .. import elements

#: Two atoms closer than this (Å) are rejected as an unphysical structure.
MIN_PAIR_DISTANCE = 0.5


class StructureError(ValueError):
    """The input structure cannot be handled (empty, NaN/inf, bad shapes, unsupported element,
    atoms too close, periodic cell)."""


class FragmentationError(ValueError):
    """Bonds could not be assigned (or user-supplied bonds are invalid)."""


def as_arrays(numbers, positions) -> tuple[np.ndarray, np.ndarray]:
    """Check shapes/types/finiteness and return ``(numbers int64 (N,), positions float64 (N, 3))``."""
    try:
        z = np.asarray(numbers)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise StructureError(f"atomic numbers could not be read as an array: {exc}") from None
    if z.ndim != 1:
        raise StructureError(f"atomic numbers must be a 1-D sequence, got shape {z.shape}")
    if z.shape[0] == 0:
        raise StructureError("empty structure: no atoms were given")
    if z.dtype.kind == "f":
        if not np.all(np.isfinite(z)) or not np.all(z == np.round(z)):
            raise StructureError("atomic numbers must be integers")
    elif z.dtype.kind not in "iu":
        raise StructureError(f"atomic numbers must be integers, got dtype {z.dtype}")
    z = z.astype(np.int64)
    try:
        r = np.asarray(positions, dtype=np.float64)
    except Exception as exc:
        raise StructureError(f"positions could not be read as a float array: {exc}") from None
    if r.shape != (z.shape[0], 3):
        raise StructureError(
            f"positions must have shape (N, 3) = ({z.shape[0]}, 3) for {z.shape[0]} atoms, "
            f"got {r.shape}"
        )
    if not np.isfinite(r).all():  # one flat pass; the per-atom one (5x slower) only to name the atoms
        idx = np.nonzero(~np.isfinite(r).all(axis=1))[0]
        names = ", ".join(f"{elements.symbol(z[i])}{i}" for i in idx[:10])
        more = f" and {len(idx) - 10} more" if len(idx) > 10 else ""
        raise StructureError(f"positions contain NaN or inf values (atoms {names}{more})")
    return z, r


def check_elements(z: np.ndarray) -> None:
    unsupported = sorted({int(x) for x in z if not elements.is_supported(int(x))})
    if unsupported:
        names = ", ".join(f"{elements.symbol(x)} (Z={x})" for x in unsupported)
        raise StructureError(
            f"unsupported element(s): {names}. Supported elements: {elements.supported_symbols()}"
        )


def check_cell(pbc=None, cell=None) -> None:
    if pbc is not None and bool(np.any(np.asarray(pbc, dtype=bool))):
        raise StructureError(
            f"periodic boundary conditions (pbc={np.asarray(pbc, dtype=bool).tolist()}) are not "
            "supported: only isolated molecules are (set atoms.pbc = False)"
        )


def distance_matrix(r: np.ndarray) -> np.ndarray:
    """All pair distances (N, N) with +inf on the diagonal."""
    x, y, z = r.T
    d = np.subtract.outer(x, x)
    d *= d
    t = np.subtract.outer(y, y)
    t *= t
    d += t
    np.subtract(z[:, None], z[None, :], out=t)
    t *= t
    d += t
    np.sqrt(d, out=d)
    np.fill_diagonal(d, np.inf)
    return d


def pair_distances(r: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Distances (P,) in Å of the pairs ``(i[k], j[k])`` of positions ``r`` (N, 3), computed with
    the operations of :func:`distance_matrix` in the same order, so equal to its entries to the bit."""
    x, y, z = r.T
    d = x[i] - x[j]
    d *= d
    t = y[i] - y[j]
    t *= t
    d += t
    t = z[i] - z[j]
    t *= t
    d += t
    return np.sqrt(d, out=d)


def check_close_pairs(z: np.ndarray, d: np.ndarray) -> None:
    """Raise if any pair is closer than :data:`MIN_PAIR_DISTANCE` (``d`` from :func:`distance_matrix`)."""
    if d.shape[0] < 2:
        return
    k = int(np.argmin(d))
    i, j = divmod(k, d.shape[0])
    if d[i, j] < MIN_PAIR_DISTANCE:
        _raise_close_pair(z, min(i, j), max(i, j), d[i, j], int(np.count_nonzero(np.triu(d < MIN_PAIR_DISTANCE, 1))))


def check_close_pair_list(z: np.ndarray, i: np.ndarray, j: np.ndarray, d: np.ndarray) -> None:
    """:func:`check_close_pairs` over listed pairs: ``i`` < ``j`` (P,) sorted by (i, j), holding
    every pair closer than :data:`MIN_PAIR_DISTANCE`, with distances ``d`` (P,) Å from
    :func:`pair_distances`. The same error names the same pair: among the closest pairs, the first
    in (i, j) order, as the first minimum of the dense matrix in row-major order is."""
    if len(d) == 0:
        return
    k = int(np.argmin(d))
    if d[k] < MIN_PAIR_DISTANCE:
        _raise_close_pair(z, int(i[k]), int(j[k]), d[k], int(np.count_nonzero(d < MIN_PAIR_DISTANCE)))


def _raise_close_pair(z: np.ndarray, i: int, j: int, dij: float, n_bad: int) -> None:
    more = f" ({n_bad} such pairs in all)" if n_bad > 1 else ""
    raise StructureError(
        f"atoms {elements.symbol(z[i])}{i} and {elements.symbol(z[j])}{j} are "
        f"{dij:.3f} Å apart, closer than {MIN_PAIR_DISTANCE} Å{more}"
    )


def validate_structure(numbers, positions, pbc=None, cell=None) -> tuple[np.ndarray, np.ndarray]:
    """Validate a molecule; raise :class:`StructureError` with a clear message if it is unusable.

    Checks: non-empty; shapes (N,) and (N, 3); finite positions; supported elements; no pair
    closer than 0.5 Å; not periodic (``pbc``; a cell without pbc is ignored, as ASE does).
    Returns ``(numbers int64, positions float64)``.
    """
    check_cell(pbc, cell)
    z, r = as_arrays(numbers, positions)
    check_elements(z)
    check_close_pairs(z, distance_matrix(r))
    return z, r
