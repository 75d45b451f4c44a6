//! Split-key attention for a few query rows per kv head: decoding (one new token
//! against a long KV cache) and other short query blocks. The forward kernels give
//! every query head its own cube and walk all keys in it, so one decoding step runs
//! `B * Hq` cubes (12 for the 1.5B model) over the whole cache: most of the GPU idles.
//! Here (flash-decoding):
//! - a cube takes one kv head and one slice of the keys, for all the query rows that
//!   read that kv head (the `Hq / Hkv` heads of its group times Sq): each K/V row is
//!   read once for the whole group;
//! - the keys are split so that about two cubes per multiprocessor run;
//! - each cube writes its slice's O (normalised) and LSE in f32, and a second kernel
//!   merges the slices per row with weights `exp(lse_s - lse)`;
//! - inside a cube, key tiles go global -> registers -> shared memory (the next
//!   tile's loads optionally issued before the current tile's work); the score and
//!   P V sums run as four independent multiply-add chains, unrolled; the threads a
//!   cube are settable. All three are [`super::DecodeTuning`] settings (environment:
//!   `LONGVIEW_DECODE_PREFETCH=1`, `LONGVIEW_DECODE_UNROLL=0`,
//!   `LONGVIEW_DECODE_UNITS`) kept for A/B timing; the defaults (no prefetch,
//!   unrolled, 128 units) are the fastest of `flash_bench --decode` on an H100.
//!
//! Masks: causal with offsets (key `j` visible to query row `i` iff
//! `k_offset + j <= q_offset + i`) or none; packed sequences do not come here. A row
//! with no visible key gets O = 0 and LSE = [`NO_KEYS`], as in the other kernels.

use cubecl::prelude::*;

use super::kernels::{MASKED, NO_KEYS};
use super::{AttnError, Client, DeviceTensor, FlashOptions, Geometry};

/// Most query rows per kv head (`Hq / Hkv * Sq`) the decode kernels take.
pub const DECODE_MAX_ROWS: usize = 32;
/// Units per cube of the split kernel unless `DecodeTuning::units` says.
const UNITS: usize = 128;
/// Units per cube of the merge kernel.
const MERGE_UNITS: usize = 64;

