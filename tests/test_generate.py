"""``mmgm generate``'s data set writer (mmgm_ray.postprocess.generate): Ray Data writes exactly the rows
(and bytes) of the previous in-process selection, reads only committed parts, and refuses bad targets
before anything runs."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from image_stores import add_uncommitted_part, image_run
from mmgm_ray.config import DataConfig, RunConfig, from_dict
from mmgm_ray.data import ImageDataset, load_dataset, write_parquet_dataset
from mmgm_ray.pool import generate_dataset
from mmgm_ray.postprocess import open_committed
from mmgm_ray.postprocess.generate import first_rows, write_generated
from mmgm_ray.store import read_samples

JUMP = 2


def old_selection(url: str, n: int, burn_in: int, thin: int, sample_dtype: str):
    """The selection ``generate_dataset`` made in the driver before Ray Data wrote it (all kept rows
    loaded, then ordered): steps after burn_in, every thin-th jump, the first n in (step, chain) order."""
    x, meta = read_samples(url, min_step=burn_in + 1)
    steps, chains = meta.column("step").to_numpy(), meta.column("chain_id").to_numpy()
    rel = (steps - burn_in) // JUMP
    ok = np.flatnonzero((steps > burn_in) & (rel % thin == 0))
    idx = ok[np.lexsort((chains[ok], steps[ok]))][:n]
    xs = np.clip(x[idx], 0.0, 1.0) if sample_dtype == "uint8" else x[idx]
    return xs, steps[idx], chains[idx]


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("store_dtype,out_dtype", [("uint8", "uint8"), ("float32", "float16"), ("float32", "uint8")])
def test_ray_writes_the_old_selection_byte_for_byte(ray_session, tmp_path, store_dtype, out_dtype):
    """Cases: a cut inside a step (n = 25 of 10 chains), thinning with burn-in, more samples asked than
    kept (short), on a store with a chain that diverged; an uncommitted part on storage is ignored."""
    url = image_run(tmp_path, chains=10, jumps=8, dtype=store_dtype, jump_every=JUMP)
    cases = [(25, 2, 1), (17, 4, 2), (100, 0, 1)]
    want = {c: old_selection(url, *c, out_dtype) for c in cases}
    kept = {c: len(old_selection(url, 10 ** 6, *c[1:], out_dtype)[0]) for c in cases}
    assert kept[(100, 0, 1)] == 10 * 8 - 4  # every jump but chain 3's last four: fewer than asked
    add_uncommitted_part(url)
    for (n, burn_in, thin), (xs, steps, chains) in want.items():
        out = tmp_path / f"out-{n}-{burn_in}-{thin}"
        res = write_generated(url, str(out), n, burn_in, thin, JUMP, sample_dtype=out_dtype, name="g")
        assert res["written"] == len(xs) == min(n, kept[(n, burn_in, thin)])
        got = pq.read_table(out).sort_by([("step", "ascending"), ("chain_id", "ascending")])
        assert got["step"].to_numpy().tolist() == steps.tolist()
        assert got["chain_id"].to_numpy().tolist() == chains.tolist()
        old = write_parquet_dataset(ImageDataset("g", torch.from_numpy(xs), None, (1, 4, 4), url), str(tmp_path / "old"),
                                    sample_dtype=out_dtype)
        assert got["sample"].combine_chunks().equals(pq.read_table(old)["sample"].combine_chunks())  # same bytes
        ds, ref = (load_dataset(DataConfig(name="parquet", path=p)) for p in (str(out), old))
        assert ds.event_shape == (1, 4, 4) and torch.equal(ds.x, ref.x)  # loaded in (step, chain) order
        assert pq.read_schema(next(out.glob("*.parquet"))).metadata[b"mmgm.sample_dtype"] == out_dtype.encode()
    assert res["files"] >= 2  # several read tasks wrote parts


def test_first_rows_and_refusals(tmp_path):
    """The PNG/grid rows are the first k of the selection, read in this process; a non-empty --out is
    refused before the pool runs (no run folder appears)."""
    url = image_run(tmp_path, chains=10, jumps=8, jump_every=JUMP)
    xs, _, _ = old_selection(url, 13, 2, 2, "float32")
    np.testing.assert_array_equal(first_rows(open_committed(url), 13, 2, 2, JUMP), xs)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x.parquet").write_bytes(b"")
    cfg = from_dict(RunConfig, {"name": "gen", "output": str(tmp_path / "runs"), "oracle": {"kind": "gmm"},
                                "data": {"name": "gmm"}, "pool": {"num_chains": 4}})
    with pytest.raises(ValueError, match="already exists and is not an empty folder"):
        generate_dataset(cfg, str(tmp_path / "taken"), num_samples=4, progress=False)
    assert not (tmp_path / "runs").exists()


@pytest.mark.ray
def test_nothing_kept_is_one_line_and_writes_nothing(ray_session, tmp_path):
    url = image_run(tmp_path, chains=4, jumps=2, jump_every=JUMP)
    with pytest.raises(ValueError, match="no sample survived burn-in/thinning"):
        write_generated(url, str(tmp_path / "out"), 4, 4, 1, JUMP)
    assert not (tmp_path / "out").exists()
