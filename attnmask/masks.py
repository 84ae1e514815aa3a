"""Locality masks: pure functions of geometry, knowing nothing of models.

Tokens are laid out as ``prefix_tokens`` prefix tokens (class, distillation, register
tokens) followed by the ``H x W`` patch tokens in row-major order, as every supported host
model does. A *masked* (local) head lets a patch query attend only to the patches inside a
``kh x kw`` window centred on itself, clipped at the grid border. Prefix tokens stay
global.

There is one definition of the mask: :func:`local_window`, a closure
``(batch, head, q_idx, kv_idx) -> bool`` in attention-gym's ``mask_mod`` shape (``True``
means "may attend"). Evaluated on broadcast ``arange``s it gives the dense boolean mask
that SDPA takes; passed as-is it is a FlexAttention ``mask_mod``. Every backend derives its
mask from it, so backends agree by construction.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(batch, head, q_idx, kv_idx) -> bool tensor``; ``True`` where attention is allowed."""

ALIGN = 16
"""Row stride (in elements) of cached additive masks: what fused SDPA kernels require."""

PREFIX_POLICIES = ("global", "isolated")
"""How masked heads treat prefix tokens.

- ``"global"``: prefix tokens attend to every token and every query may attend to them
  (both ways global; the default).
- ``"isolated"``: prefix tokens still attend to every token, but patch queries of masked
  heads see only the patches in their window, not the prefix tokens.
"""


