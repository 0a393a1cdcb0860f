r"""Quality of ``pyro_nflows.fit`` as a density estimator, against zuko and nflows.

Run from the repository root::

    python benchmarks/density.py                   # the full table, seed 0 (~40 min on 2 cores)
    python benchmarks/density.py --seeds 0 1 2 --jobs 2 --out table.jsonl   # averaged over 3 seeds, resumable
    python benchmarks/density.py --seeds 0 1 2 --out table.jsonl --report   # the table of the rows kept so far
    python benchmarks/density.py --seeds 0 1 2 --jobs 2 --out table.jsonl --flows nsf --rerun --peers
                                                   # re-score ours only
    python benchmarks/density.py --quick           # smoke run, about 2 minutes
    python benchmarks/density.py --datasets checkerboard two_moons --flows nsf --epochs 50
    python benchmarks/density.py --datasets rings --flows realnvp --seeds 1 --patience 100   # no early stopping
    python benchmarks/density.py --target          # also: fit(checkerboard, flow="nsf") with defaults (~6 min more)

**What is compared.** For every dataset and every preset (``maf``, ``nsf``,
``realnvp``), ours is ``pyro_nflows.fit(train, flow=preset,
validation_data=validation, epochs=E, patience=P, seed=S)`` -- every other
setting its default (5 layers, the default hidden widths, actnorm between
layers, Adam at 1e-3 with a cosine schedule over all ``E`` epochs, batch 256,
gradient norms clipped at 5, early stopping after ``P`` epochs without a
better validation log-likelihood, best weights restored). ``P`` is ``fit``'s
default patience (30), read from its signature so that the benchmark cannot
drift from it; ``--patience`` overrides it for ours and the peers alike.
Each peer builds the same architecture at its own defaults otherwise:

- ``maf``: zuko's ``MAF(D, transforms=5, hidden_features=(H, H))``; nflows'
  ``MaskedAutoregressiveFlow(D, H, 5, 1, use_residual_blocks=False)``;
- ``nsf``: zuko's ``NSF(D, bins=8, transforms=5, hidden_...)``; nflows' 5 x
  ``MaskedPiecewiseRationalQuadraticAutoregressiveTransform`` (8 bins, linear
  tails at 3, one MADE block), reversed between layers;
- ``realnvp``: zuko's ``RealNVP(D, transforms=5, hidden_...)``; nflows'
  ``SimpleRealNVP(D, H', 5, 1)``, ``H'`` chosen to match our parameter count
  (its residual blocks have one layer more);

where ``(H, H)`` are our default hidden widths for the preset at that ``D``.
Peers are trained by one shared loop that copies ``fit``'s: the same
train/validation/test split (``datasets.split`` with ``--seed``), the same
standardisation of the data (mean and standard deviation of the training
part, whose log-determinant is added back, so every number is in the data's
own units), Adam at the same learning rate with the same cosine schedule over
the same number of epochs, batch size, gradient clipping, early-stopping
patience and best-weights rule. Every model starts from the same torch seed.

**The score.** Test negative log-likelihood per point (lower is better), in
nats, and in bits for ``checkerboard`` (NLL / ln 2), whose true entropy is
exactly 5.00 bits (published flows reach 5.05 to 5.08). Next to each peer
the paired difference ``peer - ours`` and its standard error; a row PASSes
when ours is at least as good as every peer up to noise (``ours <= peer + 2
SE``) and prints ``worse`` otherwise. With one seed the standard error is
over test points; with ``--seeds`` each seed's mean difference is one
observation, the row shows their mean, its standard error from the spread
between seeds, and in brackets the seeds where ours is better. Train seconds
are wall time (they include validation passes); parameter counts are printed
so that the sizes can be checked.

**Data.** The 2-D toys draw ``--n`` points (default ``datasets.DEFAULT_N``
= 10,000: 8,000 train, 1,000 validation, 1,000 test; ``--n 100000`` is the
papers' size and about ten times slower) with ``--seed``; ``digits`` is
scikit-learn's 1,797 dequantized 8 x 8 images (64-D; 1,437 / 180 / 180), for
``maf`` and ``nsf`` only unless ``--flows`` says otherwise.

**Noise.** With one seed, the ``± SE`` covers test-point noise only.
Training noise (the seed, and where early stopping happens to fire on a noisy
1,000-point validation set) is often larger on the toys: the same
configuration moves by 0.1-0.3 nats from seed to seed, for every library. So
read the table averaged over seeds (``--seeds 0 1 2``), whose standard error
covers both.

**Running it.** ``--jobs N`` runs N rows at once, one process each (with
``--threads`` torch threads each; the seconds column is then inflated by
whatever shares the machine, the scores are not: a row's result depends only
on its seed). ``--out FILE`` appends each finished row to a JSON-lines file;
rerunning with the same file and settings reuses the rows already there,
so an interrupted table resumes where it stopped, and more seeds can be added
later.

**The checkerboard target** (``--target``): ``fit(train, flow="nsf",
progress=False)`` with every other argument at its default, on the train part
of 100,000 generated checkerboard points (80,000 rows, of which fit holds out
10% for validation), scored on the 10,000 test points: the target is <= 5.10
test bits in under 10 minutes.

The table is a report, not a test: the exit status is 0 unless a run errors.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import copy
import inspect
import json
import math
import multiprocessing
import os
import platform
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

# Benchmark the checkout this file lives in, installed or not.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_ROOT, "pyro_nflows")) and _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.common import library_versions  # noqa: E402
from pyro_nflows import datasets  # noqa: E402
from pyro_nflows.density import fit  # noqa: E402
from pyro_nflows.nn import default_hidden_dims  # noqa: E402

TOYS = ["checkerboard", "two_moons", "eight_gaussians", "pinwheel", "two_spirals", "rings", "circles"]
FLOWS = ["maf", "nsf", "realnvp"]
PEERS = ["zuko", "nflows"]
DIGITS_FLOWS = ["maf", "nsf"]
NUM_LAYERS = 5
COUNT_BINS = 8
SPLINE_BOUND = 3.0  # our spline_autoregressive default; nflows' tails are put there too
BATCH_SIZE = 256
LR = 1e-3
PATIENCE = inspect.signature(fit).parameters["patience"].default  # fit's default, for both sides
CLIP_NORM = 5.0
TARGET_BITS, TARGET_SECONDS = 5.10, 600.0
DASH = "—"


class Unavailable(Exception):
    """A peer that is not installed or has no equivalent."""


# ---------------------------------------------------------------------------
# The peers: a module with log_prob(z) on standardised data
# ---------------------------------------------------------------------------


def hidden_width(flow: str, dim: int) -> int:
    """Our default hidden width for a preset at dimension ``dim`` (two layers of it)."""
    widths = default_hidden_dims(dim, network="coupling" if flow == "realnvp" else "made")
    assert len(set(widths)) == 1, widths
    return widths[0]


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


class ZukoDensity(nn.Module):
    def __init__(self, flow: nn.Module):
        super().__init__()
        self.flow = flow

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return self.flow().log_prob(z)


class NflowsDensity(nn.Module):
    def __init__(self, flow: nn.Module):
        super().__init__()
        self.flow = flow

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return self.flow.log_prob(z)


def build_zuko(flow: str, dim: int, width: int, target_parameters: int) -> nn.Module:
    try:
        import zuko
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise Unavailable(f"zuko not installed ({error})") from None
    hidden = (width, width)
    if flow == "maf":
        return ZukoDensity(zuko.flows.MAF(dim, transforms=NUM_LAYERS, hidden_features=hidden))
    if flow == "nsf":
        return ZukoDensity(zuko.flows.NSF(dim, bins=COUNT_BINS, transforms=NUM_LAYERS, hidden_features=hidden))
    if flow == "realnvp":
        return ZukoDensity(zuko.flows.RealNVP(dim, transforms=NUM_LAYERS, hidden_features=hidden))
    raise Unavailable(f"no zuko equivalent of {flow}")


def build_nflows(flow: str, dim: int, width: int, target_parameters: int) -> nn.Module:
    try:
        from nflows.distributions.normal import StandardNormal
        from nflows.flows import Flow, MaskedAutoregressiveFlow, SimpleRealNVP
        from nflows.transforms import CompositeTransform, ReversePermutation
        from nflows.transforms.autoregressive import MaskedPiecewiseRationalQuadraticAutoregressiveTransform
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise Unavailable(f"nflows not installed ({error})") from None
    if flow == "maf":
        return NflowsDensity(
            MaskedAutoregressiveFlow(dim, width, NUM_LAYERS, num_blocks_per_layer=1, use_residual_blocks=False)
        )
    if flow == "nsf":
        layers = []
        for index in range(NUM_LAYERS):
            if index > 0:
                layers.append(ReversePermutation(dim))
            layers.append(
                MaskedPiecewiseRationalQuadraticAutoregressiveTransform(
                    dim, width, num_bins=COUNT_BINS, tails="linear", tail_bound=SPLINE_BOUND,
                    num_blocks=1, use_residual_blocks=False,
                )
            )
        return NflowsDensity(Flow(CompositeTransform(layers), StandardNormal([dim])))
    if flow == "realnvp":
        # Its coupling nets are residual nets with one hidden layer more than
        # ours: pick the width whose parameter count is closest to ours.
        def make(h: int) -> nn.Module:
            return SimpleRealNVP(dim, h, NUM_LAYERS, num_blocks_per_layer=1)

        best = min(range(8, 2 * width + 1), key=lambda h: abs(_realnvp_count(dim, h) - target_parameters))
        return NflowsDensity(make(best))
    raise Unavailable(f"no nflows equivalent of {flow}")


def _realnvp_count(dim: int, h: int) -> int:
    """Parameters of nflows' SimpleRealNVP(dim, h, 5, 1), without building it."""
    total = 0
    for index in range(NUM_LAYERS):
        kept = (dim + 1) // 2 if index % 2 == 0 else dim // 2  # its masks alternate
        changed = dim - kept
        total += (kept * h + h) + 2 * (h * h + h) + (h * 2 * changed + 2 * changed)
    return total


