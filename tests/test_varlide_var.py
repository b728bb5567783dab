"""``varlide-var``: VICM -> VARSR backbone -> VGPM as an enhancer (tiny random backbones)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from varlide.models.base import create_enhancer
from varlide.models.pretrained import WEIGHTS_FILE, default_weights_dir, weights_sha256
from varlide.models.var.varsr import restore
from varlide.models.varlide_var import BACKBONE_FILES, VarlideVar, VarlideVarConfig

PATCH_NUMS = (1, 2, 4)
TINY = VarlideVarConfig(
    transformer=dict(depth=1, width=32, heads=2, vocab_size=32, cvae=8, patch_nums=PATCH_NUMS,
                     prefix_side=4, cond_channels=(8, 16, 16), refiner_width=16,
                     refiner_depth=1),
    tokenizer=dict(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 2, 2),
                   patch_nums=PATCH_NUMS),
    overlap=2, tile_batch=8)
TILE = 16  # tokenizer: 4 tokens x 4 (two downsamplings)


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_folder(tmp_path, seed: int = 0):
    torch.manual_seed(seed)
    model = VarlideVar(TINY)
    with torch.no_grad():
        for p in [*model.var.parameters(), *model.vae.parameters()]:
            p.add_(torch.randn_like(p) * 0.1)
    folder = tmp_path / "w"
    version = model.save_pretrained(folder, backbone=True)
    return model, folder, version


def test_weights_folder_round_trip_and_version(tmp_path):
    model, folder, version = _tiny_folder(tmp_path)
    assert {p.name for p in folder.iterdir()} == {"config.json", WEIGHTS_FILE,
                                                  *BACKBONE_FILES.values()}
    loaded = create_enhancer("varlide-var", weights=str(folder))
    assert loaded.version == version and version.endswith("+t16o2+hl")
    var_sha = weights_sha256((folder / BACKBONE_FILES["var"]).read_bytes())
    assert f"+var{var_sha[:8]}+" in version
    for a, b in zip(loaded.var.state_dict().values(), model.var.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)


def test_routes_skip_and_full_and_one_tile_equals_the_backbone(tmp_path):
    _, folder, _ = _tiny_folder(tmp_path)
    enh = create_enhancer("varlide-var", weights=str(folder), highlights=False)
    x = torch.rand(2, 3, TILE, TILE) * 0.2
    res = enh.enhance(x, torch.tensor([0.9, 0.1]), torch.tensor([0.2, 0.2]))
    assert res.route == ["skip", "full"]
    torch.testing.assert_close(res.images[0], x[0])
    assert int(res.n_iter[1]) > 0 and int(res.n_iter[0]) == 0
    with torch.no_grad():  # one frame that is exactly one tile: VICM, then the backbone
        curve = enh.vicm(x[1:], torch.tensor([0.1]), mask="hard")["image"].clamp(0, 1)
        direct = restore(enh.var, enh.vae, curve, seed=0)
    torch.testing.assert_close(res.images[1:], direct, atol=1e-6, rtol=0)


def test_any_size_goes_through_tiles(tmp_path):
    _, folder, _ = _tiny_folder(tmp_path)
    enh = create_enhancer("varlide-var", weights=str(folder))
    x = torch.rand(2, 3, 37, 50) * 0.2
    res = enh.enhance(x, torch.tensor([0.1, 0.2]), torch.tensor([0.2, 0.5]))
    assert res.images.shape == x.shape and res.route == ["full", "full"]
    assert 0 <= float(res.images.min()) and float(res.images.max()) <= 1
    assert float(res.images.mean()) > float(x.mean())  # VICM brightened them


def test_missing_backbone_files_name_the_commands(tmp_path):
    _, folder, _ = _tiny_folder(tmp_path)
    (folder / BACKBONE_FILES["var"]).unlink()
    with pytest.raises(FileNotFoundError, match="varlide weights convert VARSR.pth"):
        create_enhancer("varlide-var", weights=str(folder))
    with pytest.raises(FileNotFoundError, match="No VAR weights ship"):
        create_enhancer("varlide-var")


def test_front_end_defaults_to_the_shipped_curve(tmp_path):
    _, folder, _ = _tiny_folder(tmp_path)
    (folder / WEIGHTS_FILE).unlink()
    (folder / "config.json").unlink()  # sizes back to the release's: rewrite a tiny one
    VarlideVar(TINY).save_pretrained(tmp_path / "cfg")
    (folder / "config.json").write_bytes((tmp_path / "cfg" / "config.json").read_bytes())
    enh = create_enhancer("varlide-var", weights=str(folder))
    shipped = (default_weights_dir("varlide-lite") / WEIGHTS_FILE).read_bytes()
    assert enh.version.startswith(weights_sha256(shipped)[:12])


def test_full_size_refuses_cpu_unless_forced():
    with torch.device("meta"):
        enh = VarlideVar()
        forced = VarlideVar(allow_cpu=True)
    assert enh.full_size
    with pytest.raises(RuntimeError, match="allow_cpu"):
        enh._check_device(torch.device("cpu"))
    forced._check_device(torch.device("cpu"))  # no error
    enh._check_device(torch.device("cuda"))  # the GPU is fine


@pytest.mark.usefixtures("prefect_harness")
def test_varlide_enhance_runs_end_to_end_on_a_tiny_checkpoint(tmp_path, mlflow_sqlite,
                                                              monkeypatch):
    from varlide.cli import main
    from varlide.engine import clear_stage_cache

    _, folder, version = _tiny_folder(tmp_path)
    loads = []
    real = VarlideVar.from_pretrained.__func__

    def counted(cls, *args, **kwargs):
        loads.append(args[0])
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(VarlideVar, "from_pretrained", classmethod(counted))
    clear_stage_cache()
    inp = tmp_path / "in"
    inp.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        arr = (rng.random((24 + 8 * i, 40, 3)) * 40).astype(np.uint8)  # dark: route full
        Image.fromarray(arr).save(inp / f"f{i}.png")
    out = tmp_path / "out"
    code = main(["enhance", str(inp), str(out), "--enhancer", "varlide-var", "--weights",
                 str(folder), "--metrics", "brightness", "--no-progress", "--format", "png",
                 "--shard-size", "1"])
    assert code == 0
    assert len(loads) == 1  # three shards, one model: loaded once per worker process
    files = sorted(out.glob("scores/**/*.parquet"))
    df = pd.concat([pd.read_parquet(f) for f in files])
    assert len(df) == 3 and set(df["status"]) == {"ok"}
    assert set(df["enhancer"]) == {"varlide-var"}
    assert set(df["enhancer_version"]) == {version}
    assert set(df["route"]) == {"full"}


def test_dry_run_without_backbone_files_stops_naming_them(tmp_path, capsys):
    from varlide.cli import main

    inp = tmp_path / "in"
    inp.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(inp / "a.png")
    for extra in ([], ["--weights", str(tmp_path / "nowhere")]):
        code = main(["enhance", str(inp), str(tmp_path / "out"), "--enhancer", "varlide-var",
                     "--dry-run", "--no-progress", *extra])
        err = capsys.readouterr().err
        assert code == 2 and "varsr.safetensors" in err and "varlide weights convert" in err
    assert not (tmp_path / "out").exists()


def test_the_upstream_files_are_in_the_weights_catalogue():
    from varlide.resolver import catalogue

    used = {r.file.location: r.used_by for r in catalogue()}
    for name in ("VARSR.pth", "VQVAE.pth"):
        assert used[f"hf:qyp2000/VARSR/{name}"] == "enhancer varlide-var (upstream release)"


def test_header_check_refuses_files_that_do_not_fit_without_loading_them(tmp_path):
    import json

    from varlide.models.varlide_var import check_weights

    _, folder, _ = _tiny_folder(tmp_path)
    check_weights(folder)  # fits
    meta = json.loads((folder / "config.json").read_text())
    meta["model"]["transformer"]["depth"] = 2  # the files hold one block
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="varsr.safetensors does not fit"):
        check_weights(folder)
    (folder / BACKBONE_FILES["vae"]).unlink()
    with pytest.raises(FileNotFoundError, match="vqvae.safetensors"):
        check_weights(folder)


def test_an_fp16_converted_backbone_loads_and_restores_alike(tmp_path):
    """`varlide weights convert VARSR.pth DIR/varsr.safetensors --dtype fp16` (what the README
    suggests) gives half-precision tensors; they load into the fp32 model, cast."""
    import json

    from safetensors.torch import load_file, save_file

    _, folder, _ = _tiny_folder(tmp_path)
    meta = json.loads((folder / "config.json").read_text())
    meta.pop("backbone")  # a front end that names no backbone hash (one made by hand)
    (folder / "config.json").write_text(json.dumps(meta))
    full = create_enhancer("varlide-var", weights=str(folder), highlights=False)
    for fname in BACKBONE_FILES.values():
        state = load_file(folder / fname)
        save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()},
                  folder / fname)
    half = create_enhancer("varlide-var", weights=str(folder), highlights=False)
    assert next(half.var.parameters()).dtype == torch.float32
    assert half.version != full.version  # other files, another version
    x = torch.rand(1, 3, TILE, TILE) * 0.2
    a = full.enhance(x, torch.tensor([0.1]), torch.tensor([0.2])).images
    b = half.enhance(x, torch.tensor([0.1]), torch.tensor([0.2])).images
    assert float((a - b).abs().mean()) < 0.02


def test_the_readme_path_from_the_authors_files_to_a_run(tmp_path):
    """VARSR.pth / VQVAE.pth in the authors' nesting -> `varlide weights convert` (fp16 for
    the transformer, as the README says) -> DIR (+ a config.json for the tiny sizes) ->
    `create_enhancer("varlide-var", weights=DIR)` restores as the original modules do."""
    import json

    from varlide.cli import main

    model, folder, _ = _tiny_folder(tmp_path)
    src = tmp_path / "release"
    src.mkdir()
    torch.save({"trainer": {"var_wo_ddp": model.backbone_state("var"),
                            "var_opt": {"state": {}}}, "epoch": 3}, src / "VARSR.pth")
    torch.save({"trainer": {"vae_local": model.backbone_state("vae")}}, src / "VQVAE.pth")
    run = tmp_path / "DIR"
    assert main(["weights", "convert", str(src / "VARSR.pth"), str(run / "varsr.safetensors"),
                 "--dtype", "fp16"]) == 0
    assert main(["weights", "convert", str(src / "VQVAE.pth"),
                 str(run / "vqvae.safetensors")]) == 0
    sizes = json.loads((folder / "config.json").read_text())["model"]
    (run / "config.json").write_text(json.dumps({"enhancer": "varlide-var", "model": sizes}))
    enh = create_enhancer("varlide-var", weights=str(run), highlights=False)
    x = torch.rand(1, 3, TILE, TILE) * 0.2
    got = enh.enhance(x, torch.tensor([0.1]), torch.tensor([0.2])).images
    with torch.no_grad():
        curve = enh.vicm(x, torch.tensor([0.1]), mask="hard")["image"].clamp(0, 1)
        want = restore(model.var, model.vae, curve, seed=0)
    assert float((got - want).abs().mean()) < 0.02  # fp16 storage of the transformer only
