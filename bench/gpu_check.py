"""One table of the sampler's speed on one device: matmul rate, the network, the engine, the pool.

Rows, measured in one process (``bench/gpu_check.sh`` runs this under a time limit):

1. ``matmul``: bf16 n x n x n products (the device's practical peak; n = 8192 on CUDA);
2. ``forward fp32 eager``: the project's U-Net at CIFAR-10 size (``cifar10_ussf``'s network, 3x32x32,
   random weights) in float32, eager, batch 64;
3. ``forward fast path``: the same network through ``mmgm_ray.fastpath`` with ``sampler.fast=on``
   (bf16 where native, channels_last on CUDA, compiled, CUDA graphs on CUDA) at the micro-batch it
   measures (the "auto batch");
4. ``engine reduced walk``: ``WalkJumpEngine`` with those options, 2 micro-batches of chains;
5. ``pool, 1 actor, uint8``: the Ray chain pool, one actor (one GPU), streaming jumps to a Parquet
   store as uint8 (steady rate, actor start-up and compilation excluded). Skipped in one line when
   Ray cannot be imported at all (a GPU image without Ray: docs/GPU.md, "The speed table").

Columns: rate (images or chain-steps per second), TFLOP/s (network FLOPs counted by
``torch.utils.flop_counter`` on one forward), fraction of the matmul rate, and the row's ratio to
the row it builds on (fast / eager, engine / forward fast, pool / engine). The last line is one
JSON object. ``--quick`` shrinks the network and the sizes and does not compile (Inductor takes
minutes on a small CPU), so the whole table runs on a CPU in a minute or two, one thread
(tests/test_bench.py runs ``--device cpu --quick``); compilation is tested in tests/test_fastpath.py.

    python bench/gpu_check.py [--device cuda|cpu] [--quick] [--min-time-s 2] [--json PATH]

Stopped by SIGINT (the time limit of ``bench/gpu_check.sh``), it prints the rows measured so far.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402 - after the path: the repository's mmgm_ray, not an installed one
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from mmgm_ray import fastpath  # noqa: E402
from mmgm_ray.config import RunConfig, SamplerConfig, from_dict, load_config, to_dict  # noqa: E402
from mmgm_ray.engine import WalkJumpEngine  # noqa: E402
from mmgm_ray.factory import build_score_model, save_artifact  # noqa: E402

EVENT = (3, 32, 32)


def sizes(device: torch.device, quick: bool) -> dict:
    """Problem sizes: full on CUDA, scaled down for a CPU and for ``--quick``."""
    if quick:
        return {"matmul_n": 256, "eager_batch": 8, "max_micro_batch": 32, "pool_chains": 32, "pool_steps": 40,
                "net": {"channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [16]}}
    big = device.type == "cuda"
    return {"matmul_n": 8192 if big else 2048, "eager_batch": 64, "max_micro_batch": 4096 if big else 256,
            "pool_chains": 2048 if big else 256, "pool_steps": 200 if big else 40, "net": None}


def run_config(net: dict | None) -> RunConfig:
    """The CIFAR-10 USSF config with its network (or ``net``'s smaller one for --quick)."""
    cfg = load_config("cifar10_ussf", ["data.name=digits", "data.path=null"])
    for key, value in (net or {}).items():
        setattr(cfg.model.net, key, value)
    cfg.model.net.zero_init_out = False   # random weights everywhere: a zero output layer makes no work
    return cfg


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(fn, items: int, device: torch.device, min_time_s: float) -> float:
    """items / second of ``fn()`` after one warm-up call, timed over >= ``min_time_s``."""
    fn()
    sync(device)
    calls, t0 = 0, time.perf_counter()
    while calls == 0 or time.perf_counter() - t0 < min_time_s:
        fn()
        calls += 1
    sync(device)
    return items * calls / (time.perf_counter() - t0)


def matmul_tflops(n: int, device: torch.device, min_time_s: float) -> float:
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=gen).to(torch.bfloat16)
    b = torch.randn(n, n, device=device, generator=gen).to(torch.bfloat16)
    return rate(lambda: a @ b, 2 * n ** 3, device, min_time_s) / 1e12


