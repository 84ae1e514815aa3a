"""Masked attention on FlexAttention: block-sparse, so a local head skips the key blocks
its queries cannot see.

The block mask comes from the same ``mask_mod`` as every other backend
(:meth:`~attnmask.masks.LocalMask.window_mod`), built once per geometry and cached. Only the
masked heads go through FlexAttention; global heads take SDPA's dense (flash) path, as in
:func:`~attnmask.kernels.sdpa.sdpa_attention`. One compiled ``flex_attention`` serves every
layer: layers of one model share shapes, so it compiles once per input shape, not per layer.

Two knobs change how much work the block mask can skip (:data:`FLEX_VARIANTS`):

- ``block_size``: the square block of the block mask (128 is FlexAttention's default; 64
  gives finer sparsity at the price of more, smaller tiles).
- ``order``: ``"rows"`` keeps the host's token order (prefix tokens, then patches row by
  row). ``"tiles"`` reorders the patches into 2D tiles of one block each (8 x 16 for 128, 8 x
  8 for 64) with the prefix tokens last, so a query block's window touches few key blocks
  and the always-visible prefix tokens share one small block; q, k, v are gathered into that
  order and the output is gathered back.

Soft mode (``mask.mode == "soft"``, the paper's Eq. 2) has no sparsity to exploit: every key
contributes. Its masked heads run FlexAttention without a block mask, in the host's token
order (``block_size`` and ``order`` are ignored), with a ``score_mod`` that sets the scores
of forbidden keys to 0 (the ``score`` FlexAttention hands a ``score_mod`` is already scaled)
and then adds the host's mask. It is exact, but no faster than dense attention; ``"auto"``
runs soft mode on SDPA.

FlexAttention has no backward on CPU (torch says so when asked); use ``"sdpa"`` to train on
CPU. Dropout is not supported by FlexAttention.
"""

from __future__ import annotations

import functools
import threading
import warnings
from typing import Callable, Optional

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention as _flex_attention

from ..masks import LocalMask, MaskMod, at_positions, cache_by_id
from .capabilities import Backend, Capabilities, Measured
from .common import split_heads

ORDERS = ("rows", "tiles")
"""Token orders the flex kernel can run in (see the module docstring)."""

BLOCK_SIZES = (64, 128)
"""Block sizes the flex kernel accepts."""

FLEX_VARIANTS: dict[str, dict] = {
    f"flex-b{size}-{order}": {"block_size": size, "order": order} for size in (128, 64) for order in ORDERS
}
"""Labelled settings of :func:`flex_attention`, for the benchmarks."""

