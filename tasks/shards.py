"""The shard task: one call into ``varlide.engine.process_shard``.

No result caching: the run store's markers are the one source of truth for "done".
"""

from __future__ import annotations

import dataclasses
import sys

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import task_run

from varlide import progress
from varlide.engine import ShardJob, ShardResult, process_shard
from varlide.storage.runstore import RunStore


def _dask_worker_threads() -> int | None:
    """The thread count of the Dask worker running this task, or None (not on Dask)."""
    if "distributed" not in sys.modules:  # a Dask worker has it loaded; do not import it here
        return None
    try:
        from distributed import get_worker

        return get_worker().state.nthreads
    except (ImportError, ValueError):
        return None


def _for_this_process(job: ShardJob, nthreads: int) -> ShardJob:
    """On a Dask worker, the shards in flight in this process are its threads (not --workers).

    The engine divides this process's cores among ``workers`` shards; on a Dask worker that
    is the worker's own thread count, whatever the submitting machine's setting was.
    """
    if job.config.get("workers") == nthreads:
        return job
    return dataclasses.replace(job, config={**job.config, "workers": nthreads})


def _finished_before(job: ShardJob) -> ShardResult | None:
    """The shard's result from its done marker, when an earlier attempt of this run wrote it.

    Dask recomputes a task whose result was held by a worker that died before the flow read
    it; the marker (written last) says the shard is already done, so it is not redone.
    """
    marker = RunStore(job.output_uri, job.run_id).read_marker(job.shard.index)
    return None if marker is None else ShardResult.from_marker(marker)


@task(name="process-shard", cache_policy=NO_CACHE, persist_result=False,
      task_run_name="shard-{job.shard.index:05d}")
def process_shard_task(job: ShardJob) -> ShardResult:
    # The flow registers a reporter only where tasks run in its own process (thread runner);
    # with Dask it advances the bar per finished shard instead.
    nthreads = _dask_worker_threads()
    if nthreads is not None:
        if (done := _finished_before(job)) is not None:
            return done
        job = _for_this_process(job, nthreads)
    reporter = progress.reporter(job.run_id)
    result = process_shard(job, progress=None if reporter is None else reporter.update)
    result.tries = task_run.get_run_count() or 1  # > 1: Prefect retried the shard
    return result
