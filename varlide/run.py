"""Run planning and summaries: the library side of a run, used by flows, CLI and benchmarks.

``prepare_run`` decides what a run is: a new run lists the corpus, plans shards and writes
the manifest; a resumed run (same run id, manifest present) reuses the stored plan and only
reports files that appeared since (they are left for a new run, never mixed into old
shards). ``summarize_run`` computes run metrics from ALL shards' Parquet, not from what one
process saw, so a resumed run reports the whole run.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from varlide import __version__
from varlide.config import Config
from varlide.imaging.encode import iter_output_names
from varlide.storage.listing import list_corpus
from varlide.storage.plan import PlannedFile, Shard, plan_from_json, plan_shards, plan_to_json
from varlide.storage.results import read_table
from varlide.storage.runstore import RunStore
from varlide.storage.uri import filesystem, join

if TYPE_CHECKING:
    from varlide.engine import ShardJob

log = logging.getLogger(__name__)

QUANTILES = (0.05, 0.5, 0.95)


def canonical_uri(uri: str) -> str:
    """Local paths become absolute (so a run id does not depend on the cwd); URIs stay."""
    if "://" in uri:
        return uri.rstrip("/")
    return os.path.abspath(os.path.expanduser(uri))


@dataclass
class RunPlan:
    run_id: str
    dataset: str
    input_uri: str
    output_uri: str
    config: Config
    shards: list[Shard]
    done: set[int]
    resumed: bool
    new_files: list[str] = field(default_factory=list)  # appeared since the stored plan

    @property
    def pending(self) -> list[Shard]:
        return [s for s in self.shards if s.index not in self.done]

    @property
    def images(self) -> int:
        return sum(len(s.files) for s in self.shards)

    def job(self, shard: Shard) -> ShardJob:
        from varlide.engine import ShardJob  # torch: not needed to plan (a dry run)

        return ShardJob(run_id=self.run_id, dataset=self.dataset, input_uri=self.input_uri,
                        output_uri=self.output_uri, shard=shard,
                        config=self.config.model_dump(mode="json"))

    def describe(self) -> str:
        pending = self.pending
        lines = [
            f"run {self.run_id} ({'resumed' if self.resumed else 'new'}), dataset {self.dataset}",
            f"  input   {self.input_uri}",
            f"  output  {self.output_uri}",
            f"  images  {self.images} in {len(self.shards)} shard(s) of up to "
            f"{self.config.shard_size}; done {len(self.done)}, to do {len(pending)} "
            f"({sum(len(s.files) for s in pending)} images)",
            f"  stages  prior={self.config.prior} "
            f"enhancer={self.config.enhancer if self.config.enhance else '(off)'} "
            f"metrics={','.join(self.config.quality_metric_names())}",
        ]
        if self.new_files:
            lines.append(f"  {len(self.new_files)} file(s) appeared since this run was planned;"
                         " they are not part of it (start a new run, e.g. with --fresh)")
        return "\n".join(lines)


def _planned_files(input_uri: str, cfg: Config) -> list[PlannedFile]:
    """The listing with each file's output name, one compact record per file (no per-file
    table beside it: a 1,000,000-key corpus plans in ~20 s and well under 1 GB)."""
    listed = list_corpus(input_uri, cfg.include, cfg.exclude, cfg.limit)
    names = iter_output_names([f.rel_path for f in listed], cfg.format)
    return [
        PlannedFile(rel_path=f.rel_path, size=f.size, out_rel_path=name.rel_path,
                    out_format=name.pil_format, out_error=name.error)
        for f, (_, name) in zip(listed, names, strict=True)
    ]


def pin_registry_weights(cfg: Config) -> Config:
    """``enhancer_weights: models:/NAME@ALIAS`` -> ``models:/NAME/VERSION`` (what the alias
    names now), so the run id, the manifest and every shard name the weights actually used,
    even when the alias moves while the run is in flight (CLI and deployment runs alike)."""
    w = cfg.enhancer_weights
    if not (cfg.enhance and w and str(w).startswith("models:/") and "@" in str(w)):
        return cfg
    from varlide.registry_mlflow import pin_model_uri

    pinned = pin_model_uri(str(w))
    log.info("weights %s -> %s", w, pinned)
    return cfg.model_copy(update={"enhancer_weights": pinned})


def prepare_run(input_uri: str, output_uri: str, cfg: Config, *, fresh: bool = False,
                write: bool = True) -> RunPlan:
    """Plan a new run or load a resumable one. ``write=False`` (dry run) writes nothing."""
    input_uri, output_uri = canonical_uri(input_uri), canonical_uri(output_uri)
    cfg = pin_registry_weights(cfg)
    if cfg.reference:
        cfg = cfg.model_copy(update={"reference": canonical_uri(cfg.reference)})
    run_id = cfg.run_id_for(input_uri)
    dataset = cfg.dataset_for(input_uri)
    store = RunStore(output_uri, run_id)
    if fresh and write and store.exists():
        store.clear(dataset)
    if store.exists() and not (fresh and not write):
        manifest = store.read_manifest()
        shards = plan_from_json(manifest["plan"])
        known = {f.rel_path for s in shards for f in s.files}
        listed = list_corpus(input_uri, cfg.include, cfg.exclude, None)
        new_files = [f.rel_path for f in listed if f.rel_path not in known]
        if cfg.limit is not None:
            new_files = []  # a limited run never claims the rest of the corpus as new
        return RunPlan(run_id, manifest.get("dataset", dataset), input_uri, output_uri, cfg,
                       shards, store.done_shards(), True, new_files)
    shards = plan_shards(_planned_files(input_uri, cfg), cfg.shard_size)
    plan = RunPlan(run_id, dataset, input_uri, output_uri, cfg, shards, set(), False)
    if write:
        store.write_manifest(build_manifest(plan))
    return plan


def build_manifest(plan: RunPlan) -> dict[str, Any]:
    return {
        "run_id": plan.run_id,
        "dataset": plan.dataset,
        "input_uri": plan.input_uri,
        "output_uri": plan.output_uri,
        "created_at": datetime.now(UTC).isoformat(),
        "varlide_version": __version__,
        "config": plan.config.model_dump(mode="json"),
        "output_config": plan.config.output_config(),
        "images": plan.images,
        "plan": plan_to_json(plan.shards),
    }


def scores_uri(output_uri: str, dataset: str, run_id: str) -> str:
    return join(output_uri, "scores", dataset, run_id)


def read_run_scores(output_uri: str, dataset: str, run_id: str) -> pa.Table | None:
    """All shards' rows of a run, or None when no shard has been written yet."""
    uri = scores_uri(output_uri, dataset, run_id)
    fs, path = filesystem(uri)
    if not fs.exists(path) or not fs.glob(f"{path}/*.parquet"):
        return None
    return read_table(uri)


