"""The training task: one call into ``varlide.training.train``, logged to MLflow."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from varlide.tracking import TrainTracker
from varlide.training import TrainConfig, train


@task(name="train-enhancer", cache_policy=NO_CACHE, persist_result=False)
def train_task(corpus_uri: str, out_dir: str, config: dict[str, Any],
               experiment: str) -> dict[str, Any]:
    cfg = TrainConfig(**config)
    tracker = TrainTracker(experiment, out_dir, {"corpus_uri": corpus_uri, **cfg.as_dict()})
    try:
        result = train(corpus_uri, out_dir, cfg, on_checkpoint=tracker.on_checkpoint,
                       on_metrics=tracker.on_metrics)
    except BaseException:
        tracker.finish(ok=False)
        raise
    summary = {
        "weights_uri": result.weights_uri, "version": result.version, "steps": result.steps,
        "resumed_from": result.resumed_from, "seconds": result.seconds,
        "steps_per_s": result.steps_per_s, "split": {k: v for k, v in result.split.items()
                                                     if k != "val_rel_paths"},
        "mlflow_run_id": tracker.mlflow_run_id,
    }
    tracker.log_final(result.weights_uri, {**summary, "curves": result.curves,
                                           "val_curves": result.val_curves})
    tracker.finish(ok=True)
    return summary
