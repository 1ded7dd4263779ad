"""Training loop (in-process), Ray Train (resume, worker failure), job submission, config checks."""
from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import re
import secrets
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from fake_cluster import free_port, free_range  # tests/: one definition of free ports
from mmgm_ray import faults
from mmgm_ray.cli import main as mmgm_main
from mmgm_ray.factory import build_oracle, load_artifact
from mmgm_ray.train.loop import noise_seed, read_metrics, train_local
from pinned import cpu_config, cpu_dict, cpu_sets

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

# A tiny digits run: small U-Net, small batches, frequent logs and checkpoints.
TINY = ["model.net.channels=8", "model.net.mid_attn=false", "train.batch_size=32", "train.lr=0.002",
        "train.warmup_steps=5", "train.log_every=5", "train.checkpoint_every=10", "train.preview.chains=4",
        "train.preview.steps=10", "train.ema_eval_batch=64"]


@pytest.fixture(autouse=True)
def one_thread():
    """Single-threaded torch: on a shared 2-core machine OpenMP threads contending with other
    processes made these small nets 5x slower; the Ray workers run with OMP_NUM_THREADS=1 too."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_cfg(tmp_path, *extra):
    return cpu_config("digits", *TINY, f"output={tmp_path}", *extra)


# ---------------------------------------------------------------------------------------------
# In-process loop
# ---------------------------------------------------------------------------------------------

def test_loss_falls_on_digits(tmp_path):
    cfg = tiny_cfg(tmp_path, "train.steps=60", "train.log_every=10", "name=fall")
    res = train_local(cfg, progress=False)
    losses = [r["loss"] for r in res.history]
    assert [r["step"] for r in res.history] == [10, 20, 30, 40, 50, 60]
    # initial loss of the zero-init EDM denoiser is about sigma_eff^2 * sigma_data^2/(...) ~ 0.05
    assert losses[-1] < 0.6 * losses[0], losses
    assert all(np.isfinite(losses))
    # outputs: config, metrics, a preview PNG, the artifact (EMA weights) that loads and hashes
    run = tmp_path / "fall"
    assert cpu_config(str(run / "config.yaml")).train.steps == 60
    assert [r["step"] for r in read_metrics(str(run))] == [10, 20, 30, 40, 50, 60]
    assert (run / "previews" / "step_0000060.png").exists()
    model, mcfg, info = load_artifact(str(run / "model.pt"))
    assert info["model_hash"] == res.model_hash and mcfg.name == "fall"
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, res.ema.state_dict()[k])


def test_loop_is_deterministic_and_local_resume_is_exact(tmp_path):
    """Same seed -> same curve; stopping at a checkpoint and resuming gives the same curve."""
    train_local(tiny_cfg(tmp_path, "train.steps=20", "name=a", "train.preview.chains=0"), progress=False)
    cfg_b = tiny_cfg(tmp_path, "train.steps=10", "name=b", "train.preview.chains=0")
    first = train_local(cfg_b, progress=False)
    assert first.step == 10
    cfg_b.train.steps = 20
    b = train_local(cfg_b, progress=False)
    assert b.start_step == 10 and b.step == 20
    la = {r["step"]: r["loss"] for r in read_metrics(str(tmp_path / "a"))}
    lb = {r["step"]: r["loss"] for r in read_metrics(str(tmp_path / "b"))}
    assert sorted(lb) == [5, 10, 15, 20]
    for s in la:
        assert lb[s] == pytest.approx(la[s], rel=1e-5), (s, la[s], lb[s])


def test_training_noise_seeds_use_the_whole_run_seed():
    """Seeds that agree in their low 32 bits get different training noise (they used to alias);
    seeds below 2^32 keep their previous noise streams."""
    top = (1 << 63) - 1
    seeds = [noise_seed(s, 0, 0) for s in (0, 1 << 32, top, top & 0xFFFFFFFF)]
    assert len(set(seeds)) == 4
    assert noise_seed(5, 1, 2) == int(np.random.SeedSequence([5, 1, 2]).generate_state(1)[0])


def test_universal_mlp_approaches_gmm_oracle(tmp_path):
    """An MLP universal denoiser trained on the GMM approaches the Bayes (oracle) denoiser.

    The oracle E[X | ybar] is the minimum-MSE estimator, so MSE_model / MSE_oracle >= 1 up to
    sampling noise. On 20,000 fresh noisy samples the ratio's standard error is under 1%. The
    identity denoiser (ybar itself, MSE = sigma_eff^2) sits at a ratio of about 2.0 here, so the
    factor 1.10 (model within 10% of Bayes risk) separates a learned posterior mean from a
    poor fit; the trained MLP reached 1.004 (model 0.1251 vs oracle 0.1246).
    """
    cfg = cpu_config("gmm", f"output={tmp_path}", "train.steps=1500", "train.log_every=500",
                     "train.checkpoint_every=1500", "name=gmm")
    res = train_local(cfg, progress=False)
    oracle = build_oracle(cpu_config("gmm", "oracle.kind=gmm"))
    g = torch.Generator().manual_seed(123)
    x, _ = oracle.sample_x(20000, g)
    x = x.float()
    ybar = x + oracle.noise.sigma_eff * torch.randn(x.shape, generator=g)
    with torch.no_grad():
        mse_model = (res.ema.denoise(ybar) - x).pow(2).mean().item()
        mse_oracle = (oracle.denoise(ybar.double()).float() - x).pow(2).mean().item()
    mse_identity = (ybar - x).pow(2).mean().item()
    assert mse_oracle < 0.7 * mse_identity, (mse_oracle, mse_identity)  # the test can discriminate
    ratio = mse_model / mse_oracle
    assert 0.97 < ratio < 1.10, (mse_model, mse_oracle, ratio)


def test_bad_configs_fail_clearly(tmp_path, capsys):
    from mmgm_ray.train.validate import validate_run

    for overrides, pattern in [
        (["data.name=imagenet"], "unknown data set 'imagenet'"),
        (["train.lr=-0.001"], "train.lr must be a finite number > 0"),
        (["noise.sigma=0"], "noise.sigma must be a finite number > 0"),
        (["data.name=mnist", f"data.path={tmp_path}/nope"], "nope"),
        (["train.batch_size=5000"], "fewer than train.batch_size=5000"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            validate_run(cpu_config("digits", *overrides, f"output={tmp_path}"))
        rc = mmgm_main(["train", "--config", "digits", "--dry-run", *cpu_sets(f"output={tmp_path}", *overrides)])
        assert rc == 2
        err = capsys.readouterr().err
        assert err.startswith("mmgm train: error:") and "Traceback" not in err
    # a config mutated in code after loading is re-checked too
    cfg = cpu_config("digits", f"output={tmp_path}")
    cfg.noise.sigma = -1.0
    with pytest.raises(ValueError, match="noise.sigma"):
        validate_run(cfg)
    assert not (tmp_path / "digits").exists()  # nothing was written: no run started


def test_yaml_exponent_floats_are_numbers(tmp_path):
    """PyYAML (YAML 1.1) reads ``1e-6`` as the string '1e-6'; a float field takes it as YAML 1.2
    does, while a word in a float field is still one line naming the key."""
    import yaml  # only this test reads YAML directly

    d = yaml.safe_load("train: {lr: 3e-4}\npool: {memory_fraction: 1e-6}\nsampler: {delta: .5E+0}")
    cfg = cpu_dict(d)
    assert (cfg.train.lr, cfg.pool.memory_fraction, cfg.sampler.delta) == (3e-4, 1e-6, 0.5)
    with pytest.raises(ValueError, match="config key 'train.lr': expected a number, got 'fast'"):
        cpu_dict({"train": {"lr": "fast"}})


# ---------------------------------------------------------------------------------------------
# --dry-run of every shipped config
# ---------------------------------------------------------------------------------------------

def _write_cifar_archive(path: Path, per_batch: int = 60) -> None:
    """A small archive in the cifar-10-python.tar.gz layout (5 x per_batch train images)."""
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            n = per_batch
            blob = pickle.dumps({b"labels": rng.integers(0, 10, n).tolist(),
                                 b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def _write_fashion_folder(folder: Path, n: int = 130) -> None:
    """Fashion-MNIST IDX files (gzipped) with n random 28x28 images per split."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        for kind, arr in (("images-idx3", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)),
                          ("labels-idx1", rng.integers(0, 10, n, dtype=np.uint8))):
            raw = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
            (folder / f"{prefix}-{kind}-ubyte.gz").write_bytes(gzip.compress(raw))


