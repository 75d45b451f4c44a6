//! Chunked prefill: a prompt (visual tokens included) runs through the text layers
//! `chunk` rows at a time against the growing KV cache, so the activations of one
//! pass are bounded by the chunk and only the cache grows with the prompt. Each chunk
//! attends causally to the cached keys and to itself (the causal mask aligns the
//! query block to the end of the keys), so the result equals a one-pass prefill.
//!
//! Also here: frames encoded in batches as they are decoded (only the visual tokens
//! are kept), and the memory estimate that refuses a request before it is allocated.

use std::path::Path;

use burn::tensor::{Device, Int, Tensor, TensorData};
use longview_data::video::{DecodeOptions, Sampling, decode_probed, probe, sampled_indices};
use longview_models::VlmConfig;
use longview_models::attention::AttentionImpl;
use longview_models::vila::config::TextConfig;
use longview_models::{KvCache, VisualInput, Vlm};

use crate::error::InferError;

/// Prompt rows per prefill chunk unless the caller says otherwise. 8192: on an H100
/// the 1.5B's prefill of 201,760 tokens took 26.9 s in chunks of 8192 against 36.8 s
/// in chunks of 2048 (16384: no faster; `benchmarks/inference.md`): larger chunks
/// give the flash kernels enough query tiles to fill the GPU. Activations grow with
/// the chunk (about 0.9 GB for the 7B's MLP at 8192 rows); the memory check counts
/// them.
pub const DEFAULT_CHUNK: usize = 8192;

/// Frames per vision-encoder batch unless the caller says otherwise.
pub const DEFAULT_FRAME_BATCH: usize = 32;

/// Token embeddings of `ids` (`[1, len]`) with the visual tokens of `visual` written
/// over its placeholders. Frames are encoded `frame_batch` at a time.
///
/// # Shapes
/// - output: `[1, len, text_hidden]`
pub fn embed_prompt(
    model: &Vlm,
    ids: &[u32],
    visual: VisualInput,
    frame_batch: usize,
    device: &Device,
) -> Result<Tensor<3>, InferError> {
    if ids.is_empty() {
        return Err(InferError::Request("the prompt is empty".into()));
    }
    let input_ids = Tensor::<2, Int>::from_data(
        TensorData::new(ids.iter().map(|&t| t as i64).collect(), [1, ids.len()]),
        device,
    );
    let visual = match visual {
        VisualInput::Pixels(pixels) => Some(encode_in_batches(model, pixels, frame_batch)),
        VisualInput::Embeddings(tokens) => Some(tokens),
        VisualInput::None => None,
    };
    let text = model.embed_tokens(input_ids.clone());
    Ok(model.splice(text, &input_ids, visual)?)
}

/// Stages 1-3 on `pixels`, `batch` frames at a time; each batch's activations are
/// freed once its visual tokens exist.
///
/// # Shapes
/// - pixels: `[frames, 3, side, side]`; output: `[ceil(frames / temporal_pool), tokens_per_frame, text_hidden]`
pub fn encode_in_batches(model: &Vlm, pixels: Tensor<4>, batch: usize) -> Tensor<3> {
    // Whole groups of the projector's temporal pooling in every batch.
    let batch = pool_aligned(model, batch);
    let frames = pixels.dims()[0];
    let batch = batch.max(1);
    if frames <= batch {
        return model.encode_frames(pixels);
    }
    let parts: Vec<Tensor<3>> = (0..frames)
        .step_by(batch)
        .map(|start| {
            let end = (start + batch).min(frames);
            model.encode_frames(pixels.clone().narrow(0, start, end - start))
        })
        .collect();
    Tensor::cat(parts, 0)
}

/// The visual tokens of the frames `sampling` picks from `video`, encoded
/// `frame_batch` frames at a time as the decoder delivers them: only the tokens are
/// kept, each batch's pixels are dropped once encoded (an hour of video never holds
/// all its pixels at once). Returns the tokens (`[frames, tokens_per_frame,
/// text_hidden]`) and the source frame indices. A request whose tokens would not fit
/// the memory available ([`check_video_fits`]) is refused before any frame is
/// decoded.
pub fn encode_video(
    model: &Vlm,
    config: &VlmConfig,
    video: &Path,
    sampling: &Sampling,
    frame_batch: usize,
    device: &Device,
) -> Result<(Tensor<3>, Vec<usize>), InferError> {
    let side = config.vision.image_size;
    let options = DecodeOptions {
        batch_size: pool_aligned(model, frame_batch),
        ..DecodeOptions::siglip(side as u32)
    };
    let info = probe(video)?;
    if let Some(available) = available_bytes(None, device) {
        let picked = sampled_indices(&info, sampling, options.short_video)?.len();
        let bytes_per_value = burn::tensor::DType::from(device.settings().float_dtype).size();
        check_video_fits(
            config,
            picked,
            options.batch_size,
            bytes_per_value,
            available,
        )
        .map_err(|e| InferError::Request(format!("{}: {e}", video.display())))?;
    }
    let mut parts = Vec::new();
    let mut indices = Vec::new();
    decode_probed(info, sampling, &options, |batch| {
        let frames = batch.frames.len();
        let pixels = crate::pixels::to_device::<4>(
            TensorData::new(batch.pixels, [frames, 3, side, side]),
            device,
        );
        parts.push(model.encode_frames(pixels));
        indices.extend(batch.frames.iter().map(|f| f.index));
    })?;
    if parts.is_empty() {
        return Err(InferError::Request(format!(
            "{}: the sampling picked no frames",
            video.display()
        )));
    }
    Ok((Tensor::cat(parts, 0), indices))
}

