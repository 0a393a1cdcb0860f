import functools
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_nflows import datasets
from pyro_nflows.cli import main
from pyro_nflows.density import DensityModel, load


def test_fit_on_the_default_dataset_writes_a_model(tmp_path, capsys):
    output = tmp_path / "model.pt"
    status = main(["fit", "--n", "600", "--epochs", "2", "--num-layers", "1", "--no-progress", "-o", str(output)])
    assert status == 0
    printed = capsys.readouterr().out
    assert "dataset 'two_moons'" in printed
    assert "test  log-likelihood per point" in printed
    model = load(output)
    assert torch.isfinite(model.log_prob(datasets.two_moons(10, seed=3))).all()


def test_fit_on_a_file(tmp_path, capsys):
    path = tmp_path / "data.npy"
    np.save(path, np.random.default_rng(0).normal(size=(300, 3)))
    output = tmp_path / "model.pt"
    assert main(["fit", str(path), "--epochs", "1", "--num-layers", "1", "--no-progress", "-o", str(output)]) == 0
    assert load(output).input_dim == 3


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert (
        main(["fit", "--flow", "nope", "--n", "100", "--epochs", "1", "--no-progress", "-o", str(tmp_path / "m.pt")])
        == 2
    )
    assert "unknown flow 'nope'" in capsys.readouterr().err
    assert main(["fit", str(tmp_path / "missing.csv"), "--no-progress"]) == 2


def test_flows_lists_the_registry(capsys):
    assert main(["flows"]) == 0
    assert "householder" in capsys.readouterr().out


def test_fit_writes_a_picture_for_2d_data_then_sample_and_score(tmp_path, capsys):
    output = tmp_path / "moons.pt"
    assert (
        main(
            [
                "fit",
                "--n",
                "600",
                "--epochs",
                "1",
                "--num-layers",
                "1",
                "--hidden-dims",
                "8",
                "8",
                "--no-progress",
                "-o",
                str(output),
            ]
        )
        == 0
    )
    picture = output.with_suffix(".png")
    assert picture.exists() and picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    samples = tmp_path / "samples.npy"
    assert main(["sample", str(output), "-n", "50", "-o", str(samples), "--seed", "1"]) == 0
    drawn = np.load(samples)
    assert drawn.shape == (50, 2) and np.isfinite(drawn).all()

    scores = tmp_path / "scores.csv"
    capsys.readouterr()
    assert main(["score", str(output), str(samples), "-o", str(scores)]) == 0
    printed = capsys.readouterr().out
    expected = load(output).log_prob(torch.as_tensor(drawn, dtype=torch.float32))
    assert f"{expected.mean().item():.4f}" in printed
    assert np.allclose(np.loadtxt(scores, delimiter=","), expected.detach().numpy(), atol=1e-5)


def test_score_refuses_a_file_of_the_wrong_width(tmp_path, capsys):
    output = tmp_path / "m.pt"
    main(["fit", "--n", "300", "--epochs", "1", "--num-layers", "1", "--no-progress", "-o", str(output)])
    wide = tmp_path / "wide.npy"
    np.save(wide, np.zeros((4, 3)))
    assert main(["score", str(output), str(wide)]) == 2
    assert "has 3 columns; the model was fitted to 2" in capsys.readouterr().err