def token_coords(idx: torch.Tensor, prefix_tokens: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column on the patch grid of token indices (prefix tokens get negative rows).

    Args:
        idx: Integer tensor of token indices.
        prefix_tokens: Number of prefix tokens before the patch tokens.
        width: Width ``W`` of the patch grid.

    Returns:
        ``(row, col)`` tensors shaped like ``idx``.
    """
    patch = idx - prefix_tokens
    return torch.div(patch, width, rounding_mode="floor"), torch.remainder(patch, width)


def local_window(
    grid: tuple[int, int],
    window: tuple[int, int],
    prefix_tokens: int = 0,
    prefix: str = "global",
) -> MaskMod:
    """Mask of one local head: each patch attends to its ``kh x kw`` neighbourhood.

    Args:
        grid: Patch grid ``(H, W)``.
        window: Neighbourhood ``(kh, kw)``, odd sizes, centred on the query patch and
            clipped at the grid border (a corner patch of a 3 x 3 window sees 4 patches).
        prefix_tokens: Number of prefix tokens (class, distillation, registers) placed
            before the patch tokens.
        prefix: Prefix policy, one of :data:`PREFIX_POLICIES`.

    Returns:
        A ``mask_mod`` closure ``(b, h, q_idx, kv_idx) -> bool``, independent of ``b``, ``h``.
    """
    _, width = grid
    radius_h, radius_w = window[0] // 2, window[1] // 2

    def local_window_mask(b, h, q_idx, kv_idx):
        q_row, q_col = token_coords(q_idx, prefix_tokens, width)
        kv_row, kv_col = token_coords(kv_idx, prefix_tokens, width)
        near = ((q_row - kv_row).abs() <= radius_h) & ((q_col - kv_col).abs() <= radius_w)
        q_prefix = q_idx < prefix_tokens
        kv_prefix = kv_idx < prefix_tokens
        if prefix == "global":
            return q_prefix | kv_prefix | near
        return q_prefix | (~kv_prefix & near)

    return local_window_mask


def select_heads(mask_mod: MaskMod, head_is_local: torch.Tensor) -> MaskMod:
    """Apply ``mask_mod`` to the heads flagged in ``head_is_local``; other heads see everything.

    Args:
        mask_mod: A per-head-agnostic mask, e.g. from :func:`local_window`.
        head_is_local: Boolean tensor of shape ``(num_heads,)``.
    """

    def selected_heads_mask(b, h, q_idx, kv_idx):
        return ~head_is_local[h] | mask_mod(b, h, q_idx, kv_idx)

    return selected_heads_mask


def at_positions(mask_mod: MaskMod, positions: torch.Tensor) -> MaskMod:
    """``mask_mod`` for a sequence whose token ``i`` of sample ``b`` sits at ``positions[b, i]``.

    For models that drop or reorder tokens per sample (ViTMAE's random masking):
    ``positions`` gives each token's index in the full layout (prefix tokens, then the
    row-major grid), and the mask is the full-layout mask read at those indices.
    """

    def mask_at_positions(b, h, q_idx, kv_idx):
        return mask_mod(b, h, positions[b, q_idx], positions[b, kv_idx])

    return mask_at_positions


def kept_positions(kept: torch.Tensor, prefix_tokens: int) -> torch.Tensor:
    """:attr:`LocalMask.positions` of a sequence of prefix tokens then each sample's kept patches.

    Args:
        kept: ``(batch, kept)`` indices into the row-major patch grid, in sequence order
            (ViTMAE's shuffle, timm's patch dropout).
        prefix_tokens: Number of prefix tokens before the patches.

    Returns:
        ``(batch, prefix_tokens + kept)`` indices into the full layout.
    """
    prefix = torch.arange(prefix_tokens, device=kept.device).expand(kept.shape[0], -1)
    return torch.cat([prefix, kept + prefix_tokens], dim=1)


def evaluate(
    mask_mod: MaskMod, num_heads: int, num_tokens: int, device=None, batch: Optional[int] = None
) -> torch.Tensor:
    """Evaluate a ``mask_mod`` densely.

    Returns:
        Boolean tensor ``(num_heads, num_tokens, num_tokens)``, or
        ``(batch, num_heads, num_tokens, num_tokens)`` when ``batch`` is given.
    """
    heads = torch.arange(num_heads, device=device)[:, None, None]
    q_idx = torch.arange(num_tokens, device=device)[None, :, None]
    kv_idx = torch.arange(num_tokens, device=device)[None, None, :]
    if batch is None:
        zero = torch.zeros((), dtype=torch.long, device=device)
        return mask_mod(zero, heads, q_idx, kv_idx).expand(num_heads, num_tokens, num_tokens)
    b = torch.arange(batch, device=device)[:, None, None, None]
    return mask_mod(b, heads[None], q_idx[None], kv_idx[None]).expand(batch, num_heads, num_tokens, num_tokens)


@dataclass(frozen=True)
class LocalMask:
    """Everything that defines the mask of one attention layer for one input size.

    Attributes:
        grid: Patch grid ``(H, W)``.
        window: Neighbourhood ``(kh, kw)`` (odd sizes).
        prefix_tokens: Number of prefix tokens before the patches.
        num_heads: Number of heads of the layer.
        heads: Sorted indices of the masked (local) heads; the others are global.
        prefix: Prefix policy, one of :data:`PREFIX_POLICIES`.
        positions: Optional ``(batch, tokens)`` integer tensor for sequences that hold a
            per-sample subset or reordering of the full layout (ViTMAE's random masking):
            token ``i`` of sample ``b`` is token ``positions[b, i]`` of the full layout
            (prefix tokens, then the row-major grid). ``None``: the full layout in order.
        mode: ``"hard"`` (out-of-window logits of masked heads are ``-inf``) or ``"soft"``
            (they are set to 0 before the softmax: the paper's Eq. 2).
        layer: Index of the attention layer this mask belongs to (for tools that record
            per-layer statistics); not part of the geometry.
    """

    grid: tuple[int, int]
    window: tuple[int, int]
    prefix_tokens: int
    num_heads: int
    heads: tuple[int, ...]
    prefix: str = "global"
    positions: Optional[torch.Tensor] = field(default=None, compare=False, repr=False)
    mode: str = "hard"
    layer: Optional[int] = field(default=None, compare=False)

    @property
    def full_tokens(self) -> int:
        """Prefix tokens plus every patch token of the grid."""
        return self.prefix_tokens + self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        """Tokens in the sequence: :attr:`full_tokens`, or the number of :attr:`positions`."""
        return self.full_tokens if self.positions is None else int(self.positions.shape[-1])

    @property
    def covers_grid(self) -> bool:
        """True when the window reaches every patch from every patch (the mask is a no-op)."""
        return (
            (self.prefix == "global" or self.prefix_tokens == 0)
            and self.window[0] >= 2 * self.grid[0] - 1
            and self.window[1] >= 2 * self.grid[1] - 1
        )

    @property
    def global_heads(self) -> tuple[int, ...]:
        """Indices of the heads that stay global."""
        return tuple(h for h in range(self.num_heads) if h not in self.heads)

    @property
    def is_identity(self) -> bool:
        """True when no head is restricted, so plain attention is exact."""
        return not self.heads or self.covers_grid

    def window_mod(self) -> MaskMod:
        """The head-agnostic local mask (what every masked head uses)."""
        return local_window(self.grid, self.window, self.prefix_tokens, self.prefix)

    def mask_mod(self, device=None) -> MaskMod:
        """The per-head mask: local on :attr:`heads`, everything allowed on the other heads."""
        head_is_local = torch.zeros(self.num_heads, dtype=torch.bool, device=device)
        head_is_local[list(self.heads)] = True
        window = self.window_mod()
        if self.positions is not None:
            window = at_positions(window, self.positions.to(device))
        return select_heads(window, head_is_local)

    def window_mask(self, device=None) -> torch.Tensor:
        """Dense boolean mask of a masked head: ``(N, N)``, cached per (geometry, device).

        With :attr:`positions`, the cached full-layout mask read at each sample's
        positions: ``(batch, 1, N, N)`` (built per call: positions change every forward).
        Under ``torch.compile`` the mask is built inside the graph instead (the cache is a
        Python side effect the compiler should not trace).
        """
        device = torch.device(device or "cpu")

        def build() -> torch.Tensor:
            return evaluate(self.window_mod(), 1, self.full_tokens, device)[0].contiguous()

        if torch.compiler.is_compiling():
            full = build()
        else:
            full = cached((self.grid, self.window, self.prefix_tokens, self.prefix, device), build)
        if self.positions is None:
            return full
        positions = self.positions.to(device)
        return full[positions[:, :, None], positions[:, None, :]].unsqueeze(1)

    def additive_mask(self, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """:meth:`window_mask` as an additive ``(N, N)`` mask: 0 where allowed, ``-inf`` elsewhere.

        This is the form fused SDPA kernels consume: a boolean mask is converted to it on
        every call, and a row stride that is not a multiple of 16 elements is padded with a
        copy on every call (the memory-efficient CUDA kernel's alignment). Built once per
        (geometry, dtype, device) in a buffer whose rows are padded to a multiple of 16; the
        returned tensor is the ``(N, N)`` view of it. Not for per-sample :attr:`positions`.
        """
        device = torch.device(device or "cpu")
        if self.positions is not None:
            raise ValueError("LocalMask.additive_mask does not support per-sample positions; use window_mask()")
        n = self.full_tokens

        def build() -> torch.Tensor:
            allowed = self.window_mask(device)
            padded = torch.zeros(n, -(-n // ALIGN) * ALIGN, dtype=dtype, device=device)
            padded[:, :n].masked_fill_(~allowed, float("-inf"))
            return padded[:, :n]

        if torch.compiler.is_compiling():
            return torch.zeros(n, n, dtype=dtype, device=device).masked_fill(~self.window_mask(device), float("-inf"))
        key = ("additive", self.grid, self.window, self.prefix_tokens, self.prefix, dtype, device)
        return cached(key, build)

    def head_additive_mask(self, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Additive mask of every head at once (hard mode's ``-inf``, whatever :attr:`mode`
        says): ``(1, num_heads, N, N)``, 0 everywhere on global heads and :meth:`additive_mask`
        on masked heads (rows padded to a multiple of
        16 elements). For running all heads in one SDPA call. Cached per (geometry, heads,
        dtype, device); not for per-sample :attr:`positions`."""
        device = torch.device(device or "cpu")
        if self.positions is not None:
            raise ValueError("LocalMask.head_additive_mask does not support per-sample positions; use window_mask()")
        n = self.full_tokens

        def build() -> torch.Tensor:
            padded = torch.zeros(self.num_heads, n, -(-n // ALIGN) * ALIGN, dtype=dtype, device=device)
            padded[list(self.heads), :, :n] = self.additive_mask(device, dtype)
            return padded[None, :, :, :n]

        if torch.compiler.is_compiling():
            return build()
        key = ("head-additive", self.grid, self.window, self.prefix_tokens, self.prefix, self.num_heads, self.heads, dtype, device)
        return cached(key, build)

    def forbidden(self, device=None) -> torch.Tensor:
        """``(num_heads, N, N)`` boolean: True where a masked head may not attend (global
        heads: all False). Cached per (geometry, heads, device), like :meth:`window_mask`;
        for host code that masks its own logits (:func:`mask_logits`)."""
        device = torch.device(device or "cpu")
        if self.positions is not None:
            raise ValueError("LocalMask.forbidden does not support per-sample positions; use window_mask()")

        def build() -> torch.Tensor:
            return ~evaluate(self.mask_mod(device), self.num_heads, self.num_tokens, device).contiguous()

        if torch.compiler.is_compiling():
            return build()
        key = ("forbidden", self.grid, self.window, self.prefix_tokens, self.prefix, self.num_heads, self.heads, device)
        return cached(key, build)

    def dense(self, device=None) -> torch.Tensor:
        """Dense mask of all heads (for tests and plots): ``(num_heads, N, N)``, or
        ``(batch, num_heads, N, N)`` with :attr:`positions`."""
        batch = None if self.positions is None else int(self.positions.shape[0])
        return evaluate(self.mask_mod(device), self.num_heads, self.num_tokens, device, batch)


def restrict(logits: torch.Tensor, allowed: torch.Tensor, mode: str = "hard") -> torch.Tensor:
    """The one definition of what a mask does to a masked head's logits.

    ``"hard"``: ``-inf`` where ``allowed`` is False. ``"soft"`` (the paper's Eq. 2,
    ``M * (q k^T) / sqrt(d)``): 0 there. Applied to the scaled ``q k^T`` logits *before* the
    host model's own mask or bias is added (the order matters only in soft mode).

    Args:
        logits: Scaled ``q k^T`` logits, broadcastable with ``allowed``.
        allowed: Boolean, True where the head may attend.
        mode: ``"hard"`` or ``"soft"``.
    """
    return logits.masked_fill(~allowed, masked_logit(mode))


def masked_logit(mode: str) -> float:
    """The value :func:`restrict` gives a forbidden logit: ``-inf`` (hard) or ``0.0`` (soft)."""
    if mode == "hard":
        return float("-inf")
    if mode == "soft":
        return 0.0
    raise ValueError(f"mode={mode!r} is not accepted: expected one of 'hard', 'soft'")


def mask_logits(logits: torch.Tensor, mask: LocalMask) -> torch.Tensor:
    """Set the logits that the masked heads may not use: ``-inf`` in hard mode, 0 in soft mode
    (:func:`restrict`, with ``mask.mode``).

    For host code that computes attention itself (CaiT's talking heads). In soft mode
    ``logits`` must be real logits (CaiT's head-mixed ones): 0 on an additive bias would not
    zero the logit it is added to.

    Args:
        logits: ``(..., num_heads, N, N)`` attention logits (or, hard mode only, additive bias).
        mask: The layer's mask for this geometry (no ``positions``).

    Returns:
        ``logits`` itself when the mask restricts nothing; else a tensor whose global heads
        hold exactly the values of ``logits`` (selected, not recomputed).
    """
    if mask.is_identity:
        return logits
    return logits.masked_fill(mask.forbidden(logits.device), masked_logit(mask.mode))


def combine_masks(attn_mask: Optional[torch.Tensor], local: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Add a boolean mask ``local`` (True = attend) to a host model's ``attn_mask``.

    A boolean host mask is and-ed; an additive float host mask gets ``-inf`` where ``local``
    forbids attention, so the host's values (e.g. a relative position bias) are kept.
    """
    if attn_mask is None:
        return local
    if attn_mask.dtype == torch.bool:
        return attn_mask & local
    return torch.where(local, attn_mask.to(dtype), float("-inf"))


_CACHE_SIZE = 64
_CACHE_BYTES = 1 << 30
"""Bounds of the mask cache: at most this many entries and this many bytes (1 GiB; one
dense fp32 mask at 4097 tokens is 67 MB). Least recently used entries go first."""
_cache: OrderedDict[tuple, tuple[Any, int]] = OrderedDict()
_cache_bytes = 0
_cache_lock = threading.Lock()


def nbytes(value: Any) -> int:
    """Bytes held by a cached value: tensors (their whole storage, so a view of a padded
    buffer counts the buffer), tuples and lists of them, objects holding tensors."""
    if isinstance(value, torch.Tensor):
        return value.untyped_storage().nbytes()
    if isinstance(value, (tuple, list)):
        return sum(nbytes(v) for v in value)
    fields = getattr(value, "__dict__", None)
    if fields is None and hasattr(value, "__dataclass_fields__"):
        fields = {name: getattr(value, name) for name in value.__dataclass_fields__}
    if fields:
        return sum(nbytes(v) for v in fields.values() if isinstance(v, (torch.Tensor, tuple, list)))
    return 0


def cached(key: tuple, build: Callable[[], Any]) -> Any:
    """Bounded LRU lookup shared by every mask form (dense, additive, block masks, blocked
    indices): ``build()`` only on a miss. Keys start with what they hold. Bounded in entries
    and in bytes (:func:`nbytes`); thread-safe (a miss may build twice, one copy is kept)."""
    global _cache_bytes
    with _cache_lock:
        entry = _cache.get(key)
        if entry is not None:
            _cache.move_to_end(key)
            return entry[0]
    value = build()
    size = nbytes(value)
    with _cache_lock:
        if key in _cache:
            return _cache[key][0]
        _cache[key] = (value, size)
        _cache_bytes += size
        while len(_cache) > 1 and (len(_cache) > _CACHE_SIZE or _cache_bytes > _CACHE_BYTES):
            _, (_, dropped) = _cache.popitem(last=False)
            _cache_bytes -= dropped
    return value


def cache_info() -> dict[str, int]:
    """Size of the mask cache (for tests and debugging)."""
    return {"entries": len(_cache), "max_entries": _CACHE_SIZE, "bytes": _cache_bytes, "max_bytes": _CACHE_BYTES}


def clear_cache() -> None:
    """Drop every cached mask."""
    global _cache_bytes
    with _cache_lock:
        _cache.clear()
        _cache_bytes = 0
