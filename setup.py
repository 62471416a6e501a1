"""setup.py exists for what pyproject.toml cannot say: the top-level kernel_src/ folder installed as
``apex_fast.kernels`` and the optional csrc/ C++ extension (built with
``pip install -e . --no-build-isolation`` so it links against the torch already installed)."""
import os
import sys

from setuptools import find_packages, setup


def ext_modules():
    """The csrc/ extension ``apex_fast._C`` (torch.ops.apex_fast.*), see csrc/README.md.

    Built only when torch is importable at build time: a CppExtension (CPU kernels, OpenMP), or a
    CUDAExtension adding csrc/cuda/*.cu + csrc/cuda_binding.cpp where torch has CUDA and nvcc exists.
    A failed build only warns (the package falls back to the torch reference) unless
    APEX_FAST_REQUIRE_EXT=1 (CI). APEX_FAST_NO_EXT=1 skips it, APEX_FAST_NO_CUDA=1 builds CPU only,
    APEX_FAST_NATIVE=0 drops -march=native (set it when the build machine differs from the runner)."""
    if os.environ.get("APEX_FAST_NO_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except Exception as e:  # torch not installed in the build environment (e.g. build isolation)
        print(f"apex_fast: not building the C++ extension ({e})", file=sys.stderr)
        return [], {}
    require = os.environ.get("APEX_FAST_REQUIRE_EXT") == "1"
    cxx = ["-O3", "-fopenmp", "-fno-math-errno"]
    if os.environ.get("APEX_FAST_NATIVE", "1") == "1":
        cxx.append("-march=native")
    # rpath to torch's libs so `import apex_fast._C` also works before `import torch`
    link = ["-fopenmp", "-Wl,-rpath," + os.path.join(os.path.dirname(torch.__file__), "lib")]
    srcs = ["csrc/ops.cpp"]
    cuda = (torch.version.cuda is not None and ce.CUDA_HOME is not None
            and os.environ.get("APEX_FAST_NO_CUDA") != "1")
    if cuda:
        ext = ce.CUDAExtension(
            "apex_fast._C", srcs + ["csrc/cuda_binding.cpp", "csrc/cuda/weighted_grads.cu"],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]}, extra_link_args=link)
    else:
        ext = ce.CppExtension("apex_fast._C", srcs, extra_compile_args={"cxx": cxx}, extra_link_args=link)

    class OptionalBuildExt(ce.BuildExtension):
        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as e:
                if require:
                    raise
                print(f"apex_fast: WARNING: building {extension.name} failed ({e}); the ops fall back to "
                      "the torch reference. Set APEX_FAST_REQUIRE_EXT=1 to make this an error.", file=sys.stderr)

    return [ext], {"build_ext": OptionalBuildExt}


exts, cmdclass = ext_modules()
setup(
    packages=find_packages(include=["apex_fast", "apex_fast.*"]) + ["apex_fast.kernels"],
    package_dir={"apex_fast.kernels": "kernel_src"},
    ext_modules=exts,
    cmdclass=cmdclass,
)
