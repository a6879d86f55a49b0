// Error types of the native extension. bindings.cpp turns each into a Python
// exception class, so nothing here ever exits or aborts the interpreter.
#pragma once
#include <stdexcept>
#include <string>

namespace vattn {

// The page pool cannot back what a step asks for (Python: OutOfPagesError, a MemoryError).
struct OutOfPages : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A CUDA driver call failed or libcuda.so.1 is missing (Python: CudaError, a RuntimeError).
struct CudaError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// An OS call (mmap, memfd_create, ...) failed (Python: OSError).
struct SystemError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

}  // namespace vattn
