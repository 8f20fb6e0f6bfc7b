"""Why a training run stopped, as ``fit`` records it (``result["stopped"]``, the model metadata's
``training.stopped``): ``"done"`` (all planned steps), ``"max_time"`` / ``"max_steps"`` (the budget
given on the command line; the model is evaluated as usual) or a signal name such as
``"SIGTERM"`` (pre-empted: the checkpoint and the best weights are written at once, without
evaluation, and the run continues with ``--resume``)."""
from __future__ import annotations


def pre_empted(stopped: str | None) -> bool:
    """True when a run was stopped by a signal (its model has no valid/test errors yet)."""
    return bool(stopped) and str(stopped).startswith("SIG")
