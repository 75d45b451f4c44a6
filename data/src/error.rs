//! Errors of the data pipeline. Every error about a file names it.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: no such file")]
    NotFound { path: PathBuf },
    #[error("{path}: not a readable video ({reason})")]
    NotAVideo { path: PathBuf, reason: String },
    #[error("the video has no frames")]
    Empty,
    #[error(
        "asked for {asked} frames but the video has {available} (choose ShortVideo::Repeat or ::Truncate to allow this)"
    )]
    TooFewFrames { asked: usize, available: usize },
    #[error("invalid sampling: {0}")]
    Sampling(String),
    /// The stream broke before every requested frame was decoded. `decoded` frames
    /// (in request order) were fine; nothing is repeated or invented to fill the gap.
    #[error(
        "{path}: corrupt or truncated video: decoded {decoded} of {requested} requested frames, then: {reason}"
    )]
    Corrupt {
        path: PathBuf,
        decoded: usize,
        requested: usize,
        reason: String,
    },
    #[error("{path}: {context}: {source}")]
    Ffmpeg {
        path: PathBuf,
        context: String,
        #[source]
        source: ffmpeg_next::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("tokenizer {source_name}: {reason}")]
    Tokenizer { source_name: String, reason: String },
    #[error("chat template: {0}")]
    Template(String),
    #[error("{path}: not a readable image ({reason})")]
    Image { path: PathBuf, reason: String },
    #[error("{path}:{line}: {reason}")]
    Dataset {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{path}: {source}")]
    InFile {
        path: PathBuf,
        #[source]
        source: Box<DataError>,
    },
}

impl DataError {
    /// Attaches a file name to an error that does not carry one yet.
    pub fn in_file(self, path: impl Into<PathBuf>) -> Self {
        match self {
            DataError::Empty | DataError::TooFewFrames { .. } | DataError::Sampling(_) => {
                DataError::InFile {
                    path: path.into(),
                    source: Box::new(self),
                }
            }
            other => other,
        }
    }
}
