"""Command line: `se3set-ase {info,models,fit,eval,sample,label}`. Argument parsing only; each subcommand
calls one function of the package."""
from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

# subcommand -> module providing `add_arguments(parser)` and `main(args) -> int`
SUBCOMMANDS = {
    "info": ("se3set_ase.info", "versions of the stack, CUDA and optional extras"),
    "fit": ("se3set_ase.training.cli", "train a model from a data file or a named dataset"),
    "models": ("se3set_ase.catalogue", "the model files that names resolve to, with their test errors"),
    "eval": ("se3set_ase.training.evaluate", "errors of a model on a data file"),
    "sample": ("se3set_ase.data.sample", "GFN2-xTB reference frames of a molecule (Langevin MD)"),
    "label": ("se3set_ase.data.label", "GFN2-xTB energies and forces for given geometries"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="se3set-ase", description="SE3Set potentials for ASE")
    p.add_argument("--version", action="version", version=f"se3set-ase {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(sp)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command is None:
        build_parser().print_help()
        return 0
    try:
        return int(importlib.import_module(args._module).main(args) or 0)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        # our errors (DataError, TrainingError, ModelFileError, StructureError, ...) say what is
        # wrong and what to do: print that, not a traceback
        print(f"se3set-ase {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"se3set-ase {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
