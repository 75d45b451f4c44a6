//! Host side of the flash-attention kernels: which kernel runs and its launch (the
//! forward and decoding here, the backward in `backward.rs`). The
//! tensors are in `device_tensor.rs`, the options and shape checks in `options.rs`,
//! the tensor-core support test and tile sizes in `tc_tiles.rs`, the kernels in
//! `kernels.rs` (scalar), `tensor_core/` (forward, dq, dkdv) and `decode.rs` (split keys).
//!
//! Layout: q `[B, Hq, Sq, D]`, k and v `[B, Hkv, Sk, D]` (any strides), o like q,
//! lse `[B, Hq, Sq]` f32 (natural log, of the scaled scores). `Hkv` must divide `Hq`
//! (grouped-query attention: query head `h` uses kv head `h / (Hq / Hkv)`).

mod backward;
mod decode;
mod decode_tc;
mod device_tensor;
mod kernels;
mod options;
mod tc_tiles;
mod tensor_core;

pub use backward::{flash_backward, flash_backward_from_delta, flash_backward_with};
pub use decode::DECODE_MAX_ROWS;
pub use decode_tc::DECODE_TC_MIN_ROWS;
pub use device_tensor::{DeviceTensor, poison_outputs, set_poison_outputs};
pub use options::{DecodeTuning, FlashOptions};
pub use tc_tiles::{TC_MAX_HEAD_DIM, tensor_cores_unsupported};

use options::{Geometry, check, dims};
use tc_tiles::tc_forward_tiles;

use cubecl::prelude::*;
use cubecl::server::Handle;

pub use kernels::NO_KEYS;
use kernels::{flash_forward_kernel, merge_kernel};
use tensor_core::flash_tc_forward_kernel;

/// Largest head dimension the kernels accept (per-unit register arrays).
pub const MAX_HEAD_DIM: usize = 256;
/// Units per cube (query rows of the forward and dQ kernels, key rows of dK/dV).
const UNITS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum AttnError {
    #[error("attention shapes: {0}")]
    Shape(String),
    #[error("attention options: {0}")]
    Options(String),
    #[error("reading a kernel result failed: {0}")]
    Read(String),
}

/// Rows of a `rows x d` f32 tile pair that fit in shared memory: a power of two,
/// at most 32.
fn tile_rows(client: &Client, d: usize, extra_per_row: usize) -> usize {
    let budget = client.properties().hardware.max_shared_memory_size;
    let mut rows = 32;
    while rows > 1 && rows * (2 * d + extra_per_row) * 4 > budget {
        rows /= 2;
    }
    rows
}

fn cu_buffer(client: &Client, options: &FlashOptions) -> (BufferArg, u32, bool, Handle) {
    let cu = options.cu_seqlens.clone().unwrap_or_else(|| vec![0, 0]);
    let handle = client.create_from_slice(u32::as_bytes(&cu));
    let arg = unsafe { BufferArg::from_raw_parts(handle.clone(), cu.len()) };
    (
        arg,
        (cu.len() - 1) as u32,
        options.cu_seqlens.is_some(),
        handle,
    )
}

/// Which kernels [`flash_forward_with`] / [`flash_backward_with`] run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FlashKernel {
    /// Tensor cores where [`tensor_cores_unsupported`] says they can run, else scalar.
    #[default]
    Auto,
    /// One unit per row, f32 FMAs (any runtime, any float type).
    Scalar,
    /// `mma.sync` m16n8k16 (f16/bf16 on CUDA sm_80+); an error where unsupported.
    TensorCore,
    /// Forward only: the split-key kernels for at most [`DECODE_MAX_ROWS`] query rows
    /// per kv head (decoding; what `Auto` picks for such calls); an error for other
    /// calls. The backward takes it as `Auto`.
    Decode,
}

