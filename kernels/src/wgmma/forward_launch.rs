//! Host side of the wgmma flash forward ([`super::forward`]): the shape and layout checks,
//! when [`crate::flash::flash_forward`] hands a call to it ([`routes`]), and the launch.

use cubecl::prelude::*;

use super::forward::{HEAD_DIM, ROWS_A_CUBE, forward_kernel};
use crate::{AttnError, DeviceTensor, FlashOptions};

/// Shape of one [`forward`] call: `[batch, heads, seq, head_dim]` bf16 inputs, `kv_heads`
/// dividing `heads`, `head_dim` one [`head_dim_supported`] accepts; causal: query `i` sees
/// keys `j <= i` (for other alignments, [`forward_into`]).
#[derive(Clone, Copy, Debug)]
pub struct ForwardShape {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub seq_q: usize,
    pub seq_k: usize,
    pub head_dim: usize,
    pub causal: bool,
}

/// The head dims the wgmma kernels take: multiples of 8 from 64 to 128. Below 128 the
/// tiles keep their 128-column layout with the columns past `head_dim` zero; the score
/// products go only 64 or 80 deep where the head dim allows, the others stay 128 wide
/// (at SigLIP's 72: `P V` and the gradient products do 1.78x the useful work).
pub fn head_dim_supported(head_dim: usize) -> bool {
    head_dim.is_multiple_of(8) && (64..=HEAD_DIM).contains(&head_dim)
}

/// Why the kernel cannot read or write these tensors as laid out (`None`: it can): Q, K, V
/// and O need unit stride along the head dimension, other strides a multiple of 8 elements
/// (16 bytes: each copy moves 16 aligned bytes) that fit in 32 bits, and a start 16-byte
/// aligned; LSE must be contiguous.
pub fn layout_unsupported(
    tensors: [(&str, &DeviceTensor); 4],
    lse: &DeviceTensor,
) -> Option<String> {
    for (name, t) in tensors {
        let start = t.handle.offset_start.unwrap_or(0);
        if t.strides.len() != 4 || t.strides[3] != 1 {
            return Some(format!(
                "{name} has strides {:?} (the head dim must be contiguous)",
                t.strides
            ));
        }
        if t.strides[..3]
            .iter()
            .any(|&s| s % 8 != 0 || s > u32::MAX as usize)
        {
            return Some(format!(
                "{name} has strides {:?} (multiples of 8 needed)",
                t.strides
            ));
        }
        if start % 16 != 0 {
            return Some(format!(
                "{name} starts at byte {start} (16-byte alignment needed)"
            ));
        }
    }
    match lse.shape[..] {
        [_, h, s] if lse.strides == [h * s, s, 1] => None,
        _ => Some(format!(
            "lse (shape {:?}, strides {:?}) is not contiguous",
            lse.shape, lse.strides
        )),
    }
}

/// The kernels' strides argument: the (batch, head, row) element strides of four
/// `[batch, heads, seq, head_dim]` tensors, in order.
pub(super) fn stride_table(tensors: [&DeviceTensor; 4]) -> Vec<u32> {
    tensors
        .iter()
        .flat_map(|t| t.strides[..3].iter().map(|&s| s as u32))
        .collect()
}

/// How many elements from its start a strided tensor's binding may address.
pub(super) fn element_extent(t: &DeviceTensor) -> usize {
    1 + t
        .shape
        .iter()
        .zip(&t.strides)
        .map(|(&n, &s)| (n.max(1) - 1) * s)
        .sum::<usize>()
}

