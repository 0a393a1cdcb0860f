"""Speed of pyro_nflows' flows against their peers (pyro, zuko, nflows, normflows).

Run from the repository root::

    python benchmarks/speed.py                 # every case, one table
    python benchmarks/speed.py --filter householder --repeats 41
    python benchmarks/speed.py --quick         # smoke run, a few seconds

Everything is measured side by side in this one process. The machines we run on
are noisy, so the numbers are *ratios* of medians over interleaved rounds:

* every contestant (ours and each peer) is warmed up, then calibrated to an
  inner loop of ``number`` calls lasting about ``--sample-ms``;
* each round times one such loop of every contestant, in a shuffled order, so
  that a burst of machine noise hits all of them alike;
* a contestant's time is the median over rounds of (loop time / number); a
  ratio ``peer/ours`` is the median over rounds of the paired per-round ratios
  (> 1 means we are faster).

Before anything is timed, every peer's output is checked against ours on the
same input and the same parameters, so a wrong answer is never timed (where
parameters cannot be shared, as between MADE layouts, each contestant is
checked on its own instead: see the MAF cases). A mismatch (or any error in a
case) is reported, the other cases still run, and the exit status is 1;
missed speed targets do not change it (the table is a report, not a test).

Adding a case: write a ``setup(batch)`` function that builds our module and
the peers' equivalents with the same parameters, checks they agree (``same``),
and returns ``Contestants(ours=step, peers={"pyro": step, ...})``, where a step
is a no-argument callable doing one timed operation (``fwd_bwd`` builds the
usual "forward, log-det, backward, zero grads" step). Then append a
``Case(name, setup, target=...)`` to ``CASES`` (``target`` is ``(peer,
minimum peer/ours ratio)`` or a list of them, each of which must hold; a case
whose peers take seconds a call can cap its ``repeats`` and ``warmup``). A
peer left out of ``peers``
prints "—" (no equivalent); a peer whose import fails prints "—" too, with a
note (``optional_import``). A setup may also return ``notes``, lines printed
under the table (what a case matched, or counted: the NFE of an ODE solve).

The residual and continuous flows' cases, against normflows and zuko, live in
``benchmarks/speed_implicit.py``, the image flows' in ``benchmarks/speed_images.py``;
each appends its cases to ``CASES``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import platform
import random
import statistics
import sys
import time
import warnings
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

# Benchmark the checkout this file lives in, installed or not.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_ROOT, "pyro_nflows")) and _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402

from benchmarks.common import library_versions  # noqa: E402

# Run as a script, this module is __main__: let benchmarks/speed_implicit.py's
# ``from benchmarks.speed import ...`` find it rather than load a second copy.
if __name__ == "__main__":
    sys.modules.setdefault("benchmarks.speed", sys.modules[__name__])

PEERS = ("pyro", "zuko", "nflows", "normflows")
PEER_DISTRIBUTIONS = {"pyro": "pyro-ppl", "zuko": "zuko", "nflows": "nflows", "normflows": "normflows"}
DASH = "\u2014"

Step = Callable[[], None]


# ---------------------------------------------------------------------------
# What a case is
# ---------------------------------------------------------------------------


class Unavailable(Exception):
    """A peer that cannot run here (not installed); the column shows a dash."""


class Mismatch(AssertionError):
    """A peer disagrees with ours: the case is not timed."""


@dataclasses.dataclass
class Contestants:
    ours: Step
    # peer name -> step, or a string saying why that peer cannot run here.
    peers: Dict[str, object]
    # Lines printed under the table (what was matched, counted or checked).
    notes: List[str] = dataclasses.field(default_factory=list)


Target = Tuple[str, float]  # (peer, minimum peer/ours ratio)


@dataclasses.dataclass
class Case:
    name: str
    setup: Callable[[], Contestants]
    # A target, a list of targets (each must hold), or None.
    target: Optional[object] = None
    # Slow cases (a peer taking seconds a call): at most this many timed rounds
    # and warm-up calls, whatever the command line says.
    repeats: Optional[int] = None
    warmup: Optional[int] = None

    def targets(self) -> List[Target]:
        if self.target is None:
            return []
        return [self.target] if isinstance(self.target[0], str) else list(self.target)


def optional_import(module: str):
    """Import a peer's module; an ImportError becomes :class:`Unavailable`."""
    try:
        return importlib.import_module(module)
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise Unavailable(f"{module} not installed ({error})") from None


def peer_steps(**builders: Callable[[], Step]) -> Dict[str, object]:
    """Build each peer's step; one that raises :class:`Unavailable` becomes its reason."""
    steps: Dict[str, object] = {}
    for name, build in builders.items():
        try:
            steps[name] = build()
        except Unavailable as reason:
            steps[name] = str(reason)
    return steps


