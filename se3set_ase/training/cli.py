"""`se3set-ase fit DATA`: arguments -> :class:`TrainConfig` -> :func:`fit`."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from ..model.config import ModelConfig
from .stops import pre_empted


def _size(text: str) -> float:
    v = float(text)
    if v < 0:
        raise argparse.ArgumentTypeError("sizes must be >= 0")
    return v


def _duration(text: str) -> float:
    """Seconds from '3600', '90m', '2h' or 'HH:MM:SS'."""
    t = text.strip()
    if ":" in t:
        parts = [float(x) for x in t.split(":")]
        return sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
    unit = {"s": 1, "m": 60, "h": 3600}.get(t[-1])
    return float(t[:-1]) * unit if unit else float(t)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="extxyz/ASE file, sGDML/rMD17 .npz, ASE .db, or a named dataset (md17:aspirin, md22:DHA)")
    p.add_argument("-o", "--output", help="final model file (default OUT_DIR/model.pt; with --resume, the "
                   "checkpoint's)")
    p.add_argument("--out-dir", default=None, help="run folder for checkpoints, log.csv, learning_curve.png (default runs/<data name>)")
    p.add_argument("--valid-file"), p.add_argument("--test-file")
    p.add_argument("--extra-train", action="append", default=[], metavar="FILE",
                   help="more training frames (repeatable): all of FILE's frames join the training set "
                        "after the split, so the validation and test sets stay those of DATA (active "
                        "learning: add labelled frames where the model failed, then --resume)")
    p.add_argument("--energy-key"), p.add_argument("--forces-key")
    p.add_argument("--train-size", type=_size, help="frames (int) or fraction for training; default: the rest")
    p.add_argument("--valid-size", "--valid-fraction", dest="valid_size", type=_size, default=0.05)
    p.add_argument("--test-size", type=_size, default=0.0, help="frames or fraction held out as test set")
    p.add_argument("--split-block", type=int, default=1, metavar="FRAMES",
                   help="split by contiguous blocks of FRAMES frames (one MD trajectory: choose more "
                        "frames than its correlation time, e.g. 20 for frames 10 fs apart); default 1: "
                        "frames at random")
    p.add_argument("--preset", default="small", choices=ModelConfig.preset_names())
    p.add_argument("--model", default="{}", help='JSON overrides of the model config, e.g. \'{"num_blocks": 4}\'')
    p.add_argument("--fragment", default="auto", choices=["auto", "md17", "md22"])
    p.add_argument("--max-ring-system-atoms", type=int, metavar="N",
                   help="cut fused ring systems of more than N atoms (hydrogens included) into connected "
                        "chunks of at most N: fullerenes and nanotubes are otherwise one hyperedge each, "
                        "with a cost quadratic in its size (default: the published rule, never cut)")
    p.add_argument("--element-energies", help='JSON {"1": -13.6, "6": -1029.0} in eV; default least squares')
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--device", default="auto")
    p.add_argument("--epochs", type=int, default=None,
                   help="default 100; with --resume, the checkpoint's (give it only to change the plan)")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr", type=float, default=1e-6)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--schedule", default="cosine", choices=["cosine", "plateau"])
    p.add_argument("--weight-decay", type=float, default=1e-6)
    p.add_argument("--ema-decay", type=float, default=0.99)
    p.add_argument("--clip-grad", type=float, default=10.0)
    p.add_argument("--energy-weight", type=float, default=1.0)
    p.add_argument("--forces-weight", type=float, default=100.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every-steps", type=int, default=200)
    p.add_argument("--save-every-minutes", type=float, default=10.0)
    p.add_argument("--max-time", type=_duration, help="stop cleanly and save after this long (s, 90m, 2h, HH:MM:SS)")
    p.add_argument("--resume", action="store_true", help="continue OUT_DIR/last.ckpt exactly")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels, so that a resumed run equals an unbroken one bit for bit "
                        "on CUDA too (on the CPU it does anyway); slower on CUDA")
    p.add_argument("--compile", action="store_true",
                   help="run the training steps through one compiled graph (torch.compile: forward, forces "
                        "and their backward fused; compiling takes minutes once, then each step is faster "
                        "and keeps less in memory: benchmarks/bench_train_compiled.py); under torchrun each process "
                        "compiles it")
    p.add_argument("--memory-budget", type=float, metavar="F",
                   help="with --compile: keep at most this fraction (0-1) of what the compiled step keeps "
                        "for its backward by default, recomputing the rest (0.3: 4-5x less than eager; on a CPU "
                        "1.1-1.8x slower than the default compiled step, tiny to paper preset; default: "
                        "TorchInductor's own choice)")
    p.add_argument("--no-progress", action="store_true")


def config_from_args(args: argparse.Namespace):
    from ..training import TrainConfig

    name = args.data.replace(":", "_").rsplit("/", 1)[-1].split(".")[0]
    e_ref = json.loads(args.element_energies) if args.element_energies else None
    return TrainConfig(
        data=args.data, out_dir=args.out_dir or f"runs/{name}", output=args.output,
        valid_file=args.valid_file, test_file=args.test_file, extra_train=list(args.extra_train), energy_key=args.energy_key,
        forces_key=args.forces_key, train_size=args.train_size, valid_size=args.valid_size,
        test_size=args.test_size, split_block=args.split_block, preset=args.preset, model_overrides=json.loads(args.model),
        fragment=args.fragment, max_ring_system_atoms=args.max_ring_system_atoms,
        element_energies={int(k): float(v) for k, v in e_ref.items()} if e_ref else None,
        dtype=args.dtype, device=args.device, epochs=TrainConfig.epochs if args.epochs is None else args.epochs, max_steps=args.max_steps,
        batch_size=args.batch_size, lr=args.lr, min_lr=args.min_lr, warmup_steps=args.warmup_steps,
        schedule=args.schedule, weight_decay=args.weight_decay, ema_decay=args.ema_decay,
        clip_grad=args.clip_grad or None, energy_weight=args.energy_weight, forces_weight=args.forces_weight,
        seed=args.seed, save_every_steps=args.save_every_steps, save_every_minutes=args.save_every_minutes,
        max_time=args.max_time, progress=not args.no_progress, deterministic=args.deterministic,
        compile=args.compile, memory_budget=args.memory_budget)


def main(args: argparse.Namespace) -> int:
    from ..training import fit

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    given = {k for k in ("epochs", "output") if getattr(args, k) is not None}
    result = fit(config_from_args(args), resume=args.resume, argv=["se3set-ase"] + sys.argv[1:], given=given)
    # 3: pre-empted by a signal, unfinished (continue with --resume); a --max-time stop is a
    # budget the user set and ends with the model evaluated: 0, as a finished run
    return 3 if pre_empted(result.get("stopped")) else 0
