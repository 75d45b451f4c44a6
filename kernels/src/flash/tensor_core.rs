//! Tensor-core flash attention: `mma.sync` m16n8k16 with f16/bf16 operands and f32
//! accumulators through CubeCL's register-level `MmaDefinition` (CUDA sm_80+; the
//! LLVM/NVPTX path, so no cp.async: tiles are staged with plain 16-byte loads). Same
//! masks, outputs and conventions as the scalar kernels in `kernels.rs`.
//!
//! Every kernel works per plane (warp) on 16 rows, with the tile it iterates over
//! staged in shared memory by the whole cube:
//! - shared tiles are rows of `padded` elements (head dim rounded up to 16, zeros
//!   past it) stored as 16-byte vectors, one spare vector per row so that the eight
//!   row addresses of an `ldmatrix` fall on distinct banks;
//! - `S = A B^T` products (scores, `dO V^T`) read B with `ldmatrix` from rows of the
//!   tile ([`mma_abt`]); `P V`-like products read it transposed ([`mma_ab`]);
//! - a lane holds rows `g = lane / 4` and `g + 8`, columns `2t, 2t + 1`
//!   (`t = lane % 4`) of each 16x8 accumulator tile, so a row reduction is lane-local
//!   plus two XOR shuffles, and the accumulators of two adjacent score tiles are,
//!   element for element, the A operand of the next product ([`acc_to_a`]): P and dS
//!   never leave registers.
//!
//! Positions of accumulator elements (for masks and stores) come from
//! `position_of_nth`; the `ldmatrix` row addresses and the accumulator-to-A mapping
//! follow the fragment layouts PTX documents for `mma.m16n8k16.row.col`.

// `#[cube]` bodies also exist as plain Rust, where the builtins are placeholder
// constants (`CUBE_COUNT_X - CUBE_POS_X - 1` "overflows"); that code never runs.
#![allow(arithmetic_overflow)]

use cubecl::cmma::{MatrixIdent, MmaDefinition};
use cubecl::prelude::*;

use super::kernels::{MASKED, NO_KEYS, key_hi, segment_hi, segment_lo};

/// Stages rows `[first, first + rows)` of one `[len, head_dim]` slice (element offset
/// `base`, rows `row_stride` elements apart) into `dst`, `padded / N + 1` vectors per
/// row; columns past `head_dim` and rows past `len` are zero. All `threads` units of
/// the cube take part.
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage<F: Float, N: Size>(
    src: &Tensor<Vector<F, N>>,
    base: usize,
    row_stride: usize,
    first: usize,
    len: usize,
    dst: &mut Shared<[Vector<F, N>]>,
    #[comptime] rows: usize,
    #[comptime] head_dim: usize,
    #[comptime] padded: usize,
    #[comptime] threads: usize,
) {
    let width = src.vector_size();
    let per_row = comptime!(padded / width);
    let pitch_v = comptime!(per_row + 1);
    let mut idx = UNIT_POS as usize;
    while idx < comptime!(rows * per_row) {
        let r = idx / per_row;
        let c = idx % per_row;
        let row = first + r;
        let mut x = Vector::new(F::new(0.0));
        if row < len && c * width < head_dim {
            x = src[(base + row * row_stride) / width + c];
        }
        dst[r * pitch_v + c] = x;
        idx += threads;
    }
}

/// Global half of a pipelined [`stage`]: this unit's vectors of rows
/// `[first, first + rows)` into registers (`regs[i]` is vector `UNIT_POS + i threads`
/// of the tile), zeros past `len` and past `head_dim`. The loads are in flight until
/// [`commit`] stores them, so the tile being computed hides their latency.
#[cube]
#[allow(clippy::too_many_arguments)]
fn prefetch<F: Float, N: Size>(
    src: &Tensor<Vector<F, N>>,
    base: usize,
    row_stride: usize,
    first: usize,
    len: usize,
    regs: &mut Array<Vector<F, N>>,
    #[comptime] rows: usize,
    #[comptime] head_dim: usize,
    #[comptime] padded: usize,
    #[comptime] threads: usize,
) {
    let width = src.vector_size();
    let per_row = comptime!(padded / width);
    let total = comptime!(rows * per_row);
    #[unroll]
    for i in 0..comptime!(total.div_ceil(threads)) {
        let idx = UNIT_POS as usize + i * threads;
        let r = idx / per_row;
        let c = idx % per_row;
        let row = first + r;
        let mut x = Vector::new(F::new(0.0));
        if idx < total && row < len && c * width < head_dim {
            x = src[(base + row * row_stride) / width + c];
        }
        regs[i] = x;
    }
}

