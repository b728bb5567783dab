"""Markdown tables for docs/METHOD.md with each measure's direction."""

from __future__ import annotations

import logging

import pandas as pd

from varlide.evaluation.sets import ALL, INPUT, TARGET_BAND
from varlide.iqa.base import MetricInfo, metric_info

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- Markdown

DIGITS = {"psnr": 2, "ssim": 4, "brightness": 3, "overexposed": 4, "piqe": 2, "entropy": 3,
          "sharpness": 1, "in_band": 2}


def measure_info(name: str) -> MetricInfo | None:
    """A measure's metadata (direction, range), ``in_band`` included; None if unknown."""
    if name == "in_band":
        return MetricInfo("in_band", False, (0.0, 1.0),
                          description=f"fraction of outputs with mean luma in {TARGET_BAND}")
    try:
        return metric_info(name)
    except KeyError:
        return None


def _header(name: str) -> str:
    if name == "in_band":
        return f"in [{TARGET_BAND[0]:.2f}, {TARGET_BAND[1]:.2f}] ↑"
    info = measure_info(name)
    arrow = "" if info is None or info.lower_better is None else (
        " ↓" if info.lower_better else " ↑")
    return f"{name}{arrow}"


def format_table(df: pd.DataFrame, std: bool = True, bold_best: bool = True) -> str:
    """Markdown for docs/METHOD.md: one table per kind of set (paired, unpaired), one row per
    (set, band, enhancer), a column per measure headed with its direction (↑ higher is
    better, ↓ lower is better, from ``metric_info``; brightness has none: its target is
    :data:`TARGET_BAND`), cells ``mean ± std``; the best enhancer (not the input) of each
    set and band in bold."""
    if df.empty:
        return ""
    blocks = []
    for kind in list(dict.fromkeys(df["kind"])):
        sub = df[df["kind"] == kind]
        measures = [c[: -len("_mean")] for c in sub.columns
                    if c.endswith("_mean") and sub[c].notna().any()]
        show_band = (sub["band"] != ALL).any()
        head = ["set"] + (["band"] if show_band else []) + ["enhancer", "n"]
        head += [_header(m) for m in measures]
        lines = ["| " + " | ".join(head) + " |",
                 "| " + " | ".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + " |"]
        best: dict[tuple, dict[str, float]] = {}
        if bold_best:
            for key, g in sub[sub["enhancer"] != INPUT].groupby(["set", "band"], sort=False):
                best[key] = {}
                for m in measures:
                    info = measure_info(m)
                    col = g[f"{m}_mean"].dropna()
                    if info is None or info.lower_better is None or len(g) < 2 or col.empty:
                        continue
                    best[key][m] = col.min() if info.lower_better else col.max()
        for _, r in sub.iterrows():
            cells = [str(r["set"])] + ([str(r["band"])] if show_band else [])
            cells += [str(r["enhancer"]), str(int(r["n"]))]
            for m in measures:
                mean = r.get(f"{m}_mean")
                if mean is None or pd.isna(mean):
                    cells.append("")
                    continue
                d = DIGITS.get(m, 3)
                text = f"{mean:.{d}f}"
                sd = r.get(f"{m}_std")
                if std and sd is not None and not pd.isna(sd) and int(r["n"]) > 1:
                    text += f" ± {sd:.{d}f}"
                target = best.get((r["set"], r["band"]), {}).get(m)
                if (r["enhancer"] != INPUT and target is not None
                        and round(mean, d) == round(target, d)):
                    text = f"**{text}**"
                cells.append(text)
            lines.append("| " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    legend = (f"↑ higher is better, ↓ lower is better; brightness (mean Rec.601 luma) has no "
              f"direction: the target is [{TARGET_BAND[0]:.2f}, {TARGET_BAND[1]:.2f}]. "
              f"Mean ± std over images; best enhancer per set and band in bold.")
    return "\n\n".join(blocks) + "\n\n" + legend + "\n"
