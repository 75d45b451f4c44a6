//! Batched generation over different prompts on a sequence-parallel group (what
//! `longview_infer::batch` does on one device): every prompt is prefilled
//! sequence-parallel on its own, leaving each rank its share of every prompt's KV
//! cache; then all the prompts' samples decode together, one step for every sequence
//! still generating.
//!
//! On each rank the shares are joined left-padded to that rank's longest share (all
//! ranks know every share's length, so they agree on every rank's padded length);
//! the padding keys are masked out of the rank's partial attention (key segment 1
//! against the query's 0, so a row that holds only padding here contributes O = 0,
//! LSE = -inf). Each row keeps its own positions. A step's new keys and values go to
//! the rank whose padded share is the shortest, for all rows, and the partial
//! `(O, LSE)` of every rank are gathered and merged in rank order as in
//! [`SpInference::extend`]. The owner writes them into buffers with room for the
//! longest answer ([`LayerCache`]), not by concatenation. Tested against one device's
//! batched generation: the same tokens, log-probs within 1e-4 (`tests/inference.rs`).

use std::time::Instant;

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use longview_comm::Communicator;
use longview_infer::InferError;
use longview_infer::batch::{BatchRequest, BatchTimes, check_requests, regroup};
use longview_infer::generate::{Generation, decode_rows, next_token_rows};
use longview_infer::prefill::check_request_fits;
use longview_infer::shared_prefix::grouped_attention;
use longview_models::Vlm;
use longview_models::attention::SplitAtAttention;
use longview_models::vila::kv_cache::{LayerCache, row_index};

use super::{ShardedCache, SpInference};
use crate::block::{Block, forward as block_forward};

impl<C: Communicator + Send + Sync + 'static> SpInference<C> {
    /// The generations of every request (`out[i][j]`: request `i`'s sample `j`), each
    /// prompt prefilled sequence-parallel, all samples decoded as one batch against
    /// the sharded caches. The same on every rank; each equals
    /// [`SpInference::generate_group`] for that request alone up to float rounding.
    pub fn generate_batch(
        &self,
        model: &Vlm,
        requests: Vec<BatchRequest>,
        device: &Device,
    ) -> Result<Vec<Vec<Generation>>, InferError> {
        Ok(self.generate_batch_timed(model, requests, device)?.0)
    }

    /// [`SpInference::generate_batch`] and how long its prefill and decoding took
    /// (on this rank).
    pub fn generate_batch_timed(
        &self,
        model: &Vlm,
        requests: Vec<BatchRequest>,
        device: &Device,
    ) -> Result<(Vec<Vec<Generation>>, BatchTimes), InferError> {
        let start = Instant::now();
        let world = self.world();
        check_requests(&requests)?;
        // Each rank holds about 1/P of every cache; the estimate is per rank, for
        // every sequence at the longest prompt.
        let longest = requests.iter().map(|r| r.prompt.len()).max().unwrap_or(0);
        let new = requests.iter().map(|r| r.limits.max_new_tokens).max();
        let sequences: usize = requests.iter().map(|r| r.samples.len()).sum();
        let per_rank = longest.div_ceil(world);
        let request_size = (per_rank, new.unwrap_or(0), sequences.max(1));
        check_request_fits(model, request_size, per_rank, None, device)?;

        let counts: Vec<usize> = requests.iter().map(|r| r.samples.len()).collect();
        let (mut caches, mut firsts, mut samples, mut limits, mut positions) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for request in requests.into_iter().filter(|r| !r.samples.is_empty()) {
            let (cache, first) =
                self.prefill_prompt(model, &request.prompt, request.visual, device)?;
            for decoding in &request.samples {
                firsts.push(first.clone());
                samples.push(*decoding);
                limits.push(request.limits.clone());
                positions.push(request.prompt.len());
            }
            caches.push((cache, request.samples.len()));
        }
        if caches.is_empty() {
            return Ok((
                counts.iter().map(|_| Vec::new()).collect(),
                BatchTimes::default(),
            ));
        }
        let prefill_s = start.elapsed().as_secs_f64();
        let layers = model.text_layers().len();
        let answer = limits.iter().map(|l| l.max_new_tokens).max().unwrap_or(0);
        let rank = self.comm.rank();
        let mut batch = ShardBatch::join(&caches, rank, layers, positions, answer, device);
        drop(caches);
        let flat = decode_rows(firsts, &samples, &limits, |tokens, kept| {
            if kept.len() != batch.rows() {
                batch.select(kept, device);
            }
            self.step_batch(model, &mut batch, tokens, device)
        })?;
        let times = BatchTimes {
            prefill_s,
            decode_s: start.elapsed().as_secs_f64() - prefill_s,
        };
        Ok((regroup(flat, &counts), times))
    }

    /// `tokens[r]` (one per row) through the text layers against the sharded batch,
    /// whose owner rank grows by one position; every row's next-token logits on the
    /// host, the same on every rank.
    fn step_batch(
        &self,
        model: &Vlm,
        batch: &mut ShardBatch,
        tokens: &[i64],
        device: &Device,
    ) -> Result<Vec<Vec<f32>>, InferError> {
        let rows = tokens.len();
        let owner = batch.owner();
        let mine = owner == self.comm.rank();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(tokens.to_vec(), [rows, 1]), device);
        let positions: Vec<i64> = batch.next_position.iter().map(|&p| p as i64).collect();
        let rope = model.text_context(Tensor::from_data(
            TensorData::new(positions, [rows, 1]),
            device,
        ));
        // This rank's keys this step (its share, plus the new one on the owner) and
        // which are padding: the same for every layer.
        let local = batch.lens[self.comm.rank()] + usize::from(mine);
        let padding =
            (local > 0 && batch.pad.iter().any(|&p| p > 0)).then(|| batch.padding(local, device));
        let mut x = model.embed_tokens(ids);
        for (layer, cached) in model.text_layers().iter().zip(&mut batch.layers) {
            let input = layer.attention_input(x.clone(), &rope);
            if mine {
                cached.append(input.k.clone(), input.v.clone());
            }
            let [_, heads, _, head_dim] = input.q.dims();
            let (o, lse) = match (cached.get(), &padding) {
                // This rank's padding keys masked (a row with only padding here: O = 0,
                // LSE = -inf).
                (Some((k, v)), Some(padding)) => {
                    grouped_attention(input.q.clone(), k, v, Some(padding.clone()), input.scale)
                }
                // No padding on this rank: one query row sees every key (the flash
                // kernels on a GPU).
                (Some((k, v)), None) => block_forward(&Block {
                    q: input.q.clone(),
                    k,
                    v,
                    causal: false,
                    scale: input.scale,
                    segments: None,
                }),
                _ => (
                    Tensor::zeros([rows, heads, 1, head_dim], device),
                    Tensor::full([rows, heads, 1], f32::NEG_INFINITY, device),
                ),
            };
            let merged = self.gather_merge(o, lse)?;
            x = layer.after_attention(x, merged.cast(input.q.dtype()));
        }
        batch.lens[owner] += 1;
        for p in &mut batch.next_position {
            *p += 1;
        }
        next_token_rows(model, x)
    }
}

