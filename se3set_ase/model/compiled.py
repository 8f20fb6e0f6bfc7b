"""Energy and forces from a compiled graph, for a molecule whose hypergraph keeps its indices.

On a CPU a force call of the fused network is a few thousand PyTorch operations, many of them
small (per irrep type, per Clebsch-Gordan path, forward and backward), and the small ones cost
more in dispatch and memory traffic than in arithmetic. For a fixed topology (see
:mod:`.per_topology`) the whole computation, forward and the backward that gives the forces, is
traced once into one graph of ATen operations (``make_fx``, with the hypergraph's indices and the
model's frozen weights as constants) and compiled with TorchInductor (``torch.compile``), which
fuses the element-wise chains and writes C++ loops for them. The compiled graph is then called
with each step's positions.

Compiling costs minutes for a new topology (TorchInductor keeps its results on disk, so the same
model and topology compile in well under a minute the next time); a call then costs about half
of an eager one (``benchmarks/bench_speed.py``). Worth it for long MD with a fixed topology; the
calculator does it with ``compile=True``. Results equal those of
:func:`se3set_ase.model.network.energy_and_forces` to rounding (the same operations, fused).
The weights are frozen into the compiled graph: build a new object after changing them.
Known limit: with more than one torch thread, TorchInductor 2.13's C++ code generation fails on
these graphs (an assertion on vectorised atomic adds); the calculator then warns and runs eagerly,
so use ``compile=True`` with one thread (``OMP_NUM_THREADS=1``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..hypergraph import Hypergraph, no_host_sync
from .network import SE3SetModel, energy_and_forces
from .per_topology import PerTopology

Tensor = torch.Tensor


@dataclass
class _Compiled:
    fn: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]  # positions (N, 3) -> energy, forces, e_atom


class CompiledEnergyForces:
    """``energy_and_forces(model, hg)`` through a compiled graph, one per hypergraph topology.

    ``model``: an inference model (no parameter needs a gradient) on the CPU. Call with a
    hypergraph: returns total energies (G,) eV, forces (N, 3) eV/Å and per-atom energies (N,) eV.
    ``compilations`` counts the topologies compiled so far.
    """

    def __init__(self, model: SE3SetModel, max_graphs: int = 4):
        self.device = next(model.parameters()).device
        if self.device.type != "cpu":
            raise ValueError(f"compiled energy + forces is implemented for the CPU, not {self.device} "
                             "(on CUDA the calculator replays CUDA graphs instead)")
        if any(p.requires_grad for p in model.parameters()):
            raise ValueError("compiled energy + forces is for inference: set requires_grad_(False) on the parameters")
        self.model = model
        self._graphs: PerTopology[_Compiled] = PerTopology(self._compile, max_graphs)

    @property
    def compilations(self) -> int:
        return self._graphs.builds

    def _compile(self, hg: Hypergraph) -> _Compiled:
        from torch.fx.experimental.proxy_tensor import make_fx

        static = hg.to(self.device, self.model.dtype)
        # one eager call first: it checks the elements and fills the model's caches (Clebsch-Gordan
        # tensors, scaled frozen weights), none of which may happen while tracing
        energy_and_forces(self.model, static, training=False)

        def call(pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            energy, forces, e_atom = energy_and_forces(self.model, static.with_positions(pos), training=False)
            return energy.detach(), forces.detach(), e_atom.detach()

        with no_host_sync():
            graph = make_fx(call)(static.positions)
        fn = torch.compile(graph, dynamic=False, fullgraph=True)
        fn(static.positions)  # compile now, not at the first step that uses it
        return _Compiled(fn)

    def __call__(self, hg: Hypergraph) -> tuple[Tensor, Tensor, Tensor]:
        entry = self._graphs(hg)
        return entry.fn(hg.positions.to(self.device, self.model.dtype))