/// Whether [`crate::flash::flash_forward`] (kernel `Auto`) runs a call on this kernel: a
/// CUDA device of compute capability 9.0 compiling kernels with the LLVM backend
/// (`CUBECL_CUDA_CPP_KERNELS` unset), bf16, a head dim [`head_dim_supported`] accepts
/// (the same for Q, K and V), no packed sequences, causal where the query and key blocks
/// start at the same position with as many rows (and, with [`shifted_enabled`], where the
/// queries start at or after their keys: [`causal_shift`]), and a layout
/// [`layout_unsupported`] accepts. `LONGVIEW_FLASH_WGMMA=0` turns it off (the `mma.sync`
/// kernel then runs).
pub fn routes(
    client: &Client,
    bf16: bool,
    (q, k, v): (&DeviceTensor, &DeviceTensor, &DeviceTensor),
    (o, lse): (&DeviceTensor, &DeviceTensor),
    options: &FlashOptions,
) -> bool {
    if std::env::var("LONGVIEW_FLASH_WGMMA").is_ok_and(|v| v == "0")
        || std::env::var_os("CUBECL_CUDA_CPP_KERNELS").is_some()
        || client.properties().identity.fingerprint != "ptx_sm90"
    {
        return false;
    }
    if q.shape.len() != 4 || k.shape.len() != 4 {
        return false;
    }
    let (sq, sk) = (q.shape[2], k.shape[2]);
    let causal_taken = match causal_shift(options) {
        _ if !options.causal => true,
        Some(0) if sq == sk => true,
        Some(_) => shifted_enabled(),
        None => false,
    };
    bf16 && head_dim_supported(q.shape[3])
        && k.shape.get(3) == Some(&q.shape[3])
        && options.cu_seqlens.is_none()
        && causal_taken
        && sq > 0
        && sk > 0
        && layout_unsupported([("q", q), ("k", k), ("v", v), ("o", o)], lse).is_none()
}

/// Whether causal calls other than a sequence against itself (a prefill chunk against its
/// KV cache, the causal ring's later blocks: queries after their keys' block, or lengths
/// apart) take the wgmma kernels: yes unless `LONGVIEW_FLASH_WGMMA_SHIFTED=0`, which sends
/// them to the `mma.sync` kernels (for an A/B). On since session 34, after their f64
/// checks (`check::check_forward_shifted`, `check_backward::check_backward_shifted`)
/// passed on an H100.
pub fn shifted_enabled() -> bool {
    std::env::var("LONGVIEW_FLASH_WGMMA_SHIFTED").map_or(true, |v| v != "0")
}

/// How many keys past its own position a causal query sees, `q_offset - k_offset` (0 for a
/// sequence against itself, the cached length for a prefill chunk against its KV cache);
/// `None` when the queries' block starts before the keys' (some rows would see no key,
/// which the kernel does not handle).
pub fn causal_shift(options: &FlashOptions) -> Option<usize> {
    options.q_offset.checked_sub(options.k_offset)
}

/// The kernels' `causal` argument for a call [`routes`] accepted: `Some(shift)` when
/// causal ([`causal_shift`]), `None` for full attention.
pub fn causal_argument(options: &FlashOptions) -> Option<usize> {
    if options.causal {
        causal_shift(options)
    } else {
        None
    }
}

