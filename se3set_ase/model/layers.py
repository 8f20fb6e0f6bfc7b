"""Equivariant building blocks: radial basis, radial MLP, layer norm, gated FFN, depthwise TP.

Shapes: features are flat e3nn tensors ``(..., irreps.dim)``. Distances in Å.
"""
from __future__ import annotations

import math

import torch
from e3nn import o3
from e3nn.nn import Gate
from torch import nn


class ExpNormalBasis(nn.Module):
    """K exp-normal radial functions with a cosine cutoff at ``cutoff`` (Å).

    phi_k(d) = f_cut(d) exp(-beta (exp(-alpha d) - mu_k)^2), alpha = 5/cutoff, mu_k evenly spaced
    in [exp(-cutoff), 1], f_cut(d) = (cos(pi d / cutoff) + 1)/2 for d < cutoff else 0.
    Input (E,), output (E, K).
    """

    def __init__(self, num_basis: int, cutoff: float):
        super().__init__()
        self.cutoff = float(cutoff)
        start = math.exp(-cutoff)
        self.register_buffer("mu", torch.linspace(start, 1.0, num_basis))
        self.beta = (2.0 * (1.0 - start) / num_basis) ** -2
        self.alpha = 5.0 / cutoff

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        fcut = 0.5 * (torch.cos(math.pi * d / self.cutoff) + 1.0) * (d < self.cutoff)
        x = torch.exp(-self.alpha * d).unsqueeze(-1) - self.mu.to(d.dtype)
        return fcut.unsqueeze(-1) * torch.exp(-self.beta * x * x)


class RadialMLP(nn.Module):
    """Basis (E, K) -> per-edge tensor-product weights (E, num_out): Linear-LN-SiLU twice, Linear."""

    def __init__(self, num_basis: int, hidden: int, num_out: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(num_basis, hidden), nn.LayerNorm(hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.SiLU(),
            nn.Linear(hidden, num_out),
        )

    def forward(self, basis: torch.Tensor) -> torch.Tensor:
        return self.net(basis)


class SmoothLeakyReLU(nn.Module):
    """f(x) = (1+a)/2 x + (1-a)/2 x (2 sigmoid(x) - 1), a = 0.2: smooth, leaky for x < 0.

    Computed as the equal a x + (1 - a) silu(x): three kernels instead of seven."""

    def __init__(self, negative_slope: float = 0.2):
        super().__init__()
        self.a = negative_slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.add(torch.nn.functional.silu(x) * (1 - self.a), x, alpha=self.a)


class EquivariantLayerNorm(nn.Module):
    """Layer norm per irrep type: scalars are centred; every type is divided by the RMS over its
    channels and components; a learned scale per channel (and bias on scalars)."""

    def __init__(self, irreps: o3.Irreps, eps: float = 1e-5):
        super().__init__()
        self.irreps = o3.Irreps(irreps).simplify()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(self.irreps.num_irreps))
        n_scalar = sum(mul for mul, ir in self.irreps if ir.l == 0)
        self.bias = nn.Parameter(torch.zeros(n_scalar))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, start, w0, b0 = [], 0, 0, 0
        for mul, ir in self.irreps:
            block = x[..., start:start + mul * ir.dim].reshape(*x.shape[:-1], mul, ir.dim)
            start += mul * ir.dim
            if ir.l == 0:
                block = block - block.mean(dim=-2, keepdim=True)
            rms = torch.sqrt(block.pow(2).mean(dim=(-2, -1), keepdim=True) + self.eps)
            block = block / rms * self.weight[w0:w0 + mul].unsqueeze(-1)
            w0 += mul
            if ir.l == 0:
                block = block + self.bias[b0:b0 + mul].unsqueeze(-1)
                b0 += mul
            out.append(block.reshape(*x.shape[:-1], mul * ir.dim))
        return torch.cat(out, dim=-1)


def gate_layout(irreps_out: o3.Irreps) -> tuple[Gate, o3.Irreps]:
    """A Gate producing ``irreps_out``: SiLU on its scalars, sigmoid gates on the others.

    Returns the gate and the irreps it takes as input (scalars + gates + gated).
    """
    irreps_out = o3.Irreps(irreps_out).simplify()
    scalars = o3.Irreps([(m, ir) for m, ir in irreps_out if ir.l == 0])
    gated = o3.Irreps([(m, ir) for m, ir in irreps_out if ir.l > 0])
    gates = o3.Irreps(f"{gated.num_irreps}x0e") if gated.num_irreps else o3.Irreps("")
    gate = Gate(scalars, [nn.SiLU()], gates, [torch.sigmoid] if gated.num_irreps else [], gated)
    return gate, gate.irreps_in


class GatedFFN(nn.Module):
    """Linear -> gated nonlinearity (hidden ``irreps_mid``) -> Linear."""

    def __init__(self, irreps_in: o3.Irreps, irreps_mid: o3.Irreps, irreps_out: o3.Irreps):
        super().__init__()
        self.gate, gate_in = gate_layout(irreps_mid)
        self.lin1 = IrrepsLinear(irreps_in, gate_in)
        self.lin2 = IrrepsLinear(self.gate.irreps_out, irreps_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.gate(self.lin1(x)))


