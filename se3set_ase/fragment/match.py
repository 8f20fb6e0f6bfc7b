"""Put a known (pinned) fragmentation onto a molecule given in another atom order.

A model file pins the fragmentation each training topology got, keyed on the bond graph in the
training data's atom order. The same molecule with its atoms listed in another order is the same
graph up to a relabelling, and should get the same hyperedges *in space*: the ones that sat on the
same atoms of the training geometry. For a molecule without symmetry the relabelling is unique.
For a symmetric graph (C60: 120 automorphisms; a nanotube wall) many relabellings are graph
isomorphisms, they put the pinned hyperedges on different atoms, and only the geometry can tell
them apart. We take the isomorphism whose relabelled geometry is closest to the pin's reference
geometries (the frame at which it was decided, or frames of the training set) after the best
rotation and translation (Kabsch): the atom order under which the input looks most like what the
model was trained on.
Its result depends on the positions only, not on the order the atoms come in, so permuting the
input permutes the hypergraph and leaves the energy unchanged.

Search (individualisation-refinement, as in canonical-labelling programs, with a geometric finish):
colour refinement (1-WL) of the two graphs together, so that equal colours mean "could map onto each
other"; while fewer than three atoms (not on one line) are matched one-to-one, fix one pinned atom of
the smallest ambiguous colour class and branch over every input atom of that colour, refining after
each choice. At a branch with enough one-to-one atoms, rotate the reference onto them and assign the
remaining atoms of each colour class by minimal total squared distance (Hungarian); keep the result
if it is an isomorphism. The number of branches is about the symmetry number of the part of the
molecule whose atoms become unique first (4 for the buckyball catcher's body), not the full
automorphism group (which for the double-walled nanotube defeats a plain subgraph matcher).
"""
from __future__ import annotations

import numpy as np

_MAX_LEAVES = 20000  # a guard against pathological graphs; no molecule in the tests comes close


def _neighbour_table(n: int, pairs: np.ndarray) -> np.ndarray:
    """(n, max degree) neighbour indices, padded with n (a dummy atom of colour -1)."""
    deg = np.bincount(pairs.reshape(-1), minlength=n)
    table = np.full((n, max(int(deg.max(initial=0)), 1)), n, dtype=np.int64)
    fill = np.zeros(n, dtype=np.int64)
    for i, j in pairs:
        table[i, fill[i]] = j
        fill[i] += 1
        table[j, fill[j]] = i
        fill[j] += 1
    return table


