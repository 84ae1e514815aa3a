"""Model level: a patched timm model against the same model unpatched, in one process.

Each comparison builds the model once (random weights, ``timm.create_model(name,
pretrained=False, img_size=size)``), deep-copies it once per backend and patches the copies
with :func:`attnmask.apply`; the unpatched model and every patched copy are then timed in
interleaved rounds on the same images. Swin models are patched with a 3 x 3 window: their
attention windows are 7 x 7 tokens, so a 7 x 7 locality window would mask nothing.

One comparison per fraction of heads masked (``settings.model_heads``: half, all); with
``settings.depth`` the models are built with that many blocks where the constructor takes
``depth`` (ViT, DeiT, BEiT, ...; Swin keeps its stages). Every row records ``heads`` (the
fraction), ``heads_label`` (``"half"``, ``"all"``) and ``depth`` (the attention layers the
model was built with).
"""

from __future__ import annotations

import copy
import functools
import gc
import time
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import api
from .attention import row, selected, summary
from .settings import Settings, heads_label
from .timing import DTYPES, Timing, one_line, time_interleaved

BASELINE = "unpatched"


def window_for(model_name: str, window: int) -> int:
    """The locality window used for ``model_name``: 3 for Swin (see the module docstring)."""
    return 3 if "swin" in model_name else window


def model_backends(model: nn.Module, patterns) -> list[str]:
    """``"auto"`` and every explicit kernel the model's adapter accepts (never the float64
    ``"reference"``), filtered by ``patterns``."""
    from ..adapters import find_adapter
    from ..kernels import KERNELS

    names = ["auto", *(name for name in KERNELS if name not in ("auto", "reference"))]
    accepted = getattr(find_adapter(model), "backends", None)
    return [name for name in names if (accepted is None or name in accepted) and selected(name, patterns)]


def build(name: str, size: int, depth: Optional[int]) -> nn.Module:
    """``timm.create_model(name, pretrained=False, img_size=size)``, with ``depth=depth`` when
    given and the model's constructor takes it (ViT does, Swin does not: built as it is)."""
    import timm

    if depth is not None:
        try:
            return timm.create_model(name, pretrained=False, img_size=size, depth=depth)
        except TypeError as error:
            if "depth" not in str(error):
                raise
    return timm.create_model(name, pretrained=False, img_size=size)


def layers_of(model: nn.Module) -> Optional[int]:
    """Attention layers (blocks) of a timm model, counted from the module tree."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)):
        return len(blocks)
    stages = getattr(model, "layers", None)
    if isinstance(stages, (nn.Sequential, nn.ModuleList)) and all(hasattr(stage, "blocks") for stage in stages):
        return sum(len(stage.blocks) for stage in stages)
    return None


def _infer(model: nn.Module, images: torch.Tensor) -> None:
    with torch.no_grad():
        model(images)


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(images).float(), labels).backward()
    optimizer.step()


def _row(base: dict[str, Any], name: str, timing: Timing, baseline: Timing, batch: int) -> dict[str, Any]:
    """:func:`.attention.row` plus images per second of both models."""
    out = row(base, name, timing, baseline)
    if "error" not in out:
        out.update(images_per_s=batch * 1e3 / timing.ms, baseline_images_per_s=batch * 1e3 / baseline.ms)
    return out


def compare(settings: Settings, name: str, size: int, mode: str, heads: float = 0.5) -> list[dict[str, Any]]:
    """Rows of one (model, image size, mode, heads masked) comparison, one per backend."""
    device, dtype = torch.device(settings.device), DTYPES[settings.dtype]
    batch, window = settings.batch_for_size(size), window_for(name, settings.window)
    torch.manual_seed(settings.seed)
    unpatched = build(name, size, settings.depth).to(device=device, dtype=dtype)
    unpatched.train(mode == "train")
    base = {
        "model": name, "image_size": size, "batch": batch, "mode": mode, "window": [window, window],
        "heads": heads, "heads_label": heads_label(heads), "depth": layers_of(unpatched),
    }
    models: dict[str, nn.Module] = {BASELINE: unpatched}
    failed: dict[str, str] = {}
    for backend in model_backends(unpatched, settings.backends):
        try:
            models[backend] = api.apply(copy.deepcopy(unpatched), heads=heads, window=window, backend=backend)
        except Exception as error:
            failed[backend] = one_line(error)
    if len(models) > 1:
        report = api.describe(next(model for backend, model in models.items() if backend != BASELINE))
        base.update(
            grid=list(report.grid) if report.grid else None,
            masked_heads=sum(len(layer.heads) for layer in report.layers),
            total_heads=sum(layer.num_heads for layer in report.layers),
        )
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    images = torch.randn(batch, 3, size, size, device=device, dtype=dtype, generator=generator)
    labels = torch.randint(0, unpatched.num_classes, (batch,), device=device, generator=generator)
    fns: dict[str, Callable[[], None]] = {}
    for backend, model in models.items():
        if mode == "inference":
            fns[backend] = functools.partial(_infer, model, images)
        else:
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
            fns[backend] = functools.partial(_train_step, model, optimizer, images, labels)
    timings = time_interleaved(
        fns, device, warmup=settings.warmup, repeats=settings.repeats, max_seconds=settings.max_seconds
    )
    rows = [
        dict(_row(base, backend, timings[backend], timings[BASELINE], batch), resolved=api.describe(model).resolved_backend)
        for backend, model in models.items()
        if backend != BASELINE
    ]
    rows += [dict(base, backend=backend, error=reason) for backend, reason in failed.items()]
    del models, fns, unpatched
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def run_models(settings: Settings, echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Every (model, image size, mode, heads masked) comparison of ``settings``.

    ``ratio`` is ``baseline_ms / ms``: the patched model's throughput relative to the
    unpatched one (above 1 the patched model is faster). Sizes in
    ``settings.skip_train_sizes`` get one row per model and heads setting with ``skipped``
    saying why.
    """
    rows: list[dict[str, Any]] = []
    for name in settings.models:
        for size in settings.sizes:
            for mode in settings.modes:
                for heads in settings.model_heads:
                    where = {"model": name, "image_size": size, "mode": mode, "heads": heads, "heads_label": heads_label(heads)}
                    title = f"model {name} {size} px {mode}, {heads_label(heads)} heads masked"
                    if mode == "train" and size in settings.skip_train_sizes:
                        reason = f"training at {size} px skipped on {settings.device} (too slow for the run's time budget)"
                        rows.append(dict(where, skipped=reason))
                        echo(f"{title}: skipped")
                        continue
                    start = time.perf_counter()
                    try:
                        group = compare(settings, name, size, mode, heads)
                    except Exception as error:  # building the model or its input failed: record, go on
                        group = [dict(where, backend="all", error=one_line(error))]
                        if settings.device == "cuda":
                            torch.cuda.empty_cache()
                    rows.extend(group)
                    depth = f", depth {group[0]['depth']}" if group[0].get("depth") is not None else ""
                    echo(
                        f"{title} (batch {group[0].get('batch', '?')}{depth}) "
                        f"[{time.perf_counter() - start:.0f} s]: {summary(group)}"
                    )
    return rows
