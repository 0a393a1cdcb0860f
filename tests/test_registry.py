import pytest
import torch
from pyro.distributions import ConditionalTransformModule, TransformModule

from pyro_nflows import available_flows, build_flow, transforms
from pyro_nflows.registry import FLOWS, parse_spec


def test_spec_builds_layers_in_order():
    layers = build_flow("householder:4+lu_linear:2+elementwise_spline(count_bins=4)", 3)
    assert [type(t).__name__ for t in layers] == ["Householder", "LULinear", "LULinear", "ElementwiseSpline"]
    assert layers[0].vectors.shape == (4, 3)  # N sets the number of reflections, not of layers
    assert layers[3].count_bins == 4


def test_count_keyword_and_aliases():
    (layer,) = build_flow("convex_triangular:5", 4)
    assert layer.components.shape[0] == 5
    assert type(build_flow("ccliniaf:3", 4)[0]) is type(layer)  # the paper's name (Tomczak & Welling 2017)
    (entry, count, options), = parse_spec(" qr_linear : 2 ( count_transforms = 3 ) ")
    assert (entry.name, count, options) == ("qr_linear", 2, {"count_transforms": 3})


def test_context_builds_conditional_versions_where_they_exist():
    layers = build_flow("householder:2+actnorm+triangular_linear", 4, context_dim=3)
    assert isinstance(layers[0], ConditionalTransformModule)
    assert isinstance(layers[1], TransformModule)  # no conditional actnorm: used as is
    assert isinstance(layers[2], ConditionalTransformModule)
    transform = layers[0].condition(torch.randn(3))
    assert transform(torch.randn(4)).shape == (4,)


def test_defaults_reach_the_families_that_take_them_unless_the_spec_sets_them():
    defaults = {"spline_from": "x"}
    layers = build_flow("spline_coupling:2+householder+spline_coupling(spline_from=z)", 4, defaults=defaults)
    assert [getattr(t, "spline_from", None) for t in layers] == ["x", "x", None, "z"]
    (conditional,) = build_flow("spline_coupling", 4, context_dim=3, defaults=defaults)
    assert conditional.condition(torch.randn(3)).spline_from == "x"
    assert build_flow("spline_coupling", 4)[0].spline_from == "z"  # the layer's own default


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown flow 'housholder'.*householder.*lu_linear"):
        build_flow("housholder:2", 3)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "non-empty"),
        ("householder:x", "N must be an integer"),
        ("householder:0", "must be an integer >= 1"),
        ("householder+", "cannot parse"),
        ("householder(count=3)", "takes no option"),
        ("elementwise_spline(count_bins)", "key=value"),
    ],
)
def test_bad_specs_raise(spec, message):
    with pytest.raises(ValueError, match=message):
        build_flow(spec, 3)


def test_bad_dimensions_raise():
    with pytest.raises(ValueError, match="input_dim"):
        build_flow("householder", 0)
    with pytest.raises(ValueError, match="context_dim"):
        build_flow("householder", 3, context_dim=0)


def test_available_flows_lists_every_entry():
    table = available_flows()
    for name in FLOWS:
        assert name in table


def test_per_layer_options_alternate_sylvester_triangular_layers():
    layers = build_flow("sylvester:3(kind=triangular)", 4)
    assert [layer.reverse for layer in layers] == [False, True, False]
    layers = build_flow("sylvester:2(kind='triangular', reverse=True)", 4, context_dim=2)
    assert [layer.reverse for layer in layers] == [True, False]
    # Kinds without an orientation get their options unchanged.
    assert [layer.kind for layer in build_flow("sylvester:2(kind=householder)", 4)] == ["householder"] * 2


def test_repeat_continues_per_layer_alternation():
    layers = build_flow("actnorm+maf", 3, repeat=4)
    assert [type(t).__name__ for t in layers] == ["ActNorm", "MaskedAutoregressive"] * 4
    orders = [t.made.order.tolist() for t in layers[1::2]]
    assert orders == [[0, 1, 2], [2, 1, 0], [0, 1, 2], [2, 1, 0]]
    with pytest.raises(ValueError, match="repeat"):
        build_flow("maf", 3, repeat=0)


@pytest.mark.parametrize(
    "build, replacements",
    [
        (lambda: transforms.spline_coupling(1), ["elementwise_affine", "elementwise_spline"]),
        (
            lambda: transforms.conditional_affine_coupling(1, 2),
            ["conditional_elementwise_affine", "conditional_elementwise_spline"],
        ),
        (lambda: transforms.convex_triangular_linear(3, count_matrices=1), ["triangular_linear"]),
        (lambda: transforms.conditional_convex_triangular_linear(3, 2, count_matrices=1), ["triangular_linear"]),
        (lambda: transforms.random_permutation(3, dim=-2), ["permute"]),
    ],
)
def test_errors_that_recommend_a_flow_name_one_that_exists(build, replacements):
    with pytest.raises(ValueError) as error:
        build()
    for name in replacements:
        assert name in str(error.value)
        assert callable(getattr(transforms, name))


def test_pyro_names_are_aliases_of_ours():
    assert isinstance(transforms.spline(3, 4, 2.0), transforms.ElementwiseSpline)
    assert isinstance(transforms.conditional_spline(3, 2, [8], 4), transforms.ConditionalElementwiseSpline)
    flow = transforms.affine_autoregressive(3, [8])
    assert flow.made_reads == "input" and flow.sign == 1  # IAF: one-pass sampling, like Pyro's
    assert transforms.conditional_affine_autoregressive(3, 2, [8]).made_reads == "input"
    linear = (lambda: transforms.spline(3, order="linear"), lambda: transforms.spline_autoregressive(3, order="linear"))
    for make in linear:
        with pytest.raises(NotImplementedError, match="order='quadratic'"):
            make()


@pytest.mark.parametrize(
    "spec, message",
    [
        ("householder:2(count_transforms=3)", "N \\(2\\) sets count_transforms, which the options set too"),
        ("iaf(stable=false)", "stable must be True or False, got 'false'"),
        ("iaf(stable=yes)", "stable must be True or False, got 'yes'"),
        ("iaf(stable='no')", "stable must be True or False, got 'no'"),
        ("maf(hidden_dims=8)", "hidden_dims must be a sequence of layer widths"),
    ],
)
def test_options_are_never_read_loosely_or_dropped(spec, message):
    with pytest.raises(ValueError, match=message):
        build_flow(spec, 3)
    with pytest.raises(ValueError, match=message):
        build_flow(spec, 3, context_dim=2)
