"""The method registry (pipeline/methods.py) feeds the params, the CLI and the factory; ModelSpec travels in
checkpoints, old ones included."""

from __future__ import annotations

import typing

import pytest
import torch

from pipeline import methods
from pipeline.config import TrainParams
from pipeline.models import build_model, load_checkpoint, save_checkpoint
from pipeline.models.profile import add_profile_parser
from pipeline.models.spec import ModelSpec


def _choices(parser, dest: str) -> tuple:
    return tuple(next(a for a in parser._actions if a.dest == dest).choices)


def test_params_and_cli_accept_exactly_the_registered_methods():
    import argparse

    assert typing.get_args(TrainParams.model_fields["method"].annotation) == tuple(methods.METHODS)
    assert typing.get_args(TrainParams.model_fields["ila_variant"].annotation) == methods.METHODS["ila"].variants
    parser = add_profile_parser(argparse.ArgumentParser().add_subparsers())
    assert _choices(parser, "method") == tuple(methods.METHODS)
    assert _choices(parser, "variant") == methods.METHODS["ila"].variants
    with pytest.raises(ValueError, match=r"train.method: unknown method 'nope', expected one of \('cnn'"):
        build_model("nope", "resnet10t", 3)


@pytest.mark.parametrize("name", list(methods.METHODS))
def test_every_registered_method_builds_records_its_options_and_reloads(tmp_path, name):
    method = methods.METHODS[name]
    vit = method.needs_vit or name == "vit"
    model_name, size = ("test_vit", 48) if vit else ("resnet10t", 32)  # ILA needs a 5x5 token grid or more
    options = {"patch_size": 8} if vit else {}
    torch.manual_seed(0)
    model = build_model(name, model_name, 3, "none", size, **options)
    assert model.spec.method == name and model.spec.model == model_name and model.spec.img_size == size
    assert set(model.spec.options) <= {*methods.COMMON_OPTIONS, *method.options}
    assert set(method.options) <= set(model.spec.options)  # the method's own options are always recorded
    save_checkpoint(tmp_path / "m.pt", model.eval(), {"classes": ["a", "b", "c"]})
    loaded, ckpt = load_checkpoint(tmp_path / "m.pt")
    assert ModelSpec.of(ckpt) == model.spec
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_a_checkpoint_without_recorded_options_still_loads(tmp_path):
    """Checkpoints written before build options were recorded hold {method, model, img_size} only."""
    model = build_model("cnn", "resnet10t", 3, "none", 32)
    state = {k: v for k, v in model.state_dict().items()}
    torch.save(
        {
            "format": "anime-fgvc-checkpoint/1",
            "model": state,
            "classes": ["a", "b", "c"],
            "model_spec": {"method": "cnn", "model": "resnet10t", "img_size": 32},
        },
        tmp_path / "old.pt",
    )
    loaded, ckpt = load_checkpoint(tmp_path / "old.pt")
    assert ModelSpec.of(ckpt) == ModelSpec("cnn", "resnet10t", 32, {})
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded(x))
