import math

import numpy as np
import pytest
import torch

from pyro_nflows import datasets, density
from pyro_nflows.density import DensityModel, check_data, fit, load
from pyro_nflows.registry import build_flow
from pyro_nflows.saving import FORMAT_VERSION

# The Gaussian the fit tests draw from: x = MEAN + MIXING @ noise.
MIXING = torch.tensor([[2.0, 0.0], [1.5, 0.5]])
MEAN = torch.tensor([10.0, -3.0])


def _gaussian_data(n=600, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=generator) @ MIXING.T + MEAN


def test_fit_learns_and_densities_are_in_data_units():
    data = _gaussian_data()
    model = fit(data, num_layers=2, epochs=40, batch_size=128, lr=1e-2, seed=0, progress=False)
    history = model.history
    assert history.validation[history.best_epoch] == max(history.validation)
    assert history.train[-1] > history.train[0]
    # The true density is N(mean, A A^T). KL(true || model), estimated on 20,000
    # exact draws scored by both (paired, so the draws' own noise cancels, about
    # 0.002 here), is small only if the model's densities are in the data's units.
    true = torch.distributions.MultivariateNormal(MEAN, MIXING @ MIXING.T)
    draws = true.sample((20_000,))
    kl = (true.log_prob(draws) - model.log_prob(draws)).mean().item()
    assert 0 < kl < 0.1


def test_samples_follow_the_data():
    data = _gaussian_data(n=1000)
    model = fit(data, num_layers=2, epochs=40, batch_size=128, lr=1e-2, seed=0, progress=False)
    samples = model.sample(4000)
    assert samples.shape == (4000, 2)
    assert torch.allclose(samples.mean(0), data.mean(0), atol=0.2)
    assert torch.allclose(samples.std(0), data.std(0), rtol=0.15)


def test_save_and_load_restore_the_model_exactly(tmp_path):
    data = datasets.two_moons(500, seed=0)
    model = fit(data, num_layers=2, epochs=2, seed=0, progress=False)
    path = tmp_path / "model.pt"
    model.save(path)
    restored = load(path)
    points = datasets.two_moons(50, seed=1)
    assert torch.equal(model.log_prob(points), restored.log_prob(points))
    assert restored.config == model.config


def test_load_refuses_other_files(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="not a model saved by DensityModel.save"):
        load(path)
    # nor a model of another kind (a VAE), which its JSON configuration would not rebuild
    from pyro_nflows.vae import VAE

    VAE(4, 2).save(path)
    with pytest.raises(ValueError, match="its kind is 'vae', not 'density'"):
        load(path)
    # nor a file from an older format, whose weights mean another density
    DensityModel(2, num_layers=1).save(path)
    payload = torch.load(path, weights_only=True)
    torch.save({**payload, "format": 1}, path)
    expected = f"has format 1; this version reads {FORMAT_VERSION} .*CHANGELOG.md.*fit or train the model again"
    with pytest.raises(ValueError, match=expected):
        load(path)


def test_fit_stops_early_and_restores_the_best_weights():
    data = _gaussian_data(n=200)
    model = fit(data, num_layers=1, epochs=200, lr=5e-2, patience=3, seed=0, progress=False)
    history = model.history
    assert "early stop" in history.stopped
    assert len(history.validation) == history.best_epoch + 1 + 3
    # The restored weights score the validation data as at the best epoch.
    assert history.validation[history.best_epoch] == max(history.validation)


def test_divergence_stops_with_a_warning_and_keeps_the_best_model(monkeypatch):
    data = _gaussian_data(n=200)
    calls = {"count": 0}
    original = DensityModel.log_prob

    def diverging(self, x):  # healthy for a while, then NaN, as a blown-up run would be
        calls["count"] += 1
        result = original(self, x)
        return result if calls["count"] < 12 or not self.training else result * float("nan")

    monkeypatch.setattr(DensityModel, "log_prob", diverging)
    with pytest.warns(RuntimeWarning, match="loss became nan.*restoring the best weights so far"):
        model = fit(data, num_layers=1, epochs=50, seed=0, progress=False)
    monkeypatch.undo()
    assert "diverged" in model.history.stopped
    assert model.history.best_epoch >= 0
    assert torch.isfinite(model.log_prob(data)).all()