def flops_per_image(model, device: torch.device) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.reduced_score(torch.zeros(1, *EVENT, device=device))
    return counter.get_total_flops()


def pool_rate(cfg: RunConfig, model, fast: fastpath.FastOptions, device: torch.device, n: dict) -> float:
    """Steady chain-steps/s of a one-actor pool writing uint8 jumps (Ray from the environment)."""
    import ray   # optional here: the GPU image gets Ray from a bundle on PYTHONPATH (docs/GPU.md)

    from mmgm_ray.pool import run_pool
    out = tempfile.mkdtemp(prefix="mmgm-gpu-check-")
    save_artifact(f"{out}/model.pt", model, cfg, EVENT)
    chains, steps = n["pool_chains"], n["pool_steps"]
    run = from_dict(RunConfig, {**to_dict(cfg), "name": "pool", "output": out, "model_path": f"{out}/model.pt",
                                "sampler": {**to_dict(cfg.sampler), "fast": "on", "autocast": fast.autocast,
                                            "compile": "on" if fast.compile else "off",
                                            "block_size": min(256, chains)},
                                "store": {"sample_dtype": "uint8"},
                                "pool": {"num_chains": chains, "micro_batch": fast.micro_batch, "num_steps": steps, "num_actors": 1,
                                         "checkpoint_every": steps // 4, "cpus_per_actor": 1.0,
                                         "gpus_per_actor": 1.0 if device.type == "cuda" else 0.0,
                                         "device": device.type}})
    # address="local": a cluster of its own, never one found through $RAY_TMPDIR
    ray.init(address="local", num_cpus=2, num_gpus=1 if device.type == "cuda" else 0, include_dashboard=False,
             log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}})
    try:
        return float(run_pool(run, progress=False)["chain_steps_per_s"])
    finally:
        ray.shutdown()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small network and sizes (CPU smoke run of the table)")
    ap.add_argument("--min-time-s", type=float, default=None, help="time per measurement (default 2, quick 0.2)")
    ap.add_argument("--json", default=None, help="also write the result (the last line) to this file")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.quick:
        torch.set_num_threads(1)   # a shared small CPU: one thread is the robust choice
    t_start = time.perf_counter()
    n = sizes(device, args.quick)
    min_t = args.min_time_s or (0.2 if args.quick else 2.0)
    cfg = run_config(n["net"])
    torch.manual_seed(0)
    model = build_score_model(cfg, EVENT).to(device).eval().requires_grad_(False)
    flops = flops_per_image(model, device)
    rows, res = [], {"device": str(device), "quick": args.quick, "flops_per_image": flops}

    def row(name, setting, fn, unit, base=None, per_forward=True):
        """Run one measurement; a failure becomes the row's text, never the end of the table."""
        t = time.perf_counter()
        log(f"{name}: {setting}")
        try:
            value = fn()
        except Exception as e:  # noqa: BLE001 - reported in the table
            traceback.print_exc()
            rows.append((name, setting, f"error: {type(e).__name__}: {str(e).splitlines()[0][:60]}", "", "", ""))
            return None
        tflops = value * flops / 1e12 if per_forward else None
        frac = tflops / res["matmul_tflops"] if tflops is not None and res.get("matmul_tflops") else None
        ratio = value / base if base else None
        res[name] = {"rate": value, "unit": unit, "setting": setting, "tflops": tflops, "fraction_of_matmul": frac,
                     "ratio": ratio, "seconds": round(time.perf_counter() - t, 1)}
        rows.append((name, setting, f"{value:,.0f} {unit}", "" if tflops is None else f"{tflops:.1f}",
                     "" if frac is None else f"{100 * frac:.1f}%", "" if ratio is None else f"{ratio:.2f}x"))
        return value

    try:
        measure(row, res, rows, model, cfg, n, device, min_t, args.quick)
    except KeyboardInterrupt:   # the time limit of gpu_check.sh (SIGINT): report what was measured
        rows.append(("interrupted", f"time limit reached after {time.perf_counter() - t_start:.0f} s", "", "", "", ""))
        res["interrupted"] = True
    res["wall_s"] = round(time.perf_counter() - t_start, 1)
    print_table(rows, device, flops, res)
    line = json.dumps(res)
    if args.json:
        with open(args.json, "w") as f:
            f.write(line + "\n")
    print(line)
    return 0


