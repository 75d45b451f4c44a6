//! The backward entry points: dQ, dK and dV from the inputs, the forward's O and LSE,
//! and dO (or a precomputed `delta`), on the tensor-core kernels where they run and
//! the scalar kernels elsewhere.

use cubecl::prelude::*;

use super::device_tensor::elementwise_cubes;
use super::kernels::{flash_delta_kernel, flash_dkdv_kernel, flash_dq_kernel, scale_cast_kernel};
use super::options::{Geometry, check};
use super::tc_tiles::{TcTiles, tc_tiles};
use super::tensor_core::{flash_tc_dkdv_kernel, flash_tc_dq_kernel};
use super::{
    AttnError, DeviceTensor, FlashKernel, FlashOptions, UNITS, cu_buffer, tile_rows,
    use_tensor_cores,
};

/// Backward: `(dQ, dK, dV)` from the inputs, the forward's `O` and `LSE`, and `dO`.
/// dK/dV of a kv head sum the contributions of all query heads of its group.
#[allow(clippy::too_many_arguments)]
pub fn flash_backward<F: Float + CubeElement>(
    client: &Client,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    o: &DeviceTensor,
    lse: &DeviceTensor,
    d_o: &DeviceTensor,
    options: &FlashOptions,
) -> Result<(DeviceTensor, DeviceTensor, DeviceTensor), AttnError> {
    flash_backward_with::<F>(client, q, k, v, o, lse, d_o, options, FlashKernel::Auto)
}

/// [`flash_backward`] with the dQ and dK/dV kernels chosen by the caller.
#[allow(clippy::too_many_arguments)]
pub fn flash_backward_with<F: Float + CubeElement>(
    client: &Client,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    o: &DeviceTensor,
    lse: &DeviceTensor,
    d_o: &DeviceTensor,
    options: &FlashOptions,
    kernel: FlashKernel,
) -> Result<(DeviceTensor, DeviceTensor, DeviceTensor), AttnError> {
    let g = check(q, k, v, options)?;
    if o.shape != q.shape || d_o.shape != q.shape || lse.shape != [g.b, g.hq, g.sq] {
        return Err(AttnError::Shape(format!(
            "o {:?}, dO {:?} must be {:?} and lse {:?} must be {:?}",
            o.shape,
            d_o.shape,
            q.shape,
            lse.shape,
            [g.b, g.hq, g.sq]
        )));
    }
    let rows = g.b * g.hq * g.sq;
    let delta = DeviceTensor::output::<f32>(client, &[g.b, g.hq, g.sq]);
    flash_delta_kernel::launch::<F>(
        client,
        CubeCount::Static(rows.div_ceil(UNITS) as u32, 1, 1),
        CubeDim::new_1d(UNITS as u32),
        o.arg(),
        d_o.arg(),
        delta.arg(),
        g.d,
    );
    flash_backward_from_delta::<F>(client, q, k, v, lse, &delta, d_o, options, kernel)
}

