"""`se3set-ase sample`: GFN2-xTB frames, exact resume, clear errors."""
import argparse
import os

# tblite's OpenMP threads busy-wait; on a loaded 2-core runner that made these tiny runs 100x
# slower. Must be set before tblite's library is loaded (first import below, in the tests).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest

from se3set_ase.data import DataError, read_frames
from se3set_ase.data.sample import SamplingError, add_arguments, bond_set, main, sample
from se3set_ase.data.systems import BUILTIN_SMILES, build_system

FAST = dict(every=5, equil_steps=10, progress=False)


def test_bond_set():
    from ase.build import molecule

    w = molecule("H2O")
    assert bond_set(w.numbers, w.positions) == {(0, 1), (0, 2)}


def test_bond_set_short_hydrogen_bond_is_no_new_bond():
    """As the fragmenter: H1 1.18 Å from the acceptor O2 but nearer its own O1 stays O1's only;
    nearer O2 it has moved (a proton transfer, which the MD checks must report)."""
    from ase import Atoms

    def dimer(oo, h_shift=0.0):
        return Atoms("OHHOHH", positions=[[0, 0, 0], [0.97 + h_shift, 0, 0], [-0.24, 0.93, 0],
                                          [oo, 0, 0], [oo + 0.24, 0.93, 0], [oo + 0.24, -0.93, 0]])

    waters = {(0, 1), (0, 2), (3, 4), (3, 5)}
    for a in (dimer(2.9), dimer(2.15)):
        assert bond_set(a.numbers, a.positions) == waters
    moved = dimer(2.15, h_shift=0.15)
    assert bond_set(moved.numbers, moved.positions) == {(0, 2), (1, 3), (3, 4), (3, 5)}


def test_bond_set_with_previous_bonds_has_the_calculators_hysteresis():
    """Along a trajectory a pair not bonded before counts as bonded only below 1.1 (R_i + R_j):
    water squeezed to H...H 0.78 Å (inside 1.3 x 0.62 = 0.806 Å) is still water then, at 0.66 Å
    (inside 0.682 Å) it is not; without ``previous`` the geometry alone decides."""
    from ase import Atoms

    def bent(hh, oh=0.96):
        half = np.arcsin(hh / 2 / oh)
        return Atoms("OH2", positions=[[0, 0, 0], [oh * np.sin(half), oh * np.cos(half), 0],
                                       [-oh * np.sin(half), oh * np.cos(half), 0]])
    water = {(0, 1), (0, 2)}
    assert bond_set(bent(1.52).numbers, bent(1.52).positions) == water
    squeezed = bent(0.78)
    assert bond_set(squeezed.numbers, squeezed.positions) == {(1, 2)}
    assert bond_set(squeezed.numbers, squeezed.positions, previous=water) == water
    closer = bent(0.66)
    assert bond_set(closer.numbers, closer.positions, previous=water) == {(1, 2)}
    stretched = bent(1.52, oh=1.25)  # O-H inside 1.3 x 0.97 = 1.261 Å: the bonds hold
    assert bond_set(stretched.numbers, stretched.positions, previous=water) == water
    broken = bent(1.52, oh=1.27)  # beyond it: broken, hysteresis or not
    assert bond_set(broken.numbers, broken.positions, previous=water) == set()


def test_bad_smiles_and_unsupported_element(tmp_path):
    pytest.importorskip("tblite.ase")
    with pytest.raises(DataError, match="not a valid SMILES"):
        sample("C1CC(", tmp_path / "x.extxyz", 1, **FAST)
    with pytest.raises(DataError, match=r"U \(Z=92\) not covered by GFN2-xTB"):
        sample("[U]", tmp_path / "x.extxyz", 1, **FAST)
    assert not (tmp_path / "x.extxyz").exists()


def test_builtin_smiles_parse():
    from rdkit import Chem

    for name, smi in BUILTIN_SMILES.items():
        assert Chem.MolFromSmiles(smi) is not None, name
    atoms, name = build_system("Benzene")
    assert name == "benzene" and len(atoms) == 12


