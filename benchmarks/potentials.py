r"""Quality of planar, radial and Sylvester flows: fit Rezende & Mohamed's
energy U1 by reverse KL, and the cost of the planar flow's numerical inverse.

Run from the repository root::

    python benchmarks/potentials.py            # the full table (~9 minutes on 2 busy cores)
    python benchmarks/potentials.py --quick    # smoke run, about a minute
    python benchmarks/potentials.py --filter planar --iterations 8000
    python benchmarks/potentials.py --specs "planar:16" "sylvester:16(kind=householder)"

**The target** ([1], table 1 / figure 3): the ring with two lobes,

.. math:: U_1(z) = \tfrac12 \Big(\frac{\|z\| - 2}{0.4}\Big)^2
          - \log\Big(e^{-\frac12 (\frac{z_1 - 2}{0.6})^2} + e^{-\frac12 (\frac{z_1 + 2}{0.6})^2}\Big),
          \qquad p(z) = e^{-U_1(z)} / Z,

with :math:`\log Z = 1.8775` on :math:`\mathbb{R}^2` (numerical quadrature).

**The fit.** :math:`q` is a flow (built from a registry spec with
:func:`pyro_nflows.registry.build_flow`) applied to :math:`N(0, I_2)`. Adam
minimises :math:`E_q[\log q(z) + \beta_t U_1(z)]` on fresh base samples
every step, with the annealing of [1], :math:`\beta_t` rising linearly from
0.01 to 1 over the first ``--warmup`` fraction of the steps (reverse KL is
mode-seeking; starting at a flat target keeps both lobes), and a learning
rate that warms up for 5% of the steps then decays along a cosine to 1/1000
of ``--lr``. Every spec starts from the same seed.

**The score.** After training, :math:`\mathrm{KL}(q\|p) = E_q[\log q(z) + U_1(z)] + \log Z`
(exact log-density of the flow, no bound), estimated on ``--eval-samples``
samples (100k), printed with its standard error. A spec whose family is not
registered (yet) is skipped with a note.

**The inverse's cost.** For the trained ``planar:32`` flow (and ``radial:32``
for contrast, closed form): time per point of the uncached inverse through
the whole stack against the forward pass, at a batch of 10,000 and of 1
(median of repeats, single-threaded); the Newton iterations each planar layer
took (:attr:`~pyro_nflows.transforms.planar_flow.ConditionedPlanar.last_inverse_iterations`,
for a batch, which stops when its slowest point has converged; and per point,
inverting points one at a time); and the round-trip error
:math:`\max\|f(f^{-1}(y)) - y\|` on the flow's own samples and on points
it did not produce (a grid over the square of side 8, and points 100 times
further out).

The table is a report, not a test: missed targets print FAIL and do not
change the exit status.

References:

[1] Danilo Jimenez Rezende, Shakir Mohamed. Variational Inference with
    Normalizing Flows. ICML 2015. arXiv:1505.05770
[2] Rianne van den Berg, Leonard Hasenclever, Jakub M. Tomczak, Max Welling.
    Sylvester Normalizing Flows for Variational Inference. UAI 2018.
    arXiv:1803.05649
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field

# Benchmark the checkout this file lives in, installed or not.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_ROOT, "pyro_nflows")) and _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402

from pyro_nflows.registry import FLOWS, build_flow, parse_spec  # noqa: E402

LOG_Z = 1.8775  # log of the integral of exp(-U1) over R^2
SPECS = [
    "planar:2",
    "planar:8",
    "planar:32",
    "radial:32",
    "sylvester:8(kind=orthogonal)",
    "sylvester:8(kind=householder)",
    "sylvester:8(kind=triangular)",
    "sylvester:32(kind=triangular)",  # as deep as planar:32
]
PLANAR_TARGET = ("planar:32", 0.05)
SYLVESTER_TARGET = 0.02


def potential_u1(z: torch.Tensor) -> torch.Tensor:
    """Rezende & Mohamed's U1: a ring of radius 2 with two lobes at z1 = +-2."""
    z1 = z[..., 0]
    ring = 0.5 * ((torch.linalg.vector_norm(z, dim=-1) - 2) / 0.4) ** 2
    lobes = torch.logaddexp(-0.5 * ((z1 - 2) / 0.6) ** 2, -0.5 * ((z1 + 2) / 0.6) ** 2)
    return ring - lobes


