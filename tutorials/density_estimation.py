# %% [markdown]
# # Density estimation with `pyro_nflows.density.fit`
#
# A flow density is a base distribution pushed through invertible maps; its
# log-density is exact, so it can be fitted by maximum likelihood. This
# tutorial fits a masked autoregressive flow (MAF) and a neural spline flow
# (NSF) to a 2-D toy, compares them on held-out data, samples, saves and
# reloads the model, and resumes an interrupted run from its checkpoint.
#
# Open it as a notebook with Jupytext or VS Code (it is a percent-format
# script), or run it: `python tutorials/density_estimation.py`. With the
# environment variable `CI` set (as the test suite does), it trains for a
# few epochs only.

# %%
import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed; the figure is written to a file
import matplotlib.pyplot as plt
import torch

from pyro_nflows import datasets
from pyro_nflows.density import fit, load

smoke_test = "CI" in os.environ
epochs = 2 if smoke_test else 100
workdir = Path(tempfile.mkdtemp(prefix="pyro_nflows_tutorial_"))

# %% [markdown]
# ## Data
#
# `datasets.pinwheel` draws from five curved arms; `split` cuts the rows into
# seeded train / validation / test parts.

# %%
data = datasets.pinwheel(2000 if smoke_test else 10000, seed=0)
train, validation, test = datasets.split(data, (0.8, 0.1, 0.1), seed=0)
print(train.shape, validation.shape, test.shape)

# %% [markdown]
# ## Two flows, one call each
#
# `fit` standardises the data inside the model (its log-determinant is
# counted, so densities are in the data's own units), stacks `num_layers`
# layers with actnorm between them and alternating orderings, trains with
# Adam on a cosine schedule, stops early on the validation log-likelihood and
# restores the best weights. `"maf"` uses affine autoregressive layers;
# `"nsf"` rational-quadratic spline ones (more flexible per layer).

# %%
models = {}
for flow in ("maf", "nsf"):
    models[flow] = fit(train, flow=flow, epochs=epochs, validation_data=validation, seed=0, progress=False)
    with torch.no_grad():
        score = models[flow].log_prob(test).mean().item()
    print(f"{flow}: test log-likelihood {score:.3f} nats per point; {models[flow].history.stopped}")

# %% [markdown]
# ## Looking at the density
#
# The log-density on a grid, next to the data.

# %%
grid = torch.linspace(-4, 4, 200)
xx, yy = torch.meshgrid(grid, grid, indexing="xy")
points = torch.stack([xx.flatten(), yy.flatten()], -1)
figure, axes = plt.subplots(1, 3, figsize=(12, 4))
axes[0].scatter(*test.T, s=1)
axes[0].set_title("test data")
for axis, (flow, model) in zip(axes[1:], models.items()):
    with torch.no_grad():
        density = model.log_prob(points).exp().reshape(200, 200)
    axis.imshow(density, origin="lower", extent=(-4, 4, -4, 4))
    axis.set_title(f"{flow} density")
figure.savefig(workdir / "pinwheel.png")
print("figure written to", workdir / "pinwheel.png")

# %% [markdown]
# ## Sampling, saving, loading
#
# `save` writes the configuration as JSON and the weights as tensors; `load`
# reads them back with `torch.load(weights_only=True)` (nothing is
# unpickled), and the reloaded model gives the same densities.

# %%
model = models["nsf"]
with torch.no_grad():
    samples = model.sample(5)
print(samples)
model.save(workdir / "pinwheel_nsf.pt")
reloaded = load(workdir / "pinwheel_nsf.pt")
with torch.no_grad():
    assert torch.allclose(reloaded.log_prob(test), model.log_prob(test))

# %% [markdown]
# ## Resuming an interrupted run
#
# With `checkpoint=`, `fit` writes its state after every epoch. If the run is
# interrupted (Ctrl-C, a crash, a lost machine), the same call with the same
# data, settings and checkpoint continues from the last finished epoch, and
# gives the model an uninterrupted run would have given. Here the second call
# finds a finished run in the file and reads its result back instead of
# training again.

# %%
checkpoint = workdir / "run.ckpt"
first = fit(train, flow="maf", epochs=epochs, seed=1, checkpoint=checkpoint, progress=False)
again = fit(train, flow="maf", epochs=epochs, seed=1, checkpoint=checkpoint, progress=False)
with torch.no_grad():  # the finished run is read back, not retrained
    assert torch.allclose(first.log_prob(test), again.log_prob(test))
print("resumed from", checkpoint)
