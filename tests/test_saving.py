"""The ground layer of every file the package writes and reads (pyro_nflows.saving):
the one atomic writer, the checksum, and the reading of model files that
checks a file's configuration against its weights before building anything."""

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_nflows import density
from pyro_nflows.density import DensityModel, load
from pyro_nflows.registry import FLOWS
from pyro_nflows.saving import check_output, checksum, read_model, save_atomically
from pyro_nflows.vae import VAE

# --------------------------------------------------------------------------
# The atomic writer
# --------------------------------------------------------------------------


def test_save_atomically_takes_a_payload_or_a_writer(tmp_path):
    save_atomically({"weights": torch.arange(3)}, tmp_path / "payload.pt")
    assert torch.equal(torch.load(tmp_path / "payload.pt", weights_only=True)["weights"], torch.arange(3))
    array = np.arange(6.0).reshape(3, 2)
    save_atomically(lambda file: np.save(file, array), tmp_path / "array.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "array.npy"), array)
    save_atomically(lambda file: np.savetxt(file, array, delimiter=","), tmp_path / "array.csv")
    np.testing.assert_array_equal(np.loadtxt(tmp_path / "array.csv", delimiter=","), array)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["array.csv", "array.npy", "payload.pt"]
    with pytest.raises(TypeError, match="state_dict"):
        save_atomically(torch.nn.Linear(1, 1), tmp_path / "module.pt")


def test_a_writer_that_fails_half_way_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "samples.csv"
    path.write_text("old\n")

    def half_then_fail(file):
        file.write(b"new, but only half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_atomically(half_then_fail, path)
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["samples.csv"]


def test_the_bytes_go_to_a_temporary_file_in_the_same_folder_until_the_rename(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"old")
    seen = {}

    def look(file):
        file.write(b"new")
        seen["during"] = path.read_bytes()
        seen["others"] = sorted(p.name for p in tmp_path.iterdir() if p != path)

    save_atomically(look, path)
    assert seen["during"] == b"old" and path.read_bytes() == b"new"
    [temporary] = seen["others"]
    assert temporary.startswith(".model.pt.") and temporary.endswith(".tmp")


def test_written_files_get_the_permissions_open_would_give_or_keep_the_old_ones(tmp_path):
    previous = os.umask(0o027)
    try:
        save_atomically(lambda file: file.write(b"new"), tmp_path / "new.bin")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "new.bin").stat().st_mode) == 0o640  # 0o666 less the umask, not mkstemp's 0o600
    kept = tmp_path / "kept.bin"
    kept.write_bytes(b"old")
    kept.chmod(0o604)
    save_atomically(lambda file: file.write(b"new"), kept)
    assert stat.S_IMODE(kept.stat().st_mode) == 0o604


def test_a_link_is_kept_and_its_file_replaced_and_a_device_is_written_to(tmp_path):
    target = tmp_path / "models" / "v3.pt"
    target.parent.mkdir()
    target.write_bytes(b"old")
    link = tmp_path / "model.pt"
    link.symlink_to(target)
    save_atomically(lambda file: file.write(b"new"), link)
    assert link.is_symlink() and target.read_bytes() == b"new"
    save_atomically({"a": 1}, "/dev/null")  # not replaced by a file
    assert Path("/dev/null").is_char_device()


def _a_file(path: Path) -> Path:
    path.write_text("")
    return path


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda tmp: tmp, IsADirectoryError, "it is a directory; give a file name"),
        (lambda tmp: tmp / "missing" / "model.pt", FileNotFoundError, "the folder .*missing does not exist"),
        (lambda tmp: _a_file(tmp / "file") / "model.pt", NotADirectoryError, "file is not a folder"),
    ],
)
def test_check_output_says_why_a_path_cannot_be_written(tmp_path, make, error, message):
    path = make(tmp_path)
    for check in (lambda: check_output(path, "model"), lambda: save_atomically({"a": 1}, path, "model")):
        with pytest.raises(error, match=message) as info:
            check()
        assert str(path) in str(info.value) and "model" in str(info.value)
    assert not list(Path(tmp_path).glob("**/.*"))  # nothing left behind


@pytest.mark.skipif(os.access("/sys", os.W_OK) and os.geteuid() != 0 or not os.path.isdir("/sys"),
                    reason="needs a folder where no file can be created")
def test_check_output_refuses_a_folder_where_no_file_can_be_created():
    with pytest.raises(PermissionError, match=r"cannot write model /sys/model.pt: no file can be created in /sys"):
        check_output("/sys/model.pt", "model")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write read-only files and folders")
def test_check_output_refuses_read_only_files_and_folders(tmp_path):
    locked = tmp_path / "locked.pt"
    locked.write_bytes(b"old")
    locked.chmod(0o444)
    with pytest.raises(PermissionError, match="the file is read-only"):
        save_atomically({"a": 1}, locked)
    folder = tmp_path / "folder"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match="no file can be created in"):
            check_output(folder / "model.pt")
    finally:
        folder.chmod(0o755)


# --------------------------------------------------------------------------
# The checksum
# --------------------------------------------------------------------------


