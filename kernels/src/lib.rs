//! CubeCL kernels of longview. Today: flash attention (forward with log-sum-exp,
//! FlashAttention-2 style backward) for `[B, H, S, D]` tensors with grouped-query
//! heads, causal masks at arbitrary global offsets of the query and key blocks (what
//! ring attention steps need), packed variable-length sequences, and the merge of
//! partial `(O, LSE)` results. Runtime-agnostic: the host functions take a cubecl
//! [`Client`](cubecl::client::Client) of any runtime (wgpu in CI, CUDA on GPUs).

#[cfg(all(feature = "burn", any(feature = "wgpu", feature = "cuda")))]
pub mod burn_op;
#[cfg(all(feature = "burn", any(feature = "wgpu", feature = "cuda")))]
pub mod decode_graph;
#[cfg(all(feature = "burn", feature = "cuda"))]
pub mod device_memory;
pub mod env_switch;
pub mod flash;
#[cfg(all(feature = "burn", any(feature = "wgpu", feature = "cuda")))]
pub mod fused;
#[cfg(feature = "cuda")]
pub mod gemm;
pub mod reference;
#[cfg(feature = "cuda")]
pub mod wgmma;

pub use flash::{
    AttnError, DeviceTensor, FlashKernel, FlashOptions, flash_backward, flash_backward_from_delta,
    flash_backward_with, flash_decode_sliced, flash_forward, flash_forward_with, merge_partials,
    tensor_cores_unsupported,
};
