"""The ``pyro-nflows`` command.

::

    pyro-nflows fit                          # two moons, the default flow
    pyro-nflows fit data.csv -o model.pt     # your own data (.csv or .npy)
    pyro-nflows fit --dataset checkerboard --flow "actnorm+lu_linear+elementwise_spline:2" --layers 8
    pyro-nflows flows                        # the flows a --flow spec can name
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import torch

from pyro_nflows import datasets
from pyro_nflows.density import DEFAULT_FLOW, fit
from pyro_nflows.registry import available_flows

__all__ = ["main"]


def _fit(args: argparse.Namespace) -> int:
    if args.file is not None:
        data = datasets.load_array(args.file)
        source = str(args.file)
    else:
        data = datasets.load_dataset(args.dataset, n=args.n, seed=args.seed)
        source = f"dataset {args.dataset!r}"
    train, validation, test = datasets.split(data, (0.8, 0.1, 0.1), seed=args.seed)
    print(f"{source}: {len(data)} rows x {data.shape[1]} columns -> train {len(train)}, validation {len(validation)}, test {len(test)}")
    print(f"flow: {args.layers} x ({args.flow})")
    model = fit(
        train,
        flow=args.flow,
        num_layers=args.layers,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        validation_data=validation,
        patience=args.patience,
        seed=args.seed,
        progress=not args.no_progress,
    )
    with torch.no_grad():
        train_ll = model.log_prob(train).mean().item()
        test_ll = model.log_prob(test).mean().item()
    print(f"stopped: {model.history.stopped} (best epoch {model.history.best_epoch + 1})")
    print(f"train log-likelihood per point: {train_ll:.4f} nats")
    print(f"test  log-likelihood per point: {test_ll:.4f} nats")
    model.save(args.output)
    print(f"model written to {args.output}")
    return 0


def _flows(args: argparse.Namespace) -> int:
    print(available_flows())
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyro-nflows", description="Normalizing flows for Pyro.")
    commands = parser.add_subparsers(dest="command", required=True)

    fit_parser = commands.add_parser("fit", help="fit a flow density to data and save it")
    fit_parser.add_argument("file", nargs="?", type=Path, help="a .csv or .npy file of rows (default: a built-in dataset)")
    fit_parser.add_argument("--dataset", default="two_moons", choices=sorted(datasets.DATASETS), help="built-in dataset (default: two_moons)")
    fit_parser.add_argument("--n", type=int, default=None, help="rows to generate for a built-in dataset")
    fit_parser.add_argument("--flow", default=DEFAULT_FLOW, help=f"spec of one layer (default: {DEFAULT_FLOW}); see `pyro-nflows flows`")
    fit_parser.add_argument("--layers", type=int, default=5, help="number of stacked layers (default: 5)")
    fit_parser.add_argument("--epochs", type=int, default=40, help="maximum epochs (default: 40)")
    fit_parser.add_argument("--batch-size", type=int, default=256)
    fit_parser.add_argument("--lr", type=float, default=3e-3)
    fit_parser.add_argument("--patience", type=int, default=10, help="epochs without improvement before stopping")
    fit_parser.add_argument("--seed", type=int, default=0)
    fit_parser.add_argument("-o", "--output", type=Path, default=Path("model.pt"), help="where to write the model (default: model.pt)")
    fit_parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    fit_parser.set_defaults(run=_fit)

    flows_parser = commands.add_parser("flows", help="list the flows a spec can name")
    flows_parser.set_defaults(run=_flows)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"pyro-nflows: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
