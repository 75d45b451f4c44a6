//! Autoregressive generation with a KV cache: the prompt (visual tokens included) is
//! run once, then every new token costs one token's forward pass. Greedy decoding or
//! nucleus (top-p) sampling with a temperature and a seed; several samples of one
//! prompt decode as one batch over a shared prefill ([`generate_group`]), each token
//! with its sampling log-probability.

use burn::tensor::{Device, Int, Tensor, TensorData};
use longview_models::{KvCache, VisualInput, Vlm};

use crate::error::InferError;
use crate::graph_decode::{GraphDecoder, graph_decoding};
use crate::prefill::{
    DEFAULT_CHUNK, DEFAULT_FRAME_BATCH, check_request_fits, embed_prompt, positions, prefill,
};

/// How the next token is chosen from the logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decoding {
    /// The most likely token (ties: the lowest id).
    Greedy,
    /// Nucleus sampling: the smallest set of most likely tokens whose probability
    /// reaches `top_p` (after dividing the logits by `temperature`), renormalised and
    /// sampled with a generator seeded by `seed`.
    TopP {
        top_p: f64,
        temperature: f64,
        seed: u64,
    },
}

impl Decoding {
    /// The temperature the logits are divided by (1 for greedy).
    pub fn temperature(&self) -> f64 {
        match *self {
            Decoding::Greedy => 1.0,
            Decoding::TopP { temperature, .. } => temperature,
        }
    }

    /// Checks the sampling parameters; the message names the bad value.
    pub fn validate(&self) -> Result<(), String> {
        if let Decoding::TopP {
            top_p, temperature, ..
        } = *self
        {
            if !(top_p > 0.0 && top_p <= 1.0) {
                return Err(format!("top-p {top_p} must be in (0, 1]"));
            }
            if !(temperature > 0.0 && temperature.is_finite()) {
                return Err(format!(
                    "temperature {temperature} must be positive (use greedy decoding for 0)"
                ));
            }
        }
        Ok(())
    }
}

/// What [`generate`] produces and when it stops.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub decoding: Decoding,
    /// Token ids that end the answer (not included in it).
    pub stop: Vec<u32>,
    /// Prompt rows per prefill chunk ([`crate::prefill`]); 0 runs the prompt in one
    /// pass.
    pub prefill_chunk: usize,
    /// Bytes the request may use on the device; a request whose estimate
    /// ([`crate::prefill::estimate`]) is larger is refused before anything is
    /// allocated. `None`: the memory available now on a CPU device, what the
    /// registered probe says on a GPU ([`crate::prefill::set_device_memory_probe`];
    /// no check without one).
    pub memory_budget: Option<f64>,
}

impl GenerateOptions {
    /// `max_new_tokens` with `decoding`, ending at `stop`, prefill in chunks of
    /// [`DEFAULT_CHUNK`] rows.
    pub fn new(max_new_tokens: usize, decoding: Decoding, stop: Vec<u32>) -> Self {
        GenerateOptions {
            max_new_tokens,
            decoding,
            stop,
            prefill_chunk: DEFAULT_CHUNK,
            memory_budget: None,
        }
    }
}

/// One generated sequence.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Generation {
    /// The new ids (without the stop token).
    pub tokens: Vec<u32>,
    /// Per token, its natural log-probability under `softmax(logits / temperature)`
    /// over the whole vocabulary (before top-p truncation; temperature 1 for greedy):
    /// what a policy-gradient update recomputes and compares against.
    pub logprobs: Vec<f32>,
    /// Whether a stop token ended it (else `max_new_tokens` did).
    pub stopped: bool,
}

/// The ids that end an answer: `<|im_end|>` and `<|endoftext|>` (those the
/// tokenizer has).
pub fn stop_tokens(tokenizer: &longview_data::TextTokenizer) -> Vec<u32> {
    ["<|im_end|>", "<|endoftext|>"]
        .iter()
        .filter_map(|t| tokenizer.token_id(t))
        .collect()
}

/// The generated ids after `prompt` (without the stop token), with the KV cache.
///
/// `visual` holds the frames or visual tokens of the prompt's placeholders.
pub fn generate(
    model: &Vlm,
    prompt: &[u32],
    visual: VisualInput,
    options: &GenerateOptions,
    device: &Device,
) -> Result<Vec<u32>, InferError> {
    let mut group = generate_group(model, prompt, visual, &[options.decoding], options, device)?;
    Ok(group.remove(0).tokens)
}

