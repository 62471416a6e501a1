"""apex_fast.ops: every op, every backend (torch reference, C++ extension, Triton) against the
reference (docs/SPEC.md 1, 3, 5), odd shapes, low precision, bad input, dispatch.

Device: APEX_FAST_TEST_DEVICE=cpu|cuda (default: cuda when visible, else cpu). On cuda the torch and
Triton backends run on the GPU (Triton compiled), the extension's CPU kernels on the CPU and its CUDA
kernel (weighted_grads) on the GPU as the extra backend ``cpp_cuda``; bench/gpu_suite.sh runs this
module that way. On cpu, Triton kernels run through the Triton interpreter: TRITON_INTERPRET=1 is set
here before anything imports triton (the kernels module is imported lazily by the ops).
"""
import os

import torch

DEV = os.environ.get("APEX_FAST_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
if DEV not in ("cpu", "cuda"):
    raise RuntimeError(f"APEX_FAST_TEST_DEVICE={DEV!r}: choose cpu or cuda")
if DEV == "cuda" and not torch.cuda.is_available():
    raise RuntimeError("APEX_FAST_TEST_DEVICE=cuda but torch sees no CUDA device (torch "
                     f"{torch.__version__}, built with CUDA {torch.version.cuda}); unset it to test on the CPU")
if DEV == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402

from apex_fast import ops  # noqa: E402
from apex_fast.ops import _backend, _triton  # noqa: E402
from apex_fast.ops import reference as ref  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAN = float("nan")


def _backend_param(name):
    marks = []
    if name == "cpp" and _backend.cpp_ops() is None:
        marks.append(pytest.mark.skip(reason="apex_fast._C is not built (run .ci/build_ext.sh or "
                                             f"`pip install -e . --no-build-isolation`): {_backend.cpp_error()}"))
    if name == "triton" and not _backend.triton_available():
        marks.append(pytest.mark.skip(reason="triton is not installed"))
    if name == "cpp_cuda" and not (DEV == "cuda" and _backend.cpp_has("weighted_grads", torch.device("cuda"))):
        marks.append(pytest.mark.skip(reason="the extension's CUDA kernels: needs APEX_FAST_TEST_DEVICE=cuda and "
                                             "apex_fast._C built where torch has CUDA"))
    return pytest.param(name, marks=marks, id=name)


BACKENDS = [_backend_param(b) for b in ("torch", "cpp", "triton")]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def backend(request, monkeypatch):
    name = request.param
    monkeypatch.setenv("APEX_FAST_BACKEND", "cpp" if name == "cpp_cuda" else name)
    if name == "triton" and DEV == "cpu":
        k = _backend.triton_kernels("gram")
        if type(k.gram_partial_kernel).__name__ != "InterpretedFunction":
            pytest.skip("triton was imported without TRITON_INTERPRET=1 before this module; run it alone")
    return name


def _dev(name):
    # "cpp": the extension's CPU kernels; "cpp_cuda": its CUDA kernels; torch and Triton run on DEV
    # (Triton on CUDA, or in the interpreter on CPU)
    return {"cpp": "cpu", "cpp_cuda": "cuda"}.get(name, DEV)


def rewards(N, K, G, *, nan_frac=0.1, seed=0, dtype=torch.float32, dev="cpu"):
    g = torch.Generator().manual_seed(seed)
    R = torch.randn(N, K, generator=g) * torch.linspace(0.3, 3, K) + torch.linspace(-2, 6, K)
    R[torch.rand(N, K, generator=g) < nan_frac] = NAN
    ids = torch.randint(0, G, (N,), generator=g) * 7919 - 13  # arbitrary, unsorted, negative values
    return R.to(dtype).to(dev), ids.to(dev)


def close(a, b, dtype=torch.float32, tight=2e-5):
    tol = tight if dtype in (torch.float32, torch.float64) else 2e-3
    torch.testing.assert_close(a.float().cpu(), b.float().cpu(), atol=tol, rtol=tol)


# ---------------------------------------------------------------------------------------------------
# the reference itself: hand-checked values (SPEC 1 / 3)


def test_reference_group_normalize_hand_checked():
    R = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, NAN, 4.0])
    ids = torch.tensor([7, 7, 7, 100, 100, 100, -3])
    A = ref.group_normalize(R, ids, eps=0.0)
    s = (2 / 3) ** 0.5  # population std of 1, 2, 3
    torch.testing.assert_close(A, torch.tensor([-1 / s, 0.0, 1 / s, 0.0, 0.0, 0.0, 0.0]))
    # all-equal groups give exactly 0 also with global_std, and a floor bounds the std from below
    A = ref.group_normalize(R, ids, global_std=True, eps=0.0)
    assert A[3] == 0 and A[4] == 0 and A[6] == 0
    A = ref.group_normalize(R, ids, eps=0.0, std_floor=2.0)
    torch.testing.assert_close(A[:3], torch.tensor([-0.5, 0.0, 0.5]))