@pytest.mark.parametrize("name", ["digits", "digits_muvb", "gmm", "fashion_mnist", "cifar10_mdae", "cifar10_ussf"])
def test_shipped_configs_dry_run(name, tmp_path, capsys):
    """Every shipped config validates fully (config + data + network) with --dry-run.

    The CIFAR-10 configs need data.path: they get a small archive in the real format (300 training
    images: enough for 4 workers x 64); Fashion-MNIST gets a small IDX folder when Debian's
    dataset-fashion-mnist is not installed. The data is read and checked, not just named.
    """
    extra = cpu_sets(f"output={tmp_path}/runs")
    if name.startswith("cifar10"):
        arc = tmp_path / "cifar-10-python.tar.gz"
        _write_cifar_archive(arc)
        extra += ["--set", f"data.path={arc}"]
        # without a path the config refuses to load, naming the key
        assert mmgm_main(["train", "--config", name, "--dry-run", *cpu_sets()]) == 2
        assert "data.path is required" in capsys.readouterr().err
    if name == "fashion_mnist":
        from mmgm_ray.data import default_fashion_mnist_dir
        if default_fashion_mnist_dir() is None:
            _write_fashion_folder(tmp_path / "fm")
            extra += ["--set", f"data.path={tmp_path / 'fm'}"]
    assert mmgm_main(["train", "--config", name, "--dry-run", *extra]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["dry_run"] == "ok" and summary["parameters"] > 1000
    assert cpu_config(name, *[e for e in extra if e != "--set"]).name == name
    assert f"name: {name}" in out  # the resolved config is printed
    assert not (tmp_path / "runs").exists()  # dry run: nothing written


def test_demo_like_local_cli(tmp_path, capsys):
    """``mmgm train --local`` trains in-process and writes the artifact."""
    rc = mmgm_main(["train", "--config", "digits", "--local",
                    *cpu_sets(*TINY, "train.steps=10", f"output={tmp_path}", "name=cli")])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["step"] == 10 and Path(out["artifact"]).exists()


# ---------------------------------------------------------------------------------------------
# Ray Train
# ---------------------------------------------------------------------------------------------

@pytest.mark.ray
@pytest.mark.timeout(300)
def test_ray_resume_continues_steps_and_curve(ray_session, tmp_path):
    """Same run name + storage -> the second fit starts from the checkpoint step and the loss curve
    continues: it equals an uninterrupted in-process run of the same config (exact resume)."""
    from mmgm_ray.train.ray_train import run_ray_training

    out = tmp_path / "ray"
    cfg1 = tiny_cfg(out, "train.steps=20", "name=resume")
    r1 = run_ray_training(cfg1, progress=False)
    assert r1.metrics["step"] == 20 and r1.checkpoint_path
    cfg2 = tiny_cfg(out, "train.steps=40", "name=resume")
    r2 = run_ray_training(cfg2, progress=False)
    assert r2.metrics["step"] == 40
    hist = read_metrics(str(out / "resume"))
    assert [r["step"] for r in hist] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert {r["start_step"] for r in hist if r["step"] <= 20} == {0}
    assert {r["start_step"] for r in hist if r["step"] > 20} == {20}  # resumed, not restarted
    # the uninterrupted reference, in-process
    ref = train_local(tiny_cfg(tmp_path / "local", "train.steps=40", "name=ref", "train.preview.chains=0"),
                      progress=False)
    ref_loss = {r["step"]: r["loss"] for r in ref.history}
    for r in hist:
        assert r["loss"] == pytest.approx(ref_loss[r["step"]], rel=2e-3), (r["step"], r["loss"], ref_loss[r["step"]])
    model, mcfg, info = load_artifact(str(out / "resume" / "model.pt"))
    assert info["extra"]["step"] == 40 and mcfg.train.steps == 40
    assert (out / "resume" / "config.yaml").exists()


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(420)
def test_ray_mem2_two_ddp_workers_resume_continues_steps_and_curve(ray_session, tmp_path):
    """MEM^2 (double backprop: the loss differentiates the energy's gradient) on 2 DDP workers trains,
    checkpoints and resumes exactly like the universal model: the resumed curve equals an
    uninterrupted 2-worker run's. Plain DDP suffices (no static_graph / find_unused_parameters):
    the inner torch.autograd.grad(..., inputs=y) runs no parameter's AccumulateGrad hook, so DDP's
    reducer fires once per parameter, in the outer backward. The tolerance is the universal test's:
    both runs take the same steps on the same data and noise; only all-reduce order may differ."""
    from mmgm_ray.train.ray_train import run_ray_training

    out = tmp_path / "ray"
    mem2 = ["model.kind=mem2", "sampler.walk=full", "noise.M=4", "train.resources.num_workers=2", "train.preview.chains=0"]
    r1 = run_ray_training(tiny_cfg(out, "train.steps=20", "name=mem2", *mem2), progress=False)
    assert r1.metrics["step"] == 20 and r1.checkpoint_path
    r2 = run_ray_training(tiny_cfg(out, "train.steps=30", "name=mem2", *mem2), progress=False)
    assert r2.metrics["step"] == 30
    hist = read_metrics(str(out / "mem2"))
    assert [r["step"] for r in hist] == [5, 10, 15, 20, 25, 30]
    assert [r["start_step"] for r in hist] == [0, 0, 0, 0, 20, 20]  # resumed, not restarted
    ref = run_ray_training(tiny_cfg(out, "train.steps=30", "name=mem2-ref", *mem2), progress=False)
    ref_loss = {r["step"]: r["loss"] for r in ref.history}
    for r in hist:
        assert r["loss"] == pytest.approx(ref_loss[r["step"]], rel=2e-3), (r["step"], r["loss"], ref_loss[r["step"]])
    assert hist[-1]["loss"] < hist[0]["loss"]
    model, mcfg, info = load_artifact(str(out / "mem2" / "model.pt"))
    extra = dict(info["extra"])
    assert extra.pop("hardware")["device_type"] == "cpu"  # the device class the run was trained on
    # the training step's options (train.fast=auto on a CPU), recorded for a resume
    assert extra.pop("fast_path") == {"autocast": "float32", "compile": False, "fused_adamw": True}
    assert extra == {"step": 30, "world_size": 2} and mcfg.model.kind == "mem2"
    ref_model, _, _ = load_artifact(ref.artifact)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, ref_model.state_dict()[k], rtol=1e-3, atol=1e-5)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_ray_worker_crash_is_retried_from_checkpoint(ray_session, tmp_path, monkeypatch):
    """Rank 0 dies (os._exit) at step 17 on the first attempt only (marker file); FailureConfig
    restarts the 2-worker DDP group from the step-10 checkpoint and the run completes."""
    from mmgm_ray.train.ray_train import run_ray_training

    marker = tmp_path / "crashed"
    cfg = tiny_cfg(tmp_path / "ray", "train.steps=30", "name=crash", "train.resources.num_workers=2",
                   "train.resources.max_failures=2", "train.preview.chains=0")
    monkeypatch.setenv(faults.ENV, json.dumps({"train_crash": {"step": 17, "marker": str(marker), "rank": 0}}))
    res = run_ray_training(cfg, progress=False)
    assert marker.read_text() == "17"  # the first attempt did die there
    assert res.metrics["step"] == 30
    hist = read_metrics(str(tmp_path / "ray" / "crash"))
    assert [r["step"] for r in hist] == [5, 10, 15, 20, 25, 30]  # no duplicates from the dead attempt
    assert [r["start_step"] for r in hist] == [0, 0, 10, 10, 10, 10]
    assert hist[-1]["loss"] < hist[0]["loss"]
    _, _, info = load_artifact(res.artifact)
    assert info["extra"]["step"] == 30 and info["extra"]["world_size"] == 2
    assert info["extra"]["hardware"]["device_class"].startswith("cpu/")


