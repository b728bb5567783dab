"""Planning at scale: the local listing walk equals fsspec's, plans stay compact, old
manifests still resume."""

from __future__ import annotations

import json
import os
import tracemalloc

import pytest

from varlide.config import load_config
from varlide.run import prepare_run
from varlide.storage import listing
from varlide.storage.listing import list_corpus
from varlide.storage.plan import PlannedFile, plan_from_json, plan_shards, plan_to_json
from varlide.storage.runstore import RunStore
from varlide.storage.uri import filesystem


def _tree(root) -> None:
    files = ["a.jpg", "b.PNG", "notes.txt", ".hidden.jpg", "sub/c.jpeg", "sub/.cache/d.jpg",
             ".git/e.png", "sub/deeper/f g.png", "sub/deeper/ünï.tif", "x/y/z/w.webp",
             "back\\slash.png", "night/1.jpg", "night/2.jpg"]
    for rel in files:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * (len(rel) + 1))
    os.symlink(root / "a.jpg", root / "link.jpg")
    os.symlink(root / "missing.jpg", root / "broken.jpg")
    os.symlink(root / "sub", root / "linked-sub")
    os.symlink(root, root / "sub" / "loop")  # a cycle: walked once, never forever


def _fsspec_listing(root, **kw):
    fs, _ = filesystem(str(root))
    return listing._list_fsspec(fs, str(root).rstrip("/"), str(root), kw.get("include", ()),
                                kw.get("exclude", ()))


@pytest.mark.parametrize("kw", [{}, {"include": ("*.jpg",)}, {"exclude": ("night/",)},
                                {"include": ("sub/*",), "exclude": ("*.tif",)}])
def test_local_walk_equals_fsspec_find(tmp_path, kw):
    (tmp_path / "c").mkdir()
    root = tmp_path / "c"
    _tree(root)
    ours = list_corpus(str(root), **kw)
    theirs = sorted(_fsspec_listing(root, **kw), key=lambda f: f.rel_path)
    assert ours == theirs
    names = {f.rel_path: f.size for f in list_corpus(str(root))}
    assert "back\\slash.png" in names  # listed under its real name, not as back/slash.png
    assert names["link.jpg"] == names["a.jpg"]
    assert not any(n.startswith("linked-sub/") for n in names)  # its folder is listed once
    assert names["broken.jpg"] == 0  # listed: its row will say it is unreadable
    assert not any("loop/" in n for n in names)  # a link cycle is not followed around


def test_limit_and_order(tmp_path):
    _tree(tmp_path)
    full = list_corpus(str(tmp_path))
    assert list_corpus(str(tmp_path), limit=3) == full[:3]
    assert [f.rel_path for f in full] == sorted(f.rel_path for f in full)


def test_compact_plan_round_trip_and_old_form():
    files = [PlannedFile("a.jpg", 3, "a.jpg", "JPEG"), PlannedFile("b.bmp", 4, "b.png", "PNG"),
             PlannedFile("c.bmp", 5, None, None, "output name collision: ...")]
    shards = plan_shards(files, 2)
    data = json.loads(json.dumps(plan_to_json(shards)))
    assert data[0]["files"][0] == ["a.jpg", 3, "", "JPEG"]
    assert plan_from_json(data) == shards
    old = [{"index": 0, "files": [{"rel_path": "a.jpg", "size": 3, "out_rel_path": "a.jpg",
                                   "out_format": "JPEG"}]}]
    assert plan_from_json(old)[0].files == (files[0],)
    with pytest.raises(ValueError, match="malformed"):
        plan_from_json([{"index": 0, "files": [["only-a-name"]]}])


def test_a_run_planned_with_the_old_manifest_form_resumes(tmp_path):
    for i in range(5):
        (tmp_path / "in" / f"{i}.jpg").parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / f"{i}.jpg").write_bytes(b"y")
    cfg = load_config(overrides={"shard_size": 2})
    plan = prepare_run(str(tmp_path / "in"), str(tmp_path / "out"), cfg)
    store = RunStore(str(tmp_path / "out"), plan.run_id)
    manifest = store.read_manifest()
    manifest["plan"] = [{"index": s.index, "files": [
        {"rel_path": f.rel_path, "size": f.size, "out_rel_path": f.out_rel_path,
         "out_format": f.out_format} for f in s.files]} for s in plan.shards]
    (tmp_path / "out" / "runs" / plan.run_id / "manifest.json").write_text(json.dumps(manifest))
    again = prepare_run(str(tmp_path / "in"), str(tmp_path / "out"), cfg)
    assert again.resumed and again.shards == plan.shards


def test_twenty_thousand_keys_plan_in_little_memory(tmp_path):
    root = tmp_path / "big"
    for d in range(20):
        (root / f"d{d:02d}").mkdir(parents=True)
        for f in range(1000):
            (root / f"d{d:02d}" / f"frame-{f:05d}.jpg").touch()
    cfg = load_config(overrides={"shard_size": 256})
    tracemalloc.start()
    plan = prepare_run(str(root), str(tmp_path / "out"), cfg)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert plan.images == 20_000 and len(plan.shards) == 79
    # ~300 B per key at the peak (the record, its path string, the manifest text being
    # built); the dict-per-key listing and manifest of before needed ~1.2 KB.
    assert peak < 20_000 * 600, f"{peak / 20_000:.0f} B per key"
    size = (tmp_path / "out" / "runs" / plan.run_id / "manifest.json").stat().st_size
    assert size < 20_000 * 45  # one compact row per key
