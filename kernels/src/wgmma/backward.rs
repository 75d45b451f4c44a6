//! A flash-attention backward on the warpgroup MMA (bf16; head dim 128, and 64 to 120 in
//! multiples of 8 padded with zero columns as in the forward): dK and dV of a
//! block of 128 keys, and dQ added into an f32 buffer by reductions, from the forward's LSE
//! and `delta = rowsum(dO * O)`. What `flash_backward` runs on a compute-capability-9.0
//! device for the calls [`backward_launch::routes`](super::backward_launch::routes) accepts.
//!
//! Cube: two warpgroups; warpgroup `w` owns keys `[first + 64 w, first + 64 w + 64)` of the
//! cube's block; grid `(ceil(Sk / 128), B * Hkv)`. K and V (128 rows each) are staged once;
//! the loop runs over the query heads of the kv head's group and, for each, over query tiles
//! of 64 rows (causal: from the first query that sees the block, query `i` seeing keys
//! `j <= i + shift`, `shift = q_offset - k_offset >= 0`). Q and dO tiles are double-buffered,
//! copied by `cp.async` one tile ahead, with their LSE (times `log2 e`) and delta. Per tile,
//! each warpgroup computes, with `S^T` and `dP^T` as 64 keys x 64 queries on the accumulator
//! layout (keys are rows):
//! - `S^T = K Q^T`, `dP^T = V dO^T` (one asm statement, both waited for together);
//! - `P^T = exp2(S^T scale log2 e - LSE log2 e)` (zero where causal hides a query from a key),
//!   `dS^T = P^T (dP^T - delta)`;
//! - `dS` stored into shared memory (queries as rows), then `dV += P^T dO` and
//!   `dK += dS^T Q` with `P^T` / `dS^T` as register A fragments (one asm statement);
//! - after a cube barrier, `dQ = dS K` for 64 queries x its half of the head dimension
//!   (128 keys deep, both warpgroups' dS), added to the f32 dQ buffer by 16-byte
//!   `red.global.add.v4.f32` reductions ([`add_dq_tile`]).
//!
//! dK is scaled by `scale` at the end; the dQ buffer holds `dS K` (the caller multiplies by
//! `scale` when it converts to bf16, as for the `mma.sync` kernel's fused dQ). Query rows
//! whose LSE is below -1e38 (no visible key) contribute nothing. All tiles use the forward's
//! 128-byte-swizzled layout (`forward.rs`): a row's 16-byte chunks permuted by `c ^ (r % 8)`
//! within each 64-column half; the 64-row tiles keep their halves 8192 bytes apart.

use cubecl::prelude::barrier::copy_async;
use cubecl::prelude::*;

use super::forward::{
    LOG2_E, copy_tile_async, exp2_approx, fence_for_wgmma, global_address, past_head_dim,
    stage_tile_async, swizzled_descriptor, tile_word,
};
use super::{
    accumulator_col, accumulator_row, mma_dq_m64n64k128_bf16_sw128,
    mma_dv_dk_m64n128k64_bf16_sw128, mma_scores_m64n64k64_bf16_sw128,
    mma_scores_m64n64k80_bf16_sw128, mma_scores_m64n64k128_bf16_sw128, pack_bf16x2, shared_address,
};

/// What a query row that contributes nothing stores as its LSE (times `log2 e`): every
/// `exp2(s - NO_ROW)` is 0.
const NO_ROW: f32 = 1.0e38;
/// Keys a cube handles (two warpgroups of 64).
pub const KEYS_A_CUBE: usize = 128;

/// Word offset of word `word` (0..64) of row `row` of a 64-row, 128-wide bf16 tile (16 KB,
/// 1024-byte aligned) in the 128-byte-swizzled layout: as [`tile_word`], halves 8 KB apart.
#[cube]
fn tile_word64(row: usize, word: usize) -> usize {
    let chunk = word / 4;
    (chunk / 8) * 2048 + row * 32 + ((chunk % 8) ^ (row % 8)) * 4 + word % 4
}

