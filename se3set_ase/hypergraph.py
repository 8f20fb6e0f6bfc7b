"""The SE3Set hypergraph as tensors, and batching.

A molecule of N atoms is covered by hyperedges (fragments). As in the published SE3Set code a
hyperedge is not one vector but a set of *tokens*, one per (hyperedge, member atom) incidence,
anchored at that member atom:

- ``token_anchor[t]``: the atom a token sits on (the e2v incidence token -> atom), shape (M,).
- ``token_edge[t]``: the hyperedge the token belongs to, shape (M,).
- ``v2e_src[e] -> v2e_dst[e]``: member atom s -> token t for every member s of t's hyperedge other
  than the anchor itself (the self incidences carry no geometry and are dropped), shape (E,).
- ``token_switched[t]``: True for an *implicit cross token*: a token (kernel F, atom i) with i not in
  F, which exists only because i is near F. Its weight is smooth in the geometry (see
  :func:`token_weights`) and is 0 when the token is created or removed, so the energy stays
  continuous while the token list changes between MD steps. Own/explicit tokens have weight 1.

Units: positions in Å. All index tensors are ``torch.long``.
"""
from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass, fields, replace
from typing import Sequence

import numpy as np
import torch


@dataclass
class Hypergraph:
    """Tensors of one molecule or of a batch of molecules (see module docstring)."""

    numbers: torch.Tensor  # (N,) atomic numbers
    positions: torch.Tensor  # (N, 3) Å
    token_anchor: torch.Tensor  # (M,)
    token_edge: torch.Tensor  # (M,)
    token_switched: torch.Tensor  # (M,) bool
    v2e_src: torch.Tensor  # (E,)
    v2e_dst: torch.Tensor  # (E,)
    batch: torch.Tensor  # (N,) molecule index of each atom
    num_graphs: int = 1

    @property
    def num_atoms(self) -> int:
        return self.numbers.shape[0]  # no int(): a symbolic size stays symbolic when traced

    @property
    def num_tokens(self) -> int:
        return self.token_anchor.shape[0]

    @property
    def num_hyperedges(self) -> int:
        return int(self.token_edge.max()) + 1 if self.num_tokens else 0

    def to(self, device=None, dtype: torch.dtype | None = None) -> "Hypergraph":
        """Move index tensors to ``device``; positions also to ``dtype`` (float)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                if f.name == "positions" and dtype is not None:
                    v = v.to(device=device, dtype=dtype)
                else:
                    v = v.to(device=device)
            out[f.name] = v
        return Hypergraph(**out)

    def with_positions(self, positions: torch.Tensor) -> "Hypergraph":
        return replace(self, positions=positions)


def from_tokens(
    numbers: np.ndarray,
    positions: np.ndarray,
    hyperedges: Sequence[Sequence[int]],
    cross_tokens: Sequence[tuple[int, int]] = (),
    dtype: torch.dtype = torch.float64,
) -> Hypergraph:
    """Build tensors from hyperedges (atom index lists) and implicit cross tokens.

    Every member ``a`` of every hyperedge ``h`` gets a token (h, a) with weight 1. Each
    ``(h, i)`` in ``cross_tokens`` adds a switched token anchored at atom ``i`` (not a member of
    ``h``) whose other members are all atoms of ``h``.
    """
    anchors, edges, switched, src, dst = [], [], [], [], []
    t = 0
    for h, members in enumerate(hyperedges):
        members = list(members)
        for a in members:
            anchors.append(a)
            edges.append(h)
            switched.append(False)
            for s in members:
                if s != a:
                    src.append(s)
                    dst.append(t)
            t += 1
    for h, i in cross_tokens:
        anchors.append(i)
        edges.append(h)
        switched.append(True)
        for s in hyperedges[h]:
            src.append(s)
            dst.append(t)
        t += 1
    n = len(numbers)
    long = torch.long
    return Hypergraph(
        numbers=torch.as_tensor(np.asarray(numbers), dtype=long),
        positions=torch.as_tensor(np.asarray(positions, dtype=np.float64)).to(dtype),
        token_anchor=torch.tensor(anchors, dtype=long),
        token_edge=torch.tensor(edges, dtype=long),
        token_switched=torch.tensor(switched, dtype=torch.bool),
        v2e_src=torch.tensor(src, dtype=long),
        v2e_dst=torch.tensor(dst, dtype=long),
        batch=torch.zeros(n, dtype=long),
        num_graphs=1,
    )


def collate(graphs: Sequence[Hypergraph]) -> Hypergraph:
    """Concatenate molecules into one batch, offsetting atom, token and hyperedge indices."""
    if len(graphs) == 1:
        return graphs[0]
    cat = torch.cat
    n_off = m_off = h_off = g_off = 0
    parts: dict[str, list[torch.Tensor]] = {f.name: [] for f in fields(Hypergraph) if f.name != "num_graphs"}
    for g in graphs:
        parts["numbers"].append(g.numbers)
        parts["positions"].append(g.positions)
        parts["token_anchor"].append(g.token_anchor + n_off)
        parts["token_edge"].append(g.token_edge + h_off)
        parts["token_switched"].append(g.token_switched)
        parts["v2e_src"].append(g.v2e_src + n_off)
        parts["v2e_dst"].append(g.v2e_dst + m_off)
        parts["batch"].append(g.batch + g_off)
        n_off += g.num_atoms
        m_off += g.num_tokens
        h_off += g.num_hyperedges
        g_off += g.num_graphs
    return Hypergraph(**{k: cat(v) for k, v in parts.items()}, num_graphs=g_off)


def switch(d: torch.Tensor, r_c: float, width: float) -> torch.Tensor:
    """Smooth step: 1 for d <= r_c - width, 0 for d >= r_c, cosine in between (C1)."""
    x = ((d - (r_c - width)) / width).clamp(0.0, 1.0)
    return 0.5 * (1.0 + torch.cos(math.pi * x))


_TRACING = threading.local()


@contextlib.contextmanager
def no_host_sync():
    """Inside this block :func:`capturing` says True on every device: the network takes the
    branches that read no tensor value back to Python, so that it can be traced into a graph
    (:mod:`se3set_ase.model.compiled`). Checks skipped there must have run eagerly before."""
    depth = getattr(_TRACING, "depth", 0)
    _TRACING.depth = depth + 1
    try:
        yield
    finally:
        _TRACING.depth = depth


def capturing(t: torch.Tensor) -> bool:
    """True while ``t``'s CUDA stream is being captured into a CUDA graph, or inside
    :func:`no_host_sync`: no host sync (``bool(tensor)``, ``.item()``) is allowed then."""
    if getattr(_TRACING, "depth", 0):
        return True
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def has_switched_tokens(hg: Hypergraph) -> bool:
    """Whether any token is switched. During a CUDA-graph capture this says True without a host
    sync: the switched-token branch is then recorded, which is exact either way (tokens that are not
    switched get weight 1)."""
    return capturing(hg.token_switched) or bool(hg.token_switched.any())


def token_weights(
    hg: Hypergraph, edge_length: torch.Tensor, r_c: float, width: float
) -> torch.Tensor:
    """Weight of each token, shape (M,), differentiable in the positions.

    Own and explicit tokens: 1. A switched token (F, i): w = 1 - prod_{j in F} (1 - s(d_ij)),
    i.e. a smooth "is any atom of F within r_c of i": 0 when all atoms are beyond r_c (the token
    is created and removed there), 1 as soon as one atom is within r_c - width.
    ``edge_length`` holds |r_s - r_anchor| per v2e edge, shape (E,).
    """
    w = torch.ones(hg.num_tokens, dtype=edge_length.dtype, device=edge_length.device)
    if not has_switched_tokens(hg):
        return w
    # every edge is computed and the others masked to 0 (no boolean indexing: its data-dependent
    # size would need a host sync, which a CUDA-graph capture forbids)
    on_switched = hg.token_switched[hg.v2e_dst]
    log_off = torch.log(torch.clamp(1.0 - switch(edge_length, r_c, width), min=1e-30))
    log_off = torch.where(on_switched, log_off, torch.zeros_like(log_off))
    acc = torch.zeros_like(w).index_add(0, hg.v2e_dst, log_off)
    return torch.where(hg.token_switched, 1.0 - torch.exp(acc), w)


def hypergraph_stats(graphs: Sequence[Hypergraph]) -> dict[str, float]:
    """Averages the network normalises by: tokens per atom, members per token (with self)."""
    atoms = sum(g.num_atoms for g in graphs)
    tokens = sum(g.num_tokens for g in graphs)
    edges = sum(int(g.v2e_src.shape[0]) for g in graphs)
    return {
        "avg_num_atoms": atoms / max(len(graphs), 1),
        "avg_node_degree": tokens / max(atoms, 1),
        "avg_hyperedge_degree": (edges + tokens) / max(tokens, 1),
    }
