"""Fragmentation -> hypergraph: published counts, invariances, cache, continuity, errors."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms

from se3set_ase import hypergraph as hgmod
from se3set_ase.fragment import (
    Fragmentation,
    FragmentationError,
    Fragmenter,
    FragmentSettings,
    StructureError,
    Topology,
    fragment,
    perceive_bonds,
    validate_structure,
)

from se3set_ase.fragment.bonds import connectivity  # noqa: E402
from se3set_ase.fragment.errors import distance_matrix  # noqa: E402
from se3set_ase.fragment.pairs import PAIR_SKIN  # noqa: E402

DATA = Path(__file__).parent / "data"
MD17 = FragmentSettings.preset("md17")
MD22 = FragmentSettings.preset("md22")


def read(name: str) -> Atoms:
    return ase.io.read(DATA / f"{name}.xyz")


def formula(atoms: Atoms, idx) -> str:
    c = Counter(atoms.get_chemical_symbols()[i] for i in idx)
    return "".join(f"{s}{c[s]}" for s in sorted(c))


def from_smiles(smiles: str, seed: int = 7) -> Atoms:
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    assert AllChem.EmbedMolecule(mol, randomSeed=seed) == 0
    AllChem.MMFFOptimizeMolecule(mol)
    charge = Chem.GetFormalCharge(mol)
    return Atoms(
        numbers=[a.GetAtomicNum() for a in mol.GetAtoms()],
        positions=mol.GetConformer().GetPositions(),
        info={"charge": charge},
    )


def random_rotation(rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q


def assert_same_tensors(a: hgmod.Hypergraph, b: hgmod.Hypergraph):
    for name in ("numbers", "token_anchor", "token_edge", "token_switched", "v2e_src", "v2e_dst", "batch"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.allclose(a.positions, b.positions)
    assert a.num_graphs == b.num_graphs


def token_multiset(hg: hgmod.Hypergraph, perm_inv=None) -> Counter:
    """Tokens as (anchor, member set, switched), in original atom labels via perm_inv."""
    m = perm_inv if perm_inv is not None else np.arange(hg.num_atoms)
    members: dict[int, set[int]] = {t: set() for t in range(hg.num_tokens)}
    for s, t in zip(hg.v2e_src.tolist(), hg.v2e_dst.tolist()):
        members[t].add(int(m[s]))
    out = Counter()
    for t in range(hg.num_tokens):
        a = int(m[int(hg.token_anchor[t])])
        out[(a, frozenset(members[t] | {a}), bool(hg.token_switched[t]))] += 1
    return out


# --------------------------------------------------------------------------- published counts


def test_aspirin_md17():
    atoms = read("aspirin")
    frag = fragment(atoms.numbers, atoms.positions, settings=MD17)
    assert sorted(formula(atoms, g) for g in frag.groups) == sorted(
        ["C6H4", "C1H1O2", "C1O2", "C1H3"]  # ring+4H, COOH, ester C(=O)O, CH3
    )
    assert [len(g) for g in frag.groups] == [10, 4, 4, 3]
    assert frag.kernels == frag.groups  # no merge with min 2
    sizes = {formula(atoms, k): len(h) for k, h in zip(frag.kernels, frag.hyperedges)}
    assert sizes == {"C6H4": 17, "C1H1O2": 14, "C1O2": 17, "C1H3": 7}
    for k, h in zip(frag.kernels, frag.hyperedges):
        assert set(k) <= set(h)
    hg = frag.hypergraph(atoms.positions)
    assert hg.num_tokens == 55
    assert hg.v2e_src.numel() + hg.num_tokens == 823  # incidences including self
    assert not bool(hg.token_switched.any())
    stats = hgmod.hypergraph_stats([hg])
    assert stats["avg_hyperedge_degree"] == pytest.approx(823 / 55)
    assert stats["avg_node_degree"] == pytest.approx(55 / 21)


def test_ac_ala3_nhme_md22():
    atoms = read("ac_ala3_nhme")
    frag = fragment(atoms.numbers, atoms.positions, settings=MD22)
    assert len(frag.groups) == 12
    assert Counter(formula(atoms, g) for g in frag.groups) == Counter(
        {"C1H1N1O1": 4, "C1H3": 5, "C1H1": 3}
    )
    assert frag.hyperedges == frag.kernels == frag.groups
    assert sorted(a for k in frag.kernels for a in k) == list(range(len(atoms)))  # a partition
    hg = frag.hypergraph(atoms.positions)
    n_cross = int(hg.token_switched.sum())
    assert hg.num_tokens == len(atoms) + n_cross
    assert 100 < n_cross < 250  # the reference sees ~150-165 at r_c = 4 Å


def test_dha_md22_groups():
    atoms = read("dha")
    frag = fragment(atoms.numbers, atoms.positions, settings=MD22)
    c = Counter(formula(atoms, g) for g in frag.groups)
    assert c == Counter({"C2H2": 6, "C1H2": 8, "C1H3": 1, "C1H1O2": 1})


def test_large_ring_systems_cut_into_connected_chunks():
    """The catcher is two ring systems (C60, C60H28): one hyperedge each by the published rule;
    with max_ring_system_atoms=12 every group has at most 12 atoms, groups partition the atoms,
    each is connected by bonds, hydrogens stay with their carbon, and the hypergraph builds."""
    import dataclasses

    from se3set_ase.data.geometries import read_geometry

    atoms = read_geometry("buckyball-catcher")
    whole = fragment(atoms.numbers, atoms.positions, settings=MD22)
    assert sorted(len(k) for k in whole.kernels) == [60, 88]
    cut_settings = dataclasses.replace(MD22, max_ring_system_atoms=12)
    cut = fragment(atoms.numbers, atoms.positions, settings=cut_settings)
    assert max(len(g) for g in cut.groups) <= 12 and len(cut.groups) >= 148 // 12
    assert sorted(a for g in cut.groups for a in g) == list(range(len(atoms)))
    pairs = {tuple(sorted(p)) for p in cut.topology.pairs()}
    group_of = {a: k for k, g in enumerate(cut.groups) for a in g}
    for g in cut.groups:  # connected: a spanning search inside the group reaches all its atoms
        seen, todo = {g[0]}, [g[0]]
        while todo:
            a = todo.pop()
            for b in g:
                if b not in seen and tuple(sorted((a, b))) in pairs:
                    seen.add(b)
                    todo.append(b)
        assert seen == set(g)
    for i, j in pairs:
        if 1 in (atoms.numbers[i], atoms.numbers[j]):
            assert group_of[i] == group_of[j]
    hg_whole = Fragmenter(settings=MD22)(atoms)
    hg_cut = Fragmenter(settings=cut_settings)(atoms)
    assert hg_cut.num_hyperedges == len(cut.kernels) > 2
    assert hg_cut.v2e_src.numel() < hg_whole.v2e_src.numel() / 2  # 7164 against 18296 pairs
    assert FragmentSettings.from_dict(cut_settings.to_dict()) == cut_settings


@pytest.mark.parametrize("name", ["aspirin", "dha", "ac_ala3_nhme"])
def test_ring_system_limit_leaves_ordinary_molecules_alone(name):
    """Ring systems within the limit (benzene C6H4 here) stay whole: same groups as published."""
    import dataclasses

    atoms = read(name)
    for base in (MD17, MD22):
        a = fragment(atoms.numbers, atoms.positions, settings=base)
        b = fragment(atoms.numbers, atoms.positions, settings=dataclasses.replace(base, max_ring_system_atoms=12))
        assert a.groups == b.groups and a.kernels == b.kernels


def test_ring_system_limit_validated():
    with pytest.raises(ValueError, match="max_ring_system_atoms"):
        FragmentSettings(max_ring_system_atoms=0)


# --------------------------------------------------------------------------- tensors


@pytest.mark.parametrize("name,settings", [("aspirin", MD17), ("ac_ala3_nhme", MD22), ("ac_ala3_nhme", MD17)])
def test_tensors_match_from_tokens(name, settings):
    atoms = read(name)
    frag = fragment(atoms.numbers, atoms.positions, settings=settings)
    cross = [tuple(x) for x in frag.cross_tokens(atoms.positions).tolist()]
    ref = hgmod.from_tokens(atoms.numbers, atoms.positions, frag.hyperedges, cross)
    assert_same_tensors(frag.hypergraph(atoms.positions), ref)
    # cross tokens: exactly the (kernel, outside atom) pairs with min distance < r_c
    if settings.mode == "implicit":
        d = atoms.get_all_distances()
        expect = {(h, i) for h, k in enumerate(frag.kernels) for i in range(len(atoms))
                  if i not in k and d[i, list(k)].min() < settings.implicit_rc}
        assert set(cross) == expect



def test_cached_tensors_follow_changing_cross_tokens():
    """Along a smooth path the implicit token list changes; every step the cached fragmenter's
    tensors equal a fresh build, and graphs returned earlier keep their own positions."""
    atoms = read("ac_ala3_nhme")
    fr = Fragmenter(MD22)
    frag = fr.fragmentation(atoms)
    rng = np.random.default_rng(3)
    phase = rng.uniform(0, 2 * np.pi, size=atoms.positions.shape)
    lists, graphs = set(), []
    for t in range(30):
        r = atoms.positions + 0.08 * np.sin(2 * np.pi * t / 15 + phase)
        hg = fr(atoms.numbers, r)
        cross = [tuple(x) for x in frag.cross_tokens(r).tolist()]
        lists.add(tuple(cross))
        assert_same_tensors(hg, hgmod.from_tokens(atoms.numbers, r, frag.hyperedges, cross))
        graphs.append((hg, r))
    assert fr.misses == 1 and len(lists) > 3  # the path really changed the token list
    for hg, r in graphs:
        assert np.allclose(hg.positions.numpy(), r)

# --------------------------------------------------------------------------- invariances


@pytest.mark.parametrize("name,settings", [("aspirin", MD17), ("ac_ala3_nhme", MD22)])
def test_permutation_permutes_hypergraph(name, settings):
    atoms = read(name)
    rng = np.random.default_rng(0)
    frag = fragment(atoms.numbers, atoms.positions, settings=settings)
    hg = frag.hypergraph(atoms.positions)
    for _ in range(3):
        perm = rng.permutation(len(atoms))  # new atom k is old atom perm[k]
        pf = fragment(atoms.numbers[perm], atoms.positions[perm], settings=settings)
        remap = lambda edges: {frozenset(int(perm[a]) for a in e) for e in edges}  # noqa: E731
        assert remap(pf.groups) == {frozenset(g) for g in frag.groups}
        assert remap(pf.kernels) == {frozenset(k) for k in frag.kernels}
        assert remap(pf.hyperedges) == {frozenset(h) for h in frag.hyperedges}
        phg = pf.hypergraph(atoms.positions[perm])
        assert token_multiset(phg, perm) == token_multiset(hg)


@pytest.mark.parametrize("name,settings", [("aspirin", MD17), ("ac_ala3_nhme", MD22)])
def test_rotation_translation_invariance(name, settings):
    atoms = read(name)
    rng = np.random.default_rng(1)
    frag = fragment(atoms.numbers, atoms.positions, settings=settings)
    hg = frag.hypergraph(atoms.positions)
    for _ in range(3):
        pos = atoms.positions @ random_rotation(rng).T + rng.normal(size=3) * 10
        rf = fragment(atoms.numbers, pos, settings=settings)
        assert (rf.groups, rf.kernels, rf.hyperedges) == (frag.groups, frag.kernels, frag.hyperedges)
        rhg = rf.hypergraph(pos)
        for f in ("token_anchor", "token_edge", "token_switched", "v2e_src", "v2e_dst"):
            assert torch.equal(getattr(rhg, f), getattr(hg, f))


# --------------------------------------------------------------------------- cache / continuity


def test_fragmenter_cache_skips_rdkit(monkeypatch):
    atoms = read("aspirin")
    fr = Fragmenter(MD17)
    hg0 = fr(atoms)
    assert fr.misses == 1 and not fr.last_topology_changed
    from rdkit.Chem import rdDetermineBonds

    def boom(*a, **k):
        raise AssertionError("RDKit called on a cache hit")

    monkeypatch.setattr(rdDetermineBonds, "DetermineBondOrders", boom)
    rng = np.random.default_rng(2)
    for _ in range(5):
        moved = atoms.copy()
        moved.positions += rng.normal(scale=0.02, size=moved.positions.shape)
        hg = fr(moved)
        assert not fr.last_topology_changed
        assert torch.equal(hg.v2e_src, hg0.v2e_src) and torch.equal(hg.token_anchor, hg0.token_anchor)
        assert torch.allclose(hg.positions, torch.as_tensor(moved.positions))
    assert fr.misses == 1 and fr.hits == 5
    assert fr.fragmentation(atoms) is fr.fragmentation(atoms.numbers, atoms.positions, charge=0)


def test_fragmenter_topology_change_flag():
    atoms = read("aspirin")
    fr = Fragmenter(MD17)
    fr(atoms)
    # pull the hydroxyl H of COOH away from its O: connectivity changes
    frag = fr.fragmentation(atoms)
    h_idx = next(i for i, z in enumerate(atoms.numbers) if z == 1
                 for j, k, _ in frag.topology.bonds if i in (j, k) and atoms.numbers[j + k - i] == 8)
    o_idx = next(j + k - h_idx for j, k, _ in frag.topology.bonds
                 if h_idx in (j, k))
    broken = atoms.copy()
    v = broken.positions[h_idx] - broken.positions[o_idx]
    broken.positions[h_idx] = broken.positions[o_idx] + 3.0 * v / np.linalg.norm(v)
    hg = fr(broken)  # perceived as carboxylate + H+ (charged fragments are allowed)
    assert fr.last_topology_changed and fr.misses == 2
    assert (h_idx,) in fr.fragmentation(broken).groups
    assert hg.num_tokens != 55
    fr(atoms)
    assert fr.last_topology_changed  # back to the original topology
    fr(atoms)
    assert not fr.last_topology_changed


def test_implicit_tokens_enter_with_zero_weight():
    """Moving an atom across r_c changes the token list, but the new token has weight ~0."""
    atoms = read("ac_ala3_nhme")
    fr = Fragmenter(MD22)
    frag = fr.fragmentation(atoms)
    rc, w = MD22.implicit_rc, MD22.switch_width
    d = atoms.get_all_distances()
    # a (kernel, atom) pair just beyond r_c: an H atom of kernel 0's neighbourhood
    best = None
    for h, k in enumerate(frag.kernels):
        for i in range(len(atoms)):
            if i in k:
                continue
            dm = d[i, list(k)].min()
            if rc < dm < rc + 0.5 and (best is None or dm < best[2]):
                best = (h, i, dm, list(k)[int(np.argmin(d[i, list(k)]))])
    assert best is not None
    h, i, dm, j = best
    u = atoms.positions[i] - atoms.positions[j]
    u /= np.linalg.norm(u)
    weights = []
    for target in (rc + 1e-6, rc - 1e-6):
        moved = atoms.copy()
        moved.positions[i] = atoms.positions[j] + u * target
        hg = fr(moved)
        el = (hg.positions[hg.v2e_src] - hg.positions[hg.token_anchor[hg.v2e_dst]]).norm(dim=-1)
        tw = hgmod.token_weights(hg, el, rc, w)
        sel = (hg.token_edge == h) & (hg.token_anchor == i) & hg.token_switched
        weights.append(tw[sel])
    assert weights[0].numel() == 0 and weights[1].numel() == 1
    assert float(weights[1][0]) < 1e-10


def test_batch_collates():
    a, b = read("aspirin"), read("ac_ala3_nhme")
    fr = Fragmenter(MD22)
    batch = fr.batch([a, (b.numbers, b.positions), a])
    assert batch.num_graphs == 3 and batch.num_atoms == 2 * len(a) + len(b)
    single = [fr(a), fr(b), fr(a)]
    assert batch.num_tokens == sum(g.num_tokens for g in single)


# --------------------------------------------------------------------------- bonds, charge, settings


def test_perceive_bonds_and_user_bonds():
    atoms = read("aspirin")
    topo = perceive_bonds(atoms.numbers, atoms.positions)
    assert isinstance(topo, Topology) and hash(topo.key) is not None
    assert len(topo.bonds) == 21 and sum(o == 2 for *_, o in topo.bonds) == 5  # 3 ring + 2 C=O
    assert all(i < j for i, j, _ in topo.bonds)
    ref = fragment(atoms.numbers, atoms.positions, settings=MD17)
    by_triples = fragment(atoms.numbers, atoms.positions, bonds=topo.bonds, settings=MD17)
    by_pairs = fragment(atoms.numbers, atoms.positions, bonds=[(i, j) for i, j, _ in topo.bonds], settings=MD17)
    by_topo = fragment(atoms.numbers, atoms.positions, bonds=topo, settings=MD17)
    for f in (by_triples, by_pairs, by_topo):
        assert {frozenset(h) for h in f.hyperedges} == {frozenset(h) for h in ref.hyperedges}
    with pytest.raises(FragmentationError, match="Kekulé"):
        fragment(atoms.numbers, atoms.positions, bonds=[(0, 1, 1.5)])
    with pytest.raises(FragmentationError, match="indices"):
        fragment(atoms.numbers, atoms.positions, bonds=[(0, 99, 1)])


def test_charge_handling():
    acetate = from_smiles("CC(=O)[O-]")
    assert acetate.info["charge"] == -1
    frag = Fragmenter(MD17).fragmentation(acetate)  # charge from atoms.info
    assert frag.topology.charge == -1 and sum(frag.topology.formal_charges) == -1
    assert len(frag.groups) == 2  # carboxylate, CH3
    with pytest.raises(FragmentationError, match=r"charge \+0") as exc:
        fragment(acetate.numbers, acetate.positions, charge=0)
    assert "connectivity_only" in str(exc.value) and "C" in str(exc.value)
    # connectivity-only fallback, only when asked for
    f = fragment(acetate.numbers, acetate.positions, settings=FragmentSettings(connectivity_only=True))
    assert f.topology.connectivity_only and all(o == 1 for *_, o in f.topology.bonds)
    # the argument overrides atoms.info
    with pytest.raises(FragmentationError):
        Fragmenter(MD17)(acetate, charge=0)
    ammonium = from_smiles("C[NH3+]")
    assert Fragmenter(MD17).fragmentation(ammonium).topology.charge == 1


def test_radical_names_atom():
    atoms = read("aspirin")
    methyl_h = [i for i, z in enumerate(atoms.numbers) if z == 1][-1]
    keep = [i for i in range(len(atoms)) if i != methyl_h]
    with pytest.raises(FragmentationError, match=r"odd") as exc:
        perceive_bonds(atoms.numbers[keep], atoms.positions[keep])
    assert "charge=" in str(exc.value)


def test_settings_roundtrip_and_presets():
    for s in (MD17, MD22, FragmentSettings()):
        d = json.loads(json.dumps(s.to_dict()))
        assert FragmentSettings.from_dict(d) == s
    assert MD17.mode == "explicit" and MD17.bo_method == "lendvay" and MD17.overlap_threshold == 0.1
    assert (MD22.mode, MD22.bo_method, MD22.min_kernel_atoms, MD22.max_kernel_atoms) == ("implicit", "simpleexp", 0, 8)
    assert MD22.implicit_rc == 4.0 and MD22.switch_width == 1.0
    with pytest.raises(ValueError):
        FragmentSettings(mode="other")
    with pytest.raises(ValueError):
        FragmentSettings.from_dict({"bogus": 1})
    with pytest.raises(ValueError):
        FragmentSettings.preset("qm7")


def test_kernel_merging_respects_min_size():
    atoms = read("ac_ala3_nhme")
    s = FragmentSettings(mode="implicit", bo_method="lendvay", min_kernel_atoms=3, max_kernel_atoms=8)
    frag = fragment(atoms.numbers, atoms.positions, settings=s)
    assert all(len(k) >= 3 for k in frag.kernels)
    assert sorted(a for k in frag.kernels for a in k) == list(range(len(atoms)))
    assert len(frag.kernels) == 9  # the three C-alpha H pairs are absorbed


# --------------------------------------------------------------------------- bad input


def test_bad_inputs_raise():
    atoms = read("aspirin")
    z, r = atoms.numbers, atoms.positions
    with pytest.raises(StructureError, match="empty"):
        fragment([], np.zeros((0, 3)))
    bad = r.copy()
    bad[3, 1] = np.nan
    with pytest.raises(StructureError, match="NaN"):
        fragment(z, bad)
    bad[3, 1] = np.inf
    with pytest.raises(StructureError, match="NaN or inf"):
        Fragmenter()(z, bad)
    with pytest.raises(StructureError, match="shape"):
        fragment(z, r[:-1])
    na = z.copy()
    na[0] = 11
    with pytest.raises(StructureError, match=r"Na \(Z=11\).*Supported elements: H, Li, B, C"):
        fragment(na, r)
    close = r.copy()
    close[5] = close[2] + [0.3, 0.0, 0.0]
    sym = atoms.get_chemical_symbols()
    with pytest.raises(StructureError, match=rf"{sym[2]}2 and {sym[5]}5 are 0.300 Å apart"):
        fragment(z, close)
    periodic = atoms.copy()
    periodic.cell = [20, 20, 20]
    periodic.pbc = True
    with pytest.raises(StructureError, match="only isolated molecules"):
        Fragmenter()(periodic)
    with pytest.raises(StructureError, match="only isolated molecules"):
        validate_structure(z, r, pbc=[True, False, False])
    periodic.pbc = False  # a cell without pbc is fine
    assert Fragmenter(MD17)(periodic).num_tokens == 55
    zz, rr = validate_structure(z, r)
    assert zz.dtype == np.int64 and rr.shape == (21, 3)


# --------------------------------------------------------------------------- pinned fragmentations
def test_pinned_fragmentation_is_independent_of_the_first_geometry(tmp_path):
    """Salicylic acid frames 0 and 3 of MD17: the O-H...O contact puts a group-pair bond order on
    either side of a threshold, so each frame, seen first, freezes a different hypergraph. A
    pinned fragmentation (what a model file stores) gives frame 0's hypergraph at frame 3."""
    from se3set_ase import SE3SetCalculator
    from se3set_ase.fragment.core import Fragmentation
    from se3set_ase.model import ModelConfig, SE3SetModel, save_model
    from se3set_ase.training.cache import training_fragmentations

    f0, f3 = ase.io.read(DATA / "salicylic_acid_frames_0_3.xyz", index=":")
    st = FragmentSettings.preset("md17")
    first0 = Fragmenter(st).fragmentation(f0)
    first3 = Fragmenter(st).fragmentation(f3)
    assert first0.topology == first3.topology and first0.hyperedges != first3.hyperedges

    # what training freezes for a file: the first frame of each topology
    class F:  # the fields training_fragmentations reads
        def __init__(self, a):
            self.numbers, self.positions, self.charge = a.numbers, a.positions, 0
    pins = training_fragmentations([F(f0), F(f3)], st)
    assert len(pins) == 1 and pins[0].hyperedges == first0.hyperedges
    back = Fragmentation.from_dict(json.loads(json.dumps(pins[0].to_dict())), st)
    assert back == pins[0]

    fr = Fragmenter(st, pinned=[back])
    assert fr.fragmentation(f3).hyperedges == first0.hyperedges and fr.misses == 0

    # through a model file and the calculator
    torch.manual_seed(0)
    model = SE3SetModel(ModelConfig.preset("tiny", elements=[1, 6, 8], fragment=st), torch.float64)
    model.fragmentations = [pins[0].to_dict()]
    path = save_model(model, tmp_path / "pinned.pt", dtype=torch.float64)
    calc = SE3SetCalculator(str(path))
    hg3 = calc.fragmenter(f3)
    ref = Fragmenter(st, pinned=pins)(f3)
    assert torch.equal(hg3.v2e_src, ref.v2e_src) and torch.equal(hg3.v2e_dst, ref.v2e_dst)
    assert hg3.v2e_src.shape != Fragmenter(st)(f3).v2e_src.shape  # unpinned: frame 3's own choice


