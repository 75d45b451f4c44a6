//! The cuBLASLt linear layer (forward, dX, dW, bias gradient) on the GPU against
//! Burn's f32 linear on the CPU backend, every case of `longview_kernels::gemm::check::cases` (odd and
//! non-square sizes, both weight layouts, strided inputs), bf16 and f16.
//!
//! Needs a CUDA GPU; run on the device machine:
//!   cargo test -p longview-kernels --no-default-features --features burn,cuda \
//!     --test gemm -- --ignored
//! (the packaged CLI runs the same checks: `longview gemm --check --device cuda`).

use burn::tensor::{DType, Device};
use longview_kernels::gemm::check;

/// bf16 output rounding is 2^-9 relative; the reference accumulates in f32 in another
/// order. 1e-2 of the largest reference element bounds both with margin, and a wrong
/// transpose or layout misses by O(1).
const TOLERANCE: f32 = 1e-2;

#[test]
#[ignore = "needs a CUDA GPU (see the file's header for the command)"]
fn cublaslt_linear_matches_burn_f32_in_bf16_and_f16() {
    let device = Device::cuda(0).autodiff();
    let reference = Device::flex().autodiff();
    for dtype in [DType::BF16, DType::F16] {
        let results = check::run_all(dtype, &device, &reference, TOLERANCE)
            .unwrap_or_else(|e| panic!("{dtype:?}: {e}"));
        for (case, worst) in results {
            println!("{dtype:?} {case:?}: worst relative difference {worst:.2e}");
        }
    }
}
