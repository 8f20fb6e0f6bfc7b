"""MACE vs SE3Set side by side: the same split, the same CPU wall-clock budget, the same test frames.

Run (from the repository root)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mace_side_by_side.py models/md17_aspirin.pt \\
        --data ../shared/data/md17/aspirin.extxyz
    .venv/bin/python benchmarks/mace_side_by_side.py --setup          # only build .venv-mace

What it does:

1. Reads the SE3Set model file's training metadata (data file, split sizes, seed, wall time) and
   recomputes the split with ``se3set_ase.data.split_indices``, as ``models/make_card.py`` does.
2. Writes train/valid/test extended-XYZ files (``REF_energy`` eV in ``info``, ``REF_forces``
   eV/Å in ``arrays``) from frames read by ``se3set_ase.data.read_frames``.
3. Trains MACE (mace-torch, small settings, ``--E0s average``) with its own CLI
   ``mace_run_train`` in a separate virtual environment ``.venv-mace`` (mace-torch pins
   e3nn 0.4.4, this project needs e3nn 0.6), and kills it when the wall-clock budget is spent.
   The budget counts MACE's whole training process (data loading and statistics included).
   MACE writes its model file only at the end of training, so after the kill the script reruns
   ``mace_run_train --restart_latest`` with ``--max_num_epochs`` equal to the epoch of the last
   checkpoint: no further training step runs, MACE loads that checkpoint (the best validation
   loss so far; checkpoints are written only on improvement) and saves it as a ``.model``.
4. Evaluates the MACE model (``mace_eval_configs``, float64) and the SE3Set model
   (``SE3SetCalculator``, float64) on the same test frames and prints energy MAE (meV) and force
   MAE (meV/Å, mean over all force components) side by side; writes them as JSON to ``--out``.

The SE3Set model's budget is the ``wall_time_s`` in its metadata (its training loop on the
project's 2-core CPU machines); MACE gets the same number of minutes unless ``--budget-minutes``
says otherwise. Both run on ``--threads`` torch threads (default 1).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MACE_VENV = ROOT / ".venv-mace"
MACE_TORCH_VERSION = "0.3.16"  # the mace-torch release this script was checked against
DEFAULT_BUDGET_MIN = 90.0
MACE_NAME = "mace_small"
ENERGY_KEY = "REF_energy"
FORCES_KEY = "REF_forces"


class BenchError(RuntimeError):
    """A problem the user has to fix (missing metadata, wrong data file, failed MACE run)."""


# ----------------------------------------------------------------------------- the MACE venv
def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def torch_release() -> str:
    """This environment's torch release without the local tag (``2.13.0+cpu`` -> ``2.13.0``)."""
    import torch

    return torch.__version__.split("+")[0]


def run_logged(cmd: list[str], env: dict[str, str] | None = None) -> None:
    """Run ``cmd``, printing it first; raise BenchError if it fails."""
    print("+ " + shlex.join(cmd), flush=True)
    rc = subprocess.call(cmd, env=env)
    if rc != 0:
        raise BenchError(f"command failed with exit status {rc}: {shlex.join(cmd)}")


def setup_mace_venv(venv: Path, mace_version: str) -> None:
    """Create ``venv`` with this environment's torch release (CPU wheel) and then mace-torch.

    torch is installed first and pinned with a constraints file so that installing mace-torch
    cannot replace it (e.g. with a multi-GB CUDA build)."""
    torch_v = torch_release()
    print(f"[setup] creating the MACE environment {venv} (torch {torch_v}, mace-torch {mace_version})")
    if not venv_python(venv).exists():
        run_logged([sys.executable, "-m", "venv", str(venv)])
    pip = [str(venv_python(venv)), "-m", "pip", "install"]
    run_logged(pip + [f"torch=={torch_v}"])
    constraints = venv / "mace-constraints.txt"
    constraints.write_text(f"torch=={torch_v}\n")
    run_logged(pip + ["-c", str(constraints), f"mace-torch=={mace_version}"])
    check_mace_venv(venv, torch_v)


