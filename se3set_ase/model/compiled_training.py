"""Energy and forces for training, from one compiled graph that autograd differentiates again.

A force-matching step computes the forces with ``create_graph=True`` and then differentiates a
loss of them with respect to the parameters. Eagerly that is the forward, the first backward
(recorded as a graph of its own) and the backward of both: some ten thousand small operations
on a DHA batch, most of whose outputs are kept alive for the second backward
(``benchmarks/memory_by_place.py``). Here the forward and the first backward are traced once
into one graph of ATen operations (``make_fx``, symbolic sizes) whose inputs are the positions,
the elements, the index tensors *and the parameters*, so the forces are an ordinary function of
the parameters. ``torch.compile`` (AOTAutograd + TorchInductor) then writes that graph's
forward and its backward with respect to the parameters as fused loops, and its partitioner
recomputes cheap element-wise results in the backward instead of keeping them.

One graph serves every batch: the atom, token and incidence counts stay symbols, and the elements
and index tensors are inputs, so batches of other molecules, other sizes and other token lists
reuse it (explicit and implicit fragments alike: the switched-token branch is always traced,
which is exact for tokens that are not switched).

Why the trace is edited: when the autograd engine saves an operation's *output* for its backward
(``exp``, ``sigmoid``, ``rsqrt``, ...), it keeps a detached alias, and ``make_fx`` records that
``detach``. Eagerly the engine re-attaches the alias to its history when ``create_graph=True``;
in the traced graph the detach would cut the second-order path through it, and the parameter
gradients of a force loss would come out wrong (by ~1-30 % on the test models). Those ``detach``
nodes are therefore replaced by their inputs. The network's own detach, the max shift of the
attention softmax (read by a ``scatter_reduce``), is kept: a softmax does not depend on the shift,
so no derivative is lost, and without it TorchInductor's CPU code for the derivative of the
``amax`` scatter gave NaN gradients (torch 2.13; the uncompiled graph and AOTAutograd's
decompositions alone were finite and exact). ``tests/test_compiled_training.py`` checks the
parameter gradients of a force loss against the plain e3nn path in float64, traced and compiled.

Parameters that get no gradient in the eager network (the last block's l > 0 value paths,
which cannot reach the scalar energy) stay out of the graph's inputs, so they keep
``grad = None`` as they do eagerly.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable

import torch

from ..hypergraph import Hypergraph, no_host_sync
from .compiled import _no_scalar_constants, _threads_safe
from .fused import fused_energy_and_forces, unrolled_products
from .network import SE3SetModel

Tensor = torch.Tensor

# the hypergraph fields that are inputs of the graph (their lengths are symbols)
_INPUT_FIELDS = ("numbers", "token_anchor", "token_edge", "token_switched", "v2e_src", "v2e_dst")


class CompiledTrainingForces:
    """``energy_and_forces(model, hg, training=True)`` through one compiled graph.

    Call with a batch hypergraph on the model's device and dtype: returns total energies (G,) eV,
    forces (N, 3) eV/Å and per-atom energies (N,) eV, differentiable in the model's parameters
    (a loss of them has the gradients of the eager network, to rounding). The graph is traced and
    compiled at the first call (minutes on a CPU; TorchInductor keeps its results on disk, so the
    same model architecture compiles much faster the next time); ``compilations`` counts them.
    ``unroll_products``: trace the per-edge Clebsch-Gordan products as element-wise sums
    (:func:`.fused.unrolled_products`; default on the CPU, as in :mod:`.compiled`).
    ``memory_budget`` (0-1): what the compiled forward may keep for the backward, as a fraction
    of what it keeps by default (``torch._functorch.config.activation_memory_budget``): below 1,
    AOTAutograd's partitioner recomputes more in the backward, matrix products included, to keep
    less (``benchmarks/bench_train_compiled.py --memory-budget``).
    ``compile=False`` keeps the traced graph uncompiled (the same operations eagerly: for tests).
    If compiling fails (no C++ compiler, ...), a warning says so and the eager network serves
    every call (``failed`` is then True).
    """

    def __init__(self, model: SE3SetModel, unroll_products: bool | None = None,
                 inductor_options: dict | None = None, compile: bool = True, memory_budget: float | None = None):
        self.model = model
        self.device = next(model.parameters()).device
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"compiled training is implemented for the CPU and CUDA, not {self.device}")
        self.unroll_products = self.device.type == "cpu" if unroll_products is None else unroll_products
        self.inductor_options = dict(inductor_options) if inductor_options else None
        self.compile = compile
        if memory_budget is not None and not 0.0 <= memory_budget <= 1.0:
            raise ValueError(f"memory_budget must be within [0, 1], got {memory_budget}")
        self.memory_budget = memory_budget
        self.compilations = 0
        self.failed = False  # compiling failed: the eager network serves the calls (with a warning)
        self._fn: Callable[..., tuple[Tensor, Tensor]] | None = None
        self._params: list[torch.nn.Parameter] = []
        self._names: list[str] = []

    @property
    def parameters_in_graph(self) -> list[str]:
        """Names of the parameters that are inputs of the graph (those with a gradient)."""
        return list(self._names)

    def _build(self, hg: Hypergraph) -> None:
        import torch.fx.experimental._config as fx_config
        from torch.fx.experimental.proxy_tensor import make_fx

        model = self.model
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        # one eager call first: it checks the elements, fills the model's caches (Clebsch-Gordan
        # tensors and their non-zero entries), none of which may happen while tracing, and says
        # which parameters a force loss reaches
        with unrolled_products(self.unroll_products), torch.enable_grad():
            energy, forces, _ = fused_energy_and_forces(model, hg, training=True)
            grads = torch.autograd.grad(energy.sum() + forces.pow(2).sum(), [p for _, p in named],
                                        allow_unused=True)
        named = [(n, p) for (n, p), g in zip(named, grads) if g is not None]
        names = [n for n, _ in named]
        # the network reads neither the molecule index of the atoms nor their count (the energies
        # are summed per molecule outside the graph): empty placeholders, so that a use would fail
        # while tracing instead of fixing the first batch's molecules into the graph
        batch, num_graphs = torch.empty(0, dtype=torch.long, device=self.device), 0

        def call(pos: Tensor, *rest: Tensor) -> tuple[Tensor, Tensor]:
            fields, params = rest[:len(_INPUT_FIELDS)], rest[len(_INPUT_FIELDS):]
            pos = pos.detach().requires_grad_(True)
            g = Hypergraph(positions=pos, batch=batch, num_graphs=num_graphs, **dict(zip(_INPUT_FIELDS, fields)))
            e_atom = torch.func.functional_call(model, dict(zip(names, params)), (g,), strict=False)
            # the total of all molecules: the same forces as the per-molecule energies' sum
            (grad,) = torch.autograd.grad(e_atom.sum(), pos, create_graph=True)
            return e_atom, -grad

        example = (hg.positions,) + tuple(getattr(hg, f) for f in _INPUT_FIELDS) + tuple(p for _, p in named)
        with unrolled_products(self.unroll_products), no_host_sync(), fx_config.patch(use_duck_shape=False):
            graph = make_fx(call, tracing_mode="symbolic", _allow_non_fake_inputs=True)(*example)
        _reattach_saved_outputs(graph)
        _no_scalar_constants(graph)  # else torch.compile restarts its trace to specialise them
        fn = graph
        if self.compile:
            try:
                fn = torch.compile(graph, dynamic=True, fullgraph=True, options=self.inductor_options)
                with _threads_safe(self.device), torch.enable_grad(), self._budget():
                    # compile the forward and the backward now, under the thread-safe setting (a
                    # gradient taken here, not accumulated into .grad)
                    e_atom, f = fn(*example)
                    torch.autograd.grad(e_atom.sum() + f.pow(2).sum(), [p for _, p in named])
            except Exception as exc:  # noqa: BLE001 (no C++ compiler, an Inductor bug, ...)
                warnings.warn(f"compiling the training step failed ({type(exc).__name__}: {exc}); "
                              "training with the eager network instead", RuntimeWarning, stacklevel=3)
                self.failed = True
                return
        self._fn, self._params, self._names = fn, [p for _, p in named], names
        self.compilations += 1

    def _budget(self):
        """The partitioner's activation memory budget while compiling (``memory_budget``; also
        around each call, in case a size guard fails and the graph is compiled again)."""
        if self.memory_budget is None:
            return contextlib.nullcontext()
        import torch._functorch.config as functorch_config

        return functorch_config.patch(activation_memory_budget=self.memory_budget)

    def __call__(self, hg: Hypergraph) -> tuple[Tensor, Tensor, Tensor]:
        self.model.element_indices(hg.numbers)  # unknown elements: the eager network's error
        if self._fn is None and not self.failed:
            self._build(hg)
        if self.failed:
            return fused_energy_and_forces(self.model, hg, training=True)
        with _threads_safe(self.device), torch.enable_grad(), self._budget():
            e_atom, forces = self._fn(hg.positions, *(getattr(hg, f) for f in _INPUT_FIELDS), *self._params)
        energy = torch.zeros(hg.num_graphs, dtype=e_atom.dtype, device=e_atom.device).index_add(0, hg.batch, e_atom)
        return energy, forces, e_atom


def _reattach_saved_outputs(graph: torch.fx.GraphModule) -> int:
    """Replace the ``aten.detach`` nodes of a traced graph by their inputs (see the module's
    docstring), all but the attention softmax's max shift (a detach read by ``scatter_reduce``);
    returns how many were replaced."""
    n = 0
    for node in list(graph.graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten.detach.default:
            if any(u.target is torch.ops.aten.scatter_reduce.two for u in node.users):
                continue  # segment_softmax's shift: kept, see the module's docstring
            node.replace_all_uses_with(node.args[0])
            graph.graph.erase_node(node)
            n += 1
    graph.recompile()
    return n
