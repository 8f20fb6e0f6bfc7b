"""Energy and forces replayed from a CUDA graph, for a molecule whose hypergraph keeps its indices.

One force call of SE3Set is a few thousand small kernels (per block, per irrep type, forward and
backward). On a GPU the CPU cost of launching them through Python and the dispatcher, not the
arithmetic, sets the time of a call. In MD or an optimisation the hypergraph of a molecule keeps
its index tensors from step to step: the fragmentation is cached per bond topology, and the
implicit cross tokens, listed with a Verlet skin (``Fragmenter(skin=...)``), keep their list for
many steps while their weights, computed from the positions inside the network, switch smoothly.
So the whole energy + forces computation is captured once per topology as a CUDA graph and
replayed with new positions: one copy in, one replay, one copy out.

A new topology (other index tensors, another molecule) is captured anew; the last
``max_graphs`` topologies are kept. Results equal those of
:func:`se3set_ase.model.network.energy_and_forces` (same kernels, same order).

With a :class:`~se3set_ase.model.compiled.CompiledEnergyForces` (``compiled=``) the captured call
is the compiled graph instead of the eager network: TorchInductor's Triton kernels fuse the
element-wise chains, so a replay launches fewer kernels (DHA, small preset, H100: 2154 instead of
3609 per call, 6.4 instead of 10.4 ms; ``benchmarks/gpu_profile.py``). The compiled graph serves
every topology of the molecule; only the capture is redone per topology.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..hypergraph import Hypergraph
from .compiled import CompiledEnergyForces
from .network import SE3SetModel, energy_and_forces
from .per_topology import PerTopology

Tensor = torch.Tensor


@dataclass
class _Captured:
    static: Hypergraph  # the topology on the device; static.positions is the graph's input buffer
    graph: torch.cuda.CUDAGraph
    energy: Tensor  # (G,) outputs written by every replay
    forces: Tensor  # (N, 3)
    e_atom: Tensor  # (N,)


class GraphedEnergyForces:
    """``energy_and_forces(model, hg)`` through CUDA graphs, one per hypergraph topology.

    ``model`` must live on a CUDA device with parameters that need no gradient (an inference
    model, as in the calculator). Call with a hypergraph on the CPU (as the fragmenter makes it):
    returns total energies (G,) eV, forces (N, 3) eV/Å and per-atom energies (N,) eV, on the
    model's device, as new tensors (the graph's own outputs are overwritten by the next replay).
    ``compiled``: capture this compiled graph of the same model instead of the eager network.
    """

    def __init__(self, model: SE3SetModel, max_graphs: int = 4, warmup: int = 2,
                 compiled: CompiledEnergyForces | None = None):
        self.device = next(model.parameters()).device
        if self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a model on a CUDA device, not {self.device}")
        if any(p.requires_grad for p in model.parameters()):
            raise ValueError("CUDA-graph replay is for inference: set requires_grad_(False) on the parameters")
        if compiled is not None and compiled.model is not model:
            raise ValueError("compiled must be a CompiledEnergyForces of the same model")
        self.model = model
        self.warmup = warmup
        self.compiled = compiled
        self._graphs: PerTopology[_Captured] = PerTopology(self._capture, max_graphs)

    @property
    def captures(self) -> int:
        """How many topologies were captured (a new one each time the indices change)."""
        return self._graphs.builds

    def _capture(self, hg: Hypergraph) -> _Captured:
        dtype = self.model.dtype
        static = hg.to(self.device, dtype)
        if self.compiled is not None:  # compiles now (outside the capture) if not yet done
            compiled_fn, inputs = self.compiled.graph_inputs(static)

            def call():
                return compiled_fn(*inputs)
        else:
            def call():
                return energy_and_forces(self.model, static, training=False)
        # eager runs on a side stream first: they check the elements, fill the model's caches
        # (Clebsch-Gordan tensors, layouts) and warm cuBLAS, none of which may happen in a capture
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                call()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            energy, forces, e_atom = call()
        return _Captured(static, graph, energy, forces, e_atom)

    def __call__(self, hg: Hypergraph) -> tuple[Tensor, Tensor, Tensor]:
        with torch.cuda.device(self.device):  # the model's GPU, also when it is not the current one
            return self._call(hg)

    def _call(self, hg: Hypergraph) -> tuple[Tensor, Tensor, Tensor]:
        cap = self._graphs(hg)
        cap.static.positions.copy_(hg.positions.to(cap.static.positions.dtype))
        cap.graph.replay()
        return cap.energy.clone(), cap.forces.clone(), cap.e_atom.clone()
