//! Hopper's warpgroup MMA from a CubeCL kernel (`longview_kernels::wgmma`, inline PTX through
//! the patched cubecl-llvm) against an f64 product of the same bf16 inputs: 64 x n x depth
//! for n = 64 and 128 and depth 16 to 128, step by step and with the steps chained in one asm
//! statement, every output poisoned with NaN before the launch.
//! Tolerance: |c - ref| <= 1e-5 * sum_k |a_ik b_jk| + 1e-6 (f32 accumulation of exact bf16
//! products; the bound is a few f32 ulps of the absolute sum).
//!
//! Needs a GPU of compute capability 9.0 (H100/H200), so ignored by default. Build here:
//!     cargo test -p longview-kernels --no-default-features --features cuda --test wgmma --no-run --release
//! and run the printed executable on the device machine:
//!     wgmma-<hash> --ignored --test-threads 1

#![cfg(feature = "cuda")]

use cubecl::prelude::*;
use half::bf16;
use longview_kernels::reference::random_values;
use longview_kernels::wgmma::{DescriptorOffsets, tile_product};

fn client() -> Client {
    cubecl::Device::cuda(0).expect("CUDA device 0").client()
}

/// The largest violation of the tolerance, as (excess, row, col, got, want), or `None`.
fn worst_violation(
    got: &[f32],
    a: &[bf16],
    b: &[bf16],
    n: usize,
    depth: usize,
) -> Option<(f64, usize, usize, f32, f64)> {
    let mut worst: Option<(f64, usize, usize, f32, f64)> = None;
    for row in 0..64 {
        for col in 0..n {
            let (mut want, mut magnitude) = (0.0f64, 0.0f64);
            for kk in 0..depth {
                let p = a[row * depth + kk].to_f64() * b[col * depth + kk].to_f64();
                want += p;
                magnitude += p.abs();
            }
            let value = got[row * n + col];
            let error = (value as f64 - want).abs();
            let excess = error - (1e-5 * magnitude + 1e-6);
            if (value.is_nan() || excess > 0.0) && worst.is_none_or(|w| excess > w.0) {
                worst = Some((if value.is_nan() { f64::INFINITY } else { excess }, row, col, value, want));
            }
        }
    }
    worst
}

#[test]
#[ignore = "needs an H100/H200: see the top of the file"]
fn warpgroup_products_match_the_f64_reference() {
    let client = client();
    let mut failures = Vec::new();
    for n in [64usize, 128] {
        for depth in [16usize, 32, 64, 128] {
            let seed = (n * 1000 + depth) as u64;
            let a: Vec<bf16> = random_values(64 * depth, seed).into_iter().map(bf16::from_f32).collect();
            let b: Vec<bf16> =
                random_values(n * depth, seed + 1).into_iter().map(bf16::from_f32).collect();
            // Step by step, and (where a helper chains the steps in one asm statement) chained.
            let chains = depth == 128 || (depth == 64 && n == 64);
            for chained in [false, true].into_iter().filter(|&c| !c || chains) {
                let run = |offsets| {
                    tile_product(&client, &a, &b, n, depth, offsets, chained).expect("the product runs")
                };
                let got = run(DescriptorOffsets::Documented);
                let Some(worst) = worst_violation(&got, &a, &b, n, depth) else {
                    println!("n {n} depth {depth} chained {chained}: within tolerance");
                    continue;
                };
                // Tell a descriptor-field mix-up from any other mistake.
                let hint = match worst_violation(&run(DescriptorOffsets::Exchanged), &a, &b, n, depth) {
                    None => "with the two descriptor offsets exchanged it matches",
                    Some(_) => "exchanging the descriptor offsets does not fix it",
                };
                failures.push(format!(
                    "n {n} depth {depth} chained {chained}: c[{}][{}] = {} against {} ({hint})",
                    worst.1, worst.2, worst.3, worst.4
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
