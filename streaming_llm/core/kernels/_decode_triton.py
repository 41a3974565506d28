"""Triton kernels of :func:`streaming_llm.core.kernels.decode.decode_attention` (imported lazily).

Flash-decoding with per-row bounds. Grid ``(rows, kv_heads, splits)``: program ``(b, j, s)`` takes the
``s``-th of ``splits`` equal chunks (whole ``BLOCK_N`` tiles) of row ``b``'s own range ``[lo[b], hi[b])``
and runs an online softmax over it for the ``GROUPS`` query heads of kv head ``j`` at once, so each
key/value tile is loaded once per group. Programs whose chunk is empty (short rows) load no key and
write nothing; :func:`decode_reduce` recomputes which chunks were used from ``lo``/``hi`` and merges
their partial (log-sum-exp, normalised output) pairs in float32. With one split the split kernel writes
the output directly and no reduce runs.

Everything value-dependent (ranges, chunk bounds, loop trip counts) is read on the device; the grid and
the compiled variant depend on shapes and dtypes only, so a launch can be captured in a CUDA graph and
replayed with new ``lo``/``hi``.

No ``from __future__ import annotations`` here: Triton reads the ``tl.constexpr`` annotations. The kernels
call no jitted function of Triton's standard library (``tl.sum``, ``tl.max``, ``tl.zeros``, ``tl.cdiv``):
Triton fixes interpreted-or-compiled for a jitted function when it is defined, so its standard library is
compiled-only if ``triton`` was imported before ``TRITON_INTERPRET=1`` was set (transformers imports it),
while this module, imported on first use, follows the variable as it is then. So the kernels also run under
an interpreter switched on late (the CPU tests). Reductions are ``tl.reduce`` with the very combine functions
``tl.max``/``tl.sum`` use (the interpreter recognises them and reduces with numpy); a Triton without those
private names gets equivalent ones defined here.
"""

# ruff: noqa: SIM108  -- if/else on constexprs picks code at compile time: kept as statements, as Triton reads them

import triton
import triton.language as tl


@triton.jit
def _max2(a, b):
    return tl.maximum(a, b)


@triton.jit
def _add2(a, b):
    return a + b


_MAX = getattr(tl.standard, "_elementwise_max", _max2)  # what tl.max reduces with
_SUM = getattr(tl.standard, "_sum_combine", _add2)  # what tl.sum reduces with


