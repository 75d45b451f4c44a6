//! The KV cache of a decoding batch whose rows continue shared prompts: each prompt's
//! keys and values are held once (`[1, kv_heads, prompt, head_dim]`, as its prefill
//! left them) and only the tokens decoded since are held per row. A GRPO rollout's G
//! samples of one 50k-token prompt then keep one copy of its cache instead of G (the
//! 1.5B's cache is 28 KiB a token: 1.4 GB per copy at 50k tokens, 5.8 GB at 202k),
//! and each decoding step reads the prompt's keys once for all its rows.
//!
//! A step's attention for row `r` (prompt `p`) is split in two over disjoint keys and
//! merged by log-sum-exp: the rows of prompt `p` as the query rows of one sequence
//! against its prompt's keys (no mask: the new tokens come after every prompt key),
//! and each row against its own decoded keys (the new one included). The merge
//! (`longview_models::attention::merge_partials`, the ring attention's) gives the
//! attention over the concatenated keys. Prompts of different lengths need no padding.
//! Tested against one [`crate::generate::generate_group`] per prompt
//! (`tests/batch.rs`).

use burn::tensor::{Bool, DType, Device, Int, Tensor, TensorData};
use longview_models::attention::{
    AttentionImpl, AttentionInput, AttentionMask, FLASH_DECODE_MAX_ROWS, SplitAtAttention,
    attend_with_lse, merge_partials,
};
use longview_models::vila::kv_cache::{LayerCache, row_index};
use longview_models::{KvCache, Vlm};

use crate::error::InferError;
use crate::generate::next_token_rows;
use crate::graph_decode::{GraphDecoder, Step};

/// Attention output and log-sum-exp, both f32: `[rows, heads, 1, head_dim]` and
/// `[rows, heads, 1]`.
type Partial = (Tensor<4>, Tensor<3>);

pub struct SharedPrefixBatch {
    /// Per prompt, per layer: the prompt's keys and values.
    prefixes: Vec<Vec<(Tensor<4>, Tensor<4>)>>,
    /// Per row, the prompt it continues (a prompt's rows are consecutive).
    prompt_of: Vec<usize>,
    /// Per layer, the keys and values of the tokens decoded so far,
    /// `[rows, kv_heads, decoded, head_dim]`.
    own: Vec<LayerCache>,
    /// Per row, the position of its next token.
    next_position: Vec<usize>,
    /// Most query rows a kv head in one attention call over a prompt's keys.
    kv_head_rows: usize,
    /// Decoded tokens each row's own cache has room for.
    answer: usize,
}

impl SharedPrefixBatch {
    /// `caches`: each prompt's prefilled cache (batch 1) and its number of rows;
    /// room for `answer` decoded tokens per row.
    pub fn new(
        caches: Vec<(KvCache, usize)>,
        layers: usize,
        next_position: Vec<usize>,
        answer: usize,
    ) -> Self {
        let mut prompt_of = Vec::new();
        let mut prefixes = Vec::with_capacity(caches.len());
        for (p, (cache, rows)) in caches.into_iter().enumerate() {
            prompt_of.extend(std::iter::repeat_n(p, rows));
            prefixes.push(
                (0..layers)
                    .map(|l| cache.layer(l).expect("every layer is prefilled"))
                    .collect(),
            );
        }
        SharedPrefixBatch {
            prefixes,
            prompt_of,
            own: (0..layers).map(|_| LayerCache::reserved(answer)).collect(),
            next_position,
            kv_head_rows: FLASH_DECODE_MAX_ROWS,
            answer,
        }
    }

    /// Caps the query rows a kv head of each attention call over a prompt's keys (by
    /// default the flash decode kernels' [`FLASH_DECODE_MAX_ROWS`]): a prompt's rows
    /// then run in several calls whose results are concatenated. For tests (the
    /// CPU build's attention has no cap) and benchmarks.
    pub fn limit_kv_head_rows(&mut self, rows: usize) {
        self.kv_head_rows = rows.max(1);
    }

    pub fn rows(&self) -> usize {
        self.prompt_of.len()
    }

    /// Keeps the rows `kept` (in that order, increasing).
    pub fn select(&mut self, kept: &[usize], device: &Device) {
        let index = row_index(kept, device);
        for layer in &mut self.own {
            *layer = layer.select_rows(&index);
        }
        self.prompt_of = kept.iter().map(|&r| self.prompt_of[r]).collect();
        self.next_position = kept.iter().map(|&r| self.next_position[r]).collect();
    }

