"""Every flow in the registry goes through the shared checks of ``checks.py``.

A new family is checked by adding its line to ``pyro_nflows.registry.FLOWS``;
``EXTRA_OPTIONS`` adds configurations worth checking beyond the defaults.
"""

import pytest
from checks import check_transform

from pyro_nflows.registry import FLOWS

INPUT_DIM = 5
CONTEXT_DIM = 3

# name -> extra option sets to check besides the helper's defaults.
EXTRA_OPTIONS = {
    "householder": [{"count_transforms": 3}, {"count_transforms": 7}],  # K < D and K > D
    "convex_triangular_linear": [{"count_matrices": 2}, {"count_matrices": 6}],
    "qr_linear": [{"count_transforms": 2}],
    "elementwise_spline": [{"count_bins": 4, "bound": 1.0}],
    "sylvester": [
        {"count_ortho_vectors": 1},  # default is orthogonal with M = ceil(D/2); also M = 1 and M = D
        {"count_ortho_vectors": 5},
        {"kind": "householder"},
        {"kind": "householder", "count_transforms": 2},
        {"kind": "triangular"},
        {"kind": "triangular", "reverse": True},
    ],
    "maf": [{"identity_init": False}],
    "affine_coupling": [
        {"split_dim": 1},
        {"split_dim": 4, "reverse": True},
        {"log_scale_bound": 1.0},
        {"identity_init": False},
    ],
    "additive_coupling": [{"split_dim": 4}, {"reverse": True}, {"identity_init": False}],
    "spline_coupling": [
        {"count_bins": 4, "bound": 1.0},
        {"split_dim": 1, "reverse": True},
        {"spline_from": "x", "reverse": True},
    ],
}
# Flows with nothing to learn (the shared check asserts they indeed have no parameters).
PARAMETER_FREE = {"permute"}
# Flows whose inverse is an ODE solve, held to the tolerance they are built with: options for every
# case of the flow, and the shared check's float64 round-trip tolerance (the default is 1e-10).
NUMERICAL = {"continuous": ({"atol": 1e-7, "rtol": 1e-7}, 1e-6)}


def _cases():
    for name, entry in FLOWS.items():
        if entry.event != "vector":  # the image flows go through tests/image_checks.py (tests/test_conv.py)
            continue
        fixed, _ = NUMERICAL.get(name, ({}, None))
        for options in [{}] + EXTRA_OPTIONS.get(name, []):
            options = {**fixed, **options}
            label = name + "".join(f"-{k}={v}" for k, v in options.items())
            checks = {"has_parameters": name not in PARAMETER_FREE}
            if name in NUMERICAL:
                checks["round_trip_atol64"] = NUMERICAL[name][1]
            yield pytest.param(entry.build, options, None, checks, id=label)
            if entry.build_conditional is not None:
                yield pytest.param(entry.build_conditional, options, CONTEXT_DIM, checks, id="conditional_" + label)


@pytest.mark.parametrize("helper, options, context_dim, checks", list(_cases()))
def test_shared_checks(helper, options, context_dim, checks):
    if context_dim is None:
        check_transform(lambda: helper(INPUT_DIM, **options), INPUT_DIM, **checks)
    else:
        check_transform(
            lambda: helper(INPUT_DIM, context_dim, hidden_dims=(16, 16), **options), INPUT_DIM, context_dim, **checks
        )


def test_every_extra_option_names_a_registered_flow():
    assert set(EXTRA_OPTIONS) <= set(FLOWS)
    assert PARAMETER_FREE <= set(FLOWS)
    assert set(NUMERICAL) <= set(FLOWS)
