//! Tensor-core forward: O and LSE for one block of query rows per cube.

// See the parent module: `#[cube]` bodies also exist as plain Rust, where the
// builtins are placeholder constants; that code never runs.
#![allow(arithmetic_overflow)]
// `is_multiple_of` has no expansion inside `#[cube]` code; `%` does.
#![allow(clippy::manual_is_multiple_of)]

use cubecl::cmma::{MatrixIdent, MmaDefinition};
use cubecl::prelude::*;

use super::online_softmax::online_softmax;
use super::{
    acc_to_a, commit, load_a, mma_ab, mma_abt, mma_abt_shared_a, prefetch, stage, stage_async,
    store_rows, wait_async_copies, zero,
};
use crate::flash::kernels::{NO_KEYS, counted_keys, key_hi, segment_lo};

/// O and LSE. Cube: `(32, warps)` units, plane `w` owns the `16 m_tiles` query rows
/// `[16 m_tiles w, 16 m_tiles (w + 1))` of the cube's block (`m_tiles` row blocks of
/// 16, which share every K and V fragment a plane loads from shared memory); grid
/// `(ceil(Sq / (16 m_tiles warps)), B * Hq)`. Q is staged through the K buffer, which
/// has `max(16 m_tiles warps, 2 block_k)` rows. With `late_prefetch` the next tile's
/// loads are issued after the scores are computed rather than before, so the
/// registers they land in are not live during the `Q K^T` product. With `q_shared`
/// Q stays in its own shared buffer and its fragments are loaded for each product
/// (registers for larger row blocks) instead of being held in registers. With
/// `async_copy` the K and V tiles go from global to shared memory by `cp.async`
/// ([`stage_async`]), issued at the top of a tile for the next one and waited for at
/// its end, so no registers hold them in flight (`late_prefetch` is then moot). With
/// `lazy_rescale` a row block's accumulators are rescaled only after a tile that gave
/// one of its rows a new maximum; with `fold_scale` the softmax scale is applied inside
/// the exponential's argument ([`online_softmax`]).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn flash_tc_forward_kernel<F: Float, N: Size>(
    q: &Tensor<Vector<F, N>>,
    k: &Tensor<Vector<F, N>>,
    v: &Tensor<Vector<F, N>>,
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
    #[comptime] warps: usize,
    #[comptime] block_k: usize,
    #[comptime] m_tiles: usize,
    #[comptime] late_prefetch: bool,
    #[comptime] q_shared: bool,
    #[comptime] counted: bool,
    #[comptime] async_copy: bool,
    #[comptime] lazy_rescale: bool,
    #[comptime] fold_scale: bool,
) {
    let def = MmaDefinition::<F, F, f32>::new(16usize, 8usize, 16usize);
    let size!(NA) = def.vector_size(MatrixIdent::A);
    let size!(NC) = def.vector_size(MatrixIdent::Accumulator);
    let a_vecs = def.vectors_per_lane(MatrixIdent::A);
    let c_vecs = def.vectors_per_lane(MatrixIdent::Accumulator);

    let padded = comptime!(head_dim.div_ceil(16) * 16);
    let width = q.vector_size();
    let pitch_v = comptime!(padded / width + 1);
    let kd = comptime!(padded / 16);
    let od = comptime!(padded / 8);
    let kn = comptime!(block_k / 8);
    let plane_rows = comptime!(16 * m_tiles);
    let block_q = comptime!(plane_rows * warps);
    let q_in_k = comptime!(if q_shared { 0 } else { block_q });
    let rows_k = comptime!(if q_in_k > 2 * block_k {
        q_in_k
    } else {
        2 * block_k
    });
    let rows_q = comptime!(if q_shared { block_q } else { 1 });
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
    let mut sk = k.shape(2);
    if counted {
        sk = counted_keys(cu, sk, k_offset, b);
    }
    // Last query blocks first: under a causal mask they have the most keys, and
    // starting them early shortens the tail of the launch.
    let first = (CUBE_COUNT_X - 1 - CUBE_POS_X) as usize * block_q;
    let mut last = sq - 1;
    if first + block_q < sq {
        last = first + block_q - 1;
    }
    let block_lo = segment_lo(cu, nseg, first, varlen);
    let block_hi = key_hi(cu, nseg, last, sk, q_offset, k_offset, causal, varlen);

    // The query rows of this lane, two a row block (g and g + 8; entry 2 mi + 1 is
    // the second), and the keys each may see.
    let mut lo = Array::<u32>::new(comptime!(2 * m_tiles));
    let mut hi = Array::<u32>::new(comptime!(2 * m_tiles));
    #[unroll]
    for r in 0..comptime!(2 * m_tiles) {
        let row = first + warp * plane_rows + comptime!(r / 2 * 16 + r % 2 * 8) + g;
        let mut row_lo = 0usize;
        let mut row_hi = 0usize;
        if row < sq {
            row_lo = segment_lo(cu, nseg, row, varlen);
            row_hi = key_hi(cu, nseg, row, sk, q_offset, k_offset, causal, varlen);
        }
        lo[r] = row_lo as u32;
        hi[r] = row_hi as u32;
    }

    // K and V tiles are double-buffered: rows [0, block_k) and [block_k, 2 block_k).
    let mut k_s = Shared::<[Vector<F, N>]>::new_aligned_slice(comptime!(rows_k * pitch_v), 16usize);
    let mut v_s =
        Shared::<[Vector<F, N>]>::new_aligned_slice(comptime!(2 * block_k * pitch_v), 16usize);

    // Q: its own shared buffer, or fragments in registers staged through k_s.
    let mut q_s = Shared::<[Vector<F, N>]>::new_aligned_slice(comptime!(rows_q * pitch_v), 16usize);
    let q_base = b * q.stride(0) + h * q.stride(1);
    let q_frags = comptime!(if q_shared { 1 } else { m_tiles * kd * a_vecs });
    let mut q_frag = Array::<Vector<F, NA>>::new(q_frags);
    if q_shared {
        stage::<F, N>(
            q,
            q_base,
            q.stride(2),
            first,
            sq,
            &mut q_s,
            block_q,
            head_dim,
            padded,
            threads,
        );
    } else {
        stage::<F, N>(
            q,
            q_base,
            q.stride(2),
            first,
            sq,
            &mut k_s,
            block_q,
            head_dim,
            padded,
            threads,
        );
        sync_cube();
        load_a::<F, N, NA>(
            &def,
            &k_s,
            warp * plane_rows,
            &mut q_frag,
            kd,
            pitch_v,
            m_tiles,
            0usize,
        );
    }
    sync_cube();

    let mut acc = Array::<Vector<f32, NC>>::new(comptime!(m_tiles * od * c_vecs));
    zero::<NC>(&mut acc, comptime!(m_tiles * od * c_vecs));
    let mut s = Array::<Vector<f32, NC>>::new(comptime!(m_tiles * kn * c_vecs));
    let mut p_frag = Array::<Vector<F, NA>>::new(comptime!(m_tiles * kn / 2 * a_vecs));
    // Running row maxima and (lane-partial) row sums, indexed like `lo`.
    let mut m = Array::<f32>::new(comptime!(2 * m_tiles));
    let mut l = Array::<f32>::new(comptime!(2 * m_tiles));
    #[unroll]
    for r in 0..comptime!(2 * m_tiles) {
        m[r] = f32::new(NO_KEYS);
        l[r] = 0.0f32;
    }
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
        let row0 = buf * block_k;
        let mut sees = false;
        #[unroll]
        for r in 0..comptime!(2 * m_tiles) {
            sees = sees || ((lo[r] as usize) < tile + block_k && (hi[r] as usize) > tile);
        }
        let any = plane_any(sees);

        // The next tile's loads fly while this one is computed. The other buffer was
        // last read before the previous barrier.
        if async_copy && next < block_hi {
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
        if !async_copy && !late_prefetch && next < block_hi {
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
        if any {
            zero::<NC>(&mut s, comptime!(m_tiles * kn * c_vecs));
            if q_shared {
                mma_abt_shared_a::<F, N, NA, NA, NC>(
                    &def,
                    &q_s,
                    warp * plane_rows,
                    &k_s,
                    row0,
                    &mut s,
                    kn,
                    kd,
                    pitch_v,
                    m_tiles,
                );
            } else {
                mma_abt::<F, N, NA, NA, NC>(
                    &def, &q_frag, &k_s, row0, &mut s, kn, kd, pitch_v, m_tiles,
                );
            }
        }
        if !async_copy && late_prefetch && next < block_hi {
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
        if any {
            #[unroll]
            for mi in 0..m_tiles {
                online_softmax::<F, NC>(
                    &def,
                    &mut s,
                    &mut acc,
                    &lo,
                    &hi,
                    &mut m,
                    &mut l,
                    tile,
                    scale,
                    kn,
                    od,
                    mi,
                    lazy_rescale,
                    fold_scale,
                );
            }
            acc_to_a::<F, NA, NC>(&def, &s, &mut p_frag, kn, m_tiles);
            mma_ab::<F, N, NA, NA, NC>(
                &def,
                &p_frag,
                &v_s,
                row0,
                &mut acc,
                od,
                comptime!(kn / 2),
                pitch_v,
                0usize,
                m_tiles,
            );
        }
        if async_copy {
            wait_async_copies();
        } else if next < block_hi {
            // The other buffer was last read before the previous barrier.
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

    // Row sums over the quad, then O / l and LSE.
    let o_base = b * o.stride(0) + h * o.stride(1);
    #[unroll]
    for mi in 0..m_tiles {
        let row0 = first + warp * plane_rows + mi * 16 + g;
        let row1 = row0 + 8;
        let mut l0 = l[comptime!(2 * mi)];
        let mut l1 = l[comptime!(2 * mi + 1)];
        l0 += plane_shuffle_xor(l0, 1u32);
        l0 += plane_shuffle_xor(l0, 2u32);
        l1 += plane_shuffle_xor(l1, 1u32);
        l1 += plane_shuffle_xor(l1, 2u32);
        let mut inv0 = 0.0f32;
        let mut inv1 = 0.0f32;
        let mut lse0 = f32::new(NO_KEYS);
        let mut lse1 = f32::new(NO_KEYS);
        if l0 > 0.0f32 {
            inv0 = 1.0f32 / l0;
            lse0 = m[comptime!(2 * mi)] + l0.ln();
        }
        if l1 > 0.0f32 {
            inv1 = 1.0f32 / l1;
            lse1 = m[comptime!(2 * mi + 1)] + l1.ln();
        }
        store_rows::<F, NC>(
            &def,
            &acc,
            o,
            o_base,
            row0,
            row1,
            inv0,
            inv1,
            sq,
            od,
            head_dim,
            comptime!(mi * od),
        );
        if lane % 4 == 0 {
            let base = b * lse.stride(0) + h * lse.stride(1);
            let step = lse.stride(2);
            if row0 < sq {
                lse[base + row0 * step] = lse0;
            }
            if row1 < sq {
                lse[base + row1 * step] = lse1;
            }
        }
    }
}
