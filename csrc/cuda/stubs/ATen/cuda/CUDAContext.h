// Syntax-check stub ONLY (used by .ci/build_ext.sh on machines whose torch has no CUDA headers):
// lets `g++ -fsyntax-only csrc/cuda_binding.cpp` check the binding against the CPU torch headers.
// Never on a real build's include path.
#pragma once
namespace at {
namespace cuda {
struct StubStream {
  void* stream() const { return nullptr; }
};
inline StubStream getCurrentCUDAStream() { return {}; }
}  // namespace cuda
}  // namespace at
