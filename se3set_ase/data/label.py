"""GFN2-xTB labels for given geometries: ``se3set-ase label geometries.xyz -o labelled.extxyz``.

The sampler (:mod:`.sample`) makes reference data by running GFN2-xTB molecular dynamics; this
labels geometries that came from elsewhere, such as the frames of a model's own MD where it went
wrong (active learning: label them, train on with ``fit --extra-train``). Each geometry gets a
fresh SCF (tblite, GFN2-xTB, no restart guess) on its positions rounded to 8 decimals, exactly as
written, so the labels equal any later GFN2-xTB call on the stored frame. Energies in eV, forces
in eV/Å, written as extended XYZ that :func:`se3set_ase.data.read_frames` reads. A run that was
cut continues where the output ends (frames already written are not recomputed).
"""
from __future__ import annotations

import argparse
import io
import logging
import sys
import time
from pathlib import Path

import numpy as np

from .errors import DataError

logger = logging.getLogger(__name__)


def label(inp, out, charge: int | None = None, every: int = 1, progress: bool = True) -> Path:
    """Label every ``every``-th geometry of ``inp`` (any file ASE reads) with GFN2-xTB and append
    the frames to the extxyz ``out``; returns its path. ``charge``: total charge (default: each
    geometry's ``info["charge"]``, else 0). Raises DataError (unreadable input, periodic cell,
    output from another input), ImportError (tblite missing)."""
    from .sample import _require_tblite, _versions

    TBLite = _require_tblite()
    import ase.io
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator
    from tqdm.auto import tqdm

    inp, out = Path(inp), Path(out)
    if every < 1:
        raise DataError(f"every must be >= 1, not {every}")
    try:
        geoms = ase.io.read(inp, index=f"::{every}")
    except FileNotFoundError:
        raise DataError(f"{inp}: no such file") from None
    except Exception as exc:  # noqa: BLE001  (ASE raises many kinds for unreadable files)
        raise DataError(f"{inp}: not a structure file ASE can read ({type(exc).__name__}: {exc})") from None
    if not geoms:
        raise DataError(f"{inp}: no geometries")
    for k, a in enumerate(geoms):
        if a.pbc.any():
            raise DataError(f"{inp}: geometry {k * every} is periodic; GFN2-xTB labels here are for molecules")
    done = 0
    if out.exists() and out.stat().st_size:
        try:
            written = ase.io.read(out, index=":")
        except Exception as exc:  # noqa: BLE001  (a frame cut while being written, another format)
            raise DataError(f"{out}: cannot be read to continue ({type(exc).__name__}: {exc}); "
                            "remove it or choose another output name") from None
        for k, w in enumerate(written):
            a = geoms[k] if k < len(geoms) else None
            if (a is None or w.info.get("source_file") != inp.name or len(w) != len(a)
                    or not np.allclose(w.positions, np.round(a.positions, 8), atol=1e-7)):
                raise DataError(f"{out}: frame {k} is not geometry {k * every} of {inp}; "
                                "choose another output name")
        done = len(written)
        logger.info("%s: %d of %d geometries already labelled, continuing", out, done, len(geoms))
    meta = dict(method="GFN2-xTB", source_file=inp.name, every=int(every), **_versions())
    t0 = time.perf_counter()
    with open(out, "ab") as fh:
        for k in tqdm(range(done, len(geoms)), disable=not progress, unit="frame", desc="GFN2-xTB"):
            a = geoms[k]
            q = int(a.info.get("charge", 0)) if charge is None else int(charge)
            f = Atoms(a.numbers, np.round(a.positions, 8))
            f.calc = TBLite(method="GFN2-xTB", verbosity=0, **({"charge": q} if q else {}))
            energy, forces = f.get_potential_energy(), f.get_forces().copy()
            f.info.update(meta)
            f.info.update(charge=q, source_index=k * every)
            f.calc = SinglePointCalculator(f, energy=energy, forces=forces)
            buf = io.StringIO()
            ase.io.write(buf, f, format="extxyz")
            fh.write(buf.getvalue().encode("utf-8"))
            fh.flush()
    logger.info("labelled %d geometries of %s with GFN2-xTB (eV, eV/Å) into %s in %.0f s",
                len(geoms) - done, inp, out, time.perf_counter() - t0)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="geometries: any file ASE reads (xyz, extxyz, traj, ...)")
    p.add_argument("-o", "--output", required=True, help="extended XYZ file (appended; re-run to continue)")
    p.add_argument("--every", type=int, default=1, help="label every N-th geometry (default 1)")
    p.add_argument("--charge", type=int, default=None, help="total charge (default: info['charge'] or 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers and not logger.handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = label(args.input, args.output, charge=args.charge, every=args.every, progress=not args.no_progress)
    except (DataError, ImportError) as e:
        print(f"se3set-ase label: error: {e}", file=sys.stderr)
        return 2
    print(f"{out}: labelled")
    return 0
