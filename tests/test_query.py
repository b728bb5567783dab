"""`varlide query`: DuckDB SQL over the score tables (view `scores`), local and on S3 (moto).

Score files are written by the real writer (varlide.storage.results) in the real layout with
known values, so counts and aggregates can be checked exactly; two runs with different
measures check that the view spans runs (union by name) and that --run narrows it.
"""

from __future__ import annotations

import io
from datetime import UTC, datetime

import pandas as pd
import pyarrow.parquet as pq
import pytest

from varlide.analysis import AnalysisError, connect, run_sql, score_files
from varlide.cli import main
from varlide.storage.results import write_rows
from varlide.storage.uri import join

WHEN = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def _row(run_id: str, dataset: str, shard: int, i: int, **extra) -> dict:
    return {"schema_version": 1, "run_id": run_id, "dataset": dataset, "shard": shard,
            "rel_path": f"cam/{i:03d}.png", "source_uri": f"/in/cam/{i:03d}.png",
            "size_bytes": 1000 + i, "status": "ok", "visibility": 0.1 * i, "blur": 0.5,
            "route": "curve", "n_iter": 8, "processed_at": WHEN, **extra}


def _write_store(out: str) -> None:
    """Run r1 (dataset night, 3 shards, 6 rows incl. 1 error, brightness + piqe) and
    run r2 (dataset day, 1 shard, 2 rows, brightness only)."""
    for shard, idx in enumerate(([0, 1], [2, 3], [4, 5])):
        rows = []
        for i in idx:
            if i == 5:
                rows.append(_row("r1", "night", shard, i, status="error", visibility=None,
                                 blur=None, route=None, n_iter=None,
                                 error="not an image: looks like text"))
            else:
                rows.append(_row("r1", "night", shard, i, q_brightness_in=0.1 * i,
                                 q_brightness_out=0.1 * i + 0.3, q_piqe_in=50.0 + i,
                                 q_piqe_out=40.0 + i))
        write_rows(rows, ("brightness", "piqe"),
                   join(out, "scores", "night", "r1", f"shard-{shard:05d}.parquet"))
    write_rows([_row("r2", "day", 0, i, q_brightness_in=0.5, q_brightness_out=0.6, route="skip")
                for i in (10, 11)], ("brightness",),
               join(out, "scores", "day", "r2", "shard-00000.parquet"))


@pytest.fixture
def store(tmp_path) -> str:
    out = str(tmp_path / "out")
    _write_store(out)
    return out


def _query(con, sql: str) -> list[tuple]:
    return run_sql(con, sql).fetchall()


def test_view_spans_every_run_with_the_union_of_columns(store):
    con = connect(store)
    assert _query(con, "SELECT run_id, dataset, count(*) FROM scores GROUP BY ALL ORDER BY 1") \
        == [("r1", "night", 6), ("r2", "day", 2)]
    # r2 has no piqe: its q_piqe_* are NULL, not an error
    assert _query(con, "SELECT count(q_piqe_in) FROM scores WHERE run_id = 'r2'") == [(0,)]
    (gain,), = _query(con, "SELECT avg(q_brightness_out - q_brightness_in) FROM scores "
                           "WHERE status = 'ok'")
    assert gain == pytest.approx((5 * 0.3 + 2 * 0.1) / 7)
    assert _query(con, "SELECT rel_path, error FROM scores WHERE status = 'error'") == [
        ("cam/005.png", "not an image: looks like text")]


def test_run_narrows_the_view(store, capsys):
    con = connect(store, "r1")
    assert _query(con, "SELECT DISTINCT run_id FROM scores") == [("r1",)]
    assert _query(con, "SELECT count(*), sum(shard) FROM scores") == [(6, 0 + 0 + 1 + 1 + 2 + 2)]
    assert main(["query", store, "SELECT count(*) AS n FROM scores", "--run", "r2"]) == 0
    cells = [line.strip("│ ") for line in capsys.readouterr().out.splitlines()
             if line.startswith("│")]
    assert cells == ["n", "int64", "2"]


def test_terminal_table_shows_the_rows(store, capsys):
    sql = ("SELECT rel_path, round(q_piqe_out - q_piqe_in, 1) AS piqe_change FROM scores "
           "WHERE run_id = 'r1' AND status = 'ok' ORDER BY rel_path")
    assert main(["query", store, sql]) == 0
    out = capsys.readouterr().out
    assert "rel_path" in out and "piqe_change" in out
    for i in range(5):
        assert f"cam/{i:03d}.png" in out
    assert out.count("-10.0") == 5
    assert "cam/005.png" not in out  # the error row was filtered out


