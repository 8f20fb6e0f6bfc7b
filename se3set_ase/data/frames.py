"""`Frame`: one labelled (or unlabelled) structure in eV and eV/Å, the unit every reader yields."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Frame"]

_DEFAULT_ENERGY_KEYS = ("energy",)
_DEFAULT_FORCES_KEYS = ("forces",)


@dataclass
class Frame:
    """One structure: atomic numbers, positions (Å), energy (eV), forces (eV/Å), total charge.

    `energy`/`forces` are None for unlabelled frames. `info` holds free-form metadata
    (source file, frame index, extxyz info keys...)."""

    numbers: np.ndarray
    positions: np.ndarray
    energy: float | None = None
    forces: np.ndarray | None = None
    charge: int = 0
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.numbers = np.asarray(self.numbers, dtype=np.int64).reshape(-1)
        self.positions = np.asarray(self.positions, dtype=np.float64).reshape(-1, 3)
        if self.energy is not None:
            self.energy = float(np.asarray(self.energy, dtype=np.float64).reshape(()))
        if self.forces is not None:
            self.forces = np.asarray(self.forces, dtype=np.float64).reshape(-1, 3)
        self.charge = int(self.charge)

    def __len__(self) -> int:
        return int(self.numbers.shape[0])

    @property
    def has_labels(self) -> bool:
        return self.energy is not None and self.forces is not None

    def to_atoms(self):
        """ase.Atoms; energy/forces (when present) on a SinglePointCalculator."""
        from ase import Atoms
        from ase.calculators.singlepoint import SinglePointCalculator

        atoms = Atoms(numbers=self.numbers.copy(), positions=self.positions.copy())
        atoms.info.update({k: v for k, v in self.info.items()})
        if self.charge:
            atoms.info["charge"] = self.charge
        if self.energy is not None or self.forces is not None:
            results: dict[str, Any] = {}
            if self.energy is not None:
                results["energy"] = self.energy
            if self.forces is not None:
                results["forces"] = self.forces.copy()
            atoms.calc = SinglePointCalculator(atoms, **results)
        return atoms

    @classmethod
    def from_atoms(cls, atoms, energy_key: str | None = None, forces_key: str | None = None) -> "Frame":
        """Frame from ase.Atoms.

        With `energy_key`/`forces_key` the labels come from `atoms.info[energy_key]` /
        `atoms.arrays[forces_key]` (falling back to the calculator only when the key is
        "energy"/"forces", which ASE moves onto a SinglePointCalculator when reading extxyz).
        Without keys: `info["energy"]` / `arrays["forces"]`, then the calculator results.
        A missing label gives None (the readers decide whether that is an error)."""
        info = dict(atoms.info)
        energy = _find_energy(atoms, energy_key)
        forces = _find_forces(atoms, forces_key)
        charge = info.pop("charge", info.pop("total_charge", 0))
        try:
            charge = int(round(float(charge)))
        except (TypeError, ValueError):
            charge = 0
        info.pop(energy_key or "energy", None)
        return cls(
            numbers=atoms.get_atomic_numbers(),
            positions=atoms.get_positions(),
            energy=energy,
            forces=forces,
            charge=charge,
            info=info,
        )


def _calc_results(atoms) -> dict:
    calc = getattr(atoms, "calc", None)
    if calc is None:
        return {}
    return dict(getattr(calc, "results", {}) or {})


def _find_energy(atoms, key: str | None):
    keys = (key,) if key else _DEFAULT_ENERGY_KEYS
    for k in keys:
        if k in atoms.info and atoms.info[k] is not None:
            return float(atoms.info[k])
    if key in (None, "energy"):
        res = _calc_results(atoms)
        for k in ("energy", "free_energy"):
            if res.get(k) is not None:
                return float(res[k])
    return None


def _find_forces(atoms, key: str | None):
    keys = (key,) if key else _DEFAULT_FORCES_KEYS
    for k in keys:
        if k in atoms.arrays:
            return np.array(atoms.arrays[k], dtype=np.float64)
    if key in (None, "forces"):
        res = _calc_results(atoms)
        if res.get("forces") is not None:
            return np.array(res["forces"], dtype=np.float64)
    return None


def available_keys(atoms) -> str:
    """Human-readable list of the label candidates in an Atoms (for error messages)."""
    calc = sorted(_calc_results(atoms))
    return (f"info keys {sorted(atoms.info)}, per-atom arrays {sorted(atoms.arrays)}, "
            f"calculator results {calc}")
