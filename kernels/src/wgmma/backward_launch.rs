//! Host side of the wgmma flash backward ([`super::backward`]): when
//! [`crate::flash::flash_backward`] hands a call to it ([`routes`]) and the launch.

use cubecl::prelude::*;

use super::backward::{KEYS_A_CUBE, backward_kernel};
use super::forward_launch::{element_extent, head_dim_supported, layout_unsupported, stride_table};
use crate::{AttnError, DeviceTensor, FlashOptions};

/// Whether [`crate::flash::flash_backward`] (kernel `Auto`) runs a call on this kernel: the
/// calls the wgmma forward takes ([`super::forward_launch::routes`]: sm_90, bf16, head dim
/// a multiple of 8 from 64 to 128, no packed sequences, causal queries not before their
/// keys' block, Q/K/V strided as it reads them), with dO laid out the same way and a
/// contiguous delta.
/// `LONGVIEW_FLASH_WGMMA=0` or `LONGVIEW_FLASH_WGMMA_BACKWARD=0` turns it off (the
/// `mma.sync` kernels then run).
pub fn routes(
    client: &Client,
    bf16: bool,
    (q, k, v, d_o): (&DeviceTensor, &DeviceTensor, &DeviceTensor, &DeviceTensor),
    (lse, delta): (&DeviceTensor, &DeviceTensor),
    options: &FlashOptions,
) -> bool {
    if std::env::var("LONGVIEW_FLASH_WGMMA_BACKWARD").is_ok_and(|v| v == "0")
        || !delta.is_contiguous()
    {
        return false;
    }
    super::forward_launch::routes(client, bf16, (q, k, v), (d_o, lse), options)
}

/// Launches the backward for bf16 `q`, `d_o` `[batch, heads, seq_q, head_dim]` and `k`, `v`
/// `[batch, kv_heads, seq_k, head_dim]` (head dims as [`head_dim_supported`]; any layout
/// [`layout_unsupported`] accepts), with the forward's `lse` and `delta = rowsum(dO * O)`
/// (contiguous f32 `[batch, heads, seq_q]`): writes dK (scaled) and dV into contiguous
/// `dk`, `dv` shaped like `k`, and adds `dS K` (unscaled) into the contiguous f32 `dq_acc`
/// shaped like `q`, which must start zeroed.
/// Needs a CUDA device of compute capability 9.0.
#[allow(clippy::too_many_arguments)]
pub fn backward_into(
    client: &Client,
    (q, k, v, d_o): (&DeviceTensor, &DeviceTensor, &DeviceTensor, &DeviceTensor),
    (lse, delta): (&DeviceTensor, &DeviceTensor),
    (dk, dv, dq_acc): (&DeviceTensor, &DeviceTensor, &DeviceTensor),
    scale: f32,
    causal: Option<usize>,
) -> Result<(), AttnError> {
    let shape_error = || {
        AttnError::Shape(format!(
            "wgmma backward: shapes q {:?} k {:?} v {:?} dO {:?} lse {:?} delta {:?} dk {:?} \
             dv {:?} dq_acc {:?} do not agree (expected [batch, heads, seq, head_dim], \
             head_dim a multiple of 8 from 64 to 128)",
            q.shape,
            k.shape,
            v.shape,
            d_o.shape,
            lse.shape,
            delta.shape,
            dk.shape,
            dv.shape,
            dq_acc.shape
        ))
    };
    let [batch, heads, seq_q, d] = q.shape[..] else {
        return Err(shape_error());
    };
    let [kb, kv_heads, seq_k, kd] = k.shape[..] else {
        return Err(shape_error());
    };
    let rows = [batch, heads, seq_q];
    if !head_dim_supported(d)
        || kd != d
        || kb != batch
        || v.shape != k.shape
        || d_o.shape != q.shape
        || lse.shape != rows
        || delta.shape != rows
        || dk.shape != k.shape
        || dv.shape != k.shape
        || dq_acc.shape != q.shape
    {
        return Err(shape_error());
    }
    if kv_heads == 0 || heads % kv_heads != 0 {
        return Err(AttnError::Shape(format!(
            "wgmma backward: {kv_heads} kv heads do not divide {heads} query heads"
        )));
    }
    let shift = causal.unwrap_or(0);
    if shift > u32::MAX as usize {
        return Err(AttnError::Options(format!(
            "wgmma backward: causal shift {shift} does not fit in 32 bits"
        )));
    }
    if let Some(why) = layout_unsupported([("q", q), ("k", k), ("v", v), ("dO", d_o)], lse) {
        return Err(AttnError::Shape(format!("wgmma backward: {why}")));
    }
    for (name, t) in [("delta", delta), ("dk", dk), ("dv", dv), ("dq_acc", dq_acc)] {
        if !t.is_contiguous() {
            return Err(AttnError::Shape(format!(
                "wgmma backward: {name} (shape {:?}, strides {:?}) must be contiguous",
                t.shape, t.strides
            )));
        }
    }
    if seq_q == 0 || seq_k == 0 || batch * heads == 0 {
        return Ok(());
    }
    let strides = stride_table([q, k, v, d_o]);
    let strides_handle = client.create_from_slice(u32::as_bytes(&strides));
    // Q, K, V and dO are bound as u32 words.
    let extent = |t: &DeviceTensor| element_extent(t).div_ceil(2);
    let count = |t: &DeviceTensor| t.shape.iter().product::<usize>();
    unsafe {
        backward_kernel::launch(
            client,
            CubeCount::Static(
                seq_k.div_ceil(KEYS_A_CUBE) as u32,
                (batch * kv_heads) as u32,
                1,
            ),
            CubeDim::new_1d(256),
            BufferArg::from_raw_parts(q.handle.clone(), extent(q)),
            BufferArg::from_raw_parts(k.handle.clone(), extent(k)),
            BufferArg::from_raw_parts(v.handle.clone(), extent(v)),
            BufferArg::from_raw_parts(d_o.handle.clone(), extent(d_o)),
            BufferArg::from_raw_parts(lse.handle.clone(), count(lse)),
            BufferArg::from_raw_parts(delta.handle.clone(), count(delta)),
            BufferArg::from_raw_parts(dk.handle.clone(), count(dk)),
            BufferArg::from_raw_parts(dv.handle.clone(), count(dv)),
            BufferArg::from_raw_parts(dq_acc.handle.clone(), count(dq_acc)),
            BufferArg::from_raw_parts(strides_handle.clone(), strides.len()),
            seq_q as u32,
            seq_k as u32,
            heads as u32,
            (heads / kv_heads) as u32,
            scale,
            shift as u32,
            causal.is_some(),
            d,
        );
    }
    drop(strides_handle);
    Ok(())
}