    /// `tokens[r]` (one per row) through the text layers; every row's next-token
    /// logits on the host.
    pub fn step(
        &mut self,
        model: &Vlm,
        tokens: &[i64],
        device: &Device,
    ) -> Result<Vec<Vec<f32>>, InferError> {
        let n = tokens.len();
        assert_eq!(n, self.rows(), "one token per row");
        let ids = Tensor::<2, Int>::from_data(TensorData::new(tokens.to_vec(), [n, 1]), device);
        let positions: Vec<i64> = self.next_position.iter().map(|&p| p as i64).collect();
        let rope = model.text_context(Tensor::from_data(
            TensorData::new(positions, [n, 1]),
            device,
        ));
        let runs = runs(&self.prompt_of);
        let mut x = model.embed_tokens(ids);
        for (l, (layer, own)) in model.text_layers().iter().zip(&mut self.own).enumerate() {
            let input = layer.attention_input(x.clone(), &rope);
            let implementation = layer.attention_impl();
            let (k, v) = own.append(input.k.clone(), input.v.clone());
            let mine = partial(implementation, input.q.clone(), k, v, input.scale);
            let shared = prefix_partials(
                &self.prefixes,
                &runs,
                self.kv_head_rows,
                l,
                &input,
                implementation,
            );
            x = layer.after_attention(x, merge_partials(shared, mine).0.cast(input.q.dtype()));
        }
        for p in &mut self.next_position {
            *p += 1;
        }
        next_token_rows(model, x)
    }

    /// This batch's decoding steps captured once as a device graph and replayed
    /// ([`GraphDecoder`]): each row's own keys in buffers with room for the answer,
    /// the prompts' keys as the prefill left them (their attention has the same shapes
    /// at every step). Before any step (the rows' own caches empty); where
    /// `Vlm::counted_decoding_applies`.
    pub fn into_graph<'a>(
        self,
        model: &'a Vlm,
        device: &Device,
    ) -> Result<GraphDecoder<'a>, InferError> {
        if self.own.iter().any(|layer| !layer.is_empty()) || self.answer == 0 {
            return Err(InferError::Request(
                "a shared-prefix batch becomes a graph before its first step, with room for \
                 an answer"
                    .into(),
            ));
        }
        let rows = self.rows();
        let layers = model.empty_decode_layers(rows, self.answer, device);
        let buffers = model.decode_buffers_over(layers, rows, device);
        let step_buffers = buffers.clone();
        let runs = runs(&self.prompt_of);
        let (prefixes, kv_head_rows) = (self.prefixes, self.kv_head_rows);
        let implementation = model.text_attention();
        let step: Step<'a> = Box::new(move || {
            model.decode_counted_with(&step_buffers, |l, input, (o, lse)| {
                let shared =
                    prefix_partials(&prefixes, &runs, kv_head_rows, l, input, implementation);
                merge_partials(shared, (o.cast(DType::F32), lse))
                    .0
                    .cast(input.q.dtype())
            })
        });
        Ok(GraphDecoder::with_step(
            model,
            buffers,
            self.next_position,
            0,
            step,
        ))
    }
}

/// Layer `l`'s attention of every row's query (`input.q`) over its prompt's keys:
/// each run of one prompt's rows as the query positions of one sequence, in calls the
/// decode kernels take whole (each row a position of every query head, `heads /
/// kv_heads` rows a kv head, at most `kv_head_rows` rows a kv head). O and LSE in f32,
/// rows in order.
fn prefix_partials(
    prefixes: &[Vec<(Tensor<4>, Tensor<4>)>],
    runs: &[(usize, usize, usize)],
    kv_head_rows: usize,
    l: usize,
    input: &AttentionInput,
    implementation: AttentionImpl,
) -> Partial {
    let mut outs = Vec::with_capacity(runs.len());
    let mut lses = Vec::with_capacity(runs.len());
    for &(p, start, rows) in runs {
        let (k, v) = &prefixes[p][l];
        let group = input.q.dims()[1] / k.dims()[1];
        let per_call = (kv_head_rows / group).max(1);
        for (start, rows) in calls(start, rows, per_call) {
            let q = input.q.clone().narrow(0, start, rows).swap_dims(0, 2);
            let (o, lse) = partial(implementation, q, k.clone(), v.clone(), input.scale);
            outs.push(o.swap_dims(0, 2));
            lses.push(lse.swap_dims(0, 2));
        }
    }
    (Tensor::cat(outs, 0), Tensor::cat(lses, 0))
}

/// `rows` rows from `start` cut into `(first row, rows)` calls of at most `per_call`
/// rows, as even as possible (7B, 7 query heads a kv head: a group of 5 runs as 3 + 2
/// rows, 21 and 14 rows a kv head, not 4 + 1).
fn calls(start: usize, rows: usize, per_call: usize) -> Vec<(usize, usize)> {
    if rows == 0 {
        return Vec::new();
    }
    let count = rows.div_ceil(per_call.max(1));
    let (base, extra) = (rows / count, rows % count);
    let mut at = start;
    (0..count)
        .map(|i| {
            let n = base + usize::from(i < extra);
            at += n;
            (at - n, n)
        })
        .collect()
}