def sample_with_log_q(flows, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` samples of the flow on N(0, I_2) and their exact log-density."""
    z = torch.randn(count, 2)
    log_q = -0.5 * z.square().sum(-1) - math.log(2 * math.pi)
    for flow in flows:
        y = flow(z)
        log_q = log_q - flow.log_abs_det_jacobian(z, y)
        z = y
    return z, log_q


def learning_rate_factor(step: int, total: int) -> float:
    """5% linear warm-up, then a cosine from 1 down to 1e-3."""
    warm = max(1, int(0.05 * total))
    if step < warm:
        return 0.04 + 0.96 * step / warm
    progress = (step - warm) / max(1, total - warm)
    return 1e-3 + (1 - 1e-3) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class Fit:
    spec: str
    kl: float = float("nan")
    stderr: float = float("nan")
    seconds: float = 0.0
    parameters: int = 0
    note: str = ""
    flows: list = field(default_factory=list)


def unregistered(spec: str) -> str | None:
    """Why ``spec`` cannot be built here (a family not registered yet), or None."""
    try:
        parse_spec(spec)
    except ValueError as error:
        if "unknown flow" in str(error):
            return f"not registered yet ({str(error).split(';')[0]})"
        raise
    return None


def fit(spec: str, args) -> Fit:
    result = Fit(spec)
    reason = unregistered(spec)
    if reason is not None:
        result.note = "skipped: " + reason
        print(f"[{spec}] {result.note}", flush=True)
        return result
    torch.manual_seed(args.seed)
    flows = build_flow(spec, 2)
    parameters = [p for flow in flows for p in flow.parameters()]
    result.parameters = sum(p.numel() for p in parameters)
    optimizer = torch.optim.Adam(parameters, lr=args.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(step, args.iterations))
    warmup_steps = max(1, int(args.warmup * args.iterations))
    report_every = max(1, args.iterations // 10)
    start = time.perf_counter()
    print(f"[{spec}] {result.parameters} parameters, {args.iterations} steps of {args.batch}", flush=True)
    for step in range(args.iterations):
        beta = min(1.0, 0.01 + step / warmup_steps)
        z, log_q = sample_with_log_q(flows, args.batch)
        loss = (log_q + beta * potential_u1(z)).mean()
        if not torch.isfinite(loss):
            result.note = f"diverged at step {step} (non-finite loss)"
            print(f"[{spec}] {result.note}", flush=True)
            result.seconds = time.perf_counter() - start
            return result
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % report_every == 0 or step == args.iterations - 1:
            # With beta = 1 the loss + log Z is a one-batch estimate of the KL.
            print(
                f"[{spec}] step {step:6d}  beta {beta:4.2f}  lr {schedule.get_last_lr()[0]:.1e}  "
                f"loss+logZ {loss.item() + LOG_Z:8.4f}  {time.perf_counter() - start:6.1f}s",
                flush=True,
            )
    result.seconds = time.perf_counter() - start
    result.kl, result.stderr = estimate_kl(flows, args.eval_samples)
    result.flows = flows
    print(f"[{spec}] KL(q||p) = {result.kl:.4f} +- {result.stderr:.4f}  ({result.seconds:.0f}s)", flush=True)
    return result


@torch.no_grad()
def estimate_kl(flows, count: int, chunk: int = 20_000) -> tuple[float, float]:
    """KL(q||p) and its standard error from ``count`` samples of q."""
    values = []
    for begin in range(0, count, chunk):
        z, log_q = sample_with_log_q(flows, min(chunk, count - begin))
        values.append(log_q + potential_u1(z))
    values = torch.cat(values).double()
    return values.mean().item() + LOG_Z, (values.std() / math.sqrt(values.numel())).item()


# ---------------------------------------------------------------------------
# The cost of the inverse
# ---------------------------------------------------------------------------


def _median_seconds(function, repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        function()
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def _forward(flows, x):
    for flow in flows:
        x = flow._call(x)
    return x


def _inverse(flows, y, iterations=None):
    for flow in reversed(flows):
        y = flow._inverse(y)
        if iterations is not None:
            iterations.append(getattr(flow, "last_inverse_iterations", None))
    return y


@torch.no_grad()
def inverse_cost(fit_result: Fit, args) -> list[str]:
    """Lines of the inverse-cost report for a trained flow."""
    flows = fit_result.flows
    lines = []
    torch.manual_seed(args.seed + 1)
    for dtype in (torch.float32, torch.float64):
        typed = [flow.to(dtype) for flow in flows]
        samples = _forward(typed, torch.randn(10_000, 2, dtype=dtype))
        name = "float32" if dtype == torch.float32 else "float64"
        for batch in (10_000, 1):
            y = samples[:batch]
            x = torch.randn(batch, 2, dtype=dtype)
            forward = _median_seconds(lambda: _forward(typed, x), args.repeats if batch > 1 else 5 * args.repeats)
            inverse = _median_seconds(lambda: _inverse(typed, y), args.repeats if batch > 1 else 5 * args.repeats)
            lines.append(
                f"  {name} batch {batch:>6}: forward {1e6 * forward / batch:9.2f} us/point, "
                f"inverse {1e6 * inverse / batch:9.2f} us/point, inverse/forward {inverse / forward:5.1f}x"
            )
        if fit_result.spec.startswith("planar"):
            per_layer = []
            _inverse(typed, samples, per_layer)
            single = []
            for point in samples[:200]:
                counts = []
                _inverse(typed, point.unsqueeze(0), counts)
                single.extend(counts)
            lines.append(
                f"  {name} Newton iterations per layer: batch of 10,000 mean {statistics.mean(per_layer):.1f}, "
                f"max {max(per_layer)}; one point at a time median {statistics.median(single):.0f}, "
                f"mean {statistics.mean(single):.1f}, max {max(single)} (the count includes the "
                f"evaluation at the inflection point)"
            )
        # Round trips, on the flow's own samples and on points it did not produce.
        grid = torch.stack(torch.meshgrid(torch.linspace(-4, 4, 101), torch.linspace(-4, 4, 101), indexing="ij"), -1)
        grid = grid.reshape(-1, 2).to(dtype)
        errors = []
        for label, points in (("own samples", samples), ("grid [-4,4]^2", grid), ("grid x100", 100 * grid)):
            back = _forward(typed, _inverse(typed, points))
            scale = points.abs().max().item()
            errors.append(f"{label} {(back - points).abs().max().item() / scale:.1e}")
        lines.append(f"  {name} round trip max|f(f^-1(y)) - y| / max|y|: " + ", ".join(errors))
    for flow in flows:
        flow.float()
    return lines


# ---------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: few steps, small batches, fewer samples")
    parser.add_argument("--specs", nargs="+", default=None, help="flow specs to fit (default: the table's)")
    parser.add_argument("--filter", default=None, help="only specs containing this text")
    parser.add_argument("--iterations", type=int, default=None, help="Adam steps per spec (default 4000; quick 400)")
    parser.add_argument("--batch", type=int, default=None, help="samples per step (default 512; quick 256)")
    parser.add_argument("--lr", type=float, default=1e-2, help="peak learning rate (default 1e-2)")
    parser.add_argument("--warmup", type=float, default=0.2, help="fraction of steps over which beta rises to 1")
    parser.add_argument(
        "--eval-samples", type=int, default=None, help="samples for the KL (default 100000; quick 20000)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timing repeats (default 7; quick 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.iterations = args.iterations or (400 if quick else 4000)
    args.batch = args.batch or (256 if quick else 512)
    args.eval_samples = args.eval_samples or (20_000 if quick else 100_000)
    args.repeats = args.repeats or (3 if quick else 7)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    specs = args.specs or SPECS
    if args.filter:
        specs = [spec for spec in specs if args.filter in spec]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"U1 by reverse KL: {args.iterations} steps x {args.batch} samples, lr {args.lr}, "
        f"beta warm-up {args.warmup:.0%}, KL on {args.eval_samples} samples; torch {torch.__version__}, "
        f"{args.threads} thread(s), load average {load:.1f}",
        flush=True,
    )
    begin = time.perf_counter()
    results = [fit(spec, args) for spec in specs]

    cost_lines = []
    for result in results:
        if result.spec in ("planar:32", "radial:32") and result.flows:
            cost_lines.append(f"{result.spec} (trained), uncached inverse vs forward through all layers:")
            cost_lines.extend(inverse_cost(result, args))

    print()
    width = max([len("spec")] + [len(result.spec) for result in results])
    print(f"{'spec':<{width}} {'params':>6} {'KL(q||p) nats':>14} {'+-':>7} {'train s':>8}  note")
    for result in results:
        kl = f"{result.kl:14.4f}" if math.isfinite(result.kl) else f"{'-':>14}"
        stderr = f"{result.stderr:7.4f}" if math.isfinite(result.stderr) else f"{'':>7}"
        print(f"{result.spec:<{width}} {result.parameters:>6} {kl} {stderr} {result.seconds:8.0f}  {result.note}")
    print()
    by_spec = {result.spec: result for result in results}
    spec, target = PLANAR_TARGET
    if spec in by_spec and math.isfinite(by_spec[spec].kl):
        verdict = "PASS" if by_spec[spec].kl <= target else "FAIL"
        print(f"target {spec} KL <= {target}: {by_spec[spec].kl:.4f}  {verdict}")
    else:
        print(f"target {spec} KL <= {target}: not run")
    sylvester = [r for r in results if r.spec.startswith("sylvester") and math.isfinite(r.kl)]
    if sylvester:
        best = min(sylvester, key=lambda r: r.kl)
        verdict = "PASS" if best.kl <= SYLVESTER_TARGET else "FAIL"
        print(f"target best Sylvester KL <= {SYLVESTER_TARGET}: {best.kl:.4f} ({best.spec})  {verdict}")
    else:
        why = "sylvester not registered" if "sylvester" not in FLOWS else "no Sylvester spec run"
        print(f"target best Sylvester KL <= {SYLVESTER_TARGET}: skipped ({why})")
    if cost_lines:
        print()
        print("\n".join(cost_lines))
    print(f"\ntotal {time.perf_counter() - begin:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
