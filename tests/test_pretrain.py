"""pretrain: the distillation command on a tiny budget, its resume, the pool's exclusions, the committed weights."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from pipeline import cli
from pipeline.config import PretrainParams
from pipeline.pretrain import distill as distill_mod
from pipeline.pretrain.augment import BatchAugment
from pipeline.pretrain.distill import DistillPaths, distill, sha256_file
from pipeline.pretrain.pool import OPENCLIPART_DIR, PoolError, build_pool, excluded_codepoints

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "steps": 4,
    "batch_size": 4,
    "img_size": 32,
    "patch_size": 8,
    "min_grid": 4,
    "pool_px": 40,
    "warmup_steps": 1,
    "checkpoint_every": 2,
    "log_every": 1,
    "sources": ["openclipart"],
    "name": "tiny",
}


def _clipart(root: Path, n: int = 6) -> Path:
    """n distinct RGBA drawings in the openclipart package layout, plus one symlinked duplicate."""
    folder = root / OPENCLIPART_DIR / "shapes"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        px = np.zeros((50, 70, 4), np.uint8)
        px[5 + i : 40, 10 : 60 - i] = [*rng.integers(0, 255, 3), 255]
        Image.fromarray(px).save(folder / f"d{i}.png")
    (folder / "link.png").symlink_to(folder / "d0.png")
    return root


def _params(tmp_path: Path, **pretrain) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["base"]["device"] = "cpu"
    params["acquire"]["embedded"]["path"] = str(REPO / "datasets/emoji")
    params["pretrain"].update({**TINY, **pretrain, "exclude_dataset": str(REPO / "datasets/emoji")})
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def test_pretrain_command_exports_card_provenance_and_loadable_weights(tmp_path):
    sources = _clipart(tmp_path / "src")
    out = tmp_path / "weights"
    rc = cli.main(
        [
            "pretrain",
            "--params",
            str(_params(tmp_path)),
            "--out",
            str(out),
            "--work",
            str(tmp_path / "w"),
            "--sources",
            str(sources),
            "--threads",
            "1",
        ]
    )
    assert rc == 0
    weights = out / "tiny.safetensors"
    state = load_file(weights)
    assert {t.dtype for t in state.values()} == {torch.float16}
    assert state["head.weight"].shape == (1000, 192)  # a complete ImageNet classifier, as timm expects
    card = (out / "tiny.md").read_text()
    assert re.search(r"sha256: `([0-9a-f]{64})`", card).group(1) == sha256_file(weights)
    summary = json.loads((out / "tiny.json").read_text())
    assert summary["steps"] == 4 and summary["grid"] == [4, 4]
    provenance = pl.read_csv(out / "tiny.provenance.csv")
    assert provenance.to_dicts()[0]["images"] == 6  # the symlink is the same drawing: counted once
    curve = pl.read_csv(out / "tiny.loss.csv")
    assert curve["step"].to_list() == [1, 2, 3, 4] and curve["loss"].is_finite().all()
    assert (out / "tiny.loss.png").read_bytes()[:4] == b"\x89PNG"

    from pipeline.models.factory import build_model

    model = build_model("vit", "vit_tiny_patch16_224", 5, f"file:{weights}", 32, patch_size=8).eval()
    assert torch.equal(model.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"].float())
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 5)


def test_killed_distillation_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    cfg = PretrainParams(**{**TINY, "sources": ("openclipart",)})
    images = np.random.default_rng(1).integers(0, 255, (10, 40, 40, 3), dtype=np.uint8)
    straight = distill(
        cfg, images, DistillPaths(tmp_path / "a", tmp_path / "a.safetensors"), seed=3, device=torch.device("cpu")
    )

    real_call = BatchAugment.__call__

    def killed_at_3(self, step):
        if step == 3:
            raise KeyboardInterrupt
        return real_call(self, step)

    monkeypatch.setattr(BatchAugment, "__call__", killed_at_3)
    paths = DistillPaths(tmp_path / "b", tmp_path / "b.safetensors")
    with pytest.raises(KeyboardInterrupt):
        distill(cfg, images, paths, seed=3, device=torch.device("cpu"))
    assert torch.load(paths.work_dir / "last.pt", weights_only=True)["step"] == 2  # the last checkpoint
    monkeypatch.setattr(BatchAugment, "__call__", real_call)
    resumed = distill(cfg, images, paths, seed=3, device=torch.device("cpu"))
    assert [r["step"] for r in resumed["history"]] == [1, 2, 3, 4]
    for (k, a), b in zip(straight["student"].state_dict().items(), resumed["student"].state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k

    with pytest.raises(ValueError, match="other settings"):  # another lr must not continue this state
        distill(cfg.model_copy(update={"lr": 0.5}), images, paths, seed=3, device=torch.device("cpu"))


def test_batches_depend_only_on_seed_and_step():
    pool = torch.from_numpy(np.random.default_rng(2).integers(0, 255, (7, 40, 40, 3), dtype=np.uint8))
    a = BatchAugment(pool, 4, 32, 5, scale_min=0.25, mixup=0.5)
    b = BatchAugment(pool, 4, 32, 5, scale_min=0.25, mixup=0.5)
    assert torch.equal(a(3), b(3)) and not torch.equal(a(3), a(4))
    assert a(3).shape == (4, 3, 32, 32) and a(3).min() >= -1 and a(3).max() <= 1  # normalised as the teacher wants
    # Two epochs of 7 images: every image once per epoch.
    seen = [i for step in range(7) for i in a.indices(step).tolist()]
    assert sorted(seen[:7]) == list(range(7)) and sorted(seen[7:14]) == list(range(7))


def test_views_pad_with_white_and_vary_per_image(monkeypatch):
    from pipeline.pretrain import augment

    for colour_op in ("P_JITTER", "P_GREY", "P_SHUFFLE", "P_BLUR", "P_INVERT"):
        monkeypatch.setattr(augment, colour_op, 0.0)
    white = torch.full((16, 40, 40, 3), 255, dtype=torch.uint8)
    views = BatchAugment(white, 16, 32, 0, scale_min=0.25, mixup=0.0)(0)
    # Rotated/sheared crops reach outside the drawing: that area is the pool's white, not black.
    assert torch.allclose(views, torch.ones_like(views), atol=1e-5)
    monkeypatch.undo()
    pool = torch.from_numpy(np.random.default_rng(3).integers(0, 255, (1, 40, 40, 3), dtype=np.uint8))
    views = BatchAugment(pool.expand(16, -1, -1, -1).contiguous(), 16, 32, 0, scale_min=0.25, mixup=0.0)(0)
    assert len({tuple(v[:50].tolist()) for v in views.flatten(1)}) == 16  # each image of a batch: its own view


def test_pool_refuses_missing_sources_and_knows_the_embedded_classes(tmp_path):
    with pytest.raises(PoolError, match="fetch_pretrain_sources"):
        build_pool(tmp_path, ("openclipart",), 40, (), REPO / "datasets/emoji")
    embedded = excluded_codepoints(REPO / "datasets/emoji")
    assert len(embedded) == 233 and 0x1F600 in embedded  # grinning face: never in the pool


def test_student_grid_below_the_minimum_is_refused(tmp_path):
    cfg = PretrainParams(**{**TINY, "sources": ("openclipart",), "patch_size": 16, "min_grid": 6})
    images = np.zeros((4, 40, 40, 3), np.uint8)
    with pytest.raises(ValueError, match="2x2 grid"):
        distill(cfg, images, DistillPaths(tmp_path, tmp_path / "w.safetensors"), seed=0, device=torch.device("cpu"))


def test_committed_weights_match_their_card_and_run():
    weights = REPO / "weights/vit_tiny_distilled_128.safetensors"
    card = (REPO / "weights/vit_tiny_distilled_128.md").read_text()
    assert re.search(r"sha256: `([0-9a-f]{64})`", card).group(1) == sha256_file(weights)
    assert weights.stat().st_size <= 25 * 2**20
    summary = json.loads((REPO / "weights/vit_tiny_distilled_128.json").read_text())
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    # The variants start from these weights, at the size they were distilled at; the card says where it ran.
    for name in ("vit", "glsim", "ila"):
        assert params["variants"][name]["weights"] == "file:weights/vit_tiny_distilled_128.safetensors"
        assert params["variants"][name]["img_size"] == summary["img_size"] == params["pretrain"]["img_size"]
    assert summary["device"] in card and f"{summary['steps']} steps x batch {summary['batch_size']}" in card
    from pipeline.models.factory import build_model

    model = build_model("vit", "vit_tiny_patch16_224", 233, f"file:{weights}", 128).eval()
    assert model.patch_embed.grid_size == (8, 8)
    with torch.inference_mode():
        logits = model(torch.zeros(1, 3, 128, 128))
    assert logits.shape == (1, 233) and torch.isfinite(logits).all()
    # The distilled ImageNet head: the student agrees with its teacher on a real drawing's top-5.
    teacher = distill_mod.Teacher("tf_efficientnet_lite0", 16)
    student = build_model("vit", "vit_tiny_patch16_224", 1000, f"file:{weights}", 128).eval()
    x = (
        torch.from_numpy(
            np.asarray(
                Image.open(REPO / "datasets/emoji/images/noto/1F600.png").convert("RGB").resize((128, 128)),
                dtype=np.float32,
            )
        ).permute(2, 0, 1)[None]
        / 127.5
        - 1
    )
    with torch.inference_mode():
        t5 = set(teacher(x)[3].topk(5).indices[0].tolist())
        s5 = set(student(x).topk(5).indices[0].tolist())
    assert t5 & s5


def _shapes_manifest(root: Path) -> pl.DataFrame:
    """3 classes (a red disc, a green bar, a blue cross) drawn at jittered places: 4 train, 2 val, 2 test each."""
    from PIL import ImageDraw

    rng = np.random.default_rng(0)
    rows = []
    for cls in range(3):
        for i, split in enumerate(["train"] * 4 + ["val"] * 2 + ["test"] * 2):
            im = Image.new("RGB", (48, 48), "white")
            d = ImageDraw.Draw(im)
            x, y = rng.integers(4, 16, 2)
            if cls == 0:
                d.ellipse([x, y, x + 26, y + 26], fill=(220, 30, 30))
            elif cls == 1:
                d.rectangle([x, y + 8, x + 30, y + 16], fill=(30, 180, 30))
            else:
                d.line([x, y, x + 26, y + 26], fill=(30, 30, 220), width=5)
                d.line([x + 26, y, x, y + 26], fill=(30, 30, 220), width=5)
            im.save(root / f"{cls}_{i}.png")
            rows.append({"path": f"{cls}_{i}.png", "class_id": cls, "split": split})
    return pl.DataFrame(rows)


def test_linear_probe_separates_classes_on_frozen_teacher_features(tmp_path):
    from pipeline.pretrain.probe import probe, teacher_model

    torch.set_num_threads(1)
    df = _shapes_manifest(tmp_path)
    result = probe(teacher_model(), "cnn", df, tmp_path, 32)
    assert result["dim"] == 1280 and result["l2"] in (1e-4, 1e-3, 1e-2, 1e-1)
    assert result["test_top1"] > 50.0  # chance is 33 %
    with pytest.raises(ValueError, match="train, val and test"):
        probe(teacher_model(), "cnn", df.filter(pl.col("split") != "val"), tmp_path, 32)


def test_a_larger_budget_continues_the_state_and_the_card_says_so(tmp_path):
    from pipeline.pretrain.distill import export

    torch.set_num_threads(1)
    cfg = PretrainParams(**{**TINY, "sources": ("openclipart",)})
    images = np.random.default_rng(4).integers(0, 255, (6, 40, 40, 3), dtype=np.uint8)
    paths = DistillPaths(tmp_path / "w", tmp_path / "out/v.safetensors")
    distill(cfg, images, paths, seed=0, device=torch.device("cpu"), steps=2)
    result = distill(cfg, images, paths, seed=0, device=torch.device("cpu"), steps=4)
    assert result["budgets"] == [[0, 2], [2, 4]] and [r["step"] for r in result["history"]] == [1, 2, 3, 4]
    rows = [{"group": "openclipart", "source": "s", "licence": "l", "images": 6}]
    summary = export(result, cfg, rows, paths, seed=0, device="cpu")
    assert summary["steps"] == 4
    assert "Step budget changed while resuming: 2 steps from step 0; 4 steps from step 2" in paths.card.read_text()


def test_pool_pack_travels_and_trains_like_the_sources(tmp_path):
    """--pack writes the fitted pool into one file; --pool trains from it on a machine without the sources."""
    sources = _clipart(tmp_path / "src")
    params = _params(tmp_path)
    pack = tmp_path / "pack" / "pool.npz"
    pretrain = ["pretrain", "--params", str(params)]
    assert cli.main([*pretrain, "--work", str(tmp_path / "w"), "--sources", str(sources), "--pack", str(pack)]) == 0
    from pipeline.pretrain.pool import load_pool, unpack_pool

    built, carried = load_pool(tmp_path / "w" / "pool.npz"), unpack_pool(pack)
    assert np.array_equal(built.images, carried.images)  # lossless by default
    assert carried.groups == built.groups and carried.files == built.files
    out = tmp_path / "out"
    on_gpu_host = ["--work", str(tmp_path / "w2"), "--pool", str(pack), "--out", str(out)]
    on_gpu_host += ["--device", "cpu", "--threads", "1", "--export-each-checkpoint"]
    assert cli.main([*pretrain, *on_gpu_host]) == 0
    summary = json.loads((out / "tiny.json").read_text())
    assert summary["images"] == 6 and summary["pool_file"] == "pool.npz" and summary["device"] == "cpu"
    assert "Pool read from the pack `pool.npz`" in (out / "tiny.md").read_text()
    with pytest.raises(PoolError, match="no pool pack"):
        unpack_pool(tmp_path / "w" / "pool.npz")


def test_wall_clock_budget_is_sized_from_the_measured_speed(tmp_path):
    torch.set_num_threads(1)
    cfg = PretrainParams(
        **{**TINY, "sources": ("openclipart",), "steps": 10_000, "warmup_steps": 50, "checkpoint_every": 10_000}
    )
    images = np.random.default_rng(5).integers(0, 255, (6, 40, 40, 3), dtype=np.uint8)
    result = distill(
        cfg,
        images,
        DistillPaths(tmp_path / "w", tmp_path / "v.safetensors"),
        seed=0,
        device=torch.device("cpu"),
        max_seconds=4.0,
    )
    # Sized inside the warm-up, so the schedule so far fits any budget: one budget, far below the 10,000 asked.
    assert len(result["budgets"]) == 1 and result["budgets"][0][0] == 0
    assert 25 < result["steps"] == result["budgets"][0][1] < 10_000
    assert result["history"][-1]["step"] == result["steps"]


def test_a_diverged_loss_stops_before_any_state_is_saved(tmp_path, monkeypatch):
    """Steps do not sync to check their loss; a non-finite one is caught at the next checkpoint (here no log row
    comes first) and the run stops before writing that state."""
    torch.set_num_threads(1)
    cfg = PretrainParams(**{**TINY, "sources": ("openclipart",), "log_every": 100, "checkpoint_every": 2})
    images = np.random.default_rng(1).integers(0, 255, (10, 40, 40, 3), dtype=np.uint8)
    real_losses = distill_mod.distill_losses

    def diverged(*args, **kwargs):
        return {k: v * float("nan") for k, v in real_losses(*args, **kwargs).items()}

    monkeypatch.setattr(distill_mod, "distill_losses", diverged)
    paths = DistillPaths(tmp_path / "a", tmp_path / "a.safetensors")
    with pytest.raises(FloatingPointError, match="loss is nan before step 2"):
        distill(cfg, images, paths, seed=3, device=torch.device("cpu"))
    assert not (paths.work_dir / "last.pt").exists()
