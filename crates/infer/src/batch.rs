//! Batched generation over different prompts: every prompt is prefilled on its own
//! (chunked, [`crate::prefill`]), then all their samples decode together as one
//! batch, one forward pass per step for every sequence still generating. Each
//! prompt's keys and values are held once for all its samples, the decoded tokens'
//! per row ([`crate::shared_prefix`]); each row keeps its own positions (its prompt
//! length plus the tokens decoded), so a row sees exactly what it would see alone. A
//! sequence that finishes leaves the batch. Tested against one
//! [`crate::generate::generate_group`] per prompt: the same tokens, log-probs within
//! 1e-5 (`tests/batch.rs`).

use std::time::Instant;

use burn::tensor::{DType, Device};
use longview_models::{VisualInput, Vlm};

use crate::error::InferError;
use crate::generate::{Decoding, Generation, Limits, check_request, decode_rows, prefill_prompt};
use crate::graph_decode::graph_decoding;
use crate::prefill::{DEFAULT_CHUNK, available_bytes, check_fits, estimate, kv_cache_bytes};
use crate::shared_prefix::SharedPrefixBatch;

/// One prompt of a batch and how its samples decode.
pub struct BatchRequest {
    pub prompt: Vec<u32>,
    /// The frames or visual tokens of the prompt's placeholders.
    pub visual: VisualInput,
    /// One decoding per sample of this prompt (e.g. G top-p samples with their own
    /// seeds); the samples share the prompt's prefill.
    pub samples: Vec<Decoding>,
    pub limits: Limits,
}

/// How the batch is run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchOptions {
    /// Prompt rows per prefill chunk; 0 runs each prompt in one pass.
    pub prefill_chunk: usize,
    /// Bytes the batch may use on the device (see
    /// [`crate::generate::GenerateOptions::memory_budget`]).
    pub memory_budget: Option<f64>,
}

impl Default for BatchOptions {
    fn default() -> Self {
        BatchOptions {
            prefill_chunk: DEFAULT_CHUNK,
            memory_budget: None,
        }
    }
}

/// Wall-clock seconds of a batch's phases. Each phase ends on the host (the first
/// and the last logits are read back), so the device's work is inside them.
#[derive(Debug, Clone, Copy, Default)]
pub struct BatchTimes {
    /// Every prompt's prefill, to its first logits.
    pub prefill_s: f64,
    /// Every decoding step after that.
    pub decode_s: f64,
}

/// The generations of every request (`out[i][j]`: request `i`'s sample `j`), decoded
/// as one batch. Each equals what [`crate::generate::generate_group`] gives for that
/// request alone.
pub fn generate_batch(
    model: &Vlm,
    requests: Vec<BatchRequest>,
    options: &BatchOptions,
    device: &Device,
) -> Result<Vec<Vec<Generation>>, InferError> {
    Ok(generate_batch_timed(model, requests, options, device)?.0)
}

/// [`generate_batch`] and how long its prefill and decoding took.
pub fn generate_batch_timed(
    model: &Vlm,
    requests: Vec<BatchRequest>,
    options: &BatchOptions,
    device: &Device,
) -> Result<(Vec<Vec<Generation>>, BatchTimes), InferError> {
    let start = Instant::now();
    check_requests(&requests)?;
    check_batch_memory(model, &requests, options, device)?;
    let counts: Vec<usize> = requests.iter().map(|r| r.samples.len()).collect();
    let mut caches = Vec::with_capacity(requests.len());
    let (mut firsts, mut samples, mut limits, mut positions) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    // A request without samples has nothing to decode: it is not prefilled.
    for request in requests.into_iter().filter(|r| !r.samples.is_empty()) {
        let BatchRequest {
            prompt,
            visual,
            samples: decodings,
            limits: limit,
        } = request;
        let (cache, first) = prefill_prompt(
            model,
            &prompt,
            visual,
            options.prefill_chunk,
            prompt.len(),
            device,
        )?;
        for decoding in &decodings {
            firsts.push(first.clone());
            samples.push(*decoding);
            limits.push(limit.clone());
            positions.push(prompt.len());
        }
        caches.push((cache, decodings.len()));
    }
    if caches.is_empty() {
        return Ok((
            counts.iter().map(|_| Vec::new()).collect(),
            BatchTimes::default(),
        ));
    }
    let prefill_s = start.elapsed().as_secs_f64();
    let layers = model.text_layers().len();
    let longest_answer = limits.iter().map(|l| l.max_new_tokens).max().unwrap_or(0);
    let mut batch = SharedPrefixBatch::new(caches, layers, positions, longest_answer);
    // Steps exist from two tokens an answer on (the first comes with the prefill).
    let flat = if longest_answer > 1 && graph_decoding(model, device) {
        let mut decoder = batch.into_graph(model, device)?;
        decode_rows(firsts, &samples, &limits, |tokens, kept| {
            decoder.step(tokens, kept)
        })?
    } else {
        decode_rows(firsts, &samples, &limits, |tokens, kept| {
            if kept.len() != batch.rows() {
                batch.select(kept, device);
            }
            batch.step(model, tokens, device)
        })?
    };
    let times = BatchTimes {
        prefill_s,
        decode_s: start.elapsed().as_secs_f64() - prefill_s,
    };
    Ok((regroup(flat, &counts), times))
}

/// Refuses a batch with an empty prompt or an invalid decoding, naming the request.
pub fn check_requests(requests: &[BatchRequest]) -> Result<(), InferError> {
    for (i, request) in requests.iter().enumerate() {
        check_request(
            &request.prompt,
            &request.samples,
            request.limits.max_new_tokens,
        )
        .map_err(|e| InferError::Request(format!("request {i}: {e}")))?;
    }
    Ok(())
}

/// The batch's generations, one per sample in request order, grouped back by
/// request: `counts[i]` samples for request `i`.
pub fn regroup(flat: Vec<Generation>, counts: &[usize]) -> Vec<Vec<Generation>> {
    let mut flat = flat.into_iter();
    counts
        .iter()
        .map(|&g| flat.by_ref().take(g).collect())
        .collect()
}

/// Refuses a batch whose KV cache (every prompt once, every sample's new tokens) and
/// one prefill chunk would not fit the budget.
fn check_batch_memory(
    model: &Vlm,
    requests: &[BatchRequest],
    options: &BatchOptions,
    device: &Device,
) -> Result<(), InferError> {
    let Some(available) = available_bytes(options.memory_budget, device) else {
        return Ok(());
    };
    let longest = requests.iter().map(|r| r.prompt.len()).max().unwrap_or(0);
    let new = requests
        .iter()
        .map(|r| r.limits.max_new_tokens)
        .max()
        .unwrap_or(0);
    let sequences: usize = requests.iter().map(|r| r.samples.len()).sum();
    let prompts: usize = requests
        .iter()
        .filter(|r| !r.samples.is_empty())
        .map(|r| r.prompt.len())
        .sum();
    let bytes_per_value = DType::from(device.settings().float_dtype).size();
    let shape = model.text_shape();
    // The activations of the longest prompt's prefill; the cache as held.
    let mut need = estimate(
        &shape,
        longest,
        new,
        sequences,
        options.prefill_chunk,
        bytes_per_value,
    );
    need.kv_cache = kv_cache_bytes(&shape, prompts + sequences * new, bytes_per_value);
    check_fits(&need, available, longest, options.prefill_chunk)
}
