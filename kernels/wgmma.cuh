// wgmma.cuh — warpgroup-level bf16 tensor-core products for Hopper (sm_90a: wgmma.mma_async), the form the
// attention's sm_90 kernels (kernels/attention.cuh) are written with, and the 128-byte-swizzled shared-memory tiles
// they read their operands from.
//
// A warpgroup is 4 consecutive warps (128 threads, the first warp's index a multiple of 4). One wgmma multiplies
// A (64 × 16) by B (16 × N) into a 64 × N fp32 accumulator spread over the warpgroup: warp w of the group holds rows
// 16w .. 16w+15, in exactly the layout of mma.sync m16n8k16's accumulators (kernels/mma.cuh) repeated over the N/8
// column tiles: d[n][0..3] are rows g, g, g+8, g+8 (g = lane / 4) at columns 8n + c, c+1, c, c+1 (c = 2·(lane % 4)).
// A comes from shared memory (a descriptor) or from registers, where warp w's 16 rows are an mma.sync A fragment
// (mma::to_a turns accumulators into one); B always comes from shared memory. So the code written for mma.sync's
// fragments (the online softmax on a warp's 16 rows, P as the next product's A operand) carries over unchanged: a
// warp's 16 rows of a wgmma accumulator are its mma.sync tiles.
//
// Against mma.sync: one instruction per warpgroup does 64 × N × 16 (mma.sync: 16 × 8 × 16 a warp), B is read by the
// tensor cores from shared memory directly (no ldmatrix into registers), and the product runs asynchronously: it is
// issued, committed as a group, and waited for (wait<n>: at most n groups in flight) before its accumulators are read.
//
// Shared-memory tiles (the "128-byte swizzle" canonical layout): rows of 64 bf16 values (128 bytes); the 16-byte
// chunk c of row r is stored at chunk position c ^ (r % 8), so that 8 rows read at the same column hit 8 different
// bank groups; a tile wider than 64 columns is stored as consecutive slabs of 64 columns (all rows of columns 0-63,
// then all rows of 64-127). The hardware applies the XOR to address bits, so a tile must start 1024-byte aligned.
// Its descriptor gives the start address and two strides in bytes: for a K-major operand (the 16 k values of a row
// contiguous: Q or K rows as the A or B of S = Q Kᵀ) SBO = 1024, the step between groups of 8 rows, and each k step
// of 16 moves the start by 32 bytes inside the row (the XOR still lands right); for an MN-major operand (V as the B
// of P V: row = k, the N values contiguous) SBO = 1024 is the step between groups of 8 k rows and LBO the step
// between 64-column slabs.
//
// The instructions exist on sm_90a only (the Makefile builds for it). Compiled for any other target the products
// trap, and wgmma::available() (a flag the device code was compiled with) tells the host not to launch them: a build
// for another GPU, or one that also embeds plain compute_90 PTX (nvcc's -arch=sm_90a does) and JIT-compiles it on a
// newer GPU, runs the mma.sync kernels.
#pragma once
#include <cstdint>          // uint32_t, uint64_t
#include <cuda.h>           // CUtensorMap and its enums (the tensor maps of the TMA loads)
#include <cudaTypedefs.h>   // PFN_cuTensorMapEncodeTiled: the driver's encoder, fetched through the runtime
#include <cuda_bf16.h>      // __nv_bfloat16
#include "kernels/common.cuh"  // cudaCheck
#include "kernels/mma.cuh"  // smem_addr, cp_async16

