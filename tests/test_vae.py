"""Tests of pyro_nflows.vae: posteriors, the VAE, training and likelihood estimation."""

import copy
import math

import pyro
import pyro.optim
import pytest
import torch
from checks import check_transform
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO

from pyro_nflows.transforms import conditional_convex_triangular_linear, conditional_sylvester
from pyro_nflows.vae import (
    VAE,
    available_posteriors,
    build_posterior,
    estimate_nll,
    load,
    parse_posterior,
    train_vae,
    warmup_factor,
)
from pyro_nflows.vae import train as train_module
from pyro_nflows.vae.posteriors import HouseholderChain

X_DIM, Z_DIM, HIDDEN = 12, 3, (16,)

SPECS = [
    "gaussian",
    "householder:3",
    "convex_triangular:3",
    "iaf:2",
    "sylvester:2",
    "sylvester:2(kind='householder', count_transforms=2)",
    "sylvester:2(kind='triangular')",
    "planar:2",
    "residual:1(hidden_dims=(8,))",
    "continuous(hidden_dims=(8,), atol=1e-10, rtol=1e-10)",  # tight: the by-hand check compares to 1e-9
]


def binary_data(rows, seed=0, dtype=torch.float32):
    """Rows of X_DIM pixels from two noisy prototypes (so that there is something to learn)."""
    generator = torch.Generator().manual_seed(seed)
    prototypes = torch.tensor([[0.9] * 6 + [0.1] * 6, [0.1] * 6 + [0.9] * 6], dtype=torch.float64)
    labels = torch.randint(2, (rows,), generator=generator)
    return torch.bernoulli(prototypes[labels], generator=generator).to(dtype)


