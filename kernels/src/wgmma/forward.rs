//! A flash-attention forward on the warpgroup MMA (bf16, O and LSE; head dim 128, and the
//! multiples of 8 from 64 to 120 with the columns past the head dim held at zero in the
//! 128-wide tiles; `Q K^T` then goes only 64 or 80 deep where the head dim allows, `P V`
//! stays 128 wide): what `flash_forward` runs on a compute-capability-9.0 device for the
//! calls
//! [`forward_launch::routes`](super::forward_launch::routes) accepts (no packed sequences;
//! causal with the queries' block at or after the keys' one, as in chunked prefill; strided
//! inputs). Checked against f64 by
//! `flash_bench --wgmma` and `flash_bench --checks` (`benchmarks/flash_attention.md`).
//!
//! Cube: two warpgroups, 64 query rows each (128 rows a cube); grid `(ceil(Sq / 128),
//! B * H)`. Q is staged once into shared memory; K and V go through three 32 KB stages each
//! (224 KB of shared memory with Q, one cube an SM), copied by `cp.async` one interval ahead.
//! Per tile of 128 keys: `S = Q K^T` as eight chained `m64n128k16` steps into 64
//! accumulators, the online softmax on the accumulator layout (each unit holds rows `g` and
//! `g + 8` of its warp's 16, reduced over the quad with two shuffles; `exp2` with the scale
//! folded in), P packed into bf16 A fragments, `O += P V` as eight register-A steps.
//!
//! **Schedule.** The loop runs intervals between cube barriers. In interval `t` warpgroup 0
//! runs tile `t`'s softmax, then one asm statement with tile `t`'s `P V` and tile `t + 1`'s
//! `Q K^T`; warpgroup 1 runs that asm statement for tile `t - 1` first, then tile `t`'s
//! softmax. So each warpgroup's softmax runs while the other's products are on the tensor
//! cores. In interval `t` the tiles in use are K `t`, `t + 1` and V `t - 1`, `t`; K `t + 2`
//! and V `t + 1` are copied into the third stage of each.
//!
//! **Layout.** Q, K and V tiles are stored 128-byte swizzled (see [`tile_word`]): each
//! 64-column half of the tile is 128 rows of 128 bytes whose 16-byte chunks are permuted by
//! the row (`c ^ (r % 8)`), which is what the descriptors' swizzle mode 1 reads. Eight
//! consecutive units copy one row's eight chunks, so their shared-memory writes hit distinct
//! banks; in the earlier non-swizzled core-matrix layout they all hit the same four banks,
//! the copies were split into one-sector L2 requests, and the kernel was bound by L2 tag
//! lookups at half this speed. K is read K-major, V N-major (the transpose bit).
//! Causal masking: query row `i` sees keys `j <= i + shift`, `shift = q_offset - k_offset >=
//! 0` (0 for a sequence against itself; the cached length for a prefill chunk against its
//! KV cache), so every row sees key 0. GQA by `group` query heads a kv head.

use cubecl::prelude::barrier::copy_async;
use cubecl::prelude::*;

pub use super::forward_launch::{
    ForwardShape, causal_argument, causal_shift, forward, forward_into, head_dim_supported,
    layout_unsupported, routes, shifted_enabled,
};

use super::{
    accumulator_col, mma_pv_m64n128k128_bf16_sw128, mma_pv_then_qk_m64n128k128_bf16_sw128,
    mma_pv_then_qk64_m64n128k128_bf16_sw128, mma_pv_then_qk80_m64n128k128_bf16_sw128,
    mma_qk_m64n128k64_bf16_sw128, mma_qk_m64n128k80_bf16_sw128, mma_qk_m64n128k128_bf16_sw128,
    pack_bf16x2, shared_address, shared_descriptor,
};

/// The score of a masked entry (finite: `exp(MASKED - m)` is 0 for any real `m`).
const MASKED: f32 = -1.0e38;
/// `log2(e)`: `exp(x) = exp2(x log2(e))`.
pub(super) const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// The head dimension this kernel handles.
pub const HEAD_DIM: usize = 128;
/// Query rows a cube handles (two warpgroups of 64).
pub const ROWS_A_CUBE: usize = 128;

