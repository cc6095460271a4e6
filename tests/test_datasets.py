"""Tests for nlis_jax.experiments.datasets: IDX reader, data loaders, synthetic single-index data."""

from __future__ import annotations

import gzip
import io
import struct
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from nlis_jax.experiments import datasets as D

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

_CODES = {
    np.uint8: 0x08,
    np.int8: 0x09,
    np.int16: 0x0B,
    np.int32: 0x0C,
    np.float32: 0x0D,
    np.float64: 0x0E,
}


def idx_bytes(arr: np.ndarray) -> bytes:
    """Encode ``arr`` as an IDX file (independently of the reader under test)."""
    code = _CODES[arr.dtype.type]
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}i", *arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, arr: np.ndarray, *, gz: bool | None = None) -> Path:
    data = idx_bytes(arr)
    if gz if gz is not None else path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def fake_split(n: int, seed: int, h: int = 4, w: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, h, w), dtype=np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255  # the full range occurs
    labels = (np.arange(n) % 10).astype(np.uint8)
    return images, labels


def write_fake_fashion(folder: Path, *, gz: bool = True, n_train: int = 30, n_test: int = 20) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    sfx = ".gz" if gz else ""
    out = {}
    for split, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        images, labels = fake_split(n, seed)
        img_name, lab_name = D.FASHION_MNIST_FILES[split]
        write_idx(folder / (img_name + sfx), images)
        write_idx(folder / (lab_name + sfx), labels)
        out[split] = (images, labels)
    return out


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No data anywhere the loaders look: env vars cleared, HOME and the system folder empty."""
    monkeypatch.delenv("NLIS_FASHION_MNIST", raising=False)
    monkeypatch.delenv("SCIKIT_LEARN_DATA", raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setattr(D, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "no-system-dir")
    return tmp_path


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} (../shared/data beside the checkout) is missing")
    return SHARED_DATA


# ----------------------------------------------------------------------------------------------
# read_idx
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
@pytest.mark.parametrize(
    "arr",
    [
        np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5) * 8,
        np.array([0, 9, 3, 255, 7], dtype=np.uint8),
        np.array([[-300, 2], [32000, -1]], dtype=np.int16),
        np.array([1.5, -2.25e30, np.pi], dtype=np.float32),
        np.array([[1e-300], [-7.0]], dtype=np.float64),
        np.array([-5, 2**30], dtype=np.int32),
        np.array([-128, 127], dtype=np.int8),
    ],
    ids=["u8-3d", "u8-1d", "i16", "f32", "f64", "i32", "i8"],
)
def test_read_idx_round_trip(tmp_path, arr, gz):
    path = write_idx(tmp_path / ("a.idx" + (".gz" if gz else "")), arr)
    out = D.read_idx(path)
    assert out.shape == arr.shape
    assert out.dtype == arr.dtype and out.dtype.isnative
    np.testing.assert_array_equal(out, arr)
    out[...] = 0  # writable


def test_read_idx_detects_gzip_by_content(tmp_path):
    arr = np.arange(6, dtype=np.uint8)
    out = D.read_idx(write_idx(tmp_path / "labels-no-suffix", arr, gz=True))
    np.testing.assert_array_equal(out, arr)


def test_read_idx_empty_array(tmp_path):
    out = D.read_idx(write_idx(tmp_path / "e", np.zeros((0, 28, 28), np.uint8)))
    assert out.shape == (0, 28, 28)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda b: b"\x08\x03" + b[2:], "magic number"),
        (lambda b: b[:2] + b"\x42" + b[3:], "type code 0x42"),
        (lambda b: b[:3] + b"\x00" + b[4:], "0 dimensions"),
        (lambda b: b[:-1], "truncated IDX file"),
        (lambda b: b + b"\x00\x01", "2 unexpected trailing bytes"),
        (lambda b: b[:9], "truncated IDX header"),
        (lambda b: b[:3], "too short"),
        (lambda b: b[:4] + struct.pack(">i", -2) + b[8:], "negative dimension"),
        (lambda b: gzip.compress(b)[:-12], "gzip"),
        (lambda b: b"\x1f\x8b" + b"not really gzip data", "gzip"),
    ],
    ids=[
        "magic",
        "code",
        "ndim0",
        "truncated",
        "trailing",
        "header",
        "short",
        "negdim",
        "gz-cut",
        "gz-bad",
    ],
)
def test_read_idx_corrupt_files_raise_value_error(tmp_path, mutate, match):
    good = idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(mutate(good))
    with pytest.raises(ValueError, match=match) as info:
        D.read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        D.read_idx(tmp_path / "nope")


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST on tiny fake files
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_fashion_mnist_fake_folder(isolated, gz):
    folder = isolated / "fm"
    truth = write_fake_fashion(folder, gz=gz)
    for split in ("train", "test"):
        images, labels = truth[split]
        ds = D.load_fashion_mnist(folder, split=split, download_if_missing=False)
        n = images.shape[0]
        assert ds.name == f"fashion_mnist_{split}"
        assert ds.x.shape == (n, 12) and ds.x.dtype == np.float32
        assert ds.y.shape == (n,) and ds.y.dtype == np.int32
        assert ds.x.min() == 0.0 and ds.x.max() == 1.0
        np.testing.assert_allclose(ds.x, images.reshape(n, -1) / 255.0, rtol=1e-6)
        np.testing.assert_array_equal(ds.y, labels)
        assert ds.class_names == D.FASHION_MNIST_CLASSES
        assert ds.n_samples == n and ds.n_features == 12


def test_fashion_mnist_options(isolated):
    folder = isolated / "fm"
    images, labels = write_fake_fashion(folder)["train"]

    raw = D.load_fashion_mnist(
        folder, flatten=False, normalize=False, dtype=np.float64, download_if_missing=False
    )
    assert raw.x.shape == images.shape and raw.x.dtype == np.float64
    np.testing.assert_array_equal(raw.x, images)

    binary = D.load_fashion_mnist(folder, classes=(7, 2), download_if_missing=False)
    keep = (labels == 7) | (labels == 2)
    assert binary.x.shape == (int(keep.sum()), 12)
    np.testing.assert_array_equal(binary.y, np.where(labels[keep] == 7, 0, 1))
    np.testing.assert_allclose(binary.x, images[keep].reshape(-1, 12) / 255.0, rtol=1e-6)
    assert binary.class_names == ("Sneaker", "Pullover")

    limited = D.load_fashion_mnist(folder, classes=(7, 2), limit=4, download_if_missing=False)
    np.testing.assert_array_equal(limited.x, binary.x[:4])
    np.testing.assert_array_equal(limited.y, binary.y[:4])
    assert len(D.load_fashion_mnist(folder, limit=10**6, download_if_missing=False).y) == 30

    with pytest.raises(ValueError, match="split"):
        D.load_fashion_mnist(folder, split="valid")
    with pytest.raises(ValueError, match="distinct"):
        D.load_fashion_mnist(folder, classes=(1, 1))
    with pytest.raises(ValueError, match="out of range"):
        D.load_fashion_mnist(folder, classes=(0, 10))
    with pytest.raises(ValueError, match=r"classes must be integer labels, got \[0.5\]"):
        D.load_fashion_mnist(folder, classes=(0.5,))  # was read as class 0
    assert D.load_fashion_mnist(folder, classes=np.array([7, 2]), download_if_missing=False).y.max() == 1
    with pytest.raises(ValueError, match="limit"):
        D.load_fashion_mnist(folder, limit=0)
    with pytest.raises(TypeError, match="floating"):
        D.load_fashion_mnist(folder, dtype=np.uint8)


def test_fashion_mnist_mismatched_files(isolated):
    folder = isolated / "fm"
    write_fake_fashion(folder)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match="disagree"):
        D.load_fashion_mnist(folder, split="test", download_if_missing=False)


def test_fashion_mnist_search_order(isolated, monkeypatch):
    # $SCIKIT_LEARN_DATA/../fashion-mnist (the layout of ../shared/data)
    data = isolated / "data"
    write_fake_fashion(data / "fashion-mnist", n_test=11)
    (data / "scikit_learn_data").mkdir()
    monkeypatch.setenv("SCIKIT_LEARN_DATA", str(data / "scikit_learn_data"))
    assert D.load_fashion_mnist(split="test", download_if_missing=False).n_samples == 11

    # $SCIKIT_LEARN_DATA/fashion-mnist comes before it
    write_fake_fashion(data / "scikit_learn_data" / "fashion-mnist", n_test=12)
    assert D.load_fashion_mnist(split="test", download_if_missing=False).n_samples == 12

    # $NLIS_FASHION_MNIST before that, data_home before everything
    write_fake_fashion(isolated / "env", n_test=13)
    monkeypatch.setenv("NLIS_FASHION_MNIST", str(isolated / "env"))
    assert D.load_fashion_mnist(split="test", download_if_missing=False).n_samples == 13
    write_fake_fashion(isolated / "dh" / "fashion-mnist", n_test=14)
    ds = D.load_fashion_mnist(split="test", data_home=isolated / "dh", download_if_missing=False)
    assert ds.n_samples == 14

    dirs = [p for p, _ in D.fashion_mnist_search_dirs(isolated / "dh")]
    assert dirs[:4] == [
        isolated / "dh" / "fashion-mnist",
        isolated / "env",
        data / "scikit_learn_data" / "fashion-mnist",
        data / "fashion-mnist",
    ]
    assert dirs[-1] == D.FASHION_MNIST_SYSTEM_DIR


def test_fashion_mnist_home_and_system_dirs(isolated, monkeypatch):
    write_fake_fashion(isolated / "system", n_test=15)
    monkeypatch.setattr(D, "FASHION_MNIST_SYSTEM_DIR", isolated / "system")
    assert D.load_fashion_mnist(split="test", download_if_missing=False).n_samples == 15
    write_fake_fashion(isolated / "home" / "scikit_learn_data" / "fashion-mnist", n_test=16)
    assert D.load_fashion_mnist(split="test", download_if_missing=False).n_samples == 16


def test_fashion_mnist_missing_raises_helpful_error(isolated):
    empty = isolated / "empty"
    empty.mkdir()
    with pytest.raises(D.DatasetNotFoundError) as info:
        D.load_fashion_mnist(empty, split="test", download_if_missing=False)
    assert isinstance(info.value, FileNotFoundError)
    msg = str(info.value)
    assert str(empty) in msg
    assert "t10k-images-idx3-ubyte.gz" in msg
    assert "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/t10k-images-idx3-ubyte.gz" in msg
    assert "dataset-fashion-mnist" in msg and "/usr/share/datasets/fashion-mnist" in msg
    assert "NLIS_FASHION_MNIST" in msg

    # Without a path: every searched folder is named.
    with pytest.raises(D.DatasetNotFoundError) as info:
        D.load_fashion_mnist(download_if_missing=False)
    msg = str(info.value)
    for folder, _ in D.fashion_mnist_search_dirs():
        assert str(folder) in msg
    assert "does not exist" in msg


def test_fashion_mnist_download_failure_is_clean(isolated, monkeypatch):
    calls = []

    def offline(url, timeout=None):
        calls.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    target = isolated / "dl"
    with pytest.raises(D.DatasetNotFoundError) as info:
        D.load_fashion_mnist(target, split="test")
    msg = str(info.value)
    assert "name resolution" in msg and str(target) in msg and "dataset-fashion-mnist" in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert len(calls) == len(D.FASHION_MNIST_URLS)  # every mirror tried once, then give up
    assert not list(target.glob("*.part"))


def test_fashion_mnist_download_once_and_cache(isolated, monkeypatch):
    served = {}
    for split, n in (("train", 6), ("test", 4)):
        images, labels = fake_split(n, seed=n)
        for base, arr in zip(D.FASHION_MNIST_FILES[split], (images, labels), strict=True):
            served[base + ".gz"] = gzip.compress(idx_bytes(arr))
    monkeypatch.setattr(D, "_FASHION_MNIST_N", {"train": 6, "test": 4})
    calls = []

    def fake_urlopen(url, timeout=None):
        calls.append(url)
        name = url.rsplit("/", 1)[1]
        if url.startswith(D.FASHION_MNIST_URLS[0]) and name.startswith("train-images"):
            raise urllib.error.HTTPError(url, 503, "Service Unavailable", None, None)
        return io.BytesIO(served[name])  # a context manager with .read(), like a response

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    dh = isolated / "dh"
    ds = D.load_fashion_mnist(split="test", data_home=dh)
    assert ds.n_samples == 4
    assert sorted(p.name for p in (dh / "fashion-mnist").iterdir()) == sorted(served)
    assert len(calls) == 5  # four files, one of them from the mirror after a 503
    assert D.load_fashion_mnist(split="train", data_home=dh).n_samples == 6
    assert len(calls) == 5  # cached: no new downloads

    # Default download folder follows scikit-learn: $SCIKIT_LEARN_DATA/fashion-mnist.
    monkeypatch.setenv("SCIKIT_LEARN_DATA", str(isolated / "skl"))
    D.load_fashion_mnist(split="test")
    assert (isolated / "skl" / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz").is_file()


def test_fashion_mnist_download_rejects_bad_content(isolated, monkeypatch):
    monkeypatch.setattr(
        urllib.request, "urlopen", lambda url, timeout=None: io.BytesIO(b"<html>moved</html>")
    )
    with pytest.raises(D.DatasetNotFoundError, match="magic number"):
        D.load_fashion_mnist(isolated / "dl", split="test")
    assert not list((isolated / "dl").iterdir())


# ----------------------------------------------------------------------------------------------
# California / digits
# ----------------------------------------------------------------------------------------------


def test_california_missing_raises_helpful_error(isolated):
    empty = isolated / "empty"
    with pytest.raises(D.DatasetNotFoundError) as info:
        D.load_california(data_home=empty, download_if_missing=False)
    msg = str(info.value)
    assert str(empty / "cal_housing_py3.pkz") in msg
    assert "SCIKIT_LEARN_DATA" in msg and "fetch_california_housing" in msg


def test_digits():
    ds = D.load_digits()
    assert ds.x.shape == (1797, 64) and ds.y.dtype == np.int32
    np.testing.assert_allclose(ds.x.mean(0), 0.0, atol=1e-12)
    std = ds.x.std(0)
    assert np.all((np.abs(std - 1) < 1e-12) | (std == 0))  # blank pixels stay 0
    assert set(np.unique(ds.y)) == set(range(10))

    binary = D.load_digits(classes=(3, 8), add_bias=True, standardize=False, limit=50)
    assert binary.x.shape == (50, 65) and binary.feature_names[-1] == "bias"
    assert set(np.unique(binary.y)) == {0, 1} and binary.class_names == ("3", "8")
    assert binary.x[:, :64].max() <= 16 and np.all(binary.x[:, -1] == 1)


# ----------------------------------------------------------------------------------------------
# Real data from ../shared/data
# ----------------------------------------------------------------------------------------------


def test_real_california(shared_data, monkeypatch):
    monkeypatch.setenv("SCIKIT_LEARN_DATA", str(shared_data / "scikit_learn_data"))
    ds = D.load_california(download_if_missing=False)
    assert ds.x.shape == (20640, 9) and ds.y.shape == (20640,)
    assert ds.x.dtype == np.float64 and ds.feature_names[-1] == "bias"
    np.testing.assert_allclose(ds.x[:, :8].mean(0), 0.0, atol=1e-10)
    np.testing.assert_allclose(ds.x[:, :8].std(0), 1.0, atol=1e-10)
    np.testing.assert_array_equal(ds.x[:, 8], 1.0)
    assert abs(ds.y.mean()) < 1e-10 and abs(ds.y.std() - 1) < 1e-10
    # scaling maps back to the raw units (median house value in $100,000: 0.15..5.00001)
    y_raw = ds.y * ds.scaling["y_std"] + ds.scaling["y_mean"]
    assert 0.14 < y_raw.min() and y_raw.max() < 5.01

    raw = D.load_california(standardize=False, add_bias=False, dtype=np.float32)
    assert raw.x.shape == (20640, 8) and raw.x.dtype == np.float32 and raw.scaling is None
    np.testing.assert_allclose(raw.y, y_raw, rtol=1e-6)

    # the cache is read without scikit-learn: the very arrays fetch_california_housing returns
    from sklearn.datasets import fetch_california_housing

    bunch = fetch_california_housing(download_if_missing=False)
    exact = D.load_california(standardize=False, add_bias=False)
    np.testing.assert_array_equal(exact.x, bunch.data)
    np.testing.assert_array_equal(exact.y, bunch.target)
    assert exact.feature_names == tuple(bunch.feature_names)
    standard = D.load_california()  # the layout too: numpy's column sums depend on it
    np.testing.assert_array_equal(standard.x[:, :8], D.features.standardize(bunch.data)[0])


def test_real_fashion_mnist_test_split(shared_data, isolated, monkeypatch):
    monkeypatch.setenv("SCIKIT_LEARN_DATA", str(shared_data / "scikit_learn_data"))
    ds = D.load_fashion_mnist(split="test", download_if_missing=False)
    assert ds.x.shape == (10000, 784) and ds.x.dtype == np.float32
    assert ds.x.min() == 0.0 and ds.x.max() == 1.0
    np.testing.assert_array_equal(np.bincount(ds.y), np.full(10, 1000))
    assert ds.y.dtype == np.int32

    shirts = D.load_fashion_mnist(
        shared_data / "fashion-mnist", split="test", classes=(0, 6), flatten=False, limit=500
    )
    assert shirts.x.shape == (500, 28, 28) and set(np.unique(shirts.y)) == {0, 1}


# ----------------------------------------------------------------------------------------------
# Synthetic single-index data
# ----------------------------------------------------------------------------------------------


def test_single_index_deterministic_and_consistent():
    a = D.make_single_index(3, 50, 4, noise=0.0, theta_norm=2.0)
    b = D.make_single_index(3, 50, 4, noise=0.0, theta_norm=2.0)
    for u, v in zip(a[:2] + (a.theta_star,), b[:2] + (b.theta_star,), strict=True):
        np.testing.assert_array_equal(u, v)
    assert a.x.shape == (50, 4) and a.y.shape == (50,) and a.name == "single_index_tanh"
    np.testing.assert_allclose(np.linalg.norm(a.theta_star), 2.0, rtol=1e-12)
    np.testing.assert_allclose(a.y, np.tanh(a.x @ a.theta_star), rtol=1e-12)
    # theta_star depends only on the seed
    np.testing.assert_array_equal(D.make_single_index(3, 7, 4, theta_norm=2.0).theta_star, a.theta_star)
    assert not np.allclose(D.make_single_index(4, 50, 4).theta_star, a.theta_star)


def test_single_index_links_noise_and_keys():
    import jax

    ds = D.make_single_index(0, 4000, 3, phi="relu", noise=0.5)
    resid = ds.y - np.maximum(ds.x @ ds.theta_star, 0)
    assert abs(resid.std() - 0.5) < 0.03

    custom = D.make_single_index(0, 10, 3, phi=jax.numpy.sin, noise=0.0, dtype=np.float32)
    assert custom.x.dtype == custom.y.dtype == custom.theta_star.dtype == np.float32
    np.testing.assert_allclose(custom.y, D.make_single_index(0, 10, 3, phi="sin", noise=0.0).y, rtol=1e-5)

    k1 = D.make_single_index(jax.random.key(7), 5, 2)
    k2 = D.make_single_index(jax.random.PRNGKey(7), 5, 2)
    np.testing.assert_array_equal(k1.x, k2.x)
    assert not np.allclose(D.make_single_index(jax.random.key(8), 5, 2).x, k1.x)

    with pytest.raises(ValueError, match="Unknown link"):
        D.make_single_index(0, 5, 2, phi="nope")
    with pytest.raises(ValueError, match="noise"):
        D.make_single_index(0, 5, 2, noise=-1.0)
    with pytest.raises(ValueError, match="positive"):
        D.make_single_index(0, 0, 2)
    with pytest.raises(TypeError, match="seed"):
        D.make_single_index(1.5, 5, 2)
