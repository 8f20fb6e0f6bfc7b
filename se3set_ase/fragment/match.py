"""Put a known (pinned) fragmentation onto a molecule given in another atom order.

A model file pins the fragmentation each training topology got, keyed on the bond graph in the
training data's atom order. The same molecule with its atoms listed in another order is the same
graph up to a relabelling, and should get the same hyperedges *in space*: the ones that sat on the
same atoms of the training geometry. For a molecule without symmetry the relabelling is unique.
For a symmetric graph (C60: 120 automorphisms; a nanotube wall) many relabellings are graph
isomorphisms, they put the pinned hyperedges on different atoms, and only the geometry can tell
them apart. We take an isomorphism whose relabelled geometry is close to one of the pin's reference
geometries (the frame at which it was decided, or frames of the training set) after the best
rotation and translation (Kabsch): the atom order under which the input looks like what the model
was trained on. The search below is a geometric heuristic, not an exhaustive minimisation (it can
miss the global minimum RMSD by a fraction of an Å on a strongly distorted input), but every step
of it is a function of the geometry alone (colours, the choice of pinned atom, the candidate order
by distance, the Hungarian assignment, the pruning bound), so the relabelling it returns does not
depend on the order the atoms come in: permuting the input permutes the hypergraph and leaves the
energy unchanged. Only an exactly symmetric input geometry has ties, and those choices are related
by a symmetry of the input itself.

Search (individualisation-refinement, as in canonical-labelling programs, with a geometric finish):
colour refinement (1-WL) of the two graphs together, so that equal colours mean "could map onto each
other"; while fewer than three atoms (not on one line) are matched one-to-one, fix one pinned atom of
the smallest ambiguous colour class and branch over every input atom of that colour, refining after
each choice. At a branch with enough one-to-one atoms, superpose each reference on them, assign the
remaining atoms of each colour class by least total squared distance (Hungarian) and superpose and
reassign on all atoms until the assignment is stable (ICP); keep the best result that is an
isomorphism, and branch deeper where none is. A branch whose one-to-one atoms alone already fit the
references worse than the best result is cut. The number of branches is about the symmetry number
of the part of the molecule whose atoms become unique first (4 for the buckyball catcher's body,
~450 search nodes for the double-walled nanotube), not the full automorphism group (which for the
nanotube defeats a plain subgraph matcher). Identical disconnected molecules (a water cluster) are
the hard case: far from every reference the search stops after ``_MAX_NODES`` nodes with a warning.
"""
from __future__ import annotations

import warnings

import numpy as np

_MAX_NODES = 3000  # search nodes; a guard against pathological graphs (warned when reached)
_ICP_ROUNDS = 5


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
    """A graph isomorphism ``perm`` (reference atom i -> input atom ``perm[i]``) whose relabelled
    input geometry is close to one of the reference geometries after superposition (module
    docstring), and that RMSD in Å; None when the two bond graphs are not isomorphic (same
    elements, bonds preserved). Depends on the geometry only, not on the input's atom order.

    ``numbers_*`` (N,), ``pairs_*`` (B, 2) bonded pairs, ``positions`` (N, 3) and
    ``positions_ref`` (N, 3) or (T, N, 3) in Å.
    """
    from scipy.optimize import linear_sum_assignment

    za, zb = np.asarray(numbers_ref, dtype=np.int64), np.asarray(numbers, dtype=np.int64)
    pa, pb = np.asarray(pairs_ref, dtype=np.int64).reshape(-1, 2), np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    n = len(za)
    pa, pb = np.unique(np.sort(pa, axis=1), axis=0), np.unique(np.sort(pb, axis=1), axis=0)
    if n == 0:
        return (np.zeros(0, dtype=np.int64), 0.0) if len(zb) == 0 else None
    if len(zb) != n or len(pa) != len(pb) or not np.array_equal(np.sort(za), np.sort(zb)):
        return None
    refs, xb = np.asarray(positions_ref, dtype=np.float64), np.asarray(positions, dtype=np.float64)
    refs = refs[None] if refs.ndim == 2 else refs
    xa = refs[0]  # for the collinearity test and the search order
    nbrs = _neighbour_table(2 * n, np.concatenate([pa, pb + n]))
    adj_b = np.zeros((n, n), dtype=bool)
    adj_b[pb[:, 0], pb[:, 1]] = adj_b[pb[:, 1], pb[:, 0]] = True
    best: list = [None, np.inf]
    nodes = [0]

    def balanced(col):
        ca, cb = np.bincount(col[:n], minlength=col.max() + 1), np.bincount(col[n:], minlength=col.max() + 1)
        return np.array_equal(ca, cb), ca

    def finish(col):
        """Complete the one-to-one atoms to an isomorphism by geometry: superpose each reference
        on them, assign every ambiguous colour class by least total squared distance, superpose
        again on all atoms and reassign until nothing changes (a few rounds; like ICP). Keeps the
        best isomorphism found; False when no reference gave one."""
        ca = np.bincount(col[:n], minlength=col.max() + 1)
        single = np.flatnonzero(ca[col[:n]] == 1)
        first_b = {}
        for j in range(n - 1, -1, -1):
            first_b[int(col[n + j])] = j
        classes = [(np.flatnonzero(col[:n] == c), np.flatnonzero(col[n:] == c)) for c in np.flatnonzero(ca > 1)]
        fixed = np.full(n, -1, dtype=np.int64)
        fixed[single] = [first_b[int(col[i])] for i in single]
        found = False
        for x in refs:
            rot, cref, cin = _kabsch(x[single], xb[fixed[single]])
            perm = fixed.copy()
            for _ in range(_ICP_ROUNDS):
                moved = (x - cref) @ rot + cin  # the reference placed on the input
                before = perm.copy()
                for ma, mb in classes:
                    cost = ((moved[ma, None, :] - xb[None, mb, :]) ** 2).sum(-1)
                    r, c = linear_sum_assignment(cost)
                    perm[ma[r]] = mb[c]
                if np.array_equal(perm, before):
                    break
                rot, cref, cin = _kabsch(x, xb[perm])
            if not adj_b[perm[pa[:, 0]], perm[pa[:, 1]]].all():
                continue
            found = True
            rmsd = min(_rmsd(y, xb[perm]) for y in refs)
            if rmsd < best[1] - 1e-12:
                best[0], best[1] = perm, rmsd
        return found

    rho_a = np.linalg.norm(xa - xa.mean(0), axis=1)  # distance from the centroid, Å
    rho_b = np.linalg.norm(xb - xb.mean(0), axis=1)

    def search(col):
        nodes[0] += 1
        ok, ca = balanced(col)
        if not ok or nodes[0] >= _MAX_NODES:
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
        # likeliest first, so that the bound prunes early; the order is geometric too, so that
        # where the node cap cuts the search it cuts it the same way for every input order
        gap = np.linalg.norm(xb[cands] - moved[a], axis=1) if aligned else np.abs(rho_b[cands] - rho_a[a])
        fresh = col.max() + 1
        for b in cands[np.argsort(gap, kind="stable")]:
            nxt = col.copy()
            nxt[a] = nxt[n + b] = fresh
            search(_refine(nxt, nbrs))

    search(_refine(np.concatenate([za, zb]), nbrs))
    if nodes[0] >= _MAX_NODES:
        warnings.warn(f"best_isomorphism: stopped after {_MAX_NODES} partial matchings of a {n}-atom "
                      f"graph; the relabelling found (RMSD {best[1]:.3f} Å) may not be the closest one",
                      RuntimeWarning, stacklevel=2)
    return None if best[0] is None else (best[0], best[1])
