"""`se3set-ase info`: what this installation runs on."""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import platform


def _version(module: str, dist: str | None = None) -> str:
    try:
        mod = importlib.import_module(module)
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return "not installed"
    try:
        return importlib.metadata.version(dist or module)
    except importlib.metadata.PackageNotFoundError:
        return getattr(mod, "__version__", "installed")


def collect() -> dict[str, str]:
    import torch

    from . import __version__

    cuda = torch.cuda.is_available()
    return {
        "se3set-ase": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "e3nn": _version("e3nn"),
        "ase": _version("ase"),
        "rdkit": _version("rdkit"),
        "numpy": _version("numpy"),
        "h5py": _version("h5py"),
        "torch-cluster": _version("torch_cluster", "torch-cluster") + " (optional; not needed by any feature)",
        "tblite": _version("tblite"),
        "cuda available": str(cuda),
        "cuda devices": ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) if cuda else "-",
        "cpu threads": str(torch.get_num_threads()),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def main(args: argparse.Namespace) -> int:
    for k, v in collect().items():
        print(f"{k:>15}: {v}")
    return 0
