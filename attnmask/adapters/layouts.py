"""Where a model's tokens sit: the one description every adapter shares.

A sequence an attention layer sees is laid out as

    [prefix tokens][patch grid, row-major][suffix tokens]

per attention call, where a call may cover one host *window* of the image (Swin, SAM-ViT,
MaxViT, NesT, ...) instead of the whole grid. Prefix tokens are class, distillation and
register tokens; suffix tokens are tokens appended after the patches (YOLOS's detection
tokens). Some models keep a per-sample subset of patches (ViTMAE's random masking, timm's
patch dropout): then each token's position in the full layout is given per sample.

- :class:`PatchLayout`: prefix tokens, then the grid of the latest forward, read from the
  patch embedding's output by a forward hook (``(B, D, h, w)`` or ``(B, h, w, D)``).
- :class:`KeptPatches`: the per-sample kept patches of the latest forward.
- :class:`WindowLayout`: one square window per call, no prefix (Swin).
- :class:`TokenGeometry` and :func:`resolve_geometry`: the layout of one call learned at run
  time from the shapes the host produces (see :mod:`attnmask.adapters.generic`).
- :func:`pooled_allowed`: the locality rule when keys sit on a coarser grid than queries.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from ..masks import LocalMask, kept_positions
from ..spec import LayerPlan

Grid = tuple[int, int]


def pair(value) -> Grid:
    """``7`` or ``(7, 7)`` -> ``(7, 7)`` (config sizes come as either)."""
    if isinstance(value, (tuple, list)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


def _grid_error(num_tokens: int, prefix_tokens: int, tried: str) -> ValueError:
    return ValueError(
        f"attnmask: a sequence of {num_tokens} tokens does not fit the patch grid "
        f"({prefix_tokens} prefix tokens + a {tried} grid); feed images through the "
        "model's patch embedding so the grid of each input is known"
    )


_UNSET = object()


class PerThread:
    """One value per thread: what the latest forward *of this thread* recorded, so threads
    running one model at different image sizes never read each other's grid.

    With ``fallback`` (grids), a thread that has recorded nothing reads the latest value
    recorded by any thread. Such a thread is typically recomputing a forward rather than
    serving images of its own: activation checkpointing reruns checkpointed blocks during
    backward, and on CUDA the backward runs on autograd's own device thread, which never ran
    the patch embedding. It then gets the grid of the *latest* forward, which is the one it
    recomputes in the usual one-forward-one-backward step (not when several forwards at
    different sizes run before one backward). A grid read this way is still checked against
    the token count. Without ``fallback`` (per-sample kept patches, which belong to
    particular samples), such a thread reads ``None``. Before any forward, the value is
    ``None``. Copies and pickles start empty (the values belong to forwards of this process).
    """

    def __init__(self, fallback: bool = True) -> None:
        self._local = threading.local()
        self._latest = None
        self.fallback = fallback

    def __reduce__(self):
        return (PerThread, (self.fallback,))

    def get(self):
        value = getattr(self._local, "value", _UNSET)
        if value is _UNSET:
            return self._latest if self.fallback else None
        return value

    def set(self, value) -> None:
        self._local.value = value
        self._latest = value


class PatchLayout:
    """Prefix tokens, then the row-major patch grid of the latest forward.

    Registered as a forward hook on the patch embedding, whose 4-D output gives the grid of
    each input: ``(B, D, h, w)`` (a convolution) or, with ``channels_last``, ``(B, h, w, D)``
    (timm's ``dynamic_img_size`` patch embedding). ``kept``: the model keeps a per-sample
    subset of patches (:class:`KeptPatches`). ``static_grid`` (the configured image
    size over the patch size) is used when no forward has run or the token count does not
    fit the latest grid. The grid is never guessed from the token count (which cannot tell
    8 x 16 from 16 x 8), only checked against it.
    """

    def __init__(
        self,
        prefix_tokens: int,
        static_grid: "nn.Module | Grid",
        channels_last: bool = False,
        kept: Optional["KeptPatches"] = None,
    ) -> None:
        self.prefix_tokens = prefix_tokens
        self.kept = kept
        self._static = static_grid  # a grid, or a patch embedding with a ``grid_size``
        self.channels_last = channels_last
        self._last = PerThread()

    @property
    def last_grid(self) -> Optional[Grid]:
        """The grid of this thread's latest forward (a thread without one: the latest of any
        thread; ``None`` before the first forward)."""
        return self._last.get()

    def __call__(self, module: nn.Module, args, output) -> None:
        if isinstance(output, torch.Tensor) and output.dim() == 4:
            self._last.set((output.shape[1], output.shape[2]) if self.channels_last else (output.shape[-2], output.shape[-1]))

    @property
    def static_grid(self) -> Grid:
        grid = self._static.grid_size if isinstance(self._static, nn.Module) else self._static
        return int(grid[0]), int(grid[1])

    @property
    def grid(self) -> Grid:
        return self.last_grid or self.static_grid

    def grid_for(self, num_tokens: int) -> Grid:
        """The grid of a sequence of ``num_tokens`` tokens: the latest, else the configured one."""
        patches = num_tokens - self.prefix_tokens
        for grid in (self.last_grid, self.static_grid):
            if grid is not None and grid[0] * grid[1] == patches:
                return grid
        static, last = self.static_grid, self.last_grid
        tried = f"{static[0]}x{static[1]}" + (f" or {last[0]}x{last[1]}" if last is not None and last != static else "")
        raise _grid_error(num_tokens, self.prefix_tokens, tried)

    def mask(self, plan: LayerPlan, batch: int, num_tokens: int, kept: Optional["KeptPatches"] = None) -> LocalMask:
        """The layer's mask for a sequence of ``num_tokens`` tokens; with ``kept`` patches
        (per-sample subsets), read at each kept patch's true grid position."""
        kept = kept if kept is not None else self.kept
        keep = kept.keep if kept is not None else None
        count = num_tokens - self.prefix_tokens
        if keep is not None and kept.required and 0 <= count <= keep.shape[-1]:
            keep = keep[:, :count]  # a whole shuffle: the sequence holds its first ``count`` patches
        if keep is not None and keep.shape[0] == batch and keep.shape[-1] == count:
            return plan.local_mask(self.grid, self.prefix_tokens, kept_positions(keep, self.prefix_tokens))
        if kept is not None and kept.required:
            raise ValueError(
                f"attnmask: cannot place the {num_tokens} tokens of this layer on the {self.grid[0]}x{self.grid[1]} "
                "grid: run the model (or its embeddings) on the images first"
            )
        return plan.local_mask(self.grid_for(num_tokens), self.prefix_tokens)


