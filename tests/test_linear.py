"""Properties of the linear family beyond the shared checks: agreement with
independent references (Pyro's Householder, explicit matrix products)."""

import pytest
import torch
from pyro.distributions.transforms import Householder as PyroHouseholder

from pyro_nflows.transforms import (
    ConditionedHouseholder,
    Householder,
    LULinear,
    QRLinear,
    conditional_convex_triangular_linear,
    conditional_householder,
    convex_triangular_linear,
    householder,
    lu_linear,
    qr_linear,
    triangular_linear,
)
from pyro_nflows.transforms.matrices import reflect

pytestmark = pytest.mark.usefixtures("float64")

def _explicit_product(vectors):
    """H_K ... H_1 as a dense matrix, one reflection at a time."""
    dim = vectors.shape[-1]
    product = torch.eye(dim)
    for v in vectors:
        u = v / v.norm()
        product = (torch.eye(dim) - 2 * torch.outer(u, u)) @ product
    return product


@pytest.mark.parametrize("count", [1, 3, 8, 12])
def test_reflect_matches_the_explicit_product(count):
    vectors = torch.randn(count, 8)
    x = torch.randn(5, 8)
    matrix = _explicit_product(vectors)
    assert torch.allclose(reflect(x, vectors), x @ matrix.T, atol=1e-12)
    assert torch.allclose(reflect(x, vectors, inverse=True), x @ matrix, atol=1e-12)


def test_reflect_with_batched_vectors_matches_per_point_products():
    vectors = torch.randn(4, 3, 6)
    x = torch.randn(2, 4, 6)
    y = reflect(x, vectors)
    for i in range(2):
        for j in range(4):
            assert torch.allclose(y[i, j], _explicit_product(vectors[j]) @ x[i, j], atol=1e-12)


def test_householder_matches_pyro():
    ours = Householder(7, count_transforms=5).double()
    pyro = PyroHouseholder(7, count_transforms=5).double()
    with torch.no_grad():
        pyro.u_unnormed.copy_(ours.vectors)
    x = torch.randn(10, 7)
    assert torch.allclose(ours(x), pyro(x), atol=1e-12)
    assert torch.allclose(ours._inverse(x), pyro._inverse(x), atol=1e-12)


def test_householder_with_full_count_reaches_any_rotation():
    """D reflections can represent any orthogonal matrix of determinant (-1)^D: fit one."""
    torch.manual_seed(0)
    target = torch.linalg.qr(torch.randn(4, 4)).Q
    if torch.linalg.det(target) < 0:  # a product of 4 reflections has determinant +1
        target[:, 0] = -target[:, 0]
    flow = Householder(4, count_transforms=4).double()
    optimizer = torch.optim.Adam(flow.parameters(), lr=0.05)
    x = torch.randn(64, 4)
    for _ in range(600):
        optimizer.zero_grad()
        loss = (flow._call(x) - x @ target.T).square().mean()
        loss.backward()
        optimizer.step()
    assert loss.item() < 1e-6


def test_linear_log_dets_match_dense_slogdet():
    lu, qr = LULinear(6).double(), QRLinear(6).double()
    with torch.no_grad():
        for p in list(lu.parameters()) + list(qr.parameters()):
            p.add_(0.5 * torch.randn_like(p))
    x = torch.randn(6)
    eye = torch.eye(6)
    for flow in (lu, qr):
        matrix = flow._call(eye) - flow._call(torch.zeros(6))  # columns W e_i
        assert torch.allclose(flow.log_abs_det_jacobian(x, flow(x)), torch.linalg.slogdet(matrix.T).logabsdet)


def test_convex_triangular_is_a_convex_combination():
    flow = convex_triangular_linear(4, count_matrices=3).double()
    with torch.no_grad():
        flow.logits.copy_(torch.tensor([0.2, -1.0, 0.7]))
    weights = torch.softmax(flow.logits, 0)
    singles = []
    for k in range(3):
        single = triangular_linear(4).double()
        with torch.no_grad():
            single.entries.copy_(flow.components[k])
        singles.append(single.matrix())
    expected = sum(w * m for w, m in zip(weights, singles))
    assert torch.allclose(flow.matrix(), expected)
    assert torch.equal(torch.diagonal(flow.matrix()), torch.ones(4))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: householder(0), "input_dim"),
        (lambda: householder(3, count_transforms=0), "count_transforms"),
        (lambda: householder(3.5), "input_dim"),
        (lambda: convex_triangular_linear(3, count_matrices=1), "count_matrices must be >= 2"),
        (lambda: conditional_convex_triangular_linear(3, 2, count_matrices=0), "count_matrices"),
        (lambda: conditional_householder(3, 0), "context_dim"),
        (lambda: conditional_householder(3, 2, hidden_dims=(8, 0)), "hidden_dims"),
        (lambda: qr_linear(3, count_transforms=0), "count_transforms"),
        (lambda: lu_linear(-1), "input_dim"),
    ],
)
def test_bad_hyper_parameters_raise(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_wrong_event_size_names_expected_and_given():
    with pytest.raises(
        ValueError, match=r"Householder expects inputs whose last dimension is 4, got a tensor of shape \(2, 5\)"
    ):
        householder(4)(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"ConditionalHouseholder expects contexts whose last dimension is 3"):
        conditional_householder(4, 3).condition(torch.randn(2, 2))


def test_conditioned_householder_takes_a_callable():
    vectors = torch.randn(2, 3)
    flow = ConditionedHouseholder(3, lambda: vectors)
    x = torch.randn(3)
    assert torch.allclose(flow(x), reflect(x, vectors))
