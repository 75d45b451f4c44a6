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