class KeptPatches:
    """Forward hook recording which patches each sample kept in the latest forward.

    ``keep`` is ``(batch, kept)`` indices into the row-major grid, in sequence order, or
    ``None`` when every patch was kept. ``read`` turns the hooked module's output into those
    indices: timm's ``patch_drop`` returns ``(tokens, keep_indices)``; ViTMAE's embeddings
    return ``(embeddings, mask, ids_restore)`` and ``argsort(ids_restore)`` is the shuffle
    (see :meth:`from_ids_restore`). ``required``: every sequence is a kept subset (ViTMAE),
    and ``keep`` is then the whole shuffle, of which a sequence holds the first patches.
    """

    def __init__(self, read: Callable[[object], Optional[torch.Tensor]], required: bool = False) -> None:
        self.read = read
        self.required = required
        self._keep = PerThread(fallback=False)  # per-sample indices: never another forward's

    @property
    def keep(self) -> Optional[torch.Tensor]:
        """The kept patches of this thread's latest forward (see :class:`PerThread`)."""
        return self._keep.get()

    def __call__(self, module: nn.Module, args, output) -> None:
        keep = self.read(output)
        self._keep.set(keep if isinstance(keep, torch.Tensor) else None)

    @classmethod
    def from_patch_drop(cls) -> "KeptPatches":
        return cls(lambda out: out[1] if isinstance(out, tuple) and len(out) == 2 else None)

    @classmethod
    def from_ids_restore(cls) -> "KeptPatches":
        def read(out):
            if isinstance(out, (tuple, list)) and len(out) >= 3 and isinstance(out[-1], torch.Tensor):
                return torch.argsort(out[-1], dim=1)
            return None

        return cls(read, required=True)