/// Partial attention of one key slice. Grid: `(splits, B * Hkv)`; cube: `units`
/// units. `o_part` is `[splits * B, Hq, Sq, D]`, `lse_part` `[splits * B, Hq, Sq]`
/// (slice `s` of batch row `b` at `s * B + b`). With `counted`, the keys are the
/// first `keys[0]` rows of k and v (slices past them write no keys: O = 0, LSE =
/// [`NO_KEYS`]); otherwise `keys` is not read.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn flash_decode_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    o_part: &mut Tensor<f32>,
    lse_part: &mut Tensor<f32>,
    keys: &Tensor<u32>,
    scale: f32,
    q_offset: u32,
    k_offset: u32,
    per_split: u32,
    #[comptime] causal: bool,
    #[comptime] counted: bool,
    #[comptime] head_dim: usize,
    #[comptime] max_rows: usize,
    #[comptime] block_k: usize,
    #[comptime] units: usize,
    #[comptime] unrolled: bool,
    #[comptime] prefetch: bool,
) {
    let split = CUBE_POS_X as usize;
    let hq = q.shape(1);
    let hkv = k.shape(1);
    let group = hq / hkv;
    let b = CUBE_POS_Y as usize / hkv;
    let hk = CUBE_POS_Y as usize % hkv;
    let batch = q.shape(0);
    let sq = q.shape(2);
    // `counted`: only the first `keys[0]` rows of k and v hold keys (a KV cache's
    // buffers read by a captured decoding step, whose length lives on the device).
    let mut sk = k.shape(2);
    if counted {
        let filled = usize::cast_from(keys[0]);
        if filled < sk {
            sk = filled;
        }
    }
    let rows = group * sq;
    let u = UNIT_POS_X as usize;
    let pitch = comptime!(head_dim + 1);

    // This slice's keys, cut to what the last query row may see.
    let lo = split * per_split as usize;
    let mut hi = lo + per_split as usize;
    if hi > sk {
        hi = sk;
    }
    if causal {
        let limit = q_offset as usize + sq;
        let mut visible = 0usize;
        if limit > k_offset as usize {
            visible = limit - k_offset as usize;
        }
        if visible < hi {
            hi = visible;
        }
    }

    // Query rows (row r = query head hk * group + r / sq, position r % sq), scaled.
    let mut q_s = Shared::<[f32]>::new_slice(comptime!(max_rows * head_dim));
    let mut k_s = Shared::<[f32]>::new_slice(comptime!(block_k * (head_dim + 1)));
    let mut v_s = Shared::<[f32]>::new_slice(comptime!(block_k * head_dim));
    let mut p_s = Shared::<[f32]>::new_slice(comptime!(max_rows * block_k));
    let mut row_s = Shared::<[f32]>::new_slice(max_rows);
    let mut idx = u;
    while idx < rows * head_dim {
        let r = idx / head_dim;
        let d = idx % head_dim;
        let h = hk * group + r / sq;
        let i = r % sq;
        let at = b * q.stride(0) + h * q.stride(1) + i * q.stride(2) + d * q.stride(3);
        q_s[idx] = f32::cast_from(q[at]) * scale;
        idx += units;
    }

    // Accumulators: element `u + j * units` of the rows x head_dim block.
    let per_unit = comptime!((max_rows * head_dim).div_ceil(units));
    let mut acc = Array::<f32>::new(per_unit);
    for j in 0..per_unit {
        acc[j] = 0.0f32;
    }
    // Softmax statistics of row `u` (units below `rows`).
    let mut m = f32::new(NO_KEYS);
    let mut l = 0.0f32;

    let k_base = b * k.stride(0) + hk * k.stride(1);
    let v_base = b * v.stride(0) + hk * v.stride(1);
    // A tile's keys and values travel through registers: every load of a tile is
    // issued before the first store (keys past the slice clamped to its last key and
    // zeroed when stored), one memory latency a tile. With `prefetch` the next tile's
    // loads are issued before this tile's scores, so they are in flight while it is
    // computed; without, after its P V.
    let staged = comptime!((block_k * head_dim).div_ceil(units));
    let mut k_r = Array::<f32>::new(staged);
    let mut v_r = Array::<f32>::new(staged);
    if lo < hi {
        load_tile(
            k, v, &mut k_r, &mut v_r, k_base, v_base, lo, hi, head_dim, staged, units,
        );
    }
    let mut tile = lo;
    while tile < hi {
        // The previous tile's readers are done (and the query rows staged).
        sync_cube();
        #[unroll]
        for t in 0..staged {
            let idx = u + t * units;
            if idx < comptime!(block_k * head_dim) {
                let j = idx / head_dim;
                let d = idx % head_dim;
                let valid = tile + j < hi;
                k_s[j * pitch + d] = select(valid, k_r[t], 0.0f32);
                v_s[idx] = select(valid, v_r[t], 0.0f32);
            }
        }
        sync_cube();
        let next = tile + block_k;
        if prefetch && next < hi {
            load_tile(
                k, v, &mut k_r, &mut v_r, k_base, v_base, next, hi, head_dim, staged, units,
            );
        }
        // Scores, masked ones NO_KEYS.
        let mut idx = u;
        while idx < rows * block_k {
            let r = idx / block_k;
            let j = idx % block_k;
            let key = tile + j;
            let mut visible = key < hi;
            if causal {
                visible = visible && k_offset as usize + key <= q_offset as usize + r % sq;
            }
            let mut s = f32::new(NO_KEYS);
            if visible {
                s = chained_dot(
                    &q_s,
                    r * head_dim,
                    1usize,
                    &k_s,
                    j * pitch,
                    1usize,
                    head_dim,
                    unrolled,
                );
            }
            p_s[idx] = s;
            idx += units;
        }
        sync_cube();
        // Online softmax, one unit per row: probabilities in place, the rescale of
        // the row's accumulators in row_s.
        if u < rows {
            let mut tile_max = f32::new(NO_KEYS);
            #[unroll(unrolled)]
            for j in 0..block_k {
                tile_max = max(tile_max, p_s[u * block_k + j]);
            }
            let mut corr = 1.0f32;
            if tile_max > f32::new(MASKED) {
                let m_new = max(m, tile_max);
                corr = (m - m_new).exp();
                l *= corr;
                #[unroll(unrolled)]
                for j in 0..block_k {
                    let s = p_s[u * block_k + j];
                    let mut p = 0.0f32;
                    if s > f32::new(MASKED) {
                        p = (s - m_new).exp();
                    }
                    l += p;
                    p_s[u * block_k + j] = p;
                }
                m = m_new;
            } else {
                for j in 0..block_k {
                    p_s[u * block_k + j] = 0.0f32;
                }
            }
            row_s[u] = corr;
        }
        sync_cube();
        for jj in 0..per_unit {
            let e = u + jj * units;
            if e < rows * head_dim {
                let r = e / head_dim;
                let d = e % head_dim;
                let pv = chained_dot(
                    &p_s,
                    r * block_k,
                    1usize,
                    &v_s,
                    d,
                    head_dim,
                    block_k,
                    unrolled,
                );
                acc[jj] = acc[jj] * row_s[r] + pv;
            }
        }
        if !prefetch && next < hi {
            load_tile(
                k, v, &mut k_r, &mut v_r, k_base, v_base, next, hi, head_dim, staged, units,
            );
        }
        tile = next;
    }

    // This slice's LSE, and O / l.
    sync_cube();
    let slot = split * batch + b;
    if u < rows {
        row_s[u] = l;
        let h = hk * group + u / sq;
        let i = u % sq;
        let mut row_lse = f32::new(NO_KEYS);
        if l > 0.0f32 {
            row_lse = m + l.ln();
        }
        let at = slot * lse_part.stride(0) + h * lse_part.stride(1) + i * lse_part.stride(2);
        lse_part[at] = row_lse;
    }
    sync_cube();
    for jj in 0..per_unit {
        let e = u + jj * units;
        if e < rows * head_dim {
            let r = e / head_dim;
            let d = e % head_dim;
            let h = hk * group + r / sq;
            let i = r % sq;
            let lr = row_s[r];
            let mut x = 0.0f32;
            if lr > 0.0f32 {
                x = acc[jj] / lr;
            }
            let at = slot * o_part.stride(0)
                + h * o_part.stride(1)
                + i * o_part.stride(2)
                + d * o_part.stride(3);
            o_part[at] = x;
        }
    }
}

