"""The README.md model card of an `export --format hf` folder: what the model is, how well it did, on which data,
with which recipe and seed, and how to load it. Everything comes from the train output folder (model.pt's spec,
config.yaml: the resolved params it trained with) and the DVC metrics files."""

from __future__ import annotations

from pathlib import Path

import yaml

RECIPE_KEYS = (
    "method",
    "model",
    "weights",
    "recipe",
    "img_size",
    "epochs",
    "batch_size",
    "optimizer",
    "lr",
    "weight_decay",
    "scheduler",
    "warmup_steps",
    "augment",
    "label_smoothing",
    "drop_path_rate",
    "precision",
    "glsim_top_k",
    "glsim_box",
    "ila_variant",
)
DATA_KEYS = {
    "acquire": ("source",),
    "split": ("strategy", "group_column", "group_assign", "test_groups", "val_groups"),
    "clean": ("min_per_class", "near_dup_hamming"),
}


def model_card(model_dir: Path, config: dict, metrics: list[tuple[Path, dict]], model_md5: str) -> str:
    params = _params(model_dir)
    spec = config["anime_fgvc"]["model_spec"]
    train, base = params.get("train", {}), params.get("base", {})
    lines = [
        "---",
        "library_name: timm",
        "pipeline_tag: image-classification",
        f"tags: [image-classification, fine-grained, anime-fgvc, {spec['method']}]",
        "---",
        "",
        f"# {model_dir.name}: {spec['method']} on {spec['model']}",
        "",
        f"{config['num_classes']} classes, {spec.get('img_size')} px, exported from `{model_dir}/model.pt` "
        f"(md5 `{model_md5}`, epoch {config['anime_fgvc'].get('epoch')}) by `python -m pipeline export`.",
        "",
        "## Metrics",
        "",
    ]
    rows = [
        (p.name if len(metrics) < 2 else f"{p.parent.name}/{p.name}", k, v)
        for p, m in metrics
        for k, v in sorted(m.items())
        if isinstance(v, (int, float))
    ]
    lines += (
        ["| file | metric | value |", "|---|---|---:|"] + [f"| {f} | {k} | {_fmt(v)} |" for f, k, v in rows]
        if rows
        else ["No metrics files were found (pass `--metrics`)."]
    )
    lines += ["", "## Data", ""] + [
        f"- `{section}.{k}`: {_fmt(params.get(section, {}).get(k))}"
        for section, keys in DATA_KEYS.items()
        for k in keys
        if params.get(section, {}).get(k) is not None
    ]
    lines += [f"- classes: {', '.join(config['label_names'][:20])}" + (" ..." if config["num_classes"] > 20 else "")]
    lines += ["", "## Recipe", ""] + [f"- `train.{k}`: {_fmt(train[k])}" for k in RECIPE_KEYS if k in train]
    lines += [f"- preprocessing: mean {config['pretrained_cfg']['mean']}, std {config['pretrained_cfg']['std']}"]
    lines += [
        "",
        "## Seeds",
        "",
        f"- `base.seed`: {base.get('seed')} (data order, augmentation, initialisation)",
        "",
        "## Use",
        "",
        "In this pipeline: `train.weights: local-dir:<this folder>` with the same "
        f"`train.method: {spec['method']}` and `train.model: {spec['model']}`.",
    ]
    if spec["method"] in ("cnn", "vit", "linear"):
        lines += ["With timm: `timm.create_model('local-dir:<this folder>')` (or `hf-hub:` once uploaded)."]
    lines += [
        "",
        "The complete resolved parameters are in `training_config.yaml` beside this card." if params else "",
        "",
    ]
    return "\n".join(lines)


def _params(model_dir: Path) -> dict:
    path = model_dir / "config.yaml"
    return yaml.safe_load(path.read_text()) or {} if path.is_file() else {}


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return str(value)