CPU_COMPILED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""Dtypes of the compiled FlexAttention kernel on CPU (torch's CPU lowering has no float64)."""

DEFAULT_BLOCK_SIZE = 128
DEFAULT_ORDER = "rows"

_TILE = {128: (8, 16), 64: (8, 8)}


def flex_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: LocalMask,
    *,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    order: str = DEFAULT_ORDER,
    compiled: Optional[bool] = None,
) -> torch.Tensor:
    """Attention with the locality mask on the masked heads, through FlexAttention.

    Args:
        q: Queries ``(batch, heads, tokens, head_dim)``.
        k: Keys, same shape as ``q``.
        v: Values ``(batch, heads, tokens, head_dim_v)``.
        mask: The layer's :class:`~attnmask.masks.LocalMask` for this input size. With
            per-sample ``positions`` the block mask is built per call (it changes every
            forward) and ``order`` is ignored. In soft mode (``mask.mode``) there is no block
            mask and ``block_size`` and ``order`` are ignored (see the module docstring).
        attn_mask: The host model's own mask (boolean, or additive such as a relative
            position bias), added to the masked heads' scores through a ``score_mod``.
        dropout_p: Must be 0 (FlexAttention has no dropout).
        scale: Softmax scale; ``None`` means ``head_dim ** -0.5``.
        block_size: 128 or 64, see the module docstring.
        order: ``"rows"`` or ``"tiles"``, see the module docstring.
        compiled: Run the ``torch.compile``-d FlexAttention (the fused kernel). ``None``:
            yes, unless already inside a compiled region (which compiles it itself) or on
            CPU in a dtype the CPU kernel lacks (float64). ``False`` runs FlexAttention's
            unfused eager implementation (exact but slow; for tests and float64).

    Raises:
        ValueError: For ``dropout_p > 0``, an unknown ``block_size`` or ``order``, or
            gradients on CPU.
    """
    if dropout_p:
        raise ValueError(
            f"dropout_p={dropout_p!r} is not accepted by backend='flex': FlexAttention has no dropout "
            "(use backend='sdpa' or 'auto' while attention dropout is on)"
        )
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size={block_size!r} is not accepted: expected one of {BLOCK_SIZES}")
    if order not in ORDERS:
        raise ValueError(f"order={order!r} is not accepted: expected one of {ORDERS}")
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ValueError(
            "backend='flex' cannot train on CPU: FlexAttention has no backward on CPU "
            "(use backend='sdpa' or 'auto', or run under torch.no_grad() / inference_mode())"
        )
    if mask.is_identity:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    if compiled is None:
        compiled = not torch.compiler.is_compiling() and (q.device.type != "cpu" or q.dtype in CPU_COMPILED_DTYPES)
    soft = mask.mode == "soft"
    if mask.positions is not None or soft:
        order = "rows"

    def masked_heads(q_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor, host: Optional[torch.Tensor]) -> torch.Tensor:
        orders = token_order(mask, order, block_size, q_.device)
        perm = None if orders is None else orders[0]
        if perm is not None:
            q_, k_, v_ = (t.index_select(2, perm) for t in (q_, k_, v_))
        score_mod = None if host is None else host_score_mod(host, q_.dtype, perm, q_.shape[-2])
        if soft:  # dense: every key contributes, so a block mask would skip nothing
            blocks = None
            score_mod = soft_score_mod(window_mod(mask, q_.device), score_mod)
        else:
            blocks = block_mask(mask, block_size, order, q_.device, perm)
        arguments = dict(score_mod=score_mod, block_mask=blocks, scale=scale)
        if blocks is not None and q_.is_cuda and block_size != DEFAULT_BLOCK_SIZE:
            # The CUDA kernel's tiles must divide the block mask's blocks (its default is 128).
            arguments["kernel_options"] = {"BLOCK_M": block_size, "BLOCK_N": block_size}
        if torch.compiler.is_compiling():
            out = _flex_attention(q_, k_, v_, **arguments)
        elif not compiled:
            with warnings.catch_warnings():  # chosen on purpose (float64 / compiled=False)
                warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
                out = _flex_attention(q_, k_, v_, **arguments)
        else:
            out = _run_compiled(q_, k_, v_, arguments)
        if orders is not None:
            out = out.index_select(2, orders[1])
        return out

    return split_heads(q, k, v, mask, attn_mask, masked_heads, scale=scale)


RECOMPILE_LIMIT = 64
"""Compilations of FlexAttention allowed per process before torch falls back to its eager
implementation. torch's default, 8, is shared by every caller of ``flex_attention``, and a
few models with a few input sizes, block sizes and token orders exceed it; the first
compiled flex call raises ``torch._dynamo.config.recompile_limit`` (a process-wide setting,
for every compiled function) to at least this, and never lowers it."""

_limit_lock = threading.Lock()
_limit_raised = False


def _raise_recompile_limit() -> None:
    """Raise torch's per-function recompile limit to at least :data:`RECOMPILE_LIMIT`, once
    per process and never lowered (a set-and-restore around each call is not thread-safe:
    a concurrent call could restore the old limit mid-compilation). A user's higher limit is
    kept."""
    global _limit_raised
    with _limit_lock:
        if _limit_raised:
            return
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
        _limit_raised = True


def _run_compiled(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arguments: dict) -> torch.Tensor:
    """Call the compiled FlexAttention (raising the recompile limit on first use)."""
    if not _limit_raised:
        _raise_recompile_limit()
    return _compiled_flex()(q, k, v, **arguments)


