r"""Reference posterior moments of the eight schools model, by a long NUTS run
from Pyro, written to ``tests/data/eight_schools_nuts.json``.

Run from the repository root::

    python benchmarks/eight_schools_reference.py              # 4 chains x (2000 warm-up + 5000 draws), a few minutes
    python benchmarks/eight_schools_reference.py --quick      # smoke run, printed only, nothing written
    python benchmarks/eight_schools_reference.py --num-samples 10000 --output ref.json

**The model** (Rubin 1981 [1]; Gelman et al. [2], section 5.5), *centered*:

.. math:: \mu \sim N(0, 5), \quad \tau \sim \text{HalfCauchy}(5), \quad
          \theta_j \sim N(\mu, \tau), \quad y_j \sim N(\theta_j, \sigma_j),
          \quad j = 1..8,

with :math:`y = (28, 8, -3, 7, -1, 1, 18, 12)` and
:math:`\sigma = (15, 10, 16, 11, 9, 11, 10, 18)`.

**How.** NUTS on the centered parameterisation diverges in the neck of the
funnel between :math:`\tau` and :math:`\theta` and is biased there, so the
chains run on the *non-centered* one, :math:`\tilde\theta_j \sim N(0, 1)`,
:math:`\theta_j = \mu + \tau \tilde\theta_j`: the same joint distribution of
:math:`(\mu, \tau, \theta)`, hence the same posterior, without divergences.
Both models and the data live in :mod:`pyro_nflows.models`
(``eight_schools``, ``eight_schools_noncentered``, ``eight_schools_data``).
Chains run one after the other (chain :math:`c` seeded ``seed + c``), each
with its own step-size and diagonal mass-matrix adaptation. The file holds
posterior means and standard deviations of :math:`\mu`, :math:`\tau`,
:math:`\log\tau` and :math:`\theta_j`, the Monte Carlo standard error of each
mean (:math:`\mathrm{sd}/\sqrt{\mathrm{ESS}}`, effective sample size across
chains), split :math:`\hat R`, the number of divergences, and the versions,
seed and settings that produced it. It uses no flow of this package: only
Pyro's NUTS and the models of :mod:`pyro_nflows.models`.

References:

[1] Donald B. Rubin. Estimation in Parallel Randomized Experiments. Journal
    of Educational Statistics 6(4), 1981.
[2] Andrew Gelman, John B. Carlin, Hal S. Stern, David B. Dunson, Aki
    Vehtari, Donald B. Rubin. Bayesian Data Analysis, 3rd edition, 2013.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# Use the checkout this file lives in, installed or not.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_ROOT, "pyro_nflows")) and _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import pyro  # noqa: E402
import torch  # noqa: E402
from pyro.infer import MCMC, NUTS  # noqa: E402
from pyro.ops.stats import effective_sample_size, split_gelman_rubin  # noqa: E402

from pyro_nflows.models import (  # noqa: E402
    EIGHT_SCHOOLS_SIGMA,
    EIGHT_SCHOOLS_Y,
    eight_schools_data,
    eight_schools_noncentered,
)

OUTPUT = os.path.join(_ROOT, "tests", "data", "eight_schools_nuts.json")


def run_chains(num_chains: int, warmup: int, samples: int, seed: int) -> tuple[dict[str, torch.Tensor], int]:
    """Draws of mu, tau, theta, shape (chains, samples, ...), and the divergence count."""
    y, sigma = eight_schools_data()
    draws: dict[str, list[torch.Tensor]] = {"mu": [], "tau": [], "theta": []}
    divergences = 0
    for chain in range(num_chains):
        pyro.set_rng_seed(seed + chain)
        kernel = NUTS(eight_schools_noncentered, target_accept_prob=0.9, jit_compile=True, ignore_jit_warnings=True)
        mcmc = MCMC(kernel, num_samples=samples, warmup_steps=warmup, num_chains=1, disable_progbar=True)
        mcmc.run(y, sigma)
        chain_draws = mcmc.get_samples()
        mu, tau = chain_draws["mu"], chain_draws["tau"]
        draws["mu"].append(mu)
        draws["tau"].append(tau)
        draws["theta"].append(mu[:, None] + tau[:, None] * chain_draws["theta_tilde"])
        divergences += int(sum(len(v) for v in mcmc.diagnostics()["divergences"].values()))
    return {name: torch.stack(values) for name, values in draws.items()}, divergences


def summarise(draws: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Mean, sd, MC standard error of the mean, ESS and split R-hat of each quantity."""
    quantities = {"mu": draws["mu"], "tau": draws["tau"], "log_tau": draws["tau"].log(), "theta": draws["theta"]}
    summary: dict[str, dict] = {"mean": {}, "sd": {}, "mcse": {}, "ess": {}, "r_hat": {}}
    for name, values in quantities.items():
        flat = values.reshape(-1, *values.shape[2:])
        ess = effective_sample_size(values, chain_dim=0, sample_dim=1)
        sd = flat.std(0)
        stats = {
            "mean": flat.mean(0),
            "sd": sd,
            "mcse": sd / ess.sqrt(),
            "ess": ess,
            "r_hat": split_gelman_rubin(values, chain_dim=0, sample_dim=1),
        }
        for key, value in stats.items():
            summary[key][name] = [round(v, 5) for v in value.tolist()] if value.dim() else round(value.item(), 5)
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--warmup-steps", type=int, default=2000, help="NUTS warm-up steps per chain")
    parser.add_argument("--num-samples", type=int, default=5000, help="draws kept per chain")
    parser.add_argument("--seed", type=int, default=20240)
    parser.add_argument("--output", default=OUTPUT)
    parser.add_argument("--quick", action="store_true", help="2 chains x (200 + 500), printed only")
    args = parser.parse_args(argv)
    if args.quick:
        args.chains, args.warmup_steps, args.num_samples = 2, 200, 500
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)

    start = time.perf_counter()
    draws, divergences = run_chains(args.chains, args.warmup_steps, args.num_samples, args.seed)
    elapsed = time.perf_counter() - start
    result = {
        "description": (
            "Posterior moments of the centered eight schools model (mu ~ N(0, 5), tau ~ HalfCauchy(5), "
            "theta_j ~ N(mu, tau), y_j ~ N(theta_j, sigma_j)), computed with Pyro NUTS on the non-centered "
            "parameterisation (theta = mu + tau * theta_tilde, theta_tilde ~ N(0, 1)), which has the same "
            "posterior over (mu, tau, theta) and no divergences. mcse = sd / sqrt(ess), ess across chains. "
            "Made by benchmarks/eight_schools_reference.py."
        ),
        "y": list(EIGHT_SCHOOLS_Y),
        "sigma": list(EIGHT_SCHOOLS_SIGMA),
        **summarise(draws),
        "divergences": divergences,
        "num_chains": args.chains,
        "warmup_steps": args.warmup_steps,
        "num_samples_per_chain": args.num_samples,
        "seed": args.seed,
        "sampler": "NUTS(target_accept_prob=0.9, jit_compile=True), chains sequential, chain c seeded seed + c",
        "pyro_version": pyro.__version__,
        "torch_version": torch.__version__,
        "seconds": round(elapsed, 1),
    }
    text = json.dumps(result, indent=1)
    print(text)
    max_r_hat = max(max(v) if isinstance(v, list) else v for v in result["r_hat"].values())
    if max_r_hat > 1.01 or divergences:
        print(f"warning: max split R-hat {max_r_hat:.4f}, {divergences} divergences")
    if not args.quick:
        os.makedirs(os.path.dirname(args.output), exist_ok=True)
        with open(args.output, "w") as handle:
            handle.write(text + "\n")
        print(f"wrote {args.output} in {elapsed:.0f} s")


if __name__ == "__main__":
    main()
