//! The `#[cube]` kernels. One unit owns one query row (forward, dQ) or one key row
//! (dK/dV); key/value (or query/dO) tiles are staged in shared memory by the whole
//! cube; softmax statistics and accumulators stay in f32 whatever the input type.
//!
//! Masking, for query row `i` and key row `j` (local indices):
//! - causal: allowed iff `k_offset + j <= q_offset + i` (global positions);
//! - packed sequences (`varlen`, Sq == Sk, offsets 0): allowed iff `i` and `j` lie in
//!   the same `[cu[s], cu[s+1])`.
//!
//! A row with no allowed key gets O = 0 and LSE = [`NO_KEYS`] (a finite sentinel:
//! WGSL cannot spell infinities), which merges with weight 0.

use cubecl::prelude::*;

/// LSE of a query row that sees no key.
pub const NO_KEYS: f32 = -3.0e38;
/// Scores below this are "masked" in the kernels.
pub(super) const MASKED: f32 = -1.0e38;

/// Sets every element of `out` to `value` (cast to `F`) (2-D grid of 256-unit cubes).
#[cube(launch)]
pub fn fill_kernel<F: Float>(out: &mut [F], value: f32) {
    let i = (CUBE_POS_Y as usize * CUBE_COUNT_X as usize + CUBE_POS_X as usize) * 256
        + UNIT_POS_X as usize;
    if i < out.len() {
        out[i] = F::cast_from(value);
    }
}

/// `out[i] = F(acc[i] * scale)` (the fused dQ accumulator to its output type).
#[cube(launch)]
pub fn scale_cast_kernel<F: Float>(acc: &[f32], out: &mut [F], scale: f32) {
    let i = (CUBE_POS_Y as usize * CUBE_COUNT_X as usize + CUBE_POS_X as usize) * 256
        + UNIT_POS_X as usize;
    if i < out.len() {
        out[i] = F::cast_from(acc[i] * scale);
    }
}

/// Start of the sequence holding `pos` (packed batches), else 0.
#[cube]
pub(super) fn segment_lo(cu: &[u32], nseg: u32, pos: usize, #[comptime] varlen: bool) -> usize {
    let mut lo = 0usize;
    if varlen {
        let mut s = 0u32;
        while s < nseg {
            let a = cu[s as usize] as usize;
            let b = cu[(s + 1) as usize] as usize;
            if pos >= a && pos < b {
                lo = a;
            }
            s += 1;
        }
    }
    lo
}

/// End of the sequence holding `pos` (packed batches), else `len`.
#[cube]
pub(super) fn segment_hi(
    cu: &[u32],
    nseg: u32,
    pos: usize,
    len: usize,
    #[comptime] varlen: bool,
) -> usize {
    let mut hi = len;
    if varlen {
        let mut s = 0u32;
        while s < nseg {
            let a = cu[s as usize] as usize;
            let b = cu[(s + 1) as usize] as usize;
            if pos >= a && pos < b {
                hi = b;
            }
            s += 1;
        }
    }
    hi
}

/// One past the last key query row `i` may see.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn key_hi(
    cu: &[u32],
    nseg: u32,
    i: usize,
    sk: usize,
    q_offset: u32,
    k_offset: u32,
    #[comptime] causal: bool,
    #[comptime] varlen: bool,
) -> usize {
    let mut hi = segment_hi(cu, nseg, i, sk, varlen);
    if causal {
        let limit = q_offset as usize + i + 1;
        let k0 = k_offset as usize;
        let mut causal_hi = 0usize;
        if limit > k0 {
            causal_hi = limit - k0;
        }
        if causal_hi < hi {
            hi = causal_hi;
        }
    }
    hi
}