@functools.lru_cache(maxsize=None)
def _compiled_flex() -> Callable[..., torch.Tensor]:
    """The one compiled FlexAttention every layer shares (compiled lazily, on first use).

    Layers of a model share shapes, so they share its compiled code: one compilation per
    input shape (batch size, grid), never per layer. Static shapes on purpose: a kernel
    specialised to its sizes is the fast one, and torch 2.14's CPU lowering of FlexAttention
    with symbolic sizes fails to build. Past :data:`RECOMPILE_LIMIT` compilations torch falls
    back to the eager implementation (correct, slow) and warns.
    """
    return torch.compile(_flex_attention, dynamic=False)


def tile_order(grid: tuple[int, int], prefix_tokens: int, tile: tuple[int, int]) -> torch.Tensor:
    """Token permutation for ``order="tiles"``: ``perm[new] = old``.

    Patches are sorted by (tile row, tile column, row in tile, column in tile), then the
    prefix tokens follow. Tiles at the right and bottom edges may be partial.
    """
    height, width = grid
    rows = torch.arange(height)[:, None].expand(height, width)
    cols = torch.arange(width)[None, :].expand(height, width)
    tiles_across = -(-width // tile[1])
    key = ((rows // tile[0]) * tiles_across + cols // tile[1]) * (tile[0] * tile[1]) + (rows % tile[0]) * tile[1] + cols % tile[1]
    patches = torch.argsort(key.reshape(-1), stable=True) + prefix_tokens
    return torch.cat([patches, torch.arange(prefix_tokens)])


def inverse(perm: torch.Tensor) -> torch.Tensor:
    """The inverse permutation: ``inverse(perm)[perm[i]] = i``."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def token_order(
    mask: LocalMask, order: str, block_size: int, device: torch.device
) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """The permutation the masked heads run in and its inverse, or ``None`` for the host's
    own order. Cached per (grid, prefix tokens, block size, device)."""
    if order == "rows" or mask.positions is not None:
        return None
    if torch.compiler.is_compiling():
        return _constant_order(mask.store.id, mask.grid, mask.prefix_tokens, block_size, str(device))
    return _cached_order(mask, block_size, device)


def _cached_order(mask: LocalMask, block_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    def build() -> tuple[torch.Tensor, torch.Tensor]:
        perm = tile_order(mask.grid, mask.prefix_tokens, _TILE[block_size]).to(device)
        return perm, inverse(perm)

    return mask.store.get(("flex-order", mask.grid, mask.prefix_tokens, block_size, device), build)


@torch._dynamo.assume_constant_result
def _constant_order(
    cache_id: int, grid: tuple[int, int], prefix_tokens: int, block_size: int, device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_cached_order` from constants, run by dynamo at trace time (its result is a
    constant of the compiled graph)."""
    geometry = LocalMask(grid, (1, 1), prefix_tokens, 1, (0,), cache=cache_by_id(cache_id))
    return _cached_order(geometry, block_size, torch.device(device))


def block_mask(
    mask: LocalMask, block_size: int, order: str, device: torch.device, perm: Optional[torch.Tensor] = None
) -> BlockMask:
    """The FlexAttention block mask of a masked head (shared by all masked heads and samples).

    Cached per (geometry, block size, order, device) in the mask's cache; built per call for
    per-sample ``positions``. Inside compiled regions the cached block tensors are constants
    of the graph. ``perm`` is the token order of ``order``
    (from :func:`token_order`), ``None`` for the host's order.
    """
    num_tokens = mask.num_tokens
    if mask.positions is not None:
        mask_mod = window_mod(mask, device)
        return create_block_mask(mask_mod, int(mask.positions.shape[0]), None, num_tokens, num_tokens, device, block_size)
    if torch.compiler.is_compiling():
        # The block-level tensors (key and query sides) are looked up once, at trace time, and
        # are constants of the graph: a compiled forward builds nothing of the block mask.
        # (Not BlockMask.from_kv_blocks: its transposes, run in the graph on constants, fail to
        # trace in torch 2.14's dynamo, and would be per-forward work besides.)
        tensors = _constant_blocks(
            mask.store.id, mask.grid, mask.window, mask.prefix_tokens, mask.prefix, block_size, order, str(device)
        )
        return BlockMask(
            seq_lengths=(num_tokens, num_tokens),
            **dict(zip(BLOCK_FIELDS, tensors)),
            BLOCK_SIZE=(block_size, block_size),
            mask_mod=_order_mod(mask, perm),
        )
    return _cached_block_mask(mask, block_size, order, device, perm)


def _order_mod(mask: LocalMask, perm: Optional[torch.Tensor]) -> MaskMod:
    mask_mod: MaskMod = mask.window_mod()
    return mask_mod if perm is None else _permuted(mask_mod, perm)


def _cached_block_mask(
    mask: LocalMask, block_size: int, order: str, device: torch.device, perm: Optional[torch.Tensor]
) -> BlockMask:
    num_tokens = mask.num_tokens

    def build() -> BlockMask:
        return create_block_mask(_order_mod(mask, perm), None, None, num_tokens, num_tokens, device, block_size)

    key = ("flex-blocks", mask.grid, mask.window, mask.prefix_tokens, mask.prefix, block_size, order, device)
    return mask.store.get(key, build)


BLOCK_FIELDS = (
    "kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
    "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices",
)
"""The tensors of a :class:`BlockMask` (its constructor's argument names)."""


@torch._dynamo.assume_constant_result
def _constant_blocks(
    cache_id: int,
    grid: tuple[int, int],
    window: tuple[int, int],
    prefix_tokens: int,
    prefix: str,
    block_size: int,
    order: str,
    device: str,
) -> tuple[torch.Tensor, ...]:
    """The tensors of :func:`_cached_block_mask`'s block mask (:data:`BLOCK_FIELDS`), from
    constants: run by dynamo at trace time, the result is a constant of the compiled graph."""
    place = torch.device(device)
    geometry = LocalMask(grid, window, prefix_tokens, 1, (0,), prefix, cache=cache_by_id(cache_id))
    orders = None if order == "rows" else _cached_order(geometry, block_size, place)
    blocks = _cached_block_mask(geometry, block_size, order, place, None if orders is None else orders[0])
    return tuple(getattr(blocks, name) for name in BLOCK_FIELDS)


def window_mod(mask: LocalMask, device: torch.device) -> MaskMod:
    """The window ``mask_mod`` of a masked head, read at per-sample ``positions`` if any."""
    if mask.positions is None:
        return mask.window_mod()
    return at_positions(mask.window_mod(), mask.positions.to(device))


def soft_score_mod(window: MaskMod, host: Optional[Callable] = None) -> Callable:
    """A soft-mode ``score_mod``: the (already scaled) score where ``window`` allows
    attention, 0 elsewhere (:func:`~attnmask.masks.restrict` in ``"soft"`` mode), then
    ``host`` (a ``score_mod`` adding the host's mask) if given."""

    def soft_window(score, b, h, q_idx, kv_idx):
        score = torch.where(window(b, h, q_idx, kv_idx), score, torch.zeros_like(score))
        return score if host is None else host(score, b, h, q_idx, kv_idx)

    return soft_window


def _permuted(mask_mod: MaskMod, perm: torch.Tensor) -> MaskMod:
    """``mask_mod`` for tokens stored in the order ``perm`` (``perm[new] = old``)."""

    def permuted_mask(b, h, q_idx, kv_idx):
        return mask_mod(b, h, perm[q_idx], perm[kv_idx])

    return permuted_mask


def host_score_mod(host: torch.Tensor, dtype: torch.dtype, perm: Optional[torch.Tensor], num_tokens: int) -> Callable:
    """A ``score_mod`` adding the host model's mask (``-inf`` where a boolean mask forbids).

    ``host`` broadcasts to ``(batch, heads, tokens, tokens)``: batch and head dimensions of
    size 1 are read at index 0, query and key dimensions of size 1 are expanded (a view). With a token permutation, scores are read at the host's own indices.
    """
    bias = host if host.dtype != torch.bool else torch.zeros(host.shape, dtype=dtype, device=host.device).masked_fill(~host, float("-inf"))
    while bias.dim() < 4:
        bias = bias.unsqueeze(0)
    bias = bias.to(dtype)
    per_batch, per_head = bias.shape[0] > 1, bias.shape[1] > 1
    bias = bias.expand(-1, -1, num_tokens, num_tokens)  # (B, 1, 1, N) key masks and the like: a view

    def host_bias(score, b, h, q_idx, kv_idx):
        if perm is not None:
            q_idx, kv_idx = perm[q_idx], perm[kv_idx]
        return score + bias[b if per_batch else 0, h if per_head else 0, q_idx, kv_idx]

    return host_bias


CPU_EVIDENCE_FLEX = (
    "CPU (2-core AMD EPYC, 2 threads, torch 2.14.1, fp32, batch 1, 12 heads x 64, 7x7 window, forward; "
    "benchmarks/results/cpu-amd-epyc.json), speed relative to dense SDPA, half / all heads masked: compiled "
    "FlexAttention with 64-blocks 1.17x / 1.43x at 2305 tokens and 1.40x / 2.16x at 4097, against 0.90x / "
    "0.88x and 0.93x / 0.88x for the SDPA kernel; 128-blocks 0.98x / 0.97x and 1.32x / 1.72x. At 1025 "
    "tokens and below FlexAttention lost (0.91x / 0.78x against SDPA's 1.05x / 0.90x). Whole timm "
    "ViT-B/16 at 1024 px, inference: auto 1.18x the unpatched throughput, sdpa 0.99x. No backward on CPU."
)
CUDA_EVIDENCE_FLEX = (
    "H100, bf16, torch 2.11, 12 heads x 64, 7x7 window, class token, forward "
    "(benchmarks/results/gpu_probe_h100.json; ratio to dense flash SDPA, per call / back to back): "
    "1025 tokens, half the heads masked: FlexAttention with 64-token blocks 0.82x / 0.68x, SDPA split "
    "0.76x / 0.63x, 128-token blocks 0.56x / 0.51x; 4097 tokens, half: 0.85x / 0.91x vs SDPA 0.77x / 0.71x; "
    "all: 0.92x / 1.22x vs 0.73x / 0.62x. Whole timm ViT-B/16 at 1024 px, half the heads masked: 0.966x "
    "the unpatched throughput with 64-token blocks, SDPA split 0.823x, 128-token blocks 0.840x; with "
    "this row, auto 0.96x vs sdpa 0.86x (benchmarks/results/nvidia-h100-80gb-hbm3-auto.json). Not "
    "below 4097 tokens: at 512 px (1025 tokens) 64-token blocks gave 0.68x the unpatched ViT-B/16 "
    "against SDPA's 0.90x, although the attention-level probe favoured them; 1026-4096 tokens are "
    "not measured and stay on SDPA."
)
CUDA_EVIDENCE_FLEX_TRAIN = (
    "H100, bf16, torch 2.11, forward+backward (benchmarks/results/nvidia-h100-80gb-hbm3.json): 4097 "
    "tokens, FlexAttention (128-token blocks) 0.71x / 0.99x dense with half / all heads masked, SDPA 0.60x / "
    "0.56x; at 1025 tokens SDPA wins (0.49x / 0.65x vs 0.45x / 0.56x). ViT-B/16 training step at 1024 px: "
    "flex 0.87x the unpatched model, sdpa 0.80x (benchmarks/results/h100-logs/call1-device_check.log)."
)

BACKEND = Backend(
    name="flex",
    run=flex_attention,
    # No CPU backward in torch; no dropout; gradients through a host bias captured by the
    # score_mod are neither measured nor tested on CUDA. Per-sample positions build a block
    # mask per forward (never measured to pay off).
    capabilities=Capabilities(
        backward=("cuda",), dropout=False, soft_dropout=False, host_masks_in_training=False, positions=False
    ),
    rows=(
        Measured(
            "flex",
            speed=1.17,
            device="cpu",
            dtypes=(torch.float32,),
            min_tokens=2305,
            training=False,
            options=(("block_size", 64),),
            evidence=CPU_EVIDENCE_FLEX,
        ),
        Measured(
            "flex",
            speed=0.85,
            device="cuda",
            dtypes=(torch.bfloat16, torch.float16),
            min_tokens=4097,
            training=False,
            options=(("block_size", 64),),
            evidence=CUDA_EVIDENCE_FLEX,
        ),
        Measured("flex", speed=0.71, device="cuda", min_tokens=4097, training=True, evidence=CUDA_EVIDENCE_FLEX_TRAIN),
    ),
)
