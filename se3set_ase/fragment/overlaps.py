"""Overlaps: explicit (BO threshold c_w, frozen per topology) and implicit (r_c, per call).

Also a vectorised builder of :class:`~se3set_ase.hypergraph.Hypergraph` tensors that gives
exactly what :func:`~se3set_ase.hypergraph.from_tokens` gives (checked in the tests), with the
static part precomputed once per fragmentation.
"""
from __future__ import annotations

import numpy as np
import torch

from ..hypergraph import Hypergraph
from .errors import distance_matrix
from .pairs import PairList, within


def explicit_overlaps(kernel_groups, isolated, gsum: np.ndarray, c_w: float) -> list[list[int]]:
    """For each kernel K (a list of group indices), the groups g' not in K with
    sum_{g in K} Gsum[g, g'] >= c_w. Isolated kernels, and a single kernel, get none."""
    ng = gsum.shape[0]
    out: list[list[int]] = []
    for groups, iso in zip(kernel_groups, isolated):
        if iso or len(kernel_groups) < 2:
            out.append([])
            continue
        total = gsum[groups].sum(axis=0)
        inside = np.zeros(ng, dtype=bool)
        inside[groups] = True
        out.append([int(g) for g in np.nonzero((total >= c_w) & ~inside)[0]])
    return out


