r"""Flow posteriors against the Gaussian one: test NLL of a VAE on binarised digits.

Run from the repository root::

    python benchmarks/vae.py                 # 8 posteriors x 3 seeds, one table (~40 min on 2 busy cores)
    python benchmarks/vae.py --quick         # smoke run: 4 posteriors, 1 seed, 50 epochs, 1000 samples (~2 min)
    python benchmarks/vae.py --posteriors gaussian householder:10 --seeds 0 1 2 3 4
    python benchmarks/vae.py --dataset mnist5k --out vae_mnist5k.jsonl  # MNIST-5k, resumable
    python benchmarks/vae.py --dataset mnist5k --out vae_mnist5k.jsonl --report   # the runs kept so far
    python benchmarks/vae.py --dataset mnist5k --gap --seeds 0   # train, validation and test ELBO of each run

**What is compared.** The VAE of the Householder-flow and ccLinIAF papers
(gated MLP encoder and decoder, hidden widths 300-300, a Bernoulli
likelihood) with ``z_dim = 16`` on scikit-learn's digits binarised at 0.5
(``datasets.binarized_digits()``: 1,797 images of 8 x 8 pixels; one fixed
80/10/10 split, 1,437 / 180 / 180 rows, for every run), once per posterior:

- ``gaussian``: the plain VAE;
- ``householder:10``: Householder flow, 10 reflections (Tomczak & Welling 2016);
- ``convex_triangular:5``: ccLinIAF with 5 matrices (Tomczak & Welling 2017);
- ``iaf:2``: 2 gated IAF steps, MADEs of 64-64 units reading h (Kingma et al. 2016);
- ``sylvester:4`` with ``kind`` ``orthogonal`` (M = 8), ``householder``
  (8 reflections) and ``triangular`` (van den Berg et al. 2018);
- ``planar:8``: 8 planar flows (Rezende & Mohamed 2015).

Every run has the same budget (the defaults of ``pyro-nflows vae``):
``train_vae`` with Adam at 1e-3, batches of 100, at most 300 epochs, KL
warm-up over the first 50, early stopping after 30 epochs at full KL weight
without a better validation ELBO (10 draws per point), best weights
restored; the same seeds (each seeds the initialisation, the shuffling and
the draws).

**The score.** Test negative log-likelihood per image, in nats (lower is
better), estimated by importance sampling with 5000 samples from the
posterior (Burda et al. 2016; ``estimate_nll``): mean ± standard deviation
over the seeds. Next to it: the test ELBO (mean ± std), the difference to
the Gaussian posterior of the same seed (mean ± std over seeds; negative:
better), the epochs trained (best epoch) and the seconds per run. A flow
"beats" the Gaussian when its mean NLL is lower; the last line says whether
every one does (the papers' pattern).

**MNIST-5k** (``--dataset mnist5k``): ``datasets.mnist_5k()``'s 5,000 real
MNIST digits, binarised stochastically once (seed 0), 4,000 / 500 / 500,
``z_dim = 40``, at most 150 epochs, warm-up 30, patience 20 (the reasons are
in benchmarks/README.md#vae-mnist5k).

The table is a report, not a test: the exit status is 0 unless a run errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

# Benchmark the checkout this file lives in, installed or not.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_ROOT, "pyro_nflows")) and _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402

from benchmarks.common import FinishedRows, library_versions  # noqa: E402
from pyro_nflows import datasets  # noqa: E402
from pyro_nflows.cli import VAE_DEFAULTS  # noqa: E402
from pyro_nflows.vae import VAE, estimate_nll, train_vae  # noqa: E402

POSTERIORS = [
    "gaussian",
    "householder:10",
    "convex_triangular:5",
    "iaf:2",
    "sylvester:4",
    "sylvester:4(kind='householder', count_transforms=8)",
    "sylvester:4(kind='triangular')",
    "planar:8",
]
QUICK_POSTERIORS = ["gaussian", "householder:10", "iaf:2", "planar:8"]
SPLIT_SEED = 0
# The data sets: a description and the binarised rows (cut by split with SPLIT_SEED).
DATASETS = {
    "digits": ("binarised digits, 8 x 8", datasets.binarized_digits),
    "mnist5k": (
        "MNIST-5k, 28 x 28, binarised stochastically once (seed 0)",
        lambda: datasets.mnist_5k(binarize="stochastic", seed=SPLIT_SEED),
    ),
}
MNIST_5K_Z_DIM = 40  # the Householder-flow and ccLinIAF papers' latent size on MNIST
# MNIST-5k's budget: 4,000 training images overfit sooner than the digits' 300 epochs, at 5x the cost an epoch.
MNIST_5K_BUDGET = {"epochs": 150, "warmup_epochs": 30, "patience": 20}
# What a finished run depends on: runs kept in --out are reused only when all of these match.
SETTINGS = ("dataset", "z_dim", "hidden_dims", "epochs", "warmup_epochs", "patience", "num_samples")
BATCH_SIZE = 100
LR = 1e-3


@dataclass
class Run:
    nll: float
    elbo: float
    epochs: int
    best_epoch: int
    seconds: float


@dataclass
class Row:
    posterior: str
    runs: Dict[int, Run] = field(default_factory=dict)


def train_one(posterior: str, seed: int, data: tuple, settings: argparse.Namespace):
    """A VAE with ``posterior`` trained on ``data[0]`` as every run of the table is; its history."""
    train, validation, _ = data
    torch.manual_seed(seed)
    vae = VAE(train.shape[1], settings.z_dim, posterior, hidden_dims=settings.hidden_dims)
    history = train_vae(
        vae, train, validation, epochs=settings.epochs, batch_size=BATCH_SIZE, lr=LR,
        warmup_epochs=settings.warmup_epochs, patience=settings.patience, seed=seed, progress=False,
    )
    return vae, history


def mean_elbo(vae, rows: torch.Tensor, seed: int) -> float:
    """The mean ELBO per image of ``rows``, 10 draws per image, seeded."""
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(seed)
        return vae.elbo(rows, num_samples=10).mean().item()


def run_one(posterior: str, seed: int, data: tuple, settings: argparse.Namespace) -> Run:
    start = time.perf_counter()
    vae, history = train_one(posterior, seed, data, settings)
    test = data[2]
    elbo = mean_elbo(vae, test, seed)
    nll = estimate_nll(vae, test, num_samples=settings.num_samples, seed=seed)
    return Run(nll, elbo, len(history.validation), history.best_epoch + 1, time.perf_counter() - start)


def print_gaps(data: tuple, settings: argparse.Namespace) -> None:
    """``--gap``: each posterior trained as in the table, then its ELBO on the training, validation
    and test images with the best weights; ``train - test`` is how much of the training ELBO the
    posterior and decoder do not carry to new images."""
    print("| posterior | seed | train ELBO | validation ELBO | test ELBO | train − test |\n|---|---|---|---|---|---|")
    for seed in settings.seeds:
        for posterior in settings.posteriors:
            vae, _ = train_one(posterior, seed, data, settings)
            train, validation, test = (mean_elbo(vae, rows, seed) for rows in data)
            print(f"| `{posterior}` | {seed} | {train:.2f} | {validation:.2f} | {test:.2f} | {train - test:.2f} |",
                  flush=True)


def _mean_std(values: List[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(rows: List[Row]) -> str:
    baseline = next((row for row in rows if row.posterior == "gaussian"), None)
    lines = [
        "| posterior | test NLL (nats) | test ELBO | NLL − Gaussian's (same seed) | epochs (best) | s / run |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        runs = [row.runs[seed] for seed in sorted(row.runs)]
        if baseline is not None and row is not baseline:
            paired = [row.runs[s].nll - baseline.runs[s].nll for s in sorted(row.runs) if s in baseline.runs]
            difference = _mean_std(paired)
        else:
            difference = "—"
        epochs = ", ".join(f"{run.epochs} ({run.best_epoch})" for run in runs)
        seconds = f"{statistics.mean(run.seconds for run in runs):.0f}" if runs else "—"
        lines.append(
            f"| `{row.posterior}` | {_mean_std([r.nll for r in runs])} | {_mean_std([r.elbo for r in runs])} "
            f"| {difference} | {epochs} | {seconds} |"
        )
    return "\n".join(lines)


def verdict(rows: List[Row]) -> str:
    means = {row.posterior: statistics.mean(r.nll for r in row.runs.values()) for row in rows if row.runs}
    if "gaussian" not in means or len(means) < 2:
        return "no Gaussian baseline (or nothing to compare it with) in this run"
    losers = [name for name, value in means.items() if name != "gaussian" and value >= means["gaussian"]]
    if not losers:
        return f"every flow posterior beats the Gaussian one (mean test NLL {means['gaussian']:.2f} nats)"
    return f"NOT every flow posterior beats the Gaussian one ({means['gaussian']:.2f} nats): {', '.join(losers)} do not"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--posteriors", nargs="+", default=None, help="posterior specs (default: the 8 above; --quick: 4)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: 0 1 2; --quick: 0)")
    defaults = VAE_DEFAULTS
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"maximum epochs (default {defaults['epochs']}, mnist5k {MNIST_5K_BUDGET['epochs']}; --quick 50)",
    )
    parser.add_argument(
        "--warmup-epochs",
        type=int,
        default=None,
        help=f"KL warm-up epochs (default {defaults['warmup_epochs']}, mnist5k "
        f"{MNIST_5K_BUDGET['warmup_epochs']}; --quick 10)",
    )
    parser.add_argument(
        "--patience",
        type=int,
        default=None,
        help=f"early-stopping patience (default {defaults['patience']}, mnist5k {MNIST_5K_BUDGET['patience']}; "
        "--quick 10)",
    )
    parser.add_argument(
        "--z-dim", type=int, default=None, help=f"latent size (default {defaults['z_dim']}; mnist5k {MNIST_5K_Z_DIM})"
    )
    hidden_dims = inspect.signature(VAE).parameters["hidden_dims"].default
    parser.add_argument("--hidden-dims", type=int, nargs="+", default=list(hidden_dims))
    parser.add_argument(
        "--num-samples", type=int, default=None, help="importance samples for the NLL (default 5000; --quick 1000)"
    )
    parser.add_argument(
        "--dataset", choices=sorted(DATASETS), default="digits",
        help="digits: the 8 x 8 digits; mnist5k: MNIST-5k, 28 x 28 (default: digits)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--out", default=None, help="JSON-lines file of finished runs; a rerun reuses them")
    parser.add_argument("--report", action="store_true", help="run nothing: the table of the runs in --out")
    parser.add_argument(
        "--gap", action="store_true",
        help="instead of the table: each run's ELBO on the training, validation and test images (no NLL, no --out)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 posteriors, 1 seed, 50 epochs, 1000 samples")
    args = parser.parse_args(argv)
    quick = args.quick
    budget = MNIST_5K_BUDGET if args.dataset == "mnist5k" else defaults
    args.posteriors = args.posteriors or (QUICK_POSTERIORS if quick else POSTERIORS)
    args.seeds = args.seeds or ([0] if quick else [0, 1, 2])
    args.epochs = args.epochs or (50 if quick else budget["epochs"])
    args.warmup_epochs = (
        args.warmup_epochs if args.warmup_epochs is not None else (10 if quick else budget["warmup_epochs"])
    )
    args.patience = args.patience or (10 if quick else budget["patience"])
    args.num_samples = args.num_samples or (1000 if quick else 5000)
    args.z_dim = args.z_dim or (MNIST_5K_Z_DIM if args.dataset == "mnist5k" else defaults["z_dim"])
    torch.set_num_threads(args.threads)

    description, load_data = DATASETS[args.dataset]
    data = datasets.split(load_data(), (0.8, 0.1, 0.1), seed=SPLIT_SEED)
    print(f"pyro_nflows VAE posteriors on {description} ({library_versions({'pyro': 'pyro-ppl'})})")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"train/validation/test {len(data[0])}/{len(data[1])}/{len(data[2])}  z_dim {args.z_dim}  "
        f"gated hidden {tuple(args.hidden_dims)}  epochs<={args.epochs} (warm-up {args.warmup_epochs}, "
        f"patience {args.patience})  batch {BATCH_SIZE}  Adam {LR}  "
        f"seeds {args.seeds}  NLL with {args.num_samples} importance samples  threads {args.threads}  "
        f"load {load:.2f} on {os.cpu_count()} cores  {platform.python_implementation()} {platform.python_version()}\n",
        flush=True,
    )
    if args.gap:
        print_gaps(data, args)
        return 0
    settings = {key: getattr(args, key) for key in SETTINGS}
    done = FinishedRows(args.out, settings, key=lambda row: (row["posterior"], row["seed"]))
    start = time.perf_counter()
    rows = [Row(posterior) for posterior in args.posteriors]
    errors = []
    for seed in args.seeds:  # seed by seed: a run cut short still has complete comparisons
        for row in rows:
            if (row.posterior, seed) not in done and not args.report:
                try:
                    run = run_one(row.posterior, seed, data, args)
                except Exception as error:  # report it, run the others
                    errors.append(f"{row.posterior} seed {seed}: {type(error).__name__}: {error}")
                    continue
                done.add({"posterior": row.posterior, "seed": seed, **dataclasses.asdict(run)})
                print(
                    f"  seed {seed} {row.posterior:<52} NLL {run.nll:7.3f}  ELBO {run.elbo:8.3f}  "
                    f"{run.epochs} epochs (best {run.best_epoch})  {run.seconds:.0f} s",
                    file=sys.stderr, flush=True,
                )
            finished = done.get((row.posterior, seed))
            if finished is not None:
                row.runs[seed] = Run(**{name: finished[name] for name in Run.__dataclass_fields__})
    print(table(rows))
    print(f"\n{verdict(rows)}")
    print(f"wall time {time.perf_counter() - start:.0f} s")
    for error in errors:
        print(f"ERROR {error}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