/// One sequence per entry of `samples` (each with its own decoding, e.g. top-p with
/// its own seed), all continuing `prompt`: the prompt is embedded and prefilled once
/// (in chunks of `options.prefill_chunk` rows), its KV cache shared by every sample,
/// and the samples decode together as one batch that finished ones leave. Sequence
/// `i` equals what [`generate`] gives with `samples[i]`. `options.decoding` is not
/// used.
pub fn generate_group(
    model: &Vlm,
    prompt: &[u32],
    visual: VisualInput,
    samples: &[Decoding],
    options: &GenerateOptions,
    device: &Device,
) -> Result<Vec<Generation>, InferError> {
    check_request(prompt, samples, options.max_new_tokens)?;
    check_memory(model, prompt.len(), samples.len(), options, device)?;
    let room = prompt.len() + options.max_new_tokens;
    let (cache, first) =
        prefill_prompt(model, prompt, visual, options.prefill_chunk, room, device)?;
    let mut cache = cache.repeat(samples.len());
    if graph_decoding(model, device) {
        let mut decoder = GraphDecoder::new(model, cache, room, device)?;
        return decode_group(first, samples, options, |tokens, kept| {
            decoder.step(tokens, kept)
        });
    }
    decode_group(first, samples, options, |tokens, kept| {
        if kept.len() != cache.batch() {
            cache = cache.select(kept);
        }
        decode_step(model, &mut cache, tokens, device)
    })
}

/// `prompt` (with `visual` over its placeholders) prefilled `chunk` rows at a time
/// into a new KV cache with room for `room` tokens (the prompt plus the longest
/// answer: [`KvCache::reserve`]); returns the cache and the logits after the prompt's
/// last token, on the host ([`next_token_rows`]: the visual placeholder masked).
pub fn prefill_prompt(
    model: &Vlm,
    prompt: &[u32],
    visual: VisualInput,
    chunk: usize,
    room: usize,
    device: &Device,
) -> Result<(KvCache, Vec<f32>), InferError> {
    let embeds = embed_prompt(model, prompt, visual, DEFAULT_FRAME_BATCH, device)?;
    let mut cache = KvCache::new();
    cache.reserve(room);
    let last = prefill(model, embeds, chunk, &mut cache, prompt.len() - 1);
    let first = next_token_rows(model, last)?.remove(0);
    Ok((cache, first))
}

/// One decoding step on one device: `tokens[i]` (one per row of `cache`) through the
/// text layers against the cache (extended by one position), and every row's
/// next-token logits on the host.
pub fn decode_step(
    model: &Vlm,
    cache: &mut KvCache,
    tokens: &[i64],
    device: &Device,
) -> Result<Vec<Vec<f32>>, InferError> {
    let logits = decode_logits(model, cache, tokens, device);
    next_token_rows_of(model, logits)
}

/// The device side of [`decode_step`]: every row's logits `[rows, 1, vocab]`, as the
/// operations that compute them are queued (on an asynchronous device nothing waits
/// for them here; reading them back does).
pub fn decode_logits(
    model: &Vlm,
    cache: &mut KvCache,
    tokens: &[i64],
    device: &Device,
) -> Tensor<3> {
    let n = tokens.len();
    let ids = Tensor::<2, Int>::from_data(TensorData::new(tokens.to_vec(), [n, 1]), device);
    let embeds = model.embed_tokens(ids);
    let positions = positions(n, cache.len(), 1, device);
    model.logits(model.text_layers_cached(embeds, positions, cache))
}

/// Where one sequence stops: after `max_new_tokens`, or at a token of `stop` (not
/// included in the answer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub max_new_tokens: usize,
    pub stop: Vec<u32>,
}

/// The decoding loop of a group of samples that share a prompt: `first` are the
/// logits after the prompt; `step(tokens, kept)` runs one token for each sequence
/// still generating (`tokens[i]` continues the cache row `kept[i]` of the previous
/// step's rows) and returns their next logits, in the same order. Whatever runs the
/// model (one device, or sequence-parallel ranks) supplies `step`.
pub fn decode_group(
    first: Vec<f32>,
    samples: &[Decoding],
    options: &GenerateOptions,
    step: impl FnMut(&[i64], &[usize]) -> Result<Vec<Vec<f32>>, InferError>,
) -> Result<Vec<Generation>, InferError> {
    let limits = Limits {
        max_new_tokens: options.max_new_tokens,
        stop: options.stop.clone(),
    };
    let n = samples.len();
    decode_rows(vec![first; n], samples, &vec![limits; n], step)
}

