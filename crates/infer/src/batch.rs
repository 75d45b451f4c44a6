//! Batched generation over different prompts: every prompt is prefilled on its own
//! (chunked, [`crate::prefill`]), then all their samples decode together as one
//! batch, one forward pass per step for every sequence still generating.
//!
//! The prompts' KV caches have different lengths. They are joined left-padded: row
//! `r` holds `pad[r]` zero keys/values, then its prompt's keys/values, then the keys of
//! the tokens decoded so far, all rows the same length. Each decode step drives the
//! text layers from outside ([`SplitAtAttention`]: q/k/v from the layer, attention
//! here, the rest of the layer back in the layer), with the padded keys masked out of
//! the softmax; each row keeps its own positions (its prompt length plus the tokens
//! decoded), so a row sees exactly what it would see alone. While no row is padded
//! (one prompt's samples, or prompts of one length: GRPO's rollouts) the layer's own
//! attention runs (the flash decode kernels on a GPU), reading the cache's buffers
//! in place; the tokens are written into buffers sized for the longest answer
//! ([`LayerCache`]). A sequence that finishes
//! leaves the batch (its rows are dropped from the cache). Tested against one
//! [`crate::generate::generate_group`] per prompt: the same tokens, log-probs within
//! 1e-5 (`tests/generation.rs`).

use burn::tensor::activation::softmax;
use burn::tensor::{Bool, DType, Device, Int, Tensor, TensorData};
use longview_models::attention::{AttentionInput, AttentionMask, SplitAtAttention, attend};
use longview_models::vila::kv_cache::{LayerCache, row_index};
use longview_models::{KvCache, VisualInput, Vlm};

use crate::error::InferError;
use crate::generate::{
    Decoding, Generation, Limits, check_request, decode_rows, next_token_rows, prefill_prompt,
};
use crate::prefill::{DEFAULT_CHUNK, check_request_fits};

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

/// The generations of every request (`out[i][j]`: request `i`'s sample `j`), decoded
/// as one batch. Each equals what [`crate::generate::generate_group`] gives for that
/// request alone.
pub fn generate_batch(
    model: &Vlm,
    requests: Vec<BatchRequest>,
    options: &BatchOptions,
    device: &Device,
) -> Result<Vec<Vec<Generation>>, InferError> {
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
        return Ok(counts.iter().map(|_| Vec::new()).collect());
    }
    let layers = model.text_layers().len();
    let longest_answer = limits.iter().map(|l| l.max_new_tokens).max().unwrap_or(0);
    let mut batch = PaddedCache::join(&caches, layers, positions, longest_answer, device);
    drop(caches);
    let flat = decode_rows(firsts, &samples, &limits, |tokens, kept| {
        if kept.len() != batch.rows() {
            batch.select(kept, device);
        }
        batch.step(model, tokens, device)
    })?;
    Ok(regroup(flat, &counts))
}

