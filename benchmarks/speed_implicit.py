"""Speed cases of the two families with no closed-form inverse: residual flows
against normflows' ``Residual``, continuous flows against zuko's ``CNF``.

``benchmarks/speed.py`` runs them with its other cases (this module appends
them to its ``CASES``: one list, one table); this module only builds them, with ``speed.py``'s machinery
(``Contestants``, ``same``, ``peer_steps``, ``_nll_step``). Select them with
``python benchmarks/speed.py --filter residual`` (or ``continuous``).

**Residual flows** (5 blocks of ``x + g(x)``, g a Lipschitz MLP with hidden
widths (H, H), every linear layer held to spectral norm c = 0.9 by the
induced norm ``W / max(1, u^T W v / c)``, LipSwish activations). Ours is
``residual(D, (H, H), lipschitz=0.9, direction="maf")``: the block is the
data -> noise map, what ``fit`` trains, so scoring data is one pass and
sampling solves the block by fixed-point iteration. normflows'
``Residual(LipschitzMLP([D, H, H, D], lipschitz_const=0.9), reverse=True)``
is the same arrangement (its ``log_prob`` direction applies the block). The
parametrisations are the same, so normflows gets *our* weights, biases,
LipSwish slopes and singular vectors, and outputs are compared with
``same``. One difference of architecture remains: normflows' LipschitzMLP
also applies its Swish to the input (``Swish, Linear, Swish, Linear, Swish,
Linear``); we replace that first Swish by the identity, so that both compute
the same g (this only removes work from normflows). Neither side refreshes
its singular vectors in the timed step (the weights do not change there; in
training ours takes an SVD per layer, normflows' ``update_lipschitz`` 5 power
iterations, after each optimiser step).

- ``log_prob fwd+bwd roulette``: the unbiased Russian-roulette log-det with
  Gaussian probes and Neumann-series gradients on both sides. normflows'
  default draws ``n ~ np.random.geometric(0.5)``, which counts from 1, and
  computes ``n + n_exact_terms`` = ``n + 2`` terms: at least 3 terms, 4 on
  average. Ours ``count_exact_terms=3, roulette_p=0.5, probe="gaussian"`` is
  the same estimator (the same law of the number of terms, the same
  weights); ``count_exact_terms=2`` would compute one term fewer on average.
  Checked before timing: the blocks agree; each estimator's mean over many
  draws matches the exact log-density within its standard error (both sides
  run the same network, so the exact value is one for both).
- ``log_prob fwd+bwd exact`` (D = 2): ours ``logdet="exact"`` (``vmap`` of
  ``jacrev``, then ``slogdet``) against normflows' ``brute_force=True`` (a
  loop over the 2 output coordinates of autograd, then the 2 x 2 determinant).
  Checked: the log-densities agree, and ours equals the change of variables
  with an autograd Jacobian in float64.
- ``sample``: noise through the 5 blocks' fixed-point solves, under
  ``no_grad``. normflows' ``NormalizingFlow.sample`` also computes log q
  (in evaluation mode 20 or more power-series terms per block), so its step is
  what ``sample`` does without that: ``iresblock.inverse(z)`` per block.
  normflows iterates the whole batch until every coordinate's squared step is
  below ``1e-5 (1 + |y_i|)`` (so steps below about ``3e-3``); ours stops each
  point once its a-priori error bound is below ``tolerance (1 + |y|)``. The
  matched cases give ours the tolerance whose stopping step is normflows'
  (``sqrt(1e-5) (1 + |y|)``); the notes print the round-trip error
  ``|noise - block(sample)|`` each side reaches, and the fixed-point steps.
  The ``default tolerance`` case runs ours at its own default (a residual of
  ten float32 epsilons), more accurate than normflows and slower.

**Continuous flows** (one ODE ``dx/dt = f(x, t)`` on [0, 1], dopri5, exact
trace, ``atol = rtol = 1e-5`` on both sides). Ours is ``continuous(D, (H,
H))``: concat-squash tanh layers, the exact trace in closed form (about one
extra matrix-vector product per evaluation), torchdiffeq's dopri5 with the
max norm, backpropagation through the solver's steps. zuko's ``CNF(D,
hidden_features=(H, H), atol=1e-5, rtol=1e-5, exact=True)``: an ELU MLP on
``(x, cos/sin of 3 time frequencies)``, the exact trace by autograd batched
over the D basis vectors (``is_grads_batched``), its own dopri45 (7
evaluations per step, max norm) with the adaptive-checkpoint adjoint (the
backward pass re-evaluates every step). What is matched: D, hidden widths,
tolerances, solver family, time span, batch, the exact trace. What is not:
the networks (different layers, so no shared weights and no ``same``), and
zuko scales the trace by 1e-2 in its error control (its log-det is held
100 times more loosely than x; ours holds both alike). Each side is
checked on its own before timing: round trip, and ``log_prob`` equal to the
change of variables with an autograd Jacobian in float64 at tight
tolerances. So that both fields start equally hard to integrate, ours'
output layer (which starts at 1/100 of torch's default, near the identity)
is rescaled so that its mean speed ``|f(x, 1/2)|`` on the batch equals
zuko's. Adaptive solvers still take different steps on different
fields, so the notes print each side's network evaluations (NFE) per call,
forward and backward (hooks on the dynamics networks), and the ``dynamics
... (one evaluation)`` cases time one evaluation of the field with its exact
trace, forward and backward on one batch: the apples-to-apples ratio.

``sample`` is ``TransformedDistribution.sample`` for ours (which integrates
the log-det along, D + 1 states, the value Pyro scores its own samples with)
and ``flow().sample`` for zuko (D states only).
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable, List, Optional, Tuple

import torch

from benchmarks.speed import CASES as SPEED_CASES
from benchmarks.speed import (
    Case,
    Contestants,
    Mismatch,
    Step,
    Unavailable,
    _CountCalls,
    _expect,
    _nll_step,
    copy_,
    optional_import,
    peer_steps,
    same,
)

LIPSCHITZ = 0.9
BLOCKS = 5
# normflows' fixed-point rule: every coordinate's squared step below atol + rtol |y_i|, atol = rtol = 1e-5.
NORMFLOWS_STEP = math.sqrt(1e-5)
ODE_TOLERANCE = 1e-5
# Draws of the stochastic log-det estimators, whose mean is checked against the exact value before timing.
DRAWS = 64


def _normal(dim: int, dtype=torch.float32):
    import pyro.distributions as pdist

    zeros = torch.zeros(dim, dtype=dtype)
    return pdist.Normal(zeros, torch.ones_like(zeros)).to_event(1)


def _log_normal(z: torch.Tensor) -> torch.Tensor:
    return -0.5 * (z.square().sum(-1) + z.shape[-1] * math.log(2 * math.pi))


def _mean_and_se(draws: List[torch.Tensor]) -> Tuple[float, float]:
    values = torch.tensor([float(d) for d in draws], dtype=torch.float64)
    return values.mean().item(), values.std().item() / math.sqrt(len(values))


def _check_unbiased(who: str, draw: Callable[[], torch.Tensor], exact: torch.Tensor, count: int) -> str:
    """``draw()`` estimates ``exact`` (per point); its mean over ``count`` draws
    (each the batch mean of estimate - exact) must be within 4 standard errors
    of 0. Returns a note with the numbers."""
    draws = [(draw() - exact).mean() for _ in range(count)]
    mean, se = _mean_and_se(draws)
    if not abs(mean) <= 4 * se + 1e-4:
        raise Mismatch(f"{who}: mean log-det error {mean:+.4f} nats over {count} draws, standard error {se:.4f}")
    return f"{who}: estimator - exact = {mean:+.4f} ± {se:.4f} nats per point ({count} draws)"


# ---------------------------------------------------------------------------
# Residual flows against normflows
# ---------------------------------------------------------------------------


class _ResidualContestants:
    """Our 5 residual blocks (direction ``"maf"``) with weights moved off their
    start, and normflows' equivalent built from the same weights."""

    def __init__(self, dim: int, hidden: Tuple[int, int], logdet: str, tolerance: Optional[float] = None):
        from pyro.distributions import TransformedDistribution

        from pyro_nflows.transforms.residual_flow import residual

        self.dim, self.hidden, self.logdet = dim, hidden, logdet
        options = dict(count_exact_terms=3, roulette_p=0.5, probe="gaussian") if logdet == "roulette" else {}
        self.ours = [
            residual(dim, hidden, lipschitz=LIPSCHITZ, logdet=logdet, direction="maf", tolerance=tolerance, **options)
            for _ in range(BLOCKS)
        ]
        for block in self.ours:
            self._randomize(block)
        self.ours_module = torch.nn.ModuleList(self.ours)
        self.ours_dist = TransformedDistribution(_normal(dim), self.ours)

    @staticmethod
    def _randomize(block) -> None:
        """Weights off their start (then normalised to c by the parametrisation), and
        one LipSwish slope per layer (normflows' Swish has a single one)."""
        with torch.no_grad():
            for layer in block.net.layers:
                original = layer.parametrizations.weight.original
                original.add_(0.3 * torch.randn_like(original))
                layer.bias.add_(0.3 * torch.randn_like(layer.bias))
            for activation in block.net.activations:
                activation.raw_beta.fill_(0.5 + 0.3 * float(torch.randn(())))
        block.net.refresh()  # exact singular vectors for the new weights (sizes <= 128)

    def with_exact_log_det(self):
        """A context in which our blocks use the exact log-det."""
        return _setting(self.ours, "logdet", "exact")

    def normflows(self):
        """normflows' NormalizingFlow of 5 ``Residual`` blocks carrying our parameters."""
        nf = optional_import("normflows")
        blocks = [self._normflows_block(nf, block) for block in self.ours]
        model = nf.NormalizingFlow(q0=nf.distributions.DiagGaussian(self.dim, trainable=False), flows=blocks)
        return model, [b.iresblock.nnet for b in blocks]

    def _normflows_block(self, nf, block):
        net = nf.nets.LipschitzMLP([self.dim, *self.hidden, self.dim], lipschitz_const=LIPSCHITZ)
        net.net[0] = torch.nn.Identity()  # ours applies no activation to the input (see the module docstring)
        linears = [m for m in net.net if isinstance(m, nf.nets.lipschitz.InducedNormLinear)]
        swishes = [m for m in net.net if isinstance(m, nf.nets.lipschitz.Swish)]
        _expect("normflows: linear layers", len(linears), len(block.net.layers))
        _expect("normflows: activations", len(swishes), len(block.net.activations))
        for theirs, mine in zip(linears, block.net.layers):
            copy_(theirs.weight, mine.parametrizations.weight.original)
            copy_(theirs.bias, mine.bias)
            copy_(theirs.u, mine.normalization.u)
            copy_(theirs.v, mine.normalization.v)
        for theirs, mine in zip(swishes, block.net.activations):
            copy_(theirs.beta, mine.raw_beta[:1])  # both: beta = softplus(raw), z sigmoid(beta z) / 1.1
        # normflows' defaults: roulette with geometric p = 0.5, 2 exact terms, Neumann gradients in the forward pass.
        return nf.flows.Residual(net, reverse=True, reduce_memory=True, geom_p=0.5, n_exact_terms=2,
                                 brute_force=self.logdet == "exact")

    def check_blocks(self, model) -> None:
        """Every block of normflows computes ours (x + g(x)) on the same points."""
        x = torch.randn(64, self.dim)
        with torch.no_grad():
            for index, (mine, theirs) in enumerate(zip(self.ours, model.flows)):
                same(mine._inverse(x), theirs.inverse(x.clone())[0], f"normflows block {index}: x + g(x)")

    def to_noise(self, x: torch.Tensor) -> torch.Tensor:
        for block in reversed(self.ours):
            x = block._inverse(x)  # the block, one pass
        return x


