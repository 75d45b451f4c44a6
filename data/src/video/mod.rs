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

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::Once;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, SyncSender};

use ff::codec::packet::side_data::Type as SideDataType;
use ff::software::scaling::{Context as Scaler, Flags};
use ff::{Error as FfError, Packet, format, frame, media};
use ffmpeg_next as ff;

use crate::error::DataError;
use crate::preprocess::Preprocess;
pub use sampling::{Sampling, ShortVideo, uniform_indices};

/// Default of [`DecodeOptions::seek_skip_frames`]. Measured on a 2-core machine with a
/// 640x360 H.264 file (benchmarks/video_sampling.md): a seek plus decoder flush cost
/// about as much as decoding 35 frames.
pub const SEEK_SKIP_FRAMES: usize = 32;

/// Default of [`DecodeOptions::seek_skip_frames`] for single-threaded decoders (the
/// parallel segment decoders), whose flush costs little.
pub const SEEK_SKIP_FRAMES_SINGLE: usize = 4;

/// Where [`probe`] found the frame list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeSource {
    /// The container's sample index (MP4/MOV without reordered frames): no packet
    /// is read beyond a few that confirm the index.
    ContainerIndex,
    /// A pass over every packet of the file (other containers, B-frames, or an
    /// index that does not match the packets).
    Demux,
}

/// What [`probe`] learns about a video.
#[derive(Debug, Clone)]
pub struct VideoInfo {
    pub path: PathBuf,
    /// Frames of the video stream, in presentation order.
    pub frames: usize,
    /// Average frame rate (frames per second).
    pub fps: f64,
    /// Coded size (before rotation).
    pub width: u32,
    pub height: u32,
    /// Clockwise rotation to apply for display (0, 90, 180 or 270).
    pub rotation: u32,
    /// Time base of the timestamps below (seconds per tick).
    pub time_base: (i32, i32),
    /// Presentation timestamp of every frame, ascending.
    pub frame_pts: Vec<i64>,
    /// Presentation timestamps of the keyframes, ascending.
    pub keyframe_pts: Vec<i64>,
    /// Frames the container declares (`nb_frames`, else duration x fps), if it does.
    pub declared_frames: Option<usize>,
    /// Set when the stream is damaged or truncated: frames after the damage are not
    /// listed in `frame_pts`.
    pub damaged: Option<String>,
    pub source: ProbeSource,
}

impl VideoInfo {
    pub fn seconds(&self, pts: i64) -> f64 {
        (pts - self.frame_pts[0]) as f64 * self.time_base.0 as f64 / self.time_base.1 as f64
    }

    /// Display size after rotation.
    pub fn display_size(&self) -> (u32, u32) {
        if self.rotation % 180 == 90 {
            (self.height, self.width)
        } else {
            (self.width, self.height)
        }
    }

    /// Index of the keyframe at or before frame `index`.
    fn keyframe_index_at_or_before(&self, index: usize) -> usize {
        let keyframe = self.keyframe_at_or_before(self.frame_pts[index]);
        self.frame_pts.partition_point(|&p| p < keyframe)
    }

    /// Pts of the keyframe at or before `pts`.
    fn keyframe_at_or_before(&self, pts: i64) -> i64 {
        match self.keyframe_pts.partition_point(|&k| k <= pts) {
            0 => self.keyframe_pts.first().copied().unwrap_or(pts),
            i => self.keyframe_pts[i - 1],
        }
    }
}

pub(crate) fn init_ffmpeg() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        ff::init().expect("FFmpeg initialises");
        ff::log::set_level(ff::log::Level::Fatal);
    });
}

fn open(path: &Path) -> Result<(format::context::Input, usize), DataError> {
    init_ffmpeg();
    if !path.exists() {
        return Err(DataError::NotFound { path: path.into() });
    }
    let input = format::input(path).map_err(|e| DataError::NotAVideo {
        path: path.into(),
        reason: e.to_string(),
    })?;
    let stream = input
        .streams()
        .best(media::Type::Video)
        .ok_or_else(|| DataError::NotAVideo {
            path: path.into(),
            reason: "no video stream".into(),
        })?;
    let index = stream.index();
    Ok((input, index))
}

