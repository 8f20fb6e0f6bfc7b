"""How often does the frozen fragmentation depend on the geometry it is decided at?

Run: ``.venv/bin/python benchmarks/fragment_stability.py FILE [FILE ...] [--preset md17|md22|auto]``

The fragmenter decides kernel merging and explicit overlaps once per bond topology, from empirical
(geometric) bond orders at the first geometry it sees, then freezes them (so MD is continuous).
A training run decides them at the first frame of its data file; the calculator at the user's
first geometry. Where a bond order between groups sits near a threshold (an intramolecular
hydrogen bond, for example), two starting geometries of the same molecule can give two different
hypergraphs, and a model trained on one is wrong on the other.

For every frame of each file this script fragments the frame on its own (as if it were the first
geometry seen) and counts the frames whose hyperedges differ from those decided at frame 0 (what
``se3set-ase fit`` freezes for the whole file). Deterministic: no timing, no random numbers.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from se3set_ase.data import read_frames  # noqa: E402
from se3set_ase.fragment import FragmentSettings, fragment  # noqa: E402


def stability(path: str, preset: str = "auto") -> tuple[int, Counter, tuple]:
    """(number of frames, Counter of hyperedge tuples -> frames, frame 0's hyperedges)."""
    frames = read_frames(path)
    if preset == "auto":
        preset = "md17" if len(frames[0].numbers) <= 25 else "md22"  # as `fit --fragment auto`
    settings = FragmentSettings.preset(preset)
    counts: Counter = Counter()
    first = None
    for f in frames:
        h = fragment(f.numbers, f.positions, charge=f.charge, settings=settings).hyperedges
        if first is None:
            first = h
        counts[h] += 1
    return len(frames), counts, first


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--preset", default="auto", choices=("auto", "md17", "md22"))
    args = ap.parse_args()
    print(f"{'file':32s} {'frames':>6s} {'as frame 0':>10s} {'different':>9s} {'variants':>8s}")
    for path in args.files:
        n, counts, first = stability(path, args.preset)
        same = counts[first]
        print(f"{Path(path).name:32s} {n:6d} {same:10d} {n - same:9d} {len(counts):8d}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
