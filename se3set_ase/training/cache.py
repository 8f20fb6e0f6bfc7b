"""Frames -> hypergraphs, once, cached in an HDF5 file.

Fragmentation runs once per bond topology (the :class:`~se3set_ase.fragment.Fragmenter` cache);
the per-frame index tensors are stored flat with offsets in ``<data>.se3set-<key>.h5`` next to the
data file (or in ``$SE3SET_CACHE_DIR``, or ``$XDG_CACHE_HOME/se3set_ase/hypergraphs`` when the
data folder is not writable).
The key hashes the data file (path, size, mtime), the label keys, the fragmentation settings and
the cache layout version, so a changed file or setting builds a new cache and an unchanged one is
reused.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np
import torch

from ..data import Frame
from ..fragment import Fragmenter, FragmentSettings
from ..fragment.cache import _pin_key
from ..hypergraph import Hypergraph

log = logging.getLogger("se3set_ase")
CACHE_VERSION = 1
_FIELDS = ("token_anchor", "token_edge", "token_switched", "v2e_src", "v2e_dst")


@dataclass
class LabelledGraphs:
    """Hypergraphs (float64 positions) with energies (G,) eV and forces list of (N_i, 3) eV/Å."""

    graphs: list[Hypergraph]
    energies: np.ndarray
    forces: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.graphs)

    def subset(self, idx: Sequence[int]) -> "LabelledGraphs":
        idx = [int(i) for i in idx]
        return LabelledGraphs([self.graphs[i] for i in idx], self.energies[idx], [self.forces[i] for i in idx])


def build_graphs(frames: Sequence[Frame], settings: FragmentSettings, progress: bool = False,
                 pinned: Sequence = ()) -> LabelledGraphs:
    """Fragment every frame (RDKit work once per topology; ``pinned`` fragmentations are used
    for their topologies whatever the geometry, see :class:`Fragmenter`)."""
    from tqdm import tqdm

    fragmenter = Fragmenter(settings, cache_size=max(256, len(frames)), pinned=pinned)  # no eviction: one decision per topology
    graphs = [fragmenter(f.numbers, f.positions, charge=f.charge)
              for f in tqdm(frames, desc="fragmenting", disable=not progress, leave=False)]
    energies = np.array([np.nan if f.energy is None else f.energy for f in frames], dtype=np.float64)
    forces = [np.full((len(f), 3), np.nan) if f.forces is None else f.forces for f in frames]
    return LabelledGraphs(graphs, energies, forces)


def cache_key(source: str | os.PathLike, settings: FragmentSettings, extra: dict | None = None) -> str:
    p = Path(source)
    st = p.stat()
    blob = json.dumps({"path": str(p.resolve()), "size": st.st_size, "mtime": st.st_mtime_ns,
                       "settings": settings.to_dict(), "extra": extra or {}, "version": CACHE_VERSION},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_path(source: str | os.PathLike, key: str) -> Path:
    """Next to the data file; in ``$SE3SET_CACHE_DIR`` when set, or in the user cache folder
    when the data folder is not writable (by access or by its mode bits: root may write into a
    read-only folder, but a folder marked read-only is not the place for a cache)."""
    p = Path(source)
    if os.environ.get("SE3SET_CACHE_DIR"):
        return Path(os.environ["SE3SET_CACHE_DIR"]) / f"{p.name}.se3set-{key}.h5"
    if os.access(p.parent, os.W_OK) and p.parent.stat().st_mode & 0o222:
        return p.parent / f"{p.name}.se3set-{key}.h5"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "se3set_ase" / "hypergraphs"
    return base / f"{p.name}.se3set-{key}.h5"


def save_h5(path: Path, data: LabelledGraphs, key: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as h:
            h.attrs["key"] = key
            h.attrs["version"] = CACHE_VERSION
            g = data.graphs
            h["numbers"] = np.concatenate([x.numbers.numpy() for x in g])
            h["positions"] = np.concatenate([x.positions.double().numpy() for x in g])
            h["forces"] = np.concatenate(data.forces)
            h["energies"] = data.energies
            h["n_atoms"] = np.array([x.num_atoms for x in g])
            h["n_tokens"] = np.array([x.num_tokens for x in g])
            h["n_edges"] = np.array([int(x.v2e_src.shape[0]) for x in g])
            for name in _FIELDS:
                h[name] = np.concatenate([getattr(x, name).numpy() for x in g])
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_h5(path: Path, key: str) -> LabelledGraphs | None:
    try:
        with h5py.File(path, "r") as h:
            if h.attrs.get("key") != key or int(h.attrs.get("version", -1)) != CACHE_VERSION:
                return None
            arr = {k: h[k][()] for k in h.keys()}
    except OSError:
        return None
    ca = np.concatenate([[0], np.cumsum(arr["n_atoms"])])
    ct = np.concatenate([[0], np.cumsum(arr["n_tokens"])])
    ce = np.concatenate([[0], np.cumsum(arr["n_edges"])])
    graphs, forces = [], []
    t = torch.from_numpy
    for i in range(len(arr["n_atoms"])):
        a, b = ca[i], ca[i + 1]
        graphs.append(Hypergraph(
            numbers=t(arr["numbers"][a:b]).long(), positions=t(arr["positions"][a:b]).double(),
            token_anchor=t(arr["token_anchor"][ct[i]:ct[i + 1]]).long(),
            token_edge=t(arr["token_edge"][ct[i]:ct[i + 1]]).long(),
            token_switched=t(arr["token_switched"][ct[i]:ct[i + 1]]).bool(),
            v2e_src=t(arr["v2e_src"][ce[i]:ce[i + 1]]).long(),
            v2e_dst=t(arr["v2e_dst"][ce[i]:ce[i + 1]]).long(),
            batch=torch.zeros(b - a, dtype=torch.long), num_graphs=1))
        forces.append(arr["forces"][a:b])
    return LabelledGraphs(graphs, arr["energies"], forces)


MAX_REFERENCES = 16


def training_fragmentations(frames: Sequence[Frame], settings: FragmentSettings,
                            reference_indices: Sequence[int] | None = None,
                            max_references: int = MAX_REFERENCES) -> list:
    """The fragmentations :func:`build_graphs` freezes for ``frames`` (one per bond topology,
    decided at its first frame in file order), as :class:`Fragmentation` objects.

    Their reference geometries (what puts a pin onto another atom order, see
    :mod:`se3set_ase.fragment.match`): up to ``max_references`` of the frames listed in
    ``reference_indices`` (the training split) that have the topology, evenly spaced in file
    order; the deciding frame where none has it or no indices are given."""
    fragmenter = Fragmenter(settings, cache_size=max(256, len(frames)))
    keys = []
    for f in frames:
        fragmenter.fragmentation(f.numbers, f.positions, charge=f.charge)
        keys.append(fragmenter._last_key)
    pins = fragmenter.fragmentations()
    if reference_indices is None:
        return pins
    out = []
    for pin in pins:
        key = _pin_key(pin)
        idx = sorted(int(i) for i in reference_indices if keys[int(i)] == key)
        if idx:
            pick = np.unique(np.round(np.linspace(0, len(idx) - 1, min(max_references, len(idx)))).astype(int))
            pin = pin.with_references(np.stack([np.asarray(frames[idx[k]].positions, dtype=np.float64) for k in pick]))
        out.append(pin)
    return out


def cached_graphs(source: str | os.PathLike, frames: Sequence[Frame], settings: FragmentSettings,
                  extra: dict | None = None, progress: bool = False,
                  pinned: Sequence = ()) -> tuple[LabelledGraphs, Path, bool]:
    """Hypergraphs of ``frames`` read from ``source``; returns (graphs, cache file, reused?).

    ``pinned``: fragmentations to use for their topologies (e.g. a training set's, for a
    separate validation file); they are part of the cache key."""
    if pinned:
        extra = dict(extra or {}, pinned=[f.to_dict() for f in pinned])
    key = cache_key(source, settings, extra)
    path = cache_path(source, key)
    if path.is_file():
        data = load_h5(path, key)
        if data is not None and len(data) == len(frames):
            log.info("reused hypergraph cache %s", path)
            return data, path, True
    data = build_graphs(frames, settings, progress, pinned=pinned)
    save_h5(path, data, key)
    log.info("wrote hypergraph cache %s (%d frames)", path, len(data))
    return data, path, False