/// Shared half of a pipelined [`stage`]: stores what [`prefetch`] loaded at rows
/// `[row0, row0 + rows)` of `dst`.
#[cube]
fn commit<F: Float, N: Size>(
    regs: &Array<Vector<F, N>>,
    dst: &mut Shared<[Vector<F, N>]>,
    row0: usize,
    #[comptime] rows: usize,
    #[comptime] per_row: usize,
    #[comptime] threads: usize,
) {
    let total = comptime!(rows * per_row);
    #[unroll]
    for i in 0..comptime!(total.div_ceil(threads)) {
        let idx = UNIT_POS as usize + i * threads;
        if idx < total {
            dst[(row0 + idx / per_row) * (per_row + 1) + idx % per_row] = regs[i];
        }
    }
}

/// A fragments of 16 rows `[row0, row0 + 16)` of a shared tile, all `kd` k-blocks of
/// 16 columns: `frags[kb * vectors_per_lane(A) + i]`.
#[cube]
fn load_a<F: Float, N: Size, NA: Size>(
    def: &MmaDefinition<F, F, f32>,
    src: &Shared<[Vector<F, N>]>,
    row0: usize,
    frags: &mut Array<Vector<F, NA>>,
    #[comptime] kd: usize,
    #[comptime] pitch_v: usize,
) {
    let a_vecs = def.vectors_per_lane(MatrixIdent::A);
    let lane = UNIT_POS_PLANE as usize;
    let row = row0 + lane % 16;
    let col = lane / 16;
    #[unroll]
    for kb in 0..kd {
        let at = row * pitch_v + kb * 2 + col;
        let regs =
            def.load_matrix::<Vector<F, N>, NA>(&src[at..at + 1], MatrixIdent::A, 4usize, false);
        #[unroll]
        for i in 0..a_vecs {
            frags[kb * a_vecs + i] = regs[i];
        }
    }
}

/// `acc += A B^T`: A is 16 x (16 kd) in registers (`load_a` layout); B^T's columns
/// are the shared-tile rows `[row0, row0 + 8 n_tiles)` (columns `[0, 16 kd)`), so
/// `acc` holds `n_tiles` 16x8 tiles.
#[cube]
#[allow(clippy::too_many_arguments)]
fn mma_abt<F: Float, N: Size, NA: Size, NB: Size, NC: Size>(
    def: &MmaDefinition<F, F, f32>,
    a: &Array<Vector<F, NA>>,
    b_s: &Shared<[Vector<F, N>]>,
    row0: usize,
    acc: &mut Array<Vector<f32, NC>>,
    #[comptime] n_tiles: usize,
    #[comptime] kd: usize,
    #[comptime] pitch_v: usize,
) {
    let a_vecs = def.vectors_per_lane(MatrixIdent::A);
    let b_vecs = def.vectors_per_lane(MatrixIdent::B);
    let c_vecs = def.vectors_per_lane(MatrixIdent::Accumulator);
    let lane = UNIT_POS_PLANE as usize;
    let row = row0 + (lane / 16) * 8 + lane % 8;
    let col = (lane / 8) % 2;
    #[unroll]
    for nb2 in 0..comptime!(n_tiles / 2) {
        #[unroll]
        for kb in 0..kd {
            let at = (row + nb2 * 16) * pitch_v + kb * 2 + col;
            let regs = def.load_matrix::<Vector<F, N>, NB>(
                &b_s[at..at + 1],
                MatrixIdent::B,
                4usize,
                false,
            );
            let mut af = Array::<Vector<F, NA>>::new(a_vecs);
            #[unroll]
            for i in 0..a_vecs {
                af[i] = a[kb * a_vecs + i];
            }
            #[unroll]
            for half in 0..2usize {
                let nb = nb2 * 2 + half;
                let mut bf = Array::<Vector<F, NB>>::new(b_vecs);
                #[unroll]
                for i in 0..b_vecs {
                    bf[i] = regs[half * b_vecs + i];
                }
                let mut c = Array::<Vector<f32, NC>>::new(c_vecs);
                #[unroll]
                for i in 0..c_vecs {
                    c[i] = acc[nb * c_vecs + i];
                }
                def.execute_inplace(&af, &bf, &mut c);
                #[unroll]
                for i in 0..c_vecs {
                    acc[nb * c_vecs + i] = c[i];
                }
            }
        }
    }
}

