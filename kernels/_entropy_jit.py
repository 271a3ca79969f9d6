"""The Triton kernels behind :mod:`.entropy_triton` (imported lazily: imports triton).

Helpers are module-level ``@triton.jit`` functions so that the kernels can call them.
"""

import triton
import triton.language as tl


# Online reduction over blocks (fp32):
#   m_new = max(m, max(x_b)),  a = e^(m - m_new)
#   S <- a S + sum e^(x - m_new)
#   T <- a (T + (m - m_new) S) + sum e^(x - m_new) (x - m_new)   [T = sum e^z z]
#   H = log S - T / S ;  lse = m + log S.   x = -inf contributes 0 (guarded).
# Top-k: a register buffer of the KP largest values seen (KP >= kmax, padded
# with +inf beyond kmax so the padding is never the minimum); a block whose
# max exceeds the buffer minimum inserts its values one by one (largest
# first, replacing the minimum; min and argmin in one reduction), either by
# re-reducing the whole block per insertion (SUB == BLOCK_SIZE) or per sub-tile
# of SUB values (_insert_subtiles, the default). Ties at the threshold are not
# inserted: a tied value has the same p, so the entropy is unchanged.
@triton.jit
def _argmax_first(v1, i1, v2, i2):
    """Combine for (value, index) pairs: the larger value, on a tie the smaller index."""
    pick = (v1 > v2) | ((v1 == v2) & (i1 < i2))
    return tl.where(pick, v1, v2), tl.where(pick, i1, i2)


@triton.jit
def _load_row(x_row, stride_xc, cols, hi):
    """Logits at ``cols`` as float32, NaN and +inf (flagged by the caller) as -inf."""
    x = tl.load(x_row + cols.to(tl.int64) * stride_xc, mask=cols < hi, other=float("-inf"))
    x = x.to(tl.float32)
    return tl.where((x != x) | (x == float("inf")), float("-inf"), x)


@triton.jit
def _insert_subtiles(x, x_row, stride_xc, start, hi, buf, thr, j, KP: tl.constexpr,
                     NSUB: tl.constexpr, SUB: tl.constexpr):  # fmt: skip
    # The block as NSUB sub-tiles of SUB: one reduction gives each sub-tile's largest
    # (value, column); each insertion then touches only the sub-tile it came from: the
    # sub-tile is reloaded (cached) and its next value in (value desc, column asc) order
    # found among the SUB values after the inserted one. Same values inserted in the
    # same order as one-by-one over the whole block, at a fraction of the work.
    kidx = tl.arange(0, KP)
    sub = tl.arange(0, SUB)
    tile = tl.arange(0, NSUB)
    smax, sarg = tl.max(tl.reshape(x, (NSUB, SUB)), 1, return_indices=True)
    scol = tile * SUB + sarg
    sv, sc = tl.reduce((smax, scol), 0, _argmax_first)
    while sv > thr:
        buf = tl.where(kidx == j, sv, buf)
        thr, j = tl.min(buf, 0, return_indices=True)
        tb = sc // SUB
        y = _load_row(x_row, stride_xc, start + tb * SUB + sub, hi)
        after = (y < sv) | ((y == sv) & (sub > sc - tb * SUB))
        nv, ni = tl.max(tl.where(after, y, float("-inf")), 0, return_indices=True)
        smax = tl.where(tile == tb, nv, smax)
        scol = tl.where(tile == tb, tb * SUB + ni, scol)
        sv, sc = tl.reduce((smax, scol), 0, _argmax_first)
    return buf, thr, j


