"""Fused forward pass of :class:`SE3SetModel`: same parameters, same numbers, no flat slicing.

``fused_forward(model, hg)`` computes exactly what ``SE3SetModel.forward`` computes (per-atom
energies, eV), reading the parameters of the existing modules, but keeps every feature as one
tensor per irrep type, laid out ``(B, 2l+1, mul)`` ("component-major": a linear map is then one
``addmm`` on a ``(B*(2l+1), mul)`` view). No per-edge tensor is ever sliced, split or
concatenated: in double backward (forces with ``create_graph=True``, then ``backward``) every
such slice becomes "allocate zeros of the full size + copy", which dominated the plain training
step.

How the pieces map onto the plain modules:

- ``IrrepsLinear``: per irrep type, ``y = sum_k x_k @ W[rows_k, cols] / sqrt(fan_in) (+ bias)``;
  a linear that follows a tensor product takes the product's paths as separate inputs (one
  matmul per path, accumulated into the output type, no ``cat``), and outputs that the plain
  code splits afterwards (attention scalars | gate scalars | gates) are computed as separate
  column blocks of the weight (slicing parameters, not activations).
- depthwise ("uvu") ``TensorProduct``: per instruction, with the real Clebsch-Gordan tensor
  ``o3.wigner_3j(l1, l2, l3)`` times e3nn's normalisation ``instruction.path_weight``
  (cached per dtype/device on the model). V2E (attribute = spherical harmonics, one copy per l,
  per-edge radial weights): ``S = C . Y(r)`` (E, d1, d3), ``T = S^T x * w_edge``; the radial
  weights of each path come from its own rows of the radial MLP's last layer. E2V and the
  second products (shared u x v weights): the attribute is first contracted with the weights
  over v (one matmul), then with the CG. Shared weights of a product whose attribute has
  multiplicity 1 are folded into the rows of the following linear map.
- Fewer, larger matmuls where it costs nothing in layout: the 0e columns a gate reads (and an
  attention's logits beside them) come from one matmul, split after; the V2E radial weights of
  all paths from one ``addmm`` (the path weights folded into its rows); ``Y . C`` per (l1, l2, l3)
  once per call for all blocks. E2V products that share an attribute block share one matmul on
  GPUs only (``GROUP_SHARED_PRODUCTS``).
- ``Gate`` (e3nn): the activations are called through the gate's own ``normalize2mom``
  modules, so the constants are the plain ones.

- For the compiled path (:mod:`.compiled`) the per-edge CG contractions are traced as element-wise
  sums over the CG tensor's non-zero entries (:func:`unrolled_products`), which TorchInductor
  fuses into its loops, instead of batched matmuls (``benchmarks/bench_compiled.py``); and on the
  CPU the gathers and sums along the index lists go through inverse tables
  (:func:`inverse_tables`, :mod:`.segments`), gathers in both directions instead of scatter-adds.

- Opt-in, not the model's numbers: within :func:`matmul_dtype` (``torch.bfloat16``) the linear
  maps' products round their inputs to that type (``benchmarks/README.md``: speed and error).

Everything is batched over atoms/tokens/edges; Python loops run over the handful of l-paths.
Tested against the plain forward in ``tests/test_fused.py`` (float64 to 1e-10, float32 to 1e-5,
energies, forces and force-loss parameter gradients).
"""
from __future__ import annotations

import contextvars
import math
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from e3nn import o3

from ..hypergraph import Hypergraph, has_switched_tokens, token_weights
from .attention import HyperAttention
from .layers import EquivariantLayerNorm, GatedFFN, IrrepsLinear
from .segments import Segments

Tensor = torch.Tensor
Feat = list  # list[Tensor | None], one (B, 2l+1, mul) tensor per block of an Irreps
RowScale = tuple  # (flat parameter, offset, length, constant factor): see _lin_cols

# The E2V products' Y = attr @ W^T of the paths that share an attribute block: one matmul (True),
# one per path (False), or None: grouped on GPUs (launch-bound: 4 % fewer operations per call),
# per path on CPUs (arithmetic-bound: the grouped Y are strided views, measured 10 % slower).
GROUP_SHARED_PRODUCTS: bool | None = None

# Clebsch-Gordan contractions of single edges (d1 x d3 per edge, d = 2l + 1 <= 5): as batched
# matmuls (eager: few, large operations) or, inside :func:`unrolled_products`, written out as sums
# of element-wise products over the CG tensor's non-zero entries (many small operations in eager
# mode, but TorchInductor compiles each product into one fused loop: 1.3-1.8x faster than the
# batched matmul per product in isolation on a CPU, 1.06x per paper-preset call, and no
# (E, d1*d2, u) outer product is built). The compiled path (:mod:`.compiled`) traces the network
# inside it; the numbers are the same to rounding.
_UNROLL = contextvars.ContextVar("se3set_unroll_products", default=False)

# Inverse tables of the hypergraph's index lists (:func:`.segments.inverse_table`), by field name
# (``v2e_dst``, ``v2e_src``, ``token_anchor``), within :func:`inverse_tables`: the gathers and
# segment sums along a list with a table are written as gathers only (:class:`.segments.Segments`).
_TABLES = contextvars.ContextVar("se3set_inverse_tables", default=None)


# Within :func:`matmul_dtype`: the type the linear maps' matrix products round their inputs to
# (``torch.bfloat16``), or None: the network's own dtype.
_MATMUL_DTYPE = contextvars.ContextVar("se3set_matmul_dtype", default=None)


