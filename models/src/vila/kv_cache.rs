//! The KV cache of autoregressive decoding: every layer's keys and values (after
//! RoPE) of the tokens run so far, with the batch operations batched generation
//! needs (one prompt's cache shared by several samples, finished sequences dropped).
//!
//! Each layer keeps its keys and values in buffers with room for more tokens: a new
//! token is written into the free room (`slice_assign`, in place while the cache is
//! the buffers' only owner) and attention reads a view of the filled part. Appending
//! by concatenation instead copies the whole cache of every layer for every token.
//! [`KvCache::reserve`] sizes the buffers for a known total (prompt plus answer), so
//! they are allocated once; without it they grow by half their size when full.

use burn::tensor::{Device, Int, Tensor, TensorData};

/// Buffers grow to at least this many tokens (and then by half their size).
const MIN_CAPACITY: usize = 256;

/// One layer's cached keys and values (after RoPE): buffers of
/// `[batch, kv_heads, capacity, head_dim]` of which the first `len` tokens are filled.
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    buffers: Option<(Tensor<4>, Tensor<4>)>,
    len: usize,
    /// Tokens to allocate for at the next growth ([`KvCache::reserve`]).
    reserve: usize,
}

impl LayerCache {
    /// Tokens cached in this layer.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Tokens the buffers hold room for (0 while empty).
    pub fn capacity(&self) -> usize {
        self.buffers.as_ref().map_or(0, |(k, _)| k.dims()[2])
    }

    /// The cached keys and values, `[batch, kv_heads, len, head_dim]` (views of the
    /// buffers; `None` while empty).
    pub fn get(&self) -> Option<(Tensor<4>, Tensor<4>)> {
        let (k, v) = self.buffers.as_ref()?;
        let len = self.len;
        Some((k.clone().narrow(2, 0, len), v.clone().narrow(2, 0, len)))
    }

    /// Appends the keys and values of new tokens (`[batch, kv_heads, new, head_dim]`)
    /// and returns all cached ones, as [`LayerCache::get`] does.
    pub fn append(&mut self, k: Tensor<4>, v: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let [b, h, new, d] = k.dims();
        if new == 0 && self.buffers.is_none() {
            // Nothing cached and nothing to cache: no buffer to allocate yet.
            return (k, v);
        }
        let needed = self.len + new;
        if needed > self.capacity() {
            let grown = (self.capacity() + self.capacity() / 2)
                .max(needed)
                .max(self.reserve)
                .max(MIN_CAPACITY);
            let (dtype, device) = (k.dtype(), k.device());
            let empty = || Tensor::<4>::zeros([b, h, grown, d], (&device, dtype));
            let (mut kb, mut vb) = (empty(), empty());
            if let Some((old_k, old_v)) = self.get() {
                kb = kb.slice_assign([0..b, 0..h, 0..self.len, 0..d], old_k);
                vb = vb.slice_assign([0..b, 0..h, 0..self.len, 0..d], old_v);
            }
            self.buffers = Some((kb, vb));
        }
        let (kb, vb) = self.buffers.take().expect("allocated above");
        let at = [0..b, 0..h, self.len..needed, 0..d];
        self.buffers = Some((kb.slice_assign(at.clone(), k), vb.slice_assign(at, v)));
        self.len = needed;
        self.get().expect("just filled")
    }

    /// An empty cache whose buffers, once a token comes, hold room for `tokens`.
    pub fn reserved(tokens: usize) -> Self {
        LayerCache {
            reserve: tokens,
            ..LayerCache::default()
        }
    }

    /// The rows `index` of the batch (in that order, [`row_index`]) in fresh buffers
    /// that grow to at least this cache's capacity.
    pub fn select_rows(&self, index: &Tensor<1, Int>) -> LayerCache {
        match self.get() {
            Some((k, v)) => LayerCache::holding(
                k.select(0, index.clone()),
                v.select(0, index.clone()),
                self.capacity().max(self.reserve),
            ),
            None => self.clone(),
        }
    }

    /// A cache holding exactly `k` and `v` (`[batch, kv_heads, len, head_dim]`), to
    /// grow to at least `reserve` tokens when the next append needs room.
    pub fn holding(k: Tensor<4>, v: Tensor<4>, reserve: usize) -> Self {
        let len = k.dims()[2];
        LayerCache {
            buffers: Some((k, v)),
            len,
            reserve,
        }
    }
}

