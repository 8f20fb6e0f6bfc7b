"""The fused forward (se3set_ase.model.fused) computes the same function as SE3SetModel.forward."""
from __future__ import annotations

from pathlib import Path

import ase.io
import pytest
import torch
from e3nn import o3

from se3set_ase.fragment import Fragmenter, FragmentSettings
from se3set_ase.hypergraph import collate
from se3set_ase.model import ModelConfig, SE3SetModel
from se3set_ase.model.fused import fused_energy_and_forces, fused_forward, from_blocks, to_blocks
from se3set_ase.model.network import energy_and_forces as _energy_and_forces, plain_path

DATA = Path(__file__).parent / "data"


def energy_and_forces(model, hg, training=False):
    with plain_path(model):
        return _energy_and_forces(model, hg, training=training)


def plain_forward(model, hg):
    return energy_and_forces(model, hg)[2]


CASES = [("md17", "aspirin.xyz"), ("md22", "ac_ala3_nhme.xyz")]


def _setup(preset: str, frag: str, xyz: str, dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)
    cfg = ModelConfig.preset(preset, fragment=FragmentSettings.preset(frag))
    model = SE3SetModel(cfg, dtype)
    torch.nn.init.normal_(model.head[-1].weight)  # the head's output layer starts at zero
    with torch.no_grad():  # non-trivial statistics, so that every buffer is exercised
        model.energy_scale.fill_(1.7)
        model.avg_node_degree.fill_(2.3)
        model.avg_hyperedge_degree.fill_(5.1)
        model.element_energy.normal_()
    atoms = ase.io.read(DATA / xyz)
    hg = Fragmenter(cfg.fragment)(atoms).to(dtype=dtype)
    return model, hg


def test_layout_roundtrip():
    irreps = o3.Irreps("3x0e+2x1o+1x2e")
    x = torch.randn(4, irreps.dim)
    assert torch.equal(from_blocks(to_blocks(x, irreps), irreps), x)


def test_plain_path_really_runs_plain(monkeypatch):
    """The reference side of every comparison here must not dispatch to the fused code."""
    import se3set_ase.model.network as net

    model, hg = _setup("tiny", "md17", "aspirin.xyz", torch.float64)
    calls = []
    monkeypatch.setattr(net, "fused_forward", lambda m, g: calls.append(1) or fused_forward(m, g))
    model(hg)
    assert calls == [1]  # the default is fused
    plain_forward(model, hg)
    assert calls == [1] and "fused" not in model.__dict__  # plain, and the default is restored


@pytest.fixture(params=[False, True], ids=["matmul-products", "unrolled-products"])
def unroll(request):
    """fused.unrolled_products: the eager layout (CG products as batched matmuls) and the compiled
    CPU path's (element-wise sums over the non-zero Clebsch-Gordan entries)."""
    from se3set_ase.model.fused import unrolled_products

    with unrolled_products(request.param):
        yield request.param


@pytest.mark.parametrize("preset", ["tiny", "small"])
@pytest.mark.parametrize("frag,xyz", CASES)
def test_fused_equals_plain_float64(preset, frag, xyz, unroll):
    model, hg = _setup(preset, frag, xyz, torch.float64)
    if frag == "md22":
        assert bool(hg.token_switched.any()), "implicit case must exercise switched tokens"
    e0 = plain_forward(model, hg)
    e1 = fused_forward(model, hg)
    assert e0.abs().max() > 0
    torch.testing.assert_close(e1, e0, rtol=0, atol=1e-10)
    E0, F0, _ = energy_and_forces(model, hg)
    E1, F1, _ = fused_energy_and_forces(model, hg)
    assert F0.abs().max() > 1e-3
    torch.testing.assert_close(E1, E0, rtol=0, atol=1e-10)
    torch.testing.assert_close(F1, F0, rtol=0, atol=1e-10)


