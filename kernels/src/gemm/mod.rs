//! Matrix products at cuBLAS speed on the CUDA backend: cuBLASLt GEMMs on CubeCL's
//! buffers, queued on CubeCL's own stream (the patched cubecl-cuda hands it out with
//! a buffer's address, `third_party/cubecl-cuda/PATCH.md`), so no host
//! synchronisation separates them from CubeCL's kernels.
//!
//! [`linear`] is the layer the models call: `x op(W) + b` with its own backward (dX
//! and dW as two more GEMMs, the bias gradient the GEMM `1^T dY`). It runs cuBLASLt on CUDA
//! devices with bf16/f16 tensors and Burn's own `linear`/`matmul` everywhere else (the
//! CPU, wgpu, f32), so one model code serves every backend.
//!
//! Why a Burn backend extension and not Burn's `float_matmul`: the extension needs no
//! change to Burn (`float_matmul` lives in burn-cubecl and cannot call out of it
//! without patching that crate too), and owning the backward lets the weight
//! gradient be one GEMM over the flattened rows with the transposes folded into
//! cuBLAS's flags, where Burn's default backward transposes views and may copy them.
//!
//! Set `LONGVIEW_GEMM=burn` to run Burn's matmul on CUDA too (comparisons, or a
//! machine whose cuBLASLt does not load).

#[cfg(feature = "burn")]
mod burn_op;
#[cfg(feature = "burn")]
pub mod check;
pub mod cublaslt;

#[cfg(feature = "burn")]
pub use burn_op::{GemmBackend, Transposes, WeightLayout, applies, linear, matmul_2d};
pub use cublaslt::{GemmDtype, GemmError, RowMajorGemm};
