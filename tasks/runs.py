"""Run-level tasks: plan, record in MLflow. Each wraps one library call."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from varlide.config import Config
from varlide.run import RunPlan, prepare_run, record_run
from varlide.storage.runstore import RunStore


@task(name="plan-run", cache_policy=NO_CACHE, persist_result=False)
def plan_run_task(input_uri: str, output_uri: str, config: Config, fresh: bool,
                  store: RunStore | None = None, retry_errors: bool = False) -> RunPlan:
    """Plan (or load) the run; ``store``: the RunStore holding the run's lock, so the clear
    and the manifest are written under it (without one, prepare_run locks for planning)."""
    return prepare_run(input_uri, output_uri, config, fresh=fresh, store=store,
                       retry_errors=retry_errors)


@task(name="record-run", cache_policy=NO_CACHE, persist_result=False)
def record_run_task(plan: RunPlan, session: dict[str, Any]) -> dict[str, Any]:
    return record_run(plan, session)
