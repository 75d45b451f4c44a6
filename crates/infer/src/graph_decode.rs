//! Decoding with each step captured once as a device graph and replayed for every new
//! token. A decoding step of the 1.5B model is some twenty small kernel launches a
//! layer, each dispatched by the host; on CUDA the host's dispatching, not the GPU's
//! work, set the pace (`benchmarks/inference.md`). Captured (`burn::tensor::capture`,
//! a CUDA graph on CUDA), a step is one launch. The step is `Vlm::decode_counted`:
//! its token ids and position live in device buffers the host rewrites between
//! replays, the KV cache in buffers sized for the whole answer. Where the backend
//! cannot capture, `capture` falls back to running the step's operations again at
//! every replay, with the same result.
//!
//! `LONGVIEW_DECODE_GRAPH=0` turns it off ([`graph_decoding_enabled`]); it applies
//! where `Vlm::counted_decoding_applies` holds (flash attention on a CubeCL device):
//! `generate_group` (one prompt's cache, [`GraphDecoder::new`]) and shared-prefix
//! batches (`SharedPrefixBatch::into_graph`: GRPO rollouts, `generate_batch`).

use burn::tensor::{Device, Graph, Tensor, capture};
use longview_models::vila::decode_graph::DecodeBuffers;
use longview_models::{KvCache, Vlm};

use crate::error::InferError;
use crate::generate::next_token_rows_of;

/// A decoding step's device operations, returning the logits `[rows, 1, vocab]`.
pub type Step<'a> = Box<dyn FnMut() -> Tensor<3> + 'a>;

/// Whether decoding runs as captured steps where it can (`LONGVIEW_DECODE_GRAPH`, a
/// switch, on unless set to `0`/`off`/`false`; read once).
pub fn graph_decoding_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| match std::env::var("LONGVIEW_DECODE_GRAPH") {
        Ok(v) => !matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "0" | "off" | "false"
        ),
        Err(_) => true,
    })
}

/// Whether [`GraphDecoder`] decodes `model` on `device`: switched on and
/// `Vlm::counted_decoding_applies`.
pub fn graph_decoding(model: &Vlm, device: &Device) -> bool {
    graph_decoding_enabled() && model.counted_decoding_applies(device)
}

/// The decoding steps of `rows` sequences over KV buffers, captured at the first
/// step and replayed after. Sequences that finish keep their cache row (their step
/// runs on token 0 and nobody reads it): the captured graph's shapes never change.
/// Not `Send`: the replays, the input writes and the reads must all come from the
/// thread that captured (one device stream).
pub struct GraphDecoder<'a> {
    model: &'a Vlm,
    buffers: DecodeBuffers,
    /// The step's operations until the first step captures them.
    step: Option<Step<'a>>,
    graph: Option<Graph<Tensor<3>, Step<'a>>>,
    /// The cache row of each sequence still decoding, in the caller's order.
    live: Vec<usize>,
    /// Per cache row, the position of its next token.
    positions: Vec<usize>,
    /// Tokens in the buffers.
    cached: usize,
    capacity: usize,
    /// Host seconds the capture took (its warm-up runs and the recording).
    capture_s: f64,
}

impl<'a> GraphDecoder<'a> {
    /// Takes over `cache` (its `batch` rows, all of one length) for decoding up to
    /// `capacity` tokens in all (`Vlm::decode_counted`). An error when the cache is
    /// empty or already past the capacity.
    pub fn new(
        model: &'a Vlm,
        cache: KvCache,
        capacity: usize,
        device: &Device,
    ) -> Result<Self, InferError> {
        let (len, rows) = (cache.len(), cache.batch());
        if len == 0 || rows == 0 || len > capacity {
            return Err(InferError::Request(format!(
                "graph decoding needs a filled KV cache within its capacity ({rows} rows of \
                 {len} tokens, capacity {capacity})"
            )));
        }
        let buffers = model
            .decode_buffers(cache, rows, capacity, device)
            .ok_or_else(|| InferError::Request("graph decoding: an empty KV cache".into()))?;
        let step_buffers = buffers.clone();
        let step: Step<'a> = Box::new(move || model.decode_counted(&step_buffers));
        Ok(Self::with_step(model, buffers, vec![len; rows], len, step))
    }

