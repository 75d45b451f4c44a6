//! The product attention's `P V` needs: A (64 x K) in registers, as an accumulator tile
//! becomes after the softmax, and B (K x N) stored N-major (row-major `[K, N]`, as V is),
//! which the instruction reads with its transpose bit.
//!
//! B's layout in shared memory (no swizzle): core matrices of 8 K-rows x 8 N-columns, each
//! row 16 contiguous bytes along N; the core matrices of one 8-row K group lie next to each
//! other along N (128 bytes apart) and the K groups `N / 8 * 128` bytes apart
//! ([`n_major_offset`]). As for the K-major operands the byte offsets are arguments, so a
//! test can tell which descriptor field means which direction; [`n_major_offsets`] holds
//! the assignment checked on the device.

use cubecl::prelude::*;

use super::{
    DescriptorOffsets, accumulator_col, accumulator_row, mma_m64n64k16_bf16_register_a,
    mma_m64n128k16_bf16_register_a, shared_address, shared_descriptor,
};

/// Element offset of `(kk, col)` of an N-major operand `n` columns wide.
#[cube]
pub fn n_major_offset(kk: usize, col: usize, #[comptime] n: usize) -> usize {
    ((kk / 8) * comptime!(n / 8) + col / 8) * 64 + (kk % 8) * 8 + col % 8
}

/// The (leading, stride) byte offsets of the descriptor of an N-major operand `n` wide in
/// [`n_major_offset`]'s layout: leading = between K groups, stride = between column groups
/// along N (CUTLASS's reading of the non-swizzled MN-major layout), or exchanged.
pub fn n_major_offsets(n: usize, offsets: DescriptorOffsets) -> (u32, u32) {
    let k_groups = (n / 8 * 128) as u32;
    match offsets {
        DescriptorOffsets::Documented => (k_groups, 128),
        DescriptorOffsets::Exchanged => (128, k_groups),
    }
}

/// Two bf16 values packed into one register, `lo` in the low half.
#[cube]
pub fn pack_bf16x2(lo: f32, hi: f32) -> u32 {
    let packed: u32;
    gpu_asm!(
        "cvt.rn.bf16x2.f32 {}, {}, {};",
        out(_) packed,
        in(_) hi,
        in(_) lo,
        options(pure, nomem)
    );
    packed
}

/// `c = a b` for `a` 64 x `depth` and `b` `depth` x `n` (row-major bf16), `c` 64 x `n` f32, by
/// one warpgroup: `b` staged N-major into shared memory, each unit's A fragment loaded from
/// global memory into registers, then `depth / 16` register-A wgmma steps.
#[cube(launch)]
pub fn tile_product_register_a_kernel(
    a: &[half::bf16],
    b: &[half::bf16],
    c: &mut [f32],
    leading_bytes: u32,
    stride_bytes: u32,
    #[comptime] n: usize,
    #[comptime] depth: usize,
) {
    let unit = UNIT_POS as usize;
    let mut b_s = Shared::<[half::bf16]>::new_aligned_slice(comptime!(n * depth), 128usize);
    let mut j = unit;
    while j < comptime!(n * depth) {
        b_s[n_major_offset(j / n, j % n, n)] = b[j];
        j += 128;
    }
    sync_cube();
    let b_address = shared_address::<half::bf16>(&b_s);
    let (warp, lane) = (unit / 32, unit % 32);
    let (row, pair) = (warp * 16 + lane / 4, (lane % 4) * 2);
    let mut acc = Array::<f32>::new(comptime!(n / 2));
    #[unroll]
    for r in 0..comptime!(n / 2) {
        acc[r] = 0.0f32;
    }
    #[unroll]
    for s in 0..comptime!(depth / 16) {
        let top = row * depth + s * 16 + pair;
        let bottom = top + 8 * depth;
        let a0 = pack_bf16x2(f32::cast_from(a[top]), f32::cast_from(a[top + 1]));
        let a1 = pack_bf16x2(f32::cast_from(a[bottom]), f32::cast_from(a[bottom + 1]));
        let a2 = pack_bf16x2(f32::cast_from(a[top + 8]), f32::cast_from(a[top + 9]));
        let a3 = pack_bf16x2(f32::cast_from(a[bottom + 8]), f32::cast_from(a[bottom + 9]));
        // Two K groups of 8 rows a step.
        let step = comptime!((s * 2 * (n / 8) * 128) as u32);
        let desc_b = shared_descriptor(b_address + step, leading_bytes, stride_bytes);
        let accumulate = comptime!(if s == 0 { 0u32 } else { 1u32 });
        if comptime!(n == 64) {
            mma_m64n64k16_bf16_register_a(&mut acc, a0, a1, a2, a3, desc_b, accumulate);
        } else {
            mma_m64n128k16_bf16_register_a(&mut acc, a0, a1, a2, a3, desc_b, accumulate);
        }
    }
    #[unroll]
    for r in 0..comptime!(n / 2) {
        c[accumulator_row(unit, r) * n + accumulator_col(unit, r)] = acc[r];
    }
}

/// `a b` on the device through [`tile_product_register_a_kernel`]: `a` is 64 x `depth`, `b`
/// is `depth` x `n` (row-major), the result 64 x `n` row-major f32; `n` 64 or 128, `depth` a
/// multiple of 16 up to 128. Needs a CUDA device of compute capability 9.0.
pub fn tile_product_register_a(
    client: &Client,
    a: &[half::bf16],
    b: &[half::bf16],
    n: usize,
    depth: usize,
    offsets: DescriptorOffsets,
) -> Result<Vec<f32>, crate::AttnError> {
    super::check_tile_shape(a.len(), b.len(), n, depth)?;
    let (leading, stride) = n_major_offsets(n, offsets);
    let a = crate::DeviceTensor::from_slice(client, a, &[64, depth]);
    let b = crate::DeviceTensor::from_slice(client, b, &[depth, n]);
    let c = crate::DeviceTensor::poisoned::<f32>(client, f32::NAN, &[64, n]);
    unsafe {
        tile_product_register_a_kernel::launch(
            client,
            CubeCount::Static(1, 1, 1),
            CubeDim::new_1d(128),
            BufferArg::from_raw_parts(a.handle.clone(), 64 * depth),
            BufferArg::from_raw_parts(b.handle.clone(), n * depth),
            BufferArg::from_raw_parts(c.handle.clone(), 64 * n),
            leading,
            stride,
            n,
            depth,
        );
    }
    c.to_vec::<f32>(client)
}
