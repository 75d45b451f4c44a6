//! Loading a model for inference: a run folder (its newest checkpoint), a checkpoint
//! folder or a VILA model folder, with the tokenizer saved beside it.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use longview_data::TextTokenizer;
use longview_models::hf::checkpoint::load_vila;
use longview_models::{Vlm, VlmConfig};

use crate::error::InferError;
use crate::sample::Encoder;

/// The newest complete checkpoint under `out`, if any.
pub fn latest_checkpoint(out: &Path) -> Result<Option<PathBuf>, InferError> {
    let pointer = out.join("checkpoints").join("latest");
    if !pointer.exists() {
        return Ok(None);
    }
    let name = std::fs::read_to_string(&pointer).map_err(InferError::io(&pointer))?;
    let dir = out.join("checkpoints").join(name.trim());
    if !dir.join("trainer.json").exists() {
        return Err(InferError::checkpoint(
            &pointer,
            format!(
                "points at `{}`, which is not a complete checkpoint",
                name.trim()
            ),
        ));
    }
    Ok(Some(dir))
}

/// Finds the model folder from a run folder (its latest checkpoint), a checkpoint
/// folder (`model/` inside) or a VILA model folder itself.
pub fn resolve_model_dir(path: &Path) -> Result<PathBuf, InferError> {
    if !path.exists() {
        return Err(InferError::checkpoint(path, "does not exist"));
    }
    if path.join("config.json").exists() && path.join("llm").exists() {
        return Ok(path.into());
    }
    if path.join("model").join("config.json").exists() {
        return Ok(path.join("model"));
    }
    if let Some(latest) = latest_checkpoint(path)? {
        return Ok(latest.join("model"));
    }
    Err(InferError::checkpoint(
        path,
        "is neither a run folder (checkpoints/latest), a checkpoint folder (model/) nor a \
         VILA model folder (config.json, llm/, vision_tower/, mm_projector/)",
    ))
}

/// A model loaded for inference or evaluation, with its tokenizer.
pub struct LoadedModel {
    pub model: Vlm,
    pub config: VlmConfig,
    pub tokenizer: TextTokenizer,
    pub dir: PathBuf,
}

impl LoadedModel {
    /// Samples at the model's input size, in the Qwen2 chat template.
    pub fn encoder(&self) -> Encoder<'_> {
        let side = self.config.vision.image_size as u32;
        Encoder {
            tokenizer: &self.tokenizer,
            template: longview_data::ChatTemplate::qwen2(),
            model: &self.config,
            width: side,
            height: side,
        }
    }
}

/// Loads the model and tokenizer `path` resolves to.
pub fn load(path: &Path, device: &Device) -> Result<LoadedModel, InferError> {
    let dir = resolve_model_dir(path)?;
    let (mut model, mut config) = load_vila(&dir, device)?;
    let tokenizer = TextTokenizer::from_checkpoint_dir(&dir)?;
    check_vocabulary(&dir, &tokenizer, &config)?;
    limit_generation(&mut model, &mut config, &tokenizer);
    Ok(LoadedModel {
        model,
        config,
        tokenizer,
        dir,
    })
}

/// Rows past the tokenizer's ids (Qwen2 pads its embedding table; a large shape
/// trained with a small tokenizer) are never generated or scored: no text could be
/// made of them. A checkpoint that saved its limit (`longview_generation_vocab`)
/// keeps it.
pub fn limit_generation(model: &mut Vlm, config: &mut VlmConfig, tokenizer: &TextTokenizer) {
    if model.generation_vocab.is_none() && tokenizer.vocab_size() < config.text.vocab_size {
        model.generation_vocab = Some(tokenizer.vocab_size());
    }
    config.generation_vocab = model.generation_vocab;
}

/// Refuses a tokenizer that can emit ids past the model's embedding table (a
/// mismatched tokenizer.json would otherwise fail deep inside the first forward).
pub fn check_vocabulary(
    dir: &Path,
    tokenizer: &TextTokenizer,
    config: &VlmConfig,
) -> Result<(), InferError> {
    let (tokens, rows) = (tokenizer.vocab_size(), config.text.vocab_size);
    if tokens > rows {
        return Err(InferError::checkpoint(
            dir,
            format!(
                "the tokenizer has {tokens} tokens but the LLM's embedding has {rows} rows (llm/config.json vocab_size): the tokenizer does not belong to this model"
            ),
        ));
    }
    Ok(())
}
