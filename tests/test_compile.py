"""``torch.compile`` on the package's flows.

A compiled ``log_prob``, its gradients and a compiled sampler give the eager
results; the closed-form directions compile into one graph (no graph break:
the cache, which keys on tensor identity and version counters, is off in a
traced call, and a conditioned flow does not memoise its context network's
outputs); the numerical inverses (planar's root, the residual flow's fixed
point) run eagerly between graphs instead of failing to trace.

Compiled with torch's ``"aot_eager"`` backend: dynamo's tracing and AOT
autograd, the parts that see our code, without inductor's C++ generation
(``benchmarks/speed_compile.py`` times inductor's).
"""

import pyro.distributions as dist
import pytest
import torch
import torch._dynamo as dynamo

from pyro_nflows.registry import build_flow

DIM, BATCH = 4, 8

# spec -> the directions that are closed form, so must compile into one graph:
# "score" (log_prob of data), "sample" (rsample and the log_prob of that sample).
FAMILIES = {
    "maf:2": {"score"},
    "iaf:2": set(),  # its sample is parallel, but the score of a sample runs the sequential inverse
    "affine_coupling:2": {"score", "sample"},
    "spline_coupling:2": {"score", "sample"},
    "householder:3": {"score", "sample"},
    "lu_linear": {"score", "sample"},
    "planar:2": set(),  # the score of a sample runs the root-finding inverse, eagerly
    "residual(logdet='exact')": set(),
}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """A fresh dynamo, with torch's distribution checks off as dynamo's first use leaves
    them (for the whole process), and back as they were after the test."""
    validate = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(False)
    dynamo.reset()
    yield
    dynamo.reset()
    torch.distributions.Distribution.set_default_validate_args(validate)


def _distribution(spec: str) -> dist.TransformedDistribution:
    torch.manual_seed(0)
    flows = [flow.double() for flow in build_flow(spec, DIM)]
    with torch.no_grad():
        for flow in flows:
            for parameter in flow.parameters():  # off the identity start
                parameter.add_(0.2 * torch.randn_like(parameter))
    base = dist.Normal(torch.zeros(DIM, dtype=torch.float64), torch.ones(DIM, dtype=torch.float64)).to_event(1)
    return dist.TransformedDistribution(base, flows)


def _parameters(flow: dist.TransformedDistribution) -> list[torch.Tensor]:
    return [p for t in flow.transforms for p in t.parameters()]


def _score(flow):
    return lambda x: flow.log_prob(x)


def _sample(flow):
    def sample_and_score(seed: int):
        torch.manual_seed(seed)
        y = flow.rsample((BATCH,))
        return y, flow.log_prob(y)

    return sample_and_score


def _compile(function):
    """``function`` compiled with ``aot_eager``, and the list of the graphs dynamo makes of it
    (one graph: no graph break)."""
    graphs = []
    aot_eager = dynamo.lookup_backend("aot_eager")

    def backend(graph, example_inputs):
        graphs.append(graph)
        return aot_eager(graph, example_inputs)

    return torch.compile(function, backend=backend), graphs


@pytest.mark.parametrize("spec", FAMILIES)
def test_compiled_log_prob_and_gradients_match(spec):
    flow = _distribution(spec)
    x = torch.randn(BATCH, DIM, dtype=torch.float64)
    score = _score(flow)
    eager = score(x)
    eager_grads = torch.autograd.grad(eager.sum(), _parameters(flow))
    compiled_score, graphs = _compile(score)
    compiled = compiled_score(x)
    grads = torch.autograd.grad(compiled.sum(), _parameters(flow))
    torch.testing.assert_close(compiled, eager, atol=1e-10, rtol=1e-10)
    for grad, eager_grad in zip(grads, eager_grads):
        torch.testing.assert_close(grad, eager_grad, atol=1e-10, rtol=1e-10)
    if "score" in FAMILIES[spec]:
        assert len(graphs) == 1


@pytest.mark.parametrize("spec", FAMILIES)
def test_compiled_sampling_matches(spec):
    flow = _distribution(spec)
    sample = _sample(flow)
    y_eager, log_q_eager = sample(1)
    compiled, graphs = _compile(sample)
    y, log_q = compiled(1)
    torch.testing.assert_close(y, y_eager, atol=1e-10, rtol=1e-10)
    # A traced call keeps no cache, so the score of the sample runs the inverse: rounding apart, the same.
    torch.testing.assert_close(log_q, log_q_eager, atol=1e-8, rtol=1e-8)
    if "sample" in FAMILIES[spec]:
        assert len(graphs) == 1
    # A second seed reuses the graphs and gives that seed's draw.
    count = len(graphs)
    y2, _ = compiled(2)
    torch.testing.assert_close(y2, sample(2)[0], atol=1e-10, rtol=1e-10)
    assert len(graphs) == count


# Conditional flows: spec -> whether scoring data is closed form (one graph).
CONDITIONAL = {"maf:2": True, "affine_coupling:2": True, "planar:2": False}


@pytest.mark.parametrize("spec", CONDITIONAL)
def test_compiled_conditional_log_prob_matches(spec):
    """The context network's outputs are not memoised in a traced call either."""
    torch.manual_seed(0)
    flows = [flow.double() for flow in build_flow(spec, DIM, 2)]
    base = dist.Normal(torch.zeros(DIM, dtype=torch.float64), torch.ones(DIM, dtype=torch.float64)).to_event(1)
    x, context = torch.randn(BATCH, DIM, dtype=torch.float64), torch.randn(BATCH, 2, dtype=torch.float64)

    def score(x, context):
        return dist.ConditionalTransformedDistribution(base, flows).condition(context).log_prob(x)

    parameters = [p for flow in flows for p in flow.parameters()]
    eager = score(x, context)
    eager_grads = torch.autograd.grad(eager.sum(), parameters)
    compiled_score, graphs = _compile(score)
    compiled = compiled_score(x, context)
    grads = torch.autograd.grad(compiled.sum(), parameters)
    torch.testing.assert_close(compiled, eager, atol=1e-10, rtol=1e-10)
    for grad, eager_grad in zip(grads, eager_grads):
        torch.testing.assert_close(grad, eager_grad, atol=1e-10, rtol=1e-10)
    if CONDITIONAL[spec]:
        assert len(graphs) == 1


def test_a_traced_call_leaves_the_cache_empty():
    flow = _distribution("maf:2")
    _compile(_sample(flow))[0](1)
    assert all(len(t.__dict__["_pairs"]) == 0 for t in flow.transforms)
