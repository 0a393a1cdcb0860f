r"""Pyro's flow programs with Pyro's flows, and with ours swapped in.

Run from the repository root::

    python benchmarks/pyro_swap.py            # every case, one table (a few minutes on 2 cores)
    python benchmarks/pyro_swap.py --quick    # smoke run, under a minute
    python benchmarks/pyro_swap.py --cases neutra-banana dmm --steps-scale 2

Each case re-expresses one of Pyro's flow programs (there is no network
here, so the data are generated) and runs it twice in one process: once with
Pyro's helpers (``pyro.distributions.transforms.X``, ``AutoIAFNormal``) and
once with ours (``pyro_nflows.transforms.X``, ``AutoIAF``), called the same
way, at the same sizes, from the same seed:

1. **The normalizing-flows tutorial** (``tutorial/source/normalizing_flows_intro.ipynb``):
   maximum likelihood with Adam on a standardised 2-D toy (``circles``,
   the tutorial's ``make_circles``; and ``two_moons``), full batch, through

   - ``spline(2, count_bins=16, bound=B, order="quadratic")`` (an
     element-wise spline: ``event_dim`` 0, so ``log_prob`` has one column per
     coordinate, as in the tutorial; Pyro's with ``order="quadratic"`` too, so
     that the families match), lr 1e-2 as the tutorial;
   - four ``spline_coupling(2, None, [32, 32], 16, B)`` layers with
     ``permute(2, [1, 0])`` between them, lr 5e-3 as the tutorial.
     Pyro's coupling also passes the untouched half through an element-wise
     spline, ours leaves it as it is (the parameter counts are printed
     below the table).

   Metric: the test NLL per point in nats (in standardised units, the same for both).
2. **NeuTra** (``examples/neutra.py``): SVI of the banana-shaped density of
   the example (``a = 1.15``, ``b = 1``) and of Neal's funnel
   (``pyro_nflows.models.funnel``), Pyro's ``AutoIAFNormal(model, [H], None, K)``
   against our ``AutoIAF(model, K, [H])`` (the same layers and widths, each
   guide's other defaults; on the banana also ours with ``init_scale=1``,
   the scale of Pyro's fixed standard-normal base), ``Trace_ELBO`` with 8 vectorised particles and
   Adam at 1e-2 as the example. Both densities are normalised, so the ELBO
   is minus the KL divergence to the target (0 is perfect); it is estimated
   on ``--eval-samples`` draws of the trained guide.
3. **The deep Markov model** (``examples/dmm.py`` with ``--num-iafs 2``):
   the DMM's gated transition, emitter, RNN-and-combiner guide, with two IAF
   layers ``affine_autoregressive(z_dim, hidden_dims=[iaf_dim])`` on every
   ``q(z_t | z_{t-1}, x_{t:T})``, on binary sequences drawn from a known
   nonlinear state-space model (the JSB chorales' shape, smaller: 16
   notes, 12 steps). ``ClippedAdam`` as the example (lr 3e-3, betas 0.96 /
   0.999, clip norm 10). Metric: the test ELBO per time step, in nats (10
   particles, held-out sequences).

**Timing.** The two runs of a case step in lockstep (one step of Pyro's
run, then one of ours, each with its own random stream, so neither sees the
other's draws and machine noise hits both alike). The time of a step is its
wall time; the table gives the median over the steps after a warm-up (the
first 10%, at least 3 steps) and the ratio Pyro's / ours (> 1: ours is
faster). Nothing of a run's result depends on the other run.

The table is a report: the exit status is 0 unless a case raises.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

# Benchmark the checkout this file lives in, installed or not.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_ROOT, "pyro_nflows")) and _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import pyro.distributions.transforms as pyro_transforms  # noqa: E402
import torch  # noqa: E402
from pyro.distributions import constraints  # noqa: E402
from pyro.infer import SVI, Trace_ELBO  # noqa: E402
from pyro.infer.autoguide import AutoIAFNormal  # noqa: E402
from pyro.infer.importance import vectorized_importance_weights  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributions.utils import broadcast_all  # noqa: E402

import pyro_nflows.transforms as our_transforms  # noqa: E402
from benchmarks.common import library_versions  # noqa: E402
from pyro_nflows import datasets  # noqa: E402
from pyro_nflows.autoguides import AutoIAF  # noqa: E402
from pyro_nflows.models import funnel  # noqa: E402

LIBRARIES = {"pyro": pyro_transforms, "ours": our_transforms}


# ---------------------------------------------------------------------------
# Running two contestants in lockstep
# ---------------------------------------------------------------------------


@dataclass
class Run:
    """One contestant of a case: ``step()`` does one optimiser step; ``score()``
    returns the final metric. Each run draws from its own random stream."""

    step: Callable[[], object]
    score: Callable[[], float]
    seed: int
    times: list[float] = field(default_factory=list)
    _rng: torch.Tensor | None = None

    def __post_init__(self) -> None:
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            self._rng = torch.get_rng_state()

    def timed_step(self) -> None:
        """One step from this run's own random stream, timed."""
        with torch.random.fork_rng():
            torch.set_rng_state(self._rng)
            start = time.perf_counter()
            self.step()
            self.times.append(time.perf_counter() - start)
            self._rng = torch.get_rng_state()

    def final(self) -> float:
        """The run's metric, from its own random stream."""
        with torch.random.fork_rng():
            torch.set_rng_state(self._rng)
            return self.score()

    def median_ms(self) -> float:
        """Median step time in ms after the warm-up (the first 10%, at least 3 steps)."""
        warm_up = max(3, len(self.times) // 10)
        kept = self.times[warm_up:] or self.times
        return 1000 * statistics.median(kept)


@dataclass
class Row:
    """One line of the table."""

    case: str
    metric: str
    pyro: float
    ours: float
    pyro_ms: float
    ours_ms: float
    note: str = ""


def race(case: str, metric: str, runs: dict[str, Run], steps: int, note: str = "") -> Row:
    """Step Pyro's run and ours alternately ``steps`` times, then score both."""
    for _ in range(steps):
        runs["pyro"].timed_step()
        runs["ours"].timed_step()
    scores = {name: run.final() for name, run in runs.items()}
    return Row(case, metric, scores["pyro"], scores["ours"], runs["pyro"].median_ms(), runs["ours"].median_ms(), note)


def count_parameters(modules: list) -> int:
    """The learnable parameters of the modules among ``modules``."""
    return sum(p.numel() for m in modules if isinstance(m, nn.Module) for p in m.parameters())


# ---------------------------------------------------------------------------
# 1. The normalizing-flows tutorial: maximum likelihood on a 2-D toy
# ---------------------------------------------------------------------------


def _standardised_toy(name: str, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and test rows of a 2-D toy, standardised with the training rows'
    mean and standard deviation (the tutorial's ``StandardScaler``)."""
    data = datasets.load_dataset(name, n=2 * count, seed=seed)
    train, test = data[:count], data[count:]
    mean, std = train.mean(0), train.std(0)
    return (train - mean) / std, (test - mean) / std


def _elementwise_spline(library) -> list:
    """The tutorial's first flow: one element-wise spline (quadratic, 16 bins)."""
    return [library.spline(2, count_bins=16, bound=4.0, order="quadratic")]


def _spline_couplings(library) -> list:
    """The tutorial's second flow, stacked: four spline couplings, the halves swapped between them."""
    layers = []
    for index in range(4):
        if index:
            layers.append(library.permute(2, torch.tensor([1, 0])))
        layers.append(library.spline_coupling(2, None, [32, 32], 16, 4.0))
    return layers


def _density_run(build: Callable[[], list], train: torch.Tensor, test: torch.Tensor, lr: float, seed: int) -> Run:
    """Maximum likelihood as the tutorial does it: the base a batch of
    standard normals, ``-log_prob(data).mean()``, Adam, the cache cleared
    after every step; scored by the test NLL per point (summed over
    coordinates where the flow is element-wise)."""
    torch.manual_seed(seed)
    layers = build()
    base = dist.Normal(torch.zeros(2), torch.ones(2))
    flow = dist.TransformedDistribution(base, layers)
    parameters = [p for layer in layers if isinstance(layer, nn.Module) for p in layer.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=lr)

    def step() -> None:
        optimizer.zero_grad()
        loss = -flow.log_prob(train).mean()
        loss.backward()
        optimizer.step()
        flow.clear_cache()

    @torch.no_grad()
    def score() -> float:
        log_prob = flow.log_prob(test)
        return -(log_prob.sum(-1) if log_prob.dim() == 2 else log_prob).mean().item()

    return Run(step, score, seed)


def tutorial_cases(args: argparse.Namespace) -> list[Row]:
    """Both toys, the element-wise spline and the coupling stack."""
    rows = []
    for toy in ("circles", "two_moons"):
        train, test = _standardised_toy(toy, args.points, args.seed)
        for label, build, lr, steps in [
            ("spline", _elementwise_spline, 1e-2, args.spline_steps),
            ("4 spline couplings", _spline_couplings, 5e-3, args.coupling_steps),
        ]:
            runs = {
                name: _density_run(lambda lib=lib: build(lib), train, test, lr, args.seed)
                for name, lib in LIBRARIES.items()
            }
            sizes = {name: count_parameters(build(lib)) for name, lib in LIBRARIES.items()}
            note = f"parameters: Pyro's {sizes['pyro']}, ours {sizes['ours']}"
            rows.append(race(f"tutorial {toy}: {label}", "test NLL (nats)", runs, steps, note))
    return rows


# ---------------------------------------------------------------------------
# 2. NeuTra: SVI of the banana and the funnel with IAF guides
# ---------------------------------------------------------------------------


class Banana(dist.TorchDistribution):
    r"""The banana of Pyro's NeuTra example (Wang et al. 2018):
    :math:`x = a u_0`, :math:`y = u_1 / a + b (u_0^2 + a^2)` with :math:`u`
    a correlated standard bivariate normal (correlation ``rho``). The map has
    unit Jacobian, so the density is normalised."""

    arg_constraints = {"a": constraints.positive, "b": constraints.real}
    support = constraints.real_vector

    def __init__(self, a: float, b: float, rho: float = 0.9):
        self.a, self.b, self.rho = broadcast_all(a, b, rho)
        covariance = torch.tensor([[1.0, rho], [rho, 1.0]])
        self.base = dist.MultivariateNormal(torch.zeros(2), covariance_matrix=covariance)
        super().__init__(event_shape=(2,))

    def sample(self, sample_shape=()) -> torch.Tensor:
        u = self.base.sample(sample_shape)
        x = self.a * u[..., 0]
        y = u[..., 1] / self.a + self.b * (u[..., 0] ** 2 + self.a**2)
        return torch.stack([x, y], -1)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        u0 = value[..., 0] / self.a
        u1 = (value[..., 1] - self.b * (u0**2 + self.a**2)) * self.a
        return self.base.log_prob(torch.stack([u0, u1], -1))


def banana() -> None:
    """The example's model at its default ``a = 1.15``, ``b = 1``."""
    pyro.sample("x", Banana(1.15, 1.0))


def _guide_run(model: Callable, make_guide: Callable, seed: int, particles: int, eval_samples: int) -> Run:
    """SVI as the NeuTra example does it (Adam at 1e-2), vectorised particles;
    scored by the ELBO on ``eval_samples`` draws (= -KL: the targets are normalised)."""
    torch.manual_seed(seed)
    guide = make_guide(model)
    guide()  # set up (and register) the parameters now, from this run's seed
    elbo = Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), elbo)

    @torch.no_grad()
    def score() -> float:
        weights, _, _ = vectorized_importance_weights(model, guide, num_samples=eval_samples, max_plate_nesting=1)
        return weights.mean().item()

    return Run(svi.step, score, seed)


def neutra_cases(args: argparse.Namespace) -> list[Row]:
    """The banana and the funnel, Pyro's ``AutoIAFNormal`` and our ``AutoIAF``."""
    rows = []
    cases = [("banana", banana, 32, {}), ("banana", banana, 32, {"init_scale": 1.0}), ("funnel", funnel, 40, {})]
    for label, model, hidden, options in cases:
        pyro.clear_param_store()  # the two guides have different names: both live in the store
        guides = {
            "pyro": lambda m, h=hidden: AutoIAFNormal(m, [h], None, 2),
            "ours": lambda m, h=hidden, o=options: AutoIAF(m, 2, [h], **o),
        }
        runs = {
            name: _guide_run(model, make, args.seed, args.particles, args.eval_samples) for name, make in guides.items()
        }
        ours = "AutoIAF" + "".join(f"({key}={value})" for key, value in options.items())
        note = f"2 IAF layers, hidden [{hidden}]"
        rows.append(race(f"neutra {label}: AutoIAFNormal / {ours}", "ELBO = -KL (nats)", runs, args.svi_steps, note))
    return rows


# ---------------------------------------------------------------------------
# 3. The deep Markov model with IAF layers on every z_t
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DMMSizes:
    """The DMM's sizes: the JSB chorales' (88 notes, z_dim 100, ...), scaled down."""

    notes: int = 16
    steps: int = 12
    z_dim: int = 6
    emission_dim: int = 32
    transition_dim: int = 32
    rnn_dim: int = 48
    iaf_dim: int = 24
    num_iafs: int = 2


def synthetic_sequences(count: int, sizes: DMMSizes, seed: int) -> torch.Tensor:
    """Binary sequences ``(count, steps, notes)`` from a known nonlinear
    state-space model: a 2-D latent rotating slowly with a tanh nonlinearity
    and Gaussian noise, and notes switched on by a fixed random readout."""
    generator = torch.Generator().manual_seed(seed)
    angle = 0.3
    rotation = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    readout = 2.0 * torch.randn(2, sizes.notes, generator=generator)
    bias = torch.randn(sizes.notes, generator=generator) - 1.0
    z = torch.randn(count, 2, generator=generator)
    rows = []
    for _ in range(sizes.steps):
        z = torch.tanh(1.2 * z @ rotation.T) + 0.3 * torch.randn(count, 2, generator=generator)
        rows.append(torch.bernoulli(torch.sigmoid(z @ readout + bias), generator=generator))
    return torch.stack(rows, 1)


class Emitter(nn.Module):
    """``p(x_t | z_t)``: Bernoulli probabilities from a two-layer network."""

    def __init__(self, sizes: DMMSizes):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(sizes.z_dim, sizes.emission_dim),
            nn.ReLU(),
            nn.Linear(sizes.emission_dim, sizes.emission_dim),
            nn.ReLU(),
            nn.Linear(sizes.emission_dim, sizes.notes),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)  # logits


