"""Density estimation in one call: ``fit(data)`` returns a :class:`DensityModel`.

A :class:`DensityModel` is a standard normal base, a stack of flow layers
built from a spec (see :mod:`pyro_nflows.registry`; the presets ``"maf"``,
``"nsf"`` and ``"realnvp"`` name the usual ones) repeated ``num_layers`` times
with a normalisation layer between repeats, and a fixed standardisation
``x = loc + scale * z`` fitted to the training data. The standardisation's log-determinant is part of
:meth:`DensityModel.log_prob`, so densities are in the data's own units.

``save`` writes one file holding the configuration as JSON text and the
weights as tensors; ``load`` reads it with ``torch.load(weights_only=True)``,
so loading never unpickles arbitrary objects. ``fit(..., checkpoint=path)``
writes a checkpoint after every epoch (atomically) and, when the file is
already there, resumes from it: an interrupted run loses at most one epoch.
"""

from __future__ import annotations

import copy
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import pyro.distributions as dist
import torch
from pyro.distributions.torch_transform import ComposeTransformModule
from pyro.distributions.transforms import BatchNorm
from torch import nn
from torch.distributions.transforms import AffineTransform
from tqdm.auto import tqdm

from pyro_nflows.registry import build_flow
from pyro_nflows.transforms.elementwise import ActNorm
from pyro_nflows.validation import check_count

__all__ = ["DEFAULT_FLOW", "PRESETS", "DensityModel", "FitHistory", "check_data", "fit", "load"]

# Names for the usual stacks; any other registry spec is used as written.
PRESETS = {
    "maf": "maf",  # Papamakarios et al. 2017: affine MADE layers, alternating orderings
    "nsf": "spline_autoregressive",  # Durkan et al. 2019: autoregressive rational-quadratic splines
    "realnvp": "affine_coupling",  # Dinh et al. 2017: affine couplings, alternating halves
}
DEFAULT_FLOW = "maf"
NORMALIZATIONS = ("actnorm", "batchnorm", None)
FORMAT_VERSION = 1


def check_data(data, name: str = "data", min_rows: int = 2) -> torch.Tensor:
    """Return ``data`` as a float tensor of shape ``(n, d)``, or raise ``ValueError``
    naming the rows or columns at fault (non-finite values, constant columns,
    too few rows, wrong number of dimensions)."""
    tensor = torch.as_tensor(data)
    if not tensor.is_floating_point():
        tensor = tensor.to(torch.get_default_dtype())
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be a 2-D array of shape (rows, columns), got shape {tuple(tensor.shape)}")
    rows, columns = tensor.shape
    if columns < 1:
        raise ValueError(f"{name} has no columns")
    bad = ~torch.isfinite(tensor)
    if bad.any():
        bad_rows = torch.nonzero(bad.any(1)).flatten().tolist()
        bad_columns = torch.nonzero(bad.any(0)).flatten().tolist()
        raise ValueError(
            f"{name} holds NaN or infinite values in {len(bad_rows)} rows "
            f"(first rows: {bad_rows[:10]}) and columns {bad_columns[:10]}; remove or impute them"
        )
    if rows < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows, got {rows}")
    constant = torch.nonzero(tensor.std(0) == 0).flatten().tolist() if rows > 1 else []
    if constant:
        raise ValueError(
            f"{name} has constant columns {constant[:10]}: a density over them is degenerate; drop them"
        )
    return tensor


