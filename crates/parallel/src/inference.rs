//! Sequence-parallel inference over the ranks of one group: the prompt's prefill
//! runs as zigzag ring attention (or Ulysses, or 2D attention: [`SpScheme`]),
//! leaving every rank the keys and values of its shard (its part of a KV cache no
//! rank holds whole; each scheme's layout decides which tokens a rank holds, and
//! decoding does not care); decoding then attends each new
//! query to every rank's shard, and the partial `(O, LSE)` results are gathered and
//! merged in rank order (the same on every rank, so every rank computes the same
//! hidden states, logits and tokens without further messages). The new tokens' keys
//! and values go to the rank holding the fewest, so shards stay balanced.
//!
//! Several prompts decode as one batch with [`SpInference::generate_batch`]
//! (`inference/batch.rs`): each prefilled on its own, the shares joined left-padded on
//! every rank.
//!
//! The prompt's last `1..=2P` tokens (what zigzag sharding cannot split evenly, and
//! at least the last one, whose logits start the answer) run through the decode path
//! as one multi-token step: on the rank that stores them they attend causally to
//! themselves, everywhere to every cached key.

mod batch;

use std::sync::Arc;

use burn::tensor::{Device, Int, Tensor, TensorData};
use longview_comm::Communicator;
use longview_infer::InferError;
use longview_infer::generate::{
    Decoding, GenerateOptions, Generation, check_memory, check_request, decode_group,
    next_token_rows,
};
use longview_infer::prefill::{DEFAULT_FRAME_BATCH, embed_prompt};
use longview_models::attention::{AttentionImpl, SplitAtAttention};
use longview_models::{KvCache, VisualInput, Vlm};

use crate::autodiff::{DistributedAttention, WithComm};
use crate::block::{Block, forward as block_forward, merge};
use crate::layout::{SeqLayout, shard};
use crate::ring::{RingAttention, RingBalance};

/// A sequence-parallel attention scheme: what a prefill runs, and what MM-SP training
/// and GRPO's log-prob passes run (`run.sp_scheme`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SpScheme {
    /// Load-balanced ring over every rank ([`SeqLayout::Zigzag`] shards).
    #[default]
    ZigzagRing,
    /// All-to-all to whole sequences for a share of the heads and back (the group
    /// size must suit the heads: [`crate::ulysses::check_heads`]).
    Ulysses,
    /// Ulysses inside groups of `ulysses` contiguous ranks, zigzag ring across them.
    TwoD { ulysses: usize },
}

impl std::fmt::Display for SpScheme {
    /// The form [`std::str::FromStr`] reads: `ring`, `ulysses` or `2d:U`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SpScheme::ZigzagRing => write!(f, "ring"),
            SpScheme::Ulysses => write!(f, "ulysses"),
            SpScheme::TwoD { ulysses } => write!(f, "2d:{ulysses}"),
        }
    }
}

impl std::str::FromStr for SpScheme {
    type Err = String;

    /// `ring` (or `zigzag`), `ulysses`, or `2d:U` (U the Ulysses degree).
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ring" | "zigzag" => Ok(SpScheme::ZigzagRing),
            "ulysses" => Ok(SpScheme::Ulysses),
            other => match other.strip_prefix("2d:").map(str::parse::<usize>) {
                Some(Ok(ulysses)) if ulysses > 0 => Ok(SpScheme::TwoD { ulysses }),
                _ => Err(format!(
                    "sequence-parallel scheme `{other}`: expected ring, ulysses or 2d:U (U the \
                     Ulysses degree, dividing the ranks)"
                )),
            },
        }
    }
}

/// A rank's handle on its sequence-parallel group for inference.
pub struct SpInference<C: Communicator + Send + Sync + 'static> {
    /// Decode's collectives (the gather of partial results).
    comm: C,
    /// The prefill's attention, on channels of its own.
    prefill: Arc<dyn DistributedAttention>,
    /// How the prefill shards the prompt's tokens.
    layout: SeqLayout,
    scale: f64,
}

/// This rank's part of a sequence-parallel KV cache and every rank's token count.
pub struct ShardedCache {
    pub local: KvCache,
    /// Tokens held by each rank (the same on every rank).
    pub counts: Vec<usize>,
}

impl ShardedCache {
    fn new(world: usize) -> Self {
        ShardedCache {
            local: KvCache::new(),
            counts: vec![0; world],
        }
    }

    /// Tokens cached over all ranks.
    pub fn total(&self) -> usize {
        self.counts.iter().sum()
    }

