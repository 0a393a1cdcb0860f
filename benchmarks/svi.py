r"""Quality of the flow autoguides: Neal's funnel and eight schools, against
Pyro's Gaussian guides, Pyro's ``AutoIAFNormal`` and a long NUTS run.

Run from the repository root::

    python benchmarks/svi.py                       # every guide, one table (~15 minutes on 2 busy cores)
    python benchmarks/svi.py --quick               # smoke run: 3 guides, few steps (~1 minute)
    python benchmarks/svi.py --guides AutoIAF "AutoFlow(iaf:3 natural)" --steps 5000
    python benchmarks/svi.py --list                # the guide names

**Funnel** (Neal 2003 [1]), 10 dimensions:
:math:`y \sim N(0, 3)`, :math:`x_{1..9} \sim N(0, e^{y/2})`. Its
log-normaliser is exactly 0, so :math:`\mathrm{ELBO} = -\mathrm{KL}(q \| p)
\le 0` (0 is a perfect posterior). After training, the ELBO is estimated on
``--eval-samples`` (20,000) draws from the guide, printed with its standard
error, and so is the guide's standard deviation of :math:`y` (truth 3). The
target for our best guide: ELBO >= -0.10 and sd(y) within 10% of 3.

**Eight schools**, centered (``benchmarks/eight_schools_reference.py``):
posterior means of :math:`\mu`, :math:`\tau` and :math:`\theta_{1..8}` from
the trained guide's draws, each as ``|mean - reference mean| / reference
sd`` (for the thetas, the largest of the eight), and the ratio of the
guide's sd of :math:`\log\tau` to the reference's (reverse-KL guides tend to
shrink it), against the NUTS moments stored in
``tests/data/eight_schools_nuts.json``.

The two models are ``funnel`` and ``eight_schools`` of :mod:`pyro_nflows.models`.

**Training**, identical for every guide: ``--steps`` (funnel) and
``--schools-steps`` SVI steps of ``Trace_ELBO`` with ``--particles``
vectorised particles, Pyro's ``ClippedAdam`` at ``--lr`` decaying
geometrically to ``lr / 100``, from seed ``--seed``; every guide that takes
an ``init_scale`` gets ``--init-scale`` (Pyro's ``AutoIAFNormal`` has a fixed
standard-normal base, i.e. scale 1). A narrow start is what holds flows back
on the funnel: the conditional scale of :math:`x` must be learnt over the
whole range of :math:`y`, which a guide that starts at scale 0.1 rarely
visits (see ``--init-scale 0.1``).

The table is a report, not a test: a missed target prints FAIL and does not
change the exit status.

References:

[1] Radford M. Neal. Slice sampling. Annals of Statistics 31(3), 2003.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

# Benchmark the checkout this file lives in, installed or not.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_ROOT, "pyro_nflows")) and _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import pyro  # noqa: E402
import torch  # noqa: E402
from pyro.infer import SVI, Trace_ELBO  # noqa: E402
from pyro.infer.autoguide import AutoIAFNormal, AutoMultivariateNormal, AutoNormal  # noqa: E402
from pyro.infer.importance import vectorized_importance_weights  # noqa: E402

from benchmarks.common import library_versions  # noqa: E402
from benchmarks.eight_schools_reference import OUTPUT as REFERENCE  # noqa: E402
from pyro_nflows.autoguides import (  # noqa: E402
    AutoConvexTriangular,
    AutoFlow,
    AutoHouseholder,
    AutoIAF,
    AutoPlanar,
    AutoSylvester,
)
from pyro_nflows.models import eight_schools, funnel  # noqa: E402

TARGET_ELBO = -0.10
TARGET_SD_Y = 0.10  # relative error of sd(y) against 3


@dataclass(frozen=True)
class Guide:
    """A guide to compare: ``make(model, init_scale)`` builds it; ``ours`` marks this package's."""

    name: str
    make: Callable
    ours: bool


