"""The built-in example: patch a timm ViT built from its config, check it, time it.

Nothing is downloaded: the model has random weights. Run with ``attnmask demo`` or
``python -m attnmask demo``.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any, Callable, Optional

import torch
from torch import nn

from . import api
from .kernels import record
from .masks import LocalMask


def _import_timm():
    try:
        import timm
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise SystemExit(f"attnmask demo needs timm: pip install 'attnmask[timm]' ({error})")
    return timm


def _elapsed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _outside(center: int, radius: int, size: int) -> Optional[int]:
    """A coordinate in ``0..size-1`` farther than ``radius`` from ``center``, or ``None``."""
    if center + radius + 1 < size:
        return center + radius + 1
    if center - radius - 1 >= 0:
        return center - radius - 1
    return None


def choose_patches(
    grid: tuple[int, int], window: tuple[int, int]
) -> tuple[tuple[int, int], Optional[tuple[int, int]], tuple[int, int]]:
    """``(query, outside, inside)`` patches of a ``grid`` for the locality check.

    The query is the centre patch when some patch lies outside its window, else a corner
    (the farthest reach); ``outside`` is a patch outside the query's window, ``None`` when
    the window covers the grid from every query; ``inside`` is a neighbour inside it (the
    query itself for a 1 x 1 window).
    """
    (rows, cols), (radius_r, radius_c) = grid, (window[0] // 2, window[1] // 2)
    row, col = rows // 2, cols // 2
    if _outside(row, radius_r, rows) is None and _outside(col, radius_c, cols) is None:
        row, col = 0, 0
    far_row, far_col = _outside(row, radius_r, rows), _outside(col, radius_c, cols)
    outside = (far_row, col) if far_row is not None else (row, far_col) if far_col is not None else None
    if radius_c and cols > 1:
        inside = (row, col + 1 if col + 1 < cols else col - 1)
    elif radius_r and rows > 1:
        inside = (row + 1 if row + 1 < rows else row - 1, col)
    else:
        inside = (row, col)
    return (row, col), outside, inside


def _first_call(model: nn.Module, images: torch.Tensor, layer: int, module: nn.Module):
    """The mask and the inputs of ``module``'s first call in a forward on ``images``: what
    attnmask itself read (grid, prefix tokens) rather than host attributes."""
    masks: list[LocalMask] = []
    calls: list[tuple[tuple, dict]] = []

    def recorder(probs: torch.Tensor, mask: LocalMask) -> None:
        if mask.layer == layer and not masks:
            masks.append(mask)

    def hook(mod, args, kwargs):
        if not calls:
            calls.append((args, kwargs))

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad(), record.recording(recorder):
            model(images)
    finally:
        handle.remove()
    return (masks[0] if masks else None), (calls[0] if calls else None)


def locality_check(model: nn.Module, images: torch.Tensor) -> dict[str, Any]:
    """Perturb one patch token outside (and one inside) a query patch's window at the input
    of the first masked attention layer; measure that layer's per-head output at the query.

    The grid and the prefix tokens are the ones attnmask's mask uses on this input (recorded
    from the layer's call), so host windows (Swin) and prefix tokens are placed as masked.
    Returns ``{"applies": False, "reason": ...}`` when the check cannot say anything (the
    window covers the grid, or the layer's per-head outputs cannot be read).
    """
    spec = api.get_spec(model)
    layer = spec.masked_layers[0]
    name = spec.layers[layer]
    masked = list(spec.heads[layer])
    unmasked = [h for h in range(spec.num_heads[layer]) if h not in masked]
    module = model.get_submodule(name)
    mask, call = _first_call(model, images, layer, module)
    result: dict[str, Any] = {"layer": name, "applies": False}
    if mask is None or call is None:
        return dict(result, reason=f"no masked attention call of {name} was seen")
    result["grid"] = list(mask.grid)
    result["prefix_tokens"] = mask.prefix_tokens
    query, outside, inside = choose_patches(mask.grid, spec.window)
    result["query_patch"] = list(query)
    if outside is None:
        return dict(result, reason=(
            f"the {spec.window[0]}x{spec.window[1]} window covers the {mask.grid[0]}x{mask.grid[1]} grid of {name}: "
            "no patch lies outside any query's window, so the outside-window check does not apply"
        ))
    args, kwargs = call
    x = args[0] if args and isinstance(args[0], torch.Tensor) else None
    proj = getattr(module, "proj", None)
    if mask.positions is not None or x is None or x.dim() != 3 or x.shape[1] != mask.num_tokens or not isinstance(proj, nn.Linear):
        return dict(result, reason=f"{name}'s per-head outputs cannot be read here (layer input and output projection)")

    def heads_at_query(token: Optional[tuple[int, int]]) -> torch.Tensor:
        changed = x.clone()
        if token is not None:
            changed[0, mask.prefix_tokens + token[0] * mask.grid[1] + token[1]] += 1.0
        seen: list[torch.Tensor] = []
        handle = proj.register_forward_pre_hook(lambda mod, inputs: seen.append(inputs[0]))
        try:
            with torch.no_grad():
                module(changed, *args[1:], **kwargs)
        finally:
            handle.remove()
        out = seen[0]
        return out.reshape(out.shape[0], out.shape[1], spec.num_heads[layer], -1)[0, mask.prefix_tokens + query[0] * mask.grid[1] + query[1]]

    base = heads_at_query(None)
    moved_outside = (heads_at_query(outside) - base).abs()
    moved_inside = (heads_at_query(inside) - base).abs()
    return dict(
        result,
        applies=True,
        outside_patch=list(outside),
        inside_patch=list(inside),
        masked_heads_change_outside=float(moved_outside[masked].max()),
        masked_heads_change_inside=float(moved_inside[masked].max()),
        global_heads_change_outside=float(moved_outside[unmasked].max()) if unmasked else float("nan"),
    )


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
        model_name: A timm model name (built with random weights): any vision transformer
            attnmask supports (ViT, DeiT, Swin, BEiT, EVA, ...).
        heads, window: Passed to :func:`attnmask.apply`.
        batch: Batch size of the random images.
        repeats: Timed forward passes of each model (interleaved, median).
        seed: Random seed for weights and images.
        echo: Where to print progress.
    """
    timm = _import_timm()
    if not timm.is_model(model_name):
        raise ValueError(
            f"--model {model_name!r} is not accepted: timm has no model of that name "
            "(timm.list_models('vit_*') lists ViTs; any timm vision transformer works)"
        )
    torch.manual_seed(seed)
    model = timm.create_model(model_name, pretrained=False).eval()
    _, height, width = timm.data.resolve_model_data_config(model)["input_size"]
    images = torch.randn(batch, 3, height, width)
    try:
        patched = api.apply(copy.deepcopy(model), heads=heads, window=window)
    except TypeError as error:
        if "window=" in str(error) or "heads=" in str(error):
            raise
        raise ValueError(f"--model {model_name!r} is not accepted: {error}") from None
    spec = api.get_spec(patched)
    echo(f"model: {model_name} (random weights), input {batch}x3x{height}x{width}")
    echo(str(api.describe(patched)))

    locality = locality_check(patched, images) if spec.masked_layers else {}
    if locality.get("applies"):
        echo(
            f"locality, {locality['layer']} ({locality['grid'][0]}x{locality['grid'][1]} grid), query patch "
            f"{tuple(locality['query_patch'])}: perturbing patch {tuple(locality['outside_patch'])}'s token "
            f"(outside the window) moves the masked heads by {locality['masked_heads_change_outside']:.3g} and the "
            f"global heads by {locality['global_heads_change_outside']:.3g}; a neighbour inside the window "
            f"{tuple(locality['inside_patch'])} moves the masked heads by {locality['masked_heads_change_inside']:.3g}"
        )
    elif locality:
        echo(f"locality: not checked: {locality['reason']}")
    else:
        echo("locality: not checked: no head is masked")

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
    ok = restored and (
        not locality.get("applies")
        or (locality["masked_heads_change_outside"] == 0.0 and locality["masked_heads_change_inside"] > 0)
    )
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
