"""Fragmentation of molecules into SE3Set hypergraphs.

Pipeline: bond perception (distance connectivity + RDKit bond orders with the total charge)
-> groups (multiple bonds, bonds to H, functional-group SMARTS, ring systems) -> kernels (small
groups merged by empirical bond order) -> hyperedges (explicit: kernel + overlap groups with summed
bond order >= c_w; implicit: kernels + switched cross tokens within r_c) -> tensors
(:mod:`se3set_ase.hypergraph`).

Continuity of the potential energy surface
------------------------------------------
Everything discrete is decided once per bond topology and frozen: bonds -> groups -> kernels
(merging uses the bond-order matrix at the *first* geometry seen for that topology) -> explicit
overlaps (the c_w test at that same geometry). A topology is identified by the atomic numbers, the
total charge and the distance-based connectivity graph (d_ij <= 1.3 (R_cov,i + R_cov,j); a hydrogen
within that distance of several atoms is bonded to the nearest, so a short hydrogen bond is not a
bond). Along an MD
trajectory without bond breaking the explicit hypergraph is therefore constant, and the energy is as
smooth as the network. Implicit cross tokens are recomputed every call from the current positions:
a candidate token (kernel F, atom i), i not in F, is listed when min_{j in F} |r_i - r_j| < r_c, and
the model weighs it with :func:`se3set_ase.hypergraph.token_weights` (a C1 switch over
``switch_width`` below r_c), so a token enters or leaves the list with weight 0. The only remaining
discontinuity is a change of connectivity (a bond forms or breaks):
:attr:`Fragmenter.last_topology_changed` reports it so that the calculator can warn.

Note that a cached fragmentation's kernels/overlaps depend on which geometry of a topology came
first; the hypergraph does not depend on the geometry as long as the cache holds it.

Canonical order: members, groups, kernels and hyperedges are ordered with RDKit canonical atom
ranks, so permuting the input atoms permutes the hypergraph (up to the molecule's symmetry) and
rotations/translations leave it unchanged. A pinned fragmentation (a model's training one) with
reference geometries is carried onto the same molecule in any atom order by the graph isomorphism
closest to a reference (:mod:`se3set_ase.fragment.match`), which also fixes the one case where
the symmetry matters: ring systems cut into chunks (``max_ring_system_atoms``).

Charge: the total charge is an argument (``charge=``; an ``ase.Atoms`` gives
``atoms.info["charge"]``, default 0) and is passed to RDKit's bond-order assignment, which places
formal charges; it is part of the cache key.
"""
from .bonds import Topology, perceive_bonds
from .cache import Fragmenter
from .core import Fragmentation, FragmentSettings, fragment, fragment_topology
from .errors import FragmentationError, StructureError, validate_structure
from .groups import FUNCTIONAL_GROUPS
from .kernels import bond_order_matrix

__all__ = [
    "FUNCTIONAL_GROUPS",
    "FragmentSettings",
    "Fragmentation",
    "FragmentationError",
    "Fragmenter",
    "StructureError",
    "Topology",
    "bond_order_matrix",
    "fragment",
    "fragment_topology",
    "perceive_bonds",
    "validate_structure",
]
