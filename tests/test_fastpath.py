"""The sampler's fast path (mmgm_ray.fastpath): options, micro-batches under a memory bound, the
compile fallback, stationary moments with bf16 + compiled scores (THEORY section 4), bitwise resume
for a given option set, and options recorded in block checkpoints and reused by a restarted actor."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from mmgm_ray import fastpath
from mmgm_ray.config import SamplerConfig, from_dict
from mmgm_ray.engine import WalkJumpEngine, chain_blocks
from mmgm_ray.fastpath import FastOptions, FastScore
from mmgm_ray.integrators import IntegratorParams
from mmgm_ray.models import MEM2, UniversalDenoiser, UniversalScoreModel
from mmgm_ray.nets import MLP
from mmgm_ray.noise import GaussianMNM
from mmgm_ray.oracles import GaussianOracle

from pinned import cpu_config, cpu_dict
from test_core import discrete_stationary

CPU = torch.device("cpu")


class _Rational(UniversalScoreModel):
    """g(ybar) = ybar / (1 + ybar^2) + 1/2 elementwise (IEEE +, *, / only): a row's output cannot
    depend on the other rows of its batch, so chunking must give the same bits."""

    def denoise(self, ybar):
        return ybar / (1.0 + ybar * ybar) + 0.5


class _Spy:
    """A score function that records the batch sizes it was called with."""

    def __init__(self, fn):
        self.fn, self.sizes = fn, []

    def __call__(self, y):
        self.sizes.append(y.shape[0])
        return self.fn(y)


def _mlp_model(d=4, M=3, seed=0):
    torch.manual_seed(seed)
    return UniversalDenoiser(MLP(d, 32, 2, zero_init_out=False), GaussianMNM(1.0, M), (d,)).eval()


# ---- options and config ------------------------------------------------------------------------------

def test_options_round_trip_and_bad_options_fail_in_one_line():
    o = FastOptions("bfloat16", True, True, False, 64)
    assert FastOptions.from_dict(o.as_dict()) == o and o.dtype is torch.bfloat16
    assert fastpath.OFF.dtype is None and fastpath.OFF.micro_batch == 0
    for kwargs, match in (({"autocast": "int8"}, "autocast"), ({"micro_batch": -1}, "micro_batch"),
                          ({"cuda_graphs": True}, "cuda_graphs")):
        with pytest.raises(ValueError, match=match):
            FastOptions(**kwargs)
    with pytest.raises(ValueError, match="keys"):
        FastOptions.from_dict({"autocast": "float32", "speed": 11})
    with pytest.raises(ValueError, match="CUDA"):
        FastScore(lambda y: y, FastOptions(compile=True, cuda_graphs=True, micro_batch=4), CPU, (2,))
    with pytest.raises(ValueError, match="micro_batch"):
        FastScore(lambda y: y, FastOptions(compile=True), CPU, (2,))


def test_config_fields_accept_yaml_on_off_and_name_bad_values():
    cfg = cpu_config(None, "sampler.fast=off", "sampler.compile=on")
    assert (cfg.sampler.fast, cfg.sampler.compile) == ("off", "on")
    assert cpu_config(None).sampler.fast == "auto"
    for override, key in (("sampler.fast=fastest", "sampler.fast"), ("sampler.autocast=int8", "sampler.autocast"),
                          ("sampler.compile=maybe", "sampler.compile")):
        with pytest.raises(ValueError, match=key.replace(".", "\\.")):
            cpu_config(None, override)


# ---- micro-batches --------------------------------------------------------------------------------------

@pytest.mark.parametrize("walk", ["reduced", "full"])
def test_micro_batches_give_the_rows_of_one_forward(walk):
    """Chunks of 96 (balanced from 100) over 1,000 chains: every row as in one forward, bitwise,
    for the reduced walk (psi shaped like xhat) and the full walk (psi (N, M, d), xhat (N, d))."""
    model = _Rational(GaussianMNM(0.8, 4), (3,))
    shape = fastpath.chain_shape(model, walk, (3,))
    y = torch.randn(1000, *shape, generator=torch.Generator().manual_seed(0))
    fn = fastpath.score_function(model, walk)
    spy = _Spy(fn)
    mb = fastpath.balanced_micro_batch(1000, 100)
    out = FastScore(spy, FastOptions(micro_batch=mb), CPU, shape)(y)
    ref = fn(y)
    assert mb == 100 and spy.sizes == [100] * 10
    assert torch.equal(out.psi, ref.psi) and torch.equal(out.xhat, ref.xhat)
    assert fastpath.balanced_micro_batch(1000, 384) == 334 and fastpath.balanced_micro_batch(10, 64) == 10


def test_resolved_micro_batch_respects_the_memory_bound(monkeypatch):
    model = _mlp_model()
    sampler = SamplerConfig(fast="on", compile="off", autocast="float32")
    opts = fastpath.resolve_options(sampler, model, CPU, (4,), 5000, 10, max_micro_batch=300)
    assert 16 <= opts.micro_batch <= 300 and math.ceil(5000 / opts.micro_batch) * opts.micro_batch - 5000 < 5000 / 16
    spy = _Spy(model.reduced_score)
    eng = WalkJumpEngine(model, sampler, (4,), 0, range(20), fast=opts)
    eng._scores = {opts.micro_batch: FastScore(spy, opts, CPU, (4,))}   # the same options, a spy inside
    eng.initialize()
    eng.run_collect(3)
    assert max(spy.sizes) <= 300 and sum(spy.sizes) == 3 * 20 * 256
    # explicit micro_batch: bounded too, and nothing is measured
    monkeypatch.setattr(fastpath, "measure_micro_batch", lambda *a, **k: pytest.fail("measured"))
    explicit = from_dict(SamplerConfig, {"fast": "on", "compile": "off"})
    assert fastpath.resolve_options(explicit, model, CPU, (4,), 5000, 10, max_micro_batch=300,
                                    micro_batch=1000).micro_batch == 295
    # the memory bound holds with the fast path off as well, as given (eager slices need no balancing)
    off = fastpath.resolve_options(SamplerConfig(fast="off"), model, CPU, (4,), 5000, 10, max_micro_batch=300)
    assert off == FastOptions(micro_batch=300)


def _no_timing(monkeypatch):
    for name in ("measure_micro_batch", "rows_per_second"):
        monkeypatch.setattr(fastpath, name, lambda *a, **k: pytest.fail("auto measured a timing"))


def test_cpu_auto_is_float32_eager_whatever_the_cpu_and_the_run(monkeypatch):
    """The default on a CPU: float32 eager at the caller's micro-batch, even where bf16 is native and
    for runs of any length, and without any timing, so a fresh run's round-off cannot depend on the
    load at start-up (the reproducibility rule) and equals the fast path off's."""
    _no_timing(monkeypatch)
    monkeypatch.setattr(fastpath, "native_low_precision", lambda device: "bfloat16")
    auto = SamplerConfig()
    oracle = GaussianOracle([0.0, 1.0], torch.eye(2), GaussianMNM(1.0, 4)).float()
    assert fastpath.resolve_options(auto, oracle, CPU, (2,), 4096, 10 ** 9) == fastpath.OFF
    model = _mlp_model()
    for work in (1, 10 ** 12):
        assert fastpath.resolve_options(auto, model, CPU, (4,), 512, work) == fastpath.OFF
        assert fastpath.resolve_options(auto, model, CPU, (4,), 512, work, max_micro_batch=200) == \
            fastpath.resolve_options(SamplerConfig(fast="off"), model, CPU, (4,), 512, work, max_micro_batch=200) == \
            FastOptions(micro_batch=200)
    # explicit fields still override, still without timing
    assert fastpath.resolve_options(SamplerConfig(autocast="bfloat16", compile="on"), model, CPU, (4,), 512, 1,
                                    max_micro_batch=200) == FastOptions("bfloat16", compile=True, micro_batch=171)


