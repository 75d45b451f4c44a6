//! The fused dQ's path out of the dK/dV kernel: the product `dQ = dS K` with dS read
//! from shared memory one k-block at a time, a plane's dQ tiles into a shared f32 tile,
//! then the cube's tile into the f32 dQ buffer with coalesced atomics.

// See the parent module: `#[cube]` bodies also exist as plain Rust, where the
// builtins are placeholder constants; that code never runs.
#![allow(arithmetic_overflow)]

use cubecl::cmma::{MatrixIdent, MmaDefinition};
use cubecl::prelude::*;

use super::mma_ab;

/// `acc += dS K` for one plane's 16 query rows of the fused dQ: dS is the shared tile
/// `ds_s` (bf16/f16 elements; this lane's `ldmatrix` row starts at element `a_at` and
/// the 16-column k-blocks follow every 16 elements), K the shared tile `k_s` (rows are
/// the k index, `kk` blocks of 16 from row 0; `n_tiles` column tiles of 8 from vector
/// column `col0_v`). All `kk` A fragments are loaded first, then one product runs over
/// them. (Loading one k-block at a time just before its products was measured on an H100
/// on 2026-12-07 as `LONGVIEW_FLASH_DQ_SHARED_DS`: the same registers, spill and
/// instruction count, so the compiler had already scheduled it that way; removed.)
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn dq_product<F: Float, N: Size, NA: Size, NC: Size>(
    def: &MmaDefinition<F, F, f32>,
    ds_s: &Shared<[F]>,
    a_at: usize,
    k_s: &Shared<[Vector<F, N>]>,
    acc: &mut Array<Vector<f32, NC>>,
    #[comptime] n_tiles: usize,
    #[comptime] kk: usize,
    #[comptime] pitch_v: usize,
    col0_v: usize,
) {
    let a_vecs = def.vectors_per_lane(MatrixIdent::A);
    let mut ds_frag = Array::<Vector<F, NA>>::new(comptime!(kk * a_vecs));
    #[unroll]
    for kb in 0..kk {
        let at = a_at + kb * 16;
        let regs = def.load_matrix::<F, NA>(&ds_s[at..at + 8], MatrixIdent::A, 4usize, false);
        #[unroll]
        for i in 0..a_vecs {
            ds_frag[kb * a_vecs + i] = regs[i];
        }
    }
    mma_ab::<F, N, NA, NA, NC>(
        def, &ds_frag, k_s, 0usize, acc, n_tiles, kk, pitch_v, col0_v, 1usize,
    );
}

/// Stores a plane's dQ tiles (16 rows from tile row `row0`, column tiles `[ct, ct +
/// dq_tiles)` of 8, `mma` accumulator layout) into the f32 shared tile `dq_s`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn store_dq_tile<F: Float, NC: Size>(
    def: &MmaDefinition<F, F, f32>,
    dq_t: &Array<Vector<f32, NC>>,
    dq_s: &mut Shared<[f32]>,
    row0: usize,
    ct: usize,
    #[comptime] dq_tiles: usize,
    #[comptime] pitch: usize,
) {
    let c_vecs = def.vectors_per_lane(MatrixIdent::Accumulator);
    let vc = def.vector_size(MatrixIdent::Accumulator);
    let lane = UNIT_POS_PLANE;
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
                dq_s[(row0 + r as usize) * pitch + (ct + nd) * 8 + c as usize] = x.extract(e);
            }
        }
    }
}

/// Adds the cube's dQ tile (`dq_s`, `block_q` rows of `head_dim` in rows of `pitch`)
/// to the f32 buffer from element `base` with atomics, consecutive units on
/// consecutive elements. `checked`: only the first `rows` rows.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn add_dq_shared(
    dq_s: &Shared<[f32]>,
    dq_acc: &mut Tensor<Atomic<f32>>,
    base: usize,
    rows: usize,
    #[comptime] block_q: usize,
    #[comptime] head_dim: usize,
    #[comptime] pitch: usize,
    #[comptime] threads: usize,
    #[comptime] checked: bool,
) {
    let count = comptime!(block_q * head_dim);
    #[unroll]
    for j in 0..comptime!(count.div_ceil(threads)) {
        let idx = UNIT_POS as usize + j * threads;
        let row = idx / head_dim;
        let at = row * pitch + idx % head_dim;
        if checked {
            if idx < count && row < rows {
                dq_acc[base + idx].fetch_add(dq_s[at]);
            }
        } else {
            dq_acc[base + idx].fetch_add(dq_s[at]);
        }
    }
}
