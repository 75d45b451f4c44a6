//! The forward's online softmax: one key tile's scores of a row block turned into `P`,
//! with the running maxima, row sums and output accumulators brought up to date.

// See the parent module: `#[cube]` bodies also exist as plain Rust, where the
// builtins are placeholder constants; that code never runs.
#![allow(arithmetic_overflow)]

use cubecl::cmma::{MatrixIdent, MmaDefinition};
use cubecl::prelude::*;

use crate::flash::kernels::MASKED;

/// One step of the online softmax for row block `mi` of a plane: scales and masks
/// its scores `s` (keys `[tile, tile + 8 kn)`), updates the running maxima `m` and
/// lane-partial sums `l` of its two rows (entries `2 mi`, `2 mi + 1`), rescales its
/// accumulator tiles and leaves `P = exp(S - m)` in `s` (masked entries 0). With
/// `lazy_rescale` the accumulators are left alone when no row of the row block (in the
/// whole plane) has a new maximum: every factor is then `exp(0)`, exactly 1, and after
/// the first tiles of a long row most tiles do not move its maximum. With `fold_scale`
/// the scores stay unscaled through the mask and the row maximum (the scale is
/// positive, so the maximum is the same element), and the scale is applied inside the
/// exponential's argument by one fused multiply-add, `exp(fma(s, scale, -m))`, instead
/// of a multiply of every score before it (`m` is kept scaled either way).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn online_softmax<F: Float, NC: Size>(
    def: &MmaDefinition<F, F, f32>,
    s: &mut Array<Vector<f32, NC>>,
    acc: &mut Array<Vector<f32, NC>>,
    lo: &Array<u32>,
    hi: &Array<u32>,
    m: &mut Array<f32>,
    l: &mut Array<f32>,
    tile: usize,
    scale: f32,
    #[comptime] kn: usize,
    #[comptime] od: usize,
    #[comptime] mi: usize,
    #[comptime] lazy_rescale: bool,
    #[comptime] fold_scale: bool,
) {
    let c_vecs = def.vectors_per_lane(MatrixIdent::Accumulator);
    let vc = def.vector_size(MatrixIdent::Accumulator);
    let lane = UNIT_POS_PLANE;
    let g = (lane / 4) as usize;
    let block_k = comptime!(kn * 8);
    let lo0 = lo[comptime!(2 * mi)] as usize;
    let hi0 = hi[comptime!(2 * mi)] as usize;
    let lo1 = lo[comptime!(2 * mi + 1)] as usize;
    let hi1 = hi[comptime!(2 * mi + 1)] as usize;

    // Scale and mask; row maxima over the quad.
    let full0 = lo0 <= tile && hi0 >= tile + block_k;
    let full1 = lo1 <= tile && hi1 >= tile + block_k;
    let mut mx0 = f32::new(MASKED);
    let mut mx1 = f32::new(MASKED);
    #[unroll]
    for nb in 0..kn {
        #[unroll]
        for i in 0..c_vecs {
            let at = comptime!((mi * kn + nb) * c_vecs + i);
            let mut x = s[at];
            #[unroll]
            for e in 0..vc {
                let (r, c) = def.position_of_nth(
                    lane,
                    comptime!((i * vc + e) as u32),
                    MatrixIdent::Accumulator,
                );
                let key = tile + nb * 8 + c as usize;
                let mut val = x.extract(e);
                if !fold_scale {
                    val *= scale;
                }
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
            s[at] = x;
        }
    }
    mx0 = max(mx0, plane_shuffle_xor(mx0, 1u32));
    mx0 = max(mx0, plane_shuffle_xor(mx0, 2u32));
    mx1 = max(mx1, plane_shuffle_xor(mx1, 1u32));
    mx1 = max(mx1, plane_shuffle_xor(mx1, 2u32));
    if fold_scale {
        // The maxima of the unscaled scores, scaled once (a masked MASKED stays below
        // the visibility test below, which looks at the unscaled value).
        if mx0 > f32::new(MASKED) {
            mx0 *= scale;
        }
        if mx1 > f32::new(MASKED) {
            mx1 *= scale;
        }
    }
    // A row with nothing visible yet keeps NO_KEYS.
    let m0 = m[comptime!(2 * mi)];
    let m1 = m[comptime!(2 * mi + 1)];
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
    m[comptime!(2 * mi)] = new0;
    m[comptime!(2 * mi + 1)] = new1;
    let mut l0 = l[comptime!(2 * mi)] * corr0;
    let mut l1 = l[comptime!(2 * mi + 1)] * corr1;
    // Plane-uniform (the caller runs this for every lane of the plane or none).
    let mut moved = true;
    if lazy_rescale {
        moved = plane_any(new0 != m0 || new1 != m1);
    }
    if moved {
        rescale_rows::<F, NC>(def, acc, corr0, corr1, od, mi);
    }
    // P = exp(S - m), masked entries 0; lane-partial row sums.
    #[unroll]
    for nb in 0..kn {
        #[unroll]
        for i in 0..c_vecs {
            let at = comptime!((mi * kn + nb) * c_vecs + i);
            let mut x = s[at];
            #[unroll]
            for e in 0..vc {
                let (r, _c) = def.position_of_nth(
                    lane,
                    comptime!((i * vc + e) as u32),
                    MatrixIdent::Accumulator,
                );
                // Masked entries: the exponential is computed and discarded by a
                // select rather than skipped by a branch, so that the exponentials of
                // a tile overlap (one branch each serialised them: 2026-12-06
                // profile, benchmarks/flash_attention.md).
                let val = x.extract(e);
                let visible = val > f32::new(MASKED);
                if r as usize == g {
                    let mut arg = val - new0;
                    if fold_scale {
                        arg = fma(val, scale, -new0);
                    }
                    let p = select(visible, arg.exp(), 0.0f32);
                    l0 += p;
                    x.insert(e, p);
                } else {
                    let mut arg = val - new1;
                    if fold_scale {
                        arg = fma(val, scale, -new1);
                    }
                    let p = select(visible, arg.exp(), 0.0f32);
                    l1 += p;
                    x.insert(e, p);
                }
            }
            s[at] = x;
        }
    }
    l[comptime!(2 * mi)] = l0;
    l[comptime!(2 * mi + 1)] = l1;
}

/// Multiplies the accumulator tiles of row block `mi` by `f0` (this lane's row g) and
/// `f1` (row g + 8).
#[cube]
fn rescale_rows<F: Float, NC: Size>(
    def: &MmaDefinition<F, F, f32>,
    acc: &mut Array<Vector<f32, NC>>,
    f0: f32,
    f1: f32,
    #[comptime] od: usize,
    #[comptime] mi: usize,
) {
    let c_vecs = def.vectors_per_lane(MatrixIdent::Accumulator);
    let vc = def.vector_size(MatrixIdent::Accumulator);
    let lane = UNIT_POS_PLANE;
    let g = lane / 4;
    #[unroll]
    for nd in 0..od {
        #[unroll]
        for i in 0..c_vecs {
            let at = comptime!((mi * od + nd) * c_vecs + i);
            let mut x = acc[at];
            #[unroll]
            for e in 0..vc {
                let (r, _c) = def.position_of_nth(
                    lane,
                    comptime!((i * vc + e) as u32),
                    MatrixIdent::Accumulator,
                );
                let mut f = f1;
                if r == g {
                    f = f0;
                }
                x.insert(e, x.extract(e) * f);
            }
            acc[at] = x;
        }
    }
}
