//! Hopper's warpgroup MMA from a CubeCL kernel (`longview_kernels::wgmma`, inline PTX through
//! the patched cubecl-llvm) against an f64 product of the same bf16 inputs
//! (`wgmma::check::check_tile_products`: 64 x n x depth for n = 64, 128 and depth 16 to 128;
//! K-major operands step by step and chained, and A in registers with B N-major; outputs
//! poisoned with NaN; |error| <= 1e-5 * sum |a b| + 1e-6).
//!
//! Needs a GPU of compute capability 9.0 (H100/H200), so ignored by default. Build here:
//!     cargo test -p longview-kernels --no-default-features --features cuda --test wgmma --no-run --release
//! and run the printed executable on the device machine:
//!     wgmma-<hash> --ignored --test-threads 1

#![cfg(feature = "cuda")]

use longview_kernels::wgmma::check::check_tile_products;

#[test]
#[ignore = "needs an H100/H200: see the top of the file"]
fn warpgroup_products_match_the_f64_reference() {
    let client = cubecl::Device::cuda(0).expect("CUDA device 0").client();
    let (passed, failed) = check_tile_products(&client).expect("the products run");
    for line in &passed {
        println!("{line}");
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}
