"""A Verlet pair list: the per-step connectivity and cross tokens of a large molecule without the
dense (N, N) distance matrix.

:class:`PairList` lists every pair i < j closer than ``reach + skin`` Å at the geometry it was
built at (a cell list: O(N) work for a molecule, whose density is bounded) and stays valid while no
atom has moved ``skin / 2`` from there, so that no pair distance has changed by ``skin`` or more.
A listed pair that was nearer than a threshold - skin is then still nearer than the threshold, one
that was farther than threshold + skin is still farther, and an unlisted pair is farther than
``reach``. So each step only the pairs that were within ``skin`` of a threshold need their distance
(the bond thresholds, the 0.5 Å close contact and, for implicit fragments, the cross-token cut-off),
and those are computed by :func:`~.errors.pair_distances`, equal to the dense matrix to the bit:
everything decided from them (connectivity, close-contact error, cross tokens) is exactly what the
dense path decides. Every ``sure`` decision keeps a margin (:func:`_margin`) over the rounding of the
distances and of the displacement test.
"""
from __future__ import annotations

import numpy as np

from .. import elements
from .errors import MIN_PAIR_DISTANCE, pair_distances

#: Skin (Å) of the pair list: it is rebuilt when an atom has moved half of it. A wider skin
#: rebuilds less often but computes more distances each step (the pairs within a skin of the
#: cross-token cut-off grow with it). In MD at 500 K and 0.5 fs steps (bench_fragment's MMFF path,
#: which moves some atom 0.47 Å in 10 fs, as GFN2-xTB MD of DHA does) a 0.3 Å skin lasts ~5 steps,
#: 1.0 Å ~17: Ac-(Ala)36-NHMe, one thread, explicit / implicit / implicit with the 1 Å token skin
#: 0.16 / 0.51 / 0.27 ms per step at 0.3 Å, 0.09 / 0.34 / 0.15 at 1.0 Å, 0.08 / 0.32 / 0.15 at
#: 1.2 Å; on the gentler oscillation path (never rebuilt) 1.0 Å costs 0.01-0.05 ms more than 0.3.
PAIR_SKIN = 1.0

#: Beyond this coordinate magnitude (Å) the cell indices are not trusted to the margin and every
#: pair is a candidate (still exact; an isolated molecule never gets there).
_MAX_GRID_COORD = 1e5

# the 13 neighbour cells "after" a cell (the other 13 see it as after them)
_HALF_SHELL = np.array([(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1) if (a, b, c) > (0, 0, 0)],
                       dtype=np.int64)


def _margin(r: np.ndarray) -> float:
    """Margin (Å) over the rounding of distances and displacements at coordinates ``r`` (N, 3):
    float64 differences of coordinates up to |r| err by ~1e-16 |r|."""
    return 1e-9 + 1e-12 * float(np.abs(r).max())


def _cell_candidates(r: np.ndarray, side: float) -> tuple[np.ndarray, np.ndarray]:
    """Candidate pairs (a, b) (each unordered pair once, any order) of atoms in the same or
    neighbouring cubic cells of ``side`` Å; every pair nearer than ``side`` is among them."""
    n = len(r)
    cell = np.floor((r - r.min(axis=0)) / side).astype(np.int64) + 1  # |r| < _MAX_GRID_COORD: exact
    dims = cell.max(axis=0) + 2  # empty slabs on both sides: a neighbour's id never wraps
    cid = (cell[:, 0] * dims[1] + cell[:, 1]) * dims[2] + cell[:, 2]
    order = np.argsort(cid, kind="stable")  # atoms cell by cell
    cid = cid[order]
    pos = np.arange(n, dtype=np.int64)
    shell = (cid[:, None] + _HALF_SHELL @ np.array([dims[1] * dims[2], dims[2], 1])).ravel()
    # in the atom's own cell the atoms after it, in the 13 cells after that cell all their atoms
    lo = np.concatenate([pos + 1, np.searchsorted(cid, shell)])
    hi = np.searchsorted(cid, np.concatenate([cid, shell]), side="right")
    cnt = hi - lo
    ends = np.cumsum(cnt)
    a = np.repeat(np.concatenate([pos, np.repeat(pos, len(_HALF_SHELL))]), cnt)
    b = np.repeat(lo - ends + cnt, cnt) + np.arange(ends[-1], dtype=np.int64)
    return order[a], order[b]


def within(ref: np.ndarray, r: np.ndarray, distance: float) -> bool:
    """Whether every atom of ``r`` (N, 3) is nearer than ``distance`` Å to where ``ref`` has it."""
    if r.shape != ref.shape:
        return False
    q = r - ref
    q *= q
    limit = distance * distance
    largest = float(q.max())
    if largest >= limit or 3.0 * largest < limit:  # a coordinate moved that far, or none a 1/sqrt 3 of it
        return largest < limit
    return float((q[:, 0] + q[:, 1] + q[:, 2]).max()) < limit  # = q.sum(axis=1) to the bit, 3x faster


