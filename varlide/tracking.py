"""MLflow helpers: one MLflow run per varlide run id, resumed when the run id comes back.

The tracking URI comes from ``MLFLOW_TRACKING_URI`` (default: a SQLite file ``mlflow.db`` in
the working directory); a relative SQLite path is made absolute when the URI is read, so the
store is one fixed file whatever directory a later step (resume, report) runs in.
Output-changing config goes in as params (they cannot change within a run id); execution
details (workers, device, ...) go in as tags, which may change on a resume. Run metrics are
logged from the summary of all shards' Parquet. Nothing here reads credentials, and URIs
are redacted before they are logged.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

log = logging.getLogger(__name__)

RUN_ID_TAG = "varlide.run_id"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"

_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][\w+.-]*://)[^/@\s]+@")


def redact(text: str) -> str:
    """Drop ``user:secret@`` from URIs so no credential reaches a log or a param."""
    return _CREDENTIALS.sub(r"\g<scheme>***@", text)


def tracking_uri() -> str:
    """The MLflow store: ``MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``, a relative SQLite
    path resolved against the working directory now. Left relative, SQLAlchemy would resolve
    it at each connection, so a run resumed (or reported) from another directory would
    silently open a new, empty store and a new MLflow run."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    return absolute_sqlite_uri(_credentials_to_env(uri))


def _credentials_to_env(uri: str) -> str:
    """``http://user:secret@host`` -> ``http://host``, with MLflow's own
    ``MLFLOW_TRACKING_USERNAME`` / ``PASSWORD`` set from it (unless set already): MLflow
    sends them as basic auth, and never prints them (its "View run at" line prints the
    tracking URI)."""
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return uri
    if parts.username is not None:
        os.environ.setdefault("MLFLOW_TRACKING_USERNAME", unquote(parts.username))
    if parts.password is not None:
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", unquote(parts.password))
    clean = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
    if os.environ.get("MLFLOW_TRACKING_URI") == uri:
        os.environ["MLFLOW_TRACKING_URI"] = clean  # what MLflow itself reads, cleaned too
    return clean


def absolute_sqlite_uri(uri: str) -> str:
    """``sqlite:///rel/x.db`` -> ``sqlite:////<cwd>/rel/x.db`` (a query string kept); absolute
    and in-memory SQLite URIs and every other scheme are returned as they are."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return uri
    path, sep, query = uri.removeprefix(prefix).partition("?")
    if not path or path == ":memory:" or os.path.isabs(path):
        return uri
    return f"{prefix}{os.path.abspath(path)}{sep}{query}"


def _default_artifact_location() -> str | None:
    """Artifacts beside a local SQLite store (``<db dir>/mlartifacts``), not in the cwd.

    MLflow's own default for a SQLite store is ``./mlruns`` of whatever directory the process
    happens to run in; keeping them next to the database keeps a store self-contained.
    """
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        db = os.path.abspath(uri.removeprefix("sqlite:///"))
        return "file://" + os.path.join(os.path.dirname(db), "mlartifacts")
    return None


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri())


def _experiment_id(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_default_artifact_location())
    except Exception:  # created concurrently by another process
        return client.get_experiment_by_name(name).experiment_id


def _flatten(prefix: str, value: Any) -> dict[str, str]:
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for k, v in value.items():
            out.update(_flatten(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    return {prefix: redact(str(value))[:6000]}


class RunTracker:
    """The MLflow side of one varlide run (created or resumed by run id)."""

    def __init__(self, experiment: str, varlide_run_id: str) -> None:
        from mlflow.entities import RunStatus

        self._status = RunStatus
        self.client = _client()
        self.experiment_id = _experiment_id(self.client, experiment)
        found = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{RUN_ID_TAG}` = '{varlide_run_id}'",
            max_results=1,
        )
        self.resumed = bool(found)
        if found:
            self.mlflow_run_id = found[0].info.run_id
            self.client.update_run(self.mlflow_run_id, status="RUNNING")
        else:
            run = self.client.create_run(self.experiment_id, run_name=varlide_run_id,
                                         tags={RUN_ID_TAG: varlide_run_id})
            self.mlflow_run_id = run.info.run_id

    @property
    def url(self) -> str:
        return f"{redact(tracking_uri())} experiment {self.experiment_id} run {self.mlflow_run_id}"

    def log_params(self, params: dict[str, Any]) -> None:
        """Params once per run; on a resume, differing values are kept as they were."""
        from mlflow.entities import Param

        flat = _flatten("", params)
        existing = self.client.get_run(self.mlflow_run_id).data.params
        new = [Param(k, v) for k, v in flat.items() if k not in existing]
        changed = [k for k, v in flat.items() if k in existing and existing[k] != v]
        if changed:
            log.warning("MLflow params differ from the run's first start; kept: %s", changed)
        for i in range(0, len(new), 100):
            self.client.log_batch(self.mlflow_run_id, params=new[i:i + 100])

    def set_tags(self, tags: dict[str, Any]) -> None:
        for k, v in _flatten("", tags).items():
            self.client.set_tag(self.mlflow_run_id, k, v)

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if v is not None and v == v]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.mlflow_run_id, metrics=items[i:i + 500])

    def log_dict(self, data: dict[str, Any], artifact_file: str) -> None:
        self.client.log_dict(self.mlflow_run_id, data, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.mlflow_run_id, text, artifact_file)

    def finish(self, ok: bool) -> None:
        self.client.set_terminated(self.mlflow_run_id, status="FINISHED" if ok else "FAILED")


class TrainTracker:
    """The MLflow side of a training run: curves, every checkpoint, the final weights.

    Keyed by the training output folder, so a killed and resumed training run continues the
    same MLflow run (experiment ``varlide-train`` unless configured).
    """

    TAG = "varlide.train_out"

    def __init__(self, experiment: str, out_dir: str, params: dict[str, Any]) -> None:
        self.client = _client()
        self.experiment_id = _experiment_id(self.client, experiment)
        key = redact(out_dir)
        found = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{self.TAG}` = '{key}'", max_results=1)
        if found:
            self.mlflow_run_id = found[0].info.run_id
            self.client.update_run(self.mlflow_run_id, status="RUNNING")
        else:
            run = self.client.create_run(self.experiment_id, run_name=key.rsplit("/", 1)[-1],
                                         tags={self.TAG: key})
            self.mlflow_run_id = run.info.run_id
        existing = self.client.get_run(self.mlflow_run_id).data.params
        from mlflow.entities import Param

        new = [Param(k, v) for k, v in _flatten("", params).items() if k not in existing]
        for i in range(0, len(new), 100):
            self.client.log_batch(self.mlflow_run_id, params=new[i:i + 100])

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k.replace("/", "_"), float(v), now, step) for k, v in metrics.items()
                 if v is not None and v == v]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.mlflow_run_id, metrics=items[i:i + 500])

    def on_checkpoint(self, step: int, path: str) -> None:
        self.client.log_artifacts(self.mlflow_run_id, path, f"checkpoints/step-{step:07d}")

    def log_final(self, weights_dir: str, summary: dict[str, Any]) -> None:
        self.client.log_artifacts(self.mlflow_run_id, weights_dir, "weights")
        self.client.log_dict(self.mlflow_run_id, summary, "train_summary.json")

    def finish(self, ok: bool) -> None:
        self.client.set_terminated(self.mlflow_run_id, status="FINISHED" if ok else "FAILED")