def test_the_checksum_sees_every_byte_dtype_and_shape_but_not_the_order_of_keys():
    payload = {"config": "{}", "state": {"a": torch.arange(4.0), "b": torch.ones(2, 2, dtype=torch.bool)}}
    reference = checksum(payload)
    assert checksum({"state": {"b": payload["state"]["b"], "a": payload["state"]["a"]}, "config": "{}"}) == reference
    assert checksum({**payload, "checksum": "anything"}) == reference  # the checksum is not part of itself
    flipped = torch.arange(4.0)
    flipped.view(torch.int32)[2] ^= 1  # one bit of one value
    changes = [
        {**payload, "state": {**payload["state"], "a": flipped}},
        {**payload, "state": {**payload["state"], "a": torch.arange(4.0).double()}},
        {**payload, "state": {**payload["state"], "a": torch.arange(4.0).reshape(2, 2)}},
        {**payload, "config": "{ }"},
    ]
    assert len({checksum(change) for change in changes} | {reference}) == len(changes) + 1
    assert checksum({"x": torch.tensor(1.0, dtype=torch.bfloat16), "n": None, "t": (1, 2.5)})  # any dtype, 0-d


# --------------------------------------------------------------------------
# Reading model files
# --------------------------------------------------------------------------


@pytest.mark.parametrize("flow", sorted(name for name, entry in FLOWS.items() if entry.event == "vector"))
def test_every_flow_saves_and_loads_within_the_build_budget(tmp_path, flow):
    """The budget that a file's weights set for rebuilding its model never refuses a real one."""
    model = DensityModel(3, flow, num_layers=2)
    model.save(tmp_path / "model.pt")
    restored = load(tmp_path / "model.pt")
    for key, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value)


@pytest.mark.parametrize("posterior", ["gaussian", "householder:3", "convex_triangular_linear:2", "iaf:2",
                                       "sylvester:2(kind=orthogonal)", "planar:2", "residual", "continuous"])
@pytest.mark.parametrize("hidden_dims", [(), (16,)])
def test_every_vae_posterior_saves_and_loads_within_the_build_budget(tmp_path, posterior, hidden_dims):
    vae = VAE(6, 3, posterior, hidden_dims=hidden_dims)
    vae.save(tmp_path / "vae.pt")
    restored = VAE.load(tmp_path / "vae.pt")
    for key, value in vae.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value)


FITS_NOT = "its configuration does not fit the weights it carries"


def _tampered(tmp_path, **config):
    """A model file whose configuration says ``config``, with a checksum that matches (as a hostile file would)."""
    DensityModel(2, num_layers=2).save(tmp_path / "model.pt")
    payload = torch.load(tmp_path / "model.pt", weights_only=True)
    payload["config"] = json.dumps({**json.loads(payload["config"]), **config})
    payload["checksum"] = checksum(payload)
    torch.save(payload, tmp_path / "tampered.pt")
    return tmp_path / "tampered.pt"


@pytest.mark.parametrize(
    "config, message",
    [
        ({"num_layers": 10**7}, "num_layers = 10000000 asks for more than the .* values of weights the file holds"),
        ({"num_layers": 40}, "num_layers 40 is more than the 3 layers whose weights it holds"),
        ({"hidden_dims": [10**6, 10**6]}, r"hidden_dims = \[1000000, 1000000\] asks for more than"),
        ({"input_dim": 10**6}, "input_dim = 1000000 asks for more"),
        ({"input_dim": 3}, r"input_dim 3 is not the size of its standardisation 'loc' \(2,\)"),
    ],
)
def test_an_absurd_configuration_is_refused_before_anything_is_built(tmp_path, monkeypatch, config, message):
    path = _tampered(tmp_path, **config)

    def never(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(density, "_stack", never)
    with pytest.raises(ValueError, match=f"tampered.pt: {FITS_NOT}: {message}"):
        load(path)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"flow": "maf(hidden_dims=(100000, 100000))"}, "would create a tensor of 10000000000 elements"),
        ({"flow": "householder:100000000"}, "would create a tensor of 200000000 elements"),
        ({"flow": "maf:1000000"}, "registers more than .* parameters, buffers and modules"),
        ({"flow": "permute:10000000"}, "registers more than"),
        ({"hidden_dims": [-5]}, "every entry of hidden_dims must be an integer >= 1, got -5"),
        ({"num_layers": -1}, "num_layers must be an integer >= 1, got -1"),
        ({"extra": 1}, "unexpected keyword argument 'extra'"),
    ],
)
def test_a_configuration_that_would_build_more_than_its_weights_is_stopped(tmp_path, config, message):
    with pytest.raises(ValueError, match=f"tampered.pt: cannot rebuild the model from its configuration: .*{message}"):
        load(_tampered(tmp_path, **config))


@pytest.mark.parametrize(
    "config, message",
    [
        ({"hidden_dims": [20, 20]}, r"weights of the wrong shape \['layers.0.made.mask0'"),
        ({"num_layers": 1}, r"weights unexpected \['layers.1.initialized'"),
        ({"flow": "nsf"}, "weights of the wrong shape"),
        ({"normalization": None}, "weights missing .*; unexpected"),
    ],
)
def test_weights_must_be_exactly_those_of_the_configuration(tmp_path, config, message):
    with pytest.raises(ValueError, match=f"tampered.pt: its weights do not match its configuration .*{message}"):
        load(_tampered(tmp_path, **config))


def test_read_model_runs_the_class_check_before_building(tmp_path):
    DensityModel(2, num_layers=1).save(tmp_path / "model.pt")

    def refuse(config, state):
        raise ValueError("no, because")

    with pytest.raises(ValueError, match=f"model.pt: {FITS_NOT}: no, because"):
        read_model(DensityModel, "density", tmp_path / "model.pt", check_config=refuse)
