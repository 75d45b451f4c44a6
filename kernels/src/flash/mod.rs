//! Host side of the flash-attention kernels: shape checks with clear errors, tile
//! sizes from the device's shared-memory limit, launches.
//!
//! Layout: q `[B, Hq, Sq, D]`, k and v `[B, Hkv, Sk, D]` (any strides), o like q,
//! lse `[B, Hq, Sq]` f32 (natural log, of the scaled scores). `Hkv` must divide `Hq`
//! (grouped-query attention: query head `h` uses kv head `h / (Hq / Hkv)`).

mod decode;
mod kernels;
mod tensor_core;

pub use decode::DECODE_MAX_ROWS;

use cubecl::prelude::*;
use cubecl::server::Handle;

pub use kernels::NO_KEYS;
use kernels::{
    flash_delta_kernel, flash_dkdv_kernel, flash_dq_kernel, flash_forward_kernel, merge_kernel,
};
use tensor_core::{flash_tc_dkdv_kernel, flash_tc_dq_kernel, flash_tc_forward_kernel};

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

/// A tensor on a cubecl device: buffer, shape, strides (in elements).
#[derive(Clone, Debug)]
pub struct DeviceTensor {
    pub handle: Handle,
    pub shape: Vec<usize>,
    pub strides: Vec<usize>,
}

/// A 2-D grid of 256-unit cubes covering `n` elements (the y axis past 65,535 cubes).
fn elementwise_cubes(n: usize) -> CubeCount {
    let cubes = n.div_ceil(256);
    let (x, y) = if cubes > 65535 {
        (65535, cubes.div_ceil(65535))
    } else {
        (cubes, 1)
    };
    CubeCount::Static(x as u32, y as u32, 1)
}

fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}

impl DeviceTensor {
    /// Uploads `data` as a contiguous tensor of `shape`.
    pub fn from_slice<E: CubeElement>(client: &Client, data: &[E], shape: &[usize]) -> Self {
        assert_eq!(
            data.len(),
            shape.iter().product::<usize>(),
            "data length does not match shape {shape:?}"
        );
        DeviceTensor {
            handle: client.create_from_slice(E::as_bytes(data)),
            shape: shape.to_vec(),
            strides: contiguous_strides(shape),
        }
    }

    /// A contiguous tensor with every element set to `value` (tests poison outputs
    /// with NaN so that an element a kernel forgets to write is caught).
    pub fn filled<E: CubeElement>(client: &Client, value: E, shape: &[usize]) -> Self {
        let n = shape.iter().product::<usize>();
        Self::from_slice(client, &vec![value; n], shape)
    }

    /// A contiguous tensor of `shape` with every element set to `value` by a kernel on
    /// the device (no host buffer, no upload: this is how the kernels' outputs start,
    /// as NaN, so that an element a kernel forgets to write never passes as a value).
    pub fn poisoned<E: Float + CubeElement>(client: &Client, value: f32, shape: &[usize]) -> Self {
        let n = shape.iter().product::<usize>();
        let handle = client.empty((n * std::mem::size_of::<E>()).max(1));
        if n > 0 {
            kernels::fill_kernel::launch::<E>(
                client,
                elementwise_cubes(n),
                CubeDim::new_1d(256),
                unsafe { BufferArg::from_raw_parts(handle.clone(), n) },
                value,
            );
        }
        DeviceTensor {
            handle,
            shape: shape.to_vec(),
            strides: contiguous_strides(shape),
        }
    }

    /// A contiguous tensor of `shape` whose contents are undefined until a kernel
    /// writes every element (scratch buffers that are written whole).
    fn uninitialized<E: CubeElement>(client: &Client, shape: &[usize]) -> Self {
        let n = shape.iter().product::<usize>();
        DeviceTensor {
            handle: client.empty((n * std::mem::size_of::<E>()).max(1)),
            shape: shape.to_vec(),
            strides: contiguous_strides(shape),
        }
    }

    /// Reads a contiguous tensor back.
    pub fn to_vec<E: CubeElement>(&self, client: &Client) -> Result<Vec<E>, AttnError> {
        let bytes = client
            .read_one(self.handle.clone())
            .map_err(|e| AttnError::Read(format!("{e:?}")))?;
        let n = self.shape.iter().product::<usize>();
        let values = E::from_bytes(&bytes);
        if values.len() < n {
            return Err(AttnError::Read(format!(
                "buffer holds {} elements, shape {:?} needs {n}",
                values.len(),
                self.shape
            )));
        }
        Ok(values[..n].to_vec())
    }

