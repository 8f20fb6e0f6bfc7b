"""Energy and forces from a compiled graph, one per molecule, whatever its token lists (on the CPU:
while their segments fit the graph's inverse tables).

On a CPU a force call of the fused network is a few thousand PyTorch operations, many of them
small (per irrep type, per Clebsch-Gordan path, forward and backward), and the small ones cost
more in dispatch and memory traffic than in arithmetic. Here the whole computation, forward and
the backward that gives the forces, is traced once into one graph of ATen operations (``make_fx``
with symbolic sizes: positions and the five index tensors are inputs, the token and incidence
counts stay symbols; the elements, the batch vector and the model's frozen weights are constants)
and compiled with TorchInductor (``torch.compile(dynamic=True)``), which fuses the element-wise
chains and writes C++ loops for them. The compiled graph then serves every hypergraph of the same
atoms: MD steps, the Verlet list of the implicit cross tokens changing every few tens of steps,
even a re-fragmentation after a bond change.

Compiling costs minutes the first time (TorchInductor keeps its results on disk, so the same model
and molecule compile in well under a minute the next time); a call then costs about half of an
eager one (``benchmarks/bench_speed.py``). Worth it for MD and long optimisations; the calculator
does it with ``compile=True``. Results equal those of
:func:`se3set_ase.model.network.energy_and_forces` to rounding (the same operations, fused).
The weights are frozen into the compiled graph: build a new object after changing them.
With more than one torch thread, TorchInductor 2.13 writes the scatter and index-put
accumulations (the backward of every gather) as vectorised atomic adds and its C++ code generation
fails on those whose index does not vary along the vectorised loop (an assertion); compiling and
calling with ``torch.use_deterministic_algorithms(True)`` set makes it call ATen's kernels for
those accumulations instead (:func:`_threads_safe`), and the rest is compiled as before. The
per-edge Clebsch-Gordan products are traced as element-wise sums that Inductor fuses
(:func:`.fused.unrolled_products`); ``benchmarks/bench_compiled.py`` times that against the eager
layout's batched matmuls. On the CPU the code that calls the loops and kernels is generated as C++
too (:data:`CPU_INDUCTOR_OPTIONS`), not as Python.

On the CPU the gathers and sums of features along ``v2e_dst``, ``v2e_src`` and ``token_anchor``
go through inverse tables (:mod:`.segments`), so the forces' backward holds gathers only and the
scatter-adds left to ATen are a few small ones (the attention's maxima, the switched tokens'
weights). The tables are graph inputs beside the indices, made for each token list (and kept
while the fragmenter hands out the same index tensors); their widths are fixed when the graph is
compiled, with room for the segments to grow (:func:`table_widths`), and a token list with a
longer segment gets a new graph. Paper preset, DHA, two threads, same runs: 181.0 vs 191.6 and
165.8 vs 177.9 ms per call with and without tables, for a cold compile 40 % longer (862 vs 616 s;
``bench_compiled.py``, variant ``scatter``).
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from ..hypergraph import Hypergraph, no_host_sync
from .fused import inverse_tables, matmul_dtype, unrolled_products
from .network import SE3SetModel, energy_and_forces
from .per_topology import PerTopology, same_atoms
from .segments import SegmentOverflow, inverse_table, max_segment

Tensor = torch.Tensor


@dataclass
class _Compiled:
    fn: Callable[..., tuple[Tensor, Tensor, Tensor]]  # positions (N, 3), *indices, *tables -> energy, forces, e_atom
    widths: dict[str, int]  # the inverse tables' widths per index field (_TABLE_FIELDS); empty: no tables


# TorchInductor's options for a CPU graph. The wrapper that allocates the buffers and calls the
# ~800 loops and ~700 ATen kernels of a paper-preset call, in C++ rather than Python: 15 ms less per
# DHA call (178.4 -> 163.1 and 166.2 -> 154.9 ms, two runs; 306.6 -> 270.2 ms on one thread), the
# same cold compile (651 vs 646 s) when that C++ is built apart from the loops at -O1 (one -O3
# translation unit of both did not finish in 40 min): ``benchmarks/bench_compiled.py``, variant
# ``python-wrapper``, and benchmarks/README.md. On CUDA the calculator replays the compiled graph
# from a CUDA graph, where the wrapper costs nothing, so CUDA keeps TorchInductor's defaults.
CPU_INDUCTOR_OPTIONS = {"cpp_wrapper": True, "cpp_wrapper_build_separate": True}

# the hypergraph fields that are inputs of the compiled graph (their lengths are symbols)
_INDEX_FIELDS = ("token_anchor", "token_edge", "token_switched", "v2e_src", "v2e_dst")


# the index fields whose gathers and sums go through inverse tables (:mod:`.segments`), with the
# number of segments of each
_TABLE_FIELDS = {"v2e_dst": "num_tokens", "v2e_src": "num_atoms", "token_anchor": "num_atoms"}


def table_widths(hg: Hypergraph, at_least: dict[str, int] | None = None) -> dict[str, int]:
    """The inverse tables' widths for a graph compiled with ``hg``: each field's largest segment
    plus room for the segments to grow (more cross tokens) before a recompile is needed, and no
    less than ``at_least`` (the widths of the graph it replaces: two token lists that outgrow each
    other's tables in different fields then share one graph instead of recompiling in turn)."""
    out = {}
    for field, size in _TABLE_FIELDS.items():
        m = max_segment(getattr(hg, field), getattr(hg, size))
        out[field] = max(m + max(2, m // 4), (at_least or {}).get(field, 0))
    return out


def make_tables(hg: Hypergraph, widths: dict[str, int]) -> tuple[Tensor, ...] | None:
    """The inverse tables of ``hg``'s index fields at ``widths`` (:func:`.segments.inverse_table`),
    in ``_TABLE_FIELDS`` order; None if a segment outgrew its width."""
    out = []
    for field, width in widths.items():
        try:
            out.append(inverse_table(getattr(hg, field), getattr(hg, _TABLE_FIELDS[field]), width))
        except SegmentOverflow:
            return None
    return tuple(out)


def _inputs(hg: Hypergraph, tables: tuple[Tensor, ...] = ()) -> tuple[Tensor, ...]:
    """The compiled graph's inputs taken from ``hg`` as they are: ``(positions, *indices, *tables)``."""
    return (hg.positions,) + tuple(getattr(hg, f) for f in _INDEX_FIELDS) + tuple(tables)


class CompiledEnergyForces:
    """``energy_and_forces(model, hg)`` through a compiled graph, one per molecule (same elements
    and batch; any token lists whose segments fit its inverse tables, if it has them).

    ``model``: an inference model (no parameter needs a gradient) on the CPU or a CUDA device
    (Triton kernels there; the calculator replays the compiled graph from a CUDA graph). Call with a
    hypergraph: returns total energies (G,) eV, forces (N, 3) eV/Å and per-atom energies (N,) eV.
    ``compilations`` counts the graphs compiled so far. ``unroll_products``: trace the per-edge
    Clebsch-Gordan products as element-wise sums (:func:`.fused.unrolled_products`; default on the
    CPU) or as the eager path's batched matmuls (default on CUDA). ``inductor_options``: passed to
    ``torch.compile(options=...)`` over the device's defaults (:data:`CPU_INDUCTOR_OPTIONS` on the
    CPU, none on CUDA), e.g. ``{"freezing": True}`` or ``{"cpp_wrapper": False}``; for A/B timing in
    ``benchmarks/bench_compiled.py``. ``segment_tables``: gather and sum along the index lists
    through inverse tables (:mod:`.segments`, no scatter-add of features; default on the CPU, where
    it was measured 1.06-1.07x faster per paper-preset call) or through ATen's ``index_select`` /
    ``index_add`` (default on CUDA). The index tensors of a hypergraph passed in must not be
    changed in place afterwards: the tables of the last ones are kept by identity.
    ``matmul_dtype``: e.g. ``torch.bfloat16``: the linear maps' matrix products traced in that type
    (:func:`.fused.matmul_dtype`; opt-in, not the model's numbers: ``benchmarks/README.md`` gives
    the speed and the force error); None (default): the model's dtype.
    """

    def __init__(self, model: SE3SetModel, max_graphs: int = 4, unroll_products: bool | None = None,
                 inductor_options: dict | None = None, segment_tables: bool | None = None,
                 matmul_dtype: torch.dtype | None = None):
        self.device = next(model.parameters()).device
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"compiled energy + forces is implemented for the CPU and CUDA, not {self.device}")
        if any(p.requires_grad for p in model.parameters()):
            raise ValueError("compiled energy + forces is for inference: set requires_grad_(False) on the parameters")
        self.model = model
        self.matmul_dtype = matmul_dtype
        # measured on the CPU (benchmarks/bench_compiled.py); on CUDA not yet, so it keeps the
        # layout whose H100 figures are recorded
        self.unroll_products = self.device.type == "cpu" if unroll_products is None else unroll_products
        # gathers and segment sums through inverse tables, no scatter-add (see .segments): measured
        # on the CPU; on CUDA the tables would be rebuilt outside a captured CUDA graph, not done
        self.segment_tables = self.device.type == "cpu" if segment_tables is None else segment_tables
        self._tables_for: tuple[tuple[Tensor, ...], dict[str, int], tuple[Tensor, ...]] | None = None
        self._outgrown: dict[str, int] | None = None  # the widths of a graph being replaced
        defaults = CPU_INDUCTOR_OPTIONS if self.device.type == "cpu" else {}
        self.inductor_options = {**defaults, **(inductor_options or {})} or None
        # TorchInductor's loops written for one thread (ATen's matrix products keep torch's threads)
        self._serial_loops = (self.inductor_options or {}).get("cpp.threads") == 1
        self._graphs: PerTopology[_Compiled] = PerTopology(self._compile, max_graphs, same=same_atoms)

    @property
    def compilations(self) -> int:
        return self._graphs.builds

    def _compile(self, hg: Hypergraph) -> _Compiled:
        static = hg.to(self.device, self.model.dtype)
        # per-edge CG products as element-wise sums, which Inductor fuses into its loops
        # (``unroll_products=False``: as batched matmuls, the eager layout; for A/B timing)
        with unrolled_products(self.unroll_products), matmul_dtype(self.matmul_dtype):
            return self._trace_and_compile(static)

    # symbolic sizes: one graph serves every token list of a molecule. A subclass may set False
    # (sizes traced as constants, ``dynamic=False``) to time what they cost: such a graph holds only
    # for the hypergraph it was traced with (benchmarks/bench_compiled.py, variant ``static``)
    symbolic_sizes = True

    def _trace_and_compile(self, static: Hypergraph) -> _Compiled:
        widths = table_widths(static, self._outgrown) if self.segment_tables else {}
        graph = trace_energy_and_forces(self.model, static, self.symbolic_sizes, widths)
        example = _inputs(static, make_tables(static, widths))
        fn = torch.compile(graph, dynamic=self.symbolic_sizes, fullgraph=True, options=self.inductor_options)
        with _threads_safe(self.device, self._serial_loops):
            fn(*example)  # compile now, not at the first step that uses it
        return _Compiled(fn, widths)

    def _entry_and_tables(self, hg: Hypergraph) -> tuple[_Compiled, tuple[Tensor, ...]]:
        """The compiled graph for ``hg`` (``hg`` on the model's device) and ``hg``'s inverse tables
        at its widths. The tables of the last index tensors are kept (MD: the same tensors step
        after step); a segment grown past its table's width compiles a new graph, with wider
        tables."""
        entry = self._graphs(hg)
        if not entry.widths:
            return entry, ()
        indices = tuple(getattr(hg, f) for f in _TABLE_FIELDS)
        hit = self._tables_for
        if hit is not None and hit[1] is entry.widths and all(a is b for a, b in zip(hit[0], indices)):
            return entry, hit[2]
        tables = make_tables(hg, entry.widths)
        if tables is None:
            self._graphs.discard(hg)
            self._outgrown = entry.widths
            try:
                entry = self._graphs(hg)
            finally:
                self._outgrown = None
            tables = make_tables(hg, entry.widths)
        self._tables_for = (indices, entry.widths, tables)
        return entry, tables

    def graph_inputs(self, hg: Hypergraph) -> tuple[Callable[..., tuple[Tensor, Tensor, Tensor]], tuple[Tensor, ...]]:
        """The compiled function for ``hg``'s molecule (compiled now if not yet) and its inputs
        ``(positions, *indices, *tables)`` taken from ``hg`` as they are (no copies: ``hg`` must
        be on the model's device, in its dtype). For a CUDA-graph capture (:mod:`.graphed`)."""
        entry, tables = self._entry_and_tables(hg)
        return entry.fn, _inputs(hg, tables)

    def __call__(self, hg: Hypergraph) -> tuple[Tensor, Tensor, Tensor]:
        hg = hg.to(self.device, self.model.dtype)
        entry, tables = self._entry_and_tables(hg)
        with _threads_safe(self.device, self._serial_loops):  # a call may recompile (a size guard failing)
            return entry.fn(*_inputs(hg, tables))


def trace_energy_and_forces(model: SE3SetModel, static: Hypergraph, symbolic_sizes: bool = True,
                            widths: dict[str, int] | None = None) -> torch.fx.GraphModule:
    """The ATen graph of ``energy_and_forces(model, g, training=False)`` for hypergraphs ``g`` of
    ``static``'s atoms: inputs ``(positions (N, 3), *indices, *tables)`` (the index fields in
    ``_INDEX_FIELDS`` order, their lengths symbols if ``symbolic_sizes``; then, for each field in
    ``widths``, its inverse table of that width, :func:`make_tables`), outputs energies (G,),
    forces (N, 3), per-atom energies (N,). With tables the network's gathers and segment sums along
    those fields are gathers only (:func:`.fused.inverse_tables`); the graph then holds for tables
    of exactly these widths. What :class:`CompiledEnergyForces` compiles; traced within the
    caller's :func:`.fused.unrolled_products` setting. ``static`` on the model's device, in its
    dtype."""
    import torch.fx.experimental._config as fx_config
    from torch.fx.experimental.proxy_tensor import make_fx

    # one eager call first: it checks the elements and fills the model's caches (Clebsch-Gordan
    # tensors and their non-zero entries, scaled frozen weights), none of which may happen
    # while tracing
    energy_and_forces(model, static, training=False)

    widths = widths or {}

    def call(pos: Tensor, *inputs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        indices, tables = inputs[:len(_INDEX_FIELDS)], inputs[len(_INDEX_FIELDS):]
        g = Hypergraph(numbers=static.numbers, positions=pos, batch=static.batch,
                       num_graphs=static.num_graphs, **dict(zip(_INDEX_FIELDS, indices)))
        with inverse_tables(dict(zip(widths, tables))):
            energy, forces, e_atom = energy_and_forces(model, g, training=False)
        return energy.detach(), forces.detach(), e_atom.detach()

    example = _inputs(static, make_tables(static, widths))
    # no duck sizing: two index lists that happen to have the same length must not be
    # assumed to have it always
    with no_host_sync(), fx_config.patch(use_duck_shape=False):
        graph = make_fx(call, tracing_mode="symbolic" if symbolic_sizes else "fake",
                        _allow_non_fake_inputs=True)(*example)
    if symbolic_sizes:
        _check_sizes_symbolic(graph)
        _numels_as_sizes(graph)
    _no_scalar_constants(graph)
    return graph


def _numels_as_sizes(graph: torch.fx.GraphModule) -> None:
    """Rewrite the traced graph's ``aten.sym_numel`` nodes, which ``torch.compile`` cannot trace
    when the element count turned out constant (an inverse table's rows = the atoms, once the
    tracer equated them): a constant count becomes the number, a 1-D tensor's count its
    ``sym_size``."""
    changed = False
    for node in list(graph.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.sym_numel.default:
            continue
        val = node.meta.get("val")
        if isinstance(val, torch.SymInt):
            expr = val.node.shape_env.replace(val.node.expr)
            val = int(expr) if expr.is_number else val
        if isinstance(val, int):
            node.replace_all_uses_with(val)
        else:
            (x,) = node.args
            if x.meta["val"].dim() != 1:
                continue
            with graph.graph.inserting_before(node):
                size = graph.graph.call_function(torch.ops.aten.sym_size.int, (x, 0))
            size.meta["val"] = node.meta["val"]
            node.replace_all_uses_with(size)
        graph.graph.erase_node(node)
        changed = True
    if changed:
        graph.graph.lint()
        graph.recompile()


def _no_scalar_constants(graph: torch.fx.GraphModule) -> None:
    """Hold the traced graph's 0-d tensor constants (the model's average degrees and energy scale)
    as 1-element tensors viewed as 0-d. ``torch.compile(dynamic=True)`` reads a 0-d constant as an
    unspecialised float, which TorchInductor then specialises by restarting the whole trace: one
    more Dynamo trace and AOT pass per compile. Cold DHA compiles on two cores: 278 s against
    348 s with the restart at the tiny preset, 730 s against 1016 s at the paper preset (the
    restart ~6 min in; ``bench_compiled.py``, variant ``scalar-constants``). The same kernels,
    the same numbers to the bit."""
    changed = False
    for node in list(graph.graph.nodes):
        if node.op != "get_attr":
            continue
        value = getattr(graph, node.target)
        if not isinstance(value, Tensor) or value.dim() != 0:
            continue
        name = f"{node.target}_as_1d"
        graph.register_buffer(name, value.reshape(1).clone())
        with graph.graph.inserting_before(node):
            held = graph.graph.get_attr(name)
            view = graph.graph.call_function(torch.ops.aten.view.default, (held, []))
        if "val" in node.meta:
            view.meta["val"] = node.meta["val"]
        node.replace_all_uses_with(view)
        graph.graph.erase_node(node)
        changed = True
    if changed:
        graph.graph.lint()
        graph.recompile()


@contextmanager
def dynamo_restarts() -> Iterator[list[str]]:
    """Within the block, Dynamo's "Restarting analysis" messages, collected into the list it
    yields: each one is a whole trace of the graph done again (see :func:`_no_scalar_constants`).
    For tests and ``benchmarks/bench_compiled.py``."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("Restarting analysis"):
                messages.append(record.getMessage())

    logger, handler = logging.getLogger("torch._dynamo.convert_frame"), Collect(logging.INFO)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@contextmanager
def _threads_safe(device: torch.device, serial_loops: bool = False) -> Iterator[None]:
    """With more than one torch thread, hold ``torch.use_deterministic_algorithms(True)`` (warn
    only) so that TorchInductor leaves scatter/index-put accumulations to ATen instead of writing
    vectorised atomic adds it cannot generate; with one thread (plain stores, no atomics) nothing
    changes, nor on CUDA (Triton's atomics are fine there). The previous setting is restored on exit."""
    if device.type != "cpu" or torch.get_num_threads() == 1 or serial_loops:
        yield
        return
    was_on = torch.are_deterministic_algorithms_enabled()
    was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_on, warn_only=was_warn)


def _check_sizes_symbolic(graph) -> None:
    """Raise if tracing fixed the length of an index input (a Python ``int()`` of a size in the
    network): the graph would then be wrong for other token lists."""
    placeholders = [n for n in graph.graph.nodes if n.op == "placeholder"]
    for name, node in zip(_INDEX_FIELDS, placeholders[1:]):
        size = node.meta["val"].shape[0]
        if not isinstance(size, torch.SymInt) or size.node.expr.is_number or \
                size.node.shape_env.replace(size.node.expr).is_number:
            raise RuntimeError(f"tracing fixed the length of {name}: the compiled graph would hold "
                               "only for this token list")
