//! How fast the warpgroup MMA runs from a CubeCL kernel when nothing else does: each
//! warpgroup repeats `m64n128k128` (eight chained `m64n128k16` steps, then a wait) on operands
//! that stay in shared memory, so the rate is the instruction's, with this module's
//! waiting scheme, and no memory traffic. The upper bound an attention or GEMM kernel built on
//! these helpers can approach; `flash_bench --wgmma` prints it next to the device.

use std::time::Instant;

use cubecl::prelude::*;

use super::{
    LEADING_BYTES, mma_m64n128k128_bf16, shared_address, shared_descriptor, stride_bytes_of,
};

/// Floating-point operations of one `m64n128k128` product.
const PRODUCT_FLOPS: f64 = 2.0 * 64.0 * 128.0 * 128.0;

/// Each warpgroup of each cube: `iterations` products into its own accumulators, their sum
/// written to `out[unit]` so nothing is dead code.
#[cube(launch)]
pub fn throughput_kernel(out: &mut [f32], iterations: u32, #[comptime] warpgroups: usize) {
    let unit = UNIT_POS as usize;
    let mut a_s = Shared::<[half::bf16]>::new_aligned_slice(comptime!(64usize * 128), 128usize);
    let mut b_s = Shared::<[half::bf16]>::new_aligned_slice(comptime!(128usize * 128), 128usize);
    let mut i = unit;
    while i < comptime!(128usize * 128) {
        let value = half::bf16::cast_from(f32::cast_from(i % 7) * 0.001f32);
        if i < comptime!(64usize * 128) {
            a_s[i] = value;
        }
        b_s[i] = value;
        i += comptime!(128 * warpgroups);
    }
    sync_cube();
    let stride = comptime!(stride_bytes_of(128));
    let desc_a = shared_descriptor(shared_address::<half::bf16>(&a_s), LEADING_BYTES, stride);
    let desc_b = shared_descriptor(shared_address::<half::bf16>(&b_s), LEADING_BYTES, stride);
    let mut acc = Array::<f32>::new(64usize);
    #[unroll]
    for r in 0..64usize {
        acc[r] = 0.0f32;
    }
    for _ in 0..iterations {
        mma_m64n128k128_bf16(&mut acc, desc_a, desc_b, 1u32);
    }
    let mut sum = 0.0f32;
    #[unroll]
    for r in 0..64usize {
        sum += acc[r];
    }
    out[CUBE_POS_X as usize * comptime!(128 * warpgroups) + unit] = sum;
}

/// One timed run of [`throughput_kernel`].
#[derive(Clone, Copy, Debug)]
pub struct ThroughputRun {
    pub cubes: u32,
    pub warpgroups: usize,
    pub iterations: u32,
    pub seconds: f64,
    pub tflops: f64,
}

fn sync(client: &Client) {
    cubecl::future::block_on(client.sync()).expect("device sync");
}

/// Times `cubes` cubes of `warpgroups` warpgroups (1 to 3), each repeating `iterations`
/// products, after one untimed launch of the same size. Needs a CUDA device of compute
/// capability 9.0.
pub fn throughput(
    client: &Client,
    cubes: u32,
    warpgroups: usize,
    iterations: u32,
) -> Result<ThroughputRun, crate::AttnError> {
    if !(1..=3).contains(&warpgroups) || cubes == 0 || iterations == 0 {
        return Err(crate::AttnError::Options(format!(
            "wgmma throughput: {cubes} cubes of {warpgroups} warpgroups x {iterations} \
             iterations; expected 1 to 3 warpgroups and at least one cube and iteration"
        )));
    }
    let units = cubes as usize * 128 * warpgroups;
    let out = crate::DeviceTensor::poisoned::<f32>(client, f32::NAN, &[units]);
    let launch = || unsafe {
        throughput_kernel::launch(
            client,
            CubeCount::Static(cubes, 1, 1),
            CubeDim::new_1d((128 * warpgroups) as u32),
            BufferArg::from_raw_parts(out.handle.clone(), units),
            iterations,
            warpgroups,
        );
    };
    launch();
    sync(client);
    let started = Instant::now();
    launch();
    sync(client);
    let seconds = started.elapsed().as_secs_f64();
    let sums = out.to_vec::<f32>(client)?;
    if let Some(bad) = sums.iter().position(|s| !s.is_finite()) {
        return Err(crate::AttnError::Read(format!(
            "wgmma throughput: unit {bad} wrote {} (every unit writes a finite sum)",
            sums[bad]
        )));
    }
    let flops = PRODUCT_FLOPS * (cubes as usize * warpgroups) as f64 * iterations as f64;
    Ok(ThroughputRun {
        cubes,
        warpgroups,
        iterations,
        seconds,
        tflops: flops / seconds / 1e12,
    })
}
