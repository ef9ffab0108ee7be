// Internal to //kernels/cuda: the MoE workspace layout and the tensor-core GEMM
// launchers (moe_tc.cu), shared with the launcher in moe.cu.
#ifndef KL_KERNELS_CUDA_MOE_INTERNAL_H_
#define KL_KERNELS_CUDA_MOE_INTERNAL_H_

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace kl::cuda::internal {

// Rows (routed token slots) per M tile of each algorithm; the sort kernel counts
// tiles with this granularity, so it must match the GEMM kernels.
constexpr int kMoeExactRows = 16;
constexpr int kMoeSkinnyRows = 16;
constexpr int kMoeTiledRows = 128;

// Upper bound on the M tiles of all experts together: Σ_e ceil(c_e / R) <=
// floor(S / R) + (number of non-empty experts) <= ceil(S / R) + min(E, S).
inline int64_t MoeMaxMTiles(int64_t slots, int64_t experts, int rows_per_tile) {
  return (slots + rows_per_tile - 1) / rows_per_tile + (experts < slots ? experts : slots);
}

// Device workspace views (S = T * k slots; "position" p = index in expert-sorted order).
struct MoeWorkspace {
  int32_t* offsets = nullptr;      // [E+1] first position of each expert; offsets[E] = routed slots
  int32_t* tile_off = nullptr;     // [E+1] first M tile of each expert; tile_off[E] = tiles
  // [max_m_tiles] per M tile: {expert, first position, rows (1..R), 0}, or expert -1
  // past the last tile. One 16-byte load tells a GEMM CTA what to do (or to exit).
  int4* tile_info = nullptr;
  int32_t* sorted_slot = nullptr;  // [S] slot s = t * k + j at position p (p < offsets[E])
  int32_t* slot_pos = nullptr;     // [S] position of slot s, -1 for an out-of-range id
  uint16_t* xb = nullptr;          // bf16 [T][D] copy of x (tensor-core paths only)
  void* h = nullptr;               // [S][I] SwiGLU output: fp32 (exact) or bf16 (tensor core)
  float* y = nullptr;              // fp32 [S][D] weighted down-projection per position
};

// What the GEMM kernels need besides the workspace.
struct MoeGemmArgs {
  int32_t T, D, I, E, topk;  // tokens, hidden, inter, experts, k
  const float* x;            // fp32 [T][D] (the exact path reads it directly)
  const void* const* w1;
  const void* const* w3;
  const void* const* w2;
  const float* topk_weights;
  int32_t max_m_tiles;  // grid.y of every GEMM launch
};


// Tensor-core gate+up and down GEMMs (bf16 weights); skinny: the decode path.
cudaError_t LaunchMoeTcGemms(const MoeGemmArgs& a, const MoeWorkspace& ws, bool skinny,
                             cudaStream_t stream);

}  // namespace kl::cuda::internal

#endif  // KL_KERNELS_CUDA_MOE_INTERNAL_H_
