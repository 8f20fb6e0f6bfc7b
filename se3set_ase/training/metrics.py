"""Errors of a model on labelled hypergraphs, and the per-sample loss.

Units: energies eV, forces eV/Å in, metrics reported in meV, meV/atom and meV/Å. Force MAE/RMSE
are over Cartesian components (the MD17/MD22 literature convention).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..hypergraph import collate
from ..model import energy_and_forces
from .cache import LabelledGraphs


@dataclass
class Batch:
    graph: object  # Hypergraph on the device
    energy: torch.Tensor  # (B,) eV, float64
    forces: torch.Tensor  # (N, 3) eV/Å
    n_atoms: torch.Tensor  # (B,)


def make_batch(data: LabelledGraphs, idx, device, dtype) -> Batch:
    idx = [int(i) for i in idx]
    hg = collate([data.graphs[i] for i in idx]).to(device, dtype)
    energy = torch.as_tensor(data.energies[idx], dtype=torch.float64, device=device)  # float64 always
    forces = torch.as_tensor(np.concatenate([data.forces[i] for i in idx]), dtype=dtype, device=device)
    n_atoms = torch.tensor([data.graphs[i].num_atoms for i in idx], device=device)
    return Batch(hg, energy, forces, n_atoms)


def per_sample_loss(e_pred, f_pred, b: Batch, energy_weight: float, forces_weight: float) -> torch.Tensor:
    """w_E ((E - E_ref)/N)^2 + w_F mean_{atoms, xyz} (F - F_ref)^2 per molecule, shape (B,)."""
    e_term = ((e_pred - b.energy) / b.n_atoms) ** 2
    sq = ((f_pred - b.forces) ** 2).sum(-1)
    f_term = sq.new_zeros(e_term.shape).index_add(0, b.graph.batch, sq) / (3 * b.n_atoms)
    return energy_weight * e_term + forces_weight * f_term


#: evaluation batches hold at most this many atoms: a batch's autograd graph is held at once, and
#: validating 16 frames of the 370-atom nanotube took a training process from 5 to 14 GB
EVAL_MAX_ATOMS = 1024


def eval_batches(n_atoms, batch_size: int, max_atoms: int = EVAL_MAX_ATOMS) -> list[range]:
    """Consecutive frame ranges of at most ``batch_size`` frames and ``max_atoms`` atoms (a frame
    larger than ``max_atoms`` is a batch of its own)."""
    out, start, atoms = [], 0, 0
    for i, n in enumerate(int(n) for n in n_atoms):
        if i > start and (i - start >= batch_size or atoms + n > max_atoms):
            out.append(range(start, i))
            start, atoms = i, 0
        atoms += n
    if len(n_atoms) > start:
        out.append(range(start, len(n_atoms)))
    return out


@dataclass
class FrameErrors:
    """Prediction minus reference, frame by frame (CPU, float64).

    ``energy``: (F,) eV; ``n_atoms``: (F,); ``forces``: F tensors of shape (n_i, 3), eV/Å."""
    energy: torch.Tensor
    n_atoms: torch.Tensor
    forces: list[torch.Tensor]

    def forces_mae(self) -> np.ndarray:
        """(F,) mean |ΔF| over each frame's Cartesian components, eV/Å."""
        return np.array([f.abs().mean().item() for f in self.forces])

    def forces_rmse(self) -> np.ndarray:
        """(F,) root mean square ΔF over each frame's Cartesian components, eV/Å."""
        return np.array([f.pow(2).mean().sqrt().item() for f in self.forces])


def frame_errors(model, data: LabelledGraphs, batch_size: int, device, dtype,
                 max_atoms: int = EVAL_MAX_ATOMS) -> FrameErrors:
    """Energy and force errors of ``model`` on each frame of ``data``, evaluated in batches of at
    most ``batch_size`` frames and ``max_atoms`` atoms (the errors do not depend on the batching)."""
    de, n_atoms, df = [], [], []
    for idx in eval_batches([g.num_atoms for g in data.graphs], batch_size, max_atoms):
        b = make_batch(data, idx, device, dtype)
        e, f, _ = energy_and_forces(model, b.graph, training=False)
        de.append((e.detach() - b.energy).double().cpu())
        n_atoms.append(b.n_atoms.cpu())
        df += list(torch.split((f.detach() - b.forces).double().cpu(), b.n_atoms.tolist()))  # atoms in frame order
    return FrameErrors(torch.cat(de), torch.cat(n_atoms), df)


def summarize(errors: FrameErrors) -> dict[str, float]:
    """MAE and RMSE of energy (meV, meV/atom) and forces (meV/Å, over all Cartesian components)."""
    de, df = errors.energy, torch.cat([f.flatten() for f in errors.forces])
    de_atom = de / errors.n_atoms
    return {
        "energy_mae_meV": 1000 * de.abs().mean().item(),
        "energy_rmse_meV": 1000 * de.pow(2).mean().sqrt().item(),
        "energy_mae_meV_per_atom": 1000 * de_atom.abs().mean().item(),
        "forces_mae_meV_A": 1000 * df.abs().mean().item(),
        "forces_rmse_meV_A": 1000 * df.pow(2).mean().sqrt().item(),
        "n_frames": len(de),
    }


def evaluate(model, data: LabelledGraphs, batch_size: int, device, dtype,
             max_atoms: int = EVAL_MAX_ATOMS) -> dict[str, float]:
    """Energy and force errors of ``model`` on ``data`` (``summarize`` of ``frame_errors``)."""
    if len(data) == 0:
        return {}
    return summarize(frame_errors(model, data, batch_size, device, dtype, max_atoms))


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """Metrics of several sets as a fixed-width table."""
    cols = [("energy_mae_meV", "E MAE meV"), ("energy_mae_meV_per_atom", "meV/atom"),
            ("energy_rmse_meV", "E RMSE meV"), ("forces_mae_meV_A", "F MAE meV/Å"),
            ("forces_rmse_meV_A", "F RMSE meV/Å"), ("n_frames", "frames")]
    lines = [f"{'set':<8}" + "".join(f"{h:>14}" for _, h in cols)]
    for name, m in rows.items():
        if m:
            lines.append(f"{name:<8}" + "".join(
                f"{m[k]:>14.0f}" if k == "n_frames" else f"{m[k]:>14.3f}" for k, _ in cols))
    return "\n".join(lines)