class GatedTransition(nn.Module):
    """``p(z_t | z_{t-1})``: a gate mixes a linear (identity at the start)
    and a nonlinear proposal for the mean; the scale comes from the proposal."""

    def __init__(self, sizes: DMMSizes):
        super().__init__()
        z, hidden = sizes.z_dim, sizes.transition_dim
        self.gate = nn.Sequential(nn.Linear(z, hidden), nn.ReLU(), nn.Linear(hidden, z), nn.Sigmoid())
        self.proposal = nn.Sequential(nn.Linear(z, hidden), nn.ReLU(), nn.Linear(hidden, z))
        self.linear = nn.Linear(z, z)
        nn.init.eye_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.scale = nn.Linear(z, z)

    def forward(self, z_previous: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, proposal = self.gate(z_previous), self.proposal(z_previous)
        loc = (1 - gate) * self.linear(z_previous) + gate * proposal
        return loc, nn.functional.softplus(self.scale(torch.relu(proposal)))


class Combiner(nn.Module):
    """``q(z_t | z_{t-1}, x_{t:T})``'s Gaussian before the IAF layers, from
    ``z_{t-1}`` and the backward RNN's state at ``t``."""

    def __init__(self, sizes: DMMSizes):
        super().__init__()
        self.hidden = nn.Linear(sizes.z_dim, sizes.rnn_dim)
        self.loc = nn.Linear(sizes.rnn_dim, sizes.z_dim)
        self.scale = nn.Linear(sizes.rnn_dim, sizes.z_dim)

    def forward(self, z_previous: torch.Tensor, rnn_state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        combined = 0.5 * (torch.tanh(self.hidden(z_previous)) + rnn_state)
        return self.loc(combined), nn.functional.softplus(self.scale(combined))


class DMM(nn.Module):
    """The deep Markov model and its guide; the guide's ``q(z_t | ...)`` goes
    through ``num_iafs`` layers of ``library.affine_autoregressive(z_dim, hidden_dims=[iaf_dim])``."""

    def __init__(self, sizes: DMMSizes, library, name: str):
        super().__init__()
        self.sizes, self.name = sizes, name
        self.emitter, self.transition, self.combiner = Emitter(sizes), GatedTransition(sizes), Combiner(sizes)
        self.rnn = nn.RNN(sizes.notes, sizes.rnn_dim, nonlinearity="relu", batch_first=True)
        self.iafs = nn.ModuleList(
            [library.affine_autoregressive(sizes.z_dim, hidden_dims=[sizes.iaf_dim]) for _ in range(sizes.num_iafs)]
        )
        self.z_0 = nn.Parameter(torch.zeros(sizes.z_dim))
        self.z_q_0 = nn.Parameter(torch.zeros(sizes.z_dim))
        self.h_0 = nn.Parameter(torch.zeros(1, 1, sizes.rnn_dim))

    def model(self, sequences: torch.Tensor) -> None:
        pyro.module(self.name, self)
        z = self.z_0.expand(len(sequences), -1)
        with pyro.plate("sequences", len(sequences)):
            for t in pyro.markov(range(sequences.shape[1])):
                loc, scale = self.transition(z)
                z = pyro.sample(f"z_{t}", dist.Normal(loc, scale).to_event(1))
                pyro.sample(f"x_{t}", dist.Bernoulli(logits=self.emitter(z)).to_event(1), obs=sequences[:, t])

    def guide(self, sequences: torch.Tensor) -> None:
        pyro.module(self.name, self)
        h_0 = self.h_0.expand(1, len(sequences), -1).contiguous()
        backward_states, _ = self.rnn(sequences.flip(1), h_0)
        states = backward_states.flip(1)  # states[:, t] has read x_{t:T}
        z = self.z_q_0.expand(len(sequences), -1)
        with pyro.plate("sequences", len(sequences)):
            for t in pyro.markov(range(sequences.shape[1])):
                loc, scale = self.combiner(z, states[:, t])
                q = dist.TransformedDistribution(dist.Normal(loc, scale).to_event(1), list(self.iafs))
                z = pyro.sample(f"z_{t}", q)


def _dmm_run(library, name: str, train: torch.Tensor, test: torch.Tensor, sizes: DMMSizes, seed: int) -> Run:
    """SVI of the DMM as the example (``ClippedAdam``: lr, betas, clip norm);
    scored by the test ELBO per time step (10 particles)."""
    torch.manual_seed(seed)
    dmm = DMM(sizes, library, name)
    optimizer = pyro.optim.ClippedAdam({"lr": 3e-3, "betas": (0.96, 0.999), "clip_norm": 10.0})
    svi = SVI(dmm.model, dmm.guide, optimizer, Trace_ELBO(max_plate_nesting=1))

    def step() -> None:
        svi.step(train)

    @torch.no_grad()
    def score() -> float:
        elbo = Trace_ELBO(num_particles=10, max_plate_nesting=1)
        return -elbo.loss(dmm.model, dmm.guide, test) / test.shape[:2].numel()

    return Run(step, score, seed)


def dmm_cases(args: argparse.Namespace) -> list[Row]:
    """The DMM with two IAF layers, Pyro's ``affine_autoregressive`` and ours."""
    sizes = DMMSizes()
    train = synthetic_sequences(args.sequences, sizes, args.seed)
    test = synthetic_sequences(args.sequences, sizes, args.seed + 1000)
    pyro.clear_param_store()
    runs = {name: _dmm_run(lib, f"dmm_{name}", train, test, sizes, args.seed) for name, lib in LIBRARIES.items()}
    note = (
        f"{args.sequences} sequences x {sizes.steps} steps x {sizes.notes} notes, z_dim {sizes.z_dim}, "
        f"{sizes.num_iafs} IAFs of hidden [{sizes.iaf_dim}]"
    )
    return [race("dmm --num-iafs 2", "test ELBO / step (nats)", runs, args.dmm_steps, note)]


# ---------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------

CASES = {"tutorial": tutorial_cases, "neutra": neutra_cases, "dmm": dmm_cases}


def format_table(rows: list[Row]) -> str:
    """The rows as an aligned text table (which is also a Markdown table), then the notes."""
    header = ("case", "metric", "Pyro's", "ours", "Pyro's ms/step", "ours ms/step", "ratio")
    lines = [
        (r.case, r.metric, f"{r.pyro:.4f}", f"{r.ours:.4f}", f"{r.pyro_ms:.2f}", f"{r.ours_ms:.2f}",
         f"{r.pyro_ms / r.ours_ms:.2f}")
        for r in rows
    ]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines)]
    out = [" | ".join(cell.ljust(width) for cell, width in zip(header, widths))]
    out.append("-+-".join("-" * width for width in widths))
    out += [" | ".join(cell.ljust(width) for cell, width in zip(line, widths)) for line in lines]
    notes = [f"- {r.case}: {r.note}" for r in rows if r.note]
    return "\n".join(out + ([""] + notes if notes else []))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with the step counts (``--quick``'s or the full ones, scaled)."""
    description = __doc__.split("\n\n")[0]
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: few steps and draws (under a minute)")
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES), help="which programs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1: small models)")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every step count")
    parser.add_argument("--points", type=int, default=1000, help="training (and test) points of the 2-D toys")
    parser.add_argument("--particles", type=int, default=8, help="ELBO particles of the NeuTra SVI")
    parser.add_argument("--eval-samples", type=int, default=20000, help="draws that estimate the final ELBO")
    parser.add_argument("--sequences", type=int, default=64, help="training (and test) sequences of the DMM")
    args = parser.parse_args(argv)
    steps = {"spline_steps": 1000, "coupling_steps": 800, "svi_steps": 1500, "dmm_steps": 200}
    if args.quick:
        steps = {"spline_steps": 40, "coupling_steps": 30, "svi_steps": 30, "dmm_steps": 10}
        args.eval_samples = min(args.eval_samples, 1000)
    for name, count in steps.items():
        setattr(args, name, max(4, round(count * args.steps_scale)))
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the selected cases and print the header and the table."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    pyro.set_rng_seed(args.seed)
    command = "python benchmarks/pyro_swap.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"# {command.strip()}")
    print(f"# {datetime.date.today().isoformat()}, {platform.platform()}, {os.cpu_count()} CPUs, "
          f"{args.threads} thread(s), load {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"# {library_versions({'pyro': 'pyro-ppl'})}")
    start = time.perf_counter()
    rows = []
    for name in args.cases:
        rows += CASES[name](args)
    print(format_table(rows))
    print(f"\n# {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
