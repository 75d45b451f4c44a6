//! Hopper's warpgroup MMA (`wgmma.mma_async`, sm_90a) from CubeCL kernels, through inline PTX:
//! the patched cubecl-llvm lowers `gpu_asm!` with register operands
//! (`third_party/cubecl-llvm/src/nvptx/inline_asm.rs`). CUDA only, and only devices of compute
//! capability 9.0 (the kernels compile for `sm_90a` there); nothing else may launch these.
//!
//! **Status:** the flash forward in [`forward`] is what `flash_forward` runs for bf16 head
//! dims 64-128 (multiples of 8; below 128 held in the 128-wide tiles with zero columns) on
//! sm_90 ([`forward_launch::routes`]), and the backward in [`backward`] what
//! `flash_backward` runs for the same calls ([`backward_launch::routes`]); the rest are
//! building blocks. Here: the
//! `m64n64k16` / `m64n128k16` bf16 products with f32 accumulators, both operands in shared
//! memory without swizzling (one step, or 64/128 deep chained in one asm statement), and the
//! form with A in registers and B N-major (`register_a.rs`, what `P V` needs); each product
//! is waited for before the next. [`check::check_tile_products`] compares them with an f64
//! product (`kernels/tests/wgmma.rs`, `flash_bench --wgmma`). The flash forward in
//! [`forward`] uses the 128-byte-swizzled variants (`*_sw128`, generated too), checked
//! through that forward's own f64 check ([`check::check_forward`]).
//!
//! ## Operands in shared memory (no swizzle, both K-major)
//!
//! A (64 x K) and B (N x K, so the product is `A B^T`) are stored as *core matrices*: 8 rows of
//! 8 bf16, each row 16 contiguous bytes, the whole core matrix 128 contiguous bytes. This module
//! puts the core matrices of one 8-row group next to each other along K (`leading_bytes`
//! = 128 apart) and the 8-row groups `K / 8 * 128` bytes apart (`stride_bytes`)
//! ([`core_matrix_offset`]). A 64-bit descriptor ([`shared_descriptor`]) carries, in 16-byte
//! units, the start address (bits 0-13), the leading-dimension byte offset (bits 16-29, the
//! distance between core matrices adjacent in K) and the stride-dimension byte offset (bits
//! 32-45, between core matrices adjacent in M or N); bits 62-63 = 0 select no swizzle. A
//! 16-deep step covers two core matrices along K, so step `s` starts `s * 256` bytes in.
//!
//! ## Accumulators
//!
//! Unit `t` of the 128-unit warpgroup holds `N / 2` f32 values of the 64 x N result: value `i`
//! is at row `16 (t / 32) + (t % 32) / 4 + 8 ((i / 2) % 2)` and column
//! `8 (i / 4) + 2 (t % 4) + i % 2` ([`accumulator_row`], [`accumulator_col`]): the `mma.sync`
//! m16n8 layout of each warp's 16 rows, repeated every 8 columns.

use cubecl::prelude::*;

pub mod backward;
pub mod backward_launch;
pub mod check;
pub mod check_backward;
pub mod forward;
pub mod forward_launch;
mod generated;
mod register_a;
mod throughput;

pub use generated::*;
pub use register_a::{
    n_major_offset, n_major_offsets, pack_bf16x2, tile_product_register_a,
    tile_product_register_a_kernel,
};
pub use throughput::{ThroughputRun, throughput};

/// Bytes between core matrices adjacent in K in [`core_matrix_offset`]'s layout.
pub const LEADING_BYTES: u32 = 128;

/// Bytes between 8-row groups in [`core_matrix_offset`]'s layout of an operand `depth` deep.
pub fn stride_bytes_of(depth: usize) -> u32 {
    (depth / 8 * 128) as u32
}

