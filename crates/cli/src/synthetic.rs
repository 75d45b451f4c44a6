//! Generated inputs for the demo and the benchmarks: a batch of "videos" (uniform
//! noise frames at the encoder's resolution) with a prompt, the expanded visual
//! placeholders and an answer; only the answer tokens are supervised.
//!
//! The data pipeline (ffmpeg sampling, tokenizer, datasets) is a separate component;
//! this module only fabricates tensors of the right shapes and layout.

use anyhow::Result;
use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};
use longview_models::VlmConfig;
use longview_models::vila::{IGNORE_INDEX, VisualInput, VlmInput, expand_visual_placeholders};

/// One generated batch.
pub struct SyntheticBatch {
    pub input: VlmInput,
    pub labels: Tensor<2, Int>,
    pub frames: usize,
    /// Sequence length (text + visual tokens) of every row.
    pub seq_len: usize,
    pub visual_tokens: usize,
    pub supervised_tokens: usize,
}

/// Deterministic token ids (a 64-bit LCG), kept clear of the special ids at the top
/// of the vocabulary.
struct TokenStream(u64);

impl TokenStream {
    fn next(&mut self, vocab: u32) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) % (vocab as u64 - 8).max(1)) as u32
    }
}

/// `batch` rows, each with `frames` frames, `text_tokens` prompt tokens and
/// `answer_tokens` supervised answer tokens.
pub fn batch(
    config: &VlmConfig,
    batch: usize,
    frames: usize,
    text_tokens: usize,
    answer_tokens: usize,
    seed: u64,
    device: &Device,
) -> Result<SyntheticBatch> {
    let vocab = config.text.vocab_size as u32;
    let placeholder = config.placeholder_token_id;
    let separator = vocab - 2;
    let media = u32::MAX; // marker replaced by the expansion, never a real id
    let per_frame = config.tokens_per_frame();
    // Under temporal pooling every row's frames form whole groups, so that groups
    // never straddle two rows of the batch.
    let pool = config.temporal_pool();
    if !frames.is_multiple_of(pool) {
        anyhow::bail!(
            "{frames} frames under temporal pooling of {pool} frames: use a multiple of {pool}"
        );
    }
    let mut tokens = TokenStream(seed ^ 0x5eed);
    let mut ids = Vec::new();
    let mut labels = Vec::new();
    let mut seq_len = 0;
    for _ in 0..batch {
        let mut prompt: Vec<u32> = (0..text_tokens / 2).map(|_| tokens.next(vocab)).collect();
        if frames > 0 {
            prompt.push(media);
        }
        prompt.extend((0..text_tokens - text_tokens / 2).map(|_| tokens.next(vocab)));
        let frame_counts: Vec<usize> = if frames > 0 {
            vec![config.visual_frames(frames)]
        } else {
            vec![]
        };
        let prompt = expand_visual_placeholders(
            &prompt,
            media,
            &frame_counts,
            per_frame,
            placeholder,
            Some(separator),
        )?;
        let answer: Vec<u32> = (0..answer_tokens).map(|_| tokens.next(vocab)).collect();
        seq_len = prompt.len() + answer.len();
        labels.extend(std::iter::repeat_n(IGNORE_INDEX, prompt.len()));
        labels.extend(answer.iter().map(|&t| t as i64));
        ids.extend(prompt.into_iter().chain(answer).map(|t| t as i64));
    }
    let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [batch, seq_len]), device);
    let labels = Tensor::<2, Int>::from_data(TensorData::new(labels, [batch, seq_len]), device);
    let side = config.vision.image_size;
    let visual = if frames > 0 {
        VisualInput::Pixels(Tensor::random(
            [batch * frames, config.vision.num_channels, side, side],
            Distribution::Uniform(-1.0, 1.0),
            device,
        ))
    } else {
        VisualInput::None
    };
    let position_ids = longview_models::vila::default_position_ids(batch, seq_len, device);
    Ok(SyntheticBatch {
        input: VlmInput {
            input_ids: ids,
            position_ids,
            visual,
        },
        labels,
        frames: batch * frames,
        seq_len,
        visual_tokens: batch * config.visual_frames(frames) * per_frame,
        // The first answer token is predicted from the last prompt token; all count.
        supervised_tokens: batch * answer_tokens,
    })
}