def measure(row, res: dict, rows: list, model, cfg: RunConfig, n: dict, device: torch.device, min_t: float,
            quick: bool) -> None:
    """The table's rows, in order; ``row`` (from ``main``) measures and records one."""
    res["matmul_tflops"] = row("matmul", f"bf16 {n['matmul_n']}^3", lambda: matmul_tflops(n["matmul_n"], device, min_t),
                               "TFLOP/s", per_forward=False)
    eager_b = n["eager_batch"]
    x = torch.rand(eager_b, *EVENT, device=device)
    with torch.no_grad():
        eager = row("forward_fp32_eager", f"fp32 eager, batch {eager_b}",
                    lambda: rate(lambda: model.reduced_score(x), eager_b, device, min_t), "images/s")
    sampler = from_dict(SamplerConfig, {**to_dict(cfg.sampler), "fast": "on", "compile": "off" if quick else "on"})
    fast = fastpath.resolve_options(sampler, model, device, EVENT, n["max_micro_batch"], 10 ** 9,
                                    max_micro_batch=n["max_micro_batch"])
    t = time.perf_counter()
    log(f"compiling the score with {fast}")
    score = fastpath.FastScore(fastpath.score_function(model, "reduced"), fast, device, EVENT)   # compiles
    res["compile_s"], fast = round(time.perf_counter() - t, 1), score.options
    res["fast_options"] = fast.as_dict()
    mb = fast.micro_batch
    y = torch.rand(mb, *EVENT, device=device)
    with torch.no_grad():
        bare = row("forward_fast", f"{fast.autocast}{' nhwc' if fast.channels_last else ''}"
                   f"{' compiled' if fast.compile else ''}{' graphs' if fast.cuda_graphs else ''}, batch {mb}",
                   lambda: rate(lambda: score(y), mb, device, min_t), "images/s", base=eager)
    scfg = from_dict(SamplerConfig, {**to_dict(sampler), "block_size": mb})
    engine = WalkJumpEngine(model, scfg, EVENT, 0, [0, 1], device, fast=fast)
    engine.initialize()
    walk = row("engine_reduced_walk", f"2 x {mb} chains, jumps every {scfg.jump_every}",
               lambda: rate(lambda: engine.step_once(), 2 * mb, device, min_t), "chain-steps/s", base=bare)
    if importlib.util.find_spec("ray") is not None:   # absent Ray is a skipped row, a failing pool an error
        row("pool_1_actor_uint8", f"{n['pool_chains']} chains x {n['pool_steps']} steps, Parquet uint8",
            lambda: pool_rate(cfg, model, fast, device, n), "chain-steps/s", base=walk)
    else:
        rows.append(("pool_1_actor_uint8", "skipped: Ray is not importable here (docs/GPU.md, The speed table)",
                     "", "", "", ""))
        res["pool_1_actor_uint8"] = "skipped: no Ray"


def log(msg: str) -> None:
    """Progress on stderr (the table goes to stdout)."""
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def print_table(rows: list[tuple], device: torch.device, flops: int, res: dict) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\ngpu_check on {name} ({device}), torch {torch.__version__}, {flops / 1e9:.2f} GFLOP per image forward, "
          f"compile {res.get('compile_s')} s, total {res['wall_s']} s")
    head = ("row", "setting", "rate", "TFLOP/s", "of matmul", "ratio")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    print("ratios: forward_fast / forward_fp32_eager; engine / forward_fast; pool / engine")


if __name__ == "__main__":
    sys.exit(main())
