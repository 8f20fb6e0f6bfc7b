"""Speed of the plain (e3nn, flat layout) vs fused (per-l layout) SE3Set forward, side by side.

Run: ``.venv/bin/python benchmarks/bench_speed.py [--device cpu|cuda] [--quick] [--threads N]``.

(a) calculator-style energy + forces, ms per call (cached fragmentation + tensors + model +
    results to NumPy), float32, parameters frozen, per molecule and preset; on CUDA also the
    CUDA-graph replay, on the CPU with ``--compile`` also the compiled graph (``compile=True``);
(b) training step (batch of 8 DHA copies, forces with create_graph, L2 energy + 100 x force loss,
    backward, AdamW step): ms per step and samples/s;
(c) fragmentation per MD step with the topology cached (jittered geometries);
(d) ratios against the anchors in /work/shared/anchors (published SE3Set code, MACE) -- those were
    measured in ANOTHER run on the same kind of machine, so the ratios are indicative only; the
    plain-vs-fused columns are from this run and this process.

Molecules: aspirin (tests/data, MD17 explicit fragments), Ac-Ala3-NHMe and DHA (tests/data, MD22
implicit fragments), stachyose (first frame of /work/shared/data/gfn2/stachyose.extxyz if present,
else built from its SMILES with RDKit, else skipped). Weights are random (speed does not depend on
training); the zero-initialised output layer is randomised so that forces are not trivially zero.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from se3set_ase.fragment import Fragmenter, FragmentSettings  # noqa: E402
from se3set_ase.hypergraph import collate  # noqa: E402
from se3set_ase.model import ModelConfig, SE3SetModel  # noqa: E402
from se3set_ase.model.compiled import CompiledEnergyForces  # noqa: E402
from se3set_ase.model.fused import fused_energy_and_forces  # noqa: E402
from se3set_ase.model.graphed import GraphedEnergyForces  # noqa: E402
from se3set_ase.model.network import energy_and_forces as _energy_and_forces, plain_path  # noqa: E402

DATA = ROOT / "tests" / "data"
STACHYOSE_XYZ = Path("/work/shared/data/gfn2/stachyose.extxyz")
STACHYOSE_SMILES = None  # read from make_gfn2.py on demand

# anchors (/work/shared/anchors/speed_h100_2026-11-23.md): published SE3Set code, paper preset
ANCHOR_CPU_FORCE_MS = {"aspirin": 1339.89, "Ac-Ala3-NHMe": 1160.31, "DHA": 1643.48}
ANCHOR_CPU_TRAIN_MS = {"aspirin": 19813.54, "Ac-Ala3-NHMe": 25182.66, "DHA": 44522.15}
ANCHOR_H100_FORCE_MS = {"aspirin": 570.46, "Ac-Ala3-NHMe": 559.62, "DHA": 630.67, "stachyose": 573.21}
ANCHOR_H100_TRAIN_MS = {"DHA": 1338.83}
# MACE through its ASE calculator on the H100 (same anchors file), ms per force call
MACE_H100_MS = {"small": {"aspirin": 57.14, "Ac-Ala3-NHMe": 31.68, "DHA": 35.36, "stachyose": 34.33},
                "large": {"aspirin": 68.17, "Ac-Ala3-NHMe": 49.99, "DHA": 52.17, "stachyose": 56.47}}
MACE_SMALL_CPU_MS = (33.0, 84.0)
MACE_SMALL_DHA_MS = 51.0



def energy_and_forces(model, hg, training=False):
    """The plain path, timed against the fused one."""
    with plain_path(model):
        return _energy_and_forces(model, hg, training=training)


PATHS = {"plain": energy_and_forces, "fused": fused_energy_and_forces}


def _stachyose():
    import ase.io

    if STACHYOSE_XYZ.exists():
        return ase.io.read(STACHYOSE_XYZ, index=0)
    try:
        import re

        from ase import Atoms
        from rdkit import Chem
        from rdkit.Chem import AllChem

        src = Path("/work/shared/data/gfn2/make_gfn2.py").read_text()
        m = re.search(r'"stachyose":\s*((?:"[^"]*"\s*)+)', src)
        smiles = "".join(re.findall(r'"([^"]*)"', m.group(1)))
        mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
        params = AllChem.ETKDGv3()
        params.randomSeed = 42
        AllChem.EmbedMolecule(mol, params)
        AllChem.MMFFOptimizeMolecule(mol, maxIters=200)
        return Atoms(numbers=[a.GetAtomicNum() for a in mol.GetAtoms()], positions=mol.GetConformer().GetPositions())
    except Exception as exc:  # noqa: BLE001
        print(f"# stachyose skipped: {exc}")
        return None


def molecules():
    import ase.io

    mols = [("aspirin", ase.io.read(DATA / "aspirin.xyz"), "md17"),
            ("Ac-Ala3-NHMe", ase.io.read(DATA / "ac_ala3_nhme.xyz"), "md22"),
            ("DHA", ase.io.read(DATA / "dha.xyz"), "md22")]
    st = _stachyose()
    if st is not None:
        mols.append(("stachyose", st, "md22"))
    return mols


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, repeats: int, warmup: int = 1, budget_s: float = 60.0) -> float:
    """Median wall time (ms) over ``repeats`` calls after ``warmup``; stops early past budget_s."""
    for _ in range(warmup):
        fn()
    sync(device)
    ts = []
    start = time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return statistics.median(ts) * 1e3


def make_model(preset: str, frag: str, device, dtype=torch.float32, seed: int = 0) -> SE3SetModel:
    torch.manual_seed(seed)
    cfg = ModelConfig.preset(preset, fragment=FragmentSettings.preset(frag))
    model = SE3SetModel(cfg, dtype)
    torch.nn.init.normal_(model.head[-1].weight, std=0.1)
    return model.to(device)


def jittered_graphs(fragmenter, atoms, n: int = 8, scale: float = 0.02, seed: int = 0) -> list:
    """Hypergraphs of ``n`` copies of ``atoms`` with positions jittered by ``scale`` Å (a training batch)."""
    rng = np.random.default_rng(seed)
    graphs = []
    for _ in range(n):
        a = atoms.copy()
        a.positions += rng.normal(scale=scale, size=a.positions.shape)
        graphs.append(fragmenter(a))
    return graphs


def train_step(model, batch, opt, ef=fused_energy_and_forces):
    """One training step on ``batch`` as ``fit`` takes it (forces with create_graph, L2 energy +
    100 x L2 force loss against zero targets, backward, optimizer step), as a closure to time."""
    f_ref = torch.zeros_like(batch.positions)
    e_ref = torch.zeros(batch.num_graphs, dtype=f_ref.dtype, device=f_ref.device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        e, f, _ = ef(model, batch, training=True)
        ((e - e_ref).pow(2).mean() + 100.0 * (f - f_ref).pow(2).mean()).backward()
        opt.step()
    return step


def graph_call(graphed, fragmenter, atoms):
    energy, forces, _ = graphed(fragmenter(atoms))
    return float(energy.sum().cpu()), forces.cpu().numpy()


def calc_call(model, fragmenter, atoms, device, ef, dtype=torch.float32):
    hg = fragmenter(atoms).to(device, dtype)
    energy, forces, _ = ef(model, hg, training=False)
    return float(energy.detach().sum().cpu()), forces.detach().cpu().numpy()


def mace_times(mols, threads: int, reps: int) -> list[tuple[str, float, int]]:
    """(molecule, ms per MACE-small calculator call, parameters) from benchmarks/mace_speed.py,
    run in .venv-mace on the same structures and thread count."""
    import json
    import subprocess
    import tempfile

    import ase.io

    py = ROOT / ".venv-mace" / "bin" / "python"
    if not py.is_file():
        sys.exit(f"--mace needs {py}: build it with `.venv/bin/python benchmarks/mace_side_by_side.py --setup`")
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for name, atoms, _frag in mols:
            paths.append(str(Path(tmp) / f"{name}.xyz"))
            ase.io.write(paths[-1], atoms)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        out = subprocess.run([str(py), str(ROOT / "benchmarks" / "mace_speed.py"), *paths, "--threads", str(threads),
                              "--repeats", str(max(reps, 7))], capture_output=True, text=True, env=env, check=True)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return [(Path(r["molecule"]).stem, r["ms"], r["params"]) for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="fewer repeats; training at the small preset only")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--presets", default="paper,small")
    ap.add_argument("--molecules", default=None,
                    help="comma-separated subset of aspirin,Ac-Ala3-NHMe,DHA,stachyose (default: all)")
    ap.add_argument("--mace", action="store_true",
                    help="CPU: also time MACE-small's ASE calculator on the same molecules and threads in "
                         "this run (benchmarks/mace_speed.py in .venv-mace)")
    ap.add_argument("--compile", action="store_true",
                    help="CPU: also time the calculator's compile=True path (TorchInductor; minutes of "
                         "compiling per molecule and preset, reported)")
    ap.add_argument("--train-batches", default="32,64", type=lambda t: [int(b) for b in t.split(",") if b],
                    help="CUDA only: batch sizes of DHA copies for the samples/s sweep (default 32,64; "
                         "128 ran out of memory on an 80 GB H100)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda asked for but CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    presets = args.presets.split(",")
    reps = 3 if args.quick else 10
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} torch threads"
    print(f"# device: {dev_name}; torch {torch.__version__}; float32; median of up to {reps} calls")
    mols = all_mols = molecules()
    if args.molecules:
        wanted = args.molecules.split(",")
        unknown = set(wanted) - {n for n, _a, _f in mols}
        if unknown:
            sys.exit(f"--molecules: unknown {sorted(unknown)}; available: {[n for n, _a, _f in mols]}")
        mols = [m for m in mols if m[0] in wanted]

    # ---------------------------------------------------------------- (a) calculator calls
    print("\n## (a) energy + forces per call (calculator-style, cached fragmentation), ms")
    print(f"{'preset':7s} {'molecule':14s} {'atoms':>5s} {'tokens':>6s} {'v2e':>5s} {'plain':>9s} {'fused':>9s} {'speed-up':>8s} {'max|dF|/max|F|':>15s}")
    calc_ms: dict[tuple[str, str], dict[str, float]] = {}
    for preset in presets:
        for name, atoms, frag in mols:
            model = make_model(preset, frag, device)
            for p in model.parameters():
                p.requires_grad_(False)
            fr = Fragmenter(model.config.fragment)
            hg = fr(atoms)
            row = {}
            forces = {}
            for path, ef in PATHS.items():
                forces[path] = calc_call(model, fr, atoms, device, ef)[1]
                row[path] = timeit(lambda: calc_call(model, fr, atoms, device, ef), device, reps)
            if device.type == "cuda":  # the calculator's default on CUDA: replay of a captured graph
                graphed = GraphedEnergyForces(model)
                try:
                    forces["graph"] = graph_call(graphed, fr, atoms)[1]
                except RuntimeError as exc:
                    print(f"# CUDA graph capture failed for {name}: {exc}", flush=True)
                else:
                    row["graph"] = timeit(lambda: graph_call(graphed, fr, atoms), device, max(reps, 20))
                    dG = np.abs(forces["graph"] - forces["fused"]).max() / max(np.abs(forces["fused"]).max(), 1e-30)
                    print(f"{'':7s} {name:14s} CUDA graph replay {row['graph']:8.2f} ms ({row['fused'] / row['graph']:.1f}x "
                          f"fused), max|dF|/max|F| vs fused {dG:.1e}", flush=True)
            if args.compile and device.type == "cpu":  # the calculator's compile=True
                t0 = time.perf_counter()
                compiled = CompiledEnergyForces(model)
                try:
                    forces["compiled"] = graph_call(compiled, fr, atoms)[1]
                except Exception as exc:  # noqa: BLE001  (reported; the calculator falls back to eager)
                    print(f"# compiling failed for {preset} {name}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                else:
                    t_compile = time.perf_counter() - t0
                    row["compiled"] = timeit(lambda: graph_call(compiled, fr, atoms), device, max(reps, 7))
                    dC = np.abs(forces["compiled"] - forces["fused"]).max() / max(np.abs(forces["fused"]).max(), 1e-30)
                    print(f"{'':7s} {name:14s} compiled {row['compiled']:8.2f} ms ({row['fused'] / row['compiled']:.2f}x "
                          f"fused; compiling took {t_compile:.0f} s), max|dF|/max|F| vs fused {dC:.1e}", flush=True)
            dF = np.abs(forces["plain"] - forces["fused"]).max() / max(np.abs(forces["plain"]).max(), 1e-30)
            calc_ms[(preset, name)] = row
            print(f"{preset:7s} {name:14s} {len(atoms):5d} {hg.num_tokens:6d} {hg.v2e_src.shape[0]:5d} "
                  f"{row['plain']:9.1f} {row['fused']:9.1f} {row['plain'] / row['fused']:7.2f}x {dF:15.2e}", flush=True)

    # ---------------------------------------------------------------- (b) training step
    print("\n## (b) training step: batch of 8 DHA, forces with create_graph, loss backward, AdamW step")
    print(f"{'preset':7s} {'path':6s} {'ms/step':>10s} {'samples/s':>10s}")
    dha = next(a for n, a, _ in all_mols if n == "DHA")
    train_ms: dict[tuple[str, str], float] = {}
    for preset in (["small"] if args.quick else presets):
        model = make_model(preset, "md22", device)
        graphs = jittered_graphs(Fragmenter(model.config.fragment), dha)
        batch = collate(graphs).to(device, torch.float32)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
        for path, ef in PATHS.items():
            step = train_step(model, batch, opt, ef)
            slow = preset == "paper" and path == "plain" and device.type == "cpu"
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            ms = timeit(step, device, 1 if slow else (2 if args.quick else 5), warmup=1, budget_s=90.0)
            train_ms[(preset, path)] = ms
            peak = (f"  peak {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB"
                    if device.type == "cuda" else "")
            print(f"{preset:7s} {path:6s} {ms:10.1f} {8000.0 / ms:10.2f}{peak}", flush=True)
        print(f"{preset:7s} speed-up fused/plain: {train_ms[(preset, 'plain')] / train_ms[(preset, 'fused')]:.2f}x")
        # a GPU is launch-bound at batch 8: larger batches cost little more per step
        for bs in (args.train_batches if device.type == "cuda" else []):
            big = collate([graphs[k % 8] for k in range(bs)]).to(device, torch.float32)
            big_step = train_step(model, big, opt)
            torch.cuda.reset_peak_memory_stats(device)
            try:
                ms = timeit(big_step, device, 2 if args.quick else 5, warmup=1, budget_s=60.0)
            except torch.OutOfMemoryError:  # the double backward's intermediates grow with the batch
                del big, big_step
                torch.cuda.empty_cache()
                print(f"{preset:7s} fused batch {bs:4d}: out of memory", flush=True)
                break
            train_ms[(preset, f"fused b{bs}")] = ms
            print(f"{preset:7s} fused batch {bs:4d}: {ms:8.1f} ms/step {1000.0 * bs / ms:8.1f} samples/s  "
                  f"peak {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB", flush=True)

    # ---------------------------------------------------------------- (c) fragmentation
    print("\n## (c) fragmentation per MD step, topology cached (jittered geometries), ms")
    rng = np.random.default_rng(1)
    for name, atoms, frag in mols:
        fr = Fragmenter(FragmentSettings.preset(frag))
        fr(atoms)
        frames = [atoms.positions + rng.normal(scale=0.01, size=atoms.positions.shape) for _ in range(50)]
        t0 = time.perf_counter()
        for r in frames:
            fr(atoms.numbers, r)
        per = (time.perf_counter() - t0) / len(frames) * 1e3
        print(f"{name:14s} ({frag}) {per:8.3f} ms/step")

    # ---------------------------------------------------------------- (d) anchors
    print("\n## (d) against anchors (published SE3Set code and MACE; measured in ANOTHER run on the same kind of machine)")
    if device.type == "cpu":
        if "paper" in presets:
            for name, ref in ANCHOR_CPU_FORCE_MS.items():
                r = calc_ms.get(("paper", name))
                if r:
                    print(f"force call, paper, {name:14s}: published {ref:8.1f} ms | plain {r['plain']:7.1f} ({ref / r['plain']:5.1f}x) "
                          f"| fused {r['fused']:7.1f} ({ref / r['fused']:5.1f}x)")
            for name, ref in ANCHOR_CPU_TRAIN_MS.items():
                if name == "DHA" and ("paper", "fused") in train_ms:
                    p, f = train_ms[("paper", "plain")], train_ms[("paper", "fused")]
                    print(f"train step b8, paper, DHA    : published {ref:8.1f} ms | plain {p:7.1f} ({ref / p:5.1f}x) | fused {f:7.1f} ({ref / f:5.1f}x)")
        for preset in presets:
            r = calc_ms.get((preset, "DHA"))
            if r:
                print(f"DHA force call, {preset}: fused {r['fused']:.1f} ms vs MACE-small 51 ms (CPU range 33-84 ms): "
                      f"{'faster' if r['fused'] < MACE_SMALL_DHA_MS else 'slower'} ({MACE_SMALL_DHA_MS / r['fused']:.2f}x); target paper <= 150 ms")
        if args.mace:
            print("\n## (e) MACE-small's ASE calculator in this run (benchmarks/mace_speed.py, random weights, float32)")
            for name, mace_ms, params in mace_times(mols, torch.get_num_threads(), reps):
                line = f"{name:14s} MACE-small ({params:,} params) {mace_ms:7.1f} ms"
                for preset in presets:
                    r = calc_ms.get((preset, name), {})
                    for path in ("fused", "compiled"):
                        if path in r:
                            line += f" | {preset} {path} {r[path]:6.1f} ms ({mace_ms / r[path]:.2f}x)"
                print(line + "   (x > 1: SE3Set faster)", flush=True)
    else:
        for name, ref in ANCHOR_H100_FORCE_MS.items():
            r = calc_ms.get(("paper", name))
            if r:
                print(f"force call, paper, {name:14s}: published H100 {ref:7.1f} ms | plain {r['plain']:7.2f} | fused {r['fused']:7.2f} "
                      f"| CUDA graph {r['graph']:6.2f} ({ref / r['graph']:.0f}x published; target <= 5 ms)")
        for preset in presets:
            for name, mace in MACE_H100_MS["small"].items():
                r = calc_ms.get((preset, name))
                if r and "graph" in r:
                    print(f"force call, {preset:5s} {name:14s}: CUDA graph {r['graph']:6.2f} ms | MACE-small {mace:6.2f} "
                          f"({mace / r['graph']:.1f}x) | MACE-large {MACE_H100_MS['large'][name]:6.2f} "
                          f"({MACE_H100_MS['large'][name] / r['graph']:.1f}x)")
        if ("paper", "fused") in train_ms:
            f = train_ms[("paper", "fused")]
            print(f"train DHA b8 paper: published H100 {ANCHOR_H100_TRAIN_MS['DHA']:.1f} ms (6.0 samples/s) | fused {f:.1f} ms "
                  f"({8000.0 / f:.1f} samples/s, target >= 300)")


if __name__ == "__main__":
    main()
