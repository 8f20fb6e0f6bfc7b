"""Errors of the data layer."""
from __future__ import annotations


class DataError(ValueError):
    """A data file, a named dataset or a sampling request that cannot be used as asked.

    The message always names the file (and, where it applies, the frame index) and says what
    is wrong and how to fix it."""