def depthwise_tp(
    irreps_in: o3.Irreps, irreps_attr: o3.Irreps, targets: o3.Irreps, internal_weights: bool
) -> o3.TensorProduct:
    """Depthwise ("uvu") tensor product x ⊗ attr.

    For every input irrep (multiplicity u) and attribute irrep (multiplicity v), each coupled
    irrep that is in ``targets`` (or is 0e) becomes an output slot of multiplicity u, with u×v
    weights summed over v. With ``internal_weights=False`` the weights are given per edge
    (shape (E, tp.weight_numel)).
    """
    irreps_in, irreps_attr = o3.Irreps(irreps_in), o3.Irreps(irreps_attr)
    allowed = {ir for _, ir in o3.Irreps(targets)} | {o3.Irrep("0e")}
    out, instructions = [], []
    for i1, (mul1, ir1) in enumerate(irreps_in):
        for i2, (_, ir2) in enumerate(irreps_attr):
            for ir_out in ir1 * ir2:
                if ir_out in allowed:
                    instructions.append((i1, i2, len(out), "uvu", True))
                    out.append((mul1, ir_out))
    return o3.TensorProduct(
        irreps_in, irreps_attr, o3.Irreps(out), instructions,
        internal_weights=internal_weights, shared_weights=internal_weights,
    )


def heads_index(irreps: o3.Irreps, num_heads: int) -> torch.Tensor:
    """For a flat feature laid out head-major inside every irrep block, the head of each component."""
    idx = []
    for mul, ir in o3.Irreps(irreps):
        if mul % num_heads:
            raise ValueError(f"multiplicity {mul} of {ir} is not divisible by {num_heads} heads")
        per = mul // num_heads
        idx.append(torch.arange(mul).div(per, rounding_mode="floor").repeat_interleave(ir.dim))
    return torch.cat(idx)


class IrrepsLinear(nn.Module):
    """Equivariant linear map: channels of the same irrep type are mixed, bias on scalar outputs.

    Equivalent to e3nn's ``o3.Linear`` (weights N(0, 1) scaled by 1/sqrt(fan_in) per output type)
    but with one matmul per irrep type (fewer, larger operations). This is the plain path;
    the fused path (``fused.py``) reads the same parameters with features kept per irrep type,
    which also avoids the full-size gradient buffers that slicing costs in double backward.
    """

    def __init__(self, irreps_in: o3.Irreps, irreps_out: o3.Irreps, bias: bool = True):
        super().__init__()
        self.irreps_in, self.irreps_out = o3.Irreps(irreps_in), o3.Irreps(irreps_out)
        self.in_sizes = [mul * ir.dim for mul, ir in self.irreps_in]
        self.types = sorted({ir for _, ir in self.irreps_out} & {ir for _, ir in self.irreps_in}, key=lambda ir: (ir.l, ir.p))
        self.weights = nn.ParameterList()
        self.plan = []  # per type: (input block ids, output block ids, fan_in)
        for ir in self.types:
            ins = [k for k, (_, i) in enumerate(self.irreps_in) if i == ir]
            outs = [k for k, (_, i) in enumerate(self.irreps_out) if i == ir]
            u = sum(self.irreps_in[k].mul for k in ins)
            v = sum(self.irreps_out[k].mul for k in outs)
            self.weights.append(nn.Parameter(torch.randn(u, v)))
            self.plan.append((ins, outs, u))
        scalar_pos = [i for sl, (_, ir) in zip(self.irreps_out.slices(), self.irreps_out)
                      if ir == o3.Irrep("0e") for i in range(sl.start, sl.stop)]
        self.bias = nn.Parameter(torch.zeros(len(scalar_pos))) if bias and scalar_pos else None
        self.register_buffer("bias_index", torch.tensor(scalar_pos, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        blocks = torch.split(x, self.in_sizes, dim=-1) if len(self.in_sizes) > 1 else (x,)
        out: list[torch.Tensor | None] = [None] * len(self.irreps_out)
        for (ins, outs, fan_in), w, ir in zip(self.plan, self.weights, self.types):
            xs = [blocks[k].reshape(-1, self.irreps_in[k].mul, ir.dim) for k in ins]
            xi = xs[0] if len(xs) == 1 else torch.cat(xs, dim=1)  # (B, U, d)
            y = torch.matmul(xi.transpose(1, 2), w / math.sqrt(fan_in))  # (B, d, V)
            muls = [self.irreps_out[k].mul for k in outs]
            parts = torch.split(y, muls, dim=2) if len(muls) > 1 else (y,)
            for k, part in zip(outs, parts):
                out[k] = part.transpose(1, 2).reshape(-1, self.irreps_out[k].mul * ir.dim)
        for k, (mul, ir) in enumerate(self.irreps_out):
            if out[k] is None:
                out[k] = x.new_zeros(x.shape[0], mul * ir.dim)
        y = torch.cat(out, dim=-1) if len(out) > 1 else out[0]
        if self.bias is not None:
            y = y + torch.zeros(y.shape[-1], dtype=y.dtype, device=y.device).index_add(0, self.bias_index, self.bias)
        return y.reshape(*lead, self.irreps_out.dim)