/// The 32-bit shared-memory address (what `cvta.to.shared` gives) of the first element of
/// `slice`, which must lie in shared memory.
#[cube]
pub fn shared_address<E: CubePrimitive>(slice: &[E]) -> u32 {
    let base = slice.as_ptr();
    let address: u32;
    gpu_asm!(
        "{{\n.reg .u64 window;\ncvta.to.shared.u64 window, {};\ncvt.u32.u64 {}, window;\n}}",
        in(_) base,
        out(_) address,
        options(pure, nomem)
    );
    address
}

/// The descriptor of a non-swizzled operand starting at shared `address` (16-byte aligned).
#[cube]
pub fn shared_descriptor(address: u32, leading_bytes: u32, stride_bytes: u32) -> u64 {
    let start = u64::cast_from((address & 0x3FFFFu32) >> 4u32);
    let leading = u64::cast_from((leading_bytes >> 4u32) & 0x3FFFu32);
    let stride = u64::cast_from((stride_bytes >> 4u32) & 0x3FFFu32);
    start | (leading << 16u64) | (stride << 32u64)
}

/// Element offset of `(row, col)` of a K-major operand `depth` columns deep in the layout
/// described at the top of the module.
#[cube]
pub fn core_matrix_offset(row: usize, col: usize, #[comptime] depth: usize) -> usize {
    ((row / 8) * comptime!(depth / 8) + col / 8) * 64 + (row % 8) * 8 + col % 8
}

/// Row of accumulator `i` of warpgroup unit `unit`.
#[cube]
pub fn accumulator_row(unit: usize, i: usize) -> usize {
    (unit / 32) * 16 + (unit % 32) / 4 + ((i / 2) % 2) * 8
}

/// Column of accumulator `i` of warpgroup unit `unit`.
#[cube]
pub fn accumulator_col(unit: usize, i: usize) -> usize {
    (i / 4) * 8 + (unit % 4) * 2 + i % 2
}

/// `c = a b^T` for `a` 64 x `depth` and `b` `n` x `depth` (row-major bf16), `c` 64 x `n` f32,
/// by one warpgroup (a cube of 128 units): both operands staged into shared memory in the
/// core-matrix layout, then `depth / 16` wgmma steps, each its own asm statement, or with
/// `chained` (depth 128, or 64 at n = 64) all of them in one. The descriptors' two byte
/// offsets are arguments so that a test can tell a layout mistake from an instruction mistake.
#[cube(launch)]
pub fn tile_product_kernel(
    a: &[half::bf16],
    b: &[half::bf16],
    c: &mut [f32],
    leading_bytes: u32,
    stride_bytes: u32,
    #[comptime] n: usize,
    #[comptime] depth: usize,
    #[comptime] chained: bool,
) {
    let unit = UNIT_POS as usize;
    let mut a_s = Shared::<[half::bf16]>::new_aligned_slice(comptime!(64 * depth), 128usize);
    let mut b_s = Shared::<[half::bf16]>::new_aligned_slice(comptime!(n * depth), 128usize);
    let mut i = unit;
    while i < comptime!(64 * depth) {
        a_s[core_matrix_offset(i / depth, i % depth, depth)] = a[i];
        i += 128;
    }
    let mut j = unit;
    while j < comptime!(n * depth) {
        b_s[core_matrix_offset(j / depth, j % depth, depth)] = b[j];
        j += 128;
    }
    sync_cube();

    let a_address = shared_address::<half::bf16>(&a_s);
    let b_address = shared_address::<half::bf16>(&b_s);
    let mut acc = Array::<f32>::new(comptime!(n / 2));
    #[unroll]
    for r in 0..comptime!(n / 2) {
        acc[r] = 0.0f32;
    }
    if comptime!(chained && depth == 128) {
        let desc_a = shared_descriptor(a_address, leading_bytes, stride_bytes);
        let desc_b = shared_descriptor(b_address, leading_bytes, stride_bytes);
        if comptime!(n == 64) {
            mma_m64n64k128_bf16(&mut acc, desc_a, desc_b, 0u32);
        } else {
            mma_m64n128k128_bf16(&mut acc, desc_a, desc_b, 0u32);
        }
    } else if comptime!(chained && depth == 64 && n == 64) {
        let desc_a = shared_descriptor(a_address, leading_bytes, stride_bytes);
        let desc_b = shared_descriptor(b_address, leading_bytes, stride_bytes);
        mma_m64n64k64_bf16(&mut acc, desc_a, desc_b, 0u32);
    } else {
        #[unroll]
        for s in 0..comptime!(depth / 16) {
            let step = comptime!((s * 256) as u32);
            let desc_a = shared_descriptor(a_address + step, leading_bytes, stride_bytes);
            let desc_b = shared_descriptor(b_address + step, leading_bytes, stride_bytes);
            let accumulate = comptime!(if s == 0 { 0u32 } else { 1u32 });
            if comptime!(n == 64) {
                mma_m64n64k16_bf16(&mut acc, desc_a, desc_b, accumulate);
            } else {
                mma_m64n128k16_bf16(&mut acc, desc_a, desc_b, accumulate);
            }
        }
    }
    #[unroll]
    for r in 0..comptime!(n / 2) {
        c[accumulator_row(unit, r) * n + accumulator_col(unit, r)] = acc[r];
    }
}