namespace hl::gpu::wgmma {

using bf16 = __nv_bfloat16;

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define HL_WGMMA 1
static __device__ const int compiled = 1;
#else
static __device__ const int compiled = 0;
#endif

// Whether the device code running on the current device has the wgmma instructions (read once per process).
inline bool available() {
    static const int flag = [] {
        int dev = 0, major = 0;
        cudaCheck(cudaGetDevice(&dev));
        cudaCheck(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
        int v = 0;
        if (major == 9) cudaCheck(cudaMemcpyFromSymbol(&v, compiled, sizeof(int)));
        return v;
    }();
    return flag != 0;
}

// Element offset of (r, c) in a 128-byte-swizzled tile of R rows (see the header).
template <int R>
__host__ __device__ constexpr int sw128(int r, int c) {
    return (c / 64) * R * 64 + r * 64 + ((((c % 64) / 8) ^ (r % 8)) * 8) + c % 8;
}

// The copies a thread issues for a swizzled tile of R rows of a (B, T, heads, D) bf16 tensor (D a multiple of 64),
// all threads of the block taking part, eight consecutive threads a row's 128 bytes. The chunks a thread copies are
// the same for every tile, so their places in the tile and in global memory are worked out once, at construction;
// load() then starts the copies of the tile whose first row is `first` (one row of the tensor, (B·T + t)·heads +
// head rows in), rows at or past `rows` zero. Complete after the commit, wait and a __syncthreads.
template <int D, int R, int THREADS>
struct TileLoader {
    static_assert(D % 64 == 0 && (R * D / 8) % THREADS == 0, "wgmma::TileLoader: whole 128-byte rows per thread pass");
    static constexpr int N = R * D / 8 / THREADS;  // copies per thread
    int dst[N], src[N], row[N];
    __device__ explicit TileLoader(int heads) {
#pragma unroll
        for (int i = 0; i < N; i++) {
            const int idx = threadIdx.x + i * THREADS, slab = idx / (R * 8), r = (idx / 8) % R,
                      c = 64 * slab + (idx % 8) * 8;
            dst[i] = sw128<R>(r, c), src[i] = r * heads * D + c, row[i] = r;
        }
    }
    __device__ void load(bf16* tile, const bf16* first, int rows) const {
#pragma unroll
        for (int i = 0; i < N; i++) mma::cp_async16(tile + dst[i], first + (row[i] < rows ? src[i] : 0), row[i] < rows);
    }
};

// Shared-memory matrix descriptor of a swizzled tile starting at p (strides in bytes; see the header). The address
// field counts 16-byte units in its low 14 bits, so a descriptor plus a smaller offset in those units (k_step,
// mn_step, a buffer's size / 16) describes the operand that far along.
__device__ inline uint64_t desc(const bf16* p, uint32_t lbo, uint32_t sbo) {
    return (uint64_t)((mma::smem_addr(p) & 0x3FFFF) >> 4) | (uint64_t)(lbo >> 4) << 16 | (uint64_t)(sbo >> 4) << 32 |
           1ull << 62;  // layout type 1: 128-byte swizzle
}
// A K-major operand at p (its rows 16 k values each), and an MN-major one at p in a tile of R rows (k rows of N).
__device__ inline uint64_t desc_k(const bf16* p) { return desc(p, 16, 1024); }
template <int R>
__device__ inline uint64_t desc_mn(const bf16* p) { return desc(p, R * 64 * sizeof(bf16), 1024); }
// The k-th 16-wide k step, in 16-byte units: of a K-major operand in a tile of R rows (32 bytes along the row, then
// the next 64-column slab), and of an MN-major one (16 rows of 128 bytes).
template <int R>
__host__ __device__ constexpr uint64_t k_step(int k) { return ((k / 4) * R * 128 + (k % 4) * 32) / 16; }
__host__ __device__ constexpr uint64_t mn_step(int k) { return 16 * 128 * k / 16; }

// Before a batch of products: orders this thread's earlier register and shared-memory accesses before them.
// Closes the products issued since the last commit into one group. Waits until at most N groups are in flight.
// (Without sm_90a they compile to nothing: the products themselves trap.)
#ifdef HL_WGMMA
__device__ inline void fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ inline void commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ inline void wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
#else
__device__ inline void fence() {}
__device__ inline void commit() {}
template <int N>
__device__ inline void wait() {}
#endif
// Pins the values of registers at this point of the program: the compiler may otherwise move plain arithmetic on
// them past a wait (sinking a softmax behind the product it should overlap) or before one.
template <int N>
__device__ inline void fence_operand(float (&x)[N][4]) {
#pragma unroll
    for (int n = 0; n < N; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) asm volatile("" : "+f"(x[n][e])::"memory");
}
// Shared memory written by ordinary stores or cp.async, before the products read it (they read through the async
// proxy): each writing thread fences, then the block synchronises.
#ifdef HL_WGMMA
__device__ inline void fence_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
#else
__device__ inline void fence_smem() {}  // (sm_90 and later only; nothing reads through the async proxy here)
#endif

// Operand lists of the accumulators: d[0..N/8)[0..4) in order.
#define HL_WG_ACC4(n) "+f"(d[n][0]), "+f"(d[n][1]), "+f"(d[n][2]), "+f"(d[n][3])
#define HL_WG_ACC16 HL_WG_ACC4(0), HL_WG_ACC4(1), HL_WG_ACC4(2), HL_WG_ACC4(3)
#define HL_WG_ACC32 HL_WG_ACC16, HL_WG_ACC4(4), HL_WG_ACC4(5), HL_WG_ACC4(6), HL_WG_ACC4(7)
#define HL_WG_ACC64                                                                                                   \
    HL_WG_ACC32, HL_WG_ACC4(8), HL_WG_ACC4(9), HL_WG_ACC4(10), HL_WG_ACC4(11), HL_WG_ACC4(12), HL_WG_ACC4(13),        \
        HL_WG_ACC4(14), HL_WG_ACC4(15)
#define HL_WG_R16 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}"
#define HL_WG_R32                                                                                                     \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, " \
    "%24, %25, %26, %27, %28, %29, %30, %31}"
#define HL_WG_R64                                                                                                     \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, " \
    "%24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, "  \
    "%46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"

// d (64 × N) = (accumulate ? d : 0) + A (64 × 16) · B (16 × N), A from registers (this warp's 16 rows as an
// mma.sync A fragment), B from shared memory: K-major (TRANS_B = 0: B's N rows of 16 k values, as Kᵀ) or MN-major
// (TRANS_B = 1: 16 rows of N values, as V).
template <int N, int TRANS_B>
__device__ inline void mma_rs(float (&d)[N / 8][4], const uint32_t (&a)[4], uint64_t b, int accumulate) {
#ifdef HL_WGMMA
    static_assert(N == 32 || N == 64 || N == 128, "wgmma::mma_rs: N of 32, 64 or 128");
    if constexpr (N == 32)
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 " HL_WG_R16
                     ", {%16, %17, %18, %19}, %20, p, 1, 1, %22;\n}\n"
                     : HL_WG_ACC16
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate), "n"(TRANS_B));
    else if constexpr (N == 64)
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " HL_WG_R32
                     ", {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
                     : HL_WG_ACC32
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate), "n"(TRANS_B));
    else
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " HL_WG_R64
                     ", {%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"
                     : HL_WG_ACC64
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate), "n"(TRANS_B));
#else
    (void)d, (void)a, (void)b, (void)accumulate;
    __trap();