@pytest.mark.parametrize("frag,xyz", CASES)
def test_frozen_weight_cache_follows_the_parameters(frag, xyz, group):
    """With frozen parameters (as in the calculator) the fused path caches its scaled weights; the
    cached result equals the plain path on repeated calls and after the weights change in place
    (e.g. load_state_dict or an EMA swap), and nothing is cached while they need gradients."""
    from se3set_ase.model.fused import _cache

    model, hg = _setup("small", frag, xyz, torch.float64)
    for p in model.parameters():
        p.requires_grad_(False)
    for _ in range(2):
        torch.testing.assert_close(fused_energy_and_forces(model, hg)[1], energy_and_forces(model, hg)[1],
                                   rtol=0, atol=1e-10)
    frozen = next(v for k, v in _cache(model).items() if isinstance(k, tuple) and k[0] == "frozen")
    assert len(frozen) > 0
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.05)
    torch.testing.assert_close(fused_energy_and_forces(model, hg)[1], energy_and_forces(model, hg)[1],
                               rtol=0, atol=1e-10)
    frozen.clear()
    for p in model.parameters():
        p.requires_grad_(True)
    fused_energy_and_forces(model, hg)
    assert len(frozen) == 0


@pytest.mark.parametrize("preset", ["tiny", "small"])
@pytest.mark.parametrize("frag,xyz", CASES)
def test_fused_equals_plain_float32(preset, frag, xyz):
    model, hg = _setup(preset, frag, xyz, torch.float32)
    E0, F0, e0 = energy_and_forces(model, hg)
    E1, F1, e1 = fused_energy_and_forces(model, hg)
    assert (E1 - E0).abs().max() <= 1e-5 * E0.abs().max()
    assert (e1 - e0).abs().max() <= 1e-5 * e0.abs().max()
    assert (F1 - F0).abs().max() <= 1e-5 * F0.abs().max()


@pytest.mark.parametrize("frag,xyz", CASES)
def test_fused_rotation_equivariance(frag, xyz):
    model, hg = _setup("tiny", frag, xyz, torch.float64)
    rot = o3.rand_matrix(dtype=torch.float64)
    E0, F0, _ = fused_energy_and_forces(model, hg)
    E1, F1, _ = fused_energy_and_forces(model, hg.with_positions(hg.positions @ rot.T))
    torch.testing.assert_close(E1, E0, rtol=0, atol=1e-10)
    torch.testing.assert_close(F1, F0 @ rot.T, rtol=0, atol=1e-10)


def _force_loss_grads(model, hg, fn):
    model.zero_grad(set_to_none=True)
    E, F, _ = fn(model, hg, training=True)
    target = torch.linspace(-1.0, 1.0, F.numel(), dtype=F.dtype).view_as(F)
    loss = (E - 0.3).pow(2).mean() + 100.0 * (F - target).pow(2).mean()
    loss.backward()
    return loss.detach(), {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}


@pytest.fixture(params=[None, True], ids=["cpu-layout", "grouped"])
def group(request, monkeypatch):
    """fused.GROUP_SHARED_PRODUCTS: the CPU's choice (per-path matmuls), and the GPU's (grouped)."""
    import se3set_ase.model.fused as fused

    monkeypatch.setattr(fused, "GROUP_SHARED_PRODUCTS", request.param)
    return request.param


@pytest.mark.parametrize("preset", ["tiny", "small"])
@pytest.mark.parametrize("frag,xyz", CASES)
def test_fused_training_gradients(preset, frag, xyz, group, unroll):
    """Double backward: parameter gradients of a force loss agree (batch of two molecules)."""
    model, hg = _setup(preset, frag, xyz, torch.float64)
    hg2 = hg.with_positions(hg.positions + 0.02 * torch.randn_like(hg.positions))
    batch = collate([hg, hg2])
    l0, g0 = _force_loss_grads(model, batch, energy_and_forces)
    l1, g1 = _force_loss_grads(model, batch, fused_energy_and_forces)
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=1e-12)
    assert g0.keys() == g1.keys()
    nonzero = 0
    for name in g0:
        a, b = g0[name], g1[name]
        if a is None or b is None:
            # a parameter that does not enter the loss in one path must not enter it in the other
            assert (a is None or not a.any()) and (b is None or not b.any()), name
            continue
        scale = max(a.abs().max().item(), 1.0)
        assert (a - b).abs().max().item() <= 1e-10 * scale, name
        nonzero += int(a.abs().max().item() > 0)
    assert nonzero > len(g0) // 2