def same(ours: torch.Tensor, theirs: torch.Tensor, what: str, atol: float = 1e-4, rtol: float = 1e-4) -> None:
    """Raise :class:`Mismatch` unless two outputs agree."""
    ours, theirs = ours.detach(), theirs.detach()
    if ours.shape != theirs.shape or not torch.allclose(ours, theirs, atol=atol, rtol=rtol):
        error = (ours - theirs).abs().max().item() if ours.shape == theirs.shape else float("nan")
        raise Mismatch(
            f"{what}: outputs differ (shapes {tuple(ours.shape)} vs {tuple(theirs.shape)}, max |diff| {error:.3g})"
        )


def fwd_bwd(module: torch.nn.Module, forward: Callable[[], Tuple[torch.Tensor, torch.Tensor]]) -> Step:
    """One training step's worth of work: ``y, ladj = forward()``, then
    ``(y.square().sum() + ladj.sum()).backward()``, with the gradients zeroed
    (set to ``None``) first."""
    params = [p for p in module.parameters() if p.requires_grad]

    def step() -> None:
        for p in params:
            p.grad = None
        y, ladj = forward()
        (y.square().sum() + ladj.sum()).backward()

    return step


def pyro_style(t, x: torch.Tensor, inverse: bool = False) -> Callable[[], Tuple[torch.Tensor, torch.Tensor]]:
    """Forward (or inverse) of a torch-style transform, bypassing the cache
    (``_call``/``_inverse`` directly), with its log-det."""
    if inverse:
        def forward():
            z = t._inverse(x)
            return z, -t.log_abs_det_jacobian(z, x)
    else:
        def forward():
            y = t._call(x)
            return y, t.log_abs_det_jacobian(x, y)
    return forward


def nflows_style(t, x: torch.Tensor, inverse: bool = False) -> Callable[[], Tuple[torch.Tensor, torch.Tensor]]:
    """Forward (or inverse) of an nflows transform: ``(outputs, logabsdet)``."""
    if inverse:
        return lambda: t.inverse(x)
    return lambda: t(x)


