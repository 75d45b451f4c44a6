//! Errors of training and evaluation; each names the file, key or step concerned.

use std::path::PathBuf;

use longview_data::DataError;
use longview_infer::InferError;
use longview_models::ModelError;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {source_name}: {message}")]
    Config {
        source_name: String,
        message: String,
    },
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Loading, samples, generation and scoring (`longview-infer`).
    #[error(transparent)]
    Infer(#[from] InferError),
    #[error("checkpoint {}: {message}", path.display())]
    Checkpoint { path: PathBuf, message: String },
    #[error("parallel training: {0}")]
    Parallel(String),
    /// The device failed outside a model call (a synchronisation).
    #[error("device: {0}")]
    Device(String),
    /// A training row that cannot be used (line 0: the file as a whole).
    #[error("{}:{line}: {message}", path.display())]
    Row {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// A request that cannot be served (bad generation parameters, empty prompt).
    #[error("{0}")]
    Request(String),
    #[error(
        "step {step}: the loss is {loss} (diverged); lower optim.lr or set optim.clip_grad_norm, \
         and resume from the last checkpoint with --resume"
    )]
    Diverged { step: usize, loss: f32 },
}

impl TrainError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> TrainError {
        let path = path.into();
        move |source| TrainError::Io { path, source }
    }

    pub(crate) fn row(path: impl Into<PathBuf>, line: usize, message: impl ToString) -> TrainError {
        TrainError::Row {
            path: path.into(),
            line,
            message: message.to_string(),
        }
    }

    pub(crate) fn checkpoint(path: impl Into<PathBuf>, message: impl ToString) -> TrainError {
        TrainError::Checkpoint {
            path: path.into(),
            message: message.to_string(),
        }
    }
}
