//! Tensor-core dQ kernel (used where the fused dQ of `dkdv` does not apply).

// See the parent module: `#[cube]` bodies also exist as plain Rust, where the
// builtins are placeholder constants; that code never runs.
#![allow(arithmetic_overflow)]

use cubecl::cmma::{MatrixIdent, MmaDefinition};
use cubecl::prelude::*;

use super::{
    acc_to_a, commit, load_a, mma_ab, mma_abt, prefetch, stage, stage_async, store_rows,
    wait_async_copies, zero,
};
use crate::flash::kernels::{MASKED, key_hi, segment_lo};

/// dQ. Cube: `(32, warps)` units, plane `w` owns query rows `[16 w, 16 w + 16)`;
/// grid `(ceil(Sq / (16 warps)), B * Hq)`. Per key tile: `S = Q K^T`, `dP = dO V^T`,
/// `dS = P (dP - delta)`, `dQ += dS K`. Needs `16 warps <= tile_rows`, the rows
/// of each shared buffer (`max(16 warps, block_k)`). With `async_copy` the next K and
/// V tiles go to shared memory by `cp.async` ([`stage_async`]) instead of registers.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn flash_tc_dq_kernel<F: Float, N: Size>(
    q: &Tensor<Vector<F, N>>,
    k: &Tensor<Vector<F, N>>,
    v: &Tensor<Vector<F, N>>,
    d_o: &Tensor<Vector<F, N>>,
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
    #[comptime] warps: usize,
    #[comptime] block_k: usize,
    #[comptime] async_copy: bool,
) {
    let def = MmaDefinition::<F, F, f32>::new(16usize, 8usize, 16usize);
    let size!(NA) = def.vector_size(MatrixIdent::A);
    let size!(NC) = def.vector_size(MatrixIdent::Accumulator);
    let a_vecs = def.vectors_per_lane(MatrixIdent::A);
    let c_vecs = def.vectors_per_lane(MatrixIdent::Accumulator);
    let vc = def.vector_size(MatrixIdent::Accumulator);

    let padded = comptime!(head_dim.div_ceil(16) * 16);
    let width = q.vector_size();
    let pitch_v = comptime!(padded / width + 1);
    let kd = comptime!(padded / 16);
    let od = comptime!(padded / 8);
    let kn = comptime!(block_k / 8);
    let block_q = comptime!(16 * warps);
    let rows_s = comptime!(if block_q > 2 * block_k {
        block_q
    } else {
        2 * block_k
    });
    let per_row = comptime!(padded / width);
    let threads = comptime!(32 * warps);
    let per_thread = comptime!(if async_copy {
        1
    } else {
        (block_k * per_row).div_ceil(threads)
    });

    let lane = UNIT_POS_PLANE;
    let warp = UNIT_POS as usize / 32;
    let g = (lane / 4) as usize;
    let bh = CUBE_POS_Y as usize;
    let hq = q.shape(1);
    let hkv = k.shape(1);
    let b = bh / hq;
    let h = bh % hq;
    let hk = h / (hq / hkv);
    let sq = q.shape(2);
    let sk = k.shape(2);
    // Last query blocks first: under a causal mask they have the most keys, and
    // starting them early shortens the tail of the launch.
    let first = (CUBE_COUNT_X - 1 - CUBE_POS_X) as usize * block_q;
    let mut last = sq - 1;
    if first + block_q < sq {
        last = first + block_q - 1;
    }
    let block_lo = segment_lo(cu, nseg, first, varlen);
    let block_hi = key_hi(cu, nseg, last, sk, q_offset, k_offset, causal, varlen);

    let row0 = first + warp * 16 + g;
    let row1 = row0 + 8;
    let mut lo0 = 0usize;
    let mut hi0 = 0usize;
    let mut lo1 = 0usize;
    let mut hi1 = 0usize;
    let mut lse0 = 0.0f32;
    let mut lse1 = 0.0f32;
    let mut delta0 = 0.0f32;
    let mut delta1 = 0.0f32;
    let lb = b * lse.stride(0) + h * lse.stride(1);
    let db = b * delta.stride(0) + h * delta.stride(1);
    if row0 < sq {
        lo0 = segment_lo(cu, nseg, row0, varlen);
        hi0 = key_hi(cu, nseg, row0, sk, q_offset, k_offset, causal, varlen);
        lse0 = lse[lb + row0 * lse.stride(2)];
        delta0 = delta[db + row0 * delta.stride(2)];
        if lse0 < f32::new(MASKED) {
            hi0 = 0usize;
        }
    }
    if row1 < sq {
        lo1 = segment_lo(cu, nseg, row1, varlen);
        hi1 = key_hi(cu, nseg, row1, sk, q_offset, k_offset, causal, varlen);
        lse1 = lse[lb + row1 * lse.stride(2)];
        delta1 = delta[db + row1 * delta.stride(2)];
        if lse1 < f32::new(MASKED) {
            hi1 = 0usize;
        }
    }

    let mut k_s = Shared::<[Vector<F, N>]>::new_aligned_slice(comptime!(rows_s * pitch_v), 16usize);
    let mut v_s = Shared::<[Vector<F, N>]>::new_aligned_slice(comptime!(rows_s * pitch_v), 16usize);

    // Q and dO fragments, once.
    stage::<F, N>(
        q,
        b * q.stride(0) + h * q.stride(1),
        q.stride(2),
        first,
        sq,
        &mut k_s,
        block_q,
        head_dim,
        padded,
        threads,
    );
    stage::<F, N>(
        d_o,
        b * d_o.stride(0) + h * d_o.stride(1),
        d_o.stride(2),
        first,
        sq,
        &mut v_s,
        block_q,
        head_dim,
        padded,
        threads,
    );
    sync_cube();
    let mut q_frag = Array::<Vector<F, NA>>::new(comptime!(kd * a_vecs));
    let mut g_frag = Array::<Vector<F, NA>>::new(comptime!(kd * a_vecs));
    load_a::<F, N, NA>(
        &def,
        &k_s,
        warp * 16,
        &mut q_frag,
        kd,
        pitch_v,
        1usize,
        0usize,
    );
    load_a::<F, N, NA>(
        &def,
        &v_s,
        warp * 16,
        &mut g_frag,
        kd,
        pitch_v,
        1usize,
        0usize,
    );
    sync_cube();

    let mut acc = Array::<Vector<f32, NC>>::new(comptime!(od * c_vecs));
    zero::<NC>(&mut acc, comptime!(od * c_vecs));
    let mut s = Array::<Vector<f32, NC>>::new(comptime!(kn * c_vecs));
    let mut dp = Array::<Vector<f32, NC>>::new(comptime!(kn * c_vecs));
    let mut ds_frag = Array::<Vector<F, NA>>::new(comptime!(kn / 2 * a_vecs));
    let k_base = b * k.stride(0) + hk * k.stride(1);
    let v_base = b * v.stride(0) + hk * v.stride(1);

    let mut k_next = Array::<Vector<F, N>>::new(per_thread);
    let mut v_next = Array::<Vector<F, N>>::new(per_thread);
    let mut tile = block_lo - block_lo % block_k;
    if async_copy && tile < block_hi {
        stage_async::<F, N>(
            k,
            k_base,
            k.stride(2),
            tile,
            sk,
            &mut k_s,
            0usize,
            block_k,
            head_dim,
            padded,
            threads,
        );
        stage_async::<F, N>(
            v,
            v_base,
            v.stride(2),
            tile,
            sk,
            &mut v_s,
            0usize,
            block_k,
            head_dim,
            padded,
            threads,
        );
        wait_async_copies();
    }
    if !async_copy && tile < block_hi {
        prefetch::<F, N>(
            k,
            k_base,
            k.stride(2),
            tile,
            sk,
            &mut k_next,
            block_k,
            head_dim,
            padded,
            threads,
        );
        prefetch::<F, N>(
            v,
            v_base,
            v.stride(2),
            tile,
            sk,
            &mut v_next,
            block_k,
            head_dim,
            padded,
            threads,
        );
        commit::<F, N>(&k_next, &mut k_s, 0usize, block_k, per_row, threads);
        commit::<F, N>(&v_next, &mut v_s, 0usize, block_k, per_row, threads);
    }
    sync_cube();
    let mut buf = 0usize;
    while tile < block_hi {
        let next = tile + block_k;
        if async_copy && next < block_hi {
            // The other buffer was last read before the previous barrier.
            let row1 = (1 - buf) * block_k;
            stage_async::<F, N>(
                k,
                k_base,
                k.stride(2),
                next,
                sk,
                &mut k_s,
                row1,
                block_k,
                head_dim,
                padded,
                threads,
            );
            stage_async::<F, N>(
                v,
                v_base,
                v.stride(2),
                next,
                sk,
                &mut v_s,
                row1,
                block_k,
                head_dim,
                padded,
                threads,
            );
        }
        if !async_copy && next < block_hi {
            prefetch::<F, N>(
                k,
                k_base,
                k.stride(2),
                next,
                sk,
                &mut k_next,
                block_k,
                head_dim,
                padded,
                threads,
            );
            prefetch::<F, N>(
                v,
                v_base,
                v.stride(2),
                next,
                sk,
                &mut v_next,
                block_k,
                head_dim,
                padded,
                threads,
            );
        }
        let row0 = buf * block_k;
        let sees0 = lo0 < tile + block_k && hi0 > tile;
        let sees1 = lo1 < tile + block_k && hi1 > tile;
        if plane_any(sees0 || sees1) {
            zero::<NC>(&mut s, comptime!(kn * c_vecs));
            zero::<NC>(&mut dp, comptime!(kn * c_vecs));
            mma_abt::<F, N, NA, NA, NC>(&def, &q_frag, &k_s, row0, &mut s, kn, kd, pitch_v, 1usize);
            mma_abt::<F, N, NA, NA, NC>(
                &def, &g_frag, &v_s, row0, &mut dp, kn, kd, pitch_v, 1usize,
            );
            // dS = P (dP - delta), P = exp(scale S - LSE), masked entries 0.
            #[unroll]
            for nb in 0..kn {
                #[unroll]
                for i in 0..c_vecs {
                    let mut x = s[nb * c_vecs + i];
                    let y = dp[nb * c_vecs + i];
                    #[unroll]
                    for e in 0..vc {
                        let (r, c) = def.position_of_nth(
                            lane,
                            comptime!((i * vc + e) as u32),
                            MatrixIdent::Accumulator,
                        );
                        let key = tile + nb * 8 + c as usize;
                        let mut lo = lo1;
                        let mut hi = hi1;
                        let mut row_lse = lse1;
                        let mut row_delta = delta1;
                        if r as usize == g {
                            lo = lo0;
                            hi = hi0;
                            row_lse = lse0;
                            row_delta = delta0;
                        }
                        // Computed for every element and selected, not branched on:
                        // one branch per element kept the exponentials from
                        // overlapping (a masked entry's exp is discarded).
                        let p = select(
                            key >= lo && key < hi,
                            (x.extract(e) * scale - row_lse).exp(),
                            0.0f32,
                        );
                        x.insert(e, p * (y.extract(e) - row_delta));
                    }
                    s[nb * c_vecs + i] = x;
                }
            }
            acc_to_a::<F, NA, NC>(&def, &s, &mut ds_frag, kn, 1usize);
            mma_ab::<F, N, NA, NA, NC>(
                &def,
                &ds_frag,
                &k_s,
                row0,
                &mut acc,
                od,
                comptime!(kn / 2),
                pitch_v,
                0usize,
                1usize,
            );
        }
        if async_copy {
            wait_async_copies();
        } else if next < block_hi {
            commit::<F, N>(
                &k_next,
                &mut k_s,
                (1 - buf) * block_k,
                block_k,
                per_row,
                threads,
            );
            commit::<F, N>(
                &v_next,
                &mut v_s,
                (1 - buf) * block_k,
                block_k,
                per_row,
                threads,
            );
        }
        sync_cube();
        buf = 1 - buf;
        tile = next;
    }
    let base = b * dq.stride(0) + h * dq.stride(1);
    store_rows::<F, NC>(
        &def, &acc, dq, base, row0, row1, scale, scale, sq, od, head_dim, 0usize,
    );
}
