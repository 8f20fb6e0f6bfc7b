"""Built-in MD22 geometries that are built by a function (not from a SMILES)."""
import numpy as np
import pytest

from se3set_ase.data.errors import DataError
from se3set_ase.data.systems import BUCKYCATCHER_SMILES, build_system


def _check_hydrocarbon(atoms):
    x, z = atoms.positions, atoms.numbers
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    assert d.min() > 0.9
    nb = d < 1.75
    assert set(np.unique(nb[z == 6].sum(1))) <= {3, 4}
    assert (nb[z == 1].sum(1) == 1).all()
    assert (nb[z == 1][:, z == 6].sum(1) == 1).all()  # H bonded to C only


def test_double_walled_nanotube():
    atoms, name = build_system("double-walled_nanotube", seed=1234)
    assert name == "double-walled_nanotube" and len(atoms) == 370
    assert atoms.get_chemical_formula() == "C270H100"  # MD22: C266H104, see the docstring
    _check_hydrocarbon(atoms)
    r = np.hypot(atoms.positions[:, 0], atoms.positions[:, 1])[atoms.numbers == 6]
    radii = np.unique(np.round(r, 2))
    assert len(radii) == 2 and abs(radii[1] - radii[0] - 3.39) < 0.05  # coaxial, ~3.4 Å walls
    again, _ = build_system("nanotube", seed=7)
    assert np.allclose(again.positions, atoms.positions)  # deterministic
    from se3set_ase.fragment import perceive_bonds

    topo = perceive_bonds(atoms.numbers, atoms.positions)
    assert len(topo.bonds) == (270 * 3 - 100) // 2 + 100


def test_buckycatcher_smiles_and_not_built_yet():
    from rdkit import Chem
    from rdkit.Chem.rdMolDescriptors import CalcMolFormula

    assert CalcMolFormula(Chem.MolFromSmiles(BUCKYCATCHER_SMILES)) == "C60H28"
    with pytest.raises(DataError, match="buckyball-catcher .* not available yet"):
        build_system("buckyball-catcher")
