"""What ``torch.compile`` buys on CPU: our flows compiled with inductor against the same flows
run eagerly, in one process.

Run from the repository root::

    python benchmarks/speed_compile.py                 # every case (several minutes: each compiles)
    python benchmarks/speed_compile.py --filter maf    # the cases whose name contains "maf"
    python benchmarks/speed_compile.py --quick         # smoke run: few, short rounds

Each case builds one flow in float32 and times one step both ways, eager and with its
function compiled by ``torch.compile`` (inductor, default mode), medians of interleaved rounds after warm-up
(``benchmarks/speed.py``'s :func:`~benchmarks.speed.measure`). The compiled step's output is
checked against the eager one's before timing. Columns:

- ``eager/compiled``: what compilation buys (> 1: the compiled step is faster);
- ``graphs``: how many graphs dynamo made of the compiled function at its first call (the step without its
  ``backward()`` call, which runs the graphs' compiled backward; 1: no graph break; the numerical inverses
  run eagerly between graphs, see :mod:`pyro_nflows.transforms.cache` and ``roots.py``);
- ``compiled``: the graphs inductor compiled in the whole run, recompilations included (dynamo
  compiles again when a guard fails, e.g. once gradients exist);
- ``compile s``: the first call's time, which includes tracing and code generation, from cold:
  inductor's on-disk caches go to a new empty folder for each run (``TORCHINDUCTOR_CACHE_DIR``),
  so that a run does not reuse the kernels of the one before.

The cases: ``fit``'s three density models (``maf``, ``nsf``, ``realnvp``, five layers with the
density defaults) scoring data with a backward pass (a training step without the optimiser), the
MAF's sequential sampling (no gradient), and a guide's step through an IAF and a Householder flow
(``y = T(x)`` with its log-determinant, then backward). The table, with the date and machine, is
in benchmarks/README.md#compile-speed.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Callable, List, Tuple

# Benchmark the checkout this file lives in, installed or not.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_ROOT, "pyro_nflows")) and _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402
import torch._dynamo as dynamo  # noqa: E402

from benchmarks.common import library_versions  # noqa: E402
from benchmarks.speed import DASH, _table, measure  # noqa: E402
from pyro_nflows.density import DENSITY_DEFAULTS, PRESETS  # noqa: E402
from pyro_nflows.registry import build_flow  # noqa: E402

BATCH = 1024
LAYERS = 5


@dataclass
class Case:
    name: str
    # Builds what is compiled, a function of no arguments returning a tensor (the two ways'
    # results are compared), and the parameters to backpropagate to (none: no backward pass).
    setup: Callable[[], Tuple[Callable[[], torch.Tensor], List[torch.Tensor]]]


def _timed(function: Callable[[], torch.Tensor], parameters: List[torch.Tensor]) -> Callable[[], torch.Tensor]:
    """The step timed: ``function()``, then, with parameters, the backward pass of its result."""
    if not parameters:
        return function

    def step():
        for p in parameters:
            p.grad = None
        loss = function()
        loss.backward()
        return loss.detach()

    return step


def _density(preset: str, dim: int, hidden: Tuple[int, ...]) -> Callable[[], Callable[[], torch.Tensor]]:
    """``-log_prob`` of a batch of data and its backward, through ``fit``'s stack ``preset``."""

    def setup():
        flows = build_flow(PRESETS[preset], dim, repeat=LAYERS, defaults={**DENSITY_DEFAULTS, "hidden_dims": hidden})
        x = torch.randn(BATCH, dim)

        def loss():
            z, log_det = x, torch.zeros(BATCH)
            for flow in reversed(flows):  # data to noise, the direction fit scores
                previous = flow.inv(z)
                log_det = log_det - flow.log_abs_det_jacobian(previous, z)
                z = previous
            return -(log_det - 0.5 * z.square().sum(-1)).mean()

        return loss, [p for flow in flows for p in flow.parameters()]

    return setup


def _maf_sample(dim: int, hidden: Tuple[int, ...]) -> Callable[[], Callable[[], torch.Tensor]]:
    """MAF sampling, noise to data: every layer's sequential direction, without gradients."""

    def setup():
        flows = build_flow("maf", dim, repeat=LAYERS, defaults={**DENSITY_DEFAULTS, "hidden_dims": hidden})
        noise = torch.randn(BATCH, dim)

        @torch.no_grad()
        def sample():
            z = noise
            for flow in flows:
                z = flow(z)
            return z

        return sample, []

    return setup