@contextmanager
def matmul_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    """Within the block the fused network's linear maps (and the E2V products' attribute
    contraction, ``attr @ W^T``): 94 % of a paper-preset call's matrix-product work) multiply in
    ``dtype``: inputs and weights rounded to it, products accumulated as the backend does (fp32 for
    ``torch.bfloat16`` on CPUs with AVX512-BF16 or AMX, and on CUDA), the result and the bias in the
    network's dtype. Their derivatives multiply in ``dtype`` too. None: the network's dtype (the
    default). Not bitwise, not the issue's 1e-5: see ``benchmarks/README.md`` for the measured
    force error."""
    token = _MATMUL_DTYPE.set(dtype)
    try:
        yield
    finally:
        _MATMUL_DTYPE.reset(token)


@contextmanager
def unrolled_products(on: bool = True) -> Iterator[None]:
    """Within the block the fused network writes its per-edge Clebsch-Gordan products as
    element-wise sums (for tracing and compiling), see ``_UNROLL``."""
    token = _UNROLL.set(on)
    try:
        yield
    finally:
        _UNROLL.reset(token)


@contextmanager
def inverse_tables(tables: dict[str, Tensor]) -> Iterator[None]:
    """Within the block the fused network gathers and sums along each index list named in
    ``tables`` (field name -> :func:`.segments.inverse_table` of ``hg.<field>``) through that
    table, without scatter-adds (:mod:`.segments`); the caller makes the tables for the
    hypergraph it passes."""
    token = _TABLES.set(dict(tables))
    try:
        yield
    finally:
        _TABLES.reset(token)


# Within unrolled_products(): the E2V products (shared weights, attribute = token features) are
# unrolled too (True), or only the V2E ones (False: a smaller traced graph, faster to compile).
UNROLL_SHARED_PRODUCTS = True

_CACHE_ATTR = "_fused_cache"
_META_ATTR = "_fused_meta"


# ------------------------------------------------------------------ caches
def _cache(model: torch.nn.Module) -> dict:
    c = model.__dict__.get(_CACHE_ATTR)
    if c is None:
        c = {}
        model.__dict__[_CACHE_ATTR] = c
    return c


class _Ctx:
    """Per-call context: dtype/device and the model's caches (CG tensors, linear metadata)."""

    def __init__(self, model, dtype, device):
        self.dtype, self.device = dtype, device
        cache = _cache(model)
        self.cg = cache.setdefault(("cg", dtype, str(device)), {})
        self.meta = cache.setdefault("meta", {})
        self.frozen = cache.setdefault(("frozen", dtype, str(device)), {})
        self.unroll = _UNROLL.get()  # see unrolled_products()
        self.concats: dict = {}  # this call's concatenated linear inputs, see concat()
        self.sh_cg: dict = {}  # this call's Y . C per (l1, l2, l3), see _sh_cg()

    def concat(self, xs: Sequence, ks: list[int]) -> Tensor:
        """``torch.cat([xs[k] for k in ks], dim=-1)``, made once per call of the network for the
        same inputs (a linear's output types and the gate's column groups all share it)."""
        parts = tuple(xs[k] for k in ks)
        key = tuple(id(x) for x in parts)  # the tensors themselves (kept alive below), not the list
        hit = self.concats.get(key)
        if hit is None:
            hit = (parts, torch.cat(parts, dim=-1))
            self.concats[key] = hit
        return hit[1]

    def frozen_weight(self, key: tuple, sources: tuple[Tensor, ...], make) -> Tensor:
        """``make()``, a tensor computed from parameters ``sources`` only, cached while none of
        them needs a gradient or has changed (inference: the calculator freezes its model). Saves
        the per-call weight scaling, a few hundred small kernels a call on a GPU."""
        if any(t.requires_grad for t in sources):
            return make()
        stamp = tuple((t.data_ptr(), t._version) for t in sources)
        hit = self.frozen.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        value = make()
        self.frozen[key] = (stamp, value)
        return value

    def wigner(self, l1: int, l2: int, l3: int) -> Tensor:
        key = (l1, l2, l3)
        c = self.cg.get(key)
        if c is None:
            c = o3.wigner_3j(l1, l2, l3, dtype=torch.float64).to(self.dtype).to(self.device)
            self.cg[key] = c
        return c


# ------------------------------------------------------------------ layout helpers
def to_blocks(x: Tensor, irreps: o3.Irreps) -> Feat:
    """Flat e3nn tensor (B, irreps.dim) -> per-block (B, 2l+1, mul) (for tests/boundaries)."""
    out, start = [], 0
    for mul, ir in irreps:
        out.append(x[:, start:start + mul * ir.dim].reshape(-1, mul, ir.dim).transpose(1, 2).contiguous())
        start += mul * ir.dim
    return out


def from_blocks(xs: Feat, irreps: o3.Irreps) -> Tensor:
    """Per-block (B, 2l+1, mul) -> flat e3nn tensor (B, irreps.dim)."""
    return torch.cat([x.transpose(1, 2).reshape(x.shape[0], -1) for x in xs], dim=-1)