/// Forward: `(O, LSE)` for q, k, v of element type `F` (f32, f16, bf16 where the
/// runtime has them); LSE is f32.
pub fn flash_forward<F: Float + CubeElement>(
    client: &Client,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    options: &FlashOptions,
) -> Result<(DeviceTensor, DeviceTensor), AttnError> {
    let g = check(q, k, v, options)?;
    // NaN until written where outputs are poisoned (tests, checks): a row a kernel
    // skipped shows up instead of passing as 0.
    let o = DeviceTensor::output::<F>(client, &[g.b, g.hq, g.sq, g.d]);
    let lse = DeviceTensor::output::<f32>(client, &[g.b, g.hq, g.sq]);
    flash_forward_into::<F>(client, q, k, v, &o, &lse, options)?;
    Ok((o, lse))
}

/// Whether `kernel` means the tensor-core kernels for these tensors (an error when
/// they were asked for and cannot run).
fn use_tensor_cores<F: Float + CubeElement>(
    client: &Client,
    kernel: FlashKernel,
    tensors: &[(&str, &DeviceTensor)],
) -> Result<bool, AttnError> {
    match kernel {
        FlashKernel::Scalar => Ok(false),
        FlashKernel::Auto | FlashKernel::Decode => {
            Ok(tensor_cores_unsupported::<F>(client, tensors).is_none())
        }
        FlashKernel::TensorCore => match tensor_cores_unsupported::<F>(client, tensors) {
            None => Ok(true),
            Some(why) => Err(AttnError::Options(format!(
                "tensor-core kernels cannot run: {why}"
            ))),
        },
    }
}

/// [`flash_forward`] into caller-provided outputs (contiguous or not).
pub fn flash_forward_into<F: Float + CubeElement>(
    client: &Client,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    o: &DeviceTensor,
    lse: &DeviceTensor,
    options: &FlashOptions,
) -> Result<(), AttnError> {
    flash_forward_with::<F>(client, q, k, v, o, lse, options, FlashKernel::Auto)
}

/// A decoding step with the keys sliced into the batch of `inner`'s forward and the
/// slices merged (what `FlashOptions::tensor_core_decode` runs with `inner` =
/// `TensorCore`; tests run it with `Scalar`), over `slices` slices (`None`: about two
/// cubes per multiprocessor). An error for calls other than one sequence whose query
/// rows all see every key.
#[allow(clippy::too_many_arguments)]
pub fn flash_decode_sliced<F: Float + CubeElement>(
    client: &Client,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    o: &DeviceTensor,
    lse: &DeviceTensor,
    options: &FlashOptions,
    inner: FlashKernel,
    slices: Option<usize>,
) -> Result<(), AttnError> {
    let g = check(q, k, v, options)?;
    check_outputs(&g, q, o, lse)?;
    decode_tc::forward::<F>(
        client,
        &g,
        (q, k, v),
        (o, lse),
        options,
        inner,
        slices,
        None,
    )
}

/// `o` shaped like q and `lse` `[B, Hq, Sq]`, or an error naming both.
fn check_outputs(
    g: &Geometry,
    q: &DeviceTensor,
    o: &DeviceTensor,
    lse: &DeviceTensor,
) -> Result<(), AttnError> {
    if o.shape != q.shape || lse.shape != [g.b, g.hq, g.sq] {
        return Err(AttnError::Shape(format!(
            "outputs o {:?} / lse {:?} must be {:?} / {:?}",
            o.shape,
            lse.shape,
            q.shape,
            [g.b, g.hq, g.sq]
        )));
    }
    Ok(())
}