def randomize_(module: torch.nn.Module, scale: float = 0.3) -> None:
    """Move every parameter off its initialisation (so agreement checks mean something)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


def copy_(dst: torch.Tensor, src: torch.Tensor) -> None:
    with torch.no_grad():
        dst.copy_(src)


# ---------------------------------------------------------------------------
# The cases
# ---------------------------------------------------------------------------


def householder_setup(dim: int, count: int, batch: int, inverse: bool = False) -> Callable[[], Contestants]:
    def setup() -> Contestants:
        from pyro.distributions import transforms as pyro_transforms

        from pyro_nflows.transforms.linear import Householder

        x = torch.randn(batch, dim)
        ours = Householder(dim, count_transforms=count)
        randomize_(ours)
        reference = ours._inverse(x) if inverse else ours._call(x)

        def pyro_step() -> Step:
            t = pyro_transforms.Householder(dim, count_transforms=count)
            copy_(t.u_unnormed, ours.vectors)
            same(reference, t._inverse(x) if inverse else t._call(x), "pyro Householder")
            return fwd_bwd(t, pyro_style(t, x, inverse))

        def nflows_step() -> Step:
            orthogonal = optional_import("nflows.transforms.orthogonal")
            t = orthogonal.HouseholderSequence(dim, count)
            copy_(t.q_vectors, ours.vectors)
            same(reference, (t.inverse(x) if inverse else t(x))[0], "nflows HouseholderSequence")
            return fwd_bwd(t, nflows_style(t, x, inverse))

        return Contestants(
            ours=fwd_bwd(ours, pyro_style(ours, x, inverse)),
            peers=peer_steps(pyro=pyro_step, nflows=nflows_step),  # zuko: no Householder
        )

    return setup


def qr_linear_setup(dim: int, batch: int, inverse: bool = False) -> Callable[[], Contestants]:
    def setup() -> Contestants:
        from pyro_nflows.transforms.linear import QRLinear

        x = torch.randn(batch, dim)
        ours = QRLinear(dim)
        randomize_(ours, scale=0.1)
        reference = ours._inverse(x) if inverse else ours._call(x)

        def nflows_step() -> Step:
            qr = optional_import("nflows.transforms.qr")
            t = qr.QRLinear(dim, num_householder=ours.vectors.shape[0])
            # Same layout: R's strict upper part in row-major (triu_indices) order.
            copy_(t.orthogonal.q_vectors, ours.vectors)
            copy_(t.upper_entries, ours.upper_entries)
            copy_(t.log_upper_diag, ours.log_diagonal)
            copy_(t.bias, ours.bias)
            same(reference, (t.inverse(x) if inverse else t(x))[0], "nflows QRLinear")
            return fwd_bwd(t, nflows_style(t, x, inverse))

        return Contestants(
            ours=fwd_bwd(ours, pyro_style(ours, x, inverse)),
            peers=peer_steps(nflows=nflows_step),  # pyro, zuko: no QR-parametrised linear map
        )

    return setup


def lu_linear_setup(dim: int, batch: int, inverse: bool = False) -> Callable[[], Contestants]:
    def setup() -> Contestants:
        from pyro_nflows.transforms.linear import LULinear

        x = torch.randn(batch, dim)
        ours = LULinear(dim)
        randomize_(ours, scale=0.1)
        lower, upper = (m.detach() for m in ours.lu_factors())
        # Ours is y = P L U x + b; the peers have no permutation, so they are
        # checked against the same map without P (P costs one row gather of a
        # D x D matrix, nothing next to the B x D x D product).
        perm = ours.permutation
        if inverse:  # ours: x -> U^-1 L^-1 (x[perm^-1] - b[perm^-1]); feed it x[perm]
            unpermuted = ours._inverse(x[..., perm])
        else:
            unpermuted = (ours._call(x) - ours.bias)[..., ours.inverse_permutation]

        def nflows_step() -> Step:
            lu = optional_import("nflows.transforms.lu")
            t = lu.LULinear(dim)
            eps = t.eps
            copy_(t.lower_entries, ours.lower_entries)
            copy_(t.upper_entries, ours.upper_entries)
            # nflows: u_ii = softplus(w_i) + eps; ours: u_ii = exp(s_i).
            copy_(t.unconstrained_upper_diag, torch.log(torch.expm1(ours.log_diagonal.exp() - eps)))
            if inverse:
                copy_(t.bias, ours.bias[ours.inverse_permutation])
                check = t.inverse(x)[0]
            else:
                copy_(t.bias, torch.zeros(dim))
                check = t(x)[0]
            same(unpermuted, check, "nflows LULinear")
            copy_(t.bias, torch.randn(dim))
            return fwd_bwd(t, nflows_style(t, x, inverse))

        def zuko_step() -> Step:
            zt = optional_import("zuko.transforms")
            zf = optional_import("zuko.flows")
            # zuko: W = L' U' with L' lower (free diagonal), U' unit upper, packed
            # in one matrix; L U = (L diag(u)) (diag(u)^-1 U).
            diag = torch.diagonal(upper)
            packed = torch.tril(lower * diag) + torch.triu(upper / diag[:, None], diagonal=1)
            lazy = zf.UnconditionalTransform(zt.LULinearTransform, packed.clone())
            t = lazy()
            if inverse:
                check = t._inverse(x - ours.bias[ours.inverse_permutation])
            else:
                check = t._call(x)
            same(unpermuted, check, "zuko LULinearTransform")

            def forward():
                return pyro_style(lazy(), x, inverse)()  # rebuilds L, U from the parameter, as in training

            return fwd_bwd(lazy, forward)

        return Contestants(
            ours=fwd_bwd(ours, pyro_style(ours, x, inverse)),
            peers=peer_steps(nflows=nflows_step, zuko=zuko_step),  # pyro: no LU linear map on vectors
        )

    return setup


# --- Masked autoregressive flows (MAF) --------------------------------------
#
# The MADE layouts differ between libraries (degree assignments, masks, output
# interleaving), so parameters cannot be copied and outputs cannot be compared
# with ``same``. Instead, before timing:
#
# * ours: the fast sequential direction (``MADE.invert``) agrees with the naive
#   reference (``MADE.invert_reference``) layer by layer, and round-trips;
# * every contestant has the same architecture: L layers, each a MADE with
#   the same weight shapes (D -> H1 -> H2 -> 2D), on the same D and batch;
# * every contestant really does what its column claims: its sampler is its
#   flow's inverse (a round trip through its one-pass direction gives the
#   noise back) and makes D network passes per layer (ours: none, one
#   ``MADE.invert`` per layer); its log_prob makes one pass per layer and
#   equals base log-density plus log|det| of the autograd Jacobian.
#
# Pyro's AffineAutoregressive is an IAF (its ``_call`` is the one-pass
# direction); "pyro used as a MAF" samples with ``_inverse``, its loop of D
# full passes, and scores with ``_call``.


def _made_shapes(net: torch.nn.Module) -> List[Tuple[int, ...]]:
    """The weight shapes of a peer's masked MLP, in order."""
    return [tuple(m.weight.shape) for m in net.modules() if isinstance(m, torch.nn.Linear)]


class _CountCalls:
    """Count forward calls of some modules (forward hooks) while active."""

    def __init__(self, modules: Sequence[torch.nn.Module]):
        self.modules, self.count, self.handles = list(modules), 0, []

    def _hook(self, *args) -> None:
        self.count += 1

    def __enter__(self) -> "_CountCalls":
        self.handles = [m.register_forward_hook(self._hook) for m in self.modules]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


def _expect(what: str, got, expected) -> None:
    if got != expected:
        raise Mismatch(f"{what}: expected {expected}, got {got}")


