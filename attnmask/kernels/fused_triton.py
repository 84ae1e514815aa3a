"""The Triton code of ``backend="triton"``: jit kernels and their helpers, nothing else.

Imported by :mod:`attnmask.kernels.fused` on the first call (``import attnmask`` does not
import Triton). Read :mod:`attnmask.kernels.fused` for what the kernels compute; this module
is their code: the forward launch (tiles of patch queries, one program per (batch, head) for
the prefix queries), dQ, and dK/dV per tile of patch keys.
"""

import triton
import triton.language as tl


@triton.jit
def _rows(PTR, b, h, sb, sh, sn, sd, rows, ok, cols, LIMIT: tl.constexpr):
    """Rows ``rows`` (where ``ok``) of one (batch, head) slice, columns ``cols`` below
    ``LIMIT``: a ``(len(rows), len(cols))`` block, zeros elsewhere."""
    return tl.load(PTR + b * sb + h * sh + rows[:, None] * sn + cols[None, :] * sd,
                   mask=ok[:, None] & (cols[None, :] < LIMIT), other=0.0)

@triton.jit
def _put_rows(PTR, b, h, sb, sh, sn, sd, rows, ok, cols, LIMIT: tl.constexpr, value):
    tl.store(PTR + b * sb + h * sh + rows[:, None] * sn + cols[None, :] * sd,
             value.to(PTR.dtype.element_ty), mask=ok[:, None] & (cols[None, :] < LIMIT))

@triton.jit
def _softmax_step(q, k, v, allowed, m_i, l_i, acc, scale):
    """One step of the online softmax over the keys ``k`` (values ``v``) where ``allowed``."""
    s = tl.dot(q, tl.trans(k), out_dtype=tl.float32, input_precision="ieee") * scale
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, out_dtype=tl.float32, input_precision="ieee")
    return m_new, l_i, acc

@triton.jit
def _dq_step(q, k, v, do, lse, delta, allowed, dq, scale):
    """dQ (unscaled) from the keys ``k`` where ``allowed``: dS = P * (dO V^T - delta)."""
    s = tl.dot(q, tl.trans(k), out_dtype=tl.float32, input_precision="ieee") * scale
    p = tl.where(allowed, tl.exp(s - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), out_dtype=tl.float32, input_precision="ieee")
    return dq + tl.dot((p * (dp - delta[:, None])).to(k.dtype), k, out_dtype=tl.float32, input_precision="ieee")

@triton.jit
def _dkdv_step(k, v, q, do, lse, delta, allowed_t, dk, dvv, scale):
    """dK (unscaled) and dV of the keys ``k`` from the queries ``q`` where ``allowed_t``
    (keys x queries)."""
    pt = tl.where(allowed_t, tl.exp(tl.dot(k, tl.trans(q), out_dtype=tl.float32, input_precision="ieee") * scale - lse[None, :]), 0.0)
    dvv += tl.dot(pt.to(do.dtype), do, out_dtype=tl.float32, input_precision="ieee")
    dpt = tl.dot(v, tl.trans(do), out_dtype=tl.float32, input_precision="ieee")
    dk += tl.dot((pt * (dpt - delta[None, :])).to(q.dtype), q, out_dtype=tl.float32, input_precision="ieee")
    return dk, dvv

