"""GPU readiness on a CPU machine (issue 14): the CUDA branches simulated, the device checks, the
attention kernels, the memory planner, the device records. ``tests_gpu/`` runs them on a GPU."""
from __future__ import annotations

import ast
import json
import math
import os
import pathlib
import subprocess
import sys
import threading
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from mmgm_ray import demo, hardware
from mmgm_ray.cli import main as mmgm_main
from mmgm_ray.config import SamplerConfig, load_config
from mmgm_ray.engine import WalkJumpEngine, chain_blocks
from mmgm_ray.factory import build_score_model
from mmgm_ray.nets.unet import SelfAttention
from mmgm_ray.noise import GaussianMNM
from mmgm_ray.oracles import GMMOracle, _mvn_logpdf
from mmgm_ray.planner import GATHER_COPIES, MAX_GATHER_ROWS, MAX_STRETCH, measure_score_bytes, plan_memory
from mmgm_ray.store import create_run, load_manifest, read_samples, sync_manifest_from_checkpoints
from mmgm_ray.train.loop import resolve_device as train_device
from mmgm_ray.train.loop import train_local
from pinned import CPU_PINS, cpu_config, cpu_dict, cpu_sets

TESTS = pathlib.Path(__file__).resolve().parent
ROOT = TESTS.parent


