"""`se3set-ase sample SYSTEM -o frames.extxyz`: GFN2-xTB reference frames by Langevin MD.

Protocol (identical to /work/shared/data/gfn2/make_gfn2.py for its systems): RDKit ETKDG
embedding (randomSeed=seed) + MMFF; tblite GFN2-xTB; Maxwell-Boltzmann velocities at T from
default_rng(seed); ASE Langevin (dt, friction, rng default_rng(seed + 1)); `equil_steps` steps
discarded, then one frame every `every` steps.

Each frame is appended to the extxyz as soon as it is made (flushed), and a small sidecar
`<out>.state.npz` (positions, momenta, Langevin RNG state, step, frames written, byte offset) is
replaced atomically after it; re-running the same command continues the same trajectory up to
`frames`. The run stops with a clear message when the bond topology changes or forces explode.

``driver="mmff"`` (``--driver mmff``) moves the atoms with MMFF94 (RDKit, :mod:`.mmff`) instead
of GFN2-xTB and runs GFN2-xTB only on the written frames: one SCF per frame instead of one per
MD step, for systems where GFN2-xTB dynamics is too slow. The geometries are then an MMFF94
ensemble at T (the labels are GFN2-xTB's all the same); every frame records ``md_driver``.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from .errors import DataError

__all__ = ["sample", "add_arguments", "main", "SamplingError", "bond_set", "STATE_SUFFIX"]

logger = logging.getLogger("se3set_ase")

STATE_SUFFIX = ".state.npz"
BOND_FACTOR = 1.3
_STATE_VERSION = 1


class SamplingError(DataError):
    """The trajectory left the sane region (bond topology change, exploding forces)."""


def _require_tblite():
    try:
        from tblite.ase import TBLite  # noqa: F401
    except ImportError as e:
        raise ImportError(f"GFN2-xTB sampling needs tblite, which is not installed ({e}): "
                          f"pip install se3set-ase[xtb]   (or: pip install tblite)") from None
    return TBLite


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg, key in (("tblite", "tblite_version"), ("ase", "ase_version"), ("rdkit", "rdkit_version"),
                     ("se3set-ase", "se3set_ase_version")):
        try:
            out[key] = md.version(pkg)
        except md.PackageNotFoundError:
            out[key] = "unknown"
    if out["se3set_ase_version"] == "unknown":
        try:
            from se3set_ase import __version__

            out["se3set_ase_version"] = str(__version__)
        except Exception:
            pass
    if out["rdkit_version"] == "unknown":
        import rdkit

        out["rdkit_version"] = rdkit.__version__
    return out


def bond_set(numbers, positions, factor: float = BOND_FACTOR,
             previous: set[tuple[int, int]] | None = None) -> set[tuple[int, int]]:
    """Pairs (i < j) with d_ij <= factor * (R_cov,i + R_cov,j), RDKit covalent radii, hydrogen
    monovalent: the fragmenter's own connectivity (:func:`se3set_ase.fragment.bonds.connectivity`;
    an H within that distance of several atoms is bonded to the nearest, so a short hydrogen bond
    is not a new bond).

    ``previous``: the bonds of an earlier step of the same trajectory, for hysteresis as in the
    calculator (``Fragmenter(hysteresis=True)``): those hold up to ``factor``, a pair not among
    them counts as bonded only below ``elements.FORMING_FACTOR`` (1.1). A thermal fluctuation
    across the 1.3 threshold (GFN2-xTB's own AT-AT frames bring a ring's 1-3 C...C pair within 2 %
    of it) is then no new bond; a reaction still is."""
    from ..elements import FORMING_FACTOR
    from ..fragment.bonds import hysteresis_adjacency, monovalent_hydrogens, threshold_matrix

    z = np.asarray(numbers)
    pos = np.asarray(positions, dtype=float)
    d = np.linalg.norm(pos[:, None, :] - pos[None, :, :], axis=-1)
    np.fill_diagonal(d, np.inf)
    thr = threshold_matrix(z, factor)
    if previous is None:
        adj = d <= thr
    else:
        was = np.zeros(d.shape, dtype=bool)
        if previous:
            i, j = np.array(sorted(previous)).T
            was[i, j] = was[j, i] = True
        adj = hysteresis_adjacency(d, thr, threshold_matrix(z, FORMING_FACTOR), was)
    adj = monovalent_hydrogens(adj, d, np.flatnonzero(z == 1))
    i, j = np.nonzero(np.triu(adj, k=1))
    return set(zip(i.tolist(), j.tolist()))


def _pairs_text(pairs, numbers) -> str:
    from ase.data import chemical_symbols

    return ", ".join(f"{chemical_symbols[numbers[i]]}{i}-{chemical_symbols[numbers[j]]}{j}"
                     for i, j in sorted(pairs)[:8]) + (" ..." if len(pairs) > 8 else "")


def _save_state(path: Path, atoms, rng, step: int, frames_done: int, offset: int, params: dict,
                bonds0) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, version=_STATE_VERSION, numbers=atoms.numbers, positions=atoms.get_positions(), momenta=atoms.get_momenta(),
             rng_state=json.dumps(rng.bit_generator.state), step=step, frames_done=frames_done,
             offset=offset, params=json.dumps(params, sort_keys=True),
             bonds0=np.array(sorted(bonds0), dtype=np.int64).reshape(-1, 2))
    os.replace(tmp, path)


def _load_state(path: Path) -> dict:
    try:
        with np.load(path, allow_pickle=False) as z:
            d = {k: z[k] for k in z.files}
        return dict(numbers=d["numbers"], positions=d["positions"], momenta=d["momenta"],
                    rng_state=json.loads(str(d["rng_state"])), step=int(d["step"]),
                    frames_done=int(d["frames_done"]), offset=int(d["offset"]),
                    params=json.loads(str(d["params"])),
                    bonds0={tuple(p) for p in d["bonds0"].tolist()})
    except Exception as e:
        raise DataError(f"{path}: unreadable sampling state ({type(e).__name__}: {e}); remove it "
                        f"and the output file to start again") from None


def sample(system: str, out, frames: int, temperature: float = 500.0, dt_fs: float = 0.5,
           every: int = 20, equil_steps: int = 4000, friction_per_fs: float = 0.01, seed: int = 1234,
           charge: int = 0, progress: bool = True, max_force: float = 50.0,
           fresh_labels: bool = True, driver: str = "gfn2") -> Path:
    """Write `frames` GFN2-xTB frames of `system` (SMILES, structure file or built-in name) to
    the extxyz `out`, resuming a previous run of the same command. Returns the output path.

    Raises DataError (bad system/arguments/files), SamplingError (topology change or exploding
    forces; the frames before it stay in `out`), ImportError (tblite missing).

    fresh_labels=True: each frame's energy/forces come from a new SCF on the written geometry
    (equal to any later GFN2-xTB call to ~1e-8 eV/Å). False: the MD calculator's own results,
    as make_gfn2.py stores them (bitwise identical to its files; they differ from a fresh SCF by
    ~1e-4 eV/Å because tblite restarts the SCF from the previous step).

    driver: "gfn2" (GFN2-xTB Langevin dynamics) or "mmff" (MMFF94 dynamics, GFN2-xTB labels of
    the written frames only; needs fresh_labels)."""
    TBLite = _require_tblite()
    from ase import Atoms, units
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    import ase.io
    from tqdm.auto import tqdm

    from .systems import build_system, check_elements

    frames, every, equil_steps = int(frames), int(every), int(equil_steps)
    if frames < 0 or every < 1 or equil_steps < 0 or dt_fs <= 0 or temperature < 0:
        raise DataError(f"invalid sampling arguments: frames={frames}, every={every}, "
                        f"equil_steps={equil_steps}, dt_fs={dt_fs}, temperature={temperature}")
    if driver not in ("gfn2", "mmff"):
        raise DataError(f"driver must be 'gfn2' or 'mmff', not {driver!r}")
    if driver == "mmff" and not fresh_labels:
        raise DataError("--md-labels stores the MD calculator's results, which with --driver mmff "
                        "are MMFF94's, not GFN2-xTB's: the two cannot be combined")
    out = Path(out)
    state_path = out.with_name(out.name + STATE_SUFFIX)
    params = dict(system=str(system), temperature_K=float(temperature), dt_fs=float(dt_fs),
                  every=every, equil_steps=equil_steps, friction_per_fs=float(friction_per_fs),
                  seed=int(seed), charge=int(charge), fresh_labels=bool(fresh_labels))
    if driver != "gfn2":  # (absent for gfn2: states written before the option stay valid)
        params["driver"] = driver

    rng = np.random.default_rng(seed + 1)
    start = None  # the starting structure, when built here (the MMFF driver's bonds come from it)
    if state_path.exists():
        st = _load_state(state_path)
        stored = {k: v for k, v in st["params"].items() if k != "name"}
        if stored != params:
            diff = {k: (stored.get(k), v) for k, v in params.items() if stored.get(k) != v}
            raise DataError(f"{out}: exists from a run with other settings {diff} (stored, asked); "
                            f"use another output name or the same settings to continue")
        size = out.stat().st_size if out.exists() else 0
        if size < st["offset"]:
            raise DataError(f"{out}: shorter ({size} bytes) than recorded in {state_path} "
                            f"({st['offset']} bytes, {st['frames_done']} frames); cannot continue")
        if size > st["offset"]:  # a frame written after the last state save (killed in between)
            with open(out, "r+b") as fh:
                fh.truncate(st["offset"])
        name = st["params"].get("name", str(system))
        atoms = Atoms(numbers=st["numbers"], positions=st["positions"])
        atoms.set_momenta(st["momenta"])
        rng.bit_generator.state = st["rng_state"]
        step, frames_done, bonds0 = st["step"], st["frames_done"], st["bonds0"]
        logger.info("continuing %s from frame %d (step %d) of %s", name, frames_done, step, out)
    else:
        if out.exists() and out.stat().st_size > 0:
            raise DataError(f"{out}: exists but has no sampling state {state_path}, so it cannot be "
                            f"continued exactly; remove it or choose another output name")
        atoms, name = build_system(system, seed=seed)
        check_elements(atoms.numbers, name)
        start = atoms.copy()
        with warnings.catch_warnings():  # same call as make_gfn2.py (deprecated alias in ASE 3.29)
            warnings.simplefilter("ignore", DeprecationWarning)
            MaxwellBoltzmannDistribution(atoms, temperature_K=temperature,
                                         rng=np.random.default_rng(seed))
        step, frames_done = 0, 0
        bonds0 = bond_set(atoms.numbers, atoms.positions)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.touch()
    if frames_done >= frames:
        logger.info("%s already holds %d frames (asked %d): nothing to do", out, frames_done, frames)
        return out

    calc_kw = dict(method="GFN2-xTB", verbosity=0)
    if charge:
        calc_kw["charge"] = int(charge)
    if driver == "mmff":
        from .mmff import MMFFCalculator, mmff_molecule

        # bonds from the starting structure (rebuilt the same way on a resume)
        if start is None:
            start, _ = build_system(system, seed=seed)
        if start.numbers.tolist() != atoms.numbers.tolist():
            raise DataError(f"{out}: the state's atoms are not those of {system!r}")
        atoms.calc = MMFFCalculator(mmff_molecule(start.numbers, start.positions, charge, what=name))
    else:
        atoms.calc = TBLite(**calc_kw)
    with warnings.catch_warnings():  # fixcm=True (ASE default) is kept: same as make_gfn2.py
        warnings.simplefilter("ignore", FutureWarning)
        dyn = Langevin(atoms, dt_fs * units.fs, temperature_K=temperature,
                       friction=friction_per_fs / units.fs, rng=rng)
    meta = dict(system=name, method="GFN2-xTB", temperature_K=float(temperature), seed=int(seed),
                charge=int(charge), dt_fs=float(dt_fs), friction_per_fs=float(friction_per_fs),
                every=every, **_versions())
    if driver == "mmff":
        meta["md_driver"] = "MMFF94 (RDKit)"
    st_params = dict(params, name=name)
    total = equil_steps + frames * every
    bar = tqdm(total=total, initial=step, unit="step", desc=f"{name} {'MMFF94 + ' if driver == 'mmff' else ''}GFN2-xTB",
               disable=not progress,
               dynamic_ncols=True)
    try:
        with open(out, "ab") as fh:
            # equilibration, in chunks of `every` steps, saving the state after each chunk
            while step < equil_steps:
                n = min(every, equil_steps - step)
                dyn.run(n)
                step += n
                _save_state(state_path, atoms, rng, step, 0, fh.tell(), st_params, bonds0)
                bar.update(n)
            while frames_done < frames:
                dyn.run(every)
                step += every
                # Labels: a fresh SCF (no restart guess) on the geometry exactly as written to the
                # extxyz (8 decimals), so that they equal a new GFN2-xTB call on the stored frame
                # (the MD calculator restarts from the previous step's wavefunction, whose
                # converged forces differ by ~1e-4 eV/Å). The trajectory itself is untouched.
                if fresh_labels:
                    f = Atoms(atoms.numbers, np.round(atoms.positions, 8))
                    f.calc = TBLite(**calc_kw)
                    energy, forces = f.get_potential_energy(), f.get_forces().copy()
                else:
                    f = Atoms(atoms.numbers, atoms.positions.copy())
                    energy, forces = atoms.get_potential_energy(), atoms.get_forces().copy()
                _check(f, forces, energy, bonds0, frames_done, step, dt_fs, max_force, out)
                f.info.update(meta)
                f.info["time_fs"] = step * dt_fs
                f.calc = SinglePointCalculator(f, energy=energy, forces=forces)
                buf = io.StringIO()
                ase.io.write(buf, f, format="extxyz")
                fh.write(buf.getvalue().encode("utf-8"))
                fh.flush()
                frames_done += 1
                _save_state(state_path, atoms, rng, step, frames_done, fh.tell(), st_params, bonds0)
                bar.update(every)
    finally:
        bar.close()
    logger.info("wrote %d frames of %s (GFN2-xTB, eV and eV/Å) to %s", frames_done, name, out)
    return out


def _check(atoms, forces, energy, bonds0, frame, step, dt_fs, max_force, out) -> None:
    where = f"frame {frame} (MD step {step}, t = {step * dt_fs:g} fs)"
    # the run is deterministic: re-running on the same file replays the same steps and stops here again
    kept = (f"the {frame} frame(s) before it are in {out}; re-running would replay the same "
            "trajectory, so sample into a new file with a lower --temperature or another --seed")
    if not (np.isfinite(energy) and np.isfinite(forces).all()):
        raise SamplingError(f"{where}: non-finite energy or forces; stopping ({kept})")
    fmax = float(np.linalg.norm(forces, axis=1).max())
    if fmax > max_force:
        raise SamplingError(f"{where}: forces exploded (max |F| = {fmax:.1f} eV/Å > {max_force:g}); "
                            f"stopping ({kept})")
    bonds = bond_set(atoms.numbers, atoms.positions, previous=bonds0)
    if bonds != bonds0:
        broken, formed = bonds0 - bonds, bonds - bonds0
        msg = []
        if broken:
            msg.append("broken " + _pairs_text(broken, atoms.numbers))
        if formed:
            msg.append("formed " + _pairs_text(formed, atoms.numbers))
        raise SamplingError(f"{where}: bond topology changed ({'; '.join(msg)}) compared to the "
                            f"start; stopping ({kept})")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("system", metavar="SYSTEM",
                   help="a SMILES, a structure file, or a built-in name (MD17: aspirin, benzene, "
                        "ethanol, malonaldehyde, naphthalene, salicylic_acid, toluene, uracil, "
                        "paracetamol, azobenzene; MD22: Ac-Ala3-NHMe, DHA, stachyose, AT-AT, "
                        "AT-AT-CG-CG, buckyball-catcher, double-walled_nanotube)")
    p.add_argument("-o", "--output", required=True, help="extended XYZ file (appended; re-run to continue)")
    p.add_argument("-n", "--frames", type=int, default=1000, help="total frames wanted (default 1000)")
    p.add_argument("--temperature", type=float, default=500.0, help="K (default 500)")
    p.add_argument("--dt", type=float, default=0.5, help="time step, fs (default 0.5)")
    p.add_argument("--every", type=int, default=20, help="MD steps between frames (default 20)")
    p.add_argument("--equil-steps", type=int, default=4000, help="discarded steps (default 4000 = 2 ps)")
    p.add_argument("--friction", type=float, default=0.01, help="Langevin friction, 1/fs (default 0.01)")
    p.add_argument("--seed", type=int, default=1234, help="embedding/velocity seed (default 1234)")
    p.add_argument("--charge", type=int, default=0, help="total charge (default 0)")
    p.add_argument("--max-force", type=float, default=50.0, help="stop above this max |F|, eV/Å")
    p.add_argument("--driver", choices=("gfn2", "mmff"), default="gfn2",
                   help="what moves the atoms: gfn2 (GFN2-xTB dynamics, default) or mmff (MMFF94 "
                        "dynamics, GFN2-xTB labels of the written frames only: one SCF per frame "
                        "instead of one per step; an MMFF94 ensemble of geometries)")
    p.add_argument("--md-labels", action="store_true",
                   help="store the MD calculator's energy/forces (as make_gfn2.py) instead of a "
                        "fresh SCF per frame")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers and not logger.handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    try:
        out = sample(args.system, args.output, args.frames, temperature=args.temperature,
                     dt_fs=args.dt, every=args.every, equil_steps=args.equil_steps,
                     friction_per_fs=args.friction, seed=args.seed, charge=args.charge,
                     progress=not args.no_progress, max_force=args.max_force,
                     fresh_labels=not args.md_labels, driver=args.driver)
    except SamplingError as e:
        print(f"se3set-ase sample: stopped: {e}", file=sys.stderr)
        return 3
    except (DataError, ImportError) as e:
        print(f"se3set-ase sample: error: {e}", file=sys.stderr)
        return 2
    print(f"{out}: {args.frames} frames ({time.perf_counter() - t0:.0f} s)")
    return 0
