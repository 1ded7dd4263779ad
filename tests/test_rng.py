"""The per-chain counter-based generator (mmgm_ray.rng): exact values, statistics, keys, layout."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from mmgm_ray import rng
from mmgm_ray.config import RunConfig, SamplerConfig
from mmgm_ray.engine import WalkJumpEngine
from mmgm_ray.noise import GaussianMNM
from mmgm_ray.oracles import GaussianOracle
from pinned import cpu_dict

M32 = (1 << 32) - 1

# ---------------------------------------------------------------------------------------------
# A reference implementation in plain Python: integers for Philox, IEEE doubles for Box-Muller
# ---------------------------------------------------------------------------------------------


def philox_ref(ctr, key, rounds=10):
    """Philox4x32 as published (Salmon et al. 2011): full-width products of Python integers."""
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for _ in range(rounds):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & M32, (p0 >> 32) ^ c3 ^ k1, p0 & M32
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return c0, c1, c2, c3


def words_ref(seed, chain, step, stream, group):
    return philox_ref((group, step, chain, stream), (seed & M32, seed >> 32))


def horner_ref(x, coefs):
    acc = x * coefs[-1] + coefs[-2]
    for c in reversed(coefs[:-2]):
        acc = acc * x + c
    return acc


def sqrt_ref(x):
    m, e = math.frexp(x)
    if e % 2:
        m, e = m * 2.0, e - 1
    y = (m + 1.0) * 0.5
    for _ in range(4):
        y = (y + m / y) * 0.5
    return math.ldexp(y, e // 2)


def box_muller_ref(w_r, w_t):
    """The documented transform in Python floats: the same operations, in the same order."""
    m, e = math.frexp((w_r + 0.5) * 2.0 ** -32)
    if m < math.sqrt(0.5):
        m, e = m * 2.0, e - 1
    s = (m - 1.0) / (m + 1.0)
    log_m = (s * horner_ref(s * s, [1.0 / (2 * k + 1) for k in range(11)])) * 2.0
    r = sqrt_ref((e * math.log(2.0) + log_m) * -2.0)
    a = ((w_t & ((1 << 30) - 1)) + 0.5) * ((math.pi / 2) / (1 << 30))
    c = horner_ref(a * a, [(-1) ** k / math.factorial(2 * k) for k in range(13)])
    sn = a * horner_ref(a * a, [(-1) ** k / math.factorial(2 * k + 1) for k in range(12)])
    x, y = [(c, sn), (-sn, c), (-c, -sn), (sn, -c)][w_t >> 30]
    return r * x, r * y


def normal_ref(seed, chain, step, stream, j):
    w = words_ref(seed, chain, step, stream, j // 4)
    w_r, w_t = [(w[0], w[3]), (w[2], w[1])][(j % 4) // 2]
    return box_muller_ref(w_r, w_t)[j % 2]


# ---------------------------------------------------------------------------------------------
# Exact values
# ---------------------------------------------------------------------------------------------

# Random123 kat_vectors (counter[4], key[2], output[4]), the published known answers.
KAT = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
       ((M32,) * 4, (M32,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
       ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]


@pytest.mark.parametrize("ctr,key,out", KAT)
def test_philox_matches_known_answers(ctr, key, out):
    assert philox_ref(ctr, key) == out                               # the test's reference
    words = rng.Philox4x32(key)([torch.tensor(c) for c in ctr])      # the library's int64 lanes
    assert [int(w) for w in words] == list(out)


SEEDS = [0, 1, 1 << 32, 0x243F6A8885A308D3, (1 << 63) - 1]
CHAINS = [0, 1, 123_456, M32]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("step,stream", [(0, rng.STREAM_INIT_EPS), (1, rng.STREAM_WALK), (M32, rng.STREAM_WALK)])
def test_draws_equal_the_python_reference_bitwise(seed, step, stream):
    g = rng.ChainRNG(seed)
    ids = torch.tensor(CHAINS)
    z64 = g.normal(ids, step, stream, (2, 5), dtype=torch.float64).reshape(len(CHAINS), -1)
    z32 = g.normal(ids, step, stream, (2, 5)).reshape(len(CHAINS), -1)
    ref = np.array([[normal_ref(seed, c, step, stream, j) for j in range(10)] for c in CHAINS])
    assert np.array_equal(z64.numpy(), ref)
    assert z32.dtype == torch.float32 and np.array_equal(z32.numpy(), ref.astype(np.float32))
    u = g.uniform(ids, step, stream, (6,), dtype=torch.float64)
    u_ref = [[(words_ref(seed, c, step, stream, j // 4)[j % 4] >> 8) * 2.0 ** -24 for j in range(6)] for c in CHAINS]
    assert np.array_equal(u.numpy(), np.array(u_ref))
    for high in (1, 7, 70_000, 1 << 31):
        idx = g.randint(ids, step, stream, high)
        ref_idx = []
        for c in CHAINS:
            w = words_ref(seed, c, step, stream, 0)
            ref_idx.append((((w[0] << 32) | w[1]) * high) >> 64)
        assert idx.tolist() == ref_idx


def test_transform_equals_the_python_reference_on_many_words():
    """Box-Muller of 20,000 random word pairs plus the edge words, bit for bit (a tensor size that
    leaves a vectorization tail, so scalar and SIMD code paths are both compared)."""
    g = torch.Generator().manual_seed(3)
    w = torch.randint(0, 1 << 32, (2, 20_003), generator=g)
    edges = torch.tensor([0, 1, M32, (1 << 30) - 1, 1 << 30, (1 << 31) - 1, 1 << 31, 3 << 30, M32 - 1])
    w = torch.cat([w, torch.stack([edges, edges.flip(0)])], 1)
    z1, z2 = rng.box_muller(w[0], w[1])
    ref = np.array([box_muller_ref(a, b) for a, b in zip(w[0].tolist(), w[1].tolist())])
    assert np.array_equal(z1.numpy(), ref[:, 0]) and np.array_equal(z2.numpy(), ref[:, 1])


def test_transform_is_accurate_against_libm():
    """The series log / sin / cos give Box-Muller to float64 round-off.

    Reference: numpy's libm on the same words. |z| <= 6.8 and both sides carry a few ulp of error,
    so 1e-13 absolute is ~50 ulp of the largest values; the float32 draws are then the correctly
    rounded float32 of the exact transform except where the float64 value lies within that error of
    a float32 rounding boundary (~1e-8 of draws).
    """
    g = torch.Generator().manual_seed(0)
    w = torch.randint(0, 1 << 32, (2, 200_000), generator=g)
    edges = torch.tensor([0, 1, M32, (1 << 30) - 1, 1 << 30, (1 << 31) - 1, 1 << 31, 3 << 30, M32 - 1])
    w = torch.cat([w, torch.stack([edges, edges.flip(0)])], 1)
    z1, z2 = rng.box_muller(w[0], w[1])
    u = (w[0].double().numpy() + 0.5) * 2.0 ** -32
    theta = 2 * np.pi * ((w[1].double().numpy() + 0.5) * 2.0 ** -32)
    r = np.sqrt(-2 * np.log(u))
    assert np.abs(z1.numpy() - r * np.cos(theta)).max() < 1e-13
    assert np.abs(z2.numpy() - r * np.sin(theta)).max() < 1e-13
    assert z1.abs().max().item() < 6.76371                           # the documented bound sqrt(66 log 2)


def test_draws_do_not_depend_on_batch_threads_or_shape():
    """Row i depends only on chain_ids[i]: subsets, permutations, repeats, thread counts, and the
    first k draws of a larger shape (prefix stability) give the same bits."""
    g = rng.ChainRNG(99)
    ids = torch.arange(1000)
    full = g.normal(ids, 17, rng.STREAM_WALK, (3, 7))
    pick = torch.tensor([999, 5, 5, 0, 513])
    assert torch.equal(g.normal(pick, 17, rng.STREAM_WALK, (3, 7)), full[pick])
    assert torch.equal(g.normal(pick, 17, rng.STREAM_WALK, (5,)), full[pick].flatten(1)[:, :5])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(g.normal(ids, 17, rng.STREAM_WALK, (3, 7)), full)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(g.normal(ids, 17, rng.STREAM_WALK, (3, 7), torch.float64).float(), full)


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------

def _grid(seed=12345, chains=1000, steps=250, stream=rng.STREAM_WALK, step0=1, shape=(4,)):
    """Draws of chains x steps x shape, as a (steps, chains, *shape) float64 array."""
    g = rng.ChainRNG(seed)
    ids = torch.arange(chains)
    return np.stack([g.normal(ids, t, stream, shape, torch.float64).numpy() for t in range(step0, step0 + steps)])


def test_normal_moments_and_ks_on_a_million_draws():
    """10^6 draws (1000 chains x 250 steps x 4 elements, so both Box-Muller pairs and cos / sin).

    Every bound is 5 standard errors (a correct generator fails one with probability < 1e-6); the
    KS test is at level 1e-3 (keys fixed in advance, not searched). Kurtosis and tail counts catch
    a wrong radius law that mean and variance would miss.
    """
    z = _grid().ravel()
    n = z.size
    assert n == 10 ** 6
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs(scipy.stats.kurtosis(z)) < 5 * math.sqrt(24 / n)
    assert abs(scipy.stats.skew(z)) < 5 * math.sqrt(6 / n)
    assert scipy.stats.kstest(z, "norm").pvalue > 1e-3
    for t in (2.0, 3.0, 4.0):
        p = 2 * scipy.stats.norm.sf(t)
        assert abs((np.abs(z) > t).sum() - n * p) < 5 * math.sqrt(n * p * (1 - p)) + 1, t
    for j in range(4):                                               # each position of a Philox call
        assert scipy.stats.kstest(_grid(seed=7, chains=500, steps=100)[..., j].ravel(), "norm").pvalue > 1e-3


def test_draws_are_uncorrelated_across_chains_steps_streams_elements_and_seeds():
    """Sample correlations of 2.5e5 pairs each; under independence they are N(0, 1/n): bound 5/sqrt(n).

    Squares are compared too (dependence through the Box-Muller radius shared by a pair would show
    there and not in the plain correlation).
    """
    a = _grid(chains=1000, steps=250, shape=(2,))                   # (steps, chains, 2)
    bound = 5 / math.sqrt(a[..., 0].size)

    def check(x, y):
        x, y = x.ravel(), y.ravel()
        assert abs(np.corrcoef(x, y)[0, 1]) < bound
        assert abs(np.corrcoef(x * x, y * y)[0, 1]) < bound
    check(a[:, :-1, 0], a[:, 1:, 0])                                 # neighbouring chains
    check(a[:-1, :, 0], a[1:, :, 0])                                 # consecutive steps
    check(a[..., 0], a[..., 1])                                      # the two draws of one pair
    for stream in (rng.STREAM_INIT_X, rng.STREAM_INIT_EPS, rng.STREAM_INIT_INDEX):
        check(a[..., 0], _grid(chains=1000, steps=250, stream=stream, shape=(2,))[..., 0])
    for seed in (12344, 12345 + (1 << 32)):                          # low and high key word
        check(a[..., 0], _grid(seed=seed, chains=1000, steps=250, shape=(2,))[..., 0])
    b = _grid(chains=1000, steps=250, shape=(5,))                    # element 4 starts a new Philox call
    check(b[..., 3], b[..., 4])


def test_uniform_and_randint_laws():
    g = rng.ChainRNG(5)
    u = g.uniform(torch.arange(250_000), 0, rng.STREAM_INIT_X, (4,)).double().numpy().ravel()
    assert u.min() >= 0 and u.max() < 1
    assert np.array_equal(u * 2 ** 24, np.floor(u * 2 ** 24))       # the documented 2^-24 grid
    assert scipy.stats.kstest(u, "uniform").pvalue > 1e-3
    high = 10
    idx = g.randint(torch.arange(200_000), 0, rng.STREAM_INIT_INDEX, high).numpy()
    counts = np.bincount(idx, minlength=high)
    assert counts.size == high
    assert scipy.stats.chisquare(counts).pvalue > 1e-3
    top = g.randint(torch.arange(10 ** 5), 0, rng.STREAM_INIT_INDEX, 1 << 31)
    assert top.min() >= 0 and top.max() < 1 << 31 and top.max() > (1 << 31) * 0.999


# ---------------------------------------------------------------------------------------------
# Keys: seeds and ranges
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [-1, 1 << 63, 1 << 64, True, 1.5, "7"])
def test_out_of_range_seeds_are_refused_in_one_line(seed):
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*63\)") as e:
        RunConfig(seed=seed).validate()  # unpinned on purpose: validation only, nothing runs
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="seed"):
        rng.ChainRNG(seed)


def test_largest_seed_is_accepted_and_seeds_do_not_alias():
    top = (1 << 63) - 1
    cfg = cpu_dict({"seed": top})
    assert cfg.seed == top
    ids = torch.arange(64)
    draws = {s: rng.ChainRNG(s).normal(ids, 1, rng.STREAM_WALK, (4,)) for s in (0, 1, 1 << 32, top, top - 1)}
    values = list(draws.values())
    for i in range(len(values)):
        for j in range(i + 1, len(values)):
            assert not torch.equal(values[i], values[j])


def test_key_ranges_are_checked():
    g = rng.ChainRNG(0)
    ids = torch.arange(3)
    for bad in (-1, 1 << 32):
        with pytest.raises(ValueError, match="step"):
            g.normal(ids, bad, rng.STREAM_WALK, (2,))
        with pytest.raises(ValueError, match="stream"):
            g.normal(ids, 1, bad, (2,))
    with pytest.raises(ValueError, match="high"):
        g.randint(ids, 0, rng.STREAM_INIT_INDEX, (1 << 31) + 1)
    oracle = GaussianOracle([0.0], [[1.0]], GaussianMNM(1.0, 2)).float()
    with pytest.raises(ValueError, match="2\\*\\*32"):
        WalkJumpEngine(oracle, SamplerConfig(block_size=1 << 20), (1,), 0, [1 << 12])
    with pytest.raises(ValueError, match="seed"):
        WalkJumpEngine(oracle, SamplerConfig(), (1,), -1, [0])
