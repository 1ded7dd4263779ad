"""The training step's fast path (mmgm_ray.train.fast, ``train.fast``): how the options resolve, that
bf16 + compiled training reaches the GMM's Bayes denoiser like float32 does, the compile fallback
(a compiler that fails or gives a wrong gradient),
and that a resumed run keeps the options it started with."""
from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from mmgm_ray.factory import build_oracle, build_score_model, load_artifact
from mmgm_ray.train import fast
from mmgm_ray.train.fast import TrainFastOptions, resolve_train_options
from mmgm_ray.train.loop import read_metrics, train_local
from pinned import cpu_config

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
TINY = ["model.net.channels=8", "model.net.mid_attn=false", "train.batch_size=32", "train.lr=0.002",
        "train.warmup_steps=5", "train.log_every=5", "train.checkpoint_every=10", "train.preview.chains=0",
        "train.ema_eval_batch=0"]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread, as a Ray Train worker has (and the shared 2-core CI machine prefers)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _models():
    cfg = cpu_config("gmm")
    universal = build_score_model(cfg, (2,))
    energy = build_score_model(cpu_config("gmm", "model.kind=mem2", "sampler.walk=full"), (2,))
    return cfg, universal, energy


def test_options_resolve_per_device_type_without_timing(monkeypatch):
    """auto: fused AdamW everywhere, float32 eager on a CPU, bf16 (train.bf16) on CUDA; off: the
    reference; on: auto's set compiled, except energy models (double backward); the explicit
    fields override. Nothing is measured: the CUDA cases run on a CPU-only machine."""
    cfg, universal, energy = _models()
    monkeypatch.setattr(fast, "native_low_precision", lambda device: "bfloat16")
    tc = cfg.train

    def resolve(model=universal, device=CPU, **fields):
        return resolve_train_options(dataclasses.replace(tc, **fields), model, device)

    assert resolve() == TrainFastOptions("float32", compile=False, fused_adamw=True)
    assert resolve(device=CUDA) == TrainFastOptions("bfloat16", compile=False, fused_adamw=True)
    assert resolve(device=CUDA, bf16=False) == TrainFastOptions("float32", compile=False, fused_adamw=True)
    assert resolve(fast="off", autocast="bfloat16", compile="on") == fast.REFERENCE
    assert resolve(fast="on") == TrainFastOptions("float32", compile=True, fused_adamw=True)
    assert resolve(fast="on", device=CUDA) == TrainFastOptions("bfloat16", compile=True, fused_adamw=True)
    assert resolve(fast="on", model=energy) == TrainFastOptions("float32", compile=False, fused_adamw=True)
    assert resolve(fast="on", device=CUDA, autocast="float32", compile="off") == TrainFastOptions(fused_adamw=True)
    assert resolve(autocast="bfloat16", compile="on") == TrainFastOptions("bfloat16", True, True)
    # checkpoints written before the options were recorded resume with what the loop ran then
    assert fast.legacy_options(tc, CPU) == fast.REFERENCE
    assert fast.legacy_options(tc, CUDA) == TrainFastOptions("bfloat16", compile=False, fused_adamw=True)
    monkeypatch.setattr(fast, "native_low_precision", lambda device: "float32")   # a GPU without bf16
    assert resolve(fast="on", device=CUDA) == TrainFastOptions("float32", compile=True, fused_adamw=True)


def test_config_fields_accept_yaml_on_off_and_name_bad_values():
    cfg = cpu_config(None, "train.fast=off", "train.compile=on")
    assert (cfg.train.fast, cfg.train.compile, cfg.train.autocast) == ("off", "on", "auto")
    for override, key in (("train.fast=fastest", "train.fast"), ("train.autocast=float16", "train.autocast"),
                          ("train.compile=maybe", "train.compile")):
        with pytest.raises(ValueError, match=key.replace(".", "\\.")):
            cpu_config(None, override)
    with pytest.raises(ValueError, match="keys"):
        TrainFastOptions.from_dict({"autocast": "float32", "speed": 11})
    with pytest.raises(ValueError, match="autocast"):
        TrainFastOptions("float16")


