//! Exact, keyframe-aware frame sampling from video files with FFmpeg (ffmpeg-next).
//!
//! [`probe`] demuxes the video stream once (no decoding) to learn every frame's
//! presentation timestamp and where the keyframes are. [`decode`] then walks the
//! requested frames in order: it decodes forward while the next target is in the GOP
//! being decoded, and seeks to the target's keyframe only when that keyframe lies
//! beyond the decoder's position and the seek skips more than
//! [`DecodeOptions::seek_skip_frames`] frames. A dense request therefore never seeks per frame and never decodes a GOP
//! prefix twice; a sparse one skips the GOPs it does not need. Every returned frame is
//! checked against the timestamp asked for. Frames are converted and resized by the
//! decoder's scaler straight to the encoder's input size, normalised, and handed out
//! in batches so long videos never sit in memory as f32.

pub mod sampling;
mod segments;
mod stream_info;

use std::path::Path;

use crate::error::DataError;
use crate::preprocess::Preprocess;
pub use sampling::{Sampling, ShortVideo, uniform_indices};
use segments::{SegmentDecoder, decode_parallel, plan_segments};
pub(crate) use stream_info::init_ffmpeg;
pub use stream_info::{ProbeSource, VideoInfo, probe, probe_by_demuxing};

/// Default of [`DecodeOptions::seek_skip_frames`]. Measured on a 2-core machine with a
/// 640x360 H.264 file (benchmarks/video_sampling.md): a seek plus decoder flush cost
/// about as much as decoding 35 frames.
pub const SEEK_SKIP_FRAMES: usize = 32;

/// Default of [`DecodeOptions::seek_skip_frames`] for single-threaded decoders (the
/// parallel segment decoders), whose flush costs little.
pub const SEEK_SKIP_FRAMES_SINGLE: usize = 4;

/// One decoded frame's identity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FrameMeta {
    /// Index in presentation order.
    pub index: usize,
    pub pts: i64,
    /// Seconds from the first frame.
    pub seconds: f64,
}

/// A batch of preprocessed frames.
#[derive(Debug, Clone)]
pub struct FrameBatch {
    pub frames: Vec<FrameMeta>,
    /// `[frames, 3, height, width]` normalised values, row-major.
    pub pixels: Vec<f32>,
}

impl FrameBatch {
    fn new() -> Self {
        FrameBatch {
            frames: Vec::new(),
            pixels: Vec::new(),
        }
    }
}

/// How [`decode`] works.
#[derive(Debug, Clone, Copy)]
pub struct DecodeOptions {
    pub preprocess: Preprocess,
    /// Frames per [`FrameBatch`].
    pub batch_size: usize,
    /// Decoders working in parallel on independent keyframe-bounded segments of the
    /// request (0: one per core). Frames still reach the sink in request order.
    pub workers: usize,
    /// FFmpeg threads inside each decoder (0: automatic, which is frame threading
    /// over every core for a single decoder and one thread per decoder otherwise).
    pub threads: usize,
    pub short_video: ShortVideo,
    /// Decode forward through up to this many unwanted frames rather than seek
    /// (`None`: [`SEEK_SKIP_FRAMES`] for a frame-threaded decoder, whose flush is
    /// expensive, [`SEEK_SKIP_FRAMES_SINGLE`] for a single-threaded one).
    pub seek_skip_frames: Option<usize>,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        DecodeOptions {
            preprocess: Preprocess::SIGLIP_384,
            batch_size: 64,
            workers: 0,
            threads: 0,
            short_video: ShortVideo::Repeat,
            seek_skip_frames: None,
        }
    }
}

impl DecodeOptions {
    /// The defaults, with frames resized to a square SigLIP input of `side` pixels.
    pub fn siglip(side: u32) -> Self {
        DecodeOptions {
            preprocess: Preprocess::siglip(side),
            ..DecodeOptions::default()
        }
    }

    fn resolved_workers(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }

    /// Decoder threads when `workers` decoders run at once.
    fn decoder_threads(&self, workers: usize) -> usize {
        match (self.threads, workers) {
            (0, 1) => 0,
            (0, _) => 1,
            (n, _) => n,
        }
    }

    fn seek_skip(&self, decoder_threads: usize) -> usize {
        self.seek_skip_frames.unwrap_or(if decoder_threads == 1 {
            SEEK_SKIP_FRAMES_SINGLE
        } else {
            SEEK_SKIP_FRAMES
        })
    }
}

/// Counters of one [`decode`] call (what the keyframe logic did).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DecodeStats {
    pub seeks: usize,
    pub decoded_frames: usize,
    pub returned_frames: usize,
    /// Keyframe-bounded segments the request was split into.
    pub segments: usize,
    /// Decoders that ran in parallel.
    pub workers: usize,
}

impl DecodeStats {
    fn add(&mut self, other: &DecodeStats) {
        self.seeks += other.seeks;
        self.decoded_frames += other.decoded_frames;
        self.returned_frames += other.returned_frames;
    }
}

/// Decodes the frames `sampling` selects, calling `sink` with batches in request
/// order. Returns the probe result and counters.
///
/// The request is cut at keyframes into segments that decoders work on in parallel
/// ([`DecodeOptions::workers`]); each decoder resizes its frames in its own scaler,
/// at most a few RGB frames per decoder wait in a queue, and the calling thread
/// normalises them straight into the batch it hands to `sink`, so memory stays
/// bounded whatever the number of frames.
///
/// Errors: missing file, not a video, zero frames, too few frames (per
/// [`DecodeOptions::short_video`]), and [`DataError::Corrupt`] when the stream breaks
/// before every frame was delivered (the batches already passed to `sink` hold the
/// frames decoded before the damage).
pub fn decode(
    path: impl AsRef<Path>,
    sampling: &Sampling,
    options: &DecodeOptions,
    sink: impl FnMut(FrameBatch),
) -> Result<(VideoInfo, DecodeStats), DataError> {
    decode_probed(probe(path)?, sampling, options, sink)
}

