//! longview's data side: exact frame sampling from video files with FFmpeg,
//! preprocessing to the vision encoder's input, and synthetic haystack videos.

pub mod error;
pub mod preprocess;
pub mod synthetic;
mod synthetic_frames;
pub mod video;

pub use error::DataError;
pub use preprocess::{Normalization, Preprocess};
pub use video::{
    DecodeOptions, FrameBatch, FrameMeta, ProbeSource, Sampling, ShortVideo, VideoInfo, decode,
    decode_all, probe, probe_by_demuxing,
};