@pytest.mark.slow
def test_bf16_compiled_training_reaches_the_gmm_bayes_denoiser(tmp_path):
    """The fast path (bf16 autocast, compiled forward + backward, fused AdamW) trains the GMM's MLP
    universal denoiser to the Bayes (oracle) denoiser E[X | ybar] as float32 does
    (tests/test_train.py::test_universal_mlp_approaches_gmm_oracle, same run and bound).

    MSE_model / MSE_oracle >= 1 up to sampling noise (standard error under 1% on 20,000 fresh noisy
    samples); the identity denoiser sits near 2.0. bf16 perturbs each forward by a relative ~2^-8
    (0.4%) per layer, far below the minibatch noise of the gradient at batch 512, so the trained
    weights must reach the same band: within 10% of the Bayes risk (float32 reached 1.004). The
    model is evaluated in float32, so the bound is on what training learned, not on bf16 inference.
    """
    cfg = cpu_config("gmm", f"output={tmp_path}", "train.steps=1500", "train.log_every=500",
                     "train.checkpoint_every=1500", "name=gmm_fast", "train.fast=on",
                     "train.autocast=bfloat16", "train.compile=on")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)   # a compile fallback would fail here
        res = train_local(cfg, progress=False)
    _, _, info = load_artifact(res.artifact)
    assert info["extra"]["fast_path"] == {"autocast": "bfloat16", "compile": True, "fused_adamw": True}
    oracle = build_oracle(cpu_config("gmm", "oracle.kind=gmm"))
    g = torch.Generator().manual_seed(123)
    x, _ = oracle.sample_x(20000, g)
    x = x.float()
    ybar = x + oracle.noise.sigma_eff * torch.randn(x.shape, generator=g)
    with torch.no_grad():
        mse_model = (res.ema.denoise(ybar) - x).pow(2).mean().item()
        mse_oracle = (oracle.denoise(ybar.double()).float() - x).pow(2).mean().item()
    assert mse_oracle < 0.7 * (ybar - x).pow(2).mean().item()    # the test can discriminate
    ratio = mse_model / mse_oracle
    assert 0.97 < ratio < 1.10, (mse_model, mse_oracle, ratio)


class _NoCompiler(torch.nn.Module):
    """What torch.compile returns where compiling fails (at the first call)."""
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, *args):
        raise RuntimeError("no C++ compiler here\nlong traceback")


class _HalfGradient(_NoCompiler):
    """A miscompiled net: the forward is exact, the gradient half of it (the check must catch it)."""
    def forward(self, *args):
        out = self.net(*args)
        return out.detach() + 0.5 * (out - out.detach())


@pytest.mark.parametrize("compiler, why", [
    (_NoCompiler, "RuntimeError: no C++ compiler here"),
    (_HalfGradient, "ValueError: its gradient is 50.0% off the eager step's (tolerance 5%)")])
def test_compile_failure_warns_once_and_trains_eager_on_the_same_curve(tmp_path, monkeypatch, compiler, why):
    """A compiler that fails, or one whose gradient is wrong: one RuntimeWarning, the run trains
    eager, records ``compile=False`` and its curve is bitwise the eager run's (the compile and
    check steps left no trace: RNG and grads)."""
    eager = train_local(cpu_config("digits", *TINY, f"output={tmp_path}", "train.steps=10", "name=eager",
                                   "train.compile=off"), progress=False)
    monkeypatch.setattr(torch, "compile", lambda net, **kw: compiler(net))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        broken = train_local(cpu_config("digits", *TINY, f"output={tmp_path}", "train.steps=10", "name=broken",
                                        "train.compile=on"), progress=False)
    assert [str(w.message) for w in caught if w.category is RuntimeWarning] == [
        f"torch.compile of the training step failed ({why}); training eager"]
    assert torch.load(tmp_path / "broken" / "checkpoint" / "state.pt", weights_only=True)["fast_path"] == \
        {"autocast": "float32", "compile": False, "fused_adamw": True}
    assert [r["loss"] for r in read_metrics(str(tmp_path / "broken"))] == \
        [r["loss"] for r in read_metrics(str(tmp_path / "eager"))]
    for k, v in eager.ema.state_dict().items():
        assert torch.equal(v, broken.ema.state_dict()[k]), k


def test_resume_keeps_the_recorded_options(tmp_path, capsys):
    """A run started float32 (``train.fast=off``) and resumed with bf16 asked for continues in
    float32: its curve is bitwise the uninterrupted float32 run's, and it says so. Control: bf16
    from the start gives another curve (so the comparison can fail)."""
    def run(name, steps, *extra):
        cfg = cpu_config("digits", *TINY, f"output={tmp_path}", f"train.steps={steps}", f"name={name}", *extra)
        train_local(cfg, progress=False)
        return [r["loss"] for r in read_metrics(str(tmp_path / name))]

    straight = run("straight", 20, "train.fast=off")
    run("resumed", 10, "train.fast=off")
    capsys.readouterr()
    resumed = run("resumed", 20, "train.autocast=bfloat16")
    assert "resuming with the checkpoint's fast-path options" in capsys.readouterr().err
    assert resumed == straight
    other = run("other", 20, "train.autocast=bfloat16")
    # bf16 moved these 5-step mean losses by ~6e-5 relative (measured), far above float32's bitwise 0
    assert max(abs(a - b) / b for a, b in zip(other, straight)) > 1e-5, (other, straight)