/// The frame indices `sampling` picks from the video `info` describes (what
/// [`decode`] decodes): a damaged stream is sampled as the video it claims to be, so
/// the frames before the damage are the ones the caller meant and the rest are
/// reported missing.
pub fn sampled_indices(
    info: &VideoInfo,
    sampling: &Sampling,
    short: ShortVideo,
) -> Result<Vec<usize>, DataError> {
    let frames = match (&info.damaged, info.declared_frames) {
        (Some(_), Some(declared)) => declared.max(info.frames),
        _ => info.frames,
    };
    // Times are looked up in the frames' own timestamps (exact on variable-rate video,
    // where the average frame rate puts a time on the wrong frame), once the request
    // itself is known to be valid.
    let indices = sampling
        .indices(frames, info.fps, short)
        .map_err(|e| e.in_file(&info.path))?;
    match sampling {
        Sampling::Timestamps(times) if info.damaged.is_none() => {
            let mut shown: Vec<usize> = times.iter().map(|&t| frame_shown_at(info, t)).collect();
            shown.sort_unstable();
            Ok(shown)
        }
        _ => Ok(indices),
    }
}

/// The frame on screen `seconds` after the first one: the last whose timestamp is at
/// or before that time.
fn frame_shown_at(info: &VideoInfo, seconds: f64) -> usize {
    let first = info.frame_pts[0];
    let (num, den) = info.time_base;
    // A hair of tolerance: a time given exactly on a frame's timestamp stays on it
    // despite f64 rounding.
    let ticks = (seconds * den as f64 / num as f64 + 1e-6).floor() as i64;
    info.frame_pts
        .partition_point(|&pts| pts - first <= ticks)
        .saturating_sub(1)
}

/// [`decode`] of a video already probed (a caller that checked the request against
/// `info` first does not read the file twice).
pub fn decode_probed(
    info: VideoInfo,
    sampling: &Sampling,
    options: &DecodeOptions,
    mut sink: impl FnMut(FrameBatch),
) -> Result<(VideoInfo, DecodeStats), DataError> {
    let indices = sampled_indices(&info, sampling, options.short_video)?;
    let batch_size = options.batch_size.max(1);
    let mut batch = FrameBatch::new();
    let pre = options.preprocess;
    // Frames arrive as packed RGB and are normalised straight into the batch (one
    // pass over the f32 data, no intermediate copy).
    let mut deliver = |meta: FrameMeta, rgb: &[u8], stride: usize| {
        pre.normalize_rgb(rgb, stride, &mut batch.pixels);
        batch.frames.push(meta);
        if batch.frames.len() == batch_size {
            sink(std::mem::replace(&mut batch, FrameBatch::new()));
        }
    };

    let workers = options.resolved_workers().max(1);
    let threads = options.decoder_threads(workers);
    let seek_skip = options.seek_skip(threads);
    let segments = plan_segments(&info, &indices, workers, seek_skip);
    let workers = workers.min(segments.len()).max(1);
    let (threads, seek_skip) = if workers == 1 {
        let t = options.decoder_threads(1);
        (t, options.seek_skip(t))
    } else {
        (threads, seek_skip)
    };
    let mut stats = DecodeStats {
        segments: segments.len(),
        workers,
        ..DecodeStats::default()
    };
    let result = if workers == 1 {
        let mut decoder = SegmentDecoder::open(&info, &pre, threads, seek_skip)?;
        let result = decoder.run(&indices, &mut deliver);
        stats.add(&decoder.stats);
        result
    } else {
        decode_parallel(
            &info,
            &indices,
            &segments,
            &pre,
            workers,
            threads,
            seek_skip,
            &mut stats,
            &mut deliver,
        )
    };
    if !batch.frames.is_empty() {
        sink(batch);
    }
    result?;
    Ok((info, stats))
}

/// Decodes and collects every requested frame (convenient for short requests).
pub fn decode_all(
    path: impl AsRef<Path>,
    sampling: &Sampling,
    options: &DecodeOptions,
) -> Result<(VideoInfo, FrameBatch), DataError> {
    let mut all = FrameBatch::new();
    let (info, _) = decode(path, sampling, options, |b| {
        all.frames.extend(b.frames);
        all.pixels.extend(b.pixels);
    })?;
    Ok((info, all))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_pick_the_frame_on_screen_by_its_timestamp() {
        // Variable rate: frames at 0, 100, 300, 310 and 600 ms.
        let info = VideoInfo {
            path: "vfr.mp4".into(),
            frames: 5,
            fps: 5.0 / 0.7,
            width: 8,
            height: 8,
            rotation: 0,
            time_base: (1, 1000),
            frame_pts: vec![0, 100, 300, 310, 600],
            keyframe_pts: vec![0],
            declared_frames: Some(5),
            damaged: None,
            source: ProbeSource::Demux,
        };
        let times = Sampling::Timestamps(vec![0.65, 0.0, 0.15, 0.3, 0.305, 0.599]);
        let got = sampled_indices(&info, &times, ShortVideo::Repeat).unwrap();
        // 0.65 -> 4, 0.0 -> 0, 0.15 -> 1, 0.3 -> 2 (on its timestamp), 0.305 -> 2,
        // 0.599 -> 3; in time order. The average rate would say 0.3 s is frame 2
        // and 0.599 s frame 4.
        assert_eq!(got, vec![0, 1, 2, 2, 3, 4]);
    }
}