    fn arg(&self) -> TensorArg {
        unsafe {
            TensorArg::from_raw_parts(
                self.handle.clone(),
                self.strides.clone().into(),
                self.shape.clone().into(),
            )
        }
    }
}

/// Softmax scale, causal mask and its offsets, packed sequences.
#[derive(Clone, Debug, PartialEq)]
pub struct FlashOptions {
    pub scale: f32,
    pub causal: bool,
    /// Global position of the first query row (ring attention: the rank's block start).
    pub q_offset: usize,
    /// Global position of the first key row.
    pub k_offset: usize,
    /// Packed variable-length sequences: boundaries `[0, s1, ..., S]` over the
    /// sequence axis (B = 1, Sq == Sk, offsets 0); no attention across sequences.
    pub cu_seqlens: Option<Vec<u32>>,
}

impl FlashOptions {
    /// `scale = 1 / sqrt(head_dim)`, not causal.
    pub fn new(head_dim: usize) -> Self {
        FlashOptions {
            scale: 1.0 / (head_dim as f32).sqrt(),
            causal: false,
            q_offset: 0,
            k_offset: 0,
            cu_seqlens: None,
        }
    }

    pub fn causal(mut self, causal: bool) -> Self {
        self.causal = causal;
        self
    }

    pub fn offsets(mut self, q_offset: usize, k_offset: usize) -> Self {
        self.q_offset = q_offset;
        self.k_offset = k_offset;
        self
    }

    pub fn packed(mut self, cu_seqlens: Vec<u32>) -> Self {
        self.cu_seqlens = Some(cu_seqlens);
        self
    }
}

/// Checked geometry of one call.
struct Geometry {
    b: usize,
    hq: usize,
    hkv: usize,
    sq: usize,
    sk: usize,
    d: usize,
}

fn dims(name: &str, t: &DeviceTensor) -> Result<[usize; 4], AttnError> {
    if t.shape.len() != 4 || t.strides.len() != 4 {
        return Err(AttnError::Shape(format!(
            "{name} must be [batch, heads, seq, head_dim], got shape {:?}",
            t.shape
        )));
    }
    Ok([t.shape[0], t.shape[1], t.shape[2], t.shape[3]])
}

