"""Model files: round trip, safe loading (``weights_only=True``) and clear errors for bad files."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ase.io import read

from se3set_ase.fragment import Fragmenter, FragmentSettings
from se3set_ase.model import ModelConfig, ModelFileError, SE3SetModel, energy_and_forces, load_model, save_model
from se3set_ase.model.checkpoint import FORMAT_VERSION

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    cfg = ModelConfig.preset("tiny", elements=[1, 6, 7, 8], fragment=FragmentSettings.preset("md17"))
    m = SE3SetModel(cfg, torch.float64)
    torch.nn.init.normal_(m.head[-1].weight, std=1.0)
    m.set_statistics({1: -13.6, 6: -1029.8, 7: -1485.3, 8: -2042.6}, energy_scale=0.7,
                     avg_node_degree=2.5, avg_hyperedge_degree=6.0)
    return m.eval()


@pytest.fixture(scope="module")
def aspirin_hg(model):
    return Fragmenter(model.config.fragment)(read(DATA / "aspirin.xyz"))


def test_round_trip_identical_energies(model, aspirin_hg, tmp_path):
    path = save_model(model, tmp_path / "m.pt", metadata={"dataset": "unit-test"}, dtype=torch.float64)
    loaded, meta = load_model(path, dtype=torch.float64)
    assert meta["dataset"] == "unit-test"
    assert meta["elements"] == [1, 6, 7, 8]
    assert meta["units"]["energy"] == "eV"
    assert loaded.config == model.config
    assert not loaded.training
    e0, f0, a0 = energy_and_forces(model, aspirin_hg)
    e1, f1, a1 = energy_and_forces(loaded, aspirin_hg)
    assert f0.abs().max() > 1e-2  # a randomised head: the comparison is not trivially 0 == 0
    assert torch.equal(e0, e1) and torch.equal(f0, f1) and torch.equal(a0, a1)


def test_float32_file_keeps_reference_energies_exact(model, aspirin_hg, tmp_path):
    """The default file dtype is float32, but the per-element reference energies (large, eV) stay
    float64, so a float64 model loaded from it differs only by float32 rounding of the weights."""
    path = save_model(model, tmp_path / "m32.pt")
    sd = torch.load(path, weights_only=True)["state_dict"]
    assert sd["element_energy"].dtype == torch.float64
    assert sd["head.0.weight"].dtype == torch.float32
    loaded, _ = load_model(path, dtype=torch.float64)
    assert torch.equal(loaded.element_energy, model.element_energy)
    e0, f0, _ = energy_and_forces(model, aspirin_hg)
    e1, f1, _ = energy_and_forces(loaded, aspirin_hg)
    assert abs(float((e0 - e1).detach())) < 1e-3
    assert float((f0 - f1).abs().max()) < 1e-4 * float(f0.abs().max())


def test_file_is_plain_data_loadable_with_weights_only(model, tmp_path):
    path = save_model(model, tmp_path / "m.pt")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    assert payload["format"] == "se3set-ase-model"
    assert payload["format_version"] == FORMAT_VERSION
    assert ModelConfig.from_dict(payload["config"]) == model.config
    assert set(payload["state_dict"]) == set(model.state_dict())
    assert not any(p.name.startswith(".m.pt.") for p in tmp_path.iterdir())  # no temp file left


def test_truncated_file(model, tmp_path):
    path = save_model(model, tmp_path / "m.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="truncated or corrupt"):
        load_model(path)


def test_garbage_file(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"this is not a model\x00\x01\x02" * 50)
    with pytest.raises(ModelFileError, match="not a readable se3set-ase model file"):
        load_model(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope.pt")


def test_wrong_format_version(model, tmp_path):
    path = save_model(model, tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = FORMAT_VERSION + 1
    torch.save(payload, path)
    with pytest.raises(ModelFileError) as info:
        load_model(path)
    msg = str(info.value)
    assert "version" in msg and str(FORMAT_VERSION + 1) in msg and str(FORMAT_VERSION) in msg


@pytest.mark.parametrize("obj", [{"a": 1}, [1, 2, 3], {"state_dict": {}}, {"format": "something-else"}])
def test_non_model_file(obj, tmp_path):
    path = tmp_path / "other.pt"
    torch.save(obj, path)
    with pytest.raises(ModelFileError, match="not an se3set-ase model file"):
        load_model(path)


def test_bare_state_dict_is_refused(model, tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(ModelFileError):
        load_model(path)


def _drop_state_dict(p):
    del p["state_dict"]


def _fewer_blocks(p):
    p["config"]["num_blocks"] = 3


def _unknown_field(p):
    p["config"]["no_such_field"] = 1


@pytest.mark.parametrize("corrupt, message", [
    (_drop_state_dict, "state_dict"),            # a missing entry
    (_fewer_blocks, "weights do not match"),     # weights that do not fit the config
    (_unknown_field, "config"),                  # a config field this version does not know
])
def test_inconsistent_file(model, tmp_path, corrupt, message):
    path = save_model(model, tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)
    corrupt(payload)
    torch.save(payload, path)
    with pytest.raises(ModelFileError, match=message):
        load_model(path)


class _Evil:
    ran = False

    def __reduce__(self):
        return (_mark_ran, ())


def _mark_ran():
    _Evil.ran = True
    return "ran"


def test_pickled_code_is_not_executed(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "se3set-ase-model", "payload": _Evil()}, path)
    with pytest.raises(ModelFileError):
        load_model(path)
    assert not _Evil.ran


def test_metadata_must_be_json(model, tmp_path):
    with pytest.raises(TypeError):
        save_model(model, tmp_path / "m.pt", metadata={"bad": object()})
    assert not (tmp_path / "m.pt").exists()
