"""A run's self-contained HTML report, and its figures logged to MLflow."""

from __future__ import annotations

import base64
import html
import logging
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from varlide.analysis.figures import Figure, make_figures
from varlide.analysis.query import canonical
from varlide.analysis.rundata import (
    ROUTES,
    Criterion,
    RunData,
    load_run,
    metric_direction,
    resolve_run,
)
from varlide.storage.uri import join

log = logging.getLogger(__name__)

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

    output_uri = canonical(output_uri)
    run_id = resolve_run(output_uri, run_id)
    data = load_run(output_uri, run_id)
    counts = summarize_scores(data.table, tuple(data.metrics))
    figs, notes, crit = make_figures(data, thumbs=thumbs, seed=seed, rank_by=rank_by)
    page = render_html(data, figs, notes, counts, crit)
    target = canonical(out) if out else join(output_uri, "runs", run_id, "report.html")
    write_bytes(target, page.encode("utf-8"))
    mlflow_run, note = (log_to_mlflow(data, figs, page) if mlflow
                        else (None, "MLflow logging off (--no-mlflow)"))
    return ReportResult(target, run_id, counts, [f.id for f in figs], notes, mlflow_run, note)
