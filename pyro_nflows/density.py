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

Started under ``torchrun`` (more than one process), ``fit`` trains
data-parallel with :class:`torch.nn.parallel.DistributedDataParallel`: every
process holds the whole model and data, each takes its share of every global
batch, and the result matches one process trained with the same global batch.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import warnings
import zlib
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
from pyro_nflows.saving import read_model, write_model
from pyro_nflows.transforms.elementwise import ActNorm
from pyro_nflows.validation import check_count, check_rows

__all__ = ["DEFAULT_FLOW", "PRESETS", "DensityModel", "FitHistory", "check_data", "fit", "load"]

# Names for the usual stacks; any other registry spec is used as written.
PRESETS = {
    "maf": "maf",  # Papamakarios et al. 2017: affine MADE layers, alternating orderings
    "nsf": "spline_autoregressive",  # Durkan et al. 2019: autoregressive rational-quadratic splines
    "realnvp": "affine_coupling",  # Dinh et al. 2017: affine couplings, alternating halves
}
DEFAULT_FLOW = "maf"
# Options for every layer that takes them, unless the spec sets them: a density model is trained
# by scoring data, so spline couplings evaluate their spline from the data side (see
# ConditionedSplineCoupling; the layer's own default, the noise side, is the form guides train),
# and MAF, affine and additive couplings start as a mild random map rather than at the identity,
# which a guide needs and a density model does not (they train better from there: the measurements
# are in the docstrings of pyro_nflows.transforms.coupling and pyro_nflows.transforms.autoregressive.maf).
DENSITY_DEFAULTS = {"spline_from": "x", "identity_init": False}
NORMALIZATIONS = ("actnorm", "batchnorm", None)


def check_data(data, name: str = "data", min_rows: int = 2) -> torch.Tensor:
    """Return ``data`` as a float tensor of shape ``(n, d)``, or raise ``ValueError``
    naming the rows or columns at fault (non-finite values, constant columns,
    too few rows, wrong number of dimensions)."""
    tensor = check_rows(data, name, min_rows=min_rows)
    constant = torch.nonzero(tensor.std(0) == 0).flatten().tolist() if len(tensor) > 1 else []
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
    layers = build_flow(spec, input_dim, repeat=num_layers, defaults=DENSITY_DEFAULTS)
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
        (e.g. ``"lu_linear+elementwise_spline"``). Options in
        :data:`DENSITY_DEFAULTS` apply where the spec does not set them:
        spline couplings evaluate their spline from the data side, and
        MAF, affine and additive couplings do not start at the identity
        (``identity_init=False``).
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
        # The layers one by one, not their ComposeTransformModule: torch
        # recomputes a composition's domain and codomain (a walk over every
        # part) at each access, about 10% of a small model's log_prob.
        return dist.TransformedDistribution(base, [*self.layers, standardisation])

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Log-density of each row of ``x`` (shape ``(..., d)``), in the data's units."""
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.input_dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"DensityModel expects points whose last dimension is {self.input_dim}, got {shape}")
        return self.distribution().log_prob(x.to(self.loc))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``model(x)`` is :meth:`log_prob` (what ``DistributedDataParallel`` wraps)."""
        return self.log_prob(x)

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """Draw ``n`` points, shape ``(n, d)``."""
        return self.distribution().sample((check_count("n", n),))

    def save(self, path: str | Path) -> None:
        """Write the configuration (as JSON) and the weights to ``path``."""
        write_model(self, self.config, "density", path)

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device | None = "cpu") -> "DensityModel":
        """Restore a model written by :meth:`save` (weights only, no unpickling)."""
        return read_model(cls, "density", path, map_location)


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


@dataclass(frozen=True)
class _Ranks:
    """This process's place in data-parallel training (``world_size == 1``: alone)."""

    world_size: int = 1
    rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _join_process_group(distributed: bool, device: torch.device) -> tuple[_Ranks, torch.device]:
    """Find (or, under torchrun, create) the process group, and the device for this rank.

    Outside ``torchrun`` and without an initialised process group of more than
    one process, returns a world of one and ``device`` unchanged.
    """
    if not distributed or not torch.distributed.is_available():
        return _Ranks(), device
    td = torch.distributed
    initialised = td.is_initialized()
    if initialised:
        world_size, rank = td.get_world_size(), td.get_rank()
    else:
        try:
            world_size = int(os.environ.get("WORLD_SIZE", "1"))
        except ValueError:
            raise ValueError(f"WORLD_SIZE must be an integer, got {os.environ['WORLD_SIZE']!r}") from None
        missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
        if world_size > 1 and missing:
            raise ValueError(
                f"WORLD_SIZE={world_size} asks for data-parallel training, but the environment lacks "
                f"{', '.join(missing)}: start the script with torchrun, or pass distributed=False"
            )
        rank = int(os.environ.get("RANK", "0"))
    if world_size <= 1:
        return _Ranks(), device
    if device.type == "cuda" and device.index is None:  # one GPU per process on each node
        local_rank = os.environ.get("LOCAL_RANK")
        device = torch.device("cuda", int(local_rank) if local_rank is not None else rank % max(torch.cuda.device_count(), 1))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not initialised:
        td.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        world_size, rank = td.get_world_size(), td.get_rank()
    if td.get_backend() == "nccl" and device.type != "cuda":
        raise ValueError(f"the process group uses nccl, which needs CUDA tensors, but the device is {device}; pass device='cuda'")
    return _Ranks(world_size, rank), device


