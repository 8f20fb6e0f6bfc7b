"""Named datasets: md17:<molecule>, rmd17:<molecule>, md22:<system>.

Files live in the data directory: `$SE3SET_DATA`, else `$XDG_CACHE_HOME/se3set_ase/data`, else
`~/.cache/se3set_ase/data`. A missing file is downloaded (progress bar) to a temporary file in
that directory, checked (it must open as an npz with the expected keys), then moved into place
with os.replace, so an interrupted or corrupt download never leaves a file behind.

Addresses (base URL overridable with `base_url=` or `$SE3SET_DATA_URL`, used by the tests):
- MD17 and MD22 (sGDML): http://www.quantum-machine.org/gdml/data/npz/<file>. The MD17 file
  names follow the sGDML list (md17_aspirin.npz, md17_benzene2017.npz, md17_salicylic.npz...;
  paracetamol and azobenzene were added later and only exist as paracetamol_dft.npz and
  azobenzene_dft.npz). MD22 files are md22_<name>.npz. Several public loaders fetch MD22 from
  http://www.quantum-machine.org/gdml/repo/datasets/ instead; both paths were in use - they were
  cross-checked against other projects' code, not against the live site (no network here).
- rMD17: one figshare archive, https://figshare.com/ndownloader/files/23950376 (rmd17.tar.bz2,
  members rmd17/npz_data/rmd17_<name>.npz; figshare article 12672038). It is downloaded once and
  all ten npz members are extracted atomically.
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError

__all__ = ["COLLECTIONS", "get_data_dir", "resolve_dataset", "dataset_names", "download_file"]

logger = logging.getLogger("se3set_ase")

SGDML_URL = "http://www.quantum-machine.org/gdml/data/npz"
RMD17_URL = "https://figshare.com/ndownloader/files/23950376"
RMD17_ARCHIVE = "rmd17.tar.bz2"

MD17_FILES = {
    "aspirin": "md17_aspirin.npz",
    "benzene": "md17_benzene2017.npz",
    "ethanol": "md17_ethanol.npz",
    "malonaldehyde": "md17_malonaldehyde.npz",
    "naphthalene": "md17_naphthalene.npz",
    "salicylic_acid": "md17_salicylic.npz",
    "toluene": "md17_toluene.npz",
    "uracil": "md17_uracil.npz",
    "paracetamol": "paracetamol_dft.npz",
    "azobenzene": "azobenzene_dft.npz",
}
RMD17_FILES = {
    "aspirin": "rmd17_aspirin.npz",
    "azobenzene": "rmd17_azobenzene.npz",
    "benzene": "rmd17_benzene.npz",
    "ethanol": "rmd17_ethanol.npz",
    "malonaldehyde": "rmd17_malonaldehyde.npz",
    "naphthalene": "rmd17_naphthalene.npz",
    "paracetamol": "rmd17_paracetamol.npz",
    "salicylic_acid": "rmd17_salicylic.npz",
    "toluene": "rmd17_toluene.npz",
    "uracil": "rmd17_uracil.npz",
}
MD22_FILES = {
    "Ac-Ala3-NHMe": "md22_Ac-Ala3-NHMe.npz",
    "DHA": "md22_DHA.npz",
    "stachyose": "md22_stachyose.npz",
    "AT-AT": "md22_AT-AT.npz",
    "AT-AT-CG-CG": "md22_AT-AT-CG-CG.npz",
    "buckyball-catcher": "md22_buckyball-catcher.npz",
    "double-walled_nanotube": "md22_double-walled_nanotube.npz",
}
COLLECTIONS = {"md17": MD17_FILES, "rmd17": RMD17_FILES, "md22": MD22_FILES}


def _norm(s: str) -> str:
    return s.lower().replace("-", "").replace("_", "").replace(" ", "")


# extra spellings (normalised) -> canonical
_ALIASES = {"salicylic": "salicylic_acid", "salicylicacid": "salicylic_acid",
            "buckyballcatcher": "buckyball-catcher", "bucky": "buckyball-catcher",
            "doublewallednanotube": "double-walled_nanotube", "nanotube": "double-walled_nanotube",
            "dwnanotube": "double-walled_nanotube", "acala3nhme": "Ac-Ala3-NHMe"}


def dataset_names() -> list[str]:
    return [f"{c}:{m}" for c, files in COLLECTIONS.items() for m in files]


def canonical_name(name: str) -> tuple[str, str]:
    """("md17", "aspirin") from "MD17:Aspirin" etc.; DataError listing valid names otherwise."""
    coll, sep, mol = str(name).partition(":")
    coll = coll.strip().lower()
    if not sep or coll not in COLLECTIONS:
        raise DataError(f"unknown dataset {name!r}: use COLLECTION:NAME with COLLECTION one of "
                        f"{sorted(COLLECTIONS)}; valid names: {', '.join(dataset_names())}")
    files = COLLECTIONS[coll]
    key = _norm(mol)
    for m in files:
        if _norm(m) == key:
            return coll, m
    alias = _ALIASES.get(key)
    if alias in files:
        return coll, alias
    raise DataError(f"unknown {coll} name {mol!r}; valid: {', '.join(files)}")


def get_data_dir(path: str | os.PathLike | None = None) -> Path:
    """Where named datasets live: the argument, `$SE3SET_DATA`, `$XDG_CACHE_HOME/se3set_ase/data`
    or `~/.cache/se3set_ase/data`."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get("SE3SET_DATA")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "se3set_ase" / "data"