def test_frames_match_fresh_tblite(tmp_path):
    pytest.importorskip("tblite.ase")
    from tblite.ase import TBLite

    out = tmp_path / "co.extxyz"
    sample("CO", out, 3, **FAST)
    frames = read_frames(out)
    assert len(frames) == 3
    assert frames[0].info["method"] == "GFN2-xTB" and frames[0].info["system"] == "CO"
    assert frames[-1].info["time_fs"] == pytest.approx((10 + 3 * 5) * 0.5)
    for key in ("tblite_version", "ase_version", "rdkit_version", "se3set_ase_version", "seed",
                "temperature_K"):
        assert key in frames[0].info
    for fr in frames:
        a = fr.to_atoms()
        a.calc = TBLite(method="GFN2-xTB", verbosity=0)
        np.testing.assert_allclose(a.get_forces(), fr.forces, atol=1e-6)
        assert a.get_potential_energy() == pytest.approx(fr.energy, abs=1e-6)


def test_resume_equals_unbroken_run(tmp_path):
    pytest.importorskip("tblite.ase")
    full, part = tmp_path / "full.extxyz", tmp_path / "part.extxyz"
    sample("CO", full, 5, **FAST)
    sample("CO", part, 3, **FAST)  # "killed" after 3 frames
    assert len(read_frames(part)) == 3
    sample("CO", part, 5, **FAST)  # same command with the final count: continues
    a, b = read_frames(full), read_frames(part)
    assert len(b) == 5
    for x, y in zip(a, b):
        assert x.info["time_fs"] == y.info["time_fs"]
        # the restarted SCF guess differs at ~1e-9, amplified a little by the dynamics
        np.testing.assert_allclose(x.positions, y.positions, atol=1e-5)
        np.testing.assert_allclose(x.forces, y.forces, atol=1e-3)
    # a frame appended after the last state save (kill between the two writes) is dropped
    with open(part, "a") as fh:
        fh.write("3\ngarbage\n")
    sample("CO", part, 5, **FAST)
    assert len(read_frames(part)) == 5
    # other settings on an existing output: refused
    with pytest.raises(DataError, match="other settings"):
        sample("CO", part, 6, every=4, equil_steps=10, progress=False)
    # output without state: refused
    lone = tmp_path / "lone.extxyz"
    lone.write_text(full.read_text())
    with pytest.raises(DataError, match="no sampling state"):
        sample("CO", lone, 6, **FAST)


def test_topology_change_stops(tmp_path):
    pytest.importorskip("tblite.ase")
    # 3000 K with a large step breaks methanol quickly; max_force huge so the bond check triggers
    with pytest.raises(SamplingError, match=r"frame \d+ .*(bond topology changed|forces exploded).*"
                                            r"new file with a lower --temperature or another --seed"):
        sample("CO", tmp_path / "hot.extxyz", 200, temperature=20000.0, dt_fs=1.0, every=2,
               equil_steps=0, progress=False)


def test_cli(tmp_path, capsys):
    pytest.importorskip("tblite.ase")
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["O", "-o", str(tmp_path / "w.extxyz"), "-n", "2", "--every", "3",
                         "--equil-steps", "3", "--no-progress"])
    assert main(args) == 0
    assert len(read_frames(tmp_path / "w.extxyz")) == 2
    bad = p.parse_args(["[U]", "-o", str(tmp_path / "u.extxyz"), "-n", "1", "--no-progress"])
    assert main(bad) == 2
    assert "not covered by GFN2-xTB" in capsys.readouterr().err


@pytest.mark.parametrize("name,n,formula", [("AT-AT", 60, "C20H22N14O4"),
                                            ("AT-AT-CG-CG", 118, "C38H42N30O8")])
