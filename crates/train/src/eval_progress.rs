//! What an evaluation has finished, kept on disk so that an interrupted run (a
//! 3600-frame grid takes hours) resumes at the first haystack length it had not
//! scored. Each length's result is written when it is done (to a temporary file,
//! then renamed: a crash leaves the previous state whole), under a key naming what
//! it was scored with (task, checkpoint and its weights' sizes and times, videos per
//! depth, seed, settings); a file with another key is started afresh.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::TrainError;

/// Finished lengths of one evaluation, by frame count.
pub struct EvalProgress {
    path: PathBuf,
    key: String,
    done: BTreeMap<usize, serde_json::Value>,
    writes: bool,
}

impl EvalProgress {
    /// Opens `path`: the lengths it holds under `key`, none when the file is missing,
    /// unreadable or was written for another key. `writes`: whether this process
    /// records (one rank of several does).
    pub fn open(path: impl Into<PathBuf>, key: String, writes: bool) -> Self {
        let path = path.into();
        let done = std::fs::read_to_string(&path)
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .filter(|saved| saved.get("key").and_then(|k| k.as_str()) == Some(key.as_str()))
            .and_then(|saved| {
                serde_json::from_value::<BTreeMap<usize, serde_json::Value>>(
                    saved.get("done")?.clone(),
                )
                .ok()
            })
            .unwrap_or_default();
        EvalProgress {
            path,
            key,
            done,
            writes,
        }
    }

    /// The lengths already scored.
    pub fn lengths(&self) -> Vec<usize> {
        self.done.keys().copied().collect()
    }

    /// The saved result of `frames`, if it was scored (and still reads as `T`).
    pub fn get<T: DeserializeOwned>(&self, frames: usize) -> Option<T> {
        serde_json::from_value(self.done.get(&frames)?.clone()).ok()
    }

    /// Records `result` for `frames` and writes the file.
    pub fn put<T: Serialize>(&mut self, frames: usize, result: &T) -> Result<(), TrainError> {
        let value = serde_json::to_value(result)
            .map_err(|e| TrainError::checkpoint(&self.path, format!("encoding a result: {e}")))?;
        self.done.insert(frames, value);
        if !self.writes {
            return Ok(());
        }
        let text = serde_json::json!({ "key": self.key, "done": self.done }).to_string();
        let partial = self.path.with_extension("json.partial");
        std::fs::write(&partial, text).map_err(TrainError::io(&partial))?;
        std::fs::rename(&partial, &self.path).map_err(TrainError::io(&self.path))
    }
}

/// The sizes and modification times of a model folder's weight files: a change of
/// checkpoint in the same folder changes it.
pub fn weights_identity(model_dir: &Path) -> String {
    let mut parts = Vec::new();
    for sub in ["llm", "vision_tower", "mm_projector", ""] {
        let Ok(entries) = std::fs::read_dir(model_dir.join(sub)) else {
            continue;
        };
        let mut files: Vec<_> = entries
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort_by_key(|e| e.file_name());
        for file in files {
            if let Ok(meta) = file.metadata() {
                let modified = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_nanos());
                parts.push(format!(
                    "{sub}/{}:{}:{modified}",
                    file.file_name().to_string_lossy(),
                    meta.len()
                ));
            }
        }
    }
    parts.join(",")
}
