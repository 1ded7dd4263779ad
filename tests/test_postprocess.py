"""Post-processing read path: the committed view, in this process and through Ray Data."""
from __future__ import annotations

import glob
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from ray.data.expressions import col, lit

from mmgm_ray.engine import chain_blocks
from mmgm_ray.pool import ChainActor
from mmgm_ray.postprocess import decode_samples, open_committed
from mmgm_ray.store import create_run, read_samples, sync_manifest_from_checkpoints
from pinned import cpu_dict

CHAINS, STEPS, JUMP, CKPT = 96, 40, 5, 20


def small_run(root, name: str = "run") -> str:
    """A finished 2-d GMM oracle run (2 blocks), written by an in-process chain actor."""
    cfg = cpu_dict({
        "name": name, "output": str(root), "seed": 5, "noise": {"sigma": 1.0, "M": 4},
        "oracle": {"kind": "gmm"}, "data": {"name": "gmm"}, "sampler": {"block_size": 48, "jump_every": JUMP},
        "store": {"rows_per_file": 100, "sample_dtype": "float32"},
        "pool": {"num_chains": CHAINS, "num_steps": STEPS, "checkpoint_every": CKPT}})
    store = create_run(str(root), name, event_shape=(2,), config=cfg)
    blocks = chain_blocks(CHAINS, 48)
    actor = ChainActor(cfg, str(root), name, blocks)
    while not actor.advance(CKPT)["done"]:
        pass
    actor.close()
    sync_manifest_from_checkpoints(store, blocks)
    return store.url


def _add_uncommitted_part(url: str) -> None:
    """A part a block wrote after its last checkpoint: on storage, not in the manifest."""
    src = sorted(glob.glob(f"{url}/samples/block=000000/part-*.parquet"))[0]
    pq.write_table(pq.read_table(src), f"{url}/samples/block=000000/part-000999.parquet")


def test_committed_view_in_process_reads_exactly_the_committed_rows(tmp_path):
    url = small_run(tmp_path)
    want, meta = read_samples(url)
    _add_uncommitted_part(url)
    view = open_committed(url)
    assert view.num_rows == CHAINS * STEPS // JUMP and all("part-000999" not in f for f in view.files)
    got = [(b.column("chain_id").to_numpy(), b.column("step").to_numpy(), decode_samples(b, view.info))
           for b in view.batches(["chain_id", "step", "sample"], filter=pc.field("diverged") == False)]  # noqa: E712
    chain = np.concatenate([g[0] for g in got])
    step = np.concatenate([g[1] for g in got])
    x = np.concatenate([g[2] for g in got])
    order = np.lexsort((step, chain))
    assert len(chain) == view.num_rows
    ref = np.lexsort((meta.column("step").to_numpy(), meta.column("chain_id").to_numpy()))
    np.testing.assert_array_equal(x[order], want[ref])


@pytest.mark.ray
def test_ray_dataset_equals_in_process_rows(ray_session, tmp_path):
    url = small_run(tmp_path)
    _add_uncommitted_part(url)
    view = open_committed(url)
    cols = ["chain_id", "step", "score_norm"]
    local = pa.Table.from_batches(list(view.batches(cols, filter=pc.field("step") > 10)))
    remote = view.ray_dataset(cols, filter=col("step") > lit(10)).to_arrow_refs()
    remote = pa.concat_tables(ray_session.get(remote))
    key = [("chain_id", "ascending"), ("step", "ascending")]
    assert remote.num_rows == local.num_rows > 0
    assert remote.select(cols).sort_by(key).equals(local.sort_by(key))
    # the samples survive the trip as fixed-size lists and decode the same way
    batch = next(iter(view.ray_dataset(["sample"]).iter_batches(batch_size=16, batch_format="numpy")))
    assert decode_samples(batch, view.info).shape == (16, 2)


def test_bad_runs_give_one_line(tmp_path):
    with pytest.raises(ValueError, match="no run manifest"):
        open_committed(str(tmp_path / "nothing"))
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "manifest.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="garbage/manifest.json is not valid JSON"):
        open_committed(str(tmp_path / "garbage"))
    (tmp_path / "garbage" / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="garbage/manifest.json is not an mmgm run manifest"):
        open_committed(str(tmp_path / "garbage"))
    url = small_run(tmp_path, "partial")
    man = json.loads((tmp_path / "partial" / "manifest.json").read_text())
    del man["event_shape"]
    (tmp_path / "partial" / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ValueError, match=r"lacks \['event_shape'\]"):
        open_committed(url)
    store = create_run(str(tmp_path), "empty", event_shape=(2,))
    with pytest.raises(ValueError, match="no committed rows yet"):
        open_committed(store.url)
