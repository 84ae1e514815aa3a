"""``backend="triton"``: a fused 2D-local attention kernel that visits only the window.

One Triton program takes a ``TH x TW`` tile of patch queries of one (batch, head) and visits
only the keys its windows can touch: the prefix tokens (one chunk), then the halo rows of
the tile, ``KH`` grid rows of ``KW`` patches per step (contiguous tokens in row-major order).
The window is computed in the kernel from token indices (no mask tensor is read), with the
same definition as every backend (:func:`attnmask.masks.local_window`: centred, clipped at
the border, prefix tokens global or isolated). Softmax is online, as in flash attention,
accumulated in float32 (float32 inputs multiply in full precision, not TF32); the row
log-sum-exp is returned too, for a fused backward pass (not written yet).

Prefix-token queries attend to every token: they take one dense SDPA call, as do the global
heads (:func:`~attnmask.kernels.common.split_heads_into`).

What runs elsewhere (declared in :data:`BACKEND`'s capabilities, so ``auto`` never picks
this kernel for it): soft mode, a host mask or bias, dropout and per-sample positions run
:func:`~attnmask.kernels.blocked.blocked_attention`. The backward pass is, for now,
recomputation through the blocked backend's autograd (exact, not fused; see the
``backward`` note of :class:`_LocalAttention`).

Without a CUDA device the kernel runs under Triton's interpreter when ``TRITON_INTERPRET=1``
was set before :mod:`triton` was imported (tests do this; small shapes only, it is slow).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from ..masks import LocalMask
from .capabilities import Backend, Capabilities
from .common import split_heads_into

try:  # triton is optional: the backend then refuses with the reason
    import triton
    import triton.language as tl
except Exception as error:  # pragma: no cover - depends on the install
    triton = None
    _IMPORT_ERROR: Optional[str] = f"{type(error).__name__}: {error}"
else:
    _IMPORT_ERROR = None

TILE = (8, 8)
"""Query tile ``(rows, cols)`` of patches per program (64 queries)."""


def interpreted() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable(device: torch.device) -> Optional[str]:
    """Why the kernel cannot run on ``device`` here, or ``None``."""
    if triton is None:
        return f"triton is not importable ({_IMPORT_ERROR})"
    if device.type == "cuda" or (device.type == "cpu" and interpreted()):
        return None
    return f"it needs a CUDA device (or TRITON_INTERPRET=1 to check it on the CPU), got {device.type}"


if triton is not None:

    @triton.jit
    def _local_forward(
        Q, K, V, O, LSE,
        sqb, sqh, sqn, sqd,
        skb, skh, skn, skd,
        svb, svh, svn, svd,
        sob, soh, son, sod,
        heads, prefix, grid_h, grid_w, radius_h, radius_w, scale,
        PREFIX_GLOBAL: tl.constexpr,
        TH: tl.constexpr, TW: tl.constexpr,
        KH: tl.constexpr, KW: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    ):
        tile = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // heads
        h = bh % heads
        tiles_w = tl.cdiv(grid_w, TW)
        row0 = (tile // tiles_w) * TH
        col0 = (tile % tiles_w) * TW

        m_idx = tl.arange(0, TH * TW)
        q_row = row0 + m_idx // TW
        q_col = col0 + m_idx % TW
        q_ok = (q_row < grid_h) & (q_col < grid_w)
        q_tok = prefix + q_row * grid_w + q_col
        d = tl.arange(0, BLOCK_D)
        dv = tl.arange(0, BLOCK_DV)
        q = tl.load(
            Q + b * sqb + h * sqh + q_tok[:, None] * sqn + d[None, :] * sqd,
            mask=q_ok[:, None] & (d[None, :] < HEAD_DIM), other=0.0,
        )

        m_i = tl.full((TH * TW,), float("-inf"), tl.float32)
        l_i = tl.zeros((TH * TW,), tl.float32)
        acc = tl.zeros((TH * TW, BLOCK_DV), tl.float32)

        if PREFIX_GLOBAL:
            for start in range(0, prefix, BLOCK_P):
                n = start + tl.arange(0, BLOCK_P)
                n_ok = n < prefix
                k = tl.load(K + b * skb + h * skh + n[:, None] * skn + d[None, :] * skd,
                            mask=n_ok[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
                v = tl.load(V + b * svb + h * svh + n[:, None] * svn + dv[None, :] * svd,
                            mask=n_ok[:, None] & (dv[None, :] < HEAD_DIM_V), other=0.0)
                s = tl.dot(q, tl.trans(k), out_dtype=tl.float32, input_precision="ieee") * scale
                s = tl.where(n_ok[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.exp(s - m_safe[:, None])
                alpha = tl.exp(m_i - m_safe)
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, out_dtype=tl.float32, input_precision="ieee")
                m_i = m_new

        row_lo = tl.maximum(row0 - radius_h, 0)
        row_hi = tl.minimum(row0 + TH - 1 + radius_h, grid_h - 1)
        col_lo = tl.maximum(col0 - radius_w, 0)
        col_hi = tl.minimum(col0 + TW - 1 + radius_w, grid_w - 1)
        n_idx = tl.arange(0, KH * KW)
        for r in range(row_lo, row_hi + 1, KH):
            for c in range(col_lo, col_hi + 1, KW):
                k_row = r + n_idx // KW
                k_col = c + n_idx % KW
                k_ok = (k_row <= row_hi) & (k_col <= col_hi)
                k_tok = prefix + k_row * grid_w + k_col
                k = tl.load(K + b * skb + h * skh + k_tok[:, None] * skn + d[None, :] * skd,
                            mask=k_ok[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
                v = tl.load(V + b * svb + h * svh + k_tok[:, None] * svn + dv[None, :] * svd,
                            mask=k_ok[:, None] & (dv[None, :] < HEAD_DIM_V), other=0.0)
                s = tl.dot(q, tl.trans(k), out_dtype=tl.float32, input_precision="ieee") * scale
                near = (tl.abs(q_row[:, None] - k_row[None, :]) <= radius_h) & (
                    tl.abs(q_col[:, None] - k_col[None, :]) <= radius_w
                )
                s = tl.where(near & k_ok[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.exp(s - m_safe[:, None])
                alpha = tl.exp(m_i - m_safe)
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, out_dtype=tl.float32, input_precision="ieee")
                m_i = m_new

        l_i = tl.where(l_i == 0.0, 1.0, l_i)  # rows outside the grid (masked on store)
        out = acc / l_i[:, None]
        tl.store(O + b * sob + h * soh + q_tok[:, None] * son + dv[None, :] * sod,
                 out.to(O.dtype.element_ty), mask=q_ok[:, None] & (dv[None, :] < HEAD_DIM_V))
        tl.store(LSE + bh * (grid_h * grid_w) + q_row * grid_w + q_col, m_i + tl.log(l_i), mask=q_ok)


def _pow2(n: int, least: int = 16) -> int:
    return max(least, 1 << (max(n, 1) - 1).bit_length())


def patch_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: LocalMask, scale: float, out: torch.Tensor) -> torch.Tensor:
    """Write the patch queries' outputs of ``q, k, v`` (all heads masked) into ``out``
    ``(batch, heads, tokens, dim_v)`` (any strides); return the row log-sum-exp
    ``(batch * heads, patches)`` in float32."""
    if q.dtype == torch.bfloat16 and q.device.type == "cpu":
        # Triton's interpreter computes tl.dot of bfloat16 operands wrongly (numpy has no
        # bfloat16): check the kernel logic in float32 there; GPUs run bfloat16 natively.
        wide = out.new_empty(out.shape, dtype=torch.float32)
        lse = patch_forward(q.float(), k.float(), v.float(), mask, scale, wide)
        prefix = mask.prefix_tokens
        out[:, :, prefix:] = wide[:, :, prefix:].to(out.dtype)
        return lse
    batch, heads, _, dim = q.shape
    dim_v = v.shape[-1]
    (grid_h, grid_w), (window_h, window_w) = mask.grid, mask.window
    tile_h, tile_w = min(TILE[0], _pow2(grid_h, 1)), min(TILE[1], _pow2(grid_w, 1))
    while tile_h * tile_w < 16:  # tl.dot needs 16 rows
        tile_w *= 2
    radius_h, radius_w = window_h // 2, window_w // 2
    halo_w = min(tile_w + 2 * radius_w, grid_w)
    key_w = _pow2(halo_w, 1)
    key_h = max(1, 16 // key_w) if key_w < 16 else 1
    lse = torch.empty(batch * heads, grid_h * grid_w, device=q.device, dtype=torch.float32)
    tiles = triton.cdiv(grid_h, tile_h) * triton.cdiv(grid_w, tile_w)
    _local_forward[(tiles, batch * heads)](
        q, k, v, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        heads, mask.prefix_tokens, grid_h, grid_w, radius_h, radius_w, float(scale),
        PREFIX_GLOBAL=mask.prefix == "global" and mask.prefix_tokens > 0,
        TH=tile_h, TW=tile_w, KH=key_h, KW=key_w,
        BLOCK_P=_pow2(mask.prefix_tokens), BLOCK_D=_pow2(dim), BLOCK_DV=_pow2(dim_v),
        HEAD_DIM=dim, HEAD_DIM_V=dim_v,
    )
    return lse


class _LocalAttention(torch.autograd.Function):
    """Masked heads' attention (every head of ``q`` masked): prefix queries by dense SDPA,
    patch queries by the fused kernel.

    ``backward``: recomputes the same attention through
    :func:`~attnmask.kernels.blocked.blocked_attention` under autograd and returns its
    gradients (exact; a fused backward kernel is still to be written)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale):
        batch, heads, tokens, _ = q.shape
        out = q.new_empty(batch, tokens, heads, v.shape[-1]).transpose(1, 2)
        prefix = mask.prefix_tokens
        if prefix:
            out[:, :, :prefix] = F.scaled_dot_product_attention(q[:, :, :prefix], k, v, scale=scale)
        patch_forward(q, k, v, mask, scale, out)
        ctx.save_for_backward(q, k, v)
        ctx.mask, ctx.scale = mask, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from .blocked import blocked_attention

        q, k, v = ctx.saved_tensors
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_() for t in (q, k, v)]
            again = blocked_attention(*inputs, ctx.mask, scale=ctx.scale)
            grads = torch.autograd.grad(again, inputs, grad_out)
        return (*grads, None, None)


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
        attn_mask, dropout_p: A host mask, dropout, soft mode or per-sample positions run
            :func:`~attnmask.kernels.blocked.blocked_attention` instead.
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
