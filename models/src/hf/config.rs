//! Serde mirrors of Hugging Face `config.json` files, kept apart from longview's own
//! configs (candle's `LlamaConfig::into_config` pattern).
//!
//! Both layouts of transformers are read: 4.x (`rope_theta` at the top level,
//! `SiglipModel` files nesting the vision config under `vision_config`) and 5.x
//! (`rope_parameters`). Unsupported settings (another RoPE type, another activation,
//! sliding-window attention) are rejected with the field named, never ignored.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ModelError;
use crate::vila::config::{ProjectorKind, TextConfig, VisionConfig, VisionFeature};

/// `rope_parameters` of transformers 5.x.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RopeParameters {
    #[serde(default)]
    pub rope_type: Option<String>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
}

/// `config.json` of a Qwen2 checkpoint (`Qwen2ForCausalLM`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HfQwen2Config {
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
    #[serde(default)]
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    #[serde(default)]
    pub rope_scaling: Option<Value>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_silu")]
    pub hidden_act: String,
    #[serde(default)]
    pub use_sliding_window: bool,
}

fn default_rms_eps() -> f64 {
    1e-6
}
fn default_max_positions() -> usize {
    32768
}
fn default_silu() -> String {
    "silu".into()
}

/// `config.json` of a SigLIP vision tower (`SiglipVisionModel`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HfSiglipVisionConfig {
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
    #[serde(default)]
    pub model_type: Option<String>,
    #[serde(default = "siglip_defaults::hidden")]
    pub hidden_size: usize,
    #[serde(default = "siglip_defaults::intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "siglip_defaults::layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "siglip_defaults::heads")]
    pub num_attention_heads: usize,
    #[serde(default = "siglip_defaults::channels")]
    pub num_channels: usize,
    #[serde(default = "siglip_defaults::image")]
    pub image_size: usize,
    #[serde(default = "siglip_defaults::patch")]
    pub patch_size: usize,
    #[serde(default = "siglip_defaults::act")]
    pub hidden_act: String,
    #[serde(default = "siglip_defaults::eps")]
    pub layer_norm_eps: f64,
}

/// transformers' `SiglipVisionConfig` defaults (fields a config.json may omit).
mod siglip_defaults {
    pub fn hidden() -> usize {
        768
    }
    pub fn intermediate() -> usize {
        3072
    }
    pub fn layers() -> usize {
        12
    }
    pub fn heads() -> usize {
        12
    }
    pub fn channels() -> usize {
        3
    }
    pub fn image() -> usize {
        224
    }
    pub fn patch() -> usize {
        16
    }
    pub fn act() -> String {
        "gelu_pytorch_tanh".into()
    }
    pub fn eps() -> f64 {
        1e-6
    }
}

pub(crate) fn read_json(path: &Path) -> Result<Value, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| ModelError::config(path, format!("not valid JSON: {e}")))
}

fn parse<T: for<'de> Deserialize<'de>>(path: &Path, value: Value) -> Result<T, ModelError> {
    serde_json::from_value(value).map_err(|e| ModelError::config(path, e.to_string()))
}

const QWEN2_ARCHS: &str = "model_type `qwen2` / Qwen2ForCausalLM";
const SIGLIP_ARCHS: &str = "model_type `siglip_vision_model` or `siglip` (vision_config)";

impl HfQwen2Config {
    pub fn read(path: &Path) -> Result<Self, ModelError> {
        let value = read_json(path)?;
        let model_type = value
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("");
        if model_type != "qwen2" {
            return Err(ModelError::UnknownArchitecture {
                path: path.into(),
                found: format!("model_type `{model_type}`"),
                supported: QWEN2_ARCHS,
            });
        }
        parse(path, value)
    }

    /// The RoPE base from either layout.
    pub fn rope_theta(&self, path: &Path) -> Result<f64, ModelError> {
        if let Some(scaling) = &self.rope_scaling
            && !scaling.is_null()
        {
            return Err(ModelError::config(
                path,
                format!("rope_scaling {scaling} is not supported (only default RoPE)"),
            ));
        }
        match (&self.rope_parameters, self.rope_theta) {
            (Some(p), _) => {
                let kind = p.rope_type.as_deref().unwrap_or("default");
                if kind != "default" {
                    return Err(ModelError::config(
                        path,
                        format!(
                            "rope_parameters.rope_type `{kind}` is not supported (only `default`)"
                        ),
                    ));
                }
                p.rope_theta
                    .ok_or_else(|| ModelError::config(path, "rope_parameters has no rope_theta"))
            }
            (None, Some(theta)) => Ok(theta),
            (None, None) => Ok(10_000.0), // transformers' default
        }
    }