/// `acc += A B`: A is 16 x (16 kk) in registers; B is the shared-tile rows
/// `[row0, row0 + 16 kk)` (the k index) by columns `[0, 8 n_tiles)`, read
/// transposed; `acc` holds `n_tiles` 16x8 tiles.
#[cube]
#[allow(clippy::too_many_arguments)]
fn mma_ab<F: Float, N: Size, NA: Size, NB: Size, NC: Size>(
    def: &MmaDefinition<F, F, f32>,
    a: &Array<Vector<F, NA>>,
    b_s: &Shared<[Vector<F, N>]>,
    row0: usize,
    acc: &mut Array<Vector<f32, NC>>,
    #[comptime] n_tiles: usize,
    #[comptime] kk: usize,
    #[comptime] pitch_v: usize,
    col0_v: usize,
) {
    let a_vecs = def.vectors_per_lane(MatrixIdent::A);
    let b_vecs = def.vectors_per_lane(MatrixIdent::B);
    let c_vecs = def.vectors_per_lane(MatrixIdent::Accumulator);
    let lane = UNIT_POS_PLANE as usize;
    let row = row0 + lane % 16;
    let col = col0_v + lane / 16;
    #[unroll]
    for kb in 0..kk {
        let mut af = Array::<Vector<F, NA>>::new(a_vecs);
        #[unroll]
        for i in 0..a_vecs {
            af[i] = a[kb * a_vecs + i];
        }
        #[unroll]
        for nd2 in 0..comptime!(n_tiles / 2) {
            let at = (row + kb * 16) * pitch_v + nd2 * 2 + col;
            let regs =
                def.load_matrix::<Vector<F, N>, NB>(&b_s[at..at + 1], MatrixIdent::B, 4usize, true);
            #[unroll]
            for half in 0..2usize {
                let nd = nd2 * 2 + half;
                let mut bf = Array::<Vector<F, NB>>::new(b_vecs);
                #[unroll]
                for i in 0..b_vecs {
                    bf[i] = regs[half * b_vecs + i];
                }
                let mut c = Array::<Vector<f32, NC>>::new(c_vecs);
                #[unroll]
                for i in 0..c_vecs {
                    c[i] = acc[nd * c_vecs + i];
                }
                def.execute_inplace(&af, &bf, &mut c);
                #[unroll]
                for i in 0..c_vecs {
                    acc[nd * c_vecs + i] = c[i];
                }
            }
        }
    }
}

