"""Files at the ground of the package: one atomic writer, one file format for saved models.

Writing. :func:`save_atomically` is the one way the package writes a file
(saved models, checkpoints, the command line's samples, scores and
pictures): the bytes go to a new temporary file in the target's folder
(``tempfile.mkstemp``: a unique name, created exclusively, so a link planted
at a predictable name is never followed), are flushed to disk, and the file
is renamed over the target (``os.replace``). A reader, or a run killed at any
moment, sees the old file or the new one, never a part of either.
:func:`check_output` says, before any work, whether a path can be written.

Reading. A saved model is a dict written by :func:`torch.save`: the format
version, the model's kind, its constructor arguments as a JSON string, its
``state_dict`` on the CPU, and a SHA-256 checksum of all of these
(:func:`checksum`). Reading uses ``torch.load(weights_only=True)``, so nothing
is unpickled; a file that is not one (empty, truncated, random bytes) is a
``ValueError`` naming it. The checksum is verified, the weights must be
finite, and the configuration is checked against the weights the file
carries before the model is rebuilt from it: every size in it is bounded by
the tensors present, the build may not create more than they could fill
(:class:`_BuildBudget`), and the rebuilt model's ``state_dict`` must have
exactly the file's keys and shapes. So a tampered configuration
(``num_layers: 10**7``) is refused at once instead of building until memory
runs out.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Mapping

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = [
    "FORMAT_VERSION",
    "check_finite_weights",
    "check_output",
    "checksum",
    "read_model",
    "read_payload",
    "save_atomically",
    "verify_checksum",
    "write_model",
]

# The version of the file format; a file of another version is refused (what
# changed at each version is in CHANGELOG.md).
FORMAT_VERSION = 6

#: A function that writes a file's bytes to the binary file object it is given.
Writer = Callable[[BinaryIO], None]


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------


def check_output(path: str | Path, what: str = "output") -> Path:
    """Return ``path`` if a file can be written there, else raise the ``OSError``
    that says why (its message names ``what`` and the path): ``IsADirectoryError``
    for a directory, ``FileNotFoundError`` for a missing folder,
    ``NotADirectoryError`` for a folder that is a file, ``PermissionError`` for
    a folder where no file can be created or a file that is read-only.
    Nothing is left behind (the check creates and removes a temporary file)."""
    path = _check_target(Path(path), what)
    try:
        descriptor, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=path.parent)
    except OSError as error:
        raise _cannot_create(path, what, error) from None
    os.close(descriptor)
    os.unlink(probe)
    return path


def _check_target(path: Path, what: str) -> Path:
    """The checks of :func:`check_output` that need no file to be created."""
    folder = path.parent
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {what} {path}: it is a directory; give a file name")
    if not folder.exists():
        raise FileNotFoundError(f"cannot write {what} {path}: the folder {folder} does not exist; create it first")
    if not folder.is_dir():
        raise NotADirectoryError(f"cannot write {what} {path}: {folder} is not a folder")
    if path.exists() and not os.access(path, os.W_OK):
        raise PermissionError(f"cannot write {what} {path}: the file is read-only; make it writable or remove it")
    return path


def _cannot_create(path: Path, what: str, error: OSError) -> OSError:
    """``error`` (from creating a file in ``path``'s folder) with a message that says so."""
    reason = error.strerror or str(error)
    clear = type(error)(f"cannot write {what} {path}: no file can be created in {path.parent} ({reason})")
    clear.errno = error.errno
    return clear


def _new_file_mode(path: Path) -> int:
    """The permissions the written file gets: those of the file it replaces, or
    what ``open`` would give a new one (``0o666`` less the umask; ``mkstemp``
    alone would give ``0o600``)."""
    with contextlib.suppress(OSError):
        return path.stat().st_mode & 0o777
    return 0o666 & ~_umask()


def _umask() -> int:
    try:  # Linux says it without changing it (os.umask can only be read by setting it)
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_atomically(content: Any, path: str | Path, what: str = "file") -> None:
    """Write ``content`` to ``path`` through a new temporary file in ``path``'s
    folder, flushed to disk and renamed over ``path``: a reader, or a process
    killed at any moment, sees the old file or the new one, never a part of either.

    :param content: a payload for :func:`torch.save` (a dict of tensors and
        plain values), or a :data:`Writer`, a function that writes the bytes to
        the binary file it is given (``lambda file: numpy.save(file, array)``).
    :param what: what the file is, for the error messages (``"model"``).

    Raises the ``OSError`` of :func:`check_output` before writing anything if
    ``path`` cannot be written; if writing fails, the temporary file is
    removed and the old file is left as it was. The new file keeps the
    permissions of the one it replaces (a new one gets ``0o666`` less the
    umask). A link at ``path`` is kept and the file it names is replaced; a
    device or a pipe (``/dev/null``) is written to as it is.
    """
    if isinstance(content, nn.Module):
        raise TypeError("save_atomically writes a module's state_dict (or a dict holding it), not the module itself")
    write: Writer = content if callable(content) else (lambda file: torch.save(content, file))
    path = Path(path)
    if path.is_symlink():  # write to the file the link names, as open() would, and keep the link
        path = Path(os.path.realpath(path))
    path = _check_target(path, what)
    if path.exists() and not path.is_file():  # a device or a pipe (/dev/null): written to, never replaced
        with open(path, "wb") as file:
            write(file)
        return
    try:
        descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise _cannot_create(path, what, error) from None
    try:
        with os.fdopen(descriptor, "wb") as file:
            os.fchmod(file.fileno(), _new_file_mode(path))
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


# --------------------------------------------------------------------------
# Checksums and reading
# --------------------------------------------------------------------------


def checksum(payload: Mapping[str, Any]) -> str:
    """The SHA-256 (hex) of every entry of ``payload`` but ``"checksum"``: of each
    tensor's dtype, shape and bytes, and of the plain values (dicts, lists,
    strings, numbers) around them, in an order that does not depend on the
    dicts' key order."""
    digest = hashlib.sha256()
    _feed(digest, {key: value for key, value in payload.items() if key != "checksum"})
    return digest.hexdigest()


def _feed(digest, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"tensor {flat.dtype} {tuple(value.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).numpy())
    elif isinstance(value, Mapping):
        digest.update(f"dict {len(value)}\n".encode())
        for key in sorted(value, key=repr):
            _feed(digest, key)
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"list {len(value)}\n".encode())
        for item in value:
            _feed(digest, item)
    elif value is None or isinstance(value, (bool, int, float, str, bytes)):
        digest.update(f"{type(value).__name__} {value!r}\n".encode())
    else:
        raise TypeError(f"cannot checksum a {type(value).__name__}: a saved file holds tensors and plain values")


def read_payload(path: str | Path, what: str, map_location=None) -> dict[str, Any]:
    """The dict that ``torch.save`` wrote to ``path`` (read with ``weights_only=True``).

    A missing file raises ``FileNotFoundError`` and a directory
    ``IsADirectoryError`` (both naming the file); anything ``torch.load``
    cannot read (an empty, truncated or damaged file, random bytes, a pickle
    of objects), or that is not a dict, is a ``ValueError`` saying that
    ``path`` is not a readable ``what`` file.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, not a {what} file")
    if not path.exists():
        raise FileNotFoundError(f"no {what} file {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is not a readable {what} file: it is empty")
    with open(path, "rb") as file:  # a file we may not read: PermissionError, naming it
        try:
            payload = torch.load(file, map_location=map_location, weights_only=True)
        except Exception as error:  # noqa: BLE001 - whatever torch says of a damaged file, it is not one of ours
            raise ValueError(f"{path} is not a readable {what} file ({_load_failure(error)})") from None
    if not isinstance(payload, dict):
        raise ValueError(f"{path} is not a readable {what} file (it holds a {type(payload).__name__}, not a dict)")
    return payload


def _load_failure(error: Exception) -> str:
    """What went wrong in ``torch.load``, in a few words: the first line of its
    message, unless that line is torch's advice to unpickle the file (never do
    that with a file you did not write yourself)."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if not first or "weights" in first.lower() or len(first) > 200:
        return f"torch.load failed with {type(error).__name__}: an empty, truncated or damaged file, or another format"
    return f"torch.load failed: {first}"


