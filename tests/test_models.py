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
    meta = {"classes": ["a", "b", "c"], "data_config": {"mean": [0.5] * 3, "std": [0.5] * 3},
            "model_spec": {"method": "cnn", "model": "resnet18", "img_size": 32}}
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
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(tmp_path / "evil.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")