def test_md22_base_stacks(name, n, formula):
    pytest.importorskip("scipy")
    atoms, got = build_system(name.lower())
    assert got == name and len(atoms) == n and atoms.get_chemical_formula() == formula
    d = np.linalg.norm(atoms.positions[:, None] - atoms.positions[None], axis=-1) + 9 * np.eye(n)
    assert d.min() > 0.9
    # every covalent bond lies inside one base: the H-bonded/stacked partners are not bonded
    from se3set_ase.data.systems import BASE_SMILES, _embed_base
    sizes = {k: len(_embed_base(k, 1234)[0]) for k in BASE_SMILES}
    order = {"AT-AT": "ATAT", "AT-AT-CG-CG": "ATATGCGC"}[name]
    base_of = np.concatenate([np.full(sizes[b], k) for k, b in enumerate(order)])
    assert all(base_of[i] == base_of[j] for i, j in bond_set(atoms.numbers, atoms.positions))


def test_md_labels_same_trajectory(tmp_path):
    pytest.importorskip("tblite.ase")
    a, b = tmp_path / "a.extxyz", tmp_path / "b.extxyz"
    sample("O", a, 2, **FAST)
    sample("O", b, 2, fresh_labels=False, **FAST)
    fa, fb = read_frames(a), read_frames(b)
    for x, y in zip(fa, fb):
        np.testing.assert_array_equal(x.positions, y.positions)  # labels do not touch the MD
        np.testing.assert_allclose(x.forces, y.forces, atol=1e-2)


def test_help_names_every_builtin_system():
    import argparse
    import re

    from se3set_ase.data.sample import add_arguments
    from se3set_ase.data.systems import builtin_names

    p = argparse.ArgumentParser()
    add_arguments(p)
    text = re.sub(r"-\s+", "-", " ".join(p.format_help().split()))  # argparse wraps after '-'
    missing = [n for n in builtin_names() if n not in text]
    assert not missing, missing


# ------------------------------------------------------------------ --driver mmff
def test_mmff_calculator_forces_are_minus_gradient():
    from se3set_ase.data.mmff import MMFFCalculator, mmff_molecule

    atoms, _ = build_system("ethanol")
    atoms.positions += np.random.default_rng(0).normal(scale=0.05, size=atoms.positions.shape)
    atoms.calc = MMFFCalculator(mmff_molecule(atoms.numbers, atoms.positions))
    f = atoms.get_forces()
    h = 1e-4
    for i, k in [(0, 0), (2, 1), (5, 2), (8, 0)]:
        p = atoms.positions.copy()
        p[i, k] += h
        ep = atoms.calc.get_potential_energy(atoms.__class__(atoms.numbers, p))
        p[i, k] -= 2 * h
        em = atoms.calc.get_potential_energy(atoms.__class__(atoms.numbers, p))
        assert -(ep - em) / (2 * h) == pytest.approx(f[i, k], abs=1e-5)


def test_mmff_molecule_rejects_an_impossible_structure():
    from se3set_ase.data.mmff import mmff_molecule

    # a carbon with seven hydrogens around it: no bond orders make that a molecule
    pos = np.array([[0, 0, 0]] + [[np.cos(a), np.sin(a), 0.3 * (-1) ** k] for k, a in
                                  enumerate(np.linspace(0, 2 * np.pi, 8)[:7])], dtype=float)
    with pytest.raises(DataError, match="could not assign bond|MMFF94 has no parameters"):
        mmff_molecule([6] + [1] * 7, pos, what="CH7")


