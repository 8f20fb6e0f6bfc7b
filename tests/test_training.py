"""`se3set-ase fit`: learning, exact resume, DDP equivalence, HDF5 cache, errors."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import molecule
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write

from se3set_ase.data import DataError
from se3set_ase.fragment import Fragmenter
from se3set_ase.model import load_model
from se3set_ase.model.compiled_training import CompiledTrainingForces
from se3set_ase.training import TrainConfig, TrainingError, fit
from se3set_ase.training.loop import prepare_data

# a 1-block, 16-channel model: small enough for CI, large enough to learn a smooth potential
SMALL_NET = {"irreps_node": "16x0e+4x1o+2x2e", "irreps_ffn": "32x0e+8x1o+4x2e", "num_blocks": 1,
             "attn_scalars": 8}
# l <= 1 and one block: for the compiled training tests (a graph that compiles several times faster)
L1_NET = {"irreps_node": "8x0e+4x1o", "irreps_head": "4x0e+2x1o", "irreps_ffn": "16x0e+4x1o", "lmax": 1, "num_blocks": 1}


def harmonic_frames(n: int, seed: int = 0, sigma: float = 0.06, k: float = 20.0, name: str = "CH3CH2OH"):
    """Distorted copies of a molecule labelled by springs (k eV/Å²) on bonded and 1-3 pairs.

    Smooth, exactly known energies (eV) and forces (eV/Å): a potential a model must be able to learn.
    """
    mol = molecule(name)
    r0 = mol.positions
    d0 = np.linalg.norm(r0[:, None] - r0[None], axis=-1)
    i, j = np.nonzero(np.triu(d0 < 2.6, 1))
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        r = r0 + rng.normal(scale=sigma, size=r0.shape)
        v = r[i] - r[j]
        d = np.linalg.norm(v, axis=1)
        g = (k * (d - d0[i, j]) / d)[:, None] * v
        f = np.zeros_like(r)
        np.add.at(f, i, -g)
        np.add.at(f, j, g)
        a = mol.copy()
        a.positions = r
        a.calc = SinglePointCalculator(a, energy=0.5 * k * np.sum((d - d0[i, j]) ** 2) - 100.0, forces=f)
        frames.append(a)
    return frames


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "ethanol_springs.extxyz"
    write(path, harmonic_frames(40))
    return path


def config(data, out, **kw) -> TrainConfig:
    base = dict(data=str(data), out_dir=str(out), preset="tiny", model_overrides=dict(SMALL_NET),
                valid_size=8, batch_size=4, epochs=2, lr=5e-3, warmup_steps=5, dtype="float64",
                progress=False, seed=3, save_every_steps=1000, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def weights(path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def test_fit_learns_a_smooth_potential(tmp_path):
    """Force MAE falls at least 10x from the untrained model (which predicts zero forces)."""
    frames = harmonic_frames(24, name="H2O", seed=1) + harmonic_frames(24, name="NH3", seed=2)
    path = tmp_path / "water_ammonia.extxyz"
    write(path, frames)
    cfg = config(path, tmp_path / "run", epochs=40, lr=5e-3, warmup_steps=20, ema_decay=0.9,
                 dtype="float32", valid_size=8)
    result = fit(cfg)
    valid = result["metrics"]["valid"]
    untrained = 1000 * np.mean(np.abs(np.concatenate([a.get_forces() for a in frames])))  # meV/Å
    assert valid["forces_mae_meV_A"] < untrained / 10, (valid, untrained)
    # outputs a user expects
    out = tmp_path / "run"
    assert (out / "log.csv").read_text().count("\n") == 41
    assert (out / "learning_curve.png").stat().st_size > 1000
    model, meta = load_model(result["model"])
    assert model.elements == [1, 7, 8]
    # the model file pins the two molecules' training fragmentations (first frame of each)
    pinned = [(tuple(d["numbers"]), tuple(map(tuple, d["hyperedges"]))) for d in model.fragmentations]
    first = {tuple(a.numbers): a for a in reversed(frames)}
    expect = [(z, Fragmenter(model.config.fragment).fragmentation(a).hyperedges) for z, a in first.items()]
    assert sorted(pinned) == sorted(expect) and len(pinned) == 2
    assert meta["metrics"]["valid"]["forces_mae_meV_A"] == pytest.approx(valid["forces_mae_meV_A"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_resume_with_deterministic_kernels_is_exact(data_file, tmp_path):
    """On CUDA, atomic index_add sums in a varying order; with deterministic=True a run stopped
    after 5 steps and resumed equals an unbroken one bit for bit, and the switch is restored after."""
    kw = dict(device="cuda", deterministic=True)
    fit(config(data_file, tmp_path / "a", **kw))
    fit(config(data_file, tmp_path / "b", max_steps=5, **kw))
    fit(config(data_file, tmp_path / "b", device="cuda"), resume=True)  # the checkpoint's flag holds
    a, b = (torch.load(tmp_path / x / "last.ckpt", weights_only=True) for x in "ab")
    assert a["state"]["step"] == b["state"]["step"] == 16
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert not torch.are_deterministic_algorithms_enabled()


def test_resume_is_exact(data_file, tmp_path):
    """Stopped after 5 steps and resumed == one unbroken run (weights, optimizer, EMA)."""
    fit(config(data_file, tmp_path / "a"))
    fit(config(data_file, tmp_path / "b", max_steps=5))
    assert torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)["state"]["step"] == 5
    fit(config(data_file, tmp_path / "b"), resume=True)
    a, b = (torch.load(tmp_path / x / "last.ckpt", weights_only=True) for x in "ab")
    assert a["state"]["step"] == b["state"]["step"] == 16
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["ema"]["shadow"]:
        assert torch.equal(a["ema"]["shadow"][k], b["ema"]["shadow"][k]), k


def test_resume_with_other_epochs_warns(data_file, tmp_path, caplog):
    """Changing --epochs on --resume changes the LR schedule: allowed, but said."""
    import logging

    fit(config(data_file, tmp_path / "c", max_steps=3))
    with caplog.at_level(logging.WARNING, logger="se3set_ase"):
        fit(config(data_file, tmp_path / "c", max_steps=4), resume=True)
    assert "not an exact continuation" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="se3set_ase"):
        fit(config(data_file, tmp_path / "c", epochs=3, max_steps=5), resume=True)
    assert "resuming with epochs=3 (the checkpoint's run was planned for 2)" in caplog.text


def test_resume_without_best_weights_warns(data_file, tmp_path, caplog):
    """The best weights of the epochs before a resume live in best.pt, not in last.ckpt: a resume
    in a folder without it (only last.ckpt copied) says that the final model can differ."""
    import logging

    fit(config(data_file, tmp_path / "d", max_steps=9))  # past the first epoch's validation
    assert (tmp_path / "d" / "best.pt").is_file()
    with caplog.at_level(logging.WARNING, logger="se3set_ase"):
        fit(config(data_file, tmp_path / "d", max_steps=10), resume=True)
    assert "resuming without" not in caplog.text
    (tmp_path / "d" / "best.pt").unlink()
    with caplog.at_level(logging.WARNING, logger="se3set_ase"):
        fit(config(data_file, tmp_path / "d", max_steps=11), resume=True)
    assert "resuming without" in caplog.text and "copy best.pt along with last.ckpt" in caplog.text


def test_cli_resume_keeps_plan_and_honours_output(data_file, tmp_path, caplog):
    """`fit --resume` without --epochs continues the checkpoint's plan exactly (no silent default of
    100 epochs); `-o` given on resume is where the model goes."""
    import json
    import logging

    from se3set_ase.cli import main

    common = [str(data_file), "--preset", "tiny", "--model", json.dumps(SMALL_NET), "--train-size", "30",
              "--valid-size", "5", "--test-size", "5", "--batch-size", "4", "--no-progress", "--deterministic"]
    main(["fit", *common, "--out-dir", str(tmp_path / "a"), "--epochs", "2", "-o", str(tmp_path / "a.pt")])
    assert main(["fit", *common, "--out-dir", str(tmp_path / "b"), "--epochs", "2", "--max-steps", "3",
                 "-o", str(tmp_path / "first.pt")]) == 0  # a planned stop is a success
    with caplog.at_level(logging.WARNING, logger="se3set_ase"):
        main(["fit", str(data_file), "--out-dir", str(tmp_path / "b"), "--resume", "--no-progress",
              "-o", str(tmp_path / "second.pt")])
    assert "not an exact continuation" not in caplog.text
    a, b = (torch.load(tmp_path / x / "last.ckpt", weights_only=True) for x in "ab")
    assert a["state"]["step"] == b["state"]["step"] == 16  # 2 epochs of 8 steps, not 100 epochs
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert (tmp_path / "second.pt").is_file() and load_model(tmp_path / "second.pt") is not None
    # --deterministic was saved with the run, kept by --resume, and switched off again after each fit
    assert torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)["train_config"]["deterministic"] is True
    assert not torch.are_deterministic_algorithms_enabled()


@pytest.mark.parametrize("kill_step", [6, 8])  # mid-epoch, and right after an epoch's last step
def test_resume_after_kill(data_file, tmp_path, kill_step):
    """A process killed mid-run resumes from its last checkpoint to the same result."""
    fit(config(data_file, tmp_path / "a"))
    out = tmp_path / "b"
    cfg = config(data_file, out, save_every_steps=2)
    script = (f"from se3set_ase.training import TrainConfig, fit\n"
              f"import os, signal\nimport se3set_ase.training.loop as L\n"
              f"orig = L.atomic_torch_save\n"
              f"def save(obj, path):\n    orig(obj, path)\n"
              f"    if obj['state']['step'] >= {kill_step}: os.kill(os.getpid(), signal.SIGKILL)\n"
              f"L.atomic_torch_save = save\nfit(TrainConfig(**{cfg.__dict__!r}))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert torch.load(out / "last.ckpt", weights_only=True)["state"]["step"] == kill_step
    fit(cfg, resume=True)
    a, b = weights(tmp_path / "a" / "last.ckpt"), weights(out / "last.ckpt")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sigterm_stops_cleanly_and_resumes_exactly(data_file, tmp_path, monkeypatch, capsys):
    """SIGTERM mid-run (a scheduler's pre-emption): the step finishes, the checkpoint is written,
    fit returns, the previous handler is back, and --resume reaches the unbroken run's weights."""
    import os
    import signal

    import se3set_ase.training.loop as loop

    fit(config(data_file, tmp_path / "a"))
    real, calls = loop.make_batch, []

    def make_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives before step 5 ends
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "make_batch", make_batch)
    before = signal.getsignal(signal.SIGTERM)
    cfg = config(data_file, tmp_path / "b")
    result = fit(cfg)
    assert result["stopped"] == "SIGTERM" and result["steps"] == 5
    printed = capsys.readouterr().out
    assert "stopped by SIGTERM at step 5; continue with --resume" in printed
    # pre-empted: the model is written at once, without the minutes of valid/test evaluation
    assert result["metrics"] == {} and "were not measured" in printed
    assert load_model(result["model"])[1]["training"]["stopped"] == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before
    assert torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)["state"]["step"] == 5
    # the command line says "unfinished" to a job script: status 3
    import json

    from se3set_ase.cli import main

    calls.clear()
    assert main(["fit", str(data_file), "--preset", "tiny", "--model", json.dumps(SMALL_NET), "--valid-size", "8",
                 "--batch-size", "4", "--epochs", "2", "--no-progress", "--device", "cpu",
                 "--out-dir", str(tmp_path / "c")]) == 3
    monkeypatch.setattr(loop, "make_batch", real)
    fit(cfg, resume=True)
    a, b = weights(tmp_path / "a" / "last.ckpt"), weights(tmp_path / "b" / "last.ckpt")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_torchrun_gloo_equals_single_process(data_file, tmp_path):
    """2 processes (DDP, gloo) compute the same training as 1 process."""
    common = ["--preset", "tiny", "--model", '{"num_blocks": 1}', "--valid-size", "8", "--batch-size", "4",
              "--epochs", "1", "--lr", "5e-3", "--warmup-steps", "2", "--dtype", "float64", "--seed", "3",
              "--no-progress", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single = subprocess.run([sys.executable, "-m", "se3set_ase.cli", "fit", str(data_file), "--out-dir",
                             str(tmp_path / "one"), *common], capture_output=True, env=env)
    assert single.returncode == 0, single.stderr.decode()[-3000:]
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            "-m", "se3set_ase.cli", "fit", str(data_file), "--out-dir", str(tmp_path / "two"),
                            *common], capture_output=True, env=env)
    assert multi.returncode == 0, multi.stderr.decode()[-3000:]
    a, b = weights(tmp_path / "one" / "last.ckpt"), weights(tmp_path / "two" / "last.ckpt")
    moved = 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-9, atol=1e-10)
        moved += int(not torch.equal(a[k], torch.zeros_like(a[k])))
    assert moved > 10