fn rotation_of(stream: &ff::Stream<'_>) -> u32 {
    for side in stream.side_data() {
        if side.kind() == SideDataType::DisplayMatrix && side.data().len() >= 36 {
            let matrix: Vec<i32> = side.data()[..36]
                .chunks_exact(4)
                .map(|c| i32::from_ne_bytes(c.try_into().expect("4 bytes")))
                .collect();
            // Counter-clockwise degrees; display needs the clockwise inverse.
            let ccw = unsafe { ff::ffi::av_display_rotation_get(matrix.as_ptr()) };
            if ccw.is_nan() {
                return 0;
            }
            let cw = (-ccw).round() as i64;
            return (((cw % 360) + 360) % 360 / 90 * 90) as u32;
        }
    }
    0
}

/// Lists the video's frames (no decoding): from the container's sample index when
/// that is complete and trustworthy (MP4/MOV without reordered frames), otherwise by
/// reading every packet.
pub fn probe(path: impl AsRef<Path>) -> Result<VideoInfo, DataError> {
    probe_impl(path.as_ref(), true)
}

/// [`probe`] that always reads every packet, ignoring any container index.
pub fn probe_by_demuxing(path: impl AsRef<Path>) -> Result<VideoInfo, DataError> {
    probe_impl(path.as_ref(), false)
}

fn probe_impl(path: &Path, use_index: bool) -> Result<VideoInfo, DataError> {
    let (mut input, index) = open(path)?;
    let (time_base, avg_rate, rotation, params, nb_frames, stream_duration) = {
        let stream = input.stream(index).expect("index from best()");
        (
            stream.time_base(),
            stream.avg_frame_rate(),
            rotation_of(&stream),
            stream.parameters(),
            stream.frames(),
            stream.duration(),
        )
    };
    let container_duration = input.duration();
    let decoder = ff::codec::context::Context::from_parameters(params)
        .and_then(|c| c.decoder().video())
        .map_err(|e| DataError::NotAVideo {
            path: path.into(),
            reason: format!("no decoder for the video stream: {e}"),
        })?;
    let (width, height) = (decoder.width(), decoder.height());
    let mut frame_pts = Vec::new();
    let mut keyframe_pts = Vec::new();
    let mut damaged = None;
    let mut packet = Packet::empty();
    let mut source = ProbeSource::Demux;
    match use_index
        .then(|| frames_from_index(&mut input, index, path))
        .flatten()
    {
        Some((pts, keys)) => {
            (frame_pts, keyframe_pts, source) = (pts, keys, ProbeSource::ContainerIndex)
        }
        // The check may have read packets: demux from a fresh start.
        None if use_index => input = open(path)?.0,
        None => {}
    }
    let mut at_end = false;
    while source == ProbeSource::Demux && !at_end {
        match packet.read(&mut input) {
            Ok(()) => {}
            Err(FfError::Eof) => {
                at_end = true;
                continue;
            }
            Err(e) => {
                damaged = Some(e.to_string());
                at_end = true;
                continue;
            }
        }
        if packet.stream() != index {
            continue;
        }
        let Some(pts) = packet.pts().or(packet.dts()) else {
            continue;
        };
        // Packets the demuxer marks as discard (an MP4 edit list cutting the end)
        // are decoded but never shown: they are not frames of the video.
        let flags = unsafe { (*ff::packet::Ref::as_ptr(&packet)).flags };
        if flags & ff::ffi::AV_PKT_FLAG_DISCARD != 0 {
            continue;
        }
        frame_pts.push(pts);
        if packet.is_key() {
            keyframe_pts.push(pts);
        }
    }
    frame_pts.sort_unstable();
    frame_pts.dedup();
    keyframe_pts.sort_unstable();
    if frame_pts.is_empty() {
        return Err(DataError::Empty.in_file(path));
    }
    // Frame rate from the timestamps themselves (exact for constant-rate video; the
    // container's avg_frame_rate is skewed by the last frame's duration in MP4).
    let span = (frame_pts[frame_pts.len() - 1] - frame_pts[0]) as f64 * f64::from(time_base);
    let fps = if frame_pts.len() > 1 && span > 0.0 {
        (frame_pts.len() - 1) as f64 / span
    } else if avg_rate.numerator() > 0 && avg_rate.denominator() > 0 {
        f64::from(avg_rate)
    } else {
        0.0
    };
    let declared_frames = if nb_frames > 0 {
        Some(nb_frames as usize)
    } else if fps > 0.0 && stream_duration > 0 && stream_duration != ff::ffi::AV_NOPTS_VALUE {
        Some((stream_duration as f64 * f64::from(time_base) * fps).round() as usize)
    } else if fps > 0.0 && container_duration > 0 {
        Some((container_duration as f64 / ff::ffi::AV_TIME_BASE as f64 * fps).round() as usize)
    } else {
        None
    };
    if damaged.is_none()
        && let Some(declared) = declared_frames
        && declared > frame_pts.len() + 1
    {
        damaged = Some(format!(
            "the container declares {declared} frames but only {} could be read (truncated file?)",
            frame_pts.len()
        ));
    }
    Ok(VideoInfo {
        path: path.into(),
        frames: frame_pts.len(),
        declared_frames,
        fps,
        width,
        height,
        rotation,
        time_base: (time_base.numerator(), time_base.denominator()),
        frame_pts,
        keyframe_pts,
        damaged,
        source,
    })
}

