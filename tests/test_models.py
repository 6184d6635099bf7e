"""Model factory: offline pretrained weights, local weight files, linear probe freezing, safe checkpoints."""

from __future__ import annotations

import pickle

import pytest
import timm
import torch

from pipeline.models import build_model, load_checkpoint, save_checkpoint
from pipeline.models.weights import WeightsError, efficientnet_lite0_package_state_dict


def test_package_weights_map_onto_timm_lite0():
    sd = efficientnet_lite0_package_state_dict()
    model = build_model("cnn", "tf_efficientnet_lite0", 7, "package:efficientnet_lite0")
    own = model.state_dict()
    assert len(sd) == 247
    backbone = [k for k in sd if not k.startswith("classifier.")]
    assert all(torch.equal(own[k], sd[k]) for k in backbone)
    assert own["classifier.weight"].shape == (7, 1280)
    # normalisation expected by these weights
    assert model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)


def test_package_weights_refuse_other_architectures():
    with pytest.raises(WeightsError, match="tf_efficientnet_lite0"):
        build_model("cnn", "resnet18", 5, "package:efficientnet_lite0")


def test_local_weights_file_is_loaded_through_timm(tmp_path):
    src = timm.create_model("resnet18", num_classes=10)
    path = tmp_path / "resnet18.pth"
    torch.save(src.state_dict(), path)
    model = build_model("cnn", "resnet18", 3, f"file:{path}")
    assert torch.equal(model.state_dict()["conv1.weight"], src.state_dict()["conv1.weight"])
    assert model.get_classifier().out_features == 3


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        build_model("cnn", "resnet18", 3, f"file:{tmp_path / 'nope.pth'}")


def test_linear_probe_trains_only_the_head():
    model = build_model("linear", "resnet18", 4, "none")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.eval()
    torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1])).backward()
    opt.step()
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before if n not in trainable)
    assert not torch.equal(before["fc.weight"], after["fc.weight"])


@pytest.mark.parametrize("img_size", [32, 48])
def test_vit_builds_at_requested_size(img_size):
    model = build_model("vit", "vit_tiny_patch16_224", 5, "none", img_size)
    out = model(torch.randn(2, 3, img_size, img_size))
    assert out.shape == (2, 5) and torch.isfinite(out).all()


def test_checkpoint_roundtrip_and_untrusted_pickles_are_refused(tmp_path):
    model = build_model("cnn", "resnet18", 3, "none").eval()
    meta = {
        "classes": ["a", "b", "c"],
        "data_config": {"mean": [0.5] * 3, "std": [0.5] * 3},
        "model_spec": {"method": "cnn", "model": "resnet18", "img_size": 32},
    }
    save_checkpoint(tmp_path / "m.pt", model, meta)
    loaded, ckpt = load_checkpoint(tmp_path / "m.pt")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert ckpt["classes"] == ["a", "b", "c"]

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"format": "x", "payload": Evil()}))
    with pytest.raises(ValueError, match=r"not a checkpoint of this pipeline \(not a torch file: UnpicklingError\)"):
        load_checkpoint(tmp_path / "evil.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_vit_img_size_must_tile_into_patches():
    with pytest.raises(ValueError, match="train.img_size: 100 is not divisible by the patch size 16"):
        build_model("vit", "test_vit", 3, "none", 100)
    model = build_model("vit", "test_vit", 3, "none", 32, patch_size=8)  # timm re-shapes the patch embedding
    assert model.patch_embed.grid_size == (4, 4) and model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_linear_probe_on_a_vit_keeps_the_backbone_bit_identical():
    model = build_model("linear", "test_vit", 4, "none", 48)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.05)
    torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 48, 48)), torch.tensor([0, 3])).backward()
    opt.step()
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], p) for n, p in after.items() if not n.startswith("head."))
    assert not torch.equal(before["head.weight"], after["head.weight"])


@pytest.mark.parametrize(
    "method, options",
    [
        ("glsim", {"patch_size": 8, "glsim_top_k": 3, "glsim_box": "corrected"}),
        ("ila", {"patch_size": 8, "ila_variant": "ila+"}),
    ],
)
def test_glsim_and_ila_checkpoints_reload_with_identical_logits(tmp_path, method, options):
    torch.manual_seed(0)
    model = build_model(method, "test_vit", 3, "none", 48, **options)
    model.train()(torch.randn(4, 3, 48, 48))  # moves the ILA BatchNorm statistics away from their init
    with torch.no_grad():
        model.get_classifier().weight.normal_()  # GLSim's head starts at zero: logits would be trivially equal
    model.eval()
    meta = {"classes": ["a", "b", "c"], "model_spec": {"method": method, "model": "test_vit", "img_size": 48}}
    save_checkpoint(tmp_path / "m.pt", model, meta)
    loaded, ckpt = load_checkpoint(tmp_path / "m.pt")
    assert ckpt["model_spec"]["options"] == model.spec.options and set(options) <= set(model.spec.options)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_hybrid_vit_runs_glsim_and_ila_on_the_package_cnn():
    """train.backbone_cnn: timm's HybridEmbed over EfficientNet-Lite0's stride-16 stage, with the offline weights."""
    from pipeline.data.transforms import data_config

    package = efficientnet_lite0_package_state_dict()
    ila = build_model("ila", "test_vit", 3, "package:efficientnet_lite0", 96, backbone_cnn="tf_efficientnet_lite0")
    cnn = ila.vit.patch_embed.backbone
    own = {k.removeprefix("model."): v for k, v in cnn.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(own) > 100 and all(torch.equal(v, package[k]) for k, v in own.items())
    assert cnn.feature_info.reduction() == [16] and ila.vit.patch_embed.grid_size == (6, 6)
    assert data_config(ila)["mean"] == [0.5, 0.5, 0.5]  # normalised for the CNN's weights
    assert not any(p.requires_grad for p in cnn.parameters())  # frozen with the rest of the backbone
    stats = {k: v.clone() for k, v in cnn.state_dict().items()}
    out = ila.train()(torch.randn(2, 3, 96, 96))
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    assert all(torch.equal(stats[k], v) for k, v in cnn.state_dict().items())  # frozen BatchNorms stay in eval

    glsim = build_model("glsim", "test_vit", 3, "package:efficientnet_lite0", 64, backbone_cnn="tf_efficientnet_lite0")
    assert torch.equal(
        glsim.vit.patch_embed.backbone.state_dict()["model.conv_stem.weight"], package["conv_stem.weight"]
    )
    res = glsim.forward_with_crops(torch.randn(2, 3, 64, 64))
    assert res.logits.shape == (2, 3) and res.crops.shape == (2, 3, 64, 64) and glsim.patch_px == (16, 16)
    with pytest.raises(ValueError, match="train.patch_size: 12 is no feature stride of tf_efficientnet_lite0"):
        build_model("vit", "test_vit", 3, "none", 96, patch_size=12, backbone_cnn="tf_efficientnet_lite0")


def test_train_params_for_vit_methods():
    from pydantic import ValidationError

    from pipeline.config import TrainParams
    from pipeline.models.factory import model_options

    cfg = TrainParams(method="ila", model="vit_base_patch16_224", img_size=224, ila_variant="ila++")
    assert model_options(cfg)["ila_variant"] == "ila++" and TrainParams().method == "cnn"
    with pytest.raises(ValidationError, match="not divisible by the patch size 32"):
        TrainParams(method="vit", model="vit_base_patch16_224", patch_size=32, img_size=240)
    with pytest.raises(ValidationError, match="backbone_cnn"):
        TrainParams(method="cnn", backbone_cnn="tf_efficientnet_lite0")