/// Word (u32, two bf16) offset of word `word` (0..64) of row `row` in the 128-byte-swizzled
/// layout of a 128-row, 128-wide bf16 tile (32 KB, 1024-byte aligned): columns 0..64 are the
/// first 16 KB, 64..128 the second; in each half row `r` is 128 bytes at `128 r`, its eight
/// 16-byte chunks stored in the order `c ^ (r % 8)` (the hardware's 128-byte swizzle).
#[cube]
pub(super) fn tile_word(row: usize, word: usize) -> usize {
    let chunk = word / 4;
    (chunk / 8) * 4096 + row * 32 + ((chunk % 8) ^ (row % 8)) * 4 + word % 4
}

/// The descriptor of a 128-byte-swizzled operand starting at shared `address` (its 8-row
/// atoms 1024-byte aligned): `leading_bytes` / `stride_bytes` as the warpgroup MMA reads them
/// for that swizzle (K-major: leading unused, stride 1024 between 8-row groups; N-major:
/// leading between 64-wide halves, stride 1024 between 8-row groups along K).
#[cube]
pub(super) fn swizzled_descriptor(address: u32, leading_bytes: u32, stride_bytes: u32) -> u64 {
    shared_descriptor(address, leading_bytes, stride_bytes) | (1u64 << 62u64)
}

/// Starts copying rows `[first, first + 128)` of a `[rows, head_dim]` bf16 matrix (u32 words
/// from `base`) into the tile buffer at word `at` of `tile` with `cp.async`, 16 bytes (one
/// swizzled chunk) a copy; rows past `rows` and columns past `head_dim` are stored as zeros
/// directly (the partial last tile; whole tiles go through [`copy_tile_async`]). In flight
/// on return: each unit waits (`cp.async.wait_all`), then the cube syncs, before a read.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn stage_tile_async(
    src: &[u32],
    base: usize,
    row_words: usize,
    first: usize,
    rows: usize,
    tile: &mut Shared<[u32]>,
    at: usize,
    #[comptime] head_dim: usize,
) {
    // Unrolled: each copy's shared address is a constant offset from one register. (A loop
    // that advanced one address register after each copy made every increment wait until
    // the copy before it had released the register: 27% of the forward's stall samples.)
    #[unroll]
    for step in 0..8usize {
        let i = UNIT_POS as usize + step * 256;
        let row = i / 16;
        let word = (i % 16) * 4;
        let to = at + tile_word(row, word);
        if first + row < rows && word < comptime!(head_dim / 2) {
            let from = base + (first + row) * row_words + word;
            copy_async(&src[from..from + 4], &mut tile[to..to + 4], 4u32);
        } else {
            tile[to] = 0u32;
            tile[to + 1] = 0u32;
            tile[to + 2] = 0u32;
            tile[to + 3] = 0u32;
        }
    }
}

/// The global address (what `cvta.to.global` gives) of element `offset` of `slice`, a
/// kernel argument in global memory of a 4-byte element type (`u32`, `f32`).
#[cube]
pub(super) fn global_address<E: CubePrimitive>(slice: &[E], offset: usize) -> u64 {
    let base = slice.as_ptr();
    let address: u64;
    gpu_asm!(
        "cvta.to.global.u64 {}, {};",
        out(_) address,
        in(_) base,
        options(pure, nomem)
    );
    address + u64::cast_from(offset) * 4u64
}

/// This unit's eight `cp.async` copies (16 bytes each) of a whole 128-row tile: copy `i`
/// reads `from + i rows16` and writes `to + 2048 i`, where `from` is the global address of
/// (row `u / 16`, bytes `16 (u % 16)`) of the tile for unit `u`, `rows16` the bytes of 16
/// rows, and `to` the chunk's place in the swizzled layout ([`tile_word`]: 16 rows further is
/// 2048 bytes further in the tile). Eight consecutive units write one 128-byte row of a half,
/// in swizzled order, so the shared-memory writes do not conflict, and sixteen read one
/// 256-byte row. One asm statement, so a tile costs eight copies and seven adds a unit.
#[cube]
pub(super) fn copy_tile_async(from: u64, to: u32, rows16: u64) {
    gpu_asm!(
        "{{\n\
         .reg .b64 g<8>;\n\
         add.s64 g1, {0}, {2};\n\
         add.s64 g2, g1, {2};\n\
         add.s64 g3, g2, {2};\n\
         add.s64 g4, g3, {2};\n\
         add.s64 g5, g4, {2};\n\
         add.s64 g6, g5, {2};\n\
         add.s64 g7, g6, {2};\n\
         cp.async.cg.shared.global [{1}], [{0}], 16;\n\
         cp.async.cg.shared.global [{1}+2048], [g1], 16;\n\
         cp.async.cg.shared.global [{1}+4096], [g2], 16;\n\
         cp.async.cg.shared.global [{1}+6144], [g3], 16;\n\
         cp.async.cg.shared.global [{1}+8192], [g4], 16;\n\
         cp.async.cg.shared.global [{1}+10240], [g5], 16;\n\
         cp.async.cg.shared.global [{1}+12288], [g6], 16;\n\
         cp.async.cg.shared.global [{1}+14336], [g7], 16;\n\
         }}",
        in(_) from,
        in(_) to,
        in(_) rows16,
    );
}

