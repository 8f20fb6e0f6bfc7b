"""se3set-ase: SE3Set equivariant hypergraph neural network potentials for ASE."""
__version__ = "0.1.0"

__all__ = ["__version__", "SE3SetCalculator"]


def __getattr__(name):  # lazy: `import se3set_ase` stays cheap and torch-free
    if name == "SE3SetCalculator":
        from .calculator import SE3SetCalculator

        return SE3SetCalculator
    raise AttributeError(name)