class TensorBuilder:
    """Precomputed index tensors of the own/explicit tokens of fixed hyperedges."""

    def __init__(self, numbers, hyperedges):
        self.n = len(numbers)
        self.numbers = torch.as_tensor(np.asarray(numbers, dtype=np.int64))
        sizes = np.array([len(h) for h in hyperedges], dtype=np.int64)
        flat = np.fromiter((a for h in hyperedges for a in h), dtype=np.int64, count=int(sizes.sum()))
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]) if len(sizes) else np.zeros(0, np.int64)
        self.sizes, self.flat, self.starts = sizes, flat, starts
        src, dst = [], []
        for h, (s0, k) in enumerate(zip(starts, sizes)):
            m = flat[s0:s0 + k]
            ai, si = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
            keep = ai != si
            src.append(m[si[keep]])
            dst.append(s0 + ai[keep])  # own tokens are numbered like the flat members
        self.m_own = int(sizes.sum())
        self.anchor = flat.copy()
        self.edge = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)
        self.src = np.concatenate(src) if src else np.zeros(0, np.int64)
        self.dst = np.concatenate(dst) if dst else np.zeros(0, np.int64)
        # torch versions of the static part
        self.t_anchor = torch.from_numpy(self.anchor)
        self.t_edge = torch.from_numpy(self.edge)
        self.t_src = torch.from_numpy(self.src)
        self.t_dst = torch.from_numpy(self.dst)
        self.t_switched = torch.zeros(self.m_own, dtype=torch.bool)
        self.t_batch = torch.zeros(self.n, dtype=torch.long)
        # implicit mode: atom -> own kernel, and members ordered by kernel for min-reductions
        self._arange = np.arange(self.n, dtype=np.int64)
        self._last = None  # (cross tokens, index tensors) of the previous call
        self._verlet = None  # (skin, reference positions, cross tokens within r_c + skin)
        # members padded to the largest hyperedge (pad = repeat of the first member) + mask
        kmax = int(sizes.max()) if len(sizes) else 0
        self.pad = np.zeros((len(sizes), kmax), dtype=np.int64)
        self.pad_mask = np.zeros((len(sizes), kmax), dtype=bool)
        for h, (s0, k) in enumerate(zip(starts, sizes)):
            self.pad[h, :k] = flat[s0:s0 + k]
            self.pad[h, k:] = flat[s0]
            self.pad_mask[h, :k] = True
        self.owner = np.full(self.n, -1, dtype=np.int64)
        if len(sizes):
            self.owner[flat] = self.edge  # last writer wins; only meaningful without overlaps
        # the hyperedges partition the atoms (implicit mode): cross tokens can come from a pair list
        self._partition = self.m_own == self.n and bool((self.owner >= 0).all())

    def positions(self, positions, dtype):
        return torch.as_tensor(np.asarray(positions, dtype=np.float64)).to(dtype)

    def static(self, positions, dtype=torch.float64) -> Hypergraph:
        """Hypergraph of the fixed hyperedges only (explicit mode).

        The index tensors are shared between calls (only ``positions`` is new): treat them as
        read-only, as every consumer in this package does.
        """
        return Hypergraph(
            numbers=self.numbers, positions=self.positions(positions, dtype),
            token_anchor=self.t_anchor, token_edge=self.t_edge,
            token_switched=self.t_switched, v2e_src=self.t_src,
            v2e_dst=self.t_dst, batch=self.t_batch, num_graphs=1,
        )

    def cross_tokens(self, d: np.ndarray, r_c: float) -> np.ndarray:
        """Candidate implicit tokens (h, i), i not in kernel h, min_{j in h} d_ij < r_c.

        ``d``: distance matrix (N, N). Returns an int array (C, 2) sorted by atom i, then h.
        Kernels must not overlap (implicit mode).
        """
        if len(self.sizes) < 2:
            return np.zeros((0, 2), dtype=np.int64)
        # d is symmetric: min over the rows of each kernel's members -> (K, N)
        dk = d[self.pad].min(axis=1)
        dk[self.owner, self._arange] = np.inf
        i, h = np.nonzero((dk < r_c).T)  # logical C order: by atom i, then kernel h
        out = np.empty((len(h), 2), dtype=np.int64)
        out[:, 0] = h
        out[:, 1] = i
        return out

    def pairs_usable(self, pairs: PairList | None, cutoff: float) -> bool:
        """Whether ``pairs`` can give the cross tokens within ``cutoff`` Å: it lists every pair
        that near, and the hyperedges partition the atoms (else the dense path is used)."""
        return pairs is not None and self._partition and pairs.n == self.n and pairs.covers(cutoff)

    def cross_tokens_pairs(self, pairs: PairList, positions: np.ndarray, r_c: float) -> np.ndarray:
        """:meth:`cross_tokens` at ``positions`` (N, 3) from a pair list valid there (see
        :meth:`pairs_usable`): the same tokens in the same order, without the (N, N) matrix."""
        return pairs.cross_tokens(positions, self.owner, len(self.sizes), r_c)

    def cross_tokens_skin(self, positions: np.ndarray, r_c: float, skin: float,
                          d: np.ndarray | None = None, pairs: PairList | None = None) -> np.ndarray:
        """Cross tokens within ``r_c + skin`` (Å) of a reference geometry, kept until some atom has
        moved ``skin / 2`` from it (a Verlet list). Every (h, i) with an atom of h within r_c of i
        now is in the list, since no distance has shrunk by ``skin`` or more; the extra tokens are
        beyond r_c, where their weight is exactly 0 and they contribute nothing. So the energy is
        that of :meth:`cross_tokens` at ``r_c`` (to rounding), while the index tensors stay the
        same over many MD steps (what a CUDA graph needs)."""
        ref = self._verlet
        if ref is not None and ref[0] == skin and within(ref[1], positions, 0.5 * skin):
            return ref[2]
        if d is None and self.pairs_usable(pairs, r_c + skin):
            cross = pairs.tokens_within(positions, self.owner, len(self.sizes), r_c + skin)
        else:
            if d is None:
                d = distance_matrix(positions)
            cross = self.cross_tokens(d, r_c + skin)
        cross.flags.writeable = False  # with_cross keeps this array itself (no copy): nothing may change it
        self._verlet = (skin, positions.copy(), cross)
        return cross

    def verlet_reference(self) -> np.ndarray | None:
        """The positions (N, 3) Å at which the current skin list was built, or None (no list)."""
        return None if self._verlet is None else self._verlet[1].copy()

    def rebuild_verlet(self, positions: np.ndarray, r_c: float, skin: float) -> None:
        """Build the skin list at ``positions`` whatever the current list (restores a saved
        :meth:`verlet_reference`)."""
        self._verlet = None
        self.cross_tokens_skin(np.asarray(positions, dtype=np.float64), r_c, skin)

    def with_cross(self, positions, cross: np.ndarray, dtype=torch.float64) -> Hypergraph:
        """Hypergraph of the fixed hyperedges plus switched tokens ``cross`` (C, 2) of (h, i).

        The index tensors of the last token list are kept: between MD steps the list rarely
        changes, and an unchanged list costs one array comparison. As in :meth:`static` the
        returned index tensors are shared between calls: read-only.
        """
        if len(cross) == 0:
            return self.static(positions, dtype)
        last = self._last
        if last is not None and (cross is last[0] or (last[0].shape == cross.shape and np.array_equal(last[0], cross))):
            anchor, edge, switched, src, dst = last[1]
        else:
            h, i = cross[:, 0], cross[:, 1]
            c = len(h)
            k = self.sizes[h]
            ends = np.cumsum(k)
            # members of each token's kernel, in order: flat[starts[h] + 0 .. k - 1], token by token
            v_src = self.flat[np.repeat(self.starts[h] - ends + k, k) + np.arange(ends[-1], dtype=np.int64)]
            v_dst = np.repeat(np.arange(self.m_own, self.m_own + c, dtype=np.int64), k)
            sw = np.ones(self.m_own + c, dtype=bool)
            sw[: self.m_own] = False
            cat = np.concatenate
            anchor = torch.from_numpy(cat([self.anchor, i]))
            edge = torch.from_numpy(cat([self.edge, h]))
            switched = torch.from_numpy(sw)
            src = torch.from_numpy(cat([self.src, v_src]))
            dst = torch.from_numpy(cat([self.dst, v_dst]))
            # the skin list is kept as it is (never written to): the next call passes the same array
            own = self._verlet is not None and cross is self._verlet[2]
            self._last = (cross if own else cross.copy(), (anchor, edge, switched, src, dst))
        return Hypergraph(
            numbers=self.numbers, positions=self.positions(positions, dtype),
            token_anchor=anchor, token_edge=edge, token_switched=switched,
            v2e_src=src, v2e_dst=dst, batch=self.t_batch, num_graphs=1,
        )