def test_mmff_driver_frames_are_gfn2_labelled_and_resume_exactly(tmp_path):
    pytest.importorskip("tblite.ase")
    from tblite.ase import TBLite

    full, part = tmp_path / "full.extxyz", tmp_path / "part.extxyz"
    sample("CCO", full, 4, driver="mmff", **FAST)
    frames = read_frames(full)
    assert len(frames) == 4
    assert frames[0].info["md_driver"] == "MMFF94 (RDKit)" and frames[0].info["method"] == "GFN2-xTB"
    for fr in frames[::3]:  # the labels are a fresh GFN2-xTB SCF on the written geometry
        a = fr.to_atoms()
        a.calc = TBLite(method="GFN2-xTB", verbosity=0)
        np.testing.assert_allclose(a.get_forces(), fr.forces, atol=1e-6)
    # MMFF dynamics is deterministic: a cut run continues bit for bit
    sample("CCO", part, 2, driver="mmff", **FAST)
    sample("CCO", part, 4, driver="mmff", **FAST)
    for x, y in zip(frames, read_frames(part)):
        np.testing.assert_array_equal(x.positions, y.positions)
        np.testing.assert_allclose(x.forces, y.forces, atol=1e-6)
    # the driver is part of the settings: continuing with the GFN2-xTB driver is refused
    with pytest.raises(DataError, match="other settings"):
        sample("CCO", part, 5, **FAST)
    with pytest.raises(DataError, match="cannot be combined"):
        sample("CCO", tmp_path / "x.extxyz", 1, driver="mmff", fresh_labels=False, **FAST)


def test_mmff_bond_perception_out_of_memory_is_an_error_not_an_oom_kill(monkeypatch):
    import se3set_ase.data.mmff as mmff

    # 64 MiB of address space is too little even to import RDKit: the child fails, cleanly
    monkeypatch.setattr(mmff, "PERCEPTION_MEMORY_BYTES", 64 << 20)
    atoms, _ = build_system("ethanol")
    with pytest.raises(DataError, match=r"could not assign bonds and bond orders for MMFF94 within 0.0625 GiB"):
        mmff.mmff_molecule(atoms.numbers, atoms.positions, what="ethanol")


def test_mmff_reduced_perception_types_ordinary_molecules_as_the_full_one():
    """The fallback for fused sp2 networks (no RDKit aromaticity, plain SSSR) gives MMFF94 the same
    atom types and energy as RDKit's full perception on an aromatic molecule with an ester."""
    from rdkit.Chem import rdForceFieldHelpers as F
    from se3set_ase.data.mmff import _sanitize
    from se3set_ase.fragment.bonds import _rdkit_mol, perceive_bonds

    atoms, _ = build_system("aspirin")
    top = perceive_bonds(atoms.numbers, atoms.positions)
    b = np.asarray(top.bonds)
    typed = []
    for full in (True, False):
        m = _rdkit_mol(top.numbers, atoms.positions, b[:, :2], b[:, 2], top.formal_charges)
        _sanitize(m, full)
        p = F.MMFFGetMoleculeProperties(m)
        ff = F.MMFFGetMoleculeForceField(m, p, nonBondedThresh=1e6, ignoreInterfragInteractions=False)
        typed.append(([p.GetMMFFAtomType(i) for i in range(m.GetNumAtoms())], ff.CalcEnergy()))
    assert 37 in typed[0][0]  # aromatic carbon: the ring was typed aromatic
    assert typed[0][0] == typed[1][0]
    assert typed[0][1] == pytest.approx(typed[1][1], abs=1e-9)


def test_mmff_molecule_falls_back_when_full_perception_does_not_fit(monkeypatch):
    import subprocess

    import se3set_ase.data.mmff as mmff

    calls = []
    real = mmff._run_child

    def first_one_crashes(request, what):
        calls.append(request["full"])
        if request["full"]:  # as RDKit's ring perception on a nanotube: killed by the limit
            return subprocess.CompletedProcess([], -11, "", "")
        return real(request, what)

    monkeypatch.setattr(mmff, "_run_child", first_one_crashes)
    atoms, _ = build_system("ethanol")
    with pytest.warns(UserWarning, match=r"does not fit in 4 GiB \(signal 11\); MMFF94 types"):
        m = mmff.mmff_molecule(atoms.numbers, atoms.positions, what="ethanol")
    assert calls == [True, False] and m.GetNumAtoms() == 9
    atoms.calc = mmff.MMFFCalculator(m)
    assert np.isfinite(atoms.get_potential_energy())
