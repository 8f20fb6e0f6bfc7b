"""Geometry optimisation (BFGS, fmax 0.01 eV/Å) with an SE3Set model.

    python examples/optimize_bfgs.py [--model md17_ethanol.pt] [--steps 500] [--device auto]
"""
from ase.optimize import BFGS

from _common import parse, setup

args = parse(__doc__, steps=500)
atoms = setup(args)
e0 = atoms.get_potential_energy()
opt = BFGS(atoms, logfile="-")
converged = opt.run(fmax=0.01, steps=args.steps)
print(f"converged: {converged} after {opt.nsteps} steps; E = {atoms.get_potential_energy():.4f} eV "
      f"({atoms.get_potential_energy() - e0:+.4f} eV from the start)")
