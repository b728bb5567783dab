"""Retraining tasks: thin wrappers over ``varlide.promotion`` / ``varlide.registry_mlflow``.

Every task records into the retrain's own MLflow run (``RunTracker`` keyed by the retrain id,
experiment ``varlide-retrain`` by default): training curves (``train/...``), both scores,
the decision and the registered versions.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from varlide import promotion
from varlide import registry_mlflow as registry
from varlide.tracking import RunTracker

_OPTS = dict(cache_policy=NO_CACHE, persist_result=False)


@task(name="retrain-start-run", **_OPTS)
def start_run_task(experiment: str, retrain_id: str, params: dict[str, Any]) -> str:
    tracker = RunTracker(experiment, retrain_id)
    tracker.log_params(params)
    return tracker.mlflow_run_id


@task(name="retrain-select-images", retries=2, retry_delay_seconds=5, **_OPTS)
def select_images_task(output_uri: str, dataset: str, newest: int,
                       corpus_uri: str) -> dict[str, Any]:
    images = promotion.newest_scored_images(output_uri, dataset, newest)
    promotion.stage_corpus(images, corpus_uri)
    get_run_logger().info("retrain: %d newest scored images of %s staged in %s",
                          len(images), dataset, corpus_uri)
    return {"corpus_uri": corpus_uri, "images": len(images),
            "newest_processed_at": images[0]["processed_at"] if images else None,
            "oldest_processed_at": images[-1]["processed_at"] if images else None}


@task(name="retrain-ensure-champion", **_OPTS)
def ensure_champion_task(model_name: str, alias: str, initial_weights: str | None,
                         mlflow_run_id: str, enhancer: str) -> dict[str, Any]:
    """The champion's version; with none, ``enhancer``'s shipped weights (the enhancer the
    run trains, not the registered model's name) are registered and promoted."""
    mv = registry.get_alias(model_name, alias)
    if mv is not None:
        return {"version": str(mv.version), "bootstrapped": False}
    if initial_weights is None:
        from varlide.models.varlide_lite import default_weights_dir, missing_default_weights

        folder = default_weights_dir(enhancer)
        if not (folder / "model.safetensors").is_file():
            raise missing_default_weights(enhancer)
        initial_weights = str(folder)
    mv = registry.register_weights(initial_weights, model_name, run_id=mlflow_run_id,
                                   tags={registry.TAG_SOURCE: "shipped weights (bootstrap)"},
                                   description="shipped weights, the first champion")
    registry.set_alias(model_name, mv.version, alias)
    get_run_logger().info("retrain: no %s@%s yet: registered %s as version %s and made it %s",
                          model_name, alias, initial_weights, mv.version, alias)
    return {"version": str(mv.version), "bootstrapped": True}


@task(name="retrain-resolve-weights", retries=2, retry_delay_seconds=5, **_OPTS)
def resolve_task(model_uri: str) -> str:
    return registry.resolve_model_uri(model_uri)


@task(name="retrain-train-candidate", **_OPTS)
def train_candidate_task(corpus_uri: str, out_dir: str, champion_dir: str,
                         overrides: dict[str, Any], experiment: str,
                         retrain_id: str) -> dict[str, Any]:
    from varlide.training import TrainConfig, train

    cfg = TrainConfig(**promotion.finetune_config(champion_dir, overrides))
    tracker = RunTracker(experiment, retrain_id)
    tracker.log_params({f"train.{k}": v for k, v in cfg.as_dict().items()})
    result = train(corpus_uri, out_dir, cfg, on_metrics=lambda step, m: tracker.log_metrics(
        {f"train/{k}": v for k, v in m.items()}, step=step))
    return {"weights_uri": result.weights_uri, "version": result.version,
            "steps": result.steps, "seconds": result.seconds,
            "held_out": result.split["val_rel_paths"],
            "split": {k: v for k, v in result.split.items() if k != "val_rel_paths"}}


@task(name="retrain-evaluate", **_OPTS)
def evaluate_task(corpus_uri: str, held_out: list[str], champion_dir: str,
                  candidate_dir: str, evaluation: dict[str, Any]) -> dict[str, Any]:
    cfg = promotion.EvalConfig(**evaluation)
    sets = promotion.heldout_sets(corpus_uri, held_out, cfg)
    champ, cand, inp = promotion.score_pair(champion_dir, candidate_dir, sets, cfg)
    return {"champion": champ, "candidate": cand, "input": inp,
            "sets": {s.name: s.description for s in sets}}


@task(name="retrain-cleanup", **_OPTS)
def cleanup_task(uri: str) -> None:
    """Remove the staged copy of the images (the weights stay, and are in MLflow)."""
    from varlide.storage.uri import filesystem

    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


@task(name="retrain-register-and-gate", **_OPTS)
def register_and_gate_task(candidate_dir: str, model_name: str, alias: str,
                           champion_version: str, scores: dict[str, Any],
                           gate: dict[str, Any], experiment: str,
                           retrain_id: str) -> dict[str, Any]:
    tracker = RunTracker(experiment, retrain_id)
    summary = promotion.register_and_gate(candidate_dir, model_name, champion_version, scores,
                                          promotion.GateConfig(**gate), tracker, alias=alias,
                                          source=f"retrain {retrain_id}")
    get_run_logger().info("retrain: %s (%s); %s@%s = version %s", summary["decision"],
                          summary["reason"], model_name, alias,
                          summary["champion_version_after"])
    return summary