/// The backward from a precomputed `delta = rowsum(dO * O)` (f32 `[B, Hq, Sq]`) instead
/// of O: what ring attention needs, where every key block's gradients use the delta of
/// the final (merged) output. `lse` is the final output's too; rows with LSE below
/// `-1e38` (no visible key, including `-inf`) contribute nothing.
#[allow(clippy::too_many_arguments)]
pub fn flash_backward_from_delta<F: Float + CubeElement>(
    client: &Client,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    lse: &DeviceTensor,
    delta: &DeviceTensor,
    d_o: &DeviceTensor,
    options: &FlashOptions,
    kernel: FlashKernel,
) -> Result<(DeviceTensor, DeviceTensor, DeviceTensor), AttnError> {
    let g = check(q, k, v, options)?;
    let rows = [g.b, g.hq, g.sq];
    if d_o.shape != q.shape || lse.shape != rows || delta.shape != rows {
        return Err(AttnError::Shape(format!(
            "dO {:?} must be {:?}, lse {:?} and delta {:?} must be {rows:?}",
            d_o.shape, q.shape, lse.shape, delta.shape
        )));
    }
    let dq = DeviceTensor::output::<F>(client, &q.shape);
    let dk = DeviceTensor::output::<F>(client, &k.shape);
    let dv = DeviceTensor::output::<F>(client, &v.shape);
    // Hopper: the warpgroup-MMA backward for the calls the wgmma forward takes (bf16, head
    // dim 64-128, no packed sequences; `crate::wgmma::backward_launch::routes`).
    #[cfg(feature = "cuda")]
    if kernel == FlashKernel::Auto {
        use crate::wgmma::backward_launch::{backward_into, routes};
        let bf16 = F::cube_type() == half::bf16::cube_type();
        if routes(client, bf16, (q, k, v, d_o), (lse, delta), options) {
            let dq_acc = DeviceTensor::poisoned::<f32>(client, 0.0, &q.shape);
            let scale = options.scale;
            let causal = crate::wgmma::forward::causal_argument(options);
            let outputs = (&dk, &dv, &dq_acc);
            backward_into(client, (q, k, v, d_o), (lse, delta), outputs, scale, causal)?;
            scale_cast::<F>(client, &dq_acc, &dq, scale);
            return Ok((dq, dk, dv));
        }
    }
    let tensors = [("q", q), ("k", k), ("v", v), ("dO", d_o)];
    if use_tensor_cores::<F>(client, kernel, &tensors)? {
        let t = tc_tiles(client, g.d);
        // Fused dQ (atomics from the dK/dV kernel) when its planes split the dQ tile
        // evenly: LONGVIEW_FLASH_FUSED_DQ=0 turns it off (benchmarks).
        let od = g.d.div_ceil(16) * 2;
        let row_blocks = t.dkdv_block_q / 16;
        let fuse = crate::env_switch::switch("LONGVIEW_FLASH_FUSED_DQ", true)
            && t.dkdv_warps.is_multiple_of(row_blocks)
            && od.is_multiple_of(t.dkdv_warps / row_blocks)
            && (od / (t.dkdv_warps / row_blocks)).is_multiple_of(2);
        let dq_acc = if fuse {
            DeviceTensor::poisoned::<f32>(client, 0.0, &q.shape)
        } else {
            DeviceTensor::poisoned::<f32>(client, 0.0, &[1])
        };
        let (cu, nseg, varlen, _keep) = cu_buffer(client, options);
        if fuse {
            return tc_dkdv_launch::<F>(
                client,
                &g,
                &t,
                [q, k, v, d_o, lse, delta],
                [&dk, &dv, &dq_acc],
                options,
                true,
            )
            .map(|()| {
                scale_cast::<F>(client, &dq_acc, &dq, options.scale);
                (dq, dk, dv)
            });
        }
        flash_tc_dq_kernel::launch::<F>(
            client,
            CubeCount::Static(
                g.sq.div_ceil(16 * t.fwd_warps) as u32,
                (g.b * g.hq) as u32,
                1,
            ),
            CubeDim::new_2d(32, t.fwd_warps as u32),
            8,
            q.arg(),
            k.arg(),
            v.arg(),
            d_o.arg(),
            lse.arg(),
            delta.arg(),
            dq.arg(),
            cu,
            nseg,
            options.scale,
            options.q_offset as u32,
            options.k_offset as u32,
            options.causal,
            varlen,
            g.d,
            t.fwd_warps,
            t.dq_block_k,
            super::tc_async_copy(),
        );
        tc_dkdv_launch::<F>(
            client,
            &g,
            &t,
            [q, k, v, d_o, lse, delta],
            [&dk, &dv, &dq_acc],
            options,
            false,
        )?;
        return Ok((dq, dk, dv));
    }
    let (cu, nseg, varlen, _keep) = cu_buffer(client, options);
    let block_k = tile_rows(client, g.d, 0);
    flash_dq_kernel::launch::<F>(
        client,
        CubeCount::Static(g.sq.div_ceil(UNITS) as u32, (g.b * g.hq) as u32, 1),
        CubeDim::new_1d(UNITS as u32),
        q.arg(),
        k.arg(),
        v.arg(),
        d_o.arg(),
        lse.arg(),
        delta.arg(),
        dq.arg(),
        cu,
        nseg,
        options.scale,
        options.q_offset as u32,
        options.k_offset as u32,
        options.causal,
        varlen,
        g.d,
        UNITS,
        block_k,
    );
    let (cu, nseg, _, _keep2) = cu_buffer(client, options);
    let block_q = tile_rows(client, g.d, 2);
    flash_dkdv_kernel::launch::<F>(
        client,
        CubeCount::Static(g.sk.div_ceil(UNITS) as u32, (g.b * g.hkv) as u32, 1),
        CubeDim::new_1d(UNITS as u32),
        q.arg(),
        k.arg(),
        v.arg(),
        d_o.arg(),
        lse.arg(),
        delta.arg(),
        dk.arg(),
        dv.arg(),
        cu,
        nseg,
        options.scale,
        options.q_offset as u32,
        options.k_offset as u32,
        options.causal,
        varlen,
        g.d,
        UNITS,
        block_q,
    );
    Ok((dq, dk, dv))
}

/// Launches the tensor-core dK/dV kernel (`fuse_dq`: it also adds dQ / scale into
/// the f32 `dq_acc` with atomics).
#[allow(clippy::too_many_arguments)]
fn tc_dkdv_launch<F: Float + CubeElement>(
    client: &Client,
    g: &Geometry,
    t: &TcTiles,
    [q, k, v, d_o, lse, delta]: [&DeviceTensor; 6],
    [dk, dv, dq_acc]: [&DeviceTensor; 3],
    options: &FlashOptions,
    fuse_dq: bool,
) -> Result<(), AttnError> {
    let (cu, nseg, varlen, _keep) = cu_buffer(client, options);
    flash_tc_dkdv_kernel::launch::<F>(
        client,
        CubeCount::Static(
            g.sk.div_ceil(16 * t.dkdv_warps) as u32,
            (g.b * g.hkv) as u32,
            1,
        ),
        CubeDim::new_2d(32, t.dkdv_warps as u32),
        8,
        q.arg(),
        k.arg(),
        v.arg(),
        d_o.arg(),
        lse.arg(),
        delta.arg(),
        dk.arg(),
        dv.arg(),
        dq_acc.arg(),
        cu,
        nseg,
        options.scale,
        options.q_offset as u32,
        options.k_offset as u32,
        options.causal,
        varlen,
        g.d,
        t.dkdv_warps,
        t.dkdv_block_q,
        fuse_dq,
        super::tc_async_copy(),
    );
    Ok(())
}

/// `out = acc * scale` cast to `F` (both contiguous, as many elements).
fn scale_cast<F: Float + CubeElement>(
    client: &Client,
    acc: &DeviceTensor,
    out: &DeviceTensor,
    scale: f32,
) {
    let count = acc.shape.iter().product();
    scale_cast_kernel::launch::<F>(
        client,
        elementwise_cubes(count),
        CubeDim::new_1d(256),
        unsafe { BufferArg::from_raw_parts(acc.handle.clone(), count) },
        unsafe { BufferArg::from_raw_parts(out.handle.clone(), count) },
        scale,
    );
}
