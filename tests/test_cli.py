import numpy as np
import torch

from pyro_nflows import datasets
from pyro_nflows.cli import main
from pyro_nflows.density import load


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