/// [`decode_group`] for sequences that need not share a prompt: sequence `i` starts
/// from the logits `firsts[i]`, decodes with `samples[i]` and stops at `limits[i]`.
pub fn decode_rows(
    firsts: Vec<Vec<f32>>,
    samples: &[Decoding],
    limits: &[Limits],
    mut step: impl FnMut(&[i64], &[usize]) -> Result<Vec<Vec<f32>>, InferError>,
) -> Result<Vec<Generation>, InferError> {
    assert_eq!(firsts.len(), samples.len(), "one first row per sample");
    assert_eq!(limits.len(), samples.len(), "one limit per sample");
    let mut samplers: Vec<Sampler> = samples.iter().map(|&d| Sampler::new(d)).collect();
    let mut out = vec![Generation::default(); samples.len()];
    // Cache row r holds sequence active[r]; rows[r] are its next-token logits.
    let mut active: Vec<usize> = (0..samples.len()).collect();
    let mut rows = firsts;
    loop {
        let (mut still, mut tokens, mut kept) = (Vec::new(), Vec::new(), Vec::new());
        // (cache row, sequence) of every sequence below its length limit.
        let pending: Vec<(usize, usize)> = active
            .iter()
            .enumerate()
            .filter(|&(_, &seq)| out[seq].tokens.len() < limits[seq].max_new_tokens)
            .map(|(row, &seq)| (row, seq))
            .collect();
        let picked = pick_rows(&mut samplers, &rows, &pending);
        // (sequence, cache row, token) of the tokens kept, whose log-probs follow.
        let mut scored = Vec::new();
        for (&(row, seq), token) in pending.iter().zip(picked) {
            let limit = &limits[seq];
            if limit.stop.contains(&token) {
                out[seq].stopped = true;
                continue;
            }
            out[seq].tokens.push(token);
            scored.push((seq, row, token));
            // No forward pass after the last allowed token.
            if out[seq].tokens.len() < limit.max_new_tokens {
                still.push(seq);
                tokens.push(token as i64);
                kept.push(row);
            }
        }
        // The kept tokens' log-probs (a pass over the vocabulary each, ~1-2 ms a row
        // on one core) are computed on other threads while this thread queues the
        // next step and waits for its logits.
        let (logprobs, next) = std::thread::scope(|scope| {
            let jobs: Vec<(&[f32], u32, f64)> = scored
                .iter()
                .map(|&(seq, row, token)| (rows[row].as_slice(), token, samples[seq].temperature()))
                .collect();
            let logprobs = scope.spawn(move || log_probs(&jobs));
            let next = (!still.is_empty()).then(|| step(&tokens, &kept));
            (logprobs.join().expect("a log-prob thread panicked"), next)
        });
        for (&(seq, _, _), logprob) in scored.iter().zip(logprobs) {
            out[seq].logprobs.push(logprob);
        }
        match next {
            None => return Ok(out),
            Some(next) => rows = next?,
        }
        active = still;
    }
}

/// Vocabulary size from which a step's rows are sampled on several threads.
const THREADED_VOCAB: usize = 16_384;

/// The host's thread count, read once (it reads cgroup files on Linux).
fn host_threads() -> usize {
    static HOST_THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *HOST_THREADS.get_or_init(|| std::thread::available_parallelism().map_or(1, usize::from))
}

