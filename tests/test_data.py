"""Tests for mmgm_ray.data: every loader on files the tests write, plus the real Fashion-MNIST."""
from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import struct
import tarfile

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mmgm_ray.config import DataConfig, from_dict
from mmgm_ray.data import (ImageDataset, channel_stats, infinite_batches, load_cifar10, load_dataset,
                           load_parquet, make_gmm, make_loader, write_parquet_dataset)
from mmgm_ray.data.cifar import restricted_loads
from mmgm_ray.data.idx import FASHION_MNIST_DEBIAN_DIR


# ---------------------------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------------------------

def test_digits_shape_range_labels():
    ds = load_dataset(DataConfig())
    assert ds.name == "digits" and ds.x.shape == (1797, 1, 8, 8) and ds.event_shape == (1, 8, 8)
    assert ds.x.dtype == torch.float32 and ds.x.min() == 0.0 and ds.x.max() == 1.0
    # sklearn stores integers 0..16, so x * 16 must be integral
    assert torch.equal(ds.x * 16, (ds.x * 16).round())
    assert ds.labels.dtype == torch.int64 and set(ds.labels.tolist()) == set(range(10))
    assert ds.gmm is None and "load_digits" in ds.source


def test_limit_keeps_first_examples():
    full = load_dataset(DataConfig())
    ds = load_dataset(DataConfig(limit=10))
    assert len(ds) == 10 and torch.equal(ds.x, full.x[:10]) and torch.equal(ds.labels, full.labels[:10])


def test_channel_stats_match_numpy():
    ds = load_dataset(DataConfig(limit=200))
    mean, std = channel_stats(ds)
    a = ds.x.numpy()
    assert mean.shape == (1,) and np.isclose(mean[0].item(), a.mean(), atol=1e-6)
    assert np.isclose(std[0].item(), a.std(), atol=1e-6)
    rgb = ImageDataset("rgb", torch.stack([torch.zeros(4, 2, 2), torch.ones(4, 2, 2), torch.rand(4, 2, 2)], 1),
                       None, (3, 2, 2), "test")
    m, s = channel_stats(rgb)
    assert m[0] == 0 and m[1] == 1 and s[0] == 0 and s[1] == 0 and s[2] > 0


def test_config_validation():
    with pytest.raises(ValueError, match="unknown data set"):
        from_dict(DataConfig, {"name": "imagenet"})
    with pytest.raises(ValueError, match="data.path is required"):
        from_dict(DataConfig, {"name": "cifar10"})
    with pytest.raises(ValueError, match="split"):
        from_dict(DataConfig, {"split": "valid"})
    with pytest.raises(ValueError, match="limit"):
        from_dict(DataConfig, {"limit": 0})


# ---------------------------------------------------------------------------------------------
# IDX (MNIST / Fashion-MNIST)
# ---------------------------------------------------------------------------------------------

def idx_bytes(arr: np.ndarray) -> bytes:
    """Encode a uint8 array as IDX (written independently of the loader)."""
    assert arr.dtype == np.uint8
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_mnist_folder(folder, n_train=7, n_test=3, hw=(28, 28), gz=True, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 256, size=(n,) + hw, dtype=np.uint8)
        labs = rng.integers(0, 10, size=n, dtype=np.uint8)
        for kind, arr in (("images-idx3", imgs), ("labels-idx1", labs)):
            name = os.path.join(folder, f"{prefix}-{kind}-ubyte" + (".gz" if gz else ""))
            data = idx_bytes(arr)
            with open(name, "wb") as f:
                f.write(gzip.compress(data) if gz else data)
        out[prefix] = (imgs, labs)
    return out


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    truth = write_mnist_folder(tmp_path, gz=gz)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        ds = load_dataset(DataConfig(name="mnist", path=str(tmp_path), split=split))
        imgs, labs = truth[prefix]
        assert ds.x.shape == (len(imgs), 1, 28, 28) and ds.event_shape == (1, 28, 28)
        assert torch.equal((ds.x * 255).round().to(torch.uint8)[:, 0], torch.from_numpy(imgs))
        assert torch.equal(ds.labels, torch.from_numpy(labs.astype(np.int64)))
        assert prefix in ds.source


def test_idx_single_images_file_finds_sibling_labels(tmp_path):
    truth = write_mnist_folder(tmp_path, gz=True, hw=(5, 6))
    ds = load_dataset(DataConfig(name="mnist", path=str(tmp_path / "t10k-images-idx3-ubyte.gz")))
    assert ds.x.shape == (3, 1, 5, 6)
    assert torch.equal(ds.labels, torch.from_numpy(truth["t10k"][1].astype(np.int64)))
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    ds = load_dataset(DataConfig(name="mnist", path=str(tmp_path / "t10k-images-idx3-ubyte.gz")))
    assert ds.labels is None and ds.x.shape == (3, 1, 5, 6)


