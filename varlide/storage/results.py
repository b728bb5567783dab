"""The one Parquet writer and the fixed row schema of a run (DESIGN.md, docs/SCHEMA.md).

One schema per run: the fixed columns plus ``q_<metric>_in`` / ``q_<metric>_out`` for the
run's metric names, so the files of a run always concatenate. A shard file is written whole:
to a temporary name then renamed on a local disk, in one PUT on object storage.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from varlide.storage.uri import filesystem, write_bytes

SCHEMA_VERSION = 3  # 2: the deblur, deblur_kernel_px columns; 3: prior_local

FIXED_COLUMNS: list[tuple[str, pa.DataType]] = [
    ("schema_version", pa.int16()),
    ("run_id", pa.string()),
    ("dataset", pa.string()),
    ("shard", pa.int32()),
    ("rel_path", pa.string()),
    ("source_uri", pa.string()),
    ("size_bytes", pa.int64()),
    ("sha256", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("exif_applied", pa.bool_()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("prior_backend", pa.string()),
    ("prior_model", pa.string()),
    ("visibility", pa.float32()),
    ("blur", pa.float32()),
    ("prior_calibration", pa.string()),
    ("prior_local", pa.list_(pa.float32())),  # prior_local: K x G x G maps, row-major
    ("enhancer", pa.string()),
    ("enhancer_version", pa.string()),
    ("route", pa.string()),
    ("n_iter", pa.int16()),
    ("phase_strength", pa.float32()),
    ("deblur", pa.string()),
    ("deblur_kernel_px", pa.float32()),
    ("enhanced_uri", pa.string()),
]
TAIL_COLUMNS: list[tuple[str, pa.DataType]] = [
    ("iqa_max_side", pa.int32()),
    ("worker", pa.string()),
    ("device", pa.string()),
    ("decode_ms", pa.float32()),
    ("prior_ms", pa.float32()),
    ("enhance_ms", pa.float32()),
    ("quality_ms", pa.float32()),
    ("processed_at", pa.timestamp("us", tz="UTC")),
]


def quality_columns(metric_names: Sequence[str]) -> list[str]:
    """``q_<m>_in, q_<m>_out`` for each metric, in the run's metric order."""
    return [f"q_{m}_{side}" for m in metric_names for side in ("in", "out")]


def run_schema(metric_names: Sequence[str]) -> pa.Schema:
    """The fixed pyarrow schema of a run with these quality metrics."""
    fields = [pa.field(n, t) for n, t in FIXED_COLUMNS]
    fields += [pa.field(c, pa.float64()) for c in quality_columns(metric_names)]
    fields += [pa.field(n, t) for n, t in TAIL_COLUMNS]
    return pa.schema(fields)


def rows_to_table(rows: Iterable[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows (dicts; a missing key is null) to a table of exactly ``schema``."""
    rows = list(rows)
    unknown = {k for row in rows for k in row} - set(schema.names)
    if unknown:
        raise KeyError(f"row keys not in the run schema: {sorted(unknown)}")
    columns = {name: [row.get(name) for row in rows] for name in schema.names}
    return pa.Table.from_pydict(columns, schema=schema)


def write_table(table: pa.Table, uri: str) -> int:
    """Write one Parquet file whole: temp + rename locally, a single PUT remotely; returns
    its size in bytes (a shard's marker records it, so a damaged file is seen on resume)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    write_bytes(uri, buf.getvalue())
    return buf.tell()


class Written(NamedTuple):
    rows: int
    nbytes: int


def write_rows(rows: Iterable[dict[str, Any]], metric_names: Sequence[str],
               uri: str) -> Written:
    """Validate rows against the run schema and write them as one Parquet file."""
    table = rows_to_table(rows, run_schema(metric_names))
    return Written(table.num_rows, write_table(table, uri))


def read_table(uri: str) -> pa.Table:
    """Read one Parquet file or a folder of them (any fsspec URI)."""
    fs, path = filesystem(uri)
    return pq.read_table(path, filesystem=fs)