    pub fn into_config(self, path: &Path) -> Result<TextConfig, ModelError> {
        if self.hidden_act != "silu" {
            return Err(ModelError::config(
                path,
                format!(
                    "hidden_act `{}` is not supported (Qwen2 uses `silu`)",
                    self.hidden_act
                ),
            ));
        }
        if self.use_sliding_window {
            return Err(ModelError::config(
                path,
                "use_sliding_window = true is not supported (full attention only)",
            ));
        }
        check_sizes(
            path,
            &[
                ("vocab_size", self.vocab_size, 4 << 20),
                ("hidden_size", self.hidden_size, 1 << 16),
                ("intermediate_size", self.intermediate_size, 1 << 18),
                ("num_hidden_layers", self.num_hidden_layers, 1024),
                ("num_attention_heads", self.num_attention_heads, 1024),
            ],
        )?;
        let config = TextConfig::new(
            self.vocab_size,
            self.hidden_size,
            self.intermediate_size,
            self.num_hidden_layers,
            self.num_attention_heads,
            self.num_key_value_heads.unwrap_or(self.num_attention_heads),
        )
        .with_rms_norm_eps(self.rms_norm_eps)
        .with_rope_theta(self.rope_theta(path)?)
        .with_tie_word_embeddings(self.tie_word_embeddings)
        .with_max_position_embeddings(self.max_position_embeddings);
        config.validate().map_err(|m| ModelError::config(path, m))?;
        Ok(config)
    }

    /// The transformers 5.x `config.json` of a text config.
    pub fn from_config(config: &TextConfig, dtype: &str) -> Value {
        serde_json::json!({
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
            "num_hidden_layers": config.num_layers,
            "num_attention_heads": config.num_heads,
            "num_key_value_heads": config.num_kv_heads,
            "rms_norm_eps": config.rms_norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
            "tie_word_embeddings": config.tie_word_embeddings,
            "max_position_embeddings": config.max_position_embeddings,
            "hidden_act": "silu",
            "use_sliding_window": false,
            "dtype": dtype,
        })
    }
}

impl HfSiglipVisionConfig {
    /// Reads a `SiglipVisionModel` config, or the `vision_config` of a `SiglipModel` one.
    pub fn read(path: &Path) -> Result<Self, ModelError> {
        let value = read_json(path)?;
        let model_type = value
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("");
        let vision = match model_type {
            "siglip_vision_model" => value,
            "siglip" => value.get("vision_config").cloned().ok_or_else(|| {
                ModelError::config(path, "model_type `siglip` without a `vision_config` object")
            })?,
            other => {
                return Err(ModelError::UnknownArchitecture {
                    path: path.into(),
                    found: format!("model_type `{other}`"),
                    supported: SIGLIP_ARCHS,
                });
            }
        };
        parse(path, vision)
    }

