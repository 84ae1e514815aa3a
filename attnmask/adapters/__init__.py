"""Adapters: one module per host family, registered in a table.

An adapter knows one host library and nothing of kernels' insides. It finds the attention
layers of a model (its *sites*), swaps in the masked attention and undoes it. Adapter
modules import their host library at import time, so they are imported only once the host
library is already loaded (a model of that library exists), never by ``import attnmask``.
Adding a family is one new module plus one row in :data:`REGISTRY`.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from torch import nn

from ..report import FoundLayer
from ..spec import LayerPlan


@dataclass(frozen=True)
class Site:
    """One attention layer of a model.

    Attributes:
        name: Module name inside the model (``model.get_submodule(name)``).
        layer: Layer index, in the model's order of attention layers.
        num_heads: Number of heads.
        module: The attention module itself.
    """

    name: str
    layer: int
    num_heads: int
    module: nn.Module


class Adapter:
    """The one base of every adapter: what it provides, with defaults.

    A family adapter says which layers it recognises (:meth:`sites`), how it patches and
    unpatches them (:meth:`install`, :meth:`uninstall`) and, for reports, the grid and the
    prefix tokens of the latest forward. Adapter modules expose one instance as ``ADAPTER``
    (or the attribute their registry row names).
    """

    name: str = ""
    observes: bool = False
    """Whether :meth:`sites` runs an observing forward (and takes ``example=``)."""

    def matches(self, model: nn.Module) -> bool:
        """Whether this adapter handles ``model`` (cheap; no side effects)."""
        raise NotImplementedError

    def sites(self, model: nn.Module) -> list[Site]:
        """The attention layers to patch, in layer order; raises if the model cannot be patched."""
        raise NotImplementedError

    def install(self, model: nn.Module, sites: Sequence[Site], plans: Sequence[LayerPlan]) -> None:
        """Patch ``sites`` with their ``plans`` (only layers with masked heads are given)."""
        raise NotImplementedError

    def uninstall(self, model: nn.Module, names: Sequence[str]) -> None:
        """Restore the original modules named ``names`` and drop every trace of the patch."""
        raise NotImplementedError

    def grid(self, model: nn.Module) -> Optional[tuple[int, int]]:
        """The patch grid of the model's latest (or default) input, for reports."""
        return None

    def snapshot(self, model: nn.Module) -> Callable[[], None]:
        """What patching changes outside the modules' classes, attributes and hooks (which
        :func:`attnmask.apply` saves itself), as a function that puts it back exactly; a failing
        ``apply`` calls it. Default: nothing."""
        return lambda: None

    def prefix_tokens(self, model: nn.Module) -> int:
        """Tokens before the patches in the attention layers' sequences, for reports."""
        return 0

    def notes(self, model: nn.Module) -> list[str]:
        """What ``describe()`` should add about this model (layers left alone, caveats)."""
        return []

    def findings(self, model: nn.Module, example=None) -> list[FoundLayer]:
        """Every attention layer found, layer by layer (default: the sites, all patchable)."""
        grid = self.grid(model)
        geometry = f"{grid[0]}x{grid[1]} grid" if grid else ""
        return [
            FoundLayer(s.name, getattr(type(s.module), "_attnmask_host", type(s.module)).__name__, s.num_heads, "patchable", geometry=geometry)
            for s in self.sites(model)
        ]

    # Optional, for adapters whose masked heads run in the host's own attention code rather
    # than an attnmask kernel: the ``backend`` values they honour and what runs instead.
    # backends: tuple[str, ...]
    # backend_label: str


@dataclass(frozen=True)
class AdapterEntry:
    """One row of the registry.

    Attributes:
        name: Family name, stored in :class:`~attnmask.MaskSpec` (e.g. ``"timm.vit"``).
        host: Top-level module of the host library (checked in ``sys.modules``).
        module: Adapter module.
        attr: Name of the adapter object in ``module``.
        models: What a user would call the supported models.
        how: How the attention is patched (one sentence, for the docs).
        caveats: What a user should know (for the docs); empty if nothing.
        tested: Host-library versions the test suite has run against.
    """

    name: str
    host: str
    module: str
    models: str
    attr: str = "ADAPTER"
    how: str = ""
    caveats: str = ""
    tested: tuple[str, ...] = ()


