"""Add reference geometries to the pinned fragmentations of a model file made before they were stored.

A model file pins the fragmentation of each training topology. Since the pins carry training
geometries (``references``), a molecule given in another atom order gets the pinned hyperedges on
the same atoms (``se3set_ase/fragment/match.py``); a pin without them fits only the training data's
atom order, which matters for models whose ring systems are cut into chunks (the cut of a symmetric
ring system depends on the atom order).

    python models/add_references.py gfn2_buckyball_catcher \\
        --data models/data/buckyball-catcher_300K.extxyz.xz -o models/pending/gfn2_buckyball_catcher.pt

recomputes the model's training split from its metadata (as ``make_card.py`` does), recomputes
the training fragmentations of the data file exactly as ``se3set-ase fit`` now does (up to 16
training frames per topology as references), refuses unless they equal the pins in the file
(topology, groups, kernels, hyperedges), and writes a copy with the references added. Weights and
every other entry are unchanged; the metadata records what was added.
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
    ap.add_argument("-o", "--output", required=True, help="where to write the model with references")
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
    pins = payload.get("fragmentations") or []
    if not pins:
        sys.exit(f"{path}: the file pins no fragmentations")
    if all("references" in p for p in pins):
        sys.exit(f"{path}: its fragmentations already have reference geometries")
    settings = FragmentSettings.from_dict(payload["config"]["fragment"])
    frames = read_frames(args.data)
    fr = tr["frames"]
    split = split_indices(len(frames), train=int(fr["train"]), valid=int(fr["valid"]), test=int(fr["test"]),
                          seed=int(tr["seed"]), block=int(tr.get("split_block", 1)))
    new = training_fragmentations(frames, settings, reference_indices=split["train"])
    old = [Fragmentation.from_dict(p, settings) for p in pins]
    if len(new) != len(old) or any(a != b for a, b in zip(new, old)):
        sys.exit(f"{path}: the recomputed training fragmentations differ from the pinned ones "
                 "(other code or data than the model was trained with); nothing written")
    payload["fragmentations"] = [p.to_dict() for p in new]
    meta["fragmentation_references"] = {
        "added_by": "models/add_references.py",
        "frames": [len(p.references) for p in new],
        "rule": f"up to {MAX_REFERENCES} training-split frames per topology, evenly spaced in file order",
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(payload, out)
    print(f"wrote {out}: {len(new)} fragmentation(s) with {', '.join(str(len(p.references)) for p in new)} "
          "reference geometries")
    return 0


if __name__ == "__main__":
    sys.exit(main())
