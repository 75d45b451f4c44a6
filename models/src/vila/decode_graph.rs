//! A decoding step whose varying inputs live in device buffers, so that it can be
//! captured once as a device graph and replayed for every new token
//! (`longview-infer`'s `graph_decode`; on CUDA one graph launch instead of some twenty
//! kernel launches a layer, each dispatched by the host). The token ids and the
//! position are tensors the host overwrites in place between replays; the KV cache
//! is every layer's whole buffers, written at the position and read up to it by the
//! kernels of `longview_kernels::decode_graph`. Same function as
//! [`Vlm::text_layers_cached`] followed by [`Vlm::logits`] (tests: `tests/flash_model.rs`).

use burn::tensor::{Device, Int, Tensor, TensorData};

use super::Vlm;
use super::rope::Rope;
use crate::attention::{
    AttentionImpl, AttentionInput, SplitAtAttention, fits_flash_decode, flash_available,
};

/// What one decoding step of [`Vlm::decode_counted`] reads and writes.
#[derive(Debug, Clone)]
pub struct DecodeBuffers {
    /// `[rows, 1]`: each row's new token.
    pub ids: Tensor<2, Int>,
    /// `[rows, 1]`: each row's new token's position (its RoPE angle).
    pub positions: Tensor<2, Int>,
    /// `[1]`: the tokens in the layers' buffers before this step (where the step's
    /// keys and values go).
    pub cached: Tensor<1, Int>,
    /// Every layer's keys and values, `[rows, kv_heads, capacity, head_dim]`
    /// ([`super::KvCache::into_buffers`]).
    pub layers: Vec<(Tensor<4>, Tensor<4>)>,
    /// RoPE's frequencies ([`Rope::inv_freq`]).
    pub inv_freq: Tensor<1>,
}

impl Vlm {
    /// Whether [`Vlm::decode_counted`] runs here: the text layers on the flash kernels,
    /// on a CubeCL device, each kv head's query heads few enough for the decode kernel.
    pub fn counted_decoding_applies(&self, device: &Device) -> bool {
        let layers = self.llm.layers();
        let Some(first) = layers.first() else {
            return false;
        };
        let attention = &first.self_attn;
        self.text_attention() == AttentionImpl::Flash
            && flash_available(device)
            && !device.is_autodiff()
            && fits_flash_decode(attention.num_heads / attention.num_kv_heads.max(1))
    }

    /// The buffers of a decoding step over `cache` (consumed) for `rows` sequences,
    /// with room for `capacity` tokens; `None` when the cache is empty.
    pub fn decode_buffers(
        &self,
        cache: super::KvCache,
        rows: usize,
        capacity: usize,
        device: &Device,
    ) -> Option<DecodeBuffers> {
        let layers = cache.into_buffers(capacity)?;
        Some(self.decode_buffers_over(layers, rows, device))
    }

    /// The buffers of a decoding step over `layers` (`[rows, kv_heads, capacity,
    /// head_dim]` each), e.g. new empty ones ([`Vlm::empty_decode_layers`]).
    pub fn decode_buffers_over(
        &self,
        layers: Vec<(Tensor<4>, Tensor<4>)>,
        rows: usize,
        device: &Device,
    ) -> DecodeBuffers {
        DecodeBuffers {
            ids: Tensor::<2, Int>::zeros([rows, 1], device),
            positions: Tensor::<2, Int>::zeros([rows, 1], device),
            cached: Tensor::<1, Int>::zeros([1], device),
            layers,
            inv_freq: Rope::inv_freq(self.llm.head_dim, self.llm.rope_theta, device),
        }
    }

    /// Every text layer's key and value buffers for `rows` sequences of `capacity`
    /// tokens, zeros in the embedding table's dtype.
    pub fn empty_decode_layers(
        &self,
        rows: usize,
        capacity: usize,
        device: &Device,
    ) -> Vec<(Tensor<4>, Tensor<4>)> {
        let dtype = self.llm.model.embed_tokens.weight.val().dtype();
        self.llm
            .layers()
            .iter()
            .map(|layer| {
                let shape = [
                    rows,
                    layer.self_attn.num_kv_heads,
                    capacity,
                    self.llm.head_dim,
                ];
                let empty = || Tensor::<4>::zeros(shape, (device, dtype));
                (empty(), empty())
            })
            .collect()
    }