def _refine(colours: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Colour refinement to the stable partition: an atom's new colour is its colour with the
    sorted colours of its neighbours. Ids are ranks of sorted signatures, so the same signature
    gets the same id on both graphs of the disjoint union."""
    k = len(np.unique(colours))
    while True:
        nb = np.append(colours, -1)[table]
        nb.sort(axis=1)
        _, new = np.unique(np.column_stack([colours, nb]), axis=0, return_inverse=True)
        new = new.reshape(-1)
        if new.max() + 1 == k:
            return new
        colours, k = new, int(new.max()) + 1


def _kabsch(p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Proper rotation R and centroids with (p - cp) R ~ (q - cq), least squares; p, q (M, 3)."""
    cp, cq = p.mean(0), q.mean(0)
    u, _, vt = np.linalg.svd((p - cp).T @ (q - cq))
    d = np.sign(np.linalg.det(u @ vt)) or 1.0
    return u @ np.diag([1.0, 1.0, d]) @ vt, cp, cq


def _rmsd(p: np.ndarray, q: np.ndarray) -> float:
    """RMSD (Å) of p onto q after the best rotation and translation; p, q (M, 3)."""
    rot, cp, cq = _kabsch(p, q)
    return float(np.sqrt((((p - cp) @ rot + cq - q) ** 2).sum(-1).mean()))


def _not_collinear(x: np.ndarray) -> bool:
    if len(x) < 3:
        return False
    s = np.linalg.svd(x - x.mean(0), compute_uv=False)
    return bool(s[1] > 0.1)  # Å


def best_isomorphism(numbers_ref, pairs_ref, positions_ref, numbers, pairs, positions) -> tuple[np.ndarray, float] | None:
    """The graph isomorphism ``perm`` (reference atom i -> input atom ``perm[i]``) whose relabelled
    input geometry is closest to one of the reference geometries after superposition, and that
    RMSD in Å; None when the two bond graphs are not isomorphic (same elements, bonds preserved).

    ``numbers_*`` (N,), ``pairs_*`` (B, 2) bonded pairs, ``positions`` (N, 3) and
    ``positions_ref`` (N, 3) or (T, N, 3) in Å.
    """
    from scipy.optimize import linear_sum_assignment

    za, zb = np.asarray(numbers_ref, dtype=np.int64), np.asarray(numbers, dtype=np.int64)
    pa, pb = np.asarray(pairs_ref, dtype=np.int64).reshape(-1, 2), np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    n = len(za)
    if len(zb) != n or len(pa) != len(pb) or not np.array_equal(np.sort(za), np.sort(zb)):
        return None
    refs, xb = np.asarray(positions_ref, dtype=np.float64), np.asarray(positions, dtype=np.float64)
    refs = refs[None] if refs.ndim == 2 else refs
    xa = refs[0]  # for the collinearity test and the search order
    nbrs = _neighbour_table(2 * n, np.concatenate([pa, pb + n]))
    adj_b = np.zeros((n, n), dtype=bool)
    adj_b[pb[:, 0], pb[:, 1]] = adj_b[pb[:, 1], pb[:, 0]] = True
    best: list = [None, np.inf]
    leaves = [0]

    def balanced(col):
        ca, cb = np.bincount(col[:n], minlength=col.max() + 1), np.bincount(col[n:], minlength=col.max() + 1)
        return np.array_equal(ca, cb), ca

    def finish(col):
        leaves[0] += 1
        ca = np.bincount(col[:n], minlength=col.max() + 1)
        single = np.flatnonzero(ca[col[:n]] == 1)
        where_b = {}
        for j in range(n):
            where_b.setdefault(int(col[n + j]), []).append(j)
        perm = np.full(n, -1, dtype=np.int64)
        for i in single:
            perm[i] = where_b[int(col[i])][0]
        rot, cref, cin = _kabsch(xa[single], xb[perm[single]])
        moved = (xa - cref) @ rot + cin  # the first reference placed on the input
        for c, members_b in where_b.items():
            members_a = np.flatnonzero(col[:n] == c)
            if len(members_a) == 1:
                continue
            mb = np.array(members_b)
            cost = ((moved[members_a, None, :] - xb[None, mb, :]) ** 2).sum(-1)
            r, s = linear_sum_assignment(cost)
            perm[members_a[r]] = mb[s]
        if not adj_b[perm[pa[:, 0]], perm[pa[:, 1]]].all():
            return False
        rmsd = min(_rmsd(x, xb[perm]) for x in refs)
        if rmsd < best[1] - 1e-12:
            best[0], best[1] = perm, rmsd
        return True

    rho_a = np.linalg.norm(xa - xa.mean(0), axis=1)  # distance from the centroid, Å
    rho_b = np.linalg.norm(xb - xb.mean(0), axis=1)

    def search(col):
        ok, ca = balanced(col)
        if not ok or leaves[0] >= _MAX_LEAVES:
            return
        single = np.flatnonzero(ca[col[:n]] == 1)
        aligned = len(single) == n or _not_collinear(xa[single])
        if aligned:
            # bound: the rest can only add to the singletons' own best-superposition residual
            mb = np.array([np.flatnonzero(col[n:] == col[i])[0] for i in single])
            bound = min(_rmsd(x[single], xb[mb]) * np.sqrt(len(single) / n) for x in refs)
            if bound >= best[1] - 1e-12:
                return
            rot, cref, cin = _kabsch(xa[single], xb[mb])
            moved = (xa - cref) @ rot + cin
            if finish(col):
                return
            if len(single) == n:
                return  # a complete one-to-one colouring that is not an isomorphism
        sizes = np.where(ca > 1, ca, np.iinfo(np.int64).max)
        c = int(np.argmin(sizes))  # smallest ambiguous class (lowest colour id on ties)
        a = int(np.flatnonzero(col[:n] == c)[0])
        cands = np.flatnonzero(col[n:] == c)
        # likeliest first, so that the bound prunes early (the order cannot change the result)
        gap = np.linalg.norm(xb[cands] - moved[a], axis=1) if aligned else np.abs(rho_b[cands] - rho_a[a])
        fresh = col.max() + 1
        for b in cands[np.argsort(gap, kind="stable")]:
            nxt = col.copy()
            nxt[a] = nxt[n + b] = fresh
            search(_refine(nxt, nbrs))

    search(_refine(np.concatenate([za, zb]), nbrs))
    return None if best[0] is None else (best[0], best[1])