def _mm(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ w (+ bias) with x (B, d, m) and w (m, V): one mm (addmm) on the (B*d, m) view. Within
    :func:`matmul_dtype` the product's inputs are rounded to that type (its result, and the bias
    added to it, in x's)."""
    b, d, m = x.shape
    x2 = x.reshape(b * d, m)
    low = _MATMUL_DTYPE.get()
    if low is not None and low != x.dtype:
        out = torch.mm(x2.to(low), w.to(low)).to(x.dtype)
        if bias is not None:
            out = out + bias
    else:
        out = torch.mm(x2, w) if bias is None else torch.addmm(bias, x2, w)
    return out.view(b, d, w.shape[1])


# ------------------------------------------------------------------ IrrepsLinear
class _LinMeta:
    def __init__(self, lin: IrrepsLinear):
        self.type_index = {ir: t for t, ir in enumerate(lin.types)}
        # input block k -> (type idx, row0, row1)
        self.in_rows: list[tuple[int, int, int] | None] = [None] * len(lin.irreps_in)
        for t, (ins, _outs, _fan) in enumerate(lin.plan):
            r = 0
            for k in ins:
                mul = lin.irreps_in[k].mul
                self.in_rows[k] = (t, r, r + mul)
                r += mul
        # output block k -> (type idx or None, col0, col1, bias0 or None)
        self.out_cols: list[tuple[int | None, int, int, int | None]] = []
        col = [0] * len(lin.types)
        nb = 0
        for mul, ir in lin.irreps_out:
            t = self.type_index.get(ir)
            b0 = None
            if ir == o3.Irrep("0e") and lin.bias is not None:
                b0 = nb
                nb += mul
            if t is None:
                self.out_cols.append((None, 0, mul, b0))
            else:
                self.out_cols.append((t, col[t], col[t] + mul, b0))
                col[t] += mul
        self.fan_in = [fan for (_i, _o, fan) in lin.plan]
        self.dims = [ir.dim for ir in lin.types]


def _lmeta(ctx: _Ctx, lin: IrrepsLinear) -> _LinMeta:
    m = ctx.meta.get(id(lin))
    if m is None or m[0] is not lin:
        m = (lin, _LinMeta(lin))
        ctx.meta[id(lin)] = m
    return m[1]


class _Outer:
    """A tensor-product path output T[z,k,u] = s[z,k,0] * x[z,0,u], kept factored."""

    __slots__ = ("s", "x", "shape")

    def __init__(self, s: Tensor, x: Tensor):
        self.s, self.x = s, x
        self.shape = (x.shape[0], s.shape[1], x.shape[2])


def _lin_cols(ctx: _Ctx, lin: IrrepsLinear, xs: Sequence[Tensor | None], t: int, c0: int, c1: int,
              bias0: int | None, row_scale: dict[int, RowScale] | None = None) -> Tensor:
    """Columns c0:c1 of type t of ``lin`` applied to its input blocks ``xs`` (list aligned with
    ``lin.irreps_in``; None = absent). ``row_scale[k] = (flat, off, n, c)``: ``c * flat[off:off + n]``
    (mul_k,) multiplies the rows of block k (a folded shared tensor-product weight; given as a
    parameter and a range, so the cache key needs no tensor data and the slice is taken only
    when the scaled weight is made).

    The dense input blocks of type t are concatenated along the channels (once per call of the
    network, :meth:`_Ctx.concat`) and multiplied by the matching rows of the weight in one matmul;
    factored blocks (:class:`_Outer`) apply the weight to their channel factor first."""
    meta = _lmeta(ctx, lin)
    w = lin.weights[t]
    scale = 1.0 / math.sqrt(meta.fan_in[t])
    b = lin.bias[bias0:bias0 + (c1 - c0)] if bias0 is not None else None
    dense, outer = [], []
    for k, x in enumerate(xs):
        rows = meta.in_rows[k]
        if x is None or rows is None or rows[0] != t:
            continue
        (outer if isinstance(x, _Outer) else dense).append((k, x, rows[1], rows[2]))

    def weight(blocks) -> Tensor:
        """The scaled weight rows of ``blocks`` stacked in order, (sum of their mul, c1 - c0)."""
        parts = []  # (r0, r1, row scale or None)
        for k, _x, r0, r1 in blocks:
            parts.append((r0, r1, row_scale.get(k) if row_scale is not None else None))

        def make() -> Tensor:
            ws = [w[r0:r1, c0:c1] * (scale if rs is None else (rs[0][rs[1]:rs[1] + rs[2]] * (scale * rs[3])).unsqueeze(1))
                  for r0, r1, rs in parts]
            return ws[0] if len(ws) == 1 else torch.cat(ws, dim=0)

        key = (id(lin), t, c0, c1) + tuple((r0, r1) if rs is None else (r0, r1, id(rs[0]), rs[1], rs[2], rs[3])
                                           for r0, r1, rs in parts)
        return ctx.frozen_weight(key, (w,) + tuple(rs[0] for _r0, _r1, rs in parts if rs is not None), make)

    acc = None
    if dense:
        x = dense[0][1] if len(dense) == 1 else ctx.concat(xs, [k for k, _x, _r0, _r1 in dense])
        acc = _mm(x, weight(dense), b)
    for blk in outer:
        o = blk[1]
        term = o.s * _mm(o.x, weight([blk]))  # (B, d, V) from (B, 1, V)
        if acc is None:
            acc = term + b if b is not None else term
        else:
            acc = acc + term
    if acc is None:
        raise RuntimeError("fused linear: no input of the requested type")
    return acc


def _linear(ctx: _Ctx, lin: IrrepsLinear, xs: Sequence[Tensor | None],
            row_scale: dict[int, RowScale] | None = None) -> Feat:
    """All output blocks of ``lin`` (list aligned with ``lin.irreps_out``)."""
    meta = _lmeta(ctx, lin)
    ref = next(x for x in xs if x is not None)
    if isinstance(ref, _Outer):
        ref = ref.x
    out = []
    for (mul, ir), (t, c0, c1, b0) in zip(lin.irreps_out, meta.out_cols):
        if t is None:
            z = ref.new_zeros(ref.shape[0], ir.dim, mul)
            if b0 is not None:
                z = z + lin.bias[b0:b0 + mul]
            out.append(z)
        else:
            out.append(_lin_cols(ctx, lin, xs, t, c0, c1, b0, row_scale))
    return out


# ------------------------------------------------------------------ layer norm, gate, FFN
def _layer_norm(norm: EquivariantLayerNorm, xs: Feat) -> Feat:
    """``EquivariantLayerNorm`` per block, through PyTorch's fused norms (one kernel per block
    instead of ~8): scalars (B, 1, mul) are exactly ``layer_norm`` over the channels (centre, biased
    variance, scale, bias); l > 0 blocks (B, d, mul) are ``rms_norm`` over (d, mul) with the
    per-channel scale broadcast over the d components."""
    out, w0, b0 = [], 0, 0
    for (mul, ir), x in zip(norm.irreps, xs):
        w = norm.weight[w0:w0 + mul]
        w0 += mul
        if ir.l == 0:
            out.append(F.layer_norm(x, (mul,), w, norm.bias[b0:b0 + mul], norm.eps))
            b0 += mul
        else:
            out.append(F.rms_norm(x, (ir.dim, mul), w.expand(ir.dim, mul), norm.eps))
    return out


class _GateMeta:
    """Column layout of the 0e output of the linear map feeding a Gate."""

    def __init__(self, gate, offset: int):
        # gate.irreps_in = sorted/simplified (scalars + gates) 0e block, then the gated blocks
        self.n_scalars = gate.irreps_scalars.num_irreps
        self.gated = [(mul, ir) for mul, ir in gate.irreps_gated]
        self.scal = (offset, offset + self.n_scalars)
        self.gates = []
        g = offset + self.n_scalars
        for mul, _ir in self.gated:
            self.gates.append((g, g + mul))
            g += mul
        self.act_s = gate.act_scalars.acts[0] if len(gate.act_scalars.acts) else None
        self.act_g = gate.act_gates.acts[0] if len(gate.act_gates.acts) else None


def _gate_from_linear(ctx: _Ctx, lin: IrrepsLinear, xs: Sequence[Tensor | None], gate, offset: int,
                      row_scale: dict[int, RowScale] | None = None) -> Feat:
    """Gate(lin(x)) where the gate's input starts at 0e column ``offset`` of ``lin``'s output.

    Returns blocks aligned with ``gate.irreps_out`` (scalars, then the gated types)."""
    return _lead_and_gate(ctx, lin, xs, gate, offset, 0, row_scale)[1]


def _lead_and_gate(ctx: _Ctx, lin: IrrepsLinear, xs: Sequence[Tensor | None], gate, offset: int, lead: int,
                   row_scale: dict[int, RowScale] | None = None) -> tuple[Tensor | None, Feat]:
    """0e columns ``offset - lead:offset`` of ``lin``'s output (None if ``lead`` is 0) and
    Gate(lin(x)) as :func:`_gate_from_linear`.

    The 0e columns (lead | gate scalars | gates) are contiguous: one matmul, split afterwards
    (``torch.split``: its backward is one ``cat``, where separate matmuls would cost one matmul
    each, forward and backward)."""
    gm = _GateMeta(gate, offset)
    meta = _lmeta(ctx, lin)
    t0 = meta.type_index[o3.Irrep("0e")]
    # the 0e output of lin is one block (the plain IrrepsLinear puts all 0e columns in one
    # weight); bias index = column index for 0e outputs
    c0, c1 = offset - lead, (gm.gates[-1][1] if gm.gates else gm.scal[1])
    cols = _lin_cols(ctx, lin, xs, t0, c0, c1, c0 if lin.bias is not None else None, row_scale)
    sizes = [lead, gm.n_scalars] + [g1 - g0 for g0, g1 in gm.gates]
    parts = list(torch.split(cols, sizes, dim=-1)) if len(sizes) > 1 else [cols]
    head, s, gates = parts[0], parts[1], parts[2:]
    out = [gm.act_s(s)]
    for (mul, ir), g in zip(gm.gated, gates):
        g = gm.act_g(g)  # (B, 1, mul)
        x = _lin_cols(ctx, lin, xs, meta.type_index[ir], *_col_range_of_type(lin, meta, ir), None, row_scale)
        out.append(x * g)
    return (head if lead else None), out


def _col_range_of_type(lin: IrrepsLinear, meta: _LinMeta, ir) -> tuple[int, int]:
    t = meta.type_index[ir]
    cols = [(c0, c1) for (tt, c0, c1, _b) in meta.out_cols if tt == t]
    if len(cols) != 1:
        raise RuntimeError(f"fused gate expects one {ir} block in the linear's output")
    return cols[0]


def _ffn(ctx: _Ctx, ffn: GatedFFN, xs: Feat) -> Feat:
    g = _gate_from_linear(ctx, ffn.lin1, xs, ffn.gate, 0)
    return _linear(ctx, ffn.lin2, g)


# ------------------------------------------------------------------ tensor products
class _TPMeta:
    """Per instruction of a depthwise TP: (i1, i2, i_out, l1, l2, l3, path_weight, w_off, u, v)."""

    def __init__(self, tp: o3.TensorProduct):
        self.paths = []
        off = 0
        for ins in tp.instructions:
            if ins.connection_mode != "uvu" or not ins.has_weight:
                raise RuntimeError("fused: only weighted 'uvu' tensor products are supported")
            m1, ir1 = tp.irreps_in1[ins.i_in1]
            m2, ir2 = tp.irreps_in2[ins.i_in2]
            _m3, ir3 = tp.irreps_out[ins.i_out]
            self.paths.append((ins.i_in1, ins.i_in2, ins.i_out, ir1.l, ir2.l, ir3.l,
                               float(ins.path_weight), off, m1, m2))
            off += m1 * m2
        by_in2: dict[int, list[int]] = {}
        for p, path in enumerate(self.paths):
            by_in2.setdefault(path[1], []).append(p)
        self.by_in2 = list(by_in2.items())  # (attribute block, the paths that read it)
        self.single = [(path[1], [p]) for p, path in enumerate(self.paths)]
        # V2E: multiplicity-1 attribute, each path's u weights right after the previous path's
        # (then one matmul of the radial MLP's last layer gives all paths' edge weights in order)
        starts = [0]
        for path in self.paths:
            starts.append(starts[-1] + path[8])
        self.radial_rows_in_order = all(path[9] == 1 and path[7] == o for path, o in zip(self.paths, starts))


def _tmeta(ctx: _Ctx, tp) -> _TPMeta:
    m = ctx.meta.get(id(tp))
    if m is None or m[0] is not tp:
        m = (tp, _TPMeta(tp))
        ctx.meta[id(tp)] = m
    return m[1]


def _cg_sh(ctx: _Ctx, l1: int, l2: int, l3: int) -> Tensor:
    """C_{ijk} as a (d2, d1*d3) matrix (to contract with a per-edge Y_l2)."""
    key = ("sh", l1, l2, l3)
    c = ctx.cg.get(key)
    if c is None:
        w = ctx.wigner(l1, l2, l3)
        c = w.permute(1, 0, 2).reshape(2 * l2 + 1, (2 * l1 + 1) * (2 * l3 + 1)).contiguous()
        ctx.cg[key] = c
    return c


def _sh_cg(ctx: _Ctx, y: Tensor, l1: int, l2: int, l3: int) -> Tensor:
    """S[z, i, k] = sum_j Y_l2[z, j] C_{ijk}, (E, d1, d3): the same for every block and for both
    products of a V2E attention, so made once per call of the network."""
    key = (id(y), l1, l2, l3)
    hit = ctx.sh_cg.get(key)
    if hit is None:
        hit = (y, torch.mm(y, _cg_sh(ctx, l1, l2, l3)).view(y.shape[0], 2 * l1 + 1, 2 * l3 + 1))
        ctx.sh_cg[key] = hit
    return hit[1]


def _cg_pair(ctx: _Ctx, l1: int, l2: int, l3: int, pw: float) -> Tensor:
    """pw * C as a (d3, d1*d2) matrix (to contract with an outer product x_i Y_j)."""
    key = ("pair", l1, l2, l3, pw)
    c = ctx.cg.get(key)
    if c is None:
        w = ctx.wigner(l1, l2, l3)
        c = (w.reshape((2 * l1 + 1) * (2 * l2 + 1), 2 * l3 + 1).t() * pw).contiguous()
        ctx.cg[key] = c
    return c


def _cg_diagonal(ctx: _Ctx, l1: int, l2: int, l3: int, pw: float) -> Tensor | None:
    """The diagonal (d3, 1) of ``pw * C`` as a (d3, d1*d2) matrix when that matrix is diagonal
    (one of l1, l2 is 0: C_{0jk} = delta_jk / sqrt(d), to rounding: e3nn's entries differ in the
    last bit, so they are kept as they are), else None. The product with such a path is then an
    element-wise scaling, equal to the matmul (which only adds exact zeros)."""
    key = ("diag", l1, l2, l3, pw)
    if key not in ctx.cg:
        c = _cg_pair(ctx, l1, l2, l3, pw)
        diag = None
        if c.shape[0] == c.shape[1] and torch.equal(c, torch.diag(torch.diagonal(c))):
            diag = torch.diagonal(c).unsqueeze(1).contiguous()
        ctx.cg[key] = diag
    return ctx.cg[key]


def _cg_terms(ctx: _Ctx, l1: int, l2: int, l3: int, pw: float) -> list[list[tuple[int, list[tuple[int, float]]]]]:
    """The non-zero entries of ``pw * C``: per output component k, per input component i, the
    (j, pw * C_ijk) that multiply attribute component j. Python numbers (constants of a traced
    graph), made once per model and dtype."""
    key = ("terms", l1, l2, l3, pw)
    hit = ctx.cg.get(key)
    if hit is None:
        c = _cg_pair(ctx, l1, l2, l3, pw).view(2 * l3 + 1, 2 * l1 + 1, 2 * l2 + 1).tolist()
        hit = [[(i, [(j, cij) for j, cij in enumerate(ci) if cij != 0.0]) for i, ci in enumerate(ck) if any(ci)]
               for ck in c]
        ctx.cg[key] = hit
    return hit


def _contract_unrolled(s: Tensor, x: Tensor) -> Tensor:
    """T[z,k,u] = sum_i s[z,i,k] x[z,i,u] for s (E, d1, d3), x (E, d1, u), as element-wise
    products (``torch.bmm(s.transpose(1, 2), x)``; see ``_UNROLL``)."""
    t = s[:, 0, :, None] * x[:, 0, None, :]
    for i in range(1, s.shape[1]):
        t = t + s[:, i, :, None] * x[:, i, None, :]
    return t


def _pair_unrolled(terms, x: Tensor, y: Tensor) -> Tensor:
    """T[z,k,u] = sum_ij c_ijk x[z,i,u] y[z,j,u] over the non-zero c (``terms`` from
    :func:`_cg_terms`), x (E, d1, u), y (E, d2, u) -> (E, d3, u)."""
    xi, yj = x.unbind(1), y.unbind(1)
    cols = []
    for ck in terms:
        acc = None
        for i, js in ck:
            inner = None
            for j, c in js:
                term = yj[j] * c
                inner = term if inner is None else inner + term
            term = xi[i] * inner
            acc = term if acc is None else acc + term
        cols.append(acc if acc is not None else x.new_zeros(x.shape[0], x.shape[2]))
    return torch.stack(cols, dim=1)


def _tp_sh(ctx: _Ctx, tp, xs: Feat, sh: Feat, edge_w: Sequence[Tensor] | None) -> list[Tensor]:
    """Depthwise TP x (E, d1, u) with a multiplicity-1 attribute sh (E, d2) per block, WITHOUT the
    path weights ``instruction.path_weight``: the caller folds them into ``edge_w`` or into the
    rows of the next linear map (constants there, one multiplication fewer per edge and path).

    Returns one (E, d3, u) tensor per instruction (= per block of tp.irreps_out). With
    ``edge_w`` (per instruction (E, u)) the path is multiplied by it; shared weights are left to
    the caller (folded into the next linear)."""
    meta = _tmeta(ctx, tp)
    out = []
    for p, (i1, i2, _io, l1, l2, l3, _pw, _off, _u, _v) in enumerate(meta.paths):
        x = xs[i1]
        if l1 == 0:
            # C_{0jk} = delta_jk / sqrt(d): T[z,k,u] = y[z,k] x[z,0,u] / sqrt(d)
            # (computed through the CG matrix so that it is exactly the e3nn constant)
            s = _sh_cg(ctx, sh[i2], l1, l2, l3).view(x.shape[0], 2 * l3 + 1, 1)
            if l3 > 0:
                # rank-1 in (k, u): keep it factored, the next linear applies W to x first
                xw = x * edge_w[p].unsqueeze(1) if edge_w is not None else x
                out.append(_Outer(s, xw))
                continue
            t = s * x
        elif l2 == 0:
            # C_{i0k} = delta_ik / sqrt(d1) (l3 = l1): S is y0 times a multiple of the identity, so
            # T = x * (y0 C_000), an element-wise product instead of a per-edge (d1 x d1) matmul
            t = x * (sh[i2] * _cg_sh(ctx, l1, l2, l3)[0, 0]).unsqueeze(2)
        elif ctx.unroll:
            t = _contract_unrolled(_sh_cg(ctx, sh[i2], l1, l2, l3), x)
        else:
            # S = Y . C (E, d1, d3); (measured: bmm beats broadcast-multiply + sum here, forward and backward)
            t = torch.bmm(_sh_cg(ctx, sh[i2], l1, l2, l3).transpose(1, 2), x)  # (E, d3, u)
        if edge_w is not None:
            t = t * edge_w[p].unsqueeze(1)
        out.append(t)
    return out


def _path_weight_rows(ctx: _Ctx, meta: _TPMeta) -> Tensor:
    """(sum of u,) the path weight of each path repeated over its u channels (a constant)."""
    key = ("pw_rows",) + tuple((p[6], p[8]) for p in meta.paths)
    c = ctx.cg.get(key)
    if c is None:
        c = torch.cat([torch.full((u,), pw, dtype=torch.float64) for (*_a, pw, _off, u, _v) in meta.paths])
        c = c.to(ctx.dtype).to(ctx.device)
        ctx.cg[key] = c
    return c


def _tp_shared(ctx: _Ctx, tp, xs: Feat, attr: Feat) -> list[Tensor]:
    """Depthwise TP with shared u x v weights: x (E, d1, u), attr (E, d2, v) per block.

    Y = attr @ W^T (contract v first), then T[z,k,u] = pw sum_ij C_ijk x[z,i,u] Y[z,j,u]."""
    meta = _tmeta(ctx, tp)
    wflat = tp.weight
    ys: list[Tensor] = [None] * len(meta.paths)
    group = GROUP_SHARED_PRODUCTS if GROUP_SHARED_PRODUCTS is not None else attr[0].device.type != "cpu"
    for i2, ps in (meta.by_in2 if group else meta.single):
        # grouped: Y of all paths on attribute block i2 in one matmul, W^T of the paths side by side
        # (v, sum u); fewer launches on a GPU, but the split Y are strided, slower on a CPU
        parts = [(meta.paths[p][7], meta.paths[p][8], meta.paths[p][9]) for p in ps]

        def make(parts=parts) -> Tensor:
            ws = [wflat[off:off + u * v].view(u, v).t() for off, u, v in parts]
            return ws[0] if len(ws) == 1 else torch.cat(ws, dim=1)

        y_all = _mm(attr[i2], ctx.frozen_weight(("tp_shared", id(tp), i2, tuple(ps)), (wflat,), make))
        split = torch.split(y_all, [u for _off, u, _v in parts], dim=2) if len(ps) > 1 else (y_all,)
        for p, y in zip(ps, split):
            ys[p] = y  # (E, d2, u)
    out = []
    for (i1, _i2, _io, l1, l2, l3, pw, _off, u, _v), y in zip(meta.paths, ys):
        x = xs[i1]
        e = x.shape[0]
        d1, d2 = 2 * l1 + 1, 2 * l2 + 1
        diag = _cg_diagonal(ctx, l1, l2, l3, pw) if l1 == 0 or l2 == 0 else None
        if diag is not None:
            # C_{0jk} (or C_{i0k}) = delta / sqrt(d): T = c * x * y, element-wise (the matmul with
            # the diagonal (d3, d2) matrix adds exact zeros only: the same numbers)
            t = (y * diag) * x if l1 == 0 else (x * diag) * y
        elif ctx.unroll and UNROLL_SHARED_PRODUCTS:
            t = _pair_unrolled(_cg_terms(ctx, l1, l2, l3, pw), x, y)
        else:
            # any path: the outer product x_i y_j contracted with pw * C, (d3, d1*d2)
            xx = (x.unsqueeze(2) * y.unsqueeze(1)).view(e, d1 * d2, u)
            t = torch.matmul(_cg_pair(ctx, l1, l2, l3, pw), xx)
        out.append(t)
    return out


# ------------------------------------------------------------------ radial MLPs
def _radial_hiddens(ctx: _Ctx, mlps: Sequence, basis: Tensor) -> list[Tensor]:
    """The hidden layer (E, hidden) of each :class:`RadialMLP` in ``mlps``, all reading the same
    radial basis (E, K): ``net[:-1](basis)`` (Linear-LN-SiLU-Linear-LN-SiLU) for every one, with
    the first linears of all as one matmul (their weights side by side) and the second ones as one
    batched matmul. Same products as one MLP at a time (7 of them at the paper preset: the token
    degree term and each block's V2E weights), 4 matrix products per call instead of 28."""
    nets = [m.net for m in mlps]
    lin1, ln1, lin2, ln2 = (nets[0][0], nets[0][1], nets[0][3], nets[0][4])
    h = lin1.out_features
    if any(net[0].out_features != h or net[1].eps != ln1.eps or net[4].eps != ln2.eps for net in nets):
        return [net[:-1](basis) for net in nets]
    n, e = len(nets), basis.shape[0]

    def stacked(key: str, get, make) -> Tensor:
        parts = tuple(get(net) for net in nets)
        return ctx.frozen_weight(("radial", key) + tuple(id(t) for t in parts), parts, lambda: make(parts))

    w1 = stacked("w1", lambda net: net[0].weight, lambda ps: torch.cat(ps, dim=0).t())  # (K, n h)
    b1 = stacked("b1", lambda net: net[0].bias, lambda ps: torch.cat(ps))  # (n h,)
    g1 = stacked("g1", lambda net: net[1].weight, lambda ps: torch.stack(ps))  # (n, h)
    c1 = stacked("c1", lambda net: net[1].bias, lambda ps: torch.stack(ps))
    w2 = stacked("w2", lambda net: net[3].weight, lambda ps: torch.stack(ps).transpose(1, 2))  # (n, h, h)
    b2 = stacked("b2", lambda net: net[3].bias, lambda ps: torch.stack(ps).unsqueeze(1))  # (n, 1, h)
    g2 = stacked("g2", lambda net: net[4].weight, lambda ps: torch.stack(ps).unsqueeze(1))
    c2 = stacked("c2", lambda net: net[4].bias, lambda ps: torch.stack(ps).unsqueeze(1))
    x = torch.addmm(b1, basis, w1).view(e, n, h)
    x = F.silu(F.layer_norm(x, (h,), eps=ln1.eps) * g1 + c1)
    x = torch.baddbmm(b2, x.transpose(0, 1), w2)  # (n, E, h)
    x = F.silu(F.layer_norm(x, (h,), eps=ln2.eps) * g2 + c2)
    return list(x.unbind(0))


# ------------------------------------------------------------------ attention
def _segment_softmax(logits: Tensor, dst: Segments, weight: Tensor | None) -> Tensor:
    """:func:`.attention.segment_softmax` of ``logits`` (E, H) over the segments of ``dst``, its
    sums and gathers through ``dst`` (the maxima, outside the derivative, as there)."""
    idx = dst.index.unsqueeze(1).expand(-1, logits.shape[1])
    top = torch.full((dst.size, logits.shape[1]), -torch.inf, dtype=logits.dtype, device=logits.device)
    top = top.scatter_reduce(0, idx, logits.detach(), reduce="amax", include_self=True)
    e = torch.exp(logits - top.index_select(0, dst.index))
    if weight is not None:
        e = e * weight.unsqueeze(1)
    return e / dst.gather(dst.sum(e))


def _attention(ctx: _Ctx, att: HyperAttention, x_dst: Feat, x_src: Feat | None, src: Segments | None,
               dst: Segments, attr: Feat, hidden: Tensor | None, edge_weight: Tensor | None,
               sh_mode: bool) -> Feat:
    """``att`` applied along edges ``src`` -> ``dst`` (their index lists); ``hidden`` (E, radial
    hidden): its radial MLP's hidden layer (V2E, from :func:`_radial_hiddens`), None for E2V."""
    msg = [dst.gather(t) for t in _linear(ctx, att.lin_dst, x_dst)]
    if att.lin_src is not None:
        msg = [m + src.gather(t) for m, t in zip(msg, _linear(ctx, att.lin_src, x_src))]

    # first tensor product
    if sh_mode:
        # per-edge radial weights, one matmul per path on the radial MLP's hidden layer
        last = att.radial.net[-1]
        meta1 = _tmeta(ctx, att.tp1)
        if not meta1.radial_rows_in_order:
            raise RuntimeError("fused: V2E attribute must have multiplicity 1, the paths' weights in order")
        pw = _path_weight_rows(ctx, meta1)  # (sum u,): the radial outputs are the paths' weights in order
        w = ctx.frozen_weight(("radial_w", id(last)), (last.weight,), lambda: last.weight * pw.unsqueeze(1))
        b = ctx.frozen_weight(("radial_b", id(last)), (last.bias,), lambda: last.bias * pw)
        edge_w = torch.split(torch.addmm(b, hidden, w.t()), [u for *_rest, u, _v in meta1.paths], dim=1)
        m = _tp_sh(ctx, att.tp1, msg, attr, edge_w)
    else:
        m = _tp_shared(ctx, att.tp1, msg, attr)

    # lin_alpha_value: 0e columns [alpha | gate scalars | gates], then the gated types
    lav = att.lin_alpha_value
    a, g = _lead_and_gate(ctx, lav, m, att.gate, att.n_alpha, att.n_alpha)
    a = att.act_alpha(a.squeeze(1)).view(-1, att.num_heads, att.alpha_dot.shape[1])
    logits = (a * att.alpha_dot).sum(-1)
    alpha = _segment_softmax(logits, dst, edge_weight)  # (E, H)

    # second tensor product (shared weights) + lin_value2
    if sh_mode:
        t2 = _tp_sh(ctx, att.tp2, g, attr, None)
        meta2 = _tmeta(ctx, att.tp2)
        wflat = att.tp2.weight
        row_scale = {p: (wflat, off, u, pw) for p, (_a, _b, _c, _l1, _l2, _l3, pw, off, u, _v)
                     in enumerate(meta2.paths)}
        v = _linear(ctx, att.lin_value2, t2, row_scale)
    else:
        t2 = _tp_shared(ctx, att.tp2, g, attr)
        v = _linear(ctx, att.lin_value2, t2)

    h = att.num_heads
    out = []
    for x in v:
        e, d, mul = x.shape
        x = (x.view(e, d, h, mul // h) * alpha.view(e, 1, h, 1)).view(e, d, mul)
        out.append(dst.sum(x))
    return _linear(ctx, att.lin_out, out)


# ------------------------------------------------------------------ network
def _sh_blocks(model, vec: Tensor) -> list[Tensor]:
    """Spherical harmonics per l, (E, 2l+1) each, as ``model.sh`` computes them."""
    irreps_sh = model.sh.irreps_out
    return [o3.spherical_harmonics(ir.l, vec, normalize=model.sh.normalize, normalization=model.sh.normalization)
            for _mul, ir in irreps_sh]


def _add_scalars(x0: Tensor, emb: Tensor) -> Tensor:
    return x0 + emb.unsqueeze(1)


def fused_forward(model, hg: Hypergraph) -> Tensor:
    """Per-atom energies (N,) in eV: same result as ``model.forward(hg)``, fused per-l layout."""
    dtype = model.dtype
    pos = hg.positions
    ctx = _Ctx(model, dtype, pos.device)
    z = model.element_indices(hg.numbers)
    n_atoms, n_tok = hg.num_atoms, hg.num_tokens
    tables = _TABLES.get() or {}
    e2t = Segments(hg.v2e_dst, n_tok, tables.get("v2e_dst"))  # incidence -> its token
    e2a = Segments(hg.v2e_src, n_atoms, tables.get("v2e_src"))  # incidence -> its member atom
    t2a = Segments(hg.token_anchor, n_atoms, tables.get("token_anchor"))  # token -> its anchor atom
    if t2a.table is None:
        vec = e2a.gather(pos) - pos[hg.token_anchor[hg.v2e_dst]]  # member minus anchor
    else:  # the anchor's position reaches the incidence through its token: gathers only
        vec = e2a.gather(pos) - e2t.gather(t2a.gather(pos))
    length = torch.linalg.vector_norm(vec, dim=-1)
    sh = _sh_blocks(model, vec)
    basis = model.basis(length)
    frag = model.config.fragment
    w_tok = None
    if has_switched_tokens(hg):
        w_tok = token_weights(hg, length, frag.implicit_rc, frag.switch_width)

    ns = model.n_scalar
    # token embedding: anchor element + degree term (radial x Y_l summed over the token's members)
    hiddens = _radial_hiddens(ctx, [model.deg_radial] + [block.v2e.radial for block in model.blocks], basis)
    hidden = hiddens[0]
    last = model.deg_radial.net[-1]
    deg = []
    for l, y in enumerate(sh):
        rad = torch.addmm(last.bias[l * ns:(l + 1) * ns], hidden, last.weight[l * ns:(l + 1) * ns].t())
        part = y.unsqueeze(2) * rad.unsqueeze(1)  # (E, d, ns)
        deg.append(e2t.sum(part))
    s = _linear(ctx, model.deg_lin, deg)
    inv = 1.0 / torch.sqrt(model.avg_hyperedge_degree).to(dtype)
    s = [x * inv for x in s]
    s[0] = _add_scalars(s[0], model.token_embed(z[hg.token_anchor]))
    h_in = _layer_norm(model.tok_in_norm, s)

    tok = _linear(ctx, model.node_deg_lin, h_in)
    if w_tok is not None:
        tok = [x * w_tok.view(-1, 1, 1) for x in tok]
    inv_n = 1.0 / torch.sqrt(model.avg_node_degree).to(dtype)
    u = [t2a.sum(x) * inv_n for x in tok]
    u[0] = _add_scalars(u[0], model.atom_embed(z))
    n_in = _layer_norm(model.node_in_norm, u)

    for block, hidden in zip(model.blocks, hiddens[1:]):
        s = [a + b for a, b in zip(s, _attention(ctx, block.v2e, h_in, n_in, e2a, e2t,
                                                  sh, hidden, None, sh_mode=True))]
        s = [a + b for a, b in zip(s, _ffn(ctx, block.tok_ffn, _layer_norm(block.tok_norm, s)))]
        h_in = _layer_norm(block.tok_out_norm, s)
        u = [a + b for a, b in zip(u, _attention(ctx, block.e2v, n_in, None, None, t2a,
                                                  h_in, None, w_tok, sh_mode=False))]
        ffn = _ffn(ctx, block.node_ffn, _layer_norm(block.node_norm, u))
        short = _linear(ctx, block.node_shortcut, u) if block.node_shortcut is not None else u
        u = [a + b for a, b in zip(short, ffn)]
        n_in = _layer_norm(block.node_out_norm, u)
    out = model.head(n_in[0].squeeze(1)).squeeze(-1)
    # as the plain path: reference energies added in float64
    return (out * model.energy_scale.to(dtype)).double() + model.element_energy[z]


def fused_energy_and_forces(model, hg: Hypergraph, training: bool = False
                            ) -> tuple[Tensor, Tensor, Tensor]:
    """As :func:`se3set_ase.model.network.energy_and_forces`, through :func:`fused_forward`."""
    pos = hg.positions.detach().requires_grad_(True)
    hg = hg.with_positions(pos)
    with torch.enable_grad():
        e_atom = fused_forward(model, hg)
        energy = torch.zeros(hg.num_graphs, dtype=e_atom.dtype, device=e_atom.device).index_add(0, hg.batch, e_atom)
        (grad,) = torch.autograd.grad(energy.sum(), pos, create_graph=training)
    return energy, -grad, e_atom
