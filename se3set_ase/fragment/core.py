"""Settings, the frozen per-topology fragmentation, and :func:`fragment`."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from functools import cached_property
from typing import Any

import numpy as np
import torch

from ..hypergraph import Hypergraph
from .bonds import Topology, _charge_int, topology_from_bonds, topology_from_pairs, connectivity
from .errors import as_arrays, check_close_pairs, check_elements, distance_matrix
from .groups import canonical_ranks, find_groups, topology_mol
from .kernels import BO_METHODS, bond_order_matrix, group_matrices, merge_groups
from .overlaps import TensorBuilder, explicit_overlaps
from .pairs import PairList

MODES = ("explicit", "implicit")


@dataclass(frozen=True)
class FragmentSettings:
    """How a molecule is cut into hyperedges (stored in model files via :meth:`to_dict`).

    - ``mode``: "explicit" (kernel + overlap groups with summed BO >= ``overlap_threshold``) or
      "implicit" (non-overlapping kernels + switched cross tokens within ``implicit_rc``).
    - ``bo_method``: empirical bond order, "lendvay" or "simpleexp".
    - ``topo_bo_threshold``: bonds with a Kekulé order above it are unbreakable.
    - ``min_kernel_atoms`` / ``max_kernel_atoms`` / ``min_bo_threshold``: kernel merging.
    - ``overlap_threshold``: c_w of the explicit overlaps.
    - ``implicit_rc`` / ``switch_width``: cut-off (Å) of the implicit cross tokens and the width
      of the smooth switch the model applies (:func:`se3set_ase.hypergraph.token_weights`).
    - ``connectivity_only``: skip bond-order perception (all bonds single).
    - ``max_ring_system_atoms``: None (published) keeps every ring system one group; an integer
      cuts larger ones (fullerenes, nanotubes) into connected chunks of at most that many atoms
      (:mod:`se3set_ase.fragment.groups`).
    """

    mode: str = "explicit"
    bo_method: str = "lendvay"
    topo_bo_threshold: float = 1.0
    min_kernel_atoms: int = 2
    max_kernel_atoms: int = 16
    min_bo_threshold: float = 0.1
    overlap_threshold: float = 0.1
    implicit_rc: float = 4.0
    switch_width: float = 1.0
    connectivity_only: bool = False
    max_ring_system_atoms: int | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.bo_method not in BO_METHODS:
            raise ValueError(f"bo_method must be one of {BO_METHODS}, got {self.bo_method!r}")
        if self.min_kernel_atoms < 0 or self.max_kernel_atoms < 1:
            raise ValueError("min_kernel_atoms must be >= 0 and max_kernel_atoms >= 1")
        if self.max_ring_system_atoms is not None and self.max_ring_system_atoms < 1:
            raise ValueError(f"max_ring_system_atoms must be None or >= 1, got {self.max_ring_system_atoms}")
        if not (self.implicit_rc > 0 and 0 < self.switch_width <= self.implicit_rc):
            raise ValueError("need implicit_rc > 0 and 0 < switch_width <= implicit_rc")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FragmentSettings":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown fragment settings: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def preset(cls, name: str) -> "FragmentSettings":
        """Published configurations: "md17" (explicit) and "md22" (implicit)."""
        key = name.lower()
        if key == "md17":
            return cls(mode="explicit", bo_method="lendvay", min_kernel_atoms=2,
                       max_kernel_atoms=16, min_bo_threshold=0.1, overlap_threshold=0.1)
        if key == "md22":
            return cls(mode="implicit", bo_method="simpleexp", min_kernel_atoms=0,
                       max_kernel_atoms=8, min_bo_threshold=0.1, implicit_rc=4.0,
                       switch_width=1.0)
        raise ValueError(f"unknown preset {name!r}; available: 'md17', 'md22'")


@dataclass(frozen=True)
class Fragmentation:
    """Everything discrete about a molecule's hypergraph, frozen for its topology.

    ``groups``, ``kernels`` and ``hyperedges`` are tuples of atom-index tuples in canonical
    order (members by RDKit canonical rank; groups/kernels by size, largest first, then by the
    smallest canonical rank; hyperedge h is kernel h plus its overlap atoms). In implicit mode
    ``hyperedges == kernels``.
    """

    topology: Topology
    groups: tuple[tuple[int, ...], ...]
    kernels: tuple[tuple[int, ...], ...]
    hyperedges: tuple[tuple[int, ...], ...]
    settings: FragmentSettings
    #: geometries (T, N, 3) in Å this fragmentation belongs to: the one it was decided at, or a
    #: model's training frames. A pinned fragmentation is put onto the same molecule in another
    #: atom order by the graph isomorphism that brings that input closest to one of them
    #: (:mod:`se3set_ase.fragment.match`). None: only the identical atom order can use it.
    references: np.ndarray | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able record (stored in model files to pin a training fragmentation)."""
        t = self.topology
        d = {"numbers": list(t.numbers), "bonds": [list(b) for b in t.bonds], "charge": t.charge,
             "formal_charges": list(t.formal_charges), "connectivity_only": t.connectivity_only,
             "groups": [list(g) for g in self.groups], "kernels": [list(k) for k in self.kernels],
             "hyperedges": [list(h) for h in self.hyperedges]}
        if self.references is not None:
            d["references"] = np.asarray(self.references, dtype=np.float64).tolist()
        return d

    def with_references(self, references) -> "Fragmentation":
        """The same fragmentation with other reference geometries (T, N, 3) Å (or one (N, 3))."""
        refs = np.asarray(references, dtype=np.float64)
        refs = refs[None] if refs.ndim == 2 else refs
        if refs.ndim != 3 or refs.shape[1:] != (self.topology.num_atoms, 3) or len(refs) == 0:
            raise ValueError(f"references must have shape (T, {self.topology.num_atoms}, 3), got {refs.shape}")
        return replace(self, references=refs)

    def relabel(self, perm) -> "Fragmentation":
        """This fragmentation on the same molecule with atom i renamed ``perm[i]`` (a graph
        isomorphism onto the input's atom order): topology, groups, kernels, hyperedges and
        references are carried over, member order kept (so the tensors come out in the same order)."""
        p = np.asarray(perm, dtype=np.int64)
        n = self.topology.num_atoms
        if p.shape != (n,) or not np.array_equal(np.sort(p), np.arange(n)):
            raise ValueError("perm must be a permutation of the atom indices")
        t = self.topology
        numbers = [0] * n
        charges = [0] * n
        for i in range(n):
            numbers[p[i]], charges[p[i]] = t.numbers[i], t.formal_charges[i]
        bonds = tuple(sorted((min(int(p[i]), int(p[j])), max(int(p[i]), int(p[j])), int(o)) for i, j, o in t.bonds))
        topo = Topology(numbers=tuple(numbers), bonds=bonds, charge=t.charge, formal_charges=tuple(charges),
                        connectivity_only=t.connectivity_only)

        def m(xs):
            return tuple(tuple(int(p[a]) for a in x) for x in xs)

        refs = None
        if self.references is not None:
            refs = np.empty_like(self.references)
            refs[:, p] = self.references
        return Fragmentation(topology=topo, groups=m(self.groups), kernels=m(self.kernels),
                             hyperedges=m(self.hyperedges), settings=self.settings, references=refs)

    @classmethod
    def from_dict(cls, d: dict[str, Any], settings: FragmentSettings) -> "Fragmentation":
        """Inverse of :meth:`to_dict` (no RDKit, no geometry)."""
        def tup(xs):
            return tuple(tuple(int(a) for a in x) for x in xs)

        topo = Topology(numbers=tuple(int(z) for z in d["numbers"]), bonds=tup(d["bonds"]),
                        charge=int(d["charge"]), formal_charges=tuple(int(c) for c in d["formal_charges"]),
                        connectivity_only=bool(d["connectivity_only"]))
        refs = d.get("references")  # absent in model files made before it was stored
        if refs is not None:
            refs = np.asarray(refs, dtype=np.float64)
            if refs.ndim != 3 or refs.shape[1:] != (topo.num_atoms, 3):
                raise ValueError(f"fragmentation references must have shape (T, {topo.num_atoms}, 3), got {refs.shape}")
        return cls(topology=topo, groups=tup(d["groups"]), kernels=tup(d["kernels"]),
                   hyperedges=tup(d["hyperedges"]), settings=settings, references=refs)

    @cached_property
    def _builder(self) -> TensorBuilder:
        return TensorBuilder(self.topology.numbers, self.hyperedges)

    def cross_tokens(self, positions, d: np.ndarray | None = None, pairs: PairList | None = None) -> np.ndarray:
        """Implicit cross-token candidates (C, 2) as (hyperedge, atom) at ``positions``;
        empty in explicit mode. ``d``: the distance matrix (N, N) if at hand; ``pairs``: a pair
        list valid at ``positions`` (the same tokens without the dense matrix)."""
        if self.settings.mode != "implicit":
            return np.zeros((0, 2), dtype=np.int64)
        r = np.asarray(positions, dtype=np.float64)
        if d is None and self._builder.pairs_usable(pairs, self.settings.implicit_rc):
            return self._builder.cross_tokens_pairs(pairs, r, self.settings.implicit_rc)
        if d is None:
            d = distance_matrix(r)
        return self._builder.cross_tokens(d, self.settings.implicit_rc)

    def hypergraph(self, positions, dtype: torch.dtype = torch.float64,
                   d: np.ndarray | None = None, skin: float = 0.0, pairs: PairList | None = None) -> Hypergraph:
        """Hypergraph tensors at ``positions`` (same as ``hypergraph.from_tokens``).

        ``skin`` (Å, implicit mode): also list the cross tokens up to ``implicit_rc + skin`` and
        keep that list while no atom moved ``skin / 2`` (see ``TensorBuilder.cross_tokens_skin``):
        same energy, index tensors that change rarely during MD. ``d`` (N, N) or ``pairs`` (a
        :class:`~.pairs.PairList` valid at ``positions``): distances at hand, same tensors.
        """
        r = np.asarray(positions, dtype=np.float64)
        if r.shape != (self.topology.num_atoms, 3):
            raise ValueError(f"positions must have shape ({self.topology.num_atoms}, 3), got {r.shape}")
        if self.settings.mode == "explicit":
            return self._builder.static(r, dtype)
        if skin > 0:
            cross = self._builder.cross_tokens_skin(r, self.settings.implicit_rc, skin, d, pairs)
        else:
            cross = self.cross_tokens(r, d, pairs)
        return self._builder.with_cross(r, cross, dtype)