    pub fn into_config(self, path: &Path) -> Result<VisionConfig, ModelError> {
        if self.hidden_act != "gelu_pytorch_tanh" {
            return Err(ModelError::config(
                path,
                format!(
                    "hidden_act `{}` is not supported (SigLIP uses `gelu_pytorch_tanh`)",
                    self.hidden_act
                ),
            ));
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(ModelError::config(
                path,
                format!(
                    "hidden_size {} is not a multiple of num_attention_heads {}",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        check_sizes(
            path,
            &[
                ("hidden_size", self.hidden_size, 1 << 16),
                ("intermediate_size", self.intermediate_size, 1 << 18),
                ("num_hidden_layers", self.num_hidden_layers, 1024),
                ("image_size", self.image_size, 1 << 14),
            ],
        )?;
        if self.patch_size == 0 || self.image_size < self.patch_size {
            return Err(ModelError::config(
                path,
                format!(
                    "image_size {} must be at least patch_size {} (> 0)",
                    self.image_size, self.patch_size
                ),
            ));
        }
        Ok(VisionConfig::new(
            self.hidden_size,
            self.intermediate_size,
            self.num_hidden_layers,
            self.num_attention_heads,
            self.image_size,
            self.patch_size,
        )
        .with_num_channels(self.num_channels)
        .with_layer_norm_eps(self.layer_norm_eps))
    }

    pub fn from_config(config: &VisionConfig, dtype: &str) -> Value {
        serde_json::json!({
            "architectures": ["SiglipVisionModel"],
            "model_type": "siglip_vision_model",
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
            "num_hidden_layers": config.num_layers,
            "num_attention_heads": config.num_heads,
            "num_channels": config.num_channels,
            "image_size": config.image_size,
            "patch_size": config.patch_size,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": config.layer_norm_eps,
            "vision_use_head": false,
            "dtype": dtype,
        })
    }
}

/// The parts of VILA's top-level `config.json` and `mm_projector/config.json` we use.
#[derive(Debug, Clone)]
pub struct VilaConfig {
    pub projector: ProjectorKind,
    pub vision_feature: VisionFeature,
    pub placeholder_token_id: Option<u32>,
    /// `longview_token_pool` in `mm_projector/config.json` (the token budget).
    pub token_pool: Option<usize>,
    /// `longview_temporal_pool` in `mm_projector/config.json` (frames averaged).
    pub temporal_pool: Option<usize>,
    /// `longview_generation_vocab` in the top-level `config.json`: the ids a model can
    /// generate when its tokenizer is smaller than its embedding table.
    pub generation_vocab: Option<usize>,
}

impl VilaConfig {
    /// Reads `<dir>/config.json` (optional) and `<dir>/mm_projector/config.json`.
    pub fn read(dir: &Path) -> Result<Self, ModelError> {
        let top_path = dir.join("config.json");
        let top = if top_path.exists() {
            read_json(&top_path)?
        } else {
            Value::Null
        };
        let proj_path = dir.join("mm_projector").join("config.json");
        let proj = read_json(&proj_path)?;
        let kind_name = proj
            .get("mm_projector_type")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                ModelError::config(&proj_path, "missing string field `mm_projector_type`")
            })?;
        let projector = ProjectorKind::from_vila_name(kind_name).ok_or_else(|| {
            ModelError::UnknownArchitecture {
                path: proj_path.clone(),
                found: format!("mm_projector_type `{kind_name}`"),
                supported: "mlp_downsample, mlp2x_gelu",
            }
        })?;
        let vision_feature = match top.get("mm_vision_select_layer") {
            None | Some(Value::Null) => VisionFeature::Layer(-2),
            Some(Value::String(s)) if s == "post_layernorm" => VisionFeature::Last,
            Some(v) => match v.as_i64() {
                Some(k) if k < 0 => VisionFeature::Layer(k as i32),
                _ => {
                    return Err(ModelError::config(
                        &top_path,
                        format!("mm_vision_select_layer must be a negative integer, found {v}"),
                    ));
                }
            },
        };
        let placeholder_token_id = top
            .get("image_token_id")
            .and_then(Value::as_u64)
            .map(|v| v as u32);
        let generation_vocab = match top.get("longview_generation_vocab") {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 => Some(n as usize),
                _ => {
                    return Err(ModelError::config(
                        &top_path,
                        format!(
                            "longview_generation_vocab must be a positive token count, found {v}"
                        ),
                    ));
                }
            },
        };
        let token_pool = match proj.get("longview_token_pool") {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_u64() {
                Some(side) if (1..=64).contains(&side) => Some(side as usize),
                _ => {
                    return Err(ModelError::config(
                        &proj_path,
                        format!("longview_token_pool must be a side of 1..=64 tokens, found {v}"),
                    ));
                }
            },
        };
        let temporal_pool = match proj.get("longview_temporal_pool") {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_u64() {
                Some(k) if (1..=1024).contains(&k) => Some(k as usize),
                _ => {
                    return Err(ModelError::config(
                        &proj_path,
                        format!("longview_temporal_pool must be 1..=1024 frames, found {v}"),
                    ));
                }
            },
        };
        Ok(VilaConfig {
            projector,
            vision_feature,
            placeholder_token_id,
            token_pool,
            temporal_pool,
            generation_vocab,
        })
    }
}

/// Refuses sizes past what any real checkpoint has (a corrupt or hostile config.json
/// would otherwise ask the allocator for terabytes and abort the process), and zero.
fn check_sizes(path: &Path, sizes: &[(&str, usize, usize)]) -> Result<(), ModelError> {
    for &(key, value, limit) in sizes {
        if value == 0 || value > limit {
            return Err(ModelError::config(
                path,
                format!("{key} {value} is not a plausible size (1..={limit})"),
            ));
        }
    }
    Ok(())
}
