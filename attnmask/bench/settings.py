"""What a benchmark run measures: :class:`Settings`, and the quick and full presets."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

from .timing import DTYPES

HEADS_MASKED = ("half", "all")
"""How many heads an attention-level row masks: the first half of them, or all."""

PASSES = ("forward", "forward+backward")
"""What an attention-level call does."""

MODES = ("inference", "train")
"""What a model-level call does: a forward pass without gradients, or one training step
(forward, cross-entropy, backward, AdamW step)."""

ATTENTION_BATCH = {
    "cuda": {197: 256, 577: 64, 1025: 32, 2305: 8, 4097: 4},
    "cpu": {197: 8, 577: 2, 1025: 1, 2305: 1, 4097: 1},
}
"""Batch per token count: more samples at fewer tokens, so each call does comparable work
(the GPU column is the issue's table; CPU batches are small so the full run stays short)."""

MODEL_BATCH = {
    "cuda": {224: 64, 512: 16, 1024: 4},
    "cpu": {224: 4, 512: 1, 1024: 1},
}
"""Batch per image size for the model-level rows."""

MODELS = ("vit_base_patch16_224", "swin_tiny_patch4_window7_224")
"""timm models of the full preset (built with random weights, nothing downloaded)."""

HEAD_FRACTIONS = {"half": 0.5, "all": 1.0}
"""The ``heads`` fraction :func:`attnmask.apply` gets for each model-level label."""


def heads_label(fraction: float) -> str:
    """``"half"`` for 0.5, ``"all"`` for 1.0, else the fraction (``"0.25"``)."""
    for label, value in HEAD_FRACTIONS.items():
        if fraction == value:
            return label
    return f"{fraction:g}"


def head_fraction(text) -> float:
    """``"half"``/``"all"``/a number -> a fraction of the heads (``ValueError`` otherwise)."""
    if isinstance(text, str) and text in HEAD_FRACTIONS:
        return HEAD_FRACTIONS[text]
    return float(text)


def lookup(table: dict[int, int], key: int) -> int:
    """``table``'s value for the smallest key ``>= key`` (the largest key's value beyond it)."""
    for known in sorted(table):
        if known >= key:
            return table[known]
    return table[max(table)]


def grid_of(tokens: int) -> int:
    """Side ``g`` of the square patch grid of ``tokens = 1 + g * g`` (one class token)."""
    side = math.isqrt(max(tokens - 1, 0))
    if tokens < 2 or side * side != tokens - 1:
        raise ValueError(
            f"tokens={tokens} is not accepted: expected 1 + g*g (a class token and a g x g grid), "
            "e.g. 197, 577, 1025, 4097"
        )
    return side


@dataclass(frozen=True)
class Settings:
    """Everything that decides what a run measures (stored in the results as ``settings``).

    Attributes:
        preset: ``"quick"`` or ``"full"``: where the defaults came from.
        device: ``"cpu"`` or ``"cuda"``.
        dtype: One of :data:`~attnmask.bench.timing.DTYPES` (bfloat16 on CUDA, float32 on CPU).
        tokens: Attention-level token counts, each ``1 + g*g``.
        attention_batch: Batch for every token count; ``None``: :data:`ATTENTION_BATCH`.
        num_heads: Heads of the attention-level tensors.
        head_dim: Head dimension of the attention-level tensors.
        window: Side of the square locality window (Swin models use 3, see :mod:`.models`).
        heads_masked: Entries of :data:`HEADS_MASKED`.
        passes: Entries of :data:`PASSES`.
        backends: Shell-style patterns of the backends to run (``"flex*"``); ``None``: all.
        flex_variants: The variants switch (``--variants``; the name is kept for the saved
            results): also run the labelled variants at the attention level, every
            FlexAttention variant (:data:`attnmask.kernels.flex.FLEX_VARIANTS`) and the blocked
            backend's query blocks (:data:`attnmask.bench.attention.BLOCKED_VARIANTS`), not only
            the registered kernels.
        models: timm model names; empty: no model-level rows.
        sizes: Image sizes of the model-level rows.
        modes: Entries of :data:`MODES`.
        model_batch: Batch for every image size; ``None``: :data:`MODEL_BATCH`.
        model_heads: Fractions of the heads masked at the model level, each passed to
            :func:`attnmask.apply` as ``heads`` (0.5: half, 1.0: all); one comparison each. A
            single float is accepted (older settings) and made a 1-tuple.
        depth: Build the models with this many blocks (``timm.create_model(..., depth=N)``,
            for models whose constructor takes ``depth``, such as ViT; others keep theirs):
            a shallower ViT-B/16 keeps 1024 px affordable on CPU. ``None``: the model's own.
            Each model row records the depth it was built with.
        skip_train_sizes: Image sizes whose training rows are skipped (and said so).
        warmup: Untimed calls of each candidate first.
        repeats: Timed interleaved rounds.
        max_seconds: Budget per comparison: fewer rounds (at least 3) when the warm-up
            predicts more; ``None``: always ``repeats``.
        threads: ``torch.set_num_threads`` on CPU; ``None``: torch's default.
        seed: Random seed of tensors, weights and images.
    """

    preset: str = "quick"
    device: str = "cpu"
    dtype: str = "float32"
    tokens: tuple[int, ...] = (197, 1025)
    attention_batch: Optional[int] = None
    num_heads: int = 12
    head_dim: int = 64
    window: int = 7
    heads_masked: tuple[str, ...] = HEADS_MASKED
    passes: tuple[str, ...] = PASSES
    backends: Optional[tuple[str, ...]] = None
    flex_variants: bool = True
    models: tuple[str, ...] = ("vit_small_patch16_224",)
    sizes: tuple[int, ...] = (224,)
    modes: tuple[str, ...] = ("inference",)
    model_batch: Optional[int] = None
    model_heads: tuple[float, ...] = (0.5,)
    depth: Optional[int] = None
    skip_train_sizes: tuple[int, ...] = ()
    warmup: int = 2
    repeats: int = 10
    max_seconds: Optional[float] = None
    threads: Optional[int] = None
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.model_heads, (int, float)):  # one fraction, as in older settings
            object.__setattr__(self, "model_heads", (float(self.model_heads),))

    def validate(self) -> "Settings":
        """Raise ``ValueError`` naming the first bad field; return ``self``."""
        choices = {"preset": ("quick", "full"), "device": ("cpu", "cuda"), "dtype": tuple(DTYPES)}
        for name, accepted in choices.items():
            if getattr(self, name) not in accepted:
                raise ValueError(f"{name}={getattr(self, name)!r} is not accepted: expected one of {list(accepted)}")
        for name, accepted in (("heads_masked", HEADS_MASKED), ("passes", PASSES), ("modes", MODES)):
            for value in getattr(self, name):
                if value not in accepted:
                    raise ValueError(f"{name} entry {value!r} is not accepted: expected one of {list(accepted)}")
        for tokens in self.tokens:
            grid_of(tokens)
        if self.window < 1 or self.window % 2 == 0:
            raise ValueError(f"window={self.window} is not accepted: expected an odd int >= 1")
        for name in ("num_heads", "head_dim", "repeats", "attention_batch", "model_batch", "threads", "depth"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} is not accepted: expected an int >= 1")
        if self.warmup < 1:
            raise ValueError(f"warmup={self.warmup} is not accepted: expected an int >= 1 (the first call is untimed)")
        for fraction in self.model_heads:
            if not 0 < fraction <= 1:
                raise ValueError(f"model_heads entry {fraction} is not accepted: expected a fraction in (0, 1] (half: 0.5, all: 1)")
        return self

    def batch_for_tokens(self, tokens: int) -> int:
        """Attention-level batch at ``tokens``."""
        return self.attention_batch or lookup(ATTENTION_BATCH[self.device], tokens)

    def batch_for_size(self, size: int) -> int:
        """Model-level batch at image size ``size``."""
        return self.model_batch or lookup(MODEL_BATCH[self.device], size)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, not tuples) for the JSON results."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in dataclasses.asdict(self).items()}


