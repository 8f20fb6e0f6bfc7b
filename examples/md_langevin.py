"""Langevin (NVT) molecular dynamics at 300 K with an SE3Set model.

    python examples/md_langevin.py [--model md17_ethanol.pt] [--steps 400] [--device auto]
"""
import numpy as np
from ase import units
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

from _common import parse, setup

args = parse(__doc__, steps=400)
atoms = setup(args)
MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
dyn = Langevin(atoms, 0.5 * units.fs, temperature_K=300, friction=0.01 / units.fs, rng=np.random.default_rng(1))
temps = []


def report():
    temps.append(atoms.get_temperature())
    if dyn.nsteps % 50 == 0:
        print(f"t = {dyn.nsteps * 0.5:7.1f} fs  E_pot = {atoms.get_potential_energy():10.4f} eV  T = {temps[-1]:6.1f} K")


dyn.attach(report, interval=1)
dyn.run(args.steps)
print(f"mean temperature over the second half: {np.mean(temps[len(temps) // 2:]):.0f} K (target 300 K)")