/// Refuses (with the numbers and what would fit) encoding `frames` frames whose
/// visual tokens would not fit `available` bytes: the tokens at `bytes_per_value`,
/// twice (the batches' parts and their concatenation), plus one batch of
/// `frame_batch` f32 frames. A lower bound: the vision encoder's own activations
/// for one batch come on top.
pub fn check_video_fits(
    config: &VlmConfig,
    frames: usize,
    frame_batch: usize,
    bytes_per_value: usize,
    available: f64,
) -> Result<(), String> {
    let groups = frames.div_ceil(config.temporal_pool());
    let tokens = groups as f64 * config.tokens_per_frame() as f64;
    let side = config.vision.image_size as f64;
    let need = 2.0 * tokens * config.text.hidden_size as f64 * bytes_per_value as f64
        + frame_batch as f64 * 3.0 * side * side * 4.0;
    if need <= available {
        return Ok(());
    }
    let gib = |b: f64| b / (1u64 << 30) as f64;
    Err(format!(
        "{frames} frames make {tokens:.0} visual tokens ({} a frame{}), about {:.2} GiB, but \
         {:.2} GiB is available: sample fewer frames, or pool the tokens \
         (model.token_pool, model.temporal_pool)",
        config.tokens_per_frame(),
        match config.temporal_pool() {
            1 => String::new(),
            k => format!(" group of {k}"),
        },
        gib(need),
        gib(available)
    ))
}

/// `batch` frames (at least 1) rounded up to whole groups of the model's temporal
/// pooling, so that a video encoded in pieces pools the frames it would pool whole.
fn pool_aligned(model: &Vlm, batch: usize) -> usize {
    batch.max(1).div_ceil(model.temporal_pool()) * model.temporal_pool()
}

/// Runs `embeds` (new rows continuing `cache`, the same count for every sequence of
/// the batch) through the text layers `chunk` rows at a time, extending `cache`, and
/// returns the last layer's output (before the final norm) at rows `keep_from..`.
/// `chunk = 0` runs everything in one pass.
///
/// # Shapes
/// - embeds: `[batch, new, hidden]`; output: `[batch, new - keep_from, hidden]`
pub fn prefill(
    model: &Vlm,
    embeds: Tensor<3>,
    chunk: usize,
    cache: &mut KvCache,
    keep_from: usize,
) -> Tensor<3> {
    let [batch, new, _] = embeds.dims();
    assert!(keep_from < new, "prefill keeps rows {keep_from}.. of {new}");
    let chunk = if chunk == 0 { new } else { chunk };
    let device = embeds.device();
    let mut kept = Vec::new();
    let mut start = 0;
    while start < new {
        let end = (start + chunk).min(new);
        let positions = positions(batch, cache.len(), end - start, &device);
        let hidden = model.text_layers_cached(
            embeds.clone().narrow(1, start, end - start),
            positions,
            cache,
        );
        if end > keep_from {
            let from = keep_from.max(start) - start;
            kept.push(hidden.narrow(1, from, end - start - from));
        }
        start = end;
    }
    Tensor::cat(kept, 1)
}

/// Positions `first..first + len` for every sequence of a batch.
pub fn positions(batch: usize, first: usize, len: usize, device: &Device) -> Tensor<2, Int> {
    let row: Vec<i64> = (first..first + len).map(|p| p as i64).collect();
    let data: Vec<i64> = (0..batch).flat_map(|_| row.iter().copied()).collect();
    Tensor::from_data(TensorData::new(data, [batch, len]), device)
}

/// What one request needs on the device, in bytes: the KV cache of `sequences`
/// sequences of `prompt + new` tokens, and the activations of one prefill chunk.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryEstimate {
    pub kv_cache: f64,
    pub activations: f64,
}

impl MemoryEstimate {
    pub fn total(&self) -> f64 {
        self.kv_cache + self.activations
    }
}

/// Bytes of `tokens` tokens' keys and values over every layer.
pub fn kv_cache_bytes(t: &TextConfig, tokens: usize, bytes_per_value: usize) -> f64 {
    let per_token = 2.0 * t.num_layers as f64 * t.num_kv_heads as f64 * t.head_dim() as f64;
    per_token * tokens as f64 * bytes_per_value as f64
}