/// Keys and values of every layer for the tokens processed so far, so that decoding
/// a new token costs one token's forward pass instead of the whole sequence's.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    pub(super) layers: Vec<LayerCache>,
    pub(super) len: usize,
    reserve: usize,
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

    /// Sizes the buffers for `tokens` tokens in all (cached and to come) when they are
    /// next allocated, e.g. the prompt plus the answer's longest length before a
    /// prefill: then decoding never reallocates.
    pub fn reserve(&mut self, tokens: usize) {
        self.reserve = tokens;
        for layer in &mut self.layers {
            layer.reserve = tokens;
        }
    }

    /// Layer `layer`'s cache, `len` tokens of it filled.
    pub fn layer_cache(&mut self, layer: usize, layers: usize) -> &mut LayerCache {
        if self.layers.len() < layers {
            let reserve = self.reserve;
            self.layers
                .resize_with(layers, || LayerCache::reserved(reserve));
        }
        &mut self.layers[layer]
    }

    /// Layer `layer`'s cached keys and values, `[batch, kv_heads, len, head_dim]`
    /// (`None` while that layer holds nothing).
    pub fn layer(&self, layer: usize) -> Option<(Tensor<4>, Tensor<4>)> {
        self.layers.get(layer).and_then(LayerCache::get)
    }

    /// Appends keys and values of new tokens to layer `layer` (of `layers`). The
    /// token count ([`KvCache::len`]) moves with [`KvCache::advance`], once per step
    /// for all layers.
    pub fn append(&mut self, layer: usize, layers: usize, k: Tensor<4>, v: Tensor<4>) {
        self.layer_cache(layer, layers).append(k, v);
    }

    /// Counts `new` more tokens as cached (after [`KvCache::append`] on every layer).
    pub fn advance(&mut self, new: usize) {
        self.len += new;
    }

    /// Sequences in the cache's batch (0 while empty).
    pub fn batch(&self) -> usize {
        self.layers
            .iter()
            .find_map(LayerCache::get)
            .map_or(0, |(k, _)| k.dims()[0])
    }

    /// Every layer's key and value buffers, `[batch, kv_heads, capacity, head_dim]`
    /// with the cached tokens first and room for at least `capacity` tokens: the
    /// buffers themselves where they hold that much, else copies that do. What a
    /// decoding step whose length lives on the device writes and reads
    /// (`Vlm::decode_counted`). `None` while a layer holds nothing.
    pub fn into_buffers(self, capacity: usize) -> Option<Vec<(Tensor<4>, Tensor<4>)>> {
        let len = self.len;
        self.layers
            .into_iter()
            .map(|layer| {
                let (k, v) = layer.buffers?;
                if k.dims()[2] >= capacity.max(len) {
                    return Some((k, v));
                }
                let grown = |t: Tensor<4>| {
                    let [b, h, _, d] = t.dims();
                    let room =
                        Tensor::<4>::zeros([b, h, capacity.max(len), d], (&t.device(), t.dtype()));
                    room.slice_assign([0..b, 0..h, 0..len, 0..d], t.narrow(2, 0, len))
                };
                Some((grown(k), grown(v)))
            })
            .collect()
    }

    /// The cache of every sequence repeated `times` (sequence `i` becomes rows
    /// `i * times .. (i + 1) * times`): one prompt's prefill shared by `times` samples.
    /// Consumes the cache, so that with `times == 1` its buffers stay singly owned and
    /// appends keep writing in place.
    pub fn repeat(self, times: usize) -> KvCache {
        if times == 1 {
            return self;
        }
        let repeat = |t: Tensor<4>| {
            let [b, h, s, d] = t.dims();
            t.unsqueeze_dim::<5>(1)
                .expand([b, times, h, s, d])
                .reshape([b * times, h, s, d])
        };
        self.map(|k, v| (repeat(k), repeat(v)))
    }

    /// The cache of the sequences `rows` (in that order), e.g. those still generating.
    pub fn select(&self, rows: &[usize]) -> KvCache {
        let Some((first, _)) = self.layers.iter().find_map(LayerCache::get) else {
            return self.clone();
        };
        let index = row_index(rows, &first.device());
        KvCache {
            layers: self.layers.iter().map(|l| l.select_rows(&index)).collect(),
            len: self.len,
            reserve: self.reserve,
        }
    }

    /// Every layer's filled keys and values through `f`, into fresh buffers.
    fn map(&self, f: impl Fn(Tensor<4>, Tensor<4>) -> (Tensor<4>, Tensor<4>)) -> KvCache {
        let layers = self
            .layers
            .iter()
            .map(|l| match l.get() {
                Some((k, v)) => {
                    let (k, v) = f(k, v);
                    LayerCache::holding(k, v, l.reserve)
                }
                None => LayerCache::reserved(l.reserve),
            })
            .collect();
        KvCache {
            layers,
            len: self.len,
            reserve: self.reserve,
        }
    }
}

