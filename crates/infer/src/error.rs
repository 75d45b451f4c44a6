//! Errors of loading and inference; each names the file or value concerned.

use std::path::PathBuf;

use longview_data::DataError;
use longview_models::ModelError;

#[derive(Debug, thiserror::Error)]
pub enum InferError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("checkpoint {}: {message}", path.display())]
    Checkpoint { path: PathBuf, message: String },
    /// A request that cannot be served (bad generation parameters, empty prompt).
    #[error("{0}")]
    Request(String),
}

impl InferError {
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> InferError {
        let path = path.into();
        move |source| InferError::Io { path, source }
    }

    pub fn checkpoint(path: impl Into<PathBuf>, message: impl ToString) -> InferError {
        InferError::Checkpoint {
            path: path.into(),
            message: message.to_string(),
        }
    }
}