/// `(prompt, first row, rows)` of each run of consecutive rows of one prompt.
fn runs(prompt_of: &[usize]) -> Vec<(usize, usize, usize)> {
    let mut runs: Vec<(usize, usize, usize)> = Vec::new();
    for (row, &p) in prompt_of.iter().enumerate() {
        match runs.last_mut() {
            Some((q, _, rows)) if *q == p => *rows += 1,
            _ => runs.push((p, row, 1)),
        }
    }
    runs
}

/// Every query row of `q` (`[batch, heads, rows, head_dim]`) against every key of
/// `k`/`v` (`[batch, kv_heads, keys, head_dim]`, grouped-query heads): O and LSE in
/// f32. The flash kernels where the layer runs them (the split-key decode kernels
/// for a few rows per kv head), else [`grouped_attention`].
fn partial(
    implementation: AttentionImpl,
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    scale: f64,
) -> Partial {
    if implementation == AttentionImpl::Flash {
        let input = AttentionInput {
            q,
            k,
            v,
            mask: AttentionMask::Full,
            scale,
        };
        let (o, lse) = attend_with_lse(implementation, input);
        return (
            o.cast(DType::F32),
            lse.expect("the flash kernels give the LSE"),
        );
    }
    grouped_attention(q, k, v, None, scale)
}

/// Every query row of `q` (`[batch, heads, rows, head_dim]`) against the keys of
/// `k`/`v` (`[batch, kv_heads, keys, head_dim]`) not marked in `padding` (`[batch,
/// keys]`, true for a masked key), in f32 tensor ops: O and LSE (`[batch, heads,
/// rows]`). The query heads that share a kv head are rows of one matrix against its
/// keys, so the keys are never copied out per query head. A row with every key masked
/// gets O = 0 and LSE = -inf (it then weighs nothing in an LSE merge).
pub fn grouped_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    padding: Option<Tensor<2, Bool>>,
    scale: f64,
) -> (Tensor<4>, Tensor<3>) {
    let [batch, heads, rows, head_dim] = q.dims();
    let [_, kv_heads, keys, _] = k.dims();
    // Query head h reads kv head h / (heads / kv_heads): a group's heads are consecutive.
    let group = heads / kv_heads * rows;
    let q = q
        .cast(DType::F32)
        .reshape([batch, kv_heads, group, head_dim]);
    let mut scores = q
        .matmul(k.cast(DType::F32).swap_dims(2, 3))
        .mul_scalar(scale);
    if let Some(padding) = padding {
        let masked = padding
            .reshape([batch, 1, 1, keys])
            .expand([batch, kv_heads, group, keys]);
        scores = scores.mask_fill(masked, f32::NEG_INFINITY);
    }
    let max = scores.clone().max_dim(3);
    // Rows with every key masked: shift by 0 so that p = 0, total = 0, LSE = -inf.
    let empty = max.clone().equal_elem(f32::NEG_INFINITY);
    let max = max.mask_fill(empty, 0.0);
    let p = (scores - max.clone()).exp();
    let total = p.clone().sum_dim(3);
    let lse = (max + total.clone().log()).reshape([batch, heads, rows]);
    let o = (p / total.clamp_min(f32::MIN_POSITIVE))
        .matmul(v.cast(DType::F32))
        .reshape([batch, heads, rows, head_dim]);
    (o, lse)
}

#[cfg(test)]
mod tests {
    use super::calls;

    /// Calls cover the rows in order, once each, none over the limit, as even as
    /// possible.
    #[test]
    fn calls_split_rows_evenly_under_the_limit() {
        // The 1.5B (6 query heads a kv head, 5 rows a call): one call.
        assert_eq!(calls(0, 5, 32 / 6), [(0, 5)]);
        // The 7B (7 query heads a kv head, 4 rows a call): 3 + 2.
        assert_eq!(calls(10, 5, 32 / 7), [(10, 3), (13, 2)]);
        assert_eq!(calls(0, 9, 4), [(0, 3), (3, 3), (6, 3)]);
        assert_eq!(calls(2, 3, 1), [(2, 1), (3, 1), (4, 1)]);
        assert_eq!(calls(0, 0, 4), []);
        for rows in 1..40 {
            for limit in 1..12 {
                let got = calls(7, rows, limit);
                assert_eq!(got.iter().map(|c| c.1).sum::<usize>(), rows);
                assert!(got.iter().all(|&(_, n)| n >= 1 && n <= limit));
                assert_eq!(got.len(), rows.div_ceil(limit));
                assert!(got.windows(2).all(|w| w[0].0 + w[0].1 == w[1].0));
                assert_eq!(got[0].0, 7);
            }
        }
    }
}