/// Refuses a batch with an empty prompt or an invalid decoding, naming the request.
pub fn check_requests(requests: &[BatchRequest]) -> Result<(), InferError> {
    for (i, request) in requests.iter().enumerate() {
        check_request(&request.prompt, &request.samples)
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

/// Refuses a batch whose KV cache (every sample at the longest prompt's length plus
/// its new tokens) and one prefill chunk would not fit the budget.
fn check_batch_memory(
    model: &Vlm,
    requests: &[BatchRequest],
    options: &BatchOptions,
    device: &Device,
) -> Result<(), InferError> {
    let longest = requests.iter().map(|r| r.prompt.len()).max().unwrap_or(0);
    let new = requests
        .iter()
        .map(|r| r.limits.max_new_tokens)
        .max()
        .unwrap_or(0);
    let sequences: usize = requests.iter().map(|r| r.samples.len()).sum();
    check_request_fits(
        model,
        (longest, new, sequences),
        options.prefill_chunk,
        options.memory_budget,
        device,
    )
}

/// The KV cache of a batch of sequences with different prompt lengths, left-padded
/// to one length.
struct PaddedCache {
    /// Every layer's keys and values, `[rows, kv_heads, len, head_dim]` filled.
    layers: Vec<LayerCache>,
    /// Per row, the leading keys that are padding.
    pad: Vec<usize>,
    /// Per row, the position of its next token.
    next_position: Vec<usize>,
}

impl PaddedCache {
    /// One row per sample: each `(cache, samples)` (a prompt's cache, batch 1) is
    /// left-padded to the longest and repeated `samples` times, with room for
    /// `answer` more tokens.
    fn join(
        caches: &[(KvCache, usize)],
        layers: usize,
        next_position: Vec<usize>,
        answer: usize,
        device: &Device,
    ) -> Self {
        let longest = caches.iter().map(|(c, _)| c.len()).max().unwrap_or(0);
        let mut pad = Vec::new();
        for (cache, samples) in caches {
            pad.extend(std::iter::repeat_n(longest - cache.len(), *samples));
        }
        let layers = (0..layers)
            .map(|layer| {
                let (mut keys, mut values) = (Vec::new(), Vec::new());
                for (cache, samples) in caches {
                    let (k, v) = cache.layer(layer).expect("every layer is prefilled");
                    let left = longest - cache.len();
                    let padded = |t: &Tensor<4>| {
                        let [b, h, len, d] = t.dims();
                        let t = if left == 0 {
                            t.clone()
                        } else {
                            let zeros = Tensor::<4>::zeros([b, h, left, d], (device, t.dtype()));
                            Tensor::cat(vec![zeros, t.clone()], 2)
                        };
                        t.expand([*samples, h, len + left, d])
                    };
                    keys.push(padded(&k));
                    values.push(padded(&v));
                }
                LayerCache::holding(
                    Tensor::cat(keys, 0),
                    Tensor::cat(values, 0),
                    longest + answer,
                )
            })
            .collect();
        PaddedCache {
            layers,
            pad,
            next_position,
        }
    }

    fn rows(&self) -> usize {
        self.pad.len()
    }

    /// Keeps the rows `kept` (in that order).
    fn select(&mut self, kept: &[usize], device: &Device) {
        let index = row_index(kept, device);
        for layer in &mut self.layers {
            *layer = layer.select_rows(&index);
        }
        self.pad = kept.iter().map(|&r| self.pad[r]).collect();
        self.next_position = kept.iter().map(|&r| self.next_position[r]).collect();
    }

    /// `tokens[r]` (one per row) through the text layers against the cache, which
    /// grows by one position; every row's next-token logits on the host.
    fn step(
        &mut self,
        model: &Vlm,
        tokens: &[i64],
        device: &Device,
    ) -> Result<Vec<Vec<f32>>, InferError> {
        let n = tokens.len();
        assert_eq!(n, self.rows(), "one token per cache row");
        let ids = Tensor::<2, Int>::from_data(TensorData::new(tokens.to_vec(), [n, 1]), device);
        let positions: Vec<i64> = self.next_position.iter().map(|&p| p as i64).collect();
        let rope = model.text_context(Tensor::from_data(
            TensorData::new(positions, [n, 1]),
            device,
        ));
        let mut x = model.embed_tokens(ids);
        // Every layer's keys have the same length this step: one padding mask for all,
        // none while no row is padded.
        let len = self.layers.first().map_or(0, LayerCache::len) + 1;
        let padding = self.pad.iter().any(|&p| p > 0).then(|| {
            let masked: Vec<bool> = self
                .pad
                .iter()
                .flat_map(|&p| (0..len).map(move |j| j < p))
                .collect();
            Tensor::<2, Bool>::from_data(TensorData::new(masked, [n, len]), device)
        });
        for (layer, cache) in model.text_layers().iter().zip(&mut self.layers) {
            let input = layer.attention_input(x.clone(), &rope);
            let (keys, values) = cache.append(input.k, input.v);
            let out = match &padding {
                Some(padding) => {
                    padded_attention(input.q, &keys, &values, padding.clone(), input.scale)
                }
                // The new token is the last position: it sees every key.
                None => attend(
                    layer.attention_impl(),
                    AttentionInput {
                        q: input.q,
                        k: keys,
                        v: values,
                        mask: AttentionMask::Full,
                        scale: input.scale,
                    },
                ),
            };
            x = layer.after_attention(x, out);
        }
        for p in &mut self.next_position {
            *p += 1;
        }
        next_token_rows(model, x)
    }
}

/// One new query per row against the row's keys not marked in `padding` (`[rows,
/// len]`, true for a padding key), as the tensor-op reference attention computes it
/// (scores in the input dtype, softmax in f32). The query heads that share a kv head
/// are rows of one matrix against that head's keys, so the keys and values are read
/// as cached, never copied out per query head (at 40 rows, 12:2 heads and 50k cached
/// tokens that copy was 6 GB a layer and step).
///
/// # Shapes
/// - q: `[rows, heads, 1, head_dim]`; k, v: `[rows, kv_heads, len, head_dim]`
/// - output: like q
fn padded_attention(
    q: Tensor<4>,
    k: &Tensor<4>,
    v: &Tensor<4>,
    padding: Tensor<2, Bool>,
    scale: f64,
) -> Tensor<4> {
    let [rows, heads, one, head_dim] = q.dims();
    let [_, kv_heads, len, _] = k.dims();
    let groups = heads / kv_heads;
    // Query head h reads kv head h / groups: the group's heads are consecutive.
    let q = q.reshape([rows, kv_heads, groups * one, head_dim]);
    let scores = q.matmul(k.clone().swap_dims(2, 3)).mul_scalar(scale);
    let masked = padding
        .reshape([rows, 1, 1, len])
        .expand([rows, kv_heads, groups * one, len]);
    let scores = scores.mask_fill(masked, f32::NEG_INFINITY);
    let dtype = v.dtype();
    softmax(scores.cast(DType::F32), 3)
        .cast(dtype)
        .matmul(v.clone())
        .reshape([rows, heads, one, head_dim])
}
