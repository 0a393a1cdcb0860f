r"""Image density estimation: test bits/dim on scikit-learn's 8 x 8 digits (or MNIST-5k), the
four invertible convolutions of ``pyro_nflows.images.fit_images`` against normflows' Glow.

Run from the repository root::

    python benchmarks/images.py                    # seed 0, every row
    python benchmarks/images.py --seeds 0 1 2 --jobs 2 --out images.jsonl   # three seeds, resumable
    python benchmarks/images.py --quick            # smoke run: 2 epochs of small models (~1 min)
    python benchmarks/images.py --rows lu periodic --epochs 20 --hidden-channels 16
    python benchmarks/images.py --dataset mnist5k --rows lu emerging normflows --epochs 10 --jobs 2

**What is compared.** Every row is Glow (Kingma & Dhariwal 2018) with
``--levels`` levels of ``--steps`` steps (actnorm, an invertible
convolution, an affine coupling with a conv net; half the channels factored
out per level) on the digits as ``(1, 8, 8)`` images of 17 values, or with
``--dataset mnist5k`` on ``datasets.mnist_5k(images=True)``, ``(1, 28, 28)``
images of 256 values (4,000 / 500 / 500 after the split):

- ``lu``, ``qr``, ``emerging``, ``periodic``: ours,
  ``fit_images(train, levels, steps, conv, num_bits=log2(17),
  validation_data=validation, epochs=E, seed=S, hidden_channels=h)``, every
  other setting its default (uniform dequantisation, the logit pixel map,
  Adam at 1e-3 with a cosine schedule, batch 64, clipping at 5, patience 30,
  best weights), with ``conv`` ``"conv1x1_lu"``, ``"conv1x1_qr"``,
  ``"emerging"`` (``direction="maf"``) and ``"periodic"``;
- ``normflows``: normflows' ``MultiscaleFlow`` of ``GlowBlock``s (its affine
  coupling with the sigmoid scale, its LU 1x1 convolution, its actnorm),
  ``Squeeze`` and ``Merge``, with Glow's learned base per level
  (``GlowBase``), as normflows' Glow example builds it.

**The same budget.** ``--hidden-channels`` (``h``) sets the ``lu`` row;
every other row takes the hidden width whose parameter count is closest to
the ``lu`` row's (the counts are printed). **The same loop.** The
normflows model is trained by :func:`train_peer`, built from the pieces
``fit_images`` uses (``pyro_nflows.training.EpochLoop``, ``gradient_step``,
``check_loss``) and copying what ``fit_images`` does around them: the same
split (``datasets.split`` with seed 0), the same data-dependent actnorm
start (a no-grad pass over 256 training images), each epoch's uniform
dequantisation noise drawn for every training image before the shuffle
from a generator seeded by the seed, the validation images' one fixed draw
(seed 0), Adam with ``foreach=True`` at the same rate and the same cosine
schedule, batch size, clipping, epochs, early stopping and best weights.
It sees the images through our :class:`~pyro_nflows.images.PixelMap` (the
logit of ``0.05 + 0.9 x / 17``, its log-determinant added back), so that
every row models the same variable and only the flows differ.

**The score.** Test bits per dimension of the test images (180 digits, 500
MNIST-5k images; lower is better): ``bits_per_dim(model, test)``, one draw
of uniform noise per image from a generator seeded 0 (the same draw for
every row), the bound ``-log p(k + u) / (D ln 2)``, ``D`` the pixels of an
image. With ``--seeds``, each row's mean and the
standard error over seeds, and ``row - normflows`` paired by seed, with the
seeds the row wins. Seconds are wall time and inflated by whatever shares the
machine.

The table is a report, not a test: the exit status is 0 unless a run errors.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable

# Benchmark the checkout this file lives in, installed or not.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_ROOT, "pyro_nflows")) and _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.common import library_versions  # noqa: E402
from pyro_nflows import datasets  # noqa: E402
from pyro_nflows.images import ImageDensityModel, PixelMap, bits_per_dim, fit_images  # noqa: E402
from pyro_nflows.training import EpochLoop, check_loss, gradient_step  # noqa: E402

CONVS = {"lu": "conv1x1_lu", "qr": "conv1x1_qr", "emerging": "emerging", "periodic": "periodic"}
ROWS = [*CONVS, "normflows"]
PEER = "normflows"


@dataclass(frozen=True)
class Images:
    """A data set of the benchmark: its images' shape, their bits per pixel and how to load them."""

    description: str
    shape: tuple[int, int, int]
    num_bits: float
    load: Callable[[], torch.Tensor]


