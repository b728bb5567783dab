"""Analyst access to the score tables: SQL over them (DuckDB) and a run's HTML report.

``varlide query`` and ``varlide report`` are thin shells over this module (no Prefect here).

SQL: :func:`connect` lists the score files of an output store through fsspec and exposes
them to DuckDB as one view, ``scores`` (every run, or one with ``run_id``). Files of runs
with different measures are read with ``union_by_name`` (a column a run lacks is NULL).
For a remote store (``s3://`` ...) the fsspec filesystem is registered on the connection,
so DuckDB reads through s3fs (endpoint from ``AWS_ENDPOINT_URL``) and no DuckDB extension
is downloaded (auto-install of extensions is off).

Report: :func:`build_report` reads one run's rows and writes a self-contained HTML page
(inline CSS, figures as inline base64 PNGs from matplotlib's Agg backend, no script, no
external URL): counts and error reasons, histograms of v, b, ``n_iter``, ``route`` and every
quality measure before and after, v against brightness gain, and thumbnail grids (worst,
best, random) of before/after pairs read from ``source_uri`` / ``enhanced_uri``. The same
figures (and the page) go to the run's MLflow run, found by its ``varlide.run_id`` tag.

Thumbnail ranking (:func:`rank_criterion`, documented on the page): by default the change of
``piqe`` (the run's no-reference perceptual measure, lower is better), improvement =
``q_piqe_in - q_piqe_out``; without piqe, the first measure with a preferred direction,
signed so that positive = improved; without one, the brightness gain. With enhancement off
(no after images) the ranking is by visibility v (worst = darkest). ``rank_by`` picks a
measure (its improvement, or its input value without enhancement) or ``visibility``. The
worst and best grids take at most half the ranked images each, so they never overlap; the
random grid is a seeded uniform sample of the ok images.
"""


from varlide.analysis.figures import AFTER, BEFORE, Figure, make_figures
from varlide.analysis.query import VIEW, AnalysisError, connect, export, run_sql, score_files, show
from varlide.analysis.report import ReportResult, build_report, find_mlflow_run, log_to_mlflow
from varlide.analysis.rundata import (
    Criterion,
    RunData,
    load_run,
    rank_criterion,
    resolve_run,
    run_ids_with_scores,
)

__all__ = [
    "AFTER", "BEFORE", "VIEW", "AnalysisError", "Criterion", "Figure", "ReportResult", "RunData",
    "build_report", "connect", "export", "find_mlflow_run", "load_run", "log_to_mlflow",
    "make_figures", "rank_criterion", "resolve_run", "run_ids_with_scores", "run_sql",
    "score_files", "show",
]