/// Tile `j` of K or V (a `[rows, head_dim]` bf16 matrix from word `base` of `src`, rows
/// `row_words` words apart) into stage `j % 3` of `stage`: whole tiles by [`copy_tile_async`]
/// from this unit's addresses for tile 0 / stage 0 (`from` in global memory, `to` in shared
/// memory), the last partial tile by [`stage_tile_async`] (zeros past `rows`). Below head
/// dim 128 the units whose 16-byte column chunk lies past `head_dim` store zeros there
/// (through [`stage_tile_async`]) instead of copying.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_tile(
    src: &[u32],
    base: usize,
    row_words: usize,
    from: u64,
    to: u32,
    j: usize,
    rows: usize,
    stage: &mut Shared<[u32]>,
    #[comptime] head_dim: usize,
) {
    let first = j * 128;
    if first + 128 <= rows && !past_head_dim(head_dim) {
        let row_bytes = u64::cast_from(row_words) * 4u64;
        copy_tile_async(
            from + u64::cast_from(first) * row_bytes,
            to + ((j % 3) * 32768) as u32,
            row_bytes * 16u64,
        );
    } else {
        let at = (j % 3) * 8192;
        stage_tile_async(src, base, row_words, first, rows, stage, at, head_dim);
    }
}

/// Whether this unit's 16-byte column chunk of a tile row (`UNIT_POS % 16`, as the whole-tile
/// copies assign them) lies past `head_dim` (never at head dim 128).
#[cube]
pub(super) fn past_head_dim(#[comptime] head_dim: usize) -> bool {
    comptime!(head_dim < HEAD_DIM) && UNIT_POS as usize % 16 >= comptime!(head_dim / 8)
}

/// `s = Q K^T` over the first 64, 80 or 128 columns, the fewest that hold `head_dim`.
#[cube]
fn scores_first(s: &mut Array<f32>, desc_q: u64, desc_k: u64, #[comptime] head_dim: usize) {
    if comptime!(head_dim <= 64) {
        mma_qk_m64n128k64_bf16_sw128(s, desc_q, desc_k);
    } else if comptime!(head_dim <= 80) {
        mma_qk_m64n128k80_bf16_sw128(s, desc_q, desc_k);
    } else {
        mma_qk_m64n128k128_bf16_sw128(s, desc_q, desc_k);
    }
}

/// Orders this unit's generic-proxy writes to shared memory (stores, landed `cp.async`
/// copies) before the warpgroup MMA's reads of it through the async proxy.
#[cube]
pub(super) fn fence_for_wgmma() {
    gpu_asm!("cp.async.wait_all;\nfence.proxy.async.shared::cta;");
}

/// `2^x` by the special-function unit (`ex2.approx.ftz`: relative error about 2^-22; large
/// negative `x` gives 0).
#[cube]
pub(super) fn exp2_approx(x: f32) -> f32 {
    let y: f32;
    gpu_asm!("ex2.approx.ftz.f32 {}, {};", out(_) y, in(_) x, options(pure, nomem));
    y
}

