"""MMFF94 (RDKit) as an ASE calculator: a cheap driver for sampling geometries.

``se3set-ase sample --driver mmff`` moves the molecule with MMFF94 Langevin dynamics and labels
only the written frames with GFN2-xTB: one SCF per frame instead of one per MD step (10-20x
fewer GFN2-xTB calls), at the price of an MMFF94 ensemble of geometries instead of a GFN2-xTB
one. The labels are exact GFN2-xTB energies and forces of the stored geometries either way.

Bonds, bond orders and formal charges come from the starting geometry by the fragmenter's own
perception (:func:`se3set_ase.fragment.bonds.perceive_bonds`), so MMFF94 and the model see one
topology. It runs in a child process with a memory limit, together with RDKit's ring and
aromaticity perception (sanitisation, which MMFF94 atom typing needs): that can exhaust memory on
cage or tube topologies (a 370-atom double-walled nanotube took > 20 GB), which must end in an
error here, not in the machine's OOM killer. When only the ring and aromaticity perception does not
fit, MMFF94 types the molecule from its Kekulé structure instead, with a warning (:func:`_sanitize`).
"""
from __future__ import annotations

import base64
import json
import subprocess
import sys
import warnings

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

_CHILD = "from se3set_ase.data.mmff import _perceive_in_child; _perceive_in_child()"


def _sanitize(mol, full: bool) -> None:
    """RDKit sanitisation for MMFF94 typing. ``full``: RDKit's own (symmetrised SSSR and RDKit
    aromaticity). Otherwise the reduced one for large fused sp2 networks, where RDKit's ring and
    aromaticity perception exhausts memory: plain SSSR and no RDKit aromaticity, so MMFF94 types
    aromatic rings by its own rules from the Kekulé structure (the same types for every shared
    molecule and MD22 system but the buckyball catcher, whose MMFF94 energy then differs: 1602
    against 1554 kcal/mol at its minimum)."""
    from rdkit import Chem

    if full:
        Chem.SanitizeMol(mol)
    else:
        Chem.SanitizeMol(mol, Chem.SANITIZE_ALL ^ Chem.SANITIZE_SYMMRINGS ^ Chem.SANITIZE_SETAROMATICITY)
        Chem.GetSSSR(mol)


def _perceive_in_child() -> None:
    """Body of the memory-limited child: stdin ``{"numbers", "positions", "charge", "limit",
    "full"}`` -> stdout the molecule (RDKit binary, base64), sanitised by :func:`_sanitize`.
    Exit 3 with the fragmenter's message on stderr when the atoms have no valid bond orders;
    an exhausted limit ends the child with an error or a signal."""
    import resource

    x = json.load(sys.stdin)
    resource.setrlimit(resource.RLIMIT_AS, (int(x["limit"]), int(x["limit"])))
    from ..fragment.bonds import _rdkit_mol, perceive_bonds
    from ..fragment.errors import FragmentationError, StructureError

    try:
        top = perceive_bonds(x["numbers"], x["positions"], charge=int(x["charge"]))
    except (FragmentationError, StructureError) as exc:
        sys.stderr.write(str(exc))
        sys.exit(3)
    bonds = np.asarray(top.bonds, dtype=np.int64).reshape(-1, 3)
    m = _rdkit_mol(top.numbers, np.asarray(x["positions"]), bonds[:, :2], bonds[:, 2], top.formal_charges)
    _sanitize(m, bool(x["full"]))
    sys.stdout.write(base64.b64encode(m.ToBinary()).decode())


def _run_child(request: dict, what: str) -> subprocess.CompletedProcess:
    try:
        # (the limit is set by the child itself: preexec_fn is unsafe in a threaded parent)
        res = subprocess.run([sys.executable, "-c", _CHILD], input=json.dumps(request),
                             capture_output=True, text=True, timeout=_PERCEPTION_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise DataError(f"{what}: RDKit bond perception took over {_PERCEPTION_TIMEOUT_S} s; "
                        f"use --driver gfn2") from None
    if res.returncode == 3:
        raise DataError(f"{what}: could not assign bonds for MMFF94: {res.stderr.strip()}")
    return res


def _failure(res: subprocess.CompletedProcess) -> str:
    how = f"signal {-res.returncode}" if res.returncode < 0 else f"exit status {res.returncode}"
    return (res.stderr.strip().splitlines() or [how])[-1]


def mmff_molecule(numbers, positions, charge: int = 0, what: str = "molecule"):
    """RDKit molecule (atom order = ``numbers``) with bonds and bond orders perceived from
    ``positions`` (Å), checked to have MMFF94 parameters. Raises DataError when RDKit cannot
    assign bonds (within 4 GiB and 10 min) or MMFF94 lacks parameters for an atom."""
    from rdkit import Chem
    from rdkit.Chem import rdForceFieldHelpers

    numbers = np.asarray(numbers, dtype=np.int64)
    request = {"numbers": numbers.tolist(), "positions": np.asarray(positions, dtype=float).tolist(),
               "charge": int(charge), "limit": int(PERCEPTION_MEMORY_BYTES), "full": True}
    res = _run_child(request, what)
    limit = f"{PERCEPTION_MEMORY_BYTES / 2**30:g} GiB"
    if res.returncode != 0:  # RDKit's own ring and aromaticity perception did not fit: the reduced one
        first = _failure(res)
        res = _run_child({**request, "full": False}, what)
        if res.returncode != 0:
            raise DataError(f"{what}: RDKit could not assign bonds and bond orders for MMFF94 within "
                            f"{limit} ({first}; {_failure(res)}); use --driver gfn2")
        warnings.warn(f"{what}: RDKit's ring and aromaticity perception does not fit in {limit} "
                      f"({first}); MMFF94 types the aromatic rings from the Kekulé structure (SSSR "
                      f"rings only)", stacklevel=2)
    m = Chem.Mol(base64.b64decode(res.stdout))  # sanitised in the child (the pickle keeps rings, aromaticity)
    if m.GetNumAtoms() != len(numbers) or \
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
