"""Triton kernels for the gradient-conflict pass (SPEC 5) over J given as MANY per-parameter tensors
[K, n_i] (never concatenated): one launch covers every tensor through a table of base addresses
(int64, cast to pointers in the kernel) and a chunk table (tensor index, start offset per program).

* ``gram_partial_kernel``: each program reads its [K, BLOCK] chunk once and writes its partial Gram
  [BLOCK_K, BLOCK_K]; the partials are summed afterwards (deterministic, no atomics).
* ``combine_kernel``: each program writes ``out_t[start:start+BLOCK] = c^T J_t[:, start:...]``
  straight into the destination tensors (e.g. the parameters' .grad).
"""
import triton
import triton.language as tl


@triton.jit
def gram_partial_kernel(
    tab_ptr, chunk_t_ptr, chunk_s_ptr, n_ptr, part_ptr, K,
    DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, SUB: tl.constexpr, BLOCK_K: tl.constexpr,
):
    c = tl.program_id(0)
    t = tl.load(chunk_t_ptr + c)
    start = tl.load(chunk_s_ptr + c)
    n = tl.load(n_ptr + t)
    base = tl.load(tab_ptr + t).to(tl.pointer_type(DTYPE))
    kk = tl.arange(0, BLOCK_K)
    mk = kk < K
    row = kk.to(tl.int64)[:, None] * n
    acc = tl.zeros((BLOCK_K, BLOCK_K), dtype=ACC)
    for s0 in tl.static_range(0, BLOCK, SUB):
        off = start + s0 + tl.arange(0, SUB)
        m = off < n
        x = tl.load(base + row + off[None, :], mask=mk[:, None] & m[None, :], other=0.0).to(ACC)
        acc += tl.sum(x[:, None, :] * x[None, :, :], axis=2)
    tl.store(part_ptr + c * BLOCK_K * BLOCK_K + kk[:, None] * BLOCK_K + kk[None, :], acc)


@triton.jit
def combine_kernel(
    tab_ptr, out_tab_ptr, chunk_t_ptr, chunk_s_ptr, n_ptr, c_ptr, K,
    DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr, ACC: tl.constexpr,
    BLOCK: tl.constexpr, SUB: tl.constexpr, BLOCK_K: tl.constexpr,
):
    c = tl.program_id(0)
    t = tl.load(chunk_t_ptr + c)
    start = tl.load(chunk_s_ptr + c)
    n = tl.load(n_ptr + t)
    base = tl.load(tab_ptr + t).to(tl.pointer_type(DTYPE))
    obase = tl.load(out_tab_ptr + t).to(tl.pointer_type(OUT_DTYPE))
    kk = tl.arange(0, BLOCK_K)
    mk = kk < K
    row = kk.to(tl.int64)[:, None] * n
    coef = tl.load(c_ptr + kk, mask=mk, other=0.0).to(ACC)
    for s0 in tl.static_range(0, BLOCK, SUB):
        off = start + s0 + tl.arange(0, SUB)
        m = off < n
        x = tl.load(base + row + off[None, :], mask=mk[:, None] & m[None, :], other=0.0).to(ACC)
        d = tl.sum(x * coef[:, None], axis=0)
        tl.store(obase + off, d.to(OUT_DTYPE), mask=m)