#endif
}

// The same with A (64 × 16, K-major) from shared memory too.
template <int N, int TRANS_B>
__device__ inline void mma_ss(float (&d)[N / 8][4], uint64_t a, uint64_t b, int accumulate) {
#ifdef HL_WGMMA
    static_assert(N == 32 || N == 64 || N == 128, "wgmma::mma_ss: N of 32, 64 or 128");
    if constexpr (N == 32)
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 " HL_WG_R16
                     ", %16, %17, p, 1, 1, 0, %19;\n}\n"
                     : HL_WG_ACC16
                     : "l"(a), "l"(b), "r"(accumulate), "n"(TRANS_B));
    else if constexpr (N == 64)
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " HL_WG_R32
                     ", %32, %33, p, 1, 1, 0, %35;\n}\n"
                     : HL_WG_ACC32
                     : "l"(a), "l"(b), "r"(accumulate), "n"(TRANS_B));
    else
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " HL_WG_R64
                     ", %64, %65, p, 1, 1, 0, %67;\n}\n"
                     : HL_WG_ACC64
                     : "l"(a), "l"(b), "r"(accumulate), "n"(TRANS_B));
#else
    (void)d, (void)a, (void)b, (void)accumulate;
    __trap();
#endif
}
// ---------------------------------------------------------------------------------------------------------
// Tile loads by the tensor memory accelerator (TMA) and the shared-memory barriers that count their bytes
// ---------------------------------------------------------------------------------------------------------
// A warp-specialised kernel has one thread issue each tile's copy as a single instruction
// (cp.async.bulk.tensor): the TMA unit walks a tensor map (the global tensor's sizes and strides, and the box it
// copies), writes the box into shared memory already 128-byte-swizzled, and reports the bytes it wrote to an
// mbarrier. The threads that multiply wait on that barrier's phase; when done with a buffer they arrive on a
// second barrier, which the loading thread waits on before it refills it. Nothing here is a __syncthreads, and
// the tiles need no proxy fence: the TMA writes them through the same async proxy the products read them by.
//
// An mbarrier completes a phase when `count` arrivals have been made and every byte announced (expect) has landed;
// wait(parity) returns once the phase of that parity is complete. A freshly made barrier counts as having completed
// a phase of parity 1, so a producer's first wait on an empty buffer (parity 1) passes at once.

