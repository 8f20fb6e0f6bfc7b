"""A/B timing of the calculator-style energy + forces call: this working tree against a git revision.

Run: ``.venv/bin/python benchmarks/ab_revision.py REV [--presets small,paper] [--calls 25] [--threads 1]``

Both versions of ``se3set_ase`` are imported into one process (REV from a temporary
``git worktree``), built with the same random weights (float32, frozen, the zero-initialised output
layer randomised) on DHA (tests/data/dha.xyz, MD22 implicit fragments), and called in alternation,
so that a busy machine slows both alike: the ratio of the medians is the figure, not the
milliseconds. Prints the energy and force differences between the two versions as well (a
refactoring must not change the numbers beyond float32 round-off).
"""
from __future__ import annotations

import argparse
import importlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load(root: Path):
    """Import the ``se3set_ase`` package under ``root`` (dropping any other copy first)."""
    for name in [k for k in sys.modules if k == "se3set_ase" or k.startswith("se3set_ase.")]:
        del sys.modules[name]
    sys.path.insert(0, str(root))
    try:
        return (importlib.import_module("se3set_ase.model.fused"), importlib.import_module("se3set_ase.fragment"),
                importlib.import_module("se3set_ase.model"))
    finally:
        sys.path.remove(str(root))


def build(root: Path, preset: str, atoms):
    fused, fragment, model_mod = load(root)
    torch.manual_seed(0)
    cfg = model_mod.ModelConfig.preset(preset, fragment=fragment.FragmentSettings.preset("md22"))
    model = model_mod.SE3SetModel(cfg, torch.float32)
    torch.nn.init.normal_(model.head[-1].weight, std=0.1)
    for p in model.parameters():
        p.requires_grad_(False)
    hg = fragment.Fragmenter(cfg.fragment)(atoms).to("cpu", torch.float32)
    return lambda: fused.fused_energy_and_forces(model, hg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("rev", help="git revision to compare with (e.g. HEAD~3, a commit)")
    ap.add_argument("--presets", default="small,paper")
    ap.add_argument("--calls", type=int, default=25)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import ase.io

    atoms = ase.io.read(ROOT / "tests" / "data" / "dha.xyz")
    with tempfile.TemporaryDirectory() as tmp:
        old_root = Path(tmp) / "rev"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(old_root), args.rev], check=True)
        try:
            print(f"# DHA energy + forces, float32, {args.threads} thread(s), {args.calls} alternating calls each; "
                  f"A = {args.rev}, B = working tree")
            for preset in args.presets.split(","):
                calls = {"A": build(old_root, preset, atoms), "B": build(ROOT, preset, atoms)}
                (ea, fa, _), (eb, fb, _) = (tuple(t.detach() for t in calls[k]()) for k in "AB")
                d_e = float((ea - eb).abs().max())
                d_f = float((fa - fb).abs().max() / fa.abs().max())
                times = {"A": [], "B": []}
                for _ in range(args.calls):
                    for k, fn in calls.items():
                        t0 = time.perf_counter()
                        fn()
                        times[k].append(time.perf_counter() - t0)
                ma, mb = (statistics.median(times[k]) * 1e3 for k in "AB")
                print(f"{preset:6s} A {ma:8.1f} ms  B {mb:8.1f} ms  A/B {ma / mb:5.3f}  "
                      f"(fastest {min(times['A']) * 1e3:.1f} / {min(times['B']) * 1e3:.1f} ms)  "
                      f"|dE| {d_e:.1e} eV, max|dF|/max|F| {d_f:.1e}")
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old_root)], check=False)


if __name__ == "__main__":
    main()
