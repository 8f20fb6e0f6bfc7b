"""Shared test settings: one thread per library (CI has 2 cores, each running one pytest-xdist
worker, and tblite busy-waits), and hypergraph caches in a temporary folder."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("SE3SET_CACHE_DIR", str(tmp_path / "h5cache"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg_data"))
