"""`models/make_card.py` on a small trained model: a card measured in several runs (stopped by
SIGTERM in the Langevin run and again in the NVE run, continued with the same command) has the
figures of an unbroken run, and a saved state made with other arguments is refused."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
from pathlib import Path

import pytest
from ase.io import write

from se3set_ase import SE3SetCalculator
from se3set_ase.training import TrainConfig, fit
from test_training import SMALL_NET, harmonic_frames

SCRIPT = Path(__file__).resolve().parent.parent / "models" / "make_card.py"


def _make_card():
    spec = importlib.util.spec_from_file_location("make_card_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("card")
    data = root / "springs.extxyz"
    write(data, harmonic_frames(30, seed=5))
    fit(TrainConfig(data=str(data), out_dir=str(root / "run"), preset="tiny", model_overrides=dict(SMALL_NET),
                    train_size=20, valid_size=5, test_size=5, batch_size=5, epochs=1, lr=5e-3, warmup_steps=2,
                    progress=False, seed=1, device="cpu"))
    return root / "run" / "model.pt", data


def _args(model, data, out, *extra):
    return [str(model), "--data", str(data), "--out-dir", str(out), "--temperature", "300", "--langevin-ps", "0.01",
            "--nve-ps", "0.01", "--timing-calls", "1", *extra]


def _comparable(card: dict) -> dict:
    """The card without what may differ between runs: timings, dates, the output folder."""
    c = json.loads(json.dumps(card))
    for key in card["machine_dependent"]:
        *path, last = key.split(".")
        d = c
        for k in path:
            d = d[k]
        d.pop(last, None)
    for k in ("command", "runs", "generated_utc"):
        c["card"].pop(k, None)
    return c


def test_card_resumed_twice_equals_unbroken_run(trained, tmp_path, monkeypatch):
    model, data = trained
    mc = _make_card()
    assert mc.main(_args(model, data, tmp_path / "a")) == 0
    unbroken = json.loads((tmp_path / "a" / "model.json").read_text())
    assert unbroken["langevin"]["steps_done"] == 20 and unbroken["nve"]["steps"] == 20
    assert "runs" not in unbroken["card"]
    frag = unbroken["fragmentation"]
    assert frag["settings"]["max_ring_system_atoms"] is None and frag["start_frame_hyperedges"] >= 1
    assert sum(frag["start_frame_kernel_sizes"]) == unbroken["data"]["n_atoms"]
    assert "- fragmentation: " in (tmp_path / "a" / "model.md").read_text()
    assert not (tmp_path / "a" / "model.card-progress").exists()

    real = SE3SetCalculator.calculate
    calls = {"n": 0, "at": None}

    def calculate(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == calls["at"]:
            os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's pre-emption, mid-step
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SE3SetCalculator, "calculate", calculate)
    state_file = tmp_path / "b" / "model.card-progress"
    before = signal.getsignal(signal.SIGTERM)
    calls.update(n=0, at=8)  # the Langevin run's 7th step
    assert mc.main(_args(model, data, tmp_path / "b")) == 3
    assert signal.getsignal(signal.SIGTERM) is before
    state = json.loads(state_file.read_text())
    assert list(state["phases"]) == ["errors"] and state["inflight"]["langevin"]["step"] == 7
    calls.update(n=0, at=22)  # past the rest of the Langevin run: in the NVE run
    assert mc.main(_args(model, data, tmp_path / "b")) == 3
    state = json.loads(state_file.read_text())
    assert list(state["phases"]) == ["errors", "langevin"] and 0 < state["inflight"]["nve"]["step"] < 20
    calls.update(n=0, at=None)
    assert mc.main(_args(model, data, tmp_path / "b")) == 0
    resumed = json.loads((tmp_path / "b" / "model.json").read_text())
    assert not state_file.exists()
    assert len(resumed["card"]["runs"]) == 3
    assert _comparable(resumed) == _comparable(unbroken)
    assert "Measured in 3 runs" in (tmp_path / "b" / "model.md").read_text()


def test_card_state_of_another_run_is_refused(trained, tmp_path, monkeypatch):
    model, data = trained
    mc = _make_card()
    assert mc.main(_args(model, data, tmp_path, "--max-time", "0")) == 3  # stops after the first phase
    state = json.loads((tmp_path / "model.card-progress").read_text())
    assert list(state["phases"]) == ["errors"]
    with pytest.raises(SystemExit, match=r"made for another run \(differs in: seed\)"):
        mc.main(_args(model, data, tmp_path, "--seed", "4"))


def test_resumed_md_rebuilds_the_skin_list_where_the_unbroken_run_had_it():
    """With a Verlet skin (``--compile`` gives the calculator one) the snapshot records where the
    cross-token list was built and the resumed calculator rebuilds it there, so the continued run's
    forces equal the unbroken run's to the last bit (MD amplifies any rounding difference)."""
    import ase.io
    import numpy as np

    from test_calculator import randomised

    mc = _make_card()
    model = randomised(preset="md22")
    from types import SimpleNamespace

    dha = ase.io.read(Path(__file__).parent / "data" / "dha.xyz")
    frame = SimpleNamespace(numbers=dha.numbers, positions=dha.positions, charge=0)  # a data-file frame
    moved = dha.copy()
    moved.rotate(20, "z", center="COM")  # outer atoms move more than skin/2: the list is rebuilt
    later = moved.positions + np.random.default_rng(0).normal(scale=0.02, size=moved.positions.shape)

    atoms = dha.copy()
    unbroken = SE3SetCalculator(model, device="cpu", skin=1.0)
    mc._start_or_restore(atoms, unbroken, frame, None, 300.0, 0)
    atoms.get_forces()
    atoms.positions = moved.positions
    atoms.get_forces()
    snap = json.loads(json.dumps(mc._md_state(atoms, unbroken)))  # through JSON, as saved
    assert np.array_equal(snap["verlet_reference"], moved.positions)
    atoms.positions = later
    expected = atoms.get_forces()

    resumed_atoms = dha.copy()
    mc._start_or_restore(resumed_atoms, SE3SetCalculator(model, device="cpu", skin=1.0), frame, snap, 300.0, 0)
    assert np.array_equal(resumed_atoms.positions, moved.positions)
    resumed_atoms.positions = later
    assert np.array_equal(resumed_atoms.get_forces(), expected)