def test_hdf5_cache_reused_and_rebuilt(tmp_path):
    path = tmp_path / "d.extxyz"
    write(path, harmonic_frames(12))
    cfg = config(path, tmp_path / "run", valid_size=2)
    *_, info = prepare_data(cfg)
    assert not info["cache_reused"] and Path(info["cache_file"]).is_file()
    *_, info2 = prepare_data(cfg)
    assert info2["cache_reused"] and info2["cache_file"] == info["cache_file"]
    write(path, harmonic_frames(12, seed=1))  # new content -> new cache
    *_, info3 = prepare_data(cfg)
    assert not info3["cache_reused"] and info3["cache_file"] != info["cache_file"]
    # same graphs whether from the cache or freshly built
    s1, sets1, *_ = prepare_data(cfg)
    np.testing.assert_array_equal(sets1["train"].energies, prepare_data(cfg)[1]["train"].energies)


def test_resume_with_unknown_element_fails(data_file, tmp_path):
    fit(config(data_file, tmp_path / "run", max_steps=2))
    other = tmp_path / "with_n.extxyz"
    write(other, harmonic_frames(12, name="NH3"))
    with pytest.raises(TrainingError, match="elements \\[7\\] unknown to the resumed model"):
        fit(config(data_file, tmp_path / "run", valid_file=str(other)), resume=True)