/// Unit `u`'s share of the keys and values of the tile starting at key `tile` into
/// registers: element `u + t * units` of the `block_k x head_dim` tile (row `j`,
/// column `d`), keys at or past `hi` read as key `hi - 1` (the caller zeroes them).
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_tile<F: Float>(
    k: &Tensor<F>,
    v: &Tensor<F>,
    k_r: &mut Array<f32>,
    v_r: &mut Array<f32>,
    k_base: usize,
    v_base: usize,
    tile: usize,
    hi: usize,
    #[comptime] head_dim: usize,
    #[comptime] staged: usize,
    #[comptime] units: usize,
) {
    let u = UNIT_POS_X as usize;
    #[unroll]
    for t in 0..staged {
        let idx = u + t * units;
        let j = idx / head_dim;
        let d = idx % head_dim;
        let key = min(tile + j, hi - 1);
        k_r[t] = f32::cast_from(k[k_base + key * k.stride(2) + d * k.stride(3)]);
        v_r[t] = f32::cast_from(v[v_base + key * v.stride(2) + d * v.stride(3)]);
    }
}

/// `sum_i a[a_at + i * a_step] * b[b_at + i * b_step]` over `i < n`, as four
/// independent multiply-add chains (every fourth term each) added pairwise at the
/// end; the loop over groups of four is unrolled when `unrolled`. The decode kernel's
/// score (a query row against a key over the head dim) and its P V (a row's
/// probabilities against a value column over the tile's keys).
#[cube]
#[allow(clippy::too_many_arguments)]
fn chained_dot(
    a: &Shared<[f32]>,
    a_at: usize,
    #[comptime] a_step: usize,
    b: &Shared<[f32]>,
    b_at: usize,
    #[comptime] b_step: usize,
    #[comptime] n: usize,
    #[comptime] unrolled: bool,
) -> f32 {
    let mut sum = Array::<f32>::new(4usize);
    #[unroll]
    for c in 0..4usize {
        sum[c] = 0.0f32;
    }
    #[unroll(unrolled)]
    for i4 in 0..comptime!(n / 4) {
        #[unroll]
        for c in 0..4usize {
            let i = i4 * 4 + c;
            sum[c] += a[a_at + i * a_step] * b[b_at + i * b_step];
        }
    }
    for i in comptime!(n / 4 * 4)..n {
        sum[0] += a[a_at + i * a_step] * b[b_at + i * b_step];
    }
    (sum[0] + sum[1]) + (sum[2] + sum[3])
}

