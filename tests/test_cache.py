"""The cache of recent (x, y) pairs (``pyro_nflows.transforms.cache``): the deep Markov
model's pattern (one transform reused at every time step, its samples scored after the
guide has run) never inverts, and the cache stays bounded, weak and fresh."""

import copy
import gc
import pickle
import weakref

import pyro.distributions as dist
import pytest
import torch

from pyro_nflows.transforms import iaf
from pyro_nflows.transforms.base import FlowTransform

DIM, STEPS = 3, 12


@pytest.fixture
def flow():
    torch.manual_seed(0)
    transform = iaf(DIM, hidden_dims=[8]).double()
    with torch.no_grad():
        for parameter in transform.parameters():  # off the identity start
            parameter.add_(0.3 * torch.randn_like(parameter))
    return transform


def _no_inverse(monkeypatch):
    def refuse(self, y):
        raise AssertionError(f"{type(self).__name__} ran its inverse")

    monkeypatch.setattr(type(iaf(DIM)), "_inverse", refuse)


def _markov_chain(flow):
    """One draw per time step through the same flow, each from the one before (a DMM guide)."""
    z, draws = torch.zeros(4, DIM, dtype=torch.float64), []
    for _ in range(STEPS):
        q = dist.TransformedDistribution(dist.Normal(z.tanh(), 1.0).to_event(1), [flow])
        z = q.rsample()
        draws.append((q, z))
    return draws


def test_scoring_a_markov_chain_of_samples_never_inverts(flow, monkeypatch):
    draws = _markov_chain(flow)
    _no_inverse(monkeypatch)
    scores = [q.log_prob(z) for q, z in draws]
    sum(score.sum() for score in scores).backward()  # the graph of every pair is intact
    flow.zero_grad()
    monkeypatch.undo()
    with torch.no_grad():  # the same values as scoring each sample by inverting it
        for (q, z), score in zip(draws, scores):
            assert score.shape == (4,) and torch.allclose(score, q.log_prob(z.clone()), atol=1e-10)


def test_the_log_determinant_of_an_older_pair_is_handed_over_once(flow):
    x = [torch.randn(5, DIM, dtype=torch.float64) for _ in range(3)]
    y = [flow(value) for value in x]
    calls, original = [], type(flow)._theta

    def counted(self, value):  # the MADE's pass, which a log-determinant not handed over needs
        calls.append(1)
        return original(self, value)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(flow), "_theta", counted)
        first = flow.log_abs_det_jacobian(x[0], y[0])  # kept since the first call
        assert not calls
        again = flow.log_abs_det_jacobian(x[0], y[0])  # taken: computed afresh
        assert len(calls) == 1
    assert torch.allclose(first, again)


def test_pairs_are_forgotten_with_their_output_and_keep_no_output_alive(flow):
    pairs = flow.__dict__["_pairs"]
    pairs.clear()
    x = torch.randn(5, DIM, dtype=torch.float64)
    y = flow(x)
    assert len(pairs) == 1 and flow.inv(y) is x
    watch = weakref.ref(y)
    del y
    gc.collect()
    assert watch() is None, "the cache kept the output alive"
    assert len(pairs) == 0, "a pair outlived its output"


def test_the_cache_is_bounded(flow):
    flow.max_cached_pairs = 5
    x = [torch.randn(2, DIM, dtype=torch.float64) for _ in range(8)]
    y = [flow(value) for value in x]  # all kept alive
    assert len(flow.__dict__["_pairs"]) == 5
    assert all(flow.cached_input(value, forward=False) is None for value in y[:3])  # the oldest went first
    assert all(flow.inv(value) is given for value, given in zip(y[3:], x[3:]))


def test_the_inputs_kept_are_bounded_in_size_but_the_newest_pair_is_always_kept(flow):
    flow.max_cached_elements = 25
    x = [torch.randn(4, DIM, dtype=torch.float64) for _ in range(3)]  # 12 numbers each
    y = [flow(value) for value in x]
    assert len(flow.__dict__["_pairs"]) == 2 and flow.cached_input(y[0], forward=False) is None
    assert flow.inv(y[1]) is x[1] and flow.inv(y[2]) is x[2]
    big = torch.randn(10, DIM, dtype=torch.float64)  # 30 numbers, over the bound alone
    assert flow.inv(flow(big)) is big and len(flow.__dict__["_pairs"]) == 1


def test_a_parameter_update_empties_the_cache(flow):
    x = [torch.randn(2, DIM, dtype=torch.float64) for _ in range(3)]
    y = [flow(value) for value in x]
    with torch.no_grad():
        next(flow.parameters()).add_(0.1)
    assert all(flow.cached_input(value, forward=False) is None for value in y)
    recomputed = [flow.inv(value) for value in y]
    assert all(r is not given and not torch.allclose(r, given) for r, given in zip(recomputed, x))
    assert len(flow.__dict__["_pairs"]) == len(y)  # the fresh inverses, under the new parameters


def test_a_call_in_the_same_direction_is_computed_afresh(flow):
    x = torch.randn(2, DIM, dtype=torch.float64)
    y = flow(x)
    assert flow(x) is not y
    assert flow.cached_input(y, forward=True) is None


def test_without_a_cache_nothing_is_answered_but_the_log_det_is_still_handed_over(flow):
    flow.with_cache(0)
    x = torch.randn(2, DIM, dtype=torch.float64)
    y = flow(x)
    assert flow.cached_input(y, forward=False) is None and flow.inv(y) is not x
    z = flow(x)
    assert len(flow.__dict__["_pairs"]) == 1
    assert flow._take_log_det(x, z) is not None


def test_copies_and_pickles_start_empty(flow):
    keep = [flow(torch.randn(2, DIM, dtype=torch.float64)) for _ in range(3)]
    for clone in [copy.deepcopy(flow), pickle.loads(pickle.dumps(flow))]:
        assert isinstance(clone, FlowTransform) and len(clone.__dict__["_pairs"]) == 0
        assert clone.cached_input(keep[0], forward=False) is None
        point = torch.ones(1, DIM, dtype=torch.float64)
        assert torch.allclose(clone(point), flow(point))