/// Packets [`frames_from_index`] reads to confirm the index.
const INDEX_CHECK_PACKETS: usize = 16;

/// Every frame's pts and the keyframes' from an MP4/MOV sample index, when that index
/// can stand in for a demuxing pass: the stream has no reordered frames (so the
/// index's decode timestamps are the presentation timestamps), every sample's bytes
/// lie inside the file (not truncated), and the first packets read agree with it.
/// May read packets: reopen the input before demuxing when it returns `None`.
fn frames_from_index(
    input: &mut format::context::Input,
    index: usize,
    path: &Path,
) -> Option<(Vec<i64>, Vec<i64>)> {
    if !input
        .format()
        .name()
        .split(',')
        .any(|n| n == "mov" || n == "mp4")
    {
        return None;
    }
    let file_len = std::fs::metadata(path).ok()?.len();
    let mut frame_pts = Vec::new();
    let mut keyframe_pts = Vec::new();
    // SAFETY: the stream pointer comes from the open context and stays valid while
    // `input` lives; entries are read before any other call on the context.
    unsafe {
        let stream = *(*input.as_ptr()).streams.add(index);
        if (*(*stream).codecpar).video_delay != 0 {
            return None;
        }
        let count = ff::ffi::avformat_index_get_entries_count(stream);
        for i in 0..count {
            let entry = ff::ffi::avformat_index_get_entry(stream, i);
            if entry.is_null() {
                return None;
            }
            let entry = &*entry;
            let end = u64::try_from(entry.pos).ok()? + entry.size().max(0) as u64;
            if end > file_len {
                return None;
            }
            if entry.flags() & ff::ffi::AVINDEX_DISCARD_FRAME != 0 {
                continue;
            }
            frame_pts.push(entry.timestamp);
            if entry.flags() & ff::ffi::AVINDEX_KEYFRAME != 0 {
                keyframe_pts.push(entry.timestamp);
            }
        }
    }
    if frame_pts.is_empty() || !frame_pts.windows(2).all(|w| w[0] < w[1]) {
        return None;
    }
    // The first packets must carry the index's timestamps and key flags.
    let mut packet = Packet::empty();
    let mut checked = 0;
    let mut agrees = true;
    while checked < INDEX_CHECK_PACKETS.min(frame_pts.len()) {
        if packet.read(input).is_err() {
            agrees = false;
            break;
        }
        if packet.stream() != index {
            continue;
        }
        let flags = unsafe { (*ff::packet::Ref::as_ptr(&packet)).flags };
        if flags & ff::ffi::AV_PKT_FLAG_DISCARD != 0 {
            continue;
        }
        let key_expected = keyframe_pts.binary_search(&frame_pts[checked]).is_ok();
        if packet.pts() != Some(frame_pts[checked]) || packet.is_key() != key_expected {
            agrees = false;
            break;
        }
        checked += 1;
    }
    agrees.then_some((frame_pts, keyframe_pts))
}

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
    mut sink: impl FnMut(FrameBatch),
) -> Result<(VideoInfo, DecodeStats), DataError> {
    let path = path.as_ref();
    let info = probe(path)?;
    // A damaged stream is sampled as the video it claims to be, so the frames before
    // the damage are the ones the caller meant; the rest are reported missing.
    let frames = match (&info.damaged, info.declared_frames) {
        (Some(_), Some(declared)) => declared.max(info.frames),
        _ => info.frames,
    };
    let indices = sampling
        .indices(frames, info.fps, options.short_video)
        .map_err(|e| e.in_file(path))?;
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

/// Cost of a seek in decoded-frame equivalents, for balancing segments.
const SEEK_COST: usize = 4;
/// Segments per worker (more than one so a slow segment does not idle the others).
const SEGMENTS_PER_WORKER: usize = 4;
/// Smallest segment worth its own decoder, in decoded-frame equivalents.
const MIN_SEGMENT_COST: usize = 48;

/// Cuts `indices` (ascending) into ranges that independent decoders can take: a cut
/// lies only where the next requested frame's keyframe comes after the previous
/// requested frame, so no frame is decoded by two segments. Segments carry about
/// equal decoding work (frames to decode, counting a seek as [`SEEK_COST`]).
fn plan_segments(
    info: &VideoInfo,
    indices: &[usize],
    workers: usize,
    seek_skip: usize,
) -> Vec<Range<usize>> {
    if indices.is_empty() {
        return Vec::new();
    }
    if workers <= 1 {
        return std::iter::once(0..indices.len()).collect();
    }
    let readable = |i: usize| i.min(info.frames.saturating_sub(1));
    let mut costs = Vec::with_capacity(indices.len());
    let mut cuttable = Vec::with_capacity(indices.len());
    let mut position: i64 = -1;
    for &idx in indices {
        let idx = readable(idx) as i64;
        let keyframe = info.keyframe_index_at_or_before(idx as usize) as i64;
        cuttable.push(keyframe > position);
        let cost = if idx <= position {
            0
        } else if keyframe - position - 1 > seek_skip as i64 {
            (idx - keyframe + 1) as usize + SEEK_COST
        } else {
            (idx - position) as usize
        };
        costs.push(cost);
        position = position.max(idx);
    }
    let total: usize = costs.iter().sum();
    let target = (total / (workers * SEGMENTS_PER_WORKER)).max(MIN_SEGMENT_COST);
    let mut segments = Vec::new();
    let mut start = 0;
    let mut acc = 0;
    for i in 0..indices.len() {
        if i > start && acc >= target && cuttable[i] {
            segments.push(start..i);
            start = i;
            acc = 0;
        }
        acc += costs[i];
    }
    segments.push(start..indices.len());
    segments
}

enum SegmentMsg {
    /// Packed RGB rows (`3 * width` bytes each).
    Frame(FrameMeta, Vec<u8>),
    Done,
    Failed(DataError),
}

/// Frames each segment may have waiting for the consumer.
const SEGMENT_QUEUE: usize = 4;

#[allow(clippy::too_many_arguments)]
fn decode_parallel(
    info: &VideoInfo,
    indices: &[usize],
    segments: &[Range<usize>],
    pre: &Preprocess,
    workers: usize,
    threads: usize,
    seek_skip: usize,
    stats: &mut DecodeStats,
    deliver: &mut impl FnMut(FrameMeta, &[u8], usize),
) -> Result<(), DataError> {
    let (senders, receivers): (Vec<_>, Vec<_>) = segments
        .iter()
        .map(|_| mpsc::sync_channel::<SegmentMsg>(SEGMENT_QUEUE))
        .unzip();
    // The worker that takes a segment owns its sender, so a worker that dies mid-way
    // disconnects the queue the caller is reading instead of leaving it waiting.
    let senders: Vec<Mutex<Option<SyncSender<SegmentMsg>>>> =
        senders.into_iter().map(|tx| Mutex::new(Some(tx))).collect();
    let next_segment = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                let (senders, next_segment, stop) = (&senders, &next_segment, &stop);
                scope.spawn(move || {
                    let mut decoder: Option<SegmentDecoder> = None;
                    loop {
                        let k = next_segment.fetch_add(1, Ordering::Relaxed);
                        if k >= segments.len() || stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let tx = senders[k]
                            .lock()
                            .unwrap_or_else(|poisoned| poisoned.into_inner())
                            .take()
                            .expect("each segment is taken once");
                        let tx = &tx;
                        let decoder = match &mut decoder {
                            Some(d) => d,
                            None => match SegmentDecoder::open(info, pre, threads, seek_skip) {
                                Ok(d) => decoder.insert(d),
                                Err(e) => {
                                    let _ = tx.send(SegmentMsg::Failed(e));
                                    break;
                                }
                            },
                        };
                        let mut disconnected = false;
                        let result =
                            decoder.run(&indices[segments[k].clone()], |meta, rgb, stride| {
                                if disconnected {
                                    return;
                                }
                                let row = 3 * pre.width as usize;
                                let mut packed = Vec::with_capacity(row * pre.height as usize);
                                for y in 0..pre.height as usize {
                                    packed.extend_from_slice(&rgb[y * stride..y * stride + row]);
                                }
                                disconnected = tx.send(SegmentMsg::Frame(meta, packed)).is_err();
                            });
                        let last = match result {
                            Ok(()) => SegmentMsg::Done,
                            Err(e) => SegmentMsg::Failed(e),
                        };
                        if disconnected || tx.send(last).is_err() {
                            break;
                        }
                    }
                    decoder.map(|d| d.stats).unwrap_or_default()
                })
            })
            .collect();
        let mut outcome = Ok(());
        'segments: for (k, rx) in receivers.iter().enumerate() {
            loop {
                match rx.recv() {
                    Ok(SegmentMsg::Frame(meta, rgb)) => deliver(meta, &rgb, 3 * pre.width as usize),
                    Ok(SegmentMsg::Done) => break,
                    Ok(SegmentMsg::Failed(e)) => {
                        outcome = Err(match e {
                            DataError::Corrupt {
                                path,
                                decoded,
                                reason,
                                ..
                            } => DataError::Corrupt {
                                path,
                                decoded: segments[k].start + decoded,
                                requested: indices.len(),
                                reason,
                            },
                            other => other,
                        });
                        break 'segments;
                    }
                    Err(_) => {
                        outcome = Err(DataError::Corrupt {
                            path: info.path.clone(),
                            decoded: segments[k].start,
                            requested: indices.len(),
                            reason: "a decoding thread stopped unexpectedly".into(),
                        });
                        break 'segments;
                    }
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
        // Unblock workers waiting on a full queue.
        drop(receivers);
        for handle in handles {
            match handle.join() {
                Ok(s) => stats.add(&s),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        outcome
    })
}

/// One FFmpeg demuxer + decoder + scaler walking ascending frame indices.
struct SegmentDecoder<'a> {
    info: &'a VideoInfo,
    input: format::context::Input,
    stream: usize,
    decoder: ff::decoder::Video,
    scaler: Option<Scaler>,
    pre: Preprocess,
    seek_skip: usize,
    decoded: frame::Video,
    rgb: frame::Video,
    rotated: Vec<u8>,
    packet: Packet,
    /// Last frame the decoder produced.
    last_pts: Option<i64>,
    at_eof: bool,
    stats: DecodeStats,
}