class _MafContestants:
    """The four 5-layer MAFs of one size, with their checks."""

    def __init__(self, dim: int, hidden: Tuple[int, int], layers: int):
        import pyro.distributions as pdist
        from pyro.distributions.transforms import AffineAutoregressive
        from pyro.nn import AutoRegressiveNN

        from pyro_nflows.registry import build_flow

        self.dim, self.hidden, self.layers = dim, hidden, layers
        self.shapes = [[(hidden[0], dim), (hidden[1], hidden[0]), (2 * dim, hidden[1])]] * layers
        spec = f"maf:{layers}(hidden_dims=({hidden[0]}, {hidden[1]}))"
        self.ours = build_flow(spec, dim)  # alternating natural / reversed orderings
        self.ours_module = torch.nn.ModuleList(self.ours)
        randomize_(self.ours_module, scale=0.1)  # off the near-identity start, so the checks mean something
        _expect("ours: layer shapes", [[tuple(w.shape) for w in t.made.weights] for t in self.ours], self.shapes)
        base = pdist.Normal(torch.zeros(dim), torch.ones(dim)).to_event(1)
        self.ours_dist = pdist.TransformedDistribution(base, self.ours)
        self._check_ours()

        # Pyro: what affine_autoregressive(dim, hidden_dims=[...]) builds, with
        # the orderings alternating like ours (the ordering does not change
        # the cost; affine_autoregressive would draw a random one).
        orders = [torch.arange(dim), torch.arange(dim - 1, -1, -1)]
        self.pyro = [
            AffineAutoregressive(AutoRegressiveNN(dim, list(hidden), permutation=orders[i % 2])) for i in range(layers)
        ]
        self.pyro_module = torch.nn.ModuleList(self.pyro)
        self.pyro_base = base
        _expect("pyro: layer shapes", [_made_shapes(t.arn) for t in self.pyro], self.shapes)

    # -- ours ------------------------------------------------------------------

    def _check_ours(self) -> None:
        z = torch.randn(8, self.dim)
        for index, t in enumerate(self.ours):
            def step(z_i, theta_i, t=t):
                return t.elementwise.forward(z_i, theta_i)[0]

            with torch.no_grad():
                fast = t._call(z)
                same(fast, t.made.invert_reference(z, step), f"ours layer {index}: MADE.invert vs invert_reference")
                same(t._inverse(fast), z, f"ours layer {index}: _inverse(_call(z)) round trip")
        # Sampling: no full network pass, one MADE.invert per layer.
        calls = []
        for t in self.ours:
            t.made.invert = (lambda f: lambda *a, **k: (calls.append(1), f(*a, **k))[1])(t.made.invert)
        try:
            with _CountCalls([t.made for t in self.ours]) as passes:
                x = self.ours_dist.sample((4,))
        finally:
            for t in self.ours:
                del t.made.invert
        _expect("ours: network passes while sampling", passes.count, 0)
        _expect("ours: MADE.invert calls while sampling", len(calls), self.layers)
        _expect("ours: sample built a graph (not under no_grad)", x.requires_grad, False)

    # -- peers -----------------------------------------------------------------

    def zuko(self):
        zf = optional_import("zuko.flows")
        flow = zf.MAF(self.dim, transforms=self.layers, hidden_features=self.hidden)
        hypers = [t.hyper for t in flow.transform.transforms]
        _expect("zuko: layer shapes", [_made_shapes(h) for h in hypers], self.shapes)
        return flow, hypers

    def nflows(self):
        nf = optional_import("nflows.flows")
        flow = nf.MaskedAutoregressiveFlow(
            self.dim, self.hidden[0], num_layers=self.layers, num_blocks_per_layer=1, use_residual_blocks=False
        )
        if self.hidden[0] != self.hidden[1]:
            raise Unavailable("nflows' MADE has one hidden width")
        nets = [m.autoregressive_net for m in flow._transform._transforms if hasattr(m, "autoregressive_net")]
        _expect("nflows: layer shapes", [_made_shapes(n) for n in nets], self.shapes)
        return flow, nets

    def check_sampler(self, name: str, sample: Callable[[int], torch.Tensor], to_noise, nets) -> None:
        """``sample(n)`` draws n samples with D passes per layer, and they are
        the flow's inverse of the noise (``to_noise`` maps them back)."""
        torch.manual_seed(1)
        with _CountCalls(nets) as passes:
            x = sample(4)
        _expect(f"{name}: network passes while sampling", passes.count, self.dim * self.layers)
        _expect(f"{name}: sample shape", tuple(x.shape), (4, self.dim))
        _expect(f"{name}: sample built a graph (not under no_grad)", x.requires_grad, False)
        torch.manual_seed(1)
        z = torch.randn(4, self.dim)  # the same draws (all bases here are a standard normal)
        with torch.no_grad():
            same(to_noise(x), z, f"{name}: sample maps back to its noise", atol=1e-3, rtol=1e-3)

    def check_density(
        self, name: str, log_prob: Callable, to_noise: Callable, nets, passes_expected: int, module: torch.nn.Module
    ) -> None:
        """``log_prob`` makes ``passes_expected`` network passes and equals the
        change of variables with an autograd Jacobian (checked in float64 on
        ``module``, then put back to float32)."""
        x = torch.randn(3, self.dim, dtype=torch.float64)
        with _CountCalls(nets) as passes:
            log_prob(torch.randn(4, self.dim))
        _expect(f"{name}: network passes in log_prob", passes.count, passes_expected)
        module.double()
        try:
            got = log_prob(x)
            for i in range(x.shape[0]):
                jacobian = torch.autograd.functional.jacobian(lambda v: to_noise(v[None])[0], x[i])
                z = to_noise(x[i : i + 1])[0]
                normal = -0.5 * (z.square().sum() + self.dim * torch.log(torch.tensor(2 * torch.pi, dtype=z.dtype)))
                expected = normal + torch.linalg.slogdet(jacobian)[1]
                same(got[i], expected, f"{name}: log_prob vs change of variables", atol=1e-6, rtol=1e-6)
        finally:
            module.float()


