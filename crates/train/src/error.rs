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
    // The wrapped errors are boxed so that every `Result<_, TrainError>` stays small
    // (they carry paths and messages; the enum was 128 bytes with them inline).
    #[error(transparent)]
    Data(Box<DataError>),
    #[error(transparent)]
    Model(Box<ModelError>),
    /// Loading, samples, generation and scoring (`longview-infer`).
    #[error(transparent)]
    Infer(Box<InferError>),
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

impl From<DataError> for TrainError {
    fn from(error: DataError) -> Self {
        TrainError::Data(Box::new(error))
    }
}

impl From<ModelError> for TrainError {
    fn from(error: ModelError) -> Self {
        TrainError::Model(Box::new(error))
    }
}

impl From<InferError> for TrainError {
    fn from(error: InferError) -> Self {
        TrainError::Infer(Box::new(error))
    }
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
