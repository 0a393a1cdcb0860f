"""pyro_nflows: normalizing flows for Pyro.

Every flow is a :class:`pyro.distributions.TransformModule` (see
:mod:`pyro_nflows.transforms`); :func:`build_flow` builds a stack from a spec
string such as ``"householder:4+lu_linear"``. Flows in Pyro autoguides live
in :mod:`pyro_nflows.autoguides`, VAEs with flow posteriors in
:mod:`pyro_nflows.vae`, the density estimator in :mod:`pyro_nflows.density`,
amortized posteriors of Pyro models (neural posterior estimation) in
:mod:`pyro_nflows.amortized`, image density estimation in :mod:`pyro_nflows.images`
and the built-in data in :mod:`pyro_nflows.datasets`.
"""

from pyro_nflows import amortized, autoguides, datasets, density, images, models, transforms, vae
from pyro_nflows.registry import available_flows, build_flow

__version__ = "0.1.0"

__all__ = [
    "amortized", "autoguides", "available_flows", "build_flow", "datasets", "density", "images", "models",
    "transforms", "vae", "__version__",
]
