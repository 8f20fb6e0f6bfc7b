"""`se3set-ase label`: GFN2-xTB labels of given geometries, continued after a cut, clear errors."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # tblite's OpenMP threads busy-wait (see test_sample)

import ase.io  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from ase.build import molecule  # noqa: E402

from se3set_ase.cli import main as cli_main  # noqa: E402
from se3set_ase.data import DataError, read_frames  # noqa: E402
from se3set_ase.data.label import label  # noqa: E402


def geometries(n=4, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a = molecule("H2O")
        a.positions += rng.normal(scale=0.05, size=a.positions.shape)
        out.append(a)
    return out


def test_labels_equal_a_fresh_gfn2_call_and_read_back(tmp_path):
    pytest.importorskip("tblite.ase")
    from tblite.ase import TBLite

    src = tmp_path / "geoms.xyz"
    ase.io.write(src, geometries())
    out = label(src, tmp_path / "labelled.extxyz", every=2, progress=False)
    frames = read_frames(out)
    assert len(frames) == 2
    for k, fr in zip((0, 2), frames):
        assert fr.info["method"] == "GFN2-xTB" and fr.info["source_index"] == k
        a = geometries()[k]
        np.testing.assert_allclose(fr.positions, np.round(a.positions, 8), atol=1e-9)
        a.calc = TBLite(method="GFN2-xTB", verbosity=0)
        assert a.get_potential_energy() == pytest.approx(fr.energy, abs=1e-6)
        np.testing.assert_allclose(a.get_forces(), fr.forces, atol=1e-6)


def test_a_cut_run_continues_without_relabelling(tmp_path, monkeypatch):
    pytest.importorskip("tblite.ase")
    import tblite.ase

    src = tmp_path / "geoms.xyz"
    ase.io.write(src, geometries(3))
    out = tmp_path / "l.extxyz"
    whole = label(src, tmp_path / "whole.extxyz", progress=False)
    text = whole.read_text()
    first = "".join(text.splitlines(keepends=True)[:2 * (3 + 2)])  # two frames of 3 atoms
    out.write_text(first)
    calls = []
    real = tblite.ase.TBLite.calculate

    def counting(self, *a, **k):
        calls.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(tblite.ase.TBLite, "calculate", counting)
    label(src, out, progress=False)
    assert len(calls) == 1  # only the third geometry
    assert [f.energy for f in read_frames(out)] == pytest.approx([f.energy for f in read_frames(whole)], abs=1e-9)


def test_errors(tmp_path, capsys):
    pytest.importorskip("tblite.ase")
    with pytest.raises(DataError, match="no such file"):
        label(tmp_path / "missing.xyz", tmp_path / "o.extxyz", progress=False)
    periodic = molecule("H2O", vacuum=3.0)
    periodic.pbc = True
    ase.io.write(tmp_path / "p.extxyz", periodic)
    with pytest.raises(DataError, match="periodic"):
        label(tmp_path / "p.extxyz", tmp_path / "o.extxyz", progress=False)
    ase.io.write(tmp_path / "a.xyz", geometries(2))
    ase.io.write(tmp_path / "b.xyz", geometries(2, seed=5))
    label(tmp_path / "a.xyz", tmp_path / "ab.extxyz", progress=False)
    with pytest.raises(DataError, match="is not geometry 0 of"):
        label(tmp_path / "b.xyz", tmp_path / "ab.extxyz", progress=False)
    assert cli_main(["label", str(tmp_path / "missing.xyz"), "-o", str(tmp_path / "o.extxyz")]) == 2
    assert "no such file" in capsys.readouterr().err
