//! Hopper's warpgroup MMA from a CubeCL kernel (`longview_kernels::wgmma`, inline PTX through
//! the patched cubecl-llvm) against an f64 product of the same bf16 inputs
//! (`wgmma::check::check_tile_products`: 64 x n x depth for n = 64, 128 and depth 16 to 128;
//! K-major operands step by step and chained, and A in registers with B N-major; outputs
//! poisoned with NaN; |error| <= 1e-5 * sum |a b| + 1e-6), and the flash forward built on it
//! (`check_forward`: O within 1e-2 of max(|ref|, 1), LSE 1e-3 against f64 attention; and
//! `check_forward_routed`: the same through `flash_forward` on strided `[B, S, H, D]` views,
//! asserting the call is routed to it; `check_forward_shifted`: causal queries after their
//! keys' block as in chunked prefill, lengths apart, K/V views of a NaN-padded cache), and
//! the backward (`check_backward`: `flash_forward`
//! then `flash_backward` routed to the wgmma kernels, dQ/dK/dV within 1e-2 of max(|ref|, 1)
//! against f64 attention, full/causal, GQA, strided views). Forward and backward cases
//! cover head dim 128 and the padded ones: 72 (SigLIP's B x H x 729, full), 64 and 80.
//!
//! Needs a GPU of compute capability 9.0 (H100/H200), so ignored by default. Build here:
//!     cargo test -p longview-kernels --no-default-features --features cuda --test wgmma --no-run --release
//! and run the printed executable on the device machine:
//!     wgmma-<hash> --ignored --test-threads 1

#![cfg(feature = "cuda")]

use longview_kernels::wgmma::check::{
    check_forward, check_forward_routed, check_forward_shifted, check_tile_products,
};
use longview_kernels::wgmma::check_backward::{check_backward, check_backward_shifted};

type Check =
    fn(&cubecl::prelude::Client) -> Result<(Vec<String>, Vec<String>), longview_kernels::AttnError>;

/// Runs `check` on CUDA device 0 with every kernel output NaN-filled first (an element a
/// kernel forgot to write fails), prints what passed and asserts nothing failed.
fn assert_passes(check: Check) {
    longview_kernels::flash::set_poison_outputs(true);
    let client = cubecl::Device::cuda(0).expect("CUDA device 0").client();
    let (passed, failed) = check(&client).expect("the check runs");
    for line in &passed {
        println!("{line}");
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

#[test]
#[ignore = "needs an H100/H200: see the top of the file"]
fn warpgroup_products_match_the_f64_reference() {
    assert_passes(check_tile_products);
}

#[test]
#[ignore = "needs an H100/H200: see the top of the file"]
fn wgmma_forward_matches_the_f64_reference() {
    assert_passes(check_forward);
}

#[test]
#[ignore = "needs an H100/H200: see the top of the file"]
fn flash_forward_routes_to_wgmma_and_matches_the_f64_reference() {
    assert_passes(check_forward_routed);
}

#[test]
#[ignore = "needs an H100/H200: see the top of the file"]
fn flash_backward_routes_to_wgmma_and_matches_the_f64_reference() {
    assert_passes(check_backward);
}

/// The shifted causal calls (chunked prefill, the causal ring's later blocks) are routed
/// to the wgmma kernels unless `LONGVIEW_FLASH_WGMMA_SHIFTED=0`: set to 1 here so a
/// caller's environment cannot turn off what these tests check.
fn enable_shifted() {
    // SAFETY: the tests run with `--test-threads 1` (top of the file).
    unsafe { std::env::set_var("LONGVIEW_FLASH_WGMMA_SHIFTED", "1") };
}

#[test]
#[ignore = "needs an H100/H200: see the top of the file"]
fn shifted_causal_forward_routes_to_wgmma_and_matches_the_f64_reference() {
    enable_shifted();
    assert_passes(check_forward_shifted);
}

#[test]
#[ignore = "needs an H100/H200: see the top of the file"]
fn shifted_causal_backward_routes_to_wgmma_and_matches_the_f64_reference() {
    enable_shifted();
    assert_passes(check_backward_shifted);
}
