"""Physics of the SE3Set network (issue 4): symmetries, forces = -dE/dR, continuity of the
implicit cross tokens, batching, precision, size of the published architecture, element checks.

Every test first randomises the zero-initialised output layer of the energy head (an untrained
model predicts only reference energies and zero forces, so a symmetry test on it could not fail)
and checks that the forces are not ~0.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import molecule
from ase.io import read
from e3nn import o3

from se3set_ase.fragment import Fragmenter, FragmentSettings
from se3set_ase.hypergraph import collate, from_tokens
from se3set_ase.model import ModelConfig, SE3SetModel, UnknownElementError, count_parameters, energy_and_forces

DATA = Path(__file__).parent / "data"

#: "paper" preset with elements [1, 6, 8]; the published SE3Set code has 6,288,033 parameters.
PAPER_PARAMS_HCO = 6_146_785
PUBLISHED_PARAMS_HCO = 6_288_033


def randomised(preset: str, seed: int, dtype=torch.float64, elements=(1, 6, 7, 8)) -> SE3SetModel:
    torch.manual_seed(seed)
    cfg = ModelConfig.preset("tiny", elements=list(elements), fragment=FragmentSettings.preset(preset))
    model = SE3SetModel(cfg, dtype)
    torch.nn.init.normal_(model.head[-1].weight, std=1.0)
    torch.nn.init.normal_(model.head[-1].bias, std=1.0)
    model.energy_scale.fill_(0.7)
    return model.eval()


@pytest.fixture(scope="module")
def m17():
    return randomised("md17", 0)


@pytest.fixture(scope="module")
def m22():
    return randomised("md22", 1)


@pytest.fixture(scope="module")
def aspirin():
    return read(DATA / "aspirin.xyz")


@pytest.fixture(scope="module")
def ala3():
    return read(DATA / "ac_ala3_nhme.xyz")


def efa(model, atoms):
    hg = Fragmenter(model.config.fragment)(atoms)
    e, f, a = energy_and_forces(model, hg)
    return hg, e.detach(), f.detach(), a.detach()


# ------------------------------------------------------------------ E(3) symmetry
@pytest.mark.parametrize("case", ["md17-aspirin", "md22-ala3"])
def test_rotation_translation(case, m17, m22, aspirin, ala3):
    model, atoms = (m17, aspirin) if case == "md17-aspirin" else (m22, ala3)
    hg, e, f, a = efa(model, atoms)
    assert float(f.abs().max()) > 1e-2
    if case == "md22-ala3":
        assert int(hg.token_switched.sum()) > 0  # implicit cross tokens are exercised
    torch.manual_seed(3)
    for _ in range(2):
        rot = o3.rand_matrix(dtype=torch.float64)
        shift = torch.randn(3, dtype=torch.float64) * 5.0
        moved = atoms.copy()
        moved.positions = (torch.as_tensor(atoms.positions) @ rot.T + shift).numpy()
        hg2, e2, f2, a2 = efa(model, moved)
        assert hg2.num_tokens == hg.num_tokens or case == "md22-ala3"
        assert abs(float(e2 - e)) <= 1e-10
        assert float((a2 - a).abs().max()) <= 1e-10
        assert float((f2 - f @ rot.T).abs().max()) <= 1e-10


def test_permutation(m17, aspirin):
    hg, e, f, a = efa(m17, aspirin)
    assert float(f.abs().max()) > 1e-2
    perm = np.random.default_rng(5).permutation(len(aspirin))
    assert not np.array_equal(perm, np.arange(len(aspirin)))
    permuted = aspirin[perm]
    hg2, e2, f2, a2 = efa(m17, permuted)
    assert hg2.num_tokens == hg.num_tokens
    assert abs(float(e2 - e)) <= 1e-10
    assert float((f2 - f[perm]).abs().max()) <= 1e-10
    assert float((a2 - a[perm]).abs().max()) <= 1e-10


# ------------------------------------------------------------------ forces = -dE/dR
def _energy(model, fragmenter, atoms, pos):
    probe = atoms.copy()
    probe.positions = pos
    with torch.no_grad():
        return float(model(fragmenter(probe)).sum())


@pytest.mark.parametrize("case", ["md17-aspirin", "md22-ala3"])
def test_forces_finite_differences(case, m17, m22, aspirin, ala3):
    """Central differences (h = 1e-5 Å) re-fragmenting at every displaced geometry, so in implicit
    mode the cross-token list is recomputed, as in MD."""
    model, atoms = (m17, aspirin) if case == "md17-aspirin" else (m22, ala3)
    fragmenter = Fragmenter(model.config.fragment)
    hg, e, f, _ = efa(model, atoms)
    fmax = float(f.abs().max())
    assert fmax > 1e-2
    h = 1e-5  # the truncation error of a random (stiff) model is ~1e-5 eV/Å at h = 1e-4
    flat = int(f.abs().argmax())
    comps = [divmod(flat, 3), (0, 0), (len(atoms) - 1, 2), (len(atoms) // 2, 1)]
    for i, c in comps:
        plus, minus = atoms.positions.copy(), atoms.positions.copy()
        plus[i, c] += h
        minus[i, c] -= h
        fd = -(_energy(model, fragmenter, atoms, plus) - _energy(model, fragmenter, atoms, minus)) / (2 * h)
        assert abs(fd - float(f[i, c])) <= 1e-6 * fmax, (i, c, fd, float(f[i, c]))


# ------------------------------------------------------------------ continuity (implicit tokens)
def _path_energies(model, atoms, mobile, direction, steps):
    fragmenter = Fragmenter(model.config.fragment)
    energies, counts = [], []
    for s in steps:
        probe = atoms.copy()
        probe.positions[mobile] += s * direction
        hg = fragmenter(probe)
        assert not fragmenter.last_topology_changed
        with torch.no_grad():
            energies.append(float(model(hg).sum()))
        counts.append(hg.num_tokens)
    return np.array(energies), np.array(counts)


def _dimer_path():
    """Ethanol + water; the water is moved rigidly away so that cross tokens between the two
    molecules' kernels pass r_c = 4 Å (minimum distance from ~2.8 Å to ~4.4 Å)."""
    eth = molecule("CH3CH2OH")
    wat = molecule("H2O")
    direction = np.array([1.0, 0.0, 0.0])
    wat.positions += eth.positions.max(0)[0] * direction - wat.positions.min(0)[0] * direction
    atoms = eth + wat
    mobile = np.arange(len(eth), len(atoms))

    def dmin(s):
        r = atoms.positions.copy()
        r[mobile] += s * direction
        return np.linalg.norm(r[: len(eth), None] - r[None, mobile], axis=-1).min()

    lo = min(np.linspace(-1, 4, 2001), key=lambda s: abs(dmin(s) - 2.8))
    hi = min(np.linspace(-1, 4, 2001), key=lambda s: abs(dmin(s) - 4.4))
    return atoms, mobile, direction, np.linspace(lo, hi, 121)