TIMM_TESTED = ("timm 1.0.29", "timm 1.0.31")
HF_TESTED = ("transformers 5.17.0", "transformers 5.24.0")
TORCHVISION_TESTED = ("torchvision 0.29.1",)

_HF_HOW = (
    "one attention function registered as `\"attnmask\"` with `AttentionInterface.register` and "
    "selected on the model's (vision) config; the model's previous implementation runs every "
    "unmasked layer and is restored by `remove`"
)

# Most specific first: ``find_adapter`` takes the first entry whose adapter matches.
REGISTRY: tuple[AdapterEntry, ...] = (
    AdapterEntry(
        name="timm.cait",
        host="timm",
        module="attnmask.adapters.timm_cait",
        models="timm CaiT (`cait_*`)",
        how="each `TalkingHeadAttn` instance's class is swapped to a subclass that masks the "
        "head-mixed logits (after `proj_l`, before softmax) of the chosen heads",
        caveats="`proj_w` mixes heads again after the softmax, so a masked head's output is local "
        "only when every head it is mixed with is masked (use `heads=\"all\"` for strict locality). "
        "Class-attention layers (`ClassAttn`) are left alone; `describe()` says so. No attnmask kernel "
        "can run talking heads: a kernel attends head by head, while `proj_l` mixes every head's logits "
        "before the softmax and `proj_w` every head's weights after it. The adapter therefore repeats "
        "CaiT's own arithmetic: `backend` accepts `\"auto\"` and `\"reference\"` (float64) only, and "
        "`locality_scores` refuses CaiT.",
        tested=TIMM_TESTED,
    ),
    AdapterEntry(
        name="timm.swin",
        host="timm",
        module="attnmask.adapters.timm_swin",
        models="timm Swin and SwinV2 (`swin_*`, `swinv2_*`), including SwinV2's cosine attention "
        "and continuous position bias",
        how="each `WindowAttention` instance's class is swapped to a subclass that computes q, k, v "
        "as timm does and runs the layer's kernel; the relative position bias (SwinV2: the continuous "
        "position bias) plus the shifted-window mask is the kernel's host mask, and the locality mask "
        "is added to it. SwinV2's cosine attention reaches the kernel as `normalize(q) * logit_scale` "
        "and `normalize(k)` with scale 1",
        caveats="The geometry is each attention window's own token grid (e.g. 7 x 7), not the "
        "image's: a window as large as the attention window masks nothing. Global heads run through "
        "SDPA with the host's mask: bit for bit timm's fused Swin path (`fused_attn=True`), equal up "
        "to float32 rounding to timm's default explicit Swin path and to SwinV2 (explicit only).",
        tested=TIMM_TESTED,
    ),
    AdapterEntry(
        name="timm.beit",
        host="timm",
        module="attnmask.adapters.timm_beit",
        models="timm BEiT and BEiT v2 (`beit_*`, `beitv2_*`)",
        how="each BEiT `Attention` instance's class is swapped to a subclass; the relative "
        "position bias is kept and the locality mask added to it",
        tested=TIMM_TESTED,
    ),
    AdapterEntry(
        name="timm.eva",
        host="timm",
        module="attnmask.adapters.timm_eva",
        models="timm EVA, EVA-02 and other models on `EvaAttention` (rotary embeddings)",
        how="each `EvaAttention` instance's class is swapped to a subclass; rotary embeddings "
        "are applied as before, then the masked kernel runs",
        caveats="Eva models built with `attn_type='rope'` (`AttentionRope`: Perception Encoder "
        "`vit_pe_*`, ROPE-ViT `vit_*_rope_*`) are not supported.",
        tested=TIMM_TESTED,
    ),
    AdapterEntry(
        name="timm.vit",
        host="timm",
        module="attnmask.adapters.timm_vit",
        models="timm VisionTransformer family on `timm.layers.Attention`: ViT, DeiT, DeiT-III, "
        "distilled DeiT, register-token ViTs (e.g. DINOv2-reg), SigLIP-style ViTs without class token",
        how="each `Attention` instance's class is swapped to a subclass; the grid of each forward "
        "is read from the patch embedding (`dynamic_img_size=True` included)",
        tested=TIMM_TESTED,
    ),
    AdapterEntry(
        name="hf.vit",
        host="transformers",
        module="attnmask.adapters.hf",
        attr="VIT",
        models="Hugging Face ViT (`ViTModel`, `ViTForImageClassification`, ...)",
        how=_HF_HOW,
        tested=HF_TESTED,
    ),
    AdapterEntry(
        name="hf.deit",
        host="transformers",
        module="attnmask.adapters.hf",
        attr="DEIT",
        models="Hugging Face DeiT (class + distillation token)",
        how=_HF_HOW,
        tested=HF_TESTED,
    ),
    AdapterEntry(
        name="hf.beit",
        host="transformers",
        module="attnmask.adapters.hf",
        attr="BEIT",
        models="Hugging Face BEiT (`BeitModel`, `BeitForImageClassification`, ...)",
        how=_HF_HOW + "; the relative position bias arrives as `attention_mask` and the locality "
        "mask is added to it",
        tested=HF_TESTED,
    ),
    AdapterEntry(
        name="hf.dinov2",
        host="transformers",
        module="attnmask.adapters.hf",
        attr="DINOV2",
        models="Hugging Face DINOv2 and DINOv2-with-registers",
        how=_HF_HOW,
        tested=HF_TESTED,
    ),
    AdapterEntry(
        name="hf.swin",
        host="transformers",
        module="attnmask.adapters.hf",
        attr="SWIN",
        models="Hugging Face Swin",
        how=_HF_HOW + "; the locality mask is added to the relative position bias and the "
        "shifted-window mask",
        caveats="The geometry is each attention window's own token grid (`window_size` x "
        "`window_size`), not the image's.",
        tested=HF_TESTED,
    ),
    AdapterEntry(
        name="hf.vit_mae",
        host="transformers",
        module="attnmask.adapters.hf",
        attr="VIT_MAE",
        models="Hugging Face ViTMAE (`ViTMAEModel`, `ViTMAEForPreTraining`): the encoder",
        how=_HF_HOW + "; each sample's kept patches and their order come from the embedding's "
        "`ids_restore`",
        caveats="Random masking shuffles and drops patch tokens: the mask is built per sample from "
        "the true grid position of every kept patch. The pre-training decoder is left global.",
        tested=HF_TESTED,
    ),
    AdapterEntry(
        name="hf.clip",
        host="transformers",
        module="attnmask.adapters.hf",
        attr="CLIP",
        models="Hugging Face CLIP vision tower (`CLIPVisionModel`, `CLIPModel`'s vision tower)",
        how=_HF_HOW,
        caveats="Only the vision tower is patched; the text tower is left alone.",
        tested=HF_TESTED,
    ),
    AdapterEntry(
        name="hf.siglip",
        host="transformers",
        module="attnmask.adapters.hf",
        attr="SIGLIP",
        models="Hugging Face SigLIP vision tower (no class token)",
        how=_HF_HOW,
        caveats="Only the vision tower's self-attention is patched; the attention-pooling head "
        "and the text tower are left alone.",
        tested=HF_TESTED,
    ),
    AdapterEntry(
        name="hf",
        host="transformers",
        module="attnmask.adapters.hf",
        attr="ANY",
        models="any other Hugging Face vision model whose attention layers dispatch through the attention "
        "interface and whose embeddings turn pixels into patches (I-JEPA, Data2VecVision, YOLOS, DPT, "
        "AIMv2, BLIP-2's vision tower, ...)",
        how=_HF_HOW + "; the grid, the prefix tokens and host windows are learned per call from the "
        "patch embedding's output and the token count",
        caveats="Tokens after the patches are recognised from the config's `num_detection_tokens` "
        "(YOLOS). Layers whose keys sit on a coarser grid (pooled keys) accept mode='hard' only and "
        "run densely.",
        tested=HF_TESTED,
    ),
    AdapterEntry(
        name="torchvision.vit",
        host="torchvision",
        module="attnmask.adapters.torchvision_vit",
        models="torchvision `vit_b_16`, `vit_b_32`, `vit_l_16`, `vit_l_32`, `vit_h_14`",
        how="each `nn.MultiheadAttention` of an `EncoderBlock` has its class swapped to a "
        "subclass computing attention from the module's own `in_proj`/`out_proj` weights",
        caveats="torchvision's ViT accepts only its configured image size. A masked layer accepts only "
        "the call `EncoderBlock` makes (self-attention, `need_weights=False`) and runs all its heads "
        "outside `nn.MultiheadAttention`'s fused eval fast path: its global heads equal the unfused "
        "path bit for bit and the fused one up to float32 rounding.",
        tested=TORCHVISION_TESTED,
    ),
    AdapterEntry(
        name="torchvision.swin",
        host="torchvision",
        module="attnmask.adapters.torchvision_swin",
        models="torchvision `swin_t`, `swin_s`, `swin_b`, `swin_v2_t`, `swin_v2_s`, `swin_v2_b`",
        how="each `ShiftedWindowAttention(V2)` instance's class is swapped to a subclass whose forward "
        "repeats torchvision's `shifted_window_attention` (padding, cyclic shift, qkv, projections) "
        "with the attention run by the layer's kernel; the relative position bias (V2: the continuous "
        "position bias) plus the shifted-window mask is the kernel's host mask, and the locality mask "
        "is added to it. V2's cosine attention reaches the kernel as `normalize(q) * logit_scale` and "
        "`normalize(k)` with scale 1",
        caveats="The geometry is each attention window's own token grid (7 x 7 for Swin, 8 x 8 for "
        "Swin V2), not the image's; torchvision pads feature maps smaller than the window to one "
        "window rather than shrinking it. torchvision computes attention explicitly; global heads run "
        "through SDPA, so they equal the unpatched model up to float32 rounding, not bit for bit.",
        tested=TORCHVISION_TESTED,
    ),
    AdapterEntry(
        name="generic",
        host="torch",
        module="attnmask.adapters.generic",
        models="any other model whose attention layers (a module with `num_heads` calling "
        "`scaled_dot_product_attention` or a softmax) run over a patch grid: hierarchical, windowed "
        "and pooled-attention models of timm, torchvision and others",
        how="found by structure and checked by one observing forward on an example input; each "
        "patched layer's class is swapped to a subclass that runs the host's forward under a "
        "`TorchFunctionMode` routing its `scaled_dot_product_attention` call to the layer's kernel "
        "(or adding the mask to the logits of its explicit softmax); grid, prefix tokens and host "
        "windows are learned per call from run-time shapes",
        caveats="Layers that attend over channels, predict their weights without keys, pool with "
        "learned queries or see an unrolled token order are refused with the reason. Layers computing "
        "attention with an explicit softmax, and pooled layers (keys on a coarser grid), accept "
        "mode='hard' only and run densely.",
        tested=TIMM_TESTED + TORCHVISION_TESTED,
    ),
)


