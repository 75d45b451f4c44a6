//! longview's inference engine, below the trainer: what evaluation, the application
//! API (`longview`) and the trainer all use to run a trained model.
//!
//! - [`load`]: a model and its tokenizer from a run folder (newest checkpoint), a
//!   checkpoint folder or a VILA model folder.
//! - [`pixels`]: decoded frames shared between samples and the tensors uploaded from
//!   them (no host copy, cast to the float dtype on the device).
//! - [`sample`]: conversations tokenized around decoded frames, right-padded batches,
//!   and a video's frames at the encoder's input size.
//! - [`prefill`]: chunked prefill (activations bounded by the chunk), frames encoded
//!   in batches, the memory estimate that refuses requests too large.
//! - [`generate`]: KV-cache generation, greedy or top-p, one sample or a group of
//!   samples over one shared prefill, with sampling log-probabilities.
//! - [`graph_decode`]: those decoding steps captured once as a device graph and
//!   replayed (CUDA graphs), where the flash kernels run.
//! - [`batch`]: different prompts decoded as one batch, each prompt's KV cache held
//!   once for all its samples ([`shared_prefix`]).
//! - [`needle`]: LongVILA's teacher-forced needle scoring.

pub mod batch;
pub mod error;
pub mod generate;
pub mod graph_decode;
pub mod load;
pub mod needle;
pub mod pixels;
pub mod prefill;
pub mod sample;
pub mod shared_prefix;

pub use error::InferError;
pub use load::{LoadedModel, load, resolve_model_dir};
pub use needle::NeedleReport;