def test_csv_and_parquet_exports(store, tmp_path, capsys):
    sql = ("SELECT run_id, rel_path, visibility, q_brightness_out, processed_at FROM scores "
           "WHERE status = 'ok' ORDER BY run_id, rel_path")
    csv_path = tmp_path / "exports" / "ok.csv"
    assert main(["query", store, sql, "--csv", str(csv_path)]) == 0
    assert "wrote 7 rows" in capsys.readouterr().out
    df = pd.read_csv(csv_path)
    assert list(df.columns) == ["run_id", "rel_path", "visibility", "q_brightness_out",
                                "processed_at"]
    assert list(df["rel_path"]) == [f"cam/{i:03d}.png" for i in (0, 1, 2, 3, 4, 10, 11)]
    assert df["visibility"].tolist() == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 1.0, 1.1],
                                                      abs=1e-6)
    assert df["q_brightness_out"].tolist() == pytest.approx([0.3, 0.4, 0.5, 0.6, 0.7, 0.6, 0.6])
    assert pd.to_datetime(df["processed_at"], utc=True).eq(pd.Timestamp(WHEN)).all()

    pq_path = tmp_path / "ok.parquet"
    assert main(["query", store, sql, "--parquet", str(pq_path), "--run", "r1"]) == 0
    assert "wrote 5 rows" in capsys.readouterr().out
    table = pq.read_table(pq_path)
    assert table.num_rows == 5 and set(table.column("run_id").to_pylist()) == {"r1"}
    assert str(table.schema.field("visibility").type) == "float"  # float32 kept
    assert table.column("rel_path").to_pylist() == [f"cam/{i:03d}.png" for i in range(5)]


def test_sql_from_stdin(store, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("SELECT count(*) AS images FROM scores"))
    assert main(["query", store, "-"]) == 0
    assert "8" in capsys.readouterr().out


@pytest.mark.parametrize("sql, expected", [
    ("SELEC count(*) FROM scores", "syntax error"),
    ("SELECT no_such_column FROM scores", "no_such_column"),
    ("SELECT * FROM not_a_table", "not_a_table"),
    ("SELECT CAST(rel_path AS INTEGER) FROM scores", "Conversion Error"),  # fails at run time
    ("   ", "empty SQL"),
])
def test_sql_errors_are_clear_and_exit_2(store, capsys, sql, expected):
    assert main(["query", store, sql]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and expected in captured.err
    assert "Traceback" not in captured.err


def test_missing_or_empty_scores_and_unknown_run(tmp_path, store, capsys):
    assert main(["query", str(tmp_path / "nowhere"), "SELECT 1"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty" / "scores").mkdir(parents=True)
    assert main(["query", str(tmp_path / "empty"), "SELECT 1"]) == 2
    assert "no score files" in capsys.readouterr().err
    assert main(["query", store, "SELECT 1", "--run", "r9"]) == 2
    err = capsys.readouterr().err
    assert "r9" in err and "r1, r2" in err  # names the runs that exist
    with pytest.raises(AnalysisError):
        score_files(store, "../r1")


def test_export_needs_a_result(tmp_path):
    from varlide.analysis import export

    with pytest.raises(AnalysisError, match="no result to export"):
        export(None, str(tmp_path / "y.csv"), "csv")  # duckdb < 2 returns None for SET etc.


@pytest.mark.s3
def test_query_on_s3_without_a_duckdb_extension(s3_bucket, tmp_path, capsys):
    out = f"{s3_bucket}/out"
    _write_store(out)
    con = connect(out)
    assert _query(con, "SELECT run_id, count(*), count(error) FROM scores GROUP BY 1 ORDER BY 1") \
        == [("r1", 6, 1), ("r2", 2, 0)]
    loaded = {name for (name,) in _query(
        con, "SELECT extension_name FROM duckdb_extensions() WHERE loaded")}
    assert "httpfs" not in loaded and "aws" not in loaded  # read through s3fs, not httpfs
    assert score_files(out, "r2") == [f"{out}/scores/day/r2/shard-00000.parquet"]

    assert main(["query", out, "SELECT avg(q_piqe_in) AS piqe FROM scores", "--run", "r1"]) == 0
    assert "52" in capsys.readouterr().out  # mean of 50..54
    target = tmp_path / "s3.csv"
    assert main(["query", out, "SELECT rel_path FROM scores ORDER BY 1", "--run", "r2",
                 "--csv", str(target)]) == 0
    assert pd.read_csv(target)["rel_path"].tolist() == ["cam/010.png", "cam/011.png"]
    # an export may itself go to the bucket
    assert main(["query", out, "SELECT * FROM scores", "--parquet", f"{s3_bucket}/x.parquet"]) == 0
    from varlide.storage.uri import filesystem

    fs, path = filesystem(f"{s3_bucket}/x.parquet")
    with fs.open(path, "rb") as fh:
        assert pq.read_table(fh).num_rows == 8
    assert main(["query", out, "SELECT * FROM scores", "--run", "nope"]) == 2
    assert "r1, r2" in capsys.readouterr().err
