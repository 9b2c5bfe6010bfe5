// Prints the W4A16 GEMM's tiling constants (csrc/w4a16/w4a16.h, their one definition) as one JSON line, so
// that tests/test_w4a16_layout.py emulates the tiling the kernel is compiled with instead of a copy of it.
// Test machinery, built with g++ by that test (nothing is linked: the header only declares the launchers).
#include <cstdio>

#include "w4a16/w4a16.h"

int main() {
  namespace w = grace_kernels::w4a16;
  std::printf("{\"kThreads\": %d, \"kWarpsN\": %d, \"kWarpsK\": %d, \"kBlockN\": %d, \"kBlockK\": %d, "
              "\"kStages\": %d, \"kGroupSize\": %d}\n",
              w::kThreads, w::kWarpsN, w::kWarpsK, w::kBlockN, w::kBlockK, w::kStages, w::kGroupSize);
  return 0;
}