DATASETS = {
    "digits": Images("digits as 1 x 8 x 8 images, 17 values", (1, 8, 8), datasets.DIGITS_BITS, datasets.digits_images),
    "mnist5k": Images("MNIST-5k as 1 x 28 x 28 images, 256 values", (1, 28, 28), 8.0,
                      lambda: datasets.mnist_5k(images=True)),
}
LR, BATCH_SIZE, CLIP_NORM, PATIENCE = 1e-3, 64, 5.0, 30  # fit_images' defaults
SPLIT_SEED, VALIDATION_NOISE_SEED, TEST_NOISE_SEED = 0, 0, 0


class Unavailable(Exception):
    """normflows is not installed."""


def count_parameters(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters() if parameter.requires_grad)


# ---------------------------------------------------------------------------
# normflows' Glow, on the pixel map's space
# ---------------------------------------------------------------------------


class PeerDensity(nn.Module):
    """normflows' multi-scale Glow as a density on pixel values: ``log_prob(x)`` of dequantised images."""

    def __init__(self, flow: nn.Module, num_bits: float):
        super().__init__()
        self.flow = flow
        self.pixels = PixelMap(round(2**num_bits))

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pixels.inv(x)
        return self.flow.log_prob(y, None) - self.pixels.log_abs_det_jacobian(y, x)


