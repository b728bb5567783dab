"""Scheduled retraining with a promotion gate (served nightly by ``varlide serve``).

newest N scored images of a dataset (OUTPUT store, by ``processed_at``) -> train from the
current champion -> measure champion and candidate on the same held-out images with the
same weight-free measures -> register the candidate (MLflow pyfunc model) -> move the
``champion`` alias only when better by the gate's margin -> decision and both scores in the
retrain's MLflow run. With no champion yet, the shipped weights become version 1 = champion.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger

from tasks.retrain import (
    cleanup_task,
    ensure_champion_task,
    evaluate_task,
    register_and_gate_task,
    resolve_task,
    select_images_task,
    start_run_task,
    train_candidate_task,
)
from varlide.run import canonical_uri
from varlide.storage.uri import join
from varlide.tracking import redact
from varlide.training import TrainConfig


@flow(name="varlide-retrain")
def retrain_flow(output_uri: str, dataset: str, model_name: str = "varlide-lite",
                 newest: int = 512, train: dict[str, Any] | None = None,
                 gate: dict[str, Any] | None = None, evaluation: dict[str, Any] | None = None,
                 initial_weights: str | None = None, work_dir: str | None = None,
                 experiment: str = "varlide-retrain", alias: str = "champion",
                 keep_corpus: bool = False) -> dict[str, Any]:
    """Retrain ``model_name`` on the newest ``newest`` scored images of ``dataset`` and
    promote the candidate to ``alias`` only when the gate says so.

    ``train``: TrainConfig overrides (steps, crop, batch_size, val_fraction ...);
    ``gate``: GateConfig (primary, margin, guards); ``evaluation``: EvalConfig;
    ``initial_weights``: the first champion when the registry has none (default: the
    shipped weights); ``work_dir``: staged corpus and training output (default
    OUTPUT/retrain/<retrain id>; the staged images are removed at the end unless
    ``keep_corpus``)."""
    logger = get_run_logger()
    output_uri = canonical_uri(output_uri)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    retrain_id = f"retrain-{dataset}-{stamp}-{uuid.uuid4().hex[:6]}"
    work = canonical_uri(work_dir) if work_dir else join(output_uri, "retrain", retrain_id)
    run_id = start_run_task(experiment, retrain_id, {
        "output_uri": redact(output_uri), "dataset": dataset, "model_name": model_name,
        "alias": alias, "newest": newest, "gate": gate or {}, "evaluation": evaluation or {},
        "work_dir": redact(work)})
    data = select_images_task(output_uri, dataset, newest, join(work, "corpus"))
    enhancer = (train or {}).get("enhancer") or TrainConfig.enhancer  # what is retrained
    champ = ensure_champion_task(model_name, alias, initial_weights, run_id, enhancer)
    champion_dir = resolve_task(f"models:/{model_name}/{champ['version']}")
    trained = train_candidate_task(data["corpus_uri"], join(work, "train"), champion_dir,
                                   train or {}, experiment, retrain_id)
    scores = evaluate_task(data["corpus_uri"], trained["held_out"], champion_dir,
                           trained["weights_uri"], evaluation or {})
    summary = register_and_gate_task(trained["weights_uri"], model_name, alias,
                                     champ["version"], scores, gate or {}, experiment,
                                     retrain_id)
    if not keep_corpus:
        cleanup_task(data["corpus_uri"])
    summary.update(retrain_id=retrain_id, mlflow_run_id=run_id, work_dir=redact(work),
                   data=data, bootstrapped=champ["bootstrapped"], scores=scores,
                   training={k: v for k, v in trained.items() if k != "held_out"})
    logger.info("retrain %s: %s", retrain_id, summary["reason"])
    return summary
