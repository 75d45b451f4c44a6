//! longview's data side: exact frame sampling from video files with FFmpeg,
//! preprocessing to the vision encoder's input, still images, tokenizers and the chat
//! template, dataset readers, and synthetic haystack videos.

pub mod dataset;
pub mod error;
pub mod image;
pub mod preprocess;
pub mod synthetic;
mod synthetic_frames;
pub mod text;
pub mod video;

pub use error::DataError;
pub use image::{load_image, preprocess_image, read_image};
pub use preprocess::{Normalization, Preprocess};
pub use text::{ChatTemplate, EncodedChat, Media, Message, Role, TextTokenizer};
pub use video::{
    DecodeOptions, FrameBatch, FrameMeta, ProbeSource, Sampling, ShortVideo, VideoInfo, decode,
    decode_all, probe, probe_by_demuxing,
};
