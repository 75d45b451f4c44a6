//! longview's models: the LongVILA vision-language model (SigLIP vision encoder, VILA
//! projectors, Qwen2 LLM) as single-device Burn modules, the attention interface that
//! kernels and sequence-parallel schemes plug into, and Hugging Face / VILA checkpoint
//! I/O (safetensors, single or sharded; f32, f16, bf16).
//!
//! Library code never picks a backend: tensors live on a `burn::tensor::Device` chosen
//! by the binary (CPU `flex` for tests and default commands, `cuda` on GPUs).

pub mod attention;
pub mod error;
pub mod hf;
pub mod linear;
pub mod vila;

pub use error::ModelError;
pub use vila::{KvCache, VisualInput, Vlm, VlmConfig, VlmInput};