def mace_versions(venv: Path) -> dict[str, str]:
    """torch, e3nn and mace-torch versions inside the MACE venv."""
    code = ("import json, torch, e3nn, importlib.metadata as m; "
            "print(json.dumps({'torch': torch.__version__, 'e3nn': e3nn.__version__, "
            "'mace-torch': m.version('mace-torch')}))")
    out = subprocess.run([str(venv_python(venv)), "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        raise BenchError(f"{venv} does not import torch/e3nn/mace: {out.stderr.strip()[-500:]}\n"
                         f"Rebuild it with: {sys.executable} {Path(__file__).name} --setup")
    return json.loads(out.stdout.strip().splitlines()[-1])


def check_mace_venv(venv: Path, torch_v: str | None = None) -> dict[str, str]:
    """Versions in the MACE venv; BenchError if mace_run_train is missing or torch was replaced."""
    for tool in ("mace_run_train", "mace_eval_configs"):
        if not (venv / "bin" / tool).exists():
            raise BenchError(f"{venv}/bin/{tool} is missing; run with --setup")
    v = mace_versions(venv)
    if torch_v and v["torch"].split("+")[0] != torch_v:
        raise BenchError(f"{venv} has torch {v['torch']}, expected {torch_v}: pip replaced it")
    return v


def ensure_mace_venv(venv: Path, mace_version: str) -> dict[str, str]:
    """Use the MACE venv, creating it when it does not exist yet."""
    if not (venv / "bin" / "mace_run_train").exists():
        print(f"[setup] {venv}/bin/mace_run_train not found: building the MACE environment")
        setup_mace_venv(venv, mace_version)
    return check_mace_venv(venv)


# ----------------------------------------------------------------------------- model and split
@dataclass
class Source:
    """What the SE3Set model file says about its training run."""

    model_path: Path
    data_path: Path
    sizes: dict[str, int]
    seed: int
    wall_time_s: float | None
    epochs: int | None
    device: str | None
    parameters: int | None
    energy_key: str | None
    forces_key: str | None
    metrics: dict[str, Any]
    block: int = 1  # split_block of the training run (contiguous blocks of frames)


def _flag(command: str, name: str) -> str | None:
    """Value of ``--name VALUE`` in a recorded command line, or None."""
    toks = shlex.split(command or "")
    for i, t in enumerate(toks):
        if t == name and i + 1 < len(toks):
            return toks[i + 1]
        if t.startswith(name + "="):
            return t.split("=", 1)[1]
    return None


def read_source(model: str, data: str | None) -> Source:
    """Training metadata of an SE3Set model file, checked to be usable for recomputing the split."""
    from se3set_ase.model.checkpoint import ModelFileError, read_model_file
    from se3set_ase.registry import ModelNotFoundError, resolve_model

    try:
        path = resolve_model(model).resolve()
        meta = read_model_file(path)["metadata"]
    except (ModelNotFoundError, ModelFileError, FileNotFoundError) as exc:
        raise BenchError(str(exc)) from None
    tr = meta.get("training") or {}
    if not tr:
        raise BenchError(f"{path}: no training metadata (not written by `se3set-ase fit`), so its "
                         "split cannot be recomputed")
    fr = tr.get("frames") or {}
    missing = [k for k in ("train", "valid", "test") if k not in fr] + (["seed"] if "seed" not in tr else [])
    if missing:
        raise BenchError(f"{path}: the training metadata lacks {missing} (it has {sorted(tr)}; "
                         f"frames={fr}); the split cannot be recomputed")
    if int(fr["test"]) == 0:
        raise BenchError(f"{path}: the model was trained without a test split (test=0)")
    cmd = tr.get("command") or ""
    if "--valid-file" in cmd or "--test-file" in cmd:
        raise BenchError(f"{path}: trained with --valid-file/--test-file; this script recomputes "
                         "splits of one data file only")
    recorded = tr.get("data")
    if data is None:
        if not recorded:
            raise BenchError(f"{path}: the metadata records no data file; pass --data")
        data_path = Path(recorded)
    else:
        data_path = Path(data)
        if recorded and Path(recorded).name != data_path.name:
            raise BenchError(f"--data {data} is not the file the model was trained on ({recorded})")
    if not data_path.is_file():
        raise BenchError(f"data file {data_path} not found; pass --data PATH (the model was trained "
                         f"on {recorded})")
    return Source(model_path=path, data_path=data_path.resolve(),
                  sizes={k: int(fr[k]) for k in ("train", "valid", "test")}, seed=int(tr["seed"]),
                  block=int(tr.get("split_block", 1)),
                  wall_time_s=tr.get("wall_time_s"), epochs=tr.get("epochs"),
                  device=tr.get("device"), parameters=tr.get("parameters"),
                  energy_key=_flag(cmd, "--energy-key"), forces_key=_flag(cmd, "--forces-key"),
                  metrics=meta.get("metrics") or {})


def load_split(src: Source) -> tuple[list, dict[str, np.ndarray]]:
    """All frames of the data file and the {train, valid, test} indices the model was trained with."""
    from se3set_ase.data import DataError, read_frames, split_indices

    s = src.sizes
    try:
        frames = read_frames(src.data_path, energy_key=src.energy_key, forces_key=src.forces_key)
        split = split_indices(len(frames), train=s["train"], valid=s["valid"], test=s["test"], seed=src.seed,
                              block=src.block)
    except DataError as exc:
        raise BenchError(f"{exc} (split recorded in the model: {s}, seed {src.seed})") from None
    return frames, split


def write_extxyz(frames: list, indices: np.ndarray, path: Path) -> Path:
    """Frames as extended XYZ for MACE: energy (eV) in info[REF_energy], forces (eV/Å) in
    arrays[REF_forces], the data file's frame number in info['frame_index']."""
    import ase.io
    from ase import Atoms

    out = []
    for i in indices:
        f = frames[int(i)]
        a = Atoms(numbers=f.numbers, positions=f.positions, pbc=False)
        a.info[ENERGY_KEY] = float(f.energy)
        a.info["frame_index"] = int(i)
        a.arrays[FORCES_KEY] = np.asarray(f.forces, dtype=np.float64)
        out.append(a)
    path.parent.mkdir(parents=True, exist_ok=True)
    ase.io.write(path, out, format="extxyz")
    return path


# ----------------------------------------------------------------------------- MACE training
def mace_train_args(files: dict[str, Path], work: Path, seed: int, dtype: str, extra: list[str]) -> list[str]:
    """mace_run_train arguments (flags checked against mace-torch 0.3.16 ``--help``)."""
    return [
        "--name", MACE_NAME, "--work_dir", str(work), "--seed", str(seed),
        "--train_file", str(files["train"]), "--valid_file", str(files["valid"]),
        "--energy_key", ENERGY_KEY, "--forces_key", FORCES_KEY, "--E0s", "average",
        "--model", "MACE", "--hidden_irreps", "32x0e + 32x1o", "--r_max", "5.0",
        "--num_interactions", "2", "--correlation", "3", "--max_ell", "3",
        "--loss", "weighted", "--energy_weight", "1.0", "--forces_weight", "100.0",
        "--batch_size", "4", "--valid_batch_size", "16", "--lr", "0.01", "--amsgrad",
        "--ema", "--ema_decay", "0.99", "--error_table", "TotalMAE",
        "--max_num_epochs", "100000", "--patience", "100000", "--eval_interval", "1",
        "--keep_checkpoints", "--default_dtype", dtype, "--device", "cpu",
        "--num_workers", "0", "--pin_memory", "False", "--plot", "False", "--save_cpu",
        *extra,
    ]


def thread_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[k] = str(threads)
    return env


def _print_new_epochs(log: Path, seen: int) -> int:
    """Print the 'Epoch N: ...' validation lines of MACE's output not printed yet; return the count."""
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if re.search(r"\bEpoch \d+:", ln)]
    except OSError:
        return seen
    for ln in lines[seen:]:
        print("  [mace] " + ln.split(" INFO: ")[-1].strip(), flush=True)
    return len(lines)


