"""Readers: units, keys, formats and error messages."""
import logging

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
import ase.io

from se3set_ase.data import DataError, Frame, KCAL_PER_MOL_IN_EV, read_frames, split_indices
from se3set_ase.data.splits import load_splits, save_splits

KCAL = KCAL_PER_MOL_IN_EV


def sgdml_arrays(n_frames=4, seed=0):
    rng = np.random.default_rng(seed)
    z = np.array([8, 1, 1])
    R = np.array([[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]], float) + 0.01 * rng.normal(size=(n_frames, 3, 3))
    E = rng.normal(size=(n_frames, 1)) - 1000.0
    F = rng.normal(size=(n_frames, 3, 3))
    return z, R, E, F


def test_constant():
    assert abs(KCAL - 0.0433641) < 1e-7


def test_sgdml_npz_units_and_log(tmp_path, caplog):
    z, R, E, F = sgdml_arrays()
    p = tmp_path / "md17_water.npz"
    np.savez(p, z=z, R=R, E=E, F=F, name="water")
    with caplog.at_level(logging.INFO, logger="se3set_ase"):
        frames = read_frames(p)
    assert len(frames) == 4
    assert frames[2].numbers.dtype == np.int64 and frames[2].positions.dtype == np.float64
    np.testing.assert_allclose(frames[2].positions, R[2])
    assert frames[2].energy == pytest.approx(E[2, 0] * KCAL)
    np.testing.assert_allclose(frames[2].forces, F[2] * KCAL)
    assert "read 4 frames" in caplog.text and "kcal/mol -> eV" in caplog.text
    # E of shape (F,) and index selection
    np.savez(p, z=z, R=R, E=E[:, 0], F=F)
    sel = read_frames(p, index="1:3")
    assert [f.info["index"] for f in sel] == [1, 2]
    assert read_frames(p, index=-1)[0].energy == pytest.approx(E[-1, 0] * KCAL)


def test_rmd17_npz(tmp_path):
    z, R, E, F = sgdml_arrays()
    p = tmp_path / "rmd17_water.npz"
    np.savez(p, nuclear_charges=z, coords=R, energies=E[:, 0], forces=F, old_indices=np.arange(4))
    frames = read_frames(p)
    assert frames[0].energy == pytest.approx(E[0, 0] * KCAL)
    np.testing.assert_allclose(frames[3].forces, F[3] * KCAL)


def test_npz_errors(tmp_path):
    z, R, E, F = sgdml_arrays()
    p = tmp_path / "bad.npz"
    np.savez(p, z=z, R=R, E=E)  # no F
    with pytest.raises(DataError, match=r"bad.npz.*missing key.*'F'.*holds \['E', 'R', 'z'\]"):
        read_frames(p)
    assert read_frames(p, require_labels=False)[0].forces is None
    np.savez(p, z=z, R=R, E=E[:3], F=F)
    with pytest.raises(DataError, match="shape mismatch.*'E'"):
        read_frames(p)
    np.savez(p, z=z, R=R, E=E, F=F[:, :2])
    with pytest.raises(DataError, match="shape mismatch.*'F'"):
        read_frames(p)
    np.savez(p, z=z[:2], R=R, E=E, F=F)
    with pytest.raises(DataError, match="mixed atom counts"):
        read_frames(p)
    F2 = F.copy(); F2[2, 1, 0] = np.nan
    np.savez(p, z=z, R=R, E=E, F=F2)
    with pytest.raises(DataError, match="frame 2: NaN/inf in forces"):
        read_frames(p)
    E2 = E.copy(); E2[3] = np.inf
    np.savez(p, z=z, R=R, E=E2, F=F)
    with pytest.raises(DataError, match="frame 3: NaN/inf in energy"):
        read_frames(p)
    R2 = R.copy(); R2[1, 0, 0] = np.nan
    np.savez(p, z=z, R=R2, E=E, F=F)
    with pytest.raises(DataError, match="frame 1: NaN/inf in positions"):
        read_frames(p)
    np.savez(p, foo=np.zeros(3))
    with pytest.raises(DataError, match=r"missing keys.*\['foo'\]"):
        read_frames(p)
    p.write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(DataError, match="bad.npz: not a readable npz"):
        read_frames(p)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="nothere.xyz: no such file"):
        read_frames(tmp_path / "nothere.xyz")
    e = tmp_path / "empty.extxyz"
    e.write_text("")
    with pytest.raises(DataError, match="empty.extxyz: empty file"):
        read_frames(e)


