"""Make what a GPU session carries to the device machine: ``.whl/site.tar.xz`` and ``.gpu/data/``.

Run (here, with network, before the first device call):
``.venv/bin/python benchmarks/gpu_prepare.py [--python-version 3.12] [--paper dha]``

The device machine has torch (CUDA), e3nn, h5py and pytest but neither RDKit nor ASE, and no
network; ``benchmarks/gpu_session.sh`` unpacks ``.whl/site.tar.xz`` to ``/tmp/site`` and puts it
on ``PYTHONPATH``. Everything that travels (tracked files, untracked files git does not ignore,
carried folders) must fit in 64 MiB, and the tracked files alone are ~43 MB since the models ship,
so the two wheels (RDKit 32 MB, ASE 3 MB as zips) go:

- without ``rdkit/Contrib`` and the packages' test data;
- without the RDKit extension modules and shared libraries that this package never loads: those
  a probe (``import rdkit.Chem``, ``AllChem``, ``rdDetermineBonds``, ``rdForceFieldHelpers``,
  ``rdMolDescriptors``, ``RDLogger``: every RDKit import of ``se3set_ase`` and its tests, then an
  embedding, MMFF and bond perception) does not map into the process (matched by name without
  the build hash, so a probe under this machine's Python serves the device's Python 3.12 wheel);
- as one tar.xz of the unpacked files (xz packs shared libraries far better than a wheel's zip);
  every library a kept object needs (``readelf -d``) is checked to be in it.

The data: MD17 aspirin (xz) and the first stachyose frame, and with ``--paper dha`` the GFN2 DHA
frames (xz). The script ends by adding up what will travel and fails above 64 MiB.
``--check`` only adds it up. Both output folders must stay out of commits: this script lists them
in ``.git/info/exclude``, so a device call takes them only when named: ``carry: [".whl", ".gpu"]``.
"""
from __future__ import annotations

import argparse
import io
import lzma
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
LIMIT = 64 * 2**20
DROP_DIRS = ("rdkit/Contrib/", "rdkit-stubs/", "/test_data/", "/testData/", "ase/test/")

PROBE = r"""
import json
from rdkit import Chem, RDLogger
from rdkit.Chem import AllChem, rdDetermineBonds, rdForceFieldHelpers, rdMolDescriptors
mol = Chem.AddHs(Chem.MolFromSmiles("CC(=O)Oc1ccccc1C(=O)O"))
AllChem.EmbedMolecule(mol, randomSeed=1)
rdForceFieldHelpers.MMFFOptimizeMolecule(mol)
xyz = Chem.MolToXYZBlock(mol)
raw = Chem.MolFromXYZBlock(xyz)
rdDetermineBonds.DetermineBonds(raw, charge=0)
rdMolDescriptors.CalcMolFormula(raw)
names = set()
for line in open("/proc/self/maps"):
    path = line.split()[-1]
    if ".so" in path and ("rdkit" in path.lower()):
        names.add(path.rsplit("/", 1)[-1])
print(json.dumps(sorted(names)))
"""


def _stem(name: str) -> str:
    """A shared object's name without the build hash and version: libRDKitGraphMol-5c0144ed.so.1 ->
    libRDKitGraphMol; rdchem.so / rdchem.cpython-312-x86_64-linux-gnu.so -> rdchem."""
    base = name.split(".so")[0]
    base = re.sub(r"\.cpython-\d+.*$", "", base)
    base = re.sub(r"-[0-9a-f]{8}$", "", base)
    return re.sub(r"^(libboost_(?:python|numpy))\d+$", r"\1", base)  # libboost_python311 -> 312


def loaded_rdkit_objects() -> set[str]:
    """Stems of the RDKit shared objects the probe maps (this machine's RDKit)."""
    import json

    out = subprocess.run([sys.executable, "-c", PROBE], check=True, capture_output=True, text=True).stdout
    return {_stem(n) for n in json.loads(out.strip().splitlines()[-1])}


def download(specs: list[str], python_version: str, dest: Path) -> list[Path]:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", python_version, "--implementation", "cp",
           "--platform", "manylinux_2_28_x86_64", "-d", str(dest)] + specs
    subprocess.run(cmd, check=True)
    return sorted(dest.glob("*.whl"))


def keep_member(name: str, loaded: set[str] | None) -> bool:
    if name.endswith("/") or any(d in name for d in DROP_DIRS):
        return False
    if loaded is not None and name.startswith(("rdkit/", "rdkit.libs/")) and ".so" in name.rsplit("/", 1)[-1]:
        return _stem(name.rsplit("/", 1)[-1]) in loaded
    return True