def _stack(input_dim: int, flow: str, num_layers: int, hidden_dims, normalization) -> list:
    """``num_layers`` repeats of the layer ``flow`` names, normalised between repeats."""
    if flow in PRESETS:
        spec = PRESETS[flow] if hidden_dims is None else f"{PRESETS[flow]}(hidden_dims={tuple(hidden_dims)})"
    elif hidden_dims is not None:
        raise ValueError(
            f"hidden_dims applies to the presets {sorted(PRESETS)}; in the spec {flow!r} give it as an "
            "option of the layer that takes it, e.g. 'maf(hidden_dims=(64, 64))'"
        )
    else:
        spec = flow
    layers = build_flow(spec, input_dim, repeat=num_layers)
    per_repeat = len(layers) // num_layers
    stack = []
    for index in range(num_layers):
        if index > 0 and normalization == "actnorm":
            stack.append(ActNorm(input_dim))
        elif index > 0 and normalization == "batchnorm":
            stack.append(BatchNorm(input_dim))
        stack.extend(layers[index * per_repeat : (index + 1) * per_repeat])
    return stack


class DensityModel(nn.Module):
    """A normalizing-flow density on :math:`\\mathbb{R}^d`.

    :param input_dim: the data's dimension :math:`d`.
    :param flow: ``"maf"``, ``"nsf"``, ``"realnvp"`` or the spec of one layer
        (e.g. ``"lu_linear+elementwise_spline"``).
    :param num_layers: how many times the layer is stacked.
    :param hidden_dims: hidden widths of the layers' networks (presets only;
        in a spec write them as an option, ``maf(hidden_dims=(64, 64))``).
    :param normalization: ``"actnorm"`` (default), ``"batchnorm"`` (Pyro's
        :class:`~pyro.distributions.transforms.BatchNorm`, batch statistics
        while training) or ``None``, between repeats of the layer.

    ``log_prob(x)`` scores points in the data's units, ``sample(n)`` draws
    ``n`` points, ``save(path)`` / :func:`load` store and restore it exactly.
    """

    def __init__(
        self,
        input_dim: int,
        flow: str = DEFAULT_FLOW,
        num_layers: int = 5,
        hidden_dims: Sequence[int] | None = None,
        normalization: str | None = "actnorm",
    ):
        super().__init__()
        check_count("num_layers", num_layers)
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        if hidden_dims is not None:
            hidden_dims = [check_count("every entry of hidden_dims", h) for h in hidden_dims]
        self.config = {
            "input_dim": input_dim,
            "flow": flow,
            "num_layers": num_layers,
            "hidden_dims": hidden_dims,
            "normalization": normalization,
        }
        self.layers = ComposeTransformModule(_stack(input_dim, flow, num_layers, hidden_dims, normalization))
        self.register_buffer("loc", torch.zeros(input_dim))
        self.register_buffer("scale", torch.ones(input_dim))

    @property
    def input_dim(self) -> int:
        return self.config["input_dim"]

    def set_standardisation(self, data: torch.Tensor) -> None:
        """Fit the fixed affine map from the flow's output to the data's units."""
        with torch.no_grad():
            self.loc.copy_(data.mean(0))
            self.scale.copy_(data.std(0))

    def distribution(self) -> dist.TransformedDistribution:
        """The model as a Pyro distribution with ``event_shape == (d,)``."""
        base = dist.Normal(torch.zeros_like(self.loc), torch.ones_like(self.loc)).to_event(1)
        standardisation = AffineTransform(self.loc, self.scale, event_dim=1)
        return dist.TransformedDistribution(base, [self.layers, standardisation])

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Log-density of each row of ``x`` (shape ``(..., d)``), in the data's units."""
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.input_dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"DensityModel expects points whose last dimension is {self.input_dim}, got {shape}")
        return self.distribution().log_prob(x.to(self.loc))

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """Draw ``n`` points, shape ``(n, d)``."""
        return self.distribution().sample((check_count("n", n),))

    def save(self, path: str | Path) -> None:
        """Write the configuration (as JSON) and the weights to ``path``."""
        payload = {
            "format": FORMAT_VERSION,
            "config": json.dumps(self.config),
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
        }
        torch.save(payload, Path(path))

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device | None = "cpu") -> "DensityModel":
        """Restore a model written by :meth:`save` (weights only, no unpickling)."""
        payload = torch.load(Path(path), map_location=map_location, weights_only=True)
        if not isinstance(payload, dict) or "config" not in payload or "state_dict" not in payload:
            raise ValueError(f"{path} is not a model saved by DensityModel.save")
        if payload.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path} has format {payload.get('format')!r}; this version reads {FORMAT_VERSION}")
        model = cls(**json.loads(payload["config"]))
        model.load_state_dict(payload["state_dict"])
        return model