impl<'a> SegmentDecoder<'a> {
    fn open(
        info: &'a VideoInfo,
        pre: &Preprocess,
        threads: usize,
        seek_skip: usize,
    ) -> Result<Self, DataError> {
        let path = &info.path;
        let ff_err = |context: &str| {
            let context = context.to_string();
            move |source| DataError::Ffmpeg {
                path: path.clone(),
                context,
                source,
            }
        };
        let (input, stream) = open(path)?;
        let params = input.stream(stream).expect("probed stream").parameters();
        let mut context = ff::codec::context::Context::from_parameters(params)
            .map_err(ff_err("decoder parameters"))?;
        context.set_threading(ff::threading::Config {
            kind: ff::threading::Type::Frame,
            count: threads,
            ..Default::default()
        });
        let decoder = context
            .decoder()
            .video()
            .map_err(ff_err("opening the decoder"))?;
        Ok(SegmentDecoder {
            info,
            input,
            stream,
            decoder,
            scaler: None,
            pre: *pre,
            seek_skip,
            decoded: frame::Video::empty(),
            rgb: frame::Video::empty(),
            rotated: Vec::new(),
            packet: Packet::empty(),
            last_pts: None,
            at_eof: false,
            stats: DecodeStats::default(),
        })
    }

    /// Hands the RGB frames of `indices` (ascending, repeats allowed) to `emit`.
    /// A [`DataError::Corrupt`] counts the frames of `indices` emitted before it.
    fn run(
        &mut self,
        indices: &[usize],
        mut emit: impl FnMut(FrameMeta, &[u8], usize),
    ) -> Result<(), DataError> {
        let info = self.info;
        let path = &info.path;
        let corrupt = |next: usize, reason: String| DataError::Corrupt {
            path: path.clone(),
            decoded: next,
            requested: indices.len(),
            reason,
        };
        let mut next = 0; // position in `indices`
        while next < indices.len() {
            if indices[next] >= info.frames {
                let reason = info.damaged.clone().unwrap_or_default();
                return Err(corrupt(
                    next,
                    format!(
                        "frame {} lies beyond the readable stream: {reason}",
                        indices[next]
                    ),
                ));
            }
            let target = info.frame_pts[indices[next]];
            let keyframe = info.keyframe_at_or_before(target);
            // Seek only to a keyframe beyond the decoder's position (so no GOP prefix
            // is ever decoded twice, whatever the density of the request), and only
            // when that skips more than `seek_skip` frames: below that, decoding
            // forward is cheaper than flushing the decoder. A fresh decoder stands
            // before the first frame.
            let position = match self.last_pts {
                None => -1,
                Some(pos) => info.frame_pts.partition_point(|&p| p <= pos) as i64 - 1,
            };
            let keyframe_index = info.frame_pts.partition_point(|&p| p < keyframe) as i64;
            let must_seek = keyframe_index - position - 1 > self.seek_skip as i64
                || self.last_pts.is_some_and(|pos| pos >= target);
            if must_seek {
                let ret = unsafe {
                    ff::ffi::avformat_seek_file(
                        self.input.as_mut_ptr(),
                        self.stream as i32,
                        i64::MIN,
                        keyframe,
                        keyframe,
                        0,
                    )
                };
                if ret < 0 {
                    return Err(corrupt(
                        next,
                        format!("seek to pts {keyframe} failed: {}", FfError::from(ret)),
                    ));
                }
                self.decoder.flush();
                self.stats.seeks += 1;
                self.at_eof = false;
            }
            // Feed packets until the decoder produces the target frame.
            loop {
                match self.decoder.receive_frame(&mut self.decoded) {
                    Ok(()) => {
                        self.stats.decoded_frames += 1;
                        let Some(pts) = self.decoded.timestamp() else {
                            continue;
                        };
                        self.last_pts = Some(pts);
                        if pts < target {
                            continue;
                        }
                        if pts > target {
                            return Err(corrupt(
                                next,
                                format!(
                                    "frame {} (pts {target}) was never decoded; the decoder went on to pts {pts}",
                                    indices[next]
                                ),
                            ));
                        }
                        let (data, stride) = self.convert()?;
                        // Convert once, emit for every request of this frame.
                        while next < indices.len()
                            && indices[next] < info.frames
                            && info.frame_pts[indices[next]] == pts
                        {
                            let meta = FrameMeta {
                                index: indices[next],
                                pts,
                                seconds: info.seconds(pts),
                            };
                            let data = match &data {
                                Some(rotated) => rotated.as_slice(),
                                None => self.rgb.data(0),
                            };
                            emit(meta, data, stride);
                            self.stats.returned_frames += 1;
                            next += 1;
                        }
                        if let Some(buffer) = data {
                            self.rotated = buffer;
                        }
                        break;
                    }
                    Err(FfError::Eof) => {
                        return Err(corrupt(
                            next,
                            format!(
                                "the stream ended before frame {} (pts {target})",
                                indices[next]
                            ),
                        ));
                    }
                    Err(FfError::Other { errno }) if errno == ff::error::EAGAIN => {}
                    Err(e) => return Err(corrupt(next, format!("decoding failed: {e}"))),
                }
                if self.at_eof {
                    return Err(corrupt(
                        next,
                        format!(
                            "the stream ended before frame {} (pts {target})",
                            indices[next]
                        ),
                    ));
                }
                match self.packet.read(&mut self.input) {
                    Ok(()) => {
                        if self.packet.stream() != self.stream {
                            continue;
                        }
                        match self.decoder.send_packet(&self.packet) {
                            Ok(()) => {}
                            Err(FfError::Other { errno }) if errno == ff::error::EAGAIN => {}
                            Err(e) => {
                                return Err(corrupt(
                                    next,
                                    format!("bad packet at pts {:?}: {e}", self.packet.pts()),
                                ));
                            }
                        }
                    }
                    Err(FfError::Eof) => {
                        self.decoder
                            .send_eof()
                            .map_err(|source| DataError::Ffmpeg {
                                path: path.clone(),
                                context: "flushing the decoder".into(),
                                source,
                            })?;
                        self.at_eof = true;
                    }
                    Err(e) => return Err(corrupt(next, format!("reading failed: {e}"))),
                }
            }
        }
        Ok(())
    }

