"""Attention Locality Score (ALS) and the paper's rule for choosing heads from it.

:func:`locality_scores` measures, for every head of every attention layer, how much of its
attention already falls inside a local window, from the model's real attention
probabilities on given images. :func:`suggest_heads` turns such a table into a ``heads=``
mapping for :func:`attnmask.apply`, following the search described in the MaiT paper.

Definition (``window = (kh, kw)``, a grid of ``H x W`` patches, ``P`` prefix tokens)::

    ALS(layer, head) = mean over images b and patch queries n of
                       sum over patch keys i in W(n) of A[b, head, n, i]

``A`` is the head's attention probability matrix (rows sum to 1 over all tokens, prefix
tokens included) and ``W(n)`` the ``kh x kw`` neighbourhood of patch ``n``, clipped at the
grid border. Prefix tokens (class, distillation, register tokens) are neither queries nor
local keys: attention a patch pays to the class token counts as non-local. Uniform attention
over ``N`` tokens therefore scores ``mean_n |W(n)| / N``, and a hard-masked head that may not
see prefix tokens (``apply(..., prefix="isolated")`` with the same window) scores exactly 1.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Callable, Optional

import torch
from torch import nn

from .adapters import REGISTRY, adapter_named, find_adapter
from .api import _install, get_spec, remove, unwrap
from .kernels import resolve_backend
from .kernels.record import recording
from .masks import LocalMask
from .spec import LayerPlan, normalize_window

HOST_ATTENTION_FAMILIES = ("timm.cait",)
"""Families whose attention runs in the host's own code (no attnmask kernel to record from):
CaiT's talking heads mix the heads' logits and weights, which no per-head kernel expresses."""

Forward = Callable[[nn.Module, torch.Tensor], Any]


def local_weight(probs: torch.Tensor, mask: LocalMask, window: Any) -> torch.Tensor:
    """In-window attention weight of each patch query: the summand of the ALS.

    Args:
        probs: Attention probabilities ``(batch, heads, tokens, tokens)`` of one layer.
        mask: The layer's :class:`~attnmask.masks.LocalMask`: only its geometry is used
            (grid, prefix tokens, per-sample ``positions``), not its heads or window.
        window: The scoring window (what :func:`attnmask.apply` accepts).

    Returns:
        ``(batch, heads, patch queries)``: for each patch query, the sum of its
        probabilities on the patch keys inside its window (prefix keys excluded).
    """
    window = normalize_window(window)
    # "isolated": patch queries see only the patches of their window, not the prefix tokens.
    geometry = dataclasses.replace(mask, window=window, prefix="isolated", heads=(), mode="hard")
    allowed = geometry.window_mask(probs.device)  # (N, N), or (batch, 1, N, N) with positions
    inside = torch.where(allowed, probs, torch.zeros((), dtype=probs.dtype, device=probs.device))
    return inside.sum(dim=-1)[..., mask.prefix_tokens :]


class _Tally:
    """Recorder: sums each layer's per-head in-window weight and counts the queries."""

    def __init__(self, num_heads: Sequence[int], window: tuple[int, int]) -> None:
        self.num_heads = list(num_heads)
        self.window = window
        self.sums = torch.zeros(len(num_heads), max(num_heads), dtype=torch.float64)
        self.counts = torch.zeros(len(num_heads), dtype=torch.float64)

    def __call__(self, probs: torch.Tensor, mask: LocalMask) -> None:
        layer = mask.layer
        if layer is None or not 0 <= layer < len(self.num_heads):
            return  # not one of the layers being scored
        weight = local_weight(probs, mask, self.window)
        self.sums[layer, : weight.shape[1]] += weight.double().sum(dim=(0, 2)).cpu()
        self.counts[layer] += weight.shape[0] * weight.shape[2]

    def scores(self) -> torch.Tensor:
        out = torch.full_like(self.sums, float("nan"))
        for layer, heads in enumerate(self.num_heads):
            if self.counts[layer] > 0:
                out[layer, :heads] = self.sums[layer, :heads] / self.counts[layer]
        return out