class WindowLayout:
    """Swin: each attention call sees the tokens of one square window, row-major, no prefix."""

    prefix_tokens = 0

    def __init__(self, window_size: int) -> None:
        self.window_size = window_size
        self._last = PerThread()

    @property
    def last_grid(self) -> Optional[Grid]:
        return self._last.get()

    @property
    def grid(self) -> Grid:
        return self.last_grid or (self.window_size, self.window_size)

    def mask(self, plan: LayerPlan, batch: int, num_tokens: int, kept=None) -> LocalMask:
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            raise ValueError(f"attnmask: a window of {num_tokens} tokens is not square")
        self._last.set((side, side))
        return plan.local_mask((side, side), 0)


# -- layouts learned at run time ----------------------------------------------------------

MAX_EXTRA_TOKENS = 16
"""Most non-patch tokens a sequence may hold besides its grid (class + registers + ...)."""


@dataclass(frozen=True)
class TokenGeometry:
    """The layout of one attention call, learned from run-time shapes.

    Attributes:
        grid: ``(h, w)`` of the patches the call sees (a host window's own grid when
            ``windows > 1``).
        prefix: Tokens before the patches.
        suffix: Tokens after the patches.
        windows: Attention calls per image batch (host windows folded into the batch).
        source: Where the grid came from (for reports), e.g. ``"the layer's 4-D input"``.
    """

    grid: Grid
    prefix: int = 0
    suffix: int = 0
    windows: int = 1
    source: str = ""

    @property
    def tokens(self) -> int:
        return self.prefix + self.grid[0] * self.grid[1] + self.suffix

    def positions(self, batch: int, device) -> Optional[torch.Tensor]:
        """:attr:`LocalMask.positions` for a layout with suffix tokens (``None`` without):
        the mask's full layout puts prefix and suffix tokens first, then the grid."""
        if not self.suffix:
            return None
        p, s, n = self.prefix, self.suffix, self.grid[0] * self.grid[1]
        order = torch.cat(
            [torch.arange(p), torch.arange(n) + p + s, torch.arange(s) + p]
        ).to(device)
        return order.expand(batch, -1)

    def local_mask(self, plan: LayerPlan, batch: int, device) -> LocalMask:
        return plan.local_mask(self.grid, self.prefix + self.suffix, self.positions(batch, device))


def grid_candidates(shape: Sequence[int]) -> list[Grid]:
    """The grids a 4-D feature map of ``shape`` may hold: ``(B, C, h, w)`` and ``(B, h, w, C)``
    (images, with 4 channels or fewer, hold no token grid)."""
    if len(shape) != 4:
        return []
    if shape[1] <= 4 and shape[2] > 4 and shape[3] > 4:
        return []  # an image (4 channels or fewer), not a feature map
    out = []
    if shape[1] > 4:
        out.append((int(shape[2]), int(shape[3])))
    if shape[3] > 4:
        out.append((int(shape[1]), int(shape[2])))
    return out