def test_reference_dual_stage_hand_checked():
    R = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, NAN], [5.0, 1.0], [5.0, 3.0]])
    ids = torch.tensor([7, 7, 7, 100, 100])
    A, Ahat, st = ref.dual_stage_advantages(R, ids, torch.tensor([0.5, 0.5]), std_floor=torch.tensor([0.1, 2.0]),
                                            eps=1e-4)
    s = (2 / 3) ** 0.5
    want_hat = torch.tensor([[-1 / (s + 1e-4), 0], [0, 0], [1 / (s + 1e-4), 0], [0, -1 / (2 + 1e-4)],
                             [0, 1 / (2 + 1e-4)]])
    torch.testing.assert_close(Ahat, want_hat)
    comb = (want_hat * 0.5).sum(1)
    torch.testing.assert_close(st["combined"], comb)
    want = (comb - comb.mean()) / (comb.std(unbiased=False) + 1e-4)
    want[1] = 0.0  # s == 0: no signal in any objective -> stays masked
    torch.testing.assert_close(A, want)
    torch.testing.assert_close(st["mean"], torch.tensor([[2.0, 0.0], [5.0, 2.0]]))
    torch.testing.assert_close(st["std"], torch.tensor([[s, 0.0], [0.0, 1.0]]))
    torch.testing.assert_close(st["count"], torch.tensor([[3.0, 2.0], [2.0, 2.0]]))
    assert st["inverse"].tolist() == [0, 0, 0, 1, 1]


def test_reference_dual_stage_clip():
    R = torch.tensor([[0.0], [0.0], [0.0], [0.0], [10.0]])
    A, _, st = ref.dual_stage_advantages(R, torch.zeros(5, dtype=torch.long), torch.ones(1), clip=1.5)
    # Ahat = [-.5, -.5, -.5, -.5, 2] (std 4), batch std 1 -> A = [-.5 x4, 2 -> clipped to 1.5]
    torch.testing.assert_close(A, torch.tensor([-0.5, -0.5, -0.5, -0.5, 1.5]), atol=1e-3, rtol=0)
    assert A[4] == 1.5 and abs(float(st["clip_frac"]) - 0.2) < 1e-6


def test_reference_gram_cosine_combine_weighted_grads():
    J = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(ref.gram(J), J @ J.T)
    C = ref.cosine(J)
    assert C[0, 1] == 0 and C[0, 0] == 1 and C[2, 2] == 0  # zero gradient: cosine 0
    torch.testing.assert_close(ref.combine(J, torch.tensor([1.0, 2.0, 5.0])), torch.tensor([1.0, 6.0, 2.0]))
    d, a, W = torch.randn(6, 2), torch.randn(6, 3), torch.randn(6, 4)
    G = ref.weighted_grads(d, a, W)
    for k in range(4):
        torch.testing.assert_close(G[k], sum(W[m, k] * torch.outer(d[m], a[m]) for m in range(6)))


# ---------------------------------------------------------------------------------------------------
# group_normalize


