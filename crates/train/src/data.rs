//! Samples for training and evaluation: generated needle-in-a-haystack videos decoded
//! with FFmpeg at the encoder's resolution, wrapped in the Qwen2 chat template, and
//! batched (right-padded, padding unsupervised) into model inputs.

use std::path::Path;

use burn::tensor::{Device, Int, Tensor, TensorData};
use longview_data::synthetic::{HaystackSample, HaystackSpec, write_haystack_set};
use longview_data::text::IGNORE_INDEX;
use longview_data::{
    ChatTemplate, DecodeOptions, Media, Message, Sampling, TextTokenizer, decode_all,
};
use longview_models::vila::default_position_ids;
use longview_models::{VisualInput, VlmConfig, VlmInput};

use crate::error::TrainError;

/// The question every haystack sample asks.
pub const NEEDLE_QUESTION: &str = "What number appears in the video? Answer with the number only.";

/// One tokenized conversation with its frames.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Prompt and answer ids, visual placeholders expanded.
    pub ids: Vec<u32>,
    /// Aligned with `ids`; [`IGNORE_INDEX`] where unsupervised.
    pub labels: Vec<i64>,
    /// Length of the prompt (everything before the answer's first token).
    pub prompt_len: usize,
    /// Planar `[frames, 3, height, width]` in `[-1, 1]`.
    pub pixels: Vec<f32>,
    pub frames: usize,
    /// Frame side in pixels.
    pub side: usize,
    /// The answer text (for exact-match scoring).
    pub answer: String,
    /// Needle depth in the video (haystack samples).
    pub depth: f64,
}

impl Sample {
    /// Supervised next-token targets (labels after the first position).
    pub fn supervised(&self) -> usize {
        self.labels
            .iter()
            .skip(1)
            .filter(|&&l| l != IGNORE_INDEX)
            .count()
    }
}

/// Frame geometry and tokenization shared by all samples.
pub struct Encoder<'a> {
    pub tokenizer: &'a TextTokenizer,
    pub template: ChatTemplate,
    pub model: &'a VlmConfig,
    pub width: u32,
    pub height: u32,
}

impl Encoder<'_> {
    /// Decodes every frame of `video` and encodes the conversation around it.
    pub fn sample(
        &self,
        video: &Path,
        frames: usize,
        question: &str,
        answer: &str,
        depth: f64,
    ) -> Result<Sample, TrainError> {
        let side = self.model.vision.image_size as u32;
        let options = DecodeOptions {
            workers: 1,
            ..DecodeOptions::siglip(side)
        };
        let (_, batch) = decode_all(video, &Sampling::Uniform { count: frames }, &options)?;
        let messages = [
            Message::user(format!("<video>\n{question}")),
            Message::assistant(answer),
        ];
        let encoded = self.template.encode(
            self.tokenizer,
            &messages,
            &[Media::Video { frames }],
            self.model.tokens_per_frame(),
            false,
        )?;
        let prompt_len = encoded
            .labels
            .iter()
            .position(|&l| l != IGNORE_INDEX)
            .unwrap_or(encoded.labels.len());
        Ok(Sample {
            ids: encoded.ids,
            labels: encoded.labels,
            prompt_len,
            pixels: batch.pixels,
            frames,
            side: side as usize,
            answer: answer.into(),
            depth,
        })
    }
}

/// Training and held-out haystack samples.
pub struct HaystackData {
    pub train: Vec<Sample>,
    pub eval: Vec<Sample>,
}

/// The haystack lengths of the training set: `min_frames`, doubling, up to `frames`.
pub fn train_lengths(min_frames: usize, frames: usize) -> Vec<usize> {
    let mut lengths = Vec::new();
    let mut n = min_frames.clamp(1, frames);
    while n < frames {
        lengths.push(n);
        n *= 2;
    }
    lengths.push(frames);
    lengths
}

/// Generates (or reuses) the haystack videos in `dir` and decodes them.
///
/// Training videos put the needle at 11 evenly spaced depths, in haystacks of every
/// length of [`train_lengths`] (equal shares, interleaved); held-out videos are
/// `frames` long and use LongVILA's grid {0, .2, .4, .6, .8, 1} with another seed.
pub fn haystack(
    encoder: &Encoder<'_>,
    dir: &Path,
    frames: usize,
    min_frames: usize,
    train_videos: usize,
    eval_per_depth: usize,
    seed: u64,
) -> Result<HaystackData, TrainError> {
    let train_depths: Vec<f64> = (0..=10).map(|i| i as f64 / 10.0).collect();
    let eval_depths: Vec<f64> = (0..=5).map(|i| i as f64 / 5.0).collect();
    let spec = |frames: usize, depths: Vec<f64>, per_depth: usize, seed: u64| HaystackSpec {
        width: encoder.width,
        height: encoder.height,
        fps: 8,
        frames,
        gop: 32,
        depths,
        per_depth,
        seed,
    };
    let load = |dir: &Path, rows: &[HaystackSample]| -> Result<Vec<Sample>, TrainError> {
        rows.iter()
            .map(|r| {
                encoder.sample(
                    &dir.join(&r.video),
                    r.frames,
                    NEEDLE_QUESTION,
                    &r.answer,
                    r.depth,
                )
            })
            .collect()
    };
    let mut per_length: Vec<Vec<Sample>> = Vec::new();
    if train_videos > 0 {
        let lengths = train_lengths(min_frames, frames);
        let per_depth = train_videos.div_ceil(train_depths.len() * lengths.len());
        for &n in &lengths {
            let train_dir = dir.join(format!(
                "train-{n}f-{}x{}-{per_depth}x11-seed{seed}",
                encoder.width, encoder.height
            ));
            let rows = rows(
                &train_dir,
                &spec(n, train_depths.clone(), per_depth, seed + n as u64),
            )?;
            // Rows come depth by depth: interleave the depths.
            let mut rows: Vec<(usize, HaystackSample)> = rows.into_iter().enumerate().collect();
            rows.sort_by_key(|(i, _)| (i % per_depth, i / per_depth));
            let rows: Vec<HaystackSample> = rows.into_iter().map(|(_, r)| r).collect();
            per_length.push(load(&train_dir, &rows)?);
        }
    }
    // Interleave the lengths, then keep the requested count.
    let longest = per_length.iter().map(Vec::len).max().unwrap_or(0);
    let mut train = Vec::with_capacity(train_videos);
    for i in 0..longest {
        for set in &mut per_length {
            if i < set.len() {
                train.push(set[i].clone());
            }
        }
    }
    train.truncate(train_videos);
    let eval = if eval_per_depth == 0 {
        Vec::new()
    } else {
        let eval_seed = seed + 1_000_003;
        let eval_dir = dir.join(format!(
            "eval-{frames}f-{}x{}-{eval_per_depth}x6-seed{eval_seed}",
            encoder.width, encoder.height
        ));
        let rows = rows(
            &eval_dir,
            &spec(frames, eval_depths, eval_per_depth, eval_seed),
        )?;
        load(&eval_dir, &rows)?
    };
    Ok(HaystackData { train, eval })
}

