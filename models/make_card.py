#!/usr/bin/env python
"""Measure a model and write its model card: ``models/NAME.json`` (every figure, machine-readable),
``models/NAME.md`` (the card, rendered from the JSON only) and ``models/README.md`` (a table of every
``models/*.json``).

    python models/make_card.py md17_aspirin --data /work/shared/data/md17/aspirin.extxyz
    python models/make_card.py /tmp/run/dev.pt --data DATA --quick --out-dir /tmp/cards
    python models/make_card.py --readme-only            # regenerate models/README.md only
    python models/make_card.py gfn2_stachyose --data DATA --compile --langevin-dtype float32
                          # MD through compile=True, float32 Langevin: ~3x faster for big molecules

NAME is a model name (resolved like ``SE3SetCalculator(NAME)``) or a path to a ``.pt`` file; the
card is named after the file's stem. Everything in the card is measured here; nothing is typed by
hand except the documented facts about the data sources (level of theory, MD17 temperature, the
sGDML 2018 force targets), which are constants below with their sources.

Determinism: the split is recomputed with ``se3set_ase.data.split_indices`` from the sizes and
seed in the model's metadata (the counts ``prepare_data`` resolved, so the same permutation slices),
errors are evaluated in float64, and every random number (MD velocities, Langevin noise, FD
components) comes from seeded ``numpy.random.default_rng``. torch runs with ``--threads`` threads
(default 1) so that reductions, and hence the chaotic MD trajectories, are reproducible. A rerun on
the same software gives identical figures except the timings (keys listed in
``machine_dependent``). A rerun must use the card's own command: ``--compile`` and
``--langevin-dtype`` change the rounding, hence the MD trajectories (not their meaning).

Resume: the measurement keeps its progress in ``OUT_DIR/NAME.card-progress`` (the finished
phases, and the MD run in flight every ``--save-every-minutes`` and on SIGTERM or ``--max-time``).
The same command run again continues where it stopped and gives the figures of an unbroken run
(positions, momenta and the noise generator's state are stored exactly; the calculator's bond
hysteresis is restored by one call at the start frame). The state file is removed when the card is
written; one made with other arguments or for another model or data file is refused.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import signal
import statistics
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
KCAL_MOL_EV = 0.0433641043  # 1 kcal/mol in eV
CARD_VERSION = 1

# --- documented facts about the data sources (not measured; sources given in the card) ------------
MD17_LEVEL = "DFT, PBE+vdW-TS (as documented for MD17; the data files do not record it)"
MD17_SOURCE = ("MD17 frames recovered from the 2018 sGDML model files (stefanch/sGDML commit 1017258, "
               "models/<molecule>.npz): geometries exact, forces = original training labels (<= 2e-5 eV/Å), "
               "energies = the sGDML model's own prediction (~5.6 meV MAE from the DFT labels), "
               "see /work/shared/data/README.md")
MD17_TEMPERATURE_K = 500.0
MD17_TEMPERATURE_NOTE = "500 K, the temperature of the MD17 reference AIMD trajectories (Chmiela et al., Sci. Adv. 2017)"
GFN2_LEVEL = "GFN2-xTB (semi-empirical tight binding) via tblite"
GFN2_SOURCE = ("GFN2-xTB Langevin MD frames made by /work/shared/data/gfn2/make_gfn2.py "
               "(RDKit embedding + MMFF, tblite, ASE Langevin, one trajectory, 10 fs frame spacing), "
               "see /work/shared/data/README.md")
# sGDML (Chmiela et al., Nat. Commun. 2018) force MAE on MD17, meV/Å
SGDML_2018_FORCE_MAE = {"aspirin": 29.4, "ethanol": 14.5, "malonaldehyde": 18.0, "naphthalene": 4.9,
                        "paracetamol": 21.4, "salicylic_acid": 12.2, "toluene": 6.2, "uracil": 10.5}
MD17_ENERGY_NOISE_MEV = 6.0
LANGEVIN_FRICTION_PER_FS = 0.01  # as in the GFN2 data generation
FD_STEP_A = 1e-4
FD_FLOOR_EV_A = 0.05  # relative FD error = |FD - F| / max(|F|, floor)
MACHINE_DEPENDENT = ["timing", "langevin.wall_time_s", "langevin.ms_per_step", "nve.wall_time_s",
                     "nve.ms_per_step", "card.host", "card.generated_utc",
                     "atom_order.abs_dE_meV", "atom_order.max_abs_dF_meV_A"]
# |ΔE| (meV) and max |ΔF| (meV/Å) below which two atom orders agree to float64 rounding
ORDER_INVARIANT_MEV = 1e-6


# ----------------------------------------------------------------------------- helpers
def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def git_commit() -> str | None:
    """The repository commit of the code that measures (``+dirty`` with uncommitted changes to the
    package or this script), or None outside a git checkout."""
    import subprocess

    root = HERE.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "se3set_ase", "models/make_card.py"],
                               cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sample_source(info: dict) -> str:
    """How ``se3set-ase sample`` made a file, from the keys it writes into every frame's info."""
    spacing = float(info.get("dt_fs", 0.5)) * int(info.get("every", 20))
    return (f"GFN2-xTB Langevin MD frames made by `se3set-ase sample {info.get('system')} "
            f"--temperature {float(info.get('temperature_K')):g} --seed {info.get('seed')}` "
            f"(se3set-ase {info.get('se3set_ase_version')}, tblite {info.get('tblite_version')}, "
            f"RDKit embedding, ASE Langevin, friction {info.get('friction_per_fs')}/fs, "
            f"dt {info.get('dt_fs')} fs, one trajectory, {spacing:g} fs frame spacing, a fresh SCF per frame)")


def data_path_for_card(data: Path) -> str:
    """The data file as the card records it: relative to the repository when it is inside it (data
    committed with the model, found again from any clone), else absolute."""
    root = HERE.parent
    try:
        return data.relative_to(root).as_posix()
    except ValueError:
        return str(data)


def data_kind(data: Path, frames) -> dict:
    """Source, level of theory, molecule and MD temperature of a data file."""
    info0 = frames[0].info if frames else {}
    method = str(info0.get("method", ""))
    mol = data.name.split(".")[0]
    if data.parent.name == "md17":
        return {"kind": "md17", "molecule": mol, "level_of_theory": MD17_LEVEL, "source": MD17_SOURCE,
                "temperature_K": MD17_TEMPERATURE_K, "temperature_note": MD17_TEMPERATURE_NOTE}
    if method.upper().startswith("GFN2") or data.parent.name == "gfn2":
        t = info0.get("temperature_K")
        return {"kind": "gfn2", "molecule": str(info0.get("system", mol)),
                "level_of_theory": GFN2_LEVEL + (f" (file: method={method})" if method else ""),
                "source": sample_source(info0) if "se3set_ase_version" in info0 and t is not None else GFN2_SOURCE,
                "temperature_K": float(t) if t is not None else None,
                "temperature_note": "info['temperature_K'] of the data file (the sampling temperature)"}
    return {"kind": "other", "molecule": mol, "level_of_theory": "unknown (not recorded in the file)",
            "source": str(data), "temperature_K": None, "temperature_note": "not recorded; pass --temperature"}


def frame_atoms(frame):
    from ase import Atoms

    a = Atoms(numbers=frame.numbers.copy(), positions=frame.positions.copy())
    if frame.charge:
        a.info["charge"] = frame.charge
    return a


def metrics_block(m: dict) -> dict:
    """Metrics from training.metrics.evaluate plus kcal/mol conversions."""
    if not m:
        return {}
    out = dict(m)
    out["energy_mae_kcal_mol"] = m["energy_mae_meV"] / 1000 / KCAL_MOL_EV
    out["energy_rmse_kcal_mol"] = m["energy_rmse_meV"] / 1000 / KCAL_MOL_EV
    out["forces_mae_kcal_mol_A"] = m["forces_mae_meV_A"] / 1000 / KCAL_MOL_EV
    out["forces_rmse_kcal_mol_A"] = m["forces_rmse_meV_A"] / 1000 / KCAL_MOL_EV
    return out