GUIDES = [
    Guide("AutoNormal", lambda m, s: AutoNormal(m, init_scale=s), False),
    Guide("AutoMultivariateNormal", lambda m, s: AutoMultivariateNormal(m, init_scale=s), False),
    Guide(
        "AutoIAFNormal (pyro, 2 x [64, 64])",
        lambda m, s: AutoIAFNormal(m, hidden_dim=[64, 64], num_transforms=2),
        False,
    ),
    Guide("AutoHouseholder", lambda m, s: AutoHouseholder(m, init_scale=s), True),
    Guide("AutoConvexTriangular", lambda m, s: AutoConvexTriangular(m, init_scale=s), True),
    Guide("AutoPlanar (8)", lambda m, s: AutoPlanar(m, num_transforms=8, init_scale=s), True),
    Guide("AutoSylvester (orthogonal, 4)", lambda m, s: AutoSylvester(m, kind="orthogonal", init_scale=s), True),
    Guide("AutoIAF", lambda m, s: AutoIAF(m, num_transforms=2, init_scale=s), True),
    Guide("AutoFlow(iaf:3 natural)", lambda m, s: AutoFlow(m, "iaf:3(ordering=natural)", init_scale=s), True),
    Guide(
        "AutoFlow(spline_autoregressive:2 iaf natural)",
        lambda m, s: AutoFlow(m, "spline_autoregressive:2(direction=iaf, ordering=natural)", init_scale=s),
        True,
    ),
    Guide("AutoFlow(spline_coupling:4)", lambda m, s: AutoFlow(m, "spline_coupling:4", init_scale=s), True),
    Guide(
        "AutoFlow(spline_coupling:4 spline_from=x)",
        lambda m, s: AutoFlow(m, "spline_coupling:4(spline_from=x)", init_scale=s),
        True,
    ),
]
QUICK = ["AutoNormal", "AutoIAFNormal (pyro, 2 x [64, 64])", "AutoIAF"]


def train(model, guide, steps: int, args, lr: float, particles: int) -> None:
    decay = 0.01 ** (1.0 / steps)  # lr / 100 at the end
    optimizer = pyro.optim.ClippedAdam({"lr": lr, "lrd": decay})
    svi = SVI(model, guide, optimizer, Trace_ELBO(num_particles=particles, vectorize_particles=True))
    for _ in range(steps):
        svi.step(*args)


@torch.no_grad()
def weighted_draws(model, guide, num_samples: int, args, max_plate_nesting: int):
    """Log importance weights log p - log q of ``num_samples`` guide draws, and the draws."""
    log_weights, _, guide_trace = vectorized_importance_weights(
        model, guide, *args, num_samples=num_samples, max_plate_nesting=max_plate_nesting
    )
    values = {
        name: site["value"].reshape(num_samples, -1)
        for name, site in guide_trace.nodes.items()
        if site["type"] == "sample" and not site["infer"].get("is_auxiliary")
    }
    return log_weights, values


def run_funnel(entry: Guide, options) -> dict:
    pyro.clear_param_store()
    pyro.set_rng_seed(options.seed)
    guide = entry.make(funnel, options.init_scale)
    train(funnel, guide, options.steps, (), options.lr, options.particles)
    log_weights, values = weighted_draws(funnel, guide, options.eval_samples, (), 0)
    n = log_weights.numel()
    return {
        "elbo": log_weights.mean().item(),
        "elbo_se": log_weights.std().item() / math.sqrt(n),
        "sd_y": values["y"].std().item(),
    }