/// Stages rows `[first, first + rows)` of a `[.., len, head_dim]` tensor slice starting
/// at element `base` into `dst` as f32 times `scale` (rows past `len` read as 0). All
/// units of the cube take part, `step` (the cube size) elements apart.
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage_rows<F: Float>(
    src: &Tensor<F>,
    base: usize,
    first: usize,
    len: usize,
    scale: f32,
    dst: &mut Shared<[f32]>,
    #[comptime] rows: usize,
    #[comptime] head_dim: usize,
    #[comptime] step: usize,
) {
    let mut idx = UNIT_POS_X as usize;
    while idx < comptime!(rows * head_dim) {
        let r = first + idx / head_dim;
        let d = idx % head_dim;
        let mut x = 0.0f32;
        if r < len {
            x = f32::cast_from(src[base + r * src.stride(2) + d * src.stride(3)]) * scale;
        }
        dst[idx] = x;
        idx += step;
    }
}

/// Keys of batch entry `b` of a counted call (`counted` in the forward kernels): the
/// first `cu[0]` rows of the whole key buffer hold keys, and entry `b` (a slice of it,
/// `sk` rows) starts at row `k_offset + b sk`; its keys are the rows before the count.
#[cube]
pub(super) fn counted_keys(cu: &[u32], sk: usize, k_offset: u32, b: usize) -> usize {
    let base = k_offset as usize + b * sk;
    let filled = usize::cast_from(cu[0]);
    let mut here = 0usize;
    if filled > base {
        here = filled - base;
    }
    if here > sk {
        here = sk;
    }
    here
}

/// O and LSE. Cube: `block_q` units (one query row each); grid:
/// `(ceil(Sq / block_q), B * Hq)`. With `counted` (no mask, no packed sequences),
/// only [`counted_keys`] of the entry's rows are keys.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn flash_forward_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    o: &mut Tensor<F>,
    lse: &mut Tensor<f32>,
    cu: &[u32],
    nseg: u32,
    scale: f32,
    q_offset: u32,
    k_offset: u32,
    #[comptime] causal: bool,
    #[comptime] varlen: bool,
    #[comptime] head_dim: usize,
    #[comptime] block_q: usize,
    #[comptime] block_k: usize,
    #[comptime] counted: bool,
) {
    let bh = CUBE_POS_Y as usize;
    let hq = q.shape(1);
    let hkv = k.shape(1);
    let b = bh / hq;
    let h = bh % hq;
    let hk = h / (hq / hkv);
    let sq = q.shape(2);
    let mut sk = k.shape(2);
    if counted {
        sk = counted_keys(cu, sk, k_offset, b);
    }
    let first = CUBE_POS_X as usize * block_q;
    let row = first + UNIT_POS_X as usize;
    let valid = row < sq;
    let mut last = sq - 1;
    if first + block_q < sq {
        last = first + block_q - 1;
    }

    // Keys any row of this block may see (uniform over the cube).
    let block_lo = segment_lo(cu, nseg, first, varlen);
    let block_hi = key_hi(cu, nseg, last, sk, q_offset, k_offset, causal, varlen);
    // This row's keys.
    let mut row_lo = 0usize;
    let mut row_hi = 0usize;
    if valid {
        row_lo = segment_lo(cu, nseg, row, varlen);
        row_hi = key_hi(cu, nseg, row, sk, q_offset, k_offset, causal, varlen);
    }

    let q_base = b * q.stride(0) + h * q.stride(1) + row * q.stride(2);
    let k_base = b * k.stride(0) + hk * k.stride(1);
    let v_base = b * v.stride(0) + hk * v.stride(1);
    let mut q_reg = Array::<f32>::new(head_dim);
    let mut acc = Array::<f32>::new(head_dim);
    for d in 0..head_dim {
        let mut x = 0.0f32;
        if valid {
            x = f32::cast_from(q[q_base + d * q.stride(3)]) * scale;
        }
        q_reg[d] = x;
        acc[d] = 0.0f32;
    }
    let mut m = f32::new(NO_KEYS);
    let mut l = 0.0f32;
    let mut k_s = Shared::<[f32]>::new_slice(comptime!(block_k * head_dim));
    let mut v_s = Shared::<[f32]>::new_slice(comptime!(block_k * head_dim));
    let mut scores = Array::<f32>::new(block_k);

    let mut tile = block_lo - block_lo % block_k;
    while tile < block_hi {
        // Stage K and V rows [tile, tile + block_k) in shared memory.
        stage_rows(
            k, k_base, tile, sk, 1.0f32, &mut k_s, block_k, head_dim, block_q,
        );
        stage_rows(
            v, v_base, tile, sk, 1.0f32, &mut v_s, block_k, head_dim, block_q,
        );
        sync_cube();
        // Scores of this row against the tile, and their maximum.
        let mut tile_max = f32::new(NO_KEYS);
        for j in 0..block_k {
            let key = tile + j;
            let mut s = f32::new(NO_KEYS);
            if key >= row_lo && key < row_hi {
                let mut dot = 0.0f32;
                for d in 0..head_dim {
                    dot += q_reg[d] * k_s[j * head_dim + d];
                }
                s = dot;
            }
            scores[j] = s;
            tile_max = max(tile_max, s);
        }
        if tile_max > MASKED {
            let m_new = max(m, tile_max);
            let correction = (m - m_new).exp();
            l *= correction;
            for d in 0..head_dim {
                acc[d] *= correction;
            }
            for j in 0..block_k {
                let s = scores[j];
                if s > MASKED {
                    let p = (s - m_new).exp();
                    l += p;
                    for d in 0..head_dim {
                        acc[d] += p * v_s[j * head_dim + d];
                    }
                }
            }
            m = m_new;
        }
        sync_cube();
        tile += block_k;
    }

    if valid {
        let o_base = b * o.stride(0) + h * o.stride(1) + row * o.stride(2);
        let mut inv = 0.0f32;
        let mut row_lse = f32::new(NO_KEYS);
        if l > 0.0f32 {
            inv = 1.0f32 / l;
            row_lse = m + l.ln();
        }
        for d in 0..head_dim {
            let at = o_base + d * o.stride(3);
            o[at] = F::cast_from(acc[d] * inv);
        }
        let at = b * lse.stride(0) + h * lse.stride(1) + row * lse.stride(2);
        lse[at] = row_lse;
    }
}