PEER_BUILDERS: Dict[str, Callable[..., nn.Module]] = {"zuko": build_zuko, "nflows": build_nflows}


# ---------------------------------------------------------------------------
# The shared training loop for the peers (a copy of fit's)
# ---------------------------------------------------------------------------


@dataclass
class Result:
    nll: Optional[torch.Tensor] = None  # per test point, nats, data units
    parameters: int = 0
    seconds: float = 0.0
    epochs: int = 0
    best_epoch: int = -1
    note: str = ""


def _mean_log_prob(log_prob: Callable[[torch.Tensor], torch.Tensor], data: torch.Tensor, batch_size: int) -> float:
    with torch.no_grad():
        return sum(log_prob(chunk).sum().item() for chunk in data.split(batch_size)) / len(data)


def train_peer(
    model: nn.Module, train: torch.Tensor, validation: torch.Tensor, epochs: int, seed: int, patience: int = PATIENCE,
    deadline: Optional[float] = None,
) -> tuple[int, int]:
    """Maximum likelihood on standardised data, exactly as ``fit`` trains ours:
    Adam, cosine schedule over all steps, clipping, early stopping, best weights.
    ``deadline`` (a ``time.perf_counter()`` value): stop after the step that
    passes it, keeping the best weights, as ``fit`` does on Ctrl-C (see
    :func:`time_limit`). Returns (epochs run, best epoch)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    steps_per_epoch = math.ceil(len(train) / BATCH_SIZE)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    best_state, best_value, best_epoch, waited = copy.deepcopy(model.state_dict()), -math.inf, -1, 0
    epoch = 0
    for epoch in range(epochs):
        model.train()
        for batch in torch.randperm(len(train), generator=generator).split(BATCH_SIZE):
            loss = -model.log_prob(train[batch]).mean()
            if not torch.isfinite(loss):
                message = f"peer loss became {loss.item()} in epoch {epoch + 1}; keeping the best weights"
                warnings.warn(message, stacklevel=2)
                model.load_state_dict(best_state)
                return epoch + 1, best_epoch
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
            optimizer.step()
            scheduler.step()
            if deadline is not None and time.perf_counter() > deadline:
                model.load_state_dict(best_state)
                model.eval()
                return epoch + 1, best_epoch
        model.eval()
        value = _mean_log_prob(model.log_prob, validation, 4 * BATCH_SIZE)
        if value > best_value:
            best_value, best_epoch, waited = value, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            waited += 1
            if waited >= patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    return epoch + 1, best_epoch


@contextlib.contextmanager
def time_limit(seconds: Optional[float]):
    """Raise ``KeyboardInterrupt`` in the main thread after ``seconds`` (``None``:
    never): ``fit`` treats it as Ctrl-C in its epoch loop, stops and keeps its
    best weights. One that arrives outside the loop (before the first epoch,
    say) escapes ``fit``: it becomes a ``TimeoutError`` here."""
    if seconds is None:
        yield
        return
    fired = []

    def interrupt(signum, frame):
        fired.append(True)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    except KeyboardInterrupt:
        if not fired:
            raise  # a real Ctrl-C
        raise TimeoutError(f"the time limit of {seconds:.0f} s passed outside fit's epoch loop") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_ours(
    flow: str, train, validation, test, epochs: int, seed: int, patience: int = PATIENCE,
    seconds_limit: Optional[float] = None,
) -> Result:
    """``fit`` with its defaults but ``epochs`` and ``patience``; ``seconds_limit``
    stops it there (:func:`time_limit`), keeping its best weights."""
    start = time.perf_counter()
    with warnings.catch_warnings(), time_limit(seconds_limit):
        warnings.filterwarnings("ignore", message="fit interrupted", category=RuntimeWarning)
        model = fit(
            train, flow=flow, validation_data=validation, epochs=epochs, patience=patience, seed=seed, progress=False
        )
    seconds = time.perf_counter() - start
    with torch.no_grad():
        nll = torch.cat([-model.log_prob(chunk) for chunk in test.split(4 * BATCH_SIZE)]).double()
    history = model.history
    return Result(nll, count_parameters(model), seconds, len(history.validation), history.best_epoch, history.stopped)


def run_peer(
    peer: str, flow: str, train, validation, test, epochs: int, seed: int, target_parameters: int,
    patience: int = PATIENCE, build: Optional[Callable[[int], nn.Module]] = None,
    seconds_limit: Optional[float] = None,
) -> Result:
    """A peer trained by :func:`train_peer` on standardised data, scored in data
    units. ``build(dim)``: the model, instead of ``PEER_BUILDERS[peer]``;
    ``seconds_limit``: stop training there, keeping the best weights."""
    dim = train.shape[1]
    loc, scale = train.mean(0), train.std(0)
    log_det = scale.log().sum().item()  # x = loc + scale * z

    def standardise(x):
        return (x - loc) / scale

    torch.manual_seed(seed)
    if build is not None:
        model = build(dim)
    else:
        model = PEER_BUILDERS[peer](flow, dim, hidden_width(flow, dim), target_parameters)
    start = time.perf_counter()
    deadline = None if seconds_limit is None else start + seconds_limit
    epochs_run, best_epoch = train_peer(
        model, standardise(train), standardise(validation), epochs, seed, patience, deadline
    )
    seconds = time.perf_counter() - start
    with torch.no_grad():
        nll = (
            torch.cat([-model.log_prob(standardise(chunk)) for chunk in test.split(4 * BATCH_SIZE)]).double() + log_det
        )
    return Result(nll, count_parameters(model), seconds, epochs_run, best_epoch)


# ---------------------------------------------------------------------------
# One row: a dataset, a preset and a seed, ours and every peer
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """What one row runs; rows that differ only in ``seed`` are averaged."""

    dataset: str
    flow: str
    seed: int
    epochs: int
    n: int
    patience: int
    peers: tuple

    def settings(self) -> dict:
        """The settings a saved row must share with this run to be reused."""
        return {"epochs": self.epochs, "n": self.n, "patience": self.patience}


@dataclass
class Row:
    dataset: str
    flow: str
    seed: int = 0
    results: Dict[str, Result] = field(default_factory=dict)
    notes: Dict[str, str] = field(default_factory=dict)
    errors: Dict[str, str] = field(default_factory=dict)  # contestant -> what went wrong

    def to_json(self) -> dict:
        results = {
            name: {**{k: v for k, v in vars(r).items() if k != "nll"},
                   "nll": None if r.nll is None else r.nll.tolist()}
            for name, r in self.results.items()
        }
        return {"dataset": self.dataset, "flow": self.flow, "seed": self.seed, "results": results,
                "notes": self.notes, "errors": self.errors}

    @classmethod
    def from_json(cls, data: dict) -> "Row":
        results = {
            name: Result(**{**r, "nll": None if r["nll"] is None else torch.tensor(r["nll"], dtype=torch.float64)})
            for name, r in data["results"].items()
        }
        return cls(data["dataset"], data["flow"], data["seed"], results, data["notes"], dict(data["errors"]))

    def contestants(self) -> set:
        """Everyone this row ran: with a result, a note (unavailable) or an error."""
        return set(self.results) | set(self.notes) | set(self.errors)

    def updated_by(self, newer: "Row") -> "Row":
        """This row with every contestant that ``newer`` ran replaced by ``newer``'s outcome."""
        ran = newer.contestants()

        def keep(outcomes: dict, new: dict) -> dict:
            return {**{k: v for k, v in outcomes.items() if k not in ran}, **new}

        return Row(self.dataset, self.flow, self.seed, keep(self.results, newer.results),
                   keep(self.notes, newer.notes), keep(self.errors, newer.errors))


