//! Tensor-core flash attention: `mma.sync` m16n8k16 with f16/bf16 operands and f32
//! accumulators through CubeCL's register-level `MmaDefinition` (CUDA sm_80+). Tiles
//! streamed by the forward, dQ and dK/dV kernels (K/V, or Q/dO) go to shared memory
//! by asynchronous copies ([`stage_async`]; `cp.async`, lowered by the patched
//! cubecl-llvm), or through registers ([`prefetch`] / [`commit`]) with
//! `LONGVIEW_FLASH_ASYNC_COPY=0`; the tiles staged once (Q of the forward, Q/dO of dQ, K/V
//! of dK/dV) by [`stage`]. Same masks, outputs and conventions as the scalar kernels in
//! `kernels.rs`.
//!
//! Every kernel works per plane (warp) on blocks of 16 rows (the forward on one or two,
//! which then share each B fragment a plane loads; the others on one), with the tile
//! it iterates over staged in shared memory by the whole cube:
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
use cubecl::prelude::barrier::copy_async;
use cubecl::prelude::*;

mod dkdv;
mod dq;
mod dq_atomics;
mod forward;
mod online_softmax;

pub use dkdv::flash_tc_dkdv_kernel;
pub use dq::flash_tc_dq_kernel;
pub use forward::flash_tc_forward_kernel;

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

/// [`stage`] through asynchronous copies (`cp.async`, 16 bytes each, straight from
/// global to shared memory without registers): rows `[first, first + rows)` of the
/// slice into rows `[row0, row0 + rows)` of `dst`. Vectors past `len` or past
/// `head_dim` are stored as zeros directly. The copies are in flight on return: each
/// unit must run [`wait_async_copies`], then the cube a barrier, before any unit reads
/// the tile. CUDA sm_80+ only (the tensor-core kernels' devices); the vectors must be
/// 16 bytes (`N` = 8 of a 16-bit float).
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage_async<F: Float, N: Size>(
    src: &Tensor<Vector<F, N>>,
    base: usize,
    row_stride: usize,
    first: usize,
    len: usize,
    dst: &mut Shared<[Vector<F, N>]>,
    row0: usize,
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
        if idx < total {
            let r = idx / per_row;
            let c = idx % per_row;
            let row = first + r;
            let at = (row0 + r) * (per_row + 1) + c;
            if row < len && c * width < head_dim {
                let from = (base + row * row_stride) / width + c;
                copy_async(
                    &src[from..from + 1],
                    &mut dst[at..at + 1],
                    comptime!(width as u32),
                );
            } else {
                dst[at] = Vector::new(F::new(0.0));
            }
        }
    }
}

/// Waits until this unit's [`stage_async`] copies have landed in shared memory
/// (`cp.async.wait_all`). Other units see them after a cube barrier that follows.
#[cube]
fn wait_async_copies() {
    gpu_asm!("cp.async.wait_all;");
}

/// A fragments of `16 m_tiles` rows `[row0, row0 + 16 m_tiles)` of a shared tile, the
/// `kd` k-blocks of 16 columns from block `kb0` on:
/// `frags[(mi * kd + kb) * vectors_per_lane(A) + i]` for row block `mi`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_a<F: Float, N: Size, NA: Size>(
    def: &MmaDefinition<F, F, f32>,
    src: &Shared<[Vector<F, N>]>,
    row0: usize,
    frags: &mut Array<Vector<F, NA>>,
    #[comptime] kd: usize,
    #[comptime] pitch_v: usize,
    #[comptime] m_tiles: usize,
    #[comptime] kb0: usize,
) {
    let a_vecs = def.vectors_per_lane(MatrixIdent::A);
    let lane = UNIT_POS_PLANE as usize;
    let col = lane / 16;
    #[unroll]
    for mi in 0..m_tiles {
        let row = row0 + mi * 16 + lane % 16;
        #[unroll]
        for kb in 0..kd {
            let at = row * pitch_v + (kb0 + kb) * 2 + col;
            let regs = def.load_matrix::<Vector<F, N>, NA>(
                &src[at..at + 1],
                MatrixIdent::A,
                4usize,
                false,
            );
            #[unroll]
            for i in 0..a_vecs {
                frags[(mi * kd + kb) * a_vecs + i] = regs[i];
            }
        }
    }
}