def supported() -> list[dict[str, object]]:
    """The supported families, one dict per registry row.

    Keys: ``family``, ``host`` (library), ``models``, ``how`` (how it is patched),
    ``caveats`` and ``tested`` (host-library versions the test suite ran against).
    Importing nothing: this works without any host library installed.
    """
    return [
        {
            "family": e.name,
            "host": e.host,
            "models": e.models,
            "how": e.how,
            "caveats": e.caveats,
            "tested": list(e.tested),
        }
        for e in REGISTRY
    ]


WHERE_FAMILIES = "`attnmask.supported()` or docs/supported-models.md lists the families"
"""Where an unsupported-model message sends the reader (the full list is too long for one line)."""


def supported_families() -> str:
    """Human-readable list of the supported families (for error messages)."""
    return "; ".join(f"{e.name} ({e.models}; tested with {', '.join(e.tested)})" for e in REGISTRY)


def load(entry: AdapterEntry) -> Adapter:
    """Import an adapter module and return the adapter it names ``entry.attr``."""
    return getattr(importlib.import_module(entry.module), entry.attr)


def adapter_named(name: str) -> Adapter:
    """The adapter registered under ``name``."""
    for entry in REGISTRY:
        if entry.name == name:
            return load(entry)
    raise ValueError(f"no adapter named {name!r}: known adapters are {[e.name for e in REGISTRY]}")


def find_adapter(model: nn.Module) -> Adapter:
    """The adapter that handles ``model``.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module`` or no adapter handles it; the message
            says where the supported families are listed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model={type(model).__name__} is not accepted: expected a torch.nn.Module")
    for entry in REGISTRY:
        if entry.host in sys.modules:
            adapter = load(entry)
            if adapter.matches(model):
                return adapter
    raise TypeError(
        f"{type(model).__module__}.{type(model).__qualname__} is not a supported model: no attention layers "
        f"found; {WHERE_FAMILIES}"
    )
