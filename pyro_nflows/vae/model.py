r"""The VAE: a gated-MLP encoder, an amortized flow posterior, a gated-MLP decoder.

.. math::

    p(x, z) = \mathcal N(z; 0, I)\, p(x \mid z), \qquad
    q(z \mid x) = \text{a Gaussian pushed through flows (see :mod:`pyro_nflows.vae.posteriors`)},

with :math:`p(x \mid z)` a product of Bernoullis with logits
:math:`\mathrm{decoder}(z)` (``likelihood="bernoulli"``, for data in
:math:`[0, 1]`: a proper likelihood for binary data, the usual cross-entropy
for grey levels) or of Gaussians with mean :math:`\mathrm{decoder}(z)` and a
learned per-coordinate scale (``likelihood="gaussian"``).

For Pyro: ``vae.model(x)`` and ``vae.guide(x)`` are a model/guide pair over
the sites ``"z"`` and ``"x"`` inside ``pyro.plate("data", len(x))``; both
take ``beta``, which scales the latent site (``poutine.scale``) in both, so
that ``Trace_ELBO`` optimises :math:`E_q[\log p(x \mid z)] - \beta\,
\mathrm{KL}(q \,\|\, p)` (KL warm-up, :func:`~pyro_nflows.vae.train.warmup_factor`).
Each VAE registers its parameters with Pyro's param store under its own name
(``vae.pyro_name``), so that two VAEs in one process never share parameters::

    svi = pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), pyro.infer.Trace_ELBO())

For evaluation without Pyro's tracing, :meth:`VAE.log_weights` gives
:math:`\log p(x, z_s) - \log q(z_s \mid x)` for :math:`z_s \sim q`; the ELBO
is their mean, the importance-sampled likelihood their log-mean-exp
(:func:`~pyro_nflows.vae.train.estimate_nll`).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from pyro_nflows.saving import read_model, write_model
from pyro_nflows.vae.networks import Decoder, Encoder
from pyro_nflows.vae.posteriors import ConditionedPosterior, build_posterior
from pyro_nflows.validation import check_count, check_event, check_rows

__all__ = ["LIKELIHOODS", "VAE", "load"]

LIKELIHOODS = ("bernoulli", "gaussian")
_names = itertools.count()


class VAE(nn.Module):
    r"""A variational auto-encoder with a flow posterior, in one line.

    :param x_dim: size of a data point (flattened).
    :param z_dim: size of the latent :math:`z`.
    :param posterior: a posterior spec, ``"gaussian"``, ``"householder:T"``,
        ``"convex_triangular:K"``, ``"iaf:K"``,
        ``"sylvester:K(kind='orthogonal'|'householder'|'triangular')"`` or
        ``"planar:K"`` (see :mod:`pyro_nflows.vae.posteriors`).
    :param hidden_dims: widths of the encoder's gated layers (the decoder uses
        them reversed); ``()`` makes both linear.
    :param likelihood: ``"bernoulli"`` or ``"gaussian"``.

    Example::

        >>> vae = VAE(64, 8, posterior="householder:4", hidden_dims=(32,))
        >>> x = torch.rand(5, 64).round()
        >>> vae.elbo(x).shape, vae.posterior(x).rsample().shape
        (torch.Size([5]), torch.Size([5, 8]))
    """

    def __init__(
        self,
        x_dim: int,
        z_dim: int,
        posterior: str = "gaussian",
        hidden_dims: Sequence[int] = (300, 300),
        likelihood: str = "bernoulli",
    ):
        super().__init__()
        check_count("x_dim", x_dim)
        check_count("z_dim", z_dim)
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        self.encoder = Encoder(x_dim, z_dim, hidden_dims)
        self.flow = build_posterior(posterior, z_dim, self.encoder.context_dim)
        self.decoder = Decoder(z_dim, x_dim, hidden_dims)
        if likelihood == "gaussian":
            self.log_scale = nn.Parameter(torch.zeros(x_dim))
        self.config = {
            "x_dim": x_dim,
            "z_dim": z_dim,
            "posterior": posterior,
            "hidden_dims": list(hidden_dims),
            "likelihood": likelihood,
        }
        self.pyro_name = f"pyro_nflows_vae_{next(_names)}"

    @property
    def x_dim(self) -> int:
        return self.config["x_dim"]

    @property
    def z_dim(self) -> int:
        return self.config["z_dim"]

    # -- the distributions ------------------------------------------------------

    def encode(self, x: torch.Tensor) -> ConditionedPosterior:
        r""":math:`q(z \mid x)` for a batch ``x`` of shape ``batch + (x_dim,)``."""
        check_event(x, self.x_dim, "VAE", "data point")
        loc, log_var, h = self.encoder(x)
        return ConditionedPosterior(loc, torch.exp(0.5 * log_var), self.flow(h))

    def posterior(self, x: torch.Tensor) -> dist.TransformedDistribution:
        r""":math:`q(z \mid x)` as a Pyro distribution, batch shape ``x.shape[:-1]``."""
        return self.encode(x).distribution()

    def prior(self, batch_shape: torch.Size | tuple = ()) -> dist.Distribution:
        """:math:`\\mathcal N(0, I)` over :math:`z`, with the given batch shape."""
        zeros = self.decoder.out.weight.new_zeros(tuple(batch_shape) + (self.z_dim,))
        return dist.Normal(zeros, torch.ones_like(zeros)).to_event(1)

    def likelihood(self, z: torch.Tensor) -> dist.Distribution:
        r""":math:`p(x \mid z)`, batch shape ``z.shape[:-1]``, event ``(x_dim,)``."""
        out = self.decoder(z)
        if self.config["likelihood"] == "bernoulli":
            # validate_args=False: grey levels in [0, 1] are scored by cross-entropy.
            return dist.Bernoulli(logits=out, validate_args=False).to_event(1)
        return dist.Normal(out, self.log_scale.exp()).to_event(1)

    def log_joint(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        r""":math:`\log p(x, z)`; ``z`` may carry sample dimensions in front of ``x``'s batch."""
        return self.prior().log_prob(z) + self.likelihood(z).log_prob(x)

    # -- Pyro ------------------------------------------------------------------

    def model(self, x: torch.Tensor, beta: float = 1.0) -> None:
        """Pyro model: ``z ~ N(0, I)``, ``x ~ p(x | z)``, for a batch of shape ``(B, x_dim)``."""
        pyro.module(self.pyro_name, self)
        with pyro.plate("data", len(x)):
            with poutine.scale(scale=beta):
                z = pyro.sample("z", self.prior((len(x),)))
            pyro.sample("x", self.likelihood(z), obs=x)

    def guide(self, x: torch.Tensor, beta: float = 1.0) -> None:
        """Pyro guide: ``z ~ q(z | x)``, the flow posterior."""
        pyro.module(self.pyro_name, self)
        posterior = self.posterior(x)  # checks the width of x
        with pyro.plate("data", len(x)):
            with poutine.scale(scale=beta):
                pyro.sample("z", posterior)

    # -- evaluation ------------------------------------------------------------

    def log_weights(self, x: torch.Tensor, num_samples: int = 1) -> torch.Tensor:
        r""":math:`\log p(x, z_s) - \log q(z_s \mid x)` for :math:`z_s \sim q(z \mid x)`,
        shape ``(num_samples,) + x.shape[:-1]`` (reparametrised: differentiable)."""
        check_count("num_samples", num_samples)
        q = self.encode(x)
        noise = torch.randn((num_samples,) + q.loc.shape, dtype=q.loc.dtype, device=q.loc.device)
        z, log_q = q.rsample_with_log_prob(noise)
        return self.log_joint(x, z) - log_q

    def elbo(self, x: torch.Tensor, num_samples: int = 1) -> torch.Tensor:
        r"""The evidence lower bound :math:`E_q[\log p(x, z) - \log q(z \mid x)]`
        of each point, estimated with ``num_samples`` draws, shape ``x.shape[:-1]``."""
        return self.log_weights(x, num_samples).mean(0)

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        r"""The means of :math:`p(x \mid z)` (pixel probabilities, for a Bernoulli
        likelihood) for ``n`` draws :math:`z \sim \mathcal N(0, I)`, shape ``(n, x_dim)``."""
        return self.likelihood(self.prior((check_count("n", n),)).sample()).mean

    def check_data(self, data, name: str = "data") -> torch.Tensor:
        """``data`` as a float tensor of shape ``(n, x_dim)``, or ``ValueError``
        naming the fault: wrong shape, NaN or infinite rows (listed), values
        outside ``[0, 1]`` for a Bernoulli likelihood."""
        tensor = check_rows(data, name, columns=self.x_dim, dtype=self.decoder.out.weight.dtype)
        if self.config["likelihood"] == "bernoulli":
            outside = ((tensor < 0) | (tensor > 1)).any(1)
            if outside.any():
                rows = torch.nonzero(outside).flatten().tolist()
                raise ValueError(
                    f"a Bernoulli likelihood needs data in [0, 1], but {name} has values outside it in "
                    f"{len(rows)} rows (first rows: {rows[:10]}); rescale the data, or use likelihood='gaussian'"
                )
        return tensor.to(self.decoder.out.weight)

    # -- saving ----------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the configuration (as JSON), the weights and their checksum to
        ``path``, atomically (see :mod:`pyro_nflows.saving`)."""
        write_model(self, self.config, "vae", path)

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device | None = "cpu") -> "VAE":
        """Restore a VAE written by :meth:`save` (``torch.load(weights_only=True)``: no unpickling).

        ``ValueError`` naming the file for anything that is not an intact
        model file of this version: unreadable bytes, a checksum that does not
        match, non-finite weights, a configuration that does not fit the
        weights (checked before anything is built)."""
        return read_model(cls, "vae", path, map_location).eval()

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config.items())


def load(path: str | Path, map_location: str | torch.device | None = "cpu") -> VAE:
    """Restore a :class:`VAE` written by :meth:`VAE.save`."""
    return VAE.load(path, map_location=map_location)
