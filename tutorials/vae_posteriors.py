# %% [markdown]
# # Richer VAE posteriors
#
# A variational auto-encoder (VAE) trains a decoder $p(x \mid z)$ and an
# encoder $q(z \mid x)$ together by maximising the evidence lower bound
#
# $$\mathrm{ELBO}(x) = E_{q(z \mid x)}\big[\log p(x, z) - \log q(z \mid x)\big]
#   = \log p(x) - \mathrm{KL}\big(q(z \mid x) \,\|\, p(z \mid x)\big).$$
#
# With the usual diagonal-Gaussian $q$, the gap $\mathrm{KL}(q \,\|\, p(z
# \mid x))$ can only be as small as a diagonal Gaussian allows, and training
# the decoder against the bound favours decoders whose posteriors a diagonal
# Gaussian fits. A flow posterior pushes the Gaussian through invertible
# maps whose parameters the encoder computes from $x$, so $q$ can take other
# shapes, and the decoder is held back less.
#
# This tutorial trains the gated-MLP VAE of the Householder-flow and ccLinIAF
# papers on binarised 8 x 8 digits, with a diagonal-Gaussian posterior and
# with two flow posteriors, compares their test log-likelihoods (estimated by
# importance sampling), and saves and reloads a model.
#
# Open it as a notebook with Jupytext or VS Code (it is a percent-format
# script), or run it: `python tutorials/vae_posteriors.py`. With the
# environment variable `CI` set (as the test suite does), it trains for a
# few epochs only and its numbers mean nothing.

# %%
import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed; the figure is written to a file
import matplotlib.pyplot as plt
import torch
from pyro.infer import Trace_ELBO

from pyro_nflows import datasets
from pyro_nflows.vae import VAE, available_posteriors, estimate_nll, train_vae

smoke_test = "CI" in os.environ
epochs, warmup_epochs, patience = (2, 1, 2) if smoke_test else (300, 50, 30)
hidden_dims = (32, 32) if smoke_test else (300, 300)  # widths of the gated layers
nll_samples = 100 if smoke_test else 5000  # importance samples per test image
workdir = Path(tempfile.mkdtemp(prefix="pyro_nflows_tutorial_"))

# %% [markdown]
# ## Data
#
# `datasets.binarized_digits()` is scikit-learn's 1797 handwritten digits
# (bundled with scikit-learn, nothing is downloaded), 8 x 8 pixels each,
# thresholded at half intensity into 0/1 pixels: a Bernoulli likelihood fits
# them. `split` cuts the rows into seeded train / validation / test parts.

# %%
data = datasets.binarized_digits()
train, validation, test = datasets.split(data, (0.8, 0.1, 0.1), seed=0)
if smoke_test:
    train, validation, test = train[:300], validation[:50], test[:50]
print(train.shape, validation.shape, test.shape, "pixel values", data.unique().tolist())

# %% [markdown]
# ## Posterior families
#
# A posterior is named by a spec string, `name` or `name:N(key=value, ...)`.
# Each family's parameters are computed from the encoder's last hidden layer,
# so every image gets its own flow.

# %%
print(available_posteriors())

# %% [markdown]
# ## Three VAEs
#
# The same VAE (latent size 16, gated hidden layers of 300 and 300 units in
# the full run, a Bernoulli likelihood) with three posteriors:
#
# - `"gaussian"`: the plain VAE, $q(z \mid x) = N(\mu(x), \operatorname{diag}\sigma^2(x))$;
# - `"convex_triangular:5"`: ccLinIAF, the Gaussian times a convex
#   combination of 5 unit lower triangular matrices; a full-covariance
#   Gaussian whose correlations depend on $x$;
# - `"sylvester:4"`: 4 orthogonal Sylvester flows, non-linear, so $q$ need
#   not be Gaussian at all.
#
# `train_vae` maximises the ELBO with Adam, warms up the KL term over the
# first `warmup_epochs` (its weight rises linearly, $1/W, 2/W, \dots, 1$),
# stops after `patience` epochs at full weight without a better validation
# ELBO and restores the best weights. Seeding torch before building a VAE
# fixes its initialisation; `seed=` fixes the shuffling and the draws.

# %%
posteriors = ["gaussian", "convex_triangular:5", "sylvester:4"]
vaes = {}
for spec in posteriors:
    torch.manual_seed(0)
    vaes[spec] = vae = VAE(train.shape[1], 16, posterior=spec, hidden_dims=hidden_dims)
    history = train_vae(
        vae, train, validation, epochs=epochs, warmup_epochs=warmup_epochs, patience=patience, seed=0, progress=False
    )
    size = sum(p.numel() for p in vae.parameters())
    print(f"{spec:<20} {size:>7} parameters; best validation ELBO {max(history.validation):.2f} "
          f"at epoch {history.best_epoch + 1}; {history.stopped}")

