"""`SE3SetCalculator`: an ASE calculator for SE3Set models. Atoms in, eV and eV/Å out.

    from se3set_ase import SE3SetCalculator
    atoms.calc = SE3SetCalculator("md17_aspirin.pt")      # shipped name, path, or model object
    atoms.get_potential_energy(), atoms.get_forces()

Each call fragments the Atoms into the model's hypergraph. The fragmentation (RDKit bond
perception, groups, kernels, overlaps) is cached per bond topology, so an MD step only rebuilds
index tensors; if the bond topology changes (a bond breaks or forms) the molecule is re-fragmented
and a warning is issued, because the potential energy surface is then discontinuous.
"""
from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes

from .fragment import Fragmenter
from .model import SE3SetModel, energy_and_forces, load_model
from .model.compiled import CompiledEnergyForces
from .model.fused import matmul_dtype as _products_in
from .model.graphed import GraphedEnergyForces
from .registry import resolve_model


class TopologyChangeWarning(UserWarning):
    """The bond topology of the structure changed between two calls."""


def pick_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class SE3SetCalculator(Calculator):
    """SE3Set potential for isolated molecules.

    Parameters
    ----------
    model: a shipped model name (``"md17_aspirin.pt"``), a path, or an :class:`SE3SetModel`.
    device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
    dtype: ``torch.float32`` (default on CUDA) or ``torch.float64`` (default on CPU; needed for
        tight energy conservation checks).
    charge: total charge for bond perception; default ``atoms.info["charge"]`` or 0.
    cuda_graph: replay energy + forces from a CUDA graph captured once per hypergraph topology
        (:mod:`se3set_ase.model.graphed`); default True on CUDA. Same numbers, several times
        faster for molecules of up to a few hundred atoms, where launching kernels sets the time.
    compile: trace energy + forces once per molecule (the token lists are inputs of symbolic
        size, so neither the Verlet list nor a re-fragmentation needs a new graph; on the CPU only
        a segment outgrowing the room of its inverse table, e.g. an atom in many more tokens, does)
        and compile them
        with TorchInductor (:mod:`se3set_ase.model.compiled`); default False. On the CPU 2.4-4.6x
        as fast per float32 call (paper and small presets, DHA, two cores; float64 gains less); on
        CUDA the compiled graph is what the CUDA graph replays (fewer, fused kernels: small preset,
        DHA, on an H100: 4.7 ms per call against 8.2). Same numbers to rounding,
        but the first compile takes minutes (well under one when TorchInductor's disk cache has
        it): for MD or optimisation of one molecule.
    skin: Verlet skin (Å) of the implicit cross tokens (``Fragmenter``): the token list, hence the
        CUDA graph, is kept until an atom has moved skin/2. Default 1.0 with CUDA graphs or
        ``compile`` (there it saves rebuilding the index tensors), else 0. Energies and forces do
        not depend on it.
    hysteresis: bond perception along the trajectory the calculator sees (default True): a bond
        of the previous call holds up to 1.3 x the covalent radii sum, a new one forms only below
        1.1 x (``Fragmenter(hysteresis=...)``), so thermal fluctuations near the threshold do not
        re-fragment the molecule (the energy would jump there). False: each call's bonds from its
        geometry alone, as the training data were fragmented (the two differ only for pairs
        between the two thresholds).
    matmul_dtype: ``torch.bfloat16``: the network's linear maps multiply in bfloat16 (inputs and
        weights rounded, accumulated in float32 by the backend; :func:`.model.fused.matmul_dtype`),
        forward and forces alike. Opt-in and not the model's numbers: on the shipped ``gfn2_dha``
        model the forces move by 3.5 meV/Å on average (its test MAE is 21 meV/Å); worth it only
        where the hardware multiplies bfloat16 faster (``benchmarks/README.md``: speed and error
        measured). Default None: the products in ``dtype``.

    Results: ``energy``/``free_energy`` (eV), ``forces`` (eV/Å), ``energies`` (per atom, eV).
    """

    implemented_properties = ["energy", "free_energy", "forces", "energies"]

    def __init__(self, model: str | os.PathLike | SE3SetModel, device: str | torch.device = "auto",
                 dtype: torch.dtype | None = None, charge: int | None = None,
                 cuda_graph: bool | None = None, compile: bool = False, skin: float | None = None,
                 hysteresis: bool = True, matmul_dtype: torch.dtype | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        if matmul_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"matmul_dtype must be None, torch.bfloat16 or torch.float16, not {matmul_dtype!r}")
        self.matmul_dtype = matmul_dtype
        self.device = pick_device(device)
        if compile and self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"compile=True is implemented for the CPU and CUDA, not {self.device}")
        if dtype is None:
            dtype = torch.float32 if self.device.type == "cuda" else torch.float64
        self.dtype = dtype
        if isinstance(model, SE3SetModel):
            self.model, self.metadata = model, {}
            if model.dtype != dtype:
                raise ValueError(f"model is {model.dtype} but dtype={dtype} was asked for; "
                                 "build the model in that dtype or pass dtype=None")
            self.model = model.to(self.device).eval()
        else:
            self.model_path = resolve_model(model)
            self.model, self.metadata = load_model(self.model_path, dtype=dtype, device=self.device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.charge = charge
        if cuda_graph is None:
            cuda_graph = self.device.type == "cuda"
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a CUDA device, not {self.device}")
        self.compiled = CompiledEnergyForces(self.model, matmul_dtype=matmul_dtype) if compile else None
        self.graphed = GraphedEnergyForces(self.model, compiled=self.compiled) if cuda_graph else None
        if skin is None:
            skin = 1.0 if (cuda_graph or compile) else 0.0
        self.fragmenter = Fragmenter.for_model(self.model, skin=skin, hysteresis=hysteresis)

    def _check(self, atoms) -> None:
        if atoms is None or len(atoms) == 0:
            raise ValueError("SE3SetCalculator: the structure is empty")
        known = set(self.model.elements)
        unknown = sorted({s for s, z in zip(atoms.get_chemical_symbols(), atoms.numbers) if int(z) not in known})
        if unknown:
            from ase.data import chemical_symbols

            raise ValueError(f"elements {unknown} are not in this model; it was trained on "
                             f"{[chemical_symbols[z] for z in sorted(known)]}")

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        self._check(atoms)
        charge = self.charge if self.charge is not None else int(atoms.info.get("charge", 0))
        hg = self.fragmenter(atoms, charge=charge)
        if self.fragmenter.last_topology_changed:
            warnings.warn("SE3SetCalculator: the bond topology changed (a bond broke or formed); the "
                          "molecule was re-fragmented and the energy may jump here", TopologyChangeWarning,
                          stacklevel=2)
        energy, forces, e_atom = self._energy_and_forces(hg)
        e = float(energy.detach().sum().cpu())
        self.results = {
            "energy": e,
            "free_energy": e,
            "forces": forces.detach().cpu().numpy().astype(np.float64),
            "energies": e_atom.detach().cpu().numpy().astype(np.float64),
        }

    def _energy_and_forces(self, hg):
        with _products_in(self.matmul_dtype):  # what the eager network and a CUDA-graph capture read
            return self._through_fastest_path(hg)

    def _through_fastest_path(self, hg):
        if self.graphed is not None:
            try:
                return self.graphed(hg)
            except Exception as exc:  # noqa: BLE001
                if self.graphed.compiled is not None:  # compiling failed: replay the eager network
                    self._compile_failed(exc)
                    self.graphed = GraphedEnergyForces(self.model)
                    return self._through_fastest_path(hg)
                if not isinstance(exc, RuntimeError):
                    raise
                # a capture the installed torch/e3nn cannot record
                warnings.warn(f"SE3SetCalculator: CUDA-graph capture failed ({exc}); running without "
                              "CUDA graphs (slower, same numbers)", RuntimeWarning, stacklevel=3)
                self.graphed = None
        if self.compiled is not None:
            try:
                return self.compiled(hg)
            except Exception as exc:  # noqa: BLE001  (no C++ compiler, an operation Inductor cannot lower, ...)
                self._compile_failed(exc)
        return energy_and_forces(self.model, hg.to(self.device, self.dtype), training=False)

    def _compile_failed(self, exc: Exception) -> None:
        warnings.warn(f"SE3SetCalculator: compiling energy + forces failed ({type(exc).__name__}: "
                      f"{str(exc)[:300]}); running without compile (slower, same numbers)",
                      RuntimeWarning, stacklevel=4)
        self.compiled = None

