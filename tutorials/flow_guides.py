# %% [markdown]
# # Flow guides for SVI
#
# Pyro's `AutoNormal` fits a mean-field Gaussian to the posterior: every
# latent gets its own mean and scale, and nothing can depend on anything
# else. `pyro_nflows.autoguides.AutoFlow` keeps the autoguide interface
# (`SVI`, `Predictive`, `median`, `quantiles`, constrained supports) but
# pushes a learnable diagonal Gaussian through a normalizing flow: all latent
# sites are packed, unconstrained, into one vector $z \in \mathbb{R}^D$, and
#
# $$z = \mu + F(\sigma \odot \epsilon), \qquad \epsilon \sim N(0, I_D),$$
#
# with $F$ any stack of the package's transforms. The density of $z$ stays
# exact (a change of variables), so the ELBO is the usual one.
#
# This tutorial fits Neal's funnel with `AutoNormal`, `AutoHouseholder`,
# `AutoIAF` and an `AutoFlow` built from a spec string, compares their ELBOs
# and their standard deviation of the funnel's scale variable, then shows the
# guide's summaries, `Predictive`, the spec strings and a model with a
# constrained site.
#
# Open it as a notebook with Jupytext or VS Code (it is a percent-format
# script), or run it: `python tutorials/flow_guides.py`. With the environment
# variable `CI` set (as the test suite does), it trains for a few steps only
# and its numbers mean nothing.

# %%
import inspect
import math
import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed; the figure is written to a file
import matplotlib.pyplot as plt
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.infer.importance import vectorized_importance_weights

from pyro_nflows import available_flows
from pyro_nflows.autoguides import (
    AutoConvexTriangular,
    AutoFlow,
    AutoHouseholder,
    AutoIAF,
    AutoPlanar,
    AutoSylvester,
)
from pyro_nflows.models import funnel
from pyro_nflows.transforms import householder, iaf

smoke_test = "CI" in os.environ
steps = 30 if smoke_test else 3000  # SVI steps per guide
particles = 8 if smoke_test else 64  # vectorised ELBO particles per step
eval_draws = 2000 if smoke_test else 20000  # guide draws for the final ELBO and sd(y)
workdir = Path(tempfile.mkdtemp(prefix="pyro_nflows_tutorial_"))

# %% [markdown]
# ## Neal's funnel
#
# Ten latent variables: a scale variable $y \sim N(0, 3)$ and nine
# $x_i \mid y \sim N(0, e^{y/2})$. The spread of every $x_i$ is set by $y$:
# for $y = -6$ the $x_i$ lie within about $\pm 0.1$ (the neck), for $y = 6$
# within about $\pm 40$ (the mouth). Nothing is observed, so the "posterior"
# is the prior itself, known exactly: the marginal sd of $y$ is 3 and the
# log-normaliser is 0, so the ELBO is $-\mathrm{KL}(q \,\|\, p) \le 0$, and 0
# means a perfect guide.
#
# The model is `pyro_nflows.models.funnel`, one of the package's models whose
# posteriors are known (imported above); its source is printed below. It is
# written so that its batch dimensions broadcast: `SVI` evaluates many
# particles at once (`vectorize_particles=True`).

# %%
print(inspect.getsource(funnel))

# %% [markdown]
# ## Training and scoring, the same for every guide
#
# `train` runs `steps` SVI steps with `particles` vectorised particles per
# step and Pyro's `ClippedAdam`, its learning rate decaying geometrically
# from 0.02 to 0.0002. `score` draws `eval_draws` samples from the trained
# guide, with their log-weights $\log p(x, y) - \log q(x, y)$
# (`vectorized_importance_weights`): their mean is the ELBO, printed with its
# standard error, and the draws of $y$ give the guide's sd of $y$.
#
# Every guide starts with `init_scale=1.0` (the default is 0.1). A guide
# that starts narrow rarely visits the neck and the mouth of the funnel, so
# it has little signal there to learn how the spread of $x$ depends on $y$.

# %%
def train(model, guide, steps, *args, lr=0.02, max_plate_nesting=0):
    optimizer = pyro.optim.ClippedAdam({"lr": lr, "lrd": 0.01 ** (1 / steps)})
    elbo = Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=max_plate_nesting)
    svi = SVI(model, guide, optimizer, elbo)
    for _ in range(steps):
        svi.step(*args)


@torch.no_grad()
def score(guide):
    log_weights, _, guide_trace = vectorized_importance_weights(
        funnel, guide, num_samples=eval_draws, max_plate_nesting=0
    )
    elbo = log_weights.mean().item()
    stderr = log_weights.std().item() / math.sqrt(eval_draws)
    return elbo, stderr, guide_trace.nodes["y"]["value"].std().item()


