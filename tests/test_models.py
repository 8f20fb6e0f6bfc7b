"""Every shipped model (``models/*.pt``) against its card (``models/NAME.json``, written by
``models/make_card.py``): it loads by name from anywhere, its metadata is what the card says, it
reproduces the card's per-frame test errors on its own test frames, and its forces are the
gradient of its energy. Also: the MD22 guidance for names that cannot be shipped, and that
``models/README.md`` is what the script generates from the cards.

The test frames come from the data file recorded in the card (``/work/shared/data/...``, or a path
relative to the repository for data committed with the model); where that
file is absent (a clone without the shared data) those checks are skipped with the reason.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from se3set_ase import SE3SetCalculator
from se3set_ase.registry import ModelNotFoundError

SCRIPT = Path(__file__).resolve().parent.parent / "models" / "make_card.py"
# SE3SET_CARD_DIR: check the models and cards of another folder (to try the checks without touching models/)
MODELS = Path(os.environ.get("SE3SET_CARD_DIR") or SCRIPT.parent)
PTS = sorted(MODELS.glob("*.pt"))
NO_MODELS = ("no models/*.pt is shipped yet, so there is no model to check against a card (ship one with "
             "`se3set-ase fit ... -o models/NAME.pt` and `python models/make_card.py NAME --data PATH`)")
MODEL_PARAMS = [pytest.param(p, id=p.stem) for p in PTS] or [
    pytest.param(None, id="no-models", marks=pytest.mark.skip(reason=NO_MODELS))]
N_FRAMES = 5


def _make_card():
    spec = importlib.util.spec_from_file_location("make_card", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _card(model_path: Path) -> dict:
    path = model_path.with_suffix(".json")
    if not path.is_file():
        pytest.fail(f"{model_path.name} has no card {path.name}: run "
                    f"`python models/make_card.py {model_path.stem} --data <its training data>`")
    return json.loads(path.read_text())


def _card_md(model_path: Path) -> str:
    return model_path.with_suffix(".md").read_text()


def _atoms(numbers, positions):
    from ase import Atoms

    return Atoms(numbers=list(numbers), positions=np.asarray(positions, dtype=np.float64))


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """Another working directory, and only the source tree's models/ (plus an empty user folder)."""
    monkeypatch.chdir(tmp_path)
    if MODELS != SCRIPT.parent:
        monkeypatch.setenv("SE3SET_MODELS", str(MODELS))
    else:
        monkeypatch.delenv("SE3SET_MODELS", raising=False)
    return tmp_path


def test_md22_guidance(elsewhere):
    with pytest.raises(ModelNotFoundError) as info:
        SE3SetCalculator("md22_dha.pt", device="cpu")
    msg = str(info.value)
    assert "se3set-ase fit md22:" in msg
    assert "gfn2_" in msg


def test_readme_is_generated():
    cards = sorted(MODELS.glob("*.json"))
    readme = MODELS / "README.md"
    if not cards and not readme.exists():
        pytest.skip("no model cards and no models/README.md yet")
    mc = _make_card()
    assert readme.is_file(), "models/README.md missing: run `python models/make_card.py --readme-only`"
    assert readme.read_text() == mc.render_readme(mc.load_cards(MODELS)), \
        "models/README.md is stale: run `python models/make_card.py --readme-only`"
    for c in cards:
        assert (MODELS / (c.stem + ".pt")).is_file(), f"card {c.name} has no model file {c.stem}.pt"
        assert (MODELS / (c.stem + ".md")).is_file(), f"card {c.name} has no {c.stem}.md"


@pytest.mark.parametrize("model_path", MODEL_PARAMS)
def test_loads_by_name_from_elsewhere(model_path, elsewhere):
    for name in (model_path.name, model_path.stem):
        calc = SE3SetCalculator(name, device="cpu", dtype=torch.float64)
        assert calc.model_path.resolve() == model_path.resolve()


@pytest.mark.parametrize("model_path", MODEL_PARAMS)
def test_metadata_matches_card(model_path):
    from se3set_ase.model import count_parameters, load_model

    card = _card(model_path)
    model, meta = load_model(model_path)
    mc = _make_card()
    assert card["model"]["sha256"] == mc.sha256(model_path), "the card was made for another version of this file"
    assert card["model"]["element_numbers"] == [int(z) for z in meta["elements"]] == model.elements
    tr = meta["training"]
    assert card["training"]["parameters"] == tr["parameters"] == count_parameters(model)
    assert card["training"]["preset"] == tr["preset"]
    assert card["training"]["steps"] == tr["steps"]
    assert card["training"]["stopped"] == tr.get("stopped"), "how training ended (done / --max-time) differs"
    if tr.get("stopped") == "max_time":  # the card says how to repeat a time-budget stop elsewhere
        assert f"--max-steps {tr['steps']}" in _card_md(model_path)
    assert card["training"]["frames"] == tr["frames"]
    assert [card["split"][k] for k in ("train", "valid", "test")] == [tr["frames"][k] for k in ("train", "valid", "test")]
    assert card["split"]["seed"] == tr["seed"]
    assert card["training"]["metrics_in_metadata"] == meta["metrics"]
    test_meta = meta["metrics"].get("test")
    if test_meta:
        test_card = card["errors"]["test"]
        assert test_card["n_frames"] == test_meta["n_frames"] == tr["frames"]["test"]
        # the card's float64 figures vs the training-time ones (training dtype): same frames, same model
        for key in ("forces_mae_meV_A", "forces_rmse_meV_A", "energy_mae_meV"):
            assert test_card[key] == pytest.approx(test_meta[key], rel=1e-2, abs=0.05), key
        assert card["split"]["check"]["reproduced"]