/// `f` over `work`, in order: on scoped threads when there are several items over a
/// large vocabulary (`vocab`), else on this thread.
fn over_rows<T: Send, R: Send>(
    work: &mut [T],
    vocab: usize,
    f: impl Fn(&mut T) -> R + Sync,
) -> Vec<R> {
    let threads = host_threads().min(work.len());
    if threads < 2 || vocab < THREADED_VOCAB {
        return work.iter_mut().map(f).collect();
    }
    let per_thread = work.len().div_ceil(threads);
    let f = &f;
    std::thread::scope(|scope| {
        let handles: Vec<_> = work
            .chunks_mut(per_thread)
            .map(|chunk| scope.spawn(move || chunk.iter_mut().map(f).collect::<Vec<_>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("a sampling thread panicked"))
            .collect()
    })
}

/// The next token of each `pending` `(cache row, sequence)`, in `pending` order. With
/// several rows over a large vocabulary the rows are sampled on scoped threads (top-p
/// over a flat 151,936-token row takes about 12 ms on one core); every sequence draws
/// from its own sampler, so the tokens do not depend on the thread count.
fn pick_rows(samplers: &mut [Sampler], rows: &[Vec<f32>], pending: &[(usize, usize)]) -> Vec<u32> {
    let mut slots: Vec<Option<&mut Sampler>> = samplers.iter_mut().map(Some).collect();
    let mut work: Vec<(&mut Sampler, &[f32])> = pending
        .iter()
        .map(|&(row, seq)| {
            let sampler = slots[seq].take().expect("one cache row per sequence");
            (sampler, rows[row].as_slice())
        })
        .collect();
    let vocab = rows.first().map_or(0, Vec::len);
    over_rows(&mut work, vocab, |(sampler, row)| sampler.pick(row))
}

/// [`log_prob`] of each `(logits, token, temperature)`, in order (on scoped threads
/// as [`pick_rows`] samples).
fn log_probs(jobs: &[(&[f32], u32, f64)]) -> Vec<f32> {
    let mut work = jobs.to_vec();
    let vocab = jobs.first().map_or(0, |j| j.0.len());
    over_rows(&mut work, vocab, |&mut (row, token, temperature)| {
        log_prob(row, token, temperature)
    })
}

/// Refuses a request with an empty prompt or a bad decoding setting.
pub fn check_request(
    prompt: &[u32],
    samples: &[Decoding],
    max_new_tokens: usize,
) -> Result<(), InferError> {
    for decoding in samples {
        decoding.validate().map_err(InferError::Request)?;
    }
    if prompt.is_empty() {
        return Err(InferError::Request(
            "generation needs a non-empty prompt".into(),
        ));
    }
    let room = MAX_SEQUENCE_TOKENS.saturating_sub(prompt.len());
    if max_new_tokens > room {
        return Err(InferError::Request(format!(
            "max_new_tokens {max_new_tokens} is too large: a {}-token prompt leaves room for \
             {room} new tokens (positions past {MAX_SEQUENCE_TOKENS} have no exact f32 RoPE \
             angle); generation stops at a stop token anyway, so ask for a length you expect",
            prompt.len()
        )));
    }
    Ok(())
}

/// Most positions a sequence (prompt and answer) may have: RoPE computes its angles in
/// f32 from the positions, which are exact integers only up to 2^24.
pub const MAX_SEQUENCE_TOKENS: usize = 1 << 24;

/// Refuses a request whose KV cache and prefill activations would not fit the budget.
pub fn check_memory(
    model: &Vlm,
    prompt: usize,
    samples: usize,
    options: &GenerateOptions,
    device: &Device,
) -> Result<(), InferError> {
    check_request_fits(
        model,
        (prompt, options.max_new_tokens, samples),
        options.prefill_chunk,
        options.memory_budget,
        device,
    )
}

/// The last row of each sequence's logits (`[batch, rows, vocab]`), on the host.
pub fn host_rows(logits: Tensor<3>) -> Result<Vec<Vec<f32>>, InferError> {
    let [batch, rows, vocab] = logits.dims();
    let last = logits
        .slice([0..batch, rows - 1..rows, 0..vocab])
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .map_err(|e| InferError::Request(format!("reading the logits: {e:?}")))?;
    Ok(last.chunks(vocab).map(<[f32]>::to_vec).collect())
}

/// The next-token logits generation samples from, on the host: the last row of
/// each sequence (as [`host_rows`]) with the visual placeholder and the ids from
/// `Vlm::emittable_vocab` on at `MASKED_LOGIT`, as `Vlm::generation_logits` masks
/// them on the device (here on the host rows, no device work in the decoding loop).
pub fn next_token_rows(model: &Vlm, hidden: Tensor<3>) -> Result<Vec<Vec<f32>>, InferError> {
    next_token_rows_of(model, model.logits(hidden))
}

/// [`next_token_rows`] from the logits `[batch, rows, vocab]` already computed.
pub fn next_token_rows_of(model: &Vlm, logits: Tensor<3>) -> Result<Vec<Vec<f32>>, InferError> {
    use longview_models::vila::MASKED_LOGIT;
    let mut rows = host_rows(logits)?;
    let emittable = model.emittable_vocab();
    for row in &mut rows {
        if let Some(x) = row.get_mut(model.placeholder_token_id as usize) {
            *x = MASKED_LOGIT;
        }
        if let Some(tail) = row.get_mut(emittable..) {
            tail.fill(MASKED_LOGIT);
        }
    }
    Ok(rows)
}

/// `log softmax(logits / temperature)[token]`, computed in f64.
pub fn log_prob(logits: &[f32], token: u32, temperature: f64) -> f32 {
    let max = logits
        .iter()
        .copied()
        .filter(|x| !x.is_nan())
        .fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits
        .iter()
        .filter(|x| !x.is_nan())
        .map(|&x| scaled_exp(x, max, temperature))
        .sum();
    ((logits[token as usize] as f64 - max) / temperature - sum.ln()) as f32
}

/// `exp((x - max) / temperature)` in f64, without calling `exp` where it is 0 anyway
/// (below e^-746 f64 underflows: the masked rows of a padded vocabulary).
fn scaled_exp(x: f32, max: f64, temperature: f64) -> f64 {
    let z = (x as f64 - max) / temperature;
    if z < -746.0 { 0.0 } else { z.exp() }
}

/// Picks tokens from host logits.
pub struct Sampler {
    decoding: Decoding,
    seed: u64,
    draws: u64,
}

impl Sampler {
    pub fn new(decoding: Decoding) -> Self {
        let seed = match decoding {
            Decoding::TopP { seed, .. } => seed,
            Decoding::Greedy => 0,
        };
        Sampler {
            decoding,
            seed,
            draws: 0,
        }
    }

    /// A uniform draw in `[0, 1)`: the data stream's splitmix64 hash of the seed and
    /// a counter.
    fn uniform(&mut self) -> f64 {
        self.draws += 1;
        (crate::sample::mix(self.seed, self.draws) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The next token for `logits` (one row over the vocabulary).
    pub fn pick(&mut self, logits: &[f32]) -> u32 {
        match self.decoding {
            Decoding::Greedy => argmax(logits),
            Decoding::TopP {
                top_p, temperature, ..
            } => {
                let nucleus = nucleus(logits, top_p, temperature);
                let mut u = self.uniform();
                for &(id, p) in &nucleus {
                    if u < p {
                        return id;
                    }
                    u -= p;
                }
                nucleus.last().map_or(0, |&(id, _)| id)
            }
        }
    }
}

/// The largest logit's index (the first one on ties; NaN never wins).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] || logits[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

/// The nucleus of `softmax(logits / temperature)`: the most likely tokens, most
/// likely first, until their probability reaches `top_p` (at least one token), with
/// probabilities renormalised to sum to 1. Ties go to the lower id.
///
/// Only the head of the distribution is ordered: the `k` most likely tokens are
/// selected (linear time) and sorted, `k` growing until they hold `top_p` of the
/// mass. A full sort of a 151,936-token vocabulary took 3-9 ms a row on the host,
/// once per sampled token and sequence.
pub fn nucleus(logits: &[f32], top_p: f64, temperature: f64) -> Vec<(u32, f64)> {
    let max = logits
        .iter()
        .copied()
        .filter(|x| !x.is_nan())
        .fold(f32::NEG_INFINITY, f32::max) as f64;
    // Tokens of probability 0 (a masked placeholder, NaN) are never candidates.
    let mut probs: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .filter(|(_, x)| !x.is_nan())
        .map(|(i, &x)| (i as u32, scaled_exp(x, max, temperature)))
        .filter(|&(_, p)| p > 0.0)
        .collect();
    let total: f64 = probs.iter().map(|(_, p)| p).sum();
    let likelier = |a: &(u32, f64), b: &(u32, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let mut k = probs.len().min(256);
    loop {
        if k < probs.len() {
            probs.select_nth_unstable_by(k, likelier);
        }
        probs[..k].sort_unstable_by(likelier);
        let mut kept = Vec::new();
        let mut mass = 0.0;
        for &(id, p) in &probs[..k] {
            let p = p / total;
            kept.push((id, p));
            mass += p;
            if mass >= top_p {
                break;
            }
        }
        if mass >= top_p || k == probs.len() {
            for entry in &mut kept {
                entry.1 /= mass;
            }
            return kept;
        }
        k = (k * 4).min(probs.len());
    }
}
