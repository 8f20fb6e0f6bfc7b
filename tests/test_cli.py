"""The `se3set-ase` command: version, info, eval, and clear errors."""
from __future__ import annotations

import json
import subprocess
import sys

import torch
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
    for cmd in ("info", "fit", "eval", "sample"):
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