def _water_dimer(oo: float, h_shift: float = 0.0) -> Atoms:
    """Water donating O1-H1...O2 along x (O...O = ``oo`` Å); ``h_shift`` moves H1 towards O2."""
    return Atoms("OHHOHH", positions=[[0, 0, 0], [0.97 + h_shift, 0, 0], [-0.24, 0.93, 0],
                                      [oo, 0, 0], [oo + 0.24, 0.93, 0], [oo + 0.24, -0.93, 0]])


def test_proton_of_a_short_hydrogen_bond_stays_bonded_to_its_donor_only():
    """Hydrogen is monovalent: H1 at 1.18 Å of the acceptor O2 (inside the 1.26 Å O-H distance
    criterion) but nearer its own O1 keeps the two-water topology; the distance criterion alone
    bonded it to both O (no valid bond orders: a FragmentationError in MD, as AT-AT's base-pair
    protons met). Only when H1 is nearer O2 does the topology change (a proton transfer)."""
    normal, short = _water_dimer(2.9), _water_dimer(2.15)
    assert np.linalg.norm(short.positions[1] - short.positions[3]) < 1.3 * (0.31 + 0.66)
    assert perceive_bonds(short.numbers, short.positions).bonds == \
        perceive_bonds(normal.numbers, normal.positions).bonds == ((0, 1, 1), (0, 2, 1), (3, 4, 1), (3, 5, 1))
    fr = Fragmenter(MD22)
    fr(normal)
    fr(short)
    assert not fr.last_topology_changed and fr.misses == 1
    crossed = _water_dimer(2.15, h_shift=0.15)  # H1 1.12 Å from O1, 1.03 Å from O2
    bonds = perceive_bonds(crossed.numbers, crossed.positions, connectivity_only=True).bonds
    assert bonds == ((0, 2, 1), (1, 3, 1), (3, 4, 1), (3, 5, 1))  # hydroxide + hydronium
    fr(crossed)
    assert fr.last_topology_changed


