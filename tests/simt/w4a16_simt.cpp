// The W4A16 CUDA kernels (csrc/w4a16/w4a16_gemm.cu and w4a16_dequant.cu, the very sources nvcc builds)
// compiled for the host and run by the CPU executor of simt.h. Test machinery, not part of the extension:
// tests/test_w4a16_simt.py builds it with AddressSanitizer and with ThreadSanitizer (include path: csrc/ and
// tests/) and drives it.
//
//   w4a16_simt gemm DIR DTYPE M N K SM_COUNT COPIES SEED BIAS
//       DTYPE f16 | bf16; COPIES late | early (simt::Options::late_copies); SEED the block order (0: grid
//       order); BIAS 0 | 1. Reads DIR/x.bin ([M, K] DTYPE), DIR/w.bin (kernel_packed int32 [K/16, 2N]),
//       DIR/scales.bin (kernel_scales [K/128, N] DTYPE), DIR/bias.bin (float32 [N], if BIAS); plans the
//       launch with make_plan for a GPU of SM_COUNT SMs, runs grace_kernels::w4a16::launch, writes
//       DIR/out.bin ([M, N] DTYPE) and prints one JSON line: the plan, and the access accounting of
//       simt::stats() (cp.async and plain accesses per site the kernel names, ldmatrix).
//   w4a16_simt dequant DIR DTYPE N K SEED
//       Reads DIR/w.bin and DIR/scales.bin as above, runs grace_kernels::w4a16::launch_dequantize (blocks in
//       SEED's order), writes DIR/out.bin (W [N, K] DTYPE) and prints one JSON line: its shared memory and
//       the access accounting (the plain loads and stores of grace_kernels::mem per named site).
//   w4a16_simt selftest NAME
//       Runs a deliberately broken kernel, to show that the executor catches that kind of bug: race (a
//       shared-memory read without __syncthreads; ThreadSanitizer reports it), early-read (a cp.async
//       destination read before its wait_group; prints the poison it saw), divergent (half a warp at
//       ldmatrix, half at mma), overflow (a cp.async past the launched shared memory), opt-in (a launch
//       over 48 KB of shared memory without the opt-in attribute), strided (uncoalesced and
//       bank-conflicted accesses; prints their accounting).
#define GRACE_SIMT 1

#include <cinttypes>
#include <fstream>
#include <string>

#include "w4a16/w4a16_dequant.cu"
#include "w4a16/w4a16_gemm.cu"