def _check_images(images: Any, batch_size: Any) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is not accepted: expected a positive int")
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[0] == 0:
            raise ValueError(
                f"images of shape {tuple(images.shape)} are not accepted: expected a (N, C, H, W) tensor "
                "with N >= 1, or an iterable of such batches (e.g. a DataLoader)"
            )
    elif isinstance(images, (str, bytes, Mapping)) or not isinstance(images, Iterable):
        raise TypeError(
            f"images={type(images).__name__} is not accepted: expected a (N, C, H, W) tensor or an "
            "iterable of batches (tensors, or tuples/lists whose first element is the image tensor)"
        )


def _batches(images: Any, batch_size: int) -> Iterable[Any]:
    if isinstance(images, torch.Tensor):
        return images.split(batch_size)
    return images


def _image_tensor(batch: Any, index: int) -> torch.Tensor:
    if isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise TypeError(
            f"batch {index} of images is a {type(batch).__name__}: expected a tensor, or a tuple/list "
            "whose first element is the image tensor"
        )
    return batch


def _progress(batches: Iterable[Any], total: Optional[int], enabled: bool) -> Iterable[Any]:
    """``batches`` with a tqdm progress bar when tqdm is installed (it is optional)."""
    if not enabled:
        return batches
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return batches
    return tqdm(batches, total=total, desc="locality_scores", unit="batch")


def _run(model: nn.Module, images: Any, batch_size: int, progress: bool, tally: _Tally, forward: Optional[Forward]) -> None:
    """Feed every batch to the model while its attention is recorded into ``tally``."""
    parameter = next(model.parameters(), None)
    bar = _progress(_batches(images, batch_size), _total(images, batch_size), progress)
    try:
        with torch.no_grad(), recording(tally):
            for index, batch in enumerate(bar):
                batch = _image_tensor(batch, index)
                if parameter is not None:
                    floating = batch.is_floating_point() and parameter.is_floating_point()
                    batch = batch.to(device=parameter.device, dtype=parameter.dtype if floating else None)
                if forward is None:
                    model(batch)
                else:
                    forward(model, batch)
    finally:
        close = getattr(bar, "close", None)
        if close is not None:
            close()


def _total(images: Any, batch_size: int) -> Optional[int]:
    if isinstance(images, torch.Tensor):
        return math.ceil(images.shape[0] / batch_size)
    try:
        return len(images)
    except TypeError:
        return None


