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

import itertools
import threading
import weakref
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
        cache: The :class:`MaskCache` its dense forms are kept in (its installation's);
            ``None``: :data:`DEFAULT_CACHE`. Not part of the geometry.
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
    cache: Optional["MaskCache"] = field(default=None, compare=False, repr=False)

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

    @property
    def store(self) -> "MaskCache":
        """The cache this mask's forms are kept in: its installation's, else :data:`DEFAULT_CACHE`."""
        return self.cache if self.cache is not None else DEFAULT_CACHE

    def _form(self, form: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """One cached form of this mask (see :func:`_build_form`). While ``torch.compile``
        traces, the lookup runs once at trace time and its result becomes a constant of the
        graph, so a compiled forward neither builds a mask nor touches the cache."""
        if torch.compiler.is_compiling():
            return _constant_form(
                self.store.id, form, self.grid, self.window, self.prefix_tokens, self.prefix,
                self.num_heads, self.heads, str(device), dtype,
            )
        return _build_form(self, form, device, dtype)

    def window_mask(self, device=None) -> torch.Tensor:
        """Dense boolean mask of a masked head: ``(N, N)``, cached per (geometry, device).

        With :attr:`positions`, the cached full-layout mask read at each sample's
        positions: ``(batch, 1, N, N)`` (gathered per call: positions change every forward).
        """
        device = torch.device(device or "cpu")
        full = self._form("window", device)
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
        if self.positions is not None:
            raise ValueError("LocalMask.additive_mask does not support per-sample positions; use window_mask()")
        return self._form("additive", torch.device(device or "cpu"), dtype)

    def head_additive_mask(self, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Additive mask of every head at once (hard mode's ``-inf``, whatever :attr:`mode`
        says): ``(1, num_heads, N, N)``, 0 everywhere on global heads and :meth:`additive_mask`
        on masked heads (rows padded to a multiple of
        16 elements). For running all heads in one SDPA call. Cached per (geometry, heads,
        dtype, device); not for per-sample :attr:`positions`."""
        if self.positions is not None:
            raise ValueError("LocalMask.head_additive_mask does not support per-sample positions; use window_mask()")
        return self._form("head-additive", torch.device(device or "cpu"), dtype)

    def forbidden(self, device=None) -> torch.Tensor:
        """``(num_heads, N, N)`` boolean: True where a masked head may not attend (global
        heads: all False). Cached per (geometry, heads, device), like :meth:`window_mask`;
        for host code that masks its own logits (:func:`mask_logits`)."""
        if self.positions is not None:
            raise ValueError("LocalMask.forbidden does not support per-sample positions; use window_mask()")
        return self._form("forbidden", torch.device(device or "cpu"))

    def dense(self, device=None) -> torch.Tensor:
        """Dense mask of all heads (for tests and plots): ``(num_heads, N, N)``, or
        ``(batch, num_heads, N, N)`` with :attr:`positions`."""
        batch = None if self.positions is None else int(self.positions.shape[0])
        return evaluate(self.mask_mod(device), self.num_heads, self.num_tokens, device, batch)


def _build_form(mask: LocalMask, form: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Look up (building on a miss) one dense form of ``mask`` in its cache:

    - ``"window"``: ``(N, N)`` boolean, True where a masked head may attend;
    - ``"additive"``: ``(N, N)`` in ``dtype``, 0 / ``-inf``, rows padded to :data:`ALIGN`;
    - ``"head-additive"``: ``(1, num_heads, N, N)``, :meth:`~LocalMask.additive_mask` on the
      masked heads, 0 on the others (padded rows);
    - ``"forbidden"``: ``(num_heads, N, N)`` boolean, True where a head may not attend.
    """
    n = mask.full_tokens
    geometry = (mask.grid, mask.window, mask.prefix_tokens, mask.prefix)
    heads = (mask.num_heads, mask.heads)
    if form == "window":
        return mask.store.get(("window", *geometry, device), lambda: evaluate(mask.window_mod(), 1, n, device)[0].contiguous())
    if form == "additive":

        def additive() -> torch.Tensor:
            padded = torch.zeros(n, -(-n // ALIGN) * ALIGN, dtype=dtype, device=device)
            # The boolean window is evaluated, not cached: only the form SDPA reads is kept.
            padded[:, :n].masked_fill_(~evaluate(mask.window_mod(), 1, n, device)[0], float("-inf"))
            return padded[:, :n]

        return mask.store.get(("additive", *geometry, dtype, device), additive)
    if form == "head-additive":

        def head_additive() -> torch.Tensor:
            padded = torch.zeros(mask.num_heads, n, -(-n // ALIGN) * ALIGN, dtype=dtype, device=device)
            padded[list(mask.heads), :, :n] = _build_form(mask, "additive", device, dtype)
            return padded[None, :, :, :n]

        return mask.store.get(("head-additive", *geometry, *heads, dtype, device), head_additive)
    if form == "forbidden":

        def forbidden() -> torch.Tensor:
            return ~evaluate(mask.mask_mod(device), mask.num_heads, n, device).contiguous()

        return mask.store.get(("forbidden", *geometry, *heads, device), forbidden)
    raise ValueError(f"form={form!r} is not a mask form: expected 'window', 'additive', 'head-additive' or 'forbidden'")


@torch._dynamo.assume_constant_result
def _constant_form(
    cache_id: int,
    form: str,
    grid: tuple[int, int],
    window: tuple[int, int],
    prefix_tokens: int,
    prefix: str,
    num_heads: int,
    heads: tuple[int, ...],
    device: str,
    dtype: Optional[torch.dtype],
) -> torch.Tensor:
    """:func:`_build_form` from plain constants, for ``torch.compile``: dynamo runs this at
    trace time (``assume_constant_result``) and puts its result in the graph as a constant,
    instead of tracing the cache (a lock and a dict) or building the mask in the graph."""
    mask = LocalMask(grid, window, prefix_tokens, num_heads, heads, prefix, cache=cache_by_id(cache_id))
    return _build_form(mask, form, torch.device(device), dtype)


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


DEFAULT_CACHE_BYTES = 512 << 20
"""Default byte bound of a :class:`MaskCache` (512 MiB). One dense fp32 additive mask at
4097 tokens (ViT-B/16 at 1024 px) is 67 MB; the per-head one-call mask of 12 heads in bf16
is 404 MB."""


class MaskCache:
    """Masks of one installation (one :func:`attnmask.apply`), built once per geometry.

    A bounded LRU map from keys (what a mask is: its form, geometry, dtype, device) to built
    masks, guarded by a lock so that threads running the model share it safely, and bounded
    in bytes (:func:`nbytes`), not entries: least recently used entries go first, and a
    value larger than the whole bound is returned without being kept. Every patched layer
    of a model shares its installation's cache; :func:`attnmask.remove` drops it with the
    installation. Masks made outside an installation (a :class:`LocalMask` built by hand)
    use :data:`DEFAULT_CACHE`.

    Under ``torch.compile`` masks are looked up once, at trace time, and become constants of
    the compiled graph (:meth:`LocalMask.additive_mask`); the graph then holds them for as
    long as it lives, whatever this cache later drops.

    Copies (``copy.deepcopy`` of a patched model, pickling) get a new, empty cache.

    Args:
        max_bytes: Byte bound (default :data:`DEFAULT_CACHE_BYTES`).
    """

    _ids = itertools.count()

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.max_bytes = int(max_bytes)
        self.id = next(MaskCache._ids)
        self._entries: OrderedDict[tuple, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._peak = 0
        self._lock = threading.Lock()
        _CACHES[self.id] = self

    def __reduce__(self):
        return (MaskCache, (self.max_bytes,))

    def get(self, key: tuple, build: Callable[[], Any]) -> Any:
        """The value cached under ``key``, or ``build()``'s (kept when it fits the bound).

        A miss builds outside the lock (two threads missing at once may both build; one copy
        is kept and both get equal values)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry[0]
        value = build()
        size = nbytes(value)
        with self._lock:
            if key in self._entries:
                return self._entries[key][0]
            if size > self.max_bytes:
                return value
            self._entries[key] = (value, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, dropped) = self._entries.popitem(last=False)
                self._bytes -= dropped
            self._peak = max(self._peak, self._bytes)
        return value

    def info(self) -> dict[str, int]:
        """``entries``, ``bytes`` held now, ``peak_bytes`` (the most held at once) and ``max_bytes``."""
        with self._lock:
            return {"entries": len(self._entries), "bytes": self._bytes, "peak_bytes": self._peak, "max_bytes": self.max_bytes}

    def clear(self) -> None:
        """Drop every entry (the peak is kept)."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0


_CACHES: "weakref.WeakValueDictionary[int, MaskCache]" = weakref.WeakValueDictionary()
"""Every live cache by :attr:`MaskCache.id`: compiled code refers to a cache by its id (a
constant), not by the object."""

DEFAULT_CACHE = MaskCache()
"""The cache of masks made outside an installation."""


def cache_by_id(cache_id: int) -> MaskCache:
    """The live cache with this id (:data:`DEFAULT_CACHE` if it is gone)."""
    return _CACHES.get(cache_id, DEFAULT_CACHE)


def cached(key: tuple, build: Callable[[], Any], cache: Optional[MaskCache] = None) -> Any:
    """``cache.get(key, build)`` (:data:`DEFAULT_CACHE` when ``cache`` is ``None``)."""
    return (cache or DEFAULT_CACHE).get(key, build)


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


def cache_info(cache: Optional[MaskCache] = None) -> dict[str, int]:
    """:meth:`MaskCache.info` of ``cache`` (default: :data:`DEFAULT_CACHE`; an installed
    model's cache is :func:`attnmask.mask_cache`)."""
    return (cache or DEFAULT_CACHE).info()


def clear_cache(cache: Optional[MaskCache] = None) -> None:
    """Drop every mask of ``cache`` (default: :data:`DEFAULT_CACHE`)."""
    (cache or DEFAULT_CACHE).clear()
