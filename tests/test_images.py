"""Image density estimation (pyro_nflows.images): the density, the dequantisation bounds, fit_images, the CLI."""

import math

import numpy as np
import pytest
import torch

from pyro_nflows import datasets
from pyro_nflows.cli import main
from pyro_nflows.density import DensityModel
from pyro_nflows.images import (
    LOGIT_ALPHA,
    ImageDensityModel,
    PixelMap,
    bits_per_dim,
    check_images,
    fit_images,
    load,
)

DIGITS_BITS = datasets.DIGITS_BITS
TINY = dict(levels=1, steps=1, hidden_channels=4)  # a glow on 1 x 2 x 2 images


def _moved(model: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """``model`` with every parameter moved off its initialisation."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return model


def _to_noise(model: ImageDensityModel, x: torch.Tensor) -> torch.Tensor:
    for transform in reversed([*model.layers, model.pixels]):
        x = transform.inv(x)
    return x


@pytest.fixture(scope="module")
def digits():
    return datasets.split(datasets.digits_images(), (0.8, 0.1, 0.1), seed=0)


@pytest.fixture(scope="module")
def fitted(digits):
    """A small uniform and a small variational model, two epochs on the digits."""
    train, validation, _ = digits
    settings = dict(levels=2, steps=2, hidden_channels=8, num_bits=DIGITS_BITS, epochs=2, lr=3e-3,
                    validation_data=validation, seed=0, progress=False)
    return {kind: fit_images(train, dequantization=kind, dequantizer_steps=2, dequantizer_channels=8, **settings)
            for kind in ("uniform", "variational")}


# ---------------------------------------------------------------------------
# The density
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("scaling", ["logit", "centred"])
def test_the_pixel_map_and_the_whole_model_are_changes_of_variables(float64, scaling):
    pixels = PixelMap(4, scaling)
    y = torch.randn(3, 1, 2, 2)
    jacobian = torch.autograd.functional.jacobian(lambda v: pixels(v.reshape(1, 2, 2)).reshape(-1), y[0].reshape(-1))
    assert torch.allclose(pixels.log_abs_det_jacobian(y, pixels(y))[0], torch.linalg.slogdet(jacobian).logabsdet)
    assert torch.allclose(pixels.inv(pixels(y)), y)

    model = _moved(ImageDensityModel(1, 2, 2, num_bits=2, scaling=scaling, **TINY).double())
    x = 4 * torch.rand(5, 1, 2, 2)
    for point, log_prob in zip(x, model.log_prob(x)):
        jacobian = torch.autograd.functional.jacobian(lambda v: _to_noise(model, v.reshape(1, 1, 2, 2)).reshape(-1),
                                                      point.reshape(-1))
        noise = _to_noise(model, point[None])
        expected = torch.distributions.Normal(0.0, 1.0).log_prob(noise).sum() + torch.linalg.slogdet(jacobian).logabsdet
        assert torch.allclose(log_prob, expected, atol=1e-8)


def test_the_density_integrates_to_one_over_the_pixel_maps_range():
    model = _moved(ImageDensityModel(1, 2, 2, num_bits=2, **TINY))
    low, high = -LOGIT_ALPHA * 4 / (1 - 2 * LOGIT_ALPHA), (1 - LOGIT_ALPHA) * 4 / (1 - 2 * LOGIT_ALPHA)
    generator = torch.Generator().manual_seed(0)
    points = low + (high - low) * torch.rand(200_000, 1, 2, 2, generator=generator)
    with torch.no_grad():
        densities = model.distribution().log_prob(points).double().exp() * (high - low) ** 4
    error = densities.std() / math.sqrt(len(densities))
    assert abs(densities.mean() - 1) < max(4 * error, 0.01)


def test_the_bounds_are_below_the_exact_log_likelihood_and_importance_sampling_reaches_it():
    generator = torch.Generator().manual_seed(0)
    level = torch.randint(0, 4, (200, 1, 1, 1), generator=generator)
    images = (level + torch.randint(-1, 2, (200, 1, 2, 2), generator=generator)).clamp(0, 3).float()
    model = fit_images(images, num_bits=2, dequantization="variational", dequantizer_steps=2, dequantizer_channels=8,
                       epochs=3, batch_size=32, lr=3e-3, seed=0, progress=False, **{**TINY, "steps": 2})
    test = images[:3]
    middles = (torch.arange(12) + 0.5) / 12
    cube = torch.cartesian_prod(middles, middles, middles, middles).reshape(-1, 1, 2, 2)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # log P(k) = log of the integral of p over k's bin, by the midpoint rule
        exact = torch.stack([torch.logsumexp(model.log_prob(image + cube), 0) - math.log(len(cube)) for image in test])
        variational = model.log_prob_bound(test, 2000, generator=generator)
        uniform = model.log_prob_bound(test, 2000, dequantization="uniform", generator=generator)
        weighted = model.log_prob_bound(test, 2000, importance_weighted=True, generator=generator)
    assert (variational <= exact + 0.01).all() and (uniform <= exact + 0.01).all()
    assert torch.allclose(weighted, exact, atol=0.05)
    assert (weighted >= variational - 0.01).all()


# ---------------------------------------------------------------------------
# Training, sampling, saving
# ---------------------------------------------------------------------------


def test_fit_lowers_the_bits_per_dim_and_variational_beats_uniform_on_its_own_model(fitted, digits):
    test = digits[2]
    uniform, variational = fitted["uniform"], fitted["variational"]
    for model in (uniform, variational):
        history = model.history
        assert history.validation[-1] > history.validation[0] and history.stopped == "ran all 2 epochs"
    untrained = ImageDensityModel(1, 8, 8, levels=2, steps=2, hidden_channels=8, num_bits=DIGITS_BITS)
    before = bits_per_dim(untrained, test)
    after = bits_per_dim(uniform, test)
    assert after < before - 0.3 and after < DIGITS_BITS  # better than a uniform code of the 17 values
    assert bits_per_dim(variational, test) < bits_per_dim(variational, test, dequantization="uniform")
    assert bits_per_dim(uniform, test) == bits_per_dim(uniform, test)  # seeded: the same number every call


def test_samples_are_images_in_the_datas_range(fitted):
    torch.manual_seed(0)
    for model in fitted.values():
        drawn = model.sample(6)
        assert drawn.shape == (6, 1, 8, 8)
        assert torch.equal(drawn, drawn.round()) and drawn.min() >= 0 and drawn.max() <= 16
        continuous = model.sample(6, quantize=False)
        assert continuous.shape == (6, 1, 8, 8) and torch.isfinite(continuous).all()
        assert not torch.equal(continuous, continuous.round())


def test_save_and_load_give_identical_log_probs(fitted, digits, tmp_path):
    images = digits[2][:20]
    for kind, model in fitted.items():
        path = tmp_path / f"{kind}.pt"
        model.save(path)
        loaded = load(path)
        assert loaded.config == model.config
        x = images + torch.rand(images.shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.equal(loaded.log_prob(x), model.log_prob(x))
            bounds = [m.log_prob_bound(images, generator=torch.Generator().manual_seed(3)) for m in (loaded, model)]
        assert torch.equal(*bounds)
    DensityModel(2, num_layers=1).save(tmp_path / "vector.pt")
    with pytest.raises(ValueError, match="its kind is 'density', not 'images'"):
        load(tmp_path / "vector.pt")


def test_an_interrupted_fit_resumes_exactly_from_its_checkpoint(tmp_path, monkeypatch, digits):
    images = digits[0][:120]
    settings = dict(levels=2, steps=1, hidden_channels=4, num_bits=DIGITS_BITS, epochs=4, batch_size=36, patience=100,
                    seed=0, progress=False)
    uninterrupted = fit_images(images, **settings)

    checkpoint = tmp_path / "run.ckpt"
    calls = {"count": 0}
    original = ImageDensityModel.forward

    def interrupt_in_epoch_three(self, images, noise):
        calls["count"] += self.training
        if calls["count"] > 1 + 2 * 3:  # the actnorm initialisation, then three batches per epoch
            raise KeyboardInterrupt
        return original(self, images, noise)

    monkeypatch.setattr(ImageDensityModel, "forward", interrupt_in_epoch_three)
    with pytest.warns(RuntimeWarning, match="resume with fit_images"):
        interrupted = fit_images(images, checkpoint=checkpoint, **settings)
    monkeypatch.undo()
    assert interrupted.history.stopped == "interrupted" and len(interrupted.history.validation) == 2

    resumed = fit_images(images, checkpoint=checkpoint, **settings)
    assert resumed.history.validation == uninterrupted.history.validation
    x = images[:10] + 0.5
    assert torch.equal(resumed.log_prob(x), uninterrupted.log_prob(x))
    with pytest.raises(ValueError, match="other data or settings"):
        fit_images(images, checkpoint=checkpoint, **{**settings, "conv": "periodic"})


def test_a_loss_that_turns_nan_keeps_the_best_weights(monkeypatch, digits):
    original, calls = ImageDensityModel.forward, {"count": 0}

    def nan_in_epoch_two(self, images, noise):
        calls["count"] += self.training
        result = original(self, images, noise)
        return result * float("nan") if calls["count"] > 1 + 3 else result  # the actnorm initialisation, 3 batches

    monkeypatch.setattr(ImageDensityModel, "forward", nan_in_epoch_two)
    with pytest.warns(RuntimeWarning, match="fit_images stopped: the training loss became nan in epoch 2"):
        model = fit_images(digits[0][:120], levels=2, steps=1, hidden_channels=4, num_bits=DIGITS_BITS, epochs=3,
                           batch_size=40, seed=0, progress=False)
    assert model.history.stopped.startswith("diverged") and len(model.history.validation) == 1


# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------


def test_the_command_line_writes_a_model_and_a_picture_of_samples(tmp_path, capsys):
    output = tmp_path / "digits.pt"
    argv = ["fit-images", "--epochs", "1", "--steps", "1", "--hidden-channels", "4", "--no-progress", "-o", str(output)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "test bits/dim (uniform dequantization bound)" in printed and "train 1437, validation 180" in printed
    assert load(output).event_shape == (1, 8, 8)
    assert output.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    for args, message in [
        (["-o", str(tmp_path)], "it is a directory"),
        (["-o", str(tmp_path / "missing" / "m.pt")], "does not exist"),
        (["--levels", "4"], "multiples of 16"),
        (["--dataset", "mnist"], "needs --data-dir"),
    ]:
        assert main(["fit-images", "--epochs", "1", "--no-progress", *args]) == 2
        error = capsys.readouterr().err
        assert error.startswith("pyro-nflows: error:") and message in error and error.count("\n") == 1


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "images, message",
    [
        (torch.zeros(10, 64), r"images of shape \(n, C, H, W\)"),
        (torch.zeros(1, 8, 8), r"images of shape \(n, C, H, W\)"),
        ("digits", "must be a torch.Tensor or numpy array"),
        (torch.full((4, 1, 8, 8), 17.0), "outside the declared range 0..16"),
        (torch.full((4, 1, 8, 8), -1.0), "outside the declared range"),
        (torch.full((4, 1, 8, 8), 2.5), "not integer pixel levels"),
        (torch.zeros(4, 1, 8, 8).index_fill_(0, torch.tensor([2]), float("nan")), r"NaN .* \(first: \[2\]\)"),
        (torch.zeros(1, 1, 8, 8), "at least 2"),
    ],
)
def test_bad_images_are_refused(images, message):
    with pytest.raises(ValueError, match=message):
        fit_images(images, num_bits=DIGITS_BITS, epochs=1, progress=False)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(levels=4), "multiples of 16"),
        (dict(conv="conv3x3"), "conv must be one of"),
        (dict(dequantization="gaussian"), "dequantization must be one of"),
        (dict(scaling="log"), "scaling must be one of"),
        (dict(num_bits=3.3), "log2 of the number of values"),
        (dict(num_bits=0), r"num_bits must be a number in \(0, 24\]"),
        (dict(epochs=0), "epochs must be an integer >= 1"),
        (dict(validation_data=torch.zeros(3, 1, 4, 4)), r"validation_data must be images of shape \(n, 1, 8, 8\)"),
    ],
)
def test_bad_options_are_refused(options, message):
    images = datasets.digits_images()[:20]
    with pytest.raises(ValueError, match=message):
        fit_images(images, **{"num_bits": DIGITS_BITS, "epochs": 1, "progress": False, **options})


def test_the_model_refuses_bad_points_and_requests():
    model = ImageDensityModel(1, 8, 8, levels=2, steps=1, hidden_channels=4, num_bits=DIGITS_BITS)
    with pytest.raises(ValueError, match=r"\(\.\.\., 1, 8, 8\)"):
        model.log_prob(torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"outside the declared range 0..17"):
        model.log_prob(torch.full((2, 1, 8, 8), 17.5))
    assert model.log_prob(17 * torch.rand(2, 1, 8, 8)).shape == (2,)  # dequantised values are scored
    with pytest.raises(ValueError, match="not integer pixel levels"):
        model.log_prob_bound(torch.full((2, 1, 8, 8), 15.5))
    with pytest.raises(ValueError, match="built with uniform dequantization"):
        model.log_prob_bound(torch.zeros(2, 1, 8, 8), dequantization="variational")
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        model.sample(0)
    assert check_images(np.zeros((2, 1, 8, 8), dtype=np.uint8), 17).dtype == torch.float32