def _nll_step(params: Sequence[torch.nn.Parameter], log_prob: Callable[[], torch.Tensor]) -> Step:
    """One training step: zero grads, ``-log_prob().mean()``, backward."""
    params = [p for p in params if p.requires_grad]

    def step() -> None:
        for p in params:
            p.grad = None
        (-log_prob().mean()).backward()

    return step


def maf_sample_setup(
    dim: int, hidden: Tuple[int, int], layers: int, batch: int, skip: Optional[Dict[str, str]] = None
) -> Callable[[], Contestants]:
    """``skip``: peer -> why it is left out (printed in the notes)."""
    skip = dict(skip or {})

    def setup() -> Contestants:
        m = _MafContestants(dim, hidden, layers)

        def ours() -> None:
            m.ours_dist.sample((batch,))  # base sample, then each layer's _call (MADE.invert), under no_grad

        def pyro_step() -> Step:
            def sample(n):
                with torch.no_grad():
                    x = m.pyro_base.sample((n,))
                    for t in reversed(m.pyro):
                        x = t._inverse(x)  # the per-dimension loop: D passes of t.arn
                    return x

            def to_noise(x):
                for t in m.pyro:
                    x = t._call(x)
                return x

            m.check_sampler("pyro", sample, to_noise, [t.arn for t in m.pyro])
            return lambda: sample(batch)

        def zuko_step() -> Step:
            flow, hypers = m.zuko()

            def sample(n):
                return flow().sample((n,))  # torch's sample: rsample under no_grad; rsample = transform.inv(z)

            m.check_sampler("zuko", sample, lambda x: flow().transform(x), hypers)
            return lambda: sample(batch)

        def nflows_step() -> Step:
            flow, nets = m.nflows()

            def sample(n):
                with torch.no_grad():
                    return flow.sample(n)  # Flow._sample: transform.inverse(noise)

            m.check_sampler("nflows", sample, lambda x: flow._transform(x)[0], nets)
            return lambda: sample(batch)

        builders = {"pyro": pyro_step, "zuko": zuko_step, "nflows": nflows_step}
        peers = peer_steps(**{p: b for p, b in builders.items() if p not in skip})
        return Contestants(ours=ours, peers={**peers, **skip})

    return setup


def maf_log_prob_setup(dim: int, hidden: Tuple[int, int], layers: int, batch: int) -> Callable[[], Contestants]:
    def setup() -> Contestants:
        m = _MafContestants(dim, hidden, layers)
        x = torch.randn(batch, dim)

        def ours_to_noise(v):
            for t in reversed(m.ours):
                v = t._inverse(v)
            return v

        # Pyro's TransformedDistribution.log_prob: per layer, inv then
        # log_abs_det_jacobian, which takes the log-det that inv computed in
        # the same MADE pass: one pass per layer (two would mean the hand-over
        # in FlowTransform broke, and the case stops with an error).
        m.check_density("ours", m.ours_dist.log_prob, ours_to_noise, [t.made for t in m.ours], layers, m.ours_module)

        def pyro_step() -> Step:
            def log_prob(v):
                # Pyro as a MAF scores with _call (one pass); its log-det is the
                # log-scale that _call caches (what log_abs_det_jacobian returns
                # after __call__; going through __call__ would hit the cache
                # with the same x on every timed call).
                ladj = 0
                for t in m.pyro:
                    v = t._call(v)
                    ladj = ladj + t._cached_log_scale.sum(-1)
                return m.pyro_base.log_prob(v) + ladj

            def to_noise(v):
                for t in m.pyro:
                    v = t._call(v)
                return v

            m.check_density("pyro", log_prob, to_noise, [t.arn for t in m.pyro], layers, m.pyro_module)
            return _nll_step(list(m.pyro_module.parameters()), lambda: log_prob(x))

        def zuko_step() -> Step:
            flow, hypers = m.zuko()
            m.check_density("zuko", lambda v: flow().log_prob(v), lambda v: flow().transform(v), hypers, layers, flow)
            return _nll_step(list(flow.parameters()), lambda: flow().log_prob(x))

        def nflows_step() -> Step:
            flow, nets = m.nflows()
            m.check_density("nflows", flow.log_prob, lambda v: flow._transform(v)[0], nets, layers, flow)
            return _nll_step(list(flow.parameters()), lambda: flow.log_prob(x))

        return Contestants(
            ours=_nll_step(list(m.ours_module.parameters()), lambda: m.ours_dist.log_prob(x)),
            peers=peer_steps(pyro=pyro_step, zuko=zuko_step, nflows=nflows_step),
        )

    return setup


