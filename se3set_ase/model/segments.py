"""Gathers and segment sums whose backward passes are gathers too: no scatter-add anywhere.

The network moves features along three index lists of a hypergraph: ``v2e_dst`` (incidence ->
token), ``v2e_src`` (incidence -> atom) and ``token_anchor`` (token -> atom). A gather
``x[index]`` has a scatter-add as its backward, a scatter-add ``zeros.index_add(0, index, x)`` is
one itself. Compiled with two CPU threads, TorchInductor 2.13 leaves every such accumulation to
ATen's serial ``index_put`` (see :mod:`.compiled`), after a zero fill and a copy.

Given the inverse of an index list as a padded table (:func:`inverse_table`: row ``i`` lists the
positions ``e`` with ``index[e] == i``, padded with ``len(index)``, which points at a row of zeros
appended to ``x``), a segment sum is a sum of ``width`` gathers, ``sum_k x_pad[table[:, k]]``:
element-wise work that TorchInductor fuses into its loops, vectorised along the channels, with
no atomics and the same order of addition on every run. :class:`Segments` gathers and sums with
such a table, and each one's backward is the other, so the forces' backward (and a second
backward) contains gathers only. Without a table it calls ``index_select`` / ``index_add``, the
eager path's operations.

The sum over a segment is taken in increasing edge order, as ``index_add`` takes it (which starts
from zero, where the table starts from the first entry and adds the padding's exact zeros last):
the same numbers to the bit in eager mode. In a compiled graph the fused loops around them may
round differently.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor


def max_segment(index: Tensor, size: int) -> int:
    """The largest number of entries of ``index`` (E,) equal to one value in ``range(size)`` (0 if
    E is 0). A host synchronisation."""
    if index.numel() == 0:
        return 0
    return int(torch.bincount(index, minlength=size).max())


class SegmentOverflow(ValueError):
    """A segment of an index list has more entries than its inverse table's width."""


def inverse_table(index: Tensor, size: int, width: int) -> Tensor:
    """(size, width) int64: row ``i`` holds the positions ``e`` of ``index`` (E,) with
    ``index[e] == i`` in increasing order, then ``E`` (the padding entry) up to ``width``.

    Raises :class:`SegmentOverflow` (a ``ValueError``) if a value occurs more than ``width``
    times, ``ValueError`` if one lies outside ``range(size)``."""
    if index.dim() != 1:
        raise ValueError(f"index must be 1-D, got shape {tuple(index.shape)}")
    n = index.numel()
    if n and (int(index.min()) < 0 or int(index.max()) >= size):
        raise ValueError(f"index values must lie in [0, {size})")
    counts = torch.bincount(index, minlength=size) if n else index.new_zeros(size)
    if n and int(counts.max()) > width:
        raise SegmentOverflow(f"a segment has {int(counts.max())} entries, more than the table's width {width}")
    order = torch.argsort(index, stable=True)
    start = torch.cumsum(counts, 0) - counts
    sorted_index = index[order]
    rank = torch.arange(n, device=index.device) - start[sorted_index]
    table = torch.full((size, width), n, dtype=torch.long, device=index.device)
    table[sorted_index, rank] = order
    return table


def _segment_sum(x: Tensor, table: Tensor) -> Tensor:
    """sum_k x_pad[table[:, k]] for x (E, ...), table (S, width) -> (S, ...); x_pad = x with a row
    of zeros appended (the padding entry E). Written out over the width (a constant of a traced
    graph): as ``x_pad[table].sum(1)`` TorchInductor would vectorise its loop along the width, with
    scalar gathers, instead of along the channels."""
    x_pad = torch.cat([x, x.new_zeros((1,) + tuple(x.shape[1:]))])
    width = table.shape[1]
    if width == 0:
        return x.new_zeros((table.shape[0],) + tuple(x.shape[1:]))
    out = x_pad.index_select(0, table[:, 0])
    for k in range(1, width):
        out = out + x_pad.index_select(0, table[:, k])
    return out


class _Gather(torch.autograd.Function):
    """x[index]; backward: the segment sum of the gradient over ``table``."""

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, table: Tensor) -> Tensor:
        ctx.save_for_backward(index, table)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: Tensor):
        index, table = ctx.saved_tensors
        return _SegmentSum.apply(grad, index, table), None, None


class _SegmentSum(torch.autograd.Function):
    """Segment sums of x over ``table``; backward: the gradient gathered by ``index``."""

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, table: Tensor) -> Tensor:
        ctx.save_for_backward(index, table)
        return _segment_sum(x, table)

    @staticmethod
    def backward(ctx, grad: Tensor):
        index, table = ctx.saved_tensors
        return _Gather.apply(grad, index, table), None, None


@dataclass(frozen=True)
class Segments:
    """An index list (E,) into ``size`` segments, with its inverse table or without one.

    ``gather(x)``: x (size, ...) -> x[index] (E, ...). ``sum(x)``: x (E, ...) -> (size, ...), the
    sum of the rows of each segment. With ``table`` (:func:`inverse_table` of ``index``) both
    and their derivatives of any order are gathers; without, ``index_select`` and ``index_add``."""

    index: Tensor
    size: int
    table: Tensor | None = None

    def __post_init__(self):
        if self.table is not None and (self.table.dim() != 2 or self.table.shape[0] != self.size):
            raise ValueError(f"an inverse table for {self.size} segments must have shape ({self.size}, width), "
                             f"got {tuple(self.table.shape)}")

    def gather(self, x: Tensor) -> Tensor:
        if self.table is None:
            return x.index_select(0, self.index)
        return _Gather.apply(x, self.index, self.table)

    def sum(self, x: Tensor) -> Tensor:
        if x.shape[0] != self.index.shape[0]:  # the table's padding entry is len(index)
            raise ValueError(f"summing {x.shape[0]} rows along an index list of {self.index.shape[0]}")
        if self.table is None:
            out = torch.zeros((self.size,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
            return out.index_add(0, self.index, x)
        return _SegmentSum.apply(x, self.index, self.table)
