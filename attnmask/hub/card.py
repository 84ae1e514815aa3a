"""The model card (``README.md``) of a saved folder, and the MaskSpec in words."""

from __future__ import annotations

import json
import re
from pathlib import PurePath
from typing import Optional

from .saved import REPO_ID, SavedMasks

PREFIX_WORDS = {
    "global": "global (class, distillation and register tokens attend to every token, and every query attends to them)",
    "isolated": "isolated (class, distillation and register tokens attend to every token, but the patch queries "
    "of local heads do not attend to them)",
}
MODE_WORDS = {
    "hard": "hard (a local head gives zero attention to every patch outside its window)",
    "soft": "soft (the paper's Eq. 2: out-of-window logits of a local head are set to 0 before the softmax)",
}


def heads_in_words(heads: tuple[tuple[int, ...], ...], num_heads: tuple[int, ...]) -> list[str]:
    """One line per run of consecutive layers masked alike, e.g. ``"layers 0-5: heads 0, 1, 2 of 6 are local"``."""
    lines: list[str] = []
    start = 0
    for i in range(1, len(heads) + 1):
        if i < len(heads) and heads[i] == heads[start] and num_heads[i] == num_heads[start]:
            continue
        layers = f"layer {start}" if i - 1 == start else f"layers {start}-{i - 1}"
        chosen, total = heads[start], num_heads[start]
        if not chosen:
            what = f"all {total} heads global"
        elif len(chosen) == total:
            what = f"all {total} heads local"
        else:
            what = f"head{'s' if len(chosen) > 1 else ''} {', '.join(map(str, chosen))} of {total} local"
        lines.append(f"{layers}: {what}")
        start = i
    return lines


def spec_in_words(saved: SavedMasks) -> list[str]:
    """The saved masks as short sentences (model card, ``attnmask inspect``)."""
    spec = saved.spec
    masked = sum(len(h) for h in spec.heads)
    total = sum(spec.num_heads)
    kh, kw = spec.window
    return [
        f"family: {spec.family} ({spec.num_layers} attention layers, {masked} of {total} heads local)",
        *heads_in_words(spec.heads, spec.num_heads),
        f"window: {kh} x {kw} patches centred on each query patch (clipped at the grid border)",
        f"prefix: {PREFIX_WORDS.get(spec.prefix, spec.prefix)}",
        f"mode: {MODE_WORDS.get(saved.mode, saved.mode)}",
    ]


def render(saved: SavedMasks, library: str, architecture: str, name: str, base_model: Optional[str], on_hub: bool = False) -> str:
    """The ``README.md`` of a saved folder.

    Args:
        saved: The masks.
        library: ``"transformers"`` or ``"timm"``.
        architecture: Model class (transformers) or architecture name (timm).
        name: How the snippets refer to the folder: a Hub repo id or a path.
        base_model: Where the weights came from, if known.
        on_hub: Whether ``name`` is a Hub repo id (else a local path).
    """
    # A card is shared with the folder: local paths (the save folder, a local base model) appear
    # by their folder name only, never as this machine's absolute path.
    name = name if on_hub else folder_name(name)
    base_model = public_name(base_model) if base_model else base_model
    front = ["---", f"library_name: {library}", "tags:", "- attnmask", "- locality-masked-attention", "- vision"]
    if base_model and REPO_ID.match(base_model):
        front.append(f"base_model: {base_model}")
    front.append("---")
    origin = f"`{base_model}`" if base_model else "A vision transformer"
    config = saved.to_config()
    if config.get("base_model"):
        config["base_model"] = public_name(str(config["base_model"]))
    lines = [
        *front,
        "",
        f"# {folder_name(name)}",
        "",
        f"{origin} ({library} `{architecture}`) with locality-masked attention heads, converted with "
        "[attnmask](https://github.com/attnmask/attnmask) (MaiT, [arXiv 2207.03006](https://arxiv.org/abs/2207.03006)). "
        "Each patch token of a local head attends only to the patches in a small window around itself "
        "(in soft mode, out-of-window logits are set to 0 instead: see the mode line); "
        "the other heads stay global. The weights are the base model's, unchanged: the masks are stored "
        "in `config.json` under the `attnmask` key and put back when the model is loaded.",
        "",
        "## Masks",
        "",
        *[f"- {line}" for line in spec_in_words(saved)],
        "",
        "## How to load",
        "",
        "With attnmask (`pip install attnmask`), masked:",
        "",
        "```python",
        "import attnmask",
        "",
        f'model = attnmask.from_pretrained("{name}")',
        "print(attnmask.describe(model))",
        "```",
        "",
    ]
    lines += _transformers_section(saved, name, architecture) if library == "transformers" else _timm_section(saved, name, on_hub)
    lines += [
        "## MaskSpec",
        "",
        "```json",
        "{",
        ",\n".join(f"  {json.dumps(key)}: {json.dumps(value)}" for key, value in config.items()),
        "}",
        "```",
        "",
    ]
    return "\n".join(lines)


def folder_name(path: str) -> str:
    """The last part of a local path (``/home/me/models/vit-local/`` -> ``vit-local``)."""
    parts = [part for part in re.split(r"[\\/]+", path) if part]
    return parts[-1] if parts else path


def public_name(source: str) -> str:
    """What a card may say about where a model came from: a Hub repo id (``org/name``,
    ``hf-hub:org/name``, ``timm/name``) as it is, a local path by its folder name only."""
    if REPO_ID.match(source) or source.startswith(("hf-hub:", "timm/")) or "/" not in source and "\\" not in source:
        return source
    return folder_name(str(PurePath(source)))


def _transformers_section(saved: SavedMasks, name: str, architecture: str) -> list[str]:
    if not saved.auto_apply:
        return [
            "With transformers alone, this folder loads as the unmasked base model "
            "(it was saved with `auto_apply=False`):",
            "",
            "```python",
            "from transformers import AutoModel",
            "",
            f'model = AutoModel.from_pretrained("{name}")  # no masks',
            "```",
            "",
        ]
    return [
        "With transformers, masked, once attnmask is imported (before or after transformers):",
        "",
        "```python",
        "import attnmask",
        f"from transformers import {architecture}",
        "",
        f'model = {architecture}.from_pretrained("{name}")  # AutoModel* classes work too',
        "```",
        "",
        "Without attnmask, transformers refuses to load the folder rather than silently dropping the masks: "
        "its error names `attn_implementation=\"attnmask (pip install attnmask, then import attnmask)\"`.",
        "",
    ]


def _timm_section(saved: SavedMasks, name: str, on_hub: bool) -> list[str]:
    source = f"hf-hub:{name}" if on_hub else f"local-dir:{name}"
    if not saved.auto_apply:
        return [
            "With timm, this folder loads as the unmasked base model (it was saved with `auto_apply=False`):",
            "",
            "```python",
            "import timm",
            "",
            f'model = timm.create_model("{source}", pretrained=True)  # no masks',
            "```",
            "",
        ]
    return [
        "With timm, masked, once attnmask is imported (before or after timm):",
        "",
        "```python",
        "import attnmask",
        "import timm",
        "",
        f'model = timm.create_model("{source}", pretrained=True)',
        "```",
        "",
        "Without attnmask, timm loads the weights without the masks (it ignores the `attnmask` key).",
        "",
    ]
