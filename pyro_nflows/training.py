"""The epoch loop every trainer of the package shares.

A trainer (:func:`~pyro_nflows.density.fit`,
:func:`~pyro_nflows.vae.train.train_vae`) writes what one epoch of its model
does; this module does the rest, the same way for all of them:

- :class:`EpochLoop` runs the epochs with a progress bar, keeps the weights
  of the best validation score, stops early after ``patience`` epochs without
  a better one, and turns Ctrl-C or a loss that is no longer finite
  (:func:`check_loss`) into a stop that keeps the best weights, with a warning;
- :func:`gradient_step` is one optimiser step with optional gradient clipping;
- :class:`TrainingState` and :class:`Checkpoint` write everything an exact
  resume needs after every epoch, atomically and with a checksum
  (:func:`pyro_nflows.saving.save_atomically`), and resume from it.

A trainer reads::

    loop = EpochLoop(model, epochs, patience, metric="validation log-likelihood", name="fit")
    with loop:  # Ctrl-C and divergence end the loop here; the best weights are restored on the way out
        for epoch in loop:
            train_value = ...  # one epoch of training, returns the mean training objective
            loop.record(epoch, train_value, validation_value)
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from pyro_nflows.distributed import Ranks
from pyro_nflows.saving import check_finite_weights, checksum, read_payload, save_atomically, verify_checksum

__all__ = ["Checkpoint", "EpochLoop", "History", "TrainingState", "check_loss", "gradient_step"]


@dataclass
class History:
    """What a trainer saw, per epoch: the mean training objective and the
    validation score (higher is better), the best epoch (0-based) and why
    training stopped."""

    train: list[float] = field(default_factory=list)
    validation: list[float] = field(default_factory=list)
    best_epoch: int = -1
    stopped: str = ""


def check_loss(loss: float, epoch: int) -> None:
    """Raise ``FloatingPointError`` if the training loss of 0-based ``epoch`` is not finite
    (the :class:`EpochLoop` then stops and keeps the best weights)."""
    if not math.isfinite(loss):
        raise FloatingPointError(f"the training loss became {loss} in epoch {epoch + 1}")


def gradient_step(
    loss: torch.Tensor, optimizer: torch.optim.Optimizer, parameters: Iterable[nn.Parameter], clip_norm: float | None
) -> None:
    """One step of ``optimizer`` on ``loss``, the gradients' norm clipped at ``clip_norm`` (``None``: not clipped)."""
    optimizer.zero_grad()
    loss.backward()
    if clip_norm is not None:
        nn.utils.clip_grad_norm_(parameters, clip_norm)
    optimizer.step()


