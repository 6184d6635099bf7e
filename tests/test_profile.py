"""`profile`: the issue's Done-when numbers for ViT-B/16 (counted on the meta device) and the command itself."""

from __future__ import annotations

import argparse
import json

import pytest

from pipeline.models.profile import add_profile_parser, main, profile

VIT_B = "vit_base_patch16_224"
HEAD_AND_CLS = 768 * 200 + 200 + 768


@pytest.fixture(scope="module")
def vit_b_224() -> dict[str, dict]:
    """Counted without running: parameters, FLOPs and tokens only depend on shapes."""
    runs = {"vit": ("vit", None), "ila+": ("ila", "ila+"), "ila++": ("ila", "ila++"), "glsim": ("glsim", None)}
    return {
        name: profile(method, VIT_B, 224, 200, variant=variant, device="meta")
        for name, (method, variant) in runs.items()
    }


def test_done_when_ila(vit_b_224):
    vit = vit_b_224["vit"]
    for name, extra in (("ila+", 173_856), ("ila++", 354_032)):
        ila = vit_b_224[name]
        assert ila["tokens"] == [197, 145, 101]
        assert ila["params_trainable"] == HEAD_AND_CLS + extra
        assert ila["flops"] <= 0.75 * vit["flops"]
    assert vit["tokens"] == [197, 197, 197] and vit["params_trainable"] == vit["params_total"]
    assert vit["flops"] > 35e9  # ~17.6 GMACs counted as 2 FLOPs each


def test_done_when_glsim(vit_b_224):
    vit, gl = vit_b_224["vit"], vit_b_224["glsim"]
    assert gl["selection_flops"] <= 1_000_000
    assert gl["encoder_passes"] == 2
    ratio = gl["flops"] / vit["flops"]
    assert 2.0 <= ratio <= 2.01  # two encoder passes plus a one-block aggregator over two tokens


def test_macs_are_half_the_flops_and_the_selection_is_priced_as_the_paper_does(vit_b_224):
    """The papers' "FLOPs" are torchprofile MACs: ViT-B/16 at 224 is ~17.6 G of them; GLS selection by the paper's
    formula (D + 2(D + 1) + 1) * N is 0.45 MFLOPs (Table 1), our counted matmul being 2 N D."""
    assert 17.4e9 < vit_b_224["vit"]["macs"] < 17.7e9
    gl = vit_b_224["glsim"]
    assert gl["selection_flops_paper"] == 452_172 and round(gl["selection_flops_paper"] / 1e6, 2) == 0.45
    assert gl["selection_flops"] == 2 * 196 * 768
    assert vit_b_224["vit"]["selection_flops_paper"] is None


def test_profile_command_prints_one_json_object(capsys):
    glsim = "--model test_vit --method glsim --img-size 32 --num-classes 3".split()
    rc = main([*glsim, *"--device cpu --batch-size 2 --warmup 1 --iters 1 --json".split()])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    for key in (
        "params_total",
        "params_trainable",
        "flops",
        "macs",
        "tokens",
        "selection_flops",
        "selection_flops_paper",
        "img_per_s",
        "peak_mem_mb",
    ):
        assert key in out
    assert out["macs"] == out["flops"] // 2 and out["selection_flops_paper"] == (64 + 2 * 65 + 1) * 4
    assert out["img_per_s"] > 0 and isinstance(out["peak_mem_mb"], float) and out["encoder_passes"] == 2
    assert out["tokens"] == [5, 5, 5] and 0 < out["selection_flops"] <= 1_000_000
    # On the meta device nothing runs: the same counts, and no speed or memory figure at all.
    assert main([*glsim, "--device", "meta", "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["img_per_s"] is None and meta["peak_mem_mb"] is None
    assert (meta["flops"], meta["params_total"], meta["tokens"]) == (out["flops"], out["params_total"], out["tokens"])


def test_add_profile_parser_plugs_into_a_cli(capsys):
    parser = argparse.ArgumentParser(prog="python -m pipeline")
    add_profile_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        [
            "profile",
            "--model",
            "test_vit",
            "--method",
            "ila",
            "--variant",
            "ila++",
            "--img-size",
            "96",
            "--num-classes",
            "4",
            "--device",
            "cpu",
            "--batch-size",
            "2",
            "--warmup",
            "0",
            "--iters",
            "1",
            "--json",
        ]
    )
    assert args.fn(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["variant"] == "ila++" and out["tokens"] == [37, 17, 5] and out["selection_flops"] is None


def test_profile_table_prints_macs_beside_flops_and_takes_a_dataset(capsys):
    assert (
        main(
            [
                "--model",
                "test_vit",
                "--method",
                "glsim",
                "--img-size",
                "64",
                "--num-classes",
                "3",
                "--device",
                "meta",
                "--dataset",
                "dogs",
            ]
        )
        == 0
    )  # k = 16: all 16 patches
    lines = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()}
    assert 0 < int(lines["macs"]) < int(lines["flops"]) and int(lines["selection_flops_paper"]) == 195 * 16


def test_profile_errors(capsys):
    assert (
        main(
            [
                "--model",
                "test_vit",
                "--method",
                "glsim",
                "--variant",
                "ila+",
                "--img-size",
                "32",
                "--num-classes",
                "3",
                "--device",
                "meta",
            ]
        )
        == 2
    )
    assert "--variant applies to --method ila" in capsys.readouterr().err


def test_attention_flops_are_counted_on_cpu_as_on_meta():
    """torch's FLOP counter misses the fused CPU attention kernel; count_flops runs attention unfused."""
    import timm
    import torch

    from pipeline.models.profile import count_flops

    cpu = timm.create_model("test_vit", img_size=64).eval()
    with torch.device("meta"):
        meta = timm.create_model("test_vit", img_size=64).eval()
        on_meta = count_flops(meta, torch.empty(1, 3, 64, 64))
    assert count_flops(cpu, torch.randn(1, 3, 64, 64)) == on_meta
    assert all(b.attn.fused_attn for b in cpu.blocks)  # restored afterwards