def per_frame_errors(errors) -> dict[str, list[float]]:
    """The card's per-frame table of ``training.metrics.FrameErrors``: energy error (meV), energy
    error per atom (meV/atom), force MAE and RMSE over each frame's components (meV/Å)."""
    de = 1000 * errors.energy
    return {"energy_err_meV": de.tolist(), "energy_err_meV_per_atom": (de / errors.n_atoms).tolist(),
            "forces_mae_meV_A": (1000 * errors.forces_mae()).tolist(),
            "forces_rmse_meV_A": (1000 * errors.forces_rmse()).tolist()}


def duplicates_across(frames, a_idx, b_idx, tol: float = 1e-8) -> int:
    """Frames of b_idx whose geometry (all pair distances) equals one of a_idx's."""
    import numpy as np

    def dvec(fr):
        p = fr.positions
        d = np.linalg.norm(p[:, None] - p[None], axis=-1)
        return d[np.triu_indices(len(p), 1)]

    a = np.array([dvec(frames[i]) for i in a_idx])
    n = 0
    for j in b_idx:
        if len(a) and np.min(np.max(np.abs(a - dvec(frames[j])), axis=1)) < tol:
            n += 1
    return n


# ----------------------------------------------------------------------------- resumable progress
class Stopped(Exception):
    """The run stopped on SIGTERM or ``--max-time`` after saving its progress."""


class Progress:
    """The finished phases and the MD in flight of one card run, kept in a JSON file.

    ``key`` names what the measurement depends on (model and data checksums, every measuring
    argument); a state file with another key is refused. Floats go through JSON unchanged
    (Python writes the shortest repr that reads back to the same double)."""

    def __init__(self, path: Path, key: dict, save_every_s: float = 600.0, max_time_s: float | None = None):
        self.path, self.key = path, key
        self.save_every_s, self.max_time_s = save_every_s, max_time_s
        self.t_start = time.monotonic()
        self.last_save = self.t_start
        self.signal = None
        if path.exists():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                sys.exit(f"{path}: unreadable card state ({exc}); delete it to start over")
            if data.get("key") != key:
                diff = sorted(k for k in set(key) | set(data.get("key", {})) if key.get(k) != data.get("key", {}).get(k))
                sys.exit(f"{path} was made for another run (differs in: {', '.join(diff)}); "
                         "rerun that command or delete the file to start over")
            self.data = data
        else:
            self.data = {"key": key, "phases": {}, "inflight": {}, "runs": []}
        self.resumed = bool(self.data["phases"] or self.data["inflight"])

    def __enter__(self):
        self._old = signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self._old)
        return False

    def _on_signal(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data))
        os.replace(tmp, self.path)
        self.last_save = time.monotonic()

    def phase(self, name: str):
        return self.data["phases"].get(name)

    def finish(self, name: str, value) -> None:
        self.data["phases"][name] = value
        self.data["inflight"].pop(name, None)
        self.save()
        self.check(name)

    def stop_reason(self) -> str | None:
        if self.signal:
            return self.signal
        if self.max_time_s is not None and time.monotonic() - self.t_start >= self.max_time_s:
            return "max-time"
        return None

    def check(self, where: str) -> None:
        """Between phases: stop here (progress already saved) if asked to."""
        why = self.stop_reason()
        if why:
            raise Stopped(f"stopped ({why}) after {where}; progress in {self.path}: rerun the same command to continue")

    def md(self, name: str):
        """The saved snapshot of MD phase ``name``, or None."""
        return self.data["inflight"].get(name)

    def md_step(self, name: str, snapshot) -> None:
        """After an MD step: save the snapshot (a callable giving it) when due, stop if asked to."""
        why = self.stop_reason()
        if why or time.monotonic() - self.last_save >= self.save_every_s:
            snap = snapshot()
            self.data["inflight"][name] = snap
            self.save()
            if why:
                raise Stopped(f"stopped ({why}) in {name} at MD step {snap['step']}; progress in {self.path}: "
                              "rerun the same command to continue")


def _md_state(atoms, calc) -> dict:
    """What a snapshot needs to continue the MD exactly: positions, momenta and, with a Verlet
    skin (``compile=True`` sets one), where the calculator's cross-token list was built: extra
    zero-weight tokens change the forces' rounding, and MD amplifies rounding."""
    ref = calc.fragmenter.verlet_reference()
    return {"positions": atoms.positions.tolist(), "momenta": atoms.get_momenta().tolist(),
            "verlet_reference": None if ref is None else ref.tolist()}


def _start_or_restore(atoms, calc, frame, snap: dict | None, temperature: float, seed: int) -> None:
    """Put ``calc`` on ``atoms`` with the MD's initial state. Fresh (``snap`` None): seeded
    Maxwell-Boltzmann velocities at ``temperature``, no net momentum or rotation. Resumed: the
    saved positions and momenta, exactly (no constraint applied), after one call of ``calc`` at the
    start ``frame``: the calculator then holds the start's bonds for its hysteresis, as the unbroken
    run's did (while the run is stable its bonds equal those, see ``bond_set(previous=...)``), and
    its cross-token list is rebuilt where the unbroken run's was (:func:`_md_state`)."""
    import numpy as np
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary, ZeroRotation

    if snap is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=np.random.default_rng(seed))
        Stationary(atoms)
        ZeroRotation(atoms)
    else:
        start = frame_atoms(frame)
        start.calc = calc
        start.get_forces()
        if snap.get("verlet_reference") is not None:
            calc.fragmenter.restore_verlet(np.array(snap["verlet_reference"]))
        atoms.positions = np.array(snap["positions"])
        atoms.set_momenta(np.array(snap["momenta"]), apply_constraint=False)
    atoms.calc = calc


# ----------------------------------------------------------------------------- measurements
def run_langevin(model_path, frame, temperature, ps, dt_fs, seed, compile=False, dtype="float64",
                 progress: Progress | None = None):
    """Langevin MD from ``frame`` (fixed centre of mass) until ``ps`` or a bond change; resumable
    through ``progress`` (phase ``langevin``)."""
    import numpy as np
    from ase import units
    from ase.constraints import FixCom
    from ase.md.langevin import Langevin

    import torch
    from se3set_ase import SE3SetCalculator
    from se3set_ase.data.sample import bond_set

    atoms = frame_atoms(frame)
    calc = SE3SetCalculator(model_path, device="cpu", dtype=getattr(torch, dtype), compile=compile)
    bonds0 = bond_set(atoms.numbers, atoms.positions)
    snap = progress.md("langevin") if progress else None
    _start_or_restore(atoms, calc, frame, snap, temperature, seed)
    start, temps, wall0 = (0, [], 0.0) if snap is None else (snap["step"], list(snap["temperatures"]),
                                                               snap["wall_time_s"])
    n_steps = int(round(ps * 1000 / dt_fs))
    atoms.set_constraint(FixCom())  # centre of mass fixed (ASE's replacement for Langevin(fixcm=True))
    rng = np.random.default_rng(seed + 1)
    if snap is not None:
        rng.bit_generator.state = snap["rng_state"]
    dyn = Langevin(atoms, timestep=dt_fs * units.fs, temperature_K=temperature, fixcm=False,
                   friction=LANGEVIN_FRICTION_PER_FS / units.fs, rng=rng)
    event = None
    t0 = time.perf_counter()
    done = start

    def snapshot():
        return {"step": done, **_md_state(atoms, calc), "rng_state": rng.bit_generator.state, "temperatures": temps,
                "wall_time_s": wall0 + time.perf_counter() - t0}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TopologyChangeWarning: detected below with bond_set
        for step in range(start + 1, n_steps + 1):
            try:
                dyn.run(1)
            except Exception as exc:  # noqa: BLE001 - a failed force call is an instability too
                event = {"step": step, "time_ps": step * dt_fs / 1000, "kind": f"error: {type(exc).__name__}: {str(exc)[:200]}"}
                break
            done = step
            pos = atoms.positions
            if not np.isfinite(pos).all():
                event = {"step": step, "time_ps": step * dt_fs / 1000, "kind": "non-finite positions"}
                break
            b = bond_set(atoms.numbers, pos, previous=bonds0)  # hysteresis, as the calculator's
            if b != bonds0:
                event = {"step": step, "time_ps": step * dt_fs / 1000, "kind": "bond topology changed",
                         "broken": sorted(map(list, bonds0 - b))[:8], "formed": sorted(map(list, b - bonds0))[:8]}
                break
            temps.append(float(atoms.get_temperature()))
            if progress is not None and step < n_steps:
                progress.md_step("langevin", snapshot)
    wall = wall0 + time.perf_counter() - t0
    return {"temperature_K": temperature, "requested_ps": ps, "dt_fs": dt_fs, "steps_requested": n_steps, "dtype": dtype,
            "steps_done": done, "friction_per_fs": LANGEVIN_FRICTION_PER_FS, "seed": seed,
            "velocity_seed": seed, "noise_seed": seed + 1, "n_bonds": len(bonds0),
            "stable": event is None, "event": event,
            "mean_temperature_K": float(np.mean(temps)) if temps else None,
            "wall_time_s": wall, "ms_per_step": 1000 * wall / max(done + (event is not None), 1),
            **compiled_note(calc, compile)}


