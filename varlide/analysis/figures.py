"""The report's figures (matplotlib Agg, PNG bytes)."""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from varlide.analysis.rundata import ROUTES, Criterion, RunData, metric_direction, rank_criterion
from varlide.storage.uri import filesystem

log = logging.getLogger(__name__)

BEFORE, AFTER = "#4c72b0", "#dd8452"  # one colour for "before" (input), one for "after"


# ---- figures --------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({
        "figure.dpi": 100, "savefig.dpi": 100, "font.size": 9, "axes.titlesize": 10,
        "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
        "grid.alpha": 0.25, "legend.frameon": False,
    })
    return plt


def _png(fig, tight: bool = True) -> bytes:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight" if tight else None, facecolor="white")
    plt.close(fig)
    return buf.getvalue()


def _finite(series):
    import numpy as np

    values = series.dropna().to_numpy(dtype=np.float64)
    return values[np.isfinite(values)]


def _hist(values: dict[str, Any], title: str, xlabel: str, colors: Sequence[str],
          bins: int = 30) -> bytes:
    import numpy as np

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 3.1))
    present = {k: v for k, v in values.items() if v.size}
    allv = np.concatenate(list(present.values()))
    lo, hi = float(allv.min()), float(allv.max())
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, min(bins, max(5, int(math.sqrt(allv.size)) * 2)) + 1)
    for (label, v), color in zip(values.items(), colors, strict=False):
        if v.size:
            ax.hist(v, bins=edges, alpha=0.6 if len(present) > 1 else 0.85, color=color,
                    label=f"{label} (median {np.median(v):.3g}, n={v.size})",
                    edgecolor="white", linewidth=0.4)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("images")
    ax.legend(loc="best", fontsize=8)
    return _png(fig)


def _bars(labels: Sequence[str], counts: Sequence[int], title: str, xlabel: str) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 3.1))
    bars = ax.bar(range(len(labels)), counts, color=BEFORE, width=0.6,
                  tick_label=[str(x) for x in labels])
    ax.bar_label(bars, labels=[str(c) for c in counts], padding=2, fontsize=8)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("images")
    ax.margins(y=0.15)
    ax.grid(axis="x", visible=False)
    return _png(fig)


def _scatter(data: RunData) -> bytes:
    import numpy as np

    plt = _plt()
    ok = data.ok
    sub = ok[ok["visibility"].notna() & ok["q_brightness_in"].notna()
             & ok["q_brightness_out"].notna()]
    if len(sub) > 20000:  # keep the page light on huge runs
        sub = sub.sample(20000, random_state=0)
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    palette = {"skip": "#8c8c8c", "curve": BEFORE, "full": AFTER}
    routes = sub["route"].fillna("none") if "route" in sub else np.full(len(sub), "none")
    for route in [*ROUTES, *sorted(set(routes) - set(ROUTES))]:
        m = routes == route
        if m.any():
            gain = sub.loc[m, "q_brightness_out"] - sub.loc[m, "q_brightness_in"]
            ax.scatter(sub.loc[m, "visibility"], gain, s=16, alpha=0.75,
                       color=palette.get(route, "#55a868"), label=f"{route} ({int(m.sum())})",
                       edgecolors="none")
    ax.axhline(0, color="#444", linewidth=0.8)
    ax.set_xlabel("visibility v (input)")
    ax.set_ylabel("brightness after − before")
    ax.set_title("Visibility against brightness gain")
    ax.legend(title="route", fontsize=8, title_fontsize=8, loc="best")
    return _png(fig)


def _thumbnail(uri: str | None, side: int):
    """A downscaled RGB array of the image at ``uri`` (None when absent or unreadable)."""
    import numpy as np
    from PIL import Image

    if not isinstance(uri, str) or not uri:
        return None
    try:
        fs, path = filesystem(uri)
        with fs.open(path, "rb") as fh:
            img = Image.open(fh)
            img.draft("RGB", (side, side))
            img = img.convert("RGB")
            img.thumbnail((side, side), Image.Resampling.LANCZOS)
            return np.asarray(img)
    except Exception as exc:  # a thumbnail is never worth failing a report
        log.info("thumbnail of %s unavailable: %s", uri, exc)
        return None


