"""Hugging Face transformers adapter: ViT, DeiT, BEiT, DINOv2, Swin, ViTMAE, CLIP and SigLIP towers.

Every vision family of transformers 5.x computes attention through
``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``. This module registers one
function, :func:`attnmask_attention`, under the name ``"attnmask"`` with
``AttentionInterface.register`` and selects it on the configuration of the model's
attention layers (``model.set_attn_implementation`` when that is the model's own config).
Nothing else of the model changes: no class swap, no new parameter.

The function receives ``(module, query, key, value, attention_mask, scaling, dropout)``
with q/k/v shaped ``(B, H, N, D)``. A layer with masked heads carries its plan and its
token layout as ``_attnmask_*`` attributes and goes through an attnmask kernel, with
whatever arrives in ``attention_mask`` (BEiT's relative position bias, Swin's bias plus
shifted-window mask) kept and the locality mask added to it. Every other layer that now
routes here (same config) runs the implementation the model had before, recorded on the
module; ``remove`` puts that implementation back on the config.

Geometry, per forward:

- ViT-like models (prefix tokens, then the row-major patch grid): a forward hook on the
  patch-embedding convolution records the grid of each input, so other image sizes
  (``interpolate_pos_encoding=True``) get their own grid.
- Swin: tokens arrive window by window; the geometry is the attention window's own square
  token grid.
- ViTMAE: random masking keeps a shuffled subset of patches per sample. A forward hook on
  the embeddings reads ``ids_restore`` and each token's true grid position is used
  (:attr:`attnmask.masks.LocalMask.positions`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..kernels import get_kernel
from ..kernels.common import explicit_probs
from ..masks import combine_masks
from ..hub.saved import SAVED_IMPLEMENTATION
from ..spec import LayerPlan
from . import Adapter, Site
from .layouts import KeptPatches, PatchLayout, WindowLayout, pair
from .swap import keep_hook, remove_attnmask_hooks

ATTN_NAME = "attnmask"
"""The name :func:`attnmask_attention` is registered under."""

_PREVIOUS = "_attnmask_previous"
_CONFIGS = "_attnmask_hf_configs"


def _fallback(module: nn.Module) -> Callable:
    """The attention function the module's model used before it was patched."""
    previous = module.__dict__.get(_PREVIOUS) or "sdpa"
    if previous == ATTN_NAME:  # a config saved while patched: never route back here
        previous = "sdpa"
    if previous != "eager" and previous in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[previous]
    # "eager" is not in the registry: each modeling file defines its own eager function.
    return getattr(sys.modules[type(module).__module__], "eager_attention_forward")