@contextlib.contextmanager
def _setting(objects, name: str, value):
    """Set ``name`` on every object for the duration, then put each value back."""
    previous = [getattr(o, name) for o in objects]
    for o in objects:
        setattr(o, name, value)
    try:
        yield
    finally:
        for o, old in zip(objects, previous):
            setattr(o, name, old)


def _check_exact_log_prob(m: _ResidualContestants) -> None:
    """Ours (exact log-det) equals the change of variables with an autograd Jacobian, in float64."""
    x = torch.randn(4, m.dim, dtype=torch.float64)
    m.ours_module.double()
    try:
        with m.with_exact_log_det():
            got = m.ours_dist.log_prob(x)
            for i in range(len(x)):
                jacobian = torch.autograd.functional.jacobian(lambda v: m.to_noise(v[None])[0], x[i])
                expected = _log_normal(m.to_noise(x[i : i + 1])[0]) + torch.linalg.slogdet(jacobian)[1]
                same(got[i], expected, "ours: log_prob vs change of variables (float64)", atol=1e-6, rtol=1e-6)
    finally:
        m.ours_module.float()


def residual_log_prob_setup(dim: int, hidden: Tuple[int, int], batch: int, logdet: str) -> Callable[[], Contestants]:
    def setup() -> Contestants:
        m = _ResidualContestants(dim, hidden, logdet)
        x = torch.randn(batch, dim)
        notes: List[str] = []
        _check_exact_log_prob(m)
        points = torch.randn(256, dim)
        with torch.no_grad(), m.with_exact_log_det():
            exact = m.ours_dist.log_prob(points)
        if logdet == "roulette":
            with torch.no_grad():
                notes.append(_check_unbiased("ours", lambda: m.ours_dist.log_prob(points), exact, DRAWS))

        def normflows_step() -> Step:
            model, _ = m.normflows()
            m.check_blocks(model)
            if logdet == "exact":
                same(m.ours_dist.log_prob(points), model.log_prob(points.clone()), "normflows log_prob (exact)")
            else:
                def draw() -> torch.Tensor:
                    return model.log_prob(points.clone()).detach()

                notes.append(_check_unbiased("normflows", draw, exact, DRAWS))
            mine = x.clone()  # normflows' brute force sets requires_grad on its input in place
            return _nll_step(list(model.parameters()), lambda: model.log_prob(mine))

        peers = peer_steps(normflows=normflows_step)
        return Contestants(
            ours=_nll_step(list(m.ours_module.parameters()), lambda: m.ours_dist.log_prob(x)), peers=peers, notes=notes
        )

    return setup


