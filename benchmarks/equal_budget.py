r"""Residual and continuous flows at an equal wall-clock budget: ``fit`` against
normflows' ``Residual`` and zuko's ``CNF``.

Run from the repository root::

    python benchmarks/equal_budget.py                     # 3 toys x 2 families, 5 min per contestant (~75 min)
    python benchmarks/equal_budget.py --minutes 10        # the same at 10 minutes each (~2.5 h)
    python benchmarks/equal_budget.py --families residual --datasets checkerboard --seeds 0 1 2
    python benchmarks/equal_budget.py --quick             # smoke run: two_moons, 2,000 points, 15 s each (~2 min)

**What is compared.** For every dataset and family, ours is
``pyro_nflows.fit(train, flow=family, validation_data=validation, epochs=E,
seed=S)``, every other setting its default (5 layers with actnorm between
them, the default hidden widths, Adam at 1e-3 with a cosine schedule over
the ``E`` epochs, batch 256, clipping at 5, patience 30, best weights): for
``residual`` 5 residual blocks (direction ``"maf"``, exact log-determinant,
Lipschitz 0.9, hidden widths ``default_hidden_dims(D, network="coupling")``),
for ``continuous`` 5 continuous flows (dopri5, exact trace, ``atol = rtol =
1e-5``, hidden ``default_hidden_dims(D, network="ode")``). The peer of the
same size is trained by ``benchmarks/density.py``'s loop (the same split,
standardisation, optimiser, schedule, batch, clipping, patience and best
weights as ``fit``):

- ``residual``: normflows, 5 ``Residual(LipschitzMLP([D, H, H, D],
  lipschitz_const=0.9), reverse=True)`` blocks with normflows' ``ActNorm``
  between them, a standard normal base; at D = 2 ``brute_force=True`` (the
  exact log-determinant, as ours), otherwise its default Russian-roulette
  estimator. Its spectral normalisation is updated (``compute_weight(update=
  True)``, its own 5 power iterations) before every training step and before
  evaluation, as normflows' ``update_lipschitz`` is meant to be called after
  every optimiser step.
- ``continuous``: zuko, a ``Flow`` of 5 ``FFJTransform(D, hidden_features=(H,
  H), atol=1e-5, rtol=1e-5, exact=True)`` (what ``CNF`` builds, five times),
  a standard normal base; zuko has no actnorm.

**The budget.** Every contestant gets ``--minutes M`` of training wall
clock (validation passes included; the same ``M`` for all). ``fit`` has no
time budget of its own, so the budget is kept in two ways, the same for
every contestant: (1) the epochs are calibrated to it: after a warm-up (one
epoch on 512 rows, so that first-call costs stay out), a run of
``--calibration-epochs`` epochs (default 2) from the same start times an
epoch, and the real run gets ``E = floor(M / epoch time)`` epochs (at least
1), so that its cosine schedule ends at the budget; (2) a hard stop at ``M``
minutes, for flows whose epochs slow down as they train (a continuous
flow's solver takes more steps as its field grows): ours through ``fit``'s
Ctrl-C path (a ``SIGALRM`` raises ``KeyboardInterrupt``; ``fit`` stops and
keeps its best weights), the peers through the loop's ``deadline``, both
keeping the best validated weights. The table prints the minutes each
actually trained, the epochs run of the ``E`` calibrated, and ``*`` when
the hard stop ended the run. The warm-up and calibration runs are not counted.

**The score.** Test negative log-likelihood per point, in nats, and in bits
for ``checkerboard`` (true entropy 5.00 bits; Residual Flows report 5.08,
implicit flows 5.05, at far longer budgets), with the paired difference
``peer - ours`` and its standard error as in ``density.py`` (over test
points for one seed, over seeds for several); PASS when ours is at least as
good as the peer up to two standard errors.

The table is a report, not a test: the exit status is 0 unless a run errors.

**Not yet run to the end.** The budget bounds training only: scoring the
validation and test points of a continuous flow is an adaptive ODE solve per
batch (``atol = rtol = 1e-5``), and after a short, unconverged run the
dynamics can be stiff enough that scoring 200 points takes many minutes (seen
with ``--quick`` on a loaded machine: ``run_ours``' test pass was still
solving after 3 minutes). No table has been recorded yet.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

# Benchmark the checkout this file lives in, installed or not.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_ROOT, "pyro_nflows")) and _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.common import library_versions  # noqa: E402
from benchmarks.density import (  # noqa: E402
    DASH,
    NUM_LAYERS,
    Result,
    Row,
    Unavailable,
    ZukoDensity,
    _score,
    _table,
    _unit,
    compare,
    load_data,
    run_ours,
    run_peer,
)
from pyro_nflows.nn import default_hidden_dims  # noqa: E402

DATASETS = ["checkerboard", "two_moons", "rings"]
FAMILIES = {"residual": "normflows", "continuous": "zuko"}
NETWORKS = {"residual": "coupling", "continuous": "ode"}
LIPSCHITZ = 0.9  # residual(...)'s default, given to normflows too
ODE_TOLERANCE = 1e-5  # continuous(...)'s default atol and rtol, given to zuko too


# ---------------------------------------------------------------------------
# The peers of the same size
# ---------------------------------------------------------------------------


class NormflowsResidualDensity(nn.Module):
    """normflows' residual flow, with its spectral norms brought up to date
    before every training step (the weights changed at the last one) and
    before evaluation."""

    def __init__(self, flow: nn.Module, layers: Sequence[nn.Module]):
        super().__init__()
        self.flow = flow
        self._normalized = list(layers)

    def _update_lipschitz(self) -> None:
        with torch.no_grad():
            for layer in self._normalized:
                layer.compute_weight(update=True)  # its own n_iterations (LipschitzMLP's max_lipschitz_iter, 5)

    def train(self, mode: bool = True) -> "NormflowsResidualDensity":
        if not mode:
            self._update_lipschitz()
        return super().train(mode)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        if self.training:
            self._update_lipschitz()
        return self.flow.log_prob(z)


def build_normflows_residual(dim: int) -> nn.Module:
    try:
        import normflows as nf
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise Unavailable(f"normflows not installed ({error})") from None
    hidden = default_hidden_dims(dim, network=NETWORKS["residual"])
    flows: List[nn.Module] = []
    for index in range(NUM_LAYERS):
        if index > 0:
            flows.append(nf.flows.ActNorm((dim,)))
        net = nf.nets.LipschitzMLP([dim, *hidden, dim], lipschitz_const=LIPSCHITZ)
        flows.append(nf.flows.Residual(net, reverse=True, brute_force=dim == 2))
    model = nf.NormalizingFlow(q0=nf.distributions.DiagGaussian(dim, trainable=False), flows=flows)
    layers = [m for m in model.modules() if isinstance(m, nf.nets.lipschitz.InducedNormLinear)]
    return NormflowsResidualDensity(model, layers)


def build_zuko_continuous(dim: int) -> nn.Module:
    try:
        from zuko.distributions import DiagNormal
        from zuko.flows import Flow
        from zuko.flows.continuous import FFJTransform
        from zuko.lazy import UnconditionalDistribution
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise Unavailable(f"zuko not installed ({error})") from None
    hidden = default_hidden_dims(dim, network=NETWORKS["continuous"])
    transforms = [
        FFJTransform(dim, atol=ODE_TOLERANCE, rtol=ODE_TOLERANCE, exact=True, hidden_features=hidden)
        for _ in range(NUM_LAYERS)
    ]
    base = UnconditionalDistribution(DiagNormal, torch.zeros(dim), torch.ones(dim), buffer=True)
    return ZukoDensity(Flow(transforms, base))


BUILDERS: Dict[str, Callable[[int], nn.Module]] = {
    "residual": build_normflows_residual,
    "continuous": build_zuko_continuous,
}


# ---------------------------------------------------------------------------
# One contestant at the budget: calibrate the epochs, then train with a hard stop
# ---------------------------------------------------------------------------


@dataclass
class Budgeted:
    """A contestant's run at the budget."""

    result: Result
    epochs: int  # calibrated
    epoch_seconds: float  # from the calibration run
    cut: bool  # the hard stop ended it