def _grid(rows, title: str, crit: Criterion | None, pairs: bool, side: int = 192) -> bytes:
    plt = _plt()
    n = len(rows)
    per_row = 4 if pairs else 6
    ncols, nrows = min(per_row, n), math.ceil(n / per_row)
    width = (2.9 if pairs else 1.9) * ncols
    fig = plt.figure(figsize=(max(width, 4.0), 2.1 * nrows + 0.5), layout="constrained")
    fig.suptitle(title, fontsize=11, fontweight="bold")
    subfigs = fig.subfigures(nrows, ncols, squeeze=False, wspace=0.02, hspace=0.02)
    for i, sf in enumerate(subfigs.flat):
        if i >= n:
            sf.set_visible(False)
            continue
        _, row = rows[i]
        sides = [("before", row.get("source_uri"))]
        if pairs:
            sides.append(("after", row.get("enhanced_uri")))
        axes = sf.subplots(1, len(sides), squeeze=False)[0]
        for ax, (label, uri) in zip(axes, sides, strict=True):
            img = _thumbnail(uri, side)
            if img is None:
                ax.text(0.5, 0.5, "not available", ha="center", va="center", fontsize=8,
                        color="#666", transform=ax.transAxes)
                ax.set_facecolor("#eee")
            else:
                ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
            for spine in ax.spines.values():
                spine.set_visible(label == "after")
                spine.set_color(AFTER)
            if pairs:
                ax.set_title(label, fontsize=8, color=AFTER if label == "after" else "#333",
                             pad=2)
        name = str(row.get("rel_path"))
        if len(name) > 34:
            name = "…" + name[-33:]
        value = ""
        if crit is not None:
            x = float(crit.shown.loc[rows[i][0]])
            value = f"\n{crit.label} {x:+.3g}" if crit.signed else f"\n{crit.label} {x:.3g}"
        sf.suptitle(name + value, fontsize=7.5)
    return _png(fig, tight=False)


@dataclass
class Figure:
    id: str  # html id, also the artifact file name
    section: str
    title: str
    caption: str
    png: bytes


def make_figures(data: RunData, thumbs: int = 8, seed: int = 0,
                 rank_by: str | None = None) -> tuple[list[Figure], list[str], Criterion | None]:
    """Every figure of the report, and notes on the ones that cannot be drawn."""
    figs: list[Figure] = []
    notes: list[str] = []
    for section in (_prior_figures, _enhancement_figures, _quality_figures, _gain_figures):
        section(data, figs, notes)
    crit = rank_criterion(data, rank_by)
    if thumbs > 0 and len(data.ok):
        figs += _thumbnail_figures(data, thumbs, seed, crit)
    return figs, notes, crit


def _prior_figures(data: RunData, figs: list[Figure], notes: list[str]) -> None:
    import numpy as np

    ok = data.ok
    backends = ", ".join(map(str, ok["prior_backend"].dropna().unique()))
    for col, name, what in (("visibility", "v", "higher = better lit"),
                            ("blur", "b", "higher = blurrier")):
        v = _finite(ok[col]) if col in ok else np.array([])
        if v.size:
            figs.append(Figure(f"fig-{col}", "priors", f"{col} ({name})",
                               f"Prior {name} of each image ({what}); backend {backends}.",
                               _hist({col: v}, f"{col} {name}", f"{name} in [0, 1]", [BEFORE])))
        else:
            notes.append(f"no {col} values (no image was scored)")


