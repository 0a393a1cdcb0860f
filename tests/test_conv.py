"""The image transforms (pyro_nflows.transforms.conv): the shared image checks
of ``image_checks.py`` on every helper and on ``glow``, and what is each
one's own, against independent references (``conv2d``, circular
convolutions, dense triangular solves, explicit reshapes)."""

import doctest

import pyro.distributions as dist
import pytest
import torch
from image_checks import ImageStack, check_image_transform
from torch.nn import functional as F

from pyro_nflows.registry import FLOWS
from pyro_nflows.transforms import (
    ChannelSlice,
    Conv1x1,
    LULinear,
    QRLinear,
    actnorm2d,
    conditional_actnorm2d,
    conditional_conv_affine_coupling,
    conv,
    conv1x1,
    conv_affine_coupling,
    emerging_conv,
    glow,
    glow_flow,
    periodic_conv,
    squeeze,
    unsqueeze,
)

SHAPE = (2, 4, 4)
CONTEXT_DIM = 3
ODD = ((2, 3, 4), "forward", "with even H and W")

# name -> (build, options of check_image_transform)
CASES = {
    "conv1x1-lu": (lambda: conv1x1(2), {}),
    "conv1x1-qr": (lambda: conv1x1(2, "qr"), {}),
    "conv1x1-qr-one-reflection": (lambda: conv1x1(2, "qr", count_transforms=1), {}),
    "emerging": (lambda: emerging_conv(2), {}),
    "emerging-iaf-5x5": (lambda: emerging_conv(2, 5, direction="iaf"), {}),
    "periodic": (lambda: periodic_conv(2), {}),
    "periodic-wider-than-the-image": (lambda: periodic_conv(2, 9), {}),
    "actnorm2d": (lambda: actnorm2d(2), {}),
    "squeeze": (lambda: squeeze(2), {"out_shape": (8, 2, 2), "has_parameters": False, "bad_shapes": [ODD]}),
    "squeeze-any-channels": (lambda: squeeze(), {"out_shape": (8, 2, 2), "has_parameters": False}),
    "unsqueeze": (lambda: unsqueeze(8), {"out_shape": (2, 4, 4), "has_parameters": False}),
    "coupling-channel": (lambda: conv_affine_coupling(2, 8), {}),
    "coupling-checkerboard": (lambda: conv_affine_coupling(2, 8, mask="checkerboard", reverse=True), {}),
    "channel-slice": (lambda: ChannelSlice(conv_affine_coupling(2, 8, mask="checkerboard"), 3), {}),
}
CONDITIONAL_CASES = {
    "conditional-actnorm2d": lambda: conditional_actnorm2d(2, CONTEXT_DIM, hidden_dims=(8,)),
    "conditional-coupling-channel": lambda: conditional_conv_affine_coupling(2, CONTEXT_DIM, 8),
    "conditional-coupling-checkerboard": lambda: conditional_conv_affine_coupling(
        2, CONTEXT_DIM, 8, mask="checkerboard", reverse=True
    ),
}