def load_data(name: str, n: int, seed: int):
    data = datasets.digits(seed=seed) if name == "digits" else datasets.load_dataset(name, n, seed=seed)
    return datasets.split(data, seed=seed)


def run_row(job: Job) -> Row:
    """Ours, then every peer, on one seeded split; failures are kept as errors, not raised."""
    train, validation, test = load_data(job.dataset, job.n, job.seed)
    row = Row(job.dataset, job.flow, job.seed)
    try:
        row.results["ours"] = run_ours(job.flow, train, validation, test, job.epochs, job.seed, job.patience)
    except Exception as error:  # report it, run the other rows
        row.errors["ours"] = f"{type(error).__name__}: {error}"
        return row
    for peer in job.peers:
        try:
            row.results[peer] = run_peer(
                peer, job.flow, train, validation, test, job.epochs, job.seed, row.results["ours"].parameters,
                job.patience,
            )
        except Unavailable as reason:
            row.notes[peer] = str(reason)
        except Exception as error:
            row.errors[peer] = f"{type(error).__name__}: {error}"
    return row


def _configure_process(threads: int) -> None:
    """What every process running rows sets first: the main one and each worker."""
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", category=UserWarning)


def _configure_worker(threads: int) -> None:
    """A worker also ends when the main process does, however that ended: a
    main process killed outright (``kill``, SIGKILL) leaves its pool's workers
    running their rows, and those already queued, for nobody."""
    _configure_process(threads)
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _interrupt_on_sigterm() -> None:
    """``kill`` (SIGTERM) stops the main process the way Ctrl-C does: the
    finished rows are kept and the pool is shut down."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def run_jobs(jobs: Sequence[Job], workers: int, threads: int, out: Optional[str], settings: dict) -> List[Row]:
    """Every job, ``workers`` processes at a time, each row printed and (with
    ``out``) appended to a JSON-lines file as it finishes, so that a run killed
    half way keeps its rows and a rerun with the same ``out`` skips them."""
    def record(row: Row) -> None:
        print(_row_line([row]), flush=True)
        for name, error in row.errors.items():
            print(f"    ERROR {name}: {error}", flush=True)
        if out is not None:
            with open(out, "a") as handle:
                handle.write(json.dumps({"settings": settings, "row": row.to_json()}) + "\n")

    rows: List[Row] = []
    if not jobs:
        return rows
    if workers <= 1:
        for job in jobs:
            print(f"  {job.dataset} {job.flow} seed {job.seed} ...", file=sys.stderr, flush=True)
            rows.append(run_row(job))
            record(rows[-1])
        return rows
    context = multiprocessing.get_context("spawn")  # no forked torch thread pools
    _interrupt_on_sigterm()
    with concurrent.futures.ProcessPoolExecutor(workers, context, _configure_worker, (threads,)) as pool:
        pending = [pool.submit(run_row, job) for job in jobs]
        try:
            for future in concurrent.futures.as_completed(pending):
                rows.append(future.result())
                record(rows[-1])
        except KeyboardInterrupt:
            print(f"\ninterrupted: {len(rows)} of {len(jobs)} rows finished"
                  + (f" and kept in {out}" if out else ""), file=sys.stderr, flush=True)
            pool.shutdown(wait=False, cancel_futures=True)
            for worker in multiprocessing.active_children():  # their rows are lost anyway: do not wait
                worker.terminate()
            raise
    return rows


def read_rows(out: str, settings: dict) -> List[Row]:
    """The rows a previous run with the same settings left in ``out``."""
    rows, other = [], 0
    with open(out) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # the last line of a run killed while writing
                print(f"  {out}:{number}: not a complete row, ignored", file=sys.stderr)
                continue
            if entry["settings"] != settings:
                other += 1
                continue
            rows.append(Row.from_json(entry["row"]))
    if other:
        print(f"  {out}: {other} rows were run with other settings than {settings} and are not used", file=sys.stderr)
    return rows


# ---------------------------------------------------------------------------
# The table: one line per dataset and preset, averaged over seeds
# ---------------------------------------------------------------------------


def _unit(dataset: str) -> tuple[str, float]:
    return ("bits", 1 / math.log(2)) if dataset == "checkerboard" else ("nats", 1.0)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _has(row: Row, name: str) -> bool:
    result = row.results.get(name)
    return result is not None and result.nll is not None


def compare(rows: Sequence[Row], peer: str) -> Optional[tuple[float, float, int, int]]:
    """``peer - ours`` in the rows' unit, over the seeds where both ran:
    (mean, standard error, seeds where ours is better, seeds).

    One seed: the paired difference per test point and its standard error,
    which covers test-point noise only. Several seeds: the mean over seeds of
    each seed's mean difference, and the standard error of that mean from
    the spread between seeds, which covers the whole noise of a seed (its
    data, split, initialisation, and where early stopping fired).
    """
    factor = _unit(rows[0].dataset)[1]
    differences = [(row.results[peer].nll - row.results["ours"].nll) * factor
                   for row in rows if _has(row, "ours") and _has(row, peer)]
    if not differences:
        return None
    means = torch.stack([d.mean() for d in differences])
    if len(differences) == 1:
        se = differences[0].std().item() / math.sqrt(len(differences[0]))
    else:
        se = means.std().item() / math.sqrt(len(means))
    return means.mean().item(), se, int((means > 0).sum()), len(means)


def verdict(rows: Sequence[Row]) -> tuple[List[str], str]:
    """Per-peer 'difference ± SE' cells and PASS / worse for one dataset and preset."""
    cells, worse = [], []
    for peer in PEERS:
        comparison = compare(rows, peer)
        if comparison is None:
            cells.append(DASH)
            continue
        mean, se, won, seeds = comparison
        cells.append(f"{mean:+.3f}±{se:.3f}" + (f" ({won}/{seeds})" if seeds > 1 else ""))
        if not math.isfinite(mean) or mean < -2 * se:
            worse.append(peer)
    if not any(_has(row, "ours") for row in rows):
        return cells, "ERROR"
    if all(cell == DASH for cell in cells):
        return cells, DASH
    return cells, "PASS" if not worse else "worse than " + ", ".join(worse)


def _mean(values: List[float], digits: Optional[int]) -> str:
    """The mean to ``digits`` decimals (None: 1 below 10, else 0), or a dash for none."""
    if not values:
        return DASH
    mean = sum(values) / len(values)
    return f"{mean:.{digits if digits is not None else (1 if mean < 10 else 0)}f}"


def _score(rows: Sequence[Row], name: str) -> str:
    factor = _unit(rows[0].dataset)[1]
    return _mean([row.results[name].nll.mean().item() * factor for row in rows if _has(row, name)], 3)


def _row_line(rows: Sequence[Row]) -> str:
    """One seed's row (or several seeds'), as printed while the table runs."""
    unit = _unit(rows[0].dataset)[0]
    cells, outcome = verdict(rows)
    parts = [f"{name} {_score(rows, name)}" for name in ["ours", *PEERS]]
    seconds = "/".join(f"{r.seconds:.0f}" for r in rows[0].results.values())
    seeds = " ".join(str(row.seed) for row in rows)
    return (f"  {rows[0].dataset} {rows[0].flow} seed {seeds} ({unit}): " + ", ".join(parts)
            + f"; peer-ours {', '.join(cells)}; {seconds} s; {outcome}")


def group(rows: Sequence[Row]) -> List[List[Row]]:
    """Rows by (dataset, preset), in first-seen order, each sorted by seed."""
    groups: Dict[tuple, List[Row]] = {}
    for row in rows:
        groups.setdefault((row.dataset, row.flow), []).append(row)
    return [sorted(members, key=lambda row: row.seed) for members in groups.values()]


def print_table(rows: Sequence[Row]) -> tuple[int, int]:
    headers = ["dataset", "flow", "seeds", "ours", "zuko", "nflows", "zuko-ours", "nflows-ours",
               "params o/z/n", "seconds o/z/n", "epochs o/z/n", "result"]
    lines, passed, total = [], 0, 0
    for members in group(rows):
        first = members[0]
        unit = _unit(first.dataset)[0]
        cells, outcome = verdict(members)
        if outcome != DASH:
            total += 1
            passed += outcome == "PASS"
        names = ["ours", *PEERS]

        def per(name: str, value: Callable[[Result], float], digits: Optional[int]) -> str:
            return _mean([value(row.results[name]) for row in members if name in row.results], digits)

        lines.append(
            [first.dataset + (" (bits)" if unit == "bits" else ""), first.flow, str(len(members))]
            + [_score(members, name) for name in names]
            + cells
            + ["/".join(f"{first.results[name].parameters / 1000:.1f}k" if name in first.results else DASH
                        for name in names)]
            + ["/".join(per(name, lambda r: r.seconds, None) for name in names)]
            + ["/".join(per(name, lambda r: r.epochs, 0) for name in names)]
            + [outcome]
        )
    print(_table(headers, lines))
    return passed, total


def run_target(seed: int) -> None:
    """fit(checkerboard train, flow="nsf") with its defaults: <= 5.10 test bits in < 10 minutes."""
    data = datasets.checkerboard(100_000, seed=seed)
    train, _, test = datasets.split(data, seed=seed)
    torch.manual_seed(seed)
    start = time.perf_counter()
    model = fit(train, flow="nsf", progress=False)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        bits = -model.log_prob(test).mean().item() / math.log(2)
    ok = bits <= TARGET_BITS and seconds <= TARGET_SECONDS
    history = model.history
    print(
        f"\ncheckerboard target: fit(checkerboard train (80,000 rows), flow='nsf') with defaults: "
        f"{bits:.3f} test bits (true entropy {datasets.CHECKERBOARD_ENTROPY_BITS:.2f}) in {seconds:.0f} s, "
        f"{len(history.validation)} epochs (best {history.best_epoch + 1}; {history.stopped}) -- "
        f"target <= {TARGET_BITS:.2f} bits in < {TARGET_SECONDS / 60:.0f} min: {'PASS' if ok else 'FAIL'}"
    )


def _parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=None, help=f"any of {TOYS + ['digits']} (default: all)")
    parser.add_argument(
        "--flows", nargs="+", default=None, choices=FLOWS, help="presets (default: all; digits: maf nsf)"
    )
    parser.add_argument("--peers", nargs="*", default=PEERS, choices=PEERS, help="peers to run (default: both)")
    parser.add_argument("--epochs", type=int, default=None, help="epoch cap for every model (default 100; --quick 20)")
    parser.add_argument(
        "--n", type=int, default=None, help="points drawn from each 2-D toy (default 10000; --quick 5000)"
    )
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=[0],
        help="data, split and initialisation seeds; each row is averaged over them (default: 0)",
    )
    parser.add_argument(
        "--patience", type=int, default=PATIENCE,
        help=f"early-stopping patience for ours and the peers alike (default: fit's, {PATIENCE})",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    parser.add_argument("--jobs", type=int, default=1, help="rows run at once, one process each (default 1)")
    parser.add_argument(
        "--out", default=None,
        help="JSON-lines file each finished row is appended to; rerunning with the same file and settings "
             "skips the rows already in it (resume an interrupted table, or add seeds)",
    )
    parser.add_argument(
        "--rerun", action="store_true",
        help="run the rows asked for even if --out has them; each contestant run replaces its earlier outcome "
             "(so --rerun --peers, with no peers, re-scores ours after a change and keeps the peers' rows)",
    )
    parser.add_argument(
        "--report", action="store_true",
        help="run nothing: print the table of the rows already in --out (say, while another run fills it)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: checkerboard, two_moons and digits, few epochs"
    )
    parser.add_argument(
        "--target", action="store_true", help="also run the checkerboard nsf target with fit's defaults"
    )
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Stop with a usage error (exit status 2) on flags that contradict each other or make no sense."""
    if args.jobs < 1 or args.threads < 1:
        parser.error(f"--jobs and --threads must be at least 1, got {args.jobs} and {args.threads}")
    if args.rerun and args.report:
        parser.error("--rerun runs rows and --report runs none: give one of them")
    if args.report and not (args.out and os.path.exists(args.out)):
        parser.error("--report prints the rows kept in --out FILE; give an existing FILE")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds repeats a seed: {args.seeds}")


