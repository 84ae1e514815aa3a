"""The built-in example: patch a timm ViT built from its config, check it, time it.

Nothing is downloaded: the model has random weights. Run with ``attnmask demo`` or
``python -m attnmask demo``.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any, Callable

import torch
from torch import nn

from . import api


def _import_timm():
    try:
        import timm
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise SystemExit(f"attnmask demo needs timm: pip install 'attnmask[timm]' ({error})")
    return timm


def _head_outputs(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Per-head attention outputs of the first block, ``(B, N, heads, head_dim)``."""
    attn = model.blocks[0].attn
    seen: dict[str, torch.Tensor] = {}
    handle = attn.proj.register_forward_pre_hook(lambda module, args: seen.__setitem__("x", args[0]))
    try:
        with torch.no_grad():
            model.forward_features(images)
    finally:
        handle.remove()
    x = seen["x"]
    return x.reshape(x.shape[0], x.shape[1], attn.num_heads, -1)


def _elapsed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def locality_check(model: nn.Module, images: torch.Tensor, window: tuple[int, int]) -> dict[str, float]:
    """Perturb one image patch outside (and one inside) a query's window; measure the first
    block's per-head output at that query."""
    spec = api.get_spec(model)
    masked = list(spec.heads[0])
    unmasked = [h for h in range(spec.num_heads[0]) if h not in masked]
    grid = model.patch_embed.grid_size
    patch_h, patch_w = model.patch_embed.patch_size
    prefix = model.num_prefix_tokens
    row, col = grid[0] // 2, grid[1] // 2
    query = prefix + row * grid[1] + col
    base = _head_outputs(model, images)[:, query]

    def perturbed(r: int, c: int) -> torch.Tensor:
        changed = images.clone()
        changed[:, :, r * patch_h : (r + 1) * patch_h, c * patch_w : (c + 1) * patch_w] += 1.0
        return (_head_outputs(model, changed)[:, query] - base).abs()

    far_row = row + window[0] // 2 + 1 if row + window[0] // 2 + 1 < grid[0] else row - window[0] // 2 - 1
    outside = perturbed(far_row, col)
    inside = perturbed(row, col + 1 if col + 1 < grid[1] else col - 1)
    return {
        "query_patch": [row, col],
        "outside_patch": [far_row, col],
        "masked_heads_change_outside": float(outside[:, masked].max()),
        "masked_heads_change_inside": float(inside[:, masked].max()),
        "global_heads_change_outside": float(outside[:, unmasked].max()) if unmasked else float("nan"),
    }


def run(
    model_name: str = "vit_small_patch16_224",
    heads: Any = 0.5,
    window: Any = 7,
    batch: int = 8,
    repeats: int = 10,
    seed: int = 0,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the demo and return its measurements.

    Args:
        model_name: A timm VisionTransformer name (built with random weights).
        heads, window: Passed to :func:`attnmask.apply`.
        batch: Batch size of the random images.
        repeats: Timed forward passes of each model (interleaved, median).
        seed: Random seed for weights and images.
        echo: Where to print progress.
    """
    timm = _import_timm()
    torch.manual_seed(seed)
    model = timm.create_model(model_name, pretrained=False).eval()
    height, width = model.patch_embed.img_size
    images = torch.randn(batch, 3, height, width)
    patched = api.apply(copy.deepcopy(model), heads=heads, window=window)
    spec = api.get_spec(patched)
    echo(f"model: {model_name} (random weights), input {batch}x3x{height}x{width}")
    echo(str(api.describe(patched)))

    locality = locality_check(patched, images, spec.window) if spec.heads[0] else {}
    if locality:
        echo(
            f"locality, first block, query patch {tuple(locality['query_patch'])}: perturbing patch "
            f"{tuple(locality['outside_patch'])} (outside the window) moves the masked heads by "
            f"{locality['masked_heads_change_outside']:.3g} and the global heads by "
            f"{locality['global_heads_change_outside']:.3g}; a neighbour inside the window moves the "
            f"masked heads by {locality['masked_heads_change_inside']:.3g}"
        )

    with torch.no_grad():
        reference = model(images)
        output = patched(images)
        restored_model = api.remove(copy.deepcopy(patched))
        restored = torch.equal(restored_model(images), reference)
    difference = float((output - reference).abs().max())
    scale = float(reference.abs().max())
    echo(f"output vs unpatched: max |difference| {difference:.4g} (max |output| {scale:.4g})")
    echo(f"after attnmask.remove: outputs bit-identical to the unpatched model: {restored}")

    with torch.inference_mode():
        for _ in range(2):
            model(images), patched(images)
        base_times, patched_times = [], []
        for _ in range(repeats):
            base_times.append(_elapsed(lambda: model(images)))
            patched_times.append(_elapsed(lambda: patched(images)))
    base_s, patched_s = statistics.median(base_times), statistics.median(patched_times)
    ratio = patched_s / base_s
    echo(
        f"forward time on {images.device.type}, fp32, batch {batch}: unpatched {base_s * 1e3:.1f} ms, "
        f"patched {patched_s * 1e3:.1f} ms, ratio {ratio:.3f}x (median of {repeats}, interleaved)"
    )
    ok = restored and (not locality or (locality["masked_heads_change_outside"] == 0.0 and locality["masked_heads_change_inside"] > 0))
    echo("demo checks: " + ("passed" if ok else "FAILED"))
    return {
        "model": model_name,
        "batch": batch,
        "spec": spec.to_dict(),
        "locality": locality,
        "max_abs_difference": difference,
        "remove_bit_identical": restored,
        "forward_ms": {"unpatched": base_s * 1e3, "patched": patched_s * 1e3},
        "time_ratio": ratio,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "ok": ok,
    }