namespace {

using grace_kernels::w4a16::Dtype;
using grace_kernels::w4a16::Plan;

// A 16-byte-aligned heap buffer of exactly `bytes` (so AddressSanitizer sees one byte past the end).
struct Buffer {
  explicit Buffer(size_t n) : bytes(n), data(std::aligned_alloc(16, (n + 15) / 16 * 16)) {
    if (data == nullptr) simt::fail("out of memory (%zu bytes)", n);
  }
  ~Buffer() { std::free(data); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  template <typename T>
  T* as() const {
    return static_cast<T*>(data);
  }
  size_t bytes;
  void* data;
};

std::unique_ptr<Buffer> read_file(const std::string& path, size_t bytes) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  if (!f) simt::fail("cannot open %s", path.c_str());
  if (static_cast<size_t>(f.tellg()) != bytes) {
    simt::fail("%s holds %lld bytes, expected %zu", path.c_str(), static_cast<long long>(f.tellg()), bytes);
  }
  auto buf = std::make_unique<Buffer>(bytes);
  f.seekg(0);
  f.read(buf->as<char>(), static_cast<std::streamsize>(bytes));
  return buf;
}

// The access accounting of simt::stats() as JSON members: "cp_async": [per call site], "ldmatrix": {...}.
void print_access() {
  const simt::Stats& st = simt::stats();
  std::printf("\"cp_async\": [");
  const char* sep = "";
  for (const auto& [site, c] : st.cp_async) {
    std::printf("%s{\"site\": \"%s\", \"instructions\": %ld, \"bytes\": %ld, \"sectors\": %ld, "
                "\"smem_wavefronts\": %ld, \"smem_ideal\": %ld}",
                sep, site.c_str(), c.instructions, c.bytes, c.sectors, c.smem_wavefronts, c.smem_ideal);
    sep = ", ";
  }
  std::printf("], \"plain\": [");
  sep = "";
  for (const auto& [site, a] : st.plain) {
    std::printf("%s{\"site\": \"%s\", \"space\": \"%s\", \"op\": \"%s\", \"instructions\": %ld, "
                "\"bytes\": %ld, \"sectors\": %ld, \"wavefronts\": %ld, \"ideal\": %ld}",
                sep, site.c_str(), a.shared ? "shared" : "global", a.store ? "store" : "load", a.instructions, a.bytes,
                a.sectors, a.wavefronts, a.ideal);
    sep = ", ";
  }
  std::printf("], \"ldmatrix\": {\"instructions\": %ld, \"wavefronts\": %ld}", st.ldmatrix_instructions,
              st.ldmatrix_wavefronts);
}

int run_gemm(char** argv) {
  const std::string dir = argv[0], dtype = argv[1], copies = argv[6];
  const int M = std::stoi(argv[2]), N = std::stoi(argv[3]), K = std::stoi(argv[4]), sms = std::stoi(argv[5]);
  if (dtype != "f16" && dtype != "bf16") simt::fail("DTYPE must be f16 or bf16, got %s", dtype.c_str());
  if (copies != "late" && copies != "early") simt::fail("COPIES must be late or early, got %s", copies.c_str());
  simt::options().late_copies = copies == "late";
  simt::options().seed = static_cast<unsigned>(std::stoul(argv[7]));
  const bool has_bias = std::string(argv[8]) == "1";

  const auto x = read_file(dir + "/x.bin", size_t{2} * M * K);
  const auto w = read_file(dir + "/w.bin", size_t{4} * (K / 16) * 2 * N);
  const auto scales = read_file(dir + "/scales.bin", size_t{2} * (K / 128) * N);
  const auto bias = has_bias ? read_file(dir + "/bias.bin", size_t{4} * N) : nullptr;
  Buffer out(size_t{2} * M * N);
  std::memset(out.data, 0xFF, out.bytes);  // NaN: an element never written shows

  const Plan plan = grace_kernels::w4a16::make_plan(M, N, K, sms);
  std::unique_ptr<Buffer> workspace;
  if (plan.splits > 1) {
    workspace = std::make_unique<Buffer>(size_t{4} * plan.splits * M * N);
    std::memset(workspace->data, 0xFF, workspace->bytes);
  }
  const cudaError_t err = grace_kernels::w4a16::launch(
      plan, dtype == "f16" ? Dtype::kHalf : Dtype::kBFloat16, x->data, w->as<int32_t>(), scales->data,
      bias ? bias->as<float>() : nullptr, workspace ? workspace->as<float>() : nullptr, out.data, M, N, K, nullptr);
  if (err != cudaSuccess) simt::fail("launch returned cudaError %d", static_cast<int>(err));

  std::ofstream f(dir + "/out.bin", std::ios::binary);
  f.write(out.as<char>(), static_cast<std::streamsize>(out.bytes));
  std::printf("{\"plan\": {\"m_blocks\": %d, \"m_tiles\": %d, \"n_blocks\": %d, \"splits\": %d, "
              "\"iters_per_split\": %d, \"shared_bytes\": %d}, ",
              plan.m_blocks, plan.m_tiles, plan.n_blocks, plan.splits, plan.iters_per_split,
              grace_kernels::w4a16::shared_bytes(plan.m_blocks));
  print_access();
  std::printf("}\n");
  return 0;
}

int run_dequant(char** argv) {
  const std::string dir = argv[0], dtype = argv[1];
  const int N = std::stoi(argv[2]), K = std::stoi(argv[3]);
  if (dtype != "f16" && dtype != "bf16") simt::fail("DTYPE must be f16 or bf16, got %s", dtype.c_str());
  simt::options().seed = static_cast<unsigned>(std::stoul(argv[4]));
  const auto w = read_file(dir + "/w.bin", size_t{4} * (K / 16) * 2 * N);
  const auto scales = read_file(dir + "/scales.bin", size_t{2} * (K / 128) * N);
  Buffer out(size_t{2} * N * K);
  std::memset(out.data, 0xFF, out.bytes);
  const cudaError_t err = grace_kernels::w4a16::launch_dequantize(
      dtype == "f16" ? Dtype::kHalf : Dtype::kBFloat16, w->as<int32_t>(), scales->data, out.data, N, K, nullptr);
  if (err != cudaSuccess) simt::fail("launch returned cudaError %d", static_cast<int>(err));
  std::ofstream f(dir + "/out.bin", std::ios::binary);
  f.write(out.as<char>(), static_cast<std::streamsize>(out.bytes));
  std::printf("{\"shared_bytes\": %d, ", grace_kernels::w4a16::dequantize_shared_bytes());
  print_access();
  std::printf("}\n");
  return 0;
}

// ------------------------------------------------------------------------------------- broken kernels

__global__ void race_kernel(float* out) {
  float* s = grace_kernels::rt::dynamic_smem<float>();
  if (threadIdx.x == 0) s[0] = 1.f;
  out[threadIdx.x] = s[0];  // no __syncthreads between the write and the reads
}

__global__ void early_read_kernel(const int4* in, uint32_t* out) {
  int4* s = grace_kernels::rt::dynamic_smem<int4>();
  grace_kernels::ptx::cp_async(s + threadIdx.x, in + threadIdx.x, true, "copy");
  grace_kernels::ptx::cp_async_commit();
  out[threadIdx.x] = static_cast<uint32_t>(s[threadIdx.x].x);  // before cp_async_wait
  grace_kernels::ptx::cp_async_wait<0>();
}

__global__ void divergent_kernel() {
  int4* s = grace_kernels::rt::dynamic_smem<int4>();
  uint32_t r[4] = {};
  float c[4] = {};
  if (threadIdx.x % 32 < 16) {
    grace_kernels::ptx::ldmatrix_x4(r, s + threadIdx.x % 32);
  } else {
    grace_kernels::ptx::mma_m16n8k16<__half>(c, r, 0, 0);
  }
}

__global__ void overflow_kernel(const int4* in) {
  int4* s = grace_kernels::rt::dynamic_smem<int4>();
  grace_kernels::ptx::cp_async(s + threadIdx.x + 1, in, true, "copy");  // one chunk past the end for the last thread
  grace_kernels::ptx::cp_async_commit();
  grace_kernels::ptx::cp_async_wait<0>();
}

__global__ void noop_kernel() {}

// Lane l copies the 16 bytes at 64 l (half of every 32-byte sector wasted) into shared chunk 8 l (all
// lanes of a phase in one bank group), then ldmatrix reads rows 128 bytes apart (the same again). Then the
// same mistakes with plain accesses: lane l loads the word at 64 l bytes (one sector per 4 bytes) and
// stores it to shared word 32 l (every lane in bank 0).
__global__ void strided_kernel(const int4* in) {
  int4* s = grace_kernels::rt::dynamic_smem<int4>();
  grace_kernels::ptx::cp_async(s + 8 * threadIdx.x, in + 4 * threadIdx.x, true, "strided_copy");
  grace_kernels::ptx::cp_async_commit();
  grace_kernels::ptx::cp_async_wait<0>();
  uint32_t r[4];
  grace_kernels::ptx::ldmatrix_x4(r, s + 8 * threadIdx.x);
  __syncthreads();
  const uint32_t v = grace_kernels::mem::load(reinterpret_cast<const uint32_t*>(in + 4 * threadIdx.x), "strided_load");
  grace_kernels::mem::store(reinterpret_cast<uint32_t*>(s) + 32 * threadIdx.x, v, "conflicted_store");
}

int run_selftest(const std::string& name) {
  using grace_kernels::rt::launch;
  Buffer in(16 * 128), out(4 * 64);
  for (int i = 0; i < 64 * 4; ++i) in.as<int32_t>()[i] = i;
  cudaError_t err = cudaSuccess;
  if (name == "race") {
    err = launch(race_kernel, dim3(1), dim3(64), 16, nullptr, out.as<float>());
  } else if (name == "early-read") {
    err = launch(early_read_kernel, dim3(1), dim3(64), 64 * 16, nullptr, in.as<const int4>(), out.as<uint32_t>());
    std::printf("thread 1 read 0x%08" PRIx32 " (the source holds 0x%08" PRIx32 ")\n", out.as<uint32_t>()[1],
                static_cast<uint32_t>(in.as<int32_t>()[4]));
  } else if (name == "divergent") {
    err = launch(divergent_kernel, dim3(1), dim3(32), 32 * 16, nullptr);
  } else if (name == "overflow") {
    err = launch(overflow_kernel, dim3(1), dim3(64), 64 * 16, nullptr, in.as<const int4>());
  } else if (name == "strided") {
    err = launch(strided_kernel, dim3(1), dim3(32), 32 * 8 * 16, nullptr, in.as<const int4>());
    std::printf("{");
    print_access();
    std::printf("}\n");
    return err == cudaSuccess ? 0 : 1;
  } else if (name == "opt-in") {
    err = launch(noop_kernel, dim3(1), dim3(32), 64 * 1024, nullptr);
    std::printf("launch with 64 KB of shared memory and no opt-in: cudaError %d\n", static_cast<int>(err));
    return 0;
  } else {
    simt::fail("unknown selftest %s", name.c_str());
  }
  if (err != cudaSuccess) simt::fail("launch returned cudaError %d", static_cast<int>(err));
  std::printf("selftest %s finished\n", name.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  if (mode == "gemm" && argc == 11) return run_gemm(argv + 2);
  if (mode == "dequant" && argc == 7) return run_dequant(argv + 2);
  if (mode == "selftest" && argc == 3) return run_selftest(argv[2]);
  std::fprintf(stderr,
               "usage: w4a16_simt gemm DIR DTYPE M N K SM_COUNT COPIES SEED BIAS\n"
               "       w4a16_simt dequant DIR DTYPE N K SEED\n"
               "       w4a16_simt selftest race|early-read|divergent|overflow|opt-in|strided\n");
  return 2;
}