def test_idx_over_fsspec_url():
    fs = fsspec.filesystem("memory")
    imgs = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    with fs.open("/mn/train-images-idx3-ubyte.gz", "wb") as f:
        f.write(gzip.compress(idx_bytes(imgs)))
    with fs.open("/mn/train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(gzip.compress(idx_bytes(np.array([3, 4], np.uint8))))
    ds = load_dataset(DataConfig(name="mnist", path="memory://mn"))
    assert torch.allclose(ds.x[:, 0], torch.from_numpy(imgs).float() / 255)
    assert ds.labels.tolist() == [3, 4] and ds.source.startswith("memory://")


@pytest.mark.parametrize("gz", [True, False])
def test_idx_truncated_file_names_file(tmp_path, gz):
    write_mnist_folder(tmp_path, gz=False)
    name = tmp_path / "train-images-idx3-ubyte"
    data = name.read_bytes()[:-100]
    os.remove(name)
    target = tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    target.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.*truncated"):
        load_dataset(DataConfig(name="mnist", path=str(tmp_path)))


def test_idx_truncated_gzip_stream(tmp_path):
    write_mnist_folder(tmp_path, gz=True)
    p = tmp_path / "train-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[:40])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.gz.*(truncated|corrupt)"):
        load_dataset(DataConfig(name="mnist", path=str(tmp_path)))


def test_idx_bad_magic_and_wrong_kind(tmp_path):
    write_mnist_folder(tmp_path, gz=False)
    p = tmp_path / "train-images-idx3-ubyte"
    raw = bytearray(p.read_bytes())
    raw[0:4] = b"\x12\x34\x08\x03"
    p.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.*bad magic"):
        load_dataset(DataConfig(name="mnist", path=str(tmp_path)))
    # a labels file where the images should be: magic says 1 dimension
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte.*1 dimension"):
        load_dataset(DataConfig(name="mnist", path=str(tmp_path / "t10k-labels-idx1-ubyte")))


def test_idx_extra_bytes_and_count_mismatch(tmp_path):
    write_mnist_folder(tmp_path, gz=False)
    p = tmp_path / "t10k-images-idx3-ubyte"
    p.write_bytes(p.read_bytes() + b"\0" * 28)
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.*wrong shape"):
        load_dataset(DataConfig(name="mnist", path=str(tmp_path), split="test"))
    write_mnist_folder(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(5, np.uint8)))
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte: 5 labels but .* 3 images"):
        load_dataset(DataConfig(name="mnist", path=str(tmp_path), split="test"))


def test_idx_missing_files(tmp_path):
    write_mnist_folder(tmp_path, gz=True)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(ValueError, match=r"missing test labels file.*t10k-labels-idx1-ubyte"):
        load_dataset(DataConfig(name="mnist", path=str(tmp_path), split="test"))
    with pytest.raises(ValueError, match="no such file or folder"):
        load_dataset(DataConfig(name="mnist", path=str(tmp_path / "nope")))