def _all_reduce(values: torch.Tensor, ranks: _Ranks, op=None) -> torch.Tensor:
    """``values`` combined over every process (summed unless ``op`` says otherwise)."""
    if ranks.distributed:
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM if op is None else op)
    return values


def _all_agree(ok: bool, ranks: _Ranks, device: torch.device) -> bool:
    """Whether ``ok`` holds on every process (a collective: call it on all of them)."""
    flag = torch.tensor([1.0 if ok else 0.0], device=device)
    return bool(_all_reduce(flag, ranks, torch.distributed.ReduceOp.MIN if ranks.distributed else None).item())


def _from_main(values: torch.Tensor, ranks: _Ranks) -> torch.Tensor:
    """``values`` as the main process (rank 0) holds them."""
    if ranks.distributed:
        torch.distributed.broadcast(values, src=0)
    return values


def _summary(tensor: torch.Tensor) -> list[float]:
    """Numbers that tell two tensors apart (shape, sum, and a sum weighted by row)."""
    rows = tensor.double().reshape(len(tensor), -1)
    weights = torch.arange(1, len(rows) + 1, dtype=torch.float64, device=rows.device)[:, None]
    return [float(n) for n in tensor.shape] + [rows.sum().item(), (rows * weights).sum().item()]


def _check_same_everywhere(numbers: list[float], ranks: _Ranks, device: torch.device) -> None:
    """Raise ``ValueError`` on every process unless they all passed the same ``numbers``."""
    if not ranks.distributed:
        return
    mine = torch.tensor(numbers, dtype=torch.float64, device=device)
    main = _from_main(mine.clone(), ranks)
    if not _all_agree(torch.equal(mine, main), ranks, device):
        raise ValueError(
            f"fit runs data-parallel over {ranks.world_size} processes, and every process must pass the same "
            "data, validation_data and arguments (each takes its share of every batch itself); "
            "they differ between processes"
        )


def _mean_log_prob(model: DensityModel, data: torch.Tensor, batch_size: int, ranks: _Ranks = _Ranks()) -> float:
    """Mean log-density of the rows of ``data``; each process scores its share, the sums are combined."""
    shard = data[ranks.rank :: ranks.world_size] if ranks.distributed else data
    with torch.no_grad():
        total = sum(model.log_prob(chunk).double().sum().item() for chunk in shard.split(batch_size))
    if ranks.distributed:  # every process must take the same early-stopping decision: use rank 0's sum
        combined = _all_reduce(torch.tensor([total], dtype=torch.float64, device=data.device), ranks)
        total = _from_main(combined, ranks).item()
    return total / len(data)