class EpochLoop:
    """Epochs with early stopping and best weights; a context manager for Ctrl-C and divergence.

    :param model: the module whose best ``state_dict`` is kept and restored.
    :param epochs: the number of epochs to run at most.
    :param patience: stop after this many epochs (of those :meth:`record`
        counts) without a better validation score.
    :param metric: what the validation score is, for the stop message
        (``"validation log-likelihood"``).
    :param name: the trainer's name, for the warnings (``"fit"``).
    :param history: the :class:`History` to fill (a subclass may carry more).
    :param label: the progress bar's label (default ``name``).
    :param progress: show a progress bar (only on the main process).
    :param ranks: the processes of a data-parallel run: only the main one
        shows the bar and warns, and under more than one process Ctrl-C is
        re-raised (the others may be anywhere; torchrun ends the job).
    :param interrupt_hint: appended to the Ctrl-C warning (how to resume).

    Iterating yields the epochs still to run (from ``len(history.validation)``,
    so a resumed loop carries on) until :meth:`record` says stop. Leaving the
    ``with`` block restores the best weights and puts the model in eval mode;
    ``KeyboardInterrupt`` and ``FloatingPointError`` raised inside it end the
    loop there, with ``history.stopped`` saying why and a ``RuntimeWarning``.
    """

    def __init__(
        self,
        model: nn.Module,
        epochs: int,
        patience: int,
        *,
        metric: str,
        name: str,
        history: History | None = None,
        label: str | None = None,
        progress: bool = True,
        ranks: Ranks = Ranks(),
        interrupt_hint: str = "",
    ):
        self.model, self.epochs, self.patience = model, epochs, patience
        self.metric, self.name, self.label = metric, name, label or name
        self.history = History() if history is None else history
        self.progress, self.ranks, self.interrupt_hint = progress and ranks.main, ranks, interrupt_hint
        self.best_state = copy.deepcopy(model.state_dict())
        self.best_value = -math.inf
        self.waited = 0
        self._bar = None

    # -- the epochs -------------------------------------------------------------

    def __iter__(self) -> Iterator[int]:
        for epoch in range(len(self.history.validation), self.epochs):
            if self.history.stopped:
                return
            yield epoch

    def record(self, epoch: int, train: float, validation: float, *, patient: bool = True, **shown: float) -> None:
        """Log epoch ``epoch``'s training objective and validation score, keep
        the weights if the score is the best so far, and decide whether to
        stop. ``patient=False``: this epoch does not count towards the
        patience (say, during a warm-up). ``shown`` go on the progress bar too."""
        history = self.history
        history.train.append(train)
        history.validation.append(validation)
        if validation > self.best_value:
            self.best_value, history.best_epoch, self.waited = validation, epoch, 0
            self.best_state = copy.deepcopy(self.model.state_dict())
        elif patient:
            self.waited += 1
        if self.waited >= self.patience:
            history.stopped = f"early stop: no better {self.metric} for {self.patience} epochs"
        elif epoch + 1 == self.epochs:
            history.stopped = f"ran all {self.epochs} epochs"
        if self._bar is not None:
            values = {**shown, "train": train, "valid": validation, "best": self.best_value}
            self._bar.set_postfix({key: f"{value:.3f}" for key, value in values.items()})
            self._bar.update()  # counted here, not by iterating the bar, so that the last epoch shows too

    # -- checkpoints ------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The loop's state for a checkpoint: best weights and score, patience count, history."""
        history = json.dumps(asdict(self.history))
        return {"best_model": self.best_state, "best_value": self.best_value, "waited": self.waited, "history": history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_state, self.best_value, self.waited = state["best_model"], state["best_value"], state["waited"]
        self.history = type(self.history)(**json.loads(state["history"]))

    # -- Ctrl-C, divergence, best weights -----------------------------------------

    def __enter__(self) -> "EpochLoop":
        start = len(self.history.validation)
        self._bar = tqdm(desc=self.label, disable=not self.progress, unit="epoch", initial=start, total=self.epochs)
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        self._bar.close()
        self._bar = None
        if kind is KeyboardInterrupt and not self.ranks.distributed:
            self.history.stopped = "interrupted"
            self._warn(f"{self.name} interrupted: restoring the best weights so far{self.interrupt_hint}")
        elif kind is FloatingPointError:  # under torchrun every process sees the same combined loss
            self.history.stopped = f"diverged: {error}"
            self._warn(f"{self.name} stopped: {error}; restoring the best weights so far")
        elif kind is not None:
            return False
        self.model.load_state_dict(self.best_state)
        self.model.eval()
        return True

    def _warn(self, message: str) -> None:
        if self.ranks.main:  # stacklevel: the trainer's caller (_warn, __exit__, trainer, caller)
            warnings.warn(message, RuntimeWarning, stacklevel=4)


@dataclass
class TrainingState:
    """Everything an exact resume needs: the model, the optimiser, the
    learning-rate schedule, the generator that shuffles the data, and the
    :class:`EpochLoop` (best weights, patience count, history)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    generator: torch.Generator
    loop: EpochLoop

    def state_dict(self) -> dict[str, Any]:
        parts = {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler}
        state = {key: part.state_dict() for key, part in parts.items()}
        return {**state, "generator": self.generator.get_state(), **self.loop.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        self.loop.load_state_dict(state)


class Checkpoint:
    """A file written after every epoch, which a later run with the same data
    and settings resumes from.

    :param path: the file.
    :param settings: the run's settings as text; a checkpoint of other settings is refused.
    :param fingerprint: text that tells the training data apart; likewise.
    :param ranks: under data parallelism, rank 0 decides whether to resume and
        writes the file; every process reads it (so it must be on a file
        system they share).
    """

    def __init__(self, path: str | Path, settings: str, fingerprint: str, ranks: Ranks, device: torch.device):
        self.path, self.settings, self.fingerprint = Path(path), settings, fingerprint
        self.ranks, self.device = ranks, device

    def resume(self, state: TrainingState) -> bool:
        """Load ``state`` from the file if it exists (``True``); ``ValueError``
        if it was written for other data or settings."""
        exists = self.path.exists()
        if self.ranks.distributed:  # rank 0 decides; every process then reads the file
            exists = bool(self.ranks.from_main(torch.tensor([float(exists)], device=self.device)).item())
        if not exists:
            return False
        saved = self._read()
        mine = {"settings": self.settings, "data": self.fingerprint}
        differ = [key for key, value in mine.items() if saved.get(key) != value]
        if differ:
            raise ValueError(
                f"checkpoint {self.path} was written for other data or settings (its {' and '.join(differ)} differ); "
                "delete it, or pass another checkpoint path, to start afresh"
            )
        state.load_state_dict(saved)
        return True

    def _read(self) -> dict[str, Any]:
        """The checkpoint's contents, its checksum verified and its weights finite
        (``ValueError`` naming the file otherwise)."""
        try:
            saved = read_payload(self.path, "checkpoint", map_location=self.device)
        except FileNotFoundError:
            if not self.ranks.distributed:
                raise
            saved = None
        if not self.ranks.all_agree(saved is not None, self.device):
            raise ValueError(
                f"checkpoint {self.path} exists for rank 0 but not for every process of the data-parallel run: "
                "put it on a file system that they all share"
            )
        verify_checksum(saved, self.path, "checkpoint")
        for part in ("model", "best_model"):
            if not isinstance(saved.get(part), dict):
                raise ValueError(f"{self.path} is not a checkpoint written by this package's trainers (no {part!r})")
            check_finite_weights(saved[part], self.path, "checkpoint")
        return saved

    def save(self, state: TrainingState) -> None:
        """Write ``state`` (on the main process only)."""
        if self.ranks.main:
            payload = {"settings": self.settings, "data": self.fingerprint, **state.state_dict()}
            save_atomically({**payload, "checksum": checksum(payload)}, self.path, what="checkpoint")
