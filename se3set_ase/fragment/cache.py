"""A fragmenter with a cache keyed on the bond topology, for MD and for datasets."""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, NamedTuple

import numpy as np
import torch

from ..hypergraph import Hypergraph, collate
from .. import elements
from .bonds import (_charge_int, hysteresis_adjacency, monovalent_hydrogen_pairs, monovalent_hydrogens,
                    threshold_matrix, topology_from_pairs)
from .core import FragmentSettings, Fragmentation, fragment_topology
from .match import best_isomorphism
from .errors import (MIN_PAIR_DISTANCE, as_arrays, check_cell, check_close_pair_list, check_close_pairs,
                     check_elements, distance_matrix, pair_distances)
from .pairs import PAIR_SKIN, PairList, within


class _PairState(NamedTuple):
    """The bonds of :attr:`Fragmenter._last` on a pair list: what the next step compares with."""

    pairs: PairList
    band: np.ndarray | None  # the band's bonds before monovalent_hydrogens (None: not on this list)
    mask: np.ndarray  # bonded flags (B,) of the list's bond candidates
    complete: bool  # every bond of the adjacency is a bond candidate of this list
    several: bool  # some H had several partners (monovalent_hydrogens changed the band's bonds)


class Fragmenter:
    """Callable: structure -> :class:`Hypergraph`, re-using the fragmentation of a topology.

    The cache key is (atomic numbers, total charge, distance-based connectivity graph), computed
    with numpy each call (the same criterion the perception uses), so a cache hit never calls
    RDKit. On a miss the topology is perceived and fragmented at the current geometry, then frozen.

    ``last_topology_changed`` is True when the call's connectivity differs from the previous
    call's (bonds formed or broken, or another molecule): the calculator can warn, since the
    energy is discontinuous there.

    ``pinned``: fragmentations to use whenever their topology comes up, whatever the geometry
    (never evicted). Kernel merging and explicit overlaps are decided from geometric bond orders,
    so without a pin the first geometry seen decides them; a model pins the ones it was trained
    on (:meth:`for_model`), so that every starting geometry gets the training hypergraph. A pin
    with reference geometries also serves the same molecule in any other atom order: the first
    geometry seen in that order picks the relabelling (:mod:`.match`), which is then kept for the
    fragmenter's life (not evicted; :meth:`clear_cache` forgets it).

    ``skin`` (Å, implicit fragments only): list the switched cross tokens up to ``implicit_rc +
    skin`` and keep the list until an atom has moved ``skin / 2`` (a Verlet list). The extra
    tokens have weight exactly 0, so energies and forces are unchanged, but the index tensors
    then stay the same over many MD steps, which lets the calculator replay a CUDA graph.

    ``hysteresis`` (for trajectories: the calculator sets it): the connectivity of a call starts
    from the previous call's, for the same atoms and charge: its bonds hold up to the usual
    1.3 x (R_i + R_j), a new bond needs d <= 1.1 x (R_i + R_j) (``elements.FORMING_FACTOR``).
    Thermal fluctuations across the 1.3 threshold (a 1-3 pair in a strained ring, a stretched
    bond) then do not re-fragment the molecule; a reaction, which crosses both, still does.
    Off (default), each call's connectivity depends on its geometry alone, as in training.

    Large molecules are handled per call without the dense (N, N) distance matrix: a Verlet pair
    list (:class:`~se3set_ase.fragment.pairs.PairList`, rebuilt when an atom has moved
    ``pair_skin / 2`` = 0.5 Å) gives the distances of the few pairs near a threshold, from which
    the same connectivity, cache hits, close-contact errors and cross tokens follow, to the bit (the
    dense matrix only on a topology change). See :meth:`_pair_path` for when (the class attributes
    ``pair_list_min_atoms`` and ``pair_list_trajectory_min_atoms``; set them, and ``pair_skin``, on
    an instance to choose).
    """

    #: From this many atoms every call uses the pair list: building one costs no more than the
    #: dense matrix even when each call needs a new one (benchmarks/bench_fragment.py).
    pair_list_min_atoms: int = 256
    #: From this many atoms a call on a trajectory (no atom moved ``pair_skin / 4`` since the
    #: previous call) uses the pair list too: it then lasts many calls and beats the dense matrix.
    pair_list_trajectory_min_atoms: int = 48
    #: Skin (Å) of the pair list (:data:`~se3set_ase.fragment.pairs.PAIR_SKIN`).
    pair_skin: float = PAIR_SKIN

    def __init__(self, settings: FragmentSettings | None = None, cache_size: int = 256,
                 pinned: Iterable[Fragmentation] = (), skin: float = 0.0, hysteresis: bool = False):
        if not skin >= 0:
            raise ValueError(f"skin must be >= 0 Å, got {skin}")
        self.settings = FragmentSettings() if settings is None else settings
        self.skin = float(skin)
        self.hysteresis = bool(hysteresis)
        self.cache_size = int(cache_size)
        self._pinned = {_pin_key(f): f for f in pinned}
        # pins with reference geometries, by what any atom order of their molecule shares
        self._by_formula: dict[tuple, list[Fragmentation]] = {}
        for f in self._pinned.values():
            if f.references is not None:
                self._by_formula.setdefault(_formula_key(f.topology.numbers, f.topology.charge, len(f.topology.bonds)),
                                            []).append(f)
        self._cache: OrderedDict[bytes, Fragmentation] = OrderedDict()
        self._decided: dict[bytes, Fragmentation] = {}  # topology key -> pin (or its relabelling) used
        # elements -> (covalent radii, H indices, bond thresholds, forming thresholds); the (N, N)
        # thresholds only once the dense path needs them
        self._thr: dict[bytes, tuple] = {}
        self._last_key: bytes | None = None
        self._last = None  # (key, charge, numbers bytes, adjacency, fragmentation)
        self._pairs: PairList | None = None  # the pair list of large molecules
        self._last_pairs: _PairState | None = None  # self._last's bonds on self._pairs
        self._previous: tuple[bytes, np.ndarray] | None = None  # the last call's atoms and positions
        self.last_topology_changed = False
        self.hits = 0
        self.misses = 0

    @classmethod
    def for_model(cls, model, cache_size: int = 256, skin: float = 0.0, hysteresis: bool = False) -> "Fragmenter":
        """The fragmenter of a model: its settings and the fragmentations it was trained on."""
        settings = model.config.fragment
        pins = [Fragmentation.from_dict(d, settings) for d in getattr(model, "fragmentations", ())]
        return cls(settings, cache_size, pinned=pins, skin=skin, hysteresis=hysteresis)

    def fragmentations(self) -> list[Fragmentation]:
        """The fragmentations decided so far (pinned first), in the order they were made."""
        return list(self._pinned.values()) + list(self._cache.values())  # not the pins' relabellings

    def clear_cache(self) -> None:
        self._cache.clear()
        self._decided.clear()
        self._thr.clear()
        self._last_key = None
        self._last = None
        self._pairs = None
        self._last_pairs = None
        self._previous = None

    @staticmethod
    def _unpack(structure, positions, charge):
        pbc = cell = None
        if positions is None:  # an ase.Atoms (or anything with numbers/positions/info)
            try:
                numbers = structure.numbers
                positions = structure.positions
            except AttributeError:
                raise TypeError("pass an ase.Atoms, or atomic numbers and positions") from None
            pbc = getattr(structure, "pbc", None)
            cell = getattr(structure, "cell", None)
            if charge is None:
                charge = getattr(structure, "info", {}).get("charge", 0)
        else:
            numbers = structure
        return numbers, positions, (0 if charge is None else charge), pbc, cell

    def _lookup(self, structure, positions, charge):
        """(fragmentation, positions (N, 3), dense distances (N, N) or None, pair list or None)."""
        numbers, positions, charge, pbc, cell = self._unpack(structure, positions, charge)
        check_cell(pbc, cell)
        z, r = as_arrays(numbers, positions)
        charge = _charge_int(charge)
        zkey = z.tobytes()
        cached = self._thr.get(zkey)
        if cached is None:
            check_elements(z)
            cached = (elements.covalent_radii(z), np.flatnonzero(z == 1), None, None)
            if len(self._thr) > 4 * self.cache_size:
                self._thr.clear()
            self._thr[zkey] = cached
        if self._pair_path(zkey, r):
            return self._lookup_pairs(z, r, charge, zkey, cached[0], cached[1]), r, None, self._pairs
        if cached[2] is None:
            cached = self._thr[zkey] = cached[:2] + (threshold_matrix(z), threshold_matrix(z, elements.FORMING_FACTOR))
        _, hydrogens, thr, thr_form = cached
        d = distance_matrix(r)
        check_close_pairs(z, d)
        last = self._last
        if self.hysteresis and last is not None and last[1] == charge and last[2] == zkey:
            adj = hysteresis_adjacency(d, thr, thr_form, last[3])
        else:
            adj = d <= thr
        adj = monovalent_hydrogens(adj, d, hydrogens)
        if (last is not None and last[1] == charge and last[2] == zkey
                and np.array_equal(last[3], adj)):  # fast path: same topology as last call
            return self._unchanged(), r, d, None
        return self._resolve(z, r, charge, zkey, adj, d, None), r, d, None

    def _pair_path(self, zkey: bytes, r: np.ndarray) -> bool:
        """Whether this call uses the pair list (the same results either way, only faster): from
        ``pair_list_min_atoms`` atoms always; from ``pair_list_trajectory_min_atoms`` while the calls
        follow a trajectory (the pair list is still valid, or no atom moved ``pair_skin / 4`` = 0.25 Å
        since the previous call: MD steps move atoms < 0.05 Å), not for unrelated geometries (a data
        set's frames, 10 fs apart or more: ~0.5 Å), which would each need a new list, costlier than
        the dense matrix for a small molecule."""
        n = len(r)
        if n >= self.pair_list_min_atoms:
            return True
        if n < self.pair_list_trajectory_min_atoms:
            return False
        previous, self._previous = self._previous, (zkey, r.copy())
        pl = self._pairs
        if pl is not None and pl.zkey == zkey and pl.valid(r):
            return True
        return previous is not None and previous[0] == zkey and within(previous[1], r, 0.25 * self.pair_skin)

    def _lookup_pairs(self, z: np.ndarray, r: np.ndarray, charge: int, zkey: bytes, radii: np.ndarray,
                      hydrogens: np.ndarray) -> Fragmentation:
        """:meth:`_lookup`'s decisions for a large molecule, from the pair list (rebuilt here when
        stale) instead of the dense distance matrix: the same close-contact error, adjacency (with
        hysteresis and monovalent hydrogens), fast path, hits and misses."""
        pl = self._pairs
        if pl is None or pl.zkey != zkey or pl.skin != self.pair_skin or not pl.valid(r):
            pl = self._pairs = PairList(r, radii, self._pair_reach(radii), self.pair_skin, zkey)
        d_close, d_band = pl.step_distances(r)
        check_close_pair_list(z, pl.close_i, pl.close_j, d_close)
        last = self._last
        state = None
        if last is not None and last[1] == charge and last[2] == zkey:
            state = self._pair_state(pl, last[3])
        band = pl.band_bonds(d_band, state.mask[pl.band] if self.hysteresis and state is not None else None)
        if (state is not None and state.band is not None and not state.several
                and np.array_equal(state.band, band)):  # fast path: the same bonds as last call
            return self._unchanged()
        mask = pl.bond_mask(band)
        several = monovalent_hydrogen_pairs(mask, pl.bi, pl.bj, len(z), hydrogens,
                                            lambda k: pair_distances(r, pl.bi[k], pl.bj[k]))
        new_state = _PairState(pl, band, mask, True, several)
        if state is not None and state.complete and np.array_equal(state.mask, mask):
            self._last_pairs = new_state
            return self._unchanged()
        return self._resolve(z, r, charge, zkey, pl.adjacency(mask), None, new_state)

    def _pair_reach(self, radii: np.ndarray) -> float:
        """Distance (Å) within which the pair list must be complete: the largest bond threshold
        (with or without hysteresis), the close contact and, for implicit fragments, the
        cross-token cut-off (+ ``skin``, for its Verlet list)."""
        reach = max(elements.CONNECTIVITY_FACTOR, elements.FORMING_FACTOR) * 2.0 * float(radii.max())
        reach = max(reach * (1 + 1e-9), MIN_PAIR_DISTANCE)
        if self.settings.mode == "implicit":
            reach = max(reach, self.settings.implicit_rc + self.skin)
        return reach

    def _pair_state(self, pl: PairList, adj: np.ndarray) -> _PairState:
        """The bonds of the last call (adjacency ``adj`` (N, N)) on the pair list ``pl``."""
        state = self._last_pairs
        if state is not None and state.pairs is pl:
            return state
        mask = adj[pl.bi, pl.bj]  # a list built since: its candidates may miss a bond of adj
        return _PairState(pl, None, mask, 2 * int(np.count_nonzero(mask)) == int(np.count_nonzero(adj)), True)

    def _unchanged(self) -> Fragmentation:
        """The fast path: the same topology as the last call."""
        self.last_topology_changed = False
        self.hits += 1
        return self._last[4]

    def _resolve(self, z: np.ndarray, r: np.ndarray, charge: int, zkey: bytes, adj: np.ndarray,
                 d: np.ndarray | None, state: _PairState | None) -> Fragmentation:
        """The fragmentation of connectivity ``adj`` (N, N), from the cache, the pins or RDKit;
        ``d``: the dense distances if at hand; ``state``: its bonds on the pair list, if any."""
        key = _topology_key(len(z), charge, zkey, adj)
        self.last_topology_changed = self._last_key is not None and key != self._last_key
        self._last_key = key
        frag = self._decided.get(key)
        if frag is None:
            frag = self._cache.get(key)
            if frag is not None:
                self._cache.move_to_end(key)
        if frag is None:
            frag = self._from_pins(key, z, r, adj, charge)
            if frag is not None:  # decided once, never evicted: the choice must not change later
                self._decided[key] = frag
        if frag is None:
            self.misses += 1  # an RDKit fragmentation
            pairs = np.argwhere(np.triu(adj, 1))
            topo = topology_from_pairs(z, r, pairs, charge, self.settings.connectivity_only)
            frag = fragment_topology(topo, r, self.settings, d=d)
            self._cache[key] = frag
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        else:
            self.hits += 1
        self._last = (key, charge, zkey, adj, frag)
        self._last_pairs = state
        return frag

    def _from_pins(self, key: bytes, z: np.ndarray, r: np.ndarray, adj: np.ndarray, charge: int) -> Fragmentation | None:
        """The pinned fragmentation for this topology, decided once per topology. An input in a
        pin's own atom order (the same labelled bond graph) gets the pin as it is: the hyperedges
        training used. Any other atom order gets a pin with reference geometries through the
        isomorphism closest to one of its references
        (:func:`~se3set_ase.fragment.match.best_isomorphism`); a pin without them (model files
        made before references were stored) fits only its own atom order.

        The own order is not sent through the geometric match because a highly symmetric
        molecule far from every reference can fit a symmetry-equivalent relabelling better than
        the identity (a double-walled nanotube test frame: RMSD 0.341 against 0.353 Å), which would
        put the cut elsewhere than training did."""
        exact = self._pinned.get(key)
        if exact is not None:
            return exact
        cands = self._by_formula.get(_formula_key(z, charge, int(np.triu(adj, 1).sum())), [])
        if not cands:
            return None
        pairs = np.argwhere(np.triu(adj, 1))
        best, best_rmsd = None, np.inf
        for pin in cands:
            t = pin.topology
            found = best_isomorphism(t.numbers, t.pairs(), pin.references, z, pairs, r)
            if found is not None and found[1] < best_rmsd:
                best, best_rmsd = (pin, found[0]), found[1]
        if best is None:
            return None
        pin, perm = best
        return pin if np.array_equal(perm, np.arange(len(perm))) else pin.relabel(perm)

    def verlet_reference(self) -> np.ndarray | None:
        """Where the skin list of the last call's fragmentation was built: positions (N, 3) in Å,
        or None (no skin, explicit mode, no call yet). A trajectory stopped and continued later
        saves it and gives it to :meth:`restore_verlet`: the continued run then lists the same
        zero-weight cross tokens as an unbroken one, so its forces are the same to the last bit
        (the list changes only the rounding), which makes a resumed MD run exactly reproducible."""
        if self._last is None or self.skin == 0 or self._last[4].settings.mode != "implicit":
            return None
        return self._last[4]._builder.verlet_reference()

    def restore_verlet(self, positions) -> None:
        """Rebuild the last call's skin list at ``positions`` (a saved :meth:`verlet_reference`
        of the same topology); the next call keeps it while no atom has moved skin/2 from there."""
        if self._last is None:
            raise RuntimeError("restore_verlet: call the fragmenter on the structure first")
        frag = self._last[4]
        if self.skin == 0 or frag.settings.mode != "implicit":
            raise ValueError("restore_verlet: this fragmenter keeps no skin list (skin 0 or explicit mode)")
        r = np.asarray(positions, dtype=np.float64)
        if r.shape != (frag.topology.num_atoms, 3):
            raise ValueError(f"restore_verlet: positions must have shape ({frag.topology.num_atoms}, 3), got {r.shape}")
        frag._builder.rebuild_verlet(r, frag.settings.implicit_rc, self.skin)

    def fragmentation(self, structure, positions=None, charge=None) -> Fragmentation:
        """The (cached) :class:`Fragmentation` of a structure."""
        return self._lookup(structure, positions, charge)[0]

    def __call__(self, structure, positions=None, charge=None,
                 dtype: torch.dtype = torch.float64) -> Hypergraph:
        """``fragmenter(atoms)`` or ``fragmenter(numbers, positions, charge=0)``.

        The charge comes from the argument, else ``atoms.info["charge"]``, else 0.
        """
        frag, r, d, pairs = self._lookup(structure, positions, charge)
        return frag.hypergraph(r, dtype=dtype, d=d, skin=self.skin, pairs=pairs)

    def batch(self, structures: Iterable, dtype: torch.dtype = torch.float64) -> Hypergraph:
        """Collate many structures (``ase.Atoms`` or ``(numbers, positions[, charge])``)."""
        graphs = []
        for s in structures:
            if isinstance(s, tuple):
                graphs.append(self(*s, dtype=dtype))
            else:
                graphs.append(self(s, dtype=dtype))
        if not graphs:
            raise ValueError("no structures to batch")
        return collate(graphs)


def _pin_key(frag: Fragmentation) -> bytes:
    """The cache key of a fragmentation's topology (as :meth:`Fragmenter._lookup` builds it)."""
    t = frag.topology
    z = np.asarray(t.numbers, dtype=np.int64)
    adj = np.zeros((len(z), len(z)), dtype=bool)
    p = t.pairs()
    adj[p[:, 0], p[:, 1]] = True
    adj[p[:, 1], p[:, 0]] = True
    return _topology_key(len(z), t.charge, z.tobytes(), adj)


def _formula_key(numbers, charge: int, num_bonds: int) -> tuple:
    """What every atom order of a molecule shares: sorted atomic numbers, charge, bond count."""
    return (np.sort(np.asarray(numbers, dtype=np.int64)).tobytes(), int(charge), int(num_bonds))


def _topology_key(n: int, charge: int, zkey: bytes, adj: np.ndarray) -> bytes:
    """Cache key of a topology: atom count, total charge, atomic numbers (int64 bytes) and the
    boolean (N, N) connectivity matrix."""
    return b"%d|%d|" % (n, charge) + zkey + np.packbits(adj).tobytes()
