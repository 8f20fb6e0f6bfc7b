"""What a training step keeps in memory: the tensors autograd saves, by place in the code.

Run: ``.venv/bin/python benchmarks/memory_by_place.py [--preset paper] [--copies 1]``.

A force-matching step computes forces with ``create_graph=True`` and then differentiates the loss
through them, so everything the forward pass saves for its backward and everything that backward
saves for the second one stays alive until ``loss.backward()``. That set, not the parameters,
sets the GPU memory of a training step (7.1 GB at batch 8 of DHA at the paper preset on an H100,
``benchmarks/README.md``). This script runs the fused energy + forces of ``--copies`` DHA
molecules once on the CPU under ``torch.autograd.graph.saved_tensors_hooks`` and adds up the
distinct storages saved, by the line of ``se3set_ase`` that made them (for the ones saved while the
forces are computed: the autograd node whose backward saved them). Random weights, float32.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from se3set_ase.fragment import Fragmenter, FragmentSettings  # noqa: E402
from se3set_ase.hypergraph import collate  # noqa: E402
from se3set_ase.model import ModelConfig, SE3SetModel  # noqa: E402
from se3set_ase.model.fused import fused_energy_and_forces  # noqa: E402

PKG = str(ROOT / "se3set_ase")


def place() -> str:
    """file:line (function) of the innermost se3set_ase frame on the stack, else the autograd node
    being differentiated (the first backward, run by the engine)."""
    node = torch._C._current_autograd_node()
    if node is not None:
        return f"backward of {node.name()}"
    for fr in reversed(traceback.extract_stack()[:-2]):
        if fr.filename.startswith(PKG):
            return f"{Path(fr.filename).name}:{fr.lineno} ({fr.name})"
    return "elsewhere"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--copies", type=int, default=1)
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args()
    import ase.io

    torch.manual_seed(0)
    model = SE3SetModel(ModelConfig.preset(args.preset, fragment=FragmentSettings.preset("md22")))
    torch.nn.init.normal_(model.head[-1].weight, std=0.1)
    atoms = ase.io.read(ROOT / "tests" / "data" / "dha.xyz")
    fr = Fragmenter(model.config.fragment)
    hg = collate([fr(atoms) for _ in range(args.copies)]).to("cpu", torch.float32)

    seen: dict[tuple[int, int], int] = {}  # (data_ptr, nbytes) -> bytes, each storage counted once
    by_place: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    params = {p.data_ptr() for p in model.parameters()}

    def pack(t: torch.Tensor):
        if t.device.type == "cpu" and t.numel() and t.untyped_storage().data_ptr() not in params:
            st = t.untyped_storage()
            key = (st.data_ptr(), st.nbytes())
            if key not in seen:
                seen[key] = st.nbytes()
                rec = by_place[place()]
                rec[0] += st.nbytes()
                rec[1] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        e, f, _ = fused_energy_and_forces(model, hg, training=True)
        loss = e.pow(2).mean() + 100.0 * f.pow(2).mean()
    total = sum(seen.values())
    print(f"# {args.preset} preset, {args.copies} x DHA ({hg.num_atoms} atoms, {hg.num_tokens} tokens, "
          f"{hg.v2e_src.shape[0]} incidences): {total / 2**20:.1f} MiB saved for the second backward "
          f"in {len(seen)} storages ({total / 2**20 / args.copies:.1f} MiB per molecule)")
    rows = sorted(by_place.items(), key=lambda kv: -kv[1][0])
    print(f"{'MiB':>9s} {'share':>6s} {'tensors':>7s}  place")
    for where, (nbytes, n) in rows[:args.top]:
        print(f"{nbytes / 2**20:9.1f} {nbytes / total:6.1%} {n:7d}  {where}")
    loss.backward()


if __name__ == "__main__":
    main()