def scaled_grids(grid: Grid, limit: int = 64) -> Iterable[Grid]:
    """Grids of feature maps derived from ``grid`` by an integer stride (floor and ceil)."""
    for stride in range(1, limit + 1):
        yield (-(-grid[0] // stride), -(-grid[1] // stride))
        yield (grid[0] // stride, grid[1] // stride)


def resolve_geometry(
    num_tokens: int,
    candidates: Iterable[tuple[Grid, str]],
    *,
    windows: int = 1,
    prefix_hint: Optional[int] = None,
    suffix: int = 0,
    max_extra: int = MAX_EXTRA_TOKENS,
) -> Optional[TokenGeometry]:
    """The first candidate grid that the token count fits.

    A candidate fits when ``num_tokens - h * w - suffix`` prefix tokens remain, between 0
    and ``max_extra`` (0 for host windows: windows hold patches only). A candidate whose extra
    count equals ``prefix_hint`` (the model's declared prefix tokens) wins over earlier ones.
    ``suffix`` of the extra tokens come after the patches, the rest before.
    """
    fits: list[TokenGeometry] = []
    for grid, source in candidates:
        h, w = grid
        if h <= 0 or w <= 0:
            continue
        extra = num_tokens - h * w
        if extra < suffix or extra - suffix > (0 if windows > 1 else max_extra):
            continue
        geometry = TokenGeometry((h, w), extra - suffix, suffix, windows, source)
        if prefix_hint is not None and extra - suffix == prefix_hint:
            return geometry
        fits.append(geometry)
    if fits:
        return fits[0]
    if windows > 1:
        side = math.isqrt(num_tokens)
        if side * side == num_tokens:
            return TokenGeometry((side, side), 0, 0, windows, "a square host window")
    return None


def pooled_allowed(
    q_grid: Grid, k_grid: Grid, window: Grid, q_prefix: int, k_prefix: int, prefix: str, device=None
) -> torch.Tensor:
    """``(Nq, Nk)`` boolean mask of a masked head whose keys sit on another grid than its queries.

    Pooled attention (keys or queries on a coarser grid: PVT, Twins, SAM2's Hiera, ...)
    covers the same image with both grids. A query patch's window is the ``kh x kw`` block of
    *query* patches centred on it, as an image region; a key may be attended when its cell
    overlaps that region. On equal grids this is exactly the usual window. Prefix tokens
    follow ``prefix`` as in :func:`attnmask.masks.local_window`.
    """
    (hq, wq), (hk, wk) = q_grid, k_grid
    rh, rw = window[0] // 2, window[1] // 2

    def overlap(q_idx: torch.Tensor, k_idx: torch.Tensor, nq: int, nk: int, radius: int) -> torch.Tensor:
        # key cell [k/nk, (k+1)/nk) meets [(q-r)/nq, (q+r+1)/nq)
        return (k_idx * nq < (q_idx + radius + 1) * nk) & ((k_idx + 1) * nq > (q_idx - radius) * nk)

    qi = torch.arange(hq * wq, device=device)
    ki = torch.arange(hk * wk, device=device)
    near = overlap(qi[:, None] // wq, ki[None, :] // wk, hq, hk, rh) & overlap(qi[:, None] % wq, ki[None, :] % wk, wq, wk, rw)
    allowed = torch.ones(q_prefix + hq * wq, k_prefix + hk * wk, dtype=torch.bool, device=device)
    allowed[q_prefix:, k_prefix:] = near
    if prefix != "global":
        allowed[q_prefix:, :k_prefix] = False
    return allowed


@dataclass(frozen=True)
class PooledMask:
    """The mask of one call whose keys sit on another grid than its queries (for recorders
    that accept it, e.g. :func:`attnmask.coverage.check_model`; see :func:`pooled_allowed`).

    Mirrors the parts of :class:`~attnmask.masks.LocalMask` a recorder reads: ``grid`` and
    ``prefix_tokens`` are the queries', ``key_grid`` and ``key_prefix`` the keys'.
    """

    grid: Grid
    key_grid: Grid
    window: Grid
    prefix_tokens: int
    key_prefix: int
    num_heads: int
    heads: tuple[int, ...]
    prefix: str = "global"
    layer: Optional[int] = None
    positions: None = None

    @property
    def global_heads(self) -> tuple[int, ...]:
        return tuple(h for h in range(self.num_heads) if h not in self.heads)

    def dense(self, device=None) -> torch.Tensor:
        """``(num_heads, Nq, Nk)`` boolean: True where a head may attend."""
        allowed = pooled_allowed(self.grid, self.key_grid, self.window, self.prefix_tokens, self.key_prefix, self.prefix, device)
        out = torch.ones(self.num_heads, *allowed.shape, dtype=torch.bool, device=device)
        out[list(self.heads)] = allowed
        return out