def group_cpu_seconds(pgid: int) -> float:
    """CPU time (user + system, s) used so far by the processes of group ``pgid`` (Linux ``/proc``),
    including that of their children already waited for."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended while we looked
        # fields[0] is the state (field 3 of proc(5)): pgrp is field 5, utime..cstime fields 14-17
        if int(fields[2]) == pgid:
            total += sum(int(x) for x in fields[11:15])
    return total / tick


def train_mace_budgeted(venv: Path, args: list[str], budget_s: float, threads: int, log: Path,
                        clock: str = "wall") -> dict[str, Any]:
    """Run mace_run_train until it ends or its budget of ``budget_s`` seconds is spent, then kill its
    process group. ``clock='wall'`` counts wall-clock seconds; ``clock='cpu'`` counts the CPU seconds
    of MACE's process group, so that other jobs on the machine (or a pause) do not shorten its
    budget. Returns {wall_s, cpu_s, stopped: 'budget'|'finished'}."""
    cmd = [str(venv / "bin" / "mace_run_train"), *args]
    print(f"[mace] training for at most {budget_s / 60:.1f} min: {shlex.join(cmd)}", flush=True)
    print(f"[mace] output -> {log}", flush=True)
    t0 = time.monotonic()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=thread_env(threads),
                                start_new_session=True)
        seen, cpu = 0, 0.0

        def spent() -> float:
            return time.monotonic() - t0 if clock == "wall" else cpu

        try:
            while proc.poll() is None and spent() < budget_s:
                time.sleep(2.0)
                cpu = max(cpu, group_cpu_seconds(proc.pid))
                seen = _print_new_epochs(log, seen)
        finally:
            stopped = "finished" if proc.poll() is not None else "budget"
            if stopped == "budget":
                cpu = max(cpu, group_cpu_seconds(proc.pid))
                os.killpg(proc.pid, signal.SIGKILL)  # the group this script started, nothing else
                proc.wait()
    wall = time.monotonic() - t0
    _print_new_epochs(log, seen)
    if stopped == "finished" and proc.returncode != 0:
        raise BenchError(f"mace_run_train failed (exit status {proc.returncode}); last lines of {log}:\n"
                         + "\n".join(log.read_text(errors="replace").splitlines()[-25:]))
    print(f"[mace] {'budget spent' if stopped == 'budget' else 'training ended'} after {wall / 60:.2f} min "
          f"wall, {cpu / 60:.2f} min CPU", flush=True)
    return {"wall_s": wall, "cpu_s": cpu, "stopped": stopped}


def _ckpt_epoch(p: Path) -> int:
    return int(re.search(r"_epoch-(\d+)\.pt$", p.name).group(1))


def latest_readable_checkpoint(venv: Path, ckpt_dir: Path) -> tuple[Path, int]:
    """Newest MACE checkpoint that loads; a file cut short by the kill is deleted (MACE's
    ``--restart_latest`` would otherwise pick it)."""
    ckpts = sorted(ckpt_dir.glob(f"{MACE_NAME}_run-*_epoch-*.pt"), key=_ckpt_epoch, reverse=True)
    if not ckpts:
        raise BenchError(f"MACE wrote no checkpoint in {ckpt_dir}: the budget ended before its first "
                         "epoch and validation; raise --budget-minutes")
    probe = "import sys, torch; torch.load(sys.argv[1], map_location='cpu', weights_only=False)"
    for p in ckpts:
        ok = subprocess.run([str(venv_python(venv)), "-c", probe, str(p)], capture_output=True).returncode == 0
        if ok:
            return p, _ckpt_epoch(p)
        print(f"[mace] {p.name} is unreadable (written when the budget ran out): deleting it")
        p.unlink()
    raise BenchError(f"no readable MACE checkpoint in {ckpt_dir}")


def export_mace_model(venv: Path, args: list[str], work: Path, threads: int, log: Path) -> tuple[Path, int]:
    """The MACE model file of the best checkpoint: rerun mace_run_train with --restart_latest and
    --max_num_epochs = that checkpoint's epoch, so it trains no further step and only saves."""
    model = work / f"{MACE_NAME}.model"
    if model.exists():
        model.unlink()
    ckpt, epoch = latest_readable_checkpoint(venv, work / "checkpoints")
    print(f"[mace] exporting checkpoint {ckpt.name} (epoch {epoch}) to {model.name}", flush=True)
    cmd = [str(venv / "bin" / "mace_run_train"), *args, "--max_num_epochs", str(epoch), "--restart_latest"]
    with open(log, "w") as fh:
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=thread_env(threads))
    text = log.read_text(errors="replace")
    if rc != 0 or not model.exists():
        raise BenchError(f"exporting the MACE model failed (exit status {rc}); last lines of {log}:\n"
                         + "\n".join(text.splitlines()[-25:]))
    if f"from epoch {epoch}" not in text or re.search(r"\bEpoch \d+:", text):
        raise BenchError(f"{log}: MACE did not just load and save the epoch-{epoch} checkpoint "
                         "(it reports another epoch or trained further)")
    return model, epoch