def test_card_of_a_pre_empted_training_is_refused(trained, tmp_path):
    """A model written by a fit stopped by SIGTERM was never evaluated: no card is made of it."""
    import torch

    from se3set_ase.model.checkpoint import atomic_torch_save, read_model_file

    model, data = trained
    payload = read_model_file(model)
    payload["metadata"]["training"]["stopped"] = "SIGTERM"
    payload["metadata"]["metrics"] = {}
    stopped = tmp_path / "stopped.pt"
    atomic_torch_save(payload, stopped)
    assert torch.load(stopped, weights_only=True)["metadata"]["training"]["stopped"] == "SIGTERM"
    with pytest.raises(SystemExit, match=r"pre-empted \(SIGTERM\).*--resume"):
        _make_card().main(_args(stopped, data, tmp_path / "out"))


def test_fit_stores_training_references_and_pin_fragmentations_restores_them(trained, tmp_path):
    """`fit` pins its fragmentations with up to 16 training frames as reference geometries;
    `models/pin_fragmentations.py` gives a file made before that (pins without references, or no
    pins at all) the same pins, weights untouched; it leaves a complete file alone and refuses
    another data file or other pins."""
    import numpy as np
    import torch
    from ase.io import read

    from se3set_ase.model.checkpoint import atomic_torch_save, read_model_file

    model, data = trained
    payload = read_model_file(model)
    pins = payload["fragmentations"]
    assert pins and all(1 <= len(p["references"]) <= 16 for p in pins)
    frames = read(data, index=":")
    tr = payload["metadata"]["training"]
    from se3set_ase.data import split_indices
    fr = tr["frames"]
    split = split_indices(len(frames), train=int(fr["train"]), valid=int(fr["valid"]), test=int(fr["test"]),
                          seed=int(tr["seed"]), block=int(tr.get("split_block", 1)))
    train_pos = [frames[i].positions for i in split["train"]]
    for ref in pins[0]["references"]:  # every reference is a training frame, none a valid/test one
        assert any(np.allclose(ref, p, atol=1e-12) for p in train_pos)

    script = SCRIPT.parent / "pin_fragmentations.py"
    spec = importlib.util.spec_from_file_location("pin_fragmentations_under_test", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    no_refs = dict(payload, fragmentations=[{k: v for k, v in p.items() if k != "references"} for p in pins])
    no_pins = {k: v for k, v in payload.items() if k != "fragmentations"}
    for name, old in (("no_refs", no_refs), ("no_pins", no_pins)):
        old_path = tmp_path / f"{name}.pt"
        atomic_torch_save(old, old_path)
        out = tmp_path / f"{name}_new.pt"
        assert mod.main([str(old_path), "--data", str(data), "-o", str(out)]) == 0
        new = read_model_file(out)
        assert new["fragmentations"] == pins
        added = new["metadata"]["fragmentation_references"]
        assert added["frames"] == [len(p["references"]) for p in pins]
        assert added["pins_added"] == (name == "no_pins")
        for k, v in payload["state_dict"].items():
            assert torch.equal(new["state_dict"][k], v)
    before = out.read_bytes()
    assert mod.main([str(out), "--data", str(data)]) == 0  # complete: left alone
    assert out.read_bytes() == before
    other = tmp_path / "other.extxyz"
    write(other, frames)
    with pytest.raises(SystemExit, match="not the file the model was trained on"):
        mod.main([str(tmp_path / "no_refs.pt"), "--data", str(other), "-o", str(tmp_path / "y.pt")])
    wrong = dict(no_refs, fragmentations=[dict(p, hyperedges=p["hyperedges"][1:]) for p in no_refs["fragmentations"]])
    atomic_torch_save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(SystemExit, match="differ from the pinned ones"):
        mod.main([str(tmp_path / "wrong.pt"), "--data", str(data)])
    assert not (tmp_path / "y.pt").exists()


def test_per_frame_errors_do_not_depend_on_the_batching(trained):
    """The card's per-frame errors come in the trainer's batches (at most 16 frames and 1024 atoms)
    and equal those of one frame at a time; their means are the trainer's MAEs."""
    import numpy as np
    import torch

    from se3set_ase.data import read_frames
    from se3set_ase.fragment import Fragmenter
    from se3set_ase.model import load_model
    from se3set_ase.training.cache import build_graphs
    from se3set_ase.training.metrics import evaluate, frame_errors

    model_path, data = trained
    model, _ = load_model(model_path, dtype=torch.float64, device="cpu")
    g = build_graphs(read_frames(data), model.config.fragment, pinned=Fragmenter.for_model(model).fragmentations())
    mc = _make_card()
    batched = mc.per_frame_errors(frame_errors(model, g, 16, "cpu", torch.float64))
    single = mc.per_frame_errors(frame_errors(model, g, 1, "cpu", torch.float64))
    assert list(batched) == ["energy_err_meV", "energy_err_meV_per_atom", "forces_mae_meV_A", "forces_rmse_meV_A"]
    assert len(batched["energy_err_meV"]) == len(g) == 30
    for k in batched:
        np.testing.assert_allclose(batched[k], single[k], rtol=1e-12, atol=1e-12)
    m = evaluate(model, g, 16, "cpu", torch.float64)
    assert np.mean(np.abs(batched["energy_err_meV"])) == pytest.approx(m["energy_mae_meV"], rel=1e-12)
    assert np.mean(batched["forces_mae_meV_A"]) == pytest.approx(m["forces_mae_meV_A"], rel=1e-12)  # equal-size frames
    n = len(read_frames(data)[0])
    assert np.array(batched["energy_err_meV"]) / n == pytest.approx(batched["energy_err_meV_per_atom"], rel=1e-12)
