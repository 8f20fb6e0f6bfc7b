#!/usr/bin/env python
"""Give a model file made by an older `se3set-ase fit` the pinned fragmentations a new fit stores.

    python models/pin_fragmentations.py md17_salicylic_acid --data ../shared/data/md17/salicylic_acid.extxyz
    python models/pin_fragmentations.py gfn2_buckyball_catcher \\
        --data models/data/buckyball-catcher_300K.extxyz.xz -o runs/gfn2_buckyball_catcher_pinned.pt

``se3set-ase fit`` stores in every model file the fragmentation it froze for each bond topology of
its data file (decided at the topology's first frame, in file order) with up to 16 training frames
as reference geometries; the calculator pins them (``Fragmenter.for_model``), and the references
let the same molecule given in another atom order get the pinned hyperedges on the same atoms
(``se3set_ase/fragment/match.py``). That matters for models that cut ring systems into chunks: the
cut of a symmetric ring system depends on the atom order.

This script recomputes the model's training split from its metadata (as ``make_card.py`` does) and
the training fragmentations of the data file exactly as fit does
(``se3set_ase.training.cache.training_fragmentations``), then

- a file without pins gets them, references included;
- a file whose pins lack references gets them, after checking that the recomputed fragmentations
  equal the pinned ones (topology, groups, kernels, hyperedges);
- a file that already pins them, references included, is left alone;
- anything else (other data file, other pins) is refused and nothing is written.

Weights, config and every other entry are unchanged; the metadata records what was added. The file
is rewritten in place unless ``-o`` names another.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("name", help="model name or path")
    ap.add_argument("--data", required=True, help="the model's training data file")
    ap.add_argument("-o", "--output", help="where to write the result (default: rewrite the model file)")
    args = ap.parse_args(argv)

    from se3set_ase.data import read_frames, split_indices
    from se3set_ase.fragment import Fragmentation, FragmentSettings
    from se3set_ase.model.checkpoint import atomic_torch_save, read_model_file
    from se3set_ase.registry import resolve_model
    from se3set_ase.training.cache import MAX_REFERENCES, training_fragmentations

    path = resolve_model(args.name).resolve()
    payload = read_model_file(path)
    meta = payload["metadata"]
    tr = meta.get("training") or {}
    if not tr:
        sys.exit(f"{path}: no training metadata (not written by `se3set-ase fit`)")
    if Path(tr["data"]).name != Path(args.data).name:
        sys.exit(f"--data {args.data} is not the file the model was trained on ({tr['data']})")
    settings = FragmentSettings.from_dict(payload["config"]["fragment"])
    frames = read_frames(args.data)
    fr = tr["frames"]
    split = split_indices(len(frames), train=int(fr["train"]), valid=int(fr["valid"]), test=int(fr["test"]),
                          seed=int(tr["seed"]), block=int(tr.get("split_block", 1)))
    new = training_fragmentations(frames, settings, reference_indices=split["train"])

    pins = payload.get("fragmentations") or []
    if pins:
        # Fragmentation equality compares topology, groups, kernels and hyperedges, not references
        old = [Fragmentation.from_dict(p, settings) for p in pins]
        if len(new) != len(old) or any(a != b for a, b in zip(new, old)):
            sys.exit(f"{path}: the recomputed training fragmentations differ from the pinned ones "
                     "(other code or data than the model was trained with); nothing written")
        if all("references" in p for p in pins):
            print(f"{path}: already pins these {len(pins)} fragmentation(s) with reference geometries")
            return 0
    payload["fragmentations"] = [p.to_dict() for p in new]
    meta["fragmentation_references"] = {
        "added_by": "models/pin_fragmentations.py",
        "pins_added": not pins,
        "frames": [len(p.references) for p in new],
        "rule": f"up to {MAX_REFERENCES} training-split frames per topology, evenly spaced in file order",
    }
    out = Path(args.output) if args.output else path
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(payload, out)
    print(f"wrote {out}: {'pinned' if not pins else 'added references to'} {len(new)} fragmentation(s) "
          f"({', '.join(f'{len(p.hyperedges)} hyperedges, {len(p.references)} references' for p in new)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
