import numpy as np
import torch

from pyro_nflows import datasets
from pyro_nflows.cli import main
from pyro_nflows.density import load


def test_fit_on_the_default_dataset_writes_a_model(tmp_path, capsys):
    output = tmp_path / "model.pt"
    status = main(["fit", "--n", "600", "--epochs", "2", "--layers", "1", "--no-progress", "-o", str(output)])
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
    assert main(["fit", str(path), "--epochs", "1", "--layers", "1", "--no-progress", "-o", str(output)]) == 0
    assert load(output).input_dim == 3


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["fit", "--flow", "nope", "--n", "100", "--epochs", "1", "--no-progress", "-o", str(tmp_path / "m.pt")]) == 2
    assert "unknown flow 'nope'" in capsys.readouterr().err
    assert main(["fit", str(tmp_path / "missing.csv"), "--no-progress"]) == 2


def test_flows_lists_the_registry(capsys):
    assert main(["flows"]) == 0
    assert "householder" in capsys.readouterr().out