def mace_parameters(venv: Path, model: Path) -> int:
    code = ("import sys, torch; m = torch.load(sys.argv[1], map_location='cpu', weights_only=False); "
            "print(sum(p.numel() for p in m.parameters()))")
    out = subprocess.run([str(venv_python(venv)), "-c", code, str(model)], capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else -1


# ----------------------------------------------------------------------------- evaluation
def errors(e_pred: np.ndarray, f_pred: list[np.ndarray], frames: list) -> dict[str, float]:
    """Energy MAE (meV), per-atom energy MAE (meV/atom), force MAE and RMSE (meV/Å, over all
    force components) of predictions (eV, eV/Å) against the frames' labels."""
    de = np.asarray(e_pred) - np.array([f.energy for f in frames])
    n = np.array([len(f) for f in frames])
    df = np.concatenate([(p - f.forces).ravel() for p, f in zip(f_pred, frames)])
    return {"energy_mae_meV": 1000 * float(np.abs(de).mean()),
            "energy_mae_meV_per_atom": 1000 * float(np.abs(de / n).mean()),
            "forces_mae_meV_A": 1000 * float(np.abs(df).mean()),
            "forces_rmse_meV_A": 1000 * float(np.sqrt((df ** 2).mean())),
            "n_frames": len(frames)}


def mace_model_float64(venv: Path, model: Path) -> Path:
    """A float64 copy of a MACE model file (mace_eval_configs sets the default dtype but does not
    convert the model's weights, so a float32-trained model must be converted first)."""
    out = model.with_name(model.stem + "_float64.model")
    code = ("import sys, torch; m = torch.load(sys.argv[1], map_location='cpu', weights_only=False); "
            "torch.save(m.double(), sys.argv[2])")
    res = subprocess.run([str(venv_python(venv)), "-c", code, str(model), str(out)], capture_output=True, text=True)
    if res.returncode != 0:
        raise BenchError(f"converting {model} to float64 failed: {res.stderr.strip()[-1000:]}")
    return out


def eval_mace(venv: Path, model: Path, test_xyz: Path, frames: list, threads: int, work: Path) -> dict[str, float]:
    """Test errors of the MACE model with mace_eval_configs in float64."""
    import ase.io

    out = work / "test_pred.xyz"
    model = mace_model_float64(venv, model)
    cmd = [str(venv / "bin" / "mace_eval_configs"), "--configs", str(test_xyz), "--model", str(model),
           "--output", str(out), "--device", "cpu", "--default_dtype", "float64", "--batch_size", "16"]
    print("[mace] " + shlex.join(cmd), flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True, env=thread_env(threads))
    if res.returncode != 0:
        raise BenchError(f"mace_eval_configs failed: {res.stderr.strip()[-1500:]}")
    pred = ase.io.read(out, ":")
    if [int(a.info["frame_index"]) for a in pred] != [int(f.info["_index"]) for f in frames]:
        raise BenchError(f"{out}: predictions are not in the order of the test frames")
    return errors(np.array([a.info["MACE_energy"] for a in pred]), [a.arrays["MACE_forces"] for a in pred], frames)


def eval_se3set(model_path: Path, frames: list) -> dict[str, float]:
    """Test errors of the SE3Set model with SE3SetCalculator in float64 on CPU."""
    import torch

    from se3set_ase.calculator import SE3SetCalculator

    calc = SE3SetCalculator(str(model_path), device="cpu", dtype=torch.float64)
    e, f = [], []
    for fr in frames:
        atoms = fr.to_atoms()
        atoms.calc = calc
        e.append(atoms.get_potential_energy())
        f.append(atoms.get_forces().copy())
    return errors(np.array(e), f, frames)


# ----------------------------------------------------------------------------- report
def _cell(x: Any, fmt: str) -> str:
    return "?" if x is None or (isinstance(x, (int, float)) and x < 0) else format(x, fmt)


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: model, parameters, training wall clock (min), epochs, test MAEs."""
    head = ("model", "params", "train min", "epochs", "test E MAE meV", "test F MAE meV/Å")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = (r["model"], _cell(r.get("params"), ","), _cell(r.get("train_min"), ".1f"),
                 _cell(r.get("epochs"), "d"), f"{r['energy_mae_meV']:.2f}", f"{r['forces_mae_meV_A']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("model", nargs="?", help="SE3Set model file (e.g. models/md17_aspirin.pt) or shipped name")
    p.add_argument("--data", help="its training data file (default: the path in the model's metadata)")
    p.add_argument("--budget-clock", choices=("wall", "cpu"), default="wall",
                   help="what MACE's budget counts: wall-clock time (default) or the CPU time of its "
                   "process group (fair when other jobs share the cores or the run is paused)")
    p.add_argument("--budget-minutes", type=float, help="MACE budget in minutes (default: the "
                   f"SE3Set model's recorded training wall time, else {DEFAULT_BUDGET_MIN:g})")
    p.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads for MACE and SE3Set (default 1)")
    p.add_argument("--mace-dtype", choices=("float32", "float64"), default="float32",
                   help="MACE training precision (default float32, as the SE3Set models; evaluation is float64)")
    p.add_argument("--mace-arg", action="append", default=[], metavar="ARG",
                   help="extra mace_run_train argument, repeatable; later flags override (e.g. --mace-arg=--lr=0.005)")
    p.add_argument("--work-dir", help="where split files and MACE's run go (default runs/mace_side_by_side/<model>)")
    p.add_argument("--out", help="result JSON (default <work-dir>/result.json)")
    p.add_argument("--venv", default=str(MACE_VENV), help=f"the MACE virtual environment (default {MACE_VENV})")
    p.add_argument("--mace-version", default=MACE_TORCH_VERSION, help="mace-torch release for --setup")
    p.add_argument("--setup", action="store_true", help="create/repair the MACE venv, then exit")
    args = p.parse_args(argv)
    if not args.setup and not args.model:
        p.error("MODEL is required (or --setup)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    venv = Path(args.venv).resolve()
    if args.setup:
        setup_mace_venv(venv, args.mace_version)
        print(f"[setup] ready: {mace_versions(venv)}")
        return 0
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    src = read_source(args.model, args.data)
    versions = ensure_mace_venv(venv, args.mace_version)
    print(f"[mace] environment {venv}: {versions}")

    work = Path(args.work_dir or ROOT / "runs" / "mace_side_by_side" / src.model_path.stem).resolve()
    os.environ.setdefault("SE3SET_CACHE_DIR", str(work / "h5cache"))  # never next to shared data
    import torch

    torch.set_num_threads(args.threads)
    frames, split = load_split(src)
    for i, f in enumerate(frames):
        f.info["_index"] = i
    print(f"[data] {src.data_path}: {len(frames)} frames, split train/valid/test = "
          f"{len(split['train'])}/{len(split['valid'])}/{len(split['test'])}, seed {src.seed}")
    if any(f.charge for f in frames):
        print("[data] WARNING: charged frames; MACE (default settings) does not see the charge")
    files = {k: write_extxyz(frames, split[k], work / "data" / f"{k}.xyz") for k in ("train", "valid", "test")}
    test = [frames[int(i)] for i in split["test"]]

    if args.budget_minutes is not None:
        budget_min, budget_from = args.budget_minutes, "--budget-minutes"
    elif src.wall_time_s:
        budget_min, budget_from = float(src.wall_time_s) / 60, "SE3Set wall_time_s in the model metadata"
        if src.device and src.device != "cpu":
            print(f"WARNING: the SE3Set model was trained on {src.device}, not on CPU: its wall time is no "
                  "CPU budget; pass --budget-minutes")
    else:
        budget_min, budget_from = DEFAULT_BUDGET_MIN, "default (no wall time in the model metadata)"
    print(f"[mace] budget {budget_min:.1f} min ({budget_from}), {args.threads} thread(s)")

    mace_work = work / "mace"
    if mace_work.exists():
        print(f"[mace] removing the previous MACE run {mace_work}")
        shutil.rmtree(mace_work)
    mace_work.mkdir(parents=True)
    targs = mace_train_args(files, mace_work, src.seed, args.mace_dtype, args.mace_arg)
    run = train_mace_budgeted(venv, targs, budget_min * 60, args.threads, mace_work / "train.out",
                              clock=args.budget_clock)
    model, epoch = export_mace_model(venv, targs, mace_work, args.threads, mace_work / "export.out")
    n_epochs = _print_new_epochs(mace_work / "train.out", 10 ** 9)

    print(f"[eval] MACE on {len(test)} test frames (float64)")
    mace_err = eval_mace(venv, model, files["test"], test, args.threads, mace_work)
    print(f"[eval] SE3Set {src.model_path.name} on the same {len(test)} test frames (float64)")
    se3_err = eval_se3set(src.model_path, test)
    meta_f = (src.metrics.get("test") or {}).get("forces_mae_meV_A")
    split_ok = meta_f is None or abs(se3_err["forces_mae_meV_A"] - meta_f) <= 0.01 * meta_f
    if not split_ok:
        print(f"WARNING: SE3Set test force MAE {se3_err['forces_mae_meV_A']:.3f} differs from its metadata "
              f"({meta_f:.3f} meV/Å) by more than 1 %: the split or the data differ from training")

    se3_min = float(src.wall_time_s) / 60 if src.wall_time_s else None
    rows = [{"model": f"SE3Set {src.model_path.name}", "params": src.parameters, "train_min": se3_min,
             "epochs": src.epochs, **se3_err},
            {"model": f"MACE small (mace-torch {versions['mace-torch']}, best epoch {epoch})",
             "params": mace_parameters(venv, model),
             "train_min": (run["wall_s"] if args.budget_clock == "wall" else run["cpu_s"]) / 60, "epochs": n_epochs,
             **mace_err}]
    print(f"\nTest set: {len(test)} frames of {src.data_path.name} (split seed {src.seed}), float64. "
          f"MACE budget {budget_min:.1f} min of {args.budget_clock} time ({budget_from}), {args.threads} thread(s).")
    if se3_min is None or abs(se3_min - budget_min) > 0.02 * se3_min:
        print(f"NOTE: the budgets differ (SE3Set trained {_cell(se3_min, '.1f')} min): "
              "NOT an equal-budget comparison.")
    print(table(rows))
    result = {
        "rows": rows, "data": str(src.data_path), "model_file": str(src.model_path),
        "split": {"function": "se3set_ase.data.split_indices", "n": len(frames), **src.sizes, "seed": src.seed,
                  "test_indices": [int(i) for i in split["test"]]},
        "budget": {"minutes": budget_min, "from": budget_from, "threads": args.threads, "clock": args.budget_clock,
                   "mace_counts": "the whole mace_run_train process (data loading, statistics, training)"},
        "mace": {"versions": versions, "train_args": targs, "stopped": run["stopped"], "wall_s": run["wall_s"],
                 "cpu_s": run["cpu_s"],
                 "epochs_validated": n_epochs, "exported_epoch": epoch, "model": str(model),
                 "train_dtype": args.mace_dtype},
        "se3set_metadata_test": src.metrics.get("test"), "split_check_ok": split_ok,
        "eval_dtype": "float64", "host": platform.node(), "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = Path(args.out) if args.out else work / "result.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        sys.exit(f"error: {exc}")