def locality_scores(
    model: nn.Module,
    images: Any,
    window: Any = 3,
    *,
    batch_size: int = 32,
    progress: bool = True,
    forward: Optional[Forward] = None,
) -> torch.Tensor:
    """Attention Locality Score of every head: how much attention already stays local.

    For each head, the mean over the images and over the *patch* queries of the attention
    probability on the patch keys inside the query's ``window`` neighbourhood (clipped at
    the grid border). Prefix tokens (class, distillation, register tokens) are not queries
    here, and attention paid to them counts as non-local. ~1: the head is local anyway;
    ~0: it is global. Uniform attention over ``N`` tokens scores ``mean_n |W(n)| / N``.

    The probabilities are the model's real ones: on a model patched by
    :func:`attnmask.apply`, masked heads are measured with their mask (hard: ``-inf``
    outside their window; soft: logits set to 0 there), with the host's own mask or bias
    (BEiT's relative position bias, ...) added. To measure every layer, attnmask is installed
    on all attention layers for the duration of the call (layers without masked heads run
    plain attention, computed explicitly), in eval mode under ``torch.no_grad``; afterwards
    the model is as it was: its modules' classes, attributes, hooks, training flags, state
    and (for a patched model) its :class:`~attnmask.MaskSpec` (one difference: on a patched
    ``dynamic_img_size`` model, attnmask's own grid hook is registered again, after any hook
    added since ``apply``). A ``torch.compile`` wrapper is scored through the model inside.

    Args:
        model: A supported model whose attention runs through attnmask's kernels: timm
            ViT/DeiT/EVA/BEiT/Swin/SwinV2, Hugging Face ViT/DeiT/BEiT/DINOv2/CLIP/SigLIP/ViTMAE/Swin,
            torchvision ViT/Swin/Swin V2 (for the Swin families, the grid is each attention
            window's own token grid). timm CaiT (talking heads) is refused.
        images: A ``(N, C, H, W)`` tensor (split into batches of ``batch_size``) or an
            iterable of batches: tensors, or tuples/lists whose first element is the image
            tensor (a ``DataLoader``). Batches are moved to the model's device (and floating
            images to its dtype).
        window: The scoring window: an odd int ``k`` or a pair of odd ints ``(kh, kw)``.
        batch_size: Images per forward when ``images`` is a tensor. Each layer's
            ``(batch, heads, tokens, tokens)`` probabilities are materialised in float32.
        progress: Show a progress bar over batches (when tqdm is installed).
        forward: ``(model, images) -> anything``: how to run the model on a batch; default
            ``model(images)``. E.g. ``lambda m, x: m(x, noise=noise)`` for ViTMAE (whose
            random masking otherwise keeps a random subset of patches; the score then counts
            the kept patches only).

    Returns:
        A float64 CPU tensor ``(num_layers, max_heads)``; ``NaN`` where a layer has fewer
        heads, and for a layer the forward never reached.

    Raises:
        TypeError, ValueError: For bad arguments, an unsupported model or a family whose
            attention runs in host code; the model is left untouched.
        RuntimeError: If no attention layer was reached (a ``forward`` bypassing them).
    """
    model = unwrap(model)  # a torch.compile wrapper: score (and restore) the model inside
    window = normalize_window(window)
    _check_images(images, batch_size)
    if forward is not None and not callable(forward):
        raise TypeError(f"forward={forward!r} is not accepted: expected a callable (model, images) -> output")
    spec = get_spec(model)
    try:
        adapter = adapter_named(spec.family) if spec is not None else find_adapter(model)
        sites = adapter.sites(model)
    except TypeError as error:
        raise TypeError(
            f"{error} (locality_scores does not support the families whose attention runs in host "
            f"code: {', '.join(sorted(HOST_ATTENTION_FAMILIES))})"
        ) from None
    if hasattr(adapter, "backend_label") or adapter.name in HOST_ATTENTION_FAMILIES:
        covered = [entry.name for entry in REGISTRY if entry.name not in HOST_ATTENTION_FAMILIES]
        raise TypeError(
            f"locality_scores does not support {adapter.name} models: their attention runs in the host's "
            f"own code ({getattr(adapter, 'backend_label', 'not an attnmask kernel')}), where attnmask cannot "
            f"read the probabilities. Supported families: {', '.join(covered)}"
        )
    if not sites:
        raise TypeError(f"attnmask found no attention layers to score in {type(model).__name__}")
    heads = spec.heads if spec is not None else tuple(() for _ in sites)
    plans = [
        LayerPlan(
            layer=site.layer,
            num_heads=site.num_heads,
            heads=heads[site.layer],
            window=spec.window if spec is not None else window,
            prefix=spec.prefix if spec is not None else "global",
            backend=resolve_backend(spec.backend) if spec is not None else "reference",
            mode=spec.mode if spec is not None else "hard",
        )
        for site in sites
    ]
    tally = _Tally([site.num_heads for site in sites], window)
    training = [(module, module.training) for module in model.modules()]

    remove(model)
    try:
        try:
            adapter.install(model, sites, plans)
            model.eval()
            _run(model, images, batch_size, progress, tally, forward)
        finally:
            adapter.uninstall(model, [site.name for site in sites])
    finally:
        for module, flag in training:
            module.training = flag
        if spec is not None:
            _install(model, adapter, adapter.sites(model), spec, resolve_backend(spec.backend))
    if not bool((tally.counts > 0).any()):
        raise RuntimeError(
            "locality_scores recorded no attention: the forward reached none of the model's attention "
            "layers (does `forward` call the model on the images?)"
        )
    return tally.scores()


