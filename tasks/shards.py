"""The shard task: one call into ``varlide.engine.process_shard``.

No result caching: the run store's markers are the one source of truth for "done".
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from varlide import progress
from varlide.engine import ShardJob, ShardResult, process_shard


@task(name="process-shard", cache_policy=NO_CACHE, persist_result=False,
      task_run_name="shard-{job.shard.index:05d}")
def process_shard_task(job: ShardJob) -> ShardResult:
    reporter = progress.reporter(job.run_id)
    return process_shard(job, progress=None if reporter is None else reporter.update)
