//! Tensor-core dK/dV kernel, with dQ fused in (atomics into an f32 buffer) where
//! the tile shapes allow it.

// See the parent module: `#[cube]` bodies also exist as plain Rust, where the
// builtins are placeholder constants; that code never runs.
#![allow(arithmetic_overflow)]

use cubecl::cmma::{MatrixIdent, MmaDefinition};
use cubecl::prelude::*;

use super::dq_atomics::{add_dq_shared, dq_product, store_dq_tile};
use super::{
    acc_to_a, commit, load_a, mma_ab, mma_abt, prefetch, stage, stage_async, store_rows,
    wait_async_copies, zero,
};
use crate::flash::kernels::{MASKED, NO_KEYS, segment_hi, segment_lo};

/// dK and dV. Cube: `(32, warps)` units of one kv head, plane `w` owns key rows
/// `[16 w, 16 w + 16)` of the cube's block; grid `(ceil(Sk / (16 warps)), B * Hkv)`.
/// Loops over the query heads of the kv group (GQA sums without atomics) and over
/// query tiles of `block_q` rows: `S^T = K Q^T`, `dP^T = V dO^T`,
/// `dS^T = P^T (dP^T - delta)`, `dV += P^T dO`, `dK += dS^T Q`. With `async_copy` the
/// next Q and dO tiles go to shared memory by `cp.async` ([`stage_async`]) instead of
/// through registers.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn flash_tc_dkdv_kernel<F: Float, N: Size>(
    q: &Tensor<Vector<F, N>>,
    k: &Tensor<Vector<F, N>>,
    v: &Tensor<Vector<F, N>>,
    d_o: &Tensor<Vector<F, N>>,
    lse: &Tensor<f32>,
    delta: &Tensor<f32>,
    dk: &mut Tensor<F>,
    dv: &mut Tensor<F>,
    dq_acc: &mut Tensor<Atomic<f32>>,
    cu: &[u32],
    nseg: u32,
    scale: f32,
    q_offset: u32,
    k_offset: u32,
    #[comptime] causal: bool,
    #[comptime] varlen: bool,
    #[comptime] head_dim: usize,
    #[comptime] warps: usize,
    #[comptime] block_q: usize,
    #[comptime] fuse_dq: bool,
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
    let qn = comptime!(block_q / 8);
    let block_k = comptime!(16 * warps);
    let threads = comptime!(32 * warps);
    // Fused dQ: the cube's dS (block_q queries x block_k keys) goes through shared
    // memory; plane w then computes query rows 16 (w % row_blocks) of dQ = dS K over
    // the column tiles [dq_tiles (w / row_blocks), +dq_tiles) and adds them to the f32
    // accumulator with atomics (the host checks that the split is even).
    let ds_pitch = comptime!(block_k + 8);
    let row_blocks = comptime!(block_q / 16);
    let dq_tiles = comptime!(if fuse_dq {
        od / (warps / row_blocks)
    } else {
        2
    });

    let lane = UNIT_POS_PLANE;
    let warp = UNIT_POS as usize / 32;
    let g = (lane / 4) as usize;
    let bh = CUBE_POS_Y as usize;
    let hq = q.shape(1);
    let hkv = k.shape(1);
    let group = hq / hkv;
    let b = bh / hkv;
    let hk = bh % hkv;
    let sq = q.shape(2);
    let sk = k.shape(2);
    let first = CUBE_POS_X as usize * block_k;

    // Queries any key of the block may be seen by (as the scalar kernel).
    let mut block_lo = segment_lo(cu, nseg, first, varlen);
    if causal {
        let need = k_offset as usize + first;
        let q0 = q_offset as usize;
        if need > q0 && need - q0 > block_lo {
            block_lo = need - q0;
        }
    }
    let mut last_key = sk - 1;
    if first + block_k < sk {
        last_key = first + block_k - 1;
    }
    let block_hi = segment_hi(cu, nseg, last_key, sq, varlen);

    // This lane's two key rows and the queries that see each: [qlo, qhi).
    let key0 = first + warp * 16 + g;
    let key1 = key0 + 8;
    let mut qlo0 = 0usize;
    let mut qhi0 = 0usize;
    let mut qlo1 = 0usize;
    let mut qhi1 = 0usize;
    if key0 < sk {
        qlo0 = segment_lo(cu, nseg, key0, varlen);
        qhi0 = segment_hi(cu, nseg, key0, sq, varlen);
        if causal {
            let need = k_offset as usize + key0;
            if need > q_offset as usize && need - q_offset as usize > qlo0 {
                qlo0 = need - q_offset as usize;
            }
        }
    }
    if key1 < sk {
        qlo1 = segment_lo(cu, nseg, key1, varlen);
        qhi1 = segment_hi(cu, nseg, key1, sq, varlen);
        if causal {
            let need = k_offset as usize + key1;
            if need > q_offset as usize && need - q_offset as usize > qlo1 {
                qlo1 = need - q_offset as usize;
            }
        }
    }

    let mut k_s =
        Shared::<[Vector<F, N>]>::new_aligned_slice(comptime!(block_k * pitch_v), 16usize);
    let mut v_s =
        Shared::<[Vector<F, N>]>::new_aligned_slice(comptime!(block_k * pitch_v), 16usize);
    // Q, dO, LSE and delta tiles are double-buffered (rows [0, block_q), [block_q, 2 block_q)).
    let mut q_s =
        Shared::<[Vector<F, N>]>::new_aligned_slice(comptime!(2 * block_q * pitch_v), 16usize);
    let mut g_s =
        Shared::<[Vector<F, N>]>::new_aligned_slice(comptime!(2 * block_q * pitch_v), 16usize);
    let mut lse_s = Shared::<[f32]>::new_slice(comptime!(2 * block_q));
    let mut delta_s = Shared::<[f32]>::new_slice(comptime!(2 * block_q));
    let per_row = comptime!(padded / width);
    let per_thread = comptime!(if async_copy {
        1
    } else {
        (block_q * per_row).div_ceil(threads)
    });
    let mut q_next = Array::<Vector<F, N>>::new(per_thread);
    let mut g_next = Array::<Vector<F, N>>::new(per_thread);

    stage::<F, N>(
        k,
        b * k.stride(0) + hk * k.stride(1),
        k.stride(2),
        first,
        sk,
        &mut k_s,
        block_k,
        head_dim,
        padded,
        threads,
    );
    stage::<F, N>(
        v,
        b * v.stride(0) + hk * v.stride(1),
        v.stride(2),
        first,
        sk,
        &mut v_s,
        block_k,
        head_dim,
        padded,
        threads,
    );

    let mut dk_acc = Array::<Vector<f32, NC>>::new(comptime!(od * c_vecs));
    let mut dv_acc = Array::<Vector<f32, NC>>::new(comptime!(od * c_vecs));
    zero::<NC>(&mut dk_acc, comptime!(od * c_vecs));
    zero::<NC>(&mut dv_acc, comptime!(od * c_vecs));
    let mut s = Array::<Vector<f32, NC>>::new(comptime!(qn * c_vecs));
    let mut dp = Array::<Vector<f32, NC>>::new(comptime!(qn * c_vecs));
    let mut a_frag = Array::<Vector<F, NA>>::new(comptime!(kd * a_vecs));
    let mut p_frag = Array::<Vector<F, NA>>::new(comptime!(qn / 2 * a_vecs));
    let mut ds_s = Shared::<[F]>::new_aligned_slice(
        comptime!(if fuse_dq { block_q * ds_pitch } else { 8 }),
        16usize,
    );
    let mut dq_t = Array::<Vector<f32, NC>>::new(comptime!(dq_tiles * c_vecs));
    // The fused dQ tile in f32, rows of `padded + 4` words. One store instruction of the
    // mma layout writes 8 rows x 4 columns of one parity, so it touches 16 of the 32
    // banks: 2-way conflicts at best, which this pitch gets.
    let dq_pitch = comptime!(padded + 4);
    let mut dq_s =
        Shared::<[f32]>::new_slice(comptime!(if fuse_dq { block_q * dq_pitch } else { 1 }));

    for gi in 0..group {
        let h = hk * group + gi;
        let q_head = b * q.stride(0) + h * q.stride(1);
        let g_head = b * d_o.stride(0) + h * d_o.stride(1);
        let lb = b * lse.stride(0) + h * lse.stride(1);
        let db = b * delta.stride(0) + h * delta.stride(1);
        let mut tile = block_lo - block_lo % block_q;
        // LSE and delta of one row of the next tile per unit (block_q <= threads).
        let mut l_next = f32::new(NO_KEYS);
        let mut d_next = 0.0f32;
        if async_copy && tile < block_hi {
            stage_async::<F, N>(
                q,
                q_head,
                q.stride(2),
                tile,
                sq,
                &mut q_s,
                0usize,
                block_q,
                head_dim,
                padded,
                threads,
            );
            stage_async::<F, N>(
                d_o,
                g_head,
                d_o.stride(2),
                tile,
                sq,
                &mut g_s,
                0usize,
                block_q,
                head_dim,
                padded,
                threads,
            );
            wait_async_copies();
        }
        if tile < block_hi {
            if !async_copy {
                prefetch::<F, N>(
                    q,
                    q_head,
                    q.stride(2),
                    tile,
                    sq,
                    &mut q_next,
                    block_q,
                    head_dim,
                    padded,
                    threads,
                );
                prefetch::<F, N>(
                    d_o,
                    g_head,
                    d_o.stride(2),
                    tile,
                    sq,
                    &mut g_next,
                    block_q,
                    head_dim,
                    padded,
                    threads,
                );
                commit::<F, N>(&q_next, &mut q_s, 0usize, block_q, per_row, threads);
                commit::<F, N>(&g_next, &mut g_s, 0usize, block_q, per_row, threads);
            }
            let r = UNIT_POS as usize;
            if r < block_q {
                let qi = tile + r;
                let mut lx = f32::new(NO_KEYS);
                let mut dx = 0.0f32;
                if qi < sq {
                    lx = lse[lb + qi * lse.stride(2)];
                    dx = delta[db + qi * delta.stride(2)];
                }
                lse_s[r] = lx;
                delta_s[r] = dx;
            }
        }
        sync_cube();
        let mut buf = 0usize;
        while tile < block_hi {
            let next = tile + block_q;
            if async_copy && next < block_hi {
                // The other buffers were last read before the previous barrier.
                let other = (1 - buf) * block_q;
                stage_async::<F, N>(
                    q,
                    q_head,
                    q.stride(2),
                    next,
                    sq,
                    &mut q_s,
                    other,
                    block_q,
                    head_dim,
                    padded,
                    threads,
                );
                stage_async::<F, N>(
                    d_o,
                    g_head,
                    d_o.stride(2),
                    next,
                    sq,
                    &mut g_s,
                    other,
                    block_q,
                    head_dim,
                    padded,
                    threads,
                );
            }
            if !async_copy && next < block_hi {
                prefetch::<F, N>(
                    q,
                    q_head,
                    q.stride(2),
                    next,
                    sq,
                    &mut q_next,
                    block_q,
                    head_dim,
                    padded,
                    threads,
                );
                prefetch::<F, N>(
                    d_o,
                    g_head,
                    d_o.stride(2),
                    next,
                    sq,
                    &mut g_next,
                    block_q,
                    head_dim,
                    padded,
                    threads,
                );
            }
            if next < block_hi {
                let qi = next + UNIT_POS as usize;
                l_next = f32::new(NO_KEYS);
                d_next = 0.0f32;
                if (UNIT_POS as usize) < block_q && qi < sq {
                    l_next = lse[lb + qi * lse.stride(2)];
                    d_next = delta[db + qi * delta.stride(2)];
                }
            }
            let row0 = buf * block_q;
            let sees0 = qlo0 < tile + block_q && qhi0 > tile;
            let sees1 = qlo1 < tile + block_q && qhi1 > tile;
            let active = plane_any(sees0 || sees1);
            if fuse_dq && !active {
                // This plane's keys see none of the tile: its rows of dS are 0.
                #[unroll]
                for nb in 0..qn {
                    #[unroll]
                    for e in 0..4usize {
                        let (r, c) = def.position_of_nth(
                            lane,
                            comptime!(e as u32),
                            MatrixIdent::Accumulator,
                        );
                        ds_s[(nb * 8 + c as usize) * ds_pitch + warp * 16 + r as usize] =
                            F::new(0.0);
                    }
                }
            }
            if active {
                zero::<NC>(&mut s, comptime!(qn * c_vecs));
                zero::<NC>(&mut dp, comptime!(qn * c_vecs));
                load_a::<F, N, NA>(
                    &def,
                    &k_s,
                    warp * 16,
                    &mut a_frag,
                    kd,
                    pitch_v,
                    1usize,
                    0usize,
                );
                mma_abt::<F, N, NA, NA, NC>(
                    &def, &a_frag, &q_s, row0, &mut s, qn, kd, pitch_v, 1usize,
                );
                load_a::<F, N, NA>(
                    &def,
                    &v_s,
                    warp * 16,
                    &mut a_frag,
                    kd,
                    pitch_v,
                    1usize,
                    0usize,
                );
                mma_abt::<F, N, NA, NA, NC>(
                    &def, &a_frag, &g_s, row0, &mut dp, qn, kd, pitch_v, 1usize,
                );
                // P^T (into s) and dS^T (into dp), masked entries 0.
                #[unroll]
                for nb in 0..qn {
                    #[unroll]
                    for i in 0..c_vecs {
                        let mut x = s[nb * c_vecs + i];
                        let mut y = dp[nb * c_vecs + i];
                        #[unroll]
                        for e in 0..vc {
                            let (r, c) = def.position_of_nth(
                                lane,
                                comptime!((i * vc + e) as u32),
                                MatrixIdent::Accumulator,
                            );
                            let ql = nb * 8 + c as usize;
                            let qi = tile + ql;
                            let mut lo = qlo1;
                            let mut hi = qhi1;
                            if r as usize == g {
                                lo = qlo0;
                                hi = qhi0;
                            }
                            let row_lse = lse_s[row0 + ql];
                            // Selected, not branched on (see the forward's softmax): a
                            // masked entry's exponential is computed and discarded.
                            let p = select(
                                qi >= lo && qi < hi && row_lse > f32::new(MASKED),
                                (x.extract(e) * scale - row_lse).exp(),
                                0.0f32,
                            );
                            x.insert(e, p);
                            y.insert(e, p * (y.extract(e) - delta_s[row0 + ql]));
                        }
                        s[nb * c_vecs + i] = x;
                        dp[nb * c_vecs + i] = y;
                    }
                }
                acc_to_a::<F, NA, NC>(&def, &s, &mut p_frag, qn, 1usize);
                mma_ab::<F, N, NA, NA, NC>(
                    &def,
                    &p_frag,
                    &g_s,
                    row0,
                    &mut dv_acc,
                    od,
                    comptime!(qn / 2),
                    pitch_v,
                    0usize,
                    1usize,
                );
                acc_to_a::<F, NA, NC>(&def, &dp, &mut p_frag, qn, 1usize);
                mma_ab::<F, N, NA, NA, NC>(
                    &def,
                    &p_frag,
                    &q_s,
                    row0,
                    &mut dk_acc,
                    od,
                    comptime!(qn / 2),
                    pitch_v,
                    0usize,
                    1usize,
                );
                if fuse_dq {
                    // dS^T (keys x queries in registers) into shared memory as dS.
                    #[unroll]
                    for nb in 0..qn {
                        #[unroll]
                        for i in 0..c_vecs {
                            let y = dp[nb * c_vecs + i];
                            #[unroll]
                            for e in 0..vc {
                                let (r, c) = def.position_of_nth(
                                    lane,
                                    comptime!((i * vc + e) as u32),
                                    MatrixIdent::Accumulator,
                                );
                                ds_s[(nb * 8 + c as usize) * ds_pitch + warp * 16 + r as usize] =
                                    F::cast_from(y.extract(e));
                            }
                        }
                    }
                }
            }
            if fuse_dq {
                sync_cube();
                // dQ rows [16 rb, 16 rb + 16) of the tile, column tiles from ct.
                let rb = warp % row_blocks;
                let ct = (warp / row_blocks) * dq_tiles;
                let a_row = rb * 16 + (lane % 16) as usize;
                let a_col = (lane / 16) as usize * 8;
                zero::<NC>(&mut dq_t, comptime!(dq_tiles * c_vecs));
                dq_product::<F, N, NA, NC>(
                    &def,
                    &ds_s,
                    a_row * ds_pitch + a_col,
                    &k_s,
                    &mut dq_t,
                    dq_tiles,
                    comptime!(block_k / 16),
                    pitch_v,
                    ct,
                );
                // Into shared memory; the cube adds the whole tile with coalesced
                // atomics after the barrier that ends the tile.
                store_dq_tile::<F, NC>(&def, &dq_t, &mut dq_s, rb * 16, ct, dq_tiles, dq_pitch);
            }
            if async_copy {
                wait_async_copies();
            }
            if next < block_hi {
                let other = (1 - buf) * block_q;
                if !async_copy {
                    commit::<F, N>(&q_next, &mut q_s, other, block_q, per_row, threads);
                    commit::<F, N>(&g_next, &mut g_s, other, block_q, per_row, threads);
                }
                if (UNIT_POS as usize) < block_q {
                    lse_s[other + UNIT_POS as usize] = l_next;
                    delta_s[other + UNIT_POS as usize] = d_next;
                }
            }
            sync_cube();
            if fuse_dq {
                // One row segment of the tile per plane and instruction: the atomics of
                // the mma layout touched 8 rows per instruction, and the memory queue
                // stalled on them (2026-12-06 profile).
                let base = ((b * hq + h) * sq + tile) * head_dim;
                if tile + block_q <= sq && comptime!((block_q * head_dim).is_multiple_of(threads)) {
                    add_dq_shared(
                        &dq_s, dq_acc, base, block_q, block_q, head_dim, dq_pitch, threads, false,
                    );
                } else {
                    add_dq_shared(
                        &dq_s,
                        dq_acc,
                        base,
                        sq - tile,
                        block_q,
                        head_dim,
                        dq_pitch,
                        threads,
                        true,
                    );
                }
            }
            buf = 1 - buf;
            tile = next;
        }
    }
    let kb = b * dk.stride(0) + hk * dk.stride(1);
    store_rows::<F, NC>(
        &def, &dk_acc, dk, kb, key0, key1, scale, scale, sk, od, head_dim, 0usize,
    );
    let vb = b * dv.stride(0) + hk * dv.stride(1);
    store_rows::<F, NC>(
        &def, &dv_acc, dv, vb, key0, key1, 1.0f32, 1.0f32, sk, od, head_dim, 0usize,
    );
}