@triton.jit
def _tile_coords(tile, grid_h, grid_w, prefix, TH: tl.constexpr, TW: tl.constexpr):
    """Row, column, token index and validity of the patches of query/key tile ``tile``."""
    tiles_w = tl.cdiv(grid_w, TW)
    idx = tl.arange(0, TH * TW)
    row = (tile // tiles_w) * TH + idx // TW
    col = (tile % tiles_w) * TW + idx % TW
    return row, col, prefix + row * grid_w + col, (row < grid_h) & (col < grid_w)

@triton.jit
def _halo(tile, grid_h, grid_w, radius_h, radius_w, TH: tl.constexpr, TW: tl.constexpr):
    """First and last grid row and column the windows of tile ``tile`` touch."""
    tiles_w = tl.cdiv(grid_w, TW)
    row0 = (tile // tiles_w) * TH
    col0 = (tile % tiles_w) * TW
    return (tl.maximum(row0 - radius_h, 0), tl.minimum(row0 + TH - 1 + radius_h, grid_h - 1),
            tl.maximum(col0 - radius_w, 0), tl.minimum(col0 + TW - 1 + radius_w, grid_w - 1))

@triton.jit
def _near(a_row, a_col, b_row, b_col, radius_h, radius_w):
    return (tl.abs(a_row[:, None] - b_row[None, :]) <= radius_h) & (tl.abs(a_col[:, None] - b_col[None, :]) <= radius_w)

@triton.jit
def _local_forward(
    Q, K, V, O, LSE,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, son, sod,
    heads, prefix, grid_h, grid_w, radius_h, radius_w, scale, patch_tiles, tokens,
    PREFIX_GLOBAL: tl.constexpr, BLOCK_N: tl.constexpr,
    TH: tl.constexpr, TW: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
):
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    if tile >= patch_tiles:  # the prefix queries: one program per (batch, head), every key
        m = tl.arange(0, BLOCK_P)
        m_ok = m < prefix
        q = _rows(Q, b, h, sqb, sqh, sqn, sqd, m, m_ok, d, HEAD_DIM)
        m_i = tl.full((BLOCK_P,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_P,), tl.float32)
        acc = tl.zeros((BLOCK_P, BLOCK_DV), tl.float32)
        for start in range(0, tokens, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            n_ok = n < tokens
            k = _rows(K, b, h, skb, skh, skn, skd, n, n_ok, d, HEAD_DIM)
            v = _rows(V, b, h, svb, svh, svn, svd, n, n_ok, dv, HEAD_DIM_V)
            m_i, l_i, acc = _softmax_step(q, k, v, n_ok[None, :], m_i, l_i, acc, scale)
        l_i = tl.where(l_i == 0.0, 1.0, l_i)
        _put_rows(O, b, h, sob, soh, son, sod, m, m_ok, dv, HEAD_DIM_V, acc / l_i[:, None])
        tl.store(LSE + bh * tokens + m, m_i + tl.log(l_i), mask=m_ok)
    else:
        q_row, q_col, q_tok, q_ok = _tile_coords(tile, grid_h, grid_w, prefix, TH, TW)
        q = _rows(Q, b, h, sqb, sqh, sqn, sqd, q_tok, q_ok, d, HEAD_DIM)
        m_i = tl.full((TH * TW,), float("-inf"), tl.float32)
        l_i = tl.zeros((TH * TW,), tl.float32)
        acc = tl.zeros((TH * TW, BLOCK_DV), tl.float32)
        if PREFIX_GLOBAL:
            for start in range(0, prefix, BLOCK_P):
                n = start + tl.arange(0, BLOCK_P)
                n_ok = n < prefix
                k = _rows(K, b, h, skb, skh, skn, skd, n, n_ok, d, HEAD_DIM)
                v = _rows(V, b, h, svb, svh, svn, svd, n, n_ok, dv, HEAD_DIM_V)
                m_i, l_i, acc = _softmax_step(q, k, v, n_ok[None, :], m_i, l_i, acc, scale)
        row_lo, row_hi, col_lo, col_hi = _halo(tile, grid_h, grid_w, radius_h, radius_w, TH, TW)
        n_idx = tl.arange(0, KH * KW)
        for r in range(row_lo, row_hi + 1, KH):
            for c in range(col_lo, col_hi + 1, KW):
                k_row = r + n_idx // KW
                k_col = c + n_idx % KW
                k_ok = (k_row <= row_hi) & (k_col <= col_hi)
                k_tok = prefix + k_row * grid_w + k_col
                k = _rows(K, b, h, skb, skh, skn, skd, k_tok, k_ok, d, HEAD_DIM)
                v = _rows(V, b, h, svb, svh, svn, svd, k_tok, k_ok, dv, HEAD_DIM_V)
                allowed = _near(q_row, q_col, k_row, k_col, radius_h, radius_w) & k_ok[None, :]
                m_i, l_i, acc = _softmax_step(q, k, v, allowed, m_i, l_i, acc, scale)
        l_i = tl.where(l_i == 0.0, 1.0, l_i)  # rows outside the grid (masked on store)
        _put_rows(O, b, h, sob, soh, son, sod, q_tok, q_ok, dv, HEAD_DIM_V, acc / l_i[:, None])
        tl.store(LSE + bh * tokens + q_tok, m_i + tl.log(l_i), mask=q_ok)

@triton.jit
def _local_backward_dq(
    Q, K, V, DO, LSE, DELTA, DQ,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdob, sdoh, sdon, sdod,
    sdqb, sdqh, sdqn, sdqd,
    heads, prefix, grid_h, grid_w, radius_h, radius_w, scale, patch_tiles, tokens,
    PREFIX_GLOBAL: tl.constexpr, BLOCK_N: tl.constexpr,
    TH: tl.constexpr, TW: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
):
    """dQ of one tile of patch queries (the forward's keys) or of the prefix queries
    (every key), with P recomputed from the saved log-sum-exp."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    if tile >= patch_tiles:
        m = tl.arange(0, BLOCK_P)
        m_ok = m < prefix
        q = _rows(Q, b, h, sqb, sqh, sqn, sqd, m, m_ok, d, HEAD_DIM)
        do = _rows(DO, b, h, sdob, sdoh, sdon, sdod, m, m_ok, dv, HEAD_DIM_V)
        lse = tl.load(LSE + bh * tokens + m, mask=m_ok, other=0.0)
        delta = tl.load(DELTA + bh * tokens + m, mask=m_ok, other=0.0)
        dq = tl.zeros((BLOCK_P, BLOCK_D), tl.float32)
        for start in range(0, tokens, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            n_ok = n < tokens
            k = _rows(K, b, h, skb, skh, skn, skd, n, n_ok, d, HEAD_DIM)
            v = _rows(V, b, h, svb, svh, svn, svd, n, n_ok, dv, HEAD_DIM_V)
            dq = _dq_step(q, k, v, do, lse, delta, n_ok[None, :] & m_ok[:, None], dq, scale)
        _put_rows(DQ, b, h, sdqb, sdqh, sdqn, sdqd, m, m_ok, d, HEAD_DIM, dq * scale)
    else:
        q_row, q_col, q_tok, q_ok = _tile_coords(tile, grid_h, grid_w, prefix, TH, TW)
        q = _rows(Q, b, h, sqb, sqh, sqn, sqd, q_tok, q_ok, d, HEAD_DIM)
        do = _rows(DO, b, h, sdob, sdoh, sdon, sdod, q_tok, q_ok, dv, HEAD_DIM_V)
        lse = tl.load(LSE + bh * tokens + q_tok, mask=q_ok, other=0.0)
        delta = tl.load(DELTA + bh * tokens + q_tok, mask=q_ok, other=0.0)
        dq = tl.zeros((TH * TW, BLOCK_D), tl.float32)
        if PREFIX_GLOBAL:
            for start in range(0, prefix, BLOCK_P):
                n = start + tl.arange(0, BLOCK_P)
                n_ok = n < prefix
                k = _rows(K, b, h, skb, skh, skn, skd, n, n_ok, d, HEAD_DIM)
                v = _rows(V, b, h, svb, svh, svn, svd, n, n_ok, dv, HEAD_DIM_V)
                dq = _dq_step(q, k, v, do, lse, delta, n_ok[None, :] & q_ok[:, None], dq, scale)
        row_lo, row_hi, col_lo, col_hi = _halo(tile, grid_h, grid_w, radius_h, radius_w, TH, TW)
        n_idx = tl.arange(0, KH * KW)
        for r in range(row_lo, row_hi + 1, KH):
            for c in range(col_lo, col_hi + 1, KW):
                k_row = r + n_idx // KW
                k_col = c + n_idx % KW
                k_ok = (k_row <= row_hi) & (k_col <= col_hi)
                k_tok = prefix + k_row * grid_w + k_col
                k = _rows(K, b, h, skb, skh, skn, skd, k_tok, k_ok, d, HEAD_DIM)
                v = _rows(V, b, h, svb, svh, svn, svd, k_tok, k_ok, dv, HEAD_DIM_V)
                allowed = _near(q_row, q_col, k_row, k_col, radius_h, radius_w) & k_ok[None, :] & q_ok[:, None]
                dq = _dq_step(q, k, v, do, lse, delta, allowed, dq, scale)
        _put_rows(DQ, b, h, sdqb, sdqh, sdqn, sdqd, q_tok, q_ok, d, HEAD_DIM, dq * scale)

@triton.jit
def _local_backward_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdob, sdoh, sdon, sdod,
    sdkb, sdkh, sdkn, sdkd,
    sdvb, sdvh, sdvn, sdvd,
    heads, prefix, grid_h, grid_w, radius_h, radius_w, scale, tokens,
    BLOCK_P: tl.constexpr,
    TH: tl.constexpr, TW: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
):
    """dK and dV of one tile of patch keys from the prefix queries (they see every key)
    and the patch queries whose windows reach it (the window is symmetric: the same halo
    as a query tile's). Prefix keys are done outside (every query may see them)."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    k_row, k_col, k_tok, k_ok = _tile_coords(tile, grid_h, grid_w, prefix, TH, TW)
    k = _rows(K, b, h, skb, skh, skn, skd, k_tok, k_ok, d, HEAD_DIM)
    v = _rows(V, b, h, svb, svh, svn, svd, k_tok, k_ok, dv, HEAD_DIM_V)
    dk = tl.zeros((TH * TW, BLOCK_D), tl.float32)
    dvv = tl.zeros((TH * TW, BLOCK_DV), tl.float32)
    for start in range(0, prefix, BLOCK_P):  # prefix queries see every key
        m = start + tl.arange(0, BLOCK_P)
        m_ok = m < prefix
        q = _rows(Q, b, h, sqb, sqh, sqn, sqd, m, m_ok, d, HEAD_DIM)
        do = _rows(DO, b, h, sdob, sdoh, sdon, sdod, m, m_ok, dv, HEAD_DIM_V)
        lse = tl.load(LSE + bh * tokens + m, mask=m_ok, other=0.0)
        delta = tl.load(DELTA + bh * tokens + m, mask=m_ok, other=0.0)
        dk, dvv = _dkdv_step(k, v, q, do, lse, delta, m_ok[None, :] & k_ok[:, None], dk, dvv, scale)
    row_lo, row_hi, col_lo, col_hi = _halo(tile, grid_h, grid_w, radius_h, radius_w, TH, TW)
    m_idx = tl.arange(0, KH * KW)
    for r in range(row_lo, row_hi + 1, KH):
        for c in range(col_lo, col_hi + 1, KW):
            q_row = r + m_idx // KW
            q_col = c + m_idx % KW
            q_ok = (q_row <= row_hi) & (q_col <= col_hi)
            q_tok = prefix + q_row * grid_w + q_col
            q = _rows(Q, b, h, sqb, sqh, sqn, sqd, q_tok, q_ok, d, HEAD_DIM)
            do = _rows(DO, b, h, sdob, sdoh, sdon, sdod, q_tok, q_ok, dv, HEAD_DIM_V)
            lse = tl.load(LSE + bh * tokens + q_tok, mask=q_ok, other=0.0)
            delta = tl.load(DELTA + bh * tokens + q_tok, mask=q_ok, other=0.0)
            allowed_t = _near(k_row, k_col, q_row, q_col, radius_h, radius_w) & q_ok[None, :] & k_ok[:, None]
            dk, dvv = _dkdv_step(k, v, q, do, lse, delta, allowed_t, dk, dvv, scale)
    _put_rows(DK, b, h, sdkb, sdkh, sdkn, sdkd, k_tok, k_ok, d, HEAD_DIM, dk * scale)
    _put_rows(DV, b, h, sdvb, sdvh, sdvn, sdvd, k_tok, k_ok, dv, HEAD_DIM_V, dvv)