# %% [markdown]
# ## Four guides
#
# - `AutoNormal`: Pyro's mean-field Gaussian.
# - `AutoHouseholder`: a full-covariance Gaussian (the diagonal Gaussian
#   rotated by Householder reflections).
# - `AutoIAF`: two inverse autoregressive flow (IAF) layers; their orderings
#   alternate natural / reversed.
# - `AutoFlow(funnel, "iaf:3(ordering=natural)")`: three IAF layers, all in
#   the natural ordering, from a spec string.
#
# Each guide's parameters live in Pyro's param store under the guide's name,
# so the store is cleared before each new guide; the seed is set before each
# so that every run is reproducible.

# %%
makers = {
    "AutoNormal": lambda: AutoNormal(funnel, init_scale=1.0),
    "AutoHouseholder": lambda: AutoHouseholder(funnel, init_scale=1.0),
    "AutoIAF": lambda: AutoIAF(funnel, num_transforms=2, init_scale=1.0),
    'AutoFlow("iaf:3(ordering=natural)")': lambda: AutoFlow(funnel, "iaf:3(ordering=natural)", init_scale=1.0),
}
guides = {}
print(f"{'guide':<38} {'ELBO (0 is perfect)':>20} {'sd(y) (exact 3)':>16}")
for name, make in makers.items():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guides[name] = guide = make()
    train(funnel, guide, steps)
    elbo, stderr, sd_y = score(guide)
    print(f"{name:<38} {f'{elbo:.3f} ± {stderr:.3f}':>20} {sd_y:>16.2f}")

# %% [markdown]
# ## Why the flows do better
#
# The funnel's difficulty is not correlation (the covariance of $y$ and
# $x_i$ is 0) but a dependence of *scale*: the spread of $x$ is $e^{y/2}$.
# A Gaussian guide, diagonal or not, gives $x$ one spread whatever $y$ is.
# The ELBO measures $\mathrm{KL}(q \,\|\, p)$, which is large wherever $q$
# puts mass that $p$ does not have: where $y$ is small, $p$ confines $x$ to
# the neck, and a guide with a fixed spread of $x$ would put mass far
# outside it. So the Gaussian guides shrink $y$ to a narrow band, where one
# spread of $x$ fits; the printout shows their sd(y) far below 3 and their
# ELBOs well below 0 (`AutoHouseholder` can rotate its axes, which does not
# help when there is no correlation to capture).
#
# An affine IAF layer maps $u \mapsto u \odot e^{s(u_{<i})} + m(u_{<i})$:
# each coordinate is shifted and scaled by functions of the coordinates
# before it. The guide packs the latent sites in the model's order, $y$
# first, so in the natural ordering the scale of each $x_i$ can depend on
# $y$: with $s = y/2$ and $m = 0$ one layer *is* the funnel. In a reversed
# layer $y$ comes last: its shift and scale can depend on the $x_i$, but no
# $x_i$ can depend on $y$. `AutoIAF` alternates the two orderings; the spec
# string keeps every layer natural. Compare the two flow rows: how close each
# gets to an ELBO of 0 and an sd(y) of 3. (`benchmarks/svi.py` runs this
# comparison for every guide of the package, and on eight schools.)

# %% [markdown]
# ## Summaries: `median` and `quantiles`
#
# Every `AutoFlow` has the summaries of Pyro's autoguides, site by site, in
# the constrained space. They are exact when the flow is affine (a Gaussian
# stays Gaussian: `AutoHouseholder`, `AutoConvexTriangular`) and otherwise
# estimated from `num_samples` draws of the guide (default 1000). The exact
# 5%, 50% and 95% quantiles of $y$ are printed first.

# %%
exact = dist.Normal(0.0, 3.0).icdf(torch.tensor([0.05, 0.5, 0.95]))
print(f"{'exact':<38} y quantiles {[round(v, 2) for v in exact.tolist()]}")
pyro.set_rng_seed(0)
for name, guide in guides.items():
    q = guide.quantiles([0.05, 0.5, 0.95])
    print(f"{name:<38} y quantiles {[round(v, 2) for v in q['y'].tolist()]}")
flow_guide = guides['AutoFlow("iaf:3(ordering=natural)")']
median = flow_guide.median(num_samples=5000)
print(f"median of y {median['y']:.2f}; shapes {({site: tuple(value.shape) for site, value in median.items()})}")

# %% [markdown]
# ## `Predictive` with a flow guide
#
# `Predictive(model, guide=guide, num_samples=...)` draws the latents from
# the guide and runs the model on them; `parallel=True` vectorises the draws
# (the funnel allows it). The plot shows the draws of $(x_1, y)$ of each
# guide next to exact draws from the funnel.

# %%
pyro.set_rng_seed(0)
exact_y = 3.0 * torch.randn(2000)
exact_x1 = torch.exp(exact_y / 2) * torch.randn(2000)
figure, axes = plt.subplots(1, len(guides) + 1, figsize=(4 * (len(guides) + 1), 4), sharex=True, sharey=True)
axes[0].scatter(exact_x1, exact_y, s=1)
axes[0].set_title("funnel (exact)")
for axis, (name, guide) in zip(axes[1:], guides.items()):
    samples = Predictive(funnel, guide=guide, num_samples=2000, parallel=True)()
    axis.scatter(samples["x"][:, 0], samples["y"], s=1)
    axis.set_title(name, fontsize=8)
