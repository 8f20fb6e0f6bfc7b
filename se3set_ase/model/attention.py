"""Equivariant multi-head graph attention on hypergraph incidences (Equiformer-style, GATv2 logits).

Used twice per block:
- V2E: atoms -> tokens along v2e edges (member s -> token t); the tensor-product attribute is the
  spherical harmonics of r_s - r_anchor(t), and its weights come from a radial MLP of |r|.
- E2V: tokens -> their anchor atom; the attribute is the token's own feature (a token sits on its
  atom, so there is no geometry), with shared weights. Token weights w_t (smooth implicit-token
  switching) enter the softmax as alpha_t = w_t exp(l_t) / sum_t' w_t' exp(l_t'), so a token with
  w_t = 0 contributes nothing and the output is continuous as it appears or vanishes.
"""
from __future__ import annotations

import math

import torch
from e3nn import o3
from torch import nn

from .layers import IrrepsLinear, RadialMLP, SmoothLeakyReLU, depthwise_tp, gate_layout, heads_index


def segment_softmax(
    logits: torch.Tensor, index: torch.Tensor, num_segments: int, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Softmax of ``logits`` (E, H) over the edges sharing ``index`` (E,), optionally weighted (E,)."""
    h = logits.shape[1]
    idx = index.unsqueeze(1).expand(-1, h)
    top = torch.full((num_segments, h), -torch.inf, dtype=logits.dtype, device=logits.device)
    top = top.scatter_reduce(0, idx, logits.detach(), reduce="amax", include_self=True)
    e = torch.exp(logits - top[index])
    if weight is not None:
        e = e * weight.unsqueeze(1)
    denom = torch.zeros((num_segments, h), dtype=e.dtype, device=e.device).index_add(0, index, e)
    return e / denom[index]


class HyperAttention(nn.Module):
    """Attention from sources to destinations along edges.

    ``irreps_src=None`` means the message is built from the destination only (E2V).
    ``radial=(num_basis, hidden)`` gives the first tensor product per-edge weights from the radial
    basis (V2E); otherwise its weights are shared parameters.
    """

    def __init__(
        self,
        irreps_dst: o3.Irreps,
        irreps_src: o3.Irreps | None,
        irreps_attr: o3.Irreps,
        irreps_head: o3.Irreps,
        num_heads: int,
        attn_scalars: int,
        irreps_out: o3.Irreps,
        radial: tuple[int, int] | None = None,
    ):
        super().__init__()
        irreps_value = o3.Irreps([(m * num_heads, ir) for m, ir in o3.Irreps(irreps_head)])
        self.num_heads = num_heads
        self.lin_dst = IrrepsLinear(irreps_dst, irreps_dst)
        self.lin_src = IrrepsLinear(irreps_src, irreps_dst) if irreps_src is not None else None
        self.tp1 = depthwise_tp(irreps_dst, irreps_attr, irreps_value, internal_weights=radial is None)
        self.radial = RadialMLP(radial[0], radial[1], self.tp1.weight_numel) if radial else None
        self.act_alpha = SmoothLeakyReLU(0.2)
        self.alpha_dot = nn.Parameter(torch.randn(num_heads, attn_scalars) * math.sqrt(2.0 / (1 + attn_scalars)))
        self.gate, gate_in = gate_layout(irreps_value)
        # one linear map gives both the attention scalars and the value (one pass over m)
        self.n_alpha = num_heads * attn_scalars
        self.lin_alpha_value = IrrepsLinear(self.tp1.irreps_out, o3.Irreps(f"{self.n_alpha}x0e") + gate_in)
        self.tp2 = depthwise_tp(self.gate.irreps_out, irreps_attr, irreps_value, internal_weights=True)
        self.lin_value2 = IrrepsLinear(self.tp2.irreps_out, irreps_value)
        self.lin_out = IrrepsLinear(irreps_value, irreps_out)
        self.register_buffer("head_of", heads_index(irreps_value, num_heads), persistent=False)

    def forward(
        self,
        x_dst: torch.Tensor,
        x_src: torch.Tensor | None,
        src: torch.Tensor | None,
        dst: torch.Tensor,
        attr: torch.Tensor,
        basis: torch.Tensor | None = None,
        edge_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x_dst (D, .), x_src (S, .), src/dst (E,), attr (E, .), basis (E, K) -> (D, irreps_out)."""
        msg = self.lin_dst(x_dst)[dst]
        if self.lin_src is not None:
            msg = msg + self.lin_src(x_src)[src]
        w = self.radial(basis) if self.radial is not None else None
        m = self.tp1(msg, attr, w) if w is not None else self.tp1(msg, attr)

        a, v = torch.split(self.lin_alpha_value(m), [self.n_alpha, self.gate.irreps_in.dim], dim=-1)
        a = self.act_alpha(a).view(-1, self.num_heads, self.alpha_dot.shape[1])
        logits = (a * self.alpha_dot).sum(-1)  # (E, H)
        alpha = segment_softmax(logits, dst, x_dst.shape[0], edge_weight)

        v = self.lin_value2(self.tp2(self.gate(v), attr))
        v = v * alpha[:, self.head_of]
        out = torch.zeros((x_dst.shape[0], v.shape[1]), dtype=v.dtype, device=v.device).index_add(0, dst, v)
        return self.lin_out(out)
