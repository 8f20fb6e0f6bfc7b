"""The SE3Set network: embeddings, blocks of V2E attention -> FFN -> E2V attention -> FFN, energy head.

Energy model (size-extensive): E = sum_i [ scale * o_i + e_ref(Z_i) ], o_i the network's per-atom
scalar, e_ref the per-element reference energies (eV) and scale (eV) fitted on training data.
Both live in the module's buffers, with the hypergraph degree statistics, so a state dict is a
complete model. Forces F = -dE/dR by autograd (:func:`energy_and_forces`).

Parameter count at the "paper" preset: 6,146,785 with elements [1, 6, 8] (the published code:
6,288,033, -2.2 %) and 6,147,041 with [1, 6, 7, 8] (published: 6,288,289). ``tests/test_model.py``
asserts these figures. A float64 model must be built as ``SE3SetModel(config, torch.float64)``.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from e3nn import o3
from torch import nn

from ..hypergraph import Hypergraph, capturing, has_switched_tokens, token_weights
from .attention import HyperAttention
from .config import ModelConfig
from .fused import fused_forward
from .layers import EquivariantLayerNorm, ExpNormalBasis, GatedFFN, IrrepsLinear, RadialMLP



class UnknownElementError(ValueError):
    """An atom's element is not one the model was trained on."""


class Block(nn.Module):
    """V2E attention -> token FFN -> E2V attention -> node FFN, pre-norm residual on two streams."""

    def __init__(self, cfg: ModelConfig, irreps_sh: o3.Irreps, last: bool):
        super().__init__()
        node = o3.Irreps(cfg.irreps_node)
        head = o3.Irreps(cfg.irreps_head)
        node_out = o3.Irreps(f"{cfg.head_dim}x0e") if last else node
        self.v2e = HyperAttention(node, node, irreps_sh, head, cfg.num_heads, cfg.attn_scalars, node,
                                  radial=(cfg.num_basis, cfg.radial_hidden))
        self.tok_norm = EquivariantLayerNorm(node)
        self.tok_ffn = GatedFFN(node, cfg.irreps_ffn, node)
        self.tok_out_norm = EquivariantLayerNorm(node)
        self.e2v = HyperAttention(node, None, node, head, cfg.num_heads, cfg.attn_scalars, node)
        self.node_norm = EquivariantLayerNorm(node)
        self.node_ffn = GatedFFN(node, cfg.irreps_ffn, node_out)
        self.node_shortcut = IrrepsLinear(node, node_out) if last else None
        self.node_out_norm = EquivariantLayerNorm(node_out)

    def forward(self, n_in, h_in, u, s, hg: Hypergraph, sh, basis, w_tok):
        s = s + self.v2e(h_in, n_in, hg.v2e_src, hg.v2e_dst, sh, basis)
        s = s + self.tok_ffn(self.tok_norm(s))
        h_in = self.tok_out_norm(s)
        u = u + self.e2v(n_in, None, None, hg.token_anchor, h_in, edge_weight=w_tok)
        ffn = self.node_ffn(self.node_norm(u))
        u = (self.node_shortcut(u) if self.node_shortcut is not None else u) + ffn
        return self.node_out_norm(u), h_in, u, s