@dataclass
class _Source:
    url: str
    target: Path  # final file
    member: str | None = None  # archive member (rMD17)


def _source(coll: str, mol: str, root: Path, base_url: str | None) -> _Source:
    base = (base_url or os.environ.get("SE3SET_DATA_URL") or "").rstrip("/")
    fname = COLLECTIONS[coll][mol]
    if coll == "rmd17":
        url = f"{base}/{RMD17_ARCHIVE}" if base else RMD17_URL
        return _Source(url, root / "rmd17" / fname, f"rmd17/npz_data/{fname}")
    url = f"{base or SGDML_URL}/{fname}"
    return _Source(url, root / coll / fname)


def _manual_hint(src: _Source) -> str:
    if src.member:
        return (f"download {src.url} ({RMD17_ARCHIVE}), extract {src.member} and put it at "
                f"{src.target}")
    return f"download {src.url} and put it at {src.target}"


def download_file(url: str, dest_dir: Path, suffix: str = "", timeout: float = 60.0,
                  progress: bool = True, desc: str | None = None) -> Path:
    """Download `url` into a new temporary file in `dest_dir`; returns its path. Checks the byte
    count against Content-Length. On failure the temporary file is removed and the exception
    propagates (URLError, OSError, DataError)."""
    from tqdm.auto import tqdm

    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".download-", suffix=suffix + ".part", dir=dest_dir)
    try:
        with os.fdopen(fd, "wb") as fh, urllib.request.urlopen(url, timeout=timeout) as r:
            total = r.headers.get("Content-Length")
            total = int(total) if total and total.isdigit() else None
            got = 0
            with tqdm(total=total, unit="B", unit_scale=True, desc=desc or url.rsplit("/", 1)[-1],
                      disable=not progress, leave=False) as bar:
                while True:
                    chunk = r.read(1 << 20)
                    if not chunk:
                        break
                    fh.write(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
            if total is not None and got != total:
                raise DataError(f"{url}: download truncated ({got} of {total} bytes)")
        return Path(tmp)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _fetch(src: _Source, name: str, progress: bool) -> None:
    from .readers import load_npz_arrays

    root = src.target.parent
    tmp: Path | None = None
    extracted: list[Path] = []
    try:
        logger.info("downloading %s from %s", name, src.url)
        tmp = download_file(src.url, root, suffix=".tar.bz2" if src.member else ".npz",
                            progress=progress, desc=src.target.name if not src.member else RMD17_ARCHIVE)
        if src.member is None:
            load_npz_arrays(tmp)  # readable, right keys and shapes, finite
            os.replace(tmp, src.target)
            tmp = None
        else:
            _extract_rmd17(tmp, root, extracted)
            if not src.target.exists():
                raise DataError(f"{src.url}: archive has no member {src.member}")
    except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as e:
        reason = getattr(e, "reason", e)
        if isinstance(e, urllib.error.HTTPError):
            reason = f"HTTP {e.code} {e.reason}"
        raise DataError(f"{name}: download of {src.url} failed ({reason}); offline or the address "
                        f"moved: {_manual_hint(src)} (or set SE3SET_DATA to a folder holding it)"
                        ) from None
    except DataError as e:
        raise DataError(f"{name}: the downloaded file is not usable ({e}); nothing was kept. "
                        f"{_manual_hint(src)}") from None
    except (OSError, tarfile.TarError, EOFError) as e:
        raise DataError(f"{name}: download of {src.url} failed ({type(e).__name__}: {e}); "
                        f"{_manual_hint(src)}") from None
    finally:
        if tmp is not None and Path(tmp).exists():
            os.unlink(tmp)


def _extract_rmd17(archive: Path, root: Path, extracted: list[Path]) -> None:
    """Extract every rmd17/npz_data/*.npz member of the archive atomically (temp file, check,
    os.replace)."""
    from .readers import load_npz_arrays

    with tarfile.open(archive, "r:*") as tar:
        for m in tar:
            base = os.path.basename(m.name)
            if not (m.isfile() and base.endswith(".npz") and "npz_data" in m.name):
                continue
            dest = root / base
            if dest.exists():
                continue
            fd, tmp = tempfile.mkstemp(prefix=".extract-", suffix=".npz", dir=root)
            try:
                with os.fdopen(fd, "wb") as out, tar.extractfile(m) as f:
                    shutil.copyfileobj(f, out)
                load_npz_arrays(tmp)
                os.replace(tmp, dest)
                extracted.append(dest)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)


def resolve_dataset(name: str, data_dir: str | os.PathLike | None = None, download: bool = True,
                    base_url: str | None = None, progress: bool = True) -> Path:
    """Path of the npz of a named dataset ("md17:aspirin", "rmd17:aspirin", "md22:DHA"; case and
    -/_ insensitive), downloading it when missing and `download` is true."""
    coll, mol = canonical_name(name)
    root = get_data_dir(data_dir)
    src = _source(coll, mol, root, base_url)
    if src.target.exists():
        return src.target
    label = f"{coll}:{mol}"
    if not download:
        raise DataError(f"{label}: {src.target} does not exist and download=False; "
                        f"{_manual_hint(src)}")
    try:
        src.target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{label}: cannot create the data directory {src.target.parent} ({e}); set "
                        f"SE3SET_DATA to a writable folder") from None
    _fetch(src, label, progress)
    return src.target