/// Estimates the device memory of a request at `bytes_per_value` (4 for f32, 2 for
/// bf16/f16): the KV cache (every layer's keys and values of `prompt + new` tokens,
/// for `sequences` sequences) plus one prefill chunk's activations (hidden states,
/// q/k/v, the MLP's intermediate rows, and the attention's own memory: the reference
/// attention's score matrix `heads x chunk x (prompt)` in f32, the worst case; the
/// flash kernels' (`t.attention == Flash`) two f32 statistics a row and head, as
/// they keep no score matrix).
pub fn estimate(
    t: &TextConfig,
    prompt: usize,
    new: usize,
    sequences: usize,
    chunk: usize,
    bytes_per_value: usize,
) -> MemoryEstimate {
    // In f64: a request too large to count in usize is refused by size, not by an
    // overflow.
    let per_token = kv_cache_bytes(t, 1, bytes_per_value);
    let kv_cache = per_token * (prompt as f64 + new as f64) * sequences as f64;
    let rows = if chunk == 0 {
        prompt
    } else {
        chunk.min(prompt)
    } as f64;
    let per_row = 4.0 * t.hidden_size as f64 + 3.0 * t.intermediate_size as f64;
    let scores = match t.attention {
        AttentionImpl::Flash => t.num_heads as f64 * rows * 2.0 * 4.0,
        AttentionImpl::Reference | AttentionImpl::Sharded => {
            t.num_heads as f64 * rows * prompt as f64 * 4.0
        }
    };
    let logits_row = t.vocab_size as f64 * 4.0 * sequences as f64;
    MemoryEstimate {
        kv_cache,
        activations: rows * per_row * bytes_per_value as f64 + scores + logits_row,
    }
}

/// Refuses a request whose estimate exceeds `available` bytes, naming the numbers and
/// what would fit.
pub fn check_fits(
    estimate: &MemoryEstimate,
    available: f64,
    prompt: usize,
    chunk: usize,
) -> Result<(), InferError> {
    if estimate.total() <= available {
        return Ok(());
    }
    let gib = |b: f64| b / (1u64 << 30) as f64;
    let advice = if estimate.kv_cache > available {
        "the KV cache alone does not fit: use fewer frames, fewer samples, or sequence-parallel inference over several devices"
    } else {
        "use a smaller prefill chunk"
    };
    Err(InferError::Request(format!(
        "a {prompt}-token prompt (prefill chunk {chunk}) needs about {:.2} GiB ({:.2} GiB KV cache + {:.2} GiB activations) but {:.2} GiB is available: {advice}",
        gib(estimate.total()),
        gib(estimate.kv_cache),
        gib(estimate.activations),
        gib(available)
    )))
}

/// What a request needs on `device`, checked before it allocates: the KV cache of
/// `sequences` sequences of `prompt + new` tokens and one prefill chunk's activations
/// ([`estimate`]) against `budget` or what [`available_bytes`] finds. Refused with the
/// numbers and what to change ([`check_fits`]); passes when nothing knows the memory.
pub fn check_request_fits(
    model: &Vlm,
    (prompt, new, sequences): (usize, usize, usize),
    chunk: usize,
    budget: Option<f64>,
    device: &Device,
) -> Result<(), InferError> {
    let Some(available) = available_bytes(budget, device) else {
        return Ok(());
    };
    let bytes_per_value = burn::tensor::DType::from(device.settings().float_dtype).size();
    let need = estimate(
        &model.text_shape(),
        prompt,
        new,
        sequences,
        chunk,
        bytes_per_value,
    );
    check_fits(&need, available, prompt, chunk)
}

/// How a program that knows its accelerators asks one for the memory a request may
/// still take (a CUDA build of the `longview` binary registers
/// `longview_kernels::device_memory::available_bytes`).
pub type DeviceMemoryProbe = fn(&Device) -> Option<f64>;

static DEVICE_MEMORY_PROBE: std::sync::OnceLock<DeviceMemoryProbe> = std::sync::OnceLock::new();

/// Registers the probe [`available_bytes`] asks for accelerator devices (the first
/// registration wins).
pub fn set_device_memory_probe(probe: DeviceMemoryProbe) {
    let _ = DEVICE_MEMORY_PROBE.set(probe);
}

/// What a request may use on `device`: the `budget` given, else the memory available
/// now on a CPU device, else what the registered probe says for an accelerator;
/// `None` (no check) when nothing knows.
pub fn available_bytes(budget: Option<f64>, device: &Device) -> Option<f64> {
    match budget {
        Some(bytes) => Some(bytes),
        None if device.memory_pool_usage().is_none() => host_available_bytes(),
        None => DEVICE_MEMORY_PROBE.get().and_then(|probe| probe(device)),
    }
}

/// Memory available to a CPU device now (`MemAvailable`), where the system says.
pub fn host_available_bytes() -> Option<f64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: f64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib * 1024.0)
}