def _water(i, e=None, f=None):
    a = Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0.01 * i], [-0.24, 0.93, 0]])
    if e is not None:
        a.calc = SinglePointCalculator(a, energy=e, forces=f)
    return a


def test_extxyz_calculator_and_custom_keys(tmp_path):
    rng = np.random.default_rng(1)
    frames = [_water(i, -10.0 - i, rng.normal(size=(3, 3))) for i in range(3)]
    p = tmp_path / "w.extxyz"
    ase.io.write(p, frames, format="extxyz")
    got = read_frames(p)
    assert [g.energy for g in got] == pytest.approx([-10, -11, -12])
    np.testing.assert_allclose(got[1].forces, frames[1].calc.results["forces"], atol=1e-6)
    # custom keys in info/arrays
    custom = []
    for i in range(2):
        a = _water(i)
        a.info["REF_energy"] = -5.0 - i
        a.arrays["REF_forces"] = np.full((3, 3), float(i))
        custom.append(a)
    q = tmp_path / "c.extxyz"
    ase.io.write(q, custom, format="extxyz")
    got = read_frames(q, energy_key="REF_energy", forces_key="REF_forces")
    assert got[1].energy == pytest.approx(-6.0)
    np.testing.assert_allclose(got[1].forces, 1.0)
    with pytest.raises(DataError, match=r"c.extxyz: frame 0: missing energy and forces.*REF_energy"):
        read_frames(q)
    assert read_frames(q, require_labels=False)[0].energy is None


@pytest.mark.parametrize("suffix,module", [(".xz", "lzma"), (".gz", "gzip"), (".bz2", "bz2")])
def test_compressed_extxyz_reads_the_same_frames(tmp_path, suffix, module):
    """A compressed extxyz (the shipped AT-AT data is .extxyz.xz) gives the frames of the plain
    file; its format comes from the name without the compression suffix."""
    import importlib

    rng = np.random.default_rng(2)
    frames = [_water(i, -10.0 - i, rng.normal(size=(3, 3))) for i in range(4)]
    plain = tmp_path / "w.extxyz"
    ase.io.write(plain, frames, format="extxyz")
    packed = tmp_path / ("w.extxyz" + suffix)
    with importlib.import_module(module).open(packed, "wb") as fh:
        fh.write(plain.read_bytes())
    want, got = read_frames(plain), read_frames(packed)
    assert len(got) == 4
    for w, g in zip(want, got):
        assert g.energy == w.energy
        np.testing.assert_array_equal(g.forces, w.forces)
        np.testing.assert_array_equal(g.positions, w.positions)
        np.testing.assert_array_equal(g.numbers, w.numbers)
    assert [g.energy for g in read_frames(packed, index="1:3")] == [-11.0, -12.0]


def test_extxyz_nan_and_partial_labels(tmp_path):
    a = _water(0, -1.0, np.zeros((3, 3)))
    b = _water(1, -2.0, np.full((3, 3), np.nan))
    p = tmp_path / "n.extxyz"
    ase.io.write(p, [a, b], format="extxyz")
    with pytest.raises(DataError, match="n.extxyz: frame 1: NaN/inf in forces"):
        read_frames(p)