@pytest.mark.parametrize("l1,l2,l3", [(l1, l2, l3) for l1 in range(3) for l2 in range(3)
                                      for l3 in range(abs(l1 - l2), min(l1 + l2, 2) + 1)])
def test_unrolled_cg_products_equal_the_dense_contraction(l1, l2, l3):
    """The element-wise forms of one Clebsch-Gordan path (diagonal constant, sparse sum, per-edge
    S contraction) equal the dense contraction sum_ij C_ijk x_i y_j, and the diagonal form is
    found exactly for the l = 0 paths."""
    from se3set_ase.model.fused import _Ctx, _cg_diagonal, _cg_terms, _contract_unrolled, _pair_unrolled

    model = torch.nn.Linear(1, 1)
    ctx = _Ctx(model, torch.float64, torch.device("cpu"))
    pw = 0.7
    g = torch.Generator().manual_seed(l1 * 9 + l2 * 3 + l3)
    x = torch.randn(6, 2 * l1 + 1, 4, dtype=torch.float64, generator=g)
    y = torch.randn(6, 2 * l2 + 1, 4, dtype=torch.float64, generator=g)
    c = pw * o3.wigner_3j(l1, l2, l3, dtype=torch.float64)
    dense = torch.einsum("ijk,ziu,zju->zku", c, x, y)
    diag = _cg_diagonal(ctx, l1, l2, l3, pw)
    assert (diag is not None) == (l1 == 0 or l2 == 0)
    if diag is not None:
        torch.testing.assert_close(diag * x * y, dense, rtol=0, atol=1e-14)
        assert diag.shape == (2 * l3 + 1, 1)
    torch.testing.assert_close(_pair_unrolled(_cg_terms(ctx, l1, l2, l3, pw), x, y), dense, rtol=0, atol=1e-14)
    # V2E form: one attribute vector per edge, S = Y . C contracted with x
    yv = y[:, :, 0]
    s = torch.einsum("ijk,zj->zik", c, yv)
    torch.testing.assert_close(_contract_unrolled(s, x), torch.einsum("zik,ziu->zku", s, x), rtol=0, atol=1e-14)


def test_bf16_products_move_the_numbers_by_their_rounding_only():
    """``fused.matmul_dtype(torch.bfloat16)``: the linear maps multiply in bfloat16 and the rest of
    the network in float32. Energies and forces move (the option is live) by about bfloat16's
    rounding (8 significant bits), no more, and come back in float32; the network's own dtype as
    matmul dtype is the default path to the bit, and leaving the block restores it."""
    from se3set_ase.model.fused import matmul_dtype

    model, hg = _setup("small", "md17", "aspirin.xyz", torch.float32)
    E0, F0, _ = fused_energy_and_forces(model, hg)
    with matmul_dtype(torch.bfloat16):
        E1, F1, _ = fused_energy_and_forces(model, hg)
    with matmul_dtype(torch.float32):
        E2, F2, _ = fused_energy_and_forces(model, hg)
    E3, F3, _ = fused_energy_and_forces(model, hg)
    assert F1.dtype == torch.float32 and E1.dtype == E0.dtype
    rel = float((F1 - F0).abs().max() / F0.abs().max())
    assert 2.0 ** -12 < rel < 2.0 ** -4, rel
    assert float((E1 - E0).detach().abs().max()) < 2.0 ** -6 * float(E0.detach().abs().max())
    assert torch.equal(F2, F0) and torch.equal(E2, E0)
    assert torch.equal(F3, F0) and torch.equal(E3, E0)
