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
