"""MLflow helpers: one MLflow run per varlide run id and output store, resumed when the run
comes back.

The tracking URI comes from ``MLFLOW_TRACKING_URI`` (default: a SQLite file ``mlflow.db`` in
the working directory); a relative SQLite path is made absolute when the URI is read, so the
store is one fixed file whatever directory a later step (resume, report) runs in. A run's
manifest records the store it started with (``recorded``): a resume or a report without
``MLFLOW_TRACKING_URI`` goes back to it; with the variable set, that is where it goes (a
warning says the two differ).
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
STORE_TAG = "varlide.output_uri"  # with the run id: one MLflow run per output store
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"

_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][\w+.-]*://)[^/@\s]+@")


def redact(text: str) -> str:
    """Drop ``user:secret@`` from URIs so no credential reaches a log or a param."""
    return _CREDENTIALS.sub(r"\g<scheme>***@", text)


def tracking_uri(recorded: str | None = None) -> str:
    """The MLflow store: ``MLFLOW_TRACKING_URI``, else the store a run ``recorded`` in its
    manifest, else ``sqlite:///mlflow.db``; a relative SQLite path resolved against the
    working directory now. Left relative, SQLAlchemy would resolve it at each connection, so
    a run resumed (or reported) from another directory would silently open a new, empty
    store and a new MLflow run."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if recorded and not env and "***@" in recorded:  # its credentials were never stored
        log.warning("this run logged to MLflow at %s; set MLFLOW_TRACKING_URI (with its "
                    "credentials) to log there again", recorded)
        recorded = None
    uri = absolute_sqlite_uri(_credentials_to_env(env or recorded or DEFAULT_TRACKING_URI))
    if env and recorded and uri != recorded:
        log.warning("this run logged to MLflow at %s; MLFLOW_TRACKING_URI says %s: using it",
                    redact(recorded), redact(uri))
    return uri


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


def _default_artifact_location(uri: str) -> str | None:
    """Artifacts beside a local SQLite store (``<db dir>/mlartifacts``), not in the cwd.

    MLflow's own default for a SQLite store is ``./mlruns`` of whatever directory the process
    happens to run in; keeping them next to the database keeps a store self-contained.
    """
    if uri.startswith("sqlite:///"):
        db = os.path.abspath(uri.removeprefix("sqlite:///"))
        return "file://" + os.path.join(os.path.dirname(db), "mlartifacts")
    return None


def _client(uri: str | None = None):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri or tracking_uri())


def _experiment_id(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return client.create_experiment(
            name, artifact_location=_default_artifact_location(client.tracking_uri))
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


def find_runs(client, experiment_ids: list[str], varlide_run_id: str,
              output_uri: str | None = None) -> list:
    """MLflow runs of a varlide run id, newest first; with ``output_uri`` only that output
    store's (a run from before the store tag, which has none, still counts)."""
    found = client.search_runs(experiment_ids,
                               filter_string=f"tags.`{RUN_ID_TAG}` = '{varlide_run_id}'",
                               max_results=100, order_by=["attributes.start_time DESC"])
    if output_uri is None:
        return found
    key = redact(output_uri)
    return [r for r in found if r.data.tags.get(STORE_TAG, key) == key]


class RunTracker:
    """The MLflow side of one varlide run (created or resumed by run id and output store:
    the same run id written to two output stores is two runs, so two MLflow runs)."""

    def __init__(self, experiment: str, varlide_run_id: str, output_uri: str | None = None,
                 uri: str | None = None) -> None:
        self.tracking_uri = uri or tracking_uri()
        self.client = _client(self.tracking_uri)
        self.experiment_id = _experiment_id(self.client, experiment)
        found = find_runs(self.client, [self.experiment_id], varlide_run_id, output_uri)
        tags = {RUN_ID_TAG: varlide_run_id}
        if output_uri is not None:
            tags[STORE_TAG] = redact(output_uri)
        self.resumed = bool(found)
        if found:
            self.mlflow_run_id = found[0].info.run_id
            self.client.update_run(self.mlflow_run_id, status="RUNNING")
            self.set_tags(tags)
        else:
            run = self.client.create_run(self.experiment_id, run_name=varlide_run_id,
                                         tags=tags)
            self.mlflow_run_id = run.info.run_id

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
