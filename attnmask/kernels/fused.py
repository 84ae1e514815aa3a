"""``backend="triton"``: a fused 2D-local attention kernel that visits only the window.

One Triton program takes a ``TH x TW`` tile of patch queries of one (batch, head) and visits
only the keys its windows can touch: the prefix tokens (one chunk), then the halo rows of
the tile, ``KH`` grid rows of ``KW`` patches per step (contiguous tokens in row-major order).
The window is computed in the kernel from token indices (no mask tensor is read), with the
same definition as every backend (:func:`attnmask.masks.local_window`: centred, clipped at
the border, prefix tokens global or isolated). Softmax is online, as in flash attention,
accumulated in float32 (float32 inputs multiply in full precision, not TF32); the row
log-sum-exp is saved for the backward pass.

Prefix-token queries attend to every token: in the same launch, one extra program per
(batch, head) computes their dense rows (keys in steps of :data:`BLOCK_N`). Global heads take
dense SDPA (:func:`~attnmask.kernels.common.split_heads_into`).

Backward, as in flash attention, from the saved log-sum-exp and ``rowsum(dO * O)``: one
launch computes dQ (per query tile over the same keys as the forward pass, and for the
prefix queries over every key); one computes dK and dV per tile of patch keys, from the
prefix queries and from the patch queries whose windows reach it (the window is symmetric,
so that is the same halo). The prefix keys' dK and dV (every query may reach them) are small
``(tokens x prefix)`` products in PyTorch.

What runs elsewhere (declared in :data:`BACKEND`'s capabilities, so ``auto`` never picks
this kernel for it): soft mode, a host mask or bias, dropout and per-sample positions run
:func:`~attnmask.kernels.blocked.blocked_attention`.

The Triton code lives in :mod:`attnmask.kernels.fused_triton`, imported on the first call
(``import attnmask`` does not import Triton); this module launches it, tunes it, and wraps it
for autograd. Without a CUDA device the kernel runs under Triton's interpreter when
``TRITON_INTERPRET=1`` is set before that first call (tests do this; small shapes only, slow).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from ..masks import LocalMask
from .capabilities import Backend, Capabilities
from .common import split_heads_into

_TRITON: dict[str, object] = {}
"""The Triton code (:mod:`attnmask.kernels.fused_triton`) once imported, or why it could not
be: imported on the first call, so that ``import attnmask`` does not import Triton."""


def _code():
    """:mod:`attnmask.kernels.fused_triton`, imported on first use (``RuntimeError`` naming
    why where Triton cannot be imported)."""
    if "module" not in _TRITON and "error" not in _TRITON:
        try:
            from . import fused_triton

            _TRITON["module"] = fused_triton
        except Exception as error:  # triton is optional: the backend refuses with the reason
            _TRITON["error"] = f"{type(error).__name__}: {error}"
    if "error" in _TRITON:
        raise RuntimeError(f"triton is not importable ({_TRITON['error']})")
    return _TRITON["module"]

TILE = (8, 8)
"""Query tile ``(rows, cols)`` of patches per program (64 queries)."""

KEYS_PER_STEP = 64
"""Keys a patch-query program loads per step (whole halo rows: ``KH`` rows of ``KW``
patches), fewer where the halo has fewer rows."""


def interpreted() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable(device: torch.device) -> Optional[str]:
    """Why the kernel cannot run on ``device`` here, or ``None``."""
    try:
        _code()
    except RuntimeError as error:
        return str(error)
    if device.type == "cuda" or (device.type == "cpu" and interpreted()):
        return None
    return f"it needs a CUDA device (or TRITON_INTERPRET=1 to check it on the CPU), got {device.type}"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int, least: int = 16) -> int:
    return max(least, 1 << (max(n, 1) - 1).bit_length())


def _tiles(mask: LocalMask, tile: tuple[int, int] = TILE) -> tuple[int, int, int, int]:
    """``(tile_h, tile_w, key_h, key_w)``: query tile (``tile`` clipped to the grid) and key
    step for this geometry."""
    (grid_h, grid_w), (window_h, window_w) = mask.grid, mask.window
    tile_h, tile_w = min(tile[0], _pow2(grid_h, 1)), min(tile[1], _pow2(grid_w, 1))
    while tile_h * tile_w < 16:  # tl.dot needs 16 rows
        tile_w *= 2
    key_w = _pow2(min(tile_w + 2 * (window_w // 2), grid_w), 1)
    halo_rows = _pow2(min(tile_h + 2 * (window_h // 2), grid_h), 1)
    key_h = max(16 // key_w, min(KEYS_PER_STEP // key_w, halo_rows), 1)  # at least 16 keys for tl.dot
    return tile_h, tile_w, key_h, key_w


TUNE_CANDIDATES: tuple[tuple[tuple[int, int], int], ...] = (
    ((8, 8), 4), ((8, 8), 8), ((8, 16), 4), ((8, 16), 8), ((16, 8), 4), ((16, 16), 8), ((4, 16), 4),
)
"""``(query tile, num_warps)`` pairs the tuner times on a GPU."""

TUNED: dict[tuple, tuple[tuple[int, int], int]] = {}
"""Cache of the tuner: ``(device, dtype, head dim, value dim, window, grid >= 64 x 64)``
-> the fastest ``(query tile, num_warps)``; filled on the first call of each key on a GPU."""


def _tune_key(q: torch.Tensor, v: torch.Tensor, mask: LocalMask) -> tuple:
    return q.device, q.dtype, q.shape[-1], v.shape[-1], mask.window, min(mask.grid) >= 64


def tuned_config(q: torch.Tensor, v: torch.Tensor, mask: LocalMask, run, timer=None) -> tuple[tuple[int, int], int]:
    """The ``(query tile, num_warps)`` for these tensors: on CUDA, each of
    :data:`TUNE_CANDIDATES` is timed once per key of :data:`TUNED` (``run(tile, warps)`` does
    one forward call; ``timer(fn) -> seconds``, CUDA events by default) and the fastest kept;
    elsewhere (Triton's interpreter) the default tile."""
    if q.device.type != "cuda" and timer is None:
        return TILE, 4
    key = _tune_key(q, v, mask)
    if key not in TUNED:
        timer = timer or _cuda_time
        best, best_s = (TILE, 4), float("inf")
        for tile, warps in TUNE_CANDIDATES:
            try:
                seconds = timer(lambda: run(tile, warps))
            except Exception:  # a configuration the device cannot compile (registers, shared memory)
                continue
            if seconds < best_s:
                best, best_s = (tile, warps), seconds
        TUNED[key] = best
    return TUNED[key]


def _cuda_time(fn, repeats: int = 5) -> float:
    fn()  # compile and warm up
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def _geometry(mask: LocalMask) -> tuple:
    (grid_h, grid_w), (window_h, window_w) = mask.grid, mask.window
    return mask.prefix_tokens, grid_h, grid_w, window_h // 2, window_w // 2


def _interpreter_bfloat16(*tensors: torch.Tensor) -> bool:
    # Triton's interpreter computes tl.dot of bfloat16 operands wrongly (numpy has no
    # bfloat16): the kernels' logic is checked in float32 there; GPUs run bfloat16 natively.
    return tensors[0].dtype == torch.bfloat16 and tensors[0].device.type == "cpu"


BLOCK_N = 64
"""Keys per step of the prefix queries' dense rows."""


def local_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: LocalMask, scale: float, out: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention of ``q, k, v`` with every head masked, in one kernel launch: one program
    per tile of patch queries, one per (batch, head) for the prefix queries.

    Returns:
        ``(out, lse)``: ``out`` ``(batch, heads, tokens, dim_v)`` (laid out as ``(batch,
        tokens, heads, dim_v)``, or the tensor given, any strides) and the row log-sum-exp
        ``(batch * heads, tokens)`` in float32 (float64 for float64 inputs).
    """
    batch, heads, tokens, dim = q.shape
    dim_v = v.shape[-1]
    if out is None:
        out = q.new_empty(batch, tokens, heads, dim_v).transpose(1, 2)
    if _interpreter_bfloat16(q):
        wide, lse = local_forward(q.float(), k.float(), v.float(), mask, scale)
        out.copy_(wide)
        return out, lse
    prefix, grid_h, grid_w, radius_h, radius_w = _geometry(mask)
    lse = torch.empty(batch * heads, tokens, device=q.device, dtype=torch.promote_types(q.dtype, torch.float32))

    def run(tile: tuple[int, int], warps: int) -> None:
        tile_h, tile_w, key_h, key_w = _tiles(mask, tile)
        patch_tiles = _cdiv(grid_h, tile_h) * _cdiv(grid_w, tile_w)
        _code()._local_forward[(patch_tiles + (prefix > 0), batch * heads)](
            q, k, v, out, lse,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            heads, prefix, grid_h, grid_w, radius_h, radius_w, float(scale), patch_tiles, tokens,
            PREFIX_GLOBAL=mask.prefix == "global" and prefix > 0, BLOCK_N=BLOCK_N,
            TH=tile_h, TW=tile_w, KH=key_h, KW=key_w,
            BLOCK_P=_pow2(prefix), BLOCK_D=_pow2(dim), BLOCK_DV=_pow2(dim_v),
            HEAD_DIM=dim, HEAD_DIM_V=dim_v, num_warps=warps,
        )

    run(*tuned_config(q, v, mask, run))
    return out, lse


def local_backward(q, k, v, out, lse, grad_out, mask: LocalMask, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of q, k, v from the output gradient ``grad_out`` ``(batch, heads, tokens,
    dim_v)``: two launches (dQ per query tile and for the prefix queries; dK/dV per patch-key
    tile), and the prefix keys' dK/dV, which every query may reach, as small ``(tokens x
    prefix)`` products in PyTorch."""
    if _interpreter_bfloat16(q):
        grads = local_backward(q.float(), k.float(), v.float(), out.float(), lse, grad_out.float(), mask, scale)
        return tuple(g.to(torch.bfloat16) for g in grads)
    batch, heads, tokens, dim = q.shape
    dim_v = v.shape[-1]
    prefix, grid_h, grid_w, radius_h, radius_w = _geometry(mask)
    tile, warps = TUNED.get(_tune_key(q, v, mask), (TILE, 4))  # the forward's choice
    tile_h, tile_w, key_h, key_w = _tiles(mask, tile)
    work = torch.promote_types(q.dtype, torch.float32)
    delta = (grad_out.to(work) * out.to(work)).sum(-1).reshape(batch * heads, tokens).contiguous()
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    patch_tiles = _cdiv(grid_h, tile_h) * _cdiv(grid_w, tile_w)
    shape = dict(TH=tile_h, TW=tile_w, KH=key_h, KW=key_w, BLOCK_P=_pow2(prefix), BLOCK_D=_pow2(dim),
                 BLOCK_DV=_pow2(dim_v), HEAD_DIM=dim, HEAD_DIM_V=dim_v, num_warps=warps)
    common = (heads, prefix, grid_h, grid_w, radius_h, radius_w, float(scale))
    global_prefix = mask.prefix == "global" and prefix > 0
    code = _code()
    code._local_backward_dq[(patch_tiles + (prefix > 0), batch * heads)](
        q, k, v, grad_out, lse, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(),
        *common, patch_tiles, tokens, PREFIX_GLOBAL=global_prefix, BLOCK_N=BLOCK_N, **shape,
    )
    code._local_backward_dkdv[(patch_tiles, batch * heads)](
        q, k, v, grad_out, lse, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(),
        *common, tokens, **shape,
    )
    if prefix:  # prefix keys: seen by the prefix queries, and by every patch query when global
        qs, kp, vp, go = q.to(work), k[:, :, :prefix].to(work), v[:, :, :prefix].to(work), grad_out.to(work)
        p = torch.exp(qs @ kp.transpose(-2, -1) * scale - lse.view(batch, heads, tokens, 1))
        if not global_prefix:
            p[:, :, prefix:] = 0.0
        dv[:, :, :prefix] = (p.transpose(-2, -1) @ go).to(dv.dtype)
        ds = p * (go @ vp.transpose(-2, -1) - delta.view(batch, heads, tokens, 1))
        dk[:, :, :prefix] = (ds.transpose(-2, -1) @ qs * scale).to(dk.dtype)
    return dq, dk, dv


class _LocalAttention(torch.autograd.Function):
    """Masked heads' attention, forward and backward fused in Triton."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale):
        out, lse = local_forward(q, k, v, mask, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask, ctx.scale = mask, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = local_backward(q, k, v, out, lse, grad_out, ctx.mask, ctx.scale)
        return dq, dk, dv, None, None


def triton_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: LocalMask,
    *,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Masked attention with the fused Triton kernel for the masked heads' patch queries.

    Args:
        q: Queries ``(batch, heads, tokens, head_dim)``, any strides.
        k: Keys, same shape as ``q``.
        v: Values ``(batch, heads, tokens, head_dim_v)``.
        mask: The layer's :class:`~attnmask.masks.LocalMask`.
        attn_mask: The host model's own mask; with one (as with dropout, soft mode or
            per-sample positions) :func:`~attnmask.kernels.blocked.blocked_attention` runs
            instead.
        dropout_p: Attention dropout (runs the blocked backend, see ``attn_mask``).
        scale: Softmax scale; ``None`` means ``head_dim ** -0.5``.

    Raises:
        RuntimeError: Triton cannot run on the tensors' device here (it names why).
    """
    if mask.is_identity:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
    if attn_mask is not None or dropout_p or mask.mode != "hard" or mask.positions is not None:
        from .blocked import blocked_attention

        return blocked_attention(q, k, v, mask, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
    why = unavailable(q.device)
    if why:
        raise RuntimeError(f"backend='triton' cannot run here: {why}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale

    def masked_heads(q_, k_, v_, host, out):
        out.copy_(_LocalAttention.apply(q_, k_, v_, mask, scale).transpose(1, 2))

    return split_heads_into(q, k, v, mask, attn_mask, masked_heads, dropout_p=dropout_p, scale=scale)


BACKEND = Backend(
    name="triton",
    run=triton_attention,
    capabilities=Capabilities(
        devices=("cuda",),
        dtypes=(torch.float16, torch.bfloat16, torch.float32),
        modes=("hard",),
        host_masks=False,
        positions=False,
        dropout=False,
    ),
    rows=(),  # not measured on a GPU yet: auto does not pick it
)