def _step_ratios(energies):
    """|dE| of each step over the larger |dE| of its two neighbouring steps. On a finely sampled
    smooth curve consecutive steps are nearly equal (ratio ~1); a jump J makes its step stand out."""
    de = np.abs(np.diff(energies))
    neighbours = np.maximum(np.r_[de[1], de[:-1]], np.r_[de[1:], de[-2]])
    return de, de / np.maximum(neighbours, 1e-12)


def test_energy_continuous_where_cross_tokens_appear(m22, monkeypatch):
    atoms, mobile, direction, steps = _dimer_path()
    energies, counts = _path_energies(m22, atoms, mobile, direction, steps)
    changes = np.nonzero(np.diff(counts))[0]
    assert len(changes) >= 2, "the token list must change along the path"
    assert np.ptp(energies) > 1e-2  # the water interacts with the ethanol along the path
    de, ratio = _step_ratios(energies)
    assert ratio.max() <= 3.0
    assert ratio[changes].max() <= 3.0
    assert de[changes].max() <= 3.0 * np.median(de)

    # the same check fails without the smooth token weights: the test can detect a jump
    from se3set_ase.model import fused, network

    for module in (network, fused):  # both the plain and the fused forward use token_weights
        monkeypatch.setattr(module, "token_weights",
                            lambda hg, length, r_c, width: torch.ones(hg.num_tokens, dtype=length.dtype))
    hard, _ = _path_energies(m22, atoms, mobile, direction, steps)
    _, ratio_hard = _step_ratios(hard)
    assert ratio_hard[changes].min() > 3.0  # every hard appearance is a jump (ratios ~200-900)


