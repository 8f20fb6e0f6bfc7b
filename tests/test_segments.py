"""Gathers and segment sums through inverse tables (se3set_ase.model.segments): the numbers and
derivatives of index_select / index_add, without any scatter-add in the graph."""
from __future__ import annotations

import pytest
import torch

from se3set_ase.model.segments import SegmentOverflow, Segments, inverse_table, max_segment

# 7 entries into 5 segments: segment 1 and 4 empty, segment 3 has three entries out of order
INDEX = torch.tensor([3, 0, 2, 3, 0, 3, 2])


def test_inverse_table_lists_each_segment_in_order_then_pads():
    table = inverse_table(INDEX, 5, 4)
    pad = len(INDEX)
    assert table.tolist() == [[1, 4, pad, pad], [pad] * 4, [2, 6, pad, pad], [0, 3, 5, pad], [pad] * 4]
    assert max_segment(INDEX, 5) == 3 and max_segment(INDEX[:0], 5) == 0


@pytest.mark.parametrize("index,size,width,match", [
    (INDEX, 5, 2, "3 entries, more than the table's width 2"),
    (INDEX, 3, 4, r"index values must lie in \[0, 3\)"),
    (torch.tensor([0, -1]), 3, 4, r"index values must lie in \[0, 3\)"),
    (INDEX.view(1, -1), 5, 4, "1-D"),
])
def test_inverse_table_refuses_what_it_cannot_hold(index, size, width, match):
    with pytest.raises(ValueError, match=match) as caught:
        inverse_table(index, size, width)
    # only a too narrow table is an overflow (the compiled call then compiles wider tables)
    assert isinstance(caught.value, SegmentOverflow) is ("more than the table's width" in match)


def _both(index: torch.Tensor, size: int, width: int) -> tuple[Segments, Segments]:
    return Segments(index, size), Segments(index, size, inverse_table(index, size, width))


@pytest.mark.parametrize("width", [3, 6])
def test_tables_give_the_sums_and_gathers_of_index_add_and_index_select(width):
    torch.manual_seed(0)
    plain, tabled = _both(INDEX, 5, width)
    x = torch.randn(7, 3, 2, dtype=torch.float64)
    y = torch.randn(5, 3, 2, dtype=torch.float64)
    expected = torch.zeros(5, 3, 2, dtype=torch.float64).index_add(0, INDEX, x)
    assert torch.equal(tabled.sum(x), expected) and torch.equal(plain.sum(x), expected)  # same order
    assert torch.equal(tabled.gather(y), y[INDEX])
    assert torch.equal(tabled.sum(x)[1], torch.zeros(3, 2, dtype=torch.float64))  # an empty segment


def test_segments_refuse_mismatched_shapes():
    """The padding entry of a table is len(index): rows of another length, or a table for another
    number of segments, would sum the wrong rows."""
    with pytest.raises(ValueError, match=r"shape \(4, width\)"):
        Segments(INDEX, 4, inverse_table(INDEX, 5, 3))
    with pytest.raises(ValueError, match="summing 8 rows along an index list of 7"):
        Segments(INDEX, 5, inverse_table(INDEX, 5, 3)).sum(torch.zeros(8, 2))


def test_tables_give_the_same_first_and_second_derivatives():
    """What the forces (first derivative) and a force loss (second) need: the derivatives of a
    gather-sum-gather chain agree with and without tables, and gradcheck holds for the tabled one."""
    torch.manual_seed(1)
    plain, tabled = _both(INDEX, 5, 4)
    y0 = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)

    def chain(seg: Segments, y: torch.Tensor) -> torch.Tensor:
        e = torch.sin(seg.gather(y)) * torch.arange(1.0, 8.0, dtype=torch.float64).unsqueeze(1)
        return (seg.sum(e) ** 2).sum()

    grads = []
    for seg in (plain, tabled):
        (g,) = torch.autograd.grad(chain(seg, y0), y0, create_graph=True)
        (gg,) = torch.autograd.grad((g ** 2).sum(), y0)
        grads.append((g.detach(), gg))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-13, atol=1e-13)
    assert torch.autograd.gradgradcheck(lambda y: chain(tabled, y), (y0,))


def test_traced_graph_with_tables_holds_no_scatter():
    """The point of the tables: the forward and backward of gathers and sums hold no scatter-add
    (which TorchInductor leaves to ATen's serial index_put with two CPU threads)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(y: torch.Tensor, index: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        seg = Segments(index, 5, table)
        y = y.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad((seg.sum(torch.tanh(seg.gather(y))) ** 2).sum(), y)
        return g

    graph = make_fx(f)(torch.randn(5, 2), INDEX, inverse_table(INDEX, 5, 4))
    targets = {str(n.target) for n in graph.graph.nodes if n.op == "call_function"}
    assert not [t for t in targets if "index_put" in t or "index_add" in t or "scatter" in t], targets
    assert any("index_select" in t for t in targets)
