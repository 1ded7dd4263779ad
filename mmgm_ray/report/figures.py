"""The report's figures as PNG bytes (matplotlib's Agg canvas, no pyplot, no global state).

Each function takes arrays and returns the encoded PNG; the numbers drawn come from
:mod:`mmgm_ray.diagnostics` (autocorrelation) or from the caller (R-hat, ESS, FID), never
recomputed here.
"""
from __future__ import annotations

import functools
import io
import math
from typing import Mapping, Optional, Sequence

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, MaxNLocator
from PIL import Image
from scipy.stats import rankdata

from mmgm_ray.diagnostics import mcmc
from mmgm_ray.images import make_grid

__all__ = ["grid_png", "filmstrip_png", "trace_rank_png", "autocorr_png", "diagnostics_hist_png",
           "transition_png", "class_frequency_png", "fid_png", "loss_png"]

_DPI = 110
_STYLE = {"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "axes.spines.top": False,
          "axes.spines.right": False, "legend.frameon": False, "legend.fontsize": 8,
          "axes.prop_cycle": matplotlib.cycler(color=["#2563eb", "#ea580c", "#16a34a", "#9333ea",
                                                      "#dc2626", "#0891b2", "#ca8a04", "#db2777"])}
_ALERT = "#dc2626"
_MUTED = "#6b7280"
# a grid tile is enlarged (nearest neighbour) to about this many pixels so 8x8 digits are legible
_TILE_PX = 56
_GRID_COLUMNS = 12
# the mean autocorrelation curve settles well before this many chains; more only costs FFTs
_ACF_CHAINS = 512


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def _styled(fn):
    """Build the figure and encode it as PNG under the report's rc style (rcParams are read both
    when artists are made and when they are drawn)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> bytes:
        with matplotlib.rc_context(_STYLE):
            buf = io.BytesIO()
            fn(*args, **kwargs).savefig(buf, format="png", dpi=_DPI, facecolor="white")
            return buf.getvalue()
    return wrapper


def grid_columns(n: int, widest: int = _GRID_COLUMNS) -> int:
    """Tiles per row for ``n`` images: all of them up to ``widest``, else the widest divisor of ``n``
    between ``widest // 2`` and ``widest`` (64 -> 8 x 8: no ragged last row), else ``widest``."""
    if n <= widest:
        return max(1, n)
    return next((c for c in range(widest, widest // 2 - 1, -1) if n % c == 0), widest)


def grid_png(images: np.ndarray, nrow: Optional[int] = None) -> bytes:
    """PNG tiling ``(n, C, H, W)`` images in [0, 1] (:func:`mmgm_ray.images.make_grid`), ``nrow`` per row."""
    n, _, h, _ = images.shape
    nrow = nrow or grid_columns(n)
    arr = make_grid(torch.from_numpy(np.ascontiguousarray(images)), nrow=nrow, padding=1,
                    scale=max(1, round(_TILE_PX / h)))
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _class_name(names: Optional[Sequence[str]], k: int) -> str:
    if k < 0:
        return "?"
    return str(names[k]) if names is not None and k < len(names) else str(k)


def _tick_kw(names: Sequence[str]) -> dict:
    # long class names (Fashion-MNIST's "T-shirt/top") are slanted so neighbours do not overlap
    return {"rotation": 45, "ha": "right"} if max(map(len, names)) > 3 else {}


@_styled
def filmstrip_png(frames: np.ndarray, labels: Optional[np.ndarray], jumps: np.ndarray,
                  chain_ids: np.ndarray, class_names: Optional[Sequence[str]] = None) -> Figure:
    """One row per chain, one column per jump; each frame titled with its class (red where the
    class differs from the frame before: the chain crossed to another mode)."""
    c, t = frames.shape[:2]
    cell = 0.78
    fig = _figure(0.7 + cell * t, 0.25 + (cell + 0.18) * c)
    axes = fig.subplots(c, t, squeeze=False)
    for i in range(c):
        for j in range(t):
            ax = axes[i, j]
            img = frames[i, j]
            ax.imshow(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0), cmap="gray", vmin=0.0,
                      vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for sp in ax.spines.values():
                sp.set_visible(False)
            if i == 0:
                ax.set_title(f"jump {int(jumps[j])}", fontsize=7, color=_MUTED)
            if labels is not None:
                moved = j > 0 and labels[i, j] != labels[i, j - 1]
                ax.set_xlabel(_class_name(class_names, int(labels[i, j])), fontsize=8, labelpad=1,
                              color=_ALERT if moved else "black", fontweight="bold" if moved else "normal")
        axes[i, 0].set_ylabel(f"chain {int(chain_ids[i])}", fontsize=8, rotation=0, ha="right", va="center")
    return fig


@_styled
def trace_rank_png(functionals: Mapping[str, np.ndarray], jump_index: np.ndarray, rows: Sequence[int],
                   chain_ids: np.ndarray) -> Figure:
    """For each functional: the trace of chains ``rows`` (left) and their rank histograms (right).

    Ranks are over all chains' draws pooled; a mixed chain's histogram is flat at draws/bins
    (dashed) and a chain stuck high or low piles up at one end (Vehtari et al. 2021, sec. 4.5)."""
    names = list(functionals)
    fig = _figure(10.0, 1.9 * len(names) + 0.3)
    axes = fig.subplots(len(names), 2, squeeze=False, width_ratios=[2.2, 1.0], sharex="col")
    for r, name in enumerate(names):
        x = functionals[name]
        ok = np.isfinite(x).all(axis=1)
        ranks = np.full(x.shape, np.nan)
        ranks[ok] = rankdata(x[ok]).reshape(int(ok.sum()), x.shape[1])
        bins = int(min(20, max(4, x.shape[1] // 20)))  # >= 20 draws a bin keeps flat looking flat
        edges = np.linspace(0.5, ok.sum() * x.shape[1] + 0.5, bins + 1)
        tr, rk = axes[r]
        for i in rows:
            line, = tr.plot(jump_index, x[i], lw=0.9, alpha=0.85, label=f"chain {int(chain_ids[i])}")
            if ok[i]:
                rk.stairs(np.histogram(ranks[i], bins=edges)[0], edges, color=line.get_color(), lw=1.2,
                          baseline=None)
        rk.axhline(x.shape[1] / bins, color=_MUTED, ls="--", lw=1)
        tr.set_ylabel(name)
        tr.set_title(f"{name}: trace" if r == 0 else "", loc="left")
        rk.set_title("rank histogram (flat = mixed)" if r == 0 else "", loc="left")
        rk.set_ylim(bottom=0)
        rk.set_yticks([])
        rk.set_xticks([])
    axes[-1, 0].set_xlabel("jump index")
    axes[-1, 1].set_xlabel("rank over all chains")
    axes[0, 0].legend(loc="upper right", ncols=min(4, len(rows)))
    return fig


def _decay_lag(mean_rho: np.ndarray) -> int:
    """First lag where the mean autocorrelation drops below 0.05 (the curve's length otherwise)."""
    below = np.flatnonzero(mean_rho < 0.05)
    return int(below[0]) if below.size else mean_rho.size


@_styled
def autocorr_png(functionals: Mapping[str, np.ndarray], rows: Sequence[int]) -> Figure:
    """Autocorrelation of each functional against lag (:func:`mmgm_ray.diagnostics.autocorr`,
    each chain about its own mean): thin lines for chains ``rows``, thick for the mean over all
    chains (at most ``_ACF_CHAINS`` of them). Curves that stay high for many lags mean few
    effective draws per chain. The lag axis runs to 4x the slowest decay (at least 20 lags, at most
    half the draws)."""
    names = list(functionals)
    rhos, means = {}, {}
    for name in names:
        x = functionals[name]
        ok = np.flatnonzero(np.isfinite(x).all(axis=1))
        use = np.union1d(ok[:_ACF_CHAINS], np.intersect1d(np.asarray(rows, dtype=int), ok))
        rhos[name] = np.full((x.shape[0], x.shape[1] // 2 + 1), np.nan)
        with np.errstate(invalid="ignore"):  # a constant chain has no autocorrelation (0/0): NaN
            rhos[name][use] = mcmc.autocorr(x[use], axis=1)[:, : x.shape[1] // 2 + 1]
        fin = np.isfinite(rhos[name][use])
        means[name] = np.where(fin, rhos[name][use], 0.0).sum(axis=0) / np.maximum(fin.sum(axis=0), 1)
        means[name][~fin.any(axis=0)] = np.nan
    half = min(r.shape[1] - 1 for r in rhos.values())
    decay = [_decay_lag(m) for m in means.values() if np.isfinite(m).all()]
    lags = int(min(half, max(20, 4 * max(decay, default=0))))
    cols = min(4, len(names))
    nrows = int(math.ceil(len(names) / cols))
    fig = _figure(2.6 * cols, 2.0 * nrows + 0.2)
    axes = fig.subplots(nrows, cols, squeeze=False, sharey=True)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names):
        for i in rows:
            ax.plot(rhos[name][i, : lags + 1], lw=0.7, alpha=0.5)
        ax.plot(means[name][: lags + 1], color="black", lw=1.8, label="mean over chains")
        ax.axhline(0.0, color=_MUTED, lw=0.8)
        ax.set_title(name if np.isfinite(means[name]).any() else f"{name} (constant: undefined)", loc="left")
        ax.set_ylim(-0.3, 1.05)
    for ax in axes.flat:
        ax.set_xlabel("lag (jumps)")
    axes[0, 0].set_ylabel("autocorrelation")
    axes[0, 0].legend(loc="upper right")
    return fig


@_styled
def diagnostics_hist_png(rhat: np.ndarray, ess_bulk: np.ndarray, ess_tail: np.ndarray,
                         rhat_threshold: float, min_ess: float) -> Figure:
    """Histograms of R-hat, bulk ESS and tail ESS over all functionals, threshold dashed red."""
    fig = _figure(10.0, 2.6)
    axes = fig.subplots(1, 3)
    panels = [(rhat, "R-hat", rhat_threshold, f"threshold {rhat_threshold:g}"),
              (ess_bulk, "bulk ESS", min_ess, f"minimum {min_ess:g}"),
              (ess_tail, "tail ESS", min_ess, f"minimum {min_ess:g}")]
    for ax, (v, title, line, label) in zip(axes, panels):
        v = np.asarray(v, dtype=np.float64)
        finite = v[np.isfinite(v)]
        lo, hi = (min(finite.min(), line), max(finite.max(), line)) if finite.size else (line * 0.9, line * 1.1)
        pad = 0.05 * (hi - lo) or 0.05 * abs(line)
        ax.hist(finite, bins=np.linspace(lo - pad, hi + pad, 21), color="#93c5fd", edgecolor="#2563eb")
        ax.axvline(line, color=_ALERT, ls="--", lw=1.5, label=label)
        undefined = v.size - finite.size
        ax.set_title(f"{title} ({v.size} functionals" + (f", {undefined} undefined)" if undefined else ")"),
                     loc="left")
        ax.legend(loc="best")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        if "ESS" in title:
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 800k, not an offset "1e6"
    axes[0].set_ylabel("functionals")
    return fig


@_styled
def transition_png(matrix: np.ndarray, class_names: Optional[Sequence[str]] = None) -> Figure:
    """Heatmap of P[i, j] = Pr(class j at the next jump | class i now)."""
    k = matrix.shape[0]
    size = min(7.0, 0.8 + 0.3 * k)  # 10 classes: 3.8 in, so it fits beside the class frequencies
    fig = _figure(size + 0.6, size)
    ax = fig.subplots()
    im = ax.imshow(np.nan_to_num(matrix, nan=0.0), cmap="Blues", vmin=0.0, vmax=1.0)
    names = [_class_name(class_names, i) for i in range(k)]
    ax.set_xticks(range(k), names, **_tick_kw(names))
    ax.set_yticks(range(k), names)
    ax.set_xlabel("class at the next jump")
    ax.set_ylabel("class now")
    if k <= 12:
        for i in range(k):
            for j in range(k):
                p = matrix[i, j]
                if np.isfinite(p) and p >= 0.005:
                    ax.text(j, i, f"{p:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if p > 0.6 else "black")
    fig.colorbar(im, ax=ax, shrink=0.8, label="probability")
    return fig


@_styled
def class_frequency_png(sampled: np.ndarray, data: Optional[np.ndarray],
                        class_names: Optional[Sequence[str]] = None) -> Figure:
    """Fraction of sampled jumps in each class, next to the data set's class frequencies."""
    k = len(sampled)
    fig = _figure(max(4.0, 0.28 * k + 1.4), 3.2)
    ax = fig.subplots()
    pos = np.arange(k)
    width = 0.4 if data is not None else 0.7
    ax.bar(pos - (width / 2 if data is not None else 0), sampled, width, label="samples (all jumps)")
    if data is not None:
        ax.bar(pos + width / 2, data, width, label="data", color="#9ca3af")
    names = [_class_name(class_names, i) for i in range(k)]
    ax.set_xticks(pos, names, **_tick_kw(names))
    ax.set_ylabel("fraction")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=2)
    return fig


@_styled
def fid_png(fid: Optional[float], real_floor: Optional[float], windows: Sequence[dict]) -> Figure:
    """FID per chain-length window (jumps ``start <= j < end``) with the final FID and the
    real-data floor as horizontal lines; without windows, the two numbers as bars."""
    fig = _figure(7.0 if windows else 4.0, 2.8)
    ax = fig.subplots()
    if windows:
        mid = [0.5 * (w["start"] + w["end"]) for w in windows]
        vals = [w["fid"] for w in windows]
        ax.plot(mid, vals, marker="o", label="FID of the window's jumps")
        ax.hlines(vals, [w["start"] for w in windows], [w["end"] for w in windows], color="#2563eb", lw=3,
                  alpha=0.35)
        if fid is not None:
            ax.axhline(fid, color="#2563eb", ls=":", lw=1.2, label=f"final FID {fid:.2f}")
        if real_floor is not None:
            ax.axhline(real_floor, color=_MUTED, ls="--", lw=1.2, label=f"real-data floor {real_floor:.2f}")
        ax.set_xlabel("jump index (bars: each window's jumps)")
        ax.set_ylim(bottom=0)
        ax.legend(loc="upper right")
    else:
        vals = [(n, v) for n, v in (("samples", fid), ("real-data floor", real_floor)) if v is not None]
        bars = ax.bar([n for n, _ in vals], [v for _, v in vals], color=["#2563eb", "#9ca3af"][: len(vals)], width=0.5)
        ax.bar_label(bars, fmt="%.2f")
    ax.set_ylabel("FID")
    return fig


@_styled
def loss_png(history: Sequence[dict]) -> Figure:
    """Training loss against step (log scale when every value is positive); EMA loss as dots."""
    fig = _figure(7.0, 2.8)
    ax = fig.subplots()
    steps = [h["step"] for h in history]
    loss = [h["loss"] for h in history]
    ax.plot(steps, loss, lw=1.3, label="training loss")
    ema = [(h["step"], h["ema_loss"]) for h in history if h.get("ema_loss") is not None]
    if ema:
        ax.plot(*zip(*ema), "o", ms=4, color="#ea580c", label="EMA model, held-out loss")
    values = loss + [v for _, v in ema]
    if min(values) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(loc="upper right")
    return fig
