"""Training through one compiled graph (se3set_ase.model.compiled_training): the energies, forces
and force-loss parameter gradients of the plain network, for batches of any size and token list."""
from __future__ import annotations

from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

import se3set_ase.model.compiled_training as ct
from se3set_ase.fragment import Fragmenter, FragmentSettings
from se3set_ase.hypergraph import collate
from se3set_ase.model import ModelConfig, SE3SetModel
from se3set_ase.model.compiled_training import CompiledTrainingForces
from se3set_ase.model.network import UnknownElementError
from se3set_ase.model.network import energy_and_forces, plain_path

DATA = Path(__file__).parent / "data"


# for the compiled tests: l <= 1 and one block, a graph that compiles in a fraction of the tiny
# preset's time (the traced-graph tests keep l = 2 and two blocks, checked to 1e-10)
L1_NET = dict(irreps_node="8x0e+4x1o", irreps_head="4x0e+2x1o", irreps_ffn="16x0e+4x1o", lmax=1, num_blocks=1)


def _model(seed: int = 0, **overrides) -> SE3SetModel:
    torch.manual_seed(seed)
    cfg = ModelConfig.preset("tiny", elements=[1, 6, 7, 8], fragment=FragmentSettings.preset("md22"), **overrides)
    model = SE3SetModel(cfg, torch.float64)
    torch.nn.init.normal_(model.head[-1].weight)
    with torch.no_grad():
        model.energy_scale.fill_(1.7)
        model.element_energy.normal_()
    return model


def _batch(names: list[str], seed: int = 0, scale: float = 0.05):
    """A batch of the molecules in tests/data, positions jittered (own token lists each)."""
    rng = np.random.default_rng(seed)
    fr = Fragmenter(FragmentSettings.preset("md22"))
    graphs = []
    for name in names:
        a = ase.io.read(DATA / name)
        a.positions += rng.normal(scale=scale, size=a.positions.shape)
        graphs.append(fr(a))
    return collate(graphs).to(dtype=torch.float64)


def _loss_and_grads(model, hg, fn):
    """A force-matching loss and its parameter gradients (None where the network has none)."""
    model.zero_grad(set_to_none=True)
    e, f, e_atom = fn(hg)
    target = torch.linspace(-1.0, 1.0, f.numel(), dtype=f.dtype).view_as(f)
    loss = (e - 0.3).pow(2).mean() + 100.0 * (f - target).pow(2).mean()
    loss.backward()
    grads = {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}
    return (e.detach(), f.detach(), e_atom.detach()), grads


def _plain(model):
    def fn(hg):
        with plain_path(model):
            return energy_and_forces(model, hg, training=True)
    return fn


def _assert_same(model, hg, fn, rtol: float) -> None:
    (e0, f0, a0), g0 = _loss_and_grads(model, hg, _plain(model))
    (e1, f1, a1), g1 = _loss_and_grads(model, hg, fn)
    torch.testing.assert_close(e1, e0, rtol=rtol, atol=0)
    torch.testing.assert_close(a1, a0, rtol=rtol, atol=rtol * float(a0.abs().max()))
    torch.testing.assert_close(f1, f0, rtol=0, atol=rtol * float(f0.abs().max()))
    # the parameters the fused network skips (zero gradients in the plain one) keep none, as eagerly
    _, g_fused = _loss_and_grads(model, hg, lambda g: energy_and_forces(model, g, training=True))
    assert {n for n, g in g1.items() if g is None} == {n for n, g in g_fused.items() if g is None}
    for n, g in g0.items():
        got = torch.zeros_like(g) if g1[n] is None else g1[n]
        torch.testing.assert_close(got, g, rtol=0, atol=rtol * float(g.abs().max()) + 1e-300, msg=n)


def test_traced_graph_has_the_force_loss_gradients_of_the_plain_network():
    """The traced forward + forces graph, differentiated again, gives the plain e3nn network's
    parameter gradients of a force loss in float64 (and the same energies and forces), for a batch
    of two molecules and then, from the same graph, for a batch of other sizes and token lists."""
    model = _model(num_blocks=2)
    traced = CompiledTrainingForces(model, compile=False)
    _assert_same(model, _batch(["dha.xyz", "ac_ala3_nhme.xyz"]), traced, rtol=1e-10)
    _assert_same(model, _batch(["ac_ala3_nhme.xyz", "aspirin.xyz", "aspirin.xyz"], seed=1), traced, rtol=1e-10)
    assert traced.compilations == 1
    assert 0 < len(traced.parameters_in_graph) < len(list(model.parameters()))  # unused ones stay out


def test_without_reattaching_saved_outputs_the_second_derivatives_are_wrong(monkeypatch):
    """Why the trace is edited: the detaches ``make_fx`` records for saved outputs cut the
    second-order paths, and the force loss's parameter gradients then come out wrong."""
    monkeypatch.setattr(ct, "_reattach_saved_outputs", lambda graph: 0)
    model = _model(num_blocks=1)
    hg = _batch(["ac_ala3_nhme.xyz"])
    _, g0 = _loss_and_grads(model, hg, _plain(model))
    (_, f1, _), g1 = _loss_and_grads(model, hg, CompiledTrainingForces(model, compile=False))
    worst = max(float((g1[n] - g).abs().max() / g.abs().max()) for n, g in g0.items() if g1[n] is not None)
    assert worst > 1e-3


def test_compiled_training_step_matches_the_plain_network():
    """Compiled (TorchInductor, CPU, two threads as in training): the plain network's energies,
    forces and force-loss gradients to rounding, for two batches of different sizes and token lists
    from one compilation."""
    model = _model(**L1_NET)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        compiled = CompiledTrainingForces(model)
        _assert_same(model, _batch(["dha.xyz", "aspirin.xyz"]), compiled, rtol=1e-9)
        graphs = counters["stats"]["unique_graphs"]
        _assert_same(model, _batch(["ac_ala3_nhme.xyz", "ac_ala3_nhme.xyz", "aspirin.xyz"], seed=2), compiled,
                     rtol=1e-9)
        assert counters["stats"]["unique_graphs"] == graphs  # other sizes: no recompilation
    finally:
        torch.set_num_threads(before)
    assert compiled.compilations == 1
    assert not torch.are_deterministic_algorithms_enabled()  # the setting was restored


def test_unknown_element_is_an_error_before_any_tracing():
    model = _model(num_blocks=1)
    fr = Fragmenter(FragmentSettings.preset("md22"))
    atoms = ase.io.read(DATA / "aspirin.xyz")
    atoms.numbers[0] = 16  # sulphur: not in the model
    traced = CompiledTrainingForces(model, compile=False)
    with pytest.raises(UnknownElementError, match="S"):
        traced(fr(atoms).to(dtype=torch.float64))
    assert traced.compilations == 0


def test_failed_compile_falls_back_to_the_eager_network_with_a_warning(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", broken)
    model = _model(num_blocks=1)
    hg = _batch(["aspirin.xyz"])
    fn = CompiledTrainingForces(model)
    with pytest.warns(RuntimeWarning, match="compiling the training step failed .*no C\\+\\+ compiler"):
        _assert_same(model, hg, fn, rtol=1e-10)
    assert fn.failed and fn.compilations == 0
    _assert_same(model, hg, fn, rtol=1e-10)  # no second attempt, no second warning
