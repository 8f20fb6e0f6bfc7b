"""The `se3set-ase` command: version, info, eval, and clear errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from ase.build import molecule
from ase.io import write

from se3set_ase import __version__
from se3set_ase.fragment import FragmentSettings
from se3set_ase.model import ModelConfig, SE3SetModel, save_model


def run(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "se3set_ase.cli", *args], capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_version_and_info():
    assert run("--version").stdout.strip() == f"se3set-ase {__version__}"
    out = run("info").stdout
    for name in ("torch", "e3nn", "ase", "rdkit", "cuda available", "torch-cluster"):
        assert name in out
    assert torch.__version__ in out


def test_help_lists_subcommands():
    out = run("--help").stdout
    for cmd in ("info", "models", "fit", "eval", "sample"):
        assert cmd in out


def test_eval_reports_the_errors_of_a_model(tmp_path):
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from test_training import harmonic_frames

    frames = harmonic_frames(6)
    data = tmp_path / "frames.extxyz"
    write(data, frames)
    torch.manual_seed(0)
    model = SE3SetModel(ModelConfig.preset("tiny", elements=[1, 6, 8], fragment=FragmentSettings.preset("md17")))
    save_model(model, tmp_path / "m.pt")
    m = json.loads(run("eval", str(tmp_path / "m.pt"), str(data), "--json", "--device", "cpu").stdout)
    # an untrained model predicts zero forces: the force MAE is the mean |F| of the labels
    import numpy as np

    mean_abs = 1000 * np.mean(np.abs(np.concatenate([a.get_forces() for a in frames])))
    assert m["n_frames"] == 6
    assert abs(m["forces_mae_meV_A"] - mean_abs) < 1e-6 * mean_abs


def test_fit_missing_file_is_a_clear_error(tmp_path):
    proc = run("fit", str(tmp_path / "nope.extxyz"), "--out-dir", str(tmp_path / "r"), check=False)
    assert proc.returncode != 0
    assert proc.returncode == 2
    assert "data file" in proc.stderr and "nope.extxyz" in proc.stderr and "Traceback" not in proc.stderr


def test_models_lists_what_each_name_resolves_to(tmp_path):
    """`se3set-ase models`: every name with the file a calculator would load (the first folder in
    the search order wins, later copies are listed as shadowed), its training facts and test
    errors from the file's metadata; a corrupt file is listed with the reason, not skipped."""
    import os

    first, xdg = tmp_path / "first", tmp_path / "xdg"
    user = xdg / "se3set_ase" / "models"
    first.mkdir()
    user.mkdir(parents=True)
    torch.manual_seed(0)
    model = SE3SetModel(ModelConfig.preset("tiny", elements=[1, 6, 8], fragment=FragmentSettings.preset("md17")))
    meta = {"training": {"data": "runs/x/frames.extxyz", "preset": "tiny", "parameters": 1234,
                         "frames": {"train": 40, "valid": 5, "test": 5}},
            "metrics": {"test": {"forces_mae_meV_A": 12.345, "energy_mae_meV_per_atom": 0.678}}}
    save_model(model, first / "mine.pt", meta)
    save_model(model, user / "mine.pt")  # shadowed by $SE3SET_MODELS
    (user / "broken.pt").write_bytes(b"not a model")
    # ring-cut models: order-dependent unless the pins carry reference geometries
    from se3set_ase.fragment import Fragmenter
    cut = FragmentSettings(**{**FragmentSettings.preset("md22").to_dict(), "max_ring_system_atoms": 12})
    ring = SE3SetModel(ModelConfig.preset("tiny", elements=[1, 6], fragment=cut))
    pin = Fragmenter(cut).fragmentation(molecule("C6H6")).to_dict()
    for name, p in (("cut_old.pt", {k: v for k, v in pin.items() if k != "references"}), ("cut_new.pt", pin)):
        ring.fragmentations = [p]
        save_model(ring, first / name, meta)
    env = dict(os.environ, SE3SET_MODELS=str(first), XDG_DATA_HOME=str(xdg))
    proc = subprocess.run([sys.executable, "-m", "se3set_ase.cli", "models", "--json"], capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    entries = {e["name"]: e for e in json.loads(proc.stdout)}
    mine = entries["mine.pt"]
    assert mine["path"] == str(first / "mine.pt") and mine["shadowed"] == [str(user / "mine.pt")]
    assert mine["elements"] == ["H", "C", "O"] and mine["preset"] == "tiny" and mine["train_frames"] == 40
    assert mine["data"] == "frames.extxyz" and mine["test_forces_mae_meV_A"] == 12.345
    assert "not a readable se3set-ase model file" in entries["broken.pt"]["error"]
    # each name is listed with the file the calculator's lookup resolves it to
    code = ("import json, sys; from se3set_ase.registry import resolve_model; "
            "print(json.dumps({n: str(resolve_model(n)) for n in sys.argv[1:]}))")
    resolved = json.loads(subprocess.run([sys.executable, "-c", code, *entries], capture_output=True, text=True,
                                         env=env, check=True).stdout)
    assert resolved == {n: e["path"] for n, e in entries.items()}
    table = subprocess.run([sys.executable, "-m", "se3set_ase.cli", "models"], capture_output=True, text=True,
                           env=env, check=True).stdout
    assert f"mine.pt: {user / 'mine.pt'} is shadowed" in table and "broken.pt: " in table
    assert "12.35" in table and "frames.extxyz (40)" in table
    assert entries["cut_old.pt"]["order_dependent"] and not entries["cut_new.pt"]["order_dependent"]
    assert not mine["order_dependent"]
    assert "cut_old.pt: cuts ring systems" in table and "cut_new.pt: cuts" not in table
    # from a folder holding a file of that name, the name means that file (as for the calculator);
    # a search folder named twice does not shadow itself
    here = tmp_path / "here"
    here.mkdir()
    save_model(model, here / "mine.pt")
    env2 = dict(env, SE3SET_MODELS=str(user))
    entries = {e["name"]: e for e in json.loads(subprocess.run(
        [sys.executable, "-m", "se3set_ase.cli", "models", "--json"], capture_output=True, text=True, env=env2,
        cwd=here, check=True).stdout)}
    assert entries["mine.pt"]["path"] == str(here / "mine.pt")
    assert entries["mine.pt"]["shadowed"] == [str(user / "mine.pt")]
    resolved = json.loads(subprocess.run([sys.executable, "-c", code, "mine.pt"], capture_output=True, text=True,
                                         env=env2, cwd=here, check=True).stdout)
    assert Path(resolved["mine.pt"]) == Path("mine.pt")  # the file in the current directory