def moved(vae, scale=0.3, seed=1):
    """Every parameter moved off its initialisation, so that no flow is near the identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return vae


# --------------------------------------------------------------------------
# Posterior specs
# --------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS)
def test_every_posterior_samples_and_the_guide_scores_by_hand(spec):
    torch.manual_seed(0)
    vae = moved(VAE(X_DIM, Z_DIM, spec, hidden_dims=HIDDEN).double())
    x = binary_data(4, dtype=torch.float64)
    z = vae.posterior(x).rsample((5,))
    assert z.shape == (5, 4, Z_DIM)

    # What Trace_ELBO scores: the guide's site, through the transforms' caches.
    site = poutine.trace(vae.guide).get_trace(x).nodes["z"]
    q, z = site["fn"], site["value"]
    assert z.shape == (4, Z_DIM)
    log_q = q.log_prob(z)

    # By hand: z_0 by uncached inverses, then log N(z_0) - log|det| of the autograd Jacobian of the whole flow.
    def push(value):
        for transform in q.transforms:
            value = transform._call(value)
        return value

    z0 = z.detach()
    for transform in reversed(q.transforms):
        z0 = transform._inverse(z0)
    assert torch.allclose(push(z0), z, atol=1e-9)
    jacobian = torch.autograd.functional.jacobian(push, z0)  # (B, D, B, D), block diagonal
    rows = torch.arange(len(x))
    blocks = jacobian[rows, :, rows, :]
    loc, log_var, _ = vae.encoder(x)
    expected = torch.distributions.Normal(loc, (0.5 * log_var).exp()).log_prob(z0).sum(-1)
    expected = expected - torch.linalg.slogdet(blocks).logabsdet
    assert torch.allclose(log_q, expected, atol=1e-8)


@pytest.mark.parametrize("spec", SPECS)
def test_svi_lowers_the_loss_for_every_posterior(spec):
    torch.manual_seed(0)
    vae = VAE(X_DIM, Z_DIM, spec, hidden_dims=HIDDEN)
    x = binary_data(64)

    def negative_elbo():
        with torch.random.fork_rng(), torch.no_grad():
            torch.manual_seed(5)
            return -vae.elbo(x, num_samples=20).mean().item()

    before = negative_elbo()
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    for _ in range(40):
        svi.step(x)
    assert negative_elbo() < before - 0.5
    # SVI stepped the VAE's own parameters, not copies in the param store.
    store = pyro.get_param_store()
    for name, parameter in vae.named_parameters():
        assert store[f"{vae.pyro_name}$$${name}"] is parameter, name


def test_two_vaes_in_one_process_do_not_share_parameters():
    first, second = VAE(X_DIM, Z_DIM, hidden_dims=HIDDEN), VAE(X_DIM, Z_DIM, hidden_dims=HIDDEN)
    assert first.pyro_name != second.pyro_name
    x = binary_data(16)
    before = copy.deepcopy(first.state_dict())
    svi = SVI(second.model, second.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    for _ in range(3):
        svi.step(x)
    assert all(torch.equal(value, first.state_dict()[key]) for key, value in before.items())


def test_householder_chain_computes_each_vector_from_the_previous_one():
    chain = HouseholderChain(z_dim=4, context_dim=6, count=3)
    h = torch.randn(5, 6)
    vectors = chain.vectors(h)
    assert vectors.shape == (5, 3, 4)
    assert torch.allclose(vectors[:, 0], chain.first(h))
    assert torch.allclose(vectors[:, 1], chain.chain[0](vectors[:, 0]))
    assert torch.allclose(vectors[:, 2], chain.chain[1](vectors[:, 1]))
    # h enters through v_1 only: with v_1 independent of h, so is every v_t.
    with torch.no_grad():
        chain.first.weight.zero_()
    vectors = chain.vectors(h)
    assert torch.allclose(vectors, vectors[:1].expand_as(vectors))
    [transform] = chain(h)
    assert type(transform).__name__ == "ConditionedHouseholder"


def test_posteriors_are_amortized_linear_maps_from_h_by_default():
    flow = build_posterior("planar:2", z_dim=4, context_dim=16)
    assert all(isinstance(layer.net.net, torch.nn.Linear) for layer in flow.layers)
    iaf = build_posterior("iaf:2", z_dim=4, context_dim=16)
    assert [layer.made.order.tolist() for layer in iaf.layers] == [[0, 1, 2, 3], [3, 2, 1, 0]]
    triangular = build_posterior("sylvester:2(kind='triangular')", z_dim=4, context_dim=16)
    assert [layer.reverse for layer in triangular.layers] == [False, True]
    wide = build_posterior("planar:1(hidden_dims=(8,))", z_dim=4, context_dim=16)
    assert not isinstance(wide.layers[0].net.net, torch.nn.Linear)


@pytest.mark.parametrize(
    "helper",
    [
        lambda: conditional_convex_triangular_linear(5, 3, 3, hidden_dims=()),
        lambda: conditional_sylvester(5, 3, kind="triangular", hidden_dims=()),
    ],
    ids=["convex_triangular", "sylvester"],
)
def test_conditional_flows_linear_in_the_context_pass_the_shared_checks(helper):
    check_transform(helper, 5, 3)


def test_parse_posterior_and_its_errors():
    assert parse_posterior("householder:10") == ("householder", 10, {})
    assert parse_posterior("sylvester:4(kind=triangular)") == ("sylvester", 4, {"kind": "triangular"})
    assert parse_posterior("ccliniaf:5") == ("convex_triangular_linear", 5, {})
    assert parse_posterior("gaussian") == ("gaussian", None, {})
    for name in ["gaussian", "householder", "convex_triangular", "iaf", "sylvester", "planar"]:
        assert name in available_posteriors()
    for bad, message in [
        ("maf:2", "unknown posterior 'maf'; valid posteriors: gaussian, householder"),
        ("", "non-empty string"),
        (3, "non-empty string"),
        ("gaussian:2", "takes no count"),
        ("householder:2+planar", "one family"),
        ("householder:0", "must be an integer >= 1"),
        ("householder:2(x=1)", "takes no options"),
        ("planar:2(x=1)", "takes no option"),
        ("sylvester:2(kind='round')", "unknown Sylvester kind"),
        ("convex_triangular:1", "count_matrices must be >= 2"),
    ]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("+", r"\+")):
            VAE(X_DIM, Z_DIM, bad, hidden_dims=HIDDEN)


# --------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------


def test_beta_scales_the_kl_term_of_trace_elbo():
    torch.manual_seed(0)
    vae = moved(VAE(X_DIM, Z_DIM, "householder:2", hidden_dims=HIDDEN).double())
    x = binary_data(8, dtype=torch.float64)

    def loss(beta):
        with torch.random.fork_rng():
            torch.manual_seed(3)
            return Trace_ELBO().differentiable_loss(vae.model, vae.guide, x, beta).item()

    # The same draw for every beta: the loss is -log p(x|z) + beta (log q(z|x) - log p(z)).
    assert math.isclose(loss(0.5) - loss(0.25), (loss(1.0) - loss(0.5)) / 2, rel_tol=1e-9)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        site = poutine.trace(vae.guide).get_trace(x).nodes["z"]
    z = site["value"]
    expected = -(vae.log_joint(x, z) - site["fn"].log_prob(z)).sum().item()
    assert math.isclose(loss(1.0), expected, rel_tol=1e-9)


def test_shapes_sampling_and_gaussian_likelihood():
    vae = VAE(X_DIM, Z_DIM, "iaf:1", hidden_dims=(8, 6))
    assert vae.encoder.context_dim == 6
    x = binary_data(7)
    assert vae.elbo(x, num_samples=3).shape == (7,)
    assert vae.log_weights(x, num_samples=3).shape == (3, 7)
    pixels = vae.sample(4)
    assert pixels.shape == (4, X_DIM) and ((pixels >= 0) & (pixels <= 1)).all()
    gaussian = VAE(X_DIM, Z_DIM, likelihood="gaussian", hidden_dims=())
    assert gaussian.encoder.context_dim == X_DIM
    assert torch.isfinite(gaussian.elbo(3 * torch.randn(5, X_DIM))).all()


def test_bad_arguments_and_data_are_refused():
    for kwargs, message in [
        (dict(likelihood="poisson"), "likelihood must be one of"),
        (dict(hidden_dims=(8, 0)), "hidden_dims"),
        (dict(hidden_dims="300"), "hidden_dims"),
        (dict(z_dim=0), "z_dim"),
    ]:
        with pytest.raises(ValueError, match=message):
            VAE(**{"x_dim": X_DIM, "z_dim": Z_DIM, **kwargs})
    vae = VAE(X_DIM, Z_DIM, hidden_dims=HIDDEN)
    good = binary_data(10)
    with pytest.raises(ValueError, match=r"shape \(n, 12\)"):
        vae.check_data(torch.zeros(10, 5))
    with pytest.raises(ValueError, match=r"shape \(n, 12\)"):
        vae.check_data(torch.zeros(12))
    bad = good.clone()
    bad[3, 1], bad[7, 0] = math.nan, math.inf
    with pytest.raises(ValueError, match=r"NaN or infinite values in 2 rows \(first rows: \[3, 7\]\)"):
        train_vae(vae, bad, good, epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"Bernoulli likelihood needs data in \[0, 1\].*rows: \[2\]"):
        estimate_nll(vae, torch.cat([good[:2], 2 * good[2:3]]))
    with pytest.raises(ValueError, match="VAE"):
        vae.posterior(torch.zeros(3, 5))
    for kwargs, message in [
        (dict(epochs=0), "epochs"),
        (dict(batch_size=0), "batch_size"),
        (dict(lr=-1.0), "lr"),
        (dict(lr=math.nan), "lr"),
        (dict(warmup_epochs=-1), "warmup_epochs"),
        (dict(patience=0), "patience"),
        (dict(clip_norm=0.0), "clip_norm"),
        (dict(validation_samples=0), "validation_samples"),
    ]:
        with pytest.raises(ValueError, match=message):
            train_vae(vae, good, good, progress=False, **kwargs)
    with pytest.raises(ValueError, match="num_samples"):
        estimate_nll(vae, good, num_samples=0)


def test_save_and_load_round_trip(tmp_path):
    vae = moved(VAE(X_DIM, Z_DIM, "sylvester:2(kind='triangular')", hidden_dims=HIDDEN))
    path = tmp_path / "vae.pt"
    vae.save(path)
    loaded = load(path)
    assert loaded.config == vae.config
    x = binary_data(6)
    assert torch.equal(
        estimate_nll(vae, x, num_samples=20, seed=0, per_point=True)[1],
        estimate_nll(loaded, x, num_samples=20, seed=0, per_point=True)[1],
    )
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a model saved by VAE.save"):
        load(tmp_path / "other.pt")


# --------------------------------------------------------------------------
# Likelihood estimation on a model whose likelihood is known exactly
# --------------------------------------------------------------------------


def linear_gaussian_vae(exact_posterior, seed=0):
    r"""x = W z + b + sigma eps with W's columns orthogonal: p(x) = N(b, W W^T + sigma^2 I), and the
    posterior is the diagonal Gaussian N(S W^T (x - b) / sigma^2, S), S = (I + W^T W / sigma^2)^{-1}."""
    generator = torch.Generator().manual_seed(seed)
    x_dim, z_dim, sigma = 5, 2, 0.5
    basis = torch.linalg.qr(torch.randn(x_dim, z_dim, generator=generator, dtype=torch.float64)).Q
    weight = basis * torch.tensor([2.0, 1.0], dtype=torch.float64)
    bias = torch.randn(x_dim, generator=generator, dtype=torch.float64)
    posterior_var = 1 / (1 + (weight * weight).sum(0) / sigma**2)
    vae = VAE(x_dim, z_dim, "gaussian", hidden_dims=(), likelihood="gaussian").double()
    with torch.no_grad():
        vae.decoder.out.weight.copy_(weight)
        vae.decoder.out.bias.copy_(bias)
        vae.log_scale.fill_(math.log(sigma))
        gain = posterior_var[:, None] * weight.T / sigma**2
        vae.encoder.mean.weight.copy_(gain)
        vae.encoder.mean.bias.copy_(-gain @ bias)
        vae.encoder.log_var.weight.zero_()
        vae.encoder.log_var.bias.copy_(posterior_var.log())
        if not exact_posterior:
            moved(vae.encoder, scale=0.3, seed=seed + 1)
    marginal = torch.distributions.MultivariateNormal(
        bias, weight @ weight.T + sigma**2 * torch.eye(x_dim, dtype=torch.float64)
    )
    data = marginal.sample((20,))
    return vae, data, -marginal.log_prob(data)


def test_estimate_nll_is_exact_when_the_posterior_is():
    vae, data, exact = linear_gaussian_vae(exact_posterior=True)
    mean, per_point = estimate_nll(vae, data, num_samples=10, per_point=True)
    assert torch.allclose(per_point, exact, atol=1e-10)
    assert math.isclose(mean, exact.mean().item(), abs_tol=1e-10)
    assert torch.allclose(-vae.elbo(data), exact, atol=1e-10)  # the KL to the true posterior is 0


def test_estimate_nll_agrees_with_the_exact_value_within_its_standard_error():
    vae, data, exact = linear_gaussian_vae(exact_posterior=False)
    torch.manual_seed(0)
    samples = 5000
    estimate, per_point = estimate_nll(vae, data, num_samples=samples, batch_size=7, per_point=True)
    # Delta method: the standard error of log(mean w) is std(w) / (sqrt(S) mean(w)).
    with torch.no_grad():
        weights = (vae.log_weights(data, samples) + exact).exp()  # w / p(x), mean 1
    standard_error = (weights.std(0) / (math.sqrt(samples) * weights.mean(0))).square().sum().sqrt() / len(data)
    assert 0 < standard_error < 0.05
    assert abs(estimate - exact.mean().item()) < 4 * standard_error
    assert (per_point - exact).abs().max() < 0.2
    # The importance-sampled bound is tighter than the ELBO.
    assert estimate < -vae.elbo(data, num_samples=samples).mean().item() - 0.01


def test_chunked_and_unchunked_estimates_agree_for_the_same_draws():
    vae = moved(VAE(X_DIM, Z_DIM, "iaf:2", hidden_dims=HIDDEN).double())
    x = binary_data(9, dtype=torch.float64)
    whole = estimate_nll(vae, x, num_samples=300, sample_chunk=300, batch_size=9, seed=4, per_point=True)[1]
    chunked = estimate_nll(vae, x, num_samples=300, sample_chunk=7, batch_size=9, seed=4, per_point=True)[1]
    assert torch.allclose(whole, chunked, rtol=1e-12, atol=1e-12)
    other_seed = estimate_nll(vae, x, num_samples=300, seed=5, per_point=True)[1]
    assert not torch.equal(whole, other_seed)
    # Per point, log-mean-exp of the weights >= their mean: NLL <= -ELBO for the same draws.
    torch.manual_seed(2)
    log_weights = vae.log_weights(x, 300)
    assert ((math.log(300) - log_weights.logsumexp(0)) <= -log_weights.mean(0) + 1e-12).all()


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------


def test_warmup_factor_schedule():
    assert [warmup_factor(e, 4) for e in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0
    with pytest.raises(ValueError):
        warmup_factor(-1, 3)


def test_training_improves_the_elbo_with_warmup():
    torch.manual_seed(0)
    vae = VAE(X_DIM, Z_DIM, "householder:2", hidden_dims=HIDDEN)
    train, validation = binary_data(200, seed=1), binary_data(50, seed=2)
    before = -estimate_nll(vae, validation, num_samples=50, seed=0)
    history = train_vae(
        vae, train, validation, epochs=8, batch_size=25, lr=1e-2, warmup_epochs=4, patience=8, seed=0, progress=False
    )
    assert history.beta == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert len(history.train) == len(history.validation) == 8
    assert history.stopped == "ran all 8 epochs"
    assert -estimate_nll(vae, validation, num_samples=50, seed=0) > before + 1.0
    assert vae.history is history and not vae.training


def scripted_validation(monkeypatch, values, action=None):
    """Make train_vae see the given validation ELBOs; record the weights each epoch ends with."""
    states = []

    def fake(vae, data, batch_size, num_samples):
        states.append(copy.deepcopy(vae.state_dict()))
        epoch = len(states) - 1
        if action is not None:
            action(vae, epoch)
        return values[epoch]

    monkeypatch.setattr(train_module, "_mean_elbo", fake)
    return states


def same_weights(vae, state):
    return all(torch.equal(value, state[key]) for key, value in vae.state_dict().items())


def test_early_stopping_restores_the_best_weights_and_waits_for_the_warmup(monkeypatch):
    torch.manual_seed(0)
    vae = VAE(X_DIM, Z_DIM, "planar:1", hidden_dims=HIDDEN)
    x = binary_data(40)
    # Worse and worse during warm-up (3 epochs) does not stop it; then 2 epochs without progress do.
    states = scripted_validation(monkeypatch, [-5.0, -6.0, -7.0, -4.0, -4.5, -4.2, -1.0])
    history = train_vae(vae, x, x, epochs=7, warmup_epochs=3, patience=2, progress=False)
    assert history.best_epoch == 3
    assert history.stopped.startswith("early stop") and len(history.validation) == 6
    assert same_weights(vae, states[3]) and not same_weights(vae, states[5])


def test_divergence_keeps_the_best_weights(monkeypatch):
    vae = VAE(X_DIM, Z_DIM, hidden_dims=HIDDEN)
    x = binary_data(40)

    def poison(vae, epoch):
        if epoch == 1:  # weights that make the next epoch's loss NaN
            with torch.no_grad():
                vae.decoder.out.bias.fill_(math.nan)

    states = scripted_validation(monkeypatch, [-3.0, -4.0, -1.0], poison)
    with pytest.warns(RuntimeWarning, match="training loss became nan in epoch 3"):
        history = train_vae(vae, x, x, epochs=3, warmup_epochs=0, progress=False)
    assert history.stopped.startswith("diverged") and history.best_epoch == 0
    assert history.validation == [-3.0, -4.0]
    assert same_weights(vae, states[0]) and torch.isfinite(vae.decoder.out.bias).all()


def test_ctrl_c_stops_cleanly_keeping_the_best_weights(monkeypatch):
    vae = VAE(X_DIM, Z_DIM, hidden_dims=HIDDEN)
    x = binary_data(40)

    def interrupt(vae, epoch):
        if epoch == 2:
            raise KeyboardInterrupt

    states = scripted_validation(monkeypatch, [-3.0, -1.0, -2.0], interrupt)
    with pytest.warns(RuntimeWarning, match="interrupted"):
        history = train_vae(vae, x, x, epochs=5, warmup_epochs=0, progress=False)
    assert history.stopped == "interrupted" and history.best_epoch == 1
    assert same_weights(vae, states[1])