/// Launches the forward into `o` (like `q`) and `lse` (`[batch, heads, seq_q]` f32, natural
/// log) for bf16 `q` `[batch, heads, seq_q, head_dim]` and `k`, `v` `[batch, kv_heads,
/// seq_k, head_dim]` (any layout [`layout_unsupported`] accepts, a head dim
/// [`head_dim_supported`] accepts), scores scaled by `scale`; `causal = Some(shift)`: query
/// row `i` sees keys `j <= i + shift` ([`causal_shift`]), `None`: every key. Needs a CUDA
/// device of compute capability 9.0.
pub fn forward_into(
    client: &Client,
    (q, k, v): (&DeviceTensor, &DeviceTensor, &DeviceTensor),
    (o, lse): (&DeviceTensor, &DeviceTensor),
    scale: f32,
    causal: Option<usize>,
) -> Result<(), AttnError> {
    let dims = |t: &DeviceTensor, name: &str| -> Result<[usize; 4], AttnError> {
        match t.shape[..] {
            [a, b, c, d] if head_dim_supported(d) => Ok([a, b, c, d]),
            _ => Err(AttnError::Shape(format!(
                "wgmma forward: {name} has shape {:?}, expected [batch, heads, seq, head_dim] \
                 with head_dim a multiple of 8 from 64 to {HEAD_DIM}",
                t.shape
            ))),
        }
    };
    let [batch, heads, seq_q, head_dim] = dims(q, "q")?;
    let [kb, kv_heads, seq_k, _] = dims(k, "k")?;
    if kb != batch
        || k.shape[3] != head_dim
        || v.shape != k.shape
        || o.shape != q.shape
        || lse.shape != [batch, heads, seq_q]
    {
        return Err(AttnError::Shape(format!(
            "wgmma forward: shapes q {:?} k {:?} v {:?} o {:?} lse {:?} do not agree",
            q.shape, k.shape, v.shape, o.shape, lse.shape
        )));
    }
    if kv_heads == 0 || heads % kv_heads != 0 {
        return Err(AttnError::Shape(format!(
            "wgmma forward: {kv_heads} kv heads do not divide {heads} query heads"
        )));
    }
    let shift = causal.unwrap_or(0);
    if shift > u32::MAX as usize {
        return Err(AttnError::Options(format!(
            "wgmma forward: causal shift {shift} does not fit in 32 bits"
        )));
    }
    if let Some(why) = layout_unsupported([("q", q), ("k", k), ("v", v), ("o", o)], lse) {
        return Err(AttnError::Shape(format!("wgmma forward: {why}")));
    }
    if seq_q == 0 || batch * heads == 0 {
        return Ok(());
    }
    let strides = stride_table([q, k, v, o]);
    let strides_handle = client.create_from_slice(u32::as_bytes(&strides));
    unsafe {
        forward_kernel::launch(
            client,
            CubeCount::Static(
                seq_q.div_ceil(ROWS_A_CUBE) as u32,
                (batch * heads) as u32,
                1,
            ),
            CubeDim::new_1d(256),
            BufferArg::from_raw_parts(q.handle.clone(), element_extent(q).div_ceil(2)),
            BufferArg::from_raw_parts(k.handle.clone(), element_extent(k).div_ceil(2)),
            BufferArg::from_raw_parts(v.handle.clone(), element_extent(v).div_ceil(2)),
            BufferArg::from_raw_parts(o.handle.clone(), element_extent(o)),
            BufferArg::from_raw_parts(lse.handle.clone(), batch * heads * seq_q),
            BufferArg::from_raw_parts(strides_handle.clone(), strides.len()),
            seq_q as u32,
            seq_k as u32,
            heads as u32,
            (heads / kv_heads) as u32,
            scale,
            shift as u32,
            causal.is_some(),
            head_dim,
        );
    }
    drop(strides_handle);
    Ok(())
}

/// O (`[batch, heads, seq_q, head_dim]` bf16) and LSE (`[batch, heads, seq_q]` f32, natural
/// log) of softmax(Q K^T / sqrt(head_dim)) V for contiguous or strided inputs, into new
/// (NaN-poisoned) outputs. Needs a CUDA device of compute capability 9.0.
pub fn forward(
    client: &Client,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    shape: ForwardShape,
) -> Result<(DeviceTensor, DeviceTensor), AttnError> {
    let ForwardShape {
        batch,
        heads,
        kv_heads,
        seq_q,
        seq_k,
        head_dim,
        causal,
    } = shape;
    let expect = |t: &DeviceTensor, name: &str, dims: [usize; 4]| {
        if t.shape != dims {
            return Err(AttnError::Shape(format!(
                "wgmma forward: {name} has shape {:?}, expected {dims:?}",
                t.shape
            )));
        }
        Ok(())
    };
    expect(q, "q", [batch, heads, seq_q, head_dim])?;
    expect(k, "k", [batch, kv_heads, seq_k, head_dim])?;
    expect(v, "v", [batch, kv_heads, seq_k, head_dim])?;
    let o =
        DeviceTensor::poisoned::<half::bf16>(client, f32::NAN, &[batch, heads, seq_q, head_dim]);
    let lse = DeviceTensor::poisoned::<f32>(client, f32::NAN, &[batch, heads, seq_q]);
    let scale = 1.0 / (head_dim as f32).sqrt();
    forward_into(client, (q, k, v), (&o, &lse), scale, causal.then_some(0))?;
    Ok((o, lse))
}