/// The slices merged: `lse = log sum_s exp(lse_s)`, `o = sum_s exp(lse_s - lse) o_s`
/// (slices without keys weigh 0; a row no slice saw gets O = 0, LSE = NO_KEYS). One
/// cube per row `(b, h, i)`, rows along x then y. The slices' O in `P` (f32 from the
/// split-key kernel, the input type from the tensor-core forward).
#[cube(launch)]
pub fn flash_decode_merge_kernel<F: Float, P: Float>(
    o_part: &Tensor<P>,
    lse_part: &Tensor<f32>,
    o: &mut Tensor<F>,
    lse: &mut Tensor<f32>,
    splits: u32,
    #[comptime] head_dim: usize,
    #[comptime] units: usize,
) {
    let row = CUBE_POS_Y as usize * CUBE_COUNT_X as usize + CUBE_POS_X as usize;
    let batch = o.shape(0);
    let hq = o.shape(1);
    let sq = o.shape(2);
    if row < batch * hq * sq {
        let i = row % sq;
        let h = (row / sq) % hq;
        let b = row / (sq * hq);
        // Slice s of this row's LSE is at `s * slice_step + lse_row`.
        let slice_step = batch * lse_part.stride(0);
        let lse_row = b * lse_part.stride(0) + h * lse_part.stride(1) + i * lse_part.stride(2);
        let mut top = f32::new(NO_KEYS);
        let mut s = 0usize;
        while s < splits as usize {
            top = max(top, lse_part[s * slice_step + lse_row]);
            s += 1;
        }
        let mut total = 0.0f32;
        if top > f32::new(MASKED) {
            let mut s = 0usize;
            while s < splits as usize {
                let x = lse_part[s * slice_step + lse_row];
                if x > f32::new(MASKED) {
                    total += (x - top).exp();
                }
                s += 1;
            }
        }
        let mut row_lse = f32::new(NO_KEYS);
        if total > 0.0f32 {
            row_lse = top + total.ln();
        }
        if UNIT_POS_X == 0 {
            let at = b * lse.stride(0) + h * lse.stride(1) + i * lse.stride(2);
            lse[at] = row_lse;
        }
        let mut d = UNIT_POS_X as usize;
        while d < head_dim {
            let mut x = 0.0f32;
            if total > 0.0f32 {
                let mut s = 0usize;
                while s < splits as usize {
                    let ls = lse_part[s * slice_step + lse_row];
                    if ls > f32::new(MASKED) {
                        let at = (s * batch + b) * o_part.stride(0)
                            + h * o_part.stride(1)
                            + i * o_part.stride(2)
                            + d * o_part.stride(3);
                        x += (ls - row_lse).exp() * f32::cast_from(o_part[at]);
                    }
                    s += 1;
                }
            }
            let at = b * o.stride(0) + h * o.stride(1) + i * o.stride(2) + d * o.stride(3);
            o[at] = F::cast_from(x);
            d += units;
        }
    }
}

/// Whether the decode kernels take a call of this geometry: few query rows per kv
/// head, no packed sequences.
pub(super) fn applies(g: &Geometry, options: &FlashOptions) -> bool {
    options.cu_seqlens.is_none() && g.hq / g.hkv * g.sq <= DECODE_MAX_ROWS
}

/// Key rows per shared tile for `max_rows` query rows at head dim `d`: a power of
/// two from 64 down to 4 within half the shared memory (two cubes per
/// multiprocessor), `None` when even 4 do not fit.
fn block_k(client: &Client, d: usize, max_rows: usize) -> Option<usize> {
    let budget = client.properties().hardware.max_shared_memory_size;
    let bytes = |bk: usize| 4 * (max_rows * d + max_rows + bk * (2 * d + 1 + max_rows));
    let mut bk = 64;
    while bk > 4 && 2 * bytes(bk) > budget {
        bk /= 2;
    }
    (bytes(bk) <= budget).then_some(bk)
}

