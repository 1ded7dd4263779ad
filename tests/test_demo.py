"""``mmgm demo``: in-process training on the 8x8 digits, walk-jump samples as a PNG grid."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmgm_ray.cli import main as mmgm_main
from mmgm_ray.demo import DEMO_CHAINS, run_demo
from mmgm_ray.factory import load_artifact
from mmgm_ray.images import grid_size, save_grid
from pinned import CPU_PINS, cpu_config, cpu_sets


pytestmark = pytest.mark.usefixtures("one_thread")


def test_save_grid_layout(tmp_path):
    x = torch.rand(10, 3, 4, 5)
    p = save_grid(x, str(tmp_path / "g.png"), nrow=4, padding=1, scale=2)
    img = Image.open(p)
    assert img.size == grid_size(10, (4, 5), nrow=4, padding=1, scale=2) == (4 * 11 + 1, 3 * 9 + 1)
    assert img.mode == "RGB"
    a = np.asarray(img)
    # first tile, first pixel (enlarged 2x2) holds x[0, :, 0, 0]
    np.testing.assert_allclose(a[1, 1] / 255.0, x[0, :, 0, 0].numpy(), atol=1 / 255)
    assert (a[0] == 255).all()  # padding row
    # vectors (N, d) with square d become 1-channel square images
    q = save_grid(torch.rand(3, 16), str(tmp_path / "v.png"), nrow=3)
    assert Image.open(q).size == (3 * 5 + 1, 4 + 2) and Image.open(q).mode == "L"
    with pytest.raises(ValueError):
        save_grid(torch.rand(2, 2, 4, 4), str(tmp_path / "bad.png"))


def test_demo_cli_outputs(tmp_path, capsys):
    """A short demo through the CLI: grid of the expected size, artifact, config, metrics."""
    out = tmp_path / "demo"
    assert mmgm_main(["demo", "--out", str(out), *cpu_sets("train.steps=30", "train.log_every=10")]) == 0
    img = Image.open(out / "samples.png")
    assert img.size == grid_size(DEMO_CHAINS, (8, 8), nrow=8, padding=1, scale=4) == (265, 265)
    assert img.mode == "L"
    model, cfg, info = load_artifact(str(out / "model.pt"))
    assert info["event_shape"] == (1, 8, 8) and info["extra"]["step"] == 30
    assert cfg.train.steps == 30 and cfg.data.name == "digits"
    assert cpu_config(str(out / "config.yaml")).train.steps == 30
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30]
    with torch.no_grad():  # the artifact is a working denoiser
        y = torch.rand(4, 1, 8, 8)
        assert model.denoise(y).shape == (4, 1, 8, 8)


def _nn_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance from each row of a to its nearest row of b."""
    d2 = (a ** 2).sum(1)[:, None] + (b ** 2).sum(1)[None] - 2 * a @ b.T
    return np.sqrt(np.maximum(d2, 0)).min(1)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_full_demo_gives_digit_like_samples(tmp_path):
    """The default demo (about 2 minutes on 2 cores) gives samples that look like digits.

    Measure: a sample is "digit-like" if its distance to the nearest of the first 1,500 real digits
    is within the 95th percentile of the same distance for the 297 held-out real digits. Held-out
    digits pass at 95% by construction; uniform noise and blurry averages pass at ~0%. We ask 40%
    of the samples to pass, and that they are not copies of training digits (min distance > 0.5).
    """
    from mmgm_ray.data import load_digits

    res = run_demo(str(tmp_path / "demo"), overrides=list(CPU_PINS), progress=False)
    x = load_digits().x.reshape(-1, 64).numpy()
    ref, held = x[:1500], x[1500:]
    thr = np.quantile(_nn_dist(held, ref), 0.95)
    s = res["x"].reshape(-1, 64).clamp(0, 1).numpy()
    d = _nn_dist(s, ref)
    noise = np.random.default_rng(0).uniform(0, 1, (64, 64))
    assert (_nn_dist(noise, ref) <= thr).mean() < 0.05  # the measure discriminates
    frac = (d <= thr).mean()
    assert frac >= 0.4, (frac, np.median(d), thr)
    assert np.median(d) > 0.5  # not memorized copies
    assert Image.open(res["samples"]).size == (265, 265)
