"""Mixing of the digits main job: integrated autocorrelation time per functional, and the run it implies.

Runs ``WalkJumpEngine`` in this process (no Ray) from a trained artifact, reduces every jump to the
functionals the main job's report checks -- score norm, kinetic energy, mean intensity, the data's
4 leading principal components (``pc``), 4 random projections (``proj``) and the softmax confidence
of the report's classifier (``class_conf``; its labels give the class transitions) -- and prints,
per functional:

* tau: the integrated autocorrelation time (Geyer's initial monotone sequence over the second half
  of the run), in jumps and in walk steps;
* the R-hat / bulk ESS / tail ESS the main job would report had it stopped at each ``--horizons``
  step count (burn-in = half the jumps, as ``pipeline.stage_diagnose``), read off this one run;
* the budget tau implies (docs/MIXING.md): stationary draws give R-hat^2 ~= 1 + (tau - 1) / n'
  over split halves of n' draws (Vats & Knudson 2021), so R-hat < ``--rhat`` needs
  n' >= (tau - 1) / (rhat^2 - 1) draws per half, 4 n' jumps per chain with half of them burn-in;
  ESS >= ``--min-ess`` then needs C >= min_ess * tau / (2 n') chains.

``--throughput 64,128,...`` measures the engine's chain-steps per CPU second at those batch sizes
(one thread, then ``--threads``) so the steps can be turned into seconds; CPU time, not wall time,
because the machine is shared. The last line is one JSON object.

    python bench/mixing.py --artifact runs/digits/model.pt --chains 256 --steps 3000
    python bench/mixing.py --artifact runs/digits/model.pt --set sampler.delta=1.0 --set sampler.gamma=1.0
    python bench/mixing.py --artifact runs/digits/model.pt --throughput 64,128,256,512 --steps 0
"""
from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

from mmgm_ray.config import RunConfig, from_dict, load_config, to_dict
from mmgm_ray.data import ImageDataset, load_dataset
from mmgm_ray.diagnostics import mcmc, transitions
from mmgm_ray.diagnostics.classifier import train_classifier
from mmgm_ray.diagnostics.functionals import PCABasis, random_directions
from mmgm_ray.engine import WalkJumpEngine, chain_blocks
from mmgm_ray.factory import load_artifact
from mmgm_ray.train.loop import train_local

GATED = ("score_norm", "kinetic", "mean_intensity", "pc", "proj", "class_conf")


class Functionals:
    """The per-jump scalars of the main job's report, with the report's own pieces: the principal
    components (``PCABasis``), random directions (seed 0, as ``postprocess.run_request``) and
    classifier (``diagnostics.classifier``) of ``mmgm_ray.diagnostics``, fitted on the training data."""

    def __init__(self, data: ImageDataset, data_cfg: dict, n_pcs: int = 4, n_random: int = 4, seed: int = 0):
        d = int(np.prod(data.event_shape))
        self.pca = PCABasis.fit(data, n_pcs, data_cfg)
        self.dirs = random_directions(d, n_random, seed)
        self.classifier, info = train_classifier(data)
        self.accuracy = info["accuracy"]
        self.frequencies = np.asarray(info["class_frequencies"])

    def __call__(self, jb) -> tuple[dict, np.ndarray]:
        """name -> (n,) or (n, k) float64 for one jump batch; and the class labels (n,)."""
        x = jb.xhat.reshape(len(jb.xhat), -1).double().numpy()
        with torch.no_grad():
            prob = torch.softmax(self.classifier(jb.xhat.float()), dim=1).numpy()
        vals = {"score_norm": jb.score_norm.double().numpy(), "kinetic": jb.kinetic.double().numpy(),
                "mean_intensity": x.mean(axis=1), "pc": x @ self.pca.components - self.pca.offsets,
                "proj": x @ self.dirs, "class_conf": prob.max(axis=1)}
        labels = prob.argmax(axis=1)
        vals["class_onehot"] = np.eye(prob.shape[1])[labels]  # not gated: what class frequencies converge like
        return vals, labels