WARMUP_ROWS = 512


def at_budget(run: Callable[..., Result], seconds: float, calibration_epochs: int) -> Budgeted:
    """``run(epochs, seconds_limit, rows)`` calibrated to ``seconds``, then run with
    that hard stop. First a warm-up of one epoch on ``WARMUP_ROWS`` training rows
    (the first call's one-time costs stay out of the calibration), then the
    calibration run of ``calibration_epochs`` on all rows."""
    run(1, None, WARMUP_ROWS)
    calibration = run(calibration_epochs, None)
    epoch_seconds = calibration.seconds / max(1, calibration.epochs)
    epochs = max(1, math.floor(seconds / epoch_seconds))
    result = run(epochs, seconds)
    return Budgeted(result, epochs, epoch_seconds, cut=result.seconds >= seconds)


def run_family(dataset: str, family: str, seed: int, n: int, seconds: float, calibration_epochs: int):
    """Ours and the family's peer at the budget; returns (row, budgets, errors)."""
    train, validation, test = load_data(dataset, n, seed)
    peer = FAMILIES[family]
    row = Row(dataset, family, seed)
    budgets: Dict[str, Budgeted] = {}

    def ours(epochs: int, limit: Optional[float], rows: Optional[int] = None) -> Result:
        # patience: fit's default, for both (it rarely fires within a budget)
        return run_ours(family, train[:rows], validation, test, epochs, seed, seconds_limit=limit)

    def theirs(epochs: int, limit: Optional[float], rows: Optional[int] = None) -> Result:
        return run_peer(peer, family, train[:rows], validation, test, epochs, seed, 0, build=BUILDERS[family],
                        seconds_limit=limit)

    for name, run in (("ours", ours), (peer, theirs)):
        print(f"  {dataset} {family} seed {seed}: {name} ...", file=sys.stderr, flush=True)
        try:
            budgets[name] = at_budget(run, seconds, calibration_epochs)
            row.results[name] = budgets[name].result
        except Unavailable as reason:
            row.notes[name] = str(reason)
        except Exception as error:  # report it, run the others
            row.errors[name] = f"{type(error).__name__}: {error}"
            if name == "ours":
                break
    return row, budgets


