#!/usr/bin/env python
"""Cost of the published fragmentation of fused ring systems against ``max_ring_system_atoms``.

For each limit (``none`` = the published rule: a ring system is one hyperedge) it fragments the
first two frames of DATA (MD22 settings), prints the hypergraph sizes and times a training step
as ``fit`` takes it (batch of the two frames, forces with create_graph, backward, AdamW step;
random small-preset weights, float32, one thread by default). The ratio is against the published
rule in the same run.

    python benchmarks/ring_split_step.py models/data/buckyball-catcher_300K.extxyz.xz
    python benchmarks/ring_split_step.py DATA --limits none,12,16 --steps 3 --preset small
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speed import train_step  # noqa: E402

from se3set_ase.data import read_frames  # noqa: E402
from se3set_ase.fragment import Fragmenter, FragmentSettings  # noqa: E402
from se3set_ase.hypergraph import collate  # noqa: E402
from se3set_ase.model import ModelConfig, SE3SetModel  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data")
    ap.add_argument("--limits", default="none,12", help="comma-separated max_ring_system_atoms values; none = published")
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from ase import Atoms

    frames = read_frames(args.data)[:2]
    elements = sorted({int(z) for f in frames for z in f.numbers})
    base = None
    print(f"{Path(args.data).name}: {len(frames[0].numbers)} atoms, batch of 2 frames, preset {args.preset}, "
          f"{args.threads} thread(s), torch {torch.__version__}")
    print(f"{'limit':>6} {'hyperedges':>10} {'tokens':>7} {'v2e pairs':>9} {'s/step':>7} {'vs published':>12}")
    for lim in args.limits.split(","):
        n = None if lim.strip().lower() == "none" else int(lim)
        st = dataclasses.replace(FragmentSettings.preset("md22"), max_ring_system_atoms=n)
        fr = Fragmenter(settings=st)
        graphs = [fr(Atoms(numbers=f.numbers, positions=f.positions)) for f in frames]
        batch = collate(graphs).to(dtype=torch.float32)
        torch.manual_seed(0)
        model = SE3SetModel(ModelConfig.preset(args.preset, elements=elements, fragment=st)).float()
        step = train_step(model, batch, torch.optim.AdamW(model.parameters(), lr=1e-4))
        step()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        dt = (time.perf_counter() - t0) / args.steps
        base = dt if base is None and n is None else base
        ratio = f"{base / dt:.2f}x" if base else "-"
        print(f"{str(n):>6} {graphs[0].num_hyperedges:>10} {graphs[0].num_tokens:>7} {graphs[0].v2e_src.numel():>9} "
              f"{dt:>7.2f} {ratio:>12}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