def test_bad_inputs(tmp_path):
    empty = tmp_path / "empty.extxyz"
    empty.write_text("")
    with pytest.raises((DataError, TrainingError), match="empty|no frames"):
        fit(config(empty, tmp_path / "r1"))
    frames = harmonic_frames(10)
    frames[3].calc = SinglePointCalculator(frames[3], energy=float("nan"), forces=frames[3].get_forces())
    nan = tmp_path / "nan.extxyz"
    write(nan, frames)
    with pytest.raises((DataError, TrainingError), match="(?i)nan"):
        fit(config(nan, tmp_path / "r2", valid_size=2))
    unlabelled = tmp_path / "nolabels.extxyz"
    write(unlabelled, [molecule("CH3CH2OH")] * 3)
    with pytest.raises(DataError, match="energy"):
        fit(config(unlabelled, tmp_path / "r3", valid_size=1))
    with pytest.raises(TrainingError, match="no checkpoint"):
        fit(config(unlabelled, tmp_path / "nowhere"), resume=True)
    corrupt = tmp_path / "r4"
    corrupt.mkdir()
    (corrupt / "last.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(TrainingError, match="truncated or corrupt"):
        fit(config(unlabelled, corrupt), resume=True)
    with pytest.raises(TrainingError, match="memory-budget.*within \\[0, 1\\], got 1.5"):
        fit(config(nan, tmp_path / "r5", compile=True, memory_budget=1.5))


def test_split_block_from_the_command_line(data_file, tmp_path):
    """`fit --split-block 5`: the sets are made of contiguous 5-frame blocks (MD trajectories),
    with the same indices as `split_indices(..., block=5)`."""
    import argparse

    from se3set_ase.data import split_indices
    from se3set_ase.training.cli import add_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args([str(data_file), "--out-dir", str(tmp_path / "run"), "--train-size", "30",
                         "--valid-size", "5", "--test-size", "5", "--split-block", "5", "--seed", "2"])
    cfg = config_from_args(args)
    assert cfg.split_block == 5
    _, sets, split, _ = prepare_data(cfg)
    want = split_indices(40, 30, 5, 5, seed=2, block=5)
    assert all((split[k] == want[k]).all() for k in want)
    assert [len(sets[k]) for k in ("train", "valid", "test")] == [30, 5, 5]
    for k in ("valid", "test"):  # each a whole block here (5 = block and 30 is a multiple of 5)
        assert np.array_equal(split[k], np.arange(split[k][0], split[k][0] + 5)) and split[k][0] % 5 == 0


def test_extra_train_frames_join_training_only_and_resume_says_so(data_file, tmp_path, caplog):
    """`--extra-train FILE`: its frames are added to the training set after the split; the split
    of DATA (hence valid and test) is the one without them, the model metadata keeps the split's
    counts (what make_card.py recomputes the split from) and names the extra frames, and adding
    them on --resume is allowed but reported as no exact continuation."""
    import argparse
    import logging

    from se3set_ase.training.cli import add_arguments, config_from_args

    extra = tmp_path / "extra.extxyz"
    write(extra, harmonic_frames(6, seed=9))
    p = argparse.ArgumentParser()
    add_arguments(p)
    base = [str(data_file), "--out-dir", str(tmp_path / "run"), "--train-size", "30", "--valid-size", "5",
            "--test-size", "5", "--seed", "2"]
    cfg0 = config_from_args(p.parse_args(base))
    cfg = config_from_args(p.parse_args(base + ["--extra-train", str(extra)]))
    assert cfg0.extra_train == [] and cfg.extra_train == [str(extra)]
    _, sets0, split0, _ = prepare_data(cfg0)
    _, sets, split, _ = prepare_data(cfg)
    assert all(np.array_equal(split[k], split0[k]) for k in split0)
    assert [len(sets[k]) for k in ("train", "valid", "test")] == [36, 5, 5]
    for k in ("valid", "test"):
        assert np.array_equal(sets[k].energies, sets0[k].energies)
    assert np.array_equal(sets["train"].energies[:30], sets0["train"].energies)
    e_extra = [a.get_potential_energy() for a in harmonic_frames(6, seed=9)]
    assert np.allclose(sets["train"].energies[30:], e_extra)

    kw = dict(model_overrides=dict(SMALL_NET), epochs=1, batch_size=6, dtype="float64", progress=False,
              save_every_steps=1000, warmup_steps=2)
    fit(config(data_file, tmp_path / "r", train_size=30, valid_size=5, test_size=5, seed=2, **kw))
    with caplog.at_level(logging.WARNING, logger="se3set_ase"):
        fit(config(data_file, tmp_path / "r", train_size=30, valid_size=5, test_size=5, seed=2,
                   extra_train=[str(extra)], **dict(kw, epochs=2)), resume=True)
    assert f"resuming with extra_train=['{extra}']" in caplog.text
    meta = load_model(tmp_path / "r" / "model.pt")[1]["training"]
    assert meta["frames"] == {"train": 30, "valid": 5, "test": 5}
    assert meta["extra_train"] == {"files": [str(extra)], "frames": 6}
    with pytest.raises(DataError, match="does not exist"):
        prepare_data(config(data_file, tmp_path / "x", extra_train=[str(tmp_path / "missing.xyz")]))


def test_cache_not_written_into_read_only_data_folder(tmp_path, monkeypatch):
    """A data folder marked read-only gets no cache file, even for root (who may write anyway)."""
    from se3set_ase.training.cache import cache_path

    monkeypatch.delenv("SE3SET_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    data = tmp_path / "data"
    data.mkdir()
    (data / "x.extxyz").write_text("")
    assert cache_path(data / "x.extxyz", "k").parent == data
    data.chmod(0o555)
    try:
        assert cache_path(data / "x.extxyz", "k").parent == tmp_path / "xdg" / "se3set_ase" / "hypergraphs"
    finally:
        data.chmod(0o755)


def test_max_ring_system_atoms_reaches_the_model_settings(data_file):
    """`fit --max-ring-system-atoms N`: the fragment settings (stored in the model) carry N."""
    import argparse

    from se3set_ase.training.cli import add_arguments, config_from_args
    from se3set_ase.training.loop import _fragment_settings

    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = config_from_args(p.parse_args([str(data_file), "--max-ring-system-atoms", "12", "--fragment", "md22"]))
    assert cfg.max_ring_system_atoms == 12
    s = _fragment_settings(cfg, 148)
    assert s.max_ring_system_atoms == 12 and s.mode == "implicit"
    assert _fragment_settings(config_from_args(p.parse_args([str(data_file)])), 9).max_ring_system_atoms is None


def test_evaluation_batches_cap_atoms_and_do_not_change_the_errors():
    """Evaluation batches hold at most ``max_atoms`` atoms (a validation of 16 large frames at once
    ran a machine out of memory); the errors are those of one frame at a time."""
    from se3set_ase.data.frames import Frame
    from se3set_ase.fragment import FragmentSettings
    from se3set_ase.model import ModelConfig, SE3SetModel
    from se3set_ase.training.cache import build_graphs
    from se3set_ase.training.metrics import eval_batches, evaluate, frame_errors

    assert [list(r) for r in eval_batches([9, 9, 30, 9, 9, 9], batch_size=2, max_atoms=20)] == \
        [[0, 1], [2], [3, 4], [5]]  # the 30-atom frame alone; never more than 2 frames
    assert [list(r) for r in eval_batches([9] * 5, batch_size=16, max_atoms=1024)] == [[0, 1, 2, 3, 4]]
    assert eval_batches([], 4) == []

    ethanol = [Frame.from_atoms(a) for a in harmonic_frames(4, seed=1)]
    water = [Frame.from_atoms(a) for a in harmonic_frames(3, seed=2, name="H2O")]
    data = build_graphs([ethanol[0], water[0], ethanol[1], ethanol[2], water[1], water[2], ethanol[3]],
                        FragmentSettings())
    torch.manual_seed(0)
    model = SE3SetModel(ModelConfig.preset("tiny", elements=[1, 6, 8], **SMALL_NET), torch.float64)
    with torch.no_grad():  # random, non-trivial energy shifts
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    one = evaluate(model, data, 1, "cpu", torch.float64)
    for max_atoms in (12, 20, 1024):
        got = evaluate(model, data, 16, "cpu", torch.float64, max_atoms=max_atoms)
        assert got.keys() == one.keys()
        for k in one:
            assert got[k] == pytest.approx(one[k], rel=1e-12), (max_atoms, k)
    assert one["forces_mae_meV_A"] > 1.0  # a random model: the errors compared are not zero
    per_frame = frame_errors(model, data, 16, "cpu", torch.float64, max_atoms=20)  # mixed sizes per batch
    assert [tuple(f.shape) for f in per_frame.forces] == [(9, 3), (3, 3), (9, 3), (9, 3), (3, 3), (3, 3), (9, 3)]
    assert per_frame.n_atoms.tolist() == [9, 3, 9, 9, 3, 3, 9]
    for i in (0, 1):  # each frame's own errors, wherever it sat in its batch
        alone = frame_errors(model, build_graphs([[ethanol[0], water[0]][i]], FragmentSettings()), 1, "cpu",
                             torch.float64)
        assert per_frame.energy[i].item() == pytest.approx(alone.energy[0].item(), rel=1e-12)
        torch.testing.assert_close(per_frame.forces[i], alone.forces[0], rtol=1e-12, atol=1e-14)


def test_reports_without_matplotlib_write_the_csv_and_warn(tmp_path, monkeypatch):
    """The learning-curve plot is the only use of matplotlib: where it cannot be imported the CSV
    log is still written, the PNG is skipped with a warning naming the CSV, and nothing raises."""
    import csv

    from se3set_ase.training.loop import write_reports

    history = [{"epoch": 1, "train_energy_mae_meV": 3.0, "valid_forces_mae_meV_A": 5.0},
               {"epoch": 2, "train_energy_mae_meV": 2.0, "valid_forces_mae_meV_A": 4.0}]
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
        with pytest.warns(UserWarning, match="no learning_curve.png.*log.csv"):
            write_reports(tmp_path, history)
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"] and rows[1]["valid_forces_mae_meV_A"] == "4.0"
    assert not (tmp_path / "learning_curve.png").exists()
    pytest.importorskip("matplotlib")
    write_reports(tmp_path, history)  # with matplotlib: the plot
    assert (tmp_path / "learning_curve.png").stat().st_size > 0


def test_compiled_fit_follows_the_eager_fit_and_resumes_exactly(data_file, tmp_path, caplog):
    """``fit --compile``: the training steps through one compiled graph give the eager run's
    weights to rounding (float64, 16 steps); a compiled run stopped after 5 steps and resumed with
    compile equals the unbroken compiled run bit for bit; resuming an eager run with compile says
    that the continuation is equal only to rounding."""
    net = dict(model_overrides=L1_NET)  # l <= 1: compiles in a fraction of SMALL_NET's time
    fit(config(data_file, tmp_path / "eager", **net))
    fit(config(data_file, tmp_path / "a", compile=True, **net))
    fit(config(data_file, tmp_path / "b", compile=True, max_steps=5, **net))
    fit(config(data_file, tmp_path / "b", compile=True, **net), resume=True)
    eager, a, b = (torch.load(tmp_path / x / "last.ckpt", weights_only=True) for x in ("eager", "a", "b"))
    assert a["state"]["step"] == b["state"]["step"] == eager["state"]["step"] == 16
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
        torch.testing.assert_close(a["model"][k], eager["model"][k], rtol=1e-7, atol=1e-9, msg=k)
    for k in a["ema"]["shadow"]:
        assert torch.equal(a["ema"]["shadow"][k], b["ema"]["shadow"][k]), k
    assert a["train_config"]["compile"] and not eager["train_config"]["compile"]
    fit(config(data_file, tmp_path / "eager", compile=True, **net), resume=True)  # finished: no step, no compiling
    assert "not a bit-for-bit continuation" in caplog.text


def test_torchrun_compiled_fit_follows_the_single_process_fit(data_file, tmp_path):
    """``torchrun --nproc-per-node 2 ... fit --compile``: each process trains through its compiled
    graph and the gradients are averaged by one all-reduce per step, which gives one process's
    eager training to rounding (float64, 16 steps). The network is the one compiled by the test
    above, so each process finds it in TorchInductor's disk cache when the tests run in order."""
    import json

    fit(config(data_file, tmp_path / "one", model_overrides=L1_NET))
    common = ["--preset", "tiny", "--model", json.dumps(L1_NET), "--valid-size", "8", "--batch-size", "4",
              "--epochs", "2", "--lr", "5e-3", "--warmup-steps", "5", "--dtype", "float64", "--seed", "3",
              "--no-progress", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            "-m", "se3set_ase.cli", "fit", str(data_file), "--out-dir", str(tmp_path / "two"),
                            "--compile", *common], capture_output=True, env=env)
    err = multi.stderr.decode()
    assert multi.returncode == 0, err[-3000:]
    assert "compiling the training step failed" not in err, err[-3000:]
    one, two = (torch.load(tmp_path / x / "last.ckpt", weights_only=True) for x in ("one", "two"))
    assert two["train_config"]["compile"] and one["state"]["step"] == two["state"]["step"] == 16
    for k in one["model"]:
        torch.testing.assert_close(two["model"][k], one["model"][k], rtol=1e-7, atol=1e-9, msg=k)


def test_memory_budget_reaches_the_compiled_step(data_file, tmp_path, monkeypatch):
    """``fit --compile --memory-budget 0.3`` builds its compiled step with that budget (the step
    itself is replaced by the eager network here: compiling is tested above)."""
    import se3set_ase.training.loop as loop
    from se3set_ase.model.network import energy_and_forces

    made = []

    class Recorder:
        def __init__(self, model, memory_budget=None):
            made.append(memory_budget)
            self.model = model

        def __call__(self, hg):
            return energy_and_forces(self.model, hg, training=True)

    monkeypatch.setattr(loop, "CompiledTrainingForces", Recorder)
    fit(config(data_file, tmp_path / "r", compile=True, memory_budget=0.3, max_steps=1))
    assert made == [0.3]
    with pytest.raises(ValueError, match="memory_budget"):
        CompiledTrainingForces(load_model(tmp_path / "r" / "model.pt")[0], memory_budget=-0.1)