@pytest.fixture(autouse=True)
def one_thread():
    """Single-threaded torch (OpenMP threads contending on a shared 2-core box are 5x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def gmm_run(out, name: str, **pool) -> dict:
    """A small oracle run that commits at every boundary (the resume cases count on it)."""
    return {"name": name, "output": str(out), "seed": 5, "noise": {"sigma": 1.0, "M": 4},
            "oracle": {"kind": "gmm"}, "data": {"name": "gmm"}, "sampler": {"block_size": 32, "jump_every": 5},
            "store": {"rows_per_file": 300},
            "pool": {"num_chains": 96, "num_steps": 20, "checkpoint_every": 10, "num_actors": 2,
                     "checkpoint_min_interval_s": 0.0, **pool}}


# ---- 2. every test pins its device ------------------------------------------------------------------

#: calls that build a run config, directly or inside the entry point they call
_BUILDERS = {"load_config", "RunConfig", "run_demo"}
_CLI_COMMANDS = {"demo", "train", "sample", "generate", "run"}   # the subcommands that build a RunConfig
_HELPERS = ("cpu_config(", "cpu_dict(", "cpu_sets(", "CPU_PINS")


def _builds_config(call: ast.Call) -> bool:
    f = call.func
    name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
    if name in _BUILDERS:
        return True
    if name == "from_dict":
        return bool(call.args) and ast.unparse(call.args[0]) == "RunConfig"
    if name in ("main", "mmgm_main"):   # mmgm_ray.cli.main, however imported
        argv = call.args[0] if call.args else None
        return isinstance(argv, ast.List) and bool(argv.elts) and \
            isinstance(argv.elts[0], ast.Constant) and argv.elts[0].value in _CLI_COMMANDS
    return name in ("run", "Popen") and "jobs" in ast.unparse(call)   # a job script as a subprocess


def test_every_test_config_pins_its_device():
    """Every config a test builds goes through ``tests/pinned.py`` (CPU pins): a call that builds a
    run config (load_config, from_dict(RunConfig), RunConfig(), run_demo, a CLI subcommand, a job
    script) must mention a helper, or a variable of its function assigned from one."""
    unpinned = set()
    for path in sorted(TESTS.glob("*.py")):
        if path.name == "pinned.py":
            continue
        tree = ast.parse(path.read_text())
        for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.Module))]:
            nodes = list(ast.walk(fn))
            pinned_names = {t.id for node in nodes if isinstance(node, ast.Assign)
                            and any(h in ast.unparse(node.value) for h in _HELPERS)
                            for t in node.targets if isinstance(t, ast.Name)}
            for call in [n for n in nodes if isinstance(n, ast.Call) and _builds_config(n)]:
                text = ast.unparse(call)
                names = {n.id for n in ast.walk(call) if isinstance(n, ast.Name)}
                if not any(h in text for h in _HELPERS) and not names & pinned_names \
                        and "unpinned on purpose" not in path.read_text().splitlines()[call.lineno - 1]:
                    unpinned.add(f"{path.name}:{call.lineno}: {text[:100]}")
    assert not unpinned, "configs that leave the device on auto:\n" + "\n".join(sorted(unpinned))


def test_pinned_configs_stay_on_cpu_where_cuda_is_visible(monkeypatch):
    """With CUDA visible, auto picks it (the bug the pins avoid); the pinned configs stay on CPU."""
    from mmgm_ray.pool.actor import resolve_device as pool_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert train_device(load_config("digits")).type == "cuda"  # unpinned on purpose: auto -> cuda
    assert pool_device(load_config(None, ["pool.gpus_per_actor=0.5"]).pool).type == "cuda"  # unpinned on purpose
    for cfg in (cpu_config("digits"), cpu_dict(gmm_run("x", "y", gpus_per_actor=0.5))):
        assert cfg.train.device == "cpu" and cfg.pool.device == "cpu"
        assert train_device(cfg).type == "cpu"
        assert pool_device(cfg.pool).type == "cpu"


# ---- 1. the demo's preview runs where the model is -----------------------------------------------

def test_demo_preview_runs_on_the_models_device(tmp_path, monkeypatch):
    """The trained model is (mocked) on cuda:0: the preview chains must run there, with the data
    handed over on the host (the engine moves only the rows it draws)."""
    cuda0 = torch.device("cuda", 0)
    ema = SimpleNamespace(parameters=lambda: iter([SimpleNamespace(device=cuda0)]))
    trained = SimpleNamespace(ema=ema, event_shape=(1, 8, 8), artifact="model.pt", model_hash="h", step=1,
                              history=[{"loss": 0.1}])
    monkeypatch.setattr(demo, "train_local", lambda *a, **k: trained)
    seen = {}

    def preview(model, cfg, shape, n, steps, device, data):
        seen.update(model=model, device=device, data_device=data.device)
        return torch.rand(n, *shape)

    monkeypatch.setattr(demo, "preview_samples", preview)
    demo.run_demo(str(tmp_path / "d"), overrides=[*CPU_PINS, "sampler.init=data"], progress=False)
    assert seen == {"model": ema, "device": cuda0, "data_device": torch.device("cpu")}


def test_init_data_moves_only_the_chosen_rows():
    """``init=data`` indexes the data where it lives; only the drawn rows go to the device."""
    moved = []

    class Watched(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if func is torch.Tensor.to:
                moved.append(tuple(args[0].shape))
            return super().__torch_function__(func, types, args, kwargs or {})

    oracle = GMMOracle([0.5, 0.5], [[0.0, 0.0], [3.0, 3.0]], torch.eye(2).expand(2, 2, 2), GaussianMNM(1.0, 4))
    cfg = SamplerConfig(block_size=8, init="data")
    data = torch.randn(1000, 2)
    ref = WalkJumpEngine(oracle, cfg, (2,), 3, [0, 1])
    ref.initialize(data)
    eng = WalkJumpEngine(oracle, cfg, (2,), 3, [0, 1])
    eng.initialize(data.as_subclass(Watched))
    assert moved == [(16, 2)]                                   # 2 blocks x 8 chains, not 1000 rows
    assert torch.equal(eng.state.y.as_subclass(torch.Tensor), ref.state.y)


# ---- 3. pool.device validation ------------------------------------------------------------------------

def test_pool_device_cuda_needs_a_reserved_gpu_and_no_index(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"pool.device='cuda' needs pool.gpus_per_actor > 0"):
        cpu_config(None, "pool.device=cuda")
    with pytest.raises(ValueError, match=r"pool.device='cuda:1': a chain actor sees only the GPU Ray reserved"):
        cpu_config(None, "pool.device=cuda:1", "pool.gpus_per_actor=1")
    assert cpu_config(None, "pool.device=cuda", "pool.gpus_per_actor=0.5").pool.device == "cuda"
    # the driver refuses before touching anything, with one line (exit 2)
    for bad in (["pool.device=cuda"], ["pool.device=cuda:0", "pool.gpus_per_actor=1"]):
        rc = mmgm_main(["sample", "--config", "gmm_sample", *cpu_sets(f"output={tmp_path}", *bad), "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and err.startswith("mmgm sample: error: pool.device="), err
    assert not any(tmp_path.iterdir())


# ---- 4. the actor's pinned-copy path, simulated -------------------------------------------------------

class _LateCopy(torch.Tensor):
    """A stand-in pinned buffer: a non_blocking copy into it lands only when its event fires."""
    queued: list = []

    def copy_(self, src, non_blocking=False):
        assert non_blocking, "the device-to-host copy must be asynchronous"
        _LateCopy.queued.append((self, src.clone()))
        return self


class _FakeEvent:
    events: list = []

    def __init__(self):
        self.stream, self.copies, self.synced_on = None, [], []
        _FakeEvent.events.append(self)

    def record(self, stream):
        self.stream, self.copies = stream, list(_LateCopy.queued)
        _LateCopy.queued.clear()

    def synchronize(self):
        for dst, src in self.copies:
            torch.Tensor.copy_(dst, src)
        self.synced_on.append(threading.current_thread().name)


def _run_actor(root, name, cfg, simulate_cuda: bool, monkeypatch):
    from mmgm_ray.pool import ChainActor
    from mmgm_ray.pool import actor as actor_mod

    store = create_run(str(root), name, event_shape=(2,), config=cfg)
    blocks = chain_blocks(cfg.pool.num_chains, cfg.sampler.block_size)
    actor = ChainActor(cfg, str(root), name, blocks)
    streams = []
    if simulate_cuda:
        def garbage(t):   # what an unsynchronized read would see
            fill = float("nan") if t.is_floating_point() else -7
            return torch.full(t.shape, fill, dtype=t.dtype).as_subclass(_LateCopy)

        monkeypatch.setattr(actor, "device", torch.device("cuda"))
        monkeypatch.setattr(actor_mod, "pinned_buffer", garbage)
        monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device: streams.append(device) or f"stream:{device}")
    while not actor.advance(10)["done"]:
        pass
    actor.close()
    sync_manifest_from_checkpoints(store, blocks)   # the driver's part: commit what the blocks checkpointed
    return read_samples(store.url), streams


def test_pinned_copy_path_writes_the_cpu_rows(tmp_path, monkeypatch):
    """The CUDA branch of the actor (pinned buffers, non_blocking copies, an event the writer waits
    on) with stand-ins whose copies land only when the event fires: the rows are bitwise those of
    the CPU branch, every event was recorded on the stream of the jumps' device and waited on once,
    by the writer thread, before the rows were used."""
    cfg = cpu_dict(gmm_run(tmp_path, "r"))
    (x_cpu, m_cpu), _ = _run_actor(tmp_path / "cpu", "r", cfg, False, monkeypatch)
    _FakeEvent.events.clear()
    (x_sim, m_sim), streams = _run_actor(tmp_path / "sim", "r", cfg, True, monkeypatch)
    jump_steps = cfg.pool.num_steps // cfg.sampler.jump_every
    assert len(_FakeEvent.events) == jump_steps and streams == [torch.device("cpu")] * jump_steps
    assert all(e.synced_on == ["mmgm-writer"] and len(e.copies) == 7 for e in _FakeEvent.events)
    assert len(x_cpu) == 96 * jump_steps and x_sim.tobytes() == x_cpu.tobytes()
    assert m_sim.drop(["run_id"]).equals(m_cpu.drop(["run_id"]))


# ---- 5. device records and resume on another device class -----------------------------------------

def test_precision_flags_are_set_and_read_back():
    before = hardware.precision_flags()
    try:
        on = hardware.apply_precision(hardware.Precision(allow_tf32=True, cudnn_deterministic=False,
                                                         cudnn_benchmark=True))
        assert on["tf32_matmul"] and on["tf32_cudnn_conv"] and on["cudnn_benchmark"] and not on["cudnn_deterministic"]
        off = hardware.apply_precision(hardware.Precision())
        assert not (off["tf32_matmul"] or off["tf32_cudnn_conv"] or off["cudnn_benchmark"])
        assert off["cudnn_deterministic"] and not off["deterministic_algorithms"]
    finally:
        hardware.apply_precision(hardware.Precision(before["tf32_matmul"], before["cudnn_deterministic"],
                                                    before["cudnn_benchmark"]))
    d = hardware.describe("cpu")
    assert d["device_class"] == f"cpu/{d['cpu_arch']}/{d['cpu_capability']}" and d["torch"] == torch.__version__


def test_device_class_check():
    cpu = hardware.describe("cpu")
    assert hardware.check_device_class(None, cpu, "run x", False) is None
    assert hardware.check_device_class(dict(cpu), cpu, "run x", False) is None
    gpu = {"device_class": "cuda/NVIDIA H200/sm_90"}
    with pytest.raises(hardware.DeviceChangeError, match="cannot resume run x: it was computed on cuda/NVIDIA H200"):
        hardware.check_device_class(gpu, cpu, "run x", False)
    assert "differ" in hardware.check_device_class(gpu, cpu, "run x", True)


def test_actor_refuses_another_device_class_before_touching_the_store(tmp_path):
    from mmgm_ray.pool import ChainActor

    cfg = cpu_dict(gmm_run(tmp_path, "r"))
    other = {"device_class": "cuda/NVIDIA H200/sm_90"}
    with pytest.raises(hardware.DeviceChangeError, match="Pass --allow-device-change"):
        ChainActor(cfg, str(tmp_path), "r", [0, 1, 2], recorded_hardware=other)
    assert not list(tmp_path.iterdir())                       # no lease, no checkpoint, nothing
    actor = ChainActor(cfg, str(tmp_path), "r", [0, 1, 2], recorded_hardware=other, allow_device_change=True)
    res = actor.advance(10)
    actor.close()
    assert "differ" in res["device_note"] and res["hardware"]["device_class"].startswith("cpu/")
    assert res["memory_plan"]["chains"] == 96


def test_runs_recorded_before_the_precision_fields_still_resume(tmp_path):
    """A run recorded before ``sampler.allow_tf32`` existed resumes: a field the recorded config
    lacks counts as its default (off); turning TF32 on for the resume is refused."""
    from mmgm_ray.config import to_dict
    from mmgm_ray.pool.driver import check_resume_compatible

    cfg = cpu_dict(gmm_run(tmp_path, "old"))
    recorded = to_dict(cfg)
    del recorded["sampler"]["allow_tf32"]
    check_resume_compatible(recorded, cfg)
    cfg.sampler.allow_tf32 = True
    with pytest.raises(ValueError, match=r"differs from the recorded one in \['sampler.allow_tf32'\]"):
        check_resume_compatible(recorded, cfg)


def _set_recorded(url, actor_class: str, device_type: str) -> None:
    man_path = pathlib.Path(url) / "manifest.json"
    man = json.loads(man_path.read_text())
    hw = man["hardware"]
    hw["device_type"] = device_type
    hw["device_class"] = actor_class
    for a in hw["actors"].values():
        a["device_class"], a["device_type"] = actor_class, device_type
    man_path.write_text(json.dumps(man))


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_sampling_resume_on_another_device_class(ray_session, tmp_path, capsys):
    """The manifest records each actor's hardware and memory plan. A resume where it says cuda is
    refused by the driver before any file is touched; where it says another CPU class, by the
    actors; one line each (exit 2). ``--allow-device-change`` continues and records the change."""
    from mmgm_ray.pool import run_pool

    summary = run_pool(cpu_dict(gmm_run(tmp_path, "dev")), progress=False)
    url = summary["url"]
    man = load_manifest(url)
    assert man["hardware"]["device_class"] == hardware.describe("cpu")["device_class"]
    assert set(man["hardware"]["actors"]) == {"0", "1"} and set(man["memory_plans"]) == {"0", "1"}
    assert man["memory_plans"]["0"]["chains"] == 64 and man["memory_plans"]["1"]["chains"] == 32
    resume = ["sample", "--resume", url, "--no-progress", *cpu_sets("pool.num_steps=30")]
    _set_recorded(url, "cuda/NVIDIA H200/sm_90", "cuda")
    before = {p: p.stat().st_mtime_ns for p in pathlib.Path(url).rglob("*")}
    assert mmgm_main(resume) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot resume" in err and "cuda" in err and "--allow-device-change" in err
    assert {p: p.stat().st_mtime_ns for p in pathlib.Path(url).rglob("*")} == before
    _set_recorded(url, "cpu/riscv64/DEFAULT", "cpu")          # same type, another class: the actors refuse
    assert mmgm_main(resume) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "computed on cpu/riscv64/DEFAULT" in err, err
    assert mmgm_main([*resume, "--allow-device-change"]) == 0
    assert "from here on the results differ" in capsys.readouterr().err
    man = load_manifest(url)
    assert man["status"] == "done" and man["progress"]["min_last_step"] == 30
    assert {c["from"] for c in man["hardware"]["changes"]} == {"cpu/riscv64/DEFAULT"}


def test_training_resume_on_another_device_class(tmp_path, capsys):
    """The training checkpoint records the hardware; a resume from another device class is refused
    with one line (exit 2) and continues with ``--allow-device-change``."""
    sets = ["model.net.channels=8", "model.net.mid_attn=false", "train.batch_size=32", "train.warmup_steps=2",
            "train.log_every=5", "train.checkpoint_every=5", "train.preview.chains=0", f"output={tmp_path}",
            "name=t"]
    assert train_local(cpu_config("digits", *sets, "train.steps=5"), progress=False).step == 5
    ckpt = tmp_path / "t" / "checkpoint" / "state.pt"
    payload = torch.load(ckpt, weights_only=True)
    assert payload["hardware"]["device_class"] == hardware.describe("cpu")["device_class"]
    assert payload["hardware"]["precision"]["tf32_cudnn_conv"] is False
    payload["hardware"]["device_class"] = "cuda/NVIDIA H200/sm_90"
    torch.save(payload, ckpt)
    cli = ["train", "--local", "--config", "digits", *cpu_sets(*sets, "train.steps=10")]
    assert mmgm_main(cli) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot resume training run 't'" in err
    assert mmgm_main([*cli, "--allow-device-change"]) == 0
    assert "from here on the results differ" in capsys.readouterr().err
    assert torch.load(ckpt, weights_only=True)["step"] == 10


def test_ray_train_error_names_the_device_change():
    from ray.train import WorkerGroupError

    from mmgm_ray.train.ray_train import _device_change

    inner = hardware.DeviceChangeError("cannot resume training run 'x': ...")
    err = WorkerGroupError("rank 0 failed", {0: inner})
    try:
        raise RuntimeError("fit failed") from err
    except RuntimeError as e:
        assert _device_change(e) is inner
    assert _device_change(WorkerGroupError("oom", {0: MemoryError()})) is None


# ---- 6. attention kernels -----------------------------------------------------------------------------

def test_attention_inputs_have_the_layout_of_the_fused_kernels():
    """q, k, v reach scaled_dot_product_attention contiguous, head dim at stride 1: the layout the
    fused kernels take (the CPU's fused flash kernel checks it too), where the former strided views
    sent every call to the math kernel. The output still is softmax(q k^T / sqrt(dh)) v."""
    torch.manual_seed(0)
    att = SelfAttention(64)
    x = torch.randn(2, 64, 4, 4)
    q, k, v = att.qkv_heads(x)
    assert all(t.is_contiguous() and t.stride(-1) == 1 and t.shape == (2, 2, 16, 32) for t in (q, k, v))
    assert torch._fused_sdp_choice(q, k, v) == int(SDPBackend.FLASH_ATTENTION)
    qkv = att.qkv(att.norm(x)).reshape(2, 3, 2, 32, 16)
    strided = [qkv[:, i].transpose(-1, -2) for i in range(3)]   # the layout before issue 14
    assert torch._fused_sdp_choice(*strided) == int(SDPBackend.MATH)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(32), -1)
    torch.nn.init.normal_(att.proj.weight)                       # the residual branch starts at zero
    ref = x + att.proj((w @ v).transpose(-1, -2).reshape(2, 64, 4, 4))
    torch.testing.assert_close(att(x), ref, atol=1e-5, rtol=1e-5)


def _model(kind: str, **net):
    cfg = cpu_config("digits", f"model.kind={kind}", "model.net.channels=32", "model.net.channel_mult=[1]",
                     "model.net.zero_init_out=false", "noise.M=2", "sampler.walk=full",
                     *[f"model.net.{k}={v}" for k, v in net.items()])
    torch.manual_seed(0)
    model = build_score_model(cfg, (1, 4, 4))
    for p in model.parameters():   # no zero-initialized branch: every weight shapes the output
        torch.nn.init.normal_(p, std=0.3)
    return model


@pytest.mark.parametrize("kind, backend", [("universal", SDPBackend.FLASH_ATTENTION),
                                           ("mdae", SDPBackend.FLASH_ATTENTION), ("mem2", SDPBackend.MATH)])
def test_attention_kernel_per_model_kind(kind, backend, monkeypatch):
    """The kernel each model's attention runs on: fused for one backward, math for MEM^2."""
    real, chosen = F.scaled_dot_product_attention, []

    def spy(q, k, v, *a, **kw):
        chosen.append(torch._fused_sdp_choice(q, k, v))   # what the dispatcher picks under the active flags
        return real(q, k, v, *a, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = _model(kind)
    model.loss(torch.rand(3, 1, 4, 4), torch.Generator().manual_seed(0))
    assert chosen and set(chosen) == {int(backend)}


def test_mem2_double_backward_through_its_attention_kernel():
    """MEM^2 trains through its score psi = -grad_y f(y), itself a gradient, so the training
    gradient is a double backward. With the math kernel the derivatives of psi with respect to
    the attention's q/k/v weights (along three random directions) are the finite-difference ones
    (float64 gradcheck), and the loss backpropagates; the fused CPU kernel has no double backward
    at all, which is why MEM^2 is built with the math kernel."""
    model = _model("mem2").double()
    att = next(m for m in model.modules() if isinstance(m, SelfAttention))
    assert att.kernels == "math"
    name = next(n for n, p in model.named_parameters() if p is att.qkv.weight)
    w0 = att.qkv.weight.detach().clone()
    dirs = torch.randn(3, *w0.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = torch.randn(2, 2, 1, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    class Score(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, y):
            return self.m._score(y, create_graph=True).psi   # what MEM2.loss differentiates

    def psi(t):
        return torch.func.functional_call(Score(), {f"m.{name}": w0 + torch.einsum("i,i...->...", t, dirs)}, (y,))

    assert torch.autograd.gradcheck(psi, (torch.zeros(3, dtype=torch.float64, requires_grad=True),))
    model.loss(torch.rand(2, 1, 4, 4, dtype=torch.float64), torch.Generator().manual_seed(1)).backward()
    assert att.qkv.weight.grad is not None and att.qkv.weight.grad.abs().sum() > 0
    fused = _model("mem2")
    for m in fused.modules():
        if isinstance(m, SelfAttention):
            m.kernels = "fused"
    with pytest.raises(RuntimeError, match="derivative for .*flash_attention.* is not implemented"):
        fused.loss(torch.rand(2, 1, 4, 4), torch.Generator().manual_seed(1)).backward()


# ---- 7. memory planner and micro-batches --------------------------------------------------------------

def test_memory_plan_for_cifar_matches_the_hand_calculation():
    """A CIFAR-10-size float32 run: 4096 chains (blocks of 256) on the reduced walk, d = 3 x 32 x 32,
    2 MB of network working memory per chain, 100 MB of weights, 8 GiB free on the GPU, 4 GiB of
    host memory available, queue 8, 10 jumps per checkpoint, 80% of the free memory planned."""
    GiB, d = 1 << 30, 3 * 32 * 32
    p = plan_memory(chains=4096, block_size=256, state_numel=d, event_numel=d, noise_draws=1,
                    score_bytes=2_000_000, weights_bytes=100_000_000, device="cuda", device_free=8 * GiB,
                    host_free=4 * GiB, queue_size=8, jumps_per_checkpoint=10)
    assert p.device_budget == 6_871_947_673                     # floor(0.8 * 8589934592)
    assert p.state_bytes == 110_592                             # 4 * ((7 + 1) * 3072 + 3072)
    # (6871947673 - 1e8 - 4096 * 110592) // 2e6 = 6318962841 // 2e6 = 3159 -> whole blocks: 12 * 256
    assert p.micro_batch == 3072
    assert p.max_chains == 56_603                               # (6871947673 - 1e8 - 2e6 * 256) // 110592
    assert p.row_bytes == 12_328                                # 4 * 3072 + 40
    assert p.host_budget == 3_435_973_836                       # floor(0.8 * 4294967296)
    assert p.fixed_host_bytes == 908_918_784                    # (8 + 10) * 4096 * 12328
    assert p.gather_rows == 64_232                              # (3435973836 - 908918784) // (3 * 12328) - 4096
    assert p.host_peak_bytes == 908_918_784 + 3 * (64_232 + 4096) * 12_328 <= p.host_budget
    # the former fixed buffer: 2^18 rows of 12328 B = 3.2 GB gathered, ~10 GB at a flush
    assert MAX_GATHER_ROWS * p.row_bytes == 3_231_711_232 and GATHER_COPIES * MAX_GATHER_ROWS * p.row_bytes > 9.6e9
    # with room to spare: one network call for all chains, the gather buffer capped at 2^18 rows
    big = plan_memory(chains=4096, block_size=256, state_numel=d, event_numel=d, noise_draws=1,
                      score_bytes=2_000_000, weights_bytes=100_000_000, device="cuda", device_free=40 * GiB,
                      host_free=64 * GiB, queue_size=8, jumps_per_checkpoint=10)
    assert big.micro_batch == 4096 and big.gather_rows == MAX_GATHER_ROWS
    # checkpoint stretch: intervals of uncommitted rows (10 * 4096 * 12328 = 504,954,880 B each) that
    # fit beside the peak. p's gather buffer took the whole budget (12,300 B spare): every boundary
    # commits; 16 GiB: 1 + (13,743,895,347 - 10,755,538,944) // 504,954,880 = 6; 64 GiB: 88, capped
    assert p.checkpoint_stretch == 1 and big.checkpoint_stretch == MAX_STRETCH == 64
    mid = plan_memory(chains=4096, block_size=256, state_numel=d, event_numel=d, noise_draws=1,
                      score_bytes=2_000_000, weights_bytes=100_000_000, device="cuda", device_free=40 * GiB,
                      host_free=16 * GiB, queue_size=8, jumps_per_checkpoint=10)
    assert mid.host_peak_bytes == 908_918_784 + 3 * (MAX_GATHER_ROWS + 4096) * 12_328 == 10_755_538_944
    assert mid.checkpoint_stretch == 6
    with pytest.raises(ValueError, match="use more actors"):
        plan_memory(chains=60_000, block_size=256, state_numel=d, event_numel=d, noise_draws=1,
                    score_bytes=2_000_000, weights_bytes=100_000_000, device="cuda", device_free=8 * GiB,
                    host_free=64 * GiB, queue_size=8, jumps_per_checkpoint=10)
    assert "micro-batch 3072" in p.summary()


@pytest.mark.parametrize("kind, factor", [("universal", 1), ("mem2", 2)])
def test_measured_score_bytes_bound_the_activations(kind, factor):
    """CPU estimate per chain: every submodule output of one score evaluation, doubled for MEM^2,
    whose score runs a backward through them."""
    model = _model(kind)
    fn, y = (model.reduced_score, torch.zeros(4, 1, 4, 4)) if kind == "universal" else \
        (model.score, torch.zeros(4, 2, 1, 4, 4))
    outs = []
    hooks = [m.register_forward_hook(lambda m, i, o: outs.append(o.numel() * o.element_size()))
             for m in model.modules() if m is not model]
    with torch.no_grad():
        fn(y)
    for h in hooks:
        h.remove()
    assert measure_score_bytes(model, fn, y) == math.ceil(factor * sum(outs) / 4)


@pytest.mark.parametrize("kind", ["universal", "mem2", "gmm"])
def test_micro_batched_score_is_bitwise_one_batch(kind):
    """Micro-batches of whole blocks (1 and 2 of the 3 blocks of 16 chains) give bitwise the jumps
    and states of one network call per step, on the CPU; the micro-batch is saved with the state
    and a restored engine adopts it. (Slices much smaller than a block may round differently:
    oneDNN picks its convolution kernels by problem size; the planner cuts whole blocks.)"""
    if kind == "gmm":
        model, shape, walk = GMMOracle([0.3, 0.7], [[0.0, 1.0], [2.0, -1.0]], torch.eye(2).expand(2, 2, 2),
                                       GaussianMNM(1.0, 4)), (2,), "reduced"
    else:
        model, shape, walk = _model(kind).eval(), (1, 4, 4), "reduced" if kind == "universal" else "full"
    cfg = SamplerConfig(walk=walk, block_size=16, jump_every=3)

    def run(micro):
        eng = WalkJumpEngine(model, cfg, shape, 9, [0, 1, 2], micro_batch=micro)
        eng.initialize()
        return eng, eng.run_collect(9)

    ref_eng, ref = run(None)
    for micro in (16, 32):
        eng, jb = run(micro)
        assert all(torch.equal(a, b) for a, b in zip(jb, ref)) and torch.equal(eng.state.y, ref_eng.state.y)
    sd = eng.state_dict()
    assert sd["micro_batch"] == 32
    fresh = WalkJumpEngine(model, cfg, shape, 9, [0, 1, 2])
    fresh.load_state_dict(sd)
    assert fresh.micro_batch == 32


# ---- 8. the GMM oracle precomputes its factors ---------------------------------------------------------

def test_gmm_oracle_uses_its_precomputed_factors_to_1e12():
    """log w_k(ybar) and log p(ybar) from the factors computed once equal the per-call Cholesky of
    every component (the former code path) to 1e-12, and no factorization runs per step."""
    g = torch.Generator().manual_seed(0)
    K, d = 5, 6
    A = torch.randn(K, d, d, generator=g, dtype=torch.float64)
    covs = A @ A.transpose(1, 2) / d + 0.1 * torch.eye(d, dtype=torch.float64)
    oracle = GMMOracle(torch.full((K,), 1.0 / K, dtype=torch.float64), 2 * torch.randn(K, d, generator=g,
                       dtype=torch.float64), covs, GaussianMNM(0.8, 4))
    ybar = 3 * torch.randn(50, d, generator=g, dtype=torch.float64)
    ref = torch.stack([_mvn_logpdf(ybar, oracle.means[k], oracle.smoothed_covs[k]) for k in range(K)], -1)
    ref = ref + torch.log(oracle.weights)
    calls = []
    real = torch.linalg.cholesky
    torch.linalg.cholesky = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        got = oracle.log_responsibilities(ybar)
        lp = oracle.log_p_ybar(ybar)
        oracle.denoise(ybar)
    finally:
        torch.linalg.cholesky = real
    assert not calls
    torch.testing.assert_close(got, ref - torch.logsumexp(ref, -1, keepdim=True), atol=1e-12, rtol=0)
    torch.testing.assert_close(lp, torch.logsumexp(ref, -1), atol=1e-12, rtol=0)


# ---- the GPU suite refuses to run without CUDA ----------------------------------------------------------

def test_gpu_suite_fails_loudly_without_cuda():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests_gpu", "-q", "-p", "no:cacheprovider"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    assert lines == ["ERROR: tests_gpu needs a CUDA device (torch.cuda.is_available() is False)"], lines


def test_gpu_suite_collects_where_cuda_is_visible():
    """Its modules import and its tests are collected (a CUDA machine then runs them)."""
    code = ("import sys, torch, pytest; torch.cuda.is_available = lambda: True; "
            "sys.exit(pytest.main(['tests_gpu', '--collect-only', '-q', '-p', 'no:cacheprovider']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "tests collected" in proc.stdout and "error" not in proc.stdout.lower(), proc.stdout
