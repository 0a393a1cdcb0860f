r"""Training a :class:`~pyro_nflows.vae.VAE` and estimating its likelihood.

**Training** (:func:`train_vae`, on the epoch loop of
:mod:`pyro_nflows.training`) maximises the ELBO with Pyro's
``Trace_ELBO`` over ``vae.model`` / ``vae.guide`` (its
``differentiable_loss``, stepped by a torch Adam over ``vae.parameters()``:
the same estimator as ``SVI(vae.model, vae.guide, Adam, Trace_ELBO())``, but
independent of Pyro's global param store, so that the best weights are a
plain ``state_dict`` and a non-finite loss is caught before it reaches the
weights). KL warm-up (Bowman et al. 2016; Sønderby et al. 2016) scales the
KL term by

.. math:: \beta_e = \min\bigl(1, (e + 1) / W\bigr), \qquad e = 0, 1, \dots

for ``warmup_epochs`` :math:`= W` (:func:`warmup_factor`); the validation
ELBO is always the true one (:math:`\beta = 1`), estimated with
``validation_samples`` draws per point, the same draws every epoch. Early stopping
as in Tomczak & Welling's code [2]: the best validation ELBO's weights are
kept, and the patience counter only counts epochs trained at
:math:`\beta = 1`.

**Likelihood** (:func:`estimate_nll`): the importance-sampled estimate of
Burda et al. [1], with the posterior as proposal,

.. math::

    -\log p(x) \approx -\log \frac1S \sum_{s=1}^S \frac{p(x, z_s)}{q(z_s \mid x)},
    \qquad z_s \sim q(z \mid x),

computed as a log-sum-exp of log-weights. Its expectation is a lower bound
on :math:`\log p(x)` that tightens as :math:`S` grows (:math:`S = 1` is the
ELBO), so the NLL estimate is above the true NLL by a bias that vanishes as
:math:`S \to \infty`; :math:`S = 5000` is the papers' choice.

References:

[1] Yuri Burda, Roger Grosse, Ruslan Salakhutdinov. Importance Weighted
    Autoencoders. arXiv:1509.00519
[2] Jakub M. Tomczak, Max Welling. Improving Variational Auto-Encoders using
    Householder Flow. arXiv:1611.09630
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from pyro.infer import Trace_ELBO

from pyro_nflows.training import EpochLoop, History, check_loss, gradient_step
from pyro_nflows.vae.model import VAE
from pyro_nflows.validation import check_count, check_positive

__all__ = ["VAEHistory", "estimate_nll", "train_vae", "warmup_factor"]

# Validation ELBOs use this seed every epoch (common random numbers), so that
# their differences reflect the weights, not the draws.
_VALIDATION_SEED = 1234


def warmup_factor(epoch: int, warmup_epochs: int) -> float:
    r"""The KL weight :math:`\beta` of 0-based ``epoch``: rises linearly,
    :math:`1/W, 2/W, \dots`, to 1 at epoch :math:`W - 1` and stays there
    (always 1 when ``warmup_epochs`` is 0).

    >>> [warmup_factor(e, 4) for e in range(6)]
    [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    """
    check_count("epoch", epoch, minimum=0)
    check_count("warmup_epochs", warmup_epochs, minimum=0)
    return 1.0 if warmup_epochs == 0 else min(1.0, (epoch + 1) / warmup_epochs)


@dataclass
class VAEHistory(History):
    """What :func:`train_vae` saw, per epoch: ``train``, the training objective
    (the :math:`\beta`-ELBO per point, averaged over the epoch's batches),
    ``validation``, the validation ELBO per point, and ``beta``, :math:`\beta`;
    with the best epoch and why training stopped (see
    :class:`~pyro_nflows.training.History`)."""

    beta: list[float] = field(default_factory=list)


@torch.no_grad()
def _mean_elbo(vae: VAE, data: torch.Tensor, batch_size: int, num_samples: int) -> float:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_VALIDATION_SEED)
        total = sum(vae.elbo(chunk, num_samples).double().sum().item() for chunk in data.split(batch_size))
    return total / len(data)


def _train_epoch(vae: VAE, data: torch.Tensor, optimizer, epoch: int, beta: float, batch_size: int, clip_norm) -> float:
    """One pass over ``data`` in random batches; the mean :math:`\beta`-ELBO per point."""
    loss_of = Trace_ELBO().differentiable_loss
    vae.train()
    total = 0.0
    for rows in torch.randperm(len(data)).split(batch_size):
        with warnings.catch_warnings():  # Pyro's NaN warnings: check_loss says more
            warnings.filterwarnings("ignore", message="Encountered NaN", category=UserWarning)
            loss = loss_of(vae.model, vae.guide, data[rows], beta) / len(rows)
        check_loss(loss.item(), epoch)
        gradient_step(loss, optimizer, vae.parameters(), clip_norm)
        total -= loss.item() * len(rows)
    return total / len(data)


def _check_settings(epochs, batch_size, lr, warmup_epochs, patience, clip_norm, validation_samples) -> None:
    for name, value in [("epochs", epochs), ("batch_size", batch_size), ("patience", patience)]:
        check_count(name, value)
    check_count("validation_samples", validation_samples)
    check_count("warmup_epochs", warmup_epochs, minimum=0)
    check_positive("lr", lr)
    if clip_norm is not None:
        check_positive("clip_norm", clip_norm)


def train_vae(
    vae: VAE,
    data,
    validation_data,
    epochs: int = 100,
    batch_size: int = 100,
    lr: float = 1e-3,
    warmup_epochs: int = 10,
    patience: int = 10,
    clip_norm: float | None = None,
    validation_samples: int = 10,
    seed: int | None = None,
    progress: bool = True,
) -> VAEHistory:
    r"""Train ``vae`` in place by maximising the ELBO; return the :class:`VAEHistory`.

    :param data: training data, shape ``(n, x_dim)``.
    :param validation_data: validation data for early stopping, shape ``(m, x_dim)``.
    :param epochs: maximum number of passes over ``data``.
    :param batch_size: rows per Adam step.
    :param lr: Adam's learning rate.
    :param warmup_epochs: epochs over which the KL weight rises linearly to 1
        (:func:`warmup_factor`); 0 for none.
    :param patience: stop after this many epochs at :math:`\beta = 1`
        without a better validation ELBO.
    :param clip_norm: clip the gradient norm at this value, a positive finite
        number (``None``: no clipping; ``ValueError`` for 0, negative, NaN or infinite).
    :param validation_samples: draws per point for the validation ELBO (the
        same draws every epoch): with small validation sets a one-draw
        estimate is noisy enough to pick the wrong epoch.
    :param seed: seeds torch's global generator (shuffling and the ELBO's
        draws); the model's initialisation happened when it was built.
    :param progress: show a progress bar with the train and validation ELBO.

    When training stops (``patience`` exhausted, ``epochs`` done, a loss that
    is NaN or infinite, or Ctrl-C) the weights of the best validation ELBO
    are restored, the model is put in eval mode, and ``history.stopped`` says
    why (the last two with a ``RuntimeWarning``). Also sets ``vae.history``.

    :raises ValueError: for data of the wrong shape, with NaN or infinite
        rows (named), outside ``[0, 1]`` for a Bernoulli likelihood, or for
        invalid settings.
    """
    if not isinstance(vae, VAE):
        raise ValueError(f"train_vae trains a pyro_nflows.vae.VAE, got {type(vae).__name__}")
    data = vae.check_data(data, "data")
    validation_data = vae.check_data(validation_data, "validation_data")
    _check_settings(epochs, batch_size, lr, warmup_epochs, patience, clip_norm, validation_samples)
    if seed is not None:
        torch.manual_seed(seed)
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    label = f"vae ({vae.config['posterior']})"
    loop = EpochLoop(vae, epochs, patience, metric="validation ELBO", name="train_vae", history=VAEHistory(),
                     label=label, progress=progress)
    validation_batch = max(1, 4 * batch_size // validation_samples)
    with loop:
        for epoch in loop:
            beta = warmup_factor(epoch, warmup_epochs)
            train = _train_epoch(vae, data, optimizer, epoch, beta, batch_size, clip_norm)
            vae.eval()
            validation = _mean_elbo(vae, validation_data, validation_batch, validation_samples)
            loop.history.beta.append(beta)
            loop.record(epoch, train, validation, patient=epoch + 1 >= warmup_epochs, beta=beta)
    vae.history = loop.history
    return loop.history


@torch.no_grad()
def estimate_nll(
    vae: VAE,
    data,
    num_samples: int = 5000,
    batch_size: int = 100,
    sample_chunk: int = 100,
    per_point: bool = False,
    seed: int | None = None,
) -> float | tuple[float, torch.Tensor]:
    r"""The importance-sampled negative log-likelihood :math:`-\log p(x)` of
    ``vae``, in nats, averaged over the rows of ``data`` [1].

    :param num_samples: importance samples :math:`S` per point (5000 in the papers).
    :param batch_size: data rows encoded together.
    :param sample_chunk: samples scored together: bounds the memory.
    :param per_point: also return each row's estimate, shape ``(n,)``.
    :param seed: draw the samples from a generator with this seed (default:
        torch's global one). With a seed, the result does not depend on
        ``sample_chunk``: the noise of the whole batch is drawn first.

    Memory: per batch, the noise and the log-weights, ``batch_size * S *
    (z_dim + 1)`` numbers; per chunk, the decoder's activations and the flow's
    intermediate latents, about ``batch_size * sample_chunk * (3 *
    sum(hidden_dims) + 2 * x_dim + (K + 2) * z_dim)`` numbers (``K`` flow
    layers; an IAF step adds its MADE's widths). With the defaults (100 rows,
    chunks of 100 samples), hidden ``(300, 300)``, ``x_dim = 784``,
    ``z_dim = 40``: about 8 MB for the noise and 140 MB per chunk in float32.

    Example::

        >>> vae = VAE(16, 2, hidden_dims=(8,))
        >>> x = torch.rand(10, 16).round()
        >>> estimate_nll(vae, x, num_samples=50) <= -vae.elbo(x, num_samples=200).mean().item() + 0.5
        True
    """
    if not isinstance(vae, VAE):
        raise ValueError(f"estimate_nll scores a pyro_nflows.vae.VAE, got {type(vae).__name__}")
    data = vae.check_data(data)
    for name, value in [("num_samples", num_samples), ("batch_size", batch_size), ("sample_chunk", sample_chunk)]:
        check_count(name, value)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=data.device).manual_seed(seed)
    was_training = vae.training
    vae.eval()
    estimates = []
    for rows in data.split(batch_size):
        q = vae.encode(rows)
        noise = torch.randn((num_samples,) + q.loc.shape, generator=generator, dtype=q.loc.dtype, device=q.loc.device)
        log_weights = torch.empty((num_samples, len(rows)), dtype=q.loc.dtype, device=q.loc.device)
        for start in range(0, num_samples, sample_chunk):
            z, log_q = q.rsample_with_log_prob(noise[start : start + sample_chunk])
            log_weights[start : start + sample_chunk] = vae.log_joint(rows, z) - log_q
        estimates.append(math.log(num_samples) - torch.logsumexp(log_weights, dim=0))
    vae.train(was_training)
    nll = torch.cat(estimates)
    mean = nll.double().mean().item()
    return (mean, nll) if per_point else mean