    /// The rank that stores the next tokens: the one holding the fewest (the lowest
    /// such rank).
    pub fn owner(&self) -> usize {
        (0..self.counts.len())
            .min_by_key(|&r| (self.counts[r], r))
            .unwrap_or(0)
    }
}

fn comm_error(what: &str) -> impl Fn(longview_comm::CommError) -> InferError + '_ {
    move |e| InferError::Request(format!("sequence-parallel inference ({what}): {e}"))
}

/// Causal zigzag ring attention over every rank of `comm`, on channels of its own
/// (split from `comm`), for heads of `head_dim` channels; with its softmax scale.
pub fn causal_zigzag_ring<C: Communicator + Send + Sync + 'static>(
    comm: &C,
    head_dim: usize,
) -> Result<(Arc<dyn DistributedAttention>, f64), longview_comm::CommError> {
    let all: Vec<usize> = (0..comm.world_size()).collect();
    let scale = (head_dim as f64).powf(-0.5);
    let ring = Arc::new(WithComm {
        comm: comm.split(&[all])?,
        attention: RingAttention {
            balance: RingBalance::Zigzag,
            causal: true,
            scale,
        },
    });
    Ok((ring, scale))
}

/// The attention heads a scheme is built for.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub head_dim: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
}

/// Causal attention of `scheme` over every rank of `comm` (on channels of its own,
/// split from `comm`): the distributed attention, the token layout it needs (which
/// rows each rank holds) and the softmax scale. Refuses a scheme the heads or the
/// group size do not allow, with the rule.
pub fn causal_scheme<C: Communicator + Send + Sync + 'static>(
    comm: &C,
    heads: Heads,
    scheme: SpScheme,
) -> crate::Result<(Arc<dyn DistributedAttention>, SeqLayout, f64)> {
    let Heads {
        head_dim,
        q_heads,
        kv_heads,
    } = heads;
    let scale = (head_dim as f64).powf(-0.5);
    let all: Vec<usize> = (0..comm.world_size()).collect();
    Ok(match scheme {
        SpScheme::ZigzagRing => {
            let (ring, scale) = causal_zigzag_ring(comm, head_dim)?;
            (ring, SeqLayout::Zigzag, scale)
        }
        SpScheme::Ulysses => {
            crate::ulysses::check_heads(q_heads, kv_heads, comm.world_size())?;
            let attention = WithComm {
                comm: comm.split(std::slice::from_ref(&all))?,
                attention: crate::ulysses::UlyssesAttention {
                    layout: SeqLayout::Zigzag,
                    causal: true,
                    scale,
                },
            };
            (Arc::new(attention), SeqLayout::Zigzag, scale)
        }
        SpScheme::TwoD { ulysses } => {
            crate::ulysses::check_heads(q_heads, kv_heads, ulysses)?;
            let groups = crate::two_d::TwoDGroups::new(comm, ulysses)?;
            let layout = groups.layout();
            let attention = WithComm {
                comm: groups,
                attention: crate::two_d::TwoDAttention {
                    causal: true,
                    scale,
                },
            };
            (Arc::new(attention), layout, scale)
        }
    })
}