/// `delta[b, h, i] = sum_d dO[b, h, i, d] * O[b, h, i, d]` (f32). One unit per row.
#[cube(launch)]
pub fn flash_delta_kernel<F: Float>(
    o: &Tensor<F>,
    d_o: &Tensor<F>,
    delta: &mut Tensor<f32>,
    #[comptime] head_dim: usize,
) {
    let rows = o.shape(0) * o.shape(1) * o.shape(2);
    let r = ABSOLUTE_POS;
    if r < rows {
        let s = o.shape(2);
        let hq = o.shape(1);
        let i = r % s;
        let h = (r / s) % hq;
        let b = r / (s * hq);
        let ob = b * o.stride(0) + h * o.stride(1) + i * o.stride(2);
        let gb = b * d_o.stride(0) + h * d_o.stride(1) + i * d_o.stride(2);
        let mut sum = 0.0f32;
        for d in 0..head_dim {
            sum += f32::cast_from(o[ob + d * o.stride(3)])
                * f32::cast_from(d_o[gb + d * d_o.stride(3)]);
        }
        let at = b * delta.stride(0) + h * delta.stride(1) + i * delta.stride(2);
        delta[at] = sum;
    }
}

/// dQ. Same geometry as the forward kernel.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn flash_dq_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    d_o: &Tensor<F>,
    lse: &Tensor<f32>,
    delta: &Tensor<f32>,
    dq: &mut Tensor<F>,
    cu: &[u32],
    nseg: u32,
    scale: f32,
    q_offset: u32,
    k_offset: u32,
    #[comptime] causal: bool,
    #[comptime] varlen: bool,
    #[comptime] head_dim: usize,
    #[comptime] block_q: usize,
    #[comptime] block_k: usize,
) {
    let bh = CUBE_POS_Y as usize;
    let hq = q.shape(1);
    let hkv = k.shape(1);
    let b = bh / hq;
    let h = bh % hq;
    let hk = h / (hq / hkv);
    let sq = q.shape(2);
    let sk = k.shape(2);
    let first = CUBE_POS_X as usize * block_q;
    let row = first + UNIT_POS_X as usize;
    let valid = row < sq;
    let mut last = sq - 1;
    if first + block_q < sq {
        last = first + block_q - 1;
    }
    let block_lo = segment_lo(cu, nseg, first, varlen);
    let block_hi = key_hi(cu, nseg, last, sk, q_offset, k_offset, causal, varlen);
    let mut row_lo = 0usize;
    let mut row_hi = 0usize;
    let mut row_lse = 0.0f32;
    let mut row_delta = 0.0f32;
    if valid {
        row_lo = segment_lo(cu, nseg, row, varlen);
        row_hi = key_hi(cu, nseg, row, sk, q_offset, k_offset, causal, varlen);
        row_lse = lse[b * lse.stride(0) + h * lse.stride(1) + row * lse.stride(2)];
        row_delta = delta[b * delta.stride(0) + h * delta.stride(1) + row * delta.stride(2)];
        if row_lse < MASKED {
            // No key: nothing flows back.
            row_hi = 0usize;
        }
    }
    let q_base = b * q.stride(0) + h * q.stride(1) + row * q.stride(2);
    let g_base = b * d_o.stride(0) + h * d_o.stride(1) + row * d_o.stride(2);
    let k_base = b * k.stride(0) + hk * k.stride(1);
    let v_base = b * v.stride(0) + hk * v.stride(1);
    let mut q_reg = Array::<f32>::new(head_dim);
    let mut g_reg = Array::<f32>::new(head_dim);
    let mut acc = Array::<f32>::new(head_dim);
    for d in 0..head_dim {
        let mut x = 0.0f32;
        let mut g = 0.0f32;
        if valid {
            x = f32::cast_from(q[q_base + d * q.stride(3)]) * scale;
            g = f32::cast_from(d_o[g_base + d * d_o.stride(3)]);
        }
        q_reg[d] = x;
        g_reg[d] = g;
        acc[d] = 0.0f32;
    }
    let mut k_s = Shared::<[f32]>::new_slice(comptime!(block_k * head_dim));
    let mut v_s = Shared::<[f32]>::new_slice(comptime!(block_k * head_dim));
    let mut tile = block_lo - block_lo % block_k;
    while tile < block_hi {
        stage_rows(
            k, k_base, tile, sk, 1.0f32, &mut k_s, block_k, head_dim, block_q,
        );
        stage_rows(
            v, v_base, tile, sk, 1.0f32, &mut v_s, block_k, head_dim, block_q,
        );
        sync_cube();
        for j in 0..block_k {
            let key = tile + j;
            if key >= row_lo && key < row_hi {
                let mut s = 0.0f32;
                let mut dp = 0.0f32;
                for d in 0..head_dim {
                    s += q_reg[d] * k_s[j * head_dim + d];
                    dp += g_reg[d] * v_s[j * head_dim + d];
                }
                let p = (s - row_lse).exp();
                let ds = p * (dp - row_delta);
                for d in 0..head_dim {
                    acc[d] += ds * k_s[j * head_dim + d];
                }
            }
        }
        sync_cube();
        tile += block_k;
    }
    if valid {
        let base = b * dq.stride(0) + h * dq.stride(1) + row * dq.stride(2);
        for d in 0..head_dim {
            let at = base + d * dq.stride(3);
            dq[at] = F::cast_from(acc[d] * scale);
        }
    }
}