@pytest.mark.ray
def test_ray_bad_config_fails_before_any_worker(ray_session, tmp_path):
    from mmgm_ray.train.ray_train import run_ray_training

    cfg = tiny_cfg(tmp_path, "name=bad")
    cfg.data.name = "imagenet"
    with pytest.raises(ValueError, match="unknown data set 'imagenet'"):
        run_ray_training(cfg)
    cfg = tiny_cfg(tmp_path, "name=bad", "train.resources.num_workers=8")
    with pytest.raises(ValueError, match=r"train.resources.num_workers=8: 8 x \{CPU: 1\} \(PACK\) needs \{CPU: 8\} and can never"):
        run_ray_training(cfg)
    assert not (tmp_path / "bad").exists()  # no config.yaml: the trainer never started
    # the job entry point refuses too, with one line, before connecting to any cluster
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "train.py"), "--config", "digits",
                           *cpu_sets("noise.sigma=-1")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "RAY_ADDRESS": "127.0.0.1:1"})  # joining would fail loudly
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "mmgm train: error: noise.sigma must be a finite number > 0, got -1.0"


# ---------------------------------------------------------------------------------------------
# A real head with token auth + ray job submit
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(400)
def test_job_submit_to_token_auth_head(tmp_path):
    """Start our own head (own temp dir, ports, token), submit jobs/train.py, see it SUCCEED; a
    request without the token is rejected; stop exactly that head by its process group."""
    short = Path(f"/tmp/mmgm-job-{os.getpid()}-{secrets.token_hex(3)}")  # unix socket paths are short
    short.mkdir()
    token_file = short / "token"
    token = secrets.token_hex(32)
    token_file.write_text(token)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file),
                "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
                "OMP_NUM_THREADS": "1"})
    gcs, dash, client, agent, metrics, rtenv = (free_port() for _ in range(6))
    wbase = free_range(60)
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--port", str(gcs), "--dashboard-port", str(dash),
           "--dashboard-host", "127.0.0.1", "--node-ip-address", "127.0.0.1", "--num-cpus", "4",
           "--temp-dir", str(short / "ray"), "--disable-usage-stats", "--ray-client-server-port", str(client),
           "--dashboard-agent-listen-port", str(agent), "--metrics-export-port", str(metrics),
           "--runtime-env-agent-port", str(rtenv), "--min-worker-port", str(wbase),
           "--max-worker-port", str(wbase + 59)]
    head = subprocess.Popen(cmd, env=env, stdout=open(short / "head.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own process group: we stop exactly this head
    url = f"http://127.0.0.1:{dash}"
    try:
        # wait for the dashboard; an authenticated request returns 200
        deadline = time.time() + 90
        while True:
            assert head.poll() is None, (short / "head.log").read_text()[-3000:]
            try:
                req = urllib.request.Request(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"})
                with urllib.request.urlopen(req, timeout=5) as r:
                    assert r.status == 200
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert time.time() < deadline, "dashboard did not come up"
                time.sleep(1)
        # without the token: rejected
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(f"{url}/api/jobs/", timeout=10)
        assert exc.value.code in (401, 403)
        noauth = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
        noauth["HOME"] = str(short)  # no ~/.ray/auth_token to fall back on
        p = subprocess.run([str(VENV_BIN / "ray"), "job", "list", "--address", url], env=noauth,
                           capture_output=True, text=True, timeout=60)
        assert p.returncode != 0 and "auth" in (p.stdout + p.stderr).lower(), p.stdout + p.stderr
        # the real submission
        out = short / "out"
        sets = cpu_sets(*TINY, "train.steps=20", f"output={out}", "name=job", "train.preview.chains=0")
        job = [str(VENV_BIN / "ray"), "job", "submit", "--address", url, "--working-dir", str(ROOT),
               "--", "python", "jobs/train.py", "--config", "digits", *sets]
        p = subprocess.run(job, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
        logs = p.stdout + p.stderr
        assert p.returncode == 0, logs[-4000:]
        job_id = re.search(r"raysubmit_\w+", logs).group(0)
        req = urllib.request.Request(f"{url}/api/jobs/{job_id}", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert json.loads(r.read())["status"] == "SUCCEEDED"
        _, mcfg, info = load_artifact(str(out / "job" / "model.pt"))
        assert info["extra"]["step"] == 20 and mcfg.name == "job"
    finally:
        try:
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(head.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(short, ignore_errors=True)