class SE3SetModel(nn.Module):
    """Hypergraph in, per-atom energies (eV) out. See the module docstring."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32):
        super().__init__()
        # e3nn bakes Clebsch-Gordan and normalisation constants in the default dtype at
        # construction, so a float64 model must be *built* in float64, not converted afterwards.
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            self._build(config)
        finally:
            torch.set_default_dtype(previous)

    @property
    def dtype(self) -> torch.dtype:
        return self.atom_embed.weight.dtype

    def _build(self, config: ModelConfig) -> None:
        self.config = config
        node = o3.Irreps(config.irreps_node)
        if node != node.sort().irreps.simplify() or node[0].ir != o3.Irrep("0e"):
            raise ValueError(f"irreps_node must be sorted and start with scalars, got {node}")
        self.irreps_node = node
        self.n_scalar = node[0].mul
        irreps_sh = o3.Irreps.spherical_harmonics(config.lmax)
        self.sh = o3.SphericalHarmonics(irreps_sh, normalize=True, normalization="component")
        self.basis = ExpNormalBasis(config.num_basis, config.max_radius)

        elements = sorted(set(int(z) for z in config.elements))
        if not elements:
            raise ValueError("a model needs at least one element")
        table = torch.full((max(elements) + 1,), -1, dtype=torch.long)
        table[torch.tensor(elements)] = torch.arange(len(elements))
        self.register_buffer("z_to_index", table)
        self.register_buffer("element_energy", torch.zeros(len(elements), dtype=torch.float64))
        self.register_buffer("energy_scale", torch.ones((), dtype=torch.float64))
        self.register_buffer("avg_node_degree", torch.ones((), dtype=torch.float64))
        self.register_buffer("avg_hyperedge_degree", torch.ones((), dtype=torch.float64))

        ns = self.n_scalar
        self.atom_embed = nn.Embedding(len(elements), ns)
        self.token_embed = nn.Embedding(len(elements), ns)
        self.deg_radial = RadialMLP(config.num_basis, config.radial_hidden, ns * (config.lmax + 1))
        self.deg_lin = IrrepsLinear(o3.Irreps([(ns, ir) for _, ir in irreps_sh]), node)
        self.node_deg_lin = IrrepsLinear(node, node)
        self.tok_in_norm = EquivariantLayerNorm(node)
        self.node_in_norm = EquivariantLayerNorm(node)
        self.blocks = nn.ModuleList(
            Block(config, irreps_sh, last=(i == config.num_blocks - 1)) for i in range(config.num_blocks)
        )
        self.head = nn.Sequential(nn.Linear(config.head_dim, config.head_dim), nn.SiLU(), nn.Linear(config.head_dim, 1))
        # zero output layer: an untrained model predicts the reference energies exactly (and zero
        # forces), so training starts from the least-squares energy baseline
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    # ---------------------------------------------------------------- statistics
    @property
    def elements(self) -> list[int]:
        return (self.z_to_index >= 0).nonzero().flatten().tolist()

    def set_statistics(self, element_energy: dict[int, float], energy_scale: float,
                       avg_node_degree: float, avg_hyperedge_degree: float) -> None:
        """Per-element reference energies (eV), energy scale (eV), hypergraph degree averages."""
        for z, e in element_energy.items():
            self.element_energy[self.z_to_index[int(z)]] = float(e)
        self.energy_scale.fill_(float(energy_scale))
        self.avg_node_degree.fill_(float(avg_node_degree))
        self.avg_hyperedge_degree.fill_(float(avg_hyperedge_degree))

    def element_indices(self, numbers: torch.Tensor) -> torch.Tensor:
        known = numbers < self.z_to_index.shape[0]
        idx = torch.where(known, self.z_to_index[numbers.clamp(max=self.z_to_index.shape[0] - 1)], -1)
        # no check inside a CUDA-graph capture (no host sync there): the eager warm-up runs before
        # every capture checked the same numbers
        if not capturing(idx) and bool((idx < 0).any()):
            from ase.data import chemical_symbols

            bad = sorted({int(z) for z in numbers[idx < 0].tolist()})
            raise UnknownElementError(
                f"elements {[chemical_symbols[z] for z in bad]} are not in this model "
                f"(it knows {[chemical_symbols[z] for z in self.elements]})"
            )
        return idx

    # ---------------------------------------------------------------- forward
    def forward(self, hg: Hypergraph) -> torch.Tensor:
        """Per-atom energies (N,) in eV, float64 (the network itself runs in the model's dtype).

        Runs the fused per-irrep-type implementation (``fused.py``, same parameters, equal to
        ~1e-14 in float64); ``model.fused = False`` selects the plain e3nn path below.
        """
        if getattr(self, "fused", True):
            return fused_forward(self, hg)
        dtype = self.dtype
        z = self.element_indices(hg.numbers)
        pos = hg.positions
        anchor = hg.token_anchor[hg.v2e_dst]
        vec = pos[hg.v2e_src] - pos[anchor]
        length = torch.linalg.vector_norm(vec, dim=-1)
        sh = self.sh(vec)
        basis = self.basis(length)
        frag = self.config.fragment
        w_tok = None
        if has_switched_tokens(hg):
            w_tok = token_weights(hg, length, frag.implicit_rc, frag.switch_width)

        n_atoms, n_tok, dim = hg.num_atoms, hg.num_tokens, self.irreps_node.dim
        ns = self.n_scalar
        # token embedding: anchor element + "degree" term from the geometry of its members
        rad = self.deg_radial(basis).view(-1, self.config.lmax + 1, ns)
        parts, start = [], 0
        for l in range(self.config.lmax + 1):
            y = sh[:, start:start + 2 * l + 1]
            start += 2 * l + 1
            parts.append((rad[:, l, :, None] * y[:, None, :]).flatten(1))
        deg = torch.zeros((n_tok, start * ns), dtype=dtype, device=pos.device).index_add(
            0, hg.v2e_dst, torch.cat(parts, dim=1))
        s = self.deg_lin(deg) / torch.sqrt(self.avg_hyperedge_degree).to(dtype)
        s = torch.cat([s[:, :ns] + self.token_embed(z[hg.token_anchor]), s[:, ns:]], dim=1)
        h_in = self.tok_in_norm(s)

        # atom embedding: element + "degree" term from the tokens anchored on the atom
        tok = self.node_deg_lin(h_in)
        if w_tok is not None:
            tok = tok * w_tok.unsqueeze(1)
        u = torch.zeros((n_atoms, dim), dtype=dtype, device=pos.device).index_add(0, hg.token_anchor, tok)
        u = u / torch.sqrt(self.avg_node_degree).to(dtype)
        u = torch.cat([u[:, :ns] + self.atom_embed(z), u[:, ns:]], dim=1)
        n_in = self.node_in_norm(u)

        for block in self.blocks:
            n_in, h_in, u, s = block(n_in, h_in, u, s, hg, sh, basis, w_tok)
        out = self.head(n_in).squeeze(-1)
        # the reference energies are large (~ -10^4 eV per molecule): add them in float64 so a
        # float32 model still resolves sub-meV energy differences
        return (out * self.energy_scale.to(dtype)).double() + self.element_energy[z]


@contextmanager
def plain_path(model: SE3SetModel) -> Iterator[SE3SetModel]:
    """Within the block ``model(hg)`` runs the plain e3nn implementation (the reference the fused
    path is tested and benchmarked against); the model's previous choice is restored after."""
    previous = model.__dict__.get("fused")
    model.fused = False
    try:
        yield model
    finally:
        if previous is None:
            del model.fused
        else:
            model.fused = previous


def energy_and_forces(model: SE3SetModel, hg: Hypergraph, training: bool = False,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Total energies (G,) eV, forces (N, 3) eV/Å and per-atom energies (N,) eV.

    ``training=True`` keeps the graph of the force computation (for force losses).
    """
    pos = hg.positions.detach().requires_grad_(True)
    hg = hg.with_positions(pos)
    with torch.enable_grad():
        e_atom = model(hg)
        energy = torch.zeros(hg.num_graphs, dtype=e_atom.dtype, device=e_atom.device).index_add(0, hg.batch, e_atom)
        (grad,) = torch.autograd.grad(energy.sum(), pos, create_graph=training)
    return energy, -grad, e_atom


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
