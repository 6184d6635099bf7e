"""The method registry: every training method by name, with its builder, options, profile and description.

One place, like timm's `register_model`: `train.method`'s allowed values (config.py), the CLI choices (`profile`,
`bench`), the model factory (models/factory.py) and the tests all read METHODS. A new method is one `register` call
here plus its builder. The ground floor: it imports nothing heavy (a params error must not wait for torch), so a
builder is named as "module:function" and imported only when a model is built.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    description: str  # one line, for --help and the docs
    builder: str | None  # "module:function": (timm model, num_classes, **build options) -> model; None: as is
    needs_vit: bool  # the timm model must be a VisionTransformer (GLSim's selection, ILA's token grid)
    options: tuple[str, ...]  # the method's own build options, recorded in checkpoints (beside the common ones)
    variants: tuple[str, ...] = ()  # the `ila_variant` values (ila); empty: one form only
    compared_with_vit: bool = False  # the report pairs it with a `vit` variant on the same model and weights
    profile: str = ""  # what `profile` counts beyond a forward pass: encoder passes and selection or token grid


METHODS: dict[str, Method] = {}

# What every method's checkpoint records of the build (ModelSpec.options): the architecture beyond the timm name.
COMMON_OPTIONS = ("patch_size", "backbone_cnn", "layer_norm_eps")


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is registered twice")
    METHODS[method.name] = method
    return method


def get(name: str) -> Method:
    """The registered method, or a ValueError naming train.method and the choices."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"train.method: unknown method {name!r}, expected one of {tuple(METHODS)}") from None


register(
    Method("cnn", "any timm model, fully fine-tuned", None, needs_vit=False, options=(), profile="one forward pass")
)
register(
    Method(
        "linear",
        "a frozen timm backbone, only the classifier trains (linear probe)",
        "pipeline.models.factory:linear_probe",
        needs_vit=False,
        options=(),
        profile="one forward pass",
    )
)
register(
    Method(
        "vit",
        "a timm VisionTransformer, fully fine-tuned (img_size and patch_size resampled by timm)",
        None,
        needs_vit=False,
        options=(),
        profile="one forward pass, token grid",
    )
)
register(
    Method(
        "glsim",
        "GLSim: global-local similarity crop, re-encoded by the same ViT (docs/methods.md#glsim)",
        "pipeline.models.glsim:build",
        needs_vit=True,
        options=("glsim_top_k", "glsim_box"),
        compared_with_vit=True,
        profile="two encoder passes, selection FLOPs (counted and the paper's)",
    )
)
register(
    Method(
        "ila",
        "ILA: down-sampling inter-layer adapters on a frozen ViT (docs/methods.md#ila)",
        "pipeline.models.ila:build",
        needs_vit=True,
        options=("ila_variant",),
        variants=("ila", "ila+", "ila++"),
        compared_with_vit=True,
        profile="one encoder pass over a shrinking token grid",
    )
)

METHOD_NAMES = tuple(METHODS)
ILA_VARIANTS = METHODS["ila"].variants