/// The accumulators of `n_tiles` 16x8 tiles as the A fragments of `n_tiles / 2`
/// 16x16 k-blocks, cast to `F`: A element `n` of block `kb` is element `n % 4` of
/// tile `2 kb + n / 4` (rows g / g+8, columns 2t, 2t+1 in both layouts).
#[cube]
fn acc_to_a<F: Float, NA: Size, NC: Size>(
    def: &MmaDefinition<F, F, f32>,
    acc: &Array<Vector<f32, NC>>,
    out: &mut Array<Vector<F, NA>>,
    #[comptime] n_tiles: usize,
) {
    let a_vecs = def.vectors_per_lane(MatrixIdent::A);
    let va = def.vector_size(MatrixIdent::A);
    let vc = def.vector_size(MatrixIdent::Accumulator);
    let c_vecs = def.vectors_per_lane(MatrixIdent::Accumulator);
    #[unroll]
    for kb in 0..comptime!(n_tiles / 2) {
        #[unroll]
        for i in 0..a_vecs {
            let mut x = Vector::empty();
            #[unroll]
            for e in 0..va {
                let n = comptime!(i * va + e);
                let tile = comptime!(kb * 2 + n / 4);
                let ce = comptime!(n % 4);
                let cv = acc[tile * c_vecs + ce / vc];
                x.insert(e, F::cast_from(cv.extract(comptime!(ce % vc))));
            }
            out[kb * a_vecs + i] = x;
        }
    }
}

/// Sets every accumulator to zero.
#[cube]
fn zero<NC: Size>(acc: &mut Array<Vector<f32, NC>>, #[comptime] len: usize) {
    #[unroll]
    for i in 0..len {
        acc[i] = Vector::new(0.0f32);
    }
}