# %% [markdown]
# ## Test log-likelihood
#
# `estimate_nll` estimates $-\log p(x)$ of each test image by importance
# sampling with the posterior as proposal (Burda et al.):
# $-\log \frac1S \sum_s p(x, z_s) / q(z_s \mid x)$, $z_s \sim q(z \mid x)$.
# It is an upper bound on the true NLL in expectation and tightens as $S$
# grows; $S = 5000$ is the papers' choice. With `seed=` the draws are
# reproducible (and the same for every model). The table gives its mean
# over the test images with the standard error of that mean, then minus the
# test ELBO and the gap between the two, which estimates
# $\mathrm{KL}(q(z \mid x) \,\|\, p(z \mid x))$ under each model's own
# decoder.

# %%
results = {}
print(f"{'posterior':<20} {'test NLL':>15} {'-ELBO':>8} {'gap':>6}   (nats per image)")
for spec, vae in vaes.items():
    nll, per_image = estimate_nll(vae, test, num_samples=nll_samples, per_point=True, seed=0)
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        elbo = vae.elbo(test, num_samples=100).mean().item()
    results[spec] = per_image
    stderr = per_image.std().item() / len(per_image) ** 0.5
    print(f"{spec:<20} {f'{nll:.3f} ± {stderr:.3f}':>15} {-elbo:>8.3f} {-elbo - nll:>6.3f}")

# %% [markdown]
# The NLL scores the model $p(x)$; the gap is a property of the pair.
# Gaps of different models are not directly comparable: each is measured
# against its own decoder's posterior, and a more flexible $q$ lets training
# reach decoders whose posteriors need not be any simpler. The printout shows
# how much each flow moves the NLL and the ELBO, and how much of that is in
# the gap.
#
# The differences between posteriors are small on these tiny images, about
# the size of the standard errors above, which mostly reflect how much the
# images differ from one another. Every model is scored on the same test
# images, so compare them image by image: the paired differences below have
# a standard error of their own. (It covers the choice of test images, not training
# noise: a different seed trains a different model. `benchmarks/vae.py`
# repeats the comparison over seeds and more posteriors.)

# %%
for spec in posteriors[1:]:
    difference = results[spec] - results["gaussian"]
    stderr = difference.std().item() / len(difference) ** 0.5
    print(f"{spec:<20} NLL minus the Gaussian's: {difference.mean().item():+.3f} ± {stderr:.3f} nats "
          f"(lower on {(difference < 0).sum().item()} of {len(difference)} test images)")

# %% [markdown]
# ## The VAE is a Pyro model/guide pair
#
# `vae.model(x)` and `vae.guide(x)` are ordinary Pyro functions over the
# sites `"z"` and `"x"`, so Pyro's ELBO machinery applies to them as it is
# (`train_vae` itself uses `Trace_ELBO`; `SVI(vae.model, vae.guide, ...)`
# trains the same objective). Pyro's loss is minus the ELBO summed over the
# batch; per image it agrees with `vae.elbo` up to Monte Carlo noise (both
# use 100 draws per image here, different ones).

# %%
vae = vaes["sylvester:4"]
with torch.no_grad():
    torch.manual_seed(0)
    pyro_elbo = Trace_ELBO(num_particles=100, vectorize_particles=True, max_plate_nesting=1)
    pyro_loss = pyro_elbo.loss(vae.model, vae.guide, test)
    elbo = vae.elbo(test, num_samples=100).mean().item()
print(f"Pyro: -ELBO {pyro_loss / len(test):.3f} per image; vae.elbo: {-elbo:.3f}")

# %% [markdown]
# ## Samples, saving, loading
#
# `vae.sample(n)` decodes $n$ draws from the prior (pixel probabilities).
# `save` writes the configuration as JSON and the weights as tensors;
# `VAE.load` (or `pyro_nflows.vae.load`) reads them back with `torch.load(weights_only=True)` (nothing
# is unpickled), and the reloaded model gives the same estimate.

# %%
torch.manual_seed(0)
images = vae.sample(16).reshape(16, 8, 8)
figure, axes = plt.subplots(2, 8, figsize=(8, 2))
for axis, image in zip(axes.flat, images):
    axis.imshow(image, cmap="gray_r", vmin=0, vmax=1)
    axis.axis("off")
figure.savefig(workdir / "vae_samples.png")
print("figure written to", workdir / "vae_samples.png")

vae.save(workdir / "digits_vae.pt")
reloaded = VAE.load(workdir / "digits_vae.pt")
print(reloaded.config)
same = estimate_nll(reloaded, test, num_samples=nll_samples, seed=0)
assert abs(same - estimate_nll(vae, test, num_samples=nll_samples, seed=0)) < 1e-4
print(f"reloaded: test NLL {same:.3f}")
