"""The shard task: one call into ``varlide.engine.process_shard``.

No result caching: the run store's markers are the one source of truth for "done".
"""

from __future__ import annotations

import dataclasses

from prefect import task
from prefect.cache_policies import NO_CACHE

from varlide import progress
from varlide.engine import ShardJob, ShardResult, process_shard


def _for_this_process(job: ShardJob) -> ShardJob:
    """On a Dask worker, the shards in flight in this process are its threads (not --workers).

    The engine divides this process's cores among ``workers`` shards; on a Dask worker that
    is the worker's own thread count, whatever the submitting machine's setting was.
    """
    try:
        from distributed import get_worker

        nthreads = get_worker().state.nthreads
    except (ImportError, ValueError):  # not on a Dask worker
        return job
    if job.config.get("workers") == nthreads:
        return job
    return dataclasses.replace(job, config={**job.config, "workers": nthreads})


@task(name="process-shard", cache_policy=NO_CACHE, persist_result=False,
      task_run_name="shard-{job.shard.index:05d}")
def process_shard_task(job: ShardJob) -> ShardResult:
    # The flow registers a reporter only where tasks run in its own process (thread runner);
    # with Dask it advances the bar per finished shard instead.
    reporter = progress.reporter(job.run_id)
    return process_shard(_for_this_process(job),
                         progress=None if reporter is None else reporter.update)
