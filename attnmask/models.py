"""The MaiT models of the paper, registered in timm's model registry.

``import attnmask.models`` registers five timm entrypoints; ``import attnmask`` alone does
not import timm (nor this module)::

    import timm
    import attnmask.models  # registers mait_* in timm

    model = timm.create_model("mait_s_patch16_224", num_classes=100, drop_path_rate=0.1)

Each is a timm ``VisionTransformer`` (patch 16, MLP ratio 4, a class token, 24 layers; the
widths and heads of the paper's table, reproduced in ``docs/models.md``) patched by :func:`attnmask.apply` with the ``"mait"``
head schedule (:func:`attnmask.schedules.mait`: every head masked in layers 0-7, head 0 in
layers 8-15, none in layers 16-23) and a 3 x 3 window. ``attnmask.remove(model)`` gives the
plain timm ``VisionTransformer``; the state_dict is a plain ViT's state_dict either way.
GFLOPs are the paper's: multiply-accumulates of one 224 px image (fvcore's convention, in
which DeiT-S has 4.6), the masked heads' attention counted densely, as the paper computes it.

| name | layers | width / heads | params (paper) | GFLOPs at 224 px (paper) |
|---|---|---|---|---|
| ``mait_xt_patch16_224`` | 24 | 144 / 3 | 6.3 M | 1.5 |
| ``mait_t_patch16_224`` | 24 | 192 / 3 | 11 M | 2.5 |
| ``mait_xs_patch16_224`` | 24 | 288 / 3 | 24.5 M | 5.3 |
| ``mait_s_patch16_224`` | 24 | 384 / 6 | 43.3 M | 9.1 |
| ``mait_s_ls_patch16_224`` | 24 | 384 / 6, LayerScale | 43.3 M | 9.1 |

No pretrained MaiT weights exist (the paper released none): ``pretrained=True`` raises.
Train the models, or load a checkpoint of your own with
``timm.create_model(name, checkpoint_path=...)``.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, is_model, model_entrypoint, register_model
from timm.models.vision_transformer import VisionTransformer

from .api import apply

MASK_DEFAULTS: dict[str, Any] = {"mask_heads": "mait", "mask_window": 3, "mask_mode": "hard"}
"""The optional attnmask arguments of every entrypoint and their defaults (the paper's)."""

CAIT_24_LAYER_INIT = 1e-5
"""LayerScale initial value CaiT uses for 24-layer models (``mait_s_ls_patch16_224``)."""


def _cfg(**kwargs: Any) -> dict[str, Any]:
    """Pretrained cfg of a MaiT model: ImageNet-1k, DeiT's evaluation transform, no weights."""
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "paper_ids": "arXiv:2207.03006",
        "paper_name": "MaiT: Leverage Attention Masks for More Efficient Image Transformers",
        "notes": ("no pretrained weights: the paper released none",),
        **kwargs,
    }


# timm's register_model reads the cfgs from this module-level name.
default_cfgs = generate_default_cfgs(
    {
        "mait_xt_patch16_224": _cfg(),
        "mait_t_patch16_224": _cfg(),
        "mait_xs_patch16_224": _cfg(),
        "mait_s_patch16_224": _cfg(),
        "mait_s_ls_patch16_224": _cfg(),
    }
)


def _register(fn: Callable[..., VisionTransformer]) -> Callable[..., VisionTransformer]:
    """timm's ``register_model``, quiet when this module runs again (``importlib.reload``, a
    test that clears ``sys.modules``): timm then warns that it overwrites the name, which
    here is only this module's own earlier copy. A name taken by anything else still warns."""
    name = fn.__name__
    if is_model(name) and model_entrypoint(name).__module__ == fn.__module__:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=f"Overwriting {name} in registry", category=UserWarning)
            return register_model(fn)
    return register_model(fn)


