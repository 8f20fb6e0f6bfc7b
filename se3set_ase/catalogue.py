"""`se3set-ase models`: the model files that names resolve to, what each was trained on, its test
errors as measured at the end of its training, and where it lives.

Names are listed in resolution order (:mod:`.registry`; a file of that name in the current
directory first): a name found in several places resolves to the first, and the later copies
are listed as shadowed. A file that cannot be read is listed with the reason, not skipped, so a
broken model is seen before a calculator trips over it.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ase.data import chemical_symbols

from .registry import available_models, model_locations, search_dirs


@dataclass
class ModelEntry:
    """One model name as a calculator would resolve it. Errors in meV (per atom) and meV/Å."""

    name: str
    path: str
    shadowed: list[str] = field(default_factory=list)
    elements: list[str] = field(default_factory=list)
    preset: str | None = None
    parameters: int | None = None
    data: str | None = None
    train_frames: int | None = None
    test_energy_mae_meV_per_atom: float | None = None
    test_forces_mae_meV_A: float | None = None
    stopped: str | None = None
    #: ring systems cut into chunks and no reference geometries pinned: the energy depends on the
    #: input's atom order (se3set_ase.fragment.match)
    order_dependent: bool = False
    error: str | None = None


def _entry(name: str, path: Path) -> ModelEntry:
    from .model.checkpoint import read_model_file  # torch is imported only when there are files

    entry = ModelEntry(name=name, path=str(path))
    try:
        payload = read_model_file(path)
    except (ValueError, OSError) as exc:
        entry.error = str(exc)
        return entry
    meta, config = payload["metadata"], payload["config"]
    entry.elements = [chemical_symbols[int(z)] for z in config.get("elements", [])]
    training = meta.get("training", {})
    entry.preset = training.get("preset")
    entry.stopped = training.get("stopped")
    pins = payload.get("fragmentations") or []
    entry.order_dependent = (config.get("fragment", {}).get("max_ring_system_atoms") is not None
                             and any("references" not in p for p in pins))
    entry.parameters = training.get("parameters")
    entry.data = Path(training["data"]).name if training.get("data") else None
    entry.train_frames = training.get("frames", {}).get("train")
    test = meta.get("metrics", {}).get("test") or {}
    entry.test_energy_mae_meV_per_atom = test.get("energy_mae_meV_per_atom")
    entry.test_forces_mae_meV_A = test.get("forces_mae_meV_A")
    return entry


def list_models() -> list[ModelEntry]:
    """Every ``*.pt`` name in the search folders, sorted by name, each with the file it resolves
    to: as for ``resolve_model``, a file of that name in the current directory comes first."""
    entries = []
    for name in available_models():
        paths = model_locations(name)
        here = Path(name)
        if here.is_file() and here.resolve() not in {p.resolve() for p in paths}:
            paths.insert(0, here.absolute())
        first, *rest = paths
        entry = _entry(name, first)
        entry.shadowed = [str(p) for p in rest]
        entries.append(entry)
    return entries


def _fmt(x: Any, spec: str = "") -> str:
    return "-" if x is None else format(x, spec)


def format_entries(entries: list[ModelEntry]) -> str:
    """A fixed-width table, one model per line, then the shadowed copies and unreadable files."""
    from .training.stops import pre_empted  # imports torch (the training package), as reading files does

    head = (f"{'name':<28}{'elements':<12}{'preset':<8}{'params':>10}  {'trained on':<34}"
            f"{'test F MAE':>12}{'test E MAE':>12}  folder")
    units = f"{'':<28}{'':<12}{'':<8}{'':>10}  {'(file, training frames)':<34}{'meV/Å':>12}{'meV/atom':>12}"
    lines = [head, units]
    notes = []
    for e in entries:
        if e.error:
            lines.append(f"{e.name:<28}unreadable: see below{'':<30}{Path(e.path).parent}")
            notes.append(f"{e.name}: {e.error}")
            continue
        trained = f"{e.data or '-'} ({_fmt(e.train_frames)})" if e.data else "-"
        lines.append(f"{e.name:<28}{' '.join(e.elements):<12}{_fmt(e.preset):<8}{_fmt(e.parameters, ',d'):>10}  "
                     f"{trained:<34}{_fmt(e.test_forces_mae_meV_A, '.2f'):>12}"
                     f"{_fmt(e.test_energy_mae_meV_per_atom, '.3f'):>12}  {Path(e.path).parent}")
        notes += [f"{e.name}: {p} is shadowed (the name resolves to {e.path})" for p in e.shadowed]
        if pre_empted(e.stopped):
            notes.append(f"{e.name}: its training was pre-empted ({e.stopped}) and is unfinished: no test errors")
        if e.order_dependent:
            notes.append(f"{e.name}: cuts ring systems into chunks and stores no reference geometries, so its "
                         "energy depends on the atom order: keep its training data's, or add them "
                         "(models/pin_fragmentations.py)")
    return "\n".join(lines + ([""] + notes if notes else []))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")


def main(args: argparse.Namespace) -> int:
    entries = list_models()
    if args.json:
        print(json.dumps([asdict(e) for e in entries], indent=1))
        return 0
    dirs = ", ".join(str(d) for d in search_dirs())
    if not entries:
        print(f"no model files in {dirs}")
        return 0
    print(format_entries(entries))
    print(f"\nsearched, in this order: {dirs}; model cards: models/NAME.md in the source tree")
    return 0