fn check(
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    options: &FlashOptions,
) -> Result<Geometry, AttnError> {
    let [b, hq, sq, d] = dims("q", q)?;
    let [bk, hkv, sk, dk] = dims("k", k)?;
    let vd = dims("v", v)?;
    if vd != [bk, hkv, sk, dk] {
        return Err(AttnError::Shape(format!(
            "v {:?} must match k {:?}",
            v.shape, k.shape
        )));
    }
    if bk != b || dk != d {
        return Err(AttnError::Shape(format!(
            "q {:?} and k {:?} differ in batch or head_dim",
            q.shape, k.shape
        )));
    }
    if hkv == 0 || hq % hkv != 0 {
        return Err(AttnError::Shape(format!(
            "{hkv} kv heads must divide {hq} query heads"
        )));
    }
    if d == 0 || d > MAX_HEAD_DIM {
        return Err(AttnError::Shape(format!(
            "head_dim {d} unsupported (1 to {MAX_HEAD_DIM})"
        )));
    }
    if b == 0 || sq == 0 || sk == 0 {
        return Err(AttnError::Shape(format!(
            "empty input: q {:?}, k {:?}",
            q.shape, k.shape
        )));
    }
    if !options.scale.is_finite() || options.scale <= 0.0 {
        return Err(AttnError::Options(format!(
            "scale {} must be positive and finite",
            options.scale
        )));
    }
    let limit = u32::MAX as usize / 2;
    if options.q_offset + sq > limit || options.k_offset + sk > limit {
        return Err(AttnError::Options("offsets beyond 2^31 positions".into()));
    }
    if let Some(cu) = &options.cu_seqlens {
        if b != 1 || sq != sk || options.q_offset != 0 || options.k_offset != 0 {
            return Err(AttnError::Options(format!(
                "packed sequences need batch 1, Sq == Sk and zero offsets (batch {b}, Sq {sq}, Sk {sk}, offsets {} / {})",
                options.q_offset, options.k_offset
            )));
        }
        if cu.len() < 2
            || cu[0] != 0
            || cu.windows(2).any(|w| w[0] > w[1])
            || *cu.last().expect("len >= 2") as usize != sq
        {
            return Err(AttnError::Options(format!(
                "cu_seqlens {cu:?} must rise from 0 to the sequence length {sq}"
            )));
        }
    }
    Ok(Geometry {
        b,
        hq,
        hkv,
        sq,
        sk,
        d,
    })
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

/// Tile sizes of the tensor-core kernels: planes per cube of the forward / dQ
/// (16 query rows each), keys per shared tile of the forward and of dQ, planes per
/// cube of dK/dV (16 key rows each) and query rows per tile of dK/dV.
/// `LONGVIEW_FLASH_TILES="fw,fk,qk,kw,kq"` overrides them (benchmark exploration).
#[derive(Clone, Copy, Debug)]
struct TcTiles {
    fwd_warps: usize,
    fwd_block_k: usize,
    dq_block_k: usize,
    dkdv_warps: usize,
    dkdv_block_q: usize,
}

impl TcTiles {
    /// Shared-memory bytes of the largest of the three kernels at head dim `d`
    /// (rows of `padded + 8` 16-bit elements; two f32 per dK/dV query row).
    fn shared_bytes(&self, d: usize) -> usize {
        // K/V (forward, dQ) and Q/dO/LSE/delta (dK/dV) tiles are double-buffered.
        let row = (d.div_ceil(16) * 16 + 8) * 2;
        let fwd =
            (self.fwd_warps * 16).max(2 * self.fwd_block_k) * row + 2 * self.fwd_block_k * row;
        let dq = 2 * (self.fwd_warps * 16).max(2 * self.dq_block_k) * row;
        // dK/dV also holds the fused dQ's dS tile (block_q x (keys + 8) elements).
        let dkdv = 2 * self.dkdv_warps * 16 * row
            + 4 * self.dkdv_block_q * (row + 4)
            + self.dkdv_block_q * (self.dkdv_warps * 16 + 8) * 2;
        fwd.max(dq).max(dkdv)
    }

    /// These tiles, shrunk until the kernels fit in `budget` bytes of shared memory
    /// (and dK/dV's query tile is at most its unit count: one LSE row per unit).
    fn fitting(mut self, d: usize, budget: usize) -> TcTiles {
        while self.dkdv_block_q > 32 * self.dkdv_warps && self.dkdv_block_q > 16 {
            self.dkdv_block_q /= 2;
        }
        while self.shared_bytes(d) > budget {
            if self.dkdv_block_q > 16 {
                self.dkdv_block_q /= 2;
            } else if self.fwd_warps > 1 || self.dkdv_warps > 1 {
                self.fwd_warps = (self.fwd_warps / 2).max(1);
                self.dkdv_warps = (self.dkdv_warps / 2).max(1);
            } else if self.fwd_block_k > 16 || self.dq_block_k > 16 {
                self.fwd_block_k = (self.fwd_block_k / 2).max(16);
                self.dq_block_k = (self.dq_block_k / 2).max(16);
            } else {
                break;
            }
        }
        self
    }
}

fn tc_tiles(client: &Client, d: usize) -> TcTiles {
    let budget = client.properties().hardware.max_shared_memory_size;
    tc_tiles_requested().fitting(d, budget)
}

fn tc_tiles_requested() -> TcTiles {
    // Chosen by a sweep on an H100 (B1 H16 S32768 D128 causal bf16,
    // benchmarks/flash_attention.md).
    let default = TcTiles {
        fwd_warps: 8,
        fwd_block_k: 64,
        dq_block_k: 32,
        dkdv_warps: 8,
        dkdv_block_q: 32,
    };
    let Ok(text) = std::env::var("LONGVIEW_FLASH_TILES") else {
        return default;
    };
    let v: Vec<usize> = text
        .split(',')
        .filter_map(|x| x.trim().parse().ok())
        .collect();
    let ok = v.len() == 5
        && v.iter().all(|&x| x > 0)
        && v[1] % 16 == 0
        && v[2] % 16 == 0
        && v[4] % 16 == 0;
    if !ok {
        eprintln!(
            "LONGVIEW_FLASH_TILES={text:?} ignored: want 5 positive numbers fw,fk,qk,kw,kq with fk, qk, kq multiples of 16"
        );
        return default;
    }
    TcTiles {
        fwd_warps: v[0],
        fwd_block_k: v[1],
        dq_block_k: v[2],
        dkdv_warps: v[3],
        dkdv_block_q: v[4],
    }
}

/// Largest head dimension of the tensor-core kernels (registers per lane).
pub const TC_MAX_HEAD_DIM: usize = 128;

/// Why the tensor-core kernels cannot run on these tensors, or `None` when they can:
/// the element type needs `mma` m16n8k16 and `ldmatrix` on the device (f16/bf16, CUDA
/// sm_80+), the head dim a multiple of 8 up to [`TC_MAX_HEAD_DIM`], every tensor
/// unit-stride along the head dim with other strides multiples of 8 (16-byte loads).
pub fn tensor_cores_unsupported<F: Float + CubeElement>(
    client: &Client,
    tensors: &[(&str, &DeviceTensor)],
) -> Option<String> {
    let elem = F::cube_type();
    if F::size_bits() != 16 {
        return Some(format!("{elem:?} is not a 16-bit float"));
    }
    let features = &client.features().matmul;
    let mma = cubecl::ir::features::MmaConfig {
        a_type: elem,
        b_type: elem,
        cd_type: f32::cube_type(),
        m: 16,
        n: 8,
        k: 16,
    };
    if !features.mma.contains(&mma) {
        return Some(format!("the device has no mma m16n8k16 for {elem:?}"));
    }
    if !features.ldmatrix.contains(&elem) {
        return Some(format!("the device has no ldmatrix for {elem:?}"));
    }
    let d = tensors
        .first()
        .and_then(|t| t.1.shape.last().copied())
        .unwrap_or(0);
    if d % 8 != 0 || d > TC_MAX_HEAD_DIM {
        return Some(format!(
            "head_dim {d} (needs a multiple of 8 up to {TC_MAX_HEAD_DIM})"
        ));
    }
    for &(name, t) in tensors {
        if t.strides.len() != 4 || t.strides[3] != 1 || t.strides[..3].iter().any(|s| s % 8 != 0) {
            return Some(format!(
                "{name} strides {:?} (needs unit stride along head_dim, others multiples of 8)",
                t.strides
            ));
        }
    }
    None
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
    // NaN until written: a row a kernel skipped shows up instead of passing as 0.
    let o = DeviceTensor::poisoned::<F>(client, f32::NAN, &[g.b, g.hq, g.sq, g.d]);
    let lse = DeviceTensor::poisoned::<f32>(client, f32::NAN, &[g.b, g.hq, g.sq]);
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
    if o.shape != q.shape || lse.shape != [g.b, g.hq, g.sq] {
        return Err(AttnError::Shape(format!(
            "outputs o {:?} / lse {:?} must be {:?} / {:?}",
            o.shape,
            lse.shape,
            q.shape,
            [g.b, g.hq, g.sq]
        )));
    }
    if kernel == FlashKernel::Decode
        || (kernel == FlashKernel::Auto && decode::applies(&g, options))
    {
        return decode::forward::<F>(client, &g, q, k, v, o, lse, options);
    }
    let (cu, nseg, varlen, _keep) = cu_buffer(client, options);
    if use_tensor_cores::<F>(client, kernel, &[("q", q), ("k", k), ("v", v)])? {
        let t = tc_tiles(client, g.d);
        flash_tc_forward_kernel::launch::<F>(
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
        );
        return Ok(());
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
    );
    Ok(())
}

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
    let delta = DeviceTensor::poisoned::<f32>(client, f32::NAN, &[g.b, g.hq, g.sq]);
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
    let dq = DeviceTensor::poisoned::<F>(client, f32::NAN, &q.shape);
    let dk = DeviceTensor::poisoned::<F>(client, f32::NAN, &k.shape);
    let dv = DeviceTensor::poisoned::<F>(client, f32::NAN, &v.shape);
    let tensors = [("q", q), ("k", k), ("v", v), ("dO", d_o)];
    if use_tensor_cores::<F>(client, kernel, &tensors)? {
        let t = tc_tiles(client, g.d);
        // Fused dQ (atomics from the dK/dV kernel) when its planes split the dQ tile
        // evenly: LONGVIEW_FLASH_FUSED_DQ=0 turns it off (benchmarks).
        let od = g.d.div_ceil(16) * 2;
        let row_blocks = t.dkdv_block_q / 16;
        let fuse = std::env::var("LONGVIEW_FLASH_FUSED_DQ").map_or(true, |v| v != "0")
            && t.dkdv_warps % row_blocks == 0
            && od % (t.dkdv_warps / row_blocks) == 0
            && (od / (t.dkdv_warps / row_blocks)) % 2 == 0;
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
                kernels::scale_cast_kernel::launch::<F>(
                    client,
                    elementwise_cubes(dq_acc.shape.iter().product()),
                    CubeDim::new_1d(256),
                    unsafe {
                        BufferArg::from_raw_parts(
                            dq_acc.handle.clone(),
                            dq_acc.shape.iter().product(),
                        )
                    },
                    unsafe {
                        BufferArg::from_raw_parts(dq.handle.clone(), dq.shape.iter().product())
                    },
                    options.scale,
                );
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
