"""Count the tensor operations of one energy + forces call, by kind and by place in the code.

Run: ``.venv/bin/python benchmarks/count_kernels.py [--preset small|paper] [--molecule dha.xyz]``.

On a GPU each non-view ATen operation is (at least) one kernel launch, and a call of the fused
SE3Set path is bound by their number, not by arithmetic (see the H100 figures in
``benchmarks/README.md``). This script runs the call once on the CPU under a
``TorchDispatchMode`` that sees every ATen operation, forward and backward, and reports how many
there are, of which kind, and which line of ``se3set_ase`` issued them ("backward" for the ones the
autograd engine runs). It is the measure for work that fuses kernels: fewer operations here means
fewer launches there. Random weights (the count does not depend on them), float32.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from se3set_ase.fragment import Fragmenter, FragmentSettings  # noqa: E402
from se3set_ase.model import ModelConfig, SE3SetModel  # noqa: E402
from se3set_ase.model.network import energy_and_forces  # noqa: E402

# operations that launch no kernel (views, metadata, allocation without fill)
NO_KERNEL = {"view", "slice", "as_strided", "transpose", "t", "unsqueeze", "squeeze", "select",
             "expand", "permute", "_reshape_alias", "detach", "alias", "_unsafe_view", "split",
             "narrow", "unbind", "lift_fresh", "empty", "empty_strided", "empty_like", "result_type",
             "_local_scalar_dense", "split_with_sizes", "unsafe_split"}


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.by_op: Counter = Counter()
        self.by_site: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name not in NO_KERNEL:
            ours = [f for f in traceback.extract_stack() if "se3set_ase" in f.filename]
            if not ours or ours[-1].name == "energy_and_forces":
                site = "backward (autograd.grad)" if ours else "other"
            else:
                site = f"{Path(ours[-1].filename).name}:{ours[-1].lineno} {ours[-1].name}"
            self.by_op[name] += 1
            self.by_site[site] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--molecule", default=str(ROOT / "tests" / "data" / "dha.xyz"))
    ap.add_argument("--fragment", default="md22", help="fragment preset (md22: implicit, md17: explicit)")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    import ase.io

    atoms = ase.io.read(args.molecule)
    torch.manual_seed(0)
    model = SE3SetModel(ModelConfig.preset(args.preset, fragment=FragmentSettings.preset(args.fragment)), torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    hg = Fragmenter(model.config.fragment)(atoms).to("cpu", torch.float32)
    energy_and_forces(model, hg)  # warm the caches (CG tensors, layouts) first, as every later call finds them
    mode = _Count()
    with mode:
        energy_and_forces(model, hg)
    total = sum(mode.by_op.values())
    back = mode.by_site["backward (autograd.grad)"]
    print(f"# {args.preset} preset, {Path(args.molecule).name}: {len(atoms)} atoms, {hg.num_tokens} tokens, "
          f"{hg.v2e_src.shape[0]} v2e edges")
    print(f"operations per energy + forces call: {total} ({total - back} forward, {back} backward)")
    print("\nby kind:")
    for k, v in mode.by_op.most_common(args.top):
        print(f"  {v:6d}  {k}")
    print("\nby place (forward) / backward:")
    for k, v in mode.by_site.most_common(args.top):
        print(f"  {v:6d}  {k}")


if __name__ == "__main__":
    main()