def _sizes(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[int, int, List[str]]:
    """The epoch cap, the toys' point count and the datasets, defaults (``--quick``'s or the full run's) filled in."""
    epochs = args.epochs or (20 if args.quick else 100)
    n = args.n or (5_000 if args.quick else datasets.DEFAULT_N)
    names = args.datasets or (["checkerboard", "two_moons", "digits"] if args.quick else TOYS + ["digits"])
    unknown = sorted(set(names) - set(TOYS) - {"digits"})
    if unknown:
        parser.error(f"unknown datasets {unknown}; known: {TOYS + ['digits']}")
    return epochs, n, names


def _print_header(args: argparse.Namespace, epochs: int, n: int) -> None:
    """Print the versions, the settings, the platform and the machine's load."""
    print(
        f"pyro_nflows density estimation vs zuko and nflows ({library_versions({'zuko': 'zuko', 'nflows': 'nflows'})})"
    )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"epochs<={epochs} (patience {args.patience})  batch {BATCH_SIZE}  lr {LR} cosine  "
        f"toys n={n} (80/10/10 split)  "
        f"seeds {' '.join(map(str, args.seeds))}  {args.jobs} processes x {args.threads} threads  "
        f"load {load:.2f} on {os.cpu_count()} cores  {platform.python_implementation()} {platform.python_version()}"
    )
    print("scores: test negative log-likelihood per point, lower is better (nats; checkerboard in bits, truth 5.00)\n",
          flush=True)