def bent_water(hh: float, oh: float = 0.96) -> Atoms:
    """Water with O-H ``oh`` Å and the two hydrogens ``hh`` Å apart."""
    half = np.arcsin(hh / 2 / oh)
    return Atoms("OH2", positions=[[0, 0, 0], [oh * np.sin(half), oh * np.cos(half), 0],
                                   [-oh * np.sin(half), oh * np.cos(half), 0]])


def test_hysteresis_keeps_the_topology_through_a_fluctuation_across_the_bond_threshold():
    """A 1-3 pair squeezed just inside 1.3 (R_i + R_j) (H...H 0.78 Å < 0.806 Å; AT-AT's ring C...C
    pair did this at 5.6 ps of 300 K MD) "bonds" by distance alone, and no bond orders exist for
    that graph; along a trajectory (hysteresis) a new bond needs 1.1 (R_i + R_j) = 0.682 Å, so the
    water stays water. A pair that does come that close still changes the topology, and without
    hysteresis each geometry stands alone as before."""
    plain = Fragmenter(FragmentSettings.preset("md17"))
    traj = Fragmenter(FragmentSettings.preset("md17"), hysteresis=True)
    for f in (plain, traj):
        f(bent_water(1.52))
    with pytest.raises(FragmentationError):
        plain(bent_water(0.78))
    hg = traj(bent_water(0.78))
    assert not traj.last_topology_changed and hg.num_tokens == traj(bent_water(1.52)).num_tokens
    assert connectivity(np.array([8, 1, 1]), _dist(bent_water(0.78)), previous=_adj_water())[1, 2] == False  # noqa: E712
    assert connectivity(np.array([8, 1, 1]), _dist(bent_water(0.78)))[1, 2] == True  # noqa: E712
    with pytest.raises(FragmentationError):
        traj(bent_water(0.66))  # inside the forming threshold: a real new bond
    fresh = Fragmenter(FragmentSettings.preset("md17"), hysteresis=True)
    with pytest.raises(FragmentationError):
        fresh(bent_water(0.78))  # no previous call: the geometry alone decides


