"""Readers: sGDML / revised-MD17 npz, extxyz and any ASE-readable file, ASE databases.

All of them go through `read_frames`, which yields `Frame`s in eV and eV/Å and checks them
(shapes, NaN/inf, missing labels) with errors that name the file and the frame."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError
from .frames import Frame, available_keys

__all__ = ["KCAL_PER_MOL_IN_EV", "read_frames", "load_npz_arrays", "NPZ_FORMATS"]

logger = logging.getLogger("se3set_ase")

#: 1 kcal/mol in eV (CODATA: 4184 J/mol / (e N_A)); the one place this constant is defined.
KCAL_PER_MOL_IN_EV = 0.0433641043

# npz layouts: name -> (numbers, positions, energy, forces, energy/forces unit factor, unit text)
NPZ_FORMATS: dict[str, tuple[str, str, str, str, float, str]] = {
    "sGDML npz": ("z", "R", "E", "F", KCAL_PER_MOL_IN_EV, "kcal/mol -> eV"),
    "revised-MD17 npz": ("nuclear_charges", "coords", "energies", "forces", KCAL_PER_MOL_IN_EV,
                         "kcal/mol -> eV"),
    "se3set npz": ("numbers", "positions", "energy", "forces", 1.0, "eV, no conversion"),
}



def _parse_index(index: Any, n: int, path: Path) -> np.ndarray:
    """Frame numbers selected by `index` (int, slice, ASE-style string like ':', '-1', '0:100:2',
    or a sequence of ints) among n frames."""
    all_idx = np.arange(n)
    try:
        if index is None:
            return all_idx
        if isinstance(index, str):
            from ase.io.formats import string2index

            index = string2index(index)
        if isinstance(index, (int, np.integer)):
            return np.atleast_1d(all_idx[int(index)])
        if isinstance(index, slice):
            return all_idx[index]
        return all_idx[np.asarray(index, dtype=np.int64)]
    except (IndexError, ValueError, TypeError) as e:
        raise DataError(f"{path}: index {index!r} does not select frames among {n}: {e}") from None


def _first_bad(a: np.ndarray) -> int | None:
    """Index (along axis 0) of the first frame holding NaN/inf, or None."""
    ok = np.isfinite(a.reshape(a.shape[0], -1)).all(axis=1)
    bad = np.flatnonzero(~ok)
    return int(bad[0]) if bad.size else None


def load_npz_arrays(path: str | os.PathLike, require_labels: bool = True) -> dict[str, Any]:
    """Open an npz (sGDML, revised MD17 or the package's own layout) and check it.

    Returns dict(format, numbers (N,), positions (F,N,3), energy (F,) or None, forces (F,N,3)
    or None, charge, unit) with energies/forces already in eV, eV/Å. Does not build Frames, so
    it is cheap enough to validate a freshly downloaded file."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as e:  # zipfile.BadZipFile, ValueError (pickled), OSError, EOFError...
        raise DataError(f"{path}: not a readable npz file ({type(e).__name__}: {e})") from None
    keys = sorted(data)
    fmt = None
    for name, (kz, kr, _, _, _, _) in NPZ_FORMATS.items():
        if kz in data and kr in data:
            fmt = name
            break
    if fmt is None:
        expected = "; ".join(f"{n}: {', '.join(v[:4])}" for n, v in NPZ_FORMATS.items())
        raise DataError(f"{path}: missing keys; the npz holds {keys} but one of these layouts is "
                        f"needed ({expected})")
    kz, kr, ke, kf, factor, unit = NPZ_FORMATS[fmt]
    R = data[kr]
    if R.dtype == object or R.ndim != 3 or R.shape[-1] != 3:
        if R.ndim == 2 and R.shape[-1] == 3:
            R = R[None]
        else:
            raise DataError(f"{path}: key '{kr}' has shape {R.shape} (dtype {R.dtype}); expected one "
                            f"(frames, atoms, 3) array - mixed atom counts in one npz are not "
                            f"supported, write such data as extxyz")
    R = R.astype(np.float64)
    F_, N = R.shape[:2]
    if F_ == 0:
        raise DataError(f"{path}: empty file: key '{kr}' holds 0 frames")
    Z = np.asarray(data[kz])
    if Z.ndim == 2:  # per-frame numbers: must be identical across frames
        if Z.shape != (F_, N):
            raise DataError(f"{path}: shape mismatch: '{kz}' has shape {Z.shape}, '{kr}' {R.shape}")
        diff = np.flatnonzero((Z != Z[0]).any(axis=1))
        if diff.size:
            raise DataError(f"{path}: frame {int(diff[0])}: atomic numbers differ from frame 0 - "
                            f"mixed molecules in one npz are not supported, write them as extxyz")
        Z = Z[0]
    if Z.shape != (N,):
        raise DataError(f"{path}: shape mismatch: '{kz}' has shape {Z.shape} but '{kr}' has "
                        f"{N} atoms per frame (shape {R.shape}); mixed atom counts are not supported")
    Z = Z.astype(np.int64)
    if (Z < 1).any() or (Z > 118).any():
        raise DataError(f"{path}: key '{kz}' holds atomic numbers outside 1..118: {np.unique(Z)}")
    bad = _first_bad(R)
    if bad is not None:
        raise DataError(f"{path}: frame {bad}: NaN/inf in positions ('{kr}')")

    E = Fo = None
    if ke in data:
        E = np.asarray(data[ke], dtype=np.float64)
        if E.shape not in ((F_,), (F_, 1)):
            raise DataError(f"{path}: shape mismatch: '{ke}' has shape {E.shape}, expected ({F_},) "
                            f"or ({F_}, 1) for {F_} frames")
        E = E.reshape(F_) * factor
        bad = _first_bad(E[:, None])
        if bad is not None:
            raise DataError(f"{path}: frame {bad}: NaN/inf in energy ('{ke}')")
    if kf in data:
        Fo = np.asarray(data[kf], dtype=np.float64)
        if Fo.shape != R.shape:
            raise DataError(f"{path}: shape mismatch: '{kf}' has shape {Fo.shape}, positions "
                            f"'{kr}' have {R.shape}")
        Fo = Fo * factor
        bad = _first_bad(Fo)
        if bad is not None:
            raise DataError(f"{path}: frame {bad}: NaN/inf in forces ('{kf}')")
    if require_labels and (E is None or Fo is None):
        missing = [k for k in (ke, kf) if k not in data]
        raise DataError(f"{path}: frame 0: missing key(s) {missing} ({fmt}); the npz holds {keys}. "
                        f"Pass require_labels=False to read unlabelled frames")
    charge = 0
    if "charge" in data and np.asarray(data["charge"]).size == 1:
        charge = int(np.asarray(data["charge"]).reshape(()))
    return dict(format=fmt, numbers=Z, positions=R, energy=E, forces=Fo, charge=charge, unit=unit,
                keys=keys)


def _read_npz(path: Path, index, require_labels: bool) -> list[Frame]:
    d = load_npz_arrays(path, require_labels=require_labels)
    sel = _parse_index(index, d["positions"].shape[0], path)
    Z, R, E, F = d["numbers"], d["positions"], d["energy"], d["forces"]
    frames = [
        Frame(numbers=Z.copy(), positions=R[i], energy=None if E is None else float(E[i]),
              forces=None if F is None else F[i], charge=d["charge"],
              info={"source": str(path), "index": int(i)})
        for i in sel
    ]
    logger.info("read %d frames from %s (%s), %s", len(frames), path, d["format"], d["unit"])
    return frames


def _check_frame(fr: Frame, path: Path, i: int, require_labels: bool, atoms=None,
                 energy_key=None, forces_key=None) -> None:
    n = len(fr)
    if n == 0:
        raise DataError(f"{path}: frame {i}: no atoms")
    if not np.isfinite(fr.positions).all():
        raise DataError(f"{path}: frame {i}: NaN/inf in positions")
    if fr.energy is not None and not np.isfinite(fr.energy):
        raise DataError(f"{path}: frame {i}: energy is {fr.energy}")
    if fr.forces is not None:
        if fr.forces.shape != (n, 3):
            raise DataError(f"{path}: frame {i}: shape mismatch: forces {fr.forces.shape} for {n} atoms")
        if not np.isfinite(fr.forces).all():
            raise DataError(f"{path}: frame {i}: NaN/inf in forces")
    if require_labels and (fr.energy is None or fr.forces is None):
        what = [w for w, v in (("energy", fr.energy), ("forces", fr.forces)) if v is None]
        where = (f" (looked for energy key {energy_key or 'energy'!r}, forces key "
                 f"{forces_key or 'forces'!r}, then the calculator)")
        present = available_keys(atoms) if atoms is not None else ""
        raise DataError(f"{path}: frame {i}: missing {' and '.join(what)}{where}; present: {present}. "
                        f"Pass energy_key=/forces_key= or require_labels=False")


def _read_db(path: Path, index, require_labels, energy_key, forces_key) -> list[Frame]:
    import ase.db

    try:
        with ase.db.connect(str(path), type="db") as db:
            rows = list(db.select())
    except Exception as e:
        raise DataError(f"{path}: not a readable ASE database ({type(e).__name__}: {e})") from None
    if not rows:
        raise DataError(f"{path}: empty file: the database holds no rows")
    sel = _parse_index(index, len(rows), path)
    frames = []
    for i in sel:
        row = rows[i]
        atoms = row.toatoms()
        atoms.info.update(row.key_value_pairs)
        data = row.get("data", {}) or {}
        if energy_key and energy_key in data:
            atoms.info[energy_key] = float(np.asarray(data[energy_key]).reshape(()))
        if forces_key and forces_key in data:
            atoms.arrays[forces_key] = np.asarray(data[forces_key], dtype=np.float64)
        fr = Frame.from_atoms(atoms, energy_key=energy_key, forces_key=forces_key)
        fr.info.update(source=str(path), index=int(i), db_id=int(row.id))
        _check_frame(fr, path, int(i), require_labels, atoms, energy_key, forces_key)
        frames.append(fr)
    logger.info("read %d frames from %s (ASE database), eV and eV/Å, no conversion", len(frames), path)
    return frames


_DECOMPRESS = {".xz": "lzma", ".gz": "gzip", ".bz2": "bz2"}


def _decompressed(path: Path, fmt: str | None) -> tuple[Any, str | None]:
    """(what to hand ``ase.io.read``, format). A compressed text file (``.xz``, ``.gz``, ``.bz2``)
    is decompressed into memory once: ASE's extxyz reader seeks back for every frame, and each
    backward seek in a compressed stream decompresses it again from the start (minutes for 2000
    frames). The format then comes from the name without the compression suffix."""
    if path.suffix not in _DECOMPRESS:
        return str(path), fmt
    import importlib
    import io

    from ase.io.formats import filetype

    opener = importlib.import_module(_DECOMPRESS[path.suffix]).open
    with opener(path, "rt") as fh:
        text = fh.read()
    return io.StringIO(text), fmt or filetype(path.stem, read=False)


def _read_ase(path: Path, index, require_labels, energy_key, forces_key, fmt=None) -> list[Frame]:
    import ase.io

    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file")
    try:
        source, source_fmt = _decompressed(path, fmt)
        images = ase.io.read(source, index=":", format=source_fmt)
    except Exception as e:
        raise DataError(f"{path}: cannot be read by ASE ({type(e).__name__}: {e}); supported: "
                        f"sGDML/revised-MD17 npz, extxyz, ASE database (.db) or another ASE "
                        f"format") from None
    if not isinstance(images, list):
        images = [images]
    if not images:
        raise DataError(f"{path}: empty file: no frames")
    sel = _parse_index(index, len(images), path)
    frames = []
    for i in sel:
        atoms = images[i]
        fr = Frame.from_atoms(atoms, energy_key=energy_key, forces_key=forces_key)
        fr.info.update(source=str(path), index=int(i))
        _check_frame(fr, path, int(i), require_labels, atoms, energy_key, forces_key)
        frames.append(fr)
    logger.info("read %d frames from %s (%s), eV and eV/Å, no conversion", len(frames), path,
                fmt or path.suffix.lstrip(".") or "ASE")
    return frames


def _looks_like_name(s: str) -> bool:
    from .datasets import COLLECTIONS

    head = s.split(":", 1)[0].lower()
    return ":" in s and head in COLLECTIONS


def read_frames(path_or_name, energy_key: str | None = None, forces_key: str | None = None,
                index=":", require_labels: bool = True) -> list[Frame]:
    """Frames (eV, eV/Å) from a file or a named dataset ("md17:aspirin", "rmd17:ethanol",
    "md22:DHA").

    Files: sGDML npz (R, z, E, F in kcal/mol), revised-MD17 npz (nuclear_charges, coords,
    energies, forces in kcal/mol), the package's npz (numbers, positions, energy, forces in eV),
    an ASE database (.db) and any ASE-readable file (extxyz...). For ASE files the labels come
    from `info[energy_key]` / `arrays[forces_key]` or the calculator (see Frame.from_atoms).
    `index`: ASE-style string (":", "-1", "0:100"), int, slice or sequence of ints.
    Raises DataError naming the file and frame for every problem."""
    s = os.fspath(path_or_name)
    path = Path(s).expanduser()
    if not path.exists() and _looks_like_name(s):
        from .datasets import resolve_dataset

        path = resolve_dataset(s)
    if not path.exists():
        raise DataError(f"{path}: no such file (pass a data file, or a dataset name such as "
                        f"md17:aspirin, rmd17:aspirin, md22:DHA)")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not a data file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _read_npz(path, index, require_labels)
    if suffix == ".db":
        return _read_db(path, index, require_labels, energy_key, forces_key)
    fmt = "extxyz" if suffix in (".xyz", ".extxyz") else None
    return _read_ase(path, index, require_labels, energy_key, forces_key, fmt)