def verify_checksum(payload: Mapping[str, Any], path: str | Path, what: str) -> None:
    """``ValueError`` naming ``path`` unless ``payload`` carries the checksum of its contents."""
    stored = payload.get("checksum")
    if not isinstance(stored, str):
        raise ValueError(f"{path} is not a {what} file of this version: it carries no checksum")
    try:
        actual = checksum(payload)
    except TypeError as error:
        raise ValueError(f"{path} is not a {what} file of this version: {error}") from None
    if actual != stored:
        raise ValueError(
            f"{path} is damaged: its contents do not match the checksum stored with them (a byte was changed, "
            f"by a disk or copy error or by hand); use an intact copy of the {what} file"
        )


def check_finite_weights(state: Mapping[str, Any], path: str | Path, what: str) -> None:
    """``ValueError`` naming ``path`` and the tensor if a floating tensor of ``state`` holds NaN or infinity."""
    for key, tensor in state.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(
                f"{path}: the weights {key!r} hold NaN or infinite values; this {what} cannot be used "
                "(fit or train it again)"
            )


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------


def write_model(module: nn.Module, config: dict, kind: str, path: str | Path) -> None:
    """Write ``module``'s weights and its constructor arguments ``config`` to
    ``path`` (atomically, with a checksum of the whole)."""
    payload = {
        "format": FORMAT_VERSION,
        "kind": kind,
        "config": json.dumps(config),
        "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
    }
    payload["checksum"] = checksum(payload)
    save_atomically(payload, path, what="model")


