"""The main job: plan a run, map the pending shards, record the run.

Thin on purpose: per-image work is in ``varlide.engine``, planning and summaries in
``varlide.run``. The flow adds what orchestration owns: retries with backoff, concurrency
(``workers`` shards in flight), the run lock, failure markers and Prefect artifacts.

Execution: a thread runner on this machine by default; with ``dask`` (``--dask``) the shard
tasks run on a Dask cluster through prefect-dask, either an existing one (its scheduler
address) or ``local:N``, a ``LocalCluster`` of N single-threaded worker processes on loopback.
GPU-bound shards carry the Dask resource annotation ``GPU=1``, so they run only on workers
started with ``--resources GPU=1``, one at a time per GPU. ``local:N`` worker processes start
with this process's malloc settings (``varlide.allocator``).

Start-up: the Prefect API is the configured one or our temporary server (``flows.prefect_api``,
which the CLI starts before its imports); while it boots, the thread runner's stages (models,
measures) are built in a background thread, so the first shard finds them ready.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.context import FlowRunContext
from prefect.exceptions import TerminationSignal
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff

from flows import prefect_api
from tasks.runs import plan_run_task, record_run_task
from tasks.shards import process_shard_task
from varlide import allocator, progress
from varlide.config import Config, ConfigError
from varlide.engine import clear_stop, worker_name
from varlide.run import RunPlan, resolve_run
from varlide.storage import retries as store_retries
from varlide.storage.runstore import RunStore


def _artifact_key(run_id: str, what: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", f"varlide-{what}-{run_id}".lower())[:100]


def _local_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def local_cluster(**kwargs: Any):
    """``distributed.LocalCluster`` whose worker processes start with our malloc settings.

    glibc reads ``MALLOC_*`` when a process starts, so the Nanny's ``env`` (set inside the
    worker once it runs) is too late for them; Dask's ``pre-spawn-environ`` is set before the
    spawn (and replaces Dask's own ``MALLOC_TRIM_THRESHOLD_`` default with ours).
    """
    import dask
    from distributed import LocalCluster

    pre = {**dask.config.get("distributed.nanny.pre-spawn-environ", {}),
           **allocator.worker_env()}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": pre}):
        return LocalCluster(**kwargs)


def task_runner_for(cfg: Config):
    """The flow's task runner: threads here (default), or Dask (``cfg.dask``)."""
    if not cfg.dask:
        return ThreadPoolTaskRunner(max_workers=cfg.workers)
    from prefect_dask import DaskTaskRunner

    if cfg.dask.startswith("local:"):
        kwargs: dict[str, Any] = {
            "n_workers": int(cfg.dask.removeprefix("local:")), "threads_per_worker": 1,
            "processes": True, "host": "127.0.0.1", "dashboard_address": "127.0.0.1:0",
            "env": allocator.worker_env()}
        if cfg.device != "cpu" and _local_cuda():  # each worker process shares this GPU
            kwargs["resources"] = {"GPU": 1}
        return DaskTaskRunner(cluster_class=local_cluster, cluster_kwargs=kwargs)
    return DaskTaskRunner(address=cfg.dask)


@contextlib.contextmanager
def _stages_ahead(cfg: Config) -> Iterator[None]:
    """Build this process's stages in a thread while the Prefect API comes up (thread
    runner only: Dask workers build their own). The shard task's ``get_stages`` then finds
    them, or waits on the engine's lock; a failure here is left for the shard to report."""
    if cfg.dask:
        yield
        return
    from varlide.engine import get_stages

    def build() -> None:
        try:
            get_stages(cfg)
        except Exception as exc:  # the shard task builds again and records the error
            logging.getLogger(__name__).debug("stages ahead of the flow: %s", exc)

    thread = threading.Thread(target=build, name="varlide-stages", daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join()


def _shard_annotations(cfg: Config, logger) -> contextlib.AbstractContextManager:
    """Dask annotations for submitting shard tasks: ``resources={'GPU': 1}`` when GPU-bound.

    GPU-bound: ``device cuda``, or ``auto`` on a cluster with GPU workers (workers resolve
    ``auto`` themselves; a cluster without any runs ``auto`` on CPU, unannotated).
    """
    if not cfg.dask or cfg.device == "cpu":
        return contextlib.nullcontext()
    ctx = FlowRunContext.get()
    client = ctx.task_runner.client if ctx is not None else None
    workers = {} if client is None else client.scheduler_info()["workers"]
    gpus = [a for a, w in workers.items() if (w.get("resources") or {}).get("GPU", 0) >= 1]
    if not gpus:
        if cfg.device == "auto":
            return contextlib.nullcontext()
        if workers:
            raise ConfigError(f"device: cuda on Dask cluster {cfg.dask}, but none of its "
                              f"{len(workers)} worker(s) advertises a GPU resource (start GPU "
                              "workers with `dask worker ADDRESS --resources GPU=1`)")
        logger.warning("no Dask worker yet: GPU shards wait for one with --resources GPU=1")
    import dask

    logger.info("shard tasks need a GPU resource; %d GPU worker(s) now", len(gpus))
    return dask.annotate(resources={"GPU": 1})


def _run_shards(plan: RunPlan, store: RunStore,
                logger) -> tuple[dict[int, str], int, int, dict[str, int]]:
    """Map the pending shards (holding the run's lock): ``(failed {index: reason}, images
    processed, shards run, retries)``. A shard failed after its retries gets its failure
    marker; ``retries`` counts shard task reruns and object-store request retries."""
    cfg = plan.config
    store_retries.install()
    task = process_shard_task.with_options(
        retries=cfg.retries, retry_delay_seconds=exponential_backoff(cfg.retry_delay_s)
        if cfg.retry_delay_s > 0 else 0)
    failed: dict[int, str] = {}
    processed = shard_retries = retried_in_shards = 0
    retried_here = store_retries.count()
    to_do = sum(len(s.files) for s in plan.pending) + sum(plan.retry.values())
    reporter = progress.Progress(plan.images, plan.images - to_do,
                                 show_bar=cfg.progress, desc=f"run {plan.run_id}")
    per_batch = not cfg.dask  # tasks in this process report per batch; Dask ones cannot
    if per_batch:
        progress.register(plan.run_id, reporter)
    try:
        artifact = create_progress_artifact(
            100.0 * len(plan.done) / max(1, len(plan.shards)),
            key=_artifact_key(plan.run_id, "progress"), description=f"run {plan.run_id}")
        with _shard_annotations(cfg, logger):
            futures = {task.submit(plan.job(s)): s.index for s in plan.to_run}
        done = len(plan.done)
        try:
            for future in as_completed(list(futures)):
                index = futures[future]
                try:
                    result = future.result()
                    rows = plan.retry.get(index, result.rows)  # a retry redoes its errors
                    processed += rows
                    shard_retries += result.tries - 1
                    retried_in_shards += result.store_retries
                    if not per_batch:
                        reporter.update(rows, result.errors)
                except Exception as exc:  # after its retries
                    failed[index] = f"{type(exc).__name__}: {exc}"
                    _record_failure(store, index, failed[index], cfg.retries, logger)
                done += 1
                store.heartbeat()
                update_progress_artifact(artifact, 100.0 * done / max(1, len(plan.shards)))
        except (KeyboardInterrupt, TerminationSignal):
            _stop_in_flight(list(futures), store, logger)
            raise
    finally:
        progress.unregister(plan.run_id)
        reporter.close()
    # shards in this process overlap, so their own counts would count each other's retries
    retries = {"shard_retries": shard_retries, "store_retries": retried_in_shards if cfg.dask
               else store_retries.count() - retried_here}
    if retries["store_retries"] or shard_retries:
        logger.info("retried: %d object-store request(s), %d shard run(s)",
                    retries["store_retries"], shard_retries)
    return failed, processed, len(futures), retries


def _record_failure(store: RunStore, index: int, reason: str, retries: int, logger) -> None:
    try:
        store.write_failure(index, reason)
    except OSError as exc:  # the store that failed the shard (ENOSPC) may refuse this too
        logger.error("shard %05d: its failure marker could not be written: %s", index, exc)
    logger.error("shard %05d failed after %d retries: %s", index, retries, reason)


STOP_WAIT_S = 30.0  # how long a stop waits for the shards in flight to end


def _stop_in_flight(futures: list, store: RunStore, logger) -> None:
    """SIGTERM / Ctrl-C: shards in this process end at their next batch, unwritten
    (``engine.request_stop``); the lock is released only once none is left running, else
    abandoned (it names this pid, dead a moment later: the next run here takes it over)."""
    from varlide.engine import request_stop

    request_stop()
    logger.warning("stopping: waiting up to %.0f s for the shards in flight", STOP_WAIT_S)
    deadline = time.monotonic() + STOP_WAIT_S
    try:
        for future in futures:
            future.wait(max(0.0, deadline - time.monotonic()))
    except (KeyboardInterrupt, TerminationSignal):  # a second signal: leave now
        store.abandon()
        raise
    if any(future.state.is_running() or future.state.is_pending() for future in futures):
        logger.warning("shards still running after %.0f s: leaving the lock %s to this "
                       "process' pid", STOP_WAIT_S, store.lock_uri)
        store.abandon()


@flow(name="varlide-enhance", task_runner=ThreadPoolTaskRunner(max_workers=1))
def enhance_flow(input_uri: str, output_uri: str, config: dict[str, Any],
                 fresh: bool = False, retry_errors: bool = False) -> dict[str, Any]:
    """Score (and enhance) every image of INPUT into OUTPUT; resumable by run id.

    The run's lock is taken before anything is written, on the id ``resolve_run`` decides
    (planning uses the same): a second start of a live run is refused (RunLockedError)
    before it can clear (``--fresh``), replan or rewrite the live run's manifest.
    ``retry_errors``: a new attempt at the error rows of shards already done."""
    logger = get_run_logger()
    target = resolve_run(input_uri, output_uri, Config(**config))
    cfg = target.config
    store = RunStore(target.output_uri, target.run_id)
    clear_stop()
    with store.lock(owner=worker_name()):
        plan = plan_run_task(target.input_uri, target.output_uri, cfg, fresh, store,
                             retry_errors)
        logger.info(plan.describe())
        started = time.perf_counter()
        failed, processed, shards_run, retries = _run_shards(plan, store, logger)
        session = {
            "failed_shards": sorted(failed), "processed_images": processed,
            "seconds": round(time.perf_counter() - started, 3), "workers": cfg.workers,
            "worker": worker_name(), "shards_run": shards_run, **retries,
        }
        summary = record_run_task(plan, session)
    summary["failures"] = {str(k): v for k, v in failed.items()}
    m = summary["metrics"]
    create_table_artifact(
        [{"run_id": plan.run_id, "dataset": plan.dataset, "images": int(m.get("images", 0)),
          "ok": int(m.get("ok", 0)), "errors": int(m.get("errors", 0)),
          "shards": len(plan.shards), "failed_shards": ",".join(map(str, sorted(failed))),
          "images_per_s": round(m.get("images_per_s", 0.0), 2)}],
        key=_artifact_key(plan.run_id, "summary"), description="varlide run summary")
    if failed:
        logging.getLogger(__name__).error("failed shards: %s", sorted(failed))
    return summary


def run_enhance(input_uri: str, output_uri: str, cfg: Config, fresh: bool = False,
                retry_errors: bool = False) -> dict[str, Any]:
    """Run the flow: ``cfg.workers`` shards in flight here, or on Dask (``cfg.dask``).

    The run is resolved first, so the flow run's parameters (stored by Prefect) hold the
    canonical URIs with any credentials hidden (``storage.uri.hide_credentials``)."""
    target = resolve_run(input_uri, output_uri, cfg)
    runner = task_runner_for(cfg)
    with _stages_ahead(cfg), prefect_api():
        return enhance_flow.with_options(task_runner=runner)(
            target.input_uri, target.output_uri, target.config.model_dump(mode="json"),
            fresh, retry_errors)


@flow(name="varlide-enhance-job")
def enhance_job(input_uri: str, output_uri: str, config: dict[str, Any],
                fresh: bool = False) -> dict[str, Any]:
    """The deployment entry point: ``enhance_flow`` as a subflow with the task runner its
    config asks for (``workers`` threads, or Dask at ``dask``).

    A deployment runs its flow object as defined, so deploying ``enhance_flow`` itself would
    run every shard on one thread whatever ``config`` says; ``varlide serve`` and
    ``infra/prefect.yaml`` deploy this flow instead."""
    return run_enhance(input_uri, output_uri, Config(**config), fresh)