B = 1024
CASES: List[Case] = [
    Case("householder fwd+bwd D=64 B=1024 K=10", householder_setup(64, 10, B), target=("pyro", 3.0)),
    Case("householder fwd+bwd D=64 B=1024 K=64", householder_setup(64, 64, B), target=("pyro", 8.0)),
    Case("householder inv+bwd D=64 B=1024 K=64", householder_setup(64, 64, B, inverse=True)),
    Case("qr_linear fwd+bwd D=64 B=1024 K=64", qr_linear_setup(64, B)),
    Case("qr_linear inv+bwd D=64 B=1024 K=64", qr_linear_setup(64, B, inverse=True)),
    Case("lu_linear fwd+bwd D=64 B=1024", lu_linear_setup(64, B)),
    Case("lu_linear inv+bwd D=64 B=1024", lu_linear_setup(64, B, inverse=True)),
    Case(
        "maf sample D=16 H=(64,64) L=5 B=1024",
        maf_sample_setup(16, (64, 64), 5, B),
        target=[("zuko", 5.0), ("pyro", 5.0)],
    ),
    Case(
        "maf sample D=64 H=(256,256) L=5 B=1024",
        # Every peer call takes seconds here: 3 rounds, and the calibration
        # call is the only warm-up (a first call's extra cost is negligible).
        maf_sample_setup(
            64,
            (256, 256),
            5,
            B,
            skip={
                "nflows": "left out at this size to keep the run short "
                "(its sampler is the same D-passes loop: about a second a call)"
            },
        ),
        target=[("zuko", 10.0), ("pyro", 10.0)],
        repeats=3,
        warmup=0,
    ),
    Case(
        "maf log_prob fwd+bwd D=16 H=(64,64) L=5 B=1024",
        maf_log_prob_setup(16, (64, 64), 5, B),
        target=("zuko", 1 / 1.1),
    ),
    Case(
        "maf log_prob fwd+bwd D=64 H=(256,256) L=5 B=1024",
        maf_log_prob_setup(64, (256, 256), 5, B),
        target=("zuko", 1 / 1.1),
    ),
]

# The residual and continuous flows (against normflows and zuko) and the image
# flows (against Pyro and nflows), in their own modules, which append their
# cases to CASES when imported.
import benchmarks.speed_images  # noqa: E402, F401
import benchmarks.speed_implicit  # noqa: E402, F401

# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------