ConfigCheck = Callable[[dict, Mapping[str, torch.Tensor]], None]


def read_model(
    cls: type,
    kind: str,
    path: str | Path,
    map_location=None,
    check_config: ConfigCheck | None = None,
    build_kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Rebuild a ``cls`` written by :func:`write_model` with this ``kind``.

    :param check_config: ``check_config(config, state_dict)`` raises
        ``ValueError`` (its message without the file's name) if the
        configuration cannot be that of these weights: the class's own cheap
        checks, run before anything is built.
    :param build_kwargs: constructor arguments that the file cannot hold
        (modules of the user's, such as a density model's embedding), given
        with the configuration; they receive the file's weights too.

    Every fault is a ``ValueError`` naming the file (see the module's docstring).
    """
    payload = read_payload(path, "model", map_location)
    what = f"{path} is not a model saved by {cls.__name__}.save"
    if "config" not in payload or not isinstance(payload.get("state_dict"), Mapping):
        raise ValueError(what)
    if payload.get("kind") != kind:
        raise ValueError(f"{what} (its kind is {payload.get('kind')!r}, not {kind!r})")
    found = payload.get("format")
    if found != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format {found!r}; this version reads {FORMAT_VERSION} (CHANGELOG.md says what changed): "
            "fit or train the model again with this version"
        )
    verify_checksum(payload, path, "model")
    state = payload["state_dict"]
    if not all(isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()):
        raise ValueError(f"{what}: its state_dict holds entries that are not named tensors")
    check_finite_weights(state, path, "model")
    config = _read_config(payload["config"], path)
    try:
        _check_sizes(config, state)
        if check_config is not None:
            check_config(config, state)
    except ValueError as error:
        raise ValueError(f"{path}: its configuration does not fit the weights it carries: {error}") from None
    model = _build(cls, {**config, **(build_kwargs or {})}, state, path)
    _check_layout(model.state_dict(), state, path)
    model.load_state_dict(state)
    return model


def _read_config(text: Any, path: str | Path) -> dict:
    try:
        config = json.loads(text) if isinstance(text, str) else None
    except (ValueError, RecursionError):
        config = None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: its configuration is not a JSON object of constructor arguments")
    return config


def _integers(value: Any) -> Iterator[int]:
    """The integers in a JSON value (not those written inside its strings)."""
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _integers(item)
    elif isinstance(value, list):
        for item in value:
            yield from _integers(item)


def _check_sizes(config: dict, state: Mapping[str, torch.Tensor]) -> None:
    """Every integer of the configuration (a size or a count) must be at most
    the number of values the weights hold: each one sizes or counts some of them."""
    total = sum(tensor.numel() for tensor in state.values())
    for name, value in config.items():
        for number in _integers(value):
            if number > max(total, 1):
                raise ValueError(
                    f"{name} = {value!r} asks for more than the {total} values of weights the file holds"
                )


# The factories that take a size, and the position of their size argument.
_SIZE_ARGUMENT = {
    torch.empty: 0, torch.zeros: 0, torch.ones: 0, torch.rand: 0, torch.randn: 0, torch.full: 0,
    torch.Tensor.new_empty: 1, torch.Tensor.new_zeros: 1, torch.Tensor.new_ones: 1, torch.Tensor.new_full: 1,
}
_SIZE_THEN_VALUE = (torch.full, torch.Tensor.new_full)  # (size, fill_value): the size is one argument


def _requested_size(func, args, kwargs) -> int:
    """The number of elements a factory call in ``_SIZE_ARGUMENT`` asks for."""
    start = _SIZE_ARGUMENT[func]
    if "size" in kwargs:
        sizes = kwargs["size"]
    else:
        sizes = args[start] if func in _SIZE_THEN_VALUE else args[start:]
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = sizes[0]
    return math.prod(int(size) for size in sizes)


class _BuildBudget(TorchFunctionMode):
    """While a model is rebuilt from a file's configuration, refuse (``ValueError``)
    to create a tensor larger than ``largest`` elements (checked before
    creating it, for the factories and for broadcasting operations), to
    create more than ``total`` elements in all, or to register more than
    ``registrations`` parameters, buffers and submodules: limits set from the
    weights in the file, which a model of that configuration would have to
    match (a model registers about two of them per tensor of its ``state_dict``)."""

    def __init__(self, largest: int, total: int, registrations: int):
        super().__init__()
        self.largest, self.total, self.registrations = largest, total, registrations
        self.created = 0
        self.registered = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self._check(self._planned(func, args, kwargs))
        result = func(*args, **kwargs)
        for tensor in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(tensor, torch.Tensor):
                self._check(tensor.numel())
                self.created += tensor.numel()
                if self.created > self.total:
                    raise ValueError(f"building it creates more than {self.total} tensor elements")
        return result

    def _check(self, size: int) -> None:
        if size > self.largest:
            raise ValueError(f"building it would create a tensor of {size} elements, more than its weights hold")

    @staticmethod
    def _planned(func, args, kwargs) -> int:
        """The elements ``func`` is about to create, where cheaply known (else 0)."""
        try:
            if func in _SIZE_ARGUMENT:
                return _requested_size(func, args, kwargs)
            if func in (torch.arange, torch.randperm, torch.eye, torch.linspace):
                return max(int(abs(float(number))) for number in args if isinstance(number, (int, float)))
            shapes = [arg.shape for arg in args if isinstance(arg, torch.Tensor)]
            return math.prod(torch.broadcast_shapes(*shapes)) if len(shapes) > 1 else 0
        except (TypeError, ValueError, RuntimeError, IndexError, OverflowError):
            return 0

    def count_registration(self, *_) -> None:
        """A hook for every parameter, buffer and submodule registered."""
        self.registered += 1
        if self.registered > self.registrations:
            raise ValueError(
                f"building it registers more than {self.registrations} parameters, buffers and modules, "
                "more than its weights could fill"
            )


def _build(cls: type, config: dict, state: Mapping[str, torch.Tensor], path: str | Path) -> nn.Module:
    """``cls(**config)`` within a :class:`_BuildBudget` set by ``state``; any
    failure is a ``ValueError`` naming ``path``."""
    total = sum(tensor.numel() for tensor in state.values())
    budget = _BuildBudget(largest=4 * total + 2**20, total=64 * total + 2**24, registrations=8 * len(state) + 64)
    module = nn.modules.module
    hooks = [register(budget.count_registration) for register in (
        module.register_module_parameter_registration_hook,
        module.register_module_buffer_registration_hook,
        module.register_module_module_registration_hook,
    )]
    try:
        with budget:
            return cls(**config)
    except Exception as error:  # noqa: BLE001 - a configuration from a file may fail in any way
        raise ValueError(f"{path}: cannot rebuild the model from its configuration: {error}") from None
    finally:
        for hook in hooks:
            hook.remove()


def _check_layout(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], path) -> None:
    """``ValueError`` naming ``path`` unless ``state`` has exactly ``expected``'s keys and shapes."""
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [key for key in expected if key in state and tuple(state[key].shape) != tuple(expected[key].shape)]
    if missing or unexpected or wrong:
        faults = [f"{label} {keys[:5]}" for label, keys in
                  [("missing", missing), ("unexpected", unexpected), ("of the wrong shape", wrong)] if keys]
        raise ValueError(f"{path}: its weights do not match its configuration (weights {'; '.join(faults)})")
