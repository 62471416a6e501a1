"""Ahead-of-time compile every Triton kernel variant the ops launch, for a GPU target, on a machine
without a GPU (Triton lowers to PTX and runs ptxas; no driver needed). CI and tests use it to catch
what the interpreter cannot (compiled-mode-only errors, register spills, lost vectorisation).

    python kernel_src/aot.py [--arch 90]   (or python -m apex_fast.kernels.aot)   # prints one line per kernel; exit 1 on failure

Must run in a process where TRITON_INTERPRET is unset when the kernels module is first imported.
"""
from __future__ import annotations

import argparse
from pathlib import Path
import os
import re
import subprocess
import sys
import tempfile
import time


def _cases(tl, gn, gr):
    P32, I64, I32, F32 = "*fp32", "*i64", "i32", "fp32"
    seg = dict(R_ptr=P32, perm_ptr=I64, offs_ptr=I64, cnts_ptr=I64, floor_ptr=P32, gstat_ptr=P32, w_ptr=P32,
               A_ptr=P32, S_ptr=P32, mean_ptr=P32, std_ptr=P32, count_ptr=P32, K=I32, eps=F32)
    gram = dict(tab_ptr=I64, chunk_t_ptr=I64, chunk_s_ptr=I64, n_ptr=I64, part_ptr=P32, K=I32)
    comb = dict(tab_ptr=I64, out_tab_ptr=I64, chunk_t_ptr=I64, chunk_s_ptr=I64, n_ptr=I64, c_ptr=P32, K=I32)
    # (name, kernel, arg types, constexprs, vector loads expected)
    return [
        ("pairwise bf16 R, global_std, floor", gn.group_norm_pairwise_kernel,
         dict(R_ptr="*bf16", ids_ptr=I64, floor_ptr=P32, A_ptr=P32, N=I32, K=I32, eps=F32),
         dict(GLOBAL_STD=True, HAS_FLOOR=True, BLOCK_I=32, BLOCK_J=32, BLOCK_K=4), False),
        ("pairwise fp32 R, K=8", gn.group_norm_pairwise_kernel,
         dict(R_ptr=P32, ids_ptr=I64, floor_ptr=P32, A_ptr=P32, N=I32, K=I32, eps=F32),
         dict(GLOBAL_STD=False, HAS_FLOOR=False, BLOCK_I=32, BLOCK_J=16, BLOCK_K=8), False),
        ("column_stats", gn.column_stats_kernel, dict(R_ptr=P32, out_ptr=P32, N=I32, K=I32),
         dict(BLOCK_N=256, BLOCK_K=4), False),
        ("segmented dual-stage", gn.group_norm_segmented_kernel, seg,
         dict(GLOBAL_STD=False, HAS_FLOOR=True, DUAL=True, BLOCK_M=256, BLOCK_K=4), False),
        ("segmented global_std", gn.group_norm_segmented_kernel, seg,
         dict(GLOBAL_STD=True, HAS_FLOOR=False, DUAL=False, BLOCK_M=256, BLOCK_K=4), False),
        ("batch_renorm", gn.batch_renorm_kernel, dict(S_ptr=P32, A_ptr=P32, stats_ptr=P32, N=I32, eps=F32, clip=F32),
         dict(BLOCK_N=1024), False),
        ("gram fp32 K=4 aligned", gr.gram_partial_kernel, dict(J0_ptr=P32, **gram),
         dict(ACC=tl.float32, BLOCK=8192, SUB=512, BLOCK_K=4, ALIGNED=True), True),
        ("gram bf16 K=8", gr.gram_partial_kernel, dict(J0_ptr="*bf16", **gram),
         dict(ACC=tl.float32, BLOCK=8192, SUB=128, BLOCK_K=8, ALIGNED=False), False),
        ("gram fp64", gr.gram_partial_kernel, dict(J0_ptr="*fp64", **dict(gram, part_ptr="*fp64")),
         dict(ACC=tl.float64, BLOCK=8192, SUB=512, BLOCK_K=4, ALIGNED=True), True),
        ("combine fp32 -> fp32 aligned", gr.combine_kernel, dict(J0_ptr=P32, O0_ptr=P32, **comb),
         dict(ACC=tl.float32, BLOCK=8192, SUB=1024, BLOCK_K=4, ALIGNED=True), True),
        ("combine fp16 -> bf16", gr.combine_kernel, dict(J0_ptr="*fp16", O0_ptr="*bf16", **comb),
         dict(ACC=tl.float32, BLOCK=8192, SUB=1024, BLOCK_K=4, ALIGNED=False), False),
    ]


def compile_all(arch: int = 90, verbose: bool = True) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: AOT compilation needs the compiled-mode kernels")
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    root = str(Path(__file__).resolve().parents[1])  # source checkout: make apex_fast importable
    if (Path(root) / "apex_fast").is_dir() and root not in sys.path:
        sys.path.insert(0, root)
    from apex_fast.ops._backend import _import_kernels

    _import_kernels()
    from apex_fast.kernels import gram as gr
    from apex_fast.kernels import group_norm as gn

    try:
        from triton.backends.nvidia.compiler import get_ptxas
        ptxas = get_ptxas(arch).path
    except Exception:
        ptxas = None
    target = GPUTarget("cuda", arch, 32)
    out = []
    for name, fn, types, consts, want_vec in _cases(tl, gn, gr):
        t0 = time.time()
        sig = {a: ("constexpr" if a in consts else types[a]) for a in fn.arg_names}
        # what the JIT does for 16-byte aligned tensors: mark pointer arguments divisible by 16
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if a.endswith("_ptr")}
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs), target=target)
        ptx = k.asm["ptx"]
        loads = sorted(set(re.findall(r"ld\.global[\.\w]*", ptx)))
        rec = {"name": name, "kernel": fn.__name__, "seconds": round(time.time() - t0, 2),
               "shared_bytes": k.metadata.shared, "num_warps": k.metadata.num_warps, "global_loads": loads,
               "vector_loads": any(".v2" in x or ".v4" in x for x in loads), "want_vector_loads": want_vec}
        if ptxas:
            with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
                f.write(ptx)
            r = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}a", f.name, "-o", os.devnull],
                               capture_output=True, text=True)
            os.unlink(f.name)
            info = r.stdout + r.stderr
            m = re.search(r"Used (\d+) registers", info)
            s = re.search(r"(\d+) bytes spill stores", info)
            rec["registers"] = int(m.group(1)) if m else None
            rec["spill_store_bytes"] = int(s.group(1)) if s else None
        if verbose:
            print(f"{name:34s} {rec['seconds']:5.1f}s regs={rec.get('registers')} spills={rec.get('spill_store_bytes')} "
                  f"shared={rec['shared_bytes']} loads={','.join(loads)}")
        out.append(rec)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arch", type=int, default=90)
    args = ap.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    recs = compile_all(args.arch)
    bad = [r["name"] for r in recs if r["want_vector_loads"] and not r["vector_loads"]]
    bad += [r["name"] for r in recs if r.get("spill_store_bytes")]
    if bad:
        print("FAILED (no vector loads or register spills):", bad)
        return 1
    print(f"all {len(recs)} kernel variants compiled for sm_{args.arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