/// The rows of a generated set, writing it first unless a complete one is there
/// (`haystack.jsonl` is renamed into place last, so its presence means complete).
fn rows(dir: &Path, spec: &HaystackSpec) -> Result<Vec<HaystackSample>, TrainError> {
    let index = dir.join("haystack.jsonl");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(TrainError::io(&index))?;
        let parsed: Result<Vec<HaystackSample>, _> =
            text.lines().map(serde_json::from_str).collect();
        if let Ok(rows) = parsed
            && rows.len() == spec.depths.len() * spec.per_depth
            && rows.iter().all(|r| dir.join(&r.video).exists())
        {
            return Ok(rows);
        }
    }
    Ok(write_haystack_set(dir, spec)?)
}

/// The frames `sampling` picks from `video`, decoded at a square `side` x `side`
/// SigLIP input: `[frames, 3, side, side]` and the source frame indices.
pub fn decode_frames(
    video: &Path,
    sampling: &Sampling,
    side: usize,
    device: &Device,
) -> Result<(Tensor<4>, Vec<usize>), TrainError> {
    let (_, batch) = decode_all(video, sampling, &DecodeOptions::siglip(side as u32))?;
    let frames = batch.frames.len();
    let pixels = Tensor::from_data(
        TensorData::new(batch.pixels, [frames, 3, side, side]),
        device,
    );
    Ok((pixels, batch.frames.iter().map(|f| f.index).collect()))
}

/// One unpadded sequence as model input: `ids` at positions `0..len`.
pub fn single_input(ids: &[u32], visual: VisualInput, device: &Device) -> VlmInput {
    let len = ids.len();
    VlmInput {
        input_ids: Tensor::from_data(
            TensorData::new(ids.iter().map(|&t| t as i64).collect(), [1, len]),
            device,
        ),
        position_ids: default_position_ids(1, len, device),
        visual,
    }
}

/// Model inputs and labels of a micro-batch.
pub struct Batch {
    pub input: VlmInput,
    pub labels: Tensor<2, Int>,
    /// Supervised next-token targets in the batch.
    pub supervised: usize,
}

/// Right-pads `samples` to one length (padding id 0, unsupervised) and stacks frames.
pub fn collate(samples: &[&Sample], device: &Device) -> Batch {
    let len = samples.iter().map(|s| s.ids.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(samples.len() * len);
    let mut labels = Vec::with_capacity(samples.len() * len);
    let mut pixels = Vec::new();
    let mut frames = 0;
    let side = samples.first().map_or(0, |s| s.side);
    for s in samples {
        ids.extend(s.ids.iter().map(|&t| t as i64));
        ids.extend(std::iter::repeat_n(0, len - s.ids.len()));
        labels.extend(&s.labels);
        labels.extend(std::iter::repeat_n(IGNORE_INDEX, len - s.labels.len()));
        pixels.extend_from_slice(&s.pixels);
        frames += s.frames;
    }
    let b = samples.len();
    let visual = if frames == 0 {
        VisualInput::None
    } else {
        VisualInput::Pixels(Tensor::from_data(
            TensorData::new(pixels, [frames, 3, side, side]),
            device,
        ))
    };
    Batch {
        input: VlmInput {
            input_ids: Tensor::from_data(TensorData::new(ids, [b, len]), device),
            position_ids: default_position_ids(b, len, device),
            visual,
        },
        labels: Tensor::from_data(TensorData::new(labels, [b, len]), device),
        supervised: samples.iter().map(|s| s.supervised()).sum(),
    }
}

/// Position `i` of the data stream: epoch `i / n` visits the samples in a seeded
/// permutation, so a resumed run sees exactly what an uninterrupted one would.
pub fn stream_index(seed: u64, n: usize, i: usize) -> usize {
    let epoch = (i / n) as u64;
    let mut order: Vec<usize> = (0..n).collect();
    let mut state =
        (seed ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03)).wrapping_add(0x9E37_79B9_7F4A_7C15) | 1;
    for k in (1..n).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        order.swap(k, (state % (k as u64 + 1)) as usize);
    }
    order[i % n]
}
