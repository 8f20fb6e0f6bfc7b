"""Data layer: frames, readers (sGDML/rMD17 npz, extxyz, ASE db), named datasets, splits and
GFN2-xTB sampling (`se3set-ase sample`)."""
from .datasets import get_data_dir, resolve_dataset
from .errors import DataError
from .frames import Frame
from .readers import KCAL_PER_MOL_IN_EV, load_npz_arrays, read_frames
from .splits import load_splits, save_splits, split_indices

__all__ = [
    "Frame", "DataError", "read_frames", "resolve_dataset", "split_indices", "save_splits",
    "load_splits", "get_data_dir", "load_npz_arrays", "KCAL_PER_MOL_IN_EV",
]
