r"""Neural posterior estimation with ``pyro_nflows.amortized.fit_posterior``, against the sbi package's NPE.

Run from the repository root::

    python benchmarks/sbi.py                                      # 3 tasks x 1,000 and 10,000 simulations
    python benchmarks/sbi.py --budgets 1000 10000 100000 --out sbi.jsonl   # resumable; add budgets later
    python benchmarks/sbi.py --out sbi.jsonl --report             # the table of the rows kept so far
    python benchmarks/sbi.py --quick                              # smoke run: 1,000 simulations, small C2ST
    python benchmarks/sbi.py --tasks two_moons --budgets 1000 --observations 5

**The tasks** of the SBI benchmark (Lueckmann et al. 2021 [1], sbibm),
written as Pyro models (site ``theta`` latent, site ``x`` observed):

- ``gaussian_linear``: ``theta ~ N(0, 0.1 I_10)``, ``x | theta ~ N(theta,
  0.1 I_10)``; the posterior is ``N(x / 2, 0.05 I)``, sampled exactly;
- ``two_moons``: ``theta ~ U(-1, 1)^2``, ``a ~ U(-pi/2, pi/2)``, ``r ~
  N(0.1, 0.01^2)`` (sites ``a`` and ``r``, marginalised: the posterior is of
  ``theta`` alone), ``x = (r cos a + 0.25, r sin a) + (-|theta_1 + theta_2| /
  sqrt 2, (theta_2 - theta_1) / sqrt 2)``. **Reference samples, exactly**:
  the map ``theta -> (-|z_0|, z_1)`` (``z`` = ``theta`` turned by -45 degrees)
  is two-to-one and measure-preserving on each branch, so with ``q = (r cos a
  + 0.25, r sin a)`` drawn from its distribution, ``m = x - q`` must satisfy
  ``m_0 <= 0``; one of the two preimages ``z = (+-m_0, m_1)`` is picked with
  probability 1/2 and turned back, and the draw is kept if ``theta`` lies in
  the prior's box. Kept draws have density proportional to ``sum over
  branches 1[theta in box] p_q(x - g(theta))``, the posterior (rejection
  sampling from the likelihood's own noise);
- ``slcp``: ``theta ~ U(-3, 3)^5``, 4 draws ``x_j ~ N(m, S)`` with ``m =
  theta_{1:2}``, ``S = [[s_1^2, rho s_1 s_2], [rho s_1 s_2, s_2^2]] + 1e-6 I``,
  ``s_1 = theta_3^2``, ``s_2 = theta_4^2``, ``rho = tanh theta_5`` (``x``
  flattened to 8 numbers). **Reference samples by MCMC**: the likelihood
  depends on ``theta_3`` and ``theta_4`` through their squares only and the
  prior is symmetric, so the posterior has four mirror-image modes; Pyro's
  NUTS samples the folded posterior (``theta_3, theta_4 in [0, 3]``, where it
  is unimodal: the Gaussian likelihood has one mode in ``(m, S)``, and the map
  to ``S`` is one-to-one there), ``--warmup-steps`` then ``--num-samples``
  draws, and each draw's signs of ``theta_3`` and ``theta_4`` are flipped
  with probability 1/2 each.

The observations are ``--observations`` draws of the prior predictive
(seed 1000; the same for every budget, seed and method); reference samples
are cached under ``--cache``.

**What is compared.** One set of ``B`` simulations per task, budget and seed
(``simulate(model, B)``, the same draws for both), then ours:
``fit_posterior(model, "x", simulations=draws, latent=["theta"],
seed=S)`` with every other setting its default (``fit``'s: MAF, 5
layers, default widths, 100 epochs at most, patience 30, batch 256, Adam at
1e-3 with a cosine schedule, 10% held out; the latents mapped to the
unconstrained space), and sbi's: ``NPE(prior, density_estimator="maf")``
(its default: nflows' MAF, 5 transforms of 50 hidden units, z-scoring),
``append_simulations(theta, x).train()`` at its defaults (batch 200, Adam at
5e-4, 10% held out, stop after 20 epochs without a better validation loss,
no epoch cap), sampled with ``build_posterior().sample(x=x_o)`` (direct
sampling, rejecting draws outside the prior's support).

**The score.** C2ST, the sbi package's (``sbi.utils.metrics.c2st`` with
``classifier="mlp"``): a classifier two-sample test between ``--num-samples``
posterior draws and as many reference draws, both z-scored by the
reference's mean and sd; scikit-learn's ``MLPClassifier`` (ReLU, two hidden
layers of ``10 D`` units, Adam, early stopping on a held-out tenth after 50
epochs without progress, at most 1,000 epochs), 5-fold cross-validated
accuracy. 0.5: the classifier cannot tell the samples apart (perfect); 1.0:
it always can. sbibm's own C2ST is the same classifier without early
stopping and with ``max_iter=10000``: on samples that are hard to tell apart
it trains to the cap, minutes per observation on a 2-core machine. The
table shows the mean over the observations (and its standard error), and
the wall time of training plus sampling for every observation.
``ours - sbi`` < 0: ours is better.

[1] Jan-Matthis Lueckmann, Jan Boelts, David S. Greenberg, Pedro J.
    Goncalves, Jakob H. Macke. Benchmarking Simulation-Based Inference.
    AISTATS 2021. arXiv:2101.04653

The table is a report, not a test: the exit status is 0 unless a run errors.

"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence

# Benchmark the checkout this file lives in, installed or not; and let `import sbi` find the
# package, not this file (run as a script, its folder comes first on the path).
_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _HERE]
if os.path.isdir(os.path.join(_ROOT, "pyro_nflows")) and _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import numpy as np  # noqa: E402
import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import FinishedRows, library_versions  # noqa: E402
from benchmarks.density import _table  # noqa: E402
from pyro_nflows.amortized import fit_posterior, simulate  # noqa: E402

METHODS = ["ours", "sbi"]
DASH = "—"
OBSERVATION_SEED = 1000


# ---------------------------------------------------------------------------
# The tasks as Pyro models, their priors for sbi, and their reference posteriors
# ---------------------------------------------------------------------------


def gaussian_linear(x=None):
    theta = pyro.sample("theta", dist.Normal(torch.zeros(10), math.sqrt(0.1)).to_event(1))
    return pyro.sample("x", dist.Normal(theta, math.sqrt(0.1)).to_event(1), obs=x)


def two_moons_shift(theta: torch.Tensor) -> torch.Tensor:
    """``(-|z_0|, z_1)``, ``z`` = ``theta`` turned by -45 degrees (sbibm's ``_map_fun``)."""
    z0 = (theta[..., 0] + theta[..., 1]) / math.sqrt(2)
    z1 = (theta[..., 1] - theta[..., 0]) / math.sqrt(2)
    return torch.stack([-z0.abs(), z1], dim=-1)


def two_moons(x=None):
    theta = pyro.sample("theta", dist.Uniform(-torch.ones(2), torch.ones(2)).to_event(1))
    a = pyro.sample("a", dist.Uniform(-math.pi / 2, math.pi / 2))
    r = pyro.sample("r", dist.Normal(0.1, 0.01))
    moon = torch.stack([r * a.cos() + 0.25, r * a.sin()], dim=-1)
    return pyro.sample("x", dist.Delta(moon + two_moons_shift(theta), event_dim=1), obs=x)


def slcp_likelihood(theta: torch.Tensor) -> dist.MultivariateNormal:
    """The distribution of one of SLCP's 4 draws given ``theta`` (batch shape ``theta.shape[:-1]``)."""
    s1, s2, rho = theta[..., 2] ** 2, theta[..., 3] ** 2, torch.tanh(theta[..., 4])
    covariance = torch.stack([torch.stack([s1**2, rho * s1 * s2], -1), torch.stack([rho * s1 * s2, s2**2], -1)], -2)
    return dist.MultivariateNormal(theta[..., :2], covariance + 1e-6 * torch.eye(2))


def slcp(x=None):
    theta = pyro.sample("theta", dist.Uniform(-3 * torch.ones(5), 3 * torch.ones(5)).to_event(1))
    with pyro.plate("draws", 4):
        return pyro.sample("x", slcp_likelihood(theta), obs=x)


_FOLDED_LOW, _FOLDED_HIGH = torch.tensor([-3.0, -3.0, 0.0, 0.0, -3.0]), torch.full((5,), 3.0)


def _slcp_log_posterior(theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """SLCP's log-posterior, up to a constant, on the folded box (theta_3, theta_4 in [0, 3]); -inf outside."""
    inside = ((theta >= _FOLDED_LOW) & (theta <= _FOLDED_HIGH)).all(-1)
    value = slcp_likelihood(theta).log_prob(x.reshape(4, 1, 2)).sum(0)
    return torch.where(inside, value, torch.full_like(value, -math.inf))


def reference_gaussian_linear(x: torch.Tensor, n: int, generator: torch.Generator, args) -> torch.Tensor:
    return x / 2 + math.sqrt(0.05) * torch.randn(n, 10, generator=generator)


def reference_two_moons(x: torch.Tensor, n: int, generator: torch.Generator, args) -> torch.Tensor:
    kept, count = [], 0
    while count < n:
        a = math.pi * (torch.rand(4 * n, generator=generator) - 0.5)
        r = 0.1 + 0.01 * torch.randn(4 * n, generator=generator)
        m = x - torch.stack([r * a.cos() + 0.25, r * a.sin()], dim=-1)  # = (-|z_0|, z_1)
        sign = torch.where(torch.rand(4 * n, generator=generator) < 0.5, -1.0, 1.0)
        z0, z1 = sign * m[:, 0], m[:, 1]
        theta = torch.stack([(z0 - z1) / math.sqrt(2), (z0 + z1) / math.sqrt(2)], dim=-1)  # z turned back
        good = (m[:, 0] <= 0) & (theta.abs() <= 1).all(-1)
        kept.append(theta[good])
        count += int(good.sum())
    return torch.cat(kept)[:n]


def reference_slcp(x: torch.Tensor, n: int, generator: torch.Generator, args) -> torch.Tensor:
    """Random-walk Metropolis on the folded posterior, then random signs of theta_3 and theta_4."""
    chains = 1000
    proposals = _FOLDED_LOW + (_FOLDED_HIGH - _FOLDED_LOW) * torch.rand(args.prior_draws, 5,
                                                                        generator=generator)
    weights = torch.cat([_slcp_log_posterior(chunk, x) for chunk in proposals.split(100_000)])
    start = torch.multinomial((weights - weights.max()).exp(), chains, replacement=True, generator=generator)
    theta = proposals[start]
    log_p = _slcp_log_posterior(theta, x)
    draws, thin, accepted, steps = [], 20, 0, 0
    cholesky = None
    while len(draws) * chains < n:
        if steps < args.warmup_steps and steps % 100 == 0:  # adapt during warm-up only
            cholesky = torch.linalg.cholesky(2.38**2 / 5 * torch.cov(theta.T) + 1e-9 * torch.eye(5))
        proposal = theta + torch.randn(chains, 5, generator=generator) @ cholesky.T
        log_q = _slcp_log_posterior(proposal, x)
        accept = torch.rand(chains, generator=generator).log() < log_q - log_p
        theta, log_p = torch.where(accept[:, None], proposal, theta), torch.where(accept, log_q, log_p)
        steps += 1
        if steps > args.warmup_steps:
            accepted += int(accept.sum())
            if (steps - args.warmup_steps) % thin == 0:
                draws.append(theta.clone())
    samples = torch.cat(draws)[:n]
    signs = torch.where(torch.rand(n, 2, generator=generator) < 0.5, -1.0, 1.0)
    samples[:, 2:4] *= signs
    rate = accepted / max(1, (steps - args.warmup_steps) * chains)
    print(f"  slcp reference: Metropolis acceptance {rate:.2f}", file=sys.stderr, flush=True)
    return samples


class Task:
    def __init__(self, model: Callable, prior: Callable, reference: Callable):
        self.model, self.prior, self.reference = model, prior, reference


TASKS = {
    "gaussian_linear": Task(gaussian_linear, lambda: torch.distributions.MultivariateNormal(
        torch.zeros(10), 0.1 * torch.eye(10)), reference_gaussian_linear),
    "two_moons": Task(two_moons, lambda: _box(2, 1.0), reference_two_moons),
    "slcp": Task(slcp, lambda: _box(5, 3.0), reference_slcp),
}


def _box(dim: int, bound: float):
    from sbi.utils import BoxUniform

    return BoxUniform(-bound * torch.ones(dim), bound * torch.ones(dim))


def observations(task: str, count: int) -> torch.Tensor:
    """``count`` observations of the task, flattened: shape ``(count, x_dim)``."""
    torch.manual_seed(OBSERVATION_SEED)
    return simulate(TASKS[task].model, count, sites=["x"], progress=False)["x"].reshape(count, -1)


def reference_samples(task: str, index: int, x: torch.Tensor, args) -> torch.Tensor:
    """The reference posterior samples of observation ``index``, cached under ``args.cache``."""
    path = os.path.join(args.cache, f"{task}-{index}-{args.num_samples}-{args.warmup_steps}-{args.prior_draws}.pt")
    if os.path.exists(path):
        return torch.load(path, weights_only=True)
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(OBSERVATION_SEED + index)
    samples = TASKS[task].reference(x, args.num_samples, generator, args)
    os.makedirs(args.cache, exist_ok=True)
    torch.save(samples, path)
    print(f"  reference {task} #{index}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return samples


# ---------------------------------------------------------------------------
# C2ST, as sbibm computes it
# ---------------------------------------------------------------------------


# Names the C2ST in --out's settings: rows scored by another classifier are not reused.
C2ST_NAME = "sbi.utils.metrics.c2st(classifier='mlp')"


def c2st(samples: torch.Tensor, reference: torch.Tensor, seed: int = 1) -> float:
    """sbi's classifier two-sample test (``sbi.utils.metrics.c2st`` with its MLP, z-scored
    by the reference, 5 folds): the cross-validated accuracy; 0.5 is perfect."""
    from sbi.utils.metrics import c2st as sbi_c2st

    return float(sbi_c2st(reference, samples, seed=seed, classifier="mlp"))


# ---------------------------------------------------------------------------
# The contestants: train on the same simulations, sample every observation
# ---------------------------------------------------------------------------


def run_ours(task: str, draws: dict, xs: torch.Tensor, n: int, seed: int) -> tuple[List[torch.Tensor], dict]:
    start = time.perf_counter()
    posterior = fit_posterior(TASKS[task].model, "x", simulations=draws, latent=["theta"], seed=seed,
                              progress=False)
    shape = draws["x"].shape[1:]
    samples = [posterior(x.reshape(shape)).sample((n,))["theta"] for x in xs]
    return samples, {"seconds": time.perf_counter() - start, "epochs": len(posterior.history.validation)}


def run_sbi(task: str, draws: dict, xs: torch.Tensor, n: int, seed: int) -> tuple[List[torch.Tensor], dict]:
    from sbi.inference import NPE
    from torch.utils.tensorboard import SummaryWriter

    torch.manual_seed(seed)
    start = time.perf_counter()
    # sbi logs to ./sbi-logs unless given a writer: keep its logs out of the checkout.
    with tempfile.TemporaryDirectory() as logs:
        writer = SummaryWriter(log_dir=logs)
        inference = NPE(prior=TASKS[task].prior(), density_estimator="maf", show_progress_bars=False,
                        summary_writer=writer)
        estimator = inference.append_simulations(draws["theta"], draws["x"].reshape(len(draws["x"]), -1)).train()
        writer.close()
    posterior = inference.build_posterior(estimator)
    samples = [posterior.sample((n,), x=x.reshape(1, -1), show_progress_bars=False) for x in xs]
    epochs = inference._summary.get("epochs_trained", [None])[-1]
    return samples, {"seconds": time.perf_counter() - start, "epochs": epochs}


RUNNERS = {"ours": run_ours, "sbi": run_sbi}


def run_row(task: str, budget: int, seed: int, method: str, args) -> dict:
    """One method on one task, budget and seed: C2ST for every observation."""
    xs = observations(task, args.observations)
    references = [reference_samples(task, index, x, args) for index, x in enumerate(xs)]
    torch.manual_seed(seed)
    draws = simulate(TASKS[task].model, budget, progress=False)
    row = {"task": task, "budget": budget, "seed": seed, "method": method}
    try:
        samples, info = RUNNERS[method](task, draws, xs, args.num_samples, seed)
    except Exception as error:  # report it, run the other rows
        return {**row, "error": f"{type(error).__name__}: {error}"}
    return {**row, **info, "c2st": [c2st(s, r) for s, r in zip(samples, references)]}


# ---------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------


def _summary(values: List[float]) -> str:
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.3f}"
    se = float(np.std(values, ddof=1)) / math.sqrt(len(values))
    return f"{mean:.3f}±{se:.3f}"


def table(rows: Sequence[dict]) -> str:
    groups: Dict[tuple, Dict[str, List[dict]]] = {}
    for row in rows:
        groups.setdefault((row["task"], row["budget"]), {}).setdefault(row["method"], []).append(row)
    headers = ["task", "simulations", "seeds", "C2ST ours", "C2ST sbi", "ours-sbi", "better", "seconds o/s",
               "epochs o/s"]
    lines = []
    for (task, budget), methods in sorted(groups.items(), key=lambda item: (list(TASKS).index(item[0][0]),
                                                                            item[0][1])):
        scores = {m: [v for r in methods.get(m, []) if "c2st" in r for v in r["c2st"]] for m in METHODS}
        cells = [_summary(scores[m]) if scores[m] else DASH for m in METHODS]
        paired = [o - s for o_row in methods.get("ours", []) for s_row in methods.get("sbi", [])
                  if o_row["seed"] == s_row["seed"] and "c2st" in o_row and "c2st" in s_row
                  for o, s in zip(o_row["c2st"], s_row["c2st"])]
        better = f"{sum(d < 0 for d in paired)}/{len(paired)}" if paired else DASH

        def mean_of(key: str, method: str) -> str:
            values = [r[key] for r in methods.get(method, []) if r.get(key) is not None]
            return f"{sum(values) / len(values):.0f}" if values else DASH

        seeds = len({r["seed"] for rs in methods.values() for r in rs})
        lines.append([task, f"{budget:,}", str(seeds), *cells, _summary(paired) if paired else DASH, better,
                      "/".join(mean_of("seconds", m) for m in METHODS),
                      "/".join(mean_of("epochs", m) for m in METHODS)])
    return _table(headers, lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--budgets", nargs="+", type=int, default=None, help="simulations (default 1000 10000)")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="simulation and training seeds")
    parser.add_argument("--observations", type=int, default=None, help="observations per task (default 5)")
    parser.add_argument("--num-samples", type=int, default=None,
                        help="posterior and reference samples per observation, for C2ST (default 10000, as sbibm)")
    parser.add_argument("--warmup-steps", type=int, default=1000,
                        help="Metropolis warm-up steps of SLCP's reference chains (default 1000)")
    parser.add_argument("--prior-draws", type=int, default=1_000_000,
                        help="prior draws resampled to start SLCP's reference chains (default 1000000)")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "pyro_nflows_sbi_reference"),
                        help="folder for the reference samples")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", default=None, help="JSON-lines file of finished rows; a rerun reuses them")
    parser.add_argument("--report", action="store_true", help="run nothing: the table of the rows in --out")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1,000 simulations, 2 observations, "
                                                              "2,000 samples")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    args.budgets = args.budgets or ([1000] if args.quick else [1000, 10_000])
    args.observations = args.observations or (2 if args.quick else 5)
    args.num_samples = args.num_samples or (2000 if args.quick else 10_000)
    settings = {"observations": args.observations, "num_samples": args.num_samples,
                "warmup_steps": args.warmup_steps, "prior_draws": args.prior_draws, "c2st": C2ST_NAME}
    print(f"pyro_nflows NPE vs sbi NPE ({library_versions({'sbi': 'sbi', 'pyro': 'pyro-ppl'})})")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{args.observations} observations per task, {args.num_samples} samples for C2ST, seeds "
          f"{' '.join(map(str, args.seeds))}  {args.threads} thread(s)  load {load:.2f} on {os.cpu_count()} cores  "
          f"{platform.python_implementation()} {platform.python_version()}\n", flush=True)
    done = FinishedRows(args.out, settings, key=lambda r: (r["task"], r["budget"], r["seed"], r["method"]))
    start = time.perf_counter()
    keys = [(t, b, s, m) for t in args.tasks for b in args.budgets for s in args.seeds for m in args.methods]
    for key in keys:
        if key in done or args.report:
            continue
        print(f"  {key[0]} {key[1]} simulations seed {key[2]} {key[3]} ...", file=sys.stderr, flush=True)
        row = run_row(*key, args)
        done.add(row)
        print(f"    {row.get('error') or ('C2ST ' + ' '.join(f'{v:.3f}' for v in row['c2st']))} "
              f"({row.get('seconds', 0):.0f} s)", file=sys.stderr, flush=True)
    rows = [done.get(key) for key in keys if key in done]
    print(table(rows))
    print("\nC2ST: mean over the observations (± its standard error) of the 5-fold accuracy of a classifier telling "
          "posterior from reference samples; 0.5 is perfect. ours-sbi: paired difference (< 0: ours is better); "
          "better: observations where ours is better; seconds: training plus sampling every observation.")
    errors = [f"{r['task']} {r['budget']} seed {r['seed']} {r['method']}: {r['error']}" for r in rows if "error" in r]
    print(f"({time.perf_counter() - start:.0f} s)")
    for error in errors:
        print(f"  ERROR {error}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
