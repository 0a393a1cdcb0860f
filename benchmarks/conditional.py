r"""Quality of ``pyro_nflows.fit(x, context=c)`` as a conditional density estimator, against zuko and nflows.

Run from the repository root::

    python benchmarks/conditional.py                                # every task and preset, seed 0
    python benchmarks/conditional.py --seeds 0 1 2 --out cond.jsonl  # over 3 seeds, resumable
    python benchmarks/conditional.py --seeds 0 1 2 --out cond.jsonl --report   # the table kept so far
    python benchmarks/conditional.py --quick                        # smoke run, a few minutes
    python benchmarks/conditional.py --tasks mixture --flows nsf --epochs 50 --n 5000

**The tasks**, each with its exact conditional log-density, so that the score
is an exact KL divergence (up to test-point noise):

- ``gaussian``: ``c ~ N(0, I_2)``, ``x | c ~ N(A c + b, L(c) L(c)^T)`` in
  3 dimensions, whose Cholesky factor ``L(c) = diag(exp(W c / 2)) (L_0 +
  tanh(c_1) M)`` makes both the spread and the correlations depend on ``c``;
- ``mixture``: ``c ~ U(-2, 2)``, ``x | c`` a mixture of 4 Gaussians in 2-D
  whose means turn with ``c`` (angle ``c``, radius 2), whose weights are
  ``softmax(c (k - 1.5))`` and whose spread is ``0.3 exp(0.3 c)``;
- ``two_moons``: the likelihood ``p(x | theta)`` of the two-moons simulator
  of the SBI benchmark (Lueckmann et al. 2021, arXiv:2101.04653):
  ``theta ~ U(-1, 1)^2``, ``x = (r cos a + 0.25, r sin a) + (-|theta_1 +
  theta_2| / sqrt 2, (theta_2 - theta_1) / sqrt 2)`` with ``a ~ U(-pi/2,
  pi/2)`` and ``r ~ N(0.1, 0.01^2)``; by the change to polar coordinates
  ``p(x | theta) = N(r; 0.1, 0.01^2) / (pi r)`` for ``q = x - shift`` in the
  right half-plane, ``r = |q|`` (a thin crescent, the hard case).

**What is compared.** Ours is ``fit(train, context=c_train, flow=preset,
validation_data=..., validation_context=..., epochs=E, patience=P, seed=S)``,
every other setting its default (5 layers, the default hidden widths for
``(D, C)``, actnorm between layers, Adam at 1e-3 with a cosine schedule,
batch 256, clipping at 5, best weights). The peers, at the same hidden
width (their parameter counts are printed and agree with ours to within 1%):

- ``maf``: zuko's ``MAF(D, C, transforms=5, hidden_features=(H, H))``;
  nflows' 5 x ``MaskedAffineAutoregressiveTransform(D, H, context_features=C,
  num_blocks=1, use_residual_blocks=False)``, reversed between layers (its
  ``MaskedAutoregressiveFlow`` takes no context);
- ``nsf``: zuko's ``NSF(D, C, bins=8, transforms=5, ...)``; nflows' 5 x
  ``MaskedPiecewiseRationalQuadraticAutoregressiveTransform`` (8 bins, linear
  tails at 3, one MADE block, ``context_features=C``), reversed between layers.

They are trained by the peer loop of ``benchmarks/density.py``
(``train_peer``, the copy of ``fit``'s loop: the same split, standardisation
of the data and -- as ``fit`` does -- of the context, optimiser, schedule,
batch size, clipping, patience and best-weights rule); each peer's rows carry
their context in the last ``C`` columns. Every model starts from the same
torch seed.

**The score.** ``KL = E[log p(x | c) - log q(x | c)]`` over the test pairs,
in nats (lower is better, 0 is perfect), with the test NLL beside it. Next
to each peer the paired difference ``peer - ours`` and its standard error
(over test points for one seed; over seeds, from their spread, for several;
in brackets the seeds where ours is better); PASS when ours is at least as
good as every peer up to noise (``ours <= peer + 2 SE``). ``--n`` points per
task (default 10,000: 80% train, 10% validation, 10% test).

The table is a report, not a test: the exit status is 0 unless a run errors.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

# Benchmark the checkout this file lives in, installed or not.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_ROOT, "pyro_nflows")) and _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.common import FinishedRows, library_versions  # noqa: E402
from benchmarks.density import (  # noqa: E402
    BATCH_SIZE,
    COUNT_BINS,
    NUM_LAYERS,
    PATIENCE,
    SPLINE_BOUND,
    Unavailable,
    _table,
    count_parameters,
    train_peer,
)
from pyro_nflows.density import fit  # noqa: E402
from pyro_nflows.nn import default_hidden_dims  # noqa: E402

FLOWS = ["maf", "nsf"]
PEERS = ["zuko", "nflows"]
DASH = "—"


# ---------------------------------------------------------------------------
# The tasks: draws of (x, c) and the exact log p(x | c)
# ---------------------------------------------------------------------------


class Gaussian:
    """x | c ~ N(A c + b, L(c) L(c)^T), L(c) = diag(exp(W c / 2)) (L_0 + tanh(c_1) M)."""

    dim, context_dim = 3, 2
    A = torch.tensor([[1.5, -0.5], [-1.0, 0.8], [0.3, 1.2]])
    B = torch.tensor([0.5, 0.0, -0.5])
    W = torch.tensor([[0.8, 0.0], [0.0, -0.6], [0.4, 0.4]])
    L0 = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.8, 0.0], [-0.3, 0.4, 0.6]])
    M = torch.tensor([[0.0, 0.0, 0.0], [0.6, 0.0, 0.0], [0.0, -0.5, 0.0]])

    def context(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(n, 2, generator=generator)

    def distribution(self, c: torch.Tensor) -> torch.distributions.Distribution:
        tril = torch.exp(0.5 * c @ self.W.T).unsqueeze(-1) * (self.L0 + torch.tanh(c[:, :1]).unsqueeze(-1) * self.M)
        return torch.distributions.MultivariateNormal(c @ self.A.T + self.B, scale_tril=tril)

    def draw(self, c: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(len(c), self.dim, 1, generator=generator)
        distribution = self.distribution(c)
        return distribution.loc + (distribution.scale_tril @ noise).squeeze(-1)

    def log_prob(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.distribution(c).log_prob(x)


class Mixture:
    """x | c: 4 Gaussians in 2-D, means turned by the angle c, weights softmax(c (k - 1.5)), sd 0.3 exp(0.3 c)."""

    dim, context_dim, components = 2, 1, 4

    def context(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return 4 * torch.rand(n, 1, generator=generator) - 2

    def _parts(self, c: torch.Tensor):
        angles = c + torch.arange(self.components) * (2 * math.pi / self.components)
        means = 2 * torch.stack([angles.cos(), angles.sin()], dim=-1)
        logits = c * (torch.arange(self.components) - 1.5)
        return means, logits, 0.3 * torch.exp(0.3 * c)

    def draw(self, c: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        means, logits, sd = self._parts(c)
        pick = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
        return means[torch.arange(len(c)), pick] + sd * torch.randn(len(c), 2, generator=generator)

    def log_prob(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        means, logits, sd = self._parts(c)
        normal = torch.distributions.Normal(means, sd.unsqueeze(-1)).log_prob(x.unsqueeze(-2)).sum(-1)
        return torch.logsumexp(normal + logits.log_softmax(-1), dim=-1)


class TwoMoons:
    """The two-moons simulator's likelihood p(x | theta) (sbibm's two_moons)."""

    dim, context_dim = 2, 2

    def context(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return 2 * torch.rand(n, 2, generator=generator) - 1

    @staticmethod
    def shift(theta: torch.Tensor) -> torch.Tensor:
        z0 = (theta[:, 0] + theta[:, 1]) / math.sqrt(2)
        z1 = (theta[:, 1] - theta[:, 0]) / math.sqrt(2)
        return torch.stack([-z0.abs() + 0.25, z1], dim=-1)

    def draw(self, c: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        a = math.pi * (torch.rand(len(c), generator=generator) - 0.5)
        r = 0.1 + 0.01 * torch.randn(len(c), generator=generator)
        return torch.stack([r * a.cos(), r * a.sin()], dim=-1) + self.shift(c)

    def log_prob(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        q = (x - self.shift(c)).double()
        r = q.norm(dim=-1)
        value = torch.distributions.Normal(0.1, 0.01).log_prob(r) - math.log(math.pi) - r.log()
        return torch.where(q[:, 0] > 0, value, torch.full_like(value, -math.inf)).to(x.dtype)


TASKS = {"gaussian": Gaussian(), "mixture": Mixture(), "two_moons": TwoMoons()}


def load_task(name: str, n: int, seed: int) -> Dict[str, torch.Tensor]:
    """``n`` seeded pairs split 80/10/10: ``{"train", "validation", "test"}`` of x and ``"..._context"`` of c."""
    task, generator = TASKS[name], torch.Generator().manual_seed(seed)
    c = task.context(n, generator)
    x = task.draw(c, generator)
    n_validation = n_test = n // 10
    parts = {"train": slice(0, n - n_validation - n_test), "validation": slice(n - n_validation - n_test, n - n_test),
             "test": slice(n - n_test, n)}
    data = {}
    for part, rows in parts.items():
        data[part], data[f"{part}_context"] = x[rows], c[rows]
    return data


# ---------------------------------------------------------------------------
# The contestants
# ---------------------------------------------------------------------------


class ContextColumns(nn.Module):
    """A conditional peer scoring rows ``[z, c]`` (its context in the last ``context_dim``
    columns), so that the unconditional peer loop of ``benchmarks/density.py`` trains it."""

    def __init__(self, flow: nn.Module, context_dim: int, library: str):
        super().__init__()
        self.flow, self.context_dim, self.library = flow, context_dim, library

    def log_prob(self, rows: torch.Tensor) -> torch.Tensor:
        z, c = rows[:, : -self.context_dim], rows[:, -self.context_dim :]
        return self.flow(c).log_prob(z) if self.library == "zuko" else self.flow.log_prob(z, context=c)


def build_peer(peer: str, flow: str, dim: int, context_dim: int, width: int) -> ContextColumns:
    hidden = (width, width)
    if peer == "zuko":
        try:
            import zuko
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise Unavailable(f"zuko not installed ({error})") from None
        if flow == "maf":
            return ContextColumns(zuko.flows.MAF(dim, context_dim, transforms=NUM_LAYERS, hidden_features=hidden),
                                  context_dim, "zuko")
        spline = zuko.flows.NSF(dim, context_dim, bins=COUNT_BINS, transforms=NUM_LAYERS, hidden_features=hidden)
        return ContextColumns(spline, context_dim, "zuko")
    try:
        from nflows.distributions.normal import StandardNormal
        from nflows.flows import Flow
        from nflows.transforms import CompositeTransform, ReversePermutation
        from nflows.transforms.autoregressive import (
            MaskedAffineAutoregressiveTransform,
            MaskedPiecewiseRationalQuadraticAutoregressiveTransform,
        )
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise Unavailable(f"nflows not installed ({error})") from None
    layers = []
    for index in range(NUM_LAYERS):
        if index > 0:
            layers.append(ReversePermutation(dim))
        if flow == "maf":
            layers.append(MaskedAffineAutoregressiveTransform(
                dim, width, context_features=context_dim, num_blocks=1, use_residual_blocks=False))
        else:
            layers.append(MaskedPiecewiseRationalQuadraticAutoregressiveTransform(
                dim, width, context_features=context_dim, num_bins=COUNT_BINS, tails="linear",
                tail_bound=SPLINE_BOUND, num_blocks=1, use_residual_blocks=False))
    return ContextColumns(Flow(CompositeTransform(layers), StandardNormal([dim])), context_dim, "nflows")


@dataclass
class Result:
    kl: List[float] = field(default_factory=list)  # log p - log q per test point, nats
    nll: float = 0.0
    parameters: int = 0
    seconds: float = 0.0
    epochs: int = 0


def _result(task: str, data: dict, log_q: torch.Tensor, parameters: int, seconds: float, epochs: int) -> Result:
    log_p = TASKS[task].log_prob(data["test"], data["test_context"]).double()
    return Result((log_p - log_q.double()).tolist(), -log_q.double().mean().item(), parameters, seconds, epochs)


def run_ours(task: str, flow: str, data: dict, epochs: int, seed: int, patience: int) -> Result:
    start = time.perf_counter()
    model = fit(data["train"], flow=flow, epochs=epochs, patience=patience, seed=seed, progress=False,
                context=data["train_context"], validation_data=data["validation"],
                validation_context=data["validation_context"])
    seconds = time.perf_counter() - start
    with torch.no_grad():
        log_q = model.log_prob(data["test"], data["test_context"])
    return _result(task, data, log_q, count_parameters(model), seconds, len(model.history.validation))


def run_peer(peer: str, task: str, flow: str, data: dict, epochs: int, seed: int, patience: int) -> Result:
    train, context = data["train"], data["train_context"]
    loc, scale = train.mean(0), train.std(0)
    context_loc, context_scale = context.mean(0), context.std(0)
    context_scale = torch.where(context_scale > 0, context_scale, torch.ones_like(context_scale))  # as fit does

    def rows(part: str) -> torch.Tensor:
        return torch.cat([(data[part] - loc) / scale, (data[f"{part}_context"] - context_loc) / context_scale], -1)

    dim, context_dim = train.shape[1], context.shape[1]
    torch.manual_seed(seed)
    width = default_hidden_dims(dim, context_dim, network="made")[0]
    model = build_peer(peer, flow, dim, context_dim, width)
    start = time.perf_counter()
    epochs_run, _ = train_peer(model, rows("train"), rows("validation"), epochs, seed, patience)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        log_q = torch.cat([model.log_prob(chunk) for chunk in rows("test").split(4 * BATCH_SIZE)])
    return _result(task, data, log_q - scale.log().sum(), count_parameters(model), seconds, epochs_run)


# ---------------------------------------------------------------------------
# Rows and the table
# ---------------------------------------------------------------------------


def run_row(task: str, flow: str, seed: int, n: int, epochs: int, patience: int, peers: Sequence[str]) -> dict:
    """Ours, then every peer, on one seeded draw of the task; failures are kept as errors."""
    data = load_task(task, n, seed)
    row = {"task": task, "flow": flow, "seed": seed, "results": {}, "errors": {}}
    runners = {"ours": lambda: run_ours(task, flow, data, epochs, seed, patience)}
    runners.update({peer: (lambda peer=peer: run_peer(peer, task, flow, data, epochs, seed, patience))
                    for peer in peers})
    for name, runner in runners.items():
        try:
            row["results"][name] = vars(runner())
        except Exception as error:  # report it, run the others
            row["errors"][name] = f"{type(error).__name__}: {error}"
    return row


def compare(rows: Sequence[dict], peer: str) -> Optional[tuple]:
    """``peer - ours`` in KL over the seeds where both ran: (mean, SE, seeds where ours is better, seeds)."""
    pairs = [(torch.tensor(r["results"][peer]["kl"]), torch.tensor(r["results"]["ours"]["kl"]))
             for r in rows if peer in r["results"] and "ours" in r["results"]]
    if not pairs:
        return None
    differences = [p - o for p, o in pairs]
    means = torch.stack([d.mean() for d in differences])
    if len(means) == 1:
        se = differences[0].std().item() / math.sqrt(len(differences[0]))
    else:
        se = means.std().item() / math.sqrt(len(means))
    return means.mean().item(), se, int((means > 0).sum()), len(means)


def _mean(rows: Sequence[dict], name: str, key: str, digits: int) -> str:
    values = [r["results"][name][key] for r in rows if name in r["results"]]
    values = [sum(v) / len(v) if isinstance(v, list) else v for v in values]
    return f"{sum(values) / len(values):.{digits}f}" if values else DASH


def table(rows: Sequence[dict], peers: Sequence[str]) -> tuple[str, int, int]:
    groups: Dict[tuple, List[dict]] = {}
    for row in rows:
        groups.setdefault((row["task"], row["flow"]), []).append(row)
    names = ["ours", *peers]
    headers = (["task", "flow", "seeds"] + [f"KL {name}" for name in names] + [f"{p}-ours" for p in peers]
               + ["NLL " + "/".join(n[0] for n in names), "params " + "/".join(n[0] for n in names),
                  "seconds", "epochs", "result"])
    lines, passed = [], 0
    for (task, flow), members in groups.items():
        cells, worse = [], []
        for peer in peers:
            comparison = compare(members, peer)
            if comparison is None:
                cells.append(DASH)
                continue
            mean, se, won, seeds = comparison
            cells.append(f"{mean:+.3f}±{se:.3f}" + (f" ({won}/{seeds})" if seeds > 1 else ""))
            worse += [peer] if mean < -2 * se else []
        outcome = "ERROR" if not any("ours" in r["results"] for r in members) else (
            "PASS" if not worse else "worse than " + ", ".join(worse))
        passed += outcome == "PASS"
        first = members[0]["results"]
        lines.append(
            [task, flow, str(len(members))] + [_mean(members, name, "kl", 3) for name in names] + cells
            + ["/".join(_mean(members, name, "nll", 2) for name in names)]
            + ["/".join(f"{first[name]['parameters'] / 1000:.1f}k" if name in first else DASH for name in names)]
            + ["/".join(_mean(members, name, "seconds", 0) for name in names)]
            + ["/".join(_mean(members, name, "epochs", 0) for name in names)] + [outcome]
        )
    return _table(headers, lines), passed, len(groups)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--flows", nargs="+", default=FLOWS, choices=FLOWS)
    parser.add_argument("--peers", nargs="*", default=PEERS, choices=PEERS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--n", type=int, default=None, help="pairs per task (default 10000; --quick 3000)")
    parser.add_argument("--epochs", type=int, default=None, help="epoch cap (default 100; --quick 15)")
    parser.add_argument("--patience", type=int, default=PATIENCE, help=f"for all (default: fit's, {PATIENCE})")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", default=None, help="JSON-lines file of finished rows; a rerun reuses them")
    parser.add_argument("--report", action="store_true", help="run nothing: the table of the rows in --out")
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer points and epochs")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    n, epochs = args.n or (3000 if args.quick else 10_000), args.epochs or (15 if args.quick else 100)
    settings = {"n": n, "epochs": epochs, "patience": args.patience}
    print(f"pyro_nflows conditional density estimation vs zuko and nflows "
          f"({library_versions({'zuko': 'zuko', 'nflows': 'nflows'})})")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"n={n} (80/10/10)  epochs<={epochs} (patience {args.patience})  batch {BATCH_SIZE}  seeds "
          f"{' '.join(map(str, args.seeds))}  {args.threads} thread(s)  load {load:.2f} on {os.cpu_count()} cores  "
          f"{platform.python_implementation()} {platform.python_version()}\n", flush=True)
    done = FinishedRows(args.out, settings, key=lambda row: (row["task"], row["flow"], row["seed"]))
    start = time.perf_counter()
    keys = [(task, flow, seed) for task in args.tasks for flow in args.flows for seed in args.seeds]
    for key in keys:
        if key in done or args.report:
            continue
        print(f"  {key[0]} {key[1]} seed {key[2]} ...", file=sys.stderr, flush=True)
        row = run_row(*key, n, epochs, args.patience, args.peers)
        done.add(row)
        print("  " + ", ".join(f"{name} KL {sum(r['kl']) / len(r['kl']):.3f} ({r['seconds']:.0f} s)"
                               for name, r in row["results"].items()), file=sys.stderr, flush=True)
    rows = [done.get(key) for key in keys if key in done]
    text, passed, total = table(rows, args.peers)
    print(text)
    print("\nKL: mean over test pairs of log p(x | c) - log q(x | c), nats (0 is perfect), mean over seeds; "
          "peer-ours: paired difference ± SE (> 0: ours is better); NLL: test negative log-likelihood per point; "
          "seconds, epochs: training wall time and epochs run (ours/zuko/nflows).")
    errors = [f"{r['task']} {r['flow']} seed {r['seed']} {name}: {error}"
              for r in rows for name, error in r["errors"].items()]
    print(f"Rows: {passed}/{total} PASS ({time.perf_counter() - start:.0f} s)")
    for error in errors:
        print(f"  ERROR {error}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