GN_CASES = [  # N, K, G
    (1, 1, 1), (7, 1, 3), (50, 3, 7), (300, 8, 1), (257, 4, 40), (64, 5, 64), (33, 20, 5),
]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("N,K,G", GN_CASES)
def test_group_normalize_matches_reference(backend, N, K, G):
    R, ids = rewards(N, K, G, dev=_dev(backend))
    for global_std in (False, True):
        for floor in (None, 0.7, torch.linspace(0.1, 2.0, K)):
            got = ops.group_normalize(R, ids, global_std=global_std, std_floor=floor)
            want = ref.group_normalize(R.cpu(), ids.cpu(), global_std=global_std,
                                       std_floor=floor if not isinstance(floor, torch.Tensor) else floor.cpu())
            assert got.dtype == torch.float32 and got.shape == R.shape
            close(got, want)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_group_normalize_dtypes(backend, dtype):
    R, ids = rewards(120, 4, 9, dtype=dtype, dev=_dev(backend))
    close(ops.group_normalize(R, ids), ref.group_normalize(R.cpu(), ids.cpu()), dtype)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_group_normalize_edge_cases(backend):
    dev = _dev(backend)
    # 1-D R, empty id ranges (gaps), an all-NaN group, an all-equal group, a single-sample group,
    # ids far outside int32, int32 ids
    R = torch.tensor([1.0, 3.0, NAN, NAN, 0.25, 0.25, 0.25, 9.0, 2.0, 4.0, float("inf")], device=dev)
    ids = torch.tensor([5, 5, 2**40, 2**40, -2**50, -2**50, -2**50, 11, 99, 99, 99], device=dev)
    for gs in (False, True):
        got = ops.group_normalize(R, ids, global_std=gs)
        want = ref.group_normalize(R.cpu(), ids.cpu(), global_std=gs)
        close(got, want)
        assert got.shape == R.shape
        assert (got[2:8] == 0).all(), "NaN, all-equal and single-sample groups give exactly 0"
        assert got[10] == 0, "inf is excluded like NaN"
    got32 = ops.group_normalize(R, torch.tensor([0, 0, 1, 1, 2, 2, 2, 3, 4, 4, 4], dtype=torch.int32, device=dev))
    close(got32, ref.group_normalize(R.cpu(), ids.cpu()))
    # all-equal values that are not exactly representable still give exactly 0
    R = torch.full((24,), 0.1, device=dev)
    assert (ops.group_normalize(R, torch.zeros(24, dtype=torch.long, device=dev), global_std=True) == 0).all()
    # N = 0
    assert ops.group_normalize(torch.zeros(0, 3, device=dev), torch.zeros(0, dtype=torch.long, device=dev)).shape == (0, 3)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.id == "triton"], indirect=True)
def test_group_normalize_triton_segmented_path(backend, monkeypatch):
    """Large N goes through the sorted, one-program-per-group kernel: force it on a small batch."""
    monkeypatch.setattr(_triton, "PAIRWISE_MAX_N", 16)
    R, ids = rewards(200, 3, 13, dev=DEV)
    for gs in (False, True):
        close(ops.group_normalize(R, ids, global_std=gs, std_floor=0.2),
              ref.group_normalize(R.cpu(), ids.cpu(), global_std=gs, std_floor=0.2))


# ---------------------------------------------------------------------------------------------------
# dual_stage_advantages