/// O and LSE. Cube: `(32, warps)` units, plane `w` owns query rows
/// `[16 w, 16 w + 16)` of the cube's block; grid `(ceil(Sq / (16 warps)), B * Hq)`.
/// Q is staged through the K buffer, which has `max(16 warps, block_k)` rows.
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
    let rows_k = comptime!(if block_q > 2 * block_k {
        block_q
    } else {
        2 * block_k
    });
    let per_row = comptime!(padded / width);
    let threads = comptime!(32 * warps);
    let per_thread = comptime!((block_k * per_row).div_ceil(threads));

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

    // The two query rows of this lane and the keys each may see.
    let row0 = first + warp * 16 + g;
    let row1 = row0 + 8;
    let mut lo0 = 0usize;
    let mut hi0 = 0usize;
    let mut lo1 = 0usize;
    let mut hi1 = 0usize;
    if row0 < sq {
        lo0 = segment_lo(cu, nseg, row0, varlen);
        hi0 = key_hi(cu, nseg, row0, sk, q_offset, k_offset, causal, varlen);
    }
    if row1 < sq {
        lo1 = segment_lo(cu, nseg, row1, varlen);
        hi1 = key_hi(cu, nseg, row1, sk, q_offset, k_offset, causal, varlen);
    }

    // K and V tiles are double-buffered: rows [0, block_k) and [block_k, 2 block_k).
    let mut k_s = Shared::<[Vector<F, N>]>::new_aligned_slice(comptime!(rows_k * pitch_v), 16usize);
    let mut v_s =
        Shared::<[Vector<F, N>]>::new_aligned_slice(comptime!(2 * block_k * pitch_v), 16usize);

    // Q fragments, once, staged through k_s.
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
    sync_cube();
    let mut q_frag = Array::<Vector<F, NA>>::new(comptime!(kd * a_vecs));
    load_a::<F, N, NA>(&def, &k_s, warp * 16, &mut q_frag, kd, pitch_v);
    sync_cube();

    let mut acc = Array::<Vector<f32, NC>>::new(comptime!(od * c_vecs));
    zero::<NC>(&mut acc, comptime!(od * c_vecs));
    let mut s = Array::<Vector<f32, NC>>::new(comptime!(kn * c_vecs));
    let mut p_frag = Array::<Vector<F, NA>>::new(comptime!(kn / 2 * a_vecs));
    let mut m0 = f32::new(NO_KEYS);
    let mut m1 = f32::new(NO_KEYS);
    let mut l0 = 0.0f32;
    let mut l1 = 0.0f32;
    let k_base = b * k.stride(0) + hk * k.stride(1);
    let v_base = b * v.stride(0) + hk * v.stride(1);

    let mut k_next = Array::<Vector<F, N>>::new(per_thread);
    let mut v_next = Array::<Vector<F, N>>::new(per_thread);
    let mut tile = block_lo - block_lo % block_k;
    if tile < block_hi {
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
        // The next tile's loads fly while this one is computed.
        let next = tile + block_k;
        if next < block_hi {
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
            mma_abt::<F, N, NA, NA, NC>(&def, &q_frag, &k_s, row0, &mut s, kn, kd, pitch_v);

            // Scale and mask; row maxima over the quad.
            let full0 = lo0 <= tile && hi0 >= tile + block_k;
            let full1 = lo1 <= tile && hi1 >= tile + block_k;
            let mut mx0 = f32::new(MASKED);
            let mut mx1 = f32::new(MASKED);
            #[unroll]
            for nb in 0..kn {
                #[unroll]
                for i in 0..c_vecs {
                    let mut x = s[nb * c_vecs + i];
                    #[unroll]
                    for e in 0..vc {
                        let (r, c) = def.position_of_nth(
                            lane,
                            comptime!((i * vc + e) as u32),
                            MatrixIdent::Accumulator,
                        );
                        let key = tile + nb * 8 + c as usize;
                        let mut val = x.extract(e) * scale;
                        if r as usize == g {
                            if !full0 && (key < lo0 || key >= hi0) {
                                val = f32::new(MASKED);
                            }
                            mx0 = max(mx0, val);
                        } else {
                            if !full1 && (key < lo1 || key >= hi1) {
                                val = f32::new(MASKED);
                            }
                            mx1 = max(mx1, val);
                        }
                        x.insert(e, val);
                    }
                    s[nb * c_vecs + i] = x;
                }
            }
            mx0 = max(mx0, plane_shuffle_xor(mx0, 1u32));
            mx0 = max(mx0, plane_shuffle_xor(mx0, 2u32));
            mx1 = max(mx1, plane_shuffle_xor(mx1, 1u32));
            mx1 = max(mx1, plane_shuffle_xor(mx1, 2u32));
            // A row with nothing visible yet keeps NO_KEYS.
            let mut new0 = m0;
            let mut new1 = m1;
            if mx0 > f32::new(MASKED) {
                new0 = max(m0, mx0);
            }
            if mx1 > f32::new(MASKED) {
                new1 = max(m1, mx1);
            }
            let corr0 = (m0 - new0).exp();
            let corr1 = (m1 - new1).exp();
            m0 = new0;
            m1 = new1;
            l0 *= corr0;
            l1 *= corr1;
            #[unroll]
            for nd in 0..od {
                #[unroll]
                for i in 0..c_vecs {
                    let mut x = acc[nd * c_vecs + i];
                    #[unroll]
                    for e in 0..vc {
                        let (r, _c) = def.position_of_nth(
                            lane,
                            comptime!((i * vc + e) as u32),
                            MatrixIdent::Accumulator,
                        );
                        let mut f = corr1;
                        if r as usize == g {
                            f = corr0;
                        }
                        x.insert(e, x.extract(e) * f);
                    }
                    acc[nd * c_vecs + i] = x;
                }
            }
            // P = exp(S - m), masked entries 0; lane-partial row sums.
            #[unroll]
            for nb in 0..kn {
                #[unroll]
                for i in 0..c_vecs {
                    let mut x = s[nb * c_vecs + i];
                    #[unroll]
                    for e in 0..vc {
                        let (r, _c) = def.position_of_nth(
                            lane,
                            comptime!((i * vc + e) as u32),
                            MatrixIdent::Accumulator,
                        );
                        let val = x.extract(e);
                        let mut p = 0.0f32;
                        if r as usize == g {
                            if val > f32::new(MASKED) {
                                p = (val - m0).exp();
                            }
                            l0 += p;
                        } else {
                            if val > f32::new(MASKED) {
                                p = (val - m1).exp();
                            }
                            l1 += p;
                        }
                        x.insert(e, p);
                    }
                    s[nb * c_vecs + i] = x;
                }
            }
            acc_to_a::<F, NA, NC>(&def, &s, &mut p_frag, kn);
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
            );
        }
        if next < block_hi {
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
        lse0 = m0 + l0.ln();
    }
    if l1 > 0.0f32 {
        inv1 = 1.0f32 / l1;
        lse1 = m1 + l1.ln();
    }
    let o_base = b * o.stride(0) + h * o.stride(1);
    store_rows::<F, NC>(
        &def, &acc, o, o_base, row0, row1, inv0, inv1, sq, od, head_dim,
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

/// Writes `od` 16x8 accumulator tiles times a per-row factor to rows `row0` / `row1`
/// (this lane's g / g+8) of `out` (element offset `base`), skipping rows past `len`
/// and columns past `head_dim`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn store_rows<F: Float, NC: Size>(
    def: &MmaDefinition<F, F, f32>,
    acc: &Array<Vector<f32, NC>>,
    out: &mut Tensor<F>,
    base: usize,
    row0: usize,
    row1: usize,
    f0: f32,
    f1: f32,
    len: usize,
    #[comptime] od: usize,
    #[comptime] head_dim: usize,
) {
    let c_vecs = def.vectors_per_lane(MatrixIdent::Accumulator);
    let vc = def.vector_size(MatrixIdent::Accumulator);
    let lane = UNIT_POS_PLANE;
    let g = lane / 4;
    let row_step = out.stride(2);
    let col_step = out.stride(3);
    #[unroll]
    for nd in 0..od {
        #[unroll]
        for i in 0..c_vecs {
            let x = acc[nd * c_vecs + i];
            #[unroll]
            for e in 0..vc {
                let (r, c) = def.position_of_nth(
                    lane,
                    comptime!((i * vc + e) as u32),
                    MatrixIdent::Accumulator,
                );
                let col = nd * 8 + c as usize;
                let mut row = row1;
                let mut f = f1;
                if r == g {
                    row = row0;
                    f = f0;
                }
                if row < len && col < head_dim {
                    out[base + row * row_step + col * col_step] = F::cast_from(x.extract(e) * f);
                }
            }
        }
    }
}

