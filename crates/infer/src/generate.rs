//! Autoregressive generation with a KV cache: the prompt (visual tokens included) is
//! run once, then every new token costs one token's forward pass. Greedy decoding or
//! nucleus (top-p) sampling with a temperature and a seed.

use burn::tensor::{Device, Int, Tensor, TensorData};
use longview_models::{KvCache, VisualInput, Vlm, VlmInput};

use crate::error::InferError;
use crate::sample::single_input;

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
    options.decoding.validate().map_err(InferError::Request)?;
    if prompt.is_empty() {
        return Err(InferError::Request(
            "generation needs a non-empty prompt".into(),
        ));
    }
    let mut cache = KvCache::new();
    let mut sampler = Sampler::new(options.decoding);
    let mut logits = model.forward_cached(single_input(prompt, visual, device), &mut cache)?;
    let mut out = Vec::new();
    while out.len() < options.max_new_tokens {
        let [_, new, vocab] = logits.dims();
        let last = logits
            .slice([0..1, new - 1..new, 0..vocab])
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .map_err(|e| InferError::Request(format!("reading the logits: {e:?}")))?;
        let next = sampler.pick(&last);
        if options.stop.contains(&next) {
            break;
        }
        out.push(next);
        if out.len() == options.max_new_tokens {
            break;
        }
        let position = cache.len() as i64;
        let input = VlmInput {
            input_ids: Tensor::<2, Int>::from_data(
                TensorData::new(vec![next as i64], [1, 1]),
                device,
            ),
            position_ids: Tensor::<2, Int>::from_data(
                TensorData::new(vec![position], [1, 1]),
                device,
            ),
            visual: VisualInput::None,
        };
        logits = model.forward_cached(input, &mut cache)?;
    }
    Ok(out)
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
/// probabilities renormalised to sum to 1.
pub fn nucleus(logits: &[f32], top_p: f64, temperature: f64) -> Vec<(u32, f64)> {
    let max = logits
        .iter()
        .copied()
        .filter(|x| !x.is_nan())
        .fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            let p = if x.is_nan() {
                0.0
            } else {
                ((x as f64 - max) / temperature).exp()
            };
            (i as u32, p)
        })
        .collect();
    let total: f64 = probs.iter().map(|(_, p)| p).sum();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut kept = Vec::new();
    let mut mass = 0.0;
    for (id, p) in probs {
        let p = p / total;
        kept.push((id, p));
        mass += p;
        if mass >= top_p {
            break;
        }
    }
    for entry in &mut kept {
        entry.1 /= mass;
    }
    kept
}