@triton.jit
def _reduce_range(x_row, stride_xc, lo, hi, KMAX, KP: tl.constexpr, DO_TOPK: tl.constexpr,
                  BLOCK_SIZE: tl.constexpr, SUB: tl.constexpr):  # fmt: skip
    offs = tl.arange(0, BLOCK_SIZE)
    kidx = tl.arange(0, KP)
    neg_inf = float("-inf")
    m = tl.full((), neg_inf, tl.float32)
    s = tl.zeros((), tl.float32)
    t = tl.zeros((), tl.float32)
    bad = tl.zeros((), tl.int32)
    buf = tl.where(kidx < KMAX, neg_inf, float("inf")).to(tl.float32)
    thr, j = tl.min(buf, 0, return_indices=True)
    for start in range(lo, hi, BLOCK_SIZE):
        cols = start + offs
        x = tl.load(x_row + cols.to(tl.int64) * stride_xc, mask=cols < hi, other=neg_inf)
        x = x.to(tl.float32)
        isbad = (x != x) | (x == float("inf"))
        bad = bad | tl.max(isbad.to(tl.int32), 0)
        x = tl.where(isbad, neg_inf, x)
        if SUB < BLOCK_SIZE:
            bmax = tl.max(x, 0)
        else:
            bmax, bi = tl.max(x, 0, return_indices=True)
        m_new = tl.maximum(m, bmax)
        a = tl.where(m_new == neg_inf, 1.0, tl.exp(m - m_new))
        d = tl.where(m == neg_inf, 0.0, m - m_new)
        z = x - m_new
        e = tl.where(x == neg_inf, 0.0, tl.exp(z))
        ez = tl.where(e > 0, e * z, 0.0)
        t = a * (t + d * s) + tl.sum(ez, 0)
        s = a * s + tl.sum(e, 0)
        m = m_new
        # Expected insertions per range ~ k (1 + ln(n / k)) for values in random order.
        if DO_TOPK and SUB < BLOCK_SIZE:
            if bmax > thr:
                buf, thr, j = _insert_subtiles(x, x_row, stride_xc, start, hi, buf, thr, j, KP,
                                               BLOCK_SIZE // SUB, SUB)  # fmt: skip
        elif DO_TOPK:  # one block reduction and one buffer reduction per insertion
            while bmax > thr:
                x = tl.where(offs == bi, neg_inf, x)
                buf = tl.where(kidx == j, bmax, buf)
                thr, j = tl.min(buf, 0, return_indices=True)
                bmax, bi = tl.max(x, 0, return_indices=True)
    vals = tl.where(kidx < KMAX, buf, neg_inf)
    return m, s, t, bad, vals

@triton.jit
def _write_outputs(full_ptr, topk_ptr, renorm_ptr, stride_out, row, m, s, t, bad, vals,
                   ks_ptr, NK: tl.constexpr, NKP: tl.constexpr, NV: tl.constexpr,
                   DO_TOPK: tl.constexpr):  # fmt: skip
    # vals: NV candidates holding the row's kmax largest (rest -inf), any order.
    neg_inf = float("-inf")
    invalid = (bad != 0) | (m == neg_inf)
    log_s = tl.log(s)
    h = tl.maximum(log_s - t / s, 0.0)
    h = tl.where(invalid, float("nan"), h)
    tl.store(full_ptr + row, h)
    if DO_TOPK:
        lse = m + log_s
        vals = tl.sort(vals, 0, descending=True)
        vidx = tl.arange(0, NV)
        logp = vals - lse
        p = tl.exp(logp)
        c = tl.where(p > 0, -p * logp, 0.0)
        zz = vals - m
        ee = tl.where(vals == neg_inf, 0.0, tl.exp(zz))
        ff = tl.where(ee > 0, ee * zz, 0.0)
        jk = tl.arange(0, NKP)
        ks = tl.load(ks_ptr + jk, mask=jk < NK, other=0)
        sel = vidx[None, :] < ks[:, None]
        hk = tl.maximum(tl.sum(tl.where(sel, c[None, :], 0.0), 1), 0.0)
        ek = tl.sum(tl.where(sel, ee[None, :], 0.0), 1)
        fk = tl.sum(tl.where(sel, ff[None, :], 0.0), 1)
        hr = tl.maximum(tl.log(ek) - fk / ek, 0.0)
        hk = tl.where(invalid, float("nan"), hk)
        hr = tl.where(invalid, float("nan"), hr)
        tl.store(topk_ptr + row * stride_out + jk, hk, mask=jk < NK)
        tl.store(renorm_ptr + row * stride_out + jk, hr, mask=jk < NK)

@triton.jit
def _entropy_kernel(full_ptr, topk_ptr, renorm_ptr, stride_out, x_ptr, stride_xr,
                    stride_xc, ks_ptr, V, KMAX, NK: tl.constexpr, NKP: tl.constexpr,
                    KP: tl.constexpr, DO_TOPK: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, SUB: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    m, s, t, bad, vals = _reduce_range(x_ptr + row * stride_xr, stride_xc, 0, V, KMAX,
                                       KP, DO_TOPK, BLOCK_SIZE, SUB)  # fmt: skip
    _write_outputs(full_ptr, topk_ptr, renorm_ptr, stride_out, row, m, s, t, bad, vals,
                   ks_ptr, NK, NKP, KP, DO_TOPK)  # fmt: skip

# Split path, pass 1: program (row, split) reduces columns [split * span, + span).
# Partials: stats[row, split] = (m, S, T, bad); cand[row, split, :KP] = its top values.
@triton.jit
def _partial_kernel(stats_ptr, cand_ptr, x_ptr, stride_xr, stride_xc, V, span, KMAX, NS,
                    KP: tl.constexpr, DO_TOPK: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, SUB: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1)
    lo = sp * span
    hi = tl.minimum(lo + span, V)
    m, s, t, bad, vals = _reduce_range(x_ptr + row * stride_xr, stride_xc, lo, hi, KMAX,
                                       KP, DO_TOPK, BLOCK_SIZE, SUB)  # fmt: skip
    slot = row * NS + sp
    tl.store(stats_ptr + slot * 4 + 0, m)
    tl.store(stats_ptr + slot * 4 + 1, s)
    tl.store(stats_ptr + slot * 4 + 2, t)
    tl.store(stats_ptr + slot * 4 + 3, bad.to(tl.float32))
    if DO_TOPK:
        tl.store(cand_ptr + slot * KP + tl.arange(0, KP), vals)

# Split path, pass 2 (one program per row): rescale each range's S and T to the
# common max exactly as the online step does (an empty range has m = -inf, S = T = 0
# and contributes nothing) and take the top values among the NS * KP candidates.
@triton.jit
def _combine_kernel(full_ptr, topk_ptr, renorm_ptr, stride_out, stats_ptr, cand_ptr,
                    ks_ptr, NS: tl.constexpr, NK: tl.constexpr, NKP: tl.constexpr,
                    KP: tl.constexpr, DO_TOPK: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    neg_inf = float("-inf")
    sidx = tl.arange(0, NS)
    base = stats_ptr + (row * NS + sidx) * 4
    mi = tl.load(base + 0)
    si = tl.load(base + 1)
    ti = tl.load(base + 2)
    bad = tl.max((tl.load(base + 3) != 0).to(tl.int32), 0)
    m = tl.max(mi, 0)
    empty = mi == neg_inf
    a = tl.where(empty, 0.0, tl.exp(mi - m))
    d = tl.where(empty, 0.0, mi - m)
    s = tl.sum(a * si, 0)
    t = tl.sum(tl.where(empty, 0.0, a * (ti + d * si)), 0)
    cidx = tl.arange(0, NS * KP)
    vals = tl.full((NS * KP,), neg_inf, tl.float32)
    if DO_TOPK:
        vals = tl.load(cand_ptr + row * NS * KP + cidx)
    _write_outputs(full_ptr, topk_ptr, renorm_ptr, stride_out, row, m, s, t, bad, vals,
                   ks_ptr, NK, NKP, NS * KP, DO_TOPK)  # fmt: skip