/// dQ. Cube: `(32, warps)` units, plane `w` owns query rows `[16 w, 16 w + 16)`;
/// grid `(ceil(Sq / (16 warps)), B * Hq)`. Per key tile: `S = Q K^T`, `dP = dO V^T`,
/// `dS = P (dP - delta)`, `dQ += dS K`. Needs `16 warps <= tile_rows`, the rows
/// of each shared buffer (`max(16 warps, block_k)`).
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
    let per_thread = comptime!((block_k * per_row).div_ceil(threads));

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
    load_a::<F, N, NA>(&def, &k_s, warp * 16, &mut q_frag, kd, pitch_v);
    load_a::<F, N, NA>(&def, &v_s, warp * 16, &mut g_frag, kd, pitch_v);
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
    if tile < block_hi {
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
        if next < block_hi {
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
            mma_abt::<F, N, NA, NA, NC>(&def, &q_frag, &k_s, row0, &mut s, kn, kd, pitch_v);
            mma_abt::<F, N, NA, NA, NC>(&def, &g_frag, &v_s, row0, &mut dp, kn, kd, pitch_v);
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
                        let mut ds = 0.0f32;
                        if key >= lo && key < hi {
                            let p = (x.extract(e) * scale - row_lse).exp();
                            ds = p * (y.extract(e) - row_delta);
                        }
                        x.insert(e, ds);
                    }
                    s[nb * c_vecs + i] = x;
                }
            }
            acc_to_a::<F, NA, NC>(&def, &s, &mut ds_frag, kn);
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
            );
        }
        if next < block_hi {
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
        &def, &acc, dq, base, row0, row1, scale, scale, sq, od, head_dim,
    );
}