def pack(wheels: list[Path], loaded: set[str] | None, out: Path) -> tuple[int, int]:
    """Unpack the kept members of ``wheels`` into one tar.xz at ``out``: (members kept, dropped)."""
    kept = dropped = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with lzma.open(out, "wb", preset=9) as xz, tarfile.open(fileobj=xz, mode="w") as tar:
        for whl in wheels:
            with zipfile.ZipFile(whl) as z:
                for info in z.infolist():
                    if not keep_member(info.filename, loaded):
                        dropped += not info.filename.endswith("/")
                        continue
                    data = z.read(info)
                    ti = tarfile.TarInfo(info.filename)
                    ti.size = len(data)
                    ti.mode = 0o755 if ".so" in info.filename else 0o644
                    tar.addfile(ti, io.BytesIO(data))
                    kept += 1
    return kept, dropped


def extract(archive: str | Path, dest: str | Path) -> None:
    """Unpack the tar.xz ``archive`` into ``dest`` (``gpu_session.sh`` calls this on the device)."""
    with tarfile.open(archive) as tar:
        tar.extractall(dest, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))


def missing_libraries(archive: Path, wheels: list[Path]) -> list[str]:
    """Shared libraries of the wheels' ``*.libs/`` folders that a kept object needs (``DT_NEEDED``,
    read with binutils' ``readelf``) but the archive lacks; [] also when ``readelf`` is absent."""
    import shutil

    if shutil.which("readelf") is None:
        print("readelf not found: the kept objects' libraries are not checked")
        return []
    bundled = set()
    for whl in wheels:
        with zipfile.ZipFile(whl) as z:
            bundled |= {n.rsplit("/", 1)[-1] for n in z.namelist() if ".libs/" in n}
    with tempfile.TemporaryDirectory() as tmp:
        extract(archive, tmp)
        have = {p.name for p in Path(tmp).rglob("*.so*")}
        needed = set()
        for so in Path(tmp).rglob("*.so*"):
            out = subprocess.run(["readelf", "-d", str(so)], capture_output=True, text=True).stdout
            needed |= set(re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", out))
    return sorted((needed & bundled) - have)


def write_data(paper: str | None) -> None:
    data = ROOT / ".gpu" / "data"
    data.mkdir(parents=True, exist_ok=True)
    jobs = [(SHARED / "md17" / "aspirin.extxyz", data / "aspirin.extxyz.xz")]
    if paper == "dha":
        jobs.append((SHARED / "gfn2" / "DHA.extxyz", data / "DHA.extxyz.xz"))
    for src, dst in jobs:
        with open(src, "rb") as f, lzma.open(dst, "wb", preset=9) as g:
            g.write(f.read())
    stachyose = SHARED / "gfn2" / "stachyose.extxyz"
    lines = stachyose.read_text().splitlines(keepends=True)
    n = int(lines[0])
    (data / "stachyose0.extxyz").write_text("".join(lines[:n + 2]))


def travel_bytes() -> int:
    """Bytes of what a device call copies: tracked files, untracked files git does not ignore and
    the carried ``.whl/`` and ``.gpu/``."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, check=True, capture_output=True).stdout
    total = 0
    for name in out.decode().split("\0"):
        p = ROOT / name
        if name and p.is_file() and not name.startswith((".whl/", ".gpu/")):  # counted below
            total += p.stat().st_size
    for folder in (".whl", ".gpu"):
        total += sum(f.stat().st_size for f in (ROOT / folder).rglob("*") if f.is_file())
    return total


def exclude_outputs() -> None:
    exclude = ROOT / ".git" / "info" / "exclude"
    exclude.parent.mkdir(parents=True, exist_ok=True)
    have = exclude.read_text().splitlines() if exclude.exists() else []
    with open(exclude, "a") as f:
        for pat in ("/.whl/", "/.gpu/"):
            if pat not in have:
                f.write(pat + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python-version", default="3.12", help="the device machine's Python")
    ap.add_argument("--paper", choices=["aspirin", "dha"], help="also the data of gpu_session.sh's PAPER run")
    ap.add_argument("--no-prune", action="store_true", help="keep every RDKit shared object")
    ap.add_argument("--out", default=str(ROOT / ".whl" / "site.tar.xz"))
    ap.add_argument("--check", action="store_true", help="only add up what will travel")
    args = ap.parse_args()
    if not args.check:
        import ase
        import rdkit

        loaded = None if args.no_prune else loaded_rdkit_objects()
        with tempfile.TemporaryDirectory() as tmp:
            wheels = download([f"rdkit=={rdkit.__version__}", f"ase=={ase.__version__}"],
                              args.python_version, Path(tmp))
            kept, dropped = pack(wheels, loaded, Path(args.out))
            missing = missing_libraries(Path(args.out), wheels)
        if missing:
            sys.exit(f"the pruned archive lacks libraries its objects need: {missing} (use --no-prune)")
        print(f"{args.out}: {Path(args.out).stat().st_size / 2**20:.1f} MiB ({kept} files, {dropped} dropped"
              + (f"; {len(loaded)} RDKit shared objects kept" if loaded is not None else "") + ")")
        write_data(args.paper)
        exclude_outputs()
    total = travel_bytes()
    print(f"what travels: {total / 2**20:.1f} MiB of {LIMIT / 2**20:.0f} MiB")
    if total > LIMIT:
        sys.exit("too large for a device call: drop --paper dha, or prune more")


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
