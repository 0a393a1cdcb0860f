"""Variational auto-encoders with amortized flow posteriors.

``VAE(x_dim, z_dim, posterior="householder:10")`` builds the gated-MLP VAE of
the Householder-flow and ccLinIAF papers with any flow posterior of
:mod:`pyro_nflows.vae.posteriors`; ``vae.model`` / ``vae.guide`` are a Pyro
model/guide pair; :func:`train_vae` trains it (KL warm-up, early stopping)
and :func:`estimate_nll` gives its importance-sampled negative
log-likelihood.

Modules: :mod:`~pyro_nflows.vae.networks` (gated encoder and decoder),
:mod:`~pyro_nflows.vae.posteriors` (the posterior families, by spec),
:mod:`~pyro_nflows.vae.model` (the VAE), :mod:`~pyro_nflows.vae.train`
(training and likelihood estimation).
"""

from pyro_nflows.vae.model import LIKELIHOODS, VAE, load
from pyro_nflows.vae.networks import Decoder, Encoder, GatedLinear, GatedMLP
from pyro_nflows.vae.posteriors import POSTERIORS, available_posteriors, build_posterior, parse_posterior
from pyro_nflows.vae.train import VAEHistory, estimate_nll, train_vae, warmup_factor

__all__ = [
    "LIKELIHOODS",
    "POSTERIORS",
    "VAE",
    "Decoder",
    "Encoder",
    "GatedLinear",
    "GatedMLP",
    "VAEHistory",
    "available_posteriors",
    "build_posterior",
    "estimate_nll",
    "load",
    "parse_posterior",
    "train_vae",
    "warmup_factor",
]