def model_for(cfg: RunConfig, artifact: str | None):
    """The trained model of ``cfg``: the artifact given, else train ``cfg`` in process (resumable)."""
    if artifact is None:
        train_local(cfg, progress=True)
        artifact = f"{cfg.run_dir}/model.pt"
    model, mcfg, info = load_artifact(artifact)
    for key in ("sigma", "M"):
        if getattr(mcfg.noise, key) != getattr(cfg.noise, key):
            raise ValueError(f"noise.{key}={getattr(cfg.noise, key)} differs from the artifact's {artifact}")
    return model, info


def run_chains(model, cfg: RunConfig, event_shape, chains: int, steps: int, funcs: Functionals):
    """Run ``chains`` chains for ``steps`` walk steps in one batch; (C, J[, k]) arrays per functional,
    labels (C, J), and the CPU seconds of the walk."""
    sampler = from_dict(type(cfg.sampler), {**to_dict(cfg.sampler), "block_size": chains})
    eng = WalkJumpEngine(model, sampler, event_shape, cfg.seed, chain_blocks(chains, chains), num_chains=chains)
    eng.initialize()
    cols: dict[str, list] = {}
    labels = []
    cpu = 0.0
    it = eng.run(steps)
    while True:
        t0 = time.process_time()
        jb = next(it, None)
        cpu += time.process_time() - t0
        if jb is None:
            break
        if len(jb.chain_id) != chains:
            raise RuntimeError(f"{chains - len(jb.chain_id)} chains diverged: pick a stable step size")
        vals, lab = funcs(jb)
        for k, v in vals.items():
            cols.setdefault(k, []).append(v)
        labels.append(lab)
    return {k: np.stack(v, axis=1) for k, v in cols.items()}, np.stack(labels, axis=1), cpu


def _worst(v, fn):
    return float(fn(np.atleast_1d(v)))


def horizon(arrays: dict, labels: np.ndarray, n_jumps: int, freq: np.ndarray) -> dict:
    """What the main job reports after ``n_jumps`` jumps (window: the second half)."""
    lo = n_jumps // 2
    out = {"steps_jumps": n_jumps, "draws": n_jumps - lo, "stats": {}}
    for name, a in arrays.items():
        s = mcmc.summarize(a[:, lo:n_jumps])
        out["stats"][name] = {"rhat": _worst(s["rhat"], np.max), "ess_bulk": _worst(s["ess_bulk"], np.min),
                              "ess_tail": _worst(s["ess_tail"], np.min)}
    gated = [out["stats"][g] for g in GATED]
    out["max_rhat"] = max(e["rhat"] for e in gated)
    out["min_ess"] = min(min(e["ess_bulk"], e["ess_tail"]) for e in gated)
    tr = transitions.transition_report(labels[:, lo:n_jumps], len(freq), freq)
    out["classes"] = {k: tr[k] for k in ("switch_rate", "dwell_mean", "tv")}
    return out


def budget(tau_jumps: float, jump_every: int, rhat: float, min_ess: float, min_chains: int) -> dict:
    """Chains x steps that tau implies (module docstring): split halves of n' >= (tau-1)/(rhat^2-1)
    draws, 4 n' jumps per chain (half burn-in), C >= max(min_chains, min_ess tau / (2 n'))."""
    half = max(2.0, (tau_jumps - 1.0) / (rhat * rhat - 1.0))
    steps = int(math.ceil(4 * half)) * jump_every
    chains = max(min_chains, int(math.ceil(min_ess * tau_jumps / (2 * half))))
    return {"tau_jumps": tau_jumps, "tau_steps": tau_jumps * jump_every, "steps": steps, "chains": chains,
            "chain_steps": steps * chains}