/// Attention of a few query rows (a decoding step) over the first `keys[0]` rows of
/// `k` and `v`, where `keys` is a u32 tensor of one element on the device: a KV
/// cache's whole buffers, read up to a length the device holds, so that a step
/// captured once as a device graph attends to the right keys at every replay
/// (`crate::decode_graph`). No mask (every counted key is visible to every row).
/// The kernels are chosen as for an eager step of as many keys as the buffers hold
/// ([`flash_decode_counted_with`] with [`FlashKernel::Auto`]).
#[allow(clippy::too_many_arguments)]
pub fn flash_decode_counted<F: Float + CubeElement>(
    client: &Client,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    o: &DeviceTensor,
    lse: &DeviceTensor,
    keys: &DeviceTensor,
    options: &FlashOptions,
) -> Result<(), AttnError> {
    let kernel = FlashKernel::Auto;
    flash_decode_counted_with::<F>(client, q, k, v, o, lse, keys, options, kernel)
}

/// [`flash_decode_counted`] with the kernels chosen by the caller: `Decode`, the
/// split-key kernel with its slices cut over all `Sk` rows; `TensorCore` (or `Scalar`,
/// for tests where there are no tensor cores), the keys sliced into the batch of that
/// forward (`decode_tc`, one sequence only), each slice reading its rows before the
/// count; `Auto`, the tensor-core slices where an eager step would take them, else
/// the split-key kernel.
#[allow(clippy::too_many_arguments)]
pub fn flash_decode_counted_with<F: Float + CubeElement>(
    client: &Client,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    o: &DeviceTensor,
    lse: &DeviceTensor,
    keys: &DeviceTensor,
    options: &FlashOptions,
    kernel: FlashKernel,
) -> Result<(), AttnError> {
    if options.causal || options.cu_seqlens.is_some() {
        return Err(AttnError::Options(
            "counted decoding takes no mask and no packed sequences".into(),
        ));
    }
    if keys.shape.iter().product::<usize>() != 1 {
        return Err(AttnError::Shape(format!(
            "the key count is one element, not {:?}",
            keys.shape
        )));
    }
    let g = check(q, k, v, options)?;
    check_outputs(&g, q, o, lse)?;
    // The forward the keys are sliced into, or `None` for the split-key kernel.
    let sliced_into = match kernel {
        FlashKernel::Decode => None,
        FlashKernel::TensorCore | FlashKernel::Scalar => Some(kernel),
        FlashKernel::Auto => {
            let tensors = [("q", q), ("k", k), ("v", v)];
            let tensor_cores = decode_tc::applies(&g, options)
                && decode_tc::wanted(&g, options, (q, o, lse))
                && use_tensor_cores::<F>(client, FlashKernel::Auto, &tensors)?;
            tensor_cores.then_some(FlashKernel::TensorCore)
        }
    };
    if let Some(inner) = sliced_into {
        let (q_k_v, out) = ((q, k, v), (o, lse));
        return decode_tc::forward::<F>(client, &g, q_k_v, out, options, inner, None, Some(keys));
    }
    decode::forward::<F>(client, &g, q, k, v, o, lse, options, Some(keys))
}

