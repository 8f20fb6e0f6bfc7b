"""NVE molecular dynamics (velocity Verlet, 0.5 fs) with an SE3Set model; prints the energy drift.

    python examples/md_nve.py [--model md17_ethanol.pt] [--steps 400] [--device auto]
"""
import time

import numpy as np
from ase import units
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary, ZeroRotation
from ase.md.verlet import VelocityVerlet

from _common import parse, setup

args = parse(__doc__, steps=400)
atoms = setup(args)
MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
Stationary(atoms)
ZeroRotation(atoms)
dyn = VelocityVerlet(atoms, 0.5 * units.fs)
e0 = atoms.get_total_energy()
totals = []


def report():
    e = atoms.get_total_energy()
    totals.append(e)
    if dyn.nsteps % 50 == 0:
        print(f"t = {dyn.nsteps * 0.5:7.1f} fs  E_pot = {atoms.get_potential_energy():10.4f} eV  "
              f"T = {atoms.get_temperature():6.1f} K  E_tot - E0 = {1000 * (e - e0):+8.3f} meV")


dyn.attach(report, interval=1)
t = time.perf_counter()
dyn.run(args.steps)
wall = time.perf_counter() - t
totals = np.array(totals)
print(f"{args.steps} steps ({args.steps * 0.5:.0f} fs) in {wall:.1f} s ({1000 * wall / args.steps:.1f} ms/step)")
print(f"energy drift: {1000 * (totals[-1] - totals[0]):+.3f} meV over the run, "
      f"max |E_tot - E0| = {1000 * np.abs(totals - e0).max():.3f} meV "
      f"({1000 * np.abs(totals - e0).max() / len(atoms):.3f} meV/atom)")
