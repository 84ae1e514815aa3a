"""Masked attention that visits only the window: the blocked neighbourhood backend.

A masked head's patch query sees at most ``kh x kw`` patches plus the prefix tokens, yet
SDPA and FlexAttention still compute (or at least visit) every logit. This backend does only
the work the window keeps, with nothing but PyTorch operations:

1. The patch grid is split into ``bh x bw`` query *blocks* (the last block of a row or
   column is shifted inward, so every block has the same shape on any grid).
2. The queries of one block can only see the patches of its *halo*, the
   ``(bh + kh - 1) x (bw + kw - 1)`` patches their windows touch (also shifted inward at the
   border, so every halo has the same size), plus the prefix tokens.
3. Queries and halo keys/values are gathered with one ``index_select`` each over indices
   precomputed per geometry, and every block of every (batch, head) runs in ONE batched SDPA
   call, with the window restricting each query to its own neighbourhood inside the halo (a
   4-D ``(1, blocks, block queries, halo keys)`` mask: a 3-D one sends CPU SDPA to its slow
   math path).
4. Prefix-token queries attend to everything: one small dense SDPA call.
5. The block outputs are gathered back into token order (an ``index_select`` that also
   resolves the overlap of shifted blocks), written straight into the output layout.

The work per query is ``(bh + kh - 1)(bw + kw - 1) + prefix`` keys instead of ``N``: at 4097
tokens (64 x 64 patches) with a 7 x 7 window and 8 x 8 blocks, 197 instead of 4097.

Every index and mask comes from the same definition as the other backends: the block mask
is the layer's ``mask_mod`` (:meth:`~attnmask.masks.LocalMask.window_mod`) evaluated at the
gathered token indices, so backends agree by construction. Blockings are cached per
(geometry, block shape, device); their size is ``O(N x halo)``, never ``N x N``.

Soft mode (the paper's Eq. 2: forbidden logits are 0, so every key contributes) is exact here
too, without visiting the out-of-window keys: their logits are all 0, so together they add
``exp(0 - m) * (sum of all values - sum of the in-window values)`` to the numerator and
``exp(0 - m) * (N - in-window count)`` to the denominator. The block part is computed
explicitly (at least float32). Soft mode with a host mask or dropout (out-of-window keys no
longer share one logit) and per-sample positions fall back to :func:`~attnmask.kernels.sdpa.sdpa_attention`.

Backward is autograd through ``index_select`` and SDPA.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..masks import LocalMask, cache_by_id
from .capabilities import Backend, Capabilities, Measured
from .common import split_heads_into
from .sdpa import sdpa_attention

Block = tuple[int, int]


@dataclass(frozen=True)
class BlockRule:
    """One row of :data:`BLOCK_TABLE`: the query block for geometries it matches.

    Attributes:
        block: Query block ``(rows, cols)``.
        device: ``"cpu"``, ``"cuda"`` or ``None`` (any).
        min_side: Smallest grid side (rows and cols) the row applies to.
        max_window: Largest window side the row applies to.
        evidence: The measurement the row rests on.
    """

    block: Block
    device: Optional[str] = None
    min_side: int = 0
    max_window: Optional[int] = None
    evidence: str = ""

    def matches(self, grid: Block, window: Block, device: str) -> bool:
        return (
            (self.device is None or self.device == device)
            and min(grid) >= self.min_side
            and (self.max_window is None or max(window) <= self.max_window)
        )


CPU_EVIDENCE_BLOCKS = (
    "CPU (2-core AMD EPYC, torch 2.14.1, fp32, batch 1 (2 at 577 tokens), 12 heads x 64, 7x7 window, class "
    "token; benchmarks/results/blocked_sweep_cpu-amd-epyc.json), speed relative to dense SDPA with all heads "
    "masked, forward / forward+backward, for query blocks 8x8, 8x16, 16x16, 7x7, 4x8: 577 tokens 1.36/1.31, "
    "0.74/0.94, 0.48/0.57, 0.69/0.96, 0.96/1.12; 1025 tokens 1.88/1.72, 1.58/1.76, 1.27/1.44, 1.65/1.48, "
    "1.92/1.88; 2305 tokens 3.87/4.52, 4.14/3.80, 3.28/3.37, 3.74/3.77, 3.37/3.60; 4097 tokens 5.64/5.64, "
    "6.00/5.35, 4.49/4.44, 4.72/4.66, 5.80/5.05. 8x8 is best or within 7% of the best everywhere (cells vary "
    "5-15% run to run here). On a 2-core Intel Xeon (benchmarks/results/cpu-intel-r-xeon-r-processor.json), "
    "8x8 / 8x16 / 16x16, forward / forward+backward: 1025 tokens 1.54/1.72, 1.49/1.59, 1.24/1.35; 4097 tokens "
    "6.41/4.86, 5.65/5.30, 4.62/4.93. Not measured on GPUs."
)

BLOCK_TABLE: tuple[BlockRule, ...] = (BlockRule((8, 8), evidence=CPU_EVIDENCE_BLOCKS),)
"""Query block per geometry, first match wins; ``block=`` overrides it."""


def choose_block(grid: Block, window: Block, device: str) -> Block:
    """The query block :data:`BLOCK_TABLE` gives this geometry, clipped to the grid."""
    for rule in BLOCK_TABLE:
        if rule.matches(grid, window, device):
            block = rule.block
            break
    else:
        block = BLOCK_TABLE[-1].block
    return min(block[0], grid[0]), min(block[1], grid[1])


def _starts(size: int, block: int) -> list[int]:
    """Start of each block along one side; the last one shifted inward to stay inside."""
    return [min(start, size - block) for start in range(0, size, block)]


@dataclass(frozen=True)
class Blocking:
    """Index tensors of one geometry (see the module docstring).

    Attributes:
        queries: ``(blocks * block_tokens,)`` token index of each block query.
        keys: ``(blocks * halo_keys,)`` token index of each block key (halo patches, then the
            prefix tokens where patch queries may see them).
        owner: ``(patches,)`` position in ``queries`` whose output each patch token takes.
        allowed: ``(1, blocks, block_tokens, halo_keys)`` boolean window mask in block space.
    """

    queries: torch.Tensor
    keys: torch.Tensor
    owner: torch.Tensor
    allowed: torch.Tensor

    # size(), not .shape: under torch.compile(dynamic=True) dynamo cannot read the .shape of
    # a constant tensor (assume_constant_result's), while size() works.
    @property
    def blocks(self) -> int:
        return self.allowed.size(1)

    @property
    def block_tokens(self) -> int:
        return self.allowed.size(2)

    @property
    def halo_keys(self) -> int:
        return self.allowed.size(3)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.queries, self.keys, self.owner, self.allowed))


def build_blocking(mask: LocalMask, block: Block, device: torch.device) -> Blocking:
    """The :class:`Blocking` of ``mask``'s geometry with query blocks ``block`` (clipped to the grid)."""
    (height, width), (kh, kw), prefix_tokens = mask.grid, mask.window, mask.prefix_tokens
    bh, bw = min(block[0], height), min(block[1], width)
    hh, hw = min(bh + kh - 1, height), min(bw + kw - 1, width)  # halo, clipped to the grid
    rows, cols = _starts(height, bh), _starts(width, bw)
    grid_index = torch.arange(height * width).view(height, width) + prefix_tokens
    queries, keys = [], []
    for r in rows:
        for c in cols:
            queries.append(grid_index[r : r + bh, c : c + bw].reshape(-1))
            hr = min(max(r - kh // 2, 0), height - hh)
            hc = min(max(c - kw // 2, 0), width - hw)
            keys.append(grid_index[hr : hr + hh, hc : hc + hw].reshape(-1))
    query_index = torch.stack(queries)  # (blocks, bh * bw)
    key_index = torch.stack(keys)  # (blocks, hh * hw)
    if prefix_tokens and mask.prefix == "global":
        key_index = torch.cat([key_index, torch.arange(prefix_tokens).expand(len(keys), -1)], dim=1)
    # Each patch takes its output from the last block holding it (later blocks overwrite).
    owner = torch.empty(height * width, dtype=torch.long)
    owner[query_index.reshape(-1) - prefix_tokens] = torch.arange(query_index.numel())
    zero = torch.zeros((), dtype=torch.long)
    allowed = mask.window_mod()(zero, zero, query_index[:, :, None], key_index[:, None, :])
    return Blocking(
        queries=query_index.reshape(-1).to(device),
        keys=key_index.reshape(-1).to(device),
        owner=owner.to(device),
        allowed=allowed[None].contiguous().to(device),
    )


def blocking(mask: LocalMask, block: Block, device: torch.device) -> Blocking:
    """:func:`build_blocking`, cached per (geometry, block, device). Under ``torch.compile``
    the lookup runs once, at trace time, and its tensors become constants of the graph: a
    compiled forward builds nothing."""
    return Blocking(*_cached_tensors(mask.store.id, mask.grid, mask.window, mask.prefix_tokens, mask.prefix, block, str(device), None))


def additive_window(mask: LocalMask, block: Block, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The block-space window as an additive mask in ``dtype`` (0 / ``-inf``), cached like
    :func:`blocking`."""
    return _cached_tensors(mask.store.id, mask.grid, mask.window, mask.prefix_tokens, mask.prefix, block, str(device), dtype)[0]


@torch._dynamo.assume_constant_result
def _cached_tensors(
    cache_id: int,
    grid: Block, window: Block, prefix_tokens: int, prefix: str, block: Block, device: str, dtype: Optional[torch.dtype]
) -> tuple[torch.Tensor, ...]:
    """The tensors of a :class:`Blocking` (``dtype=None``) or its additive window (one
    tensor), from the mask cache with id ``cache_id`` (the installation's). Arguments are
    plain constants so that dynamo can run this at trace time (``assume_constant_result``)
    instead of tracing the cache."""
    cache = cache_by_id(cache_id)
    geometry = LocalMask(grid, window, prefix_tokens, 1, (0,), prefix)
    place = torch.device(device)
    layout = cache.get(("blocked", grid, window, prefix_tokens, prefix, block, place), lambda: build_blocking(geometry, block, place))
    if dtype is None:
        return (layout.queries, layout.keys, layout.owner, layout.allowed)

    def build() -> torch.Tensor:
        return torch.zeros(layout.allowed.shape, dtype=dtype, device=place).masked_fill(~layout.allowed, float("-inf"))

    return (cache.get(("blocked-additive", grid, window, prefix_tokens, prefix, block, dtype, place), build),)


def blocked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: LocalMask,
    *,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
    block: Optional[Block] = None,
) -> torch.Tensor:
    """Attention with the locality mask on the masked heads, visiting only each window.

    Global heads take dense SDPA exactly as in :func:`~attnmask.kernels.sdpa.sdpa_attention`
    (bit-for-bit the unpatched outputs); masked heads run the blocked method of the module
    docstring.

    Args:
        q: Queries ``(batch, heads, tokens, head_dim)``.
        k: Keys, same shape as ``q``.
        v: Values ``(batch, heads, tokens, head_dim_v)``.
        mask: The layer's :class:`~attnmask.masks.LocalMask` for this input size. Per-sample
            ``positions`` run :func:`~attnmask.kernels.sdpa.sdpa_attention` instead.
        attn_mask: The host model's own mask (boolean or additive), gathered into block
            space and combined with the window (hard mode). Soft mode with a host mask runs
            :func:`~attnmask.kernels.sdpa.sdpa_attention`.
        dropout_p: Attention dropout (hard mode; soft mode with dropout runs ``sdpa``).
        scale: Softmax scale; ``None`` means ``head_dim ** -0.5``.
        block: Query block ``(rows, cols)``; ``None``: :func:`choose_block` (from
            :data:`BLOCK_TABLE`). Clipped to the grid.

    Returns:
        ``(batch, heads, tokens, head_dim_v)``, laid out in memory as ``(batch, tokens, heads,
        head_dim_v)`` (the caller's head merge is a view).
    """
    if block is not None:
        block = _check_block(block)
    soft = mask.mode == "soft"
    if mask.is_identity:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
    if mask.positions is not None or (soft and (attn_mask is not None or dropout_p)):
        return sdpa_attention(q, k, v, mask, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
    chosen = choose_block(mask.grid, mask.window, q.device.type) if block is None else block
    chosen = (min(chosen[0], mask.grid[0]), min(chosen[1], mask.grid[1]))
    layout = blocking(mask, chosen, q.device)
    scale = q.shape[-1] ** -0.5 if scale is None else scale

    def masked_heads(q_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor, host: Optional[torch.Tensor], out: torch.Tensor) -> None:
        prefix_tokens = mask.prefix_tokens
        if prefix_tokens:  # prefix queries attend to every token
            host_rows = None if host is None else _expand_host(host, q_)[:, :, :prefix_tokens]
            out[:, :prefix_tokens] = F.scaled_dot_product_attention(
                q_[:, :, :prefix_tokens], k_, v_, attn_mask=host_rows, dropout_p=dropout_p, scale=scale
            ).transpose(1, 2)
        if soft:
            patches = _soft_blocks(q_, k_, v_, layout, scale)
        else:
            patches = _hard_blocks(q_, k_, v_, mask, layout, chosen, host, dropout_p, scale)
        _scatter(patches, out[:, prefix_tokens:], mask.grid, chosen, layout)

    return split_heads_into(q, k, v, mask, attn_mask, masked_heads, dropout_p=dropout_p, scale=scale)


def _scatter(patches: torch.Tensor, out: torch.Tensor, grid: Block, block: Block, layout: Blocking) -> None:
    """Write block outputs ``(batch, heads, blocks * block_tokens, dim)`` into ``out``
    ``(batch, patches, heads, dim)``, in token order. Blocks that tile the grid exactly are
    one strided copy; shifted (overlapping) blocks take each patch from its owner block."""
    (height, width), (bh, bw) = grid, block
    if height % bh or width % bw:
        out.copy_(patches.index_select(2, layout.owner).transpose(1, 2))
        return
    batch, heads, _, dim = patches.shape
    tiles = patches.view(batch, heads, height // bh, width // bw, bh, bw, dim).permute(0, 2, 4, 3, 5, 1, 6)
    out.view(batch, height // bh, bh, width // bw, bw, heads, dim).copy_(tiles)


def _check_block(block) -> Block:
    if (
        not isinstance(block, (tuple, list))
        or len(block) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    ):
        raise ValueError(f"block={block!r} is not accepted: expected a pair of positive ints (rows, cols)")
    return int(block[0]), int(block[1])


class _Workspace(threading.local):
    """The calling thread's reusable gather buffers (CPU inference), one flat buffer per role
    and (device, dtype, inference mode), grown to the largest call and then reused."""

    def __init__(self) -> None:
        self.buffers: dict[tuple, torch.Tensor] = {}


_workspace = _Workspace()


def release_workspace() -> None:
    """Free the calling thread's gather buffers (see :func:`workspace_bytes`)."""
    _workspace.buffers.clear()


def workspace_bytes() -> int:
    """Bytes the calling thread holds in gather buffers.

    On CPU, without gradients, the blocked backend gathers queries, keys and values into
    buffers it keeps per thread instead of allocating them on every call: glibc hands freed
    blocks of more than a few MB back to the system, and re-faulting those pages on every call
    measured up to 1.9x the time of the call itself at 1025-4097 tokens. The buffers hold the
    largest call seen (about ``(2 * halo_keys / block_tokens + 1) * batch * heads * tokens *
    head_dim`` elements); :func:`release_workspace` frees them.
    """
    return sum(buffer.numel() * buffer.element_size() for buffer in _workspace.buffers.values())


def _reuses_workspace(*tensors: torch.Tensor) -> bool:
    """Whether this call may gather into the thread's buffers: CPU, no tensor that autograd
    would save (a buffer overwritten by the next call must not be saved for backward), not
    while torch.compile traces (inductor plans its own buffers)."""
    if tensors[0].device.type != "cpu" or torch.compiler.is_compiling():
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def _buffer(role: str, like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    key = (role, like.device, like.dtype, torch.is_inference_mode_enabled())
    numel = math.prod(shape)
    flat = _workspace.buffers.get(key)
    if flat is None or flat.numel() < numel:
        _workspace.buffers.pop(key, None)  # free the old one before allocating the larger one
        flat = _workspace.buffers[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
    return flat[:numel].view(shape)


def _gather(t: torch.Tensor, index: torch.Tensor, blocks: int, role: Optional[str] = None) -> torch.Tensor:
    """``t[:, :, index]`` as ``(batch * heads, blocks, per_block, dim)``; with ``role``,
    written into the thread's buffer for that role (see :func:`workspace_bytes`)."""
    batch, heads, _, dim = t.shape
    if role is None:
        return t.index_select(2, index).view(batch * heads, blocks, -1, dim)
    out = _buffer(role, t, (batch, heads, index.numel(), dim))
    torch.index_select(t, 2, index, out=out)
    return out.view(batch * heads, blocks, -1, dim)


def _hard_blocks(q, k, v, mask: LocalMask, layout: Blocking, block: Block, host, dropout_p: float, scale: float) -> torch.Tensor:
    """Block outputs ``(batch, heads, blocks * block_tokens, dim_v)`` in hard mode."""
    batch, heads = q.shape[:2]
    reuse = _reuses_workspace(q, k, v)
    qb = _gather(q, layout.queries, layout.blocks, "q" if reuse else None)
    kb = _gather(k, layout.keys, layout.blocks, "k" if reuse else None)
    vb = _gather(v, layout.keys, layout.blocks, "v" if reuse else None)
    if host is None:
        window = additive_window(mask, block, q.dtype, q.device) if q.dtype.is_floating_point else layout.allowed
        out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=window, dropout_p=dropout_p, scale=scale)
    else:
        bias = _host_blocks(host, q, layout)  # (b, h, blocks, bq, keys)
        window = layout.allowed[:, None]  # (1, 1, blocks, bq, keys)
        if bias.dtype == torch.bool:
            combined = bias & window
        else:
            combined = bias.to(q.dtype).masked_fill(~window, float("-inf"))
        combined = combined.expand(batch, heads, -1, -1, -1).reshape(batch * heads, layout.blocks, layout.block_tokens, -1)
        out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=combined, dropout_p=dropout_p, scale=scale)
    return out.view(batch, heads, -1, v.shape[-1])


def _expand_host(host: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The host mask as a ``(b, h, N, N)`` view (batch and head dims may stay 1)."""
    while host.dim() < 4:
        host = host.unsqueeze(0)
    n = q.shape[-2]
    return host.expand(-1, -1, n, n)


def _host_blocks(host: torch.Tensor, q: torch.Tensor, layout: Blocking) -> torch.Tensor:
    """The host mask read in block space: ``(b, h, blocks, block_tokens, halo_keys)``."""
    full = _expand_host(host, q)
    rows = layout.queries.view(layout.blocks, -1, 1)
    cols = layout.keys.view(layout.blocks, 1, -1)
    return full[:, :, rows, cols]


def _soft_blocks(q, k, v, layout: Blocking, scale: float) -> torch.Tensor:
    """Block outputs in soft mode (no host mask, no dropout), exact: see the module docstring."""
    batch, heads, tokens, dim_v = *q.shape[:3], v.shape[-1]
    dtype = torch.promote_types(q.dtype, torch.float32)
    reuse = _reuses_workspace(q, k, v)
    qb = _gather(q, layout.queries, layout.blocks, "q" if reuse else None).to(dtype)
    kb = _gather(k, layout.keys, layout.blocks, "k" if reuse else None).to(dtype)
    vb = _gather(v, layout.keys, layout.blocks, "v" if reuse else None).to(dtype)
    allowed = layout.allowed
    logits = (qb @ kb.transpose(-2, -1)) * scale
    logits = logits.masked_fill(~allowed, float("-inf"))
    inside = allowed.sum(-1, keepdim=True)  # in-window keys per query
    outside = tokens - inside  # keys whose logit is 0
    peak = logits.amax(-1, keepdim=True)
    peak = torch.where(outside > 0, peak.clamp(min=0.0), peak).detach()
    weights = torch.exp(logits - peak)  # 0 outside the window
    rest = torch.exp(-peak)  # the weight of each out-of-window key
    total = v.to(dtype).sum(dim=2).view(batch * heads, 1, 1, dim_v)
    numerator = (weights - rest * allowed) @ vb + rest * total
    denominator = weights.sum(-1, keepdim=True) + rest * outside
    return (numerator / denominator).to(q.dtype).view(batch, heads, -1, dim_v)


CPU_EVIDENCE_HARD = (
    "CPU (2-core AMD EPYC, torch 2.14.1, fp32, 12 heads x 64, 7x7 window, class token, 8x8 query blocks; "
    "benchmarks/results/blocked_sweep_cpu-amd-epyc.json), speed relative to dense SDPA, half / all heads masked, "
    "forward: 577 tokens 0.91x / 1.36x (SDPA 0.84x / 0.94x), 1025 tokens 1.18x / 1.88x (SDPA 0.88x / 0.87x, "
    "FlexAttention 0.84x / 0.88x), 2305 tokens 1.53x / 3.87x (FlexAttention 1.10x / 1.49x), 4097 tokens "
    "1.63x / 5.64x (FlexAttention 1.32x / 2.35x); forward+backward: 577 tokens 1.16x / 1.31x (SDPA 0.94x / "
    "1.07x), 1025 tokens 1.23x / 1.72x, 2305 tokens 1.66x / 4.52x, 4097 tokens 1.40x / 5.64x (SDPA 0.91x / 0.98x). "
    "At 197 tokens one block covers the whole grid and the gathers are pure overhead (0.3x-0.6x of dense, "
    "SDPA 0.5x-1.0x): no row there. Rows give the half-masked speed (the lower one)."
)
CPU_EVIDENCE_SOFT = (
    "CPU, soft mode, as above (benchmarks/results/blocked_sweep_soft_cpu-amd-epyc.json): half / all heads "
    "masked, forward: 4097 tokens 1.12x / 1.46x dense, where SDPA's dense soft path reaches 0.28x / 0.16x; "
    "forward+backward 1.31x / 2.34x (SDPA 0.40x / 0.25x). At 577 and 1025 tokens the explicit block-space "
    "arithmetic loses to SDPA's soft path (0.13x-0.41x vs 0.28x-0.61x); 1026-4096 tokens are not measured "
    "and stay on SDPA."
)

def _cpu_fp32(speed: float, min_tokens: int, max_tokens: Optional[int], **conditions) -> Measured:
    return Measured("blocked", speed, device="cpu", dtypes=(torch.float32,), min_tokens=min_tokens, max_tokens=max_tokens, **conditions)


BACKEND = Backend(
    name="blocked",
    run=blocked_attention,
    # Per-sample positions, and soft mode with a host mask or dropout, run sdpa inside.
    capabilities=Capabilities(positions=False, soft_host_masks=False, soft_dropout=False),
    rows=(
        _cpu_fp32(0.91, 577, 1024, training=False, evidence=CPU_EVIDENCE_HARD),
        _cpu_fp32(1.16, 577, 1024, training=True, evidence=CPU_EVIDENCE_HARD),
        _cpu_fp32(1.18, 1025, None, training=False, evidence=CPU_EVIDENCE_HARD),
        _cpu_fp32(1.23, 1025, None, training=True, evidence=CPU_EVIDENCE_HARD),
        _cpu_fp32(1.12, 4097, None, training=False, evidence=CPU_EVIDENCE_SOFT, modes=("soft",)),
        _cpu_fp32(1.31, 4097, None, training=True, evidence=CPU_EVIDENCE_SOFT, modes=("soft",)),
    ),
)