@pytest.mark.parametrize(
    "data, message",
    [
        (
            torch.tensor([[0.0, 1.0], [float("nan"), 2.0], [1.0, float("inf")]] + [[3.0, 4.0], [5.0, 7.0]] * 4),
            r"NaN or infinite values in 2 rows \(first rows: \[1, 2\]\) and columns \[0, 1\]",
        ),
        (torch.stack([torch.randn(20), torch.full((20,), 3.0)], 1), r"constant columns \[1\]"),
        (torch.randn(1, 2), "at least 2 rows"),
        (torch.randn(10), "2-D array"),
        (
            torch.cat([torch.randn(5, 2, dtype=torch.float64), torch.tensor([[1.0, -1e200]], dtype=torch.float64),
                       torch.randn(5, 2, dtype=torch.float64)]),
            r"values that overflow float32.* in 1 rows \(first rows: \[5\]\) and columns \[1\]",
        ),
        (
            torch.stack([torch.randn(20, dtype=torch.float64), 1e-50 * torch.randn(20, dtype=torch.float64)], 1),
            r"columns \[1\] become constant when rounded to float32",
        ),
        (
            torch.stack([torch.randn(20, dtype=torch.float64), 1e8 + 1e-3 * torch.randn(20, dtype=torch.float64)], 1),
            r"columns \[1\] become constant when rounded to float32",
        ),
    ],
)
def test_bad_data_is_named(data, message):
    with pytest.raises(ValueError, match=message):
        check_data(data)
    with pytest.raises(ValueError, match=message):
        fit(data, progress=False)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"epochs": 0}, "epochs"),
        ({"lr": -1.0}, "lr"),
        ({"validation_fraction": 1.5}, "validation_fraction"),
        ({"num_layers": 0}, "num_layers"),
        ({"flow": "nope"}, "unknown flow"),
        ({"clip_norm": 0}, "clip_norm must be a positive finite number, got 0"),
        ({"clip_norm": -1.0}, "clip_norm must be a positive finite number, got -1.0"),
        ({"clip_norm": float("nan")}, "clip_norm must be a positive finite number, got nan"),
        ({"clip_norm": float("inf")}, "clip_norm must be a positive finite number, got inf"),
        ({"clip_norm": "5"}, "clip_norm must be a positive finite number, got '5'"),
    ],
)
def test_bad_hyper_parameters_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fit(_gaussian_data(n=50), progress=False, **kwargs)


def test_log_prob_checks_the_width():
    model = DensityModel(2, num_layers=1)
    with pytest.raises(ValueError, match="last dimension is 2"):
        model.log_prob(torch.randn(3, 3))