@triton.jit
def decode_split(
    Q, K, V, LO, HI, OUT, PART_O, PART_L, SINK_LOGITS,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_od,
    stride_lo, stride_hi, stride_sink,
    slots, splits, scaling, softcap,
    GROUPS: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    DV: tl.constexpr, DV_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    SOFTCAP: tl.constexpr, WIDEN: tl.constexpr, DIRECT: tl.constexpr, SINKS: tl.constexpr,
):  # fmt: skip
    """One (row, kv head, chunk): partial softmax of ``GROUPS`` query heads over the chunk's keys.

    ``PART_O`` ``(rows, Hq, splits, DV)`` float32 gets the chunk's normalised output, ``PART_L``
    ``(rows, Hq, splits)`` float32 its log-sum-exp in base 2; with ``DIRECT`` (one split) the normalised
    output goes straight to ``OUT`` in its dtype. ``WIDEN``: both products in float32 (exact, ``ieee``) on
    float32 copies of the tiles: set for float32 inputs, and for bfloat16 under Triton's interpreter, whose
    ``tl.dot`` multiplies bfloat16 tiles as raw 16-bit integers (Triton 3.9).
    """
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.program_id(2)
    b64 = b.to(tl.int64)
    lo = tl.maximum(tl.load(LO + b64 * stride_lo).to(tl.int32), 0)
    hi = tl.minimum(tl.load(HI + b64 * stride_hi).to(tl.int32), slots)
    length = tl.maximum(hi - lo, 0)
    per = ((length + splits - 1) // splits + BLOCK_N - 1) // BLOCK_N * BLOCK_N  # keys per chunk: whole tiles
    start = lo + s * per
    end = tl.minimum(start + per, hi)  # empty chunk (start >= end): the loop below runs zero times

    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    dv = tl.arange(0, DV_PAD)
    heads = kvh * GROUPS + g
    q_mask = (g < GROUPS)[:, None] & (d < D)[None, :]
    q = tl.load(Q + b64 * stride_qb + heads.to(tl.int64)[:, None] * stride_qh + d[None, :] * stride_qd, mask=q_mask,
                other=0.0)  # fmt: skip
    if WIDEN:
        q = q.to(tl.float32)

    n = tl.arange(0, BLOCK_N)
    k_base = K + b64 * stride_kb + kvh.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + kvh.to(tl.int64) * stride_vh
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.full([G_PAD], 0.0, tl.float32)
    acc = tl.full([G_PAD, DV_PAD], 0.0, tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs = n0 + n
        valid = offs < end
        offs64 = offs.to(tl.int64)
        # Masks only along the keys when the head dims are powers of two (constexpr): whole-row
        # predicates keep the loads vectorised.
        if D == D_PAD:
            k_mask = valid[:, None]
        else:
            k_mask = valid[:, None] & (d < D)[None, :]
        k = tl.load(k_base + offs64[:, None] * stride_ks + d[None, :] * stride_kd, mask=k_mask, other=0.0)
        if WIDEN:
            x = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            x = tl.dot(q, tl.trans(k))
        x = x * scaling
        if SOFTCAP:  # softcap * tanh(x / softcap), tanh from exp(-2|y|): no overflow, odd by construction
            y = x / softcap
            t = tl.exp2(tl.abs(y) * -2.8853900817779268)  # exp(-2|y|) = 2^(-2 log2(e) |y|)
            th = (1.0 - t) / (1.0 + t)
            x = softcap * tl.where(y >= 0, th, -th)
        x = tl.where(valid[None, :], x * 1.4426950408889634, float("-inf"))  # base 2 (x log2 e); a tile has a valid key
        m_new = tl.maximum(m_i, tl.reduce(x, 1, _MAX))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(x - m_new[:, None])
        l_i = l_i * alpha + tl.reduce(p, 1, _SUM)
        if DV == DV_PAD:
            v_mask = valid[:, None]
        else:
            v_mask = valid[:, None] & (dv < DV)[None, :]
        v = tl.load(v_base + offs64[:, None] * stride_vs + dv[None, :] * stride_vd, mask=v_mask, other=0.0)
        if WIDEN:  # p rounded to the value dtype as below (a no-op for float32)
            pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    o_mask = (g < GROUPS)[:, None] & (dv < DV)[None, :]
    if DIRECT and SINKS:  # one more term exp(s_h) in the denominator, no value (base 2 like the scores)
        sink = tl.load(SINK_LOGITS + heads.to(tl.int64) * stride_sink, mask=g < GROUPS, other=0.0)
        sink = sink.to(tl.float32) * 1.4426950408889634
        m_all = tl.maximum(m_i, sink)
        keep = tl.exp2(m_i - m_all)  # 0 for a row that saw no key (m_i = -inf)
        acc = acc * keep[:, None]
        l_i = l_i * keep + tl.exp2(sink - m_all)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a row with an empty range (out of contract): zeros
    if DIRECT:
        ptrs = OUT + b64 * stride_ob + heads.to(tl.int64)[:, None] * stride_oh + dv[None, :] * stride_od
        tl.store(ptrs, o.to(OUT.dtype.element_ty), mask=o_mask)
    else:
        used = (g < GROUPS) & (start + 0 * g < end)  # as a vector: the interpreter wants vector masks
        row = (b64 * (GROUPS * tl.num_programs(1)) + heads) * splits + s  # (b, head, s) of the partials
        tl.store(PART_O + row[:, None] * DV + dv[None, :], o, mask=used[:, None] & (dv < DV)[None, :])
        tl.store(PART_L + row, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), mask=used)


@triton.jit
def decode_reduce(
    LO, HI, OUT, PART_O, PART_L, SINK_LOGITS,
    stride_ob, stride_oh, stride_od, stride_lo, stride_hi, stride_sink,
    slots, splits, heads, block_n,
    DV: tl.constexpr, DV_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr, SINKS: tl.constexpr,
):  # fmt: skip
    """One (row, query head): merge the partials of the chunks :func:`decode_split` used, in float32; with
    ``SINKS`` the head's learned sink logit is one more term of the merged denominator (no value)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    b64 = b.to(tl.int64)
    lo = tl.maximum(tl.load(LO + b64 * stride_lo).to(tl.int32), 0)
    hi = tl.minimum(tl.load(HI + b64 * stride_hi).to(tl.int32), slots)
    length = tl.maximum(hi - lo, 0)
    per = ((length + splits - 1) // splits + block_n - 1) // block_n * block_n  # as in decode_split
    sp = tl.arange(0, SPLITS_PAD)
    used = (sp < splits) & (sp * per < length)  # the same test as decode_split's start < end
    dv = tl.arange(0, DV_PAD)
    row = (b64 * heads + h) * splits + sp
    lse = tl.load(PART_L + row, mask=used, other=float("-inf"))
    top = tl.reduce(lse, 0, _MAX)
    if SINKS:
        sink = tl.load(SINK_LOGITS + h.to(tl.int64) * stride_sink).to(tl.float32) * 1.4426950408889634
        top = tl.maximum(top, sink)
    w = tl.where(used, tl.exp2(lse - top), 0.0)
    o = tl.load(PART_O + row[:, None] * DV + dv[None, :], mask=used[:, None] & (dv < DV)[None, :], other=0.0)
    total = tl.reduce(w, 0, _SUM)
    if SINKS:
        total = total + tl.exp2(sink - top)
    res = tl.reduce(o * w[:, None], 0, _SUM) / tl.where(total > 0, total, 1.0)
    ptrs = OUT + b64 * stride_ob + h.to(tl.int64) * stride_oh + dv * stride_od
    tl.store(ptrs, res.to(OUT.dtype.element_ty), mask=dv < DV)
