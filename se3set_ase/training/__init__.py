"""Training: the fit loop (EMA, schedules, exact resume, DDP), metrics, HDF5 hypergraph cache."""
from .loop import TrainConfig, TrainingError, fit
from .metrics import evaluate, format_table

__all__ = ["TrainConfig", "TrainingError", "fit", "evaluate", "format_table"]
