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


def _cases():
    for name, entry in FLOWS.items():
        for options in [{}] + EXTRA_OPTIONS.get(name, []):
            label = name + "".join(f"-{k}={v}" for k, v in options.items())
            learns = name not in PARAMETER_FREE
            yield pytest.param(entry.build, options, None, learns, id=label)
            if entry.build_conditional is not None:
                yield pytest.param(entry.build_conditional, options, CONTEXT_DIM, learns, id="conditional_" + label)


@pytest.mark.parametrize("helper, options, context_dim, learns", list(_cases()))
def test_shared_checks(helper, options, context_dim, learns):
    if context_dim is None:
        check_transform(lambda: helper(INPUT_DIM, **options), INPUT_DIM, has_parameters=learns)
    else:
        check_transform(
            lambda: helper(INPUT_DIM, context_dim, hidden_dims=(16, 16), **options),
            INPUT_DIM,
            context_dim,
            has_parameters=learns,
        )


def test_every_extra_option_names_a_registered_flow():
    assert set(EXTRA_OPTIONS) <= set(FLOWS)
    assert PARAMETER_FREE <= set(FLOWS)