def test_log_prob_takes_tensors_and_refuses_points_that_are_not_finite_naming_them():
    model = DensityModel(2, num_layers=1)
    with pytest.raises(ValueError, match="DensityModel.log_prob expects a torch.Tensor point, got ndarray"):
        model.log_prob(np.zeros((3, 2)))
    points = torch.randn(4, 3, 2)
    points[1, 2, 0], points[3, 0, 1] = float("nan"), float("-inf")
    with pytest.raises(ValueError, match=r"NaN or infinite values in 2 point\(s\) \(first: \[\(1, 2\), \(3, 0\)\]\)"):
        model.log_prob(points)
    wide = torch.tensor([[0.0, 1.0], [1e200, 0.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"values that overflow float32 in 1 point\(s\) \(first: \[1\]\)"):
        model.log_prob(wide)
    assert model.log_prob(wide[:1]).shape == (1,)  # finite float64 points are scored as before


def test_log_prob_of_points_the_flow_sends_to_infinity_names_them_instead_of_pyros_dump():
    model = DensityModel(2, num_layers=1)
    with torch.no_grad():
        model.scale.fill_(0.25)  # 3e38 / 0.25 overflows float32 inside the flow
    with pytest.raises(ValueError, match=r"the flow sends 1 point\(s\) \(first: \[1\]\) to infinity or NaN"):
        model.log_prob(torch.tensor([[0.0, 1.0], [3e38, 0.0]]))


def test_points_sent_to_infinity_are_named_with_torchs_validation_off():
    """torch.compile switches torch's distribution checks off for the whole process."""
    model = DensityModel(2, num_layers=1)
    with torch.no_grad():
        model.scale.fill_(0.25)
    default = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(False)
    try:
        with pytest.raises(ValueError, match=r"the flow sends 1 point\(s\) \(first: \[1\]\) to infinity or NaN"):
            model.log_prob(torch.tensor([[0.0, 1.0], [3e38, 0.0]]))
        assert torch.distributions.Distribution._validate_args is False  # the caller's setting is left as it was
    finally:
        torch.distributions.Distribution.set_default_validate_args(default)


def test_sample_refuses_an_absurd_n_before_drawing(monkeypatch):
    model = DensityModel(2, num_layers=1)
    with pytest.raises(ValueError, match=r"sample\(n=1000000000000\) would need about .* GiB .* draw fewer"):
        model.sample(10**12)
    for n in (0, -5, 2.5):
        with pytest.raises(ValueError, match="n must be an integer >= 1"):
            model.sample(n)

    def no_memory(self, *args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(torch.distributions.TransformedDistribution, "sample", no_memory)
    with pytest.raises(MemoryError, match=r"sample\(n=1000\) ran out of memory; draw fewer"):
        model.sample(1000)


def test_presets_normalization_and_hidden_dims():
    model = DensityModel(3, "nsf", num_layers=3, hidden_dims=[8, 8], normalization="actnorm")
    names = [type(t).__name__ for t in model.layers]
    assert names == ["MaskedAutoregressive", "ActNorm"] * 2 + ["MaskedAutoregressive"]
    assert [t.made.order.tolist() for t in model.layers[::2]] == [[0, 1, 2], [2, 1, 0], [0, 1, 2]]
    assert model.layers[0].made.weights[0].shape == (8, 3)
    realnvp = DensityModel(4, "realnvp", num_layers=2, normalization="batchnorm")
    assert [type(t).__name__ for t in realnvp.layers] == ["AffineCoupling", "BatchNorm", "AffineCoupling"]
    with pytest.raises(ValueError, match="hidden_dims applies to the presets"):
        DensityModel(3, "lu_linear", hidden_dims=[8])
    with pytest.raises(ValueError, match="normalization"):
        DensityModel(3, normalization="layernorm")


def test_spline_couplings_score_data_with_the_spline_unless_the_spec_says_otherwise():
    """A density model is trained by scoring data: its spline couplings evaluate
    the spline from the data side (the layer's own default is the noise side)."""
    assert {t.spline_from for t in DensityModel(4, "spline_coupling", num_layers=2).layers[::2]} == {"x"}
    chosen = DensityModel(4, "spline_coupling(spline_from=z)", num_layers=2)
    assert {t.spline_from for t in chosen.layers[::2]} == {"z"}


def _starts_at_identity(coupling) -> bool:
    last = coupling.net.net.layers[-1]
    return bool((last.weight == 0).all() and (last.bias == 0).all())


@pytest.mark.parametrize("flow", ["realnvp", "additive_coupling"])
def test_density_couplings_do_not_start_at_the_identity_unless_the_spec_says_so(flow):
    """fit's affine and additive couplings start as a mild random map (they
    train better from there); the layer's own default, and a spec that asks
    for it, start at the identity."""
    couplings = DensityModel(4, flow, num_layers=2).layers[::2]
    assert len(couplings) == 2 and not any(_starts_at_identity(t) for t in couplings)
    name = "affine_coupling" if flow == "realnvp" else flow
    chosen = DensityModel(4, f"{name}(identity_init=True)", num_layers=2).layers[::2]
    assert all(_starts_at_identity(t) for t in chosen)
    assert _starts_at_identity(build_flow(name, 4)[0])


def test_density_mafs_do_not_start_near_the_identity_unless_the_spec_says_so():
    """fit's MAF layers start as a mild random map: output weights of torch's
    initialisation over sqrt(D) (up to 1/sqrt(64) / 2 here), not times 1e-2."""
    def largest_output_weight(flow):
        return max(t.made.weights[-1].abs().max().item() for t in DensityModel(4, flow, num_layers=2).layers[::2])

    assert largest_output_weight("maf") > 1e-2
    assert largest_output_weight("maf(identity_init=True)") <= 1e-2 / 8
    assert largest_output_weight("nsf") <= 1e-2 / 8  # the spline flows keep their start


def test_density_spline_couplings_start_at_the_identity():
    """From a random start they trained worse (rings); they take no identity_init."""
    couplings = DensityModel(4, "spline_coupling", num_layers=2).layers[::2]
    assert len(couplings) == 2 and all(_starts_at_identity(t) for t in couplings)
    with pytest.raises(ValueError, match=r"takes no option \['identity_init'\]"):
        DensityModel(4, "spline_coupling(identity_init=False)", num_layers=2)


def test_an_interrupted_fit_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    data = _gaussian_data(n=300)
    settings = dict(num_layers=1, epochs=6, batch_size=64, patience=100, seed=0, progress=False)
    uninterrupted = fit(data, **settings)

    checkpoint = tmp_path / "run.ckpt"
    calls = {"count": 0}
    original = DensityModel.log_prob

    def interrupt_in_epoch_four(self, x):
        calls["count"] += 1
        if self.training and calls["count"] > 3 * 5 + 2:  # 5 batches and a validation pass per epoch
            raise KeyboardInterrupt
        return original(self, x)

    monkeypatch.setattr(DensityModel, "log_prob", interrupt_in_epoch_four)
    with pytest.warns(RuntimeWarning, match="resume with fit"):
        interrupted = fit(data, checkpoint=checkpoint, **settings)
    monkeypatch.undo()
    assert interrupted.history.stopped == "interrupted"
    assert checkpoint.exists() and 1 <= len(interrupted.history.validation) < 6

    resumed = fit(data, checkpoint=checkpoint, **settings)
    assert resumed.history.validation == pytest.approx(uninterrupted.history.validation, abs=1e-5)
    points = _gaussian_data(n=20, seed=5)
    assert torch.allclose(resumed.log_prob(points), uninterrupted.log_prob(points), atol=1e-5)


def test_a_checkpoint_from_other_data_is_refused(tmp_path):
    checkpoint = tmp_path / "run.ckpt"
    fit(_gaussian_data(n=100), num_layers=1, epochs=1, seed=0, progress=False, checkpoint=checkpoint)
    with pytest.raises(ValueError, match="written for other data or settings"):
        fit(_gaussian_data(n=100, seed=3), num_layers=1, epochs=1, seed=0, progress=False, checkpoint=checkpoint)


def _changed_value(data):
    changed = data.clone()
    changed[17, 1] = torch.nextafter(changed[17, 1], torch.tensor(math.inf))  # the smallest change float32 has
    return changed


@pytest.mark.parametrize(
    "change, differ",
    [
        (lambda data: data[:, [1, 0]], "data"),
        (_changed_value, "data"),
        (lambda data: data[torch.arange(len(data)).roll(1)], "data"),  # the same rows in another order
        ({"clip_norm": 1.0}, "settings"),
        ({"patience": 7}, "settings"),
        ({"lr": 2e-3}, "settings"),
    ],
)
def test_a_resume_with_any_change_of_the_data_or_the_settings_is_refused(tmp_path, change, differ):
    data = _gaussian_data(n=100)
    data[:, 1] = data[:, 0].flip(0)  # two columns of the same sum: swapping them keeps every sum and shape
    settings = dict(num_layers=1, epochs=2, seed=0, progress=False, checkpoint=tmp_path / "run.ckpt",
                    validation_data=data[:10])
    fit(data, **settings)
    if callable(change):
        again = (change(data), settings)
    else:
        again = (data, {**settings, **change})
    with pytest.raises(ValueError, match=rf"written for other data or settings \(its {differ} differ\)"):
        fit(again[0], **again[1])
    fit(data, **settings)  # and the same data and settings still resume


def test_a_checkpoint_that_cannot_be_written_fails_before_the_first_epoch(tmp_path, monkeypatch):
    def no_epochs(self, epoch):
        raise AssertionError("an epoch ran")

    monkeypatch.setattr(density._Epochs, "train", no_epochs)
    with pytest.raises(FileNotFoundError, match="cannot write checkpoint .*missing.*does not exist"):
        fit(_gaussian_data(n=50), checkpoint=tmp_path / "missing" / "run.ckpt", progress=False)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        fit(_gaussian_data(n=50), checkpoint=tmp_path, progress=False)


def test_batchnorm_folds_a_last_batch_of_one_row_into_the_one_before():
    data = _gaussian_data(n=101)  # 91 training rows: ten batches of 9 and one row, whose batch variance is undefined
    model = fit(data, num_layers=2, normalization="batchnorm", epochs=2, batch_size=9, seed=0, progress=False)
    assert model.history.stopped == "ran all 2 epochs"
    assert torch.isfinite(model.log_prob(data)).all()
    with pytest.raises(ValueError, match="batchnorm.*at least 2 rows"):
        fit(data, num_layers=2, normalization="batchnorm", batch_size=1, progress=False)


def test_fit_without_a_seed_follows_the_callers_global_seed():
    data = _gaussian_data(n=120)
    results = []
    for _ in range(2):
        torch.manual_seed(7)
        model = fit(data, num_layers=1, epochs=2, progress=False)
        results.append((model.log_prob(data[:5]), torch.rand(3)))  # and the caller's stream goes on the same
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