def _guide(spec: str, dim: int) -> Callable[[], Callable[[], torch.Tensor]]:
    """A guide's training step through ``spec``: ``y = T(x)`` and its log-determinant, then backward."""

    def setup():
        torch.manual_seed(0)
        flows = build_flow(spec, dim)
        with torch.no_grad():
            for p in (p for flow in flows for p in flow.parameters()):
                p.add_(0.1 * torch.randn_like(p))
        x = torch.randn(BATCH, dim)

        def loss():
            y, log_det = x, torch.zeros(BATCH)
            for flow in flows:
                previous, y = y, flow(y)
                log_det = log_det + flow.log_abs_det_jacobian(previous, y)
            return (y.square().sum(-1) - log_det).mean()

        return loss, [p for flow in flows for p in flow.parameters()]

    return setup


CASES: List[Case] = [
    Case("maf log_prob fwd+bwd D=16 H=(64,64) L=5 B=1024", _density("maf", 16, (64, 64))),
    Case("nsf log_prob fwd+bwd D=16 H=(64,64) L=5 B=1024", _density("nsf", 16, (64, 64))),
    Case("realnvp log_prob fwd+bwd D=16 H=(64,64) L=5 B=1024", _density("realnvp", 16, (64, 64))),
    Case("maf log_prob fwd+bwd D=64 H=(256,256) L=5 B=1024", _density("maf", 64, (256, 256))),
    Case("maf sample D=16 H=(64,64) L=5 B=1024", _maf_sample(16, (64, 64))),
    Case("iaf guide step fwd+bwd D=16 L=2 B=1024", _guide("iaf:2", 16)),
    Case("householder guide step fwd+bwd D=64 K=10 B=1024", _guide("householder:10", 64)),
]


def _counting_inductor(graphs: list) -> Callable:
    """Inductor, counting the graphs dynamo hands it."""
    inductor = dynamo.lookup_backend("inductor")

    def backend(graph, example_inputs):
        graphs.append(graph)
        return inductor(graph, example_inputs)

    return backend


def run_case(case: Case, repeats: int, sample_s: float, warmup: int, rng: random.Random) -> List[str]:
    """One row: eager ms, compiled ms, eager/compiled, graphs, compile s."""
    dynamo.reset()
    function, parameters = case.setup()
    graphs: list = []
    eager = _timed(function, parameters)
    compiled = _timed(torch.compile(function, backend=_counting_inductor(graphs)), parameters)
    start = time.perf_counter()
    got = compiled()
    compile_s = time.perf_counter() - start
    first_call_graphs = len(graphs)
    expected = eager()
    if not torch.allclose(got, expected, rtol=1e-4, atol=1e-4):
        raise AssertionError(f"{case.name}: compiled {got} against eager {expected}")
    timing = measure({"ours": compiled, "eager": eager}, repeats, sample_s, warmup, rng, min_rounds=min(5, repeats))
    return [
        case.name,
        f"{timing.seconds['eager'] * 1e3:.3g}",
        f"{timing.seconds['ours'] * 1e3:.3g}",
        f"{timing.ratios['eager']:.2f}x",
        str(first_call_graphs),
        str(len(graphs)),
        f"{compile_s:.0f}",
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--filter", default="", help="run only cases whose name contains this substring")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per case (default 15, 3 with --quick)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--quick", action="store_true", help="smoke run: few, short rounds")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="speed_compile_")  # compile from cold
    warnings.filterwarnings("ignore", category=UserWarning)
    cases = [case for case in CASES if args.filter.lower() in case.name.lower()]
    repeats = args.repeats or (3 if args.quick else 15)
    sample_s, warmup = (0.005, 1) if args.quick else (0.05, 3)
    print(f"torch.compile on CPU ({library_versions({})}), inductor, threads={args.threads}, rounds={repeats}, "
          f"{platform.python_implementation()} {platform.python_version()}, "
          f"load {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    rng, rows, errors = random.Random(0), [], []
    for case in cases:
        print(f"  {case.name} ...", file=sys.stderr, flush=True)
        try:
            rows.append(run_case(case, repeats, sample_s, warmup, rng))
        except Exception as error:  # report it, run the others
            errors.append(f"{case.name}: {type(error).__name__}: {str(error)[:300]}")
            rows.append([case.name] + [DASH] * 6)
    print(_table(["case", "eager ms", "compiled ms", "eager/compiled", "graphs", "compiled", "compile s"], rows))
    for error in errors:
        print(f"ERROR {error}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