DS_CASES = [(1, 1, 1), (50, 3, 7), (300, 8, 1), (257, 4, 40), (96, 2, 96)]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("N,K,G", DS_CASES)
def test_dual_stage_matches_reference(backend, N, K, G):
    R, ids = rewards(N, K, G, dev=_dev(backend), seed=N + K)
    w = torch.softmax(torch.linspace(0, 1, K), 0)
    for floor in (None, 0.5, torch.linspace(0.05, 1.0, K)):
        A, Ahat, st = ops.dual_stage_advantages(R, ids, w.to(R.device), std_floor=floor, clip=2.0)
        A2, Ahat2, st2 = ref.dual_stage_advantages(R.cpu(), ids.cpu(), w, std_floor=floor, clip=2.0)
        close(Ahat, Ahat2)
        close(A, A2, tight=1e-4)
        assert set(st) == set(st2)
        for key in st2:
            if key == "inverse":
                assert torch.equal(st[key].cpu(), st2[key])
            else:
                close(st[key], st2[key], tight=1e-4)
        assert ((A == 0) == (A2 == 0).to(A.device)).all()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dual_stage_low_precision(backend, dtype):
    R, ids = rewards(96, 4, 8, dtype=dtype, dev=_dev(backend))
    w = torch.full((4,), 0.25)
    A, Ahat, _ = ops.dual_stage_advantages(R, ids, w.to(R.device), std_floor=0.1)
    A2, Ahat2, _ = ref.dual_stage_advantages(R.cpu(), ids.cpu(), w, std_floor=0.1)
    close(Ahat, Ahat2, dtype)
    close(A, A2, dtype)


# ---------------------------------------------------------------------------------------------------
# gram / cosine / combine

J_CASES = {  # K, list of per-parameter shapes (without K)
    "K4_single_odd": (4, [(70001,)]),
    "K4_many": (4, [(33, 17), (70000,), (5,), (0,), (3, 2, 2)]),
    "K1": (1, [(300,), (4099,)]),
    "K8": (8, [(100001,)]),
    "K11_generic": (11, [(5000,), (7,)]),
}


def _J(K, shapes, dtype, dev, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(K, *s, generator=g).to(dtype).to(dev) for s in shapes]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("case", list(J_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_gram_cosine_combine(backend, case, dtype):
    K, shapes = J_CASES[case]
    if backend == "triton" and dtype == torch.float16 and case != "K4_many":
        pytest.skip("fp16 is covered by one case under the (slow) interpreter")
    Js = _J(K, shapes, dtype, _dev(backend))
    Jc = [j.cpu() for j in Js]
    M = ops.gram(Js)
    Mr = ref.gram(Jc)
    assert M.shape == (K, K) and M.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    scale = Mr.abs().max()
    tol = 2e-5 if dtype in (torch.float32, torch.float64) else 1e-3
    torch.testing.assert_close(M.cpu() / scale, Mr / scale, atol=tol, rtol=tol)
    torch.testing.assert_close(ops.cosine(Js).cpu(), ref.cosine_from_gram(Mr), atol=tol, rtol=tol)
    c = torch.linspace(-1, 2, K)
    got = ops.combine(Js, c)
    want = ref.combine(Jc, c)
    for x, y in zip(got, want):
        assert x.shape == y.shape and x.dtype == dtype
        tolc = 2e-5 if dtype in (torch.float32, torch.float64) else 2e-2
        torch.testing.assert_close(x.cpu().float(), y.float(), atol=tolc, rtol=tolc)
    # single [K, P] tensor
    J2 = Js[0].reshape(K, -1)
    torch.testing.assert_close(ops.gram(J2).cpu() / scale, ref.gram(J2.cpu()) / scale, atol=tol, rtol=tol)
    assert ops.combine(J2, c).shape == (J2.shape[1],)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_combine_into_out_of_another_dtype(backend):
    """combine writes c^T J blockwise into given tensors (e.g. params' .grad), dtype converted."""
    dev = _dev(backend)
    Js = _J(4, [(40, 30), (70001,), (1,)], torch.float32, dev)
    outs = [torch.full(j.shape[1:], 123.0, dtype=torch.bfloat16, device=dev) for j in Js]
    c = torch.tensor([0.5, -1.0, 2.0, 0.0])
    ret = ops.combine(Js, c, out=outs)
    assert all(r is o for r, o in zip(ret, outs))
    for o, w in zip(outs, ref.combine([j.cpu() for j in Js], c)):
        torch.testing.assert_close(o.cpu().float(), w.bfloat16().float(), atol=1e-2, rtol=1e-2)
    out1 = torch.empty(70001, device=dev)
    assert ops.combine(Js[1], c, out=out1) is out1
    torch.testing.assert_close(out1.cpu(), ref.combine(Js[1].cpu(), c), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_cosine_zero_gradient(backend):
    J = torch.zeros(3, 5000, device=_dev(backend))
    J[0, :10] = 1.0
    J[1, :10] = -2.0
    C = ops.cosine(J).cpu()
    torch.testing.assert_close(C, torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))


# ---------------------------------------------------------------------------------------------------
# weighted_grads (C++ extension op; the torch reference elsewhere)

WG_CASES = [  # M, out, in, K
    (100, 7, 9, 3), (64, 32, 16, 4), (1000, 1024, 3, 8), (1, 5, 4, 1), (513, 1, 1, 1), (300, 8, 40, 8),
]


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.id != "triton"] + [_backend_param("cpp_cuda")],
                         indirect=True)