def load(path: str | Path, map_location: str | torch.device | None = "cpu") -> DensityModel:
    """Restore a :class:`DensityModel` written by :meth:`DensityModel.save`."""
    return DensityModel.load(path, map_location=map_location)


@dataclass
class FitHistory:
    """What :func:`fit` saw: mean log-likelihood per point, per epoch."""

    train: list[float] = field(default_factory=list)
    validation: list[float] = field(default_factory=list)
    best_epoch: int = -1
    stopped: str = ""


def _mean_log_prob(model: DensityModel, data: torch.Tensor, batch_size: int) -> float:
    with torch.no_grad():
        total = sum(model.log_prob(chunk).sum().item() for chunk in data.split(batch_size))
    return total / len(data)


def _split(data: torch.Tensor, validation_data, validation_fraction: float, generator) -> tuple[torch.Tensor, torch.Tensor]:
    if validation_data is not None:
        validation = check_data(validation_data, "validation_data", min_rows=1)
        if validation.shape[1] != data.shape[1]:
            raise ValueError(f"validation_data has {validation.shape[1]} columns, data has {data.shape[1]}")
        return data, validation
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction must lie in (0, 1), got {validation_fraction!r}")
    order = torch.randperm(len(data), generator=generator)
    count = max(1, int(round(validation_fraction * len(data))))
    if len(data) - count < 2:
        raise ValueError(f"data has {len(data)} rows: too few to hold out {count} for validation and train on the rest")
    return data[order[count:]], data[order[:count]]


def _fingerprint(train: torch.Tensor, validation: torch.Tensor) -> str:
    """Enough to tell that a checkpoint was made from other data."""
    stats = [float(part.double().sum()) for part in (train, validation)]
    return json.dumps([list(train.shape), list(validation.shape), stats])


def _save_atomically(payload: dict, path: Path) -> None:
    temporary = path.with_name(path.name + ".tmp")
    torch.save(payload, temporary)
    os.replace(temporary, path)