def attnmask_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """transformers attention function: the layer's masked heads are local.

    Args:
        module: The attention module calling it.
        query: ``(B, H, N, D)``.
        key: ``(B, H, N, D)``.
        value: ``(B, H, N, Dv)``.
        attention_mask: What the model passes (``None``, a relative position bias, a
            shifted-window mask, ...): kept, with the locality mask added.
        scaling: Softmax scale.
        dropout: Attention dropout probability (already 0 in eval mode).

    Returns:
        ``(output (B, N, H, Dv), None)``, as transformers' SDPA function returns; when the
        caller asked for attention weights (``output_attentions=True``), ``(output, weights
        (B, H, N, N))``: masked layers compute their masked probabilities explicitly (zero
        outside a masked head's window) and unmasked layers run the model's eager attention.
    """
    plan: Optional[LayerPlan] = module.__dict__.get("_attnmask_plan")
    weights_wanted = _attentions_requested(kwargs)
    if plan is None:
        fallback = _eager(module) if weights_wanted else _fallback(module)
        return fallback(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    position_bias = kwargs.get("position_bias")
    if position_bias is not None:
        attention_mask = position_bias if attention_mask is None else attention_mask + position_bias
    if kwargs.get("is_causal", False):
        n = query.shape[2]
        causal = torch.ones(n, n, dtype=torch.bool, device=query.device).tril()
        attention_mask = combine_masks(attention_mask, causal, query.dtype)
    layout = module.__dict__["_attnmask_layout"]
    if key.shape[2] != query.shape[2] and hasattr(layout, "pooled_bias"):  # keys on a coarser grid
        if plan.mode != "hard":
            raise ValueError(f"attnmask: a layer with pooled keys accepts mode='hard' only, not {plan.mode!r}")
        bias = layout.pooled_bias(plan, query, key, attention_mask)
        if weights_wanted:
            everywhere = torch.ones((), dtype=torch.bool, device=query.device)
            return _explicit(module, query, key, value, everywhere, "hard", bias, scaling, dropout)
        out = layout.recorded(query, key, value, bias, scaling)
        if out is None:
            # SDPA itself, whatever the model ran before: eager code would add a boolean mask as
            # 0/1 and flash attention would ignore it.
            out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=dropout, scale=scaling)
        return out.transpose(1, 2).contiguous(), None
    mask = layout.mask(plan, query.shape[0], query.shape[2])
    if weights_wanted:
        return _explicit(module, query, key, value, mask.dense(query.device), plan.mode, attention_mask, scaling, dropout)
    out = get_kernel(plan.backend)(query, key, value, mask, attn_mask=attention_mask, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _attentions_requested(kwargs: dict) -> bool:
    """Whether the caller asked for attention weights (``output_attentions=True``, passed down
    as a keyword, or recorded by transformers' output capturing from the config)."""
    if kwargs.get("output_attentions"):
        return True
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # another transformers release: the keyword is what it passes
        return False
    try:
        collected = _active_collector.get()
    except LookupError:
        return False
    return isinstance(collected, dict) and "attentions" in collected


def _eager(module: nn.Module) -> Callable:
    """The module's own eager attention function (it returns the attention weights)."""
    return getattr(sys.modules[type(module).__module__], "eager_attention_forward", None) or _fallback(module)


def _explicit(module, query, key, value, allowed, mode, host, scaling, dropout) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked attention with an explicit softmax, returning the masked probabilities too (as
    transformers' eager attention does for ``output_attentions=True``): zero outside the window
    of a masked head, rows summing to 1."""
    probs = explicit_probs(query, key, allowed, mode, host, scaling).to(query.dtype)
    probs = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value)
    return out.transpose(1, 2).contiguous(), probs


AttentionInterface.register(ATTN_NAME, attnmask_attention)
# Also the name saved folders select (attnmask.hub.hooks registers it too, but its hook may run
# while this module is still being imported, when transformers is first imported from here).
AttentionInterface.register(SAVED_IMPLEMENTATION, attnmask_attention)


@dataclass(frozen=True)
class HFFamily:
    """What differs between the transformers families this module supports.

    Attributes:
        name: Adapter name (``"hf.vit"``, ...).
        models: Model-type directories under ``transformers.models`` it covers; empty: any
            model type (attention layers whose config describes images).
        layout: ``"patches"``, ``"shuffled"`` (ViTMAE), ``"windows"`` (Swin) or ``"runtime"``
            (learned per call from run-time shapes, :class:`~attnmask.adapters.generic.SiteLayout`).
        prefix_tokens: ``config -> number of prefix tokens``.
        vision_only: Keep only layers whose config is a vision config (CLIP/SigLIP towers).
        skip: Module-name parts whose layers are left alone (ViTMAE's decoder).
    """

    name: str
    models: tuple[str, ...]
    layout: str = "patches"
    prefix_tokens: Callable[[object], int] = lambda config: 1
    vision_only: bool = False
    skip: tuple[str, ...] = ()


def _modeling_modules(models: Sequence[str]) -> tuple[str, ...]:
    return tuple(f"transformers.models.{m}.modeling_{m}" for m in models)


class HFAdapter(Adapter):
    """Adapter for one family of transformers models (see :class:`HFFamily`)."""

    def __init__(self, family: HFFamily) -> None:
        self.family = family
        self.name = family.name
        self._modules = _modeling_modules(family.models)

    # -- finding the layers -------------------------------------------------------------
    def _family_class(self, cls: type) -> bool:
        if not self.family.models:
            return cls.__module__.startswith("transformers.models.")
        return cls.__module__ in self._modules and cls.__name__.endswith("Attention")

    def _host_class(self, cls: type) -> Optional[type]:
        """The class of this family ``cls`` is or derives from (a user subclass of a
        transformers attention class counts as that class), ``None`` if none."""
        return next((c for c in cls.__mro__ if self._family_class(c)), None)

    def _is_attention(self, module: nn.Module) -> bool:
        """An attention module of this family that dispatches through ``ALL_ATTENTION_FUNCTIONS``
        (read from its forward's code: a module computing attention itself would silently
        ignore the registered function)."""
        host = self._host_class(type(module))
        if host is None or not _dispatches(host) or not _dispatches(type(module)):
            return False
        if not self.family.models:
            return _describes_images(getattr(module, "config", None))
        return hasattr(module, "config")

    def _overriding(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """Subclasses of a dispatching attention class of this family whose own forward does
        not dispatch (it would ignore the registered function): refused by name."""
        return [
            (n, m)
            for n, m in model.named_modules()
            if (host := self._host_class(type(m))) is not None
            and host is not type(m)
            and _dispatches(host)
            and not _dispatches(type(m))
            and hasattr(m, "config")
        ]

    def _attention_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        found = [(n, m) for n, m in model.named_modules() if self._is_attention(m)]
        # Innermost only: older releases wrap `XSelfAttention` (which calls the attention
        # function) in an `XAttention`.
        names = [n for n, _ in found]
        inner = [(n, m) for n, m in found if not any(o != n and o.startswith(n + ".") for o in names)]
        out = []
        for name, module in inner:
            if any(part in name.split(".") for part in self.family.skip):
                continue
            if self.family.vision_only and not type(module.config).__name__.endswith("VisionConfig"):
                continue
            out.append((name, module))
        return out

    def matches(self, model: nn.Module) -> bool:
        if not self._attention_modules(model):
            return False
        if self.family.layout == "runtime":  # structural: also needs pixels turned into patches
            return self._naflex(model) or self._has_patch_embedding(model)
        return True

    def _has_patch_embedding(self, model: nn.Module) -> bool:
        try:
            self._patch_embedding(model)
        except TypeError:
            return False
        return True

    @staticmethod
    def _naflex(model: nn.Module) -> bool:
        """Per-sample patch grids given as ``spatial_shapes`` (SigLIP2's NaFlex)."""
        from .runtime import takes_spatial_shapes

        return any(takes_spatial_shapes(m) for m in model.modules())

    def sites(self, model: nn.Module) -> list[Site]:
        refused = self._overriding(model)
        if refused:
            name, module = refused[0]
            cls, host = type(module), self._host_class(type(module))
            raise TypeError(
                f"attnmask cannot patch {len(refused)} attention layer(s) of {type(model).__name__} "
                f"({', '.join(n for n, _ in refused[:3])}{', ...' if len(refused) > 3 else ''}): "
                f"{cls.__module__}.{cls.__qualname__} subclasses {host.__module__}.{host.__qualname__} but its forward "
                "does not dispatch through transformers' attention interface (ALL_ATTENTION_FUNCTIONS), so the masks "
                "would be silently ignored there. Keep the host's forward (or call the attention interface from yours)"
            )
        sites = []
        for i, (name, module) in enumerate(self._attention_modules(model)):
            heads = getattr(module, "num_attention_heads", None) or getattr(module, "num_heads", None)
            sites.append(Site(name=name, layer=i, num_heads=int(heads or module.config.num_attention_heads), module=module))
        if self.family.layout != "windows" and not (self.family.layout == "runtime" and self._naflex(model)):
            self._patch_embedding(model)  # fails early, before anything is patched
        return sites

    def _patch_embedding(self, model: nn.Module) -> tuple[str, nn.Conv2d]:
        for name, module in model.named_modules():
            if isinstance(module, nn.Conv2d) and "embed" in name and "text" not in name:
                return name, module
        raise TypeError(f"attnmask: found no patch-embedding convolution in {type(model).__name__}")

    def _embeddings(self, model: nn.Module, conv_name: str) -> nn.Module:
        """The embeddings module holding the patch convolution (ViTMAE's random masking lives there)."""
        parts = conv_name.split(".")
        for i in range(len(parts) - 1, 0, -1):
            module = model.get_submodule(".".join(parts[:i]))
            if type(module).__name__.endswith("Embeddings") and hasattr(module, "random_masking"):
                return module
        raise TypeError(f"attnmask: found no ViTMAE embeddings module above {conv_name}")

    # -- patching -----------------------------------------------------------------------
    def _layout(self, model: nn.Module, config, sites: Sequence[Site] = ()) -> object:
        family = self.family
        if family.layout == "runtime":
            from .generic import runtime_layouts

            suffix = int(getattr(config, "num_detection_tokens", 0) or 0)
            return runtime_layouts(model, sites, None, suffix)
        if family.layout == "windows":
            return None  # one per layer: each Swin stage has its own window size
        conv_name, conv = self._patch_embedding(model)
        image = pair(getattr(config, "image_size", 224))
        patch = pair(getattr(config, "patch_size", conv.stride))
        static = (image[0] // patch[0], image[1] // patch[1])
        layout = PatchLayout(family.prefix_tokens(config), static)
        if family.layout == "shuffled":
            layout.kept = KeptPatches.from_ids_restore()
            keep_hook(model, self._embeddings(model, conv_name).register_forward_hook(layout.kept))
        keep_hook(model, conv.register_forward_hook(layout))
        return layout

    def install(self, model: nn.Module, sites: Sequence[Site], plans: Sequence[LayerPlan]) -> None:
        if not sites:
            return  # nothing masked: the model keeps its own attention implementation
        every_site = self.sites(model)
        layout = self._layout(model, every_site[0].module.config, sites)
        for site in every_site:
            site.module.__dict__[_PREVIOUS] = site.module.config._attn_implementation
        for site, plan in zip(sites, plans):
            module = site.module
            module._attnmask_plan = plan
            if isinstance(layout, dict):
                module._attnmask_layout = layout[site.name]
            else:
                module._attnmask_layout = layout if layout is not None else WindowLayout(self._window_size(module))
        self._select(model, [site.module.config for site in every_site])

    @staticmethod
    def _window_size(module: nn.Module) -> int:
        bias = getattr(module, "relative_position_bias", None)
        size = getattr(bias, "window_size", None) or getattr(module, "window_size", None)
        return pair(size)[0] if size is not None else 0

    @staticmethod
    def _select(model: nn.Module, site_configs: list) -> None:
        """Select ``"attnmask"`` on the sites' configs; remember every config's choice before."""
        configs = {id(c): c for c in [getattr(model, "config", None), *site_configs] if c is not None}
        saved = [(c, c._attn_implementation) for c in configs.values()]
        model.__dict__[_CONFIGS] = saved
        try:
            if getattr(model, "config", None) is site_configs[0] and hasattr(model, "set_attn_implementation"):
                model.set_attn_implementation(ATTN_NAME)
            for config in site_configs:
                config._attn_implementation_internal = ATTN_NAME
        except BaseException:
            _restore_configs(saved)
            raise

    def snapshot(self, model: nn.Module) -> Callable[[], None]:
        """Every config reachable from ``model`` (its own, each module's, their sub-configs) with
        its attention implementation exactly as stored, to put back after a failing ``apply``."""
        saved = [(config, config.__dict__.get("_attn_implementation_internal", _MISSING)) for config in _configs(model)]

        def restore() -> None:
            for config, value in saved:
                if value is _MISSING:
                    config.__dict__.pop("_attn_implementation_internal", None)
                else:
                    config.__dict__["_attn_implementation_internal"] = value

        return restore

    def uninstall(self, model: nn.Module, names: Sequence[str]) -> None:
        _restore_configs(model.__dict__.pop(_CONFIGS, []))
        for module in model.modules():
            for attr in ("_attnmask_plan", "_attnmask_layout", _PREVIOUS):
                module.__dict__.pop(attr, None)
        remove_attnmask_hooks(model)

    def prefix_tokens(self, model: nn.Module) -> int:
        """Tokens before the patches in the attention layers' sequences."""
        if self.family.layout == "runtime":
            layouts = [m.__dict__["_attnmask_layout"] for _, m in self._attention_modules(model) if "_attnmask_layout" in m.__dict__]
            return layouts[0].prefix_tokens if layouts else 0
        sites = self.sites(model)
        return int(self.family.prefix_tokens(sites[0].module.config)) if sites else 0

    def grid(self, model: nn.Module) -> Optional[tuple[int, int]]:
        for _, module in self._attention_modules(model):
            layout = module.__dict__.get("_attnmask_layout")
            if layout is not None:
                return layout.grid
        if self.family.layout == "runtime":
            return None
        if self.family.layout == "windows":
            modules = self._attention_modules(model)
            size = self._window_size(modules[0][1]) if modules else 0
            return (size, size) if size else None
        try:
            _, conv = self._patch_embedding(model)
        except TypeError:
            return None
        config = self._attention_modules(model)[0][1].config
        image, patch = pair(getattr(config, "image_size", 224)), pair(getattr(config, "patch_size", conv.stride))
        return image[0] // patch[0], image[1] // patch[1]

    def notes(self, model: nn.Module) -> list[str]:
        notes = []
        masked = [m for _, m in self._attention_modules(model) if "_attnmask_plan" in m.__dict__]
        inactive = {m.config._attn_implementation for m in masked} - {ATTN_NAME}
        if inactive:
            notes.append(
                f"the config selects attention implementation {sorted(inactive)}, not {ATTN_NAME!r}: "
                "the masks are inactive (was set_attn_implementation called after apply?); "
                "call attnmask.apply again"
            )
        if self.family.skip:
            left = [n for n, m in model.named_modules() if self._is_attention(m) and any(p in n.split(".") for p in self.family.skip)]
            if left:
                notes.append(f"{len(left)} decoder attention layers are left global")
        if self.family.vision_only:
            text = [n for n, m in model.named_modules() if self._is_attention(m) and not type(m.config).__name__.endswith("VisionConfig")]
            if text:
                notes.append(f"{len(text)} text-tower attention layers are left alone")
        pooling = [n for n, m in model.named_modules() if type(m).__name__.endswith("AttentionPoolingHead")]
        if pooling:
            notes.append("the attention-pooling head is left alone")
        return notes


def _dispatches(cls: type) -> bool:
    """Whether ``cls.forward`` calls the attention function the config selects."""
    return "ALL_ATTENTION_FUNCTIONS" in getattr(getattr(cls.forward, "__code__", None), "co_names", ())


def _describes_images(config) -> bool:
    """A config of a model that cuts images into patches: an image size or a number of image
    channels, and a patch size (or per-stage patch sizes)."""
    if config is None:
        return False
    sees_images = getattr(config, "image_size", None) is not None or getattr(config, "num_channels", None) is not None
    has_patches = getattr(config, "patch_size", None) is not None or getattr(config, "patch_sizes", None) is not None
    return sees_images and has_patches


_MISSING = object()


def _configs(model: nn.Module) -> list:
    """Every distinct config object of ``model`` and its modules, sub-configs included."""
    found: dict[int, object] = {}
    pending = [getattr(m, "config", None) for m in model.modules()]
    while pending:
        config = pending.pop()
        if config is None or id(config) in found or not hasattr(config, "_attn_implementation"):
            continue
        found[id(config)] = config
        pending.extend(getattr(config, key, None) for key in getattr(config, "sub_configs", {}) or {})
    return list(found.values())


def _restore_configs(saved) -> None:
    """Put back each config's implementation, unless the user has chosen another since."""
    for config, implementation in saved:
        if config._attn_implementation == ATTN_NAME:
            config._attn_implementation_internal = implementation


def _registers(config) -> int:
    return 1 + int(getattr(config, "num_register_tokens", 0) or 0)


VIT = HFAdapter(HFFamily("hf.vit", ("vit",)))
DEIT = HFAdapter(HFFamily("hf.deit", ("deit",), prefix_tokens=lambda config: 2))
BEIT = HFAdapter(HFFamily("hf.beit", ("beit",)))
DINOV2 = HFAdapter(HFFamily("hf.dinov2", ("dinov2", "dinov2_with_registers"), prefix_tokens=_registers))
SWIN = HFAdapter(HFFamily("hf.swin", ("swin",), layout="windows", prefix_tokens=lambda config: 0))
VIT_MAE = HFAdapter(HFFamily("hf.vit_mae", ("vit_mae",), layout="shuffled", skip=("decoder",)))
CLIP = HFAdapter(HFFamily("hf.clip", ("clip",), vision_only=True))
SIGLIP = HFAdapter(HFFamily("hf.siglip", ("siglip",), prefix_tokens=lambda config: 0, vision_only=True))
ANY = HFAdapter(HFFamily("hf", (), layout="runtime", prefix_tokens=lambda config: 0))
"""Any other transformers vision model: layers found by structure, layout learned per call."""
