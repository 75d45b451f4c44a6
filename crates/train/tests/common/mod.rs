//! What the trainer's test binaries share: the lock every test takes before it
//! initialises a model, a temporary folder, the autodiff CPU device, and quiet runs.
#![allow(dead_code)] // each test binary uses a part

use std::path::PathBuf;

use burn::tensor::Device;
use longview_train::TrainOptions;

/// Burn's device RNG is one per process and model parameters are drawn lazily, on
/// first use: two models initialising at once in one process (tests run on several
/// threads) interleave their draws, and the same seed then gives different weights.
/// A training run is one process in real use; here every test takes this lock.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A folder under the system's temporary directory, emptied first and removed when
/// dropped; `tag` and the process id name it.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("longview-train-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The CPU device with autodiff.
pub fn device() -> Device {
    Device::flex().autodiff()
}

/// A log sink that drops every line.
pub fn quiet() -> impl FnMut(&str) {
    |_: &str| {}
}

/// Run options without a progress bar.
pub fn no_progress() -> TrainOptions {
    TrainOptions {
        progress: false,
        ..TrainOptions::default()
    }
}
