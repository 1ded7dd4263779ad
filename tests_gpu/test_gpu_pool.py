"""The chain pool on CUDA: resumed runs equal uninterrupted ones; the pinned copies land intact."""
from __future__ import annotations

import numpy as np

from mmgm_ray.engine import WalkJumpEngine, chain_blocks
from mmgm_ray.factory import load_sampling_model
from mmgm_ray.store import create_run, load_manifest, read_samples, sync_manifest_from_checkpoints
from gpu_runs import gmm_run


def _sorted_rows(url):
    x, meta = read_samples(url)
    order = np.lexsort((meta.column("step").to_numpy(), meta.column("chain_id").to_numpy()))
    return x[order], meta.take(order).drop(["run_id"])


def test_pool_on_cuda_resumes_bitwise(ray_gpu, tmp_path):
    """Two actors share the GPU (0.5 each). A run stopped after its first chunk and resumed writes
    bitwise the rows of an uninterrupted run; the manifest records the GPU and the memory plans."""
    from mmgm_ray.pool import run_pool

    ref = run_pool(gmm_run(tmp_path, "ref"), progress=False)

    def stop_after_first_chunk(driver):
        if driver.chunks_done >= 1:
            raise KeyboardInterrupt

    cut = run_pool(gmm_run(tmp_path, "cut"), progress=False, on_progress=stop_after_first_chunk)
    assert cut["status"] == "interrupted"
    done = run_pool(gmm_run(tmp_path, "cut"), resume=True, progress=False)
    assert done["status"] == ref["status"] == "done"
    (x_ref, m_ref), (x_cut, m_cut) = _sorted_rows(ref["url"]), _sorted_rows(done["url"])
    assert len(x_ref) == 512 * 60 // 5 and x_cut.tobytes() == x_ref.tobytes() and m_cut.equals(m_ref)
    man = load_manifest(done["url"])
    assert man["hardware"]["device_type"] == "cuda" and man["hardware"]["device_class"].startswith("cuda/")
    assert man["hardware"]["actors"]["0"]["precision"]["tf32_matmul"] is False
    assert {p["device"] for p in man["memory_plans"].values()} == {"cuda"}


def test_pinned_copies_write_the_engines_rows(tmp_path):
    """An in-process actor on the GPU (pinned buffers, non_blocking copies, events) writes bitwise
    the jumps a bare CUDA engine of the same blocks computes."""
    from mmgm_ray.pool import ChainActor

    cfg = gmm_run(tmp_path, "pin", gpus_per_actor=1)
    blocks = chain_blocks(cfg.pool.num_chains, cfg.sampler.block_size)
    store = create_run(str(tmp_path), "pin", event_shape=(2,), config=cfg)
    actor = ChainActor(cfg, str(tmp_path), "pin", blocks)
    while not actor.advance(20)["done"]:
        pass
    actor.close()
    sync_manifest_from_checkpoints(store, blocks)   # the driver's part: commit what the blocks checkpointed
    model, shape, _ = load_sampling_model(cfg, "cuda")
    eng = WalkJumpEngine(model, cfg.sampler, shape, cfg.seed, blocks, "cuda", micro_batch=actor.engine.micro_batch)
    eng.initialize()
    jb = eng.run_collect(cfg.pool.num_steps)
    order = np.lexsort((jb.step.cpu().numpy(), jb.chain_id.cpu().numpy()))
    x, _ = _sorted_rows(store.url)
    assert x.tobytes() == jb.xhat.cpu().numpy()[order].tobytes()
    assert actor.hardware["device_type"] == "cuda"