/// Element offset of (row `row`, column `col`) in the same 64-row swizzled layout, for bf16.
#[cube]
fn tile_element64(row: usize, col: usize) -> usize {
    let chunk = col / 8;
    (chunk / 8) * 4096 + row * 64 + ((chunk % 8) ^ (row % 8)) * 8 + col % 8
}

/// This unit's four `cp.async` copies of a whole 64-row tile (see `forward.rs`'s
/// `copy_tile_async`: copy `i` reads `from + i rows16`, writes `to + 2048 i`).
#[cube]
fn copy_tile64_async(from: u64, to: u32, rows16: u64) {
    gpu_asm!(
        "{{\n\
         .reg .b64 g<4>;\n\
         add.s64 g1, {0}, {2};\n\
         add.s64 g2, g1, {2};\n\
         add.s64 g3, g2, {2};\n\
         cp.async.cg.shared.global [{1}], [{0}], 16;\n\
         cp.async.cg.shared.global [{1}+2048], [g1], 16;\n\
         cp.async.cg.shared.global [{1}+4096], [g2], 16;\n\
         cp.async.cg.shared.global [{1}+6144], [g3], 16;\n\
         }}",
        in(_) from,
        in(_) to,
        in(_) rows16,
    );
}

/// Rows `[first, first + 64)` of a `[rows, head_dim]` bf16 matrix (u32 words from `base`,
/// rows `row_words` apart) into the 64-row tile at word `at` of `tile` by `cp.async`; zeros
/// past `rows` and in the column chunks past `head_dim`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_tile64(
    src: &[u32],
    base: usize,
    row_words: usize,
    first: usize,
    rows: usize,
    tile: &mut Shared<[u32]>,
    tile_address: u32,
    at: usize,
    #[comptime] head_dim: usize,
) {
    let unit = UNIT_POS as usize;
    let past = past_head_dim(head_dim);
    if first + 64 <= rows && !past {
        let from = global_address::<u32>(
            src,
            base + (first + unit / 16) * row_words + (unit % 16) * 4,
        );
        let to = tile_address + ((at + tile_word64(unit / 16, (unit % 16) * 4)) * 4) as u32;
        copy_tile64_async(from, to, u64::cast_from(row_words) * 64u64);
    } else {
        #[unroll]
        for step in 0..4usize {
            // `i % 16 == unit % 16`: the same column chunk in every step.
            let i = unit + step * 256;
            let row = i / 16;
            let word = (i % 16) * 4;
            let to = at + tile_word64(row, word);
            if first + row < rows && !past {
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
}

/// Adds `v` to the four f32 at global `address` (16-byte aligned) as one reduction
/// (`red.global.add.v4.f32`, sm_90): one memory transaction instead of four.
#[cube]
fn red_add_v4(address: u64, v0: f32, v1: f32, v2: f32, v3: f32) {
    gpu_asm!(
        "red.global.add.v4.f32 [{0}], {{{1}, {2}, {3}, {4}}};",
        in(_) address,
        in(_) v0,
        in(_) v1,
        in(_) v2,
        in(_) v3,
    );
}

/// Adds a warpgroup's dQ tile (`dq`, 64 queries from `q0` x 64 columns from `col0` on the
/// `m64n64` accumulator layout) into the f32 buffer `dq_acc` (rows of `head_dim` from row
/// block `row_base`), rows past `sq` and columns past `head_dim` skipped. Lanes `q` and
/// `q ^ 1` of a quad exchange halves so that each holds four consecutive columns of one
/// row (the even lane row `g`, the odd lane row `g + 8`), then each adds them with one
/// 16-byte reduction: 8 a unit instead of 32 scalar atomics, whole 32-byte sectors.
#[cube]
fn add_dq_tile(
    dq: &Array<f32>,
    dq_acc: &[f32],
    row_base: usize,
    q0: usize,
    sq: usize,
    col0: usize,
    #[comptime] head_dim: usize,
) {
    let t = UNIT_POS as usize % 128;
    let quad = t % 4;
    let odd = quad % 2 == 1;
    let row = q0 + (t / 32) * 16 + (t % 32) / 4 + if odd { 8usize } else { 0usize };
    let base = global_address::<f32>(dq_acc, (row_base + row) * head_dim + col0 + (quad / 2) * 4);
    #[unroll]
    for j in 0..8usize {
        let (x0, x1) = (dq[comptime!(4 * j)], dq[comptime!(4 * j + 1)]);
        let (y0, y1) = (dq[comptime!(4 * j + 2)], dq[comptime!(4 * j + 3)]);
        let send0 = if odd { x0 } else { y0 };
        let send1 = if odd { x1 } else { y1 };
        let got0 = plane_shuffle_xor(send0, 1u32);
        let got1 = plane_shuffle_xor(send1, 1u32);
        // Head dims are multiples of 8: columns 8 j.. of this tile are all inside or all past.
        if row < sq && col0 + comptime!(8 * j) < head_dim {
            let address = base + comptime!((j * 32) as u64);
            if odd {
                red_add_v4(address, got0, got1, y0, y1);
            } else {
                red_add_v4(address, x0, x1, got0, got1);
            }
        }
    }
}

/// Orders this unit's shared-memory stores before the warpgroup MMA's reads (async proxy),
/// without waiting for copies in flight.
#[cube]
fn fence_stores_for_wgmma() {
    gpu_asm!("fence.proxy.async.shared::cta;");
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn backward_kernel(
    q: &[u32],
    k: &[u32],
    v: &[u32],
    d_o: &[u32],
    lse: &[f32],
    delta: &[f32],
    dk: &mut [half::bf16],
    dv: &mut [half::bf16],
    // Written only through `red` reductions (`add_dq_tile`), so bound read-only.
    dq_acc: &[f32],
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
    let (sq, sk) = (sq as usize, sk as usize);
    let shift = shift as usize;
    let group = group as usize;
    let heads = heads as usize;
    let kv_heads = heads / group;
    let bh = CUBE_POS_Y as usize;
    let b = bh / kv_heads;
    let kv_head = bh % kv_heads;
    // Element strides (batch, head, row) of Q, K, V and dO, read as u32 words.
    let q_row = strides[2] as usize / 2;
    let k_row = strides[5] as usize / 2;
    let v_row = strides[8] as usize / 2;
    let o_row = strides[11] as usize / 2;
    let k_base = (b * strides[3] as usize + kv_head * strides[4] as usize) / 2;
    let v_base = (b * strides[6] as usize + kv_head * strides[7] as usize) / 2;
    let first = CUBE_POS_X as usize * 128;
    let scale_log2 = scale * f32::new(LOG2_E);

    let mut k_s = Shared::<[u32]>::new_aligned_slice(8192usize, 1024usize);
    let mut v_s = Shared::<[u32]>::new_aligned_slice(8192usize, 1024usize);
    // Q and dO tiles, two stages each (tile n at words [(n % 2) 4096, +4096)).
    let mut q_s = Shared::<[u32]>::new_aligned_slice(8192usize, 1024usize);
    let mut do_s = Shared::<[u32]>::new_aligned_slice(8192usize, 1024usize);
    let mut ds_s = Shared::<[half::bf16]>::new_aligned_slice(8192usize, 1024usize);
    let mut lse_s = Shared::<[f32]>::new_slice(128usize);
    let mut delta_s = Shared::<[f32]>::new_slice(128usize);
    let k_address = shared_address::<u32>(&k_s);
    let v_address = shared_address::<u32>(&v_s);
    let q_address = shared_address::<u32>(&q_s);
    let do_address = shared_address::<u32>(&do_s);
    let ds_address = shared_address::<half::bf16>(&ds_s);

    // K and V of the block (zeros past the keys and the head dim: every tile of this kernel
    // holds zeros in the columns past `head_dim`, so 128-wide products equal the narrower).
    if first + 128 <= sk && !past_head_dim(head_dim) {
        let own = (tile_word(unit / 16, (unit % 16) * 4) * 4) as u32;
        let at = (unit / 16) * k_row + (unit % 16) * 4;
        let k_from = global_address::<u32>(k, k_base + first * k_row + at);
        copy_tile_async(k_from, k_address + own, u64::cast_from(k_row) * 64u64);
        let at_v = (unit / 16) * v_row + (unit % 16) * 4;
        let v_from = global_address::<u32>(v, v_base + first * v_row + at_v);
        copy_tile_async(v_from, v_address + own, u64::cast_from(v_row) * 64u64);
    } else {
        stage_tile_async(k, k_base, k_row, first, sk, &mut k_s, 0usize, head_dim);
        stage_tile_async(v, v_base, v_row, first, sk, &mut v_s, 0usize, head_dim);
    }

    // Query tiles of each head: causal blocks start at the first query that sees the block's
    // first key (query `i` sees keys up to `i + shift`); none when no query does.
    let q_tiles = sq.div_ceil(64usize);
    let mut first_tile = 0usize;
    if causal && first > shift {
        first_tile = (first - shift) / 64;
    }
    let mut per_head = 0usize;
    if q_tiles > first_tile {
        per_head = q_tiles - first_tile;
    }
    let total = per_head * group;

    // Tile 0's Q, dO, LSE and delta into stage 0.
    let head0 = kv_head * group;
    let q00 = first_tile * 64;
    let q_base0 = (b * strides[0] as usize + head0 * strides[1] as usize) / 2;
    let o_base0 = (b * strides[9] as usize + head0 * strides[10] as usize) / 2;
    load_tile64(
        q, q_base0, q_row, q00, sq, &mut q_s, q_address, 0usize, head_dim,
    );
    load_tile64(
        d_o, o_base0, o_row, q00, sq, &mut do_s, do_address, 0usize, head_dim,
    );
    load_rows_stats(
        lse,
        delta,
        &mut lse_s,
        &mut delta_s,
        b * heads + head0,
        q00,
        sq,
        0usize,
    );
    fence_for_wgmma();
    sync_cube();

    let mut s = Array::<f32>::new(32usize);
    let mut dp = Array::<f32>::new(32usize);
    let mut p_frag = Array::<u32>::new(16usize);
    let mut ds_frag = Array::<u32>::new(16usize);
    let mut dq = Array::<f32>::new(32usize);
    let mut dv_acc = Array::<f32>::new(64usize);
    let mut dk_acc = Array::<f32>::new(64usize);
    #[unroll]
    for i in 0..64usize {
        dv_acc[i] = 0.0f32;
        dk_acc[i] = 0.0f32;
    }
    // This warpgroup's 64 keys as A (K-major, rows 64 w..) and its half of the head dim as
    // dQ's B (N-major).
    let desc_k = swizzled_descriptor(k_address + (warpgroup * 8192) as u32, 16u32, 1024u32);
    let desc_v = swizzled_descriptor(v_address + (warpgroup * 8192) as u32, 16u32, 1024u32);
    let desc_k_n = swizzled_descriptor(k_address + (warpgroup * 16384) as u32, 16384u32, 1024u32);
    let desc_ds = swizzled_descriptor(ds_address, 16u32, 1024u32);
    // Keys of this unit's accumulator rows (`+ 8` for the odd pairs).
    let key0 = first + warpgroup * 64 + (t / 32) * 16 + (t % 32) / 4;
    let last_key = first + warpgroup * 64 + 63;

    let mut n = 0usize;
    while n < total {
        let stage = n % 2;
        if n + 1 < total {
            let m = n + 1;
            let head = kv_head * group + m / per_head;
            let q0 = (first_tile + m % per_head) * 64;
            let q_base = (b * strides[0] as usize + head * strides[1] as usize) / 2;
            let o_base = (b * strides[9] as usize + head * strides[10] as usize) / 2;
            let at = (m % 2) * 4096;
            load_tile64(q, q_base, q_row, q0, sq, &mut q_s, q_address, at, head_dim);
            load_tile64(
                d_o, o_base, o_row, q0, sq, &mut do_s, do_address, at, head_dim,
            );
            load_rows_stats(
                lse,
                delta,
                &mut lse_s,
                &mut delta_s,
                b * heads + head,
                q0,
                sq,
                m % 2,
            );
        }
        let head = kv_head * group + n / per_head;
        let q0 = (first_tile + n % per_head) * 64;
        let q_stage = q_address + (stage * 16384) as u32;
        let do_stage = do_address + (stage * 16384) as u32;
        let desc_q = swizzled_descriptor(q_stage, 16u32, 1024u32);
        let desc_do = swizzled_descriptor(do_stage, 16u32, 1024u32);
        // As deep as the head dim needs: 64, 80 or 128 columns.
        if comptime!(head_dim <= 64) {
            mma_scores_m64n64k64_bf16_sw128(&mut s, &mut dp, desc_k, desc_q, desc_v, desc_do);
        } else if comptime!(head_dim <= 80) {
            mma_scores_m64n64k80_bf16_sw128(&mut s, &mut dp, desc_k, desc_q, desc_v, desc_do);
        } else {
            mma_scores_m64n64k128_bf16_sw128(&mut s, &mut dp, desc_k, desc_q, desc_v, desc_do);
        }
        // P^T and dS^T on the accumulator layout (rows keys, columns queries): value
        // `i = 4 j + 2 r + e` is key row `g + 8 r`, query column `8 j + 2 (t % 4) + e`. The
        // unit's 16 LSE / delta values are read first (no store in between, so each once).
        let quad_col = 2 * (t % 4);
        let stats_at = stage * 64 + quad_col;
        let mut lse2 = Array::<f32>::new(16usize);
        let mut dlt = Array::<f32>::new(16usize);
        #[unroll]
        for c in 0..16usize {
            let at = stats_at + comptime!(8 * (c / 2) + c % 2);
            lse2[c] = lse_s[at];
            dlt[c] = delta_s[at];
        }
        let partial = causal && q0 + shift < last_key;
        // dS goes to shared memory with queries as rows ([`tile_element64`]): for fixed
        // (r, e) the eight values j are 512 elements apart, so four base indices suffice.
        let key_lo = (t / 32) * 16 + (t % 32) / 4 + warpgroup * 64;
        let mut ds_at = Array::<usize>::new(4usize);
        #[unroll]
        for re in 0..4usize {
            ds_at[re] = tile_element64(
                quad_col + comptime!(re % 2),
                key_lo + comptime!((re / 2) * 8),
            );
        }
        #[unroll]
        for i in 0..32usize {
            let c = comptime!((i / 4) * 2 + i % 2);
            let re = comptime!(((i / 2) % 2) * 2 + i % 2);
            let mut p = exp2_approx(s[i] * scale_log2 - lse2[c]);
            if partial {
                let key = key0 + comptime!(((i / 2) % 2) * 8);
                if q0 + quad_col + comptime!(8 * (i / 4) + i % 2) + shift < key {
                    p = 0.0f32;
                }
            }
            let ds = p * (dp[i] - dlt[c]);
            s[i] = p;
            dp[i] = ds;
            ds_s[ds_at[re] + comptime!((i / 4) * 512)] = half::bf16::cast_from(ds);
        }
        #[unroll]
        for j in 0..4usize {
            p_frag[comptime!(4 * j)] = pack_bf16x2(s[comptime!(8 * j)], s[comptime!(8 * j + 1)]);
            p_frag[comptime!(4 * j + 1)] =
                pack_bf16x2(s[comptime!(8 * j + 2)], s[comptime!(8 * j + 3)]);
            p_frag[comptime!(4 * j + 2)] =
                pack_bf16x2(s[comptime!(8 * j + 4)], s[comptime!(8 * j + 5)]);
            p_frag[comptime!(4 * j + 3)] =
                pack_bf16x2(s[comptime!(8 * j + 6)], s[comptime!(8 * j + 7)]);
            ds_frag[comptime!(4 * j)] = pack_bf16x2(dp[comptime!(8 * j)], dp[comptime!(8 * j + 1)]);
            ds_frag[comptime!(4 * j + 1)] =
                pack_bf16x2(dp[comptime!(8 * j + 2)], dp[comptime!(8 * j + 3)]);
            ds_frag[comptime!(4 * j + 2)] =
                pack_bf16x2(dp[comptime!(8 * j + 4)], dp[comptime!(8 * j + 5)]);
            ds_frag[comptime!(4 * j + 3)] =
                pack_bf16x2(dp[comptime!(8 * j + 6)], dp[comptime!(8 * j + 7)]);
        }
        fence_stores_for_wgmma();
        mma_dv_dk_m64n128k64_bf16_sw128(
            &mut dv_acc,
            &p_frag,
            swizzled_descriptor(do_stage, 8192u32, 1024u32),
            &mut dk_acc,
            &ds_frag,
            swizzled_descriptor(q_stage, 8192u32, 1024u32),
        );
        // Both warpgroups' dS are in shared memory: dQ for this warpgroup's half of the
        // head dimension, over all 128 keys.
        sync_cube();
        // (Below head dim 65 the second warpgroup's half is all padding.)
        if warpgroup * 64 < head_dim {
            mma_dq_m64n64k128_bf16_sw128(&mut dq, desc_ds, desc_k_n);
            let row_base = (b * heads + head) * sq;
            add_dq_tile(&dq, dq_acc, row_base, q0, sq, warpgroup * 64, head_dim);
        }
        // The next tile has landed; nobody reads this tile's stage or dS any more.
        fence_for_wgmma();
        sync_cube();
        n += 1;
    }

    // dK (times scale) and dV of this warpgroup's keys, contiguous [B, Hkv, Sk, head_dim].
    let out_base = (b * kv_heads + kv_head) * sk;
    #[unroll]
    for i in 0..64usize {
        let key = first + warpgroup * 64 + accumulator_row(t, i);
        let col = accumulator_col(t, i);
        if key < sk && col < head_dim {
            let at = (out_base + key) * head_dim + col;
            dk[at] = half::bf16::cast_from(dk_acc[i] * scale);
            dv[at] = half::bf16::cast_from(dv_acc[i]);
        }
    }
}

/// LSE (times `log2 e`; [`NO_ROW`] for rows past `sq` or that see no key) and delta of the
/// 64 query rows from `q0` of row block `bh` into stage `stage`: units 0..64 the LSE,
/// 64..128 delta.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_rows_stats(
    lse: &[f32],
    delta: &[f32],
    lse_s: &mut Shared<[f32]>,
    delta_s: &mut Shared<[f32]>,
    bh: usize,
    q0: usize,
    sq: usize,
    stage: usize,
) {
    let unit = UNIT_POS as usize;
    if unit < 128 {
        let c = unit % 64;
        let row = q0 + c;
        if unit < 64 {
            let mut l2 = f32::new(NO_ROW);
            if row < sq {
                let l = lse[bh * sq + row];
                if l >= -1.0e38f32 {
                    l2 = l * f32::new(LOG2_E);
                }
            }
            lse_s[stage * 64 + c] = l2;
        } else {
            let mut dl = 0.0f32;
            if row < sq {
                dl = delta[bh * sq + row];
            }
            delta_s[stage * 64 + c] = dl;
        }
    }
}
