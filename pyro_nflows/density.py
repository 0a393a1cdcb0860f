"""Density estimation in one call: ``fit(data)`` returns a :class:`DensityModel`.

A :class:`DensityModel` is a standard normal base, a stack of flow layers
built from a spec (see :mod:`pyro_nflows.registry`; the presets ``"maf"``,
``"nsf"`` and ``"realnvp"`` name the usual ones) repeated ``num_layers`` times
with a normalisation layer between repeats, and a fixed standardisation
``x = loc + scale * z`` fitted to the training data. The standardisation's
log-determinant is part of :meth:`DensityModel.log_prob`, so densities are in
the data's own units.

``save`` writes one file, atomically, holding the configuration as JSON text,
the weights as tensors and a SHA-256 checksum of both; ``load`` reads it with
``torch.load(weights_only=True)``, so loading never unpickles arbitrary
objects, verifies the checksum and checks the configuration against the
weights before building anything (:mod:`pyro_nflows.saving`).
``fit(..., checkpoint=path)`` writes a checkpoint after every epoch
(atomically, with a checksum) and, when the file is already there, resumes
from it: an interrupted run loses at most one epoch. A checkpoint resumes
only the same data, to the byte (a hash of the training and validation
rows), and the same settings.

Started under ``torchrun`` (more than one process), ``fit`` trains
data-parallel with :class:`torch.nn.parallel.DistributedDataParallel`: every
process holds the whole model and data, each takes its share of every global
batch, and the result matches one process trained with the same global batch.

``fit`` is made of the pieces every trainer shares (:mod:`pyro_nflows.training`:
the epoch loop, checkpoints; :mod:`pyro_nflows.distributed`: the process
group) and of what is its own: the split, the model's initialisation from the
data, and one epoch of shuffled batches (:class:`_Epochs`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import pyro.distributions as dist
import torch
from pyro.distributions.conditional import ConditionalTransformModule
from pyro.distributions.transforms import BatchNorm
from torch import nn
from torch.distributions.transforms import AffineTransform

from pyro_nflows.distributed import Ranks, check_same_everywhere, data_parallel, join_process_group, summary
from pyro_nflows.registry import build_flow, spec_event
from pyro_nflows.saving import check_output, checksum, read_model, write_model
from pyro_nflows.training import Checkpoint, EpochLoop, TrainingState, check_loss, gradient_step
from pyro_nflows.transforms.elementwise import ActNorm
from pyro_nflows.validation import check_count, check_event, check_finite, check_hidden_dims, check_positive, check_rows

__all__ = ["DEFAULT_FLOW", "DENSITY_DEFAULTS", "PRESETS", "DensityModel", "check_data", "fit", "load"]

# Names for the usual stacks; any other registry spec is used as written.
PRESETS = {
    "maf": "maf",  # Papamakarios et al. 2017: affine MADE layers, alternating orderings
    "nsf": "spline_autoregressive",  # Durkan et al. 2019: autoregressive rational-quadratic splines
    "realnvp": "affine_coupling",  # Dinh et al. 2017: affine couplings, alternating halves
}
DEFAULT_FLOW = "maf"
# Options for every layer that takes them, unless the spec sets them. A density model is trained
# by scoring data, so spline autoregressive and residual flows score in one pass (the MAF direction;
# the layer's own default, Pyro's, is the IAF direction guides sample with), spline couplings evaluate
# their spline from the data side (the layer's own default, the noise side, is the form guides
# train), and MAF, affine and additive couplings start as a mild random map: a guide needs the
# identity start, a density model trains better without it (measured:
# benchmarks/README.md#spline-side, #coupling-start, #maf-start).
DENSITY_DEFAULTS = {"direction": "maf", "spline_from": "x", "identity_init": False}
NORMALIZATIONS = ("actnorm", "batchnorm", None)


def check_data(data, name: str = "data", min_rows: int = 2) -> torch.Tensor:
    """Return ``data`` as a float tensor of shape ``(n, d)``, or raise ``ValueError``
    naming the rows (counted from 0, in the order given) or columns at fault:
    non-finite values, values that overflow float32 (the precision a
    :class:`DensityModel` works in: ``|x| > 3.4e38``), constant columns, and
    columns that float32 rounds to one value (``1e-50`` becomes 0; ``1e8 + 1e-3``
    becomes ``1e8``), too few rows, the wrong number of dimensions."""
    tensor = check_rows(data, name, min_rows=min_rows)
    single = tensor.to(torch.float32)
    overflow = ~torch.isfinite(single)
    if overflow.any():
        rows, columns = _where(overflow.any(1)), _where(overflow.any(0))
        raise ValueError(
            f"{name} has values that overflow float32, the precision the model works in (|x| > "
            f"{torch.finfo(torch.float32).max:.3g}), in {len(rows)} rows (first rows: {rows[:10]}) and columns "
            f"{columns[:10]}; rescale the data"
        )
    if len(tensor) > 1:
        constant = _where(tensor.std(0) == 0)
        if constant:
            raise ValueError(
                f"{name} has constant columns {constant[:10]}: a density over them is degenerate; drop them"
            )
        rounded = _where(single.std(0) == 0)
        if rounded:
            raise ValueError(
                f"{name}'s columns {rounded[:10]} become constant when rounded to float32, the precision the model "
                "works in (their values differ by less than float32 resolves at their size); rescale or centre them"
            )
    return tensor


@contextlib.contextmanager
def _distribution_checks(on: bool):
    """torch's distribution argument checks on (or off) inside the block, and the caller's
    setting back after it. :meth:`DensityModel.log_prob` finds a point the flow sends to
    infinity by the base distribution's check, whatever the process's default (the first
    use of ``torch.compile`` switches the checks off for the whole process; Pyro's
    ``validation_enabled`` restores Pyro's own setting, not torch's)."""
    default = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(on)
    try:
        yield
    finally:
        torch.distributions.Distribution.set_default_validate_args(default)


def _where(mask: torch.Tensor) -> list:
    """The indices where ``mask`` is true: ints for a 1-D mask, tuples for more dimensions."""
    found = torch.nonzero(mask)
    return found.flatten().tolist() if mask.dim() == 1 else [tuple(index) for index in found.tolist()]


def _stack(input_dim: int, flow: str, num_layers: int, hidden_dims, normalization, context_dim=None) -> list:
    """``num_layers`` repeats of the layer ``flow`` names (their conditional
    versions, for a context of width ``context_dim``), normalised between repeats."""
    if flow in PRESETS:
        spec = PRESETS[flow] if hidden_dims is None else f"{PRESETS[flow]}(hidden_dims={tuple(hidden_dims)})"
    elif hidden_dims is not None:
        raise ValueError(
            f"hidden_dims applies to the presets {sorted(PRESETS)}; in the spec {flow!r} give it as an "
            "option of the layer that takes it, e.g. 'maf(hidden_dims=(64, 64))'"
        )
    else:
        spec = flow
    if spec_event(spec) != "vector":
        raise ValueError(
            f"the flow {flow!r} acts on images (events of shape (C, H, W)); a DensityModel models rows of "
            "vectors: use a vector flow (see available_flows())"
        )
    layers = build_flow(spec, input_dim, context_dim, repeat=num_layers, defaults=DENSITY_DEFAULTS)
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
    """A normalizing-flow density on :math:`\\mathbb{R}^d`, or a conditional
    density :math:`p(x \\mid c)`.

    :param input_dim: the data's dimension :math:`d`.
    :param flow: ``"maf"``, ``"nsf"``, ``"realnvp"`` or the spec of one layer
        (e.g. ``"lu_linear+elementwise_spline"``). Options in
        :data:`DENSITY_DEFAULTS` apply where the spec does not set them:
        spline autoregressive flows score in one pass, spline couplings
        evaluate their spline from the data side, and MAF, affine and
        additive couplings do not start at the identity (``identity_init=False``).
    :param num_layers: how many times the layer is stacked.
    :param hidden_dims: hidden widths of the layers' networks (presets only;
        in a spec write them as an option, ``maf(hidden_dims=(64, 64))``).
    :param normalization: ``"actnorm"`` (default), ``"batchnorm"`` (Pyro's
        :class:`~pyro.distributions.transforms.BatchNorm`, batch statistics
        while training) or ``None``, between repeats of the layer.
    :param context_dim: the width :math:`C` of the context rows of a
        conditional density (``None``: unconditional). Every layer that has a
        conditional version is built conditional; the context is
        standardised (:meth:`set_standardisation`) as the data is.
    :param embedding: a module that maps the standardised context, shape
        ``(..., C)``, to the conditioners' input, shape ``(..., E)``, trained
        with the flow (nflows' and sbi's embedding nets). ``save`` keeps its
        weights; ``load`` needs the module again (only weights are stored).

    ``log_prob(x)`` (or ``log_prob(x, context)``) scores points in the data's
    units, ``sample(n)`` (``sample(n, context)``) draws points,
    ``distribution()`` is the model as a Pyro distribution, ``save(path)`` /
    :func:`load` store and restore it exactly.
    """

    def __init__(
        self,
        input_dim: int,
        flow: str = DEFAULT_FLOW,
        num_layers: int = 5,
        hidden_dims: Sequence[int] | None = None,
        normalization: str | None = "actnorm",
        *,
        context_dim: int | None = None,
        embedding: nn.Module | None = None,
        embedded_dim: int | None = None,
    ):
        super().__init__()
        check_count("num_layers", num_layers)
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        if hidden_dims is not None:
            hidden_dims = check_hidden_dims(hidden_dims)
        conditioner_dim = _conditioner_width(context_dim, embedding, embedded_dim)
        self.config = {
            "input_dim": input_dim,
            "flow": flow,
            "num_layers": num_layers,
            "hidden_dims": hidden_dims,
            "normalization": normalization,
        }
        if context_dim is not None:  # unconditional models keep the configuration they always had
            self.config["context_dim"] = context_dim
            self.config["embedded_dim"] = None if embedding is None else conditioner_dim
        self.embedding = embedding
        self.layers = nn.ModuleList(_stack(input_dim, flow, num_layers, hidden_dims, normalization, conditioner_dim))
        self.register_buffer("loc", torch.zeros(input_dim))
        self.register_buffer("scale", torch.ones(input_dim))
        if context_dim is not None:
            self.register_buffer("context_loc", torch.zeros(context_dim))
            self.register_buffer("context_scale", torch.ones(context_dim))

    @property
    def input_dim(self) -> int:
        return self.config["input_dim"]

    @property
    def context_dim(self) -> int | None:
        """The width of the context rows (``None`` for an unconditional model)."""
        return self.config.get("context_dim")

    def set_standardisation(self, data: torch.Tensor, context: torch.Tensor | None = None) -> None:
        """Fit the fixed affine map from the flow's output to the data's units
        and, for a conditional model, the context's standardisation (a
        constant context column keeps scale 1)."""
        with torch.no_grad():
            self.loc.copy_(data.mean(0))
            self.scale.copy_(data.std(0))
            if context is not None:
                scale = context.std(0) if len(context) > 1 else torch.ones_like(self.context_scale)
                self.context_loc.copy_(context.mean(0))
                self.context_scale.copy_(torch.where(scale > 0, scale, torch.ones_like(scale)))

    def _conditioner_input(self, context: torch.Tensor | None) -> torch.Tensor | None:
        """The conditioners' input for ``context``: standardised, then embedded;
        ``ValueError`` for a context that is missing, unexpected or malformed."""
        if self.context_dim is None:
            if context is not None:
                raise ValueError("this DensityModel is not conditional: call it without a context")
            return None
        if context is None:
            raise ValueError(
                f"this DensityModel is conditional on a context of width {self.context_dim}: pass the context"
            )
        check_event(context, self.context_dim, "DensityModel", "context")
        context = context.to(self.context_loc)
        check_finite(context, "DensityModel", "context")
        standardised = (context - self.context_loc) / self.context_scale
        return standardised if self.embedding is None else self.embedding(standardised)

    def distribution(self, context: torch.Tensor | None = None) -> dist.TransformedDistribution:
        """The model as a Pyro distribution with ``event_shape == (d,)``; for a
        conditional model, given ``context`` (shape ``(..., C)``), with the
        context's batch shape."""
        condition = self._conditioner_input(context)
        base = dist.Normal(torch.zeros_like(self.loc), torch.ones_like(self.loc)).to_event(1)
        layers = list(self.layers)
        if condition is not None:
            base = base.expand(condition.shape[:-1])
            layers = [_conditioned(layer, condition) for layer in layers]
        standardisation = AffineTransform(self.loc, self.scale, event_dim=1)
        return dist.TransformedDistribution(base, [*layers, standardisation])

    def log_prob(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Log-density of each row of ``x`` (a ``torch.Tensor`` of shape ``(..., d)``), in the data's units;
        for a conditional model, given ``context`` (shape ``(..., C)``, broadcasting against ``x``'s batch).

        ``x`` is converted to the model's dtype (float32). A density at a point
        that is not finite there is undefined, so points holding NaN or infinity,
        or values beyond float32's range (``1e200``), are refused: ``ValueError``
        naming them (their indices in ``x``'s batch). So are finite points that
        the flow sends to infinity (far outside the data the model was fitted to).
        """
        check_event(x, self.input_dim, "DensityModel.log_prob", "point")
        points = x.to(self.loc)
        bad = ~torch.isfinite(points).all(-1)
        if bool(bad.any()):
            what = "NaN or infinite values" if not torch.isfinite(x).all() else "values that overflow float32"
            raise ValueError(
                f"DensityModel.log_prob got {what} in {int(bad.sum())} point(s) (first: {_where(bad)[:10]}); "
                "a density is defined only at finite points: remove or impute them"
            )
        with _distribution_checks(True):
            distribution = self.distribution(context)
            try:
                return distribution.log_prob(points)
            except ValueError as error:
                if "Expected value argument" not in str(error):
                    raise
            with _distribution_checks(False), torch.no_grad():
                lost = ~torch.isfinite(self.distribution(context).log_prob(points))
        raise ValueError(
            f"DensityModel.log_prob: the flow sends {int(lost.sum())} point(s) (first: {_where(lost)[:10]}) to "
            f"infinity or NaN; they lie too far outside the data the model was fitted to (largest |x| "
            f"{points.abs().max().item():.3g}) to be scored"
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """``model(x)`` (or ``model(x, context)``) is :meth:`log_prob` (what ``DistributedDataParallel`` wraps)."""
        return self.log_prob(x) if context is None else self.log_prob(x, context)

    @torch.no_grad()
    def sample(self, n: int, context: torch.Tensor | None = None) -> torch.Tensor:
        """Draw ``n`` points: shape ``(n, d)``; for a conditional model, given
        one context row (shape ``(C,)``) the same, and given a batch of them
        (shape ``(m, C)``) ``(m, n, d)``, ``n`` points for each row.

        ``ValueError`` before drawing if they would not fit in memory: the
        estimate is ``n * (d + w) * 4`` bytes (times ``m``), ``w`` the widest
        layer of the model, against the memory of the model's device (the
        machine's, on the CPU); ``MemoryError`` if an allocation fails all the same.
        """
        check_count("n", n)
        rows = 1 if context is None or context.dim() < 2 else math.prod(context.shape[:-1])
        _check_sample_memory(self, n * rows)
        try:
            drawn = self.distribution(context).sample((n,))
            return drawn if drawn.dim() == 2 else drawn.movedim(0, -2)
        except RuntimeError as error:
            if "alloc" not in str(error).lower() and not isinstance(error, torch.OutOfMemoryError):
                raise
        raise MemoryError(f"DensityModel.sample(n={n}) ran out of memory; draw fewer points at a time")

    def save(self, path: str | Path) -> None:
        """Write the configuration (as JSON), the weights and their checksum to
        ``path``, atomically (see :mod:`pyro_nflows.saving`)."""
        write_model(self, self.config, "density", path)

    @classmethod
    def load(
        cls, path: str | Path, map_location: str | torch.device | None = "cpu", embedding: nn.Module | None = None
    ) -> "DensityModel":
        """Restore a model written by :meth:`save` (weights only, no unpickling).
        A model trained with an ``embedding`` needs a module of the same
        architecture here, which receives the saved weights.

        ``ValueError`` naming the file for anything that is not an intact
        model file of this version: unreadable bytes, a checksum that does not
        match, non-finite weights, a configuration that does not fit the
        weights (checked before anything is built), an embedding missing or
        given where the file has none."""

        def check(config: dict, state) -> None:
            _check_saved_config(config, state)
            _check_saved_embedding(config, embedding)

        extra = {} if embedding is None else {"embedding": embedding}
        return read_model(cls, "density", path, map_location, check_config=check, build_kwargs=extra)


def _check_saved_config(config: dict, state) -> None:
    """What a saved configuration must say of the weights saved with it, checked
    before building: ``input_dim`` is the size of the standardisation, and
    there are at least ``num_layers`` layers (every layer has weights)."""
    loc = state.get("loc")
    if loc is None or loc.dim() != 1 or config.get("input_dim") != loc.numel():
        shape = None if loc is None else tuple(loc.shape)
        raise ValueError(f"input_dim {config.get('input_dim')!r} is not the size of its standardisation 'loc' {shape}")
    layers = {key.split(".")[1] for key in state if key.startswith("layers.")}
    num_layers = config.get("num_layers")
    if isinstance(num_layers, int) and num_layers > len(layers):
        raise ValueError(f"num_layers {num_layers} is more than the {len(layers)} layers whose weights it holds")


def _check_saved_embedding(config: dict, embedding: nn.Module | None) -> None:
    """A model saved with an embedding loads with one, and one without without."""
    saved = config.get("embedded_dim") is not None
    if saved and embedding is None:
        raise ValueError(
            f"it was trained with an embedding of the context (output width {config['embedded_dim']}), of which only "
            "the weights are saved: pass load(path, embedding=<a module of the same architecture>)"
        )
    if not saved and embedding is not None:
        raise ValueError("it has no embedding, but load was given one")


def _conditioner_width(context_dim: int | None, embedding: nn.Module | None, embedded_dim: int | None) -> int | None:
    """The width of the conditioners' input: the context's, or the embedding's output
    (``embedded_dim`` as saved, else measured on a zero context)."""
    if context_dim is None:
        if embedding is not None:
            raise ValueError("an embedding maps a context: give context_dim, the context rows' width")
        return None
    check_count("context_dim", context_dim)
    if embedding is None:
        return context_dim
    if not isinstance(embedding, nn.Module):
        raise ValueError(f"embedding must be a torch.nn.Module, got {type(embedding).__name__}")
    if embedded_dim is not None:
        return check_count("embedded_dim", embedded_dim)
    was_training = embedding.training
    try:
        with torch.no_grad():
            dtype = next(embedding.parameters(), torch.zeros(())).dtype
            output = embedding.eval()(torch.zeros(2, context_dim, dtype=dtype))
    except Exception as error:  # noqa: BLE001 - a user's module may fail in any way
        raise ValueError(
            f"embedding must map contexts of shape (n, {context_dim}) to (n, E); on zeros of shape (2, {context_dim}) "
            f"it raised {type(error).__name__}: {error}"
        ) from None
    finally:
        embedding.train(was_training)
    if not isinstance(output, torch.Tensor) or output.shape[:-1] != (2,):
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ValueError(f"embedding must map contexts of shape (n, {context_dim}) to (n, E), got {shape}")
    return output.shape[-1]


def _conditioned(layer, condition: torch.Tensor):
    """``layer`` conditioned on ``condition`` if it is a conditional flow, else ``layer``."""
    return layer.condition(condition) if isinstance(layer, ConditionalTransformModule) else layer


def _memory_of(device: torch.device) -> int | None:
    """The bytes of memory of ``device`` (the machine's physical memory for the CPU), or None if unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _check_sample_memory(model: DensityModel, n: int) -> None:
    widest = max((max(parameter.shape, default=1) for parameter in model.parameters()), default=1)
    needed = n * (model.input_dim + widest) * model.loc.element_size()
    available = _memory_of(model.loc.device)
    if available is not None and needed > available:
        raise ValueError(
            f"sample(n={n}) would need about {needed / 2**30:.3g} GiB (n * (d + the widest layer, {widest}) * "
            f"{model.loc.element_size()} bytes), more than the {available / 2**30:.3g} GiB of memory of "
            f"{model.loc.device}; draw fewer points at a time"
        )


def load(path: str | Path, map_location: str | torch.device | None = "cpu") -> DensityModel:
    """Restore a :class:`DensityModel` written by :meth:`DensityModel.save`."""
    return DensityModel.load(path, map_location=map_location)


@dataclass(frozen=True)
class _Rows:
    """Rows of data and, for a conditional density, their context rows."""

    data: torch.Tensor
    context: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index) -> "_Rows":
        return _Rows(self.data[index], None if self.context is None else self.context[index])

    def to(self, device: torch.device) -> "_Rows":
        move = functools.partial(torch.Tensor.to, device=device, dtype=torch.float32)
        return _Rows(move(self.data), None if self.context is None else move(self.context))

    def log_prob(self, model: Callable[..., torch.Tensor]) -> torch.Tensor:
        """``model(data)``, or ``model(data, context)``."""
        return model(self.data) if self.context is None else model(self.data, self.context)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"": self.data} if self.context is None else {"": self.data, "context": self.context}


def _check_rows(data, context, name: str, min_rows: int) -> _Rows:
    """``data`` (checked by :func:`check_data`) and its ``context`` rows, one per data row."""
    data = check_data(data, name, min_rows=min_rows)
    if context is None:
        return _Rows(data)
    context = check_rows(context, f"the context of {name}")
    if len(context) != len(data):
        raise ValueError(
            f"{name} has {len(data)} rows but its context has {len(context)}: give one context row per row"
        )
    return _Rows(data, context)


def _mean_log_prob(model: DensityModel, rows: _Rows, batch_size: int, ranks: Ranks = Ranks()) -> float:
    """Mean log-density of ``rows``; each process scores its share, the sums are combined."""
    shard = rows[ranks.rank :: ranks.world_size] if ranks.distributed else rows
    with torch.no_grad():
        total = sum(
            shard[start : start + batch_size].log_prob(model.log_prob).double().sum().item()
            for start in range(0, len(shard), batch_size)
        )
    if ranks.distributed:  # every process must take the same early-stopping decision: use rank 0's sum
        combined = ranks.all_reduce(torch.tensor([total], dtype=torch.float64, device=rows.data.device))
        total = ranks.from_main(combined).item()
    return total / len(rows)


def _batches(order: torch.Tensor, batch_size: int, min_rows: int) -> list[torch.Tensor]:
    """``order`` in batches of ``batch_size``; a last batch under ``min_rows`` joins the one before."""
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) < min_rows:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


def _draw_seed() -> int:
    """A seed drawn from torch's global generator: reproducible after the
    caller's ``torch.manual_seed``, and (unlike ``torch.seed()``) without
    reseeding the caller's random stream."""
    return int(torch.randint(0, 2**62, ()).item())


def _split(rows: _Rows, validation: _Rows | None, validation_fraction: float, generator) -> tuple[_Rows, _Rows]:
    """The training and validation rows: ``validation`` if given, else a seeded
    ``validation_fraction`` of ``rows``."""
    if validation is not None:
        if validation.data.shape[1] != rows.data.shape[1]:
            raise ValueError(f"validation_data has {validation.data.shape[1]} columns, data has {rows.data.shape[1]}")
        if (validation.context is None) != (rows.context is None):
            raise ValueError("give validation_context exactly when you give context (and a context for each)")
        if rows.context is not None and validation.context.shape[1] != rows.context.shape[1]:
            raise ValueError(
                f"validation_context has {validation.context.shape[1]} columns, context has {rows.context.shape[1]}"
            )
        return rows, validation
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction must lie in (0, 1), got {validation_fraction!r}")
    order = torch.randperm(len(rows), generator=generator)
    count = max(1, int(round(validation_fraction * len(rows))))
    if len(rows) - count < 2:
        raise ValueError(f"data has {len(rows)} rows: too few to hold out {count} for validation and train on the rest")
    return rows[order[count:]], rows[order[:count]]


def _fingerprint(train: _Rows, validation: _Rows) -> str:
    """The SHA-256 of the training and validation rows and their contexts
    (dtype, shapes and bytes, in the order fit uses them): any change of the
    data, of the order of its columns or of the split tells a checkpoint made
    from other data."""
    parts = {f"{part}{'_' + key if key else ''}": tensor
             for part, rows in (("train", train), ("validation", validation)) for key, tensor in rows.tensors().items()}
    return checksum(parts)


def _given_rows(data, context, validation_data, validation_context) -> tuple[_Rows, _Rows | None]:
    """The training rows and the given validation rows (``None``: held out of ``data``), checked."""
    rows = _check_rows(data, context, "data", min_rows=2)
    if validation_data is None:
        if validation_context is not None:
            raise ValueError("validation_context goes with validation_data: give both, or neither")
        return rows, None
    return rows, _check_rows(validation_data, validation_context, "validation_data", 1)


def _optimisation(model: nn.Module, lr: float, steps: int):
    """Adam and a cosine schedule over ``steps`` steps. ``foreach``: one
    multi-tensor update (measured: benchmarks/README.md#fit-foreach)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, foreach=True)
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)


def _check_settings(epochs: int, batch_size: int, patience: int, lr: float, clip_norm: float | None) -> None:
    for name, value in [("epochs", epochs), ("batch_size", batch_size), ("patience", patience)]:
        check_count(name, value)
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if clip_norm is not None:  # a norm <= 0 would flip or freeze every clipped gradient
        check_positive("clip_norm", clip_norm)


def _agree_across_processes(
    ranks: Ranks, device: torch.device, rows: _Rows, validation: _Rows | None, batch_size: int, seed, arguments: list
) -> int | None:
    """Under data parallelism, check that every process was given the same
    data and ``arguments``, and return the seed they all use (rank 0's draw
    when ``seed`` is None). In a world of one, ``seed`` as it is."""
    if not ranks.distributed:
        return seed
    if batch_size < ranks.world_size:
        raise ValueError(
            f"batch_size is the global batch, shared out over the {ranks.world_size} processes of the "
            f"data-parallel run, and must be at least {ranks.world_size}; got {batch_size}"
        )
    text = json.dumps(arguments, default=str)
    given = [tensor for part in (rows, validation) if part is not None for tensor in part.tensors().values()]
    numbers = [zlib.crc32(text.encode()), len(given), *(number for tensor in given for number in summary(tensor))]
    check_same_everywhere(numbers, ranks, device, "fit")
    if seed is None:  # every process must draw the same initialisation, split and shuffling
        shared = torch.tensor([_draw_seed()], dtype=torch.int64, device=device)
        seed = int(ranks.from_main(shared).item())
    return seed


def _initialise(model: DensityModel, train: _Rows, generator: torch.Generator, batch_size: int) -> None:
    """The standardisations from the training rows, and the data-dependent
    initialisations (actnorm) from a large batch of them."""
    model.set_standardisation(train.data, train.context)
    with torch.no_grad():
        train[torch.randperm(len(train), generator=generator)[: 4 * batch_size].to(train.data.device)].log_prob(
            model.log_prob
        )


def _batchnorm_buffers(model: nn.Module) -> list[torch.Tensor]:
    """The running statistics of the model's BatchNorm layers: the only buffers that change in training."""
    return [buffer for module in model.modules() if isinstance(module, BatchNorm) for buffer in module.buffers()]


def _min_rows(model: nn.Module, ranks: Ranks, batch_size: int, train_rows: int) -> int:
    """The fewest rows a batch may have: BatchNorm's batch variance needs 2 on
    every process (a short last batch joins the one before); other layers take any."""
    if not _batchnorm_buffers(model):
        return 1
    min_rows = 2 * ranks.world_size
    if min(batch_size, train_rows) < min_rows:
        each = f" on each of the {ranks.world_size} processes" if ranks.distributed else ""
        raise ValueError(
            f"normalization='batchnorm' needs batches of at least 2 rows{each}: batch_size and the number of "
            f"training rows must be at least {min_rows}; got batch_size {batch_size} and {train_rows} training rows"
        )
    return min_rows


@dataclass
class _Epochs:
    """fit's epoch of training: shuffled global batches, each process scoring
    its share of every batch.

    Under torchrun, DDP averages the gradients of the processes' losses; each
    process's loss is its rows' sum scaled by ``world_size / len(batch)``, so
    the average is the gradient of the batch mean. ``score`` maps indices of
    training rows to their log-densities.
    """

    score: Callable[[torch.Tensor], torch.Tensor]
    rows: int
    state: TrainingState
    batch_size: int
    min_rows: int
    clip_norm: float
    ranks: Ranks
    device: torch.device

    def train(self, epoch: int) -> float:
        """One pass over the training rows; their mean log-likelihood."""
        order = torch.randperm(self.rows, generator=self.state.generator).to(self.device)
        total = 0.0
        for batch in _batches(order, self.batch_size, self.min_rows):
            loss, batch_mean = self._loss(batch)
            check_loss(-batch_mean, epoch)
            gradient_step(loss, self.state.optimizer, self.state.model.parameters(), self.clip_norm)
            self.state.scheduler.step()
            total += batch_mean * len(batch)
        return total / self.rows

    def _loss(self, batch: torch.Tensor) -> tuple[torch.Tensor, float]:
        """This process's loss on ``batch`` and the batch's mean log-likelihood over every process."""
        ranks = self.ranks
        if not ranks.distributed:
            loss = -self.score(batch).mean()
            return loss, -loss.item()
        rows, weight = batch[ranks.rank :: ranks.world_size], ranks.world_size / len(batch)
        if len(rows) == 0:  # a short last batch: take part in the gradient sync with zero weight
            rows, weight = batch[:1], 0.0
        log_probs = self.score(rows)
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        batch_sum = log_probs.detach().double().sum() if weight else zero
        return -weight * log_probs.sum(), ranks.all_reduce(batch_sum.reshape(1)).item() / len(batch)


def _row_scorer(model: DensityModel, train: _Rows, ranks: Ranks, device, sync_buffers: bool) -> Callable:
    """Indices of training rows -> their log-densities, through DDP under torchrun.
    Every parameter takes part in ``log_prob`` (no ``find_unused_parameters``);
    of the buffers only BatchNorm's running statistics change, so only they
    are worth re-broadcasting from rank 0 (``sync_buffers``)."""
    score = data_parallel(model, device, sync_buffers) if ranks.distributed else model.log_prob
    return lambda rows: train[rows].log_prob(score)


def _resume(
    checkpoint, state: TrainingState, settings: str, fingerprint: str, ranks: Ranks, device
) -> Checkpoint | None:
    """The run's :class:`~pyro_nflows.training.Checkpoint` (``None`` without
    one), ``state`` loaded from it when the file exists."""
    if checkpoint is None:
        return None
    if ranks.main:  # a checkpoint that cannot be written fails now, not after the first epoch
        check_output(checkpoint, "checkpoint")
    saved = Checkpoint(checkpoint, settings, fingerprint, ranks, device)
    if saved.resume(state) and state.loop.progress:
        print(f"resuming from {checkpoint} after epoch {len(state.loop.history.validation)}")
    return saved


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
    patience: int = 30,
    clip_norm: float = 5.0,
    seed: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    checkpoint: str | Path | None = None,
    distributed: bool = True,
    *,
    context=None,
    validation_context=None,
    embedding: nn.Module | None = None,
) -> DensityModel:
    """Fit a flow density to the rows of ``data`` (shape ``(n, d)``) by maximum
    likelihood; given ``context`` (shape ``(n, C)``), a conditional density
    :math:`p(x \\mid c)`.

    :param flow: ``"maf"`` (default), ``"nsf"``, ``"realnvp"`` or any registry spec
        of one layer; ``num_layers``, ``hidden_dims``, ``normalization`` as in
        :class:`DensityModel`.
    :param batch_size: rows per optimisation step (the global batch when
        training data-parallel).
    :param clip_norm: the largest norm of the gradient, a positive finite
        number (``None``: not clipped).
    :param checkpoint: a file to write after every epoch; if it exists, training
        resumes from it (the same data, to the byte, and the same settings are
        required: the model's, ``epochs``, ``batch_size``, ``lr``, ``patience``,
        ``clip_norm``). Its folder must exist.
    :param distributed: train data-parallel when started under ``torchrun``
        (see below); ``False`` trains in this process alone even there.
    :param context: one context row per row of ``data``: the model is then
        conditional (every layer that has a conditional version reads the
        context; the context's standardisation, fitted on the training rows,
        is part of the model). ``validation_data`` then needs its
        ``validation_context``.
    :param embedding: a module mapping the standardised context to the
        conditioners' input, trained jointly (see :class:`DensityModel`).
    :param patience: epochs without a better validation log-likelihood before
        stopping (default 30). The learning rate follows a cosine schedule over
        all ``epochs`` and most of the gain comes late, so a short patience
        stops on a mid-schedule plateau; the best weights are restored, so a
        long one costs only time (measured: benchmarks/README.md#fit-patience).

    Holds out ``validation_fraction`` of the rows (or uses ``validation_data``),
    trains with Adam and a cosine learning-rate schedule, clips gradient norms
    at ``clip_norm``, stops early after ``patience`` epochs without a better
    validation log-likelihood and restores the best weights. A progress bar
    shows train and validation log-likelihood per point. Ctrl-C, or a loss
    that turns NaN, stops training and keeps the best model so far (with a
    warning). The returned model's ``history`` holds the curves.

    **Data-parallel training.** Started under ``torchrun`` with more than one
    process (``WORLD_SIZE > 1``; or inside a process group of more than one
    process that is already initialised), ``fit`` joins the process group,
    initialising it if need be (``gloo`` on CPU, ``nccl`` when ``device`` is
    CUDA; ``device="cuda"`` means GPU ``LOCAL_RANK``), and trains with
    :class:`~torch.nn.parallel.DistributedDataParallel`. Every process calls
    ``fit`` with the same ``data`` and arguments (checked: ``ValueError``
    otherwise); all of them draw the same model initialisation, validation
    split and shuffling (without a ``seed``, rank 0's random seed is shared),
    and process ``r`` of ``W`` scores rows ``r::W`` of each global batch of
    ``batch_size`` rows, weighted so that the averaged gradient is that of the
    batch's mean: the result matches one process trained with the same
    ``batch_size`` up to rounding (``batch_size`` must be at least ``W``).
    One exception: ``normalization="batchnorm"`` uses each process's own
    share for its batch statistics, as ``BatchNorm`` does under DDP (its
    running statistics are rank 0's); it needs 2 rows on every process, so
    ``batch_size`` must be at least ``2 W`` and a shorter last batch joins
    the one before (in one process too, for a last batch of one row).
    Validation is shared out and its sum combined, so every process takes the
    same early-stopping decision. Only rank 0 shows the progress bar, prints,
    warns and writes the checkpoint; every process reads it to resume (so it
    must be on a file system they share; a checkpoint resumes with any number
    of processes). Under ``torchrun``, Ctrl-C ends every process (torchrun
    stops the job): rerun with the same ``checkpoint`` to resume. Every
    process returns the same plain :class:`DensityModel` with the best
    weights. The process group is left initialised for later calls.
    """
    rows, given = _given_rows(data, context, validation_data, validation_context)
    _check_settings(epochs, batch_size, patience, lr, clip_norm)
    ranks, device = join_process_group(distributed, torch.device(device) if device is not None else torch.device("cpu"))
    arguments = [flow, num_layers, hidden_dims and list(hidden_dims), normalization, epochs, batch_size, lr,
                 validation_fraction, patience, clip_norm, seed, device.type, str(checkpoint)]
    seed = _agree_across_processes(ranks, device, rows, given, batch_size, seed, arguments)
    if seed is not None:
        torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed if seed is not None else _draw_seed())
    train, validation = _split(rows, given, validation_fraction, generator)

    context_dim = None if rows.context is None else rows.context.shape[1]
    model = DensityModel(
        rows.data.shape[1], flow, num_layers, hidden_dims, normalization, context_dim=context_dim, embedding=embedding
    ).to(device)
    train, validation = train.to(device), validation.to(device)
    _initialise(model, train, generator, batch_size)
    min_rows = _min_rows(model, ranks, batch_size, len(train))
    steps = epochs * len(_batches(torch.arange(len(train)), batch_size, min_rows))
    optimizer, scheduler = _optimisation(model, lr, steps)
    hint = f"; resume with fit(..., checkpoint={str(checkpoint)!r})" if checkpoint is not None else ""
    loop = EpochLoop(model, epochs, patience, metric="validation log-likelihood", name="fit", progress=progress,
                     ranks=ranks, interrupt_hint=hint)
    state = TrainingState(model, optimizer, scheduler, generator, loop)
    settings = json.dumps({**model.config, "epochs": epochs, "batch_size": batch_size, "lr": lr, "patience": patience,
                           "clip_norm": clip_norm})
    saved = _resume(checkpoint, state, settings, _fingerprint(train, validation), ranks, device)

    moving = _batchnorm_buffers(model)
    score = _row_scorer(model, train, ranks, device, sync_buffers=bool(moving))
    epoch_of = _Epochs(score, len(train), state, batch_size, min_rows, clip_norm, ranks, device)
    with loop:
        for epoch in loop:
            model.train()
            train_value = epoch_of.train(epoch)
            for buffer in moving:  # validate (and keep) the same model on every process
                ranks.from_main(buffer.data)
            model.eval()
            loop.record(epoch, train_value, _mean_log_prob(model, validation, 4 * batch_size, ranks))
            if saved is not None:
                saved.save(state)
    del score, epoch_of
    if ranks.distributed:  # return only once rank 0 has written the last checkpoint
        ranks.all_agree(True, device)
    model.history = loop.history
    return model