def fit(
    data,
    flow: str = DEFAULT_FLOW,
    num_layers: int = 5,
    hidden_dims: Sequence[int] | None = None,
    normalization: str | None = "actnorm",
    epochs: int = 100,
    batch_size: int = 256,
    lr: float = 1e-3,
    validation_fraction: float = 0.1,
    validation_data=None,
    patience: int = 10,
    clip_norm: float = 5.0,
    seed: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    checkpoint: str | Path | None = None,
) -> DensityModel:
    """Fit a flow density to the rows of ``data`` (shape ``(n, d)``) by maximum likelihood.

    :param flow: ``"maf"`` (default), ``"nsf"``, ``"realnvp"`` or any registry spec
        of one layer; ``num_layers``, ``hidden_dims``, ``normalization`` as in
        :class:`DensityModel`.
    :param checkpoint: a file to write after every epoch; if it exists, training
        resumes from it (the same data and settings are required).

    Holds out ``validation_fraction`` of the rows (or uses ``validation_data``),
    trains with Adam and a cosine learning-rate schedule, clips gradient norms
    at ``clip_norm``, stops early after ``patience`` epochs without a better
    validation log-likelihood and restores the best weights. A progress bar
    shows train and validation log-likelihood per point. Ctrl-C, or a loss
    that turns NaN, stops training and keeps the best model so far (with a
    warning). The returned model's ``history`` holds the curves.
    """
    data = check_data(data)
    for name, value in [("epochs", epochs), ("batch_size", batch_size), ("patience", patience)]:
        check_count(name, value)
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if seed is not None:
        torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
    train, validation = _split(data, validation_data, validation_fraction, generator)

    device = torch.device(device) if device is not None else torch.device("cpu")
    model = DensityModel(train.shape[1], flow, num_layers, hidden_dims, normalization).to(device)
    train, validation = train.to(device, torch.float32), validation.to(device, torch.float32)
    model.set_standardisation(train)
    with torch.no_grad():  # data-dependent initialisations (actnorm) see a large batch
        model.log_prob(train[torch.randperm(len(train), generator=generator)[: 4 * batch_size].to(device)])

    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    history = FitHistory()
    best_state, best_value, waited, start = copy.deepcopy(model.state_dict()), -math.inf, 0, 0
    settings = json.dumps({**model.config, "epochs": epochs, "batch_size": batch_size, "lr": lr})
    fingerprint = _fingerprint(train, validation)

    checkpoint = Path(checkpoint) if checkpoint is not None else None
    if checkpoint is not None and checkpoint.exists():
        saved = torch.load(checkpoint, map_location=device, weights_only=True)
        if saved.get("settings") != settings or saved.get("data") != fingerprint:
            raise ValueError(
                f"checkpoint {checkpoint} was written for other data or settings; "
                "delete it, or pass another checkpoint path, to start afresh"
            )
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        generator.set_state(saved["generator"])
        best_state, best_value, waited = saved["best_model"], saved["best_value"], saved["waited"]
        history = FitHistory(**json.loads(saved["history"]))
        start = len(history.validation)
        if progress:
            print(f"resuming from {checkpoint} after epoch {start}")

    def save_checkpoint() -> None:
        _save_atomically(
            {
                "settings": settings,
                "data": fingerprint,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "generator": generator.get_state(),
                "best_model": best_state,
                "best_value": best_value,
                "waited": waited,
                "history": json.dumps(asdict(history)),
            },
            checkpoint,
        )

    remaining = range(start, epochs) if not history.stopped else range(0)
    bar = tqdm(remaining, desc="fit", disable=not progress, unit="epoch", initial=start, total=epochs)
    try:
        for epoch in bar:
            model.train()
            order = torch.randperm(len(train), generator=generator).to(device)
            total = 0.0
            for batch in order.split(batch_size):
                loss = -model.log_prob(train[batch]).mean()
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"the training loss became {loss.item()} in epoch {epoch + 1}")
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
                optimizer.step()
                scheduler.step()
                total -= loss.item() * len(batch)
            model.eval()
            history.train.append(total / len(train))
            history.validation.append(_mean_log_prob(model, validation, 4 * batch_size))
            if history.validation[-1] > best_value:
                best_value, history.best_epoch, waited = history.validation[-1], epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                waited += 1
            bar.set_postfix(train=f"{history.train[-1]:.3f}", valid=f"{history.validation[-1]:.3f}", best=f"{best_value:.3f}")
            if waited >= patience:
                history.stopped = f"early stop: no better validation log-likelihood for {patience} epochs"
            elif epoch + 1 == epochs:
                history.stopped = f"ran all {epochs} epochs"
            if checkpoint is not None:
                save_checkpoint()
            if history.stopped:
                break
    except KeyboardInterrupt:
        history.stopped = "interrupted"
        where = f"; resume with fit(..., checkpoint={str(checkpoint)!r})" if checkpoint is not None else ""
        warnings.warn(f"fit interrupted: returning the best model so far{where}", RuntimeWarning, stacklevel=2)
    except FloatingPointError as error:
        history.stopped = f"diverged: {error}"
        warnings.warn(f"fit stopped: {error}; returning the best model so far", RuntimeWarning, stacklevel=2)
    finally:
        bar.close()
    model.load_state_dict(best_state)
    model.eval()
    model.history = history
    return model
