//! The KV cache of autoregressive decoding: every layer's keys and values (after
//! RoPE) of the tokens run so far, with the batch operations batched generation
//! needs (one prompt's cache shared by several samples, finished sequences dropped).

use burn::tensor::{Int, Tensor, TensorData};

/// One layer's cached keys and values (after RoPE), `[batch, kv_heads, len, head_dim]`.
pub type LayerCache = Option<(Tensor<4>, Tensor<4>)>;

/// Keys and values of every layer for the tokens processed so far, so that decoding
/// a new token costs one token's forward pass instead of the whole sequence's.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    pub(super) layers: Vec<LayerCache>,
    pub(super) len: usize,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Tokens cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Layer `layer`'s cached keys and values, `[batch, kv_heads, len, head_dim]`
    /// (`None` while that layer holds nothing).
    pub fn layer(&self, layer: usize) -> Option<&(Tensor<4>, Tensor<4>)> {
        self.layers.get(layer).and_then(Option::as_ref)
    }

    /// Appends keys and values of new tokens to layer `layer` (of `layers`). The
    /// token count ([`KvCache::len`]) moves with [`KvCache::advance`], once per step
    /// for all layers.
    pub fn append(&mut self, layer: usize, layers: usize, k: Tensor<4>, v: Tensor<4>) {
        if self.layers.len() < layers {
            self.layers.resize(layers, None);
        }
        let slot = &mut self.layers[layer];
        *slot = Some(match slot.take() {
            Some((past_k, past_v)) => (
                Tensor::cat(vec![past_k, k], 2),
                Tensor::cat(vec![past_v, v], 2),
            ),
            None => (k, v),
        });
    }

    /// Counts `new` more tokens as cached (after [`KvCache::append`] on every layer).
    pub fn advance(&mut self, new: usize) {
        self.len += new;
    }

    /// Sequences in the cache's batch (0 while empty).
    pub fn batch(&self) -> usize {
        self.first().map_or(0, |k| k.dims()[0])
    }

    /// The cache of every sequence repeated `times` (sequence `i` becomes rows
    /// `i * times .. (i + 1) * times`): one prompt's prefill shared by `times` samples.
    pub fn repeat(&self, times: usize) -> KvCache {
        let repeat = |t: &Tensor<4>| {
            let [b, h, s, d] = t.dims();
            t.clone()
                .unsqueeze_dim::<5>(1)
                .expand([b, times, h, s, d])
                .reshape([b * times, h, s, d])
        };
        self.map(|(k, v)| (repeat(k), repeat(v)))
    }

    /// The cache of the sequences `rows` (in that order), e.g. those still generating.
    pub fn select(&self, rows: &[usize]) -> KvCache {
        let Some(first) = self.first() else {
            return self.clone();
        };
        let device = first.device();
        let index = Tensor::<1, Int>::from_data(
            TensorData::new(rows.iter().map(|&r| r as i64).collect(), [rows.len()]),
            &device,
        );
        self.map(|(k, v)| {
            (
                k.clone().select(0, index.clone()),
                v.clone().select(0, index.clone()),
            )
        })
    }

    fn first(&self) -> Option<&Tensor<4>> {
        self.layers.iter().flatten().next().map(|(k, _)| k)
    }

    fn map(&self, f: impl Fn(&(Tensor<4>, Tensor<4>)) -> (Tensor<4>, Tensor<4>)) -> KvCache {
        KvCache {
            layers: self.layers.iter().map(|l| l.as_ref().map(&f)).collect(),
            len: self.len,
        }
    }
}