def _check_scores(scores: Any) -> torch.Tensor:
    try:
        table = torch.as_tensor(scores)
        if not table.is_floating_point():
            table = table.to(torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(
            f"scores={type(scores).__name__} is not accepted: expected a (layers, heads) tensor from "
            "locality_scores (or a nested list of floats)"
        ) from None
    if table.dim() != 2 or table.shape[0] == 0 or table.shape[1] == 0:
        raise ValueError(
            f"scores of shape {tuple(table.shape)} are not accepted: expected a non-empty (layers, heads) "
            "table, as locality_scores returns"
        )
    return table


def _check_threshold(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise TypeError(f"{name}={value!r} is not accepted: expected a number in [0, 1]")
    return float(value)


def suggest_heads(
    scores: Any,
    *,
    high: float = 0.7,
    low: float = 0.1,
    probe_head: Optional[int] = 0,
) -> dict[int, list[int]]:
    """Which heads to mask, from locality scores, by the MaiT paper's search rule.

    The paper masks head 0 of every layer, measures its ALS and then, per layer: where it is
    high, masks every head of the layer (and unmasks any head whose own ALS is ~0); where it
    is intermediate, keeps one masked head; where it is ~0, removes the mask. Per layer, with
    ``s`` the probe head's score:

    - ``s >= high``: every head whose own score is ``>= low``;
    - ``low <= s < high``: the probe head only;
    - ``s < low``: none.

    Args:
        scores: ``(layers, heads)`` table from :func:`locality_scores` (``NaN`` for heads a
            layer does not have).
        high: Score from which a layer is masked fully.
        low: Score below which a head (or, for the probe head, a layer) is left global.
        probe_head: The head whose score decides for its layer (the paper masks and measures
            head 0); ``None`` takes each layer's most local head.

    Returns:
        ``{layer: [head, ...]}`` for the layers with masked heads, which
        :func:`attnmask.apply` accepts as ``heads=``.

    Raises:
        TypeError, ValueError: For a bad table, thresholds outside ``0 <= low < high <= 1`` or
            a ``probe_head`` outside the table (or ``NaN`` in a layer).
    """
    table = _check_scores(scores)
    high = _check_threshold("high", high)
    low = _check_threshold("low", low)
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"low={low!r}, high={high!r} are not accepted: expected 0 <= low < high <= 1")
    num_heads = table.shape[1]
    if probe_head is not None and (
        isinstance(probe_head, bool) or not isinstance(probe_head, numbers.Integral) or not 0 <= probe_head < num_heads
    ):
        raise ValueError(
            f"probe_head={probe_head!r} is not accepted: expected None (each layer's most local head) or "
            f"a head index in 0..{num_heads - 1}"
        )
    # Thresholds in the table's own precision: a float32 score of 0.7 is "at least 0.7".
    high, low = (torch.tensor(value, dtype=table.dtype).item() for value in (high, low))
    table = table.detach().cpu()
    chosen: dict[int, list[int]] = {}
    for layer, row in enumerate(table):
        present = [h for h in range(num_heads) if not math.isnan(row[h].item())]
        if not present:
            continue  # a layer the forward never reached: leave it global
        probe = max(present, key=lambda h: row[h].item()) if probe_head is None else int(probe_head)
        if probe not in present:
            raise ValueError(
                f"probe_head={probe_head!r} is not accepted: layer {layer} has no score for head {probe} "
                f"(its scored heads: {present})"
            )
        score = row[probe].item()
        if score >= high:
            heads = [h for h in present if row[h].item() >= low]
        elif score >= low:
            heads = [probe]
        else:
            heads = []
        if heads:
            chosen[layer] = heads
    return chosen