@pytest.mark.parametrize("M,O,I,K", WG_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_weighted_grads(backend, M, O, I, K, dtype):
    g = torch.Generator().manual_seed(M + O)
    d, a = torch.randn(M, O, generator=g).to(dtype), torch.randn(M, I, generator=g).to(dtype)
    W = torch.randn(M, K, generator=g)
    dev = _dev(backend)
    G = ops.weighted_grads(d.to(dev), a.to(dev), W.to(dev))
    assert G.device.type == dev and ops.choose("weighted_grads", G.device) == ("cpp" if backend == "cpp_cuda" else backend)
    G = G.cpu()
    Gr = ref.weighted_grads(d, a, W)
    assert G.shape == (K, O, I) and G.dtype == dtype
    scale = Gr.double().abs().max().clamp_min(1e-6)
    tol = 1e-5 if dtype in (torch.float32, torch.float64) else 1e-2
    torch.testing.assert_close(G.double() / scale, Gr.double() / scale, atol=tol, rtol=tol)


# ---------------------------------------------------------------------------------------------------
# bad input: clear errors, the same for every backend


def test_kernel_module_constants_equal_themselves():
    """Compiled Triton (not the interpreter CI runs) re-checks every global a kernel reads by ``!=`` at each
    launch; a NaN constant never equals itself, so each launch after the first raised on the H200."""
    import importlib
    import math
    import pathlib

    tl = pytest.importorskip("triton.language")

    src = pathlib.Path(__file__).resolve().parents[1] / "kernel_src"
    for path in sorted(src.glob("*.py")):
        if path.stem == "__init__":
            continue
        mod = importlib.import_module(f"apex_fast.kernels.{path.stem}")
        for name, val in vars(mod).items():
            if isinstance(val, tl.constexpr) and isinstance(val.value, float):
                assert not math.isnan(val.value), f"{path.name}: constant {name} is NaN; fill masked loads with INF"


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_bad_input_errors(backend):
    dev = _dev(backend)
    R, ids = rewards(10, 2, 3, dev=dev)
    with pytest.raises(TypeError, match="R must be float"):
        ops.group_normalize(R.long(), ids)
    with pytest.raises(TypeError, match="group_ids must be int32/int64"):
        ops.group_normalize(R, ids.float())
    with pytest.raises(TypeError, match="group_ids must be int32/int64"):
        ops.group_normalize(R, ids.to(torch.uint8))
    with pytest.raises(ValueError, match="group_ids must be \\[N\\]"):
        ops.group_normalize(R, ids[:5])
    with pytest.raises(ValueError, match="R must be"):
        ops.group_normalize(R[None], ids)
    with pytest.raises(ValueError, match="std_floor"):
        ops.group_normalize(R, ids, std_floor=torch.ones(3))
    with pytest.raises(ValueError, match="std_floor must be finite and >= 0"):
        ops.group_normalize(R, ids, std_floor=-1.0)
    with pytest.raises(ValueError, match="weights must be \\[K=2\\]"):
        ops.dual_stage_advantages(R, ids, torch.ones(3))
    with pytest.raises(ValueError, match="R must be \\[N, K\\]"):
        ops.dual_stage_advantages(R[:, 0], ids, torch.ones(1))
    # more rows than int32 indexing allows (an expanded view: no memory is allocated)
    big = torch.zeros(1, device=dev).expand(2**31)
    with pytest.raises(ValueError, match="int32"):
        ops.group_normalize(big, torch.zeros(1, dtype=torch.long, device=dev).expand(2**31))

    J = torch.randn(4, 100, device=dev)
    with pytest.raises(ValueError, match="contiguous"):
        ops.gram(J.T.contiguous().T)
    with pytest.raises(ValueError, match="contiguous"):
        ops.gram([J[:, ::2]])
    with pytest.raises(ValueError, match="expected K = 4"):
        ops.gram([J, torch.randn(3, 10, device=dev)])
    with pytest.raises(TypeError, match="share a dtype"):
        ops.gram([J, torch.randn(4, 10, device=dev).double()])
    with pytest.raises(TypeError, match="float16/bfloat16/float32/float64"):
        ops.gram([J.int()])
    with pytest.raises(ValueError, match="empty list"):
        ops.gram([])
    with pytest.raises(ValueError, match="\\[K, P\\]"):
        ops.gram(torch.randn(100, device=dev))
    with pytest.raises(ValueError, match="c must be \\[K=4\\]"):
        ops.combine(J, torch.ones(3))
    with pytest.raises(ValueError, match="shape"):
        ops.combine([J], torch.ones(4), out=[torch.empty(99, device=dev)])
    with pytest.raises(ValueError, match="contiguous"):
        ops.combine(J, torch.ones(4), out=torch.empty(200, device=dev)[::2])
    with pytest.raises(ValueError, match="out has 2 tensors"):
        ops.combine([J], torch.ones(4), out=[torch.empty(100, device=dev)] * 2)

    d, a, W = torch.randn(8, 3, device=dev), torch.randn(8, 5, device=dev), torch.randn(8, 2, device=dev)
    with pytest.raises(TypeError, match="share a dtype"):
        ops.weighted_grads(d, a.double(), W)
    with pytest.raises(ValueError, match="same number of rows"):
        ops.weighted_grads(d, a[:7], W)
    with pytest.raises(ValueError, match="contiguous"):
        ops.weighted_grads(d.T.contiguous().T, a, W)
    with pytest.raises(TypeError, match="W must be float"):
        ops.weighted_grads(d, a, W.long())


# ---------------------------------------------------------------------------------------------------
# dispatch


def test_default_dispatch(monkeypatch):
    monkeypatch.delenv("APEX_FAST_BACKEND", raising=False)
    want = "cpp" if _backend.cpp_ops() is not None else "torch"
    for op in ("group_normalize", "dual_stage_advantages", "gram", "combine", "weighted_grads"):
        assert ops.choose(op, torch.device("cpu")) == want


def test_cuda_dispatch_without_a_gpu(monkeypatch):
    """The CUDA choice is a table lookup made before any CUDA call: weighted_grads goes to cuBLAS (the
    measured faster path), never to a Triton kernel it does not have, unless a backend is forced."""
    monkeypatch.delenv("APEX_FAST_BACKEND", raising=False)
    cuda = torch.device("cuda")
    assert ops.choose("weighted_grads", cuda) == "torch"
    monkeypatch.setenv("APEX_FAST_BACKEND", "triton")
    assert ops.choose("weighted_grads", cuda) == "torch"  # no Triton kernel: its default stays


def test_forced_backend_errors(monkeypatch):
    monkeypatch.setenv("APEX_FAST_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="APEX_FAST_BACKEND"):
        ops.gram(torch.randn(2, 3))
    monkeypatch.setenv("APEX_FAST_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if _backend.triton_available():
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            ops.gram(torch.randn(2, 3))
    # weighted_grads has no Triton kernel: a forced triton keeps its default
    ops.weighted_grads(torch.randn(3, 2), torch.randn(3, 2), torch.randn(3, 1))
    monkeypatch.setenv("APEX_FAST_BACKEND", "cpp")
    monkeypatch.setitem(_backend._cache, "cpp", None)
    monkeypatch.setitem(_backend._cache, "cpp_error", "simulated: not built")
    with pytest.raises(RuntimeError, match="not available.*simulated"):
        ops.gram(torch.randn(2, 3))


def _run(code, **env):
    e = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    e.update(env)
    e.pop("APEX_FAST_BACKEND", None)
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=e, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_works_without_triton_and_without_extension():
    out = _run("""
        import sys
        sys.modules["triton"] = None          # import triton -> ImportError
        sys.modules["apex_fast._C"] = None    # extension not built
        import torch
        from apex_fast import ops
        b = ops.available_backends()
        assert not b["cpp"], b
        R = torch.randn(20, 3); ids = torch.arange(20) % 4
        ops.group_normalize(R, ids); ops.dual_stage_advantages(R, ids, torch.ones(3) / 3)
        J = [torch.randn(3, 10), torch.randn(3, 4, 4)]
        ops.gram(J); ops.cosine(J); ops.combine(J, torch.ones(3))
        ops.weighted_grads(torch.randn(5, 2), torch.randn(5, 3), torch.randn(5, 3))
        print("ok", ops.choose("gram", torch.device("cpu")))
    """)
    assert "ok torch" in out


@pytest.mark.skipif(_backend.cpp_ops() is None, reason="apex_fast._C is not built")
@pytest.mark.parametrize("stage", ["", "1"], ids=["direct", "staged"])
def test_cpp_multithreaded_matches_reference(stage):
    """The OpenMP paths (per-thread partial Grams reduced in thread order) with 2 threads; 'staged'
    forces the row-by-row path used for rows whose stride aliases in DRAM."""
    _run("""
        import torch
        from apex_fast import ops
        from apex_fast.ops import reference as ref
        torch.manual_seed(0)
        J = [torch.randn(4, 300001), torch.randn(4, 77, 999)]
        M = ops.gram(J); Mr = ref.gram(J)
        torch.testing.assert_close(M / Mr.abs().max(), Mr / Mr.abs().max(), atol=2e-5, rtol=2e-5)
        assert torch.equal(M, ops.gram(J)), "deterministic"
        c = torch.randn(4)
        for x, y in zip(ops.combine(J, c), ref.combine(J, c)):
            torch.testing.assert_close(x, y, atol=2e-5, rtol=2e-5)
        d, a, W = torch.randn(3000, 64), torch.randn(3000, 300), torch.randn(3000, 4)
        G = ops.weighted_grads(d, a, W); Gr = ref.weighted_grads(d, a, W)
        torch.testing.assert_close(G, Gr, atol=1e-3, rtol=1e-4)
        outs = [torch.zeros(300001, dtype=torch.bfloat16), torch.zeros(77, 999, dtype=torch.bfloat16)]
        for x, y in zip(ops.combine(J, c, out=outs), ref.combine(J, c)):
            torch.testing.assert_close(x.float(), y.bfloat16().float(), atol=2e-2, rtol=2e-2)
        Jh = [j.half() for j in J]
        Mh = ops.gram(Jh); Mhr = ref.gram(Jh)
        torch.testing.assert_close(Mh / Mhr.abs().max(), Mhr / Mhr.abs().max(), atol=1e-4, rtol=1e-4)
    """, OMP_NUM_THREADS="2", APEX_FAST_STAGE=stage)


@pytest.mark.skipif(not _backend.triton_available(), reason="triton is not installed")
def test_triton_kernels_compile_for_sm90():
    """The interpreter does not catch compiled-mode errors: compile every kernel variant for sm_90
    ahead of time (no GPU needed), with no register spills and vector loads where data is aligned."""
    e = dict(os.environ, PYTHONPATH=ROOT, TRITON_DEFAULT_FP_FUSION="1")
    e.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "kernel_src", "aot.py"), "--arch", "90"], env=e, capture_output=True,
                       text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all 11 kernel variants compiled" in r.stdout
