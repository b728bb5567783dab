"""notebooks/score_distributions.ipynb, executed with nbclient on a real small run's output."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from test_report import build_analyst_output

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "score_distributions.ipynb"


@pytest.fixture(scope="session")
def analyst_runs(tmp_path_factory, prefect_harness):
    return build_analyst_output(tmp_path_factory)  # shared with test_report.py (kept on disk)


def _outputs(nb, kind: str) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == kind or kind in o.get("data", {})]


def test_notebook_is_parameterised_and_clean():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    params = nb.cells[1].source
    assert 'os.environ.get("VARLIDE_OUTPUT", "demo/out")' in params  # `make demo`'s output
    assert "VARLIDE_RUN" in params
    assert not _outputs(nb, "stream") and not _outputs(nb, "image/png")  # stored unexecuted


def test_notebook_runs_on_a_real_run(analyst_runs, monkeypatch, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("VARLIDE_OUTPUT", analyst_runs.out)
    monkeypatch.setenv("VARLIDE_RUN", analyst_runs.enhanced)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()  # raises on error

    assert not _outputs(nb, "error")
    last = _outputs(nb, "stream")[-1]["text"].strip().splitlines()[-1]
    summary = json.loads(last)
    df = pd.read_parquet(Path(analyst_runs.out) / "scores" / "lowlight" / analyst_runs.enhanced)
    assert summary == {
        "run_id": analyst_runs.enhanced, "dataset": "lowlight", "images": len(df),
        "ok": int((df["status"] == "ok").sum()), "errors": int((df["status"] == "error").sum()),
        "metrics": ["brightness", "contrast"], "duckdb_images": len(df),
    }
    assert summary["images"] == 6 and summary["errors"] == 2
    # the plots: v and b, quality before/after, v against brightness gain
    assert len(_outputs(nb, "image/png")) == 3
    # the pandas and DuckDB tables (runs, error reasons, describe, per measure, per route)
    tables = [o["data"]["text/html"] for o in _outputs(nb, "text/html")]
    assert len(tables) == 5
    assert any("not an image" in t and "empty file (0 bytes)" in t for t in tables)
    assert any("median_before" in t and "contrast" in t for t in tables)