def build_normflows(data: Images, levels: int, steps: int, hidden_channels: int) -> PeerDensity:
    """normflows' Glow as its example assembles it (levels from the coarsest, each ``steps`` GlowBlocks
    and a Squeeze; a Merge between levels; Glow's learned base per level)."""
    try:
        import normflows as nf
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise Unavailable(f"normflows not installed ({error}); pip install normflows") from None
    channels, height, width = data.shape
    bases, flows, merges = [], [], []
    for level in range(levels):
        blocks = [nf.flows.GlowBlock(channels * 2 ** (levels + 1 - level), hidden_channels, split_mode="channel",
                                     scale=True) for _ in range(steps)]
        flows.append([*blocks, nf.flows.Squeeze()])
        if level > 0:
            merges.append(nf.flows.Merge())
            shrink = 2 ** (levels - level)
            latent = (channels * shrink, height // shrink, width // shrink)
        else:
            latent = (channels * 2 ** (levels + 1), height // 2**levels, width // 2**levels)
        bases.append(nf.distributions.GlowBase(latent))
    return PeerDensity(nf.MultiscaleFlow(bases, flows, merges, class_cond=False), data.num_bits)


def build_ours(data: Images, conv: str, levels: int, steps: int, hidden_channels: int) -> ImageDensityModel:
    return ImageDensityModel(*data.shape, levels, steps, CONVS[conv], hidden_channels=hidden_channels,
                             num_bits=data.num_bits)


def matched_width(data: Images, row: str, levels: int, steps: int, target: int) -> int:
    """The hidden width of ``row`` whose parameter count is closest to ``target``."""
    def count(width: int) -> int:
        build = build_normflows if row == PEER else functools.partial(build_ours, conv=row)
        model = build(data, levels=levels, steps=steps, hidden_channels=width)
        return count_parameters(model)

    low, high = 2, 512
    while high - low > 1:  # parameter counts grow with the width
        middle = (low + high) // 2
        low, high = (middle, high) if count(middle) < target else (low, middle)
    return min((low, high), key=lambda width: abs(count(width) - target))


# ---------------------------------------------------------------------------
# The shared loop for the peer (fit_images' own, from the same pieces)
# ---------------------------------------------------------------------------


def _validation_bound(model: PeerDensity, images: torch.Tensor, noise: torch.Tensor) -> float:
    with torch.no_grad():
        return sum(model.log_prob(chunk + draw).double().sum().item()
                   for chunk, draw in zip(images.split(4 * BATCH_SIZE), noise.split(4 * BATCH_SIZE))) / len(images)


def train_peer(model: PeerDensity, train: torch.Tensor, validation: torch.Tensor, epochs: int, seed: int,
               patience: int = PATIENCE) -> EpochLoop:
    """Maximum likelihood on uniformly dequantised images, as ``fit_images`` trains ours."""
    generator = torch.Generator().manual_seed(seed)
    validation_noise = torch.rand(validation.shape, generator=torch.Generator().manual_seed(VALIDATION_NOISE_SEED))
    chosen = torch.randperm(len(train), generator=generator)[: 4 * BATCH_SIZE]
    with torch.no_grad():  # the actnorm layers' data-dependent start
        model.log_prob(train[chosen] + torch.rand(train[chosen].shape, generator=generator))
    batches = math.ceil(len(train) / BATCH_SIZE)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR, foreach=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * batches)
    loop = EpochLoop(model, epochs, patience, metric="validation bound", name="train_peer", progress=False)
    with loop:
        for epoch in loop:
            model.train()
            noisy = train + torch.rand(train.shape, generator=generator)
            total = 0.0
            for batch in torch.randperm(len(train), generator=generator).split(BATCH_SIZE):
                loss = -model.log_prob(noisy[batch]).mean()
                check_loss(loss.item(), epoch)
                gradient_step(loss, optimizer, model.parameters(), CLIP_NORM)
                scheduler.step()
                total -= loss.item() * len(batch)
            model.eval()
            loop.record(epoch, total / len(train), _validation_bound(model, validation, validation_noise))
    return loop


def peer_bits_per_dim(model: PeerDensity, test: torch.Tensor) -> float:
    """``bits_per_dim``'s number for the peer: the same noise (one draw per image, seed 0, 256 at a time)."""
    generator = torch.Generator().manual_seed(TEST_NOISE_SEED)
    with torch.no_grad():
        total = sum(model.log_prob(chunk + torch.rand((1, *chunk.shape), generator=generator)[0]).double().sum().item()
                    for chunk in test.split(256))
    return -total / (test.numel() * math.log(2))


# ---------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------


@dataclass
class Result:
    row: str
    seed: int
    settings: dict
    hidden_channels: int
    parameters: int
    bits: float
    epochs: int
    best_epoch: int
    seconds: float
    stopped: str


def run_row(row: str, seed: int, settings: dict, hidden_channels: int, threads: int) -> Result:
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message=".*torch.lu is deprecated")  # normflows' LU, every step
    data = DATASETS[settings["dataset"]]
    train, validation, test = datasets.split(data.load(), (0.8, 0.1, 0.1), seed=SPLIT_SEED)
    epochs, levels, steps = settings["epochs"], settings["levels"], settings["steps"]
    start = time.perf_counter()
    if row == PEER:
        torch.manual_seed(seed)
        model = build_normflows(data, levels, steps, hidden_channels)
        history = train_peer(model, train, validation, epochs, seed).history
        bits = peer_bits_per_dim(model, test)
    else:
        model = fit_images(train, levels, steps, CONVS[row], num_bits=data.num_bits, epochs=epochs,
                           validation_data=validation, seed=seed, progress=False, hidden_channels=hidden_channels)
        history = model.history
        bits = bits_per_dim(model, test)
    seconds = time.perf_counter() - start
    return Result(row, seed, settings, hidden_channels, count_parameters(model), bits, len(history.validation),
                  history.best_epoch, seconds, history.stopped)