/// One tile's online softmax on the accumulator layout, in place: the scores `s` (raw
/// `Q K^T`, keys from `tile`) masked where this unit's rows `row0` / `row1` must not see a
/// key (causal: row `r` sees keys up to `r + shift`), the running maxima `m` (raw units)
/// and sums `l` updated, `o` rescaled, and `P = exp((S - m) scale)` packed into bf16 A
/// fragments in `p`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn softmax_tile(
    s: &mut Array<f32>,
    o: &mut Array<f32>,
    p: &mut Array<u32>,
    state: &mut Array<f32>,
    tile: usize,
    row0: usize,
    sk: usize,
    shift: usize,
    scale_log2: f32,
    #[comptime] causal: bool,
) {
    let t = UNIT_POS as usize % 128;
    let row1 = row0 + 8;
    // Mask only where this unit's rows see part of the tile (the diagonal, the end of the
    // keys). Masked entries give exactly 0 below: every row sees key 0 in the first tile
    // (causal or not; the shift is never negative), so `m` is real from then on and
    // `exp2(-1e38 c - m c)` underflows.
    let full = tile + 128 <= sk && (!causal || tile + 127 <= row0 + shift);
    if !full {
        #[unroll]
        for i in 0..64usize {
            let col = tile + accumulator_col(t, i);
            let row = if comptime!((i / 2) % 2 == 0) {
                row0
            } else {
                row1
            };
            if col >= sk || (causal && col > row + shift) {
                s[i] = f32::new(MASKED);
            }
        }
    }
    let mut mx0 = f32::new(MASKED);
    let mut mx1 = f32::new(MASKED);
    #[unroll]
    for i in 0..64usize {
        if comptime!((i / 2) % 2 == 0) {
            mx0 = max(mx0, s[i]);
        } else {
            mx1 = max(mx1, s[i]);
        }
    }
    mx0 = max(mx0, plane_shuffle_xor(mx0, 1u32));
    mx0 = max(mx0, plane_shuffle_xor(mx0, 2u32));
    mx1 = max(mx1, plane_shuffle_xor(mx1, 1u32));
    mx1 = max(mx1, plane_shuffle_xor(mx1, 2u32));
    let new0 = max(state[0], mx0);
    let new1 = max(state[1], mx1);
    let alpha0 = exp2_approx((state[0] - new0) * scale_log2);
    let alpha1 = exp2_approx((state[1] - new1) * scale_log2);
    state[0] = new0;
    state[1] = new1;
    let shift0 = new0 * scale_log2;
    let shift1 = new1 * scale_log2;
    let mut sum0 = 0.0f32;
    let mut sum1 = 0.0f32;
    #[unroll]
    for i in 0..64usize {
        if comptime!((i / 2) % 2 == 0) {
            let e = exp2_approx(s[i] * scale_log2 - shift0);
            s[i] = e;
            sum0 += e;
            o[i] *= alpha0;
        } else {
            let e = exp2_approx(s[i] * scale_log2 - shift1);
            s[i] = e;
            sum1 += e;
            o[i] *= alpha1;
        }
    }
    state[2] = state[2] * alpha0 + sum0;
    state[3] = state[3] * alpha1 + sum1;
    // Accumulators 8j..8j+8 are the A fragment of `P V`'s 16-key step j.
    #[unroll]
    for j in 0..8usize {
        p[comptime!(4 * j)] = pack_bf16x2(s[comptime!(8 * j)], s[comptime!(8 * j + 1)]);
        p[comptime!(4 * j + 1)] = pack_bf16x2(s[comptime!(8 * j + 2)], s[comptime!(8 * j + 3)]);
        p[comptime!(4 * j + 2)] = pack_bf16x2(s[comptime!(8 * j + 4)], s[comptime!(8 * j + 5)]);
        p[comptime!(4 * j + 3)] = pack_bf16x2(s[comptime!(8 * j + 6)], s[comptime!(8 * j + 7)]);
    }
}

