"""Evaluation tasks: thin wrappers over ``varlide.evaluation`` (and the MLflow tracker).

The plan (sets with their images chosen, enhancers, measures) is JSON-able, so a measure
task rebuilds its sets from it wherever it runs; each measure task loads one enhancer and
measures it on every set (``input``, the identity, is a task of its own).
"""

from __future__ import annotations

import io
from typing import Any

import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from varlide import evaluation

_OPTS = dict(cache_policy=NO_CACHE, persist_result=False)

PER_IMAGE_FILE = "eval_per_image.csv"
SUMMARY_FILE = "eval_summary.csv"
TABLE_FILE = "eval.md"


@task(name="eval-plan", **_OPTS)
def plan_task(input_uri: str, reference_uri: str | None, enhancers: list[str],
              weights: dict[str, str] | None, metrics: list[str] | None,
              max_images: int | None, max_side: int | None, seeds: int) -> dict[str, Any]:
    """Sets (images chosen now), enhancers (``models:/NAME@ALIAS`` pinned to the version the
    alias names now) and the measures of each kind of set."""
    sets = evaluation.plan_sets(input_uri, reference_uri, max_images=max_images,
                                max_side=max_side, seeds=seeds)
    enh = evaluation.parse_enhancers(enhancers, weights)
    for spec in enh.values():
        w = spec["weights"]
        if w and w.startswith("models:/") and "@" in w:
            from varlide.registry_mlflow import pin_model_uri

            spec["weights"] = pin_model_uri(w)
            get_run_logger().info("eval: weights %s -> %s", w, spec["weights"])
    paired, unpaired = evaluation.plan_metrics(metrics, sets)
    return {"sets": sets, "enhancers": enh, "paired_metrics": list(paired),
            "unpaired_metrics": list(unpaired)}


@task(name="eval-measure", task_run_name="eval-measure-{label}", **_OPTS)
def measure_task(sets: list[dict[str, Any]], label: str, name: str | None,
                 weights: str | None, device: str, paired_metrics: list[str],
                 unpaired_metrics: list[str], batch_size: int,
                 iqa_max_side: int | None) -> pd.DataFrame:
    """Per-image rows of one enhancer (``name`` None: the identity) on every set."""
    from varlide.engine import resolve_device

    dev = resolve_device(device)
    model = None if name is None else evaluation.load_enhancer(name, weights, dev)
    per = evaluation.measure({label: model}, evaluation.sets_from_plan(sets), dev, batch_size,
                             paired_metrics=paired_metrics, unpaired_metrics=unpaired_metrics,
                             iqa_max_side=iqa_max_side, include_input=False)
    get_run_logger().info("eval: %s measured on %d image(s)", label, len(per))
    return per


@task(name="eval-summarize", **_OPTS)
def summarize_task(frames: list[pd.DataFrame], sets: list[dict[str, Any]]
                   ) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """(per-image table, summary table, Markdown table); unpaired sets by brightness band."""
    per = pd.concat([f for f in frames if not f.empty], ignore_index=True) if any(
        not f.empty for f in frames) else pd.DataFrame()
    summary = evaluation.summarize(per, by_band={s["name"]: s["kind"] == "unpaired"
                                                 for s in sets})
    return per, summary, evaluation.format_table(summary)


@task(name="eval-write", retries=2, retry_delay_seconds=2, **_OPTS)
def write_task(per: pd.DataFrame, summary: pd.DataFrame, table: str,
               out_uri: str) -> dict[str, str]:
    """The three files under ``out_uri`` (any fsspec URI), each written whole."""
    from varlide.storage.uri import join, write_bytes

    files = {PER_IMAGE_FILE: _csv(per), SUMMARY_FILE: _csv(summary), TABLE_FILE: table}
    out: dict[str, str] = {}
    for name, text in files.items():
        uri = join(out_uri, name)
        write_bytes(uri, text.encode())
        out[name] = uri
    return out


@task(name="eval-log-run", **_OPTS)
def log_run_task(experiment: str, eval_id: str, params: dict[str, Any],
                 summary: pd.DataFrame, per: pd.DataFrame, table: str,
                 plan: dict[str, Any]) -> str:
    """One MLflow run (tag ``varlide.run_id`` = the eval id): params, the summary as
    metrics (``<set>/<enhancer>/<measure>``), the three files and the plan as artifacts."""
    from varlide.tracking import RunTracker

    tracker = RunTracker(experiment, eval_id)
    try:
        tracker.log_params(params)
        tracker.set_tags({"varlide.kind": "eval"})
        tracker.log_metrics(evaluation.summary_metrics(summary))
        tracker.log_text(_csv(per), PER_IMAGE_FILE)
        tracker.log_text(_csv(summary), SUMMARY_FILE)
        tracker.log_text(table, TABLE_FILE)
        tracker.log_dict(plan, "eval_plan.json")
    except BaseException:
        tracker.finish(ok=False)
        raise
    tracker.finish(ok=True)
    return tracker.mlflow_run_id


def _csv(df: pd.DataFrame) -> str:
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    return buf.getvalue()