def _create_mait(variant: str, pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Build ``variant`` as a timm ``VisionTransformer`` and install its masks.

    ``mask_heads``, ``mask_window`` and ``mask_mode`` (see :data:`MASK_DEFAULTS`) go to
    :func:`attnmask.apply` as ``heads``, ``window`` and ``mode``; every other keyword goes
    to ``VisionTransformer`` through timm's ``build_model_with_cfg``.
    """
    if pretrained:
        raise ValueError(
            f"pretrained=True is not accepted for {variant}: no pretrained MaiT weights exist (the paper "
            "released none). Use pretrained=False and train the model, or load your own checkpoint with "
            f"timm.create_model({variant!r}, checkpoint_path=...)"
        )
    if kwargs.get("features_only"):
        raise ValueError(
            f"features_only=True is not accepted for {variant}: timm's feature wrapper prunes the blocks the "
            "masks were installed on. Build the model and call model.forward_intermediates(...) instead"
        )
    mask = {key: kwargs.pop(key, default) for key, default in MASK_DEFAULTS.items()}
    model = build_model_with_cfg(
        VisionTransformer,
        variant,
        pretrained=False,
        feature_cfg={"out_indices": 3, "feature_cls": "getter"},
        **kwargs,
    )
    try:
        return apply(model, heads=mask["mask_heads"], window=mask["mask_window"], mode=mask["mask_mode"])
    except (TypeError, ValueError) as error:  # name the entrypoint's arguments, not apply's
        message = str(error)
        for name in ("heads", "window", "mode"):
            message = message.replace(f"{name}=", f"mask_{name}=", 1) if message.startswith(f"{name}") else message
        raise type(error)(f"{variant}: {message}") from None


def _model_args(embed_dim: int, num_heads: int, **extra: Any) -> dict[str, Any]:
    return {"patch_size": 16, "embed_dim": embed_dim, "depth": 24, "num_heads": num_heads, "mlp_ratio": 4.0, **extra}


@_register
def mait_xt_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """MaiT-XT: 24 layers, width 144, 3 heads (6.3 M parameters, 1.5 GFLOPs at 224 px).

    Args:
        pretrained: Must be ``False``: no pretrained MaiT weights exist.
        **kwargs: ``VisionTransformer`` arguments (``img_size``, ``num_classes``,
            ``drop_path_rate``, ...) and the attnmask arguments ``mask_heads`` (default
            ``"mait"``), ``mask_window`` (default ``3``) and ``mask_mode`` (default
            ``"hard"``), given to :func:`attnmask.apply` as ``heads``, ``window``, ``mode``.
    """
    return _create_mait("mait_xt_patch16_224", pretrained, **dict(_model_args(144, 3), **kwargs))


@_register
def mait_t_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """MaiT-T: 24 layers, width 192, 3 heads (11 M parameters, 2.5 GFLOPs at 224 px).

    Arguments as for :func:`mait_xt_patch16_224`.
    """
    return _create_mait("mait_t_patch16_224", pretrained, **dict(_model_args(192, 3), **kwargs))


@_register
def mait_xs_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """MaiT-XS: 24 layers, width 288, 3 heads (24.5 M parameters, 5.3 GFLOPs at 224 px).

    Arguments as for :func:`mait_xt_patch16_224`.
    """
    return _create_mait("mait_xs_patch16_224", pretrained, **dict(_model_args(288, 3), **kwargs))


@_register
def mait_s_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """MaiT-S: 24 layers, width 384, 6 heads (43.3 M parameters, 9.1 GFLOPs at 224 px).

    Arguments as for :func:`mait_xt_patch16_224`.
    """
    return _create_mait("mait_s_patch16_224", pretrained, **dict(_model_args(384, 6), **kwargs))


@_register
def mait_s_ls_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """MaiT-S with LayerScale: MaiT-S whose residual branches are scaled by learned
    per-channel factors initialised to ``1e-5`` (``init_values``, the value CaiT uses for
    24-layer models). 43.3 M parameters, 9.1 GFLOPs at 224 px.

    Arguments as for :func:`mait_xt_patch16_224` (``init_values=...`` overrides ``1e-5``).
    """
    args = _model_args(384, 6, init_values=CAIT_24_LAYER_INIT)
    return _create_mait("mait_s_ls_patch16_224", pretrained, **dict(args, **kwargs))


__all__ = [
    "MASK_DEFAULTS",
    "mait_s_ls_patch16_224",
    "mait_s_patch16_224",
    "mait_t_patch16_224",
    "mait_xs_patch16_224",
    "mait_xt_patch16_224",
]