def _moved(module, scale=0.3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return module


@pytest.mark.parametrize("name", list(CASES))
def test_shared_image_checks(name):
    build, options = CASES[name]
    shape = (3, 4, 4) if name == "channel-slice" else (8, 2, 2) if name == "unsqueeze" else SHAPE
    check_image_transform(build, shape, **options)


@pytest.mark.parametrize("name", list(CONDITIONAL_CASES))
def test_shared_image_checks_conditional(name):
    check_image_transform(CONDITIONAL_CASES[name], SHAPE, CONTEXT_DIM)


# conv1x1_qr's stack differs from conv1x1_lu's only by a layer checked on its own above.
@pytest.mark.parametrize("conv_name", ["conv1x1_lu", "emerging", "periodic"])
def test_shared_image_checks_glow(conv_name):
    def build():
        return ImageStack(glow(2, 4, 4, levels=2, steps=1, conv=conv_name, hidden_channels=4))

    wrong = [((3, 4, 4), "forward", "(..., 2, H, W) with even H and W"), ((3, 4, 4), "inverse", "(..., 2, H, W)")]
    check_image_transform(build, SHAPE, bad_shapes=[ODD, *wrong])


# ---------------------------------------------------------------------------
# 1x1 convolutions and their shared LU / QR parametrisations
# ---------------------------------------------------------------------------


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("decomposition", ["lu", "qr"])
def test_conv1x1_is_conv2d_with_its_matrix(decomposition):
    layer = _moved(conv1x1(5, decomposition))
    x = torch.randn(3, 5, 4, 6)
    matrix = layer.matrix()
    assert torch.allclose(layer(x), F.conv2d(x, matrix[:, :, None, None]), atol=1e-12)
    assert torch.allclose(layer.inverse_matrix() @ matrix, torch.eye(5), atol=1e-12)
    expected = 4 * 6 * torch.linalg.slogdet(matrix).logabsdet
    assert torch.allclose(layer.log_abs_det_jacobian(x, layer(x)), expected.expand(3))


@pytest.mark.usefixtures("float64")
def test_conv1x1_shares_the_lu_and_qr_code_of_the_linear_maps():
    assert Conv1x1.lu_factors is LULinear.lu_factors and Conv1x1.qr_matrix is QRLinear.qr_matrix
    lu, linear = _moved(conv1x1(4)), LULinear(4)
    linear.load_state_dict({**lu.state_dict(), "bias": torch.zeros(4)})
    assert torch.equal(lu.matrix(), linear.matrix())
    qr, linear = _moved(conv1x1(4, "qr")), QRLinear(4)
    linear.load_state_dict({**qr.state_dict(), "bias": torch.zeros(4)})
    eye = torch.eye(4)
    assert torch.allclose(qr.matrix(), linear._call(eye).T, atol=1e-12)  # columns W e_i
    # The linear maps' state_dict keys are those they always had.
    assert list(LULinear(3).state_dict()) == [
        "lower_entries", "upper_entries", "log_diagonal", "bias", "permutation", "inverse_permutation"
    ]
    assert list(QRLinear(3).state_dict()) == ["vectors", "upper_entries", "log_diagonal", "bias"]


def test_conv1x1_refuses_bad_options():
    with pytest.raises(ValueError, match="decomposition must be 'lu'"):
        conv1x1(3, "svd")
    with pytest.raises(ValueError, match="count_transforms"):
        conv1x1(3, "lu", count_transforms=2)
    with pytest.raises(ValueError, match="channels"):
        conv1x1(0)


# ---------------------------------------------------------------------------
# Emerging convolutions
# ---------------------------------------------------------------------------


def _dense(function, shape):
    """The matrix of a linear map of images of ``shape``, flattened in (C, H, W) order."""
    size = shape[0] * shape[1] * shape[2]
    return torch.autograd.functional.jacobian(lambda v: function(v.reshape(1, *shape)).flatten(), torch.zeros(size))


def _pixel_major(matrix, shape):
    """The same matrix with the coordinates in (H, W, C) order: raster order, channels within a pixel."""
    order = torch.arange(matrix.shape[0]).reshape(shape).permute(1, 2, 0).flatten()
    return matrix[order][:, order]


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("kernel_size", [1, 3, 5])
def test_emerging_inverse_matches_a_dense_triangular_solve(kernel_size):
    shape = (3, 5, 4)
    layer = _moved(emerging_conv(3, kernel_size, direction="iaf"), scale=0.2)
    lower, upper = layer.taps()
    first = _pixel_major(_dense(lambda v: conv._causal_conv(v, lower), shape), shape)
    second = _dense(lambda v: conv._causal_conv(v.flip(-2, -1), upper).flip(-2, -1), shape)
    second = _pixel_major(second, shape)
    assert torch.equal(first, first.tril()) and torch.equal(second, second.triu())  # the two triangular factors
    y = torch.randn(2, *shape)
    flat = y.permute(0, 2, 3, 1).reshape(2, -1).T  # columns in (H, W, C) order
    z = torch.linalg.solve_triangular(second, flat, upper=True)
    x = torch.linalg.solve_triangular(first, z, upper=False)
    expected = x.T.reshape(2, shape[1], shape[2], shape[0]).permute(0, 3, 1, 2)
    assert torch.allclose(layer.solve(y), expected, atol=1e-10)
    assert torch.allclose(layer.convolve(expected), y, atol=1e-10)


@pytest.mark.usefixtures("float64")
def test_emerging_conv_is_a_d_by_d_convolution():
    layer = _moved(emerging_conv(2, 3, direction="iaf"))
    delta = torch.zeros(1, 2, 9, 9)
    delta[0, 1, 4, 4] = 1.0
    reach = layer(delta).abs().sum((0, 1)) > 0
    assert reach[3:6, 3:6].all() and reach.sum() == 9  # a 3 x 3 receptive field, centred


@pytest.mark.parametrize("height, width", [(4, 4), (6, 3)])
def test_emerging_inverse_takes_one_step_per_anti_diagonal(height, width, monkeypatch):
    """The substitutions run H + W - 1 steps each, whatever the batch (one F.pad a step,
    plus two per skew or unskew)."""
    calls = []
    pad = F.pad
    monkeypatch.setattr(F, "pad", lambda *args, **kwargs: calls.append(1) or pad(*args, **kwargs))
    layer = emerging_conv(2)
    for batch in (1, 16):
        calls.clear()
        with torch.no_grad():
            layer.solve(torch.randn(batch, 2, height, width))
        assert len(calls) == 2 * (height + width - 1) + 4


def test_emerging_directions_swap_the_convolution():
    maf, iaf = emerging_conv(2), emerging_conv(2, direction="iaf")
    iaf.load_state_dict(_moved(maf).state_dict())
    x = torch.randn(3, 2, 5, 5)
    assert torch.equal(maf._inverse(x), iaf._call(x))
    assert torch.allclose(maf.log_abs_det_jacobian(x, x), -iaf.log_abs_det_jacobian(x, x))
    with pytest.raises(ValueError, match="direction must be 'maf'"):
        emerging_conv(2, direction="forward")
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        emerging_conv(2, 4)


# ---------------------------------------------------------------------------
# Periodic convolutions
# ---------------------------------------------------------------------------


def _circular_reference(x, weight):
    """y_{h,w} = sum_{i,j} K_{ij} x_{h+i-r, w+j-r}, indices modulo the image, one tap at a time."""
    radius = weight.shape[-1] // 2
    y = torch.zeros_like(x)
    for i in range(weight.shape[-2]):
        for j in range(weight.shape[-1]):
            shifted = torch.roll(x, shifts=(radius - i, radius - j), dims=(-2, -1))
            y = y + torch.einsum("oc,nchw->nohw", weight[:, :, i, j], shifted)
    return y


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("kernel_size, height, width", [(3, 6, 7), (5, 4, 6), (7, 2, 3)])
def test_periodic_conv_is_a_circular_convolution(kernel_size, height, width):
    layer = _moved(periodic_conv(3, kernel_size))
    x = torch.randn(4, 3, height, width)
    expected = _circular_reference(x, layer.weight)
    assert torch.allclose(layer(x), expected, atol=1e-12)
    assert torch.allclose(layer._multiply(layer.spectrum(height, width), x), expected, atol=1e-12)  # Fourier
    if kernel_size // 2 <= min(height, width):
        padded = F.pad(x, (kernel_size // 2,) * 4, mode="circular")
        assert torch.allclose(layer(x), F.conv2d(padded, layer.weight), atol=1e-12)
    assert torch.allclose(layer._inverse(expected), x, atol=1e-9)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("height, width", [(4, 4), (3, 5), (5, 2)])
def test_periodic_log_det_counts_every_frequency(height, width):
    layer = _moved(periodic_conv(2))
    matrix = _dense(layer._call, (2, height, width))
    x = torch.randn(2, height, width)
    assert torch.allclose(layer.log_abs_det_jacobian(x, x), torch.linalg.slogdet(matrix).logabsdet, atol=1e-10)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("height, width", [(4, 4), (3, 5)])
def test_periodic_inverse_and_its_log_det_agree_with_and_without_gradients(height, width):
    """The inverse factors each frequency once without gradients, and solves with them."""
    layer = _moved(periodic_conv(2))
    matrix = _dense(layer._call, (2, height, width))
    y = torch.randn(3, 2, height, width)
    with torch.no_grad():
        x_plain, log_det_plain = layer._inverse_and_log_det(y)
    x_grad, log_det_grad = layer._inverse_and_log_det(y)
    assert x_grad.requires_grad and not x_plain.requires_grad
    expected = torch.linalg.solve(matrix, y.reshape(3, -1).T).T.reshape(y.shape)
    for x, log_det in [(x_plain, log_det_plain), (x_grad, log_det_grad)]:
        assert torch.allclose(x, expected, atol=1e-10)
        assert torch.allclose(log_det, torch.linalg.slogdet(matrix).logabsdet.expand(3), atol=1e-10)


# ---------------------------------------------------------------------------
# Squeeze, actnorm, couplings
# ---------------------------------------------------------------------------


def _squeeze_reference(x):
    channels, height, width = x.shape[-3:]
    y = x.new_zeros(x.shape[:-3] + (4 * channels, height // 2, width // 2))
    for c in range(channels):
        for i in range(2):
            for j in range(2):
                y[..., 4 * c + 2 * i + j, :, :] = x[..., c, i::2, j::2]
    return y


def test_squeeze_matches_a_reference_reshape():
    x = torch.randn(2, 3, 3, 4, 6)
    layer = squeeze()
    y = layer(x)
    assert torch.equal(y, _squeeze_reference(x))
    assert torch.equal(layer._inverse(y), x) and torch.equal(unsqueeze()(y), x)
    assert layer.forward_shape((5, 3, 4, 6)) == (5, 12, 2, 3) and layer.inverse_shape((12, 2, 3)) == (3, 4, 6)
    with pytest.raises(ValueError, match=r"Squeeze expects inputs of shape \(\.\.\., C, H, W\) with even H and W"):
        layer(torch.randn(3, 5, 4))
    with pytest.raises(ValueError, match=r"Squeeze expects outputs of shape \(\.\.\., 4C, H, W\)"):
        layer.inv(torch.randn(6, 2, 2))
    with pytest.raises(ValueError, match="even height and width"):
        layer.forward_shape((3, 5, 4))
    with pytest.raises(ValueError, match="multiple of 4"):
        unsqueeze(6)


def test_actnorm2d_standardises_its_first_batch_per_channel():
    data = torch.tensor([1.0, 5.0, -3.0])[:, None, None] + torch.tensor([0.5, 2.0, 4.0])[:, None, None] * torch.randn(
        64, 3, 4, 4
    )
    for direction in ("forward", "inverse"):
        layer = actnorm2d(3)
        out = layer(data) if direction == "forward" else layer.inv(data)
        assert torch.allclose(out.mean((0, 2, 3)), torch.zeros(3), atol=1e-5)
        assert torch.allclose(out.std((0, 2, 3)), torch.ones(3), atol=1e-4)
        restored = actnorm2d(3)
        restored.load_state_dict(layer.state_dict())
        assert bool(restored.initialized) and torch.equal(restored.log_scale, layer.log_scale)
    with pytest.raises(ValueError, match="channels \\[1\\] are constant"):
        actnorm2d(2)(torch.stack([torch.randn(8, 4, 4), torch.ones(8, 4, 4)], 1))


def test_couplings_start_at_the_identity_and_keep_their_part():
    x = torch.randn(5, 4, 6, 6)
    for mask in ("channel", "checkerboard"):
        layer = conv_affine_coupling(4, 8, mask=mask)
        assert torch.equal(layer(x), x)
        _moved(layer)
        y = layer(x)
        if mask == "channel":
            assert torch.equal(y[:, :2], x[:, :2]) and not torch.equal(y[:, 2:], x[:, 2:])
        else:
            kept = (torch.arange(6)[:, None] + torch.arange(6)[None, :]) % 2 == 0
            assert torch.equal(y[..., kept], x[..., kept]) and not torch.equal(y[..., ~kept], x[..., ~kept])
    with pytest.raises(ValueError, match="mask='checkerboard'"):
        conv_affine_coupling(1)
    with pytest.raises(ValueError, match="mask must be one of"):
        conv_affine_coupling(2, mask="stripes")


def test_conditional_layers_depend_on_their_context():
    x = torch.randn(4, 2, 4, 4)
    for layer in (conditional_actnorm2d(2, 3), conditional_conv_affine_coupling(2, 3, 8)):
        _moved(layer)
        first, second = torch.randn(3), torch.randn(3)
        assert not torch.allclose(layer.condition(first)(x), layer.condition(second)(x))


# ---------------------------------------------------------------------------
# Glow
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("conv_name", glow_flow.GLOW_CONVS)
def test_glow_is_one_bijection_of_the_image_shape_in_a_transformed_distribution(conv_name):
    torch.manual_seed(0)
    layers = glow(1, 8, 8, levels=3, steps=2, conv=conv_name, hidden_channels=8)
    flow = dist.TransformedDistribution(dist.Normal(torch.zeros(1, 8, 8), 1.0).to_event(3), layers)
    x = torch.randn(6, 1, 8, 8)
    log_prob = flow.log_prob(x)
    stack = ImageStack(layers)
    z, log_det = stack._inverse_and_log_det(x)
    assert z.shape == x.shape and flow.sample((2,)).shape == (2, 1, 8, 8)
    expected = dist.Normal(torch.zeros(1, 8, 8), 1.0).to_event(3).log_prob(z) - log_det
    assert torch.allclose(log_prob, expected, atol=1e-4)


def test_glow_factors_out_half_of_the_channels_per_level():
    """The latents factored out after the first level do not depend on the later levels' layers."""
    torch.manual_seed(0)
    layers = glow(1, 8, 8, levels=2, steps=1, hidden_channels=8)
    stack = ImageStack(layers)
    x = torch.randn(3, 1, 8, 8)
    z = stack.inv(x).detach()
    level_two = [layer for layer in layers if isinstance(layer, ChannelSlice)]
    assert [layer.channels for layer in level_two] == [16] * 3 and all(
        layer.transform.channels == 8 for layer in level_two
    )
    for layer in level_two:
        _moved(layer, scale=0.5)
    moved = stack.inv(x.clone()).detach()
    squeezed = glow_flow._space_to_depth(glow_flow._space_to_depth(z))  # the 16 channels at 2 x 2 of level two
    squeezed_moved = glow_flow._space_to_depth(glow_flow._space_to_depth(moved))
    assert torch.equal(squeezed[:, 8:], squeezed_moved[:, 8:])
    assert not torch.allclose(squeezed[:, :8], squeezed_moved[:, :8])


def test_glow_refuses_bad_options():
    with pytest.raises(ValueError, match="multiples of 8"):
        glow(1, 8, 12, levels=3)
    with pytest.raises(ValueError, match="conv must be one of"):
        glow(1, 8, 8, conv="dense")
    with pytest.raises(ValueError, match="levels"):
        glow(1, 8, 8, levels=0)


def test_docstring_examples_run():
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner()
    for module in (conv, glow_flow):
        for test in finder.find(module):
            runner.run(test)
    assert runner.failures == 0 and runner.tries >= 8


@pytest.mark.parametrize("name", [name for name, entry in FLOWS.items() if entry.event == "image"])
def test_every_image_family_of_the_registry_passes_the_image_checks(name):
    """A new image family is checked as soon as the registry names it."""
    entry = FLOWS[name]
    channels = 8 if name == "unsqueeze" else 2
    shape = (channels, 4, 4) if name != "unsqueeze" else (8, 2, 2)
    out_channels = channels if entry.channels_after is None else entry.channels_after(channels)
    out_shape = (out_channels,) + tuple(
        side * 2 if out_channels < channels else side // 2 if out_channels > channels else side for side in shape[1:]
    )
    learns = entry.channels_after is None
    options = {"hidden_channels": 8} if "hidden_channels" in entry.options(False) else {}
    check_image_transform(lambda: entry.build(channels, **options), shape, out_shape=out_shape, has_parameters=learns)
    if entry.build_conditional is not None:
        options = {"hidden_channels": 8} if "hidden_channels" in entry.options(True) else {"hidden_dims": (8,)}
        check_image_transform(lambda: entry.build_conditional(channels, CONTEXT_DIM, **options), shape, CONTEXT_DIM)
