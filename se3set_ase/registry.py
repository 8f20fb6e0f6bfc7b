"""Where model files are found: ``SE3SetCalculator("md17_aspirin.pt")`` from any directory.

A name without a folder is looked up, in order, in ``$SE3SET_MODELS`` (a folder), the user model
folder (``$XDG_DATA_HOME/se3set_ase/models``, default ``~/.local/share/se3set_ase/models``; where
``se3set-ase fit -o NAME.pt`` results can be put), the ``models/`` folder of this source tree, and
the installed data folder ``<prefix>/share/se3set-ase/models``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


class ModelNotFoundError(FileNotFoundError):
    """A model name that resolves to no file; the message says what exists and what to do."""


def user_model_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "se3set_ase" / "models"


def search_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("SE3SET_MODELS"):
        dirs.append(Path(os.environ["SE3SET_MODELS"]))
    dirs.append(user_model_dir())
    dirs.append(Path(__file__).resolve().parent.parent / "models")
    dirs.append(Path(sys.prefix) / "share" / "se3set-ase" / "models")
    return dirs


def model_locations(fname: str) -> list[Path]:
    """Every file named ``fname`` in the search folders, in search order (a folder named twice
    counts once); the first is what a bare name resolves to."""
    found, seen = [], set()
    for d in search_dirs():
        if d.is_dir() and d.resolve() not in seen:
            seen.add(d.resolve())
            if (d / fname).is_file():
                found.append(d / fname)
    return found


def available_models() -> list[str]:
    names = set()
    for d in search_dirs():
        if d.is_dir():
            names.update(p.name for p in d.glob("*.pt"))
    return sorted(names)


def _guidance(name: str) -> str:
    stem = name[:-3] if name.endswith(".pt") else name
    if stem.startswith("md22_"):
        system = stem[len("md22_"):]
        return (f"\nMD22 models cannot be shipped: the MD22 data (PBE+MBD) is not redistributed with "
                f"se3set-ase. The GFN2-xTB model of the same system is 'gfn2_{system}.pt'. To build "
                f"'{name}' from the official MD22 file run:\n"
                f"    se3set-ase fit md22:{system} --preset paper -o {user_model_dir() / (stem + '.pt')}\n"
                "after which this name resolves.")
    if stem in ("md17_benzene", "md17_azobenzene"):
        mol = stem[len("md17_"):]
        return (f"\n'{name}' is not shipped (no training data was available to the project). Build it with:\n"
                f"    se3set-ase fit md17:{mol} -o {user_model_dir() / (stem + '.pt')}")
    return ""


def resolve_model(name: str | os.PathLike) -> Path:
    """Path of a model file given a path or a shipped/user model name."""
    path = Path(name)
    if path.is_file():
        return path
    if path.parent != Path(".") or path.is_absolute():
        raise ModelNotFoundError(f"model file {path} does not exist")
    fname = path.name if path.suffix == ".pt" else path.name + ".pt"
    found = model_locations(fname)
    if found:
        return found[0]
    avail = available_models()
    raise ModelNotFoundError(
        f"no model named '{fname}' (looked in {', '.join(str(d) for d in search_dirs())}). "
        f"Available: {', '.join(avail) if avail else 'none'}." + _guidance(fname))
