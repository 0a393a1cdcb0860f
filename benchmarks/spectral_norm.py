"""How well each way of keeping a residual flow's weights at spectral norm c holds the bound
while an optimiser moves them, and what an exact SVD costs (benchmarks/README.md#residual-spectral-norm).

One residual block ``residual(2, (H, H), lipschitz=0.9, direction="maf")`` (the direction
``fit`` builds) is trained by maximum likelihood on ``two_moons`` with Adam (lr 3e-3, batches of 256),
once with every way of refreshing the singular vectors: power iteration with 1, 5 or 20 steps per
weight update, warm-started (forced on every matrix by ``exact_size=0``), and the package's
default for these sizes, an exact SVD per update. After every optimiser step and refresh, the
true spectral norm of every normalised weight, ``svdvals(W_hat)[0]``, is computed; the table gives
its largest value over the layers and the steps (the bound is c = 0.9; a block is invertible only
if Lip(g) < 1). The second table times ``torch.linalg.svd`` of a square matrix of side n (median
of 20 after 3 warm-ups, one thread).

    python benchmarks/spectral_norm.py            # ~1 minute on a quiet core
    python benchmarks/spectral_norm.py --steps 100
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pyro_nflows import datasets
from pyro_nflows.nn.lipschitz import InducedSpectralNorm, LipschitzLinear
from pyro_nflows.transforms import residual

LIPSCHITZ = 0.9
WAYS = [("power iteration, 1 step", 1, 0), ("power iteration, 5 steps", 5, 0),
        ("power iteration, 20 steps", 20, 0), ("exact SVD (the default)", 1, None)]
SVD_SIDES = (16, 32, 64, 128, 256, 512)


def _layers(flow) -> list[LipschitzLinear]:
    return [module for module in flow.modules() if isinstance(module, LipschitzLinear)]


def largest_norm(n_power_iterations: int, exact_size: int | None, steps: int, width: int, seed: int) -> float:
    """The largest true spectral norm of a normalised weight seen over ``steps`` of training."""
    torch.manual_seed(seed)
    flow = residual(2, (width, width), lipschitz=LIPSCHITZ, n_power_iterations=n_power_iterations, direction="maf")
    for module in flow.modules():
        if isinstance(module, InducedSpectralNorm) and exact_size is not None:
            module.exact_size = exact_size
    base = torch.distributions.Independent(torch.distributions.Normal(torch.zeros(2), torch.ones(2)), 1)
    data = datasets.two_moons(n=steps * 256, seed=seed)
    optimiser = torch.optim.Adam(flow.parameters(), lr=3e-3)
    largest = 0.0
    for batch in data.split(256):
        loss = -torch.distributions.TransformedDistribution(base, [flow.inv]).log_prob(batch).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        with torch.no_grad():
            for layer in _layers(flow):
                layer.refresh()
                largest = max(largest, float(torch.linalg.svdvals(layer.weight)[0]))
    return largest


def svd_milliseconds(side: int) -> float:
    matrix = torch.randn(side, side)
    times = []
    for index in range(23):
        start = time.perf_counter()
        torch.linalg.svd(matrix, full_matrices=False)
        if index >= 3:
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="optimiser steps per run (default: 300)")
    parser.add_argument("--width", type=int, default=64, help="hidden width H (default: 64)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..S-1 (default: 3)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"largest true spectral norm of a normalised weight (c = {LIPSCHITZ}), {args.steps} steps, H = {args.width}")
    print("| refresh | " + " | ".join(f"seed {seed}" for seed in range(args.seeds)) + " |")
    print("|---|" + "---|" * args.seeds)
    for name, n_power_iterations, exact_size in WAYS:
        norms = [largest_norm(n_power_iterations, exact_size, args.steps, args.width, seed)
                 for seed in range(args.seeds)]
        print(f"| {name} | " + " | ".join(f"{norm:.7f}" for norm in norms) + " |")
    print("\n| n | SVD of an n x n matrix (ms) |\n|---|---|")
    for side in SVD_SIDES:
        print(f"| {side} | {svd_milliseconds(side):.3f} |")


if __name__ == "__main__":
    main()
