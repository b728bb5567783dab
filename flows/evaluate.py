"""Evaluation: a table of quality measures per enhancer (``varlide eval``).

INPUT ``synthetic`` (the demo-corpus generator), a folder with ``reference_uri`` (pairs by
relative name: psnr, ssim, brightness) or a folder alone (no-reference measures, also by
input brightness band). The flow plans once (images chosen, enhancers, measures), maps one
measure task per enhancer (plus ``input``, the identity, always first; learned enhancers
with routing off, so rows measure models, not the router), then writes
``eval_per_image.csv``, ``eval_summary.csv`` and ``eval.md`` to ``out`` (any fsspec URI;
default ``./eval-<UTC time>-<hex>`` in the working directory), logs the summary metrics and
the files to one MLflow run (experiment ``varlide-eval``) and creates a Prefect table
artifact. The library (``varlide.evaluation``) knows nothing of Prefect.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from tasks.evaluation import log_run_task, measure_task, plan_task, summarize_task, write_task
from varlide.evaluation import DEFAULT_ENHANCERS, DEFAULT_MAX_SIDE, INPUT, SYNTHETIC
from varlide.run import canonical_uri
from varlide.tracking import redact


def new_eval_id() -> str:
    """``eval-<UTC time>-<6 hex>``: the MLflow run name and the default output folder."""
    return f"eval-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:6]}"


def _artifact_key(eval_id: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", f"varlide-{eval_id}".lower())[:100]


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 4)
    return value


# One enhancer at a time: each task already uses every core (torch) or the GPU.
@flow(name="varlide-eval", task_runner=ThreadPoolTaskRunner(max_workers=1))
def eval_flow(input_uri: str, reference_uri: str | None = None,
              enhancers: list[str] | None = None, weights: dict[str, str] | None = None,
              out: str | None = None, metrics: list[str] | None = None,
              max_images: int | None = None, max_side: int | None = DEFAULT_MAX_SIDE,
              seeds: int = 1, device: str = "auto", experiment: str = "varlide-eval",
              batch_size: int = 8, iqa_max_side: int | None = None,
              eval_id: str | None = None) -> dict[str, Any]:
    """Measure ``enhancers`` (``NAME`` or ``NAME=WEIGHTS_URI``, registered names; default
    classic-curve, zero-dce, varlide-lite; ``weights``: NAME -> weights for a plain NAME,
    ``models:/NAME@ALIAS`` pinned to its version) and the input on INPUT's set.

    ``metrics``: measure names (default: psnr, ssim, brightness on paired sets; brightness,
    overexposed, piqe, entropy, sharpness on unpaired ones); ``max_images``: at most this
    many images; ``max_side``: folder images area-downscaled to this long side (0/None: as
    stored; synthetic crops are ``min(max_side, 256)`` px); ``seeds``: synthetic seeds
    0..N-1. Returns the summary rows, the Markdown table, where the files went and the
    MLflow run id."""
    logger = get_run_logger()
    started = time.perf_counter()
    eval_id = eval_id or new_eval_id()
    input_uri = input_uri if input_uri == SYNTHETIC else canonical_uri(input_uri)
    reference_uri = canonical_uri(reference_uri) if reference_uri else None
    out_uri = canonical_uri(out or eval_id)
    enhancers = list(enhancers) if enhancers is not None else list(DEFAULT_ENHANCERS)
    plan = plan_task(input_uri, reference_uri, enhancers, weights, metrics, max_images,
                     max_side, seeds)
    sets = plan["sets"]
    logger.info("eval %s: %s on %s", eval_id, ", ".join([INPUT, *plan["enhancers"]]),
                "; ".join(f"{s['name']} ({s['kind']})" for s in sets))
    rows = [(INPUT, None, None)] + [(label, e["name"], e["weights"])
                                    for label, e in plan["enhancers"].items()]
    futures = [measure_task.submit(sets, label, name, w, device, plan["paired_metrics"],
                                   plan["unpaired_metrics"], batch_size, iqa_max_side)
               for label, name, w in rows]
    frames = [f.result() for f in futures]
    per, summary, table = summarize_task(frames, sets)
    files = write_task(per, summary, table, out_uri)
    counts = {s["name"]: int(summary.loc[summary["set"] == s["name"], "n"].max())
              if not summary.empty and (summary["set"] == s["name"]).any() else 0
              for s in sets}
    params = {  # values, not keys, carry labels and names (MLflow keys allow few characters)
        "input_uri": redact(input_uri), "reference_uri": redact(reference_uri or ""),
        "enhancers": [f"{label}: {e['name']} ({redact(e['weights'] or 'shipped weights')})"
                      for label, e in plan["enhancers"].items()],
        "metrics.paired": plan["paired_metrics"], "metrics.unpaired": plan["unpaired_metrics"],
        "max_images": max_images, "max_side": max_side, "seeds": seeds, "device": device,
        "out": redact(out_uri),
        "sets": [f"{s['name']} ({s['kind']} set, {counts[s['name']]} images)" for s in sets],
    }
    run_id = log_run_task(experiment, eval_id, params, summary, per, table,
                          json.loads(redact(json.dumps(plan))))
    records = [{k: _cell(v) for k, v in r.items()} for r in summary.to_dict("records")]
    create_table_artifact(
        [{k: v for k, v in r.items() if not k.endswith("_std")} for r in records],
        key=_artifact_key(eval_id), description=f"varlide eval {eval_id}: means per set, "
        f"band and enhancer (files: {redact(out_uri)})")
    seconds = round(time.perf_counter() - started, 3)
    logger.info("eval %s: %d rows in %.1f s; files in %s; MLflow run %s", eval_id,
                len(per), seconds, redact(out_uri), run_id)
    return {
        "eval_id": eval_id, "out": out_uri, "files": files, "mlflow_run_id": run_id,
        "experiment": experiment, "table": table, "summary": records,
        "sets": [{"name": s["name"], "kind": "unpaired" if s["kind"] == "unpaired" else "paired",
                  "images": counts[s["name"]]} for s in sets],
        "enhancers": {INPUT: {"name": None, "weights": None}, **plan["enhancers"]},
        "seconds": seconds,
    }