def test_ase_db(tmp_path):
    import ase.db

    p = tmp_path / "d.db"
    with ase.db.connect(p) as db:
        for i in range(3):
            db.write(_water(i, -3.0 - i, np.full((3, 3), 0.5 * i)))
    got = read_frames(p)
    assert len(got) == 3 and got[2].energy == pytest.approx(-5.0)
    np.testing.assert_allclose(got[2].forces, 1.0)
    assert read_frames(p, index="0:2")[1].energy == pytest.approx(-4.0)


def test_frame_roundtrip():
    f = Frame(numbers=[8, 1, 1], positions=np.eye(3), energy=-1.5, forces=np.ones((3, 3)), charge=-1,
              info={"system": "x"})
    a = f.to_atoms()
    assert a.get_potential_energy() == -1.5 and a.info["charge"] == -1
    g = Frame.from_atoms(a)
    assert g.energy == -1.5 and g.charge == -1 and g.info["system"] == "x"
    np.testing.assert_allclose(g.forces, 1.0)
    u = Frame(numbers=[1], positions=[[0, 0, 0]])
    assert u.to_atoms().calc is None and not u.has_labels


def test_split_indices_in_contiguous_blocks():
    """block > 1: whole blocks of consecutive frames go to one set (correlated MD neighbours stay
    together); only the blocks at the two set boundaries are shared; block=1 is the plain split."""
    n, block = 2000, 20
    s = split_indices(n, train=1800, valid=100, test=100, seed=0, block=block)
    assert [len(s[k]) for k in ("train", "valid", "test")] == [1800, 100, 100]
    assert len(np.unique(np.concatenate(list(s.values())))) == n
    owner = np.full(n, -1)
    for k, name in enumerate(("train", "valid", "test")):
        owner[s[name]] = k
    mixed = [b for b in range(n // block) if len(set(owner[b * block:(b + 1) * block])) > 1]
    assert len(mixed) <= 2
    # a test frame's neighbours 1 frame away are test frames too, except at block edges
    t = set(s["test"].tolist())
    inner = sum((i + 1 in t) for i in t)
    assert inner >= len(t) - 2 * len(t) // block - 2
    random = split_indices(n, train=1800, valid=100, test=100, seed=0)
    assert sum((i + 1 in set(random["test"].tolist())) for i in random["test"]) < 20
    assert all((split_indices(n, 1800, 100, 100, seed=0, block=1)[k] == random[k]).all() for k in random)
    odd = split_indices(105, train=80, valid=10, test=15, seed=1, block=20)  # last block shorter
    assert sorted(np.concatenate(list(odd.values())).tolist()) == list(range(105))
    with pytest.raises(DataError, match="split block"):
        split_indices(100, 80, 10, block=0)


def test_split_indices_ints_fracs_and_errors(tmp_path):
    s = split_indices(1000, train=950, valid=50, seed=3)
    assert len(s["train"]) == 950 and len(s["valid"]) == 50 and len(s["test"]) == 0
    s2 = split_indices(1000, train=950, valid=50, seed=3)
    assert all((s[k] == s2[k]).all() for k in s)
    perm = np.random.default_rng(3).permutation(1000)
    assert (s["train"] == np.sort(perm[:950])).all()
    f = split_indices(100, train=0.8, valid=0.1, seed=0)
    assert [len(f[k]) for k in ("train", "valid", "test")] == [80, 10, 10]
    allidx = np.concatenate([f[k] for k in f])
    assert len(np.unique(allidx)) == 100
    t = split_indices(100, 10, 10, test=5)
    assert len(t["test"]) == 5
    with pytest.raises(DataError, match="exceeds the 100 frames"):
        split_indices(100, 950, 50)
    with pytest.raises(DataError, match="exceeds"):
        split_indices(100, 50, 40, test=20)
    with pytest.raises(DataError, match="fraction"):
        split_indices(100, 1.5, 0.1)
    path = save_splits(tmp_path, f, n=100, seed=0)
    assert path.name == "splits.npz"
    back = load_splits(tmp_path, n=100)
    assert all((back[k] == f[k]).all() for k in f)
    with pytest.raises(DataError, match="made for 100 frames"):
        load_splits(path, n=50)
