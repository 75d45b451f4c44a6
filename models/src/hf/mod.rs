//! Hugging Face interoperability: `config.json` mirrors and safetensors checkpoints.

pub mod checkpoint;
pub mod config;

pub use checkpoint::{
    KeyMap, SaveOptions, checkpoint_files, load_into, load_qwen2, load_siglip, load_vila,
    save_component, save_qwen2, save_vila,
};
pub use config::{HfQwen2Config, HfSiglipVisionConfig, VilaConfig};