/// Tile `j`'s `O += P V` and, when there is a next tile, its scores `S = Q K^T`, in one
/// asm statement. K and V tile `j` live in stage `j % 3` (32 KB each); V's descriptor has
/// leading = 16384 bytes (between its 64-wide halves) and stride = 1024 (8-key groups).
#[cube]
#[allow(clippy::too_many_arguments)]
fn products_tile(
    o: &mut Array<f32>,
    p: &Array<u32>,
    s: &mut Array<f32>,
    j: usize,
    tiles: usize,
    desc_q: u64,
    k_address: u32,
    v_address: u32,
    #[comptime] head_dim: usize,
) {
    let v_stage = v_address + ((j % 3) * 32768) as u32;
    let desc_v = swizzled_descriptor(v_stage, 16384u32, 1024u32);
    if j + 1 < tiles {
        let k_stage = k_address + (((j + 1) % 3) * 32768) as u32;
        let desc_k = swizzled_descriptor(k_stage, 16u32, 1024u32);
        // The scores as deep as the head dim needs (see `scores_first`).
        if comptime!(head_dim <= 64) {
            mma_pv_then_qk64_m64n128k128_bf16_sw128(o, p, desc_v, s, desc_q, desc_k);
        } else if comptime!(head_dim <= 80) {
            mma_pv_then_qk80_m64n128k128_bf16_sw128(o, p, desc_v, s, desc_q, desc_k);
        } else {
            mma_pv_then_qk_m64n128k128_bf16_sw128(o, p, desc_v, s, desc_q, desc_k);
        }
    } else {
        mma_pv_m64n128k128_bf16_sw128(o, p, desc_v);
    }
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn forward_kernel(
    q: &[u32],
    k: &[u32],
    v: &[u32],
    o: &mut [half::bf16],
    lse: &mut [f32],
    strides: &[u32],
    sq: u32,
    sk: u32,
    heads: u32,
    group: u32,
    scale: f32,
    shift: u32,
    #[comptime] causal: bool,
    #[comptime] head_dim: usize,
) {
    let unit = UNIT_POS as usize;
    let warpgroup = unit / 128;
    let t = unit % 128;
    let lane = t % 32;
    let shift = shift as usize;
    let g = lane / 4;
    let (sq, sk) = (sq as usize, sk as usize);
    let bh = CUBE_POS_Y as usize;
    let b = bh / heads as usize;
    let h = bh % heads as usize;
    let kv_head = h / group as usize;
    // Element strides (batch, head, row) of Q, K, V and O; Q, K and V read as u32 words.
    let q_row = strides[2] as usize / 2;
    let k_row = strides[5] as usize / 2;
    let v_row = strides[8] as usize / 2;
    let q_base = (b * strides[0] as usize + h * strides[1] as usize) / 2;
    let k_base = (b * strides[3] as usize + kv_head * strides[4] as usize) / 2;
    let v_base = (b * strides[6] as usize + kv_head * strides[7] as usize) / 2;
    let o_base = b * strides[9] as usize + h * strides[10] as usize;
    let o_row = strides[11] as usize;
    let first = CUBE_POS_X as usize * 128;
    let row0 = first + warpgroup * 64 + (t / 32) * 16 + g;
    let row1 = row0 + 8;
    let scale_log2 = scale * f32::new(LOG2_E);

    let mut q_s = Shared::<[u32]>::new_aligned_slice(8192usize, 1024usize);
    // K and V tiles, three stages each (tile j at words [(j % 3) 8192, +8192)).
    let mut k_s = Shared::<[u32]>::new_aligned_slice(24576usize, 1024usize);
    let mut v_s = Shared::<[u32]>::new_aligned_slice(24576usize, 1024usize);
    // Q by `cp.async` too (waited for with K and V's first tiles): a plain copy loop waits
    // for each load before the next, which short sequences (SigLIP's 729) feel. Columns past
    // the head dim are stored as zeros in every tile, so the products over 128 columns (or
    // the shallower score products) equal those over `head_dim`.
    stage_tile_async(q, q_base, q_row, first, sq, &mut q_s, 0usize, head_dim);
    // This warpgroup's 64 rows: 8192 bytes into each half of the swizzled Q tile.
    let q_address = shared_address::<u32>(&q_s) + (warpgroup * 8192) as u32;
    let desc_q = swizzled_descriptor(q_address, 16u32, 1024u32);
    let k_address = shared_address::<u32>(&k_s);
    let v_address = shared_address::<u32>(&v_s);

    let mut s = Array::<f32>::new(64usize);
    let mut acc = Array::<f32>::new(64usize);
    let mut p_frag = Array::<u32>::new(32usize);
    // Running maxima (raw scores) and sums of rows row0 and row1.
    let mut state = Array::<f32>::new(4usize);
    state[0] = f32::new(MASKED);
    state[1] = f32::new(MASKED);
    state[2] = 0.0f32;
    state[3] = 0.0f32;
    #[unroll]
    for i in 0..64usize {
        acc[i] = 0.0f32;
    }
    // Causal: the cube's last row sees keys up to `first + 127 + shift`.
    let mut end = sk;
    if causal && first + 128 + shift < sk {
        end = first + 128 + shift;
    }
    let tiles = end.div_ceil(128usize);
    // This unit's copy addresses (see `copy_tile_async`).
    let k_from = global_address::<u32>(k, k_base + (unit / 16) * k_row + (unit % 16) * 4);
    let v_from = global_address::<u32>(v, v_base + (unit / 16) * v_row + (unit % 16) * 4);
    let own_word = tile_word(unit / 16, (unit % 16) * 4);
    let (k_to, v_to) = (
        k_address + (own_word * 4) as u32,
        v_address + (own_word * 4) as u32,
    );
    load_tile(
        k, k_base, k_row, k_from, k_to, 0usize, sk, &mut k_s, head_dim,
    );
    if tiles > 1 {
        load_tile(
            k, k_base, k_row, k_from, k_to, 1usize, sk, &mut k_s, head_dim,
        );
    }
    load_tile(
        v, v_base, v_row, v_from, v_to, 0usize, sk, &mut v_s, head_dim,
    );
    fence_for_wgmma();
    sync_cube();
    let desc_k0 = swizzled_descriptor(k_address, 16u32, 1024u32);
    scores_first(&mut s, desc_q, desc_k0, head_dim);

    // Interval `step` (between two cube barriers): warpgroup 0 runs tile `step`'s softmax,
    // then its products (P V of this tile, S of the next); warpgroup 1 runs the products of
    // tile `step - 1`, then tile `step`'s softmax. So one warpgroup's softmax overlaps the
    // other's products. Tiles in use in interval `step`: K `step` and `step + 1`, V `step - 1`
    // and `step`; K `step + 2` and V `step + 1` are copied for the next interval into the
    // third stage of each.
    let mut step = 0usize;
    while step <= tiles {
        if step + 2 < tiles {
            load_tile(
                k,
                k_base,
                k_row,
                k_from,
                k_to,
                step + 2,
                sk,
                &mut k_s,
                head_dim,
            );
        }
        if step + 1 < tiles {
            load_tile(
                v,
                v_base,
                v_row,
                v_from,
                v_to,
                step + 1,
                sk,
                &mut v_s,
                head_dim,
            );
        }
        if warpgroup == 1 && step >= 1 {
            products_tile(
                &mut acc,
                &p_frag,
                &mut s,
                step - 1,
                tiles,
                desc_q,
                k_address,
                v_address,
                head_dim,
            );
        }
        if step < tiles {
            softmax_tile(
                &mut s,
                &mut acc,
                &mut p_frag,
                &mut state,
                step * 128,
                row0,
                sk,
                shift,
                scale_log2,
                causal,
            );
        }
        if warpgroup == 0 && step < tiles {
            products_tile(
                &mut acc, &p_frag, &mut s, step, tiles, desc_q, k_address, v_address, head_dim,
            );
        }
        fence_for_wgmma();
        sync_cube();
        step += 1;
    }

    // Row sums over the quad, then O / l and LSE (natural log: m scale + ln l).
    let (m0, m1) = (state[0], state[1]);
    let mut l0 = state[2];
    let mut l1 = state[3];
    l0 += plane_shuffle_xor(l0, 1u32);
    l0 += plane_shuffle_xor(l0, 2u32);
    l1 += plane_shuffle_xor(l1, 1u32);
    l1 += plane_shuffle_xor(l1, 2u32);
    let mut inv0 = 0.0f32;
    let mut inv1 = 0.0f32;
    let mut lse0 = f32::new(MASKED);
    let mut lse1 = f32::new(MASKED);
    if l0 > 0.0f32 {
        inv0 = 1.0f32 / l0;
        lse0 = m0 * scale + l0.ln();
    }
    if l1 > 0.0f32 {
        inv1 = 1.0f32 / l1;
        lse1 = m1 * scale + l1.ln();
    }
    #[unroll]
    for i in 0..64usize {
        let upper = comptime!((i / 2) % 2 == 0);
        let row = if upper { row0 } else { row1 };
        let inv = if upper { inv0 } else { inv1 };
        let col = accumulator_col(t, i);
        if row < sq && col < head_dim {
            o[o_base + row * o_row + col] = half::bf16::cast_from(acc[i] * inv);
        }
    }
    if lane % 4 == 0 {
        if row0 < sq {
            lse[bh * sq + row0] = lse0;
        }
        if row1 < sq {
            lse[bh * sq + row1] = lse1;
        }
    }
}