# ------------------------------------------------------------------ batching and precision
def test_batched_equals_one_by_one(m22, aspirin, ala3):
    mols = [aspirin, read(DATA / "dha.xyz"), ala3]
    graphs = [Fragmenter(m22.config.fragment)(a) for a in mols]
    assert all(int(g.token_switched.sum()) > 0 for g in graphs)
    e_b, f_b, a_b = (t.detach() for t in energy_and_forces(m22, collate(graphs)))
    assert e_b.shape == (3,)
    start = 0
    for k, g in enumerate(graphs):
        e, f, a = (t.detach() for t in energy_and_forces(m22, g))
        n = g.num_atoms
        assert float(f.abs().max()) > 1e-2
        assert abs(float(e_b[k] - e[0])) <= 1e-10
        assert float((f_b[start:start + n] - f).abs().max()) <= 1e-10
        assert float((a_b[start:start + n] - a).abs().max()) <= 1e-10
        start += n
    assert start == f_b.shape[0]


def test_float32_matches_float64(m22, ala3):
    m32 = SE3SetModel(m22.config, torch.float32)
    m32.load_state_dict(m22.state_dict())
    m32.eval()
    assert m32.head[-1].weight.dtype == torch.float32
    hg = Fragmenter(m22.config.fragment)(ala3)
    e64, f64, _ = (t.detach() for t in energy_and_forces(m22, hg))
    e32, f32, _ = (t.detach() for t in energy_and_forces(m32, hg.to(dtype=torch.float32)))
    # the network runs in float32; energies are summed with the reference energies in float64
    assert e32.dtype == torch.float64 and f32.dtype == torch.float32
    assert float(f64.abs().max()) > 1e-2
    assert abs(float(e32.double() - e64)) <= 1e-4 * abs(float(e64))
    assert float((f32.double() - f64).abs().max()) <= 1e-4 * float(f64.abs().max())


# ------------------------------------------------------------------ architecture size
def test_parameter_count_paper_preset():
    cfg = ModelConfig.preset("paper", elements=[1, 6, 8])
    n = count_parameters(SE3SetModel(cfg))
    assert n == PAPER_PARAMS_HCO
    assert abs(n - PUBLISHED_PARAMS_HCO) <= 0.05 * PUBLISHED_PARAMS_HCO
    # one more element adds one row to the atom and the token embeddings (128 scalars each)
    assert count_parameters(SE3SetModel(ModelConfig.preset("paper", elements=[1, 6, 7, 8]))) == n + 256


# ------------------------------------------------------------------ elements
def test_unknown_element_named():
    model = randomised("md17", 2, elements=(1, 6, 8))
    hg = from_tokens(np.array([6, 7, 1]), np.array([[0, 0, 0], [1.4, 0, 0], [-1.0, 0, 0]]), [[0, 1, 2]])
    with pytest.raises(UnknownElementError, match=r"'N'") as info:
        model(hg)
    assert "'C'" in str(info.value) and "'O'" in str(info.value)  # says what the model knows
    # an element heavier than every known one (beyond the lookup table)
    hg = from_tokens(np.array([6, 16, 1]), np.array([[0, 0, 0], [1.8, 0, 0], [-1.0, 0, 0]]), [[0, 1, 2]])
    with pytest.raises(UnknownElementError, match=r"'S'"):
        energy_and_forces(model, hg)
    assert isinstance(UnknownElementError("x"), ValueError)


def test_reference_energies_only_when_untrained():
    """The zero-initialised head predicts exactly the per-element reference energies."""
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", elements=[1, 6, 8], fragment=FragmentSettings.preset("md17"))
    model = SE3SetModel(cfg, torch.float64).eval()
    model.set_statistics({1: -13.6, 6: -1029.8, 8: -2042.6}, 1.0, 2.0, 5.0)
    atoms = molecule("CH3CH2OH")
    e, f, a = energy_and_forces(model, Fragmenter(cfg.fragment)(atoms))
    assert float(e.detach()) == pytest.approx(2 * -1029.8 + 6 * -13.6 - 2042.6, abs=1e-9)
    assert float(f.abs().max()) == 0.0