def throughput(model, cfg: RunConfig, event_shape, sizes, threads: int, steps: int = 40) -> dict:
    """Chain-steps per CPU second of the engine at each batch size, one thread and ``threads``."""
    out = {}
    for t in sorted({1, threads}):
        torch.set_num_threads(t)
        for n in sizes:
            sampler = from_dict(type(cfg.sampler), {**to_dict(cfg.sampler), "block_size": n})
            eng = WalkJumpEngine(model, sampler, event_shape, cfg.seed, [0], num_chains=n)
            eng.initialize()
            for _ in eng.run(cfg.sampler.jump_every):  # warm-up: allocator, kernels
                pass
            c0, w0 = time.process_time(), time.perf_counter()
            for _ in eng.run(steps):
                pass
            cpu, wall = time.process_time() - c0, time.perf_counter() - w0
            out[f"{t}x{n}"] = {"threads": t, "batch": n, "chain_steps_per_cpu_s": n * steps / cpu,
                               "chain_steps_per_wall_s": n * steps / wall}
            print(f"throughput: {t} thread(s), batch {n:5d}: {n * steps / cpu:8.0f} chain-steps per CPU s, "
                  f"{n * steps / wall:8.0f} per wall s", flush=True)
    torch.set_num_threads(1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="digits")
    ap.add_argument("--set", action="append", default=[], help="config override, e.g. sampler.delta=1.0")
    ap.add_argument("--artifact", default=None, help="trained model.pt (default: train the config in process)")
    ap.add_argument("--chains", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--horizons", default="1000,2000,3000", help="walk-step counts to report R-hat/ESS at")
    ap.add_argument("--rhat", type=float, default=1.05)
    ap.add_argument("--min-ess", type=float, default=400.0)
    ap.add_argument("--throughput", default="", help="batch sizes to time, e.g. 64,128,256")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config, args.set)
    model, info = model_for(cfg, args.artifact)
    event_shape = info["event_shape"]
    data = load_dataset(cfg.data)
    result = {"config": args.config, "set": args.set, "model_hash": info["model_hash"], "chains": args.chains,
              "steps": args.steps, "sampler": to_dict(cfg.sampler)}
    if args.throughput:
        result["throughput"] = throughput(model, cfg, event_shape, [int(s) for s in args.throughput.split(",")],
                                          args.threads)
    if args.steps:
        result.update(mixing(model, cfg, event_shape, data, args))
    print(json.dumps(result))


def mixing(model, cfg: RunConfig, event_shape, data: ImageDataset, args) -> dict:
    """Run the chains, print tau and the implied budget per functional and R-hat per horizon."""
    funcs = Functionals(data, to_dict(cfg.data))
    print(f"classifier held-out accuracy {funcs.accuracy:.3f}", flush=True)
    w0 = time.perf_counter()
    arrays, labels, cpu = run_chains(model, cfg, event_shape, args.chains, args.steps, funcs)
    je = cfg.sampler.jump_every
    n = arrays["score_norm"].shape[1]
    print(f"{args.chains} chains x {args.steps} steps: {args.chains * args.steps / cpu:.0f} chain-steps per CPU s "
          f"({time.perf_counter() - w0:.0f} s wall)", flush=True)
    taus, budgets = {}, {}
    for name, a in arrays.items():
        tau = np.atleast_1d(mcmc.integrated_autocorr_time(a[:, n // 2:]))
        taus[name] = tau.tolist()
        budgets[name] = budget(float(tau.max()), je, args.rhat, args.min_ess, cfg.evaluate.fid_samples)
        print(f"  {name:15s} tau (jumps) {' '.join(f'{t:6.2f}' for t in tau)} -> {budgets[name]['chains']} chains "
              f"x {budgets[name]['steps']} steps", flush=True)
    horizons = []
    for s in (int(h) for h in args.horizons.split(",")):
        if s // je <= n and s // je >= 8:
            h = horizon(arrays, labels, s // je, funcs.frequencies)
            horizons.append({"steps": s, **h})
            worst = ", ".join(f"{k} {e['rhat']:.3f}" for k, e in h["stats"].items())
            print(f"  at {s} steps: max R-hat {h['max_rhat']:.4f}, min ESS {h['min_ess']:.0f} ({worst}); classes "
                  f"switch {h['classes']['switch_rate']:.3f}, dwell {h['classes']['dwell_mean']:.2f}, "
                  f"TV {h['classes']['tv']:.3f}", flush=True)
    need = max((budgets[g] for g in GATED), key=lambda b: b["chain_steps"])
    print(f"slowest gated functional: tau {need['tau_steps']:.0f} walk steps -> at least {need['chains']} chains x "
          f"{need['steps']} steps", flush=True)
    return {"classifier_accuracy": funcs.accuracy, "chain_steps_per_cpu_s": args.chains * args.steps / cpu,
            "tau_jumps": taus, "budget": budgets, "implied": need, "horizons": horizons}


if __name__ == "__main__":
    main()