    /// Scales the decoded frame into `self.rgb`; for rotated video also rotates it
    /// into a separate buffer, returned (taken from `self.rotated`) with its stride.
    fn convert(&mut self) -> Result<(Option<Vec<u8>>, usize), DataError> {
        let info = self.info;
        let pre = self.pre;
        let rotated = info.rotation % 180 == 90;
        let (scale_w, scale_h) = if rotated {
            (pre.height, pre.width)
        } else {
            (pre.width, pre.height)
        };
        let scaler = match &mut self.scaler {
            Some(s) => s,
            None => self.scaler.insert(
                Scaler::get(
                    self.decoded.format(),
                    self.decoded.width(),
                    self.decoded.height(),
                    format::Pixel::RGB24,
                    scale_w,
                    scale_h,
                    Flags::BILINEAR,
                )
                .map_err(|source| DataError::Ffmpeg {
                    path: info.path.clone(),
                    context: "creating the scaler".into(),
                    source,
                })?,
            ),
        };
        scaler
            .run(&self.decoded, &mut self.rgb)
            .map_err(|source| DataError::Ffmpeg {
                path: info.path.clone(),
                context: "scaling".into(),
                source,
            })?;
        if info.rotation == 0 {
            return Ok((None, self.rgb.stride(0)));
        }
        let mut buffer = std::mem::take(&mut self.rotated);
        rotate_rgb(
            self.rgb.data(0),
            self.rgb.stride(0),
            scale_w as usize,
            scale_h as usize,
            info.rotation,
            &mut buffer,
        );
        Ok((Some(buffer), 3 * pre.width as usize))
    }
}

/// Rotates a packed RGB image clockwise by `degrees` (90, 180, 270) into `out`.
fn rotate_rgb(src: &[u8], stride: usize, w: usize, h: usize, degrees: u32, out: &mut Vec<u8>) {
    out.resize(w * h * 3, 0);
    let (ow, _) = if degrees % 180 == 90 { (h, w) } else { (w, h) };
    for y in 0..h {
        for x in 0..w {
            let (ox, oy) = match degrees {
                90 => (h - 1 - y, x),
                180 => (w - 1 - x, h - 1 - y),
                270 => (y, w - 1 - x),
                _ => (x, y),
            };
            let s = y * stride + 3 * x;
            let d = (oy * ow + ox) * 3;
            out[d..d + 3].copy_from_slice(&src[s..s + 3]);
        }
    }
}
