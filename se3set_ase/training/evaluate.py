"""`se3set-ase eval MODEL DATA`: energy and force errors of a model file on labelled frames."""
from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model file or shipped name")
    p.add_argument("data", help="labelled frames (any format `fit` reads)")
    p.add_argument("--energy-key"), p.add_argument("--forces-key")
    p.add_argument("--index", default=":", help="frames to use, e.g. ':100' or '::10'")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--json", action="store_true", help="print metrics as JSON")


def evaluate_file(model_name: str, data: str, energy_key=None, forces_key=None, index=":",
                  device="auto", dtype="float64", batch_size: int = 16) -> dict[str, float]:
    import torch

    from ..calculator import pick_device
    from ..data import read_frames
    from ..fragment import Fragmenter
    from ..model import load_model
    from ..registry import resolve_model
    from .cache import build_graphs
    from .metrics import evaluate

    dt = {"float32": torch.float32, "float64": torch.float64}[dtype]
    dev = pick_device(device)
    model, _ = load_model(resolve_model(model_name), dtype=dt, device=dev)
    frames = read_frames(data, energy_key=energy_key, forces_key=forces_key, index=index)
    pins = Fragmenter.for_model(model).fragmentations()
    return evaluate(model, build_graphs(frames, model.config.fragment, pinned=pins), batch_size, dev, dt)


def main(args: argparse.Namespace) -> int:
    from .metrics import format_table

    m = evaluate_file(args.model, args.data, args.energy_key, args.forces_key, args.index,
                      args.device, args.dtype, args.batch_size)
    print(json.dumps(m, indent=1) if args.json else format_table({"data": m}))
    return 0
