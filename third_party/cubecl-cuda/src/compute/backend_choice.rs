//! longview patch (not in the published crate): which of the two CUDA backends
//! compiles a given kernel, and NVRTC's fast-math option, chosen at run time so that
//! one binary can time both in the same process.

use crate::compiler::CudaBackend;

/// longview patch: the backend for the kernel whose Rust type name is `name`. With
/// `CUBECL_CUDA_CPP_KERNELS` set to a comma-separated list of substrings, a kernel whose
/// type name contains one of them is transpiled to CUDA C++ and compiled by NVRTC (`*`
/// matches every kernel); every other kernel keeps the crate's default backend.
pub(crate) fn backend_for_kernel(name: &str) -> CudaBackend {
    match std::env::var("CUBECL_CUDA_CPP_KERNELS") {
        Ok(list) if names_match(&list, name) => CudaBackend::Cpp,
        _ => CudaBackend::default(),
    }
}

fn names_match(list: &str, name: &str) -> bool {
    list.split(',')
        .map(str::trim)
        .filter(|pattern| !pattern.is_empty())
        .any(|pattern| pattern == "*" || name.contains(pattern))
}

/// longview patch: with `CUBECL_CUDA_NVRTC_FAST_MATH=1`, NVRTC compiles with
/// `--use_fast_math` (approximate `exp`/division/square root, denormals flushed to
/// zero), as FlashAttention's own build does.
pub(crate) fn nvrtc_fast_math() -> bool {
    std::env::var("CUBECL_CUDA_NVRTC_FAST_MATH").is_ok_and(|v| v == "1")
}

/// longview patch: the kernels whose `exp` the LLVM backend lowers to libdevice's
/// approximate `__nv_fast_expf` when `CUBECL_CUDA_APPROX_EXP_KERNELS` is not set: longview's
/// tensor-core flash-attention kernels, whose softmax takes an exponential of every score and
/// whose results are bf16/f16 (FlashAttention builds with `--use_fast_math` for the same
/// reason). (longview's wgmma forward issues `ex2.approx` itself and calls no `exp`.)
const APPROX_EXP_DEFAULT: &str = "::flash::tensor_core::";

/// longview patch: whether the kernel whose Rust type name is `name` gets the approximate
/// exponential. `CUBECL_CUDA_APPROX_EXP_KERNELS` is a comma-separated list of substrings
/// (`*`: every kernel; empty: none) and replaces the default list.
pub(crate) fn approximate_exp_for_kernel(name: &str) -> bool {
    match std::env::var("CUBECL_CUDA_APPROX_EXP_KERNELS") {
        Ok(list) => names_match(&list, name),
        Err(_) => names_match(APPROX_EXP_DEFAULT, name),
    }
}