/// [`flash_forward_into`] with the kernel chosen by the caller (benchmarks and tests
/// compare the two).
#[allow(clippy::too_many_arguments)]
pub fn flash_forward_with<F: Float + CubeElement>(
    client: &Client,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    o: &DeviceTensor,
    lse: &DeviceTensor,
    options: &FlashOptions,
    kernel: FlashKernel,
) -> Result<(), AttnError> {
    let g = check(q, k, v, options)?;
    check_outputs(&g, q, o, lse)?;
    if kernel == FlashKernel::Decode
        || (kernel == FlashKernel::Auto && decode::applies(&g, options))
    {
        let tensors = [("q", q), ("k", k), ("v", v)];
        if decode_tc::applies(&g, options)
            && decode_tc::wanted(&g, options, (q, o, lse))
            && use_tensor_cores::<F>(client, FlashKernel::Auto, &tensors)?
        {
            let (q_k_v, out) = ((q, k, v), (o, lse));
            let tc = FlashKernel::TensorCore;
            return decode_tc::forward::<F>(client, &g, q_k_v, out, options, tc, None, None);
        }
        return decode::forward::<F>(client, &g, q, k, v, o, lse, options, None);
    }
    // Hopper: the warpgroup-MMA forward for the calls it takes (bf16, head dim 64-128, no
    // packed sequences, causal queries not before their keys, as in chunked prefill;
    // `crate::wgmma::forward::routes`).
    #[cfg(feature = "cuda")]
    if kernel == FlashKernel::Auto {
        use crate::wgmma::forward::{causal_argument, forward_into, routes};
        let bf16 = F::cube_type() == half::bf16::cube_type();
        if routes(client, bf16, (q, k, v), (o, lse), options) {
            let causal = causal_argument(options);
            return forward_into(client, (q, k, v), (o, lse), options.scale, causal);
        }
    }
    let (cu, nseg, varlen, _keep) = cu_buffer(client, options);
    let tensor_cores = use_tensor_cores::<F>(client, kernel, &[("q", q), ("k", k), ("v", v)])?;
    let segments = Segments {
        cu,
        nseg,
        varlen,
        counted: false,
    };
    launch_forward::<F>(
        client,
        &g,
        (q, k, v),
        (o, lse),
        options,
        tensor_cores,
        segments,
    );
    Ok(())
}

/// What a forward kernel's `cu` buffer holds: packed sequences' boundaries
/// (`varlen`), a key count (`counted`, see [`kernels::counted_keys`]), or nothing.
struct Segments {
    cu: BufferArg,
    nseg: u32,
    varlen: bool,
    counted: bool,
}

/// Launches the forward kernel (`tensor_cores`: the tensor-core one, else the scalar
/// one) on checked tensors.
fn launch_forward<F: Float + CubeElement>(
    client: &Client,
    g: &Geometry,
    (q, k, v): (&DeviceTensor, &DeviceTensor, &DeviceTensor),
    (o, lse): (&DeviceTensor, &DeviceTensor),
    options: &FlashOptions,
    tensor_cores: bool,
    segments: Segments,
) {
    let Segments {
        cu,
        nseg,
        varlen,
        counted,
    } = segments;
    if tensor_cores {
        let t = tc_forward_tiles(client, g.d, g.sq, g.b * g.hq);
        flash_tc_forward_kernel::launch::<F>(
            client,
            CubeCount::Static(
                g.sq.div_ceil(16 * t.fwd_m_tiles * t.fwd_warps) as u32,
                (g.b * g.hq) as u32,
                1,
            ),
            CubeDim::new_2d(32, t.fwd_warps as u32),
            8,
            q.arg(),
            k.arg(),
            v.arg(),
            o.arg(),
            lse.arg(),
            cu,
            nseg,
            options.scale,
            options.q_offset as u32,
            options.k_offset as u32,
            options.causal,
            varlen,
            g.d,
            t.fwd_warps,
            t.fwd_block_k,
            t.fwd_m_tiles,
            t.fwd_late_prefetch,
            t.fwd_q_shared,
            counted,
            tc_async_copy(),
            tc_lazy_rescale(),
            tc_fold_scale(),
        );
        return;
    }
    let block_k = tile_rows(client, g.d, 0);
    flash_forward_kernel::launch::<F>(
        client,
        CubeCount::Static(g.sq.div_ceil(UNITS) as u32, (g.b * g.hq) as u32, 1),
        CubeDim::new_1d(UNITS as u32),
        q.arg(),
        k.arg(),
        v.arg(),
        o.arg(),
        lse.arg(),
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
        counted,
    );
}

/// Whether the tensor-core forward, dQ and dK/dV kernels stage their streamed tiles
/// (K/V, Q/dO) with `cp.async` (the default) rather than through registers
/// (`LONGVIEW_FLASH_ASYNC_COPY=0`, for A/B timing).
fn tc_async_copy() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| crate::env_switch::switch("LONGVIEW_FLASH_ASYNC_COPY", true))
}