def preset(name: str, device: str = "cpu", **overrides: Any) -> Settings:
    """The ``"quick"`` or ``"full"`` settings for ``device``, with ``overrides`` (``None``
    values are ignored, so parsed command-line options can be passed as they are).

    - quick (``attnmask bench``, about a minute on a 2-core CPU): 197 and 1025 tokens, half
      and all heads, forward and forward+backward, registered backends only (``blocked``
      among them; no labelled variants); timm ViT-S/16 at 224 px, half the heads masked,
      inference; 3 rounds on CPU, 10 on CUDA.
    - full (``benchmarks/run.py``): 197/577/1025/2305/4097 tokens, every labelled variant
      (FlexAttention's and the blocked backend's query blocks); timm ViT-B/16 and Swin-T at
      224/512/1024 px, half and all heads masked, inference and training. On CPU: no 1024 px
      training, one warm-up call, and each comparison's rounds capped at 45 s (at least 3
      rounds); see ``docs/performance.md`` for the command lines that keep a CPU run short
      (``--depth``, ``--models``, ``--sizes``).
    """
    cuda = device == "cuda"
    if name == "quick":
        base = Settings(
            preset="quick",
            device=device,
            dtype="bfloat16" if cuda else "float32",
            flex_variants=False,
            warmup=2,
            repeats=10 if cuda else 3,
            max_seconds=10.0,
        )
    elif name == "full":
        base = Settings(
            preset="full",
            device=device,
            dtype="bfloat16" if cuda else "float32",
            tokens=(197, 577, 1025, 2305, 4097),
            models=MODELS,
            sizes=(224, 512, 1024),
            modes=MODES,
            model_heads=tuple(HEAD_FRACTIONS.values()),
            skip_train_sizes=() if cuda else (1024,),
            warmup=3 if cuda else 1,
            repeats=20 if cuda else 5,
            max_seconds=30.0 if cuda else 45.0,
        )
    else:
        raise ValueError(f"preset={name!r} is not accepted: expected 'quick' or 'full'")
    return dataclasses.replace(base, **{key: value for key, value in overrides.items() if value is not None}).validate()