def test_fashion_mnist_real_debian_files():
    """The real data set from Debian's dataset-fashion-mnist (CI installs it; never skipped)."""
    assert os.path.isfile(os.path.join(FASHION_MNIST_DEBIAN_DIR, "train-images-idx3-ubyte.gz")), \
        "install the data with: apt-get install -y dataset-fashion-mnist"
    train = load_dataset(DataConfig(name="fashion_mnist"))  # default path
    test = load_dataset(DataConfig(name="fashion_mnist", path=FASHION_MNIST_DEBIAN_DIR, split="test"))
    for ds, n in ((train, 60000), (test, 10000)):
        assert ds.x.shape == (n, 1, 28, 28) and ds.x.dtype == torch.float32
        assert ds.x.min() == 0.0 and ds.x.max() == 1.0
        # Fashion-MNIST is balanced: n / 10 examples of each of the 10 classes
        assert torch.equal(torch.bincount(ds.labels, minlength=10), torch.full((10,), n // 10))
    assert FASHION_MNIST_DEBIAN_DIR in train.source and "t10k" in test.source
    assert train.labels[:5].tolist() == [9, 0, 0, 3, 0]  # ankle boot, T-shirt, T-shirt, dress, T-shirt
    assert 0.2 < train.x.mean().item() < 0.4  # dark background, mean ~0.286


# ---------------------------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------------------------

def make_cifar_archive(path, per_batch=2, n_test=3, protocol=2, drop=()):
    """Write a tiny archive in the cifar-10-python.tar.gz layout; returns the truth."""
    rng = np.random.default_rng(1)
    truth = {}
    with tarfile.open(path, "w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            if name in drop:
                continue
            n = n_test if name == "test_batch" else per_batch
            data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
            labels = rng.integers(0, 10, size=n).tolist()
            truth[name] = (data, labels)
            blob = pickle.dumps({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                                 b"filenames": [f"img{i}.png".encode() for i in range(n)]}, protocol=protocol)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return truth


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar_archive_round_trip(tmp_path, protocol):
    arc = tmp_path / "cifar-10-python.tar.gz"
    truth = make_cifar_archive(arc, protocol=protocol)
    ds = load_dataset(DataConfig(name="cifar10", path=str(arc)))
    data = np.concatenate([truth[f"data_batch_{i}"][0] for i in range(1, 6)])
    labels = sum((truth[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert ds.x.shape == (10, 3, 32, 32) and ds.event_shape == (3, 32, 32)
    assert torch.equal((ds.x * 255).round().to(torch.uint8), torch.from_numpy(data.reshape(10, 3, 32, 32)))
    # channel planes: the first 1024 bytes of a row are the red channel
    assert torch.allclose(ds.x[0, 0].flatten(), torch.from_numpy(data[0, :1024]).float() / 255)
    assert ds.labels.tolist() == labels
    test = load_cifar10(str(arc), "test")
    assert test.x.shape == (3, 3, 32, 32) and test.labels.tolist() == truth["test_batch"][1]


def test_cifar_extracted_folder_and_url(tmp_path):
    arc = tmp_path / "c.tar.gz"
    truth = make_cifar_archive(arc)
    with tarfile.open(arc) as tar:
        tar.extractall(tmp_path / "ex", filter="data")
    a = load_cifar10(str(tmp_path / "ex"), "test")
    b = load_cifar10(str(tmp_path / "ex" / "cifar-10-batches-py"), "test")
    fsspec.filesystem("memory").pipe("/cifar/c.tar.gz", arc.read_bytes())
    c = load_cifar10("memory://cifar/c.tar.gz", "test")
    for ds in (a, b, c):
        assert ds.labels.tolist() == truth["test_batch"][1]
        assert torch.equal(ds.x, a.x)


def test_cifar_truncated_and_incomplete_archives(tmp_path):
    arc = tmp_path / "cifar-10-python.tar.gz"
    make_cifar_archive(arc, per_batch=50)
    raw = arc.read_bytes()
    bad = tmp_path / "truncated.tar.gz"
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"truncated.tar.gz.*(corrupt|truncated|missing)"):
        load_cifar10(str(bad), "train")
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not an archive at all" * 10)
    with pytest.raises(ValueError, match=r"junk.tar.gz: corrupt or truncated archive"):
        load_cifar10(str(junk), "train")
    part = tmp_path / "part.tar.gz"
    make_cifar_archive(part, drop=("data_batch_4",))
    with pytest.raises(ValueError, match=r"part.tar.gz: missing CIFAR-10 batch.*data_batch_4"):
        load_cifar10(str(part), "train")
    assert len(load_cifar10(str(part), "test")) == 3  # the test split is complete


class _Sneaky:
    def __reduce__(self):
        return (os.getcwd, ())


def test_cifar_unpickler_refuses_other_globals(tmp_path):
    blob = pickle.dumps({b"data": _Sneaky(), b"labels": []}, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="getcwd is not allowed"):
        restricted_loads(blob)
    # and inside an archive it surfaces as a ValueError naming the member
    arc = tmp_path / "evil.tar.gz"
    with tarfile.open(arc, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/test_batch")
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
    with pytest.raises(ValueError, match=r"evil.tar.gz:test_batch: refused"):
        load_cifar10(str(arc), "test")


# ---------------------------------------------------------------------------------------------
# Parquet
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", [("uint8", 0.5 / 255 + 1e-7), ("float16", 2.0 ** -11), ("float32", 0.0)])
def test_parquet_round_trip(tmp_path, dtype, tol):
    ds = load_dataset(DataConfig(limit=50))
    ds.x[0, 0, 0, 0] = 0.123456  # not on the /16 grid
    f = write_parquet_dataset(ds, str(tmp_path / "d"), sample_dtype=dtype)
    assert f.endswith(".parquet")
    schema = pq.read_schema(f)
    assert json.loads(schema.metadata[b"mmgm.shape"]) == [1, 8, 8]
    assert schema.metadata[b"mmgm.sample_dtype"].decode() == dtype
    back = load_dataset(DataConfig(name="parquet", path=str(tmp_path / "d")))
    assert back.x.shape == ds.x.shape and back.event_shape == (1, 8, 8) and back.x.dtype == torch.float32
    err = (back.x - ds.x).abs().max().item()
    assert err <= tol
    if dtype == "uint8":
        assert err > 0  # 0.123456 is not a multiple of 1/255: proves the quantisation happened
    assert torch.equal(back.labels, ds.labels)


def test_parquet_vectors_and_uint8_range_check(tmp_path):
    ds = make_gmm(3, 5, 100, seed=2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        write_parquet_dataset(ds, str(tmp_path / "v.parquet"), "uint8")
    write_parquet_dataset(ds, str(tmp_path / "v.parquet"), "float32")
    back = load_parquet(str(tmp_path / "v.parquet"))
    assert back.event_shape == (5,) and torch.equal(back.x, ds.x) and torch.equal(back.labels, ds.labels)


def test_parquet_filters_diverged_and_null(tmp_path):
    vals = np.arange(6 * 4, dtype=np.float32).reshape(6, 4) / 100
    flat = pa.array(vals.reshape(-1), pa.float32())
    sample = pa.FixedSizeListArray.from_arrays(flat, 4, mask=pa.array([False, False, True, False, False, False]))
    table = pa.table({"sample": sample,
                      "label": pa.array([0, 1, 2, 3, 4, 5], pa.int64()),
                      "diverged": pa.array([False, True, False, None, False, False])})
    table = table.replace_schema_metadata({"mmgm.shape": "[1, 2, 2]", "mmgm.sample_dtype": "float32"})
    pq.write_table(table, tmp_path / "a.parquet")
    (tmp_path / "manifest.json").write_text("{}")  # non-parquet files in the folder are ignored
    ds = load_parquet(str(tmp_path))
    assert ds.labels.tolist() == [0, 4, 5]  # 1 diverged, 2 null sample, 3 null diverged
    assert torch.equal(ds.x.reshape(3, 4), torch.from_numpy(vals[[0, 4, 5]]))
    assert ds.x.shape == (3, 1, 2, 2)


def test_parquet_multiple_files_and_memory_url():
    ds = load_dataset(DataConfig(limit=30))
    a = ImageDataset("a", ds.x[:20].clone(), ds.labels[:20].clone(), (1, 8, 8), "t")
    b = ImageDataset("b", ds.x[20:].clone(), ds.labels[20:].clone(), (1, 8, 8), "t")
    write_parquet_dataset(a, "memory://store/run1/part-0.parquet", "float32")
    write_parquet_dataset(b, "memory://store/run1/part-1.parquet", "float32")
    back = load_dataset(DataConfig(name="parquet", path="memory://store/run1"))
    assert torch.equal(back.x, ds.x) and torch.equal(back.labels, ds.labels)


def test_parquet_bad_inputs(tmp_path):
    pq.write_table(pa.table({"sample": pa.array([[1, 2]], pa.list_(pa.uint8(), 2))}), tmp_path / "nometa.parquet")
    with pytest.raises(ValueError, match="mmgm.shape"):
        load_parquet(str(tmp_path / "nometa.parquet"))
    (tmp_path / "e").mkdir()
    with pytest.raises(ValueError, match="no \\*.parquet files"):
        load_parquet(str(tmp_path / "e"))
    (tmp_path / "x.parquet").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="x.parquet"):
        load_parquet(str(tmp_path / "x.parquet"))


# ---------------------------------------------------------------------------------------------
# Gaussian mixture
# ---------------------------------------------------------------------------------------------

def test_gmm_deterministic():
    a = load_dataset(DataConfig(name="gmm", gmm_seed=3))
    b = load_dataset(DataConfig(name="gmm", gmm_seed=3))
    c = load_dataset(DataConfig(name="gmm", gmm_seed=4))
    assert torch.equal(a.x, b.x) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.x, c.x)
    small = make_gmm(4, 2, 100, seed=3)
    for k in ("means", "covs", "weights"):  # parameters do not depend on the sample count
        assert torch.equal(small.gmm[k], a.gmm[k])
    assert a.x.shape == (20000, 2) and a.event_shape == (2,) and a.x.dtype == torch.float32


def test_gmm_parameters_match_sample_moments():
    """Sample moments within 5 Monte Carlo standard errors of the stored parameters.

    SE of a component mean coordinate: sqrt(S_ii / n_k); of a covariance entry:
    sqrt((S_ii S_jj + S_ij^2) / n_k) (Gaussian fourth moments); of a weight: sqrt(pi (1 - pi) / N).
    Five SEs: a correct sampler fails with probability < 1e-5 per check, a wrong parameter (e.g. a
    swapped component or a missing Cholesky factor) is off by many SEs at n_k ~ 10^4.
    """
    K, d, N = 3, 3, 40000
    ds = make_gmm(K, d, N, seed=11)
    g = ds.gmm
    assert g["means"].shape == (K, d) and g["covs"].shape == (K, d, d) and g["weights"].shape == (K,)
    assert torch.allclose(g["weights"].sum(), torch.tensor(1.0))
    assert torch.allclose(g["covs"], g["covs"].transpose(1, 2))
    assert (torch.linalg.eigvalsh(g["covs"].double()) > 0).all()
    x = ds.x.double()
    for k in range(K):
        xk = x[ds.labels == k]
        n = xk.shape[0]
        S = g["covs"][k].double()
        pi = g["weights"][k].item()
        assert abs(n / N - pi) < 5 * (pi * (1 - pi) / N) ** 0.5
        se_mean = (torch.diagonal(S) / n).sqrt()
        assert ((xk.mean(0) - g["means"][k].double()).abs() < 5 * se_mean).all()
        se_cov = ((torch.diagonal(S)[:, None] * torch.diagonal(S)[None, :] + S ** 2) / n).sqrt()
        assert ((torch.cov(xk.T) - S).abs() < 5 * se_cov).all()


# ---------------------------------------------------------------------------------------------
# Loader
# ---------------------------------------------------------------------------------------------

def _index_ds(n):
    x = torch.arange(n, dtype=torch.float32)[:, None]
    return ImageDataset("idx", x, torch.arange(n), (1,), "test")


def test_loader_shards_cover_every_index_once():
    ds, world = _index_ds(103), 4
    seen = []
    for rank in range(world):
        loader = make_loader(ds, 8, rank, world, seed=5, epoch=2, drop_last=False)
        got = [xb[:, 0].long() for xb, _ in loader]
        assert len(got) == len(loader)
        for xb, yb in make_loader(ds, 8, rank, world, seed=5, epoch=2, drop_last=False):
            assert xb.dtype == torch.float32 and torch.equal(xb[:, 0].long(), yb)  # labels travel along
        seen.append(torch.cat(got))
    allidx = torch.cat(seen)
    assert torch.equal(allidx.sort().values, torch.arange(103))
    assert not torch.equal(allidx, torch.arange(103))  # shuffled


def test_loader_drop_last_equal_steps_and_epochs():
    ds, world = _index_ds(103), 3
    lens = [len(make_loader(ds, 8, r, world, seed=1)) for r in range(world)]
    assert lens == [4, 4, 4]  # 34 per rank -> 4 full batches of 8 on every rank
    shards = [torch.cat([xb[:, 0] for xb, _ in make_loader(ds, 8, r, world, seed=1)]) for r in range(world)]
    assert all(s.shape == (32,) for s in shards)
    assert len(set(torch.cat(shards).tolist())) == 96  # disjoint
    e0 = torch.cat([xb for xb, _ in make_loader(ds, 8, 0, world, seed=1, epoch=0)])
    again = torch.cat([xb for xb, _ in make_loader(ds, 8, 0, world, seed=1, epoch=0)])
    loader = make_loader(ds, 8, 0, world, seed=1)
    loader.set_epoch(1)
    e1 = torch.cat([xb for xb, _ in loader])
    assert torch.equal(e0, again) and not torch.equal(e0, e1)
    with pytest.raises(ValueError, match="do not fill one batch"):
        make_loader(_index_ds(10), 8, 0, 2)


def test_infinite_batches_and_hflip():
    ds = load_dataset(DataConfig(limit=64))
    it = infinite_batches(ds, 16, seed=0)
    batches = [next(it) for _ in range(9)]  # crosses two epoch boundaries (4 batches per epoch)
    assert all(xb.shape == (16, 1, 8, 8) for xb, _ in batches)
    plain = torch.cat([xb for xb, _ in make_loader(ds, 16, seed=0)])
    flipped = torch.cat([xb for xb, _ in make_loader(ds, 16, seed=0, hflip=True)])
    same = (plain == flipped).flatten(1).all(1)
    mirrored = (plain.flip(-1) == flipped).flatten(1).all(1)
    assert (same | mirrored).all()  # every image is either kept or mirrored
    assert (mirrored & ~same).sum() > 10 and (same & ~mirrored).sum() > 10  # about half flipped
