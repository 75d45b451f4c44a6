//! Samples and batches, shared by training and inference: a conversation tokenized in
//! the Qwen2 chat template around a video's decoded frames, right-padded batches of
//! them, and the frames of a video at the encoder's input size.

use std::path::Path;

use burn::tensor::{Device, Int, Tensor, TensorData};
use longview_data::text::IGNORE_INDEX;
use longview_data::{
    ChatTemplate, DecodeOptions, Media, Message, Sampling, TextTokenizer, decode_all,
};
use longview_models::vila::default_position_ids;
use longview_models::{VisualInput, VlmConfig, VlmInput};

use crate::error::InferError;
pub use crate::pixels::{Pixels, frames_tensor, to_device};

/// The question every haystack sample asks.
pub const NEEDLE_QUESTION: &str = "What number appears in the video? Answer with the number only.";

/// One tokenized conversation with its frames.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// Prompt and answer ids, visual placeholders expanded.
    pub ids: Vec<u32>,
    /// Aligned with `ids`; [`IGNORE_INDEX`] where unsupervised.
    pub labels: Vec<i64>,
    /// Length of the prompt (everything before the answer's first token).
    pub prompt_len: usize,
    /// Planar `[frames, 3, height, width]` in `[-1, 1]`, shared by clones and uploads.
    pub pixels: Pixels,
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
    ) -> Result<Sample, InferError> {
        let pixels = self.decode(video, frames)?;
        self.conversation(pixels, frames, question, answer, depth)
    }

    /// Every one of `frames` uniformly sampled frames of `video`, planar, normalised.
    pub fn decode(&self, video: &Path, frames: usize) -> Result<Vec<f32>, InferError> {
        let options = DecodeOptions {
            workers: 1,
            ..DecodeOptions::siglip(self.side() as u32)
        };
        let (_, batch) = decode_all(video, &Sampling::Uniform { count: frames }, &options)?;
        Ok(batch.pixels)
    }

    pub fn side(&self) -> usize {
        self.model.vision.image_size
    }

    /// The chat-template conversation of one video question around already decoded
    /// `pixels`.
    pub fn conversation(
        &self,
        pixels: impl Into<Pixels>,
        frames: usize,
        question: &str,
        answer: &str,
        depth: f64,
    ) -> Result<Sample, InferError> {
        let messages = [
            Message::user(format!("<video>\n{question}")),
            Message::assistant(answer),
        ];
        self.encode(pixels, &messages, &[Media::Video { frames }], answer, depth)
    }

    /// Any conversation: `media` in marker order, `pixels` their frames in order.
    ///
    /// Under the model's temporal pooling (`k` frames averaged into one frame's
    /// tokens), each video's frames are padded to a multiple of `k` with copies of its
    /// last frame (an image becomes `k` copies of itself) and its placeholders are
    /// those of `ceil(frames / k)` frames, so that samples batched together never pool
    /// across each other's frames.
    pub fn encode(
        &self,
        pixels: impl Into<Pixels>,
        messages: &[Message],
        media: &[Media],
        answer: &str,
        depth: f64,
    ) -> Result<Sample, InferError> {
        let frame_len = 3 * self.side() * self.side();
        let (pixels, media) =
            pad_to_pool(pixels.into(), media, self.model.temporal_pool(), frame_len);
        let frames = pixels.len() / frame_len;
        let encoded = self.template.encode(
            self.tokenizer,
            messages,
            &media,
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
            pixels,
            frames,
            side: self.side(),
            answer: answer.into(),
            depth,
        })
    }
}

/// `pixels` (planar frames of `frame_len` values, `media` in order) with every
/// video's and image's frames padded to a multiple of `k` by repeating its last frame,
/// and the media as the template must expand them: a video of `f` frames as one of
/// `ceil(f / k)` (one frame's tokens per pooled group); images stay images.
pub fn pad_to_pool(
    pixels: Pixels,
    media: &[Media],
    k: usize,
    frame_len: usize,
) -> (Pixels, Vec<Media>) {
    if k <= 1 {
        return (pixels, media.to_vec());
    }
    let expanded = media
        .iter()
        .map(|m| match m {
            Media::Video { frames } => Media::Video {
                frames: frames.div_ceil(k),
            },
            Media::Image => Media::Image,
        })
        .collect();
    if media.iter().all(|m| m.frames() % k == 0) {
        // Whole groups already (a sample encoded again): the same buffer.
        return (pixels, expanded);
    }
    let mut out = Vec::with_capacity(pixels.len());
    let mut at = 0;
    for m in media {
        let f = m.frames();
        let frames = &pixels[at * frame_len..(at + f) * frame_len];
        out.extend_from_slice(frames);
        if f > 0 {
            let last = &frames[(f - 1) * frame_len..];
            for _ in f..f.div_ceil(k) * k {
                out.extend_from_slice(last);
            }
        }
        at += f;
    }
    (out.into(), expanded)
}

/// The frames `sampling` picks from `video`, decoded at a square `side` x `side`
/// SigLIP input: `[frames, 3, side, side]` and the source frame indices.
pub fn decode_frames(
    video: &Path,
    sampling: &Sampling,
    side: usize,
    device: &Device,
) -> Result<(Tensor<4>, Vec<usize>), InferError> {
    let (_, batch) = decode_all(video, sampling, &DecodeOptions::siglip(side as u32))?;
    let frames = batch.frames.len();
    let pixels = to_device(
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

/// Right-pads `samples` to one length (padding id 0, unsupervised) and stacks frames
/// (read in place from a lone sample's buffer, [`frames_tensor`]).
pub fn collate(samples: &[&Sample], device: &Device) -> Batch {
    let len = samples.iter().map(|s| s.ids.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(samples.len() * len);
    let mut labels = Vec::with_capacity(samples.len() * len);
    for s in samples {
        ids.extend(s.ids.iter().map(|&t| t as i64));
        ids.extend(std::iter::repeat_n(0, len - s.ids.len()));
        labels.extend(&s.labels);
        labels.extend(std::iter::repeat_n(IGNORE_INDEX, len - s.labels.len()));
    }
    let frames: usize = samples.iter().map(|s| s.frames).sum();
    let b = samples.len();
    let visual = if frames == 0 {
        VisualInput::None
    } else {
        VisualInput::Pixels(frames_tensor(samples, 0, frames, device))
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

/// splitmix64 of `a` combined with `b`: a stateless, well-mixed hash.
pub fn mix(a: u64, b: u64) -> u64 {
    let mut z = a
        .wrapping_add(b.wrapping_mul(0xBF58_476D_1CE4_E5B9))
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
