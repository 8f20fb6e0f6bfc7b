"""Named datasets: resolution, download through a local HTTP server, atomic failure handling."""
import functools
import http.server
import io
import tarfile
import threading

import numpy as np
import pytest

from se3set_ase.data import DataError, read_frames, resolve_dataset
from se3set_ase.data.datasets import canonical_name, get_data_dir


def _npz_bytes(n=5):
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    np.savez(buf, z=np.array([6, 1, 1, 1, 1]), R=rng.normal(size=(n, 5, 3)), E=rng.normal(size=n),
             F=rng.normal(size=(n, 5, 3)))
    return buf.getvalue()


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_GET(self):
        if self.path.endswith("/short_md17_aspirin.npz") or self.path == "/short/md17_aspirin.npz":
            data = _npz_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))  # but send less: truncated
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            return
        return super().do_GET()


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    (root / "corrupt").mkdir(parents=True)
    (root / "md17_aspirin.npz").write_bytes(_npz_bytes())
    (root / "md22_DHA.npz").write_bytes(_npz_bytes(3))
    good = _npz_bytes()
    (root / "corrupt" / "md17_aspirin.npz").write_bytes(good[: len(good) // 2])
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w:bz2") as tf:
        for name in ("aspirin", "ethanol"):
            buf = io.BytesIO()
            rng = np.random.default_rng(1)
            np.savez(buf, nuclear_charges=np.array([8, 1, 1]), coords=rng.normal(size=(2, 3, 3)),
                     energies=np.ones(2), forces=np.ones((2, 3, 3)))
            info = tarfile.TarInfo(f"rmd17/npz_data/rmd17_{name}.npz")
            info.size = len(buf.getvalue())
            tf.addfile(info, io.BytesIO(buf.getvalue()))
    (root / "rmd17.tar.bz2").write_bytes(tar.getvalue())
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _left(d):
    return sorted(p.name for p in d.rglob("*") if p.is_file())


def test_names():
    assert canonical_name("MD17:Aspirin") == ("md17", "aspirin")
    assert canonical_name("rmd17:salicylic") == ("rmd17", "salicylic_acid")
    assert canonical_name("md22:dha") == ("md22", "DHA")
    assert canonical_name("md22:double_walled_nanotube") == ("md22", "double-walled_nanotube")
    with pytest.raises(DataError, match="valid: .*aspirin.*azobenzene"):
        canonical_name("md17:aspirine")
    with pytest.raises(DataError, match="md17:aspirin"):
        canonical_name("qm9:foo")


def test_data_dir_env(monkeypatch, tmp_path):
    monkeypatch.delenv("SE3SET_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert get_data_dir() == tmp_path / "se3set_ase" / "data"
    monkeypatch.setenv("SE3SET_DATA", str(tmp_path / "x"))
    assert get_data_dir() == tmp_path / "x"


def test_download_success_and_cache(server, tmp_path):
    d = tmp_path / "data"
    p = resolve_dataset("md17:aspirin", data_dir=d, base_url=server, progress=False)
    assert p == d / "md17" / "md17_aspirin.npz" and p.exists()
    assert _left(d) == ["md17_aspirin.npz"]
    assert len(read_frames(p)) == 5
    # cached: no server needed
    assert resolve_dataset("md17:aspirin", data_dir=d, base_url="http://127.0.0.1:9/") == p


def test_env_url_and_read_by_name(server, tmp_path, monkeypatch):
    monkeypatch.setenv("SE3SET_DATA_URL", server)
    monkeypatch.setenv("SE3SET_DATA", str(tmp_path / "d"))
    frames = read_frames("md22:dha")
    assert len(frames) == 3


def test_rmd17_archive(server, tmp_path):
    d = tmp_path / "data"
    p = resolve_dataset("rmd17:ethanol", data_dir=d, base_url=server, progress=False)
    assert p.name == "rmd17_ethanol.npz"
    assert _left(d) == ["rmd17_aspirin.npz", "rmd17_ethanol.npz"]  # all members, no archive left
    assert len(read_frames(p)) == 2


def test_404_leaves_nothing(server, tmp_path):
    d = tmp_path / "data"
    with pytest.raises(DataError, match=r"md17:uracil.*404.*put it at .*md17_uracil.npz"):
        resolve_dataset("md17:uracil", data_dir=d, base_url=server, progress=False)
    assert _left(d) == []


def test_corrupt_and_truncated_leave_nothing(server, tmp_path):
    d = tmp_path / "data"
    with pytest.raises(DataError, match="not usable.*not a readable npz"):
        resolve_dataset("md17:aspirin", data_dir=d, base_url=server + "/corrupt", progress=False)
    assert _left(d) == []
    with pytest.raises(DataError, match="md17:aspirin"):
        resolve_dataset("md17:aspirin", data_dir=d, base_url=server + "/short", progress=False)
    assert _left(d) == []


def test_offline_and_no_download(tmp_path):
    d = tmp_path / "data"
    with pytest.raises(DataError, match="download=False.*put it at"):
        resolve_dataset("md17:aspirin", data_dir=d, download=False)
    # a closed local port: connection refused, same clear error
    with pytest.raises(DataError, match=r"failed.*offline.*put it at .*md17_aspirin.npz"):
        resolve_dataset("md17:aspirin", data_dir=d, base_url="http://127.0.0.1:9", progress=False)
    assert _left(d) == []
