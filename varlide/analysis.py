"""Analyst access to the score tables: SQL over them (DuckDB) and a run's HTML report.

``varlide query`` and ``varlide report`` are thin shells over this module (no Prefect here).

SQL: :func:`connect` lists the score files of an output store through fsspec and exposes
them to DuckDB as one view, ``scores`` (every run, or one with ``run_id``). Files of runs
with different measures are read with ``union_by_name`` (a column a run lacks is NULL).
For a remote store (``s3://`` ...) the fsspec filesystem is registered on the connection,
so DuckDB reads through s3fs (endpoint from ``AWS_ENDPOINT_URL``) and no DuckDB extension
is downloaded (auto-install of extensions is off).

Report: :func:`build_report` reads one run's rows and writes a self-contained HTML page
(inline CSS, figures as inline base64 PNGs from matplotlib's Agg backend, no script, no
external URL): counts and error reasons, histograms of v, b, ``n_iter``, ``route`` and every
quality measure before and after, v against brightness gain, and thumbnail grids (worst,
best, random) of before/after pairs read from ``source_uri`` / ``enhanced_uri``. The same
figures (and the page) go to the run's MLflow run, found by its ``varlide.run_id`` tag.

Thumbnail ranking (:func:`rank_criterion`, documented on the page): by default the change of
``piqe`` (the run's no-reference perceptual measure, lower is better), improvement =
``q_piqe_in - q_piqe_out``; without piqe, the first measure with a preferred direction,
signed so that positive = improved; without one, the brightness gain. With enhancement off
(no after images) the ranking is by visibility v (worst = darkest). ``rank_by`` picks a
measure (its improvement, or its input value without enhancement) or ``visibility``. The
worst and best grids take at most half the ranked images each, so they never overlap; the
random grid is a seeded uniform sample of the ok images.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from varlide.storage.uri import filesystem, is_local_fs, join

log = logging.getLogger(__name__)

VIEW = "scores"
ROUTES = ("skip", "curve", "full")
BEFORE, AFTER = "#4c72b0", "#dd8452"  # one colour for "before" (input), one for "after"


class AnalysisError(ValueError):
    """A user-facing problem with a query or a report (the message says what to do)."""


def _canonical(uri: str) -> str:
    if "://" in uri:
        return uri.rstrip("/")
    return os.path.abspath(os.path.expanduser(uri))


def _full_uri(fs, path: str) -> str:
    """A path from ``fs`` back to a URI DuckDB and fsspec both read (plain path locally)."""
    if is_local_fs(fs):
        return path
    proto = fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol
    return f"{proto}://{path}"


def _plain_component(value: str, what: str) -> str:
    if not value or "/" in value or "\\" in value or value in (".", "..") or "'" in value:
        raise AnalysisError(f"{what} must be a plain name, got {value!r}")
    return value


# ---- score files and SQL ------------------------------------------------------------------


def score_files(output_uri: str, run_id: str | None = None) -> list[str]:
    """URIs of ``<out>/scores/<dataset>/<run_id>/*.parquet`` (one run's when ``run_id``).

    AnalysisError with what to do when there are none.
    """
    output_uri = _canonical(output_uri)
    scores = join(output_uri, "scores")
    fs, root = filesystem(scores)
    fs.invalidate_cache()
    if not fs.exists(root):
        raise AnalysisError(f"no scores in {output_uri}: {scores} does not exist "
                            "(is OUTPUT the output store of `varlide enhance`?)")
    run = _plain_component(run_id, "run id") if run_id else "*"
    files = sorted(fs.glob(f"{root}/*/{run}/*.parquet"))
    if not files:
        if run_id:
            runs = sorted({p.rstrip("/").split("/")[-2] for p in fs.glob(f"{root}/*/*/*.parquet")})
            raise AnalysisError(f"run {run_id!r} has no score files in {scores}; runs with "
                                f"scores: {', '.join(runs) if runs else 'none'}")
        raise AnalysisError(f"no score files in {scores} yet (no shard has finished)")
    return [_full_uri(fs, p) for p in files]


def connect(output_uri: str, run_id: str | None = None, con=None):
    """A DuckDB connection with the view ``scores`` over the output's score files."""
    import duckdb

    files = score_files(output_uri, run_id)
    if con is None:
        con = duckdb.connect(config={"autoinstall_known_extensions": False})
    fs, _ = filesystem(_canonical(output_uri))
    if not is_local_fs(fs):
        con.register_filesystem(fs)
    try:
        con.read_parquet(files, union_by_name=True).create_view(VIEW, replace=True)
    except duckdb.Error as exc:
        raise AnalysisError(f"cannot read the score files: {exc}") from None
    return con


def run_sql(con, sql: str):
    """Run ``sql``; its result relation (None for a statement without one).

    AnalysisError carrying DuckDB's message (with the position) on a bad query.
    """
    import duckdb

    if not sql or not sql.strip():
        raise AnalysisError("empty SQL (example: SELECT route, count(*) FROM scores GROUP BY 1)")
    try:
        return con.sql(sql)
    except duckdb.Error as exc:
        raise AnalysisError(f"SQL error: {exc}\n(the scores are the view `{VIEW}`; "
                            f"DESCRIBE {VIEW} lists its columns)") from None


def show(rel, max_rows: int = 40, max_width: int | None = None) -> None:
    """Print a result as DuckDB's box table (fits the terminal; rows summarised past max_rows)."""
    import duckdb

    if max_width is None:
        max_width = shutil.get_terminal_size((120, 24)).columns
    try:
        rel.show(max_width=max_width, max_rows=max_rows)
    except duckdb.Error as exc:
        raise AnalysisError(f"SQL error: {exc}") from None


def _arrow_reader(rel, batch_rows: int = 65536):
    if hasattr(rel, "to_arrow_reader"):
        return rel.to_arrow_reader(batch_rows)
    return rel.fetch_record_batch(batch_rows)  # duckdb < 1.4


def export(rel, uri: str, fmt: str) -> int:
    """Stream a result to ``uri`` (any fsspec URI) as ``csv`` or ``parquet``; rows written."""
    import duckdb
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if fmt not in ("csv", "parquet"):
        raise ValueError(f"format: expected csv or parquet, got {fmt!r}")
    if rel is None:
        raise AnalysisError("the SQL returned no result to export (use a SELECT)")
    uri = _canonical(uri)
    fs, path = filesystem(uri)
    if is_local_fs(fs):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    rows = 0
    try:
        reader = _arrow_reader(rel)
        with fs.open(path, "wb") as fh:
            writer = (pacsv.CSVWriter(fh, reader.schema) if fmt == "csv"
                      else pq.ParquetWriter(fh, reader.schema, compression="zstd"))
            try:
                for batch in reader:
                    writer.write_batch(batch)
                    rows += batch.num_rows
            finally:
                writer.close()
    except duckdb.Error as exc:
        _remove_quietly(fs, path)
        raise AnalysisError(f"SQL error: {exc}") from None
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        _remove_quietly(fs, path)
        hint = " (CSV holds flat columns only; try --parquet)" if fmt == "csv" else ""
        raise AnalysisError(f"cannot write {fmt}: {exc}{hint}") from None
    return rows


def _remove_quietly(fs, path: str) -> None:
    try:
        fs.rm_file(path)
    except (FileNotFoundError, OSError):
        pass


# ---- a run's rows ---------------------------------------------------------------------------


def run_ids_with_scores(output_uri: str) -> list[str]:
    fs, root = filesystem(join(_canonical(output_uri), "scores"))
    fs.invalidate_cache()
    return sorted({p.rstrip("/").split("/")[-2] for p in fs.glob(f"{root}/*/*/*.parquet")})


def resolve_run(output_uri: str, run_id: str | None) -> str:
    """``run_id``, or the output's only run; AnalysisError naming the choices otherwise."""
    if run_id:
        return _plain_component(run_id, "run id")
    runs = run_ids_with_scores(output_uri)
    if len(runs) == 1:
        return runs[0]
    if not runs:
        raise AnalysisError(f"no runs with scores in {_canonical(output_uri)}")
    raise AnalysisError(f"{len(runs)} runs in {_canonical(output_uri)}; pick one with --run: "
                        f"{', '.join(runs)}")


@dataclass
class RunData:
    """One run's rows and what its store says about it."""

    output_uri: str
    run_id: str
    dataset: str
    df: Any  # pandas.DataFrame, one row per image
    table: Any = None  # the same rows as read (pyarrow.Table)
    manifest: dict = field(default_factory=dict)
    shards_total: int | None = None
    shards_done: int | None = None
    shards_failed: int | None = None

    @property
    def metrics(self) -> list[str]:
        """Quality measures of the run, in the table's order (``q_<m>_in`` columns)."""
        return [m.group(1) for c in self.df.columns if (m := re.fullmatch(r"q_(.+)_in", c))]

    @property
    def ok(self):
        return self.df[self.df["status"] == "ok"]

    @property
    def enhanced(self) -> bool:
        return "enhanced_uri" in self.df and self.df["enhanced_uri"].notna().any()


def load_run(output_uri: str, run_id: str) -> RunData:
    """Rows, manifest and shard status of a run (AnalysisError when it has no scores)."""
    from varlide.run import read_run_scores
    from varlide.storage.runstore import RunStore, run_status

    output_uri = _canonical(output_uri)
    run_id = _plain_component(run_id, "run id")
    fs, root = filesystem(join(output_uri, "scores"))
    fs.invalidate_cache()
    dirs = sorted({p.rstrip("/").split("/")[-2] for p in fs.glob(f"{root}/*/{run_id}/*.parquet")})
    if not dirs:
        score_files(output_uri, run_id)  # raises with the runs that do have scores
    manifest: dict = {}
    store = RunStore(output_uri, run_id)
    if store.exists():
        manifest = store.read_manifest()
    dataset = manifest.get("dataset") or dirs[0]
    table = read_run_scores(output_uri, dataset, run_id)
    if table is None:
        raise AnalysisError(f"run {run_id!r} has no score files under scores/{dataset}/")
    data = RunData(output_uri, run_id, dataset, table.to_pandas(), table, manifest)
    if manifest:
        status = run_status(output_uri, run_id)
        data.shards_total, data.shards_done = status.shards_total, len(status.done)
        data.shards_failed = len(status.failed)
    return data


def metric_direction(name: str) -> bool | None:
    """``lower_better`` of a measure (None: no preferred direction, or unknown here)."""
    try:
        from varlide.iqa.base import metric_info

        return metric_info(name).lower_better
    except Exception:  # an unknown or unloadable measure: treat as undirected
        return None


@dataclass
class Criterion:
    column: str  # what the values are
    label: str  # short, for captions
    description: str  # one sentence for the page
    values: Any  # pandas Series over ok rows: higher = better
    signed: bool = True  # a change (shown with its sign) rather than a level
    level: Any = None  # the raw column when ``values`` is a level with its sign flipped

    @property
    def shown(self):
        """The values as captions show them."""
        return self.values if self.level is None else self.level


def rank_criterion(data: RunData, rank_by: str | None = None) -> Criterion | None:
    """How thumbnails are ranked (see the module docstring); None when nothing to rank by."""
    ok = data.ok
    if ok.empty:
        return None

    def has(col: str) -> bool:
        return col in ok and ok[col].notna().any()

    def improvement(m: str) -> Criterion | None:
        if not (has(f"q_{m}_in") and has(f"q_{m}_out")):
            return None
        lower = metric_direction(m)
        delta = ok[f"q_{m}_out"] - ok[f"q_{m}_in"]
        if lower is None:
            return Criterion(f"{m} gain", f"Δ{m}", f"{m} after − before (no preferred "
                             "direction; worst = smallest gain)", delta)
        sign = -1.0 if lower else 1.0
        way = "lower" if lower else "higher"
        return Criterion(f"{m} improvement", f"{m} improvement",
                         f"{m} improvement ({way} is better, so "
                         f"{'before − after' if lower else 'after − before'}; worst = least "
                         "improved)", sign * delta)

    def input_value(m: str) -> Criterion | None:
        if m == "visibility":
            if not has("visibility"):
                return None
            return Criterion("visibility", "v", "visibility v of the input (worst = darkest)",
                             ok["visibility"].astype(float), signed=False)
        if not has(f"q_{m}_in"):
            return None
        lower = metric_direction(m)
        sign = -1.0 if lower else 1.0
        return Criterion(f"{m} (input)", m, f"{m} of the input "
                         f"({'lower' if lower else 'higher'} is better)",
                         sign * ok[f"q_{m}_in"], signed=False, level=ok[f"q_{m}_in"])

    enhanced = data.enhanced
    if rank_by:
        if rank_by != "visibility" and rank_by not in data.metrics:
            raise AnalysisError(f"--rank-by {rank_by!r}: not a measure of this run "
                                f"(choose visibility or one of {', '.join(data.metrics)})")
        crit = (improvement(rank_by) if enhanced and rank_by != "visibility"
                else input_value(rank_by))
        if crit is None:
            raise AnalysisError(f"--rank-by {rank_by!r}: no values in this run")
        return crit
    if enhanced:
        order = ["piqe"] + [m for m in data.metrics if m != "piqe"
                            and metric_direction(m) is not None]
        for m in order + ["brightness"]:
            if m in data.metrics and (crit := improvement(m)) is not None:
                return crit
    return input_value("visibility")


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


# ---- the page -------------------------------------------------------------------------------

_CSS = """
:root{--fg:#1f2328;--muted:#656d76;--line:#d0d7de;--bg:#f6f8fa;--accent:#4c72b0;
--after:#dd8452;--bad:#b42318}
*{box-sizing:border-box}
body{margin:0;font:14px/1.5 -apple-system,BlinkMacSystemFont,"Segoe UI",Helvetica,Arial,
sans-serif;color:var(--fg);background:#fff}
header{background:linear-gradient(135deg,#1d2b4f,#34497a);color:#fff;padding:22px 32px}
header h1{margin:0 0 4px;font-size:22px;font-weight:600}
header p{margin:0;opacity:.85}
header code{background:rgba(255,255,255,.15);color:#fff}
nav{position:sticky;top:0;z-index:1;background:#fff;border-bottom:1px solid var(--line);
padding:8px 32px;display:flex;gap:18px;flex-wrap:wrap}
nav a{color:var(--accent);text-decoration:none;font-weight:500}
main{max-width:1240px;margin:0 auto;padding:8px 32px 40px}
section{margin-top:28px}
h2{font-size:18px;border-bottom:1px solid var(--line);padding-bottom:6px;margin:0 0 12px}
code{font:12px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:var(--bg);
padding:1px 5px;border-radius:4px}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin-bottom:14px}
.card{border:1px solid var(--line);border-radius:8px;padding:10px 16px;min-width:120px;
background:var(--bg)}
.card .n{font-size:24px;font-weight:600;display:block}
.card .l{color:var(--muted);font-size:12px;text-transform:uppercase;letter-spacing:.04em}
.card.bad .n{color:var(--bad)}
table{border-collapse:collapse;margin:6px 0 12px;font-size:13px}
th,td{border-bottom:1px solid var(--line);padding:5px 12px;text-align:left;vertical-align:top}
th{background:var(--bg);font-weight:600}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
table.kv th{background:none;color:var(--muted);font-weight:500;width:170px}
.figs{display:grid;grid-template-columns:repeat(auto-fill,minmax(460px,1fr));gap:16px}
figure{margin:0;border:1px solid var(--line);border-radius:8px;padding:10px;background:#fff}
figure img{max-width:100%;height:auto;display:block;margin:0 auto}
figcaption{color:var(--muted);font-size:12.5px;margin-top:6px}
figure.wide{grid-column:1/-1}
.note{color:var(--muted);font-style:italic}
.warn{border-left:4px solid var(--after);background:#fff6ee;padding:8px 12px;margin:10px 0}
.ok{color:#1a7f37}
footer{color:var(--muted);font-size:12px;border-top:1px solid var(--line);margin-top:36px;
padding-top:10px}
"""

_SECTIONS = (("summary", "Counts"), ("errors", "Errors"), ("priors", "Priors"),
             ("enhancement", "Enhancement"), ("quality", "Quality before and after"),
             ("gain", "Brightness gain"), ("thumbnails", "Thumbnails"))


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def _error_tables(data: RunData) -> str:
    df = data.df
    err = df[df["status"] == "error"]
    if err.empty:
        return '<p class="ok">No error rows: every image was read and processed.</p>'
    reasons = err["error"].fillna("(no reason recorded)")
    kinds = reasons.str.split(":", n=1).str[0].str.strip()
    out = ['<table id="error-reasons"><thead><tr><th>reason</th><th class="num">images</th>'
           "<th>examples</th></tr></thead><tbody>"]
    for kind, group in err.groupby(kinds, sort=False):
        examples = ", ".join(f"<code>{_e(p)}</code>" for p in group["rel_path"].head(3))
        more = f" and {len(group) - 3} more" if len(group) > 3 else ""
        out.append(f'<tr class="reason"><td>{_e(kind)}</td><td class="num">{len(group)}</td>'
                   f"<td>{examples}{more}</td></tr>")
    out.append("</tbody></table>")
    limit = 200
    out.append(f"<details><summary>Every error row ({len(err)})</summary>"
               '<table id="error-rows"><thead><tr><th>rel_path</th><th>error</th></tr></thead>'
               "<tbody>")
    for _, row in err.head(limit).iterrows():
        out.append(f"<tr><td><code>{_e(row['rel_path'])}</code></td><td>{_e(row['error'])}"
                   "</td></tr>")
    out.append("</tbody></table>")
    if len(err) > limit:
        out.append(f'<p class="note">First {limit} shown; `varlide query` lists all.</p>')
    out.append("</details>")
    return "".join(out)


def _quality_table(data: RunData) -> str:
    import numpy as np

    ok = data.ok
    if not data.metrics:
        return ""
    rows = ['<table id="quality-table"><thead><tr><th>measure</th><th>better</th>'
            '<th class="num">images</th><th class="num">median before</th>'
            '<th class="num">median after</th><th class="num">median change</th>'
            '<th class="num">improved</th></tr></thead><tbody>']
    for m in data.metrics:
        lower = metric_direction(m)
        vin = ok[f"q_{m}_in"]
        vout = ok[f"q_{m}_out"] if f"q_{m}_out" in ok else vin * np.nan
        both = vin.notna() & vout.notna()
        delta = (vout - vin)[both]
        improved = "–"
        if lower is not None and both.any():
            share = float(((delta < 0) if lower else (delta > 0)).mean())
            improved = f"{share:.0%}"
        rows.append(
            f"<tr><td>{_e(m)}</td><td>{ {True: 'lower', False: 'higher', None: '–'}[lower]}</td>"
            f'<td class="num">{int(vin.notna().sum())}</td>'
            f'<td class="num">{_fmt(float(vin.median()) if vin.notna().any() else None)}</td>'
            f'<td class="num">{_fmt(float(vout.median()) if vout.notna().any() else None)}</td>'
            f'<td class="num">{_fmt(float(delta.median()) if len(delta) else None)}</td>'
            f'<td class="num">{improved}</td></tr>')
    rows.append("</tbody></table>")
    return "".join(rows)


def render_html(data: RunData, figs: Sequence[Figure], notes: Sequence[str],
                counts: dict[str, float], crit: Criterion | None) -> str:
    """The self-contained page (no external URL, no script)."""
    from varlide import __version__

    images = int(counts.get("images", 0))
    by_section: dict[str, list[Figure]] = {}
    for f in figs:
        by_section.setdefault(f.section, []).append(f)

    def figs_of(section: str, empty: str) -> str:
        items = by_section.get(section, [])
        if not items:
            return f'<p class="note">{_e(empty)}</p>'
        return '<div class="figs">' + "".join(_figure_html(f) for f in items) + "</div>"

    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>varlide report · run {_e(data.run_id)}</title>",
             f"<style>{_CSS}</style></head><body>",
             f"<header><h1>varlide run report</h1><p>run <code>{_e(data.run_id)}</code> · "
             f"dataset {_e(data.dataset)} · {images} images · generated "
             f"{datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}</p></header>",
             "<nav>" + "".join(f'<a href="#{sid}">{_e(t)}</a>' for sid, t in _SECTIONS)
             + "</nav><main>"]
    parts += _summary_html(data, counts)
    parts.append(f'<section id="errors"><h2>Errors</h2>{_error_tables(data)}</section>')
    parts.append('<section id="priors"><h2>Priors</h2>'
                 + figs_of("priors", "No prior values.") + "</section>")
    parts.append('<section id="enhancement"><h2>Enhancement</h2>'
                 + figs_of("enhancement", "Enhancement was off in this run (scores only).")
                 + "</section>")
    parts.append('<section id="quality"><h2>Quality before and after</h2>'
                 + _quality_table(data)
                 + figs_of("quality", "No quality measures in this run.") + "</section>")
    parts.append('<section id="gain"><h2>Brightness gain</h2>'
                 + figs_of("gain", "No brightness gain to plot (needs the brightness measure "
                           "and enhanced images).") + "</section>")
    rank_note = (f'<p id="ranking">Ranked by <b>{_e(crit.column)}</b>: {_e(crit.description)}.'
                 "</p>" if crit else "")
    parts.append('<section id="thumbnails"><h2>Thumbnails</h2>' + rank_note
                 + figs_of("thumbnails", "No ok images to show.") + "</section>")
    if notes:
        parts.append('<section id="notes"><h2>Notes</h2><ul>'
                     + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul></section>")
    parts.append(f"<footer>varlide {_e(__version__)} · <code>varlide report</code> · the rows "
                 f"behind this page: <code>varlide query {_e(data.output_uri)} \"SELECT * FROM "
                 f"scores\" --run {_e(data.run_id)}</code></footer></main></body></html>")
    return "\n".join(parts)


def _figure_html(f: Figure) -> str:
    b64 = base64.b64encode(f.png).decode("ascii")
    wide = ' class="wide"' if f.section == "thumbnails" else ""
    return (f'<figure id="{_e(f.id)}"{wide}><img alt="{_e(f.title)}" '
            f'src="data:image/png;base64,{b64}"><figcaption>{_e(f.caption)}</figcaption>'
            "</figure>")


def _summary_html(data: RunData, counts: dict[str, float]) -> list[str]:
    """The counts cards, the incomplete-run warning and the run's details table."""
    cfg = data.manifest.get("config") or {}
    df = data.df
    first = df.iloc[0] if len(df) else {}
    images, ok_n, errors = (int(counts.get(k, 0)) for k in ("images", "ok", "errors"))
    rate = errors / images if images else 0.0
    cards = [("images", images, ""), ("ok", ok_n, ""), ("errors", errors, "bad" if errors else ""),
             ("error rate", f"{rate:.1%}", "bad" if errors else "")]
    if data.shards_total is not None:
        cards.append(("shards done", f"{data.shards_done}/{data.shards_total}", ""))
    for r in ROUTES:
        if counts.get(f"route_{r}"):
            cards.append((f"route {r}", int(counts[f"route_{r}"]), ""))
    enhancer = cfg.get("enhancer") if cfg.get("enhance", True) else None
    if enhancer is None and "enhancer" in df:
        enhancer = next(iter(df["enhancer"].dropna().unique()), None)
    details = [
        ("run id", f"<code>{_e(data.run_id)}</code>"),
        ("dataset", _e(data.dataset)),
        ("input", f"<code>{_e(data.manifest.get('input_uri'))}</code>"),
        ("output", f"<code>{_e(data.output_uri)}</code>"),
        ("created", _e(data.manifest.get("created_at"))),
        ("prior", _e(", ".join(f"{b} ({m})" for b, m in df[["prior_backend", "prior_model"]]
                               .dropna().drop_duplicates().itertuples(index=False)) or "–")),
        ("enhancer", _e(enhancer) if enhancer else "off (scores only)"),
        ("measures", _e(", ".join(data.metrics) or "–")),
        ("device", _e(", ".join(map(str, df["device"].dropna().unique())) if "device" in df
                      else "–")),
        ("schema version", _e(first.get("schema_version") if len(df) else "–")),
    ]
    parts = ['<section id="summary"><h2>Counts</h2><div class="cards">']
    for label, value, cls in cards:
        parts.append(f'<div class="card {cls}" data-count="{_e(label)}"><span class="n">'
                     f'{_e(value)}</span><span class="l">{_e(label)}</span></div>')
    parts.append("</div>")
    if data.shards_total is not None and data.shards_done != data.shards_total:
        parts.append(f'<p class="warn">Incomplete run: {data.shards_done} of '
                     f"{data.shards_total} shards done ({data.shards_failed} failed); the "
                     "figures show the rows written so far.</p>")
    parts.append('<table class="kv">' + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>"
                                               for k, v in details) + "</table></section>")
    return parts


# ---- MLflow ---------------------------------------------------------------------------------


def find_mlflow_run(run_id: str, output_uri: str | None = None,
                    recorded: str | None = None) -> tuple[str | None, str]:
    """(MLflow run id, note): the run of ``run_id`` (and ``output_uri``) in the store the
    run recorded (``recorded``, from its manifest) unless ``MLFLOW_TRACKING_URI`` says
    another, if any."""
    from varlide.tracking import RUN_ID_TAG, find_runs, redact, tracking_uri

    uri = tracking_uri(recorded)
    if uri.startswith("sqlite:///") and not os.path.exists(uri[len("sqlite:///"):]):
        return None, f"no MLflow store at {redact(uri)} (set MLFLOW_TRACKING_URI)"
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        exps = [e.experiment_id for e in client.search_experiments()]
        found = find_runs(client, exps, run_id, output_uri) if exps else []
    except Exception as exc:  # an unreachable server must not fail the report
        return None, f"MLflow at {redact(uri)} not usable: {exc}"
    if not found:
        return None, f"no MLflow run tagged {RUN_ID_TAG}={run_id} at {redact(uri)}"
    return found[0].info.run_id, f"MLflow run {found[0].info.run_id} at {redact(uri)}"


def log_to_mlflow(data: RunData, figs: Sequence[Figure], page: str) -> tuple[str | None, str]:
    """Log the figures (``report/figures/*.png``) and the page to the run's MLflow run."""
    from varlide.tracking import tracking_uri

    recorded = data.manifest.get("mlflow_tracking_uri")
    mlflow_run, note = find_mlflow_run(data.run_id, data.output_uri, recorded)
    if mlflow_run is None:
        log.info("report not logged to MLflow: %s", note)
        return None, note
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri(recorded))
    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(os.path.join(tmp, "figures"))
        for f in figs:
            with open(os.path.join(tmp, "figures", f"{f.id}.png"), "wb") as fh:
                fh.write(f.png)
        with open(os.path.join(tmp, "report.html"), "w", encoding="utf-8") as fh:
            fh.write(page)
        client.log_artifacts(mlflow_run, tmp, "report")
    log.info("report figures logged to %s", note)
    return mlflow_run, note


# ---- the whole report -----------------------------------------------------------------------


@dataclass
class ReportResult:
    uri: str
    run_id: str
    counts: dict[str, float]
    figures: list[str]
    notes: list[str]
    mlflow_run_id: str | None
    mlflow_note: str


def build_report(output_uri: str, run_id: str | None = None, out: str | None = None, *,
                 thumbs: int = 8, seed: int = 0, rank_by: str | None = None,
                 mlflow: bool = True) -> ReportResult:
    """Write a run's report (``runs/<run_id>/report.html`` or ``out``) and log it to MLflow."""
    from varlide.run import summarize_scores
    from varlide.storage.uri import write_bytes

    output_uri = _canonical(output_uri)
    run_id = resolve_run(output_uri, run_id)
    data = load_run(output_uri, run_id)
    counts = summarize_scores(data.table, tuple(data.metrics))
    figs, notes, crit = make_figures(data, thumbs=thumbs, seed=seed, rank_by=rank_by)
    page = render_html(data, figs, notes, counts, crit)
    target = _canonical(out) if out else join(output_uri, "runs", run_id, "report.html")
    write_bytes(target, page.encode("utf-8"))
    mlflow_run, note = (log_to_mlflow(data, figs, page) if mlflow
                        else (None, "MLflow logging off (--no-mlflow)"))
    return ReportResult(target, run_id, counts, [f.id for f in figs], notes, mlflow_run, note)