/// `acc += A B^T` for `m_tiles` blocks of 16 rows: A block `mi` is 16 x (16 kd) in
/// registers (`load_a` layout); B^T's columns are the shared-tile rows
/// `[row0, row0 + 8 n_tiles)` (columns `[0, 16 kd)`), so `acc` holds `n_tiles` 16x8
/// tiles a row block (`acc[(mi * n_tiles + nb) * vectors_per_lane(C) + i]`). Each B
/// fragment is loaded once for all row blocks.
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
    #[comptime] m_tiles: usize,
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
            #[unroll]
            for mi in 0..m_tiles {
                let mut af = Array::<Vector<F, NA>>::new(a_vecs);
                #[unroll]
                for i in 0..a_vecs {
                    af[i] = a[(mi * kd + kb) * a_vecs + i];
                }
                #[unroll]
                for half in 0..2usize {
                    let nb = mi * n_tiles + nb2 * 2 + half;
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
}

/// [`mma_abt`] with A read from shared memory: rows `[a_row0, a_row0 + 16 m_tiles)`
/// of `a_s` (columns `[0, 16 kd)`), one k-block at a time, so A costs no registers
/// between products. Per k-block, the A fragments of every row block are loaded first
/// and every B fragment once.
#[cube]
#[allow(clippy::too_many_arguments)]
fn mma_abt_shared_a<F: Float, N: Size, NA: Size, NB: Size, NC: Size>(
    def: &MmaDefinition<F, F, f32>,
    a_s: &Shared<[Vector<F, N>]>,
    a_row0: usize,
    b_s: &Shared<[Vector<F, N>]>,
    row0: usize,
    acc: &mut Array<Vector<f32, NC>>,
    #[comptime] n_tiles: usize,
    #[comptime] kd: usize,
    #[comptime] pitch_v: usize,
    #[comptime] m_tiles: usize,
) {
    let a_vecs = def.vectors_per_lane(MatrixIdent::A);
    let b_vecs = def.vectors_per_lane(MatrixIdent::B);
    let c_vecs = def.vectors_per_lane(MatrixIdent::Accumulator);
    let lane = UNIT_POS_PLANE as usize;
    let row = row0 + (lane / 16) * 8 + lane % 8;
    let col = (lane / 8) % 2;
    #[unroll]
    for kb in 0..kd {
        let mut af = Array::<Vector<F, NA>>::new(comptime!(m_tiles * a_vecs));
        load_a::<F, N, NA>(def, a_s, a_row0, &mut af, 1usize, pitch_v, m_tiles, kb);
        #[unroll]
        for nb2 in 0..comptime!(n_tiles / 2) {
            let at = (row + nb2 * 16) * pitch_v + kb * 2 + col;
            let regs = def.load_matrix::<Vector<F, N>, NB>(
                &b_s[at..at + 1],
                MatrixIdent::B,
                4usize,
                false,
            );
            #[unroll]
            for mi in 0..m_tiles {
                let mut a1 = Array::<Vector<F, NA>>::new(a_vecs);
                #[unroll]
                for i in 0..a_vecs {
                    a1[i] = af[mi * a_vecs + i];
                }
                #[unroll]
                for half in 0..2usize {
                    let nb = mi * n_tiles + nb2 * 2 + half;
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
                    def.execute_inplace(&a1, &bf, &mut c);
                    #[unroll]
                    for i in 0..c_vecs {
                        acc[nb * c_vecs + i] = c[i];
                    }
                }
            }
        }
    }
}

/// `acc += A B` for `m_tiles` blocks of 16 rows: A block `mi` is 16 x (16 kk) in
/// registers (`a[(mi * kk + kb) * vectors_per_lane(A) + i]`); B is the shared-tile
/// rows `[row0, row0 + 16 kk)` (the k index) by columns `[0, 8 n_tiles)`, read
/// transposed once for all row blocks; `acc` holds `n_tiles` 16x8 tiles a row block.
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
    #[comptime] m_tiles: usize,
) {
    let a_vecs = def.vectors_per_lane(MatrixIdent::A);
    let b_vecs = def.vectors_per_lane(MatrixIdent::B);
    let c_vecs = def.vectors_per_lane(MatrixIdent::Accumulator);
    let lane = UNIT_POS_PLANE as usize;
    let row = row0 + lane % 16;
    let col = col0_v + lane / 16;
    #[unroll]
    for kb in 0..kk {
        #[unroll]
        for nd2 in 0..comptime!(n_tiles / 2) {
            let at = (row + kb * 16) * pitch_v + nd2 * 2 + col;
            let regs =
                def.load_matrix::<Vector<F, N>, NB>(&b_s[at..at + 1], MatrixIdent::B, 4usize, true);
            #[unroll]
            for mi in 0..m_tiles {
                let mut af = Array::<Vector<F, NA>>::new(a_vecs);
                #[unroll]
                for i in 0..a_vecs {
                    af[i] = a[(mi * kk + kb) * a_vecs + i];
                }
                #[unroll]
                for half in 0..2usize {
                    let nd = mi * n_tiles + nd2 * 2 + half;
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
}

/// The accumulators of `n_tiles` 16x8 tiles a row block (`m_tiles` blocks) as the A
/// fragments of `n_tiles / 2` 16x16 k-blocks a row block, cast to `F`: A element `n`
/// of block `kb` is element `n % 4` of tile `2 kb + n / 4` (rows g / g+8, columns 2t,
/// 2t+1 in both layouts).
#[cube]
fn acc_to_a<F: Float, NA: Size, NC: Size>(
    def: &MmaDefinition<F, F, f32>,
    acc: &Array<Vector<f32, NC>>,
    out: &mut Array<Vector<F, NA>>,
    #[comptime] n_tiles: usize,
    #[comptime] m_tiles: usize,
) {
    let a_vecs = def.vectors_per_lane(MatrixIdent::A);
    let va = def.vector_size(MatrixIdent::A);
    let vc = def.vector_size(MatrixIdent::Accumulator);
    let c_vecs = def.vectors_per_lane(MatrixIdent::Accumulator);
    #[unroll]
    for mi in 0..m_tiles {
        #[unroll]
        for kb in 0..comptime!(n_tiles / 2) {
            #[unroll]
            for i in 0..a_vecs {
                let mut x = Vector::empty();
                #[unroll]
                for e in 0..va {
                    let n = comptime!(i * va + e);
                    let tile = comptime!(mi * n_tiles + kb * 2 + n / 4);
                    let ce = comptime!(n % 4);
                    let cv = acc[tile * c_vecs + ce / vc];
                    x.insert(e, F::cast_from(cv.extract(comptime!(ce % vc))));
                }
                out[(mi * (n_tiles / 2) + kb) * a_vecs + i] = x;
            }
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

/// Writes `od` 16x8 accumulator tiles (from tile `tile0` on) times a per-row factor to
/// rows `row0` / `row1` (this lane's g / g+8) of `out` (element offset `base`),
/// skipping rows past `len` and columns past `head_dim`.
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
    #[comptime] tile0: usize,
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
            let x = acc[(tile0 + nd) * c_vecs + i];
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
