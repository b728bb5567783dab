"""SQL over the score tables (DuckDB): the ``scores`` view, ``varlide query``."""

from __future__ import annotations

import logging
import os
import shutil

from varlide.storage.uri import filesystem, is_local_fs, join

log = logging.getLogger(__name__)


VIEW = "scores"


class AnalysisError(ValueError):
    """A user-facing problem with a query or a report (the message says what to do)."""


def canonical(uri: str) -> str:
    if "://" in uri:
        return uri.rstrip("/")
    return os.path.abspath(os.path.expanduser(uri))


def _full_uri(fs, path: str) -> str:
    """A path from ``fs`` back to a URI DuckDB and fsspec both read (plain path locally)."""
    if is_local_fs(fs):
        return path
    proto = fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol
    return f"{proto}://{path}"


def plain_component(value: str, what: str) -> str:
    if not value or "/" in value or "\\" in value or value in (".", "..") or "'" in value:
        raise AnalysisError(f"{what} must be a plain name, got {value!r}")
    return value


# ---- score files and SQL ------------------------------------------------------------------


def score_files(output_uri: str, run_id: str | None = None) -> list[str]:
    """URIs of ``<out>/scores/<dataset>/<run_id>/*.parquet`` (one run's when ``run_id``).

    AnalysisError with what to do when there are none.
    """
    output_uri = canonical(output_uri)
    scores = join(output_uri, "scores")
    fs, root = filesystem(scores)
    fs.invalidate_cache()
    if not fs.exists(root):
        raise AnalysisError(f"no scores in {output_uri}: {scores} does not exist "
                            "(is OUTPUT the output store of `varlide enhance`?)")
    run = plain_component(run_id, "run id") if run_id else "*"
    files = sorted(fs.glob(f"{root}/*/{run}/*.parquet"))
    if not files:
        if run_id:
            runs = sorted({p.rstrip("/").split("/")[-2] for p in fs.glob(f"{root}/*/*/*.parquet")})
            raise AnalysisError(f"run {run_id!r} has no score files in {scores}; runs with "
                                f"scores: {', '.join(runs) if runs else 'none'}")
        raise AnalysisError(f"no score files in {scores} yet (no shard has finished)")
    return [_full_uri(fs, p) for p in files]


def connect(output_uri: str, run_id: str | None = None, con=None):
    """A DuckDB connection with the view ``scores`` over the output's score files."""
    import duckdb

    files = score_files(output_uri, run_id)
    if con is None:
        con = duckdb.connect(config={"autoinstall_known_extensions": False})
    fs, _ = filesystem(canonical(output_uri))
    if not is_local_fs(fs):
        con.register_filesystem(fs)
    try:
        con.read_parquet(files, union_by_name=True).create_view(VIEW, replace=True)
    except duckdb.Error as exc:
        raise AnalysisError(f"cannot read the score files: {exc}") from None
    return con


def run_sql(con, sql: str):
    """Run ``sql``; its result relation (None for a statement without one).

    AnalysisError carrying DuckDB's message (with the position) on a bad query.
    """
    import duckdb

    if not sql or not sql.strip():
        raise AnalysisError("empty SQL (example: SELECT route, count(*) FROM scores GROUP BY 1)")
    try:
        return con.sql(sql)
    except duckdb.Error as exc:
        raise AnalysisError(f"SQL error: {exc}\n(the scores are the view `{VIEW}`; "
                            f"DESCRIBE {VIEW} lists its columns)") from None


def show(rel, max_rows: int = 40, max_width: int | None = None) -> None:
    """Print a result as DuckDB's box table (fits the terminal; rows summarised past max_rows)."""
    import duckdb

    if max_width is None:
        max_width = shutil.get_terminal_size((120, 24)).columns
    try:
        rel.show(max_width=max_width, max_rows=max_rows)
    except duckdb.Error as exc:
        raise AnalysisError(f"SQL error: {exc}") from None


def _arrow_reader(rel, batch_rows: int = 65536):
    if hasattr(rel, "to_arrow_reader"):
        return rel.to_arrow_reader(batch_rows)
    return rel.fetch_record_batch(batch_rows)  # duckdb < 1.4


def export(rel, uri: str, fmt: str) -> int:
    """Stream a result to ``uri`` (any fsspec URI) as ``csv`` or ``parquet``; rows written."""
    import duckdb
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if fmt not in ("csv", "parquet"):
        raise ValueError(f"format: expected csv or parquet, got {fmt!r}")
    if rel is None:
        raise AnalysisError("the SQL returned no result to export (use a SELECT)")
    uri = canonical(uri)
    fs, path = filesystem(uri)
    if is_local_fs(fs):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    rows = 0
    try:
        reader = _arrow_reader(rel)
        with fs.open(path, "wb") as fh:
            writer = (pacsv.CSVWriter(fh, reader.schema) if fmt == "csv"
                      else pq.ParquetWriter(fh, reader.schema, compression="zstd"))
            try:
                for batch in reader:
                    writer.write_batch(batch)
                    rows += batch.num_rows
            finally:
                writer.close()
    except duckdb.Error as exc:
        _remove_quietly(fs, path)
        raise AnalysisError(f"SQL error: {exc}") from None
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        _remove_quietly(fs, path)
        hint = " (CSV holds flat columns only; try --parquet)" if fmt == "csv" else ""
        raise AnalysisError(f"cannot write {fmt}: {exc}{hint}") from None
    return rows


def _remove_quietly(fs, path: str) -> None:
    try:
        fs.rm_file(path)
    except (FileNotFoundError, OSError):
        pass


