"""Triton kernels for the gradient-conflict pass (SPEC 5) over J given as MANY per-parameter tensors
[K, n_i] (never concatenated): one launch covers every tensor through a table of element offsets of
each tensor's data relative to the first tensor's (a real pointer argument, so Triton knows its
alignment and emits vector loads) and a chunk table (tensor index, start offset per program).

* ``gram_partial_kernel``: each program reads its [K, BLOCK] chunk once and writes its partial Gram
  [BLOCK_K, BLOCK_K]; the partials are summed afterwards (deterministic, no atomics).
* ``combine_kernel``: each program writes ``out_t[start:start+BLOCK] = c^T J_t[:, start:...]``
  straight into the destination tensors (e.g. the parameters' .grad).
"""
import triton
import triton.language as tl


@triton.jit
def gram_partial_kernel(
    J0_ptr, tab_ptr, chunk_t_ptr, chunk_s_ptr, n_ptr, part_ptr, K,
    ACC: tl.constexpr, BLOCK: tl.constexpr, SUB: tl.constexpr, BLOCK_K: tl.constexpr, ALIGNED: tl.constexpr,
):
    c = tl.program_id(0)
    t = tl.load(chunk_t_ptr + c)
    start = tl.load(chunk_s_ptr + c)
    n = tl.load(n_ptr + t)
    eoff = tl.load(tab_ptr + t)
    if ALIGNED:  # host checked: offsets and row lengths are multiples of 16 elements -> vector loads
        eoff = tl.multiple_of(eoff, 16)
        n = tl.multiple_of(n, 16)
        start = tl.multiple_of(start, BLOCK)
    base = J0_ptr + eoff
    kk = tl.arange(0, BLOCK_K)
    mk = kk < K
    row = kk.to(tl.int64)[:, None] * n
    acc = tl.zeros((BLOCK_K, BLOCK_K), dtype=ACC)
    for s0 in range(0, BLOCK, SUB):
        off = start + s0 + tl.arange(0, SUB)
        m = off < n
        x = tl.load(base + row + off[None, :], mask=mk[:, None] & m[None, :], other=0.0).to(ACC)
        acc += tl.sum(x[:, None, :] * x[None, :, :], axis=2)
    tl.store(part_ptr + c * BLOCK_K * BLOCK_K + kk[:, None] * BLOCK_K + kk[None, :], acc)


@triton.jit
def combine_kernel(
    J0_ptr, O0_ptr, tab_ptr, out_tab_ptr, chunk_t_ptr, chunk_s_ptr, n_ptr, c_ptr, K,
    ACC: tl.constexpr, BLOCK: tl.constexpr, SUB: tl.constexpr, BLOCK_K: tl.constexpr, ALIGNED: tl.constexpr,
):
    c = tl.program_id(0)
    t = tl.load(chunk_t_ptr + c)
    start = tl.load(chunk_s_ptr + c)
    n = tl.load(n_ptr + t)
    eoff = tl.load(tab_ptr + t)
    ooff = tl.load(out_tab_ptr + t)
    if ALIGNED:
        eoff = tl.multiple_of(eoff, 16)
        ooff = tl.multiple_of(ooff, 16)
        n = tl.multiple_of(n, 16)
        start = tl.multiple_of(start, BLOCK)
    base = J0_ptr + eoff
    obase = O0_ptr + ooff
    kk = tl.arange(0, BLOCK_K)
    mk = kk < K
    row = kk.to(tl.int64)[:, None] * n
    coef = tl.load(c_ptr + kk, mask=mk, other=0.0).to(ACC)
    for s0 in range(0, BLOCK, SUB):
        off = start + s0 + tl.arange(0, SUB)
        m = off < n
        x = tl.load(base + row + off[None, :], mask=mk[:, None] & m[None, :], other=0.0).to(ACC)
        d = tl.sum(x * coef[:, None], axis=0)
        tl.store(obase + off, d.to(obase.dtype.element_ty), mask=m)