/// Whether the tensor-core forward skips rescaling a row block's output accumulators
/// when no row of it has a new running maximum (the factor is then exactly 1;
/// `LONGVIEW_FLASH_LAZY_RESCALE=1`) rather than rescaling after every key tile. Off by
/// default: it passed the f64 checks on an H100 but timed no faster (2026-12-07,
/// `benchmarks/flash_attention.md`); kept for A/B runs.
fn tc_lazy_rescale() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| crate::env_switch::switch("LONGVIEW_FLASH_LAZY_RESCALE", false))
}

/// Whether the tensor-core forward applies the softmax scale inside the exponential's
/// argument by a fused multiply-add (`LONGVIEW_FLASH_FOLD_SCALE=1`) rather than
/// multiplying every score before the mask and the row maximum. Off by default for the
/// same reason as [`tc_lazy_rescale`].
fn tc_fold_scale() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| crate::env_switch::switch("LONGVIEW_FLASH_FOLD_SCALE", false))
}

/// The forward (`inner`: tensor-core or scalar) over the keys of `k` and `v` that a
/// device-held count says are filled: batch entry `b` holds rows `[k_offset + b Sk,
/// k_offset + (b + 1) Sk)` of a buffer whose first `keys[0]` rows are keys
/// ([`kernels::counted_keys`]). No mask. For `decode_tc`'s captured decoding steps.
#[allow(clippy::too_many_arguments)]
fn forward_counted<F: Float + CubeElement>(
    client: &Client,
    (q, k, v): (&DeviceTensor, &DeviceTensor, &DeviceTensor),
    (o, lse): (&DeviceTensor, &DeviceTensor),
    keys: &DeviceTensor,
    options: &FlashOptions,
    inner: FlashKernel,
) -> Result<(), AttnError> {
    let g = check(q, k, v, options)?;
    check_outputs(&g, q, o, lse)?;
    let tensors = [("q", q), ("k", k), ("v", v)];
    let tensor_cores = match inner {
        FlashKernel::Scalar => false,
        FlashKernel::TensorCore => use_tensor_cores::<F>(client, inner, &tensors)?,
        other => {
            return Err(AttnError::Options(format!(
                "counted slices run the tensor-core or scalar forward, not {other:?}"
            )));
        }
    };
    let segments = Segments {
        // SAFETY: `keys` is a u32 buffer of one element (checked by the callers).
        cu: unsafe { BufferArg::from_raw_parts(keys.handle.clone(), 1) },
        nseg: 1,
        varlen: false,
        counted: true,
    };
    launch_forward::<F>(
        client,
        &g,
        (q, k, v),
        (o, lse),
        options,
        tensor_cores,
        segments,
    );
    Ok(())
}

/// Merges `(o_b, lse_b)` into `(o_a, lse_a)` in place (ring attention's running
/// result): the softmax-weighted combination of two attention results over disjoint
/// key sets.
pub fn merge_partials<F: Float + CubeElement>(
    client: &Client,
    o_a: &DeviceTensor,
    lse_a: &DeviceTensor,
    o_b: &DeviceTensor,
    lse_b: &DeviceTensor,
) -> Result<(), AttnError> {
    let [b, h, s, d] = dims("o_a", o_a)?;
    if o_b.shape != o_a.shape || lse_a.shape != [b, h, s] || lse_b.shape != [b, h, s] {
        return Err(AttnError::Shape(format!(
            "merge: o {:?} / {:?}, lse {:?} / {:?} disagree",
            o_a.shape, o_b.shape, lse_a.shape, lse_b.shape
        )));
    }
    let rows = b * h * s;
    merge_kernel::launch::<F>(
        client,
        CubeCount::Static(rows.div_ceil(UNITS) as u32, 1, 1),
        CubeDim::new_1d(UNITS as u32),
        o_a.arg(),
        lse_a.arg(),
        o_b.arg(),
        lse_b.arg(),
        d,
    );
    Ok(())
}
