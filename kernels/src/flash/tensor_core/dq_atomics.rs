//! The fused dQ's path out of the dK/dV kernel: a plane's dQ tiles into a shared f32
//! tile, then the cube's tile into the f32 dQ buffer with coalesced atomics.

// See the parent module: `#[cube]` bodies also exist as plain Rust, where the
// builtins are placeholder constants; that code never runs.
#![allow(arithmetic_overflow)]

use cubecl::cmma::{MatrixIdent, MmaDefinition};
use cubecl::prelude::*;

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