    /// One decoding step from `buffers`: every row's token (at its position) through
    /// the text layers, its keys and values written into the buffers after the
    /// `cached` tokens and attended to with them, then the final norm and the LM head.
    /// Returns the logits `[rows, 1, vocab]`. Only device operations (no upload, no
    /// read, no shape that depends on the position): what a device graph can capture.
    ///
    /// # Panics
    /// Where [`Vlm::counted_decoding_applies`] does not hold.
    pub fn decode_counted(&self, buffers: &DecodeBuffers) -> Tensor<3> {
        self.decode_counted_with(buffers, |_, _, (o, _)| o)
    }

    /// [`Vlm::decode_counted`] with each layer's attention output chosen by
    /// `attend(layer, q, (O, LSE))` from the attention over the buffers' keys (O in
    /// the model's dtype, LSE f32), e.g. merged with an attention over other keys
    /// (a shared prompt's: `longview-infer`'s `shared_prefix`).
    pub fn decode_counted_with(
        &self,
        buffers: &DecodeBuffers,
        mut attend: impl FnMut(usize, &AttentionInput, (Tensor<4>, Tensor<3>)) -> Tensor<4>,
    ) -> Tensor<3> {
        use kernels::{attention_counted, key_count, write_rows_at};
        let embeds = self.embed_tokens(buffers.ids.clone());
        let rope =
            Rope::from_inv_freq(buffers.positions.clone(), &buffers.inv_freq).cast(embeds.dtype());
        let count = key_count(&buffers.cached, 1);
        let mut x = embeds;
        for (l, (layer, (k, v))) in self.llm.layers().iter().zip(&buffers.layers).enumerate() {
            let input = layer.attention_input(x.clone(), &rope);
            write_rows_at(k, input.k.clone(), &count);
            write_rows_at(v, input.v.clone(), &count);
            let own = attention_counted(input.q.clone(), k, v, &count, input.scale);
            let o = attend(l, &input, own);
            x = layer.after_attention(x, o);
        }
        self.logits(x)
    }
}

impl DecodeBuffers {
    /// Sets the next step's inputs in place (the buffers a captured graph reads):
    /// row `i`'s token `tokens[i]` at position `positions[i]`, its keys and values
    /// after the first `cached` of the buffers.
    ///
    /// # Panics
    /// On a token or position count other than the rows.
    pub fn set_step(&self, tokens: &[i64], positions: &[i64], cached: usize) {
        let rows = self.ids.dims()[0];
        assert!(
            tokens.len() == rows && positions.len() == rows,
            "one token and position a row"
        );
        let device = self.ids.device();
        let column = |values: &[i64]| {
            Tensor::<2, Int>::from_data(TensorData::new(values.to_vec(), [rows, 1]), &device)
        };
        let at = Tensor::<1, Int>::from_data(TensorData::new(vec![cached as i64], [1]), &device);
        kernels::overwrite(&self.ids, column(tokens));
        kernels::overwrite(&self.positions, column(positions));
        kernels::overwrite(&self.cached, at);
    }
}

#[cfg(any(feature = "flash-cuda", feature = "flash-wgpu"))]
mod kernels {
    pub use longview_kernels::decode_graph::{
        attention_counted, key_count, overwrite, write_rows_at,
    };
}

/// Builds without the flash kernels: [`Vlm::counted_decoding_applies`] is false there,
/// so nothing calls these.
#[cfg(not(any(feature = "flash-cuda", feature = "flash-wgpu")))]
mod kernels {
    use burn::tensor::{Int, Tensor};

    const NO_KERNELS: &str = "counted decoding needs a build with the flash kernels \
                              (feature flash-cuda or flash-wgpu)";

    pub fn overwrite<const D: usize>(_: &Tensor<D, Int>, _: Tensor<D, Int>) {
        panic!("{NO_KERNELS}")
    }
    pub fn key_count(_: &Tensor<1, Int>, _: usize) -> Tensor<1, Int> {
        panic!("{NO_KERNELS}")
    }
    pub fn write_rows_at(_: &Tensor<4>, _: Tensor<4>, _: &Tensor<1, Int>) {
        panic!("{NO_KERNELS}")
    }
    pub fn attention_counted(
        _: Tensor<4>,
        _: &Tensor<4>,
        _: &Tensor<4>,
        _: &Tensor<1, Int>,
        _: f64,
    ) -> (Tensor<4>, Tensor<3>) {
        panic!("{NO_KERNELS}")
    }
}