/// Runs the split-key kernels into `o` / `lse` (any strides). With `keys` (a u32
/// tensor of one element on the device), only the first `keys[0]` rows of k and v
/// are keys; the slices are cut over all `Sk` rows. An error when [`applies`] does
/// not hold or the tiles do not fit in shared memory.
#[allow(clippy::too_many_arguments)]
pub(super) fn forward<F: Float + CubeElement>(
    client: &Client,
    g: &Geometry,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    o: &DeviceTensor,
    lse: &DeviceTensor,
    options: &FlashOptions,
    keys: Option<&DeviceTensor>,
) -> Result<(), AttnError> {
    let rows = g.hq / g.hkv * g.sq;
    if !applies(g, options) {
        return Err(AttnError::Options(format!(
            "the decode kernels take at most {DECODE_MAX_ROWS} query rows per kv head and no \
             packed sequences ({rows} rows: {} query heads per kv head x {} positions)",
            g.hq / g.hkv,
            g.sq
        )));
    }
    let max_rows = rows.next_power_of_two();
    let Some(block_k) = block_k(client, g.d, max_rows) else {
        return Err(AttnError::Options(format!(
            "the decode kernels' tiles for {max_rows} rows at head dim {} exceed the device's \
             shared memory",
            g.d
        )));
    };
    let units = options.decode.units.unwrap_or(UNITS);
    if !units.is_power_of_two() || !(32..=1024).contains(&units) || units < max_rows {
        return Err(AttnError::Options(format!(
            "decode_units {units} (FlashOptions, or LONGVIEW_DECODE_UNITS): the decode kernel \
             takes a power of two from 32 to 1024 units, at least the {max_rows} rows a kv \
             head (padded)"
        )));
    }
    let (splits, per_split) = split_keys(client, g, options, block_k);
    let o_part = DeviceTensor::uninitialized::<f32>(client, &[splits * g.b, g.hq, g.sq, g.d]);
    let lse_part = DeviceTensor::uninitialized::<f32>(client, &[splits * g.b, g.hq, g.sq]);
    flash_decode_kernel::launch::<F>(
        client,
        CubeCount::Static(splits as u32, (g.b * g.hkv) as u32, 1),
        CubeDim::new_1d(units as u32),
        q.arg(),
        k.arg(),
        v.arg(),
        o_part.arg(),
        lse_part.arg(),
        // Not read unless counted: any 4-byte buffer stands in.
        keys.unwrap_or(&lse_part).arg(),
        options.scale,
        options.q_offset as u32,
        options.k_offset as u32,
        per_split as u32,
        options.causal,
        keys.is_some(),
        g.d,
        max_rows,
        block_k,
        units,
        options.decode.unroll,
        options.decode.prefetch,
    );
    merge::<F, f32>(client, (&o_part, &lse_part), (o, lse), splits, g);
    Ok(())
}

/// `splits` slices' O (`P`) and LSE merged into `o` / `lse` ([`flash_decode_merge_kernel`]).
pub(super) fn merge<F: Float + CubeElement, P: Float + CubeElement>(
    client: &Client,
    (o_part, lse_part): (&DeviceTensor, &DeviceTensor),
    (o, lse): (&DeviceTensor, &DeviceTensor),
    splits: usize,
    g: &Geometry,
) {
    let rows_out = g.b * g.hq * g.sq;
    let (x, y) = if rows_out > 65535 {
        (65535, rows_out.div_ceil(65535))
    } else {
        (rows_out, 1)
    };
    flash_decode_merge_kernel::launch::<F, P>(
        client,
        CubeCount::Static(x as u32, y as u32, 1),
        CubeDim::new_1d(MERGE_UNITS as u32),
        o_part.arg(),
        lse_part.arg(),
        o.arg(),
        lse.arg(),
        splits as u32,
        g.d,
        MERGE_UNITS,
    );
}

/// `(slices, keys per slice)`: about two cubes per multiprocessor over the `B * Hkv`
/// heads, slices a whole number of tiles, over the keys the last query row may see.
/// `DecodeTuning::splits` (`LONGVIEW_DECODE_SPLITS`) fixes the slice count.
fn split_keys(
    client: &Client,
    g: &Geometry,
    options: &FlashOptions,
    block_k: usize,
) -> (usize, usize) {
    let visible = if options.causal {
        (options.q_offset + g.sq)
            .saturating_sub(options.k_offset)
            .min(g.sk)
    } else {
        g.sk
    };
    if visible == 0 {
        return (1, block_k);
    }
    let sms = client
        .properties()
        .hardware
        .num_streaming_multiprocessors
        .unwrap_or(64) as usize;
    let wanted = options
        .decode
        .splits
        .unwrap_or_else(|| (2 * sms).div_ceil(g.b * g.hkv));
    let splits = wanted.clamp(1, visible.div_ceil(block_k)).min(65535);
    let per_split = visible.div_ceil(splits).div_ceil(block_k) * block_k;
    (visible.div_ceil(per_split), per_split)
}