def _canon(atoms, ranks) -> tuple[int, ...]:
    return tuple(sorted((int(a) for a in atoms), key=lambda a: ranks[a]))


def fragment_topology(topo: Topology, positions, settings: FragmentSettings,
                      d: np.ndarray | None = None) -> Fragmentation:
    """Fragment a molecule of known topology; ``positions`` is the geometry at which kernel
    merging and explicit overlaps are decided (then frozen)."""
    r = np.asarray(positions, dtype=np.float64)
    mol = topology_mol(topo)
    ranks = canonical_ranks(topo, mol)
    groups = find_groups(topo, ranks, settings.topo_bo_threshold, mol, settings.max_ring_system_atoms)
    if d is None:
        d = distance_matrix(r)
    bo = bond_order_matrix(topo.numbers, r, settings.bo_method, d=d)
    gmax, gsum, gtopo = group_matrices(groups, bo, topo.pairs())
    kgroups, isolated = merge_groups(groups, gmax, gtopo, settings.min_kernel_atoms,
                                     settings.max_kernel_atoms, settings.min_bo_threshold)
    if settings.mode == "explicit":
        extra = explicit_overlaps(kgroups, isolated, gsum, settings.overlap_threshold)
    else:
        extra = [[] for _ in kgroups]
    items = []
    for kg, ex in zip(kgroups, extra):
        kernel = _canon([a for g in kg for a in groups[g]], ranks)
        edge = _canon(list(kernel) + [a for g in ex for a in groups[g]], ranks)
        items.append((kernel, edge))
    items.sort(key=lambda ke: (-len(ke[0]), int(ranks[ke[0][0]])))
    return Fragmentation(
        topology=topo,
        groups=groups,
        kernels=tuple(k for k, _ in items),
        hyperedges=tuple(e for _, e in items),
        settings=settings,
        references=r[None].copy(),
    )


def fragment(numbers, positions, charge=0, bonds=None,
             settings: FragmentSettings | None = None) -> Fragmentation:
    """Fragment one molecule (numbers (N,), positions (N, 3) Å, total ``charge``).

    ``bonds``: optional :class:`Topology`, ``(i, j)`` pairs (orders perceived by RDKit) or
    ``(i, j, order)`` triples; by default bonds are perceived from the coordinates.
    """
    settings = FragmentSettings() if settings is None else settings
    z, r = as_arrays(numbers, positions)
    check_elements(z)
    d = distance_matrix(r)
    check_close_pairs(z, d)
    charge = _charge_int(charge)
    if bonds is None:
        pairs = np.argwhere(np.triu(connectivity(z, d), 1))
        topo = topology_from_pairs(z, r, pairs, charge, settings.connectivity_only)
    else:
        topo = topology_from_bonds(z, bonds, charge, r)
    return fragment_topology(topo, r, settings, d=d)
