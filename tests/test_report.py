"""`varlide report`: the self-contained HTML page of a real run, its MLflow artifacts, and how
it renders in headless Chromium (Debian's `chromium`, installed by .ci/run).

One small real run (demo corpus, 64x48 images, two unreadable files) is made once per
session by :func:`analyst_output` and shared with tests/test_notebook.py: an enhanced run
and a scores-only run (``--no-enhance``) in the same output store.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from varlide import analysis
from varlide.cli import main
from varlide.config import Config

FAST = {"metrics": ["brightness", "contrast"], "retry_delay_s": 0, "progress": False,
        "decode_threads": 2, "batch_size": 4}
ENHANCED_FIGURES = ["fig-visibility", "fig-blur", "fig-n_iter", "fig-route", "fig-q_brightness",
                    "fig-q_contrast", "fig-v_vs_gain", "fig-thumbs-worst", "fig-thumbs-best",
                    "fig-thumbs-random"]
SCORES_ONLY_FIGURES = ["fig-visibility", "fig-blur", "fig-q_brightness", "fig-q_contrast",
                       "fig-thumbs-worst", "fig-thumbs-best", "fig-thumbs-random"]
SECTIONS = ["summary", "errors", "priors", "enhancement", "quality", "gain", "thumbnails"]
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium"
                                        if os.path.exists("/usr/bin/chromium") else None)


def build_analyst_output(tmp_path_factory) -> SimpleNamespace:
    """Two real runs (enhanced; scores only) of 4 demo images + 2 unreadable files.

    Made once per session even when several modules ask (the result is kept on disk).
    """
    from varlide.demo import make_demo_corpus

    base = tmp_path_factory.getbasetemp() / "analyst-runs"
    record = base / "runs.json"
    if record.exists():
        return SimpleNamespace(**json.loads(record.read_text()))
    corpus = base / "corpus"
    make_demo_corpus(str(corpus), count=4, size=(64, 48))
    (corpus / "lowlight" / "zz_empty.png").write_bytes(b"")
    (corpus / "lowlight" / "zz_notes.jpg").write_text("not really a jpeg")
    out = base / "out"
    uri = f"sqlite:///{base / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(base)  # MLflow's default artifact root ./mlruns lands here
        from flows.enhance import run_enhance

        enhanced = run_enhance(str(corpus / "lowlight"), str(out), Config(**FAST, shard_size=4))
        scores_only = run_enhance(str(corpus / "lowlight"), str(out),
                                  Config(**FAST, enhance=False))
    assert enhanced["complete"] and scores_only["complete"]
    info = {"base": str(base), "out": str(out), "mlflow": uri, "enhanced": enhanced["run_id"],
            "scores_only": scores_only["run_id"]}
    record.write_text(json.dumps(info))
    return SimpleNamespace(**info)


@pytest.fixture(scope="session")
def analyst_output(tmp_path_factory, prefect_harness) -> SimpleNamespace:
    return build_analyst_output(tmp_path_factory)


class Page(HTMLParser):
    """What a test needs from the report: ids, images, cards, table rows, links."""

    def __init__(self, text: str):
        super().__init__()
        self.ids: list[str] = []
        self.imgs: list[dict] = []  # attrs + the id of the enclosing figure
        self.cards: dict[str, str] = {}
        self.rows: dict[str, list[list[str]]] = {}  # table id -> rows of cell texts
        self.urls: list[str] = []
        self.tags: list[str] = []
        self._figure: str | None = None
        self._card: str | None = None
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if "id" in a:
            self.ids.append(a["id"])
        for key in ("src", "href"):
            if key in a:
                self.urls.append(a[key])
        if tag == "figure":
            self._figure = a.get("id")
        elif tag == "img":
            self.imgs.append({**a, "figure": self._figure})
        elif tag == "div" and "data-count" in a:
            self._card = a["data-count"]
        elif tag == "span" and self._card and "n" in (a.get("class") or "").split():
            self._text = []
        elif tag == "table":
            self._table = a.get("id")
            self.rows.setdefault(self._table, [])
        elif tag == "tr" and self._table is not None:
            self._cell = []
            self.rows[self._table].append(self._cell)
        elif tag in ("td", "th"):
            self._text = []

    def handle_endtag(self, tag):
        if tag == "figure":
            self._figure = None
        elif tag == "span" and self._card and self._card not in self.cards:
            self.cards[self._card] = "".join(self._text).strip()
        elif tag == "div" and self._card:
            self._card = None
        elif tag in ("td", "th") and self._cell is not None:
            self._cell.append("".join(self._text).strip())
        elif tag == "table":
            self._table, self._cell = None, None

    def handle_data(self, data):
        self._text.append(data)


def _png(img: dict) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert img["src"].startswith(prefix), img["src"][:40]
    im = Image.open(io.BytesIO(base64.b64decode(img["src"][len(prefix):])))
    im.load()
    assert im.format == "PNG"
    return im


@pytest.fixture
def thumb_calls(monkeypatch) -> list[tuple[str, bool]]:
    """Every thumbnail the report reads: (uri, read ok)."""
    calls: list[tuple[str, bool]] = []
    real = analysis.figures._thumbnail

    def spy(uri, side):
        arr = real(uri, side)
        calls.append((uri, arr is not None))
        return arr

    monkeypatch.setattr(analysis.figures, "_thumbnail", spy)
    return calls


@pytest.fixture(scope="module")
def enhanced_report(analyst_output, tmp_path_factory):
    """`varlide report OUT --run ID` of the enhanced run, with MLflow; the page and stdout."""
    run_id = analyst_output.enhanced
    calls: list[tuple[str, bool]] = []
    real = analysis.figures._thumbnail

    def spy(uri, side):
        arr = real(uri, side)
        calls.append((uri, arr is not None))
        return arr

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", analyst_output.mlflow)
        mp.chdir(analyst_output.base)
        mp.setattr(analysis.figures, "_thumbnail", spy)
        buf = io.StringIO()
        mp.setattr("sys.stdout", buf)
        code = main(["report", analyst_output.out, "--run", run_id, "--thumbs", "3"])
    path = Path(analyst_output.out) / "runs" / run_id / "report.html"
    return SimpleNamespace(code=code, stdout=buf.getvalue(), path=path, run_id=run_id,
                           text=path.read_text(encoding="utf-8"), thumbs=calls)


def test_report_counts_errors_and_every_figure(enhanced_report, analyst_output):
    assert enhanced_report.code == 0
    assert f"page    {enhanced_report.path}" in enhanced_report.stdout
    page = Page(enhanced_report.text)
    for section in SECTIONS:
        assert section in page.ids, section
    # every figure, each one inline PNG inside its <figure id=...>
    assert [img["figure"] for img in page.imgs] == ENHANCED_FIGURES
    assert enhanced_report.text.count("<img") == len(ENHANCED_FIGURES)
    for img in page.imgs:
        im = _png(img)
        assert im.width > 200 and im.height > 100 and img.get("alt")
        assert np.asarray(im.convert("L")).std() > 5  # drawn on, not blank
    # counts as the table has them (4 images read, 2 not)
    df = pd.read_parquet(Path(analyst_output.out) / "scores" / "lowlight" /
                         enhanced_report.run_id)
    assert len(df) == 6 and (df["status"] == "ok").sum() == 4
    assert page.cards["images"] == "6" and page.cards["ok"] == "4"
    assert page.cards["errors"] == "2" and page.cards["error rate"] == "33.3%"
    assert page.cards["shards done"] == "2/2"
    assert page.cards["route curve"] == str(int((df["route"] == "curve").sum()))
    # the error reasons, with counts and the files
    reasons = {row[0]: row[1:] for row in page.rows["error-reasons"][1:]}
    assert set(reasons) == {"empty file (0 bytes)", "not an image"}
    assert reasons["empty file (0 bytes)"] == ["1", "zz_empty.png"]
    assert reasons["not an image"] == ["1", "zz_notes.jpg"]
    assert {r[0] for r in page.rows["error-rows"][1:]} == {"zz_empty.png", "zz_notes.jpg"}
    # quality table: one row per measure, medians as the table says
    quality = {row[0]: row for row in page.rows["quality-table"][1:]}
    assert set(quality) == {"brightness", "contrast"}
    ok = df[df["status"] == "ok"]
    assert float(quality["brightness"][3]) == pytest.approx(ok["q_brightness_in"].median(),
                                                            rel=1e-3)
    assert float(quality["brightness"][4]) == pytest.approx(ok["q_brightness_out"].median(),
                                                            rel=1e-3)
    assert quality["contrast"][6] == f"{(ok['q_contrast_out'] > ok['q_contrast_in']).mean():.0%}"
    # the ranking is documented on the page (no piqe in this run: contrast improvement)
    assert "Ranked by <b>contrast improvement</b>" in enhanced_report.text


def test_report_thumbnails_are_before_after_pairs(enhanced_report, analyst_output):
    df = pd.read_parquet(Path(analyst_output.out) / "scores" / "lowlight" /
                         enhanced_report.run_id)
    ok = df[df["status"] == "ok"]
    read = {uri for uri, fine in enhanced_report.thumbs if fine}
    assert all(fine for _, fine in enhanced_report.thumbs)
    assert read <= set(ok["source_uri"]) | set(ok["enhanced_uri"])
    assert read & set(ok["enhanced_uri"]) and read & set(ok["source_uri"])
    for uri, _ in enhanced_report.thumbs:  # each before comes with its after
        if uri in set(ok["source_uri"]):
            after = ok.loc[ok["source_uri"] == uri, "enhanced_uri"].iloc[0]
            assert after in read
    # (worst 2 + best 2 (half of the 4 ok images each) + random 3) x (before, after)
    assert len(enhanced_report.thumbs) == (2 + 2 + 3) * 2


def test_report_is_self_contained(enhanced_report):
    text = enhanced_report.text
    page = Page(text)
    assert all(u.startswith(("data:image/png;base64,", "#")) for u in page.urls), [
        u[:60] for u in page.urls if not u.startswith(("data:", "#"))]
    assert "script" not in page.tags and "link" not in page.tags and "iframe" not in page.tags
    assert not re.search(r"https?://", text)  # nothing to fetch, nothing to leak
    assert "@import" not in text and "url(" not in text


def test_report_figures_go_to_the_mlflow_run(enhanced_report, analyst_output):
    from mlflow.tracking import MlflowClient

    from varlide.tracking import RUN_ID_TAG

    client = MlflowClient(analyst_output.mlflow)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"tags.`{RUN_ID_TAG}` = '{enhanced_report.run_id}'")
    assert len(runs) == 1  # the run's own MLflow run, not a new one
    run = runs[0]
    assert f"figures logged to MLflow run {run.info.run_id}" in enhanced_report.stdout
    top = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "report")}
    assert top == {"report.html", "figures"}
    figures = sorted(Path(a.path).name for a in
                     client.list_artifacts(run.info.run_id, "report/figures"))
    assert figures == sorted(f"{f}.png" for f in ENHANCED_FIGURES)
    assert analysis.find_mlflow_run("no-such-run")[0] is None


def test_report_of_a_scores_only_run_to_a_chosen_file(analyst_output, tmp_path, capsys,
                                                      thumb_calls, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'absent' / 'mlflow.db'}")
    target = tmp_path / "reports" / "scores-only.html"
    run_id = analyst_output.scores_only
    assert main(["report", analyst_output.out, "--run", run_id, "--out", str(target),
                 "--thumbs", "2"]) == 0
    stdout = capsys.readouterr().out
    assert "not logged: no MLflow store" in stdout  # skipped with a line, not an error
    assert not (tmp_path / "absent").exists()  # and no MLflow store made on the way
    assert not (Path(analyst_output.out) / "runs" / run_id / "report.html").exists()
    text = target.read_text(encoding="utf-8")
    page = Page(text)
    assert [img["figure"] for img in page.imgs] == SCORES_ONLY_FIGURES
    for img in page.imgs:
        _png(img)
    assert page.cards["images"] == "6" and page.cards["errors"] == "2"
    assert "Enhancement was off in this run" in text and "Inputs only" in text
    assert "Ranked by <b>visibility</b>" in text
    assert thumb_calls and all(fine for _, fine in thumb_calls)
    assert all("/enhanced/" not in uri for uri, _ in thumb_calls)  # inputs only


def test_report_run_choice(analyst_output, capsys, tmp_path):
    assert main(["report", analyst_output.out, "--no-mlflow"]) == 2
    err = capsys.readouterr().err
    assert analyst_output.enhanced in err and analyst_output.scores_only in err and "--run" in err
    assert main(["report", analyst_output.out, "--run", "nope", "--no-mlflow"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["report", str(tmp_path), "--no-mlflow"]) == 2
    assert main(["report", analyst_output.out, "--run", analyst_output.enhanced,
                 "--rank-by", "sharpness", "--no-mlflow", "--out", str(tmp_path / "x.html")]) == 2
    assert "not a measure of this run" in capsys.readouterr().err


def _run_data(enhanced: bool) -> analysis.RunData:
    df = pd.DataFrame({
        "status": ["ok", "ok", "ok", "error"], "rel_path": ["a", "b", "c", "d"],
        "visibility": [0.3, 0.1, 0.2, None],
        "q_contrast_in": [0.1, 0.1, 0.1, None], "q_contrast_out": [0.3, 0.2, 0.1, None],
        "q_piqe_in": [50.0, 50.0, 50.0, None], "q_piqe_out": [60.0, 40.0, 45.0, None],
        "enhanced_uri": ["x", "y", "z", None] if enhanced else [None] * 4,
    })
    return analysis.RunData("/out", "r", "d", df)


def test_rank_criterion_is_documented_and_directed():
    crit = analysis.rank_criterion(_run_data(True))
    assert crit.column == "piqe improvement"  # piqe first; lower is better, so in - out
    assert crit.values.tolist() == [-10.0, 10.0, 5.0]
    assert "worst = least improved" in crit.description
    crit = analysis.rank_criterion(_run_data(True), "contrast")  # higher is better: out - in
    assert crit.values.round(6).tolist() == [0.2, 0.1, 0.0]
    crit = analysis.rank_criterion(_run_data(False))
    assert crit.column == "visibility" and crit.values.tolist() == pytest.approx([0.3, 0.1, 0.2])
    with pytest.raises(analysis.AnalysisError, match="not a measure"):
        analysis.rank_criterion(_run_data(True), "ssim")


@pytest.mark.s3
def test_report_of_a_run_on_s3(analyst_output, s3_bucket, capsys):
    import s3fs

    from varlide.storage.uri import filesystem

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
    run_id = analyst_output.enhanced
    local = Path(analyst_output.out)
    for sub in (f"scores/lowlight/{run_id}", f"runs/{run_id}"):
        for p in sorted((local / sub).rglob("*")):
            if p.is_file():
                fs.put_file(str(p), f"{s3_bucket[5:]}/out/{p.relative_to(local)}")
    out = f"{s3_bucket}/out"
    assert main(["report", out, "--run", run_id, "--no-mlflow", "--thumbs", "1"]) == 0
    assert f"{out}/runs/{run_id}/report.html" in capsys.readouterr().out
    rfs, path = filesystem(f"{out}/runs/{run_id}/report.html")
    page = Page(rfs.cat_file(path).decode("utf-8"))
    assert page.cards["images"] == "6" and page.cards["ok"] == "4"
    assert [img["figure"] for img in page.imgs] == ENHANCED_FIGURES


def _chromium(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    profile = tmp_path / f"chromium-profile-{len(list(tmp_path.iterdir()))}"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--hide-scrollbars", f"--user-data-dir={profile}",
           "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "HOME": str(tmp_path)})


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is absent (Debian package "
                    "`chromium`, installed by .ci/run: apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(enhanced_report, tmp_path):
    url = enhanced_report.path.resolve().as_uri()
    dom = _chromium(["--dump-dom", url], tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = Page(dom.stdout)  # the DOM the browser built
    for section in SECTIONS:
        assert section in page.ids
    assert [img["figure"] for img in page.imgs] == ENHANCED_FIGURES
    assert page.cards["images"] == "6"
    problems = [line for line in dom.stderr.splitlines()
                if ":CONSOLE" in line or "net::ERR" in line or "Refused to" in line
                or "Failed to load" in line]
    assert problems == []

    shot = tmp_path / "report.png"
    res = _chromium(["--window-size=1280,2400", f"--screenshot={shot}", url], tmp_path)
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (2400, 1280)
    before = np.array([0x4C, 0x72, 0xB0])  # the histograms' "before" blue: figures were drawn
    assert (np.abs(pixels - before).max(axis=-1) < 40).sum() > 5000
    assert (pixels.std(axis=(0, 1)) > 20).all()  # a page, not a blank or an error screen
