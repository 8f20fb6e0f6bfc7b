"""Model files: weights + JSON-able config and metadata, loadable with ``weights_only=True``.

Layout of a ``.pt`` file (a plain dict, no pickled code)::

    {"format": "se3set-ase-model", "format_version": 1,
     "config": ModelConfig.to_dict(), "metadata": {...JSON-able...},
     "state_dict": {name: tensor}}

``metadata`` holds what a user needs to trust the model: package version, elements, units
("eV", "Å"), training data, metrics. Files are written atomically (temporary file + rename).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig
from .network import SE3SetModel

FORMAT = "se3set-ase-model"
FORMAT_VERSION = 1


class ModelFileError(ValueError):
    """A model file that cannot be used: corrupt, truncated, foreign or of another version."""


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a model file is as readable as any file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def model_payload(model: SE3SetModel, metadata: dict[str, Any] | None = None,
                  dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The dict written to a model file; floating weights stored in ``dtype``."""
    from .. import __version__

    meta = {"se3set_ase_version": __version__, "elements": model.elements,
            "units": {"energy": "eV", "length": "Å", "forces": "eV/Å"}}
    meta.update(metadata or {})
    json.dumps(meta)  # fail now, not at load time, if metadata is not JSON-able
    state = {k: (v.detach().to("cpu", dtype) if v.is_floating_point() and k != "element_energy" else v.detach().cpu())
             for k, v in model.state_dict().items()}
    pins = list(getattr(model, "fragmentations", ()))
    json.dumps(pins)
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "config": model.config.to_dict(),
            "metadata": meta, "state_dict": state, "fragmentations": pins}


def save_model(model: SE3SetModel, path: str | os.PathLike, metadata: dict[str, Any] | None = None,
               dtype: torch.dtype = torch.float32) -> Path:
    atomic_torch_save(model_payload(model, metadata, dtype), path)
    return Path(path)


def read_model_file(path: str | os.PathLike) -> dict[str, Any]:
    """Load and check a model file's dict (no model built)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files
        raise ModelFileError(
            f"{path} is not a readable se3set-ase model file (truncated or corrupt?): {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelFileError(f"{path} is not an se3set-ase model file (no '{FORMAT}' header); "
                             "training checkpoints are read with `se3set-ase fit --resume`")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelFileError(f"{path} has model-file format version {version}; this se3set-ase reads "
                             f"version {FORMAT_VERSION}. Re-export it with a matching se3set-ase release.")
    for key in ("config", "metadata", "state_dict"):
        if key not in payload:
            raise ModelFileError(f"{path} lacks the '{key}' entry")
    return payload


def model_from_payload(payload: dict[str, Any], dtype: torch.dtype = torch.float32,
                       device: str | torch.device = "cpu", source: str = "model") -> SE3SetModel:
    try:
        config = ModelConfig.from_dict(payload["config"])
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"{source}: incompatible model config: {exc}") from exc
    model = SE3SetModel(config, dtype)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise ModelFileError(f"{source}: weights do not match the config: {exc}") from exc
    # the fragmentations the model was trained on (files before this entry have none): pinned by
    # Fragmenter.for_model so that a known molecule gets its training hypergraph from any geometry
    model.fragmentations = list(payload.get("fragmentations", []))
    return model.to(device).eval()


def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> tuple[SE3SetModel, dict[str, Any]]:
    """Model (in eval mode) and its metadata from a file written by :func:`save_model`."""
    payload = read_model_file(path)
    return model_from_payload(payload, dtype, device, source=str(path)), payload["metadata"]