def test_cuda_auto_is_a_function_of_the_config_and_the_run_size(monkeypatch):
    """On CUDA "auto" takes the native low precision, channels_last for conv nets, and compiles (on
    balanced chunks, without CUDA graphs) from COMPILE_MIN_CHAIN_STEPS chain-steps on, never energy
    models; nothing runs on the device and nothing is timed. ``fast="on"`` adds CUDA graphs, except
    for a score called on other threads (a Ray actor) where torch cannot replay them there."""
    _no_timing(monkeypatch)
    monkeypatch.setattr(fastpath, "native_low_precision", lambda device: "bfloat16")
    cuda, auto, model = torch.device("cuda"), SamplerConfig(), _mlp_model()
    n = fastpath.COMPILE_MIN_CHAIN_STEPS
    assert fastpath.resolve_options(auto, model, cuda, (4,), 512, n - 1, max_micro_batch=200) == \
        FastOptions("bfloat16", micro_batch=200)
    assert fastpath.resolve_options(auto, model, cuda, (4,), 512, n, max_micro_batch=200) == \
        FastOptions("bfloat16", compile=True, micro_batch=171)
    on = SamplerConfig(fast="on")
    assert fastpath.resolve_options(on, model, cuda, (4,), 512, 1, micro_batch=200) == \
        FastOptions("bfloat16", compile=True, cuda_graphs=True, micro_batch=171)
    monkeypatch.setattr(fastpath, "CUDA_GRAPHS_ACROSS_THREADS", False)
    assert not fastpath.resolve_options(on, model, cuda, (4,), 512, 1, micro_batch=200, same_thread=False).cuda_graphs
    energy = MEM2(MLP(3 * 4, 16, 1), GaussianMNM(1.0, 3), (4,))
    assert not fastpath.resolve_options(SamplerConfig(walk="full"), energy, cuda, (3, 4), 512, 10 ** 12).compile


