import pytest
import torch

from pyro_nflows.transforms.roots import InverseNotConverged, monotone_root


def test_solves_many_monotone_equations_to_tolerance():
    # f(t) = t + c tanh(t + b) - target, increasing for c > -1.
    generator = torch.Generator().manual_seed(0)
    c = -0.999 + 3 * torch.rand(1000, generator=generator, dtype=torch.float64)
    b = torch.randn(1000, generator=generator, dtype=torch.float64)
    target = 5 * torch.randn(1000, generator=generator, dtype=torch.float64)

    def function(t):
        return t + c * torch.tanh(t + b) - target, 1 + c * (1 - torch.tanh(t + b) ** 2)

    root = monotone_root(function, target - c.abs(), target + c.abs())
    value, slope = function(root)
    # The distance to the true root is about |f| / f'; the contract is 1e-12 relative.
    assert ((value / slope).abs() <= 1e-12 * (1 + root.abs())).all()


def test_raises_instead_of_returning_a_wrong_answer():
    with pytest.raises(InverseNotConverged, match="did not converge in 3 iterations"):
        monotone_root(
            lambda t: (t**3 - 2, 3 * t**2),
            torch.tensor([-10.0], dtype=torch.float64),
            torch.tensor([10.0], dtype=torch.float64),
            max_iterations=3,
        )


def test_an_exact_root_is_kept():
    # Newton lands exactly on the root of t - 1 after one step; f(t) == 0 there
    # must not send the iterate back to the middle of the bracket.
    lower = torch.tensor([0.0, 0.0], dtype=torch.float64)
    upper = torch.tensor([3.0, 5.0], dtype=torch.float64)
    root = monotone_root(lambda t: (t - 1, torch.ones_like(t)), lower, upper)
    assert torch.equal(root, torch.ones(2, dtype=torch.float64))