/// dK and dV. Cube: `block_k` units (one key row each) of one kv head; grid:
/// `(ceil(Sk / block_k), B * Hkv)`. Loops over the query heads of the group, so GQA
/// gradients are summed without atomics.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn flash_dkdv_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    d_o: &Tensor<F>,
    lse: &Tensor<f32>,
    delta: &Tensor<f32>,
    dk: &mut Tensor<F>,
    dv: &mut Tensor<F>,
    cu: &[u32],
    nseg: u32,
    scale: f32,
    q_offset: u32,
    k_offset: u32,
    #[comptime] causal: bool,
    #[comptime] varlen: bool,
    #[comptime] head_dim: usize,
    #[comptime] block_k: usize,
    #[comptime] block_q: usize,
) {
    let bh = CUBE_POS_Y as usize;
    let hq = q.shape(1);
    let hkv = k.shape(1);
    let group = hq / hkv;
    let b = bh / hkv;
    let hk = bh % hkv;
    let sq = q.shape(2);
    let sk = k.shape(2);
    let first = CUBE_POS_X as usize * block_k;
    let key = first + UNIT_POS_X as usize;
    let valid = key < sk;
    // Queries that may see any key of this block: from the first key's segment start
    // (varlen) or the first query whose global position reaches the first key
    // (causal), to the end of the last key's segment.
    let mut block_lo = segment_lo(cu, nseg, first, varlen);
    if causal {
        let need = k_offset as usize + first;
        let q0 = q_offset as usize;
        let mut causal_lo = 0usize;
        if need > q0 {
            causal_lo = need - q0;
        }
        if causal_lo > block_lo {
            block_lo = causal_lo;
        }
    }
    let mut last_key = sk - 1;
    if first + block_k < sk {
        last_key = first + block_k - 1;
    }
    let block_hi = segment_hi(cu, nseg, last_key, sq, varlen);

    let k_base = b * k.stride(0) + hk * k.stride(1) + key * k.stride(2);
    let v_base = b * v.stride(0) + hk * v.stride(1) + key * v.stride(2);
    let mut k_reg = Array::<f32>::new(head_dim);
    let mut v_reg = Array::<f32>::new(head_dim);
    let mut dk_acc = Array::<f32>::new(head_dim);
    let mut dv_acc = Array::<f32>::new(head_dim);
    for d in 0..head_dim {
        let mut kx = 0.0f32;
        let mut vx = 0.0f32;
        if valid {
            kx = f32::cast_from(k[k_base + d * k.stride(3)]);
            vx = f32::cast_from(v[v_base + d * v.stride(3)]);
        }
        k_reg[d] = kx;
        v_reg[d] = vx;
        dk_acc[d] = 0.0f32;
        dv_acc[d] = 0.0f32;
    }
    let mut q_s = Shared::<[f32]>::new_slice(comptime!(block_q * head_dim));
    let mut g_s = Shared::<[f32]>::new_slice(comptime!(block_q * head_dim));
    let mut lse_s = Shared::<[f32]>::new_slice(block_q);
    let mut delta_s = Shared::<[f32]>::new_slice(block_q);

    for g in 0..group {
        let h = hk * group + g;
        let q_head = b * q.stride(0) + h * q.stride(1);
        let g_head = b * d_o.stride(0) + h * d_o.stride(1);
        let mut tile = block_lo - block_lo % block_q;
        while tile < block_hi {
            stage_rows(
                q, q_head, tile, sq, scale, &mut q_s, block_q, head_dim, block_k,
            );
            stage_rows(
                d_o, g_head, tile, sq, 1.0f32, &mut g_s, block_q, head_dim, block_k,
            );
            let mut r = UNIT_POS_X as usize;
            while r < block_q {
                let qi = tile + r;
                let mut lx = f32::new(NO_KEYS);
                let mut dx = 0.0f32;
                if qi < sq {
                    lx = lse[b * lse.stride(0) + h * lse.stride(1) + qi * lse.stride(2)];
                    dx = delta[b * delta.stride(0) + h * delta.stride(1) + qi * delta.stride(2)];
                }
                lse_s[r] = lx;
                delta_s[r] = dx;
                r += block_k;
            }
            sync_cube();
            if valid {
                for i in 0..block_q {
                    let qi = tile + i;
                    let row_lse = lse_s[i];
                    if qi < sq && row_lse > MASKED {
                        let lo = segment_lo(cu, nseg, qi, varlen);
                        let hi = key_hi(cu, nseg, qi, sk, q_offset, k_offset, causal, varlen);
                        if key >= lo && key < hi {
                            let mut s = 0.0f32;
                            let mut dp = 0.0f32;
                            for d in 0..head_dim {
                                s += q_s[i * head_dim + d] * k_reg[d];
                                dp += g_s[i * head_dim + d] * v_reg[d];
                            }
                            let p = (s - row_lse).exp();
                            let ds = p * (dp - delta_s[i]);
                            for d in 0..head_dim {
                                dv_acc[d] += p * g_s[i * head_dim + d];
                                // q_s holds q * scale: dK = scale * sum ds q.
                                dk_acc[d] += ds * q_s[i * head_dim + d];
                            }
                        }
                    }
                }
            }
            sync_cube();
            tile += block_q;
        }
    }
    if valid {
        let kb = b * dk.stride(0) + hk * dk.stride(1) + key * dk.stride(2);
        let vb = b * dv.stride(0) + hk * dv.stride(1) + key * dv.stride(2);
        for d in 0..head_dim {
            let at_k = kb + d * dk.stride(3);
            let at_v = vb + d * dv.stride(3);
            dk[at_k] = F::cast_from(dk_acc[d]);
            dv[at_v] = F::cast_from(dv_acc[d]);
        }
    }
}

