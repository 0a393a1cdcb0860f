"""Every flow of the package, one module per family (the maths lives there).

Each family has ``Conditioned<X>`` (the maths, parameters given as tensors),
``<X>`` (a :class:`~pyro.distributions.TransformModule` owning its
parameters), ``Conditional<X>`` where it has one (a network from a context to
the parameters) and lower-case helpers ``x(input_dim, ...)`` /
``conditional_x(input_dim, context_dim, ...)``. Pyro's ``Permute`` is
re-exported rather than written again; :class:`PermuteModule` is that same
transform made a module whose permutation ``state_dict`` saves, for stacks.
"""

from pyro.distributions.transforms import Permute, permute

from pyro_nflows.transforms.base import ConditionalFlow, FlowTransform
from pyro_nflows.transforms.elementwise import (
    ActNorm,
    ElementwiseAffine,
    ElementwiseSpline,
    actnorm,
    elementwise_affine,
    elementwise_spline,
)
from pyro_nflows.transforms.linear import (
    ConditionalConvexTriangularLinear,
    ConditionalHouseholder,
    ConditionalTriangularLinear,
    ConditionedConvexTriangularLinear,
    ConditionedHouseholder,
    ConditionedTriangularLinear,
    ConvexTriangularLinear,
    Householder,
    LULinear,
    QRLinear,
    TriangularLinear,
    conditional_convex_triangular_linear,
    conditional_householder,
    conditional_triangular_linear,
    convex_triangular_linear,
    householder,
    lu_linear,
    qr_linear,
    triangular_linear,
)
from pyro_nflows.transforms.permutation import PermuteModule, random_permutation
from pyro_nflows.transforms.splines import rational_quadratic_spline

__all__ = [
    "ActNorm",
    "ConditionalConvexTriangularLinear",
    "ConditionalFlow",
    "ConditionalHouseholder",
    "ConditionalTriangularLinear",
    "ConditionedConvexTriangularLinear",
    "ConditionedHouseholder",
    "ConditionedTriangularLinear",
    "ConvexTriangularLinear",
    "ElementwiseAffine",
    "ElementwiseSpline",
    "FlowTransform",
    "Householder",
    "LULinear",
    "Permute",
    "PermuteModule",
    "QRLinear",
    "TriangularLinear",
    "actnorm",
    "conditional_convex_triangular_linear",
    "conditional_householder",
    "conditional_triangular_linear",
    "convex_triangular_linear",
    "elementwise_affine",
    "elementwise_spline",
    "householder",
    "lu_linear",
    "permute",
    "qr_linear",
    "random_permutation",
    "rational_quadratic_spline",
    "triangular_linear",
]