def test_on_measures_and_keeps_low_precision_only_when_faster_on_a_cpu(monkeypatch):
    """``fast="on"`` on a CPU measures float32 and the native low precision and keeps the faster (by
    >= 3%); on a CPU without native bf16 only float32 is measured; it compiles unless told not to."""
    model = _mlp_model()
    on = SamplerConfig(fast="on", compile="off")
    for native, bf16_rate, expect in (("bfloat16", 2000.0, "bfloat16"), ("bfloat16", 500.0, "float32"),
                                      ("bfloat16", 1020.0, "float32"), ("float32", 2000.0, "float32")):
        seen = []

        def measure(fn, options, *a, **k):
            seen.append(options.autocast)
            return 64, bf16_rate if options.autocast == "bfloat16" else 1000.0

        monkeypatch.setattr(fastpath, "native_low_precision", lambda device: native)
        monkeypatch.setattr(fastpath, "measure_micro_batch", measure)
        assert fastpath.resolve_options(on, model, CPU, (4,), 512, 10).autocast == expect
        assert seen == (["float32", "bfloat16"] if native == "bfloat16" else ["float32"])
    monkeypatch.setattr(fastpath, "measure_micro_batch", lambda *a, **k: (64, 1000.0))
    assert fastpath.resolve_options(SamplerConfig(fast="on", autocast="float32"), model, CPU, (4,), 512, 1) == \
        FastOptions("float32", False, True, False, 64)


def test_compile_failure_warns_once_and_runs_eager(monkeypatch):
    model = _mlp_model()

    def broken(fn, **kw):
        def call(*a):
            raise RuntimeError("no C++ compiler here\nlong traceback")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fs = FastScore(model.reduced_score, FastOptions(compile=True, micro_batch=32), CPU, (4,))
        y = torch.randn(100, 4)
        out = fs(y)
    assert [str(w.message) for w in caught if w.category is RuntimeWarning] == [
        "torch.compile of the score failed (RuntimeError: no C++ compiler here); running eager"]
    assert fs.options == FastOptions(micro_batch=32)       # what actually runs: recorded as such
    with torch.no_grad():
        ref = model.reduced_score(y)
    assert torch.allclose(out.xhat, ref.xhat, rtol=1e-6, atol=1e-6)