# ---------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------


def _budget_cell(budgets: Sequence[Dict[str, Budgeted]], name: str, cell: Callable[[Budgeted], str]) -> str:
    cells = [cell(b[name]) for b in budgets if name in b]
    return " ".join(cells) if cells else DASH


def _minutes(b: Budgeted) -> str:
    return f"{b.result.seconds / 60:.2f}" + ("*" if b.cut else "")


def _epochs(b: Budgeted) -> str:
    return f"{b.result.epochs}/{b.epochs}"


def print_table(groups: Sequence[tuple]) -> tuple:
    """One line per (dataset, family), averaged over seeds; returns (rows passed, rows compared)."""
    headers = ["dataset", "family", "peer", "seeds", "ours", "peer score", "peer-ours", "minutes o | p",
               "epochs run/calibrated o | p", "params o/p", "result"]
    lines, passed, total = [], 0, 0
    for rows, budgets in groups:
        first = rows[0]
        peer = FAMILIES[first.flow]
        unit = _unit(first.dataset)[0]
        comparison = compare(rows, peer) if all(peer in r.results and "ours" in r.results for r in rows) else None
        outcome, difference = "ERROR" if any(r.errors for r in rows) else DASH, DASH
        if comparison is not None:
            mean, se, won, seeds = comparison
            difference = f"{mean:+.3f}±{se:.3f}" + (f" ({won}/{seeds})" if seeds > 1 else "")
            total += 1
            ok = math.isfinite(mean) and mean >= -2 * se
            passed += ok
            outcome = "PASS" if ok else f"worse than {peer}"
        params = "/".join(
            f"{first.results[name].parameters / 1000:.1f}k" if name in first.results else DASH
            for name in ("ours", peer)
        )
        lines.append([
            first.dataset + (" (bits)" if unit == "bits" else ""), first.flow, peer, str(len(rows)),
            _score(rows, "ours"), _score(rows, peer), difference,
            f"{_budget_cell(budgets, 'ours', _minutes)} | {_budget_cell(budgets, peer, _minutes)}",
            f"{_budget_cell(budgets, 'ours', _epochs)} | {_budget_cell(budgets, peer, _epochs)}",
            params, outcome,
        ])
    print(_table(headers, lines))
    return passed, total


# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=None, choices=DATASETS,
                        help="default: all three (--quick: two_moons)")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--minutes", type=float, default=None,
                        help="training wall clock per contestant, the same for all (default 5; --quick 0.25)")
    parser.add_argument("--calibration-epochs", type=int, default=None,
                        help="epochs of the run that times an epoch (default 2; --quick 1)")
    parser.add_argument("--n", type=int, default=None, help="points drawn per toy (default 10000; --quick 2000)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="data, split and initialisation seeds")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2: one contestant at a time)")
    parser.add_argument("--quick", action="store_true", help="smoke run: two_moons, 2,000 points, 15 s each")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    minutes = args.minutes or (0.25 if args.quick else 5.0)
    calibration = args.calibration_epochs or (1 if args.quick else 2)
    n = args.n or (2_000 if args.quick else 10_000)
    names = args.datasets or (["two_moons"] if args.quick else DATASETS)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"pyro_nflows residual and continuous flows at an equal budget "
          f"({library_versions({'normflows': 'normflows', 'zuko': 'zuko'})})")
    print(f"{minutes:g} min of training per contestant (epochs calibrated on {calibration}, hard stop at the budget)  "
          f"toys n={n} (80/10/10 split)  seeds {' '.join(map(str, args.seeds))}  threads {args.threads}  "
          f"load {load:.2f} on {os.cpu_count()} cores  {platform.python_implementation()} {platform.python_version()}")
    print("scores: test negative log-likelihood per point, lower is better (nats; checkerboard in bits, truth 5.00)\n",
          flush=True)

    start = time.perf_counter()
    groups, errors = [], []
    for dataset in names:
        for family in args.families:
            rows, budgets = [], []
            for seed in args.seeds:
                row, budget = run_family(dataset, family, seed, n, minutes * 60, calibration)
                rows.append(row)
                budgets.append(budget)
                errors += [f"{dataset} {family} seed {seed} {name}: {e}" for name, e in row.errors.items()]
                errors += [f"{dataset} {family} seed {seed} {name}: {DASH} {note}" for name, note in row.notes.items()]
            groups.append((rows, budgets))
    passed, total = print_table(groups)
    print("\npeer-ours: mean paired difference of test NLL per point ± its standard error "
          + ("over seeds (in brackets: seeds where ours is better)" if len(args.seeds) > 1 else "over test points")
          + " (> 0: ours is better); PASS: ours <= peer + 2 SE.")
    print("minutes: training wall clock, per seed (* : the hard stop at the budget ended it); epochs: run / "
          "calibrated to the budget.")
    print(f"Rows: {passed}/{total} PASS")
    for error in errors:
        print(f"  {error}")
    print(f"({time.perf_counter() - start:.0f} s, calibration runs included)")
    return 1 if any(row.errors for rows, _ in groups for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
