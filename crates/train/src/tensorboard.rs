//! TensorBoard event files (`events.out.tfevents.*`) with scalar summaries, written
//! without TensorFlow: TFRecord framing (length, masked CRC-32C, payload, masked
//! CRC-32C) around hand-encoded `Event` / `Summary` protobuf messages.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::TrainError;

/// CRC-32C (Castagnoli), reflected, as TFRecord uses.
fn crc32c(bytes: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut table = [0u32; 256];
        for (i, entry) in table.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 == 1 {
                    0x82F6_3B78 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *entry = c;
        }
        table
    });
    let mut crc = !0u32;
    for &b in bytes {
        crc = table[((crc ^ b as u32) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c(bytes);
    (crc.rotate_right(15)).wrapping_add(0xA282_EAD8)
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn length_delimited(out: &mut Vec<u8>, key: u8, bytes: &[u8]) {
    out.push(key);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// `Event { wall_time = 1 (double), step = 2 (int64), file_version = 3 | summary = 5 }`;
/// zero scalars are omitted, as proto3 serialisers do.
fn event(wall_time: f64, step: i64, body: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut out = Vec::new();
    if wall_time != 0.0 {
        out.push(0x09);
        out.extend_from_slice(&wall_time.to_le_bytes());
    }
    if step != 0 {
        out.push(0x10);
        varint(&mut out, step as u64);
    }
    body(&mut out);
    out
}

/// Appends scalar events to one event file in a log folder.
pub struct EventWriter {
    file: BufWriter<File>,
    path: PathBuf,
}

impl EventWriter {
    /// Creates `events.out.tfevents.<seconds>.<host>.<pid>.<nanos>` in `dir` (a new
    /// file per run; TensorBoard reads every file of the folder), stamped with the
    /// current time.
    pub fn create(dir: &Path) -> Result<Self, TrainError> {
        let since_epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let now = since_epoch.as_secs_f64();
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        let path = dir.join(format!(
            "events.out.tfevents.{}.{host}.{}.{}",
            since_epoch.as_secs(),
            std::process::id(),
            since_epoch.subsec_nanos()
        ));
        Self::create_at(&path, now)
    }

    /// Creates the event file `path`; its first record (the file version) is stamped
    /// `wall_time`.
    pub fn create_at(path: &Path, wall_time: f64) -> Result<Self, TrainError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(TrainError::io(dir))?;
        }
        // Never truncate an existing log.
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(TrainError::io(path))?;
        let mut writer = EventWriter {
            file: BufWriter::new(file),
            path: path.into(),
        };
        let record = event(wall_time, 0, |out| {
            length_delimited(out, 0x1a, b"brain.Event:2")
        });
        writer.record(&record)?;
        Ok(writer)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One scalar (`Summary { value { tag = 1, simple_value = 2 } }`).
    pub fn scalar(
        &mut self,
        tag: &str,
        step: i64,
        value: f32,
        wall_time: f64,
    ) -> Result<(), TrainError> {
        let mut value_msg = Vec::new();
        length_delimited(&mut value_msg, 0x0a, tag.as_bytes());
        value_msg.push(0x15);
        value_msg.extend_from_slice(&value.to_le_bytes());
        let mut summary = Vec::new();
        length_delimited(&mut summary, 0x0a, &value_msg);
        let record = event(wall_time, step, |out| length_delimited(out, 0x2a, &summary));
        self.record(&record)
    }

    /// A `SessionLog { status: START }` at `step`: TensorBoard drops the events of
    /// earlier sessions at `step` and after, so a resumed run's curve does not overlap
    /// the tail a crashed run logged past its last checkpoint.
    pub fn session_start(&mut self, step: i64, wall_time: f64) -> Result<(), TrainError> {
        // Event field 7 (session_log), SessionLog field 1 (status) = 1 (START).
        let record = event(wall_time, step, |out| {
            length_delimited(out, 0x3a, &[0x08, 0x01])
        });
        self.record(&record)
    }

    /// Pushes buffered records to the file.
    pub fn flush(&mut self) -> Result<(), TrainError> {
        self.file.flush().map_err(TrainError::io(&self.path))
    }

    fn record(&mut self, data: &[u8]) -> Result<(), TrainError> {
        let len = (data.len() as u64).to_le_bytes();
        let mut framed = Vec::with_capacity(data.len() + 16);
        framed.extend_from_slice(&len);
        framed.extend_from_slice(&masked_crc(&len).to_le_bytes());
        framed.extend_from_slice(data);
        framed.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.file
            .write_all(&framed)
            .map_err(TrainError::io(&self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_rfc_3720_check_value() {
        // RFC 3720 B.4: 32 bytes of zeros -> 0x8A9136AA; "123456789" -> 0xE3069283.
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }
}