axes[0].set_xlim(-30, 30)
axes[0].set_ylim(-10, 10)
axes[0].set_ylabel("y")
for axis in axes:
    axis.set_xlabel("x_1")
print("Predictive draws:", {site: tuple(value.shape) for site, value in samples.items()})
figure.tight_layout()
figure.savefig(workdir / "funnel.png")
print("figure written to", workdir / "funnel.png")

# %% [markdown]
# ## Spec strings and the named guides
#
# `AutoFlow(model, flow)` takes the flow as a spec string, a list of
# transforms of the latent dimension, or a callable `D -> transforms`. A spec
# is a `+`-separated list of `name`, `name:N` or `name:N(key=value, ...)`;
# `available_flows()` lists the names and what `N` sets for each.

# %%
print(available_flows())

# %% [markdown]
# A spec is checked when the guide is built (a bad one raises `ValueError`
# at once) and the flow itself is built at the first call, when the latent
# dimension $D$ is known (all latent sites, unconstrained and flattened). A
# callable receives that $D$. The named guides are `AutoFlow`s with a fixed
# flow: `AutoHouseholder` (a full-covariance Gaussian by reflections),
# `AutoConvexTriangular` (ccLinIAF, also a full-covariance Gaussian),
# `AutoPlanar`, `AutoSylvester` and `AutoIAF`. Calling a guide once sets it
# up; here are their sizes on the funnel.

# %%
candidates = {
    'AutoFlow("householder:10+iaf:2")': lambda: AutoFlow(funnel, "householder:10+iaf:2"),
    "AutoFlow(lambda D: [...])": lambda: AutoFlow(funnel, lambda D: [householder(D, count_transforms=4), iaf(D)]),
    "AutoHouseholder()": lambda: AutoHouseholder(funnel),
    "AutoConvexTriangular(count_matrices=3)": lambda: AutoConvexTriangular(funnel, count_matrices=3),
    "AutoPlanar(num_transforms=8)": lambda: AutoPlanar(funnel, num_transforms=8),
    'AutoSylvester(kind="householder")': lambda: AutoSylvester(funnel, kind="householder"),
    "AutoIAF(num_transforms=2)": lambda: AutoIAF(funnel, num_transforms=2),
}
for name, make in candidates.items():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = make()
    guide()  # sets the guide up: D = 10 is known now
    layers = [type(t).__name__ for t in guide.flows]
    size = sum(p.numel() for p in guide.parameters())
    print(f"{name:<40} {size:>6} parameters  flow: {', '.join(layers)}")

try:
    AutoFlow(funnel, "householder:10+iaff:2")
except ValueError as error:
    print("ValueError:", str(error)[:100], "...")

# %% [markdown]
# ## Constrained sites
#
# The flow works in the unconstrained space; each site's slice of $z$ is
# mapped into its support by `biject_to(site.support)`, as in Pyro's own
# autoguides. A model with a positive scale (a half-Cauchy prior) and twenty
# observations from $N(1, 2)$:

# %%
pyro.set_rng_seed(0)
data = 1.0 + 2.0 * torch.randn(20)


def normal_model(data):
    loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
    scale = pyro.sample("scale", dist.HalfCauchy(5.0))
    with pyro.plate("data", len(data)):
        pyro.sample("obs", dist.Normal(loc, scale), obs=data)


pyro.clear_param_store()
pyro.set_rng_seed(0)
guide = AutoFlow(normal_model, "iaf:2", init_scale=1.0)
train(normal_model, guide, steps // 2, data, lr=0.05, max_plate_nesting=1)
print(f"data: mean {data.mean():.2f}, sd {data.std():.2f}")
for site, values in guide.quantiles([0.05, 0.5, 0.95], data).items():
    print(f"{site}: posterior 5%, 50%, 95% quantiles {[round(v, 2) for v in values.tolist()]}")

# %% [markdown]
# `guide.get_posterior()` is the distribution of the unconstrained vector
# $z$ (here `loc` and the logarithm of `scale`); `Predictive` returns the
# sites in their supports, so every draw of `scale` is positive. (With
# `pyro.plate` in the model, `Predictive` keeps the plate's dimension: the
# draws have shape `(num_samples, 1)`.)

# %%
with torch.no_grad():
    z = guide.get_posterior().sample((4000,))
samples = Predictive(normal_model, guide=guide, num_samples=4000, return_sites=["loc", "scale"], parallel=True)(data)
print(f"unconstrained z[:, 1] in [{z[:, 1].min():.2f}, {z[:, 1].max():.2f}]")
print(f"scale draws {tuple(samples['scale'].shape)} in [{samples['scale'].min():.2f}, {samples['scale'].max():.2f}]")
assert (samples["scale"] > 0).all()