impl<C: Communicator + Send + Sync + 'static> SpInference<C> {
    /// Binds the group of `comm` (every rank of it) for a model whose attention heads
    /// have `head_dim` channels; the prefill runs the zigzag ring.
    pub fn new(comm: C, head_dim: usize) -> Result<Self, InferError> {
        let (prefill, scale) =
            causal_zigzag_ring(&comm, head_dim).map_err(comm_error("ring channels"))?;
        Ok(SpInference {
            comm,
            prefill,
            layout: SeqLayout::Zigzag,
            scale,
        })
    }

    /// [`SpInference::new`] with the prefill's `scheme`, for a model of `q_heads`
    /// query heads over `kv_heads` key/value heads of `head_dim` channels. Refuses a
    /// scheme the heads or the group size do not allow, with the rule.
    pub fn with_scheme(
        comm: C,
        head_dim: usize,
        q_heads: usize,
        kv_heads: usize,
        scheme: SpScheme,
    ) -> Result<Self, InferError> {
        let heads = Heads {
            head_dim,
            q_heads,
            kv_heads,
        };
        let (prefill, layout, scale) = causal_scheme(&comm, heads, scheme)
            .map_err(|e| InferError::Request(format!("{scheme:?}: {e}")))?;
        Ok(SpInference {
            comm,
            prefill,
            layout,
            scale,
        })
    }

    fn world(&self) -> usize {
        self.comm.world_size()
    }

    /// Runs the prompt `embeds` (`[batch, len, hidden]`, the whole prompt on every
    /// rank) into `cache` and returns the last layer's output at the last prompt row
    /// (`[batch, 1, hidden]`), the same on every rank.
    pub fn prefill(
        &self,
        model: &Vlm,
        embeds: Tensor<3>,
        cache: &mut ShardedCache,
    ) -> Result<Tensor<3>, InferError> {
        let [batch, len, _] = embeds.dims();
        let (world, rank) = (self.world(), self.comm.rank());
        let even = (len - 1) / (2 * world) * (2 * world);
        if even > 0 {
            let device = embeds.device();
            let layout = self.layout;
            let local = shard(embeds.clone().narrow(1, 0, even), 1, layout, rank, world)
                .map_err(|e| InferError::Request(e.to_string()))?;
            let positions: Vec<i64> = layout
                .positions(even, rank, world)
                .map_err(|e| InferError::Request(e.to_string()))?
                .into_iter()
                .map(|p| p as i64)
                .collect();
            let local_len = positions.len();
            let positions: Vec<i64> = (0..batch).flat_map(|_| positions.clone()).collect();
            let positions = Tensor::<2, Int>::from_data(
                TensorData::new(positions, [batch, local_len]),
                &device,
            );
            let sharded = model
                .clone()
                .with_attention(model.vision_attention(), AttentionImpl::Sharded);
            let _installed = crate::model::install(
                self.prefill.clone(),
                true,
                self.scale,
                "sequence-parallel prefill",
            );
            sharded.text_layers_cached(local, positions, &mut cache.local);
            cache.counts = vec![even / world; world];
        }
        let tail = embeds.narrow(1, even, len - even);
        let hidden = self.extend(model, tail, cache)?;
        let rows = hidden.dims()[1];
        Ok(hidden.narrow(1, rows - 1, 1))
    }

    /// Runs new rows `embeds` (`[batch, new, hidden]`, the same on every rank) that
    /// continue the sequence in `cache`: their keys and values go to
    /// [`ShardedCache::owner`]; returns the last layer's output at every new row, the
    /// same on every rank.
    pub fn extend(
        &self,
        model: &Vlm,
        embeds: Tensor<3>,
        cache: &mut ShardedCache,
    ) -> Result<Tensor<3>, InferError> {
        let [batch, new, _] = embeds.dims();
        let device = embeds.device();
        let owner = cache.owner();
        let mine = owner == self.comm.rank();
        let first = cache.total() as i64;
        let positions: Vec<i64> = (0..batch).flat_map(|_| first..first + new as i64).collect();
        let rope = model.text_context(Tensor::<2, Int>::from_data(
            TensorData::new(positions, [batch, new]),
            &device,
        ));
        let layers = model.text_layers();
        let mut x = embeds;
        for (l, layer) in layers.iter().enumerate() {
            let input = layer.attention_input(x.clone(), &rope);
            if mine {
                cache
                    .local
                    .append(l, layers.len(), input.k.clone(), input.v.clone());
            }
            let [_, heads, _, head_dim] = input.q.dims();
            let (o, lse) = match cache.local.layer(l) {
                Some((k, v)) => block_forward(&Block {
                    q: input.q.clone(),
                    k,
                    v,
                    // Every cached key precedes the new rows; the owner's last `new`
                    // keys are the new rows' own, seen causally.
                    causal: mine,
                    scale: input.scale,
                    segments: None,
                }),
                None => (
                    Tensor::zeros([batch, heads, new, head_dim], &device),
                    Tensor::full([batch, heads, new], f32::NEG_INFINITY, &device),
                ),
            };
            let merged = self.gather_merge(o, lse)?;
            x = layer.after_attention(x, merged.cast(input.q.dtype()));
        }
        if mine {
            cache.local.advance(new);
        }
        cache.counts[owner] += new;
        Ok(x)
    }

    /// Every rank's partial attention output `o` (`[batch, heads, rows, head_dim]`)
    /// with its `lse` gathered and merged in rank order: the attention over the keys
    /// of all ranks, the same on every rank.
    fn gather_merge(&self, o: Tensor<4>, lse: Tensor<3>) -> Result<Tensor<4>, InferError> {
        let batch = o.dims()[0];
        let o = self
            .comm
            .all_gather(o, 0)
            .map_err(comm_error("gathering O"))?;
        let lse = self
            .comm
            .all_gather(lse, 0)
            .map_err(comm_error("gathering LSE"))?;
        let part = |r: usize| {
            (
                o.clone().narrow(0, r * batch, batch),
                lse.clone().narrow(0, r * batch, batch),
            )
        };
        let (merged, _) = (1..self.world()).fold(part(0), |acc, r| merge(acc, part(r)));
        Ok(merged)
    }

    /// [`longview_infer::generate::generate_group`] over the group: the prompt is
    /// embedded on every rank, prefilled sequence-parallel, and the samples decode
    /// against the sharded cache. Every rank returns the same generations, equal to
    /// the single-device ones up to float rounding in the attention's merge order.
    pub fn generate_group(
        &self,
        model: &Vlm,
        prompt: &[u32],
        visual: VisualInput,
        samples: &[Decoding],
        options: &GenerateOptions,
        device: &Device,
    ) -> Result<Vec<Generation>, InferError> {
        check_request(prompt, samples, options.max_new_tokens)?;
        // Each rank holds about 1/P of the cache; the estimate is per rank.
        let per_rank = prompt.len().div_ceil(self.world());
        check_memory(model, per_rank, samples.len(), options, device)?;
        let (mut cache, first) = self.prefill_prompt(model, prompt, visual, device)?;
        cache.local = std::mem::take(&mut cache.local).repeat(samples.len());
        let mut rows = samples.len();
        decode_group(first, samples, options, |tokens, kept| {
            if kept.len() != rows {
                cache.local = cache.local.select(kept);
                rows = kept.len();
            }
            let n = tokens.len();
            let ids = Tensor::<2, Int>::from_data(TensorData::new(tokens.to_vec(), [n, 1]), device);
            let hidden = self.extend(model, model.embed_tokens(ids), &mut cache)?;
            next_token_rows(model, hidden)
        })
    }

    /// `prompt` (its visual tokens spliced in) prefilled sequence-parallel into a new
    /// sharded cache: the cache and the next-token logits after the prompt
    /// (`longview_infer::generate::next_token_rows`: the visual placeholder masked), the same
    /// on every rank (what `longview_infer::generate::prefill_prompt` gives on one
    /// device).
    pub fn prefill_prompt(
        &self,
        model: &Vlm,
        prompt: &[u32],
        visual: VisualInput,
        device: &Device,
    ) -> Result<(ShardedCache, Vec<f32>), InferError> {
        let embeds = embed_prompt(model, prompt, visual, DEFAULT_FRAME_BATCH, device)?;
        let mut cache = ShardedCache::new(self.world());
        let last = self.prefill(model, embeds, &mut cache)?;
        Ok((cache, next_token_rows(model, last)?.remove(0)))
    }

    /// The next-token logits after `prompt` (its visual tokens spliced in), prefilled
    /// sequence-parallel: what [`longview_infer::generate::prefill_prompt`] returns on
    /// one device, the same on every rank.
    pub fn last_logits(
        &self,
        model: &Vlm,
        prompt: &[u32],
        visual: VisualInput,
        device: &Device,
    ) -> Result<Vec<f32>, InferError> {
        if prompt.is_empty() {
            return Err(InferError::Request(
                "an empty prompt has no next token".into(),
            ));
        }
        // Each rank runs its whole share of the prompt at once.
        let per_rank = prompt.len().div_ceil(self.world());
        longview_infer::prefill::check_request_fits(
            model,
            (per_rank, 0, 1),
            per_rank,
            None,
            device,
        )?;
        Ok(self.prefill_prompt(model, prompt, visual, device)?.1)
    }

    /// The argmax ids at the `answer_len` rows that predict `sample`'s answer (rows
    /// `prompt_len - 1 ..`): the prompt prefilled sequence-parallel, the answer's
    /// rows run through the decode path. The same on every rank.
    pub fn teacher_forced_ids(
        &self,
        model: &Vlm,
        sample: &longview_infer::sample::Sample,
        answer_len: usize,
        device: &Device,
    ) -> Result<Vec<u32>, InferError> {
        let visual = longview_infer::needle::sample_visual(sample, device);
        let embeds = embed_prompt(model, &sample.ids, visual, DEFAULT_FRAME_BATCH, device)?;
        let start = sample.prompt_len;
        let mut cache = ShardedCache::new(self.world());
        let mut rows = vec![self.prefill(model, embeds.clone().narrow(1, 0, start), &mut cache)?];
        if answer_len > 1 {
            let rest = embeds.narrow(1, start, answer_len - 1);
            rows.push(self.extend(model, rest, &mut cache)?);
        }
        Ok(longview_infer::needle::argmax_ids(
            model.logits(Tensor::cat(rows, 1)),
        ))
    }
}