def _loop(step: Step, number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        step()
    return time.perf_counter() - start


def calibrate(step: Step, sample_s: float, warmup: int) -> int:
    """Warm up, then find an inner-loop count lasting about ``sample_s``."""
    for _ in range(warmup):
        step()
    number = 1
    while True:
        elapsed = _loop(step, number)
        if elapsed >= sample_s / 4 or number >= 1 << 20:
            return max(1, round(number * sample_s / max(elapsed, 1e-9)))
        number *= 4


@dataclasses.dataclass
class Timing:
    seconds: Dict[str, float]  # contestant -> median seconds per call
    ratios: Dict[str, float]  # peer -> median paired ratio peer/ours
    spread: Dict[str, float]  # contestant -> relative interquartile range
    rounds: int
    repeats: int = 0  # rounds asked for


MIN_ROUNDS = 5


def measure(
    steps: Dict[str, Step],
    repeats: int,
    sample_s: float,
    warmup: int,
    rng: random.Random,
    budget_s: float = float("inf"),
    min_rounds: int = MIN_ROUNDS,
) -> Timing:
    """Time every step in ``repeats`` interleaved rounds; stop early (after at
    least ``min_rounds``) once the case has used ``budget_s`` seconds."""
    start = time.perf_counter()
    numbers = {name: calibrate(step, sample_s, warmup) for name, step in steps.items()}
    samples: Dict[str, List[float]] = {name: [] for name in steps}
    order = list(steps)
    for done in range(repeats):
        if done >= min_rounds and time.perf_counter() - start > budget_s:
            break
        rng.shuffle(order)
        for name in order:
            samples[name].append(_loop(steps[name], numbers[name]) / numbers[name])
    seconds = {name: statistics.median(values) for name, values in samples.items()}
    ratios = {
        name: statistics.median(p / o for p, o in zip(samples[name], samples["ours"]))
        for name in steps
        if name != "ours"
    }
    spread = {}
    for name, values in samples.items():
        if len(values) >= 4:
            q = statistics.quantiles(values, n=4)
            spread[name] = (q[2] - q[0]) / seconds[name]
        else:
            spread[name] = float("nan")
    return Timing(seconds, ratios, spread, len(samples["ours"]))


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def _ms(seconds: Optional[float]) -> str:
    if seconds is None:
        return DASH
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _ratio(value: Optional[float]) -> str:
    return DASH if value is None else f"{value:.2f}x"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


@dataclasses.dataclass
class RunSettings:
    """The run's rounds, inner-loop length, warm-up and time budget, defaults resolved."""

    repeats: int
    sample_s: float
    warmup: int
    budget_s: float


class CaseRun(NamedTuple):
    """One case's outcome: its timing (None when its setup failed) and why peers did not run."""

    case: Case
    timing: Optional[Timing]
    reasons: Dict[str, str]
    notes: Sequence[str] = ()


def _parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--filter", default="", help="run only cases whose name contains this substring")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per case (default 31, 5 with --quick)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument(
        "--sample-ms", type=float, default=None, help="length of one timed inner loop (default 20, 5 with --quick)"
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed calls before calibration (default 5, 1 with --quick)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: few, short rounds")
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds per case after which rounds stop early, at least %d rounds (default 12, 3 with --quick)"
        % MIN_ROUNDS,
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    return parser


def _print_case_names() -> None:
    """Print every case's name, one a line (``--list``)."""
    for case in CASES:
        print(case.name)


def _run_settings(args: argparse.Namespace) -> RunSettings:
    """The command line's timing settings, with the defaults (``--quick``'s or the full run's) filled in."""
    return RunSettings(
        repeats=args.repeats or (5 if args.quick else 31),
        sample_s=(args.sample_ms or (5.0 if args.quick else 20.0)) / 1e3,
        warmup=args.warmup if args.warmup is not None else (1 if args.quick else 5),
        budget_s=args.budget or (3.0 if args.quick else 12.0),
    )


def _configure(threads: int, seed: int) -> random.Random:
    """Set torch's threads and seed and silence UserWarnings; return the rounds' shuffling generator."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    warnings.filterwarnings("ignore", category=UserWarning)  # e.g. pyro's "K > D" over-parametrisation notice
    return rng


def _select_cases(pattern: str) -> List[Case]:
    """The cases whose name contains ``pattern``, ignoring case."""
    return [c for c in CASES if pattern.lower() in c.name.lower()]


def _print_header(threads: int, settings: RunSettings) -> None:
    """Print the versions, settings, platform and machine load the numbers were taken with."""
    import pyro_nflows

    origin = getattr(pyro_nflows, "__file__", None) or list(getattr(pyro_nflows, "__path__", ["?"]))[0]
    print(f"pyro_nflows speed ({library_versions(PEER_DISTRIBUTIONS)})")
    print(
        f"threads={threads}  rounds={settings.repeats}  sample~{settings.sample_s * 1e3:.0f} ms  "
        f"warmup={settings.warmup}  "
        f"{platform.python_implementation()} {platform.python_version()}  pyro_nflows from {origin}"
    )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    cores = os.cpu_count() or 1
    print(f"load average (1 min) at start: {load:.2f} on {cores} cores")
    if load > 0.5 * cores:
        print(
            "WARNING: the machine is busy; absolute times are inflated and ratios less reliable "
            "(rerun, or try --threads 1)"
        )
    print("times: median ms per call; ratios: peer/ours, median of paired rounds (> 1: we are faster)\n", flush=True)


def _split_peers(contestants: Contestants) -> Tuple[Dict[str, Step], Dict[str, str]]:
    """The steps to time (ours first, then the peers that run) and the reasons of those that cannot."""
    steps: Dict[str, Step] = {"ours": contestants.ours}
    reasons: Dict[str, str] = {}
    for peer in PEERS:
        value = contestants.peers.get(peer)
        if callable(value):
            steps[peer] = value
        elif isinstance(value, str):
            reasons[peer] = value
    return steps, reasons


def _time_case(case: Case, contestants: Contestants, settings: RunSettings, rng: random.Random) -> CaseRun:
    """Time a set-up case's contestants, with the rounds and warm-up it caps."""
    steps, reasons = _split_peers(contestants)
    repeats = min(settings.repeats, case.repeats or settings.repeats)
    warmup = min(settings.warmup, settings.warmup if case.warmup is None else case.warmup)
    timing = measure(steps, repeats, settings.sample_s, warmup, rng, settings.budget_s, min(MIN_ROUNDS, repeats))
    timing.repeats = repeats
    return CaseRun(case, timing, reasons, list(contestants.notes))


def _run_cases(cases: Sequence[Case], settings: RunSettings, rng: random.Random) -> Tuple[List[CaseRun], List[str]]:
    """Set up and time every case; a case whose setup fails is kept untimed, with its error."""
    progress = sys.stderr.isatty()
    results: List[CaseRun] = []
    errors: List[str] = []
    for case in cases:
        if progress:
            print(f"  running {case.name} ...", end="\r", flush=True, file=sys.stderr)
        try:
            contestants = case.setup()
        except Exception as error:  # a mismatch, or a broken case: report it, run the others
            errors.append(f"{case.name}: {type(error).__name__}: {error}")
            results.append(CaseRun(case, None, {}))
            continue
        results.append(_time_case(case, contestants, settings, rng))
        if progress:
            print(" " * (len(case.name) + 16), end="\r", flush=True, file=sys.stderr)
    return results, errors


def _check_targets(case: Case, timing: Timing) -> Tuple[str, int, List[str]]:
    """A case's result cell ("PASS", or what failed), how many of its targets passed, and the failures."""
    outcomes, failures, passed = [], [], 0
    for peer, minimum in case.targets():
        ratio = timing.ratios.get(peer)
        if ratio is None:
            outcomes.append(f"n/a ({peer})")
        elif ratio >= minimum:
            passed += 1
        else:
            outcomes.append(f"FAIL ({peer})")
            failures.append(
                f"{case.name}: {peer}/ours = {ratio:.2f}x, target {minimum:.3g}x "
                f"(missed by {100 * (1 - ratio / minimum):.0f}%)"
            )
    return ", ".join(outcomes) or "PASS", passed, failures


def _print_results_table(results: Sequence[CaseRun]) -> Tuple[int, int, List[str]]:
    """Print one line per case; return the targets passed, the targets checked and the failures."""
    headers = ["case", "ours ms"] + [f"{p} ms" for p in PEERS] + [f"{p}/ours" for p in PEERS] + ["target", "result"]
    rows, failures, passed, targeted = [], [], 0, 0
    for case, timing, *_ in results:
        if timing is None:
            rows.append([case.name, "not run"] + [DASH] * (2 * len(PEERS)) + [DASH, "ERROR"])
            continue
        target, result = DASH, ""
        if case.targets():
            target = ", ".join(f"{peer} >= {minimum:.3g}x" for peer, minimum in case.targets())
            result, case_passed, case_failures = _check_targets(case, timing)
            passed, targeted = passed + case_passed, targeted + len(case.targets())
            failures.extend(case_failures)
        rows.append(
            [case.name, _ms(timing.seconds["ours"])]
            + [_ms(timing.seconds.get(p)) for p in PEERS]
            + [_ratio(timing.ratios.get(p)) for p in PEERS]
            + [target, result]
        )
    print(_table(headers, rows))
    return passed, targeted, failures


def _print_section(title: str, lines: Sequence[str]) -> None:
    """Print a titled, indented list, or nothing when it is empty."""
    if lines:
        print(title)
        for line in lines:
            print(f"  {line}")


def _print_caveats(results: Sequence[CaseRun], repeats: int) -> None:
    """Print the peers not run, and the cases whose numbers are less certain (capped, cut short, noisy)."""
    timed = [(run.case, run.timing) for run in results if run.timing is not None]
    notes = [f"{run.case.name}: {peer} {DASH} {reason}" for run in results for peer, reason in run.reasons.items()]
    remarks = [f"{run.case.name}: {note}" for run in results for note in run.notes]
    noisy = [
        f"{case.name}: {name} {100 * s:.0f}%" for case, timing in timed for name, s in timing.spread.items()
        if s == s and s > 0.25
    ]
    short = [
        f"{case.name}: {timing.rounds} of {timing.repeats} rounds" for case, timing in timed
        if timing.rounds < timing.repeats
    ]
    capped = [f"{case.name}: {timing.repeats} rounds" for case, timing in timed if timing.repeats < repeats]
    _print_section("Notes:", remarks)
    _print_section("Not run:", notes)
    _print_section("Slow peers, rounds capped by the case (fewer rounds: ratios less certain):", capped)
    _print_section("Stopped early by the time budget (--budget):", short)
    _print_section("Noisy (interquartile range / median > 25%; rerun with more --repeats):", noisy)


def _print_verdict(passed: int, targeted: int, failures: Sequence[str], errors: Sequence[str]) -> None:
    """Print how many targets passed, then every failure and error."""
    if targeted:
        print(f"Targets: {passed}/{targeted} PASS" + (", failures:" if failures else ""))
    else:
        print("Targets: none among the cases run")
    for failure in failures:
        print(f"  FAIL {failure}")
    for error in errors:
        print(f"  ERROR {error}")


def _exit_status(errors: Sequence[str]) -> int:
    """1 if a case errored (a peer disagreeing with ours included), else 0: missed targets do not count."""
    return 1 if errors else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the cases the command line selects, print the table and notes; return the exit status."""
    args = _parser().parse_args(argv)
    if args.list:
        _print_case_names()
        return 0
    settings = _run_settings(args)
    rng = _configure(args.threads, args.seed)
    cases = _select_cases(args.filter)
    if not cases:
        print(f"no case matches --filter {args.filter!r}; see --list")
        return 0

    _print_header(args.threads, settings)
    start = time.perf_counter()
    results, errors = _run_cases(cases, settings, rng)
    passed, targeted, failures = _print_results_table(results)
    print()
    _print_caveats(results, settings.repeats)
    _print_verdict(passed, targeted, failures, errors)
    print(f"({len(results)} cases in {time.perf_counter() - start:.0f} s)")
    return _exit_status(errors)


if __name__ == "__main__":
    sys.exit(main())
