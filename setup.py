"""setup.py exists for what pyproject.toml cannot say: the top-level kernels/ folder installed as
``apex_fast.kernels`` and the optional csrc/ C++ extension (built with
``pip install -e . --no-build-isolation`` so it links against the torch already installed)."""
import os

from setuptools import find_packages, setup


def ext_modules():
    # seam for the csrc/ extension (see csrc/README): built only when torch is importable at build time
    return [], {}


exts, cmdclass = ext_modules()
setup(
    packages=find_packages(include=["apex_fast", "apex_fast.*"]) + ["apex_fast.kernels"],
    package_dir={"apex_fast.kernels": "kernels"},
    ext_modules=exts,
    cmdclass=cmdclass,
)
