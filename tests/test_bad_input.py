"""A catalogue of bad input, as a careless or hostile user gives it.

Each row of ``CASES`` is one bad input (through the Python API or the
command line), the error class it must raise, and a regex its message must
match; the regex names the culprit (the file, the row and column, the
option, the value). Command-line rows are run twice: through the command's
function, for the class, and through ``main``, which must turn the error
into one line, ``pyro-nflows: error: ...``, and exit status 2 (no traceback).

Add a row for every new kind of bad input found; ``test_the_catalogue_covers``
counts them per class.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from pyro_nflows import datasets
from pyro_nflows.cli import _parser, main
from pyro_nflows.datasets import load_array
from pyro_nflows.density import check_data, fit, load
from pyro_nflows.saving import checksum
from pyro_nflows.vae import VAE, train_vae

MOONS = datasets.two_moons(300, seed=0)
FIT = dict(num_layers=1, epochs=1, seed=0, progress=False)  # how the shared checkpoint was made


class Bench:
    """The files a case works on: its own folder ``tmp`` and copies of the
    shared ones (a fitted 2-D model, a VAE, the data, a checkpoint of ``fit(MOONS, **FIT)``)."""

    def __init__(self, tmp: Path, shared: Path):
        self.tmp = tmp
        for name in ("model.pt", "vae.pt", "moons.csv", "run.ckpt"):
            shutil.copy(shared / name, tmp / name)
        self.model, self.vae, self.data, self.checkpoint = (tmp / n for n in ("model.pt", "vae.pt", "moons.csv",
                                                                               "run.ckpt"))

    def __truediv__(self, name: str) -> Path:
        return self.tmp / name

    def write(self, name: str, content) -> Path:
        path = self.tmp / name
        if isinstance(content, np.ndarray):
            np.save(path, content)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return path

    def payload(self, path: Path | None = None) -> dict:
        return torch.load(path or self.model, weights_only=True)

    def rewritten(self, name: str, change: Callable[[dict], None], source: Path | None = None) -> Path:
        """A copy of a model file with ``change`` applied and a checksum that matches (as a hostile file would)."""
        payload = self.payload(source)
        change(payload)
        payload["checksum"] = checksum(payload)
        torch.save(payload, self.tmp / name)
        return self.tmp / name

    def config(self, name: str, source: Path | None = None, **config) -> Path:
        def edit(payload):
            payload["config"] = json.dumps({**json.loads(payload["config"]), **config})

        return self.rewritten(name, edit, source)

    def flipped(self, source: Path, name: str) -> Path:
        """A copy of ``source`` with one bit of one weight flipped."""
        content = bytearray(source.read_bytes())
        payload = self.payload(source)
        state = payload.get("state_dict", payload.get("model"))  # a model file's weights, or a checkpoint's
        weights = max(state.values(), key=lambda tensor: tensor.numel())
        where = content.find(weights.numpy().tobytes())
        assert where > 0
        content[where + 13] ^= 0x20
        return self.write(name, bytes(content))


@dataclass(frozen=True)
class Case:
    """``run(bench)`` does the bad thing (``cli``: it returns the command line's arguments instead)."""

    name: str
    run: Callable[[Bench], object]
    error: type[BaseException]
    match: str
    cli: bool = False
    root_ok: bool = True  # False: root may do it (permissions), skipped as root


def cli(name, argv, error, match, **options) -> Case:
    return Case(name, argv, error, match, cli=True, **options)


class _Evil:
    """A pickle that would create ``marker`` when unpickled (code a model file must never run)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _pickled_code(bench: Bench):
    marker = bench / "code_ran"
    torch.save({"state_dict": _Evil(marker)}, bench / "evil.pt")
    try:
        load(bench / "evil.pt")
    finally:
        assert not marker.exists(), "loading ran code from the file"


def _nan_weights(payload):
    payload["state_dict"] = {key: value * math.nan if value.is_floating_point() else value
                             for key, value in payload["state_dict"].items()}


def _old_format(payload):
    payload["format"] = 5
    del payload["checksum"]


def _moons_with(value, row=7, column=1, dtype=torch.float64):
    data = MOONS.to(dtype).clone()
    data[row, column] = value
    return data


def _noise(size: int) -> bytes:
    """Random bytes, the same every run."""
    return np.random.default_rng(size).bytes(size)


def _tiny_vae_data():
    return (torch.rand(30, 6) > 0.5).float()


def _resume(bench: Bench, data, **changes):
    return fit(data, checkpoint=bench.checkpoint, **{**FIT, **changes})


def _fit_cli(bench: Bench, *extra) -> list[str]:
    return ["fit", str(bench.data), "--no-progress", "--epochs", "1", "--num-layers", "1", *extra]


DATA_FILES = [
    Case("csv cell that overflows float32", lambda b: load_array(b.write("big.csv", "1,2\n3,4\n\n5,1e39\n")),
         ValueError, r"big.csv': row 4, column 2: 1e\+39 overflows float32"),
    Case("npy value that overflows float32", lambda b: load_array(b.write("big.npy", np.array([[1.0, 2], [3, -1e39]]))),
         ValueError, r"big.npy': row 2, column 2: -1e\+39 overflows float32"),
    Case("npy NaN", lambda b: load_array(b.write("nan.npy", np.array([[1.0, 2], [np.nan, 3]]))),
         ValueError, r"nan.npy': 1 NaN or infinite value\(s\), the first at row 2, column 1"),
    Case("csv inf", lambda b: load_array(b.write("inf.csv", "1,2\n3,inf\n")),
         ValueError, "inf.csv': row 2, column 2: 'inf' is not a finite number"),
    Case("csv nan", lambda b: load_array(b.write("nan.csv", "a,b\n1,2\nnan,3\n")),
         ValueError, "nan.csv': row 3, column 1: 'nan' is not a finite number"),
    Case("empty csv", lambda b: load_array(b.write("empty.csv", "")), ValueError, "empty.csv' is empty"),
    Case("header-only csv", lambda b: load_array(b.write("header.csv", "x,y\n")),
         ValueError, r"header.csv' has no data rows \(only a header\)"),
    Case("ragged csv", lambda b: load_array(b.write("ragged.csv", "1,2\n3,4,5\n")),
         ValueError, "ragged.csv': row 2 has 3 values but row 1 has 2"),
    Case("semicolon csv", lambda b: load_array(b.write("semi.csv", "1;2\n3;4\n")),
         ValueError, "semi.csv': row 2, column 1: cannot read '3;4' .*separated by commas"),
    Case("random bytes as npy", lambda b: load_array(b.write("noise.npy", bytes(range(256)))),
         ValueError, "noise.npy' is not a readable .npy array"),
    Case("3-D npy", lambda b: load_array(b.write("cube.npy", np.zeros((2, 3, 4)))),
        ValueError, "cube.npy' holds a 3-D"),
    Case("directory as data", lambda b: load_array(_folder(b, "folder.csv")), IsADirectoryError,
         "folder.csv' is a directory, not a data file"),
    Case("missing data file", lambda b: load_array(b / "missing.csv"), FileNotFoundError, "missing.csv"),
    Case("unknown extension", lambda b: load_array(b.write("data.txt", "1,2\n")),
         ValueError, r"data.txt': unknown file extension '.txt'"),
]

FIT_AND_DATA = [
    Case("NaN row, named as given", lambda b: fit(_moons_with(math.nan, row=11), **FIT),
         ValueError, r"data holds NaN or infinite values in 1 rows \(first rows: \[11\]\) and columns \[1\]"),
    Case("1e200 overflows float32", lambda b: check_data(_moons_with(1e200, row=4)),
         ValueError, r"values that overflow float32.* in 1 rows \(first rows: \[4\]\) and columns \[1\]"),
    Case("1e200 in fit", lambda b: fit(_moons_with(-1e200, row=9, column=0), **FIT),
         ValueError, r"overflow float32.*first rows: \[9\]"),
    Case("1e-50 column", lambda b: fit(torch.stack([MOONS[:, 0].double(), 1e-50 * MOONS[:, 1].double()], 1), **FIT),
         ValueError, r"columns \[1\] become constant when rounded to float32"),
    Case("constant column", lambda b: fit(torch.stack([MOONS[:, 0], torch.ones(300)], 1), **FIT),
         ValueError, r"constant columns \[1\]"),
    Case("one row", lambda b: fit(MOONS[:1], **FIT), ValueError, "at least 2 rows"),
    Case("1-D data", lambda b: fit(MOONS[:, 0], **FIT),
        ValueError, r"2-D array of shape \(n, columns\), got shape \(300,\)"),
    Case("validation of another width", lambda b: fit(MOONS, validation_data=torch.randn(5, 3), **FIT),
         ValueError, "validation_data has 3 columns, data has 2"),
    Case("clip_norm 0", lambda b: fit(MOONS, clip_norm=0, **FIT),
        ValueError, "clip_norm must be a positive finite .*got 0"),
    Case("clip_norm -1", lambda b: fit(MOONS, clip_norm=-1, **FIT), ValueError, "clip_norm must .*got -1"),
    Case("clip_norm nan", lambda b: fit(MOONS, clip_norm=math.nan, **FIT), ValueError, "clip_norm must .*got nan"),
    Case("clip_norm inf", lambda b: fit(MOONS, clip_norm=math.inf, **FIT), ValueError, "clip_norm must .*got inf"),
    Case("clip_norm text", lambda b: fit(MOONS, clip_norm="5", **FIT), ValueError, "clip_norm must .*got '5'"),
    Case("lr nan", lambda b: fit(MOONS, lr=math.nan, **FIT), ValueError, "lr must be a positive number, got nan"),
    Case("epochs 0", lambda b: fit(MOONS, **{**FIT, "epochs": 0}), ValueError, "epochs must be an integer >= 1, got 0"),
    Case("hidden_dims 0", lambda b: fit(MOONS, hidden_dims=[0], **FIT),
        ValueError, "hidden_dims must be an integer >= 1"),
    Case("unknown flow", lambda b: fit(MOONS, flow="nope", **FIT), ValueError, "unknown flow 'nope'"),
    Case("train_vae clip_norm 0", lambda b: train_vae(VAE(6, 2, hidden_dims=()), _tiny_vae_data(), _tiny_vae_data(),
                                                      clip_norm=0, progress=False),
         ValueError, "clip_norm must be a positive finite number, got 0"),
    Case("train_vae clip_norm nan", lambda b: train_vae(VAE(6, 2, hidden_dims=()), _tiny_vae_data(), _tiny_vae_data(),
                                                        clip_norm=math.nan, progress=False),
         ValueError, "clip_norm must be a positive finite number, got nan"),
    Case("train_vae clip_norm -1", lambda b: train_vae(VAE(6, 2, hidden_dims=()), _tiny_vae_data(), _tiny_vae_data(),
                                                       clip_norm=-1.0, progress=False),
         ValueError, r"clip_norm must be a positive finite number, got -1.0"),
    Case("VAE data of another width", lambda b: VAE(6, 2, hidden_dims=()).check_data(torch.zeros(4, 5)),
         ValueError, r"data must be a 2-D array of shape \(n, 6\), got shape \(4, 5\)"),
]

RESUME = [
    Case("checkpoint with the columns swapped", lambda b: _resume(b, MOONS[:, [1, 0]]),
         ValueError, r"run.ckpt was written for other data or settings \(its data differ\)"),
    Case("checkpoint with one value changed", lambda b: _resume(b, _moons_with(0.5, row=100, dtype=torch.float32)),
         ValueError, r"run.ckpt was written for other data or settings \(its data differ\)"),
    Case("checkpoint with another clip_norm", lambda b: _resume(b, MOONS, clip_norm=1.0),
         ValueError, r"run.ckpt was written for other data or settings \(its settings differ\)"),
    Case("checkpoint with another patience", lambda b: _resume(b, MOONS, patience=3),
         ValueError, r"its settings differ"),
    Case("checkpoint with a flipped bit", lambda b: fit(MOONS, checkpoint=b.flipped(b.checkpoint, "bit.ckpt"), **FIT),
         ValueError, "bit.ckpt is damaged: its contents do not match the checksum"),
    Case("empty checkpoint", lambda b: fit(MOONS, checkpoint=b.write("empty.ckpt", b""), **FIT),
         ValueError, "empty.ckpt is not a readable checkpoint file: it is empty"),
    Case("random-byte checkpoint", lambda b: fit(MOONS, checkpoint=b.write("noise.ckpt", _noise(3000)), **FIT),
         ValueError, r"noise.ckpt is not a readable checkpoint file \(torch.load failed"),
    Case("truncated checkpoint", lambda b: fit(MOONS, checkpoint=b.write("half.ckpt", b.checkpoint.read_bytes()[:900]),
                                                **FIT),
         ValueError, "half.ckpt is not a readable checkpoint file"),
    Case("a model file as checkpoint", lambda b: fit(MOONS, checkpoint=b.model, **FIT),
         ValueError, "model.pt is not a checkpoint written by this package's trainers"),
    Case("checkpoint in a missing folder", lambda b: fit(MOONS, checkpoint=b / "missing" / "run.ckpt", **FIT),
         FileNotFoundError, "cannot write checkpoint .*missing/run.ckpt: the folder .* does not exist"),
    Case("checkpoint that is a directory", lambda b: fit(MOONS, checkpoint=b.tmp, **FIT),
         IsADirectoryError, "cannot write checkpoint .*: it is a directory"),
]

MODEL_FILES = [
    Case("empty model file", lambda b: load(b.write("empty.pt", b"")), ValueError,
         "empty.pt is not a readable model file: it is empty"),
    Case("random-byte model file", lambda b: load(b.write("noise.pt", _noise(1500))), ValueError,
         r"noise.pt is not a readable model file \(torch.load failed"),
    Case("truncated model file", lambda b: load(b.write("half.pt", b.model.read_bytes()[:2000])), ValueError,
         "half.pt is not a readable model file"),
    Case("text as model file", lambda b: load(b.write("text.pt", "hello\n")), ValueError,
         "text.pt is not a readable model file"),
    Case("a pickle that runs code", _pickled_code, ValueError, r"evil.pt is not a readable model file"),
    Case("a flipped bit", lambda b: load(b.flipped(b.model, "bit.pt")), ValueError,
         "bit.pt is damaged: its contents do not match the checksum stored with them"),
    Case("NaN weights", lambda b: load(b.rewritten("nan.pt", _nan_weights)), ValueError,
         "nan.pt: the weights '.*' hold NaN or infinite values"),
    Case("an older format", lambda b: load(b.rewritten("old.pt", _old_format)), ValueError,
         "old.pt has format 5; this version reads 6"),
    Case("num_layers 10**7", lambda b: load(b.config("layers.pt", num_layers=10**7)), ValueError,
         "layers.pt: its configuration does not fit .*num_layers = 10000000 asks for more than"),
    Case("huge hidden_dims", lambda b: load(b.config("wide.pt", hidden_dims=[10**9])), ValueError,
         r"wide.pt: its configuration does not fit .*hidden_dims = \[1000000000\]"),
    Case("negative hidden_dims", lambda b: load(b.config("negative.pt", hidden_dims=[-3])), ValueError,
         "negative.pt: cannot rebuild the model .*hidden_dims must be an integer >= 1, got -3"),
    Case("negative input_dim", lambda b: load(b.config("dim.pt", input_dim=-2)), ValueError,
         r"dim.pt: .*input_dim -2 is not the size of its standardisation"),
    Case("a huge layer in the spec", lambda b: load(b.config("spec.pt", flow="maf(hidden_dims=(10**6,))")),
         ValueError, "spec.pt: cannot rebuild the model from its configuration"),
    Case("10**6 layers in the spec", lambda b: load(b.config("many.pt", flow="maf:1000000")), ValueError,
         "many.pt: cannot rebuild .*registers more than"),
    Case("another flow than the weights", lambda b: load(b.config("other.pt", flow="realnvp")), ValueError,
         "other.pt: its weights do not match its configuration"),
    Case("config that is not JSON", lambda b: load(b.rewritten("json.pt", lambda p: p.update(config="{num_layers"))),
         ValueError, "json.pt: its configuration is not a JSON object"),
    Case("a VAE as density model", lambda b: load(b.vae), ValueError, "vae.pt is not a model saved by "
         "DensityModel.save .*its kind is 'vae'"),
    Case("a checkpoint as model", lambda b: load(b.checkpoint), ValueError,
         "run.ckpt is not a model saved by DensityModel.save"),
    Case("a directory as model", lambda b: load(b.tmp), IsADirectoryError, "is a directory, not a model file"),
    Case("a missing model", lambda b: load(b / "missing.pt"), FileNotFoundError, "no model file .*missing.pt"),
    Case("VAE with a flipped bit", lambda b: VAE.load(b.flipped(b.vae, "vbit.pt")), ValueError, "vbit.pt is damaged"),
    Case("VAE with huge hidden_dims", lambda b: VAE.load(b.config("vwide.pt", b.vae, hidden_dims=[10**8, 10**8])),
         ValueError, r"vwide.pt: its configuration does not fit .*hidden_dims = \[100000000, 100000000\]"),
    Case("VAE posterior far larger than its weights", lambda b: VAE.load(b.config("vpost.pt", b.vae,
                                                                                   posterior="householder:10000000")),
         ValueError, "vpost.pt: cannot rebuild the model"),
]

MODEL_USE = [
    Case("log_prob of an ndarray", lambda b: load(b.model).log_prob(np.zeros((2, 2))), ValueError,
         "DensityModel.log_prob expects a torch.Tensor point, got ndarray"),
    Case("log_prob of a list", lambda b: load(b.model).log_prob([[0.0, 0.0]]), ValueError, "got list"),
    Case("log_prob of a NaN row", lambda b: load(b.model).log_prob(_moons_with(math.nan, row=3, dtype=torch.float32)),
         ValueError, r"NaN or infinite values in 1 point\(s\) \(first: \[3\]\)"),
    Case("log_prob of 1e200", lambda b: load(b.model).log_prob(_moons_with(1e200, row=5)), ValueError,
         r"values that overflow float32 in 1 point\(s\) \(first: \[5\]\)"),
    Case("log_prob of the wrong width", lambda b: load(b.model).log_prob(torch.zeros(3, 5)), ValueError,
         r"last dimension is 2, got a tensor of shape \(3, 5\)"),
    Case("sample 10**12", lambda b: load(b.model).sample(10**12), ValueError,
         r"sample\(n=1000000000000\) would need about .* GiB"),
    Case("sample -1", lambda b: load(b.model).sample(-1), ValueError, "n must be an integer >= 1, got -1"),
    Case("sample 2.5", lambda b: load(b.model).sample(2.5), ValueError, "n must be an integer >= 1, got 2.5"),
]

COMMAND_LINE = [
    cli("-o whose picture overwrites it", lambda b: _fit_cli(b, "-o", str(b / "model.png")), ValueError,
        r"picture \(the -o name with .png\) .*model.png would be written over the model file \(-o\)"),
    cli("-o the input data", lambda b: _fit_cli(b, "-o", str(b.data)), ValueError,
        "model file .*moons.csv would be written over the input data file"),
    cli("--checkpoint the model", lambda b: _fit_cli(b, "-o", str(b / "m.pt"), "--checkpoint", str(b / "m.pt")),
        ValueError, r"checkpoint \(--checkpoint\) .*m.pt would be written over the model file"),
    cli("-o in a missing folder", lambda b: _fit_cli(b, "-o", str(b / "no" / "m.pt")), FileNotFoundError,
        "cannot write model file .*no/m.pt: the folder .*no does not exist"),
    cli("-o a directory", lambda b: _fit_cli(b, "-o", str(b.tmp)), IsADirectoryError,
        "cannot write model file .*: it is a directory"),
    cli("--checkpoint in a missing folder", lambda b: _fit_cli(b, "--checkpoint", str(b / "no" / "run.ckpt"),
                                                               "-o", str(b / "m.pt")),
        FileNotFoundError, "cannot write checkpoint .*no/run.ckpt"),
    cli("-o where no file can be created", lambda b: _fit_cli(b, "-o", "/sys/model.pt"), PermissionError,
        "cannot write model file .*/sys/model.pt: no file can be created in /sys"),
    cli("-o a read-only file", lambda b: _fit_cli(b, "-o", str(_read_only(b))), PermissionError,
        "locked.pt: the file is read-only", root_ok=False),
    cli("a checkpoint of other settings", lambda b: _fit_cli(b, "--checkpoint", str(b.checkpoint), "-o",
                                                             str(b / "m.pt")),
        ValueError, "run.ckpt was written for other data or settings"),
    cli("fit a directory", lambda b: ["fit", str(_folder(b, "data.csv")), "--no-progress"], IsADirectoryError,
        "data.csv' is a directory"),
    cli("fit a missing file", lambda b: ["fit", str(b / "missing.csv"), "--no-progress"], FileNotFoundError,
        "missing.csv"),
    cli("fit a header-only csv", lambda b: ["fit", str(b.write("h.csv", "x,y\n")), "--no-progress"], ValueError,
        r"h.csv' has no data rows \(only a header\)"),
    cli("fit an empty file", lambda b: ["fit", str(b.write("e.csv", "")), "--no-progress"],
        ValueError, "e.csv' is empty"),
    cli("fit a csv cell of 1e39", lambda b: ["fit", str(b.write("b.csv", "1,2\n3,4\n5,6\n1e39,1\n")), "--no-progress"],
        ValueError, r"b.csv': row 4, column 1: 1e\+39 overflows float32"),
    cli("fit a model file as data", lambda b: ["fit", str(b.model), "--no-progress"], ValueError,
        "model.pt': unknown file extension '.pt'"),
    cli("--num-layers 0", lambda b: _fit_cli(b, "--num-layers", "0", "-o", str(b / "m.pt")), ValueError,
        "num_layers must be an integer >= 1, got 0"),
    cli("--batch-size 0", lambda b: _fit_cli(b, "--batch-size", "0", "-o", str(b / "m.pt")), ValueError,
        "batch_size must be an integer >= 1, got 0"),
    cli("--lr -1", lambda b: _fit_cli(b, "--lr", "-1", "-o", str(b / "m.pt")), ValueError,
        "lr must be a positive number, got -1.0"),
    cli("--flow nope", lambda b: _fit_cli(b, "--flow", "nope", "-o", str(b / "m.pt")),
        ValueError, "unknown flow 'nope'"),
    cli("--n 3", lambda b: ["fit", "--n", "3", "--no-progress", "-o", str(b / "m.pt")], ValueError,
        "leaves the .* part empty"),
    cli("sample -n -5", lambda b: ["sample", str(b.model), "-n", "-5", "-o", str(b / "s.csv")], ValueError,
        "-n must be an integer >= 1, got -5"),
    cli("sample -n 10**12", lambda b: ["sample", str(b.model), "-n", str(10**12), "-o", str(b / "s.csv")], ValueError,
        r"sample\(n=1000000000000\) would need about"),
    cli("sample a directory", lambda b: ["sample", str(b.tmp), "-o", str(b / "s.csv")], IsADirectoryError,
        "is a directory, not a model file"),
    cli("sample a missing model", lambda b: ["sample", str(b / "gone.pt"), "-o", str(b / "s.csv")], FileNotFoundError,
        "no model file .*gone.pt"),
    cli("sample random bytes", lambda b: ["sample", str(b.write("r.pt", _noise(999))), "-o", str(b / "s.csv")],
        ValueError, "r.pt is not a readable model file"),
    cli("sample a flipped bit", lambda b: ["sample", str(b.flipped(b.model, "f.pt")), "-o", str(b / "s.csv")],
        ValueError, "f.pt is damaged"),
    cli("sample an absurd config", lambda b: ["sample", str(b.config("l.pt", num_layers=10**7)),
        "-o", str(b / "s.csv")],
        ValueError, "l.pt: its configuration does not fit the weights it carries"),
    cli("sample -o .txt", lambda b: ["sample", str(b.model), "-o", str(b / "s.txt")], ValueError,
        r"s.txt: use a .csv or .npy file name"),
    cli("sample -o the model", lambda b: ["sample", str(_renamed(b, "model.npy")), "-o", str(b / "model.npy")],
        ValueError, "samples file .*model.npy would be written over the model file"),
    cli("score a file of the wrong width", lambda b: ["score", str(b.model), str(b.write("w.npy", np.zeros((4, 3))))],
        ValueError, "w.npy has 3 columns; the model was fitted to 2"),
    cli("score -o the data", lambda b: ["score", str(b.model), str(b.data), "-o", str(b.data)], ValueError,
        "scores file .*moons.csv would be written over the data file"),
    cli("score 1e39", lambda b: ["score", str(b.model), str(b.write("b.npy", np.array([[0.0, 1e39]])))], ValueError,
        r"b.npy': row 1, column 2: 1e\+39 overflows float32"),
    cli("score a header-only csv", lambda b: ["score", str(b.model), str(b.write("h.csv", "x,y\n"))], ValueError,
        "h.csv' has no data rows"),
    cli("score a directory as data", lambda b: ["score", str(b.model), str(_folder(b, "d.npy"))], IsADirectoryError,
        "d.npy' is a directory"),
    cli("vae -o a directory", lambda b: ["vae", "--no-progress", "-o", str(b.tmp)], IsADirectoryError,
        "cannot write model file .*: it is a directory"),
    cli("vae -o in a missing folder", lambda b: ["vae", "--no-progress", "-o", str(b / "no" / "v.pt")],
        FileNotFoundError, "the folder .*no does not exist"),
    cli("vae --num-samples 0", lambda b: ["vae", "--num-samples", "0", "--no-progress", "-o", str(b / "v.pt")],
        ValueError, "num_samples must be an integer >= 1, got 0"),
    cli("vae mnist without --data-dir", lambda b: ["vae", "--dataset", "mnist", "--no-progress", "-o", str(b / "v.pt")],
        ValueError, "--dataset mnist needs --data-dir"),
]


def _read_only(bench: Bench) -> Path:
    path = bench.write("locked.pt", b"old")
    path.chmod(0o444)
    return path


def _folder(bench: Bench, name: str) -> Path:
    (bench / name).mkdir()
    return bench / name


def _renamed(bench: Bench, name: str) -> Path:
    shutil.copy(bench.model, bench / name)
    return bench / name


CASES = DATA_FILES + FIT_AND_DATA + RESUME + MODEL_FILES + MODEL_USE + COMMAND_LINE


def _params(cases):
    params = []
    for case in cases:
        marks = []
        if not case.root_ok:
            marks.append(pytest.mark.skipif(os.geteuid() == 0, reason="root may write read-only files"))
        if "/sys" in case.match:
            marks.append(pytest.mark.skipif(not os.path.isdir("/sys") or (os.access("/sys", os.W_OK)
                                                                           and os.geteuid() != 0),
                                            reason="needs a folder where no file can be created"))
        params.append(pytest.param(case, id=case.name, marks=marks))
    return params


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shared")
    torch.manual_seed(0)
    fit(MOONS, checkpoint=folder / "run.ckpt", **FIT).save(folder / "model.pt")
    VAE(6, 2, "householder:2", hidden_dims=(8,)).save(folder / "vae.pt")
    np.savetxt(folder / "moons.csv", MOONS.numpy(), delimiter=",")
    return folder


@pytest.fixture
def bench(tmp_path, shared) -> Bench:
    return Bench(tmp_path, shared)


@pytest.mark.parametrize("case", _params(CASES))
def test_bad_input_raises_the_catalogued_error_naming_the_culprit(bench, case):
    if case.cli:
        args = _parser().parse_args(case.run(bench))
        action = lambda: args.run(args)  # noqa: E731 - the command's own function, which main calls
    else:
        action = lambda: case.run(bench)  # noqa: E731
    with pytest.raises(case.error) as info:
        action()
    assert type(info.value) is case.error, f"{type(info.value).__name__}: {info.value}"
    assert re.search(case.match, str(info.value)), str(info.value)
    assert "weights_only" not in str(info.value)  # never torch's advice to unpickle an untrusted file


@pytest.mark.parametrize("case", _params(COMMAND_LINE))
def test_the_command_line_reports_each_in_one_line_with_status_2(bench, case, capsys):
    assert main(case.run(bench)) == 2
    error = capsys.readouterr().err
    assert error.startswith("pyro-nflows: error: ") and error.count("\n") == 1, error
    assert re.search(case.match, error), error


def test_the_catalogue_covers_every_kind_of_bad_input():
    """The catalogue's size, per error class (the report of issue 20 counts them)."""
    classes = collections.Counter(case.error.__name__ for case in CASES)
    assert len({case.name for case in CASES}) == len(CASES)  # one row per bad input
    assert len(CASES) >= 100 and set(classes) == {"ValueError", "FileNotFoundError", "IsADirectoryError",
                                                  "PermissionError"}