def test_vae_trains_on_binarised_digits_reports_and_saves(tmp_path, capsys):
    from pyro_nflows.vae import VAE

    output = tmp_path / "vae.pt"
    argv = [
        "vae",
        "--posterior",
        "householder:2",
        "--z-dim",
        "4",
        "--hidden-dims",
        "16",
        "--epochs",
        "2",
        "--warmup-epochs",
        "1",
    ]
    assert main(argv + ["--num-samples", "20", "--no-progress", "-o", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "binarised digits (threshold), 8 x 8: train 1437, validation 180, test 180" in printed
    assert "test ELBO per point" in printed and "test NLL per point (20 importance samples)" in printed
    vae = VAE.load(output)
    assert vae.config["posterior"] == "householder:2" and vae.config["hidden_dims"] == [16]


def test_vae_trains_on_mnist_5k(tmp_path, capsys):
    from pyro_nflows.vae import VAE

    output = tmp_path / "vae.pt"
    argv = ["vae", "--dataset", "mnist5k", "--posterior", "gaussian", "--z-dim", "2", "--hidden-dims", "8",
            "--epochs", "1", "--warmup-epochs", "1", "--num-samples", "2", "--no-progress", "-o", str(output)]
    assert main(argv) == 0
    assert "binarised MNIST-5k (threshold), 28 x 28: train 4000, validation 500, test 500" in capsys.readouterr().out
    assert VAE.load(output).config["x_dim"] == 784


def test_vae_on_mnist_idx_files_and_errors(tmp_path, capsys):
    images = np.random.default_rng(0).integers(0, 256, size=(12, 28, 28), dtype=np.uint8)
    for name, rows in [("train-images-idx3-ubyte", images), ("t10k-images-idx3-ubyte", images[:4])]:
        (tmp_path / name).write_bytes(
            bytes([0, 0, 8, 3]) + np.array(rows.shape, dtype=">u4").tobytes() + rows.tobytes()
        )
    output = tmp_path / "mnist.pt"
    argv = [
        "vae",
        "--dataset",
        "mnist",
        "--data-dir",
        str(tmp_path),
        "--posterior",
        "gaussian",
        "--z-dim",
        "2",
        "--hidden-dims",
        "8",
    ]
    assert main(argv + ["--epochs", "1", "--num-samples", "5", "--no-progress", "-o", str(output)]) == 0
    assert "binarised MNIST (threshold), 28 x 28: train 10, validation 2, test 4" in capsys.readouterr().out
    assert output.exists()
    assert main(["vae", "--dataset", "mnist", "--no-progress"]) == 2
    assert "needs --data-dir" in capsys.readouterr().err
    assert main(["vae", "--posterior", "nope:3", "--epochs", "1", "--no-progress", "-o", str(output)]) == 2
    assert "unknown posterior 'nope'; valid posteriors" in capsys.readouterr().err


# --------------------------------------------------------------------------
# Nothing lost: outputs checked before any work, every file written atomically
# --------------------------------------------------------------------------


def _moons_csv(tmp_path, rows=200):
    path = tmp_path / "moons.csv"
    np.savetxt(path, datasets.two_moons(rows, seed=0).numpy(), delimiter=",")
    return path


def _no_training(monkeypatch):
    """Make any call of fit fail the test: the error must come before training."""
    from pyro_nflows import cli

    @functools.wraps(cli.fit)  # the parser reads its defaults from fit's signature
    def fit(*args, **kwargs):
        raise AssertionError("fit was called: the outputs were not checked before training")

    monkeypatch.setattr(cli, "fit", fit)


def test_an_output_whose_picture_would_overwrite_it_is_refused_before_training(tmp_path, capsys, monkeypatch):
    data = _moons_csv(tmp_path)
    _no_training(monkeypatch)
    assert main(["fit", str(data), "--no-progress", "-o", str(tmp_path / "model.png")]) == 2
    error = capsys.readouterr().err
    assert "the picture (the -o name with .png)" in error and "would be written over the model file (-o)" in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moons.csv"]


def test_the_input_data_and_the_checkpoint_are_never_written_over(tmp_path, capsys, monkeypatch):
    data = _moons_csv(tmp_path)
    before = data.read_bytes()
    _no_training(monkeypatch)
    assert main(["fit", str(data), "--no-progress", "-o", str(data)]) == 2
    assert "would be written over the input data file" in capsys.readouterr().err
    linked = tmp_path / "linked.csv"
    linked.symlink_to(data)
    assert main(["fit", str(data), "--no-progress", "-o", str(linked)]) == 2  # the same file by another name
    assert "would be written over the input data file" in capsys.readouterr().err
    argv = ["fit", str(data), "--no-progress", "-o", str(tmp_path / "run.pt"), "--checkpoint", str(tmp_path / "run.pt")]
    assert main(argv) == 2
    assert "would be written over the model file (-o)" in capsys.readouterr().err
    argv[-1] = str(tmp_path / "run.png")
    assert main(argv) == 2  # the picture would overwrite the checkpoint
    assert "picture" in capsys.readouterr().err
    assert data.read_bytes() == before


@pytest.mark.parametrize(
    "option, make, message",
    [
        ("-o", lambda tmp: tmp / "missing" / "model.pt", "the folder .*missing does not exist"),
        ("-o", lambda tmp: tmp, "it is a directory"),
        ("--checkpoint", lambda tmp: tmp / "missing" / "run.ckpt", "cannot write checkpoint .*does not exist"),
        ("--checkpoint", lambda tmp: tmp, "is a directory"),
    ],
)
def test_every_output_path_is_checked_before_the_first_epoch(tmp_path, capsys, monkeypatch, option, make, message):
    data = _moons_csv(tmp_path)
    _no_training(monkeypatch)
    argv = ["fit", str(data), "--no-progress", "-o", str(tmp_path / "model.pt"), option, str(make(tmp_path))]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert re.search(message, error) and error.count("\n") == 1 and error.startswith("pyro-nflows: error: ")


def test_a_picture_path_that_is_a_directory_is_refused_before_training(tmp_path, capsys, monkeypatch):
    data = _moons_csv(tmp_path)
    (tmp_path / "model.png").mkdir()
    _no_training(monkeypatch)
    assert main(["fit", str(data), "--no-progress", "-o", str(tmp_path / "model.pt")]) == 2
    assert re.search(r"cannot write picture .*model.png: it is a directory", capsys.readouterr().err)


def test_sample_and_score_check_their_outputs_before_the_work(tmp_path, capsys):
    model = tmp_path / "model.npy"  # a model file may have any name; its samples must not overwrite it
    DensityModel(2, num_layers=1).save(model)
    data = _moons_csv(tmp_path, rows=20)
    (tmp_path / "folder.csv").mkdir()
    for argv, message in [
        (["sample", str(model), "-o", str(model)], "samples file .* would be written over the model file"),
        (["sample", str(model), "-o", str(tmp_path / "samples.txt")], r"use a \.csv or \.npy file name"),
        (["sample", str(model), "-o", str(tmp_path / "no" / "samples.csv")], "folder .* does not exist"),
        (["score", str(model), str(data), "-o", str(data)], "scores file .* would be written over the data file"),
        (["score", str(model), str(data), "-o", str(model)], "would be written over the model file"),
        (["score", str(model), str(data), "-o", str(tmp_path / "folder.csv")], "folder.csv: it is a directory"),
    ]:
        assert main(argv) == 2, argv
        assert re.search(message, capsys.readouterr().err), argv


def test_every_expected_error_is_one_line_and_status_2(tmp_path, capsys):
    (tmp_path / "empty.pt").write_bytes(b"")
    for argv in (["sample", str(tmp_path)], ["sample", str(tmp_path / "empty.pt")],
                 ["sample", str(tmp_path / "missing.pt")], ["score", str(tmp_path / "missing.pt"), "x.csv"],
                 ["vae", "--no-progress", "-o", str(tmp_path)]):
        assert main(argv) == 2, argv
        error = capsys.readouterr().err
        assert error.startswith("pyro-nflows: error: ") and error.count("\n") == 1 and "Traceback" not in error


DRIVER = '''
"""python driver.py MARKER ARGS...: `python -m pyro_nflows.cli ARGS...`, except that writing the model
file writes half its bytes, creates MARKER and waits to be killed."""
import io
import pathlib
import runpy
import sys
import time

import torch

marker = pathlib.Path(sys.argv.pop(1))
real_save = torch.save


def save_slowly(payload, file, *args, **kwargs):
    if not (isinstance(payload, dict) and payload.get("kind") == "density"):  # checkpoints go through
        return real_save(payload, file, *args, **kwargs)
    buffer = io.BytesIO()
    real_save(payload, buffer, *args, **kwargs)
    file.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    file.flush()
    marker.write_text("writing")
    time.sleep(600)


torch.save = save_slowly
sys.argv[0] = "pyro_nflows.cli"
runpy.run_module("pyro_nflows.cli", run_name="__main__")
'''


def test_a_fit_killed_during_its_final_save_leaves_the_old_model_intact(tmp_path):
    """Fault injection: a CLI fit (a subprocess) is killed with SIGKILL in the middle of writing its
    model file, over an old model of the same name; the old model must survive, byte for byte."""
    old = DensityModel(2, num_layers=1)
    old.save(tmp_path / "model.pt")
    before = (tmp_path / "model.pt").read_bytes()
    (tmp_path / "driver.py").write_text(DRIVER)
    marker = tmp_path / "writing"
    checkpoint = tmp_path / "run.ckpt"
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg",
                   "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                                  os.environ.get("PYTHONPATH", "")])}
    argv = [sys.executable, "driver.py", str(marker), "fit", "--n", "300", "--epochs", "2", "--num-layers", "1",
            "--no-progress", "-o", "model.pt", "--checkpoint", str(checkpoint)]
    process = subprocess.Popen(argv, cwd=tmp_path, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), f"the fit never reached its final save:\n{process.stdout.read().decode()[-3000:]}"
        process.kill()  # SIGKILL: no handler, no clean-up runs
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        process.stdout.close()
    assert process.returncode == -signal.SIGKILL
    assert (tmp_path / "model.pt").read_bytes() == before
    points = datasets.two_moons(10, seed=1)
    assert torch.equal(load(tmp_path / "model.pt").log_prob(points), old.log_prob(points))
    # The kill came in the middle of the write: half a model lies in the temporary file, which nothing reads.
    [partial] = [p for p in tmp_path.iterdir() if p.name.startswith(".model.pt.") and p.name.endswith(".tmp")]
    assert 0 < partial.stat().st_size < len(before) * 2
    assert checkpoint.exists() and not (tmp_path / "model.png").exists()


def test_a_conditional_fit_then_sample_and_score_with_the_context(tmp_path, capsys):
    rng = np.random.default_rng(0)
    context = rng.normal(size=(400, 1))
    table = np.hstack([2 * context + 0.3 * rng.normal(size=(400, 1)), context, rng.normal(size=(400, 1))])
    path, output = tmp_path / "table.csv", tmp_path / "conditional.pt"
    np.savetxt(path, table, delimiter=",")
    assert main(["fit", str(path), "--context-columns", "1", "--epochs", "2", "--num-layers", "1",
                 "--no-progress", "-o", str(output)]) == 0
    assert "p(2 data columns | context columns [1])" in capsys.readouterr().out
    assert load(output).context_dim == 1 and load(output).input_dim == 2
    samples = tmp_path / "samples.npy"
    assert main(["sample", str(output), "-n", "6", "--context", "1.5", "-o", str(samples)]) == 0
    assert np.load(samples).shape == (6, 2)
    scores = tmp_path / "scores.npy"
    assert main(["score", str(output), str(path), "--context-columns", "1", "-o", str(scores)]) == 0
    model = load(output)
    data = torch.as_tensor(table, dtype=torch.float32)
    expected = model.log_prob(data[:, [0, 2]], data[:, [1]])
    assert np.allclose(np.load(scores), expected.detach().numpy(), atol=1e-5)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["score", "{model}", "{table}"], "conditional on 1 context column\\(s\\): give --context-columns"),
        (["sample", "{model}", "-n", "3"], "give --context"),
        (["sample", "{model}", "-n", "3", "--context", "a,b"], "comma-separated numbers"),
        (["score", "{model}", "{table}", "--context-columns", "7"], "distinct columns of 0..2"),
        (["score", "{model}", "{table}", "--context-columns", "0,1,2"], "leave at least one column"),
        (["fit", "{table}", "--context-columns", "x"], "column numbers such as 0,1"),
    ],
)
def test_context_errors_on_the_command_line(tmp_path, capsys, argv, message):
    table = tmp_path / "table.csv"
    np.savetxt(table, np.random.default_rng(1).normal(size=(60, 3)), delimiter=",")
    model = tmp_path / "m.pt"
    from pyro_nflows.density import DensityModel

    DensityModel(2, num_layers=1, context_dim=1).save(model)
    filled = [part.format(model=model, table=table) for part in argv]
    assert main(filled + (["--no-progress"] if filled[0] == "fit" else [])) == 2
    assert re.search(message, capsys.readouterr().err)