def run_schools(entry: Guide, options, reference: dict) -> dict:
    pyro.clear_param_store()
    pyro.set_rng_seed(options.seed)
    y = torch.tensor(reference["y"], dtype=torch.float64)
    sigma = torch.tensor(reference["sigma"], dtype=torch.float64)
    guide = entry.make(eight_schools, options.init_scale)
    train(eight_schools, guide, options.schools_steps, (y, sigma), options.lr, options.particles)
    _, values = weighted_draws(eight_schools, guide, options.eval_samples, (y, sigma), 1)
    values["log_tau"] = values["tau"].log()

    def error(name: str) -> float:
        mean = values[name].mean(0)
        ref_mean = torch.tensor(reference["mean"][name], dtype=mean.dtype).reshape(-1)
        ref_sd = torch.tensor(reference["sd"][name], dtype=mean.dtype).reshape(-1)
        return ((mean - ref_mean).abs() / ref_sd).max().item()

    return {
        "mu": error("mu"),
        "tau": error("tau"),
        "theta": error("theta"),
        "sd_log_tau": values["log_tau"].std().item() / reference["sd"]["log_tau"],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--guides", nargs="+", help="guide names (see --list); default all")
    parser.add_argument("--steps", type=int, default=3000, help="SVI steps on the funnel")
    parser.add_argument("--schools-steps", type=int, default=1500, help="SVI steps on eight schools (0: skip it)")
    parser.add_argument("--particles", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--init-scale", type=float, default=1.0)
    parser.add_argument("--eval-samples", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--quick", action="store_true", help="3 guides, 300 + 200 steps, 16 particles")
    parser.add_argument("--list", action="store_true", help="print the guide names and exit")
    options = parser.parse_args(argv)
    if options.list:
        print("\n".join(entry.name for entry in GUIDES))
        return 0
    if options.quick:
        options.steps, options.schools_steps, options.particles, options.eval_samples = 300, 200, 16, 5000
        options.guides = options.guides or QUICK
    if options.steps < 1 or options.schools_steps < 0:
        parser.error(f"--steps must be at least 1 and --schools-steps at least 0, got {options.steps} and "
                     f"{options.schools_steps}")
    known = {entry.name: entry for entry in GUIDES}
    unknown = [name for name in options.guides or [] if name not in known]
    if unknown:
        parser.error(f"unknown guides {unknown}; see --list")
    entries = [known[name] for name in options.guides] if options.guides else GUIDES
    torch.set_num_threads(options.threads)
    with open(REFERENCE) as handle:
        reference = json.load(handle)

    print(f"# {library_versions({'pyro': 'pyro-ppl'})}; {options.threads} thread(s); load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"# funnel: {options.steps} steps; eight schools: {options.schools_steps} steps; "
          f"{options.particles} particles; ClippedAdam lr {options.lr} -> {options.lr / 100:g}; "
          f"init_scale {options.init_scale}; seed {options.seed}; {options.eval_samples} evaluation draws")
    print(f"# eight schools reference: NUTS, {reference['num_chains']} x {reference['num_samples_per_chain']} "
          f"draws (pyro {reference['pyro_version']}); errors are |mean - ref| / ref sd")
    header = (f"{'guide':<48} {'funnel ELBO':>17} {'sd(y)':>6} | {'8s mu':>6} {'8s tau':>6} "
              f"{'8s theta':>8} {'sd(log tau)/ref':>15} | {'seconds':>7}")
    print(header)
    print("-" * len(header))
    rows = []
    for entry in entries:
        start = time.perf_counter()
        funnel_result = run_funnel(entry, options)
        if options.schools_steps:
            schools = run_schools(entry, options, reference)
            schools_cells = (f"{schools['mu']:>6.2f} {schools['tau']:>6.2f} {schools['theta']:>8.2f} "
                             f"{schools['sd_log_tau']:>15.2f}")
        else:
            schools_cells = f"{'—':>6} {'—':>6} {'—':>8} {'—':>15}"
        seconds = time.perf_counter() - start
        rows.append((entry, funnel_result))
        elbo = f"{funnel_result['elbo']:.3f} ± {funnel_result['elbo_se']:.3f}"
        print(f"{entry.name:<48} {elbo:>17} {funnel_result['sd_y']:>6.2f} | {schools_cells} | {seconds:>7.0f}",
              flush=True)

    ours = [(entry, result) for entry, result in rows if entry.ours]
    if ours:
        best, result = max(ours, key=lambda row: row[1]["elbo"])
        sd_error = abs(result["sd_y"] - 3.0) / 3.0
        verdict = "PASS" if result["elbo"] >= TARGET_ELBO and sd_error <= TARGET_SD_Y else "FAIL"
        print(
            f"\nbest of ours: {best.name}: funnel ELBO {result['elbo']:.3f} (target >= {TARGET_ELBO}), "
            f"sd(y) {result['sd_y']:.2f} ({100 * sd_error:.0f}% off 3; target <= {100 * TARGET_SD_Y:.0f}%): {verdict}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
