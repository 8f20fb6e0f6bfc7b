"""The SE3Set network (e3nn), its configuration and safe model files."""
from .config import ModelConfig
from .network import SE3SetModel, UnknownElementError, count_parameters, energy_and_forces

__all__ = ["ModelConfig", "SE3SetModel", "UnknownElementError", "count_parameters", "energy_and_forces"]
from .checkpoint import ModelFileError, load_model, save_model  # noqa: E402

__all__ += ["ModelFileError", "load_model", "save_model"]
