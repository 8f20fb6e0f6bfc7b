"""Empirical bond orders and kernels (groups merged up to a minimum size).

Bond-order matrices (N, N), zero diagonal, with r_e = r_el(i) + r_el(j) (``elements.BO_RADII``):
- SimpleExp: BO_ij = exp(r_e - d_ij);
- Lendvay:   BO_ij = exp(-(d_ij - r_e) r_e / 0.25).

Merging (used once per topology, at the first geometry seen for it): Gmax[a, b] is the largest
atom-pair BO between groups a and b, Gtopo[a, b] whether a covalent bond joins them; the
centrality of a kernel is the sum of its Gmax row over the other live kernels. While the smallest
kernel (by size, then centrality, then canonical rank) has fewer than ``min_kernel_atoms`` atoms, it
is removed and merged into the smallest bonded kernel; if there is none or the merged kernel would
exceed ``max_kernel_atoms``, into the smallest kernel with Gmax >= ``min_bo_threshold`` (no size
check, as in the reference); if neither exists it stays as an isolated kernel (never expanded by
explicit overlaps).
"""
from __future__ import annotations

import numpy as np

from .. import elements

BO_METHODS = ("lendvay", "simpleexp")


def bond_order_matrix(numbers, positions, method: str = "lendvay", d: np.ndarray | None = None) -> np.ndarray:
    """Empirical bond-order matrix (N, N) with a zero diagonal."""
    z = np.asarray(numbers, dtype=np.int64)
    if d is None:
        r = np.asarray(positions, dtype=np.float64)
        diff = r[:, None, :] - r[None, :, :]
        d = np.sqrt(np.einsum("ijk,ijk->ij", diff, diff))
    rel = elements.bo_radii(z)
    re = rel[:, None] + rel[None, :]
    m = method.lower()
    if m == "simpleexp":
        bo = np.exp(re - d)
    elif m == "lendvay":
        bo = np.exp(-(d - re) * re / 0.25)
    else:
        raise ValueError(f"unknown bond-order method {method!r}; choose one of {BO_METHODS}")
    bo = np.where(np.isfinite(d), bo, 0.0)
    np.fill_diagonal(bo, 0.0)
    return bo


def group_matrices(groups, bo: np.ndarray, pairs: np.ndarray):
    """(Gmax, Gsum, Gtopo) between groups; diagonals are not used."""
    n = bo.shape[0]
    g = len(groups)
    label = np.empty(n, dtype=np.int64)
    for k, grp in enumerate(groups):
        label[list(grp)] = k
    onehot = np.zeros((g, n))
    onehot[label, np.arange(n)] = 1.0
    gsum = onehot @ bo @ onehot.T
    # Gmax: row-wise max per column group, then per row group.
    colmax = np.full((n, g), -np.inf)
    for k, grp in enumerate(groups):
        colmax[:, k] = bo[:, list(grp)].max(axis=1)
    gmax = np.full((g, g), -np.inf)
    for k, grp in enumerate(groups):
        gmax[k] = colmax[list(grp)].max(axis=0)
    gtopo = np.zeros((g, g), dtype=bool)
    if len(pairs):
        a, b = label[pairs[:, 0]], label[pairs[:, 1]]
        gtopo[a, b] = True
        gtopo[b, a] = True
    np.fill_diagonal(gtopo, False)
    return gmax, gsum, gtopo


def merge_groups(groups, gmax: np.ndarray, gtopo: np.ndarray, min_atoms: int, max_atoms: int,
                 min_bo: float) -> tuple[list[list[int]], list[bool]]:
    """Merge groups into kernels. ``groups`` must be in canonical order (their index is the final
    tie-breaker). Returns (kernels as lists of group indices, isolated flag per kernel)."""
    ng = len(groups)
    n_atoms = sum(len(g) for g in groups)
    if ng == 0:
        return [], []
    if n_atoms <= min_atoms or ng == 1:
        return [list(range(ng))], [False]
    gmax = gmax.copy()
    gtopo = gtopo.copy()
    np.fill_diagonal(gmax, -1.0)
    members = {k: [k] for k in range(ng)}
    size = {k: len(groups[k]) for k in range(ng)}
    live = list(range(ng))  # ascending index = canonical order (sums taken in this order)

    def centrality(k):
        row = gmax[k, [o for o in live if o != k]]
        return float(np.sum(np.maximum(row, 0.0)))

    def key(k):
        return (size[k], centrality(k), k)

    isolated: list[int] = []
    while live:
        k = min(live, key=key)
        if size[k] >= min_atoms:
            break
        live.remove(k)
        if not live:
            isolated.append(k)
            break
        bonded = [o for o in live if gtopo[k, o]]
        recv = min(bonded, key=key) if bonded else None
        if recv is None or size[recv] + size[k] > max_atoms:
            cand = [o for o in live if gmax[k, o] >= min_bo]
            recv = min(cand, key=key) if cand else None
        if recv is None:
            isolated.append(k)
            continue
        members[recv] += members.pop(k)
        size[recv] += size.pop(k)
        gmax[recv, :] = np.maximum(gmax[recv, :], gmax[k, :])
        gmax[:, recv] = gmax[recv, :]
        gmax[recv, recv] = -1.0
        gmax[k, :] = -1.0
        gmax[:, k] = -1.0
        gtopo[recv, :] |= gtopo[k, :]
        gtopo[:, recv] = gtopo[recv, :]
        gtopo[recv, recv] = False
        gtopo[k, :] = False
        gtopo[:, k] = False
    kernels = [members[k] for k in live] + [members[k] for k in isolated]
    flags = [False] * len(live) + [True] * len(isolated)
    return kernels, flags
