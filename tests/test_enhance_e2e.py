"""The main job end to end: real Prefect (test harness), real MLflow (SQLite), real S3 (moto).

Each test asserts what a user relies on: one row per image, statuses and reasons, files in
the output layout, markers, resume behaviour, MLflow params/metrics, exit codes.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import make_rgb
from PIL import Image

from varlide.cli import main
from varlide.config import Config
from varlide.models.varlide_lite import default_weights_dir
from varlide.storage.results import SCHEMA_VERSION, run_schema
from varlide.storage.uri import filesystem

pytestmark = pytest.mark.usefixtures("prefect_harness")

FAST = {"metrics": ["brightness", "contrast", "entropy", "overexposed"], "retry_delay_s": 0,
        "progress": False, "decode_threads": 2}


def _write_png(fs, path: str, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    if "file" in fs.protocol:
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, buf.getvalue())


def _corpus(uri: str, n: int = 6, sizes=((48, 64),), scale: float = 0.15) -> list[str]:
    """n small dark PNGs under uri (nested folders), returns relative paths."""
    fs, root = filesystem(uri)
    rels = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        rel = f"{'cam_a' if i % 2 else 'cam_b'}/frame_{i:03d}.png"
        _write_png(fs, f"{root}/{rel}", make_rgb(h, w, seed=i, scale=scale))
        rels.append(rel)
    return sorted(rels)


def _run(input_uri: str, output_uri: str, **overrides):
    from flows.enhance import run_enhance

    cfg = Config(**{**FAST, **overrides})
    return run_enhance(input_uri, output_uri, cfg)


def _scores(output_uri: str) -> pd.DataFrame:
    fs, path = filesystem(output_uri)
    files = sorted(fs.glob(f"{path}/scores/**/*.parquet"))
    assert files, "no Parquet written"
    proto = output_uri.split("://")[0] + "://" if "://" in output_uri else ""
    return pd.concat([pd.read_parquet(f"{proto}{f}", storage_options=_opts(output_uri))
                      for f in files], ignore_index=True)


def _opts(uri: str) -> dict | None:
    if uri.startswith("s3://"):
        return {"client_kwargs": {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}}
    return None


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_end_to_end_local_and_s3(backend, tmp_path, mlflow_sqlite, request):
    if backend == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        inp, out = f"{bucket}/frames/night", f"{bucket}/out"
    else:
        inp, out = str(tmp_path / "frames" / "night"), str(tmp_path / "out")
    rels = _corpus(inp, n=5, sizes=((48, 64), (40, 56)))
    summary = _run(inp, out, shard_size=2)

    assert summary["complete"] and summary["failed_shards"] == []
    run_id = summary["run_id"]
    df = _scores(out)
    assert sorted(df["rel_path"]) == rels  # one row per image
    assert set(df["status"]) == {"ok"} and df["error"].isna().all()
    assert set(df["dataset"]) == {"night"} and set(df["run_id"]) == {run_id}
    assert set(df["schema_version"]) == {SCHEMA_VERSION}
    assert sorted(df["shard"].unique()) == [0, 1, 2]
    assert df["visibility"].between(0, 1).all() and df["blur"].between(0, 1).all()
    assert (df["q_brightness_out"] > df["q_brightness_in"]).all()  # dark frames got brighter
    assert set(df["enhancer"]) == {"varlide-lite"}  # the default, with its shipped weights
    shipped = json.loads((default_weights_dir("varlide-lite") / "config.json").read_text())
    # the shipped weights run the backbone slot's denoiser, and the version says so
    assert shipped["model"]["backbone"] == "denoise"
    assert set(df["enhancer_version"]) == {f"{shipped['sha256'][:12]}+ds4+denoise-w1.5-k1+hl"}
    assert set(df["route"]) <= {"skip", "curve"}  # shipped weights are VICM only: never 'full'
    assert df["sha256"].str.len().eq(64).all()
    # schema is the run's fixed schema, in order
    fs, root = filesystem(out)
    assert fs.exists(f"{root}/runs/{run_id}/manifest.json")
    assert len(fs.ls(f"{root}/runs/{run_id}/done")) == 3
    for uri in df["enhanced_uri"]:
        efs, epath = filesystem(uri)
        assert efs.exists(epath) and epath.startswith(f"{root}/enhanced/{run_id}/")
        with efs.open(epath, "rb") as fh:
            assert Image.open(fh).size in ((64, 48), (56, 40))  # geometry kept
    expected = run_schema(("brightness", "contrast", "entropy", "overexposed")).names
    assert list(df.columns) == expected

    # MLflow: one run for this run id, params and metrics from all shards
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_sqlite)
    exp = client.get_experiment_by_name("varlide-enhance")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    data = runs[0].data
    assert data.metrics["images"] == 5 and data.metrics["errors"] == 0
    assert "q_brightness_out_p50" in data.metrics and data.params["shard_size"] == "2"
    assert runs[0].info.status == "FINISHED"


def test_bad_inputs_become_error_rows(tmp_path, mlflow_sqlite):
    inp = tmp_path / "bad"
    inp.mkdir()
    good = make_rgb(32, 32, seed=1, scale=0.2)
    Image.fromarray(good).save(inp / "good.png")
    Image.fromarray(good).convert("L").save(inp / "grey.png")
    Image.fromarray(good).convert("P").save(inp / "palette.png")
    Image.fromarray(good).convert("CMYK").save(inp / "cmyk.jpg")
    Image.fromarray(good).convert("RGBA").save(inp / "alpha.png")
    Image.fromarray(good[..., 0].astype(np.uint16) * 257).save(inp / "deep16.png")
    (inp / "empty.png").write_bytes(b"")
    (inp / "notes.jpg").write_text("this is not an image")
    buf = io.BytesIO()
    Image.fromarray(make_rgb(40, 60)).save(buf, format="JPEG")
    (inp / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    Image.fromarray(make_rgb(64, 64)).save(inp / "bomb.png")
    out = tmp_path / "out"
    summary = _run(str(inp), str(out), max_pixels=64 * 64 - 1, batch_size=2)
    df = _scores(str(out)).set_index("rel_path")
    assert len(df) == 10 and summary["failed_shards"] == []
    errors = df[df["status"] == "error"]["error"].to_dict()
    assert set(errors) == {"empty.png", "notes.jpg", "cut.jpg", "bomb.png"}
    assert "empty" in errors["empty.png"]
    assert "not an image" in errors["notes.jpg"]
    assert "truncated" in errors["cut.jpg"]
    assert "decompression bomb" in errors["bomb.png"]
    ok = df[df["status"] == "ok"]
    assert set(ok.index) == {"good.png", "grey.png", "palette.png", "cmyk.jpg", "alpha.png",
                             "deep16.png"}
    for rel in ok.index:  # the good images still come out
        assert (out / "enhanced" / summary["run_id"] / rel).exists()
    assert ok["width"].eq(32).all() and ok["height"].eq(32).all()


def _install_exploding_enhancer():
    """A classic-curve that raises on 40-pixel-high images while a flag file exists."""
    from varlide.models.base import ENHANCERS
    from varlide.models.classic import ClassicCurve

    if "test-explode" in ENHANCERS:
        return

    class Exploding(ClassicCurve):
        name = "test-explode"

        def enhance(self, images, visibility, blur):
            flag = os.environ.get("VARLIDE_TEST_EXPLODE_FLAG")
            if flag and os.path.exists(flag) and images.shape[-2] == 40:
                raise RuntimeError("injected failure")
            return super().enhance(images, visibility, blur)

    @ENHANCERS.register("test-explode")
    def _factory(weights=None, **kw):
        return Exploding(**kw)


def test_failed_shard_then_resume(tmp_path, mlflow_sqlite, monkeypatch, capsys):
    _install_exploding_enhancer()
    flag = tmp_path / "explode"
    flag.write_text("1")
    monkeypatch.setenv("VARLIDE_TEST_EXPLODE_FLAG", str(flag))
    inp, out = tmp_path / "in", tmp_path / "out"
    # 6 images, shards of 2 in sorted order (cam_a/1,3 | cam_a/5, cam_b/0 | cam_b/2,4):
    # only shard 1 holds a 40-px-high image (frame 5)
    rels = _corpus(str(inp), n=6, sizes=((48, 64),) * 5 + ((40, 64),))
    args = [str(inp), str(out), "--enhancer", "test-explode", "--shard-size", "2",
            "--retries", "0", "--no-progress", "--metrics", "brightness"]
    monkeypatch.setenv("VARLIDE_RETRY_DELAY_S", "0")
    code = main(["enhance", *args])
    err = capsys.readouterr().err
    assert code == 1 and "00001" in err  # non-zero, naming the failed shard
    done_dir = next((out / "runs").iterdir()) / "done"
    assert sorted(p.name for p in done_dir.iterdir()) == ["shard-00000.json", "shard-00002.json"]
    before = {p.name: p.stat().st_mtime_ns for p in done_dir.iterdir()}
    assert main(["status", str(out)]) == 0
    status_out = capsys.readouterr().out
    assert "2/3 done" in status_out and "1 failed" in status_out

    # a file added between the runs is reported, not mixed in
    _write_png(filesystem(str(inp))[0], str(inp / "cam_c" / "late.png"), make_rgb(48, 64))
    flag.unlink()
    code = main(["enhance", *args])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "appeared since" in captured.out
    df = _scores(str(out))
    assert sorted(df["rel_path"]) == rels  # exactly one row per planned image, late.png absent
    after = {p.name: p.stat().st_mtime_ns for p in done_dir.iterdir()}
    assert after["shard-00000.json"] == before["shard-00000.json"]  # not recomputed
    assert after["shard-00002.json"] == before["shard-00002.json"]
    assert "shard-00001.json" in after
    assert not (done_dir.parent / "failed" / "shard-00001.json").exists()
    # one MLflow run per run id, continued
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_sqlite)
    runs = client.search_runs([client.get_experiment_by_name("varlide-enhance").experiment_id])
    assert len(runs) == 1 and runs[0].data.metrics["images"] == 6
    assert runs[0].info.status == "FINISHED"


def test_dry_run_writes_nothing(tmp_path, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    _corpus(str(inp), n=3)
    assert main(["enhance", str(inp), str(out), "--dry-run", "--shard-size", "2"]) == 0
    text = capsys.readouterr().out
    assert "3 in 2 shard(s)" in text and "weights" in text and "nothing written" in text
    assert not out.exists()


def test_second_live_run_is_refused(tmp_path, mlflow_sqlite):
    from varlide.run import prepare_run
    from varlide.storage.runstore import RunLockedError, RunStore

    inp, out = tmp_path / "in", tmp_path / "out"
    _corpus(str(inp), n=2)
    cfg = Config(**FAST)
    plan = prepare_run(str(inp), str(out), cfg)
    with RunStore(plan.output_uri, plan.run_id).lock(owner="someone-else"):
        with pytest.raises(RunLockedError):
            _run(str(inp), str(out))


def test_no_enhance_scores_only(tmp_path, mlflow_sqlite):
    inp, out = tmp_path / "in", tmp_path / "out"
    _corpus(str(inp), n=2)
    summary = _run(str(inp), str(out), enhance=False)
    df = _scores(str(out))
    assert df["enhanced_uri"].isna().all() and df["enhancer"].isna().all()
    assert df["q_brightness_out"].isna().all() and df["q_brightness_in"].notna().all()
    assert not (out / "enhanced" / summary["run_id"]).exists()


def test_backbone_option_is_in_the_run_id_and_the_rows(tmp_path, mlflow_sqlite):
    """``enhancer_options: {backbone: identity}`` turns the shipped denoiser off: another run
    id, the bare weights version on every row, and (noisy dark frames) different pixels."""
    inp = tmp_path / "in"
    _corpus(str(inp), n=2)
    shipped = json.loads((default_weights_dir("varlide-lite") / "config.json").read_text())
    runs = {}
    for name, opts in (("denoise", {}), ("identity", {"backbone": "identity"})):
        out = tmp_path / name
        runs[name] = _run(str(inp), str(out), enhancer_options=opts, format="png")
        df = _scores(str(out)).sort_values("rel_path")
        assert set(df["status"]) == {"ok"}
        runs[name]["version"] = set(df["enhancer_version"])
        runs[name]["pixels"] = [np.asarray(Image.open(u), dtype=np.int16)
                                for u in df["enhanced_uri"]]
    assert runs["denoise"]["run_id"] != runs["identity"]["run_id"]
    assert runs["identity"]["version"] == {f"{shipped['sha256'][:12]}+ds4+hl"}
    assert runs["denoise"]["version"] == {f"{shipped['sha256'][:12]}+ds4+denoise-w1.5-k1+hl"}
    diffs = [np.abs(a - b).mean() for a, b in zip(runs["denoise"]["pixels"],
                                                  runs["identity"]["pixels"], strict=True)]
    assert all(d > 0.1 for d in diffs), diffs


def test_deblur_option_writes_its_decision_and_kernel(tmp_path, mlflow_sqlite):
    """``enhancer_options: {deblur: true}``: another run id, ``+deblur`` in the version, and
    every row says what the stage decided (``off`` where the blur prior said sharp) and the
    kernel length it estimated; without it the two columns are null."""
    from scipy.ndimage import convolve

    from varlide.demo import motion_blur_kernel, photos_uint8
    from varlide.models.deblur import DECISIONS

    inp = tmp_path / "in"
    fs, root = filesystem(str(inp))
    k = motion_blur_kernel(11, 30.0)
    for i, (_, photo) in enumerate(photos_uint8()[:3]):
        crop = photo[:96, :128].astype(np.float32) / 255
        blurred = np.stack([convolve(crop[..., c], k, mode="reflect") for c in range(3)], -1)
        for name, img in (("blurred", blurred), ("sharp", crop)):
            _write_png(fs, f"{root}/{name}_{i}.png", (img * 255).round().astype(np.uint8))
    plain = _run(str(inp), str(tmp_path / "plain"), format="png")
    on = _run(str(inp), str(tmp_path / "deblur"), format="png",
              enhancer_options={"deblur": True})
    assert plain["run_id"] != on["run_id"]
    df0, df = _scores(str(tmp_path / "plain")), _scores(str(tmp_path / "deblur"))
    assert df0["deblur"].isna().all() and df0["deblur_kernel_px"].isna().all()
    assert len(df) == 6 and set(df["status"]) == {"ok"}
    assert all(v.endswith("+deblur+hl") for v in df["enhancer_version"])
    assert set(df["deblur"]) <= set(DECISIONS)
    tried = df["deblur"] != "off"
    assert tried.any()  # the blurred photographs reach the blur threshold
    assert df.loc[tried, "deblur_kernel_px"].notna().all()
    assert df.loc[~tried, "deblur_kernel_px"].isna().all()
    assert (df.loc[tried, "blur"] >= 0.30).all() and (df.loc[~tried, "route"] != "deblur").all()


def test_reference_gives_psnr_and_ssim(tmp_path, mlflow_sqlite):
    from varlide.demo import make_demo_corpus

    corpus = tmp_path / "demo"
    make_demo_corpus(str(corpus), count=3, size=(64, 48), seed=3)
    out = tmp_path / "out"
    _run(str(corpus / "lowlight"), str(out), reference=str(corpus / "reference"),
         metrics=["brightness"])
    df = _scores(str(out))
    assert len(df) == 3 and df["q_psnr_in"].notna().all() and df["q_ssim_out"].notna().all()
    assert (df["q_psnr_out"] > df["q_psnr_in"]).mean() >= 2 / 3  # brightening helps psnr


def test_real_dev_lowlight_corpus(shared_data, tmp_path, mlflow_sqlite):
    inp = shared_data / "dev-lowlight"
    out = tmp_path / "out"
    summary = _run(str(inp), str(out), metrics=["brightness", "overexposed"], batch_size=2)
    df = _scores(str(out))
    n = len(list(inp.glob("*.png")))
    assert len(df) == n and (df["status"] == "ok").all() and summary["complete"]
    dark = df[df["q_brightness_in"] < 0.2]
    assert (dark["q_brightness_out"] > dark["q_brightness_in"] + 0.1).all()


def test_no_credentials_leak(s3_bucket, tmp_path, mlflow_sqlite, caplog):
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    inp, out = f"{s3_bucket}/in", f"{s3_bucket}/out"
    _corpus(inp, n=2)
    summary = _run(inp, out)
    df = _scores(out)
    assert not df.astype(str).apply(lambda c: c.str.contains(secret)).any().any()
    from mlflow.tracking import MlflowClient

    run = MlflowClient(mlflow_sqlite).get_run(summary["mlflow"]["run_id"])
    blob = json.dumps([run.data.params, run.data.tags])
    assert secret not in blob and secret not in caplog.text
    assert secret not in json.dumps(summary, default=str)
    assert secret not in Path(tmp_path).joinpath("mlflow.db").read_bytes().decode("latin-1")


def test_format_change_collision_is_an_error_row_and_jpeg_output(tmp_path, mlflow_sqlite):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    Image.fromarray(make_rgb(32, 32, seed=1, scale=0.2)).save(inp / "a.png")
    Image.fromarray(make_rgb(32, 32, seed=2, scale=0.2)).save(inp / "a.tif")
    Image.fromarray(make_rgb(32, 32, seed=3, scale=0.2)).save(inp / "b.bmp")
    summary = _run(str(inp), str(out))
    df = _scores(str(out)).set_index("rel_path")
    assert df.loc["a.png", "status"] == "ok" and df.loc["b.bmp", "status"] == "ok"
    assert df.loc["a.tif", "status"] == "error" and "a.png" in df.loc["a.tif", "error"]
    enhanced = out / "enhanced" / summary["run_id"]
    assert sorted(p.name for p in enhanced.iterdir()) == ["a.png", "b.png"]
    with Image.open(enhanced / "a.png") as im:  # a.png's own output, not overwritten
        assert np.abs(np.asarray(im, dtype=float).mean() / 255
                      - df.loc["a.png", "q_brightness_out"]).max() < 0.02

    out2 = tmp_path / "out2"
    summary2 = _run(str(inp), str(out2), format="jpeg", quality=80)
    assert summary2["run_id"] != summary["run_id"]  # the format changes outputs, so the run id
    names = sorted(p.name for p in (out2 / "enhanced" / summary2["run_id"]).iterdir())
    assert names == ["b.jpg"]  # a.png and a.tif both change name to a.jpg: both refused
    df2 = _scores(str(out2)).set_index("rel_path")
    assert (df2.loc[["a.png", "a.tif"], "status"] == "error").all()
    assert df2.loc[["a.png", "a.tif"], "error"].str.contains("collid|collision").all()


def test_prefect_artifacts_and_parallel_workers(tmp_path, mlflow_sqlite):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    inp, out = tmp_path / "in", tmp_path / "out"
    rels = _corpus(str(inp), n=6)
    summary = _run(str(inp), str(out), shard_size=2, workers=3)
    df = _scores(str(out))
    assert sorted(df["rel_path"]) == rels and summary["complete"]
    with get_client(sync_client=True) as client:
        keys = [f"varlide-progress-{summary['run_id']}", f"varlide-summary-{summary['run_id']}"]
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=keys)))
    by_type = {a.type: a for a in arts}
    assert set(by_type) == {"progress", "table"}
    table = by_type["table"].data
    table = json.loads(table) if isinstance(table, str) else table
    assert table[0]["images"] == 6 and table[0]["errors"] == 0