def _make_jobs(args: argparse.Namespace, names: Sequence[str], epochs: int, n: int) -> List[Job]:
    """Every row asked for, in the table's order: by dataset, then preset, then seed."""
    return [
        Job(name, flow, seed, epochs, n, args.patience, tuple(args.peers))
        for name in names
        for flow in (args.flows or (DIGITS_FLOWS if name == "digits" else FLOWS))
        for seed in args.seeds
    ]


def _key(item: Job | Row) -> tuple:
    """A row's or a job's place in the table: (dataset, preset, seed)."""
    return (item.dataset, item.flow, item.seed)


def _add(done: Dict[tuple, Row], row: Row) -> None:
    """Keep ``row`` in ``done``; a contestant run twice: its later outcome."""
    key = _key(row)
    done[key] = done[key].updated_by(row) if key in done else row


def _reuse_saved(done: Dict[tuple, Row], out: str, settings: dict) -> None:
    """Add to ``done`` the rows that ``out`` already has with these settings."""
    for row in read_rows(out, settings):
        _add(done, row)
    print(f"  {out}: {len(done)} rows already run with these settings are reused\n", file=sys.stderr)


def _todo(args: argparse.Namespace, jobs: List[Job], done: Dict[tuple, Row]) -> List[Job]:
    """The jobs to run: none with --report, all with --rerun, else those not in ``done``."""
    if args.report:
        todo = []
    elif args.rerun:
        todo = jobs  # the same list: the sort below reorders the table as well
    else:
        todo = [job for job in jobs if _key(job) not in done]
    if args.jobs > 1:  # the longest rows first, so that no process is left with one at the end
        todo.sort(key=lambda job: job.dataset != "digits")
    return todo


