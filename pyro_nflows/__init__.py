"""pyro_nflows: normalizing flows for Pyro.

Every flow is a :class:`pyro.distributions.TransformModule` (see
:mod:`pyro_nflows.transforms`); :func:`build_flow` builds a stack from a spec
string such as ``"householder:4+lu_linear"``.
"""

from pyro_nflows import transforms
from pyro_nflows.registry import available_flows, build_flow

__version__ = "0.1.0"

__all__ = ["available_flows", "build_flow", "transforms", "__version__"]