def _dist(a: Atoms) -> np.ndarray:
    d = np.linalg.norm(a.positions[:, None] - a.positions[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    return d


def _adj_water() -> np.ndarray:
    adj = np.zeros((3, 3), dtype=bool)
    adj[0, 1:] = adj[1:, 0] = True
    return adj


# --------------------------------------------------------------------------- pins in any atom order
def _coronene(noise: float = 0.05, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Coronene C24H12 (one 36-atom ring system with its H), MMFF geometry with seeded noise (Å)."""
    from rdkit import Chem
    from rdkit.Chem import AllChem

    m = Chem.AddHs(Chem.MolFromSmiles("c1cc2ccc3ccc4ccc5ccc6ccc1c7c2c3c4c5c67"))
    AllChem.EmbedMolecule(m, randomSeed=0)
    AllChem.MMFFOptimizeMolecule(m)
    z = np.array([a.GetAtomicNum() for a in m.GetAtoms()])
    r = m.GetConformer().GetPositions()
    return z, r + np.random.default_rng(seed).normal(scale=noise, size=r.shape)


CUT12 = FragmentSettings(**{**MD22.to_dict(), "max_ring_system_atoms": 12})


def _edges_in(frag, order) -> set:
    """Hyperedges as sets of atoms of the original numbering (input atom k is original order[k])."""
    return {frozenset(int(order[a]) for a in h) for h in frag.hyperedges}


def test_ring_cut_of_a_symmetric_molecule_follows_the_atom_order_unless_pinned():
    """Coronene cut into chunks of 12: a fresh fragmentation picks the chunks by RDKit's tie
    breaking, i.e. by the input order; a pin with a reference geometry puts its own chunks on the
    same atoms in any order (the isomorphism closest to the reference), and so does a pin that went
    through a model file."""
    z, r = _coronene()
    ident = np.arange(len(z))
    pin = Fragmenter(CUT12).fragmentation(z, r)
    assert pin.references is not None and np.array_equal(pin.references[0], r)
    assert len(pin.hyperedges) > 1
    p = np.random.default_rng(0).permutation(len(z))
    fresh = Fragmenter(CUT12).fragmentation(z[p], r[p])
    assert _edges_in(fresh, p) != _edges_in(pin, ident)  # the problem the pins solve

    back = Fragmentation.from_dict(json.loads(json.dumps(pin.to_dict())), CUT12)
    assert np.array_equal(back.references, pin.references)
    for q in (p, np.random.default_rng(1).permutation(len(z)), ident):
        fr = Fragmenter(CUT12, pinned=[back])
        got = fr.fragmentation(z[q], r[q])
        assert _edges_in(got, q) == _edges_in(pin, ident) and fr.misses == 0
        assert got.topology.numbers == tuple(int(a) for a in z[q])
        assert {frozenset((int(q[i]), int(q[j]))) for i, j, _ in got.topology.bonds} == \
               {frozenset((i, j)) for i, j, _ in pin.topology.bonds}
    assert Fragmenter(CUT12, pinned=[back]).fragmentation(z, r) is back  # own order: the pin itself

    # a pin without references (model files made before they were stored) fits only its own order
    old = Fragmentation.from_dict({k: v for k, v in pin.to_dict().items() if k != "references"}, CUT12)
    assert old.references is None
    assert _edges_in(Fragmenter(CUT12, pinned=[old]).fragmentation(z[p], r[p]), p) == _edges_in(fresh, p)


def test_own_atom_order_gets_the_pin_as_trained_even_when_a_symmetric_relabelling_fits_better():
    """An input in the pin's own atom order gets the hyperedges training used, not the relabelling
    that fits the references best: a symmetric molecule far from its references (a nanotube frame
    8 ps away) can fit a symmetry-equivalent relabelling better, which would move the cut. Here the
    reference is coronene's own geometry relabelled by a graph automorphism (RMSD 0 for that
    relabelling); another atom order still goes through the geometric match."""
    from rdkit import Chem

    from se3set_ase.fragment.match import best_isomorphism

    z, r = _coronene()
    pin = Fragmenter(CUT12).fragmentation(z, r)
    m = Chem.AddHs(Chem.MolFromSmiles("c1cc2ccc3ccc4ccc5ccc6ccc1c7c2c3c4c5c67"))
    assert [a.GetAtomicNum() for a in m.GetAtoms()] == list(z)
    autos = [np.array(s) for s in m.GetSubstructMatches(m, uniquify=False, maxMatches=100)]
    sigma = next(s for s in autos if _edges_in(pin.relabel(s), np.arange(len(z))) != _edges_in(pin, np.arange(len(z))))
    moved = pin.with_references(r[sigma])  # reference atom i where input atom sigma[i] is
    found = best_isomorphism(np.array(pin.topology.numbers), pin.topology.pairs(), moved.references, z,
                             pin.topology.pairs(), r)
    assert found is not None and found[1] < 1e-6 and np.array_equal(found[0], sigma)

    fr = Fragmenter(CUT12, pinned=[moved])
    assert fr.fragmentation(z, r) is moved  # own order: the pin itself, not the better-fitting relabelling
    q = np.random.default_rng(2).permutation(len(z))
    other = Fragmenter(CUT12, pinned=[moved]).fragmentation(z[q], r[q])
    assert _edges_in(other, q) == _edges_in(pin.relabel(found[0]), np.arange(len(z)))


def test_pinned_energy_and_forces_do_not_depend_on_the_atom_order(tmp_path):
    """A model pinning a ring-cut coronene fragmentation, saved and loaded: the same geometry in
    two random atom orders gives the same energy and the permuted forces, also from a distorted
    geometry (the closest reference decides, so both orders still agree)."""
    from se3set_ase import SE3SetCalculator
    from se3set_ase.model import ModelConfig, SE3SetModel, save_model

    z, r = _coronene()
    torch.manual_seed(0)
    model = SE3SetModel(ModelConfig.preset("tiny", elements=[1, 6], fragment=CUT12), torch.float64)
    model.fragmentations = [Fragmenter(CUT12).fragmentation(z, r).to_dict()]
    path = save_model(model, tmp_path / "coronene.pt", dtype=torch.float64)
    _, r2 = _coronene(noise=0.15, seed=7)
    for geom in (r, r2):
        results = []
        for seed in (None, 0, 1):
            q = np.arange(len(z)) if seed is None else np.random.default_rng(seed).permutation(len(z))
            atoms = Atoms(numbers=z[q], positions=geom[q])
            atoms.calc = SE3SetCalculator(str(path), device="cpu")
            f = np.empty((len(z), 3))
            f[q] = atoms.get_forces()
            results.append((atoms.get_potential_energy(), f))
        for e, f in results[1:]:
            assert abs(e - results[0][0]) < 1e-9
            np.testing.assert_allclose(f, results[0][1], atol=1e-9)


def test_best_isomorphism_recovers_the_relabelling_and_rejects_other_graphs():
    from se3set_ase.fragment.bonds import perceive_bonds
    from se3set_ase.fragment.match import best_isomorphism

    z, r = _coronene()
    t = perceive_bonds(z, r, connectivity_only=True)
    p = np.random.default_rng(3).permutation(len(z))
    tp = perceive_bonds(z[p], r[p], connectivity_only=True)
    perm, rmsd = best_isomorphism(z, t.pairs(), r, z[p], tp.pairs(), r[p])
    assert np.array_equal(perm, np.argsort(p)) and rmsd < 1e-9
    # rotated and translated input: same answer (Kabsch)
    rot = np.linalg.qr(np.random.default_rng(4).normal(size=(3, 3)))[0]
    rot *= np.sign(np.linalg.det(rot))
    perm2, rmsd2 = best_isomorphism(z, t.pairs(), r, z[p], tp.pairs(), r[p] @ rot.T + 3.0)
    assert np.array_equal(perm2, perm) and rmsd2 < 1e-9
    # another graph with the same atoms and bond count: a C-C bond replaced by an H-H one
    pairs = t.pairs().copy()
    cc = next(k for k, (i, j) in enumerate(pairs) if z[i] == 6 and z[j] == 6)
    pairs[cc] = np.flatnonzero(z == 1)[:2]
    assert best_isomorphism(z, t.pairs(), r, z, pairs, r) is None
    assert best_isomorphism(z, t.pairs(), r, z[:-1], t.pairs()[:-1], r[:-1]) is None


def test_best_isomorphism_on_identical_molecules_and_the_decision_is_kept():
    """Eight identical waters (8! 2^8 isomorphisms): a thermal copy of the
    reference in its own order maps to itself, in a random order to the true relabelling; and
    a fragmenter keeps a pin's relabelling for an atom order however many other topologies pass
    through its (size-1) cache."""
    from ase.build import molecule
    from se3set_ase.fragment.match import best_isomorphism

    rng = np.random.default_rng(5)
    w = molecule("H2O")
    z, ref = [], []
    for k in range(8):
        rot = np.linalg.qr(rng.normal(size=(3, 3)))[0]
        z += list(w.numbers)
        ref += list(w.positions @ rot.T + 3.0 * np.array([k % 2, (k // 2) % 2, k // 4]))
    z, ref = np.array(z), np.array(ref)
    pairs = np.array([[3 * i, 3 * i + j] for i in range(8) for j in (1, 2)])
    x = ref + rng.normal(scale=0.05, size=ref.shape)
    perm, _ = best_isomorphism(z, pairs, ref, z, pairs, x)
    assert np.array_equal(perm, np.arange(len(z)))
    q = rng.permutation(len(z))
    inv = np.argsort(q)
    perm, _ = best_isomorphism(z, pairs, ref, z[q], inv[pairs], x[q])
    assert np.array_equal(perm, inv)

    zc, rc = _coronene()
    pin = Fragmenter(CUT12).fragmentation(zc, rc)
    fr = Fragmenter(CUT12, cache_size=1, pinned=[pin])
    p = np.random.default_rng(0).permutation(len(zc))
    first = fr.fragmentation(zc[p], rc[p])
    for other in ("CH4", "NH3", "H2O"):
        fr.fragmentation(molecule(other))
    _, r2 = _coronene(noise=0.08, seed=9)  # the same bonds, a geometry that might pick another relabelling
    assert Fragmenter(CUT12).fragmentation(zc, r2).topology == pin.topology
    assert fr.fragmentation(zc[p], r2[p]) is first
    assert fr.fragmentations()[0] is pin and len(fr.fragmentations()) == 2  # the pin and the last fresh one


# --------------------------------------------------------------------------- pair list (large molecules)

HG_TENSORS = ("numbers", "positions", "token_anchor", "token_edge", "token_switched", "v2e_src", "v2e_dst", "batch")


def _dense_path(fr: Fragmenter) -> Fragmenter:
    fr.pair_list_min_atoms = fr.pair_list_trajectory_min_atoms = 1 << 62
    return fr


def _pair_path(fr: Fragmenter) -> Fragmenter:
    fr.pair_list_min_atoms = 0
    return fr


@pytest.fixture(scope="module")
def ala6() -> Atoms:
    """Ac-(Ala)6-NHMe (72 atoms), MMFF-minimised."""
    return from_smiles("CC(=O)" + "N[C@@H](C)C(=O)" * 6 + "NC")


def _outcome(fr: Fragmenter, z, r):
    """What a call gives: (tensors, hits, misses, topology changed, skin reference) or the error."""
    try:
        hg = fr(z, r)
    except (StructureError, FragmentationError) as exc:
        return type(exc).__name__, str(exc), fr.hits, fr.misses
    ref = fr.verlet_reference()
    return ([getattr(hg, k) for k in HG_TENSORS], hg.num_graphs, fr.hits, fr.misses, fr.last_topology_changed,
            None if ref is None else ref.tolist())


def _same_outcome(a, b) -> bool:
    if isinstance(a[0], str) or isinstance(b[0], str):
        return a == b
    return all(torch.equal(x, y) for x, y in zip(a[0], b[0])) and a[1:] == b[1:]


def _stretch_path(atoms: Atoms, rng) -> tuple[list[np.ndarray], int]:
    """An MD-like path of ``atoms``: oscillation (the cross-token list changes); one C-H bond
    stretched past 1.3 (R_C + R_H) = 1.391 Å and back through the hysteresis window (1.177-1.391 Å)
    to bonded; a jump to 3 Å (out of the rebuilt list's bond candidates) and back; swung 40
    degrees at 1.36 Å (a jump: the pair list is rebuilt with the bond just inside the threshold)
    and stretched 0.02 Å per step, so that it breaks in the middle of that list's life, and back;
    a drift and a rotation (more list rebuilds). Returns the frames and the stretched H's index."""
    r0 = atoms.positions.copy()
    z = atoms.numbers
    h = next(i for i in range(len(z)) if z[i] == 1 and z[np.argsort(_dist(atoms)[i])[0]] == 6)
    c = int(np.argsort(_dist(atoms)[h])[0])
    u = (r0[h] - r0[c]) / np.linalg.norm(r0[h] - r0[c])
    w = np.cross(u, [0.0, 0.0, 1.0])
    w /= np.linalg.norm(w)
    phase = rng.uniform(0, 2 * np.pi, size=r0.shape)
    period = rng.uniform(8, 20, size=r0.shape)
    frames = [r0 + 0.08 * np.sin(2 * np.pi * t / period + phase) for t in range(16)]

    def place(bond, direction):
        x = frames[-1].copy()
        x[h] = x[c] + bond * direction
        frames.append(x)

    # breaks at 1.40, re-forms at 1.35 (1.15 with hysteresis)
    for bond in (1.15, 1.2, 1.25, 1.3, 1.35, 1.4, 1.45, 1.5, 1.45, 1.4, 1.35, 1.3, 1.25, 1.2, 1.15, 1.1):
        place(bond, u)
    for bond in (3.0, 1.09):
        place(bond, u)
    swung = np.cos(np.deg2rad(40)) * u + np.sin(np.deg2rad(40)) * w
    for bond in (1.36, 1.38, 1.4, 1.42):
        place(bond, swung)
    place(1.1, u)
    walk = frames[-1].copy()
    for _ in range(8):  # a drift of 0.05 Å per step per coordinate
        walk = walk + rng.normal(scale=0.05, size=walk.shape)
        frames.append(walk)
    angle = np.deg2rad(25)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    frames.append((walk - walk.mean(0)) @ rot.T + walk.mean(0))
    return frames, h


@pytest.mark.parametrize("pair_skin", [0.3, PAIR_SKIN])
@pytest.mark.parametrize("hysteresis", [False, True])
@pytest.mark.parametrize("skin", [0.0, 1.0])
@pytest.mark.parametrize("settings", [MD17, MD22], ids=["md17", "md22"])
def test_pair_list_gives_the_dense_hypergraphs_bit_for_bit(ala6, settings, skin, hysteresis, pair_skin):
    """Along an MD-like path of a 72-atom peptide (cross tokens entering and leaving, a C-H bond
    breaking and re-forming, also in the middle of a list's life, the pair list rebuilt) the
    pair-list path gives every hypergraph tensor, hit, miss, topology-change flag and skin
    reference of the dense path, to the bit (with the default pair-list skin and a narrower one)."""
    import dataclasses

    cut = dataclasses.replace(settings, connectivity_only=True)  # a lone H: no RDKit bond orders
    frames, _ = _stretch_path(ala6, np.random.default_rng(3))
    dense = _dense_path(Fragmenter(cut, skin=skin, hysteresis=hysteresis))
    pairs = _pair_path(Fragmenter(cut, skin=skin, hysteresis=hysteresis))
    pairs.pair_skin = pair_skin
    z = ala6.numbers
    lists, tokens, changes, last_list = 0, set(), [], None
    for x in frames:
        a, b = _outcome(dense, z, x), _outcome(pairs, z, x)
        assert _same_outcome(a, b)
        assert pairs._pairs is not None and dense._pairs is None
        lists += pairs._pairs is not last_list
        last_list = pairs._pairs
        tokens.add(a[0][2].numel())
        changes.append(a[4])
    assert lists >= 3, "the pair list should have been rebuilt along the path"
    assert sum(changes) >= 6, "the C-H bond should have broken and re-formed three times"
    if settings.mode == "implicit" and skin == 0:
        assert len(tokens) > 3, "the cross-token list should have changed along the path"


def test_pair_list_hysteresis_gives_the_dense_topology_sequence(ala6):
    """With hysteresis the stretched bond re-forms later than without (the path goes through the
    window between the forming and the breaking threshold); the pair list follows the dense path
    either way."""
    import dataclasses

    cut = dataclasses.replace(MD17, connectivity_only=True)
    frames, h = _stretch_path(ala6, np.random.default_rng(3))
    sequences = {}
    for hysteresis in (False, True):
        for name, make in (("dense", _dense_path), ("pairs", _pair_path)):
            fr = make(Fragmenter(cut, hysteresis=hysteresis))
            sequences[name, hysteresis] = [sum(h in b[:2] for b in fr.fragmentation(ala6.numbers, x).topology.bonds)
                                           for x in frames]
    assert sequences["pairs", False] == sequences["dense", False]
    assert sequences["pairs", True] == sequences["dense", True]
    assert sequences["dense", True] != sequences["dense", False]
    assert 0 in sequences["dense", True] and 0 in sequences["dense", False]


def test_pair_list_raises_the_dense_error_for_atoms_that_come_too_close(ala6):
    """Two atoms that were far apart when the pair list was built approach each other, step by
    step or in one jump: the pair list (rebuilt once an atom moved skin / 2) raises the dense
    path's error at the same step, naming the same pair; with two equally close pairs, the same
    one (the first in (i, j) order, as the dense matrix's first minimum)."""
    z, r0 = ala6.numbers, ala6.positions.copy()
    d = _dist(ala6)
    d[np.isinf(d)] = 0
    a, b = np.unravel_index(np.argmax(d), d.shape)  # the two atoms farthest apart
    assert d[a, b] > 10
    dense, pairs = _dense_path(Fragmenter(MD17)), _pair_path(Fragmenter(MD17))
    for fr in (dense, pairs):
        fr(z, r0)
    raised = 0
    for t in np.linspace(0, 1, 25)[1:]:  # b walks onto a, ~0.5 Å per step
        x = r0.copy()
        x[b] = r0[b] + t * (r0[a] + np.array([0.3, 0.0, 0.0]) - r0[b])
        e, f = _outcome(dense, z, x), _outcome(pairs, z, x)
        assert _same_outcome(e, f)
        raised += e[0] == "StructureError"
    assert raised >= 1 and "closer than 0.5" in e[1]
    for fr in (dense, pairs):
        fr(z, r0)
    near = int(np.argsort(d[a])[1])  # a close neighbour of a, pulled in 0.1 Å a step (one list)
    raised = 0
    for gap in np.arange(1.0, 0.25, -0.1):
        x = r0.copy()
        x[near] = r0[a] + gap * (r0[near] - r0[a]) / np.linalg.norm(r0[near] - r0[a])
        e, f = _outcome(dense, z, x), _outcome(pairs, z, x)
        assert _same_outcome(e, f)
        raised += e[0] == "StructureError"
    assert raised >= 2
    for fr in (dense, pairs):
        fr(z, r0)
    jump = r0.copy()
    jump[b] = r0[a] + np.array([0.0, 0.25, 0.0])  # far to overlapping in one step
    e, f = _outcome(dense, z, jump), _outcome(pairs, z, jump)
    assert e[0] == "StructureError" and _same_outcome(e, f)
    # a tie: b and a third atom c exactly 0.25 Å from a (binary fractions: bit-equal distances)
    c = int(np.argsort(d[a])[len(z) // 2])
    tie = r0.copy()
    tie[a] = np.round(r0[a])
    tie[b], tie[c] = tie[a] + [0.25, 0, 0], tie[a] - [0.25, 0, 0]
    e, f = _outcome(dense, z, tie), _outcome(pairs, z, tie)
    assert e[0] == "StructureError" and "2 such pairs" in e[1] and _same_outcome(e, f)


def test_pair_list_keeps_a_hydrogen_on_its_nearest_partner_like_the_dense_path():
    """Monovalent hydrogens on the pair list: a proton between two waters stays with the nearer
    O, moves on a transfer and, exactly midway (bit-equal distances), goes to the lower index, as
    in the dense path; with and without hysteresis."""
    for hysteresis in (False, True):
        dense = _dense_path(Fragmenter(MD17, hysteresis=hysteresis))
        pairs = _pair_path(Fragmenter(MD17, hysteresis=hysteresis))
        for shift in (0.0, 0.1, 0.2, 0.5, 0.3, 0.0):  # 0.5: H1 halfway between O1 and O2 (0, 1.94)
            atoms = _water_dimer(1.94, h_shift=shift)
            results = [_outcome(fr, atoms.numbers, atoms.positions) for fr in (dense, pairs)]
            assert _same_outcome(*results)
            if not isinstance(results[0][0], str):
                assert dense.fragmentation(atoms).topology == pairs.fragmentation(atoms).topology


def _three_close_hydrogens() -> Atoms:
    """H0, H1, H2 0.78 Å apart (inside the 0.806 Å H-H bonding distance); H0 and H1 each have an
    O 0.6 Å away, H2 only the two other H within bonding distance."""
    h = 0.78 * np.array([[0, 0, 0], [1, 0, 0], [0.5, np.sqrt(3) / 2, 0]])
    c = h.mean(axis=0)
    o = [h[k] + 0.6 * (h[k] - c) / np.linalg.norm(h[k] - c) for k in (0, 1)]
    return Atoms("HHHOO", positions=np.vstack([h, o]))


def test_hydrogen_left_without_partner_by_the_monovalent_rule_gets_the_named_error():
    """H0 and H1 keep their O and drop H2, so H2 has no partner left when its turn comes (this
    raised numpy's bare 'argmin of an empty sequence'). Now H2 is unbonded and fragmentation names
    it, on the dense path and the pair list alike."""
    atoms = _three_close_hydrogens()
    adj = connectivity(atoms.numbers, distance_matrix(atoms.positions))
    assert not adj[2].any() and adj[0, 3] and adj[1, 4] and not adj[0, 1]
    outcomes = [_outcome(path(Fragmenter(settings)), atoms.numbers, atoms.positions)
                for settings in (MD17, MD22) for path in (_dense_path, _pair_path)]
    assert outcomes[0][0] == "FragmentationError" and "H2 (no bonded neighbour)" in outcomes[0][1]
    assert _same_outcome(outcomes[0], outcomes[1]) and _same_outcome(outcomes[2], outcomes[3])  # dense = pair list
    assert outcomes[2][0] == "FragmentationError"


def test_neighbour_pairs_are_the_dense_pairs():
    """The cell list finds exactly the pairs the dense matrix has below the cut-off, with the same
    distances: a molecule, a cloud of two far-apart clusters, a cut-off beyond the molecule, and
    coordinates too large for the grid."""
    from se3set_ase.fragment.pairs import neighbour_pairs

    rng = np.random.default_rng(4)
    mol = read("ac_ala3_nhme").positions
    clusters = np.concatenate([rng.normal(size=(60, 3)), 50 + rng.normal(size=(60, 3))])
    for r, cutoff in ((mol, 2.3), (mol, 5.3), (mol, 100.0), (clusters, 1.0), (clusters, 3.0), (mol * 1e6, 2e6)):
        d = distance_matrix(r)
        want_i, want_j = np.nonzero(np.triu(d < cutoff, 1))
        i, j, dij = neighbour_pairs(r, cutoff)
        order = np.lexsort((j, i))
        assert np.array_equal(i[order], want_i) and np.array_equal(j[order], want_j)
        assert np.array_equal(dij[order], d[want_i, want_j])
    assert len(neighbour_pairs(mol[:1], 5.0)[0]) == 0


def test_token_shell_orders_alike_with_and_without_the_packed_sort(ala6):
    """The cross-token shell of a pair list, ordered by one packed int64 sort, gives the cross
    tokens of the dense matrix; so does the stable argsort it falls back to where the packed key
    would overflow (tens of thousands of atoms; forced here)."""
    from se3set_ase.fragment.pairs import PairList

    from se3set_ase import elements

    fr = Fragmenter(MD22)
    fr(ala6)
    builder = fr._last[4]._builder
    z, r0 = ala6.numbers, ala6.positions
    rng = np.random.default_rng(5)
    packed = PairList(r0, elements.covalent_radii(z), 5.0)
    fallback = PairList(r0, elements.covalent_radii(z), 5.0)
    fallback.n = 1 << 62  # the overflow test sees a huge molecule; nothing else reads n here
    for _ in range(6):
        r = r0 + rng.normal(scale=0.08, size=r0.shape)  # inside the list's skin
        assert packed.valid(r)
        want = builder.cross_tokens(distance_matrix(r), MD22.implicit_rc)
        for pl in (packed, fallback):
            pl.cross_tokens(r0, builder.owner, len(builder.sizes), MD22.implicit_rc)  # builds the shell next call
            assert np.array_equal(pl.cross_tokens(r, builder.owner, len(builder.sizes), MD22.implicit_rc), want)
    assert packed._tokens[3] is not None and fallback._tokens[3] is not None


def test_within_is_the_largest_displacement_test():
    """``within`` (the Verlet lists' validity test) decides as max_a |r_a - ref_a| < distance does,
    in each of its branches: one coordinate past the limit, all far inside, and the displacements
    whose coordinates alone cannot decide (the per-atom sum needed)."""
    from se3set_ase.fragment.pairs import within

    rng = np.random.default_rng(7)
    ref = rng.normal(size=(40, 3))
    for scale in (0.01, 0.2, 0.28, 0.3, 0.4, 0.6):
        for _ in range(50):
            r = ref + rng.uniform(-scale, scale, size=ref.shape)
            want = float(((r - ref) ** 2).sum(axis=1).max()) < 0.25
            assert within(ref, r, 0.5) == want, scale
    edge = ref.copy()
    edge[3] += [0.3, 0.3, 0.3]  # |d| = 0.52 > 0.5, every coordinate < 0.5
    assert not within(ref, edge, 0.5) and within(ref, edge, 0.53)
    assert not within(ref, ref[:-1], 0.5)  # another molecule


def test_default_fragmenter_takes_the_pair_list_on_a_trajectory_only(ala6):
    """A default Fragmenter uses the pair list for a 72-atom molecule while the calls follow a
    trajectory, and the dense matrix for unrelated geometries (a new list each call would cost
    more); the results are the same either way."""
    fr = Fragmenter(MD22)
    assert fr.pair_list_trajectory_min_atoms <= len(ala6) < fr.pair_list_min_atoms
    z, r = ala6.numbers, ala6.positions
    fr(z, r)
    assert fr._pairs is None  # the first call: nothing to follow
    fr(z, r + 0.01)
    assert fr._pairs is not None  # on a trajectory
    far = r @ random_rotation(np.random.default_rng(1)).T
    last = fr._pairs
    a, b = fr(z, far), _dense_path(Fragmenter(MD22))(z, far)
    assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in HG_TENSORS)
    assert fr._pairs is last  # a jump: the dense path, no new list
