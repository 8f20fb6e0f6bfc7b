"""Built-in MD22 geometries that are built by a function (not from a SMILES)."""
import numpy as np
import pytest

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
    from se3set_ase.data.systems import build_double_walled_nanotube

    ideal = build_double_walled_nanotube()
    r = np.hypot(ideal.positions[:, 0], ideal.positions[:, 1])[ideal.numbers == 6]
    radii = np.unique(np.round(r, 2))
    assert len(radii) == 2 and abs(radii[1] - radii[0] - 3.39) < 0.05  # coaxial, ~3.4 Å walls
    assert np.allclose(build_double_walled_nanotube(seed=7).positions, ideal.positions)
    atoms, name = build_system("double-walled_nanotube", seed=1234)  # its GFN2-xTB minimum
    assert name == "double-walled_nanotube" and len(atoms) == 370
    assert atoms.get_chemical_formula() == "C270H100"  # MD22: C266H104, see the docstring
    _check_hydrocarbon(atoms)
    c = atoms.positions[atoms.numbers == 6]
    r_in, r_out = (np.hypot(*(w[:, :2] - w[:, :2].mean(0)).T) for w in (c[:120], c[120:]))
    assert r_in.std() < 0.2 and r_out.std() < 0.2  # still round
    assert abs(r_out.mean() - r_in.mean() - 3.35) < 0.15  # and coaxial at graphite spacing
    from se3set_ase.fragment import perceive_bonds

    topo = perceive_bonds(atoms.numbers, atoms.positions)
    assert len(topo.bonds) == (270 * 3 - 100) // 2 + 100


