"""Speed of pyro_nflows' flows against their peers (pyro, zuko, nflows).

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
same input and the same parameters, so a wrong answer is never timed. A
mismatch (or any error in a case) is reported, the other cases still run, and
the exit status is 1; missed speed targets do not change it (the table is a
report, not a test).

Adding a case: write a ``setup(batch)`` function that builds our module and
the peers' equivalents with the same parameters, checks they agree (``same``),
and returns ``Contestants(ours=step, peers={"pyro": step, ...})``, where a step
is a no-argument callable doing one timed operation (``fwd_bwd`` builds the
usual "forward, log-det, backward, zero grads" step). Then append a
``Case(name, setup, target=...)`` to ``CASES``. A peer left out of ``peers``
prints "—" (no equivalent); a peer whose import fails prints "—" too, with a
note (``optional_import``).
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
from typing import Callable, Dict, List, Optional, Sequence, Tuple

# Benchmark the checkout this file lives in, installed or not.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_ROOT, "pyro_nflows")) and _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402

PEERS = ("pyro", "zuko", "nflows")
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


@dataclasses.dataclass
class Case:
    name: str
    setup: Callable[[], Contestants]
    # (peer, minimum peer/ours ratio), or None.
    target: Optional[Tuple[str, float]] = None


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
        raise Mismatch(f"{what}: outputs differ (shapes {tuple(ours.shape)} vs {tuple(theirs.shape)}, max |diff| {error:.3g})")


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
        lower, upper = (m.detach() for m in ours._factors())
        reference = ours._inverse(x) if inverse else ours._call(x)
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


B = 1024
CASES: List[Case] = [
    Case("householder fwd+bwd D=64 B=1024 K=10", householder_setup(64, 10, B), target=("pyro", 3.0)),
    Case("householder fwd+bwd D=64 B=1024 K=64", householder_setup(64, 64, B), target=("pyro", 8.0)),
    Case("householder inv+bwd D=64 B=1024 K=64", householder_setup(64, 64, B, inverse=True)),
    Case("qr_linear fwd+bwd D=64 B=1024 K=64", qr_linear_setup(64, B)),
    Case("qr_linear inv+bwd D=64 B=1024 K=64", qr_linear_setup(64, B, inverse=True)),
    Case("lu_linear fwd+bwd D=64 B=1024", lu_linear_setup(64, B)),
    Case("lu_linear inv+bwd D=64 B=1024", lu_linear_setup(64, B, inverse=True)),
]


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


MIN_ROUNDS = 5


def measure(
    steps: Dict[str, Step],
    repeats: int,
    sample_s: float,
    warmup: int,
    rng: random.Random,
    budget_s: float = float("inf"),
) -> Timing:
    """Time every step in ``repeats`` interleaved rounds; stop early (after at
    least ``MIN_ROUNDS``) once the case has used ``budget_s`` seconds."""
    start = time.perf_counter()
    numbers = {name: calibrate(step, sample_s, warmup) for name, step in steps.items()}
    samples: Dict[str, List[float]] = {name: [] for name in steps}
    order = list(steps)
    for done in range(repeats):
        if done >= MIN_ROUNDS and time.perf_counter() - start > budget_s:
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


def _versions() -> str:
    from importlib import metadata

    parts = [f"torch {torch.__version__}"]
    for name, distribution in (("pyro", "pyro-ppl"), ("zuko", "zuko"), ("nflows", "nflows")):
        try:
            parts.append(f"{name} {metadata.version(distribution)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{name} not installed")
    return ", ".join(parts)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--filter", default="", help="run only cases whose name contains this substring")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per case (default 31, 5 with --quick)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--sample-ms", type=float, default=None, help="length of one timed inner loop (default 20, 5 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls before calibration (default 5, 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="smoke run: few, short rounds")
    parser.add_argument("--budget", type=float, default=None, help="seconds per case after which rounds stop early, at least %d rounds (default 12, 3 with --quick)" % MIN_ROUNDS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    args = parser.parse_args(argv)

    if args.list:
        for case in CASES:
            print(case.name)
        return 0

    repeats = args.repeats or (5 if args.quick else 31)
    sample_s = (args.sample_ms or (5.0 if args.quick else 20.0)) / 1e3
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    budget_s = args.budget or (3.0 if args.quick else 12.0)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    warnings.filterwarnings("ignore", category=UserWarning)  # e.g. pyro's "K > D" over-parametrisation notice

    cases = [c for c in CASES if args.filter.lower() in c.name.lower()]
    if not cases:
        print(f"no case matches --filter {args.filter!r}; see --list")
        return 0

    import pyro_nflows

    origin = getattr(pyro_nflows, "__file__", None) or list(getattr(pyro_nflows, "__path__", ["?"]))[0]
    print(f"pyro_nflows speed ({_versions()})")
    print(
        f"threads={args.threads}  rounds={repeats}  sample~{sample_s * 1e3:.0f} ms  warmup={warmup}  "
        f"{platform.python_implementation()} {platform.python_version()}  pyro_nflows from {origin}"
    )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    cores = os.cpu_count() or 1
    print(f"load average (1 min) at start: {load:.2f} on {cores} cores")
    if load > 0.5 * cores:
        print("WARNING: the machine is busy; absolute times are inflated and ratios less reliable (rerun, or try --threads 1)")
    print("times: median ms per call; ratios: peer/ours, median of paired rounds (> 1: we are faster)\n", flush=True)

    progress = sys.stderr.isatty()
    start = time.perf_counter()
    rows, notes, failures, errors = [], [], [], []
    results = []
    for case in cases:
        if progress:
            print(f"  running {case.name} ...", end="\r", flush=True, file=sys.stderr)
        try:
            contestants = case.setup()
        except Exception as error:  # a mismatch, or a broken case: report it, run the others
            errors.append(f"{case.name}: {type(error).__name__}: {error}")
            results.append((case, None, {}))
            continue
        steps: Dict[str, Step] = {"ours": contestants.ours}
        reasons: Dict[str, str] = {}
        for peer in PEERS:
            value = contestants.peers.get(peer)
            if callable(value):
                steps[peer] = value
            elif isinstance(value, str):
                reasons[peer] = value
        timing = measure(steps, repeats, sample_s, warmup, rng, budget_s)
        results.append((case, timing, reasons))
        for peer, reason in reasons.items():
            notes.append(f"{case.name}: {peer} {DASH} {reason}")
        if progress:
            print(" " * (len(case.name) + 16), end="\r", flush=True, file=sys.stderr)

    headers = ["case", "ours ms"] + [f"{p} ms" for p in PEERS] + [f"{p}/ours" for p in PEERS] + ["target", "result"]
    passed = 0
    targeted = 0
    for case, timing, _ in results:
        if timing is None:
            rows.append([case.name, "not run"] + [DASH] * (2 * len(PEERS)) + [DASH, "ERROR"])
            continue
        target, result = DASH, ""
        if case.target is not None:
            peer, minimum = case.target
            target = f"{peer} >= {minimum:g}x"
            ratio = timing.ratios.get(peer)
            targeted += 1
            if ratio is None:
                result = "n/a"
            elif ratio >= minimum:
                result, passed = "PASS", passed + 1
            else:
                result = "FAIL"
                failures.append(
                    f"{case.name}: {peer}/ours = {ratio:.2f}x, target {minimum:g}x "
                    f"(missed by {100 * (1 - ratio / minimum):.0f}%)"
                )
        rows.append(
            [case.name, _ms(timing.seconds["ours"])]
            + [_ms(timing.seconds.get(p)) for p in PEERS]
            + [_ratio(timing.ratios.get(p)) for p in PEERS]
            + [target, result]
        )
    print(_table(headers, rows))

    noisy = [
        f"{case.name}: {name} {100 * s:.0f}%"
        for case, timing, _ in results
        if timing is not None
        for name, s in timing.spread.items()
        if s == s and s > 0.25
    ]
    print()
    if notes:
        print("Not run:")
        for note in notes:
            print(f"  {note}")
    short = [f"{case.name}: {timing.rounds} of {repeats} rounds" for case, timing, _ in results if timing is not None and timing.rounds < repeats]
    if short:
        print("Stopped early by the time budget (--budget):")
        for line in short:
            print(f"  {line}")
    if noisy:
        print("Noisy (interquartile range / median > 25%; rerun with more --repeats):")
        for line in noisy:
            print(f"  {line}")
    if targeted:
        print(f"Targets: {passed}/{targeted} PASS" + (", failures:" if failures else ""))
    else:
        print("Targets: none among the cases run")
    for failure in failures:
        print(f"  FAIL {failure}")
    for error in errors:
        print(f"  ERROR {error}")
    print(f"({len(results)} cases in {time.perf_counter() - start:.0f} s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