@pytest.mark.parametrize("model_path", MODEL_PARAMS)
def test_forces_on_own_test_frames(model_path):
    from se3set_ase.data import read_frames, split_indices

    card = _card(model_path)
    data = Path(card["data"]["path"])
    if not data.is_absolute():  # data committed in the repository (models/data/...)
        data = SCRIPT.parent.parent / data
    if not data.is_file():
        pytest.skip(f"the training data {data} recorded in {model_path.stem}.json is not on this machine "
                    "(a clone without /work/shared/data): the per-frame check needs it")
    frames = read_frames(data)
    assert len(frames) == card["split"]["n"], f"{data} changed since the card was made"
    s = card["split"]
    split = split_indices(s["n"], train=s["train"], valid=s["valid"], test=s["test"], seed=s["seed"],
                          block=s.get("block", 1))
    pf = card["per_frame"]["test"]
    assert split["test"].tolist() == pf["frame_index"]
    pick = np.unique(np.linspace(0, len(pf["frame_index"]) - 1, N_FRAMES).round().astype(int))
    calc = SE3SetCalculator(model_path, device="cpu", dtype=torch.float64)
    maes = []
    for k in pick:
        fr = frames[pf["frame_index"][k]]
        atoms = _atoms(fr.numbers, fr.positions)
        atoms.calc = calc
        maes.append(1000 * float(np.abs(atoms.get_forces() - fr.forces).mean()))
    # deterministic float64: the very per-frame values the card stored
    np.testing.assert_allclose(maes, [pf["forces_mae_meV_A"][k] for k in pick], rtol=1e-6, atol=1e-6)
    # and, statistically, consistent with the card's test MAE
    card_mae = card["errors"]["test"]["forces_mae_meV_A"]
    assert card_mae / 2.5 <= float(np.mean(maes)) <= 2.5 * card_mae


@pytest.mark.parametrize("model_path", MODEL_PARAMS)
def test_finite_differences(model_path):
    card = _card(model_path)
    st = card["start_structure"]
    atoms = _atoms(st["numbers"], st["positions_A"])
    atoms.calc = SE3SetCalculator(model_path, device="cpu", dtype=torch.float64)
    f = atoms.get_forces().copy()
    p0 = atoms.positions.copy()
    h = 1e-4
    comps = [int(np.argmax(np.abs(f))), 1, 3 * len(atoms) - 1]
    for c in comps:
        i, a = divmod(c, 3)
        e = []
        for sign in (1, -1):
            p = p0.copy()
            p[i, a] += sign * h
            atoms.positions = p
            e.append(atoms.get_potential_energy())
        fd = -(e[0] - e[1]) / (2 * h)
        assert fd == pytest.approx(f[i, a], abs=1e-5, rel=1e-4), (i, "xyz"[a])


@pytest.mark.parametrize("model_path", MODEL_PARAMS)
def test_atom_order(model_path):
    """The card's atom-order figure is what the code measures: the start structure in a seeded
    random atom order against its own order (fresh float64 calculators). Where the card says
    invariant, energy and forces agree to rounding and the hyperedges are the same."""
    card = _card(model_path)
    if "atom_order" not in card:
        pytest.fail(f"{model_path.stem}'s card has no atom-order check: run "
                    f"`python models/make_card.py {model_path.stem} --add-atom-order`")
    mc = _make_card()
    now = mc.atom_order_check(model_path, mc.card_start_frame(card), card["atom_order"]["seed"])
    stated = card["atom_order"]
    assert now["same_hyperedges"] == stated["same_hyperedges"]
    assert mc.order_invariant(now) == mc.order_invariant(stated)
    if mc.order_invariant(stated):
        assert now["abs_dE_meV"] < mc.ORDER_INVARIANT_MEV and now["max_abs_dF_meV_A"] < mc.ORDER_INVARIANT_MEV
    else:  # a real difference (a cut ring system): the card states its size
        assert now["abs_dE_meV"] == pytest.approx(stated["abs_dE_meV"], rel=1e-6)
        assert now["max_abs_dF_meV_A"] == pytest.approx(stated["max_abs_dF_meV_A"], rel=1e-6)