def test_double_walled_nanotube_fragments_in_bounded_memory(tmp_path):
    """Regression: the symmetrised SSSR of a nanotube exhausts memory (> 20 GB); fragmentation
    must finish quickly under a 3 GB address-space limit (run in a child process)."""
    import subprocess
    import sys

    code = (
        "import re, resource\n"
        "from se3set_ase.data.systems import build_system\n"
        "from se3set_ase.fragment import Fragmenter, FragmentSettings\n"
        # 3 GB above what the imports mapped (a CUDA build of torch maps gigabytes of address space)
        "vm = int(re.search(r'VmSize:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) << 10\n"
        "resource.setrlimit(resource.RLIMIT_AS, (vm + (3 << 30), vm + (3 << 30)))\n"
        "atoms, _ = build_system('nanotube')\n"
        "hg = Fragmenter(FragmentSettings.preset('md22'))(atoms)\n"
        "print(int(hg.batch.numel()), len(hg.token_anchor))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    n_atoms, n_tokens = map(int, out.stdout.split())
    assert n_atoms == 370 and n_tokens > 370


def _bowls(atoms):
    """(hub-centroid to C60-centre distance Å, bowl depth Å, cos(concave axis, hub->C60)) per
    corannulene of the catcher (atoms 0-87 in the SMILES' RDKit order, C60 = atoms 88-147)."""
    from rdkit import Chem

    from se3set_ase.data.buckycatcher import catcher_rings

    hub1, hub2, _ = catcher_rings(Chem.AddHs(Chem.MolFromSmiles(BUCKYCATCHER_SMILES)))
    x = atoms.positions
    centre = x[88:].mean(0)
    out = []
    for hub in (hub1, hub2):
        h = x[hub].mean(0)
        bowl = [i for i in range(88) if atoms.numbers[i] == 6 and np.linalg.norm(x[i] - h) < 3.8]
        assert len(bowl) == 20  # the corannulene carbons
        axis = x[bowl].mean(0) - h  # from the hub towards the rim: the concave side
        to_ball = centre - h
        out.append((np.linalg.norm(to_ball), np.linalg.norm(axis),
                    axis @ to_ball / np.linalg.norm(axis) / np.linalg.norm(to_ball)))
    return out


def test_buckyball_catcher_builtin():
    from rdkit import Chem
    from rdkit.Chem.rdMolDescriptors import CalcMolFormula

    assert CalcMolFormula(Chem.MolFromSmiles(BUCKYCATCHER_SMILES)) == "C60H28"
    atoms, name = build_system("buckyballcatcher")
    assert name == "buckyball-catcher" and len(atoms) == 148
    assert atoms.get_chemical_formula() == "C120H28"
    assert list(atoms.numbers[:88]) == [a.GetAtomicNum() for a in
                                        Chem.AddHs(Chem.MolFromSmiles(BUCKYCATCHER_SMILES)).GetAtoms()]
    _check_hydrocarbon(atoms)
    x = atoms.positions
    ball = x[88:]
    r = np.linalg.norm(ball - ball.mean(0), axis=1)
    assert abs(r.mean() - 3.52) < 0.05 and r.std() < 0.02  # C60 intact
    contact = np.linalg.norm(x[:88, None] - ball[None], axis=-1).min()
    assert 2.6 < contact < 3.3  # van der Waals contact, no bond between catcher and ball
    for dist, depth, cos in _bowls(atoms):
        assert 6.0 < dist < 7.2  # the ball sits in the cleft, on both hubs
        assert depth > 0.4  # corannulene is a bowl (MMFF would make it flat)
        assert cos > 0.95  # concave side facing the ball
    from se3set_ase.fragment import Fragmenter, FragmentSettings

    hg = Fragmenter(FragmentSettings.preset("md22"))(atoms)
    assert int(hg.batch.numel()) == 148


def test_buckyball_catcher_construction_is_reproducible():
    """Steps 1-2 of se3set_ase.data.buckycatcher (the MMFF open catcher + C60) are deterministic
    and put the ball in the cleft without contact closer than 3 Å (the shipped file is the
    GFN2-xTB minimum reached from there: test_shipped_geometries_are_relaxed_starts)."""
    from se3set_ase.data.buckycatcher import MIN_CONTACT_A, initial_guess

    a, b = initial_guess(), initial_guess()
    assert np.array_equal(a.positions, b.positions)
    assert np.linalg.norm(a.positions[:88, None] - a.positions[None, 88:], axis=-1).min() > MIN_CONTACT_A
    for dist, _, cos in _bowls(a):
        assert 7.0 < dist < 8.5 and cos > 0.8


@pytest.mark.parametrize("name", ["AT-AT", "AT-AT-CG-CG", "buckyball-catcher", "double-walled_nanotube"])
def test_shipped_geometries_are_relaxed_starts(name):
    """Each shipped geometry has its start's atoms in the same order, stayed near it (nothing
    flew apart) and is a GFN2-xTB stationary point (relaxed to 0.03 eV/Å; not re-checked for the
    370-atom nanotube, whose one GFN2-xTB gradient takes ~30 s)."""
    from se3set_ase.data.geometries import read_geometry, start as start_of

    shipped, start = read_geometry(name), start_of(name)
    assert np.array_equal(shipped.numbers, start.numbers)
    disp = np.linalg.norm(shipped.positions - start.positions, axis=1)
    assert disp.max() < 4.0, disp.max()
    assert np.ptp(shipped.positions, axis=0).max() < np.ptp(start.positions, axis=0).max() + 1.0
    if len(shipped) > 200:
        return
    pytest.importorskip("tblite.ase")
    from tblite.ase import TBLite

    shipped.calc = TBLite(method="GFN2-xTB", verbosity=0)
    assert np.linalg.norm(shipped.get_forces(), axis=1).max() < 0.035


def test_relaxation_resumes_from_its_trajectory(tmp_path):
    """A relaxation stopped early (here: a step limit; in practice a kill) continues from the
    last frame of its trajectory instead of starting over."""
    pytest.importorskip("tblite.ase")
    from ase.build import molecule
    from ase.io import Trajectory

    from se3set_ase.data.geometries import relax

    start = molecule("H2O")
    start.positions[1] += [0.3, 0.0, 0.1]
    traj = tmp_path / "w.traj"
    with pytest.raises(RuntimeError, match="did not reach fmax"):
        relax(start.copy(), steps=2, log=None, trajectory=traj)
    stopped = Trajectory(str(traj))[-1].positions
    first_frames = len(Trajectory(str(traj)))
    resumed = start.copy()
    done = relax(resumed, log=None, trajectory=traj)
    frames = Trajectory(str(traj))
    assert np.allclose(frames[first_frames].positions, stopped)  # continued from the stop
    assert np.linalg.norm(done.get_forces(), axis=1).max() < 0.03
    with pytest.raises(RuntimeError, match="another system"):
        relax(molecule("NH3"), log=None, trajectory=traj)