def _data_parallel(model: nn.Module, device: torch.device, sync_buffers: bool) -> nn.Module:
    """``model`` wrapped in DDP; buffers re-broadcast from rank 0 before every forward only if ``sync_buffers``."""
    ddp = nn.parallel.DistributedDataParallel
    keyword = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters else "broadcast_buffers"
    return ddp(model, device_ids=[device.index] if device.type == "cuda" else None, **{keyword: sync_buffers})


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
    patience: int = 30,
    clip_norm: float = 5.0,
    seed: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    checkpoint: str | Path | None = None,
    distributed: bool = True,
) -> DensityModel:
    """Fit a flow density to the rows of ``data`` (shape ``(n, d)``) by maximum likelihood.

    :param flow: ``"maf"`` (default), ``"nsf"``, ``"realnvp"`` or any registry spec
        of one layer; ``num_layers``, ``hidden_dims``, ``normalization`` as in
        :class:`DensityModel`.
    :param batch_size: rows per optimisation step (the global batch when
        training data-parallel).
    :param checkpoint: a file to write after every epoch; if it exists, training
        resumes from it (the same data and settings are required).
    :param distributed: train data-parallel when started under ``torchrun``
        (see below); ``False`` trains in this process alone even there.
    :param patience: epochs without a better validation log-likelihood before
        stopping (default 30). The learning rate follows a cosine schedule over
        all ``epochs``, and most of the gain comes late, once it is small; a
        short patience fires on a noisy mid-schedule plateau and forfeits that
        phase. Measured with ``benchmarks/density.py`` (100 epochs): at
        patience 10, two_moons/nsf scored 1.791 nats (seed 0) against 1.728
        when left to run, and stopped at epoch 46 of a run whose best epoch
        is 88 (seed 1); rings/realnvp 3.477 against 3.408 (seed 0). Patience
        30 gives the same result as no early stopping on those runs. The best weights are restored, so a
        longer patience costs only time (on data that overfits, such as
        digits with its best epoch near 35, 20 more epochs).

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
    data = check_data(data)
    for name, value in [("epochs", epochs), ("batch_size", batch_size), ("patience", patience)]:
        check_count(name, value)
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    ranks, device = _join_process_group(distributed, device)
    if ranks.distributed:
        if batch_size < ranks.world_size:
            raise ValueError(
                f"batch_size is the global batch, shared out over the {ranks.world_size} processes of the "
                f"data-parallel run, and must be at least {ranks.world_size}; got {batch_size}"
            )
        arguments = json.dumps(
            [flow, num_layers, hidden_dims and list(hidden_dims), normalization, epochs, batch_size, lr,
             validation_fraction, patience, clip_norm, seed, device.type, str(checkpoint)],
            default=str,
        )
        validation_summary = [] if validation_data is None else _summary(check_data(validation_data, "validation_data", 1))
        _check_same_everywhere(
            [zlib.crc32(arguments.encode()), *_summary(data), len(validation_summary), *validation_summary], ranks, device
        )
        if seed is None:  # every process must draw the same initialisation, split and shuffling
            shared = torch.tensor([_draw_seed()], dtype=torch.int64, device=device)
            seed = int(_from_main(shared, ranks).item())
    if seed is not None:
        torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed if seed is not None else _draw_seed())
    train, validation = _split(data, validation_data, validation_fraction, generator)

    model = DensityModel(train.shape[1], flow, num_layers, hidden_dims, normalization).to(device)
    train, validation = train.to(device, torch.float32), validation.to(device, torch.float32)
    model.set_standardisation(train)
    with torch.no_grad():  # data-dependent initialisations (actnorm) see a large batch
        model.log_prob(train[torch.randperm(len(train), generator=generator)[: 4 * batch_size].to(device)])

    # BatchNorm's batch variance needs 2 rows on every process (a short last batch joins the one
    # before); other layers take batches of any size.
    moving = [buffer for module in model.modules() if isinstance(module, BatchNorm) for buffer in module.buffers()]
    min_rows = 2 * ranks.world_size if moving else 1
    if min(batch_size, len(train)) < min_rows:
        each = f" on each of the {ranks.world_size} processes" if ranks.distributed else ""
        raise ValueError(
            f"normalization='batchnorm' needs batches of at least 2 rows{each}: batch_size and the number of "
            f"training rows must be at least {min_rows}; got batch_size {batch_size} and {len(train)} training rows"
        )
    # foreach: one multi-tensor update instead of a Python loop over the parameter tensors (torch's
    # default only on GPUs). On the CPU it takes 3-5% off a training step of fit's 5-layer models on
    # 2-D data, batch 256 (same model, the two optimisers interleaved: maf 10.6 -> 10.3 ms, realnvp
    # 12.6 -> 12.0, nsf 24.5 -> 24.1), with the same updates up to rounding.
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, foreach=True)
    steps_per_epoch = len(_batches(torch.arange(len(train)), batch_size, min_rows))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    history = FitHistory()
    best_state, best_value, waited, start = copy.deepcopy(model.state_dict()), -math.inf, 0, 0
    settings = json.dumps({**model.config, "epochs": epochs, "batch_size": batch_size, "lr": lr})
    fingerprint = _fingerprint(train, validation)
    progress = progress and ranks.main

    checkpoint = Path(checkpoint) if checkpoint is not None else None
    resume = checkpoint is not None and checkpoint.exists()
    if ranks.distributed and checkpoint is not None:  # rank 0 decides; every process then reads the file
        resume = bool(_from_main(torch.tensor([float(resume)], device=device), ranks).item())
    if resume:
        try:
            saved = torch.load(checkpoint, map_location=device, weights_only=True)
        except FileNotFoundError:
            if not ranks.distributed:
                raise
            saved = None
        if not _all_agree(saved is not None, ranks, device):
            raise ValueError(
                f"checkpoint {checkpoint} exists for rank 0 but not for every process of the data-parallel run: "
                "put it on a file system that they all share"
            )
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

    # Under torchrun, DDP averages the gradients of the processes' losses; each process's loss is
    # its rows' sum scaled by world_size / len(batch), so the average is the gradient of the batch mean.
    # Every parameter takes part in log_prob, so find_unused_parameters is not needed. The buffers
    # (standardisation, actnorm flags, MADE masks) agree from the start and never change, except
    # BatchNorm's running statistics: only those are worth re-broadcasting from rank 0 at every step.
    if ranks.distributed:
        score = _data_parallel(model, device, sync_buffers=bool(moving))
    else:
        score = model.log_prob
    remaining = range(start, epochs) if not history.stopped else range(0)
    bar = tqdm(desc="fit", disable=not progress, unit="epoch", initial=start, total=epochs)
    try:
        for epoch in remaining:
            model.train()
            order = torch.randperm(len(train), generator=generator).to(device)
            total = 0.0
            for batch in _batches(order, batch_size, min_rows):
                if ranks.distributed:
                    rows, weight = batch[ranks.rank :: ranks.world_size], ranks.world_size / len(batch)
                    if len(rows) == 0:  # a short last batch: take part in the gradient sync with zero weight
                        rows, weight = batch[:1], 0.0
                    log_probs = score(train[rows])
                    loss = -weight * log_probs.sum()
                    batch_sum = log_probs.detach().double().sum() if weight else torch.zeros((), dtype=torch.float64, device=device)
                    batch_mean = _all_reduce(batch_sum.reshape(1), ranks).item() / len(batch)
                else:
                    loss = -score(train[batch]).mean()
                    batch_mean = -loss.item()
                if not math.isfinite(batch_mean):
                    raise FloatingPointError(f"the training loss became {-batch_mean} in epoch {epoch + 1}")
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
                optimizer.step()
                scheduler.step()
                total += batch_mean * len(batch)
            for buffer in moving:  # validate (and keep) the same model on every process
                _from_main(buffer.data, ranks)
            model.eval()
            history.train.append(total / len(train))
            history.validation.append(_mean_log_prob(model, validation, 4 * batch_size, ranks))
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
            if checkpoint is not None and ranks.main:
                save_checkpoint()
            bar.update()  # counted here, not by iterating the bar, so that the last epoch shows too
            if history.stopped:
                break
    except KeyboardInterrupt:
        if ranks.distributed:  # the other processes may be anywhere: let torchrun end the job
            raise
        history.stopped = "interrupted"
        where = f"; resume with fit(..., checkpoint={str(checkpoint)!r})" if checkpoint is not None else ""
        warnings.warn(f"fit interrupted: returning the best model so far{where}", RuntimeWarning, stacklevel=2)
    except FloatingPointError as error:  # under torchrun every process sees the same combined loss
        history.stopped = f"diverged: {error}"
        if ranks.main:
            warnings.warn(f"fit stopped: {error}; returning the best model so far", RuntimeWarning, stacklevel=2)
    finally:
        bar.close()
    del score
    if ranks.distributed:  # return only once rank 0 has written the last checkpoint
        _all_agree(True, ranks, device)
    model.load_state_dict(best_state)
    model.eval()
    model.history = history
    return model