def residual_sample_setup(
    dim: int, hidden: Tuple[int, int], batch: int, matched: bool = True
) -> Callable[[], Contestants]:
    """``matched``: ours at the tolerance whose stopping step is normflows' (else at its default)."""

    def setup() -> Contestants:
        q = LIPSCHITZ ** (len(hidden) + 1)
        tolerance = NORMFLOWS_STEP * q / (1 - q) if matched else None
        m = _ResidualContestants(dim, hidden, "exact", tolerance=tolerance)
        notes: List[str] = []

        def ours() -> None:
            m.ours_dist.sample((batch,))  # under no_grad: each block's fixed-point solve

        def ours_from(z: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                for block in m.ours:
                    z = block._call(z)
                return z

        z = torch.randn(batch, dim)
        x_ours = ours_from(z)
        steps = [block.last_inverse_iterations for block in m.ours]
        with torch.no_grad():
            error = (m.to_noise(x_ours) - z).norm(dim=-1)
        notes.append(
            f"ours: round-trip error |z - blocks(sample)| max {error.max():.2g}, median {error.median():.2g}; "
            f"fixed-point steps per block {steps} (converged points drop out)"
        )

        def normflows_step() -> Step:
            model, nets = m.normflows()
            m.check_blocks(model)
            blocks = [flow.iresblock for flow in model.flows]

            def sample_from(v: torch.Tensor) -> torch.Tensor:
                with torch.no_grad():
                    for block in blocks:
                        v = block.inverse(v)  # the fixed-point solve alone, without log q
                    return v

            with _CountCalls(nets) as passes:
                x_theirs = sample_from(z)
            with torch.no_grad():
                theirs_error = (m.to_noise(x_theirs) - z).norm(dim=-1)
            notes.append(
                f"normflows: round-trip error max {theirs_error.max():.2g}, median {theirs_error.median():.2g}; "
                f"{passes.count} passes of g over the whole batch ({passes.count / BLOCKS:.0f} per block)"
            )
            same(x_ours, x_theirs, "normflows sample from the same noise", atol=2e-2, rtol=2e-2)

            def step() -> None:
                sample_from(model.q0(batch)[0])

            return step

        return Contestants(ours=ours, peers=peer_steps(normflows=normflows_step), notes=notes)

    return setup


# ---------------------------------------------------------------------------
# Continuous flows against zuko
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def _count_method(obj, name: str):
    """Count calls of ``obj.name`` (an instance attribute shadows the method while active)."""
    counter = {"calls": 0}
    method = getattr(obj, name)

    def counted(*args, **kwargs):
        counter["calls"] += 1
        return method(*args, **kwargs)

    setattr(obj, name, counted)
    try:
        yield counter
    finally:
        delattr(obj, name)


class _ContinuousContestants:
    """Our continuous flow and zuko's CNF on the same batch, each checked on its own
    (built once per size, see :func:`_continuous`, and shared by that size's cases)."""

    speed = ""

    def __init__(self, dim: int, hidden: Tuple[int, int], batch: int):
        from pyro.distributions import TransformedDistribution

        from pyro_nflows.transforms.continuous_flow import continuous

        self.dim, self.hidden, self.batch = dim, hidden, batch
        self.x = torch.randn(batch, dim)
        self.ours = continuous(dim, hidden, trace="exact", atol=ODE_TOLERANCE, rtol=ODE_TOLERANCE, time=1.0)
        self.zuko, self.missing = None, ""
        try:
            zf = optional_import("zuko.flows")
        except Unavailable as reason:  # ours still runs, at its own output scale
            self.missing = str(reason)
            self.speed = f"{self._speed(lambda t, x: self.ours.net(x, t)):.3g} (ours alone: zuko not installed)"
        else:
            self.zuko = zf.CNF(dim, atol=ODE_TOLERANCE, rtol=ODE_TOLERANCE, exact=True, hidden_features=hidden)
            self._match_speed()
            self._check_zuko()
        self.ours_dist = TransformedDistribution(_normal(dim), [self.ours])
        self._check_ours()

    def peer(self):
        """zuko's CNF, or :class:`Unavailable`."""
        if self.zuko is None:
            raise Unavailable(self.missing)
        return self.zuko

    def _speed(self, f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> float:
        with torch.no_grad():
            return f(torch.tensor(0.5), self.x).norm(dim=-1).mean().item()

    def _match_speed(self) -> None:
        """Scale our output layer so that the mean speed |f(x, 1/2)| on the batch is zuko's."""
        ours_speed = self._speed(lambda t, x: self.ours.net(x, t))
        zuko_speed = self._speed(self.zuko.transform.f)
        with torch.no_grad():
            self.ours.net.output.weight.mul_(zuko_speed / ours_speed)
            self.ours.net.output.bias.mul_(zuko_speed / ours_speed)
            self.ours.net.hyper.weight[-self.dim :].mul_(zuko_speed / ours_speed)  # the output's time shift
            self.ours.net.hyper.bias[-self.dim :].mul_(zuko_speed / ours_speed)
        self.speed = f"{zuko_speed:.3g}"

    def _check_ours(self) -> None:
        z = torch.randn(8, self.dim)
        with torch.no_grad():
            same(self.ours._inverse(self.ours._call(z)), z, "ours: round trip", atol=1e-3, rtol=1e-3)
        _check_cnf("ours", self.ours, self.ours_dist.log_prob, lambda v: self.ours._inverse(v), self.dim)

    def _check_zuko(self) -> None:
        flow = self.zuko
        z = torch.randn(8, self.dim)
        with torch.no_grad():
            t = flow().transform
            same(t(t.inv(z)), z, "zuko: round trip", atol=1e-3, rtol=1e-3)
        _check_cnf("zuko", flow, lambda v: flow().log_prob(v), lambda v: flow().transform(v), self.dim,
                   tolerance_holder=flow.transform)

    def nfe(self, call: Callable[[], torch.Tensor], counter) -> Tuple[int, int]:
        """Network evaluations of one call (``counter()``: the context counting them), forward and backward."""
        with counter() as count:
            value = call()
        forward = _calls(count)
        backward = 0
        if value.requires_grad:
            with counter() as count:
                (-value.mean()).backward()
            backward = _calls(count)
        return forward, backward

    def ours_counter(self):
        return _count_method(self.ours.net, "velocity_and_trace")

    def zuko_counter(self):
        return _CountCalls([self.zuko.transform.ode])


@functools.lru_cache(maxsize=None)
def _continuous(dim: int, hidden: Tuple[int, int], batch: int) -> _ContinuousContestants:
    """The contestants of one size, built and checked once for its log_prob, sample and dynamics cases."""
    with torch.random.fork_rng():
        torch.manual_seed(dim)
        return _ContinuousContestants(dim, hidden, batch)


def _calls(count) -> int:
    return count["calls"] if isinstance(count, dict) else count.count


def _check_cnf(who: str, module, log_prob, to_noise, dim: int, tolerance_holder=None) -> None:
    """``log_prob`` equals the change of variables with an autograd Jacobian of
    ``to_noise``, in float64 at tolerances of 1e-9 (then back to float32)."""
    holder = module if tolerance_holder is None else tolerance_holder
    x = torch.randn(2, dim, dtype=torch.float64)
    module.double()
    try:
        with _setting([holder], "atol", 1e-9), _setting([holder], "rtol", 1e-9):
            got = log_prob(x)
            for i in range(len(x)):
                jacobian = torch.autograd.functional.jacobian(lambda v: to_noise(v[None])[0], x[i])
                expected = _log_normal(to_noise(x[i : i + 1])[0]) + torch.linalg.slogdet(jacobian)[1]
                same(got[i], expected, f"{who}: log_prob vs change of variables (float64)", atol=1e-5, rtol=1e-5)
    finally:
        module.float()


def _nfe_note(name: str, forward: int, backward: int) -> str:
    return f"{name}: {forward} network evaluations forward, {backward} backward per call"


def continuous_log_prob_setup(dim: int, hidden: Tuple[int, int], batch: int) -> Callable[[], Contestants]:
    def setup() -> Contestants:
        m = _continuous(dim, hidden, batch)
        x = m.x
        notes = [f"mean speed |f(x, 1/2)| on the batch, both fields: {m.speed}"]
        notes.append(_nfe_note("ours", *m.nfe(lambda: m.ours_dist.log_prob(x), m.ours_counter)))

        def zuko_step() -> Step:
            flow = m.peer()
            notes.append(_nfe_note("zuko", *m.nfe(lambda: flow().log_prob(x), m.zuko_counter)))
            return _nll_step(list(flow.parameters()), lambda: flow().log_prob(x))

        return Contestants(
            ours=_nll_step(list(m.ours.parameters()), lambda: m.ours_dist.log_prob(x)),
            peers=peer_steps(zuko=zuko_step),
            notes=notes,
        )

    return setup


def continuous_sample_setup(dim: int, hidden: Tuple[int, int], batch: int) -> Callable[[], Contestants]:
    def setup() -> Contestants:
        m = _continuous(dim, hidden, batch)
        notes = [f"mean speed |f(x, 1/2)| on the batch, both fields: {m.speed}"]

        def ours() -> torch.Tensor:
            return m.ours_dist.sample((batch,))

        notes.append(_nfe_note("ours", *m.nfe(ours, m.ours_counter)))

        def zuko_step() -> Step:
            flow = m.peer()

            def zuko() -> torch.Tensor:
                return flow().sample((batch,))

            notes.append(_nfe_note("zuko", *m.nfe(zuko, m.zuko_counter)))
            return zuko

        return Contestants(ours=ours, peers=peer_steps(zuko=zuko_step), notes=notes)

    return setup


def dynamics_setup(dim: int, hidden: Tuple[int, int], batch: int) -> Callable[[], Contestants]:
    """One evaluation of each field with its exact trace, forward and backward of
    ``|f|^2 + trace`` summed over the batch: ours ``velocity_and_trace`` (with the
    per-solve ``prepare`` included), zuko the body of its ``call_and_ladj``'s
    ``f_aug`` (autograd batched over the D basis vectors, with ``create_graph``
    as in training)."""

    def setup() -> Contestants:
        m = _continuous(dim, hidden, batch)
        net, x, t = m.ours.net, m.x, torch.tensor(0.5)

        def ours_field(points: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
            return net.velocity_and_trace(t, points, net.prepare(None))

        def zuko_field(points: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
            f = m.zuko.transform.f
            identity = torch.eye(dim).expand(*points.shape, -1).movedim(-1, 0)
            with torch.enable_grad():
                points = points.clone().requires_grad_()
                velocity = f(t, points)
            jacobian = torch.autograd.grad(velocity, points, identity, create_graph=True, is_grads_batched=True)[0]
            return velocity, torch.einsum("i...i", jacobian)

        _check_trace("ours", ours_field, lambda v: net(v, t), dim)

        def zuko_step() -> Step:
            flow = m.peer()
            _check_trace("zuko", zuko_field, lambda v: flow.transform.f(t, v), dim)
            return step_of(zuko_field, flow)

        def step_of(field, module) -> Step:
            params = [p for p in module.parameters() if p.requires_grad]

            def step() -> None:
                for p in params:
                    p.grad = None
                velocity, trace = field(x)
                (velocity.square().sum() + trace.sum()).backward()

            return step

        return Contestants(ours=step_of(ours_field, net), peers=peer_steps(zuko=zuko_step))

    return setup


def _check_trace(who: str, field, velocity, dim: int) -> None:
    """The field's trace is the trace of the autograd Jacobian of its velocity."""
    points = torch.randn(4, dim)
    got_velocity, got_trace = field(points)
    for i in range(len(points)):
        jacobian = torch.autograd.functional.jacobian(lambda v: velocity(v[None])[0], points[i])
        same(got_velocity[i], velocity(points[i : i + 1])[0], f"{who}: velocity")
        same(got_trace[i], torch.trace(jacobian), f"{who}: exact trace vs autograd Jacobian")


B = 1024
N = "normflows"
CASES: List[Case] = [
    Case("residual log_prob fwd+bwd roulette D=2 H=(64,64) L=5 B=1024",
         residual_log_prob_setup(2, (64, 64), B, "roulette"), target=(N, 1.5)),
    Case("residual log_prob fwd+bwd roulette D=16 H=(128,128) L=5 B=1024",
         residual_log_prob_setup(16, (128, 128), B, "roulette"), target=(N, 1.5)),
    Case("residual log_prob fwd+bwd exact D=2 H=(64,64) L=5 B=1024",
         residual_log_prob_setup(2, (64, 64), B, "exact"), target=(N, 1.5)),
    Case("residual sample D=2 H=(64,64) L=5 B=1024", residual_sample_setup(2, (64, 64), B), target=(N, 1.5)),
    Case("residual sample D=16 H=(128,128) L=5 B=1024", residual_sample_setup(16, (128, 128), B), target=(N, 1.5)),
    Case("residual sample D=16 H=(128,128) L=5 B=1024 ours at default tolerance",
         residual_sample_setup(16, (128, 128), B, matched=False)),
    # zuko's calls take a few hundred ms (seconds on a busy machine): rounds capped.
    Case("continuous log_prob fwd+bwd exact D=2 H=(64,64) B=1024", continuous_log_prob_setup(2, (64, 64), B),
         target=("zuko", 1.5), repeats=11, warmup=1),
    Case("continuous log_prob fwd+bwd exact D=8 H=(64,64) B=1024", continuous_log_prob_setup(8, (64, 64), B),
         target=("zuko", 1.5), repeats=11, warmup=1),
    Case("continuous sample D=2 H=(64,64) B=1024", continuous_sample_setup(2, (64, 64), B),
         target=("zuko", 1.5), repeats=11, warmup=1),
    Case("continuous sample D=8 H=(64,64) B=1024", continuous_sample_setup(8, (64, 64), B),
         target=("zuko", 1.5), repeats=11, warmup=1),
    Case("continuous dynamics+exact trace fwd+bwd (one evaluation) D=2 H=(64,64) B=1024",
         dynamics_setup(2, (64, 64), B), target=("zuko", 1.5)),
    Case("continuous dynamics+exact trace fwd+bwd (one evaluation) D=8 H=(64,64) B=1024",
         dynamics_setup(8, (64, 64), B), target=("zuko", 1.5)),
]

SPEED_CASES.extend(CASES)  # one list, speed.py's: its table runs these after its own