/// `rows` as the index tensor [`LayerCache::select_rows`] takes.
pub fn row_index(rows: &[usize], device: &Device) -> Tensor<1, Int> {
    let rows: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
    let n = rows.len();
    Tensor::from_data(TensorData::new(rows, [n]), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `[batch, heads, len, dim]` with every value distinct (`base` + its index).
    fn counting(shape: [usize; 4], base: f32) -> Tensor<4> {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|i| base + i as f32).collect();
        Tensor::from_data(TensorData::new(values, shape), &Device::flex())
    }

    fn host(t: Tensor<4>) -> (Vec<usize>, Vec<f32>) {
        (
            t.dims().to_vec(),
            t.into_data().try_to_vec::<f32>().unwrap(),
        )
    }

    /// Pieces of uneven lengths (past the first and later capacities), appended, read
    /// back as their concatenation (the old implementation, kept as the reference).
    #[test]
    fn appends_read_back_as_the_concatenation() {
        let mut layer = LayerCache::default();
        // Nothing appended to an empty cache leaves it empty.
        let (k0, _) = layer.append(counting([2, 3, 0, 4], 0.0), counting([2, 3, 0, 4], 0.0));
        assert_eq!((k0.dims()[2], layer.len(), layer.capacity()), (0, 0, 0));
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        let mut capacities = Vec::new();
        for (i, new) in [1, 300, 7, 1, 1, 200, 0, 5].into_iter().enumerate() {
            let k = counting([2, 3, new, 4], 10_000.0 * i as f32);
            let v = counting([2, 3, new, 4], -10_000.0 * i as f32);
            keys.push(k.clone());
            values.push(v.clone());
            let (all_k, all_v) = layer.append(k, v);
            assert_eq!(host(all_k), host(Tensor::cat(keys.clone(), 2)));
            assert_eq!(host(all_v), host(Tensor::cat(values.clone(), 2)));
            capacities.push(layer.capacity());
        }
        assert_eq!(layer.len(), 515);
        // Lengths 1, 301, 308, 309, 310, 510, 510, 515: 256 first; 301 needs more, half
        // again is 384; 510 needs more, half again is 576.
        assert_eq!(capacities, [256, 384, 384, 384, 384, 576, 576, 576]);
    }

    /// Two clones of one cache share its buffers; each then appends other values at
    /// the same positions and reads back its own (appends write in place only while
    /// the cache owns its buffers alone), and a view taken before keeps its values.
    #[test]
    fn clones_append_without_writing_into_each_other() {
        let mut layer = LayerCache::default();
        layer.append(counting([1, 1, 3, 2], 0.0), counting([1, 1, 3, 2], 0.0));
        let before = layer.get().unwrap().0;
        let mut other = layer.clone();
        layer.append(counting([1, 1, 2, 2], 50.0), counting([1, 1, 2, 2], 50.0));
        other.append(counting([1, 1, 2, 2], 90.0), counting([1, 1, 2, 2], 90.0));
        let first: Vec<f32> = (0..6).map(|i| i as f32).collect();
        let tail = |base: f32| (0..4).map(move |i| base + i as f32);
        let want = |base| first.iter().copied().chain(tail(base)).collect::<Vec<_>>();
        assert_eq!(host(layer.get().unwrap().0).1, want(50.0));
        assert_eq!(host(other.get().unwrap().0).1, want(90.0));
        assert_eq!(host(before).1, first);
    }

    #[test]
    fn reserve_allocates_once_and_repeat_select_keep_rows() {
        let mut cache = KvCache::new();
        cache.reserve(1000);
        let k = counting([2, 1, 10, 2], 0.0);
        cache.append(0, 2, k.clone(), k.clone() * 2.0);
        cache.append(1, 2, k.clone(), k.clone());
        cache.advance(10);
        assert_eq!(cache.layers[0].capacity(), 1000);
        assert_eq!(cache.batch(), 2);
        // Rows [a, b] repeated twice are [a, a, b, b]; selecting [3, 0] gives [b, a].
        let picked = cache.clone().repeat(2).select(&[3, 0]);
        let (pk, pv) = picked.layer(0).unwrap();
        let rows = |t: &Tensor<4>, r: usize| t.clone().narrow(0, r, 1);
        assert_eq!(host(rows(&pk, 0)), host(rows(&k, 1)));
        assert_eq!(host(rows(&pk, 1)), host(rows(&k, 0)));
        assert_eq!(host(rows(&pv, 0)), host(rows(&k, 1) * 2.0));
        assert_eq!(picked.len(), 10);
        // The selection keeps the reservation for its next growth.
        let mut picked = picked;
        let one = counting([2, 1, 1, 2], 0.0);
        picked.append(0, 2, one.clone(), one);
        assert_eq!(picked.layers[0].capacity(), 1000);
    }
}
