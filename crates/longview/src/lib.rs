//! longview for Rust applications: load a checkpoint, embed a video, ask a question.
//!
//! ```no_run
//! use burn::tensor::Device;
//! use longview::{Sampling, Vlm};
//!
//! # fn main() -> Result<(), longview::Error> {
//! // A run folder (`cargo xtask train` writes runs/debug-haystack), a checkpoint
//! // folder, or a VILA model folder.
//! let vlm = Vlm::load("runs/debug-haystack", &Device::flex())?;
//! let video = vlm.embed_video("talk.mp4", &Sampling::Uniform { count: 64 })?;
//! println!("{} frames, pooled vector of {}", video.frames, video.pooled.len());
//! let answer = vlm.ask(&video, "What number appears in the video?", 8)?;
//! # Ok(()) }
//! ```
//!
//! The video is encoded once ([`Vlm::embed_video`]); every question about it reuses the
//! visual tokens. Answers are greedy ([`Vlm::ask`]) or sampled with top-p
//! ([`Vlm::ask_with`], [`Decoding::TopP`]); generation keeps a KV cache, so each new
//! token costs one token's forward pass.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor};
use longview_data::{ChatTemplate, Media, Message, TextTokenizer};
use longview_infer::prefill::{DEFAULT_FRAME_BATCH, encode_video};
use longview_models::{VisualInput, VlmConfig};

pub use longview_data::Sampling;
pub use longview_infer::generate::{Decoding, GenerateOptions};

