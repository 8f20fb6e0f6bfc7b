#!/usr/bin/env python
"""Add the training fragmentations to a model file written before they were stored.

    python models/pin_fragmentations.py models/md17_salicylic_acid.pt --data ../shared/data/md17/salicylic_acid.extxyz

``se3set-ase fit`` now stores in every model file the fragmentation it froze for each bond
topology of its data file (decided at the topology's first frame, in file order), and the
calculator pins them (``Fragmenter.for_model``). For an older file this script recomputes exactly
those fragmentations from the same data file (``se3set_ase.training.cache.training_fragmentations``:
the same frames, order and settings as training) and writes them into the file; weights, config
and metadata are untouched. The data file must be the one the model was trained on (checked by name
against the model's metadata). Refuses a file that already has them unless they are identical.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="model file (.pt)")
    p.add_argument("--data", required=True, help="the training data file")
    args = p.parse_args(argv)

    from se3set_ase.data import read_frames
    from se3set_ase.fragment import Fragmentation, FragmentSettings
    from se3set_ase.model.checkpoint import atomic_torch_save, read_model_file
    from se3set_ase.training.cache import training_fragmentations

    path = Path(args.model)
    payload = read_model_file(path)
    trained_on = Path(payload["metadata"].get("training", {}).get("data", ""))
    if trained_on.name != Path(args.data).name:
        sys.exit(f"--data {args.data} is not the file {path.name} was trained on ({trained_on})")
    settings = FragmentSettings.from_dict(payload["config"]["fragment"])
    frags = training_fragmentations(read_frames(args.data), settings)
    pins = [f.to_dict() for f in frags]
    old = payload.get("fragmentations")
    if old:
        # Fragmentation equality ignores reference geometries (models/add_references.py adds those)
        if [Fragmentation.from_dict(d, settings) for d in old] == frags:
            print(f"{path}: already pins these {len(pins)} fragmentation(s)")
            return 0
        sys.exit(f"{path} already pins other fragmentations; not overwritten")
    payload["fragmentations"] = pins
    atomic_torch_save(payload, path)
    print(f"{path}: pinned {len(pins)} fragmentation(s) "
          f"({', '.join(str(len(d['hyperedges'])) + ' hyperedges' for d in pins)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