def _in_order(jobs: Sequence[Job], done: Dict[tuple, Row]) -> List[Row]:
    """The rows asked for that have run, in the order asked for."""
    # A table in the order asked for, whichever process finished first.
    return [done[key] for key in (_key(j) for j in jobs) if key in done]


def _print_legend(rows: Sequence[Row], many: bool) -> None:
    """Print what the columns mean, then the peers that did not run and why."""
    print(
        "\nzuko-ours, nflows-ours: mean paired difference of test NLL per point ± its standard error "
        + ("over seeds (in brackets: the seeds where ours is better)" if many else "over test points")
        + " (> 0: ours is better); PASS: ours <= every peer + 2 SE."
    )
    print("params: ours/zuko/nflows; seconds, epochs: training wall time and epochs run before early stopping"
          + (", means over seeds." if many else "."))
    for row in rows:
        for peer, note in row.notes.items():
            print(f"  {row.dataset} {row.flow} seed {row.seed}: {peer} {DASH} {note}")


def _errors(rows: Sequence[Row]) -> List[str]:
    """Every contestant run that failed, one line each."""
    return [
        f"{row.dataset} {row.flow} seed {row.seed} {name}: {error}"
        for row in rows
        for name, error in row.errors.items()
    ]


def _print_summary(passed: int, total: int, errors: Sequence[str]) -> None:
    """Print how many rows passed, then every error."""
    print(f"Rows: {passed}/{total} PASS")
    for error in errors:
        print(f"  ERROR {error}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the rows the command line asks for (or reuse them from --out), print the table; return the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    _configure_process(args.threads)
    epochs, n, names = _sizes(parser, args)
    _print_header(args, epochs, n)

    start = time.perf_counter()
    jobs = _make_jobs(args, names, epochs, n)
    settings = jobs[0].settings() if jobs else {}
    done: Dict[tuple, Row] = {}
    if args.out and os.path.exists(args.out):
        _reuse_saved(done, args.out, settings)
    for row in run_jobs(_todo(args, jobs, done), args.jobs, args.threads, args.out, settings):
        _add(done, row)
    rows = _in_order(jobs, done)

    print()
    passed, total = print_table(rows)
    _print_legend(rows, many=len(args.seeds) > 1)
    errors = _errors(rows)
    _print_summary(passed, total, errors)
    if args.report and len(rows) < len(jobs):
        print(f"  --report: {len(jobs) - len(rows)} of the {len(jobs)} rows asked for are not in {args.out} yet")
    if args.target and not args.report:
        run_target(args.seeds[0])
    print(f"({time.perf_counter() - start:.0f} s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