def run_nve(model_path, frame, ps, dt_fs, seed, compile=False, progress: Progress | None = None):
    """Velocity Verlet from ``frame`` at 300 K initial velocities: the drift of the total energy;
    resumable through ``progress`` (phase ``nve``)."""
    import numpy as np
    from ase import units
    from ase.md.verlet import VelocityVerlet

    import torch
    from se3set_ase import SE3SetCalculator
    from se3set_ase.data.sample import bond_set

    atoms = frame_atoms(frame)
    calc = SE3SetCalculator(model_path, device="cpu", dtype=torch.float64, compile=compile)
    bonds0 = bond_set(atoms.numbers, atoms.positions)
    snap = progress.md("nve") if progress else None
    _start_or_restore(atoms, calc, frame, snap, 300.0, seed)
    n_steps = int(round(ps * 1000 / dt_fs))
    dyn = VelocityVerlet(atoms, timestep=dt_fs * units.fs)
    if snap is None:
        e0 = atoms.get_potential_energy() + atoms.get_kinetic_energy()
        t, e, start, wall0 = [0.0], [e0], 0, 0.0
    else:
        e0, t, e, start, wall0 = snap["e0"], list(snap["t"]), list(snap["e"]), snap["step"], snap["wall_time_s"]
    topo = None
    stop = None
    t0 = time.perf_counter()
    done = start

    def snapshot():
        return {"step": done, **_md_state(atoms, calc), "e0": e0, "t": t, "e": e, "wall_time_s": wall0 + time.perf_counter() - t0}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(start + 1, n_steps + 1):
            try:
                dyn.run(1)
            except Exception as exc:  # noqa: BLE001 - e.g. fragmentation fails once atoms fly apart
                stop = f"error at step {step}: {type(exc).__name__}: {str(exc)[:200]}"
                break
            etot = atoms.get_potential_energy() + atoms.get_kinetic_energy()
            if not np.isfinite(etot):
                stop = f"non-finite energy at step {step}"
                break
            e.append(etot)
            t.append(step * dt_fs / 1000)
            done = step
            if bond_set(atoms.numbers, atoms.positions, previous=bonds0) != bonds0:
                topo = step  # drift across a bond change is meaningless: stop here
                stop = f"bond topology changed at step {step}"
                break
            if progress is not None and step < n_steps:
                progress.md_step("nve", snapshot)
    wall = wall0 + time.perf_counter() - t0
    t, e = np.array(t), np.array(e)
    n = len(atoms)
    slope = float(np.polyfit(t, e, 1)[0]) if len(e) > 2 else float("nan")  # eV/ps
    dev = np.abs(e - e0)
    return {"ps": ps, "dt_fs": dt_fs, "steps": int(len(e) - 1), "init_temperature_K": 300.0, "seed": seed,
            "dtype": "float64", "drift_meV_per_atom_per_ps": 1000 * slope / n,
            "max_abs_dE_meV": float(1000 * dev.max()), "max_abs_dE_meV_per_atom": float(1000 * dev.max() / n),
            "topology_changed_at_step": topo, "completed": stop is None, "stopped": stop,
            "wall_time_s": wall, "ms_per_step": 1000 * wall / max(len(e) - 1, 1),
            **compiled_note(calc, compile)}


def compiled_note(calc, requested: bool) -> dict:
    """With ``--compile``: whether the compiled graph ran to the end (a fallback to eager shows as
    ``compiled: false``) and how many graphs were compiled."""
    if not requested:
        return {}
    c = calc.compiled
    return {"compiled": c is not None, "compilations": c.compilations if c is not None else None}


def time_calls(model_path, frame, n_calls, compile=False):
    """Median ms per energy+force call, eager in float32 and float64; with ``compile`` also the
    compiled float32 path (``compiled_float32``, timed after its compilation)."""
    import numpy as np
    import torch
    from ase.calculators.calculator import all_changes

    from se3set_ase import SE3SetCalculator

    out = {}
    paths = [("float32", torch.float32, False), ("float64", torch.float64, False)]
    if compile:
        paths.append(("compiled_float32", torch.float32, True))
    for name, dt, comp in paths:
        calc = SE3SetCalculator(model_path, device="cpu", dtype=dt, compile=comp)
        atoms = frame_atoms(frame)
        rng = np.random.default_rng(0)
        p0 = atoms.positions.copy()
        times = []
        for k in range(n_calls + 2):  # 2 warm-up calls
            atoms.positions = p0 + rng.normal(scale=1e-3, size=p0.shape)
            t0 = time.perf_counter()
            calc.calculate(atoms, ["energy", "forces"], all_changes)
            if k >= 2:
                times.append(1000 * (time.perf_counter() - t0))
        out[name] = {"median_ms": statistics.median(times), "min_ms": min(times), "n_calls": n_calls}
        if comp:
            out[name]["compiled"] = calc.compiled is not None  # False: it fell back to eager
    return out