/// This rank's shares of a batch of sequences' KV caches, left-padded to one length.
struct ShardBatch {
    /// Every layer's local keys and values, `[rows, kv_heads, lens[rank], head_dim]`
    /// filled (empty while this rank holds no key).
    layers: Vec<LayerCache>,
    /// Per row, this rank's leading keys that are padding.
    pad: Vec<usize>,
    /// Per row, the position of its next token.
    next_position: Vec<usize>,
    /// Every rank's padded share length (the same on every rank).
    lens: Vec<usize>,
}

impl ShardBatch {
    /// One row per sample: each `(cache, samples)` (a prompt's sharded cache, batch 1)
    /// left-padded to this rank's longest share and repeated `samples` times, with
    /// room for `answer` more tokens.
    fn join(
        caches: &[(ShardedCache, usize)],
        rank: usize,
        layers: usize,
        next_position: Vec<usize>,
        answer: usize,
        device: &Device,
    ) -> Self {
        let world = caches[0].0.counts.len();
        let lens: Vec<usize> = (0..world)
            .map(|r| caches.iter().map(|(c, _)| c.counts[r]).max().unwrap_or(0))
            .collect();
        let longest = lens[rank];
        let mut pad = Vec::new();
        for (cache, samples) in caches {
            pad.extend(std::iter::repeat_n(longest - cache.counts[rank], *samples));
        }
        let layers = (0..layers)
            .map(|layer| {
                if longest == 0 {
                    return LayerCache::reserved(answer);
                }
                let (mut keys, mut values) = (Vec::new(), Vec::new());
                for (cache, samples) in caches {
                    let left = longest - cache.counts[rank];
                    let padded = |t: Option<&Tensor<4>>, like: &Tensor<4>| {
                        let [_, h, _, d] = like.dims();
                        let zeros = Tensor::<4>::zeros([1, h, left, d], (device, like.dtype()));
                        let t = match (t, left) {
                            (Some(t), 0) => t.clone(),
                            (Some(t), _) => Tensor::cat(vec![zeros, t.clone()], 2),
                            (None, _) => zeros,
                        };
                        t.expand([*samples, h, longest, d])
                    };
                    let local = cache.local.layer(layer);
                    // A prompt with no key on this rank takes its shape from another.
                    let like = caches
                        .iter()
                        .find_map(|(c, _)| c.local.layer(layer))
                        .expect("this rank holds keys of some prompt");
                    keys.push(padded(local.as_ref().map(|(k, _)| k), &like.0));
                    values.push(padded(local.as_ref().map(|(_, v)| v), &like.1));
                }
                LayerCache::holding(
                    Tensor::cat(keys, 0),
                    Tensor::cat(values, 0),
                    longest + answer,
                )
            })
            .collect();
        ShardBatch {
            layers,
            pad,
            next_position,
            lens,
        }
    }

    fn rows(&self) -> usize {
        self.pad.len()
    }

    /// The rank that stores the next keys: the shortest padded share (the lowest
    /// such rank).
    fn owner(&self) -> usize {
        (0..self.lens.len())
            .min_by_key(|&r| (self.lens[r], r))
            .unwrap_or(0)
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

    /// Per row, true for this rank's padding keys, over `len` keys.
    fn padding(&self, len: usize, device: &Device) -> Tensor<2, Bool> {
        let masked: Vec<bool> = self
            .pad
            .iter()
            .flat_map(|&p| (0..len).map(move |j| j < p))
            .collect();
        Tensor::from_data(TensorData::new(masked, [self.rows(), len]), device)
    }
}
