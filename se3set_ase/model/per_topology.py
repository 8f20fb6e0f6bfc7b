"""Objects built once per hypergraph topology and reused while the topology holds.

In MD or an optimisation a molecule's hypergraph keeps its index tensors from step to step (the
fragmentation is cached per bond topology; implicit cross tokens keep their list inside a Verlet
skin), and only the positions change. Work that depends on the indices alone, such as a captured
CUDA graph (:mod:`.graphed`), is done once per topology and kept in a small least-recently-used
cache. A compiled graph (:mod:`.compiled`) takes the indices as inputs of symbolic size and is
kept once per molecule (same elements), whatever its token lists (on the CPU, while their segments
fit its inverse tables, :func:`.compiled.table_widths`).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import fields
from typing import Callable, Generic, TypeVar

import torch

from ..hypergraph import Hypergraph

T = TypeVar("T")


def same_topology(a: Hypergraph, b: Hypergraph) -> bool:
    """All fields but the positions are equal (indices, elements, batch, sizes)."""
    for f in fields(Hypergraph):
        if f.name == "positions":
            continue
        x, y = getattr(a, f.name), getattr(b, f.name)
        if x is y:  # the fragmenter hands out the same index tensors while the token list holds
            continue
        if isinstance(x, torch.Tensor):
            if x.shape != y.shape or not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return a.positions.shape == b.positions.shape


def same_atoms(a: Hypergraph, b: Hypergraph) -> bool:
    """Same atoms in the same molecules (elements, batch); the token lists may differ."""
    if a.num_graphs != b.num_graphs or a.numbers.shape != b.numbers.shape:
        return False
    return (a.numbers is b.numbers or torch.equal(a.numbers, b.numbers)) and \
        (a.batch is b.batch or torch.equal(a.batch, b.batch))


class PerTopology(Generic[T]):
    """``cache(hg)``: the object ``build(hg)`` made for ``hg``'s topology, built on first sight.

    The last ``max_entries`` topologies are kept; ``builds`` counts the calls of ``build``.
    ``same(a, b)`` says when two hypergraphs share an entry (default :func:`same_topology`;
    :func:`same_atoms` for objects that take the index tensors as inputs)."""

    def __init__(self, build: Callable[[Hypergraph], T], max_entries: int = 4,
                 same: Callable[[Hypergraph, Hypergraph], bool] = same_topology):
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, not {max_entries}")
        self.build = build
        self.same = same
        self.max_entries = max_entries
        self.builds = 0
        self._entries: OrderedDict[int, tuple[Hypergraph, T]] = OrderedDict()
        self._next_key = 0

    def __call__(self, hg: Hypergraph) -> T:
        for key, (template, value) in self._entries.items():
            if self.same(template, hg):
                self._entries.move_to_end(key)
                return value
        value = self.build(hg)
        self.builds += 1
        template = Hypergraph(**{f.name: getattr(hg, f.name) for f in fields(Hypergraph)})
        self._entries[self._next_key] = (template, value)
        self._next_key += 1
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return value

    def discard(self, hg: Hypergraph) -> None:
        """Forget the entries ``hg`` would get (the next call builds a new one)."""
        for key in [k for k, (template, _v) in self._entries.items() if self.same(template, hg)]:
            del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)