def test_bf16_score_is_float32_and_close_to_the_float32_score():
    """Autocast bf16: outputs come back float32, within bf16 round-off of the float32 network
    (8 significant bits: relative error ~2^-8 per layer; 2 hidden layers -> a few 2^-8)."""
    model = _mlp_model()
    y = torch.randn(256, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = FastScore(model.reduced_score, FastOptions("bfloat16", micro_batch=64), CPU, (4,))(y)
        ref = model.reduced_score(y)
    assert out.psi.dtype == torch.float32 and out.xhat.dtype == torch.float32
    err = (out.xhat - ref.xhat).abs().max() / ref.xhat.abs().max()
    assert 0 < err < 8 * 2.0 ** -8


# ---- the walk with a bf16 + compiled score -------------------------------------------------------------

FAST = FastOptions("bfloat16", compile=True, micro_batch=1024)


@pytest.mark.slow
def test_stationary_moments_with_bf16_compiled_score():
    """The reduced A-B-O-B-A walk on N(mu, diag(lam)) data, as in test_core's stationary test, with
    the oracle's score evaluated under bf16 autocast, compiled, in 4 micro-batches of 1,024.

    Reference: the exact discrete stationary covariance (Lyapunov). Tolerance: 5 Monte Carlo s.e.
    (relative s.e. ~ sqrt(2 / 32768) ~ 0.8%, as there) plus the bf16 bias bound. The oracle's gain A
    (E[X | ybar] = mu + A (ybar - mu)) enters the bf16 matmul rounded to 8 significant bits, so
    1 - A (the force constant up to 1/sigma^2) moves by at most 2^-8 A relatively, i.e. the
    stationary variance of ybar by 2^-8 A / (1 - A), and the jump variance (A^2 times it) by
    2^-8 (A / (1 - A) + 2) more; the per-row rounding of the inputs and outputs is unbiased noise
    of relative size 2^-9, whose variance (~1e-6 relative) is far below the s.e. Here A = 0.8 and
    0.5: bounds of 2.3% and 1.2%. The jumps must also differ from the float32 run's (bf16 acted).
    """
    M, sigma = 4, 1.0
    lam = torch.tensor([1.0, 0.25], dtype=torch.float64)
    mu = torch.tensor([0.5, -0.5], dtype=torch.float64)
    oracle = GaussianOracle(mu, torch.diag(lam), GaussianMNM(sigma, M)).float()
    cfg = SamplerConfig(block_size=1024, jump_every=50, init="zeros", gamma=1.0)
    eng = WalkJumpEngine(oracle, cfg, (2,), 7, range(4), fast=FAST)   # one compilation (minutes on 2 cores)
    assert eng.fast == FAST                                  # compiled: no fallback happened
    eng.initialize()
    first_bf16 = eng.run_collect(50).xhat
    list(eng.run(550))
    X = torch.cat([jb.xhat.double() for jb in eng.run(400)])
    ys = eng.state.y.double()
    ref = WalkJumpEngine(oracle, cfg, (2,), 7, range(4))      # float32 eager, same seed, same noise
    ref.initialize()
    first_fp32 = ref.run_collect(50).xhat
    assert not torch.equal(first_fp32, first_bf16)            # bf16 acted
    assert torch.allclose(first_fp32, first_bf16, atol=0.1)
    s2 = sigma ** 2 / M
    n = X.shape[0]
    for i, l in enumerate(lam.tolist()):
        k = 1.0 / (M * (l + s2))
        C, var_eval = discrete_stationary("aboba", k, IntegratorParams(cfg.resolved_delta(sigma), 1.0), 1.0 / M)
        A = l / (l + s2)
        var_jump = A ** 2 * var_eval
        bias_y = 2.0 ** -8 * A / (1 - A)
        bias_jump = bias_y + 2.0 ** -8 * 2
        se = var_jump * math.sqrt(2.0 / n)
        assert abs(X[:, i].var().item() - var_jump) < 5 * se + bias_jump * var_jump, (i, X[:, i].var().item(), var_jump)
        assert abs(X[:, i].mean().item() - mu[i].item()) < 5 * math.sqrt(var_jump / n) + 2.0 ** -8 * abs(mu[i].item())
        se_y = C[0, 0] * math.sqrt(2.0 / ys.shape[0])
        assert abs(ys[:, i].var().item() - C[0, 0]) < 5 * se_y + bias_y * C[0, 0]


@pytest.mark.slow
def test_resume_is_bitwise_with_the_fast_path_on(tmp_path):
    """bf16 + compiled + micro-batched (2,047 chains in chunks of 1,024, the second padded): a run
    saved and restored half-way equals the straight run bitwise; a state saved under one option
    set is refused by an engine with another (ValueError naming ``fast``)."""
    oracle = GaussianOracle([0.5, -0.5], torch.diag(torch.tensor([1.0, 0.25])), GaussianMNM(1.0, 4)).float()
    cfg = SamplerConfig(block_size=89, jump_every=5)
    blocks = range(23)
    a = WalkJumpEngine(oracle, cfg, (2,), 11, blocks, fast=FAST)
    assert a.fast == FAST and a.n_chains == 2047
    a.initialize()
    straight = a.run_collect(40)
    b = WalkJumpEngine(oracle, cfg, (2,), 11, blocks, fast=FAST)
    b.initialize()
    first = b.run_collect(20)
    torch.save(b.state_dict(), tmp_path / "s.pt")
    sd = torch.load(tmp_path / "s.pt", weights_only=True)
    assert {**sd["fast"], "micro_batch": sd["micro_batch"]} == FAST.as_dict()   # the micro-batch on its own
    c = WalkJumpEngine(oracle, cfg, (2,), 11, blocks, fast=FAST)
    c.load_state_dict(sd)
    resumed = type(first).cat([first, c.run_collect(20)])
    for x, y in zip(straight, resumed):
        assert torch.equal(x, y)
    with pytest.raises(ValueError, match="fast"):
        WalkJumpEngine(oracle, cfg, (2,), 11, blocks).load_state_dict(sd)


# ---- the pool records the options and a restarted actor reuses them ---------------------------------------

def test_restarted_actor_reuses_the_recorded_options(tmp_path, monkeypatch):
    """A fresh actor resolves its options (here a measured micro-batch of 64) and records them with
    its block checkpoints; a restarted actor whose measurement would now say 32 resumes with 64, so
    its rows equal an uninterrupted run's bitwise (bf16 scores: the micro-batch could change bits)."""
    from mmgm_ray.pool import ChainActor
    from mmgm_ray.store import create_run, open_dataset, sync_manifest_from_checkpoints

    cfg = cpu_dict({
        "output": str(tmp_path), "seed": 5, "noise": {"sigma": 1.0, "M": 4},
        "oracle": {"kind": "gmm"}, "data": {"name": "gmm"},
        "sampler": {"block_size": 64, "jump_every": 5, "fast": "on", "compile": "off", "autocast": "bfloat16"},
        # every boundary commits: the restart below resumes from step 20
        "pool": {"num_chains": 192, "num_steps": 40, "checkpoint_every": 10, "num_actors": 1,
                 "checkpoint_min_interval_s": 0.0}})
    blocks = chain_blocks(192, 64)
    measured = {"mb": 64}
    monkeypatch.setattr(fastpath, "measure_micro_batch", lambda *a, **k: (measured["mb"], 1e6))

    def run(name, stop_after=None):
        create_run(str(tmp_path), name, event_shape=(2,), config=cfg)
        actor = ChainActor(cfg, str(tmp_path), name, blocks)
        chunks = 0
        while not actor.advance(10)["done"]:
            chunks += 1
            if chunks == stop_after:
                break
        actor.commit()
        actor.close()
        return actor

    ref = run("straight")
    assert ref.engine.fast == FastOptions("bfloat16", micro_batch=64)
    run("restarted", stop_after=2)
    measured["mb"] = 32
    again = run("restarted")
    assert again.start_step == 20 and again.engine.fast.micro_batch == 64
    tables = {}
    for name in ("straight", "restarted"):
        store = create_run(str(tmp_path), name, event_shape=(2,), config=cfg)
        sync_manifest_from_checkpoints(store, blocks)
        tables[name] = open_dataset(store).to_table().sort_by([("chain_id", "ascending"), ("step", "ascending")])
    assert tables["straight"].num_rows == 192 * 8
    assert tables["straight"].drop(["run_id"]).equals(tables["restarted"].drop(["run_id"]))