# ---------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------


def _mean_and_error(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values) / math.sqrt(len(values)):.4f}"


def table(results: list[Result], rows: list[str]) -> str:
    by_row = {row: {result.seed: result for result in results if result.row == row} for row in rows}
    peer = by_row.get(PEER, {})
    lines = ["| row | hidden | parameters | test bits/dim | row - normflows | wins | epochs (best) | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        done = by_row[row]
        if not done:
            continue
        seeds = sorted(done)
        bits = [done[seed].bits for seed in seeds]
        paired = [done[seed].bits - peer[seed].bits for seed in seeds if seed in peer]
        difference = wins = "—"
        if row != PEER and paired:
            difference = ("+" if statistics.mean(paired) >= 0 else "") + _mean_and_error(paired)
            wins = f"{sum(value < 0 for value in paired)} of {len(paired)}"
        first = done[seeds[0]]
        epochs = ", ".join(f"{done[seed].epochs} ({done[seed].best_epoch + 1})" for seed in seeds)
        seconds = statistics.mean(done[seed].seconds for seed in seeds)
        lines.append(f"| {row} | {first.hidden_channels} | {first.parameters} | {_mean_and_error(bits)} | "
                     f"{difference} | {wins} | {epochs} | {seconds:.0f} |")
    return "\n".join(lines)


def _saved(path: str | None, settings: dict) -> list[Result]:
    if path is None or not os.path.exists(path):
        return []
    with open(path) as file:
        kept = [Result(**json.loads(line)) for line in file if line.strip()]
    return [result for result in kept if result.settings == settings]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="digits", help="(default: digits)")
    parser.add_argument("--levels", type=int, default=2, help="1, 2 or 3 on 8 x 8 images, 1 or 2 on 28 x 28 "
                        "(default: 2)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--hidden-channels", type=int, default=32, help="the lu row's; the others match its size")
    parser.add_argument("--jobs", type=int, default=1, help="rows run at once, one process each")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job")
    parser.add_argument("--out", default=None, help="JSON-lines file of finished rows: reused, and appended to")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 epochs, 1 step, 8 hidden channels")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.steps, args.hidden_channels = 2, 1, 8
    settings = {"dataset": args.dataset, "epochs": args.epochs, "levels": args.levels, "steps": args.steps,
                "lu_hidden": args.hidden_channels}
    data = DATASETS[args.dataset]
    print(library_versions({"pyro": "pyro-ppl", "normflows": "normflows"}))
    print(f"{data.description}; glow {args.levels} levels x {args.steps} steps; "
          f"{args.epochs} epochs; seeds {args.seeds}")

    target = count_parameters(build_ours(data, "lu", args.levels, args.steps, args.hidden_channels))
    widths = {}
    for row in args.rows:
        try:
            widths[row] = (args.hidden_channels if row == "lu"
                           else matched_width(data, row, args.levels, args.steps, target))
        except Unavailable as error:
            print(f"{row}: skipped ({error})")
    results = _saved(args.out, settings)
    done = {(result.row, result.seed) for result in results}
    jobs = [(row, seed) for seed in args.seeds for row in widths if (row, seed) not in done]
    print(f"{len(results)} rows reused from {args.out}; {len(jobs)} to run" if results else f"{len(jobs)} rows to run")
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_row, row, seed, settings, widths[row], args.threads): (row, seed)
                   for row, seed in jobs}
        for future in concurrent.futures.as_completed(futures):
            result = future.result()
            results.append(result)
            print(f"  {result.row} seed {result.seed}: {result.bits:.4f} bits/dim, {result.parameters} parameters, "
                  f"{result.epochs} epochs, {result.seconds:.0f} s", flush=True)
            if args.out is not None:
                with open(args.out, "a") as file:
                    file.write(json.dumps(asdict(result)) + "\n")
    print(table(results, [row for row in ROWS if row in widths]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