/// dK and dV. Cube: `(32, warps)` units of one kv head, plane `w` owns key rows
/// `[16 w, 16 w + 16)` of the cube's block; grid `(ceil(Sk / (16 warps)), B * Hkv)`.
/// Loops over the query heads of the kv group (GQA sums without atomics) and over
/// query tiles of `block_q` rows: `S^T = K Q^T`, `dP^T = V dO^T`,
/// `dS^T = P^T (dP^T - delta)`, `dV += P^T dO`, `dK += dS^T Q`.
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
    let per_thread = comptime!((block_q * per_row).div_ceil(threads));
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
    let mut ds_frag = Array::<Vector<F, NA>>::new(comptime!(block_k / 16 * a_vecs));

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
        if tile < block_hi {
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
            if next < block_hi {
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
                load_a::<F, N, NA>(&def, &k_s, warp * 16, &mut a_frag, kd, pitch_v);
                mma_abt::<F, N, NA, NA, NC>(&def, &a_frag, &q_s, row0, &mut s, qn, kd, pitch_v);
                load_a::<F, N, NA>(&def, &v_s, warp * 16, &mut a_frag, kd, pitch_v);
                mma_abt::<F, N, NA, NA, NC>(&def, &a_frag, &g_s, row0, &mut dp, qn, kd, pitch_v);
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
                            let mut p = 0.0f32;
                            let mut ds = 0.0f32;
                            if qi >= lo && qi < hi && row_lse > f32::new(MASKED) {
                                p = (x.extract(e) * scale - row_lse).exp();
                                ds = p * (y.extract(e) - delta_s[row0 + ql]);
                            }
                            x.insert(e, p);
                            y.insert(e, ds);
                        }
                        s[nb * c_vecs + i] = x;
                        dp[nb * c_vecs + i] = y;
                    }
                }
                acc_to_a::<F, NA, NC>(&def, &s, &mut p_frag, qn);
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
                );
                acc_to_a::<F, NA, NC>(&def, &dp, &mut p_frag, qn);
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
                #[unroll]
                for kb in 0..comptime!(block_k / 16) {
                    let at = a_row * ds_pitch + kb * 16 + a_col;
                    let regs =
                        def.load_matrix::<F, NA>(&ds_s[at..at + 8], MatrixIdent::A, 4usize, false);
                    #[unroll]
                    for i in 0..a_vecs {
                        ds_frag[kb * a_vecs + i] = regs[i];
                    }
                }
                zero::<NC>(&mut dq_t, comptime!(dq_tiles * c_vecs));
                mma_ab::<F, N, NA, NA, NC>(
                    &def,
                    &ds_frag,
                    &k_s,
                    0usize,
                    &mut dq_t,
                    dq_tiles,
                    comptime!(block_k / 16),
                    pitch_v,
                    ct,
                );
                let q_first = (b * hq + h) * sq + tile + rb * 16;
                #[unroll]
                for nd in 0..dq_tiles {
                    #[unroll]
                    for i in 0..c_vecs {
                        let x = dq_t[nd * c_vecs + i];
                        #[unroll]
                        for e in 0..vc {
                            let (r, c) = def.position_of_nth(
                                lane,
                                comptime!((i * vc + e) as u32),
                                MatrixIdent::Accumulator,
                            );
                            let qi = tile + rb * 16 + r as usize;
                            let col = (ct + nd) * 8 + c as usize;
                            if qi < sq && col < head_dim {
                                let at = (q_first + r as usize) * head_dim + col;
                                dq_acc[at].fetch_add(x.extract(e));
                            }
                        }
                    }
                }
            }
            if next < block_hi {
                let other = (1 - buf) * block_q;
                commit::<F, N>(&q_next, &mut q_s, other, block_q, per_row, threads);
                commit::<F, N>(&g_next, &mut g_s, other, block_q, per_row, threads);
                if (UNIT_POS as usize) < block_q {
                    lse_s[other + UNIT_POS as usize] = l_next;
                    delta_s[other + UNIT_POS as usize] = d_next;
                }
            }
            sync_cube();
            buf = 1 - buf;
            tile = next;
        }
    }
    let kb = b * dk.stride(0) + hk * dk.stride(1);
    store_rows::<F, NC>(
        &def, &dk_acc, dk, kb, key0, key1, scale, scale, sk, od, head_dim,
    );
    let vb = b * dv.stride(0) + hk * dv.stride(1);
    store_rows::<F, NC>(
        &def, &dv_acc, dv, vb, key0, key1, 1.0f32, 1.0f32, sk, od, head_dim,
    );
}