def summarize_scores(table: pa.Table | None, metric_names: tuple[str, ...]) -> dict[str, float]:
    """Run metrics from rows: counts, error rate, means and quantiles of every measure."""
    if table is None or table.num_rows == 0:
        return {"images": 0.0, "ok": 0.0, "errors": 0.0}
    df = table.to_pandas()
    ok = df[df["status"] == "ok"]
    out: dict[str, float] = {
        "images": float(len(df)), "ok": float(len(ok)),
        "errors": float((df["status"] == "error").sum()),
    }
    out["error_rate"] = out["errors"] / out["images"]
    columns = ["visibility", "blur", "n_iter", "phase_strength"]
    columns += [f"q_{m}_{s}" for m in metric_names for s in ("in", "out")]
    for col in columns:
        if col not in ok:
            continue
        values = ok[col].dropna().to_numpy(dtype=np.float64)
        values = values[np.isfinite(values)]
        if values.size == 0:
            continue
        out[f"{col}_mean"] = float(values.mean())
        for q, v in zip(QUANTILES, np.quantile(values, QUANTILES), strict=True):
            out[f"{col}_p{int(q * 100):02d}"] = float(v)
    if "route" in ok:
        for route, count in ok["route"].dropna().value_counts().items():
            out[f"route_{route}"] = float(count)
    return out


def record_run(plan: RunPlan, session: dict[str, Any]) -> dict[str, Any]:
    """Summarise the whole run from its Parquet and record it in its MLflow run.

    ``session`` describes this invocation (failed shards, images processed, seconds, workers,
    device ...). Returns the summary (also logged as ``summary.json``) with ``mlflow`` added.
    """
    from varlide.tracking import RunTracker, redact

    table = read_run_scores(plan.output_uri, plan.dataset, plan.run_id)
    metrics = summarize_scores(table, plan.config.quality_metric_names())
    store = RunStore(plan.output_uri, plan.run_id)
    done = store.done_shards()
    failed = sorted(session.get("failed_shards", []))
    seconds = float(session.get("seconds") or 0.0)
    processed = int(session.get("processed_images") or 0)
    metrics.update(shards_total=float(len(plan.shards)), shards_done=float(len(done)),
                   shards_failed=float(len(failed)))
    if seconds > 0 and processed:
        metrics["images_per_s"] = processed / seconds
    summary = {
        "run_id": plan.run_id, "dataset": plan.dataset,
        "input_uri": redact(plan.input_uri), "output_uri": redact(plan.output_uri),
        "complete": len(done) == len(plan.shards), "failed_shards": failed,
        "new_files_not_in_run": len(plan.new_files), "metrics": metrics, "session": session,
    }
    tracker = RunTracker(plan.config.experiment, plan.run_id)
    tracker.log_params({"input_uri": plan.input_uri, "output_uri": plan.output_uri,
                        "run_id": plan.run_id, **plan.config.output_config(),
                        "dataset": plan.dataset})
    execution = {k: v for k, v in plan.config.model_dump(mode="json").items()
                 if k not in Config.output_fields}
    tracker.set_tags({"varlide.version": __version__, "varlide.resumed": plan.resumed,
                      **{f"exec.{k}": v for k, v in execution.items()},
                      **{f"session.{k}": v for k, v in session.items()}})
    if table is not None:
        from varlide.priors.calibration import prior_scale_tags

        tracker.set_tags(prior_scale_tags(table))
    tracker.log_metrics(metrics)
    tracker.log_dict(summary, "summary.json")
    tracker.log_dict(store.read_manifest(), "manifest.json")
    tracker.finish(ok=not failed and summary["complete"])
    summary["mlflow"] = {"tracking_uri": redact(tracker_uri()), "experiment_id":
                         tracker.experiment_id, "run_id": tracker.mlflow_run_id}
    return summary


def tracker_uri() -> str:
    from varlide.tracking import tracking_uri

    return tracking_uri()