def _enhancement_figures(data: RunData, figs: list[Figure], notes: list[str]) -> None:
    import numpy as np

    ok = data.ok
    n_iter = ok["n_iter"].dropna() if "n_iter" in ok else ok.iloc[:0, 0]
    if len(n_iter):
        counts = n_iter.astype(int).value_counts().sort_index()
        figs.append(Figure("fig-n_iter", "enhancement", "curve iterations (n_iter)",
                           "Curve iterations applied per image (VICM's n_v; a fixed count for "
                           "classic-curve).",
                           _bars(list(counts.index), list(counts.values),
                                 "n_iter", "iterations")))
    route = ok["route"].dropna() if "route" in ok else ok.iloc[:0, 0]
    if len(route):
        counts = route.value_counts()
        labels = [r for r in ROUTES if r in counts] + sorted(set(counts.index) - set(ROUTES))
        figs.append(Figure("fig-route", "enhancement", "route",
                           "What the enhancer did: skip (left as is), curve (curve only), "
                           "full (curve and phase stage).",
                           _bars(labels, [int(counts[r]) for r in labels], "route", "route")))
    ps = _finite(ok["phase_strength"]) if "phase_strength" in ok else np.array([])
    if ps.size:
        figs.append(Figure("fig-phase_strength", "enhancement", "phase strength",
                           "VGPM strength chosen from b.",
                           _hist({"phase_strength": ps}, "phase strength", "strength",
                                 [BEFORE])))
    if not len(n_iter) and not len(route):
        notes.append("enhancement was off in this run (no n_iter, route or after images)")


def _quality_figures(data: RunData, figs: list[Figure], notes: list[str]) -> None:
    import numpy as np

    ok = data.ok
    for m in data.metrics:
        vin = _finite(ok[f"q_{m}_in"])
        vout = _finite(ok[f"q_{m}_out"]) if f"q_{m}_out" in ok else np.array([])
        if not vin.size and not vout.size:
            notes.append(f"no {m} values")
            continue
        lower = metric_direction(m)
        way = {True: "lower is better", False: "higher is better", None: "no preferred direction"}
        what = (f"{m} of each image before (q_{m}_in) and after (q_{m}_out) enhancement"
                if vout.size else f"{m} of each input image (q_{m}_in; no after values)")
        figs.append(Figure(f"fig-q_{m}", "quality", m, f"{what}; {way[lower]}.",
                           _hist({"before": vin, "after": vout}, m, m, [BEFORE, AFTER])))


def _gain_figures(data: RunData, figs: list[Figure], notes: list[str]) -> None:
    ok = data.ok
    if {"q_brightness_in", "q_brightness_out", "visibility"} <= set(ok.columns) and (
            ok["q_brightness_out"].notna() & ok["q_brightness_in"].notna()).any():
        figs.append(Figure("fig-v_vs_gain", "gain", "visibility against brightness gain",
                           "Each dot is an image: its prior v against q_brightness_out − "
                           "q_brightness_in, coloured by route.", _scatter(data)))
    else:
        notes.append("no brightness gain to plot (needs the brightness measure and after "
                     "images)")


def _thumbnail_figures(data: RunData, thumbs: int, seed: int,
                       crit: Criterion | None) -> list[Figure]:
    """Worst and best by the criterion (when there is one) and a seeded random sample."""
    import numpy as np

    ok = data.ok
    figs: list[Figure] = []
    pairs = data.enhanced
    k = min(thumbs, len(ok))
    picks = []
    if crit is not None:
        ranked = crit.values.dropna().sort_values(kind="stable")
        r = min(thumbs, max(1, len(ranked) // 2))  # worst and best never overlap
        picks = [("worst", list(ranked.index[:r])), ("best", list(ranked.index[::-1][:r]))]
    rng = np.random.default_rng(seed)
    positions = np.sort(rng.choice(len(ok), size=k, replace=False))
    picks.append(("random", list(ok.index[positions])))
    for kind, index in picks:
        rows = [(i, ok.loc[i].to_dict()) for i in index]
        title = (f"{len(index)} at random (seed {seed})" if kind == "random"
                 else f"{kind.capitalize()} {len(index)} by {crit.column}")
        caption = ((crit.description[0].upper() + crit.description[1:] + "." if crit else "")
                   if kind != "random" else "A uniform sample of the ok images.")
        caption += " Before (input) and after (enhanced) side by side." if pairs else (
            " Inputs only: this run wrote no enhanced images.")
        figs.append(Figure(f"fig-thumbs-{kind}", "thumbnails", title, caption,
                           _grid(rows, title, crit, pairs)))
    return figs


