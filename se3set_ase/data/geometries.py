"""Shipped relaxed geometries of the built-in MD22 systems that have no SMILES route.

``geometries/<name>.xyz`` holds the GFN2-xTB minimum of each system below, written by

    python -m se3set_ase.data.geometries NAME [NAME ...]

from a deterministic start (:func:`start`) relaxed with tblite's GFN2-xTB and ASE's L-BFGS to
max |F| <= 0.03 eV/Å on one thread. :func:`se3set_ase.data.systems.build_system` reads these files,
so ``se3set-ase sample AT-AT`` starts from a relaxed structure without minutes of xTB first.

- ``AT-AT`` (60 atoms), ``AT-AT-CG-CG`` (118): the Watson-Crick stacks of
  :func:`se3set_ase.data.systems.build_base_stack` (seed 1234: MMFF bases placed as rigid bodies);
- ``buckyball-catcher`` (148): see :mod:`se3set_ase.data.buckycatcher`;
- ``double-walled_nanotube`` (370): :func:`se3set_ase.data.systems.build_double_walled_nanotube`
  (ideal rolled graphene, H caps); 31 L-BFGS steps at ~20-30 s each on one core (a killed run
  resumes from ``<output>.traj``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

GEOMETRY_DIR = Path(__file__).resolve().parent / "geometries"
FMAX = 0.03  # eV/Å


def start(name: str):
    """The unrelaxed start of ``name`` (one of :data:`~se3set_ase.data.systems.SHIPPED_GEOMETRIES`)."""
    from .buckycatcher import initial_guess
    from .systems import STACKS, build_base_stack, build_double_walled_nanotube

    if name == "buckyball-catcher":
        return initial_guess()
    if name == "double-walled_nanotube":
        return build_double_walled_nanotube()
    return build_base_stack(STACKS[name], seed=1234)


def path(name: str) -> Path:
    return GEOMETRY_DIR / f"{name}.xyz"


def read_geometry(name: str):
    """ase.Atoms (no cell, no calculator) of the shipped relaxed geometry of ``name``."""
    import ase.io
    from ase import Atoms

    atoms = ase.io.read(str(path(name)), format="xyz")
    return Atoms(atoms.numbers, atoms.positions)


def relax(atoms, fmax: float = FMAX, steps: int = 2000, log: str | None = "-",
          trajectory: Path | None = None):
    """GFN2-xTB (tblite) L-BFGS relaxation in place, to max |F| <= fmax (eV/Å).

    With ``trajectory`` every step is appended to that ASE .traj file, and a run that finds the
    file continues from its last frame (a killed relaxation resumes; L-BFGS restarts its
    curvature memory there)."""
    from ase.io import Trajectory
    from ase.optimize import LBFGS
    from tblite.ase import TBLite

    if trajectory is not None and Path(trajectory).is_file() and Path(trajectory).stat().st_size:
        done = Trajectory(str(trajectory))
        if len(done):
            last = done[-1]
            if not np.array_equal(last.numbers, atoms.numbers):
                raise RuntimeError(f"{trajectory} holds another system: delete it to start over")
            atoms.positions = last.positions
        done.close()
    atoms.calc = TBLite(method="GFN2-xTB", verbosity=0)
    traj = Trajectory(str(trajectory), "a", atoms) if trajectory is not None else None
    opt = LBFGS(atoms, logfile=log, maxstep=0.2)
    if traj is not None:
        opt.attach(traj.write, interval=1)
    if not opt.run(fmax=fmax, steps=steps):
        raise RuntimeError(f"GFN2-xTB relaxation did not reach fmax {fmax} in {steps} steps")
    return atoms


def build(name: str, output: Path | None = None, log: str | None = "-") -> Path:
    """Relax ``start(name)`` and write it (xyz, comment with energy and max force); the steps go
    to ``<output>.traj`` so that a killed run continues where it stopped."""
    out = Path(output) if output else path(name)
    atoms = relax(start(name), log=log, trajectory=out.with_suffix(".traj"))
    energy = atoms.get_potential_energy()
    fmax = float(np.linalg.norm(atoms.get_forces(), axis=1).max())
    atoms.calc = None
    comment = (f"{name}, GFN2-xTB (tblite) minimum, E = {energy:.6f} eV, max|F| = {fmax:.4f} eV/A; "
               f"made by python -m se3set_ase.data.geometries {name}")
    atoms.write(str(out), format="xyz", comment=comment)
    out.with_suffix(".traj").unlink(missing_ok=True)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Relax and write the shipped built-in geometries.")
    from .systems import SHIPPED_GEOMETRIES

    p.add_argument("names", nargs="+", choices=list(SHIPPED_GEOMETRIES))
    p.add_argument("--out-dir", type=Path, default=None, help=f"default {GEOMETRY_DIR}")
    args = p.parse_args(argv)
    for name in args.names:
        out = build(name, args.out_dir / f"{name}.xyz" if args.out_dir else None)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
