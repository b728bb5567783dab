"""Run planning and summaries: the library side of a run, used by flows, CLI and benchmarks.

``resolve_run`` is the one place that decides a run's id (from the canonical input and the
output-changing config), so a flow can take the run's lock before anything is listed or
written. ``prepare_run`` decides what a run is, holding that lock: a new run lists the
corpus, plans shards and writes the manifest; a resumed run (same run id, manifest present)
must have the same input and output-changing config (else ``RunMismatchError``), reuses the
stored plan, trusts a done marker only with its Parquet file, and only reports files that
appeared since (they are left for a new run, never mixed into old shards).
``summarize_run`` computes run metrics from ALL shards' Parquet, not from what one process
saw, so a resumed run reports the whole run.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from varlide import __version__
from varlide.config import Config, ConfigError
from varlide.imaging.encode import iter_output_names
from varlide.storage.listing import SkippedEntry, fold_collisions, list_corpus
from varlide.storage.plan import PlannedFile, Shard, plan_from_json, plan_shards, plan_to_json
from varlide.storage.results import read_table
from varlide.storage.runstore import RunStore
from varlide.storage.uri import filesystem, hide_credentials, join
from varlide.tracking import redact, tracking_uri

if TYPE_CHECKING:
    from varlide.engine import ShardJob

log = logging.getLogger(__name__)

QUANTILES = (0.05, 0.5, 0.95)


class RunMismatchError(ConfigError):
    """A run id reused with another input or output-changing config: resuming would mix
    rows of two corpora (or two schemas) in one run. A usage error (exit 2)."""


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
    notes: list[str] = field(default_factory=list)  # planning warnings, shown by describe()
    retry: dict[int, int] = field(default_factory=dict)  # done shard -> its error rows

    @property
    def pending(self) -> list[Shard]:
        return [s for s in self.shards if s.index not in self.done]

    @property
    def to_run(self) -> list[Shard]:
        """The shards this invocation runs: the pending ones, then the done shards whose
        error rows ``--retry-errors`` asked for."""
        return self.pending + [s for s in self.shards if s.index in self.retry]

    @property
    def images(self) -> int:
        return sum(len(s.files) for s in self.shards)

    def job(self, shard: Shard) -> ShardJob:
        from varlide.engine import ShardJob  # torch: not needed to plan (a dry run)

        return ShardJob(run_id=self.run_id, dataset=self.dataset, input_uri=self.input_uri,
                        output_uri=self.output_uri, shard=shard,
                        config=self.config.model_dump(mode="json"),
                        retry_errors=shard.index in self.retry)

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
        if self.retry:
            lines.append(f"  retry   {sum(self.retry.values())} error row(s) in "
                         f"{len(self.retry)} done shard(s) (--retry-errors)")
        lines += [f"  note    {n}" for n in self.notes]
        return "\n".join(lines)


def _planned_files(input_uri: str, cfg: Config) -> tuple[list[PlannedFile], list[str]]:
    """The listing with each file's output name, one compact record per file (no per-file
    table beside it: a 1,000,000-key corpus plans in ~20 s and well under 1 GB), and the
    planning notes (entries never read, output names that collide when case-folded)."""
    skipped: list[SkippedEntry] = []
    listed = list_corpus(input_uri, cfg.include, cfg.exclude, cfg.limit, skipped=skipped)
    names = iter_output_names([f.rel_path for f in listed], cfg.format)
    files = [
        PlannedFile(rel_path=f.rel_path, size=f.size, out_rel_path=name.rel_path,
                    out_format=name.pil_format, out_error=name.error)
        for f, (_, name) in zip(listed, names, strict=True)
    ]
    if cfg.limit is None:  # a limited run plans its first N images only
        files += [PlannedFile(e.rel_path, 0, unread=e.reason) for e in skipped]
        files.sort(key=lambda f: f.rel_path)
    notes = _skipped_notes(skipped, rows=cfg.limit is None)
    if cfg.enhance:
        notes += _collision_notes([f.out_rel_path for f in files if f.out_rel_path])
    return files, notes


def _skipped_notes(skipped: list[SkippedEntry], rows: bool = True) -> list[str]:
    """One note per reason: how many entries are never read, with examples (each gets an
    error row, unless ``rows`` is False: a ``limit``-ed run)."""
    by_reason: dict[str, list[str]] = {}
    for entry in skipped:
        by_reason.setdefault(entry.reason, []).append(entry.rel_path)
    fate = "an error row each" if rows else "no row (a limited run)"
    return [f"{len(rels)} entr{'y' if len(rels) == 1 else 'ies'} not read, {fate}: {reason} "
            f"(e.g. {', '.join(map(repr, rels[:3]))})"
            for reason, rels in by_reason.items()]


def _collision_notes(out_names: list[str]) -> list[str]:
    """A warning (and a note) when enhanced names differ only in case or in ``\\`` vs ``/``:
    distinct here, one file on a case-insensitive filesystem (macOS, Windows), where one
    output would overwrite the other."""
    groups = fold_collisions(out_names)
    if not groups:
        return []
    shown = "; ".join(" ~ ".join(map(repr, g)) for g in groups[:3])
    note = (f"{len(groups)} group(s) of enhanced names are one name on a case-insensitive "
            f"filesystem (macOS, Windows) or where '\\' separates folders: {shown}; do not "
            "copy the outputs onto such a filesystem")
    log.warning("%s", note)
    return [note]


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


@dataclass(frozen=True)
class RunTarget:
    """What a run is before anything is listed: canonical URIs, the effective config
    (registry weights pinned, reference canonical), its run id and dataset."""

    input_uri: str
    output_uri: str
    config: Config
    run_id: str
    dataset: str


def resolve_run(input_uri: str, output_uri: str, cfg: Config) -> RunTarget:
    """The one place that decides a run's id: the flow takes the lock of this id before it
    plans, and ``prepare_run`` plans the same id. Idempotent (resolving a target's own
    URIs and config again gives the same target). Credentials in the URIs are hidden
    (``storage.uri.hide_credentials``): the run id, manifest and logs never hold them."""
    input_uri = canonical_uri(hide_credentials(input_uri))
    output_uri = canonical_uri(hide_credentials(output_uri))
    cfg = pin_registry_weights(cfg)
    if cfg.reference:
        cfg = cfg.model_copy(update={"reference": canonical_uri(hide_credentials(cfg.reference))})
    return RunTarget(input_uri, output_uri, cfg, cfg.run_id_for(input_uri),
                     cfg.dataset_for(input_uri))


def prepare_run(input_uri: str, output_uri: str, cfg: Config, *, fresh: bool = False,
                write: bool = True, store: RunStore | None = None,
                retry_errors: bool = False) -> RunPlan:
    """Plan a new run or load a resumable one. ``write=False`` (dry run) writes nothing.

    Everything written (a ``--fresh`` clear, the manifest, dropped markers) is written
    holding the run's lock: pass ``store``, the RunStore that holds it (the flow does, and
    keeps it for the whole run), or the lock is taken here for the planning only.
    RunLockedError when another live run holds it; RunMismatchError when the run id exists
    with another input or output-changing config.
    """
    target = resolve_run(input_uri, output_uri, cfg)
    if not write:
        store = RunStore(target.output_uri, target.run_id)
        return _with_retry(_plan(target, store, fresh, write=False), store, retry_errors)
    if store is not None:
        if store.run_id != target.run_id or store.output_uri != target.output_uri:
            raise ValueError(f"{store!r} is not the store of run {target.run_id!r} in "
                             f"{target.output_uri}")
        if not store.holds_lock:
            raise ValueError(f"{store!r} must hold the run's lock to plan it")
        return _with_retry(_plan(target, store, fresh, write=True), store, retry_errors)
    store = RunStore(target.output_uri, target.run_id)
    with store.lock():
        return _with_retry(_plan(target, store, fresh, write=True), store, retry_errors)


def _with_retry(plan: RunPlan, store: RunStore, retry_errors: bool) -> RunPlan:
    """Add the done shards whose markers count error rows (``--retry-errors``)."""
    if retry_errors and plan.done:
        markers = store.read_markers()
        plan.retry = {i: int(markers[i].get("errors") or 0) for i in sorted(plan.done)
                      if i in markers and int(markers[i].get("errors") or 0) > 0}
    return plan


def _plan(target: RunTarget, store: RunStore, fresh: bool, write: bool) -> RunPlan:
    if fresh and write:
        store.clear(target.dataset)
    elif store.exists() and not fresh:
        return _resume(target, store, write)
    elif write and store.has_outputs(target.dataset):
        # no manifest but markers or Parquet of this run id: an interrupted clear. Stale
        # shards of the old plan would add rows to the new one: start clean.
        log.warning("run %s has scores or markers but no manifest (an interrupted --fresh?);"
                    " clearing them before planning it anew", target.run_id)
        store.clear(target.dataset)
    files, notes = _planned_files(target.input_uri, target.config)
    shards = plan_shards(files, target.config.shard_size)
    plan = RunPlan(target.run_id, target.dataset, target.input_uri, target.output_uri,
                   target.config, shards, set(), False, notes=notes)
    if write:
        store.write_manifest(build_manifest(plan))
    return plan


def _resume(target: RunTarget, store: RunStore, write: bool) -> RunPlan:
    """The stored run, checked against this invocation, its done shards verified."""
    cfg = target.config
    manifest = store.read_manifest()
    check_resumable(manifest, target)
    shards = plan_from_json(manifest["plan"])
    dataset = manifest.get("dataset", target.dataset)
    if write:
        for path in store.remove_temp_files(dataset):
            log.info("removed %s (a temp file left by an interrupted write)", path)
    done, notes = _verified_done(store, dataset, write)
    known = {f.rel_path for s in shards for f in s.files}
    listed = list_corpus(target.input_uri, cfg.include, cfg.exclude, None)
    new_files = [f.rel_path for f in listed if f.rel_path not in known]
    if cfg.limit is not None:
        new_files = []  # a limited run never claims the rest of the corpus as new
    return RunPlan(target.run_id, dataset, target.input_uri, target.output_uri, cfg, shards,
                   done, True, new_files, notes)


def _verified_done(store: RunStore, dataset: str, write: bool) -> tuple[set[int], list[str]]:
    """The done shards whose Parquet is whole, and notes on those redone.

    A marker that outlived its Parquet (an interrupted clear, a deleted file) is dropped so
    the shard is redone: rows, not markers, are what a run delivers. A damaged Parquet (not
    the size its marker recorded) goes too, after its marker, so no reader trips on it."""
    check = store.check_done(dataset)
    for index in check.redo:
        uri = store.scores_uri(dataset, index)
        why = "missing" if index in check.missing else "damaged (not the size its marker " \
            "recorded)"
        log.warning("shard %05d of run %s is marked done but its Parquet %s is %s: redoing it",
                    index, store.run_id, uri, why)
        if write:
            store.drop_marker(index)
            if index in check.damaged:
                store.remove_parquet(dataset, index)
    notes = [f"{len(shards)} shard(s) marked done had a {what} Parquet file; redone: "
             f"{', '.join(f'{i:05d}' for i in shards[:10])}"
             for what, shards in (("missing", check.missing), ("damaged", check.damaged))
             if shards]
    return check.done, notes


def check_resumable(manifest: dict[str, Any], target: RunTarget) -> None:
    """RunMismatchError unless the stored run has this input and output-changing config.

    Execution-only fields (workers, device, batch size ...) are not compared: changing
    them is how a run is resumed on other hardware."""
    input_diff = _input_diff(manifest, target)
    diffs = input_diff + _config_diff(manifest, target.config)
    if diffs:
        raise RunMismatchError(
            f"run id {target.run_id!r} already exists in {redact(target.output_uri)} with "
            f"another {'input or ' if input_diff else ''}configuration, "
            f"so resuming it would mix rows: {redact('; '.join(diffs))}. Use another "
            "--run-id (or none: the default id follows the input and config), or --fresh "
            "to discard the stored run and start it again")


def _input_diff(manifest: dict[str, Any], target: RunTarget) -> list[str]:
    stored = manifest.get("input_uri")
    if stored is None or stored == target.input_uri:
        return []
    return [f"input_uri: stored {stored!r}, now {target.input_uri!r}"]


def _config_diff(manifest: dict[str, Any], cfg: Config) -> list[str]:
    """``field: stored X, now Y`` for each output-changing field that differs. A field the
    stored run predates counts as its default (what that run effectively used)."""
    stored = manifest.get("output_config")
    if stored is None and isinstance(manifest.get("config"), dict):
        stored = {k: v for k, v in manifest["config"].items() if k in Config.output_fields}
    if stored is None:
        return []
    current = json.loads(json.dumps(cfg.output_config()))
    defaults = _default_output_config()
    return [f"{name}: stored {stored.get(name, defaults[name])!r}, now {value!r}"
            for name, value in current.items() if stored.get(name, defaults[name]) != value]


def _default_output_config() -> dict[str, Any]:
    return json.loads(json.dumps(Config().output_config()))


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
        "notes": plan.notes,
        "mlflow_tracking_uri": redact(tracking_uri()),  # where resumes and reports log
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
    columns = ["visibility", "blur", "n_iter", "phase_strength", "deblur_kernel_px"]
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
    from varlide.tracking import RunTracker

    table = read_run_scores(plan.output_uri, plan.dataset, plan.run_id)
    metrics = summarize_scores(table, plan.config.quality_metric_names())
    store = RunStore(plan.output_uri, plan.run_id)
    done, _missing = store.verified_done(plan.dataset)
    failed = sorted(session.get("failed_shards", []))
    seconds = float(session.get("seconds") or 0.0)
    processed = int(session.get("processed_images") or 0)
    metrics.update(shards_total=float(len(plan.shards)), shards_done=float(len(done)),
                   shards_failed=float(len(failed)))
    if seconds > 0 and processed:
        metrics["images_per_s"] = processed / seconds
    for name in ("store_retries", "shard_retries"):  # this session's, when it ran shards
        if name in session:
            metrics[name] = float(session[name])
    summary = {
        "run_id": plan.run_id, "dataset": plan.dataset,
        "input_uri": redact(plan.input_uri), "output_uri": redact(plan.output_uri),
        "complete": len(done) == len(plan.shards), "failed_shards": failed,
        "new_files_not_in_run": len(plan.new_files), "metrics": metrics, "session": session,
    }
    manifest = store.read_manifest()
    tracker = RunTracker(plan.config.experiment, plan.run_id, plan.output_uri,
                         tracking_uri(manifest.get("mlflow_tracking_uri")))
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
    tracker.log_dict(manifest, "manifest.json")
    tracker.finish(ok=not failed and summary["complete"])
    summary["mlflow"] = {"tracking_uri": redact(tracker.tracking_uri), "experiment_id":
                         tracker.experiment_id, "run_id": tracker.mlflow_run_id}
    return summary