/// Everything that can go wrong, with the file or value named.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Model(#[from] longview_models::ModelError),
    #[error(transparent)]
    Data(#[from] longview_data::DataError),
    /// Checkpoint loading, frame decoding and generation (`longview-infer`).
    #[error(transparent)]
    Infer(#[from] longview_infer::InferError),
    #[error("{0}")]
    Request(String),
}

/// Qwen2's chat control tokens, refused inside a question.
const CONTROL_TOKENS: [&str; 3] = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"];

/// A loaded vision-language model with its tokenizer and chat template.
pub struct Vlm {
    model: longview_models::Vlm,
    config: VlmConfig,
    tokenizer: TextTokenizer,
    template: ChatTemplate,
    device: Device,
    dir: PathBuf,
}

/// A video's visual tokens, ready for any number of questions.
#[derive(Debug, Clone)]
pub struct VideoEmbedding {
    /// `[visual_frames, tokens_per_frame, llm_hidden]`: what the LLM reads (one row
    /// per frame, or per group of frames under the projector's temporal pooling).
    pub tokens: Tensor<3>,
    /// Frames decoded from the video.
    pub frames: usize,
    /// Source frame index of every embedded frame.
    pub frame_indices: Vec<usize>,
    /// Mean of all visual tokens: one vector per video (for search or clustering).
    pub pooled: Vec<f32>,
    /// The model folder whose vision tower and projector made these tokens: another
    /// model's questions about them are refused (its LLM reads other tokens). Set it
    /// to another folder to reuse the tokens with a checkpoint that shares this one's
    /// vision tower and projector.
    pub model_dir: PathBuf,
}

impl Vlm {
    /// Loads a run folder (its latest checkpoint), a checkpoint folder or a VILA model
    /// folder (`config.json`, `llm/` with `tokenizer.json`, `vision_tower/`,
    /// `mm_projector/`). For inference: the model lives on `device` without autodiff.
    pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<Self, Error> {
        // Inference keeps no autodiff graph, whatever device the caller hands over.
        let device = device.clone().without_autodiff();
        let loaded = longview_infer::load(path.as_ref(), &device)?;
        Ok(Vlm {
            model: loaded.model,
            config: loaded.config,
            tokenizer: loaded.tokenizer,
            template: ChatTemplate::qwen2(),
            device,
            dir: loaded.dir,
        })
    }

    /// The model's shape.
    pub fn config(&self) -> &VlmConfig {
        &self.config
    }

    /// The model folder that was loaded.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// The underlying Burn module (for custom forward passes).
    pub fn model(&self) -> &longview_models::Vlm {
        &self.model
    }

    /// Decodes the frames `sampling` picks at the encoder's resolution and encodes
    /// them in batches as they arrive (only the visual tokens are kept).
    pub fn embed_video(
        &self,
        path: impl AsRef<Path>,
        sampling: &Sampling,
    ) -> Result<VideoEmbedding, Error> {
        let (tokens, frame_indices) = encode_video(
            &self.model,
            &self.config,
            path.as_ref(),
            sampling,
            DEFAULT_FRAME_BATCH,
            &self.device,
        )?;
        let frames = frame_indices.len();
        // One frame's tokens per group of the projector's temporal pooling.
        let [visual_frames, per_frame, hidden] = tokens.dims();
        let pooled = tokens
            .clone()
            .reshape([visual_frames * per_frame, hidden])
            .mean_dim(0)
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .map_err(|e| Error::Request(format!("reading the pooled vector: {e:?}")))?;
        Ok(VideoEmbedding {
            model_dir: self.dir.clone(),
            tokens,
            frames,
            frame_indices,
            pooled,
        })
    }

    /// The prompt ids of `question` about `video` (chat template, visual tokens
    /// expanded, assistant turn opened).
    pub fn prompt(&self, video: &VideoEmbedding, question: &str) -> Result<Vec<u32>, Error> {
        if video.model_dir != self.dir {
            return Err(Error::Request(format!(
                "the video was embedded by the model in {}, not this one ({}): embed it \
                 again with this model (or set VideoEmbedding::model_dir when both share \
                 the vision tower and projector)",
                video.model_dir.display(),
                self.dir.display()
            )));
        }
        // The chat template's control tokens in a question would end the user's turn
        // and open others the model never sees as text.
        if let Some(token) = CONTROL_TOKENS.iter().find(|t| question.contains(*t)) {
            return Err(Error::Request(format!(
                "the question contains the chat template's control token {token}: it would \
                 open or end a turn of the conversation, not be read as text"
            )));
        }
        let encoded = self.template.encode(
            &self.tokenizer,
            &[Message::user(format!("<video>\n{question}"))],
            &[Media::Video {
                // Frames' worth of tokens (fewer than frames under temporal pooling).
                frames: video.tokens.dims()[0],
            }],
            video.tokens.dims()[1],
            true,
        )?;
        Ok(encoded.ids)
    }

    /// Greedy answer of at most `max_new_tokens` tokens (stops at `<|im_end|>`).
    pub fn ask(
        &self,
        video: &VideoEmbedding,
        question: &str,
        max_new_tokens: usize,
    ) -> Result<String, Error> {
        self.ask_with(video, question, Decoding::Greedy, max_new_tokens)
    }

    /// The answer with the given decoding (greedy, or top-p sampling with a
    /// temperature and seed).
    pub fn ask_with(
        &self,
        video: &VideoEmbedding,
        question: &str,
        decoding: Decoding,
        max_new_tokens: usize,
    ) -> Result<String, Error> {
        let ids = self.generate(video, question, decoding, max_new_tokens)?;
        Ok(self.tokenizer.decode(&ids, true)?)
    }

    /// Token ids after the prompt (without the stop token). The prompt, visual
    /// tokens included, runs once; every new token then costs one token's forward
    /// pass (KV cache).
    pub fn generate(
        &self,
        video: &VideoEmbedding,
        question: &str,
        decoding: Decoding,
        max_new_tokens: usize,
    ) -> Result<Vec<u32>, Error> {
        let prompt = self.prompt(video, question)?;
        let options = GenerateOptions::new(max_new_tokens, decoding, self.stop_tokens());
        Ok(longview_infer::generate::generate(
            &self.model,
            &prompt,
            VisualInput::Embeddings(video.tokens.clone()),
            &options,
            &self.device,
        )?)
    }

    /// The ids that end an answer: `<|im_end|>` and `<|endoftext|>`.
    pub fn stop_tokens(&self) -> Vec<u32> {
        longview_infer::generate::stop_tokens(&self.tokenizer)
    }
}
