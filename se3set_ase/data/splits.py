"""Train/valid/test splits: seeded, deterministic, saved next to a run as .npz."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import DataError

__all__ = ["split_indices", "save_splits", "load_splits", "SPLIT_FILE"]

SPLIT_FILE = "splits.npz"
_PARTS = ("train", "valid", "test")


def _count(size, n: int, what: str) -> int:
    if size is None:
        return 0
    if isinstance(size, (bool, np.bool_)):
        raise DataError(f"{what} size must be an int (frames) or a float in (0, 1] (fraction), "
                        f"not {size!r}")
    if isinstance(size, (int, np.integer)):
        k = int(size)
        if k < 0:
            raise DataError(f"{what} size {k} is negative")
        return k
    if isinstance(size, (float, np.floating)):
        f = float(size)
        if not 0.0 <= f <= 1.0:
            raise DataError(f"{what} size {f} is a float, so it is read as a fraction and must lie "
                            f"in [0, 1]; pass an int for a number of frames")
        return int(round(f * n))
    raise DataError(f"{what} size must be an int or a float, not {type(size).__name__}")


def split_indices(n: int, train=0.8, valid=0.1, test=None, seed: int = 0,
                  block: int = 1) -> dict[str, np.ndarray]:
    """Disjoint random index sets {"train", "valid", "test"} over range(n).

    Sizes are ints (frames, e.g. the MD17 protocol train=950, valid=50) or floats (fractions of
    n). test=None takes all remaining frames. With ``block == 1`` the order is
    `np.random.default_rng(seed).permutation(n)`; with ``block > 1`` the frames are cut into
    contiguous blocks of ``block`` frames (the last may be shorter), the blocks are permuted by
    `default_rng(seed).permutation(n_blocks)` and the order is their frames one block after the
    other, so that correlated neighbours of an MD trajectory land in the same set (only the
    two blocks at the set boundaries are shared). Train is the first part of the order, then
    valid, then test; each set is returned sorted (int64)."""
    n = int(n)
    if n <= 0:
        raise DataError(f"cannot split {n} frames")
    if int(block) != block or block < 1:
        raise DataError(f"split block must be a positive number of frames, not {block!r}")
    k_train = _count(train, n, "train")
    k_valid = _count(valid, n, "valid")
    if k_train + k_valid > n:
        raise DataError(f"train ({k_train}) + valid ({k_valid}) = {k_train + k_valid} frames "
                        f"exceeds the {n} frames available")
    k_test = n - k_train - k_valid if test is None else _count(test, n, "test")
    if k_train + k_valid + k_test > n:
        raise DataError(f"train ({k_train}) + valid ({k_valid}) + test ({k_test}) = "
                        f"{k_train + k_valid + k_test} frames exceeds the {n} frames available")
    block = int(block)
    if block == 1:
        perm = np.random.default_rng(seed).permutation(n)
    else:
        blocks = np.random.default_rng(seed).permutation(-(-n // block))
        perm = (blocks[:, None] * block + np.arange(block)[None, :]).reshape(-1)
        perm = perm[perm < n]
    a, b = k_train, k_train + k_valid
    return {"train": np.sort(perm[:a]).astype(np.int64),
            "valid": np.sort(perm[a:b]).astype(np.int64),
            "test": np.sort(perm[b:b + k_test]).astype(np.int64)}


def save_splits(path: str | os.PathLike, splits: dict[str, np.ndarray], n: int | None = None,
                seed: int | None = None, source: str | None = None) -> Path:
    """Write the splits to `path` (a .npz file, or a run directory -> <dir>/splits.npz),
    atomically. `n`, `seed`, `source` are stored for checking on load."""
    path = Path(path)
    if path.is_dir() or path.suffix != ".npz":
        path = path / SPLIT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.asarray(v, dtype=np.int64) for k, v in splits.items()}
    if n is not None:
        arrays["n"] = np.int64(n)
    if seed is not None:
        arrays["seed"] = np.int64(seed)
    if source is not None:
        arrays["source"] = np.array(str(source))
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return path


def load_splits(path: str | os.PathLike, n: int | None = None) -> dict[str, np.ndarray]:
    """Read splits written by save_splits (file or run directory). With `n`, checks that the
    indices fit a dataset of n frames (and the stored n, if any)."""
    path = Path(path)
    if path.is_dir():
        path = path / SPLIT_FILE
    if not path.exists():
        raise DataError(f"{path}: no such split file")
    try:
        with np.load(path, allow_pickle=False) as z:
            d = {k: z[k] for k in z.files}
    except Exception as e:
        raise DataError(f"{path}: not a readable split file ({type(e).__name__}: {e})") from None
    out = {k: d[k].astype(np.int64) for k in _PARTS if k in d}
    if "train" not in out:
        raise DataError(f"{path}: missing key 'train'; the file holds {sorted(d)}")
    if n is not None:
        if "n" in d and int(d["n"]) != int(n):
            raise DataError(f"{path}: the splits were made for {int(d['n'])} frames, the data has {n}")
        for k, v in out.items():
            if v.size and (v.min() < 0 or v.max() >= n):
                raise DataError(f"{path}: {k} indices outside 0..{n - 1}")
    return out