/// Merges partial results in place: `(o_a, lse_a) <- merge((o_a, lse_a), (o_b, lse_b))`
/// with `w = sigmoid(lse_b - lse_a)`, `o = o_a - w (o_a - o_b)`,
/// `lse = lse_a - logsigmoid(lse_a - lse_b)`, in a form that cannot overflow. One
/// unit per row.
#[cube(launch)]
pub fn merge_kernel<F: Float>(
    o_a: &mut Tensor<F>,
    lse_a: &mut Tensor<f32>,
    o_b: &Tensor<F>,
    lse_b: &Tensor<f32>,
    #[comptime] head_dim: usize,
) {
    let rows = o_a.shape(0) * o_a.shape(1) * o_a.shape(2);
    let r = ABSOLUTE_POS;
    if r < rows {
        let s = o_a.shape(2);
        let hq = o_a.shape(1);
        let i = r % s;
        let h = (r / s) % hq;
        let b = r / (s * hq);
        let la_i = b * lse_a.stride(0) + h * lse_a.stride(1) + i * lse_a.stride(2);
        let lb_i = b * lse_b.stride(0) + h * lse_b.stride(1) + i * lse_b.stride(2);
        let la = lse_a[la_i];
        let lb = lse_b[lb_i];
        // A side without keys contributes nothing.
        let mut w = 0.0f32;
        let mut lse = la;
        if lb > MASKED {
            if la > MASKED {
                let diff = lb - la;
                let e = (-diff.abs()).exp();
                if diff >= 0.0f32 {
                    w = 1.0f32 / (1.0f32 + e);
                    lse = lb + (1.0f32 + e).ln();
                } else {
                    w = e / (1.0f32 + e);
                    lse = la + (1.0f32 + e).ln();
                }
            } else {
                w = 1.0f32;
                lse = lb;
            }
        }
        let oa = b * o_a.stride(0) + h * o_a.stride(1) + i * o_a.stride(2);
        let ob = b * o_b.stride(0) + h * o_b.stride(1) + i * o_b.stride(2);
        for d in 0..head_dim {
            let at = oa + d * o_a.stride(3);
            let x = f32::cast_from(o_a[at]);
            let y = f32::cast_from(o_b[ob + d * o_b.stride(3)]);
            o_a[at] = F::cast_from(x - w * (x - y));
        }
        lse_a[la_i] = lse;
    }
}
