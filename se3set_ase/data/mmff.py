"""MMFF94 (RDKit) as an ASE calculator: a cheap driver for sampling geometries.

``se3set-ase sample --driver mmff`` moves the molecule with MMFF94 Langevin dynamics and labels
only the written frames with GFN2-xTB: one SCF per frame instead of one per MD step (10-20x
fewer GFN2-xTB calls), at the price of an MMFF94 ensemble of geometries instead of a GFN2-xTB
one. The labels are exact GFN2-xTB energies and forces of the stored geometries either way.

Bonds and bond orders come from the starting geometry (``rdkit.Chem.rdDetermineBonds``), run in a
child process with a memory limit: RDKit's bond-order and ring perception can exhaust memory on
cage or tube topologies (a 370-atom double-walled nanotube took > 20 GB), which must end in an
error here, not in the machine's OOM killer.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
from ase.calculators.calculator import Calculator, all_changes
from ase.units import kcal, mol as _mol

from .errors import DataError

__all__ = ["MMFFCalculator", "mmff_molecule", "PERCEPTION_MEMORY_BYTES"]

#: kcal/mol -> eV
KCAL_PER_MOL = kcal / _mol
#: address-space limit of the bond-perception child process
PERCEPTION_MEMORY_BYTES = 4 << 30
_PERCEPTION_TIMEOUT_S = 600

_PERCEIVE = (
    "import resource, sys\n"
    "lim = int(sys.argv[2])\n"
    "resource.setrlimit(resource.RLIMIT_AS, (lim, lim))\n"
    "from rdkit import Chem\n"
    "from rdkit.Chem import rdDetermineBonds\n"
    "m = Chem.MolFromXYZBlock(sys.stdin.read())\n"
    "rdDetermineBonds.DetermineBonds(m, charge=int(sys.argv[1]))\n"
    "sys.stdout.write(Chem.MolToMolBlock(m, kekulize=True))\n"
)


def mmff_molecule(numbers, positions, charge: int = 0, what: str = "molecule"):
    """RDKit molecule (atom order = ``numbers``) with bonds and bond orders perceived from
    ``positions`` (Å), checked to have MMFF94 parameters. Raises DataError when RDKit cannot
    assign bonds (within 4 GiB and 10 min) or MMFF94 lacks parameters for an atom."""
    from rdkit import Chem
    from rdkit.Chem import rdForceFieldHelpers
    from ase.data import chemical_symbols

    numbers = np.asarray(numbers)
    positions = np.asarray(positions, dtype=float)
    xyz = f"{len(numbers)}\n\n" + "".join(
        f"{chemical_symbols[int(z)]} {x:.8f} {y:.8f} {zz:.8f}\n" for z, (x, y, zz) in zip(numbers, positions))
    try:
        # (the limit is set by the child itself: preexec_fn is unsafe in a threaded parent)
        res = subprocess.run([sys.executable, "-c", _PERCEIVE, str(int(charge)), str(PERCEPTION_MEMORY_BYTES)],
                             input=xyz, capture_output=True, text=True, timeout=_PERCEPTION_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise DataError(f"{what}: RDKit bond perception took over {_PERCEPTION_TIMEOUT_S} s; "
                        f"use --driver gfn2") from None
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["killed"])[-1]
        raise DataError(f"{what}: RDKit could not assign bonds and bond orders for MMFF94 within "
                        f"{PERCEPTION_MEMORY_BYTES / 2**30:g} GiB ({last}); use --driver gfn2")
    m = Chem.MolFromMolBlock(res.stdout, removeHs=False)
    if m is None or m.GetNumAtoms() != len(numbers) or \
            [a.GetAtomicNum() for a in m.GetAtoms()] != numbers.tolist():
        raise DataError(f"{what}: RDKit's perceived molecule does not match the atoms")
    if not rdForceFieldHelpers.MMFFHasAllMoleculeParams(m):
        raise DataError(f"{what}: MMFF94 has no parameters for some atom types of this molecule; "
                        f"use --driver gfn2")
    return m


class MMFFCalculator(Calculator):
    """MMFF94 energy (eV) and forces (eV/Å) of one fixed-topology molecule (RDKit), no cutoff on
    non-bonded terms. ``molecule``: from :func:`mmff_molecule`, atoms in the order of the
    ``ase.Atoms`` it is attached to."""

    implemented_properties = ["energy", "forces"]

    def __init__(self, molecule, **kwargs):
        super().__init__(**kwargs)
        from rdkit.Chem import rdForceFieldHelpers

        self.molecule = molecule
        props = rdForceFieldHelpers.MMFFGetMoleculeProperties(molecule)
        self._ff = rdForceFieldHelpers.MMFFGetMoleculeForceField(molecule, props, nonBondedThresh=1e6,
                                                                 ignoreInterfragInteractions=False)
        self._n = molecule.GetNumAtoms()

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        if len(self.atoms) != self._n:
            raise DataError(f"MMFFCalculator: built for {self._n} atoms, got {len(self.atoms)}")
        x = self.atoms.get_positions().ravel().tolist()
        energy = self._ff.CalcEnergy(x) * KCAL_PER_MOL
        grad = np.asarray(self._ff.CalcGrad(x), dtype=float).reshape(-1, 3) * KCAL_PER_MOL
        self.results = {"energy": float(energy), "forces": -grad}