/// Which byte offset goes in which descriptor field: the layout's own ([`Self::Documented`],
/// leading = 128 bytes along K, stride = `depth / 8 * 128` bytes across rows), or the two
/// exchanged ([`Self::Exchanged`], which gives the right product only if the fields mean the
/// opposite of what the module documentation says: a test's diagnostic).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DescriptorOffsets {
    Documented,
    Exchanged,
}

/// `a b^T` on the device through [`tile_product_kernel`]: `a` is 64 x `depth`, `b` is `n` x
/// `depth` (row-major), the result 64 x `n` row-major f32. `n` is 64 or 128, `depth` a
/// multiple of 16 up to 128; `chained` runs the steps in one asm statement (depth 128, or 64
/// at n = 64; other shapes run step by step either way). Needs a CUDA device of compute
/// capability 9.0.
pub fn tile_product(
    client: &Client,
    a: &[half::bf16],
    b: &[half::bf16],
    n: usize,
    depth: usize,
    offsets: DescriptorOffsets,
    chained: bool,
) -> Result<Vec<f32>, crate::AttnError> {
    check_tile_shape(a.len(), b.len(), n, depth)?;
    let (leading, stride) = match offsets {
        DescriptorOffsets::Documented => (LEADING_BYTES, stride_bytes_of(depth)),
        DescriptorOffsets::Exchanged => (stride_bytes_of(depth), LEADING_BYTES),
    };
    let a = crate::DeviceTensor::from_slice(client, a, &[64, depth]);
    let b = crate::DeviceTensor::from_slice(client, b, &[n, depth]);
    let c = crate::DeviceTensor::poisoned::<f32>(client, f32::NAN, &[64, n]);
    unsafe {
        tile_product_kernel::launch(
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
            chained,
        );
    }
    c.to_vec::<f32>(client)
}

/// The shapes [`tile_product`] and [`tile_product_register_a`] take: `n` 64 or 128, `depth` a
/// multiple of 16 up to 128, `a` 64 x `depth` and `b` `n` x `depth` elements.
pub(crate) fn check_tile_shape(
    a_len: usize,
    b_len: usize,
    n: usize,
    depth: usize,
) -> Result<(), crate::AttnError> {
    use crate::AttnError;
    if n != 64 && n != 128 {
        return Err(AttnError::Shape(format!(
            "wgmma tile product: n = {n}, expected 64 or 128"
        )));
    }
    if depth == 0 || !depth.is_multiple_of(16) || depth > 128 {
        return Err(AttnError::Shape(format!(
            "wgmma tile product: depth = {depth}, expected a multiple of 16 up to 128"
        )));
    }
    if a_len != 64 * depth || b_len != n * depth {
        return Err(AttnError::Shape(format!(
            "wgmma tile product: a has {a_len} elements and b {b_len}, expected 64 x {depth} \
             and {n} x {depth}"
        )));
    }
    Ok(())
}