// Tensor map of a (B, T, heads, D) bf16 tensor for boxes of `rows` rows of one head's 64 columns (one 128-byte
// swizzled slab; a D = 128 head is two boxes): dims (heads·D, T, B), so rows past a sequence's end read zeros, not
// the next sequence. Encoded on the host per call (a few µs; the pointer differs per layer).
inline CUtensorMap tensor_map_rows(const bf16* base, int B, int T_, int heads, int D, int rows) {
    static PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
        void* fn = nullptr;
        cudaDriverEntryPointQueryResult found{};
        cudaCheck(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found));
        HL_CHECK(fn != nullptr && found == cudaDriverEntryPointSuccess, "TMA: the driver has no cuTensorMapEncodeTiled");
        return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
    }();
    HL_CHECK(reinterpret_cast<uintptr_t>(base) % 16 == 0 && D % 64 == 0 && rows <= 256,
             "TMA: tensors 16-byte aligned, heads of 64·k columns, boxes of at most 256 rows");
    CUtensorMap map;
    const cuuint64_t dims[3] = {(cuuint64_t)heads * D, (cuuint64_t)T_, (cuuint64_t)B};
    const cuuint64_t strides[2] = {(cuuint64_t)heads * D * sizeof(bf16), (cuuint64_t)T_ * heads * D * sizeof(bf16)};
    const cuuint32_t box[3] = {64, (cuuint32_t)rows, 1}, unit[3] = {1, 1, 1};
    const CUresult r = encode(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, const_cast<bf16*>(base), dims, strides, box,
                              unit, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                              CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    HL_CHECK(r == CUDA_SUCCESS, "TMA: cuTensorMapEncodeTiled failed (", (int)r, ")");
    return map;
}

#ifdef HL_WGMMA
__device__ inline void bar_init(uint64_t* bar, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(mma::smem_addr(bar)), "r"(count));
}
// After the barriers are made, before other threads (and the TMA unit) use them.
__device__ inline void bar_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
// One arrival that also announces `bytes` still to land (the loading thread, before it issues the copies).
__device__ inline void bar_expect(uint64_t* bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(mma::smem_addr(bar)), "r"(bytes)
                 : "memory");
}
__device__ inline void bar_arrive(uint64_t* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(mma::smem_addr(bar)) : "memory");
}
__device__ inline void bar_wait(uint64_t* bar, uint32_t parity) {
    asm volatile(
        "{\n.reg .pred done;\nWAIT_%=:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT_%=;\n}\n" ::"r"(mma::smem_addr(bar)),
        "r"(parity)
        : "memory");
}
// The box of `map` at (column, row, batch) into the swizzled tile at dst (1024-byte aligned), counted on bar.
__device__ inline void load_box(bf16* dst, const CUtensorMap* map, uint64_t* bar, int col, int row, int batch) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], [%2];\n" ::
            "r"(mma::smem_addr(dst)),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(mma::smem_addr(bar)), "r"(col), "r"(row), "r"(batch)
        : "memory");
}
// Registers a warpgroup gives up (the loading one) or takes (the multiplying ones); every warp of the group executes it.
template <int N>
__device__ inline void regs_dec() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N)); }
template <int N>
__device__ inline void regs_inc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N)); }
#else
__device__ inline void bar_init(uint64_t*, uint32_t) { __trap(); }
__device__ inline void bar_init_fence() {}
__device__ inline void bar_expect(uint64_t*, uint32_t) { __trap(); }
__device__ inline void bar_arrive(uint64_t*) { __trap(); }
__device__ inline void bar_wait(uint64_t*, uint32_t) { __trap(); }
__device__ inline void load_box(bf16*, const CUtensorMap*, uint64_t*, int, int, int) { __trap(); }
template <int N>
__device__ inline void regs_dec() {}
template <int N>
__device__ inline void regs_inc() {}
#endif

#undef HL_WG_ACC4
#undef HL_WG_ACC16
#undef HL_WG_ACC32
#undef HL_WG_ACC64
#undef HL_WG_R16
#undef HL_WG_R32
#undef HL_WG_R64

}  // namespace hl::gpu::wgmma
