"""Conditional density estimation: ``fit(x, context=c)`` and the conditional ``DensityModel``.

The reference is a conditional Gaussian whose mean and spread depend on the
context, so that the KL divergence from the truth is known exactly:
x | c ~ N(A c + b, e^{c} L L^T) in two dimensions, c one-dimensional.
"""

import pytest
import torch
from torch import nn

from pyro_nflows.density import DensityModel, fit, load

A = torch.tensor([[1.5], [-1.0]])
B = torch.tensor([0.5, 0.0])
L = torch.tensor([[1.0, 0.0], [0.8, 0.6]])
SMALL = dict(num_layers=2, hidden_dims=[32, 32], batch_size=128, progress=False, seed=0)


def _draw(context: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    spread = torch.exp(0.5 * context)
    return context @ A.T + B + spread * (torch.randn(len(context), 2, generator=generator) @ L.T)


def _true_log_prob(x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    spread = torch.exp(0.5 * context)
    gaussian = torch.distributions.MultivariateNormal(torch.zeros(2), scale_tril=L)
    return gaussian.log_prob((x - context @ A.T - B) / spread) - 2 * torch.log(spread).squeeze(-1)


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    context = torch.randn(n, 1, generator=generator)
    return _draw(context, generator), context


@pytest.fixture(scope="module")
def fitted():
    x, context = _data(2000, seed=0)
    return fit(x, context=context, epochs=30, **SMALL)


def test_the_conditional_model_learns_the_conditional_density(fitted):
    """KL(p(x | c) || q(x | c)), averaged over c, on held-out draws: an
    unconditional flow of the same size, which must ignore c, stays at about
    1.6 nats on these data; the conditional one gets close to 0."""
    x, context = _data(2000, seed=1)
    with torch.no_grad():
        kl = (_true_log_prob(x, context) - fitted.log_prob(x, context)).mean().item()
    assert kl < 0.1, kl
    assert fitted.history.stopped and len(fitted.history.validation) == 30


def test_shapes_of_scores_samples_and_the_distribution(fitted):
    torch.manual_seed(0)
    row = torch.tensor([0.3])
    assert fitted.sample(7, row).shape == (7, 2)
    assert fitted.sample(7, torch.randn(4, 1)).shape == (4, 7, 2)
    assert fitted.log_prob(torch.randn(5, 2), torch.randn(5, 1)).shape == (5,)
    assert fitted.log_prob(torch.randn(3, 5, 2), torch.randn(5, 1)).shape == (3, 5)  # the context broadcasts
    distribution = fitted.distribution(torch.randn(4, 1))
    assert distribution.batch_shape == (4,) and distribution.event_shape == (2,)
    draws = distribution.sample((6,))
    assert draws.shape == (6, 4, 2) and distribution.log_prob(draws).shape == (6, 4)


def test_samples_follow_the_context(fitted):
    torch.manual_seed(1)
    for value in (-1.0, 1.0):
        draws = fitted.sample(4000, torch.tensor([value]))
        expected = A[:, 0] * value + B
        assert torch.allclose(draws.mean(0), expected, atol=0.15), (value, draws.mean(0), expected)


def test_save_and_load_give_the_same_conditional_densities(fitted, tmp_path):
    path = tmp_path / "conditional.pt"
    fitted.save(path)
    loaded = load(path)
    x, context = _data(10, seed=2)
    assert loaded.context_dim == 1
    assert torch.equal(loaded.log_prob(x, context), fitted.log_prob(x, context))


class _Embedding(nn.Module):
    """Reads a context of 3 columns, of which only the first matters."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 4))

    def forward(self, context):
        return self.net(context)


def test_an_embedding_is_trained_jointly_and_its_weights_saved(tmp_path):
    x, context = _data(600, seed=3)
    raw = torch.cat([context, torch.randn(600, 2)], dim=1)
    embedding = _Embedding()
    before = [p.detach().clone() for p in embedding.parameters()]
    model = fit(x, context=raw, embedding=embedding, epochs=3, **SMALL)
    assert model.config["embedded_dim"] == 4 and model.embedding is embedding
    assert all(not torch.equal(b, p) for b, p in zip(before, embedding.parameters()))
    path = tmp_path / "embedded.pt"
    model.save(path)
    loaded = DensityModel.load(path, embedding=_Embedding())
    assert torch.equal(loaded.log_prob(x[:5], raw[:5]), model.log_prob(x[:5], raw[:5]))
    with pytest.raises(ValueError, match="trained with an embedding of the context"):
        load(path)


def test_a_constant_context_column_is_standardised_with_scale_one():
    x, context = _data(300, seed=4)
    constant = torch.cat([context, torch.full((300, 1), 2.0)], dim=1)
    model = fit(x, context=constant, epochs=1, **SMALL)
    assert model.context_scale[1] == 1.0 and torch.isfinite(model.log_prob(x[:4], constant[:4])).all()


def test_a_checkpoint_resumes_a_conditional_fit_and_refuses_another_context(tmp_path):
    x, context = _data(400, seed=5)
    path = tmp_path / "run.ckpt"
    first = fit(x, context=context, epochs=2, checkpoint=path, **SMALL)
    again = fit(x, context=context, epochs=2, checkpoint=path, **SMALL)  # finished: nothing more to train
    assert again.history.validation == first.history.validation
    with pytest.raises(ValueError, match="other data"):
        fit(x, context=context + 1, epochs=2, checkpoint=path, **SMALL)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x, c, m: fit(x, context=c[:-1], epochs=1, **SMALL), "has 400 rows but its context has 399"),
        (lambda x, c, m: fit(x, context=c.masked_fill(c > 2, float("nan")), epochs=1, **SMALL), "NaN or infinite"),
        (
            lambda x, c, m: fit(x, context=c, validation_data=x[:50], epochs=1, **SMALL),
            "validation_context exactly when you give context",
        ),
        (lambda x, c, m: fit(x, validation_data=x[:50], validation_context=c[:50], epochs=1, **SMALL), "exactly"),
        (lambda x, c, m: fit(x, validation_context=c[:50], epochs=1, **SMALL), "goes with validation_data"),
        (lambda x, c, m: m.log_prob(x), "conditional on a context of width 1: pass the context"),
        (lambda x, c, m: m.sample(3), "conditional on a context of width 1"),
        (lambda x, c, m: m.log_prob(x, torch.randn(400, 2)), "last dimension is 1"),
        (lambda x, c, m: m.log_prob(x, c.double().masked_fill(c > 2, float("inf"))), "non-finite context"),
        (lambda x, c, m: DensityModel(2).log_prob(x, c), "not conditional"),
        (lambda x, c, m: DensityModel(2, embedding=nn.Linear(1, 3)), "give context_dim"),
        (lambda x, c, m: DensityModel(2, context_dim=1, embedding=nn.Linear(2, 3)), "embedding must map contexts"),
    ],
)
def test_bad_contexts_are_refused(call, message):
    x, context = _data(400, seed=6)
    model = DensityModel(2, num_layers=1, context_dim=1)
    with pytest.raises(ValueError, match=message):
        call(x, context, model)