def neighbour_pairs(r: np.ndarray, cutoff: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs closer than ``cutoff`` Å at positions ``r`` (N, 3): ``(i, j, d)``, i < j, in no
    particular order, with the distances d (P,) of :func:`~.errors.distance_matrix` to the bit."""
    n = len(r)
    if n > 1 and float(np.abs(r).max()) < _MAX_GRID_COORD:
        a, b = _cell_candidates(r, cutoff * (1 + 1e-6))
        i, j = np.minimum(a, b), np.maximum(a, b)
    else:
        i, j = np.triu_indices(n, 1)
    d = pair_distances(r, i, j)
    near = np.flatnonzero(d < cutoff)
    return i[near], j[near], d[near]


class PairList:
    """Pairs within ``reach + skin`` Å of one geometry, and what a step needs from them.

    Built by :class:`~.cache.Fragmenter` for a molecule of covalent ``radii`` (N,) at positions
    ``r`` (N, 3) Å; ``reach`` (Å) must cover the bond thresholds, the close contact and the cut-off
    of the cross tokens wanted (:meth:`covers`). Per step (:meth:`step_distances`) only two sets of
    pairs get a distance: ``close`` (within ``skin`` of 0.5 Å) and the ``band`` of the bond
    candidates (within ``skin`` of a bond threshold, with or without hysteresis); a bond candidate
    farther inside is ``sure`` (bonded whatever the step), one farther out is no candidate.
    The bond candidates ``bi`` < ``bj`` (B,) are sorted by (i, j), as the dense adjacency lists them.
    """

    def __init__(self, r: np.ndarray, radii: np.ndarray, reach: float, skin: float = PAIR_SKIN,
                 zkey: bytes = b""):
        self.n = len(r)
        self.zkey = zkey
        self.reach = float(reach)
        self.skin = float(skin)
        self.ref = r.copy()
        self.eps = _margin(r)
        self.i, self.j, self.d = neighbour_pairs(r, self.reach + self.skin + self.eps)
        # bond thresholds per pair, computed as bonds.threshold_matrix does
        factors = (elements.CONNECTIVITY_FACTOR, elements.FORMING_FACTOR)
        cand = self._by_pair(np.flatnonzero(self.d <= max(factors) * 2.0 * float(radii.max()) * (1 + 1e-9)
                                            + self.skin + self.eps))
        s = radii[self.i[cand]] + radii[self.j[cand]]
        thr_break, thr_form = factors[0] * s, factors[1] * s
        keep = self.d[cand] <= np.maximum(thr_break, thr_form) + self.skin + self.eps
        cand, thr_break, thr_form = cand[keep], thr_break[keep], thr_form[keep]
        self.bi, self.bj = self.i[cand], self.j[cand]
        self.sure = self.d[cand] < np.minimum(thr_break, thr_form) - self.skin - self.eps
        self.band = np.flatnonzero(~self.sure)  # positions among the bond candidates
        self.thr_break, self.thr_form = thr_break[self.band], thr_form[self.band]
        close = self._by_pair(np.flatnonzero(self.d < MIN_PAIR_DISTANCE + self.skin + self.eps))
        self.close_i, self.close_j = self.i[close], self.j[close]
        self._ai = np.concatenate([close, cand[self.band]])
        self._aj = self.j[self._ai]
        self._ai = self.i[self._ai]
        self._tokens = None  # (owner, num kernels, r_c, cross-token shell) for cross_tokens

    def _by_pair(self, k: np.ndarray) -> np.ndarray:
        """Pair indices ``k`` in (i, j) order."""
        return k[np.argsort(self.i[k] * self.n + self.j[k])]

    def covers(self, cutoff: float) -> bool:
        """Whether every pair nearer than ``cutoff`` Å is listed while the list is valid."""
        return cutoff <= self.reach

    def valid(self, r: np.ndarray) -> bool:
        """Whether no atom of ``r`` (N, 3) has moved ``skin / 2`` from where the list was built."""
        return within(self.ref, r, 0.5 * self.skin)

    def step_distances(self, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Distances (Å) at ``r`` of the close pairs (``close_i``, ``close_j``) and of the band."""
        d = pair_distances(r, self._ai, self._aj)
        k = len(self.close_i)
        return d[:k], d[k:]

    def band_bonds(self, d_band: np.ndarray, previous: np.ndarray | None = None) -> np.ndarray:
        """Which band pairs are bonded (before :func:`~.bonds.monovalent_hydrogens`): d <= 1.3 (R_i
        + R_j), or with ``previous`` (the band's bonds of the step before) the hysteresis of
        :func:`~.bonds.hysteresis_adjacency`."""
        if previous is None:
            return d_band <= self.thr_break
        return np.where(previous, d_band <= self.thr_break, d_band <= self.thr_form)

    def bond_mask(self, band_bonds: np.ndarray) -> np.ndarray:
        """Bonded flags (B,) of all bond candidates: the sure ones and ``band_bonds``."""
        mask = self.sure.copy()
        mask[self.band] = band_bonds
        return mask

    def adjacency(self, mask: np.ndarray) -> np.ndarray:
        """The dense boolean adjacency (N, N) of a bond mask (B,) (for the cache key)."""
        adj = np.zeros((self.n, self.n), dtype=bool)
        adj[self.bi[mask], self.bj[mask]] = True
        adj[self.bj[mask], self.bi[mask]] = True
        return adj

    def cross_tokens(self, r: np.ndarray, owner: np.ndarray, num_kernels: int, r_c: float) -> np.ndarray:
        """:meth:`~.overlaps.TensorBuilder.cross_tokens` at ``r``: (h, i) (C, 2) sorted by i, then
        h, for i not in kernel h with some atom of h nearer than ``r_c`` (Å); ``owner`` (N,): each
        atom's kernel (the kernels a partition). The first call on a list computes every listed
        pair near enough (:meth:`tokens_within`); from the second on, only the candidates that were
        within the skin of ``r_c`` get distances (:meth:`_token_shell`, built once per list)."""
        t = self._tokens
        if t is None or t[0] is not owner or t[1] != num_kernels or t[2] != r_c:
            self._tokens = (owner, num_kernels, r_c, None)  # a list used once needs no shell
            return self.tokens_within(r, owner, num_kernels, r_c)
        if t[3] is None:
            t = self._tokens = (owner, num_kernels, r_c, self._token_shell(owner, num_kernels, r_c))
        cand, sure, pi, pj, entry, of_entry = t[3]
        keep = sure.copy()
        keep[of_entry[(pair_distances(r, pi, pj) < r_c)[entry]]] = True  # (3x faster than a reduceat min)
        return np.take(cand, np.flatnonzero(keep), axis=0)  # (a boolean row mask is 5x slower)

    def _token_shell(self, owner: np.ndarray, num_kernels: int, r_c: float):
        """The cross-token candidates of the listed pairs nearer than ``r_c + skin``: (cand (C, 2)
        sorted like the tokens; sure (C,): an atom of h was nearer than ``r_c - skin``; the pairs
        (pi, pj) (P,) whose distances decide the others; for each (atom, kernel member) of those
        others, ``entry`` indexes its pair and ``of_entry`` its candidate)."""
        k = max(num_kernels, 1)
        near = np.flatnonzero(self.d < r_c + self.skin + self.eps)
        oi, oj = owner[self.i[near]], owner[self.j[near]]
        other = oi != oj
        near, oi, oj = near[other], oi[other], oj[other]
        if len(near) == 0:
            none = np.zeros(0, dtype=np.int64)
            return np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=bool), none, none, none, none
        # both directions: (atom i, kernel of j) and (atom j, kernel of i), by atom then kernel; the
        # listed pair's index in the low digits, so one plain sort orders them (an argsort, stable
        # or not, is 2-10x slower)
        m = len(self.d)
        key = np.concatenate([self.i[near] * k + oj, self.j[near] * k + oi])
        pair = np.concatenate([near, near])
        if self.n * k * m < 2 ** 62:
            packed = np.sort(key * m + pair)
            key, pair = packed // m, packed % m
        else:  # (tens of thousands of atoms) the packed key would overflow int64
            order = np.argsort(key, kind="stable")
            key, pair = key[order], pair[order]
        new = np.concatenate([[True], key[1:] != key[:-1]])
        first = np.flatnonzero(new)
        cand = np.stack([key[first] % k, key[first] // k], axis=1)
        sure = np.minimum.reduceat(self.d[pair], first) < r_c - self.skin - self.eps
        of_entry = np.cumsum(new) - 1
        sel = np.flatnonzero(~sure[of_entry])  # the entries of the other candidates
        # the pairs these entries use, in list order, and each entry's place among them (np.unique
        # with return_inverse, without its sort)
        used = np.zeros(m, dtype=bool)
        used[pair[sel]] = True
        used = np.flatnonzero(used)
        place = np.empty(m, dtype=np.int64)
        place[used] = np.arange(len(used), dtype=np.int64)
        return cand, sure, self.i[used], self.j[used], place[pair[sel]], of_entry[sel]

    def tokens_within(self, r: np.ndarray, owner: np.ndarray, num_kernels: int, cutoff: float) -> np.ndarray:
        """The cross tokens within ``cutoff`` Å at ``r``, as :meth:`cross_tokens` gives them, all
        listed pairs near enough computed afresh (the skin list's rebuild, once in many steps), or
        read from the list itself when ``r`` is where it was built."""
        if np.array_equal(r, self.ref):  # the step the list was built at: its distances are these
            near = np.flatnonzero(self.d < cutoff)
            i, j = self.i[near], self.j[near]
        else:
            near = np.flatnonzero(self.d < cutoff + self.skin + self.eps)
            i, j = self.i[near], self.j[near]
            now = pair_distances(r, i, j) < cutoff
            i, j = i[now], j[now]
        other = owner[i] != owner[j]
        i, j = i[other], j[other]
        k = max(num_kernels, 1)
        key = np.sort(np.concatenate([i * k + owner[j], j * k + owner[i]]))
        key = key[np.concatenate([[True], key[1:] != key[:-1]])] if len(key) else key  # np.unique, 3x faster
        return np.stack([key % k, key // k], axis=1).astype(np.int64)

