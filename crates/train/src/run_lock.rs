//! One process per run folder: `<run.out>/.lock` holds the pid of the process writing
//! the run; a second process on the same folder is refused (it would interleave
//! checkpoints and metrics, or delete the first one's checkpoint in progress). A lock
//! whose process is gone (a crash, a killed job) is taken over.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::TrainError;

/// Held while a run writes its folder; removes the lock file when dropped.
#[derive(Debug)]
pub struct RunLock {
    path: PathBuf,
}

impl RunLock {
    /// Takes `out`'s lock, or errors naming the process that holds it.
    pub fn acquire(out: &Path) -> Result<RunLock, TrainError> {
        let path = out.join(".lock");
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut file) => {
                    write!(file, "{}", std::process::id()).map_err(TrainError::io(&path))?;
                    return Ok(RunLock { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let holder = std::fs::read_to_string(&path).unwrap_or_default();
                    match holder.trim().parse::<u32>() {
                        Ok(pid) if alive(pid) => {
                            return Err(TrainError::Request(format!(
                                "{} is in use by process {pid} (another run writing the same folder); wait for it, stop it, or choose another run.out / --out (if no such run exists, delete {})",
                                out.display(),
                                path.display()
                            )));
                        }
                        // The holder is gone: take the lock over.
                        _ => {
                            std::fs::remove_file(&path).map_err(TrainError::io(&path))?;
                        }
                    }
                }
                Err(e) => return Err(TrainError::io(&path)(e)),
            }
        }
        Err(TrainError::Request(format!(
            "could not take the lock {} (another process keeps recreating it)",
            path.display()
        )))
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Whether process `pid` exists (Linux: `/proc/<pid>`; elsewhere assumed alive).
fn alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new(&format!("/proc/{pid}")).exists()
    } else {
        true
    }
}
