//! What a call asks for ([`FlashOptions`]: scale, causal mask and offsets, packed
//! sequences) and the shape checks every launch runs first, with errors that name
//! the tensor and the numbers.

use super::{AttnError, DeviceTensor, MAX_HEAD_DIM};

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
    /// How the split-key decode kernel runs (A/B settings until measured).
    pub decode: DecodeTuning,
}

/// Settings of the decode kernels, kept for A/B timing. The defaults were chosen by
/// `flash_bench --decode` on an H100 (`benchmarks/flash_attention.md`, 2026-12-06);
/// the environment overrides them, read once per process ([`DecodeTuning::from_env`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DecodeTuning {
    /// Inner loops unrolled (the default; `LONGVIEW_DECODE_UNROLL=0` keeps loops).
    pub unroll: bool,
    /// Units (threads) per cube: a power of two from 32 to 1024, at least the rows a
    /// kv head; `None`, 128. More units split a tile's scores and P V over more
    /// threads (a GRPO group has 5x one row's work a tile). `LONGVIEW_DECODE_UNITS`;
    /// a value that is not a number becomes 0, which the launch refuses by name.
    pub units: Option<usize>,
    /// The next key tile loaded while the current one is computed
    /// (`LONGVIEW_DECODE_PREFETCH=1`); by default it is loaded after the tile's work,
    /// which `flash_bench --decode` measured 1-6% faster in 10 of its 12 shapes on an
    /// H100 (the prefetch holds a second tile in registers).
    pub prefetch: bool,
    /// Whether decoding steps that qualify run on the tensor-core forward with the
    /// keys sliced into the batch (`decode_tc`) instead of the split-key kernel, where
    /// the device has tensor cores. `None` (the default): when the step's query heads
    /// fold into its kv heads' rows by a view (any contiguous q; one position of any
    /// layout), or else from [`super::DECODE_TC_MIN_ROWS`] query rows a kv head, up
    /// to the decode kernels' [`super::DECODE_MAX_ROWS`] (both measured crossovers,
    /// `benchmarks/flash_attention.md`); `Some(_)` forces it either way for those
    /// calls (`LONGVIEW_DECODE_TENSOR_CORES=1` / `=0`).
    pub tensor_cores: Option<bool>,
    /// Key slices of a decoding step, fixed (`LONGVIEW_DECODE_SPLITS=N`, a positive
    /// number; tests and benchmarks), for the split-key kernels and the sliced
    /// tensor-core path alike; `None`: about two cubes per multiprocessor.
    pub splits: Option<usize>,
}

impl DecodeTuning {
    /// The environment's settings, read on the first call.
    pub fn from_env() -> DecodeTuning {
        static TUNING: std::sync::OnceLock<DecodeTuning> = std::sync::OnceLock::new();
        *TUNING.get_or_init(|| {
            let on = |name: &str| crate::env_switch::switch(name, true);
            DecodeTuning {
                unroll: on("LONGVIEW_DECODE_UNROLL"),
                units: std::env::var("LONGVIEW_DECODE_UNITS")
                    .ok()
                    .map(|v| v.trim().parse().unwrap_or(0)),
                prefetch: crate::env_switch::switch("LONGVIEW_DECODE_PREFETCH", false),
                tensor_cores: crate::env_switch::optional_switch("LONGVIEW_DECODE_TENSOR_CORES"),
                splits: std::env::var("LONGVIEW_DECODE_SPLITS")
                    .ok()
                    .and_then(|s| s.trim().parse::<usize>().ok())
                    .filter(|&n| n > 0),
            }
        })
    }
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
            decode: DecodeTuning::from_env(),
        }
    }

    pub fn prefetch_decode(mut self, prefetch: bool) -> Self {
        self.decode.prefetch = prefetch;
        self
    }

    pub fn decode_units(mut self, units: Option<usize>) -> Self {
        self.decode.units = units;
        self
    }

    /// Forces decoding steps onto the tensor cores (`true`) or the split-key kernel
    /// (`false`) instead of choosing by the rows a kv head.
    pub fn tensor_core_decode(mut self, tensor_cores: bool) -> Self {
        self.decode.tensor_cores = Some(tensor_cores);
        self
    }

    pub fn unroll_decode(mut self, unroll: bool) -> Self {
        self.decode.unroll = unroll;
        self
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
#[derive(Clone, Copy, Debug)]
pub(super) struct Geometry {
    pub(super) b: usize,
    pub(super) hq: usize,
    pub(super) hkv: usize,
    pub(super) sq: usize,
    pub(super) sk: usize,
    pub(super) d: usize,
}

pub(super) fn dims(name: &str, t: &DeviceTensor) -> Result<[usize; 4], AttnError> {
    if t.shape.len() != 4 || t.strides.len() != 4 {
        return Err(AttnError::Shape(format!(
            "{name} must be [batch, heads, seq, head_dim], got shape {:?}",
            t.shape
        )));
    }
    Ok([t.shape[0], t.shape[1], t.shape[2], t.shape[3]])
}

pub(super) fn check(
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