    /// A decoder whose step is `step` (device operations that read and write
    /// `buffers`, e.g. `Vlm::decode_counted_with`): the buffers hold `cached` tokens
    /// and cache row `r`'s next token is at `positions[r]`.
    pub fn with_step(
        model: &'a Vlm,
        buffers: DecodeBuffers,
        positions: Vec<usize>,
        cached: usize,
        step: Step<'a>,
    ) -> Self {
        let capacity = buffers.layers.first().map_or(0, |(k, _)| k.dims()[2]);
        GraphDecoder {
            model,
            buffers,
            step: Some(step),
            graph: None,
            live: (0..positions.len()).collect(),
            positions,
            cached,
            capacity,
            capture_s: 0.0,
        }
    }

    /// Tokens in the buffers (for [`GraphDecoder::new`]: prompt and decoded).
    pub fn len(&self) -> usize {
        self.cached
    }

    pub fn is_empty(&self) -> bool {
        self.cached == 0
    }

    /// Host seconds the first step spent capturing the graph (three warm-up runs of
    /// the step, then its recording), 0 before it.
    pub fn capture_seconds(&self) -> f64 {
        self.capture_s
    }

    /// Whether the steps replay as one device graph (`false`: the backend could not
    /// capture, and each replay runs the step's operations again).
    pub fn is_captured(&self) -> bool {
        self.graph.as_ref().is_some_and(Graph::is_hardware)
    }

    /// Queues one step: `tokens[i]` continues the sequence in row `kept[i]` of the
    /// previous step's rows (as `generate::decode_group`'s step). Returns the logits
    /// of every cache row `[rows, 1, vocab]`, not yet read ([`GraphDecoder::rows_of`]).
    pub fn queue(&mut self, tokens: &[i64], kept: &[usize]) -> Result<Tensor<3>, InferError> {
        if tokens.len() != kept.len() || kept.iter().any(|&r| r >= self.live.len()) {
            return Err(InferError::Request(format!(
                "graph decoding: {} tokens for rows {kept:?} of {}",
                tokens.len(),
                self.live.len()
            )));
        }
        if self.cached >= self.capacity {
            return Err(InferError::Request(format!(
                "graph decoding: the KV buffers' {} positions are full",
                self.capacity
            )));
        }
        self.live = kept.iter().map(|&r| self.live[r]).collect();
        let mut all = vec![0i64; self.positions.len()];
        for (&row, &token) in self.live.iter().zip(tokens) {
            all[row] = token;
        }
        let positions: Vec<i64> = self.positions.iter().map(|&p| p as i64).collect();
        self.buffers.set_step(&all, &positions, self.cached);
        if let Some(step) = self.step.take() {
            // The warm-up runs and the recording write this step's keys and values
            // after the cached ones, as every replay with these inputs does: the same
            // values.
            let device = self.buffers.ids.device();
            let start = std::time::Instant::now();
            self.graph = Some(capture(&device, step));
            self.capture_s = start.elapsed().as_secs_f64();
        }
        let graph = self.graph.as_mut().expect("captured at the first step");
        // SAFETY: the graph's closure owns every buffer it reads or writes (clones of
        // the decode buffers' tensors and whatever else the step holds) and borrows
        // the model for 'a, which outlives this decoder; the buffers are written and
        // the output read on this thread (the decoder is not Send), so on the
        // capture's stream.
        let logits = unsafe { graph.replay() }.clone();
        self.cached += 1;
        for p in &mut self.positions {
            *p += 1;
        }
        Ok(logits)
    }

    /// The host logits of the sequences still decoding (the rows of the last
    /// [`GraphDecoder::queue`]), in the caller's order, masked as generation samples
    /// them (`generate::next_token_rows_of`).
    pub fn rows_of(&self, logits: Tensor<3>) -> Result<Vec<Vec<f32>>, InferError> {
        let mut rows: Vec<Option<Vec<f32>>> = next_token_rows_of(self.model, logits)?
            .into_iter()
            .map(Some)
            .collect();
        Ok(self
            .live
            .iter()
            .map(|&row| rows[row].take().expect("each cache row once"))
            .collect())
    }

    /// [`GraphDecoder::queue`] then [`GraphDecoder::rows_of`].
    pub fn step(&mut self, tokens: &[i64], kept: &[usize]) -> Result<Vec<Vec<f32>>, InferError> {
        let logits = self.queue(tokens, kept)?;
        self.rows_of(logits)
    }
}
