"""ActNorm's data-dependent initialisation (the element-wise maths itself goes
through the shared checks of ``test_transforms.py``)."""

import pytest
import torch

from pyro_nflows.transforms import ActNorm


def _standardised(values: torch.Tensor) -> bool:
    return torch.allclose(values.mean(0), torch.zeros(3), atol=1e-5) and torch.allclose(
        values.std(0), torch.ones(3), atol=1e-5
    )


@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_the_first_batch_comes_out_standardised_and_later_batches_do_not_reinitialise(direction):
    torch.manual_seed(0)
    layer = ActNorm(3)
    apply = layer if direction == "forward" else layer.inv
    first = 5 + 3 * torch.randn(200, 3)
    assert _standardised(apply(first))
    assert bool(layer.initialized)
    scale = layer.log_scale.detach().clone()
    second = -2 + 0.5 * torch.randn(200, 3)
    assert not _standardised(apply(second))
    assert torch.equal(layer.log_scale.detach(), scale)


def test_the_flag_travels_with_the_state_dict_both_ways():
    torch.manual_seed(0)
    trained = ActNorm(3)
    trained(5 + 3 * torch.randn(100, 3))
    with torch.no_grad():
        trained.shift.add_(0.25)  # as if training had moved it

    loaded = ActNorm(3)
    loaded.load_state_dict(trained.state_dict())
    batch = torch.randn(50, 3)
    assert torch.equal(loaded(batch), trained(batch))  # not initialised again from this batch

    # An uninitialised state loaded into a used layer: the next batch initialises it.
    used = ActNorm(3)
    used(torch.randn(100, 3))
    used.load_state_dict(ActNorm(3).state_dict())
    assert not bool(used.initialized)
    assert _standardised(used(5 + 3 * torch.randn(200, 3)))


@pytest.mark.parametrize(
    "batch, message",
    [
        (torch.randn(1, 3), "at least 2 points"),
        (torch.cat((torch.randn(10, 2), torch.ones(10, 1)), -1), r"coordinates \[2\] are constant"),
    ],
)
def test_bad_first_batches_are_refused(batch, message):
    layer = ActNorm(3)
    with pytest.raises(ValueError, match=message):
        layer(batch)
    assert not bool(layer.initialized)
    with pytest.raises(ValueError, match="direction must be"):
        layer.initialize(torch.randn(10, 3), "sideways")