def fd_check(model_path, frame, seed, n_comp=6):
    import numpy as np
    import torch

    from se3set_ase import SE3SetCalculator

    calc = SE3SetCalculator(model_path, device="cpu", dtype=torch.float64)
    atoms = frame_atoms(frame)
    atoms.calc = calc
    f = atoms.get_forces().copy()
    n = len(atoms)
    order = np.argsort(-np.abs(f).ravel(), kind="stable")
    largest = [int(x) for x in order[: n_comp // 2]]
    rest = [int(x) for x in np.random.default_rng(seed).permutation(3 * n) if int(x) not in largest]
    comps = largest + rest[: n_comp - len(largest)]
    rows = []
    p0 = atoms.positions.copy()
    for c in comps:
        i, a = divmod(c, 3)
        e = []
        for s in (+1, -1):
            p = p0.copy()
            p[i, a] += s * FD_STEP_A
            atoms.positions = p
            e.append(atoms.get_potential_energy())
        atoms.positions = p0
        fd = -(e[0] - e[1]) / (2 * FD_STEP_A)
        err = abs(fd - f[i, a])
        rows.append({"atom": i, "axis": "xyz"[a], "force_eV_A": float(f[i, a]), "fd_eV_A": float(fd),
                     "abs_err_eV_A": float(err), "rel_err": float(err / max(abs(f[i, a]), FD_FLOOR_EV_A))})
    return {"step_A": FD_STEP_A, "dtype": "float64", "floor_eV_A": FD_FLOOR_EV_A, "components": rows,
            "max_abs_err_eV_A": max(r["abs_err_eV_A"] for r in rows),
            "max_rel_err": max(r["rel_err"] for r in rows)}


# ----------------------------------------------------------------------------- main measurement
def atom_order_check(model_path, frame, seed) -> dict:
    """Energy and forces of ``frame`` in its own atom order and in a seeded random one (a fresh
    float64 calculator each, forces mapped back to the first order), and whether the two got the
    same hyperedges. The own order finds the model's pinned training fragmentation; the other is
    fragmented from scratch, as a user's file in another order would be."""
    import numpy as np
    import torch

    from se3set_ase import SE3SetCalculator

    atoms = frame_atoms(frame)
    n = len(atoms)
    results = []
    for order in (np.arange(n), np.random.default_rng(seed).permutation(n)):
        a = atoms[order]
        calc = SE3SetCalculator(model_path, device="cpu", dtype=torch.float64)
        a.calc = calc
        forces = np.empty((n, 3))
        forces[order] = a.get_forces()
        hyperedges = sorted(tuple(sorted(int(order[i]) for i in h)) for h in calc.fragmenter.fragmentation(a).hyperedges)
        results.append((a.get_potential_energy(), forces, hyperedges))
    (e0, f0, h0), (e1, f1, h1) = results
    return {"seed": seed, "abs_dE_meV": 1000 * abs(e1 - e0), "max_abs_dF_meV_A": 1000 * float(np.abs(f1 - f0).max()),
            "same_hyperedges": h0 == h1}


def order_invariant(ao: dict) -> bool:
    return ao["same_hyperedges"] and ao["abs_dE_meV"] < ORDER_INVARIANT_MEV and ao["max_abs_dF_meV_A"] < ORDER_INVARIANT_MEV


def atom_order_text(ao: dict, cut) -> str:
    where = (f"data frame {ao['start_frame']} with its atoms in a seeded random order (seed {ao['seed']}; fresh "
             "calculators, float64)")
    if order_invariant(ao):
        return (f"Energy and forces do not depend on the order of the atoms: {where} has the same hyperedges, "
                f"energy and forces as in its own order, to rounding (|ΔE| and max |ΔF| below {ORDER_INVARIANT_MEV:g} "
                "meV and meV/Å).")
    why = (f" The fused ring systems are cut into chunks of at most {cut} atoms, and where the molecule's symmetry "
           "leaves a choice, which atoms form a chunk follows the input order." if cut else "")
    return (f"**Energy and forces depend on the order of the atoms**: {where} has "
            + ("the same hyperedges as" if ao["same_hyperedges"] else "other hyperedges than") + " in its own order, "
            f"|ΔE| = {ao['abs_dE_meV']:.3g} meV and max |ΔF| = {ao['max_abs_dF_meV_A']:.3g} meV/Å." + why)


def fragmentation_facts(model, frame) -> dict:
    """The model's fragment settings and the hypergraph of ``frame`` (its pinned fragmentation)."""
    from se3set_ase.fragment import Fragmenter

    fr = Fragmenter.for_model(model)
    atoms = frame_atoms(frame)
    hg = fr(atoms)
    kernels = fr.fragmentation(atoms).kernels
    return {"settings": model.config.fragment.to_dict(), "start_frame_hyperedges": int(hg.num_hyperedges),
            "start_frame_kernel_sizes": sorted((len(k) for k in kernels), reverse=True),
            "start_frame_tokens": int(hg.num_tokens), "start_frame_member_pairs": int(hg.v2e_src.numel())}


def fragmentation_line(f: dict) -> str:
    st = f["settings"]
    cut = st.get("max_ring_system_atoms")
    sizes = f["start_frame_kernel_sizes"]
    shown = ", ".join(map(str, sizes[:12])) + (", …" if len(sizes) > 12 else "")
    return (f"- fragmentation: {st['mode']} ({st['bo_method']}, kernels of at most {st['max_kernel_atoms']} atoms"
            + (f", r_c {st['implicit_rc']} Å" if st["mode"] == "implicit" else "")
            + (f"; ring systems of more than {cut} atoms cut into chunks" if cut else "; ring systems whole, as published")
            + f"); the start frame has {f['start_frame_hyperedges']} hyperedge"
            + ("s" if f["start_frame_hyperedges"] != 1 else "") + f" (kernel sizes {shown}), "
            f"{f['start_frame_tokens']} tokens and {_fmt_int(f['start_frame_member_pairs'])} member pairs")


def measure_errors(model, model_path, meta, tr, frames, split, note) -> dict:
    """Test and valid errors in float64 (metrics and per frame), and the float32 check that the
    recomputed split reproduces the training-time metrics."""
    import numpy as np
    import torch

    from se3set_ase.fragment import Fragmenter
    from se3set_ase.model import load_model
    from se3set_ase.training.cache import build_graphs, training_fragmentations
    from se3set_ase.training.metrics import evaluate, frame_errors, summarize

    settings = model.config.fragment
    # the hypergraphs training used: the model's pinned fragmentations, or (model files from before
    # pinning) what training froze, the first frame of each topology in the data file
    pins = Fragmenter.for_model(model).fragmentations() or training_fragmentations(frames, settings)
    sets = {k: [frames[i] for i in split[k]] for k in ("valid", "test")}
    errors, per_frame, graphs = {}, {}, {}
    for k, frs in sets.items():
        if not frs:
            continue
        note(f"[card] evaluating {k} ({len(frs)} frames, float64)")
        graphs[k] = build_graphs(frs, settings, pinned=pins)  # dtype-free: the split check reuses them
        fe = frame_errors(model, graphs[k], 16, torch.device("cpu"), torch.float64)  # the trainer's batches
        errors[k] = metrics_block(summarize(fe))
        per_frame[k] = {"frame_index": [int(i) for i in split[k]], **per_frame_errors(fe)}
    if "test" in per_frame:
        fm = np.array(per_frame["test"]["forces_mae_meV_A"])
        per_frame["test"]["forces_mae_meV_A_quantiles"] = {
            q: float(np.quantile(fm, float(q))) for q in ("0.0", "0.1", "0.5", "0.9", "1.0")}
    # the split is right iff the training-time (float32) test metrics are reproduced
    split_check = {}
    meta_metrics = meta.get("metrics", {})
    ref_set = "test" if meta_metrics.get("test") else "valid"
    if meta_metrics.get(ref_set) and sets.get(ref_set):
        model32, _ = load_model(model_path, dtype=torch.float32, device="cpu")
        m32 = evaluate(model32, graphs[ref_set], 16, torch.device("cpu"),
                       torch.float32 if tr.get("dtype", "float32") == "float32" else torch.float64)
        ref = meta_metrics[ref_set]["forces_mae_meV_A"]
        rel = abs(m32["forces_mae_meV_A"] - ref) / max(abs(ref), 1e-12)
        split_check = {"set": ref_set, "recomputed_forces_mae_meV_A": m32["forces_mae_meV_A"],
                       "metadata_forces_mae_meV_A": ref, "relative_difference": rel, "reproduced": rel < 1e-3}
        if not split_check["reproduced"]:
            print(f"WARNING: recomputed {ref_set} force MAE {m32['forces_mae_meV_A']:.4f} != metadata "
                  f"{ref:.4f} meV/Å: the split or data differ from training", file=sys.stderr)

    return {"errors": errors, "per_frame": per_frame, "split_check": split_check}


def measure(args) -> dict:
    commit = git_commit()  # the code that measures: read now, not when the hours of MD are over
    import torch

    from se3set_ase.data import read_frames, split_indices
    from se3set_ase.model import load_model
    from se3set_ase.registry import resolve_model
    from se3set_ase.training.stops import pre_empted

    torch.set_num_threads(args.threads)
    model_path = resolve_model(args.name).resolve()
    name = model_path.stem
    model, meta = load_model(model_path, dtype=torch.float64, device="cpu")
    tr = meta.get("training") or {}
    if not tr:
        sys.exit(f"{model_path}: no training metadata (not written by `se3set-ase fit`)")
    if pre_empted(tr.get("stopped")):
        sys.exit(f"{model_path}: its training was pre-empted ({tr['stopped']}) and never evaluated; "
                 "finish it with `se3set-ase fit ... --resume` first")
    cmd = tr.get("command") or ""
    if "--valid-file" in cmd or "--test-file" in cmd:
        sys.exit(f"{model_path}: trained with --valid-file/--test-file; this script recomputes splits of one file only")
    data = Path(args.data).resolve()
    meta_data = Path(tr["data"])
    if meta_data.name != data.name:
        sys.exit(f"--data {data} is not the file the model was trained on ({tr['data']})")
    note = print if args.verbose else (lambda *a, **k: None)
    note(f"[card] {name}: reading {data}")
    frames = read_frames(data)
    n = len(frames)
    fr = tr["frames"]
    seed = int(tr["seed"])
    # prepare_data: split_indices(len(frames), train=_num(train), valid=_num(valid), test=_num(test), seed)
    # with the sizes it resolved; the metadata stores those resolved counts, and split_indices only
    # depends on the counts and the seed (train = perm[:a], valid = perm[a:b], test = perm[b:b+k]).
    block = int(tr.get("split_block", 1))
    split = split_indices(n, train=int(fr["train"]), valid=int(fr["valid"]), test=int(fr["test"]), seed=seed,
                          block=block)
    kind = data_kind(data, frames)
    temperature = args.temperature if args.temperature is not None else kind["temperature_K"]
    if temperature is None:
        sys.exit("the data file records no temperature: pass --temperature K")

    # ---- errors (float64) on test and valid, and float32 check against the training metadata
    key = {"card_version": CARD_VERSION, "model_sha256": sha256(model_path), "data_sha256": sha256(data),
           **{k: getattr(args, k) for k in ("temperature", "langevin_ps", "nve_ps", "dt_fs", "seed", "threads",
                                             "timing_calls", "langevin_dtype", "compile", "quick")}}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    progress = Progress(out_dir / f"{name}.card-progress", key, 60 * args.save_every_minutes,
                        None if args.max_time is None else 60 * args.max_time)
    if progress.resumed:
        note(f"[card] resuming from {progress.path} (done: {', '.join(progress.data['phases']) or 'nothing'}; "
             f"in flight: {', '.join(progress.data['inflight']) or 'nothing'})")
    progress.data["runs"].append({"git_commit": commit, "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    with progress:
        return _measure(args, progress, model, model_path, name, meta, tr, data, frames, n, fr, seed, block, split,
                        kind, temperature, note)


def _measure(args, progress, model, model_path, name, meta, tr, data, frames, n, fr, seed, block, split, kind,
             temperature, note) -> dict:
    import numpy as np
    import torch

    from se3set_ase import __version__

    if progress.phase("errors") is None:
        progress.finish("errors", measure_errors(model, model_path, meta, tr, frames, split, note))
    errors, per_frame, split_check = (progress.phase("errors")[k] for k in ("errors", "per_frame", "split_check"))
    meta_metrics = meta.get("metrics", {})

    # ---- data facts
    comps = sorted({"".join(f"{z}:{c}," for z, c in zip(*np.unique(f.numbers, return_counts=True))) for f in frames})
    from ase.data import chemical_symbols

    formula = frame_atoms(frames[0]).get_chemical_formula()
    dup = duplicates_across(frames, split["train"], split["test"]) if len(split["test"]) else 0

    # ---- dynamics, timing, FD from the first test frame
    start_idx = int(split["test"][0]) if len(split["test"]) else int(split["valid"][0])
    start = frames[start_idx]
    if progress.phase("langevin") is None:
        note(f"[card] Langevin {args.langevin_ps} ps at {temperature} K")
        progress.finish("langevin", run_langevin(model_path, start, float(temperature), args.langevin_ps, args.dt_fs,
                                                 args.seed, args.compile, args.langevin_dtype, progress))
    lang = progress.phase("langevin")
    if progress.phase("nve") is None:
        note(f"[card] NVE {args.nve_ps} ps")
        progress.finish("nve", run_nve(model_path, start, args.nve_ps, args.dt_fs, args.seed, args.compile, progress))
    nve = progress.phase("nve")
    progress.check("the MD runs")  # a stop asked for now is honoured before minutes of compiling
    note("[card] timing and finite differences")
    timing = time_calls(model_path, start, args.timing_calls, args.compile)
    timing["torch_num_threads"] = torch.get_num_threads()
    timing["cpu"] = cpu_name()
    timing["n_atoms"] = len(start)
    fd = fd_check(model_path, start, args.seed)
    atom_order = atom_order_check(model_path, start, args.seed)
    runs = progress.data["runs"]

    # ---- limits
    mol = kind["molecule"]
    test_fmae = errors.get("test", {}).get("forces_mae_meV_A")
    target = None
    if kind["kind"] == "md17" and mol in SGDML_2018_FORCE_MAE and test_fmae is not None:
        t = SGDML_2018_FORCE_MAE[mol]
        target = {"molecule": mol, "sgdml_2018_forces_mae_meV_A": t, "test_forces_mae_meV_A": test_fmae,
                  "met": test_fmae <= t, "difference_meV_A": test_fmae - t, "ratio": test_fmae / t}
    e_ref = {chemical_symbols[int(z)]: float(v) for z, v in zip(model.elements, model.element_energy.tolist())} \
        if hasattr(model, "element_energy") else {}

    return {
        "card_version": CARD_VERSION,
        "name": name,
        "model": {"file": model_path.name, "sha256": sha256(model_path), "elements":
                  [chemical_symbols[int(z)] for z in meta["elements"]], "element_numbers": [int(z) for z in meta["elements"]],
                  "se3set_ase_version_trained": meta.get("se3set_ase_version"), "element_energies_eV": e_ref},
        "data": {"path": data_path_for_card(data), "sha256": sha256(data), "n_frames": n, "formula": formula,
                 "n_atoms": len(frames[0]), "n_compositions": len(comps), **kind},
        "training": {"command": tr.get("command"), "commands": tr.get("commands") or [tr.get("command")],
                     "epochs": tr.get("epochs"), "data_in_metadata": tr.get("data"), "frames": fr,
                     "seed": seed, "preset": tr.get("preset"), "parameters": tr.get("parameters"),
                     "steps": tr.get("steps"), "stopped": tr.get("stopped"),
                     "wall_time_s": tr.get("wall_time_s"), "device": tr.get("device"),
                     "dtype": tr.get("dtype"), "metrics_in_metadata": meta_metrics,
                     **({"extra_train": tr["extra_train"]} if tr.get("extra_train") else {})},
        "split": {"function": "se3set_ase.data.split_indices", "n": n, "train": int(fr["train"]),
                  "valid": int(fr["valid"]), "test": int(fr["test"]), "seed": seed,
                  **({"block": block} if block != 1 else {}),
                  "test_indices_head": [int(i) for i in split["test"][:10]],
                  "test_frames_duplicating_a_train_frame": dup, "check": split_check},
        "errors": {"dtype": "float64", **errors},
        "per_frame": per_frame,
        "start_structure": {"frame": start_idx, "numbers": [int(z) for z in start.numbers],
                            "positions_A": start.positions.tolist(), "charge": int(start.charge)},
        "langevin": {**lang, "start_frame": start_idx, "temperature_note": kind["temperature_note"]
                     if args.temperature is None else "set with --temperature"},
        "nve": {**nve, "start_frame": start_idx},
        "timing": timing,
        "fd": {**fd, "start_frame": start_idx},
        "atom_order": {**atom_order, "start_frame": start_idx},
        "fragmentation": fragmentation_facts(model, start),
        "limits": {"sgdml_2018_target": target, "md17_energy_label_noise_meV": MD17_ENERGY_NOISE_MEV
                   if kind["kind"] == "md17" else None},
        "card": {"quick": bool(args.quick), "seed": args.seed, "threads": args.threads,
                 "command": "python models/make_card.py " + " ".join(args.argv),
                 "se3set_ase_version": __version__, "git_commit": runs[0]["git_commit"], "torch_version": torch.__version__,
                 **({"runs": runs} if len(runs) > 1 else {}),
                 "host": {"cpu": cpu_name(), "platform": platform.platform(), "python": platform.python_version()},
                 "generated_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        "machine_dependent": MACHINE_DEPENDENT,
    }


# ----------------------------------------------------------------------------- rendering
def _f(x, nd=1):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{nd}f}"


def _fmt_int(x):
    return "n/a" if x is None else f"{int(x):,}"


def langevin_summary(lang: dict) -> str:
    if lang["stable"]:
        return f"stable over {lang['requested_ps']:g} ps"
    ev = lang["event"]
    return f"{ev['kind']} at step {ev['step']} ({ev['time_ps']:.4f} ps)"


def langevin_column(lang: dict) -> str:
    if lang["requested_ps"] < 10:
        return f"not run for 10 ps ({langevin_summary(lang)})"
    if lang["stable"]:
        return "yes" if lang.get("dtype", "float64") == "float64" else f"yes ({lang['dtype']})"
    return f"no: {lang['event']['kind']} at {lang['event']['time_ps']:.3f} ps"


# why a preset was picked, from measured figures of benchmarks/bench_speed.py (benchmarks/README.md)
PRESET_NOTE = {
    "small": "- why `small`: the budget is one CPU core for at most 90 min (MD17) or 3 h (MD22 systems) per "
             "model, and on such a core a `paper`-preset energy+force call costs 3.2-4.3x a `small` one "
             "(`benchmarks/bench_speed.py`, table in `benchmarks/README.md`), so in the same time the paper "
             "preset would see about a quarter of the training epochs.",
}
# the paper preset trained on a lent H100 (benchmarks/gpu_paper_pair.sh; benchmarks/README.md, "Fourth H100
# session"): model name -> (test F MAE meV/Å, what ran, results file)
PAPER_TRIED = {
    "md17_aspirin": (55.1, "18 epochs, 450 steps of batch 32 in 283 s",
                     "benchmarks/results/fit_paper_md17_aspirin_h100_2026-11-26.txt"),
    "gfn2_dha": (49.5, "7 epochs, 399 steps of batch 32 in ~270 s",
                 "benchmarks/results/fit_paper_gfn2_dha_h100_2026-11-26.txt"),
}


def paper_note(name: str, preset: str) -> str:
    """Card line on the paper preset: tried on a GPU (with its result) or still to try."""
    if preset == "paper":
        return ""
    if name in PAPER_TRIED:
        mae, what, path = PAPER_TRIED[name]
        return (f"- the `paper` preset was trained on an H100 for this split in one 15-minute GPU lease ({what}, "
                f"`{path}`): test force MAE {mae} meV/Å, worse than this model, so not shipped (it was still "
                "improving when it stopped: a lease holds ~400 optimizer steps).")
    return "- the `paper` preset was not trained for this model (no GPU time for it); it is the one to try with a GPU."


def resume_lines(t: dict) -> list[str]:
    """Card lines for the ``--resume`` commands that continued the training run, if any."""
    later = (t.get("commands") or [])[1:]
    if not later:
        return []
    out = [f"- continued with `--resume` {len(later)} time(s) (on a resume with another `--epochs` the "
           "learning-rate schedule is recomputed for the new length, so the run is not the exact continuation "
           f"of the first command's plan{'; it ended after ' + str(t['epochs']) + ' epochs' if t.get('epochs') else ''}):"]
    out += [f"  - `{c}`" for c in later]
    return out


def stop_lines(t: dict) -> list[str]:
    """Card line for a training run that a time budget ended: where it stops depends on the machine."""
    if t.get("stopped") != "max_time":
        return []
    return [f"- ended by `--max-time` after step {t['steps']}, before the planned schedule's end: the step a time "
            "budget ends at depends on the machine and its load, so a rerun elsewhere stops at another step; "
            f"the {'last' if len(t.get('commands') or []) > 1 else 'same'} command with `--max-steps {t['steps']}` in "
            "place of `--max-time` stops where this run did"]


def compiled_text(run: dict) -> str:
    """Card text for an MD run made with ``--compile`` (empty for an eager run)."""
    if "compiled" not in run:
        return ""
    if run["compiled"]:
        return f"; run with `compile=True` ({run['compilations']} compiled graph(s))"
    return "; `compile=True` requested but compiling failed: run eagerly"


def render_card(c: dict) -> str:
    d, t, s, e, L, N, T, fd, lim = (c["data"], c["training"], c["split"], c["errors"], c["langevin"], c["nve"],
                                     c["timing"], c["fd"], c["limits"])
    lines = [f"# Model card: {c['name']}", ""]
    if c["card"]["quick"]:
        lines += ["> **Quick card (`--quick`)**: the MD runs are shortened; not a card to ship.", ""]
    lines += [
        f"Generated by `{c['card']['command']}` (se3set-ase {c['card']['se3set_ase_version']}"
        + (f" at commit `{c['card']['git_commit']}`" if c["card"].get("git_commit") else "")
        + f", torch {c['card']['torch_version']}, {c['card']['threads']} torch thread(s)). Every figure below is "
        f"measured by that script and stored in `{c['name']}.json`. A rerun gives identical figures except those "
        f"marked *(machine-dependent)*: timings and wall times"
        + (" (the MD runs are chaotic: bit-identical only with the same code and torch build)."
           if c["card"].get("git_commit") else "."), "",
        *([f"Measured in {len(c['card']['runs'])} runs of that command, each continuing the saved progress of "
           f"the one before (resumed runs give the figures of an unbroken one): started "
           + ", ".join(f"{r['started_utc']} at `{r['git_commit']}`" for r in c["card"]["runs"]) + ".", ""]
          if c["card"].get("runs") else []),
        "## Model", "",
        f"- file `{c['model']['file']}` (sha256 `{c['model']['sha256'][:16]}…`), elements {', '.join(c['model']['elements'])}",
        f"- preset `{t['preset']}`, {_fmt_int(t['parameters'])} parameters",
        *([fragmentation_line(c["fragmentation"])] if c.get("fragmentation") else []),
        *([PRESET_NOTE[t["preset"]]] if t["preset"] in PRESET_NOTE else []),
        *([note] if (note := paper_note(c["name"], t["preset"])) else []),
        f"- usage: `SE3SetCalculator(\"{c['model']['file']}\")` (eV, Å, eV/Å)", "",
        "## Training data", "",
        f"- file `{d['path']}` (sha256 `{d['sha256'][:16]}…`), {d['n_frames']} frames of {d['formula']} ({d['n_atoms']} atoms)",
        f"- level of theory: {d['level_of_theory']}",
        f"- source: {d['source']}",
        f"- split (`{s['function']}`, seed {s['seed']}"
        + (f", in blocks of {s['block']} consecutive frames" if s.get("block", 1) != 1 else "")
        + f"): train {s['train']}, valid {s['valid']}, test {s['test']} "
        f"(unused: {s['n'] - s['train'] - s['valid'] - s['test']})",
    ]
    if s["check"]:
        ck = s["check"]
        lines.append(f"- split check: the recomputed {ck['set']} force MAE in the training dtype is "
                     f"{ck['recomputed_forces_mae_meV_A']:.3f} meV/Å vs {ck['metadata_forces_mae_meV_A']:.3f} in the model "
                     f"metadata ({'reproduced' if ck['reproduced'] else 'NOT reproduced: split or data differ'})")
    lines.append(f"- test frames whose geometry duplicates a training frame: {s['test_frames_duplicating_a_train_frame']}")
    if t.get("extra_train"):
        x = t["extra_train"]
        lines.append(f"- plus {x['frames']} training-only frames (`--extra-train`, not in valid or test): "
                     + ", ".join(f"`{Path(f).name}`" for f in x["files"]))
    lines += [
        "", "## Training run (from the model metadata)", "",
        f"- command: `{t['command']}`",
        *resume_lines(t),
        f"- {t['steps']} optimizer steps, wall time {_f(t['wall_time_s'], 0)} s on `{t['device']}`, training dtype {t['dtype']}, seed {t['seed']}",
        *stop_lines(t),
        "", "## Errors (float64 evaluation, recomputed from the data file)", "",
        "| set | frames | E MAE meV | E RMSE meV | E MAE meV/atom | F MAE meV/Å | F RMSE meV/Å | F MAE kcal/mol/Å | F RMSE kcal/mol/Å |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for k in ("test", "valid"):
        m = e.get(k)
        if m:
            lines.append(f"| {k} | {m['n_frames']} | {_f(m['energy_mae_meV'], 2)} | {_f(m['energy_rmse_meV'], 2)} | "
                         f"{_f(m['energy_mae_meV_per_atom'], 3)} | {_f(m['forces_mae_meV_A'], 2)} | {_f(m['forces_rmse_meV_A'], 2)} | "
                         f"{_f(m['forces_mae_kcal_mol_A'], 3)} | {_f(m['forces_rmse_kcal_mol_A'], 3)} |")
    q = c["per_frame"].get("test", {}).get("forces_mae_meV_A_quantiles")
    if q:
        lines.append("")
        lines.append(f"Per-frame test force MAE (meV/Å): min {q['0.0']:.2f}, 10% {q['0.1']:.2f}, median {q['0.5']:.2f}, "
                     f"90% {q['0.9']:.2f}, max {q['1.0']:.2f} (every frame's value is in the JSON). "
                     f"1 kcal/mol = {KCAL_MOL_EV} eV.")
    lines += [
        "", "## Molecular dynamics (CPU)", "",
        f"- **Langevin** ({L.get('dtype', 'float64')}) at {L['temperature_K']:g} K ({L['temperature_note']}), {L['requested_ps']:g} ps, dt {L['dt_fs']:g} fs, "
        f"friction {L['friction_per_fs']:g}/fs, centre of mass fixed, from data frame {L['start_frame']} (the first test frame) with Maxwell–Boltzmann velocities "
        f"(seed {L['velocity_seed']}, noise seed {L['noise_seed']}): **{langevin_summary(L)}** "
        f"(bond topology checked every step with `bond_set`, {L['n_bonds']} bonds; mean T {_f(L['mean_temperature_K'])} K); "
        f"wall time {_f(L['wall_time_s'])} s, {_f(L['ms_per_step'], 1)} ms/step *(machine-dependent)*"
        + compiled_text(L),
    ]
    if not L["stable"] and L["event"].get("broken") is not None:
        lines.append(f"  - bonds broken (atom pairs): {L['event']['broken']}; formed: {L['event']['formed']}")
    lines += [
        f"- **NVE** (VelocityVerlet, float64) {N['ps']:g} ps, dt {N['dt_fs']:g} fs, from the same frame with 300 K "
        f"Maxwell–Boltzmann velocities (seed {N['seed']}): drift {_f(N['drift_meV_per_atom_per_ps'], 4)} meV/atom/ps, "
        f"max |E−E0| {_f(N['max_abs_dE_meV'], 3)} meV ({_f(N['max_abs_dE_meV_per_atom'], 4)} meV/atom)"
        + ("" if N["completed"] else f"; **stopped early: {N['stopped']}** (figures over the {N['steps']} steps done)")
        + f"; {_f(N['ms_per_step'], 1)} ms/step *(machine-dependent)*" + compiled_text(N),
        "", "## Speed *(machine-dependent)*", "",
        f"Energy + forces of one {T['n_atoms']}-atom structure through `SE3SetCalculator` on `{T['cpu']}`, "
        f"torch.get_num_threads() = {T['torch_num_threads']}, median of {T['float64']['n_calls']} calls after 2 warm-up calls: "
        f"float32 {_f(T['float32']['median_ms'], 2)} ms, float64 {_f(T['float64']['median_ms'], 2)} ms"
        + (f"; compiled (`compile=True`) float32 {_f(T['compiled_float32']['median_ms'], 2)} ms"
           + ("" if T["compiled_float32"].get("compiled") else " (**compiling failed: eager fallback**)")
           if "compiled_float32" in T else "") + ".",
        "", "## Finite-difference force check", "",
        f"Central differences, step {fd['step_A']:g} Å, float64, {len(fd['components'])} components (the "
        f"{len(fd['components']) // 2} largest |F| and seeded random ones) of data frame {fd['start_frame']}: max |FD − F| "
        f"{fd['max_abs_err_eV_A']:.2e} eV/Å, max relative error {fd['max_rel_err']:.2e} "
        f"(relative to max(|F|, {fd['floor_eV_A']} eV/Å)).",
        *(["", "## Atom order", "", atom_order_text(c["atom_order"], (c.get("fragmentation") or {}).get("settings", {})
                                                      .get("max_ring_system_atoms"))] if c.get("atom_order") else []),
        "", "## Limits", "",
        f"- Trained on one molecule ({d['formula']}, {d['n_compositions']} composition(s) in the data); it is not a "
        "general potential for other molecules, and states far from the training distribution (other conformers, "
        "higher temperatures, reactions) are extrapolation.",
        "- Size-extensiveness comes only from the per-element reference energies "
        f"({', '.join(f'{k} {v:.4f} eV' for k, v in c['model']['element_energies_eV'].items())}), which with a single "
        "composition are the minimum-norm spread of the mean energy, not atomic energies: absolute energies of "
        "other compositions are meaningless; compare energies of the same molecule only.",
    ]
    if d["kind"] == "md17":
        lines.append(f"- The MD17 energies in this data are recovered sGDML predictions, off the DFT labels by "
                     f"~{lim['md17_energy_label_noise_meV']:g} meV (MAE ~5.6 meV, max ~24 meV): energy errors below "
                     "~6 meV cannot be measured on these frames; the force labels are the original DFT ones.")
    if d["kind"] == "gfn2":
        block = s.get("block", 1)
        how = (f"split in blocks of {block} consecutive frames ({10 * block} fs), so only test frames at a "
               "block's edge have a training frame 10 fs away; the test errors are still those of the sampled "
               "trajectory's conformers, optimistic for new ones." if block != 1 else
               "split at random, so test frames have near neighbours in the training set and the test errors "
               "are optimistic for new conformers.")
        lines.append("- GFN2-xTB is a semi-empirical method, not DFT. The frames are one correlated trajectory "
                     f"(10 fs apart) {how}")
    tg = lim.get("sgdml_2018_target")
    if tg:
        verdict = (f"**met** ({abs(tg['difference_meV_A']):.2f} meV/Å below)" if tg["met"] else
                   f"**missed** by {tg['difference_meV_A']:.2f} meV/Å ({tg['ratio']:.2f}× the target)")
        lines.append(f"- sGDML 2018 target force MAE for {tg['molecule']}: {tg['sgdml_2018_forces_mae_meV_A']} meV/Å; "
                     f"this model's test force MAE {tg['test_forces_mae_meV_A']:.2f} meV/Å: {verdict}. "
                     "(Different test frames: sGDML was tested on the rest of MD17.)")
    elif d["kind"] == "md17":
        lines.append("- No sGDML 2018 target for this molecule.")
    else:
        lines.append("- No sGDML 2018 target: not an MD17 model.")
    if c.get("atom_order") and not order_invariant(c["atom_order"]):
        lines.append("- Energies and forces depend on the atom order of the input (see Atom order): keep one atom "
                     "order for a whole study (MD, optimisation, comparisons), and prefer the training data's order.")
    if not L["stable"]:
        lines.append(f"- The {L['requested_ps']:g} ps Langevin run at {L['temperature_K']:g} K was not stable "
                     f"({langevin_summary(L)}): do not use this model for MD at that temperature without checks.")
    lines += ["", "## Reproduce", "", f"    {c['card']['command']}", ""]
    return "\n".join(lines)


def atom_order_column(ao: dict | None) -> str:
    if ao is None:
        return "not measured"
    if order_invariant(ao):
        return "invariant"
    return f"**depends** (max \\|ΔF\\| {ao['max_abs_dF_meV_A']:.3g} meV/Å)"


def render_readme(cards: list[dict]) -> str:
    lines = ["# Shipped models", "",
             "Generated by `python models/make_card.py` from the `models/*.json` cards; do not edit by hand. "
             "Each model has a card `NAME.md` with every figure and its limits. Errors: float64, on the model's own "
             "test split. Load a model with `SE3SetCalculator(\"NAME.pt\")`.", "",
             "| model | data / level of theory | frames train/valid/test | preset | params | test F MAE meV/Å | "
             "test E MAE meV | 10 ps Langevin stable? | atom order |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in cards:
        d, t, e = c["data"], c["training"], c["errors"].get("test", {})
        lot = d["level_of_theory"].split(" (")[0]
        lines.append(f"| [{c['name']}]({c['name']}.md) | {d['kind'].upper()} {d['molecule']} / {lot} | "
                     f"{c['split']['train']}/{c['split']['valid']}/{c['split']['test']} | {t['preset']} | "
                     f"{_fmt_int(t['parameters'])} | {_f(e.get('forces_mae_meV_A'), 2)} | {_f(e.get('energy_mae_meV'), 2)} | "
                     f"{'quick card: ' if c['card']['quick'] else ''}{langevin_column(c['langevin'])} | "
                     f"{atom_order_column(c.get('atom_order'))} |")
    if not cards:
        lines.append("| (none yet) | | | | | | | | |")
    lines += ["", "Models that cannot be shipped (MD22 data, MD17 benzene/azobenzene) are built with "
              "`se3set-ase fit`; `SE3SetCalculator` prints the command when such a name is asked for.", ""]
    return "\n".join(lines)


def card_start_frame(card: dict):
    """The card's start structure as a data frame (numbers, positions in Å, charge)."""
    from types import SimpleNamespace

    import numpy as np

    st = card["start_structure"]
    return SimpleNamespace(numbers=np.asarray(st["numbers"]), positions=np.asarray(st["positions_A"], dtype=np.float64),
                           charge=st["charge"])


def add_atom_order(out_dir: Path, card: dict) -> None:
    """Measure :func:`atom_order_check` for an existing card (its model file, start structure and
    seed) and write it into NAME.json and NAME.md."""
    model_path = out_dir / card["model"]["file"]
    if sha256(model_path) != card["model"]["sha256"]:
        sys.exit(f"{model_path} is not the model of its card (sha256 differs): remake the card")
    card["atom_order"] = {**atom_order_check(model_path, card_start_frame(card), card["card"]["seed"]),
                          "start_frame": card["start_structure"]["frame"]}
    for key in MACHINE_DEPENDENT:
        if key.startswith("atom_order.") and key not in card["machine_dependent"]:
            card["machine_dependent"].append(key)
    (out_dir / f"{card['name']}.json").write_text(json.dumps(card, indent=1) + "\n")
    (out_dir / f"{card['name']}.md").write_text(render_card(card))


def load_cards(out_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out_dir.glob("*.json"))]


def write_readme(out_dir: Path) -> Path:
    path = out_dir / "README.md"
    path.write_text(render_readme(load_cards(out_dir)))
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", nargs="?", help="model name (as for SE3SetCalculator) or path to a .pt file")
    p.add_argument("--data", help="the training data file (the split is recomputed from it)")
    p.add_argument("--temperature", type=float, help="Langevin temperature K (default: MD17 500 K, GFN2 info['temperature_K'])")
    p.add_argument("--langevin-ps", type=float, default=10.0)
    p.add_argument("--nve-ps", type=float, default=1.0)
    p.add_argument("--dt-fs", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0, help="seed of MD velocities/noise and FD components")
    p.add_argument("--threads", type=int, default=1, help="torch threads (fixed for reproducible MD)")
    p.add_argument("--timing-calls", type=int, default=20)
    p.add_argument("--langevin-dtype", choices=("float64", "float32"), default="float64",
                   help="dtype of the Langevin run (float32: the training dtype, about twice as fast on a "
                        "CPU; stability is a property of the model, not of the rounding; the NVE run stays float64)")
    p.add_argument("--compile", action="store_true",
                   help="run the MD with SE3SetCalculator(compile=True) (TorchInductor, one thread; "
                        "same forces to rounding, about twice as fast) and also time that path")
    p.add_argument("--quick", action="store_true", help="short MD (0.05 ps Langevin, 0.025 ps NVE, 5 timing calls) for development")
    p.add_argument("--out-dir", default=str(HERE), help="where NAME.json, NAME.md and README.md go (default: models/)")
    p.add_argument("--readme-only", action="store_true", help="only regenerate OUT_DIR/README.md from OUT_DIR/*.json")
    p.add_argument("--render-only", action="store_true",
                   help="regenerate every OUT_DIR/NAME.md and README.md from the JSON cards (no measuring)")
    p.add_argument("--add-atom-order", action="store_true",
                   help="measure only the atom-order check of NAME's existing card (all cards without NAME) from "
                        "its start structure and write it in (the card's other figures are untouched)")
    p.add_argument("--save-every-minutes", type=float, default=10.0,
                   help="save the MD in flight to OUT_DIR/NAME.card-progress this often (and on SIGTERM)")
    p.add_argument("--max-time", type=float, metavar="MIN",
                   help="stop after MIN minutes, saving the progress; the same command continues it")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    out_dir = Path(args.out_dir)
    if args.render_only:
        for card in load_cards(out_dir):
            (out_dir / f"{card['name']}.md").write_text(render_card(card))
        print(f"wrote the cards and {write_readme(out_dir)}")
        return 0
    if args.readme_only:
        print(f"wrote {write_readme(out_dir)}")
        return 0
    if args.add_atom_order:
        for card in load_cards(out_dir):
            if args.name in (None, card["name"]):
                add_atom_order(out_dir, card)
                print(f"{card['name']}: {atom_order_text(card['atom_order'], None)[:90]}...")
        print(f"wrote {write_readme(out_dir)}")
        return 0
    if not args.name or not args.data:
        p.error("NAME and --data are required (or --readme-only)")
    if args.quick:
        args.langevin_ps = min(args.langevin_ps, 0.05)
        args.nve_ps = min(args.nve_ps, 0.025)
        args.timing_calls = min(args.timing_calls, 5)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    try:
        card = measure(args)
    except Stopped as exc:
        print(exc)
        return 3
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{card['name']}.json").write_text(json.dumps(card, indent=1) + "\n")
    text = render_card(card)
    (out_dir / f"{card['name']}.md").write_text(text)
    write_readme(out_dir)
    (out_dir / f"{card['name']}.card-progress").unlink(missing_ok=True)
    print(text)
    print(f"wrote {out_dir / (card['name'] + '.json')}, {out_dir / (card['name'] + '.md')}, {out_dir / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
