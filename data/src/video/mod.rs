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

use std::path::{Path, PathBuf};
use std::sync::Once;

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

/// Reads the container and the video stream's packets (no decoding).
pub fn probe(path: impl AsRef<Path>) -> Result<VideoInfo, DataError> {
    let path = path.as_ref();
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
    loop {
        match packet.read(&mut input) {
            Ok(()) => {}
            Err(FfError::Eof) => break,
            Err(e) => {
                damaged = Some(e.to_string());
                break;
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
        if flags & ff::ffi::AV_PKT_FLAG_DISCARD as i32 != 0 {
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
    })
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

/// How [`decode`] works.
#[derive(Debug, Clone, Copy)]
pub struct DecodeOptions {
    pub preprocess: Preprocess,
    /// Frames per [`FrameBatch`].
    pub batch_size: usize,
    /// FFmpeg decoder threads (0: one per core).
    pub threads: usize,
    pub short_video: ShortVideo,
    /// Decode forward through up to this many unwanted frames rather than seek.
    pub seek_skip_frames: usize,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        DecodeOptions {
            preprocess: Preprocess::SIGLIP_384,
            batch_size: 64,
            threads: 0,
            short_video: ShortVideo::Repeat,
            seek_skip_frames: SEEK_SKIP_FRAMES,
        }
    }
}

/// Counters of one [`decode`] call (what the keyframe logic did).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DecodeStats {
    pub seeks: usize,
    pub decoded_frames: usize,
    pub returned_frames: usize,
}

/// Decodes the frames `sampling` selects, calling `sink` with batches in request
/// order. Returns the probe result and counters.
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
    let mut stats = DecodeStats::default();
    let mut batch = FrameBatch {
        frames: Vec::new(),
        pixels: Vec::new(),
    };
    let batch_size = options.batch_size.max(1);
    let result = decode_indices(
        &info,
        &indices,
        options,
        &mut stats,
        |meta, rgb, stride, pre| {
            pre.normalize_rgb(rgb, stride, &mut batch.pixels);
            batch.frames.push(meta);
            if batch.frames.len() == batch_size {
                sink(std::mem::replace(
                    &mut batch,
                    FrameBatch {
                        frames: Vec::new(),
                        pixels: Vec::new(),
                    },
                ));
            }
        },
    );
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
    let mut all = FrameBatch {
        frames: Vec::new(),
        pixels: Vec::new(),
    };
    let (info, _) = decode(path, sampling, options, |b| {
        all.frames.extend(b.frames);
        all.pixels.extend(b.pixels);
    })?;
    Ok((info, all))
}

/// The RGB frames of `indices` (ascending, repeats allowed) handed to `emit`.
fn decode_indices(
    info: &VideoInfo,
    indices: &[usize],
    options: &DecodeOptions,
    stats: &mut DecodeStats,
    mut emit: impl FnMut(FrameMeta, &[u8], usize, &Preprocess),
) -> Result<(), DataError> {
    let path = &info.path;
    let ff_err = |context: &str| {
        let context = context.to_string();
        move |source| DataError::Ffmpeg {
            path: path.clone(),
            context,
            source,
        }
    };
    let (mut input, index) = open(path)?;
    let params = input.stream(index).expect("probed stream").parameters();
    let mut context = ff::codec::context::Context::from_parameters(params)
        .map_err(ff_err("decoder parameters"))?;
    context.set_threading(ff::threading::Config {
        kind: ff::threading::Type::Frame,
        count: options.threads,
        ..Default::default()
    });
    let mut decoder = context
        .decoder()
        .video()
        .map_err(ff_err("opening the decoder"))?;
    let pre = options.preprocess;
    let rotated = info.rotation % 180 == 90;
    let (scale_w, scale_h) = if rotated {
        (pre.height, pre.width)
    } else {
        (pre.width, pre.height)
    };
    let mut scaler: Option<Scaler> = None;
    let mut decoded = frame::Video::empty();
    let mut rgb = frame::Video::empty();
    let mut rotated_buf = Vec::new();
    let mut packet = Packet::empty();

    let mut next = 0; // position in `indices`
    let mut last_pts: Option<i64> = None; // last frame the decoder produced
    let mut at_eof = false;
    let corrupt = |next: usize, reason: String| DataError::Corrupt {
        path: path.clone(),
        decoded: next,
        requested: indices.len(),
        reason,
    };
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
        // Seek only to a keyframe beyond the decoder's position (so no GOP prefix is
        // ever decoded twice, whatever the density of the request), and only when
        // that skips more than `seek_skip_frames` frames: below that, decoding forward
        // is cheaper than flushing the frame-threaded decoder. A fresh decoder stands
        // before the first frame.
        let position = match last_pts {
            None => -1,
            Some(pos) => info.frame_pts.partition_point(|&p| p <= pos) as i64 - 1,
        };
        let keyframe_index = info.frame_pts.partition_point(|&p| p < keyframe) as i64;
        let must_seek = keyframe_index - position - 1 > options.seek_skip_frames as i64
            || last_pts.is_some_and(|pos| pos >= target);
        if must_seek {
            let ret = unsafe {
                ff::ffi::avformat_seek_file(
                    input.as_mut_ptr(),
                    index as i32,
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
            decoder.flush();
            stats.seeks += 1;
            at_eof = false;
        }
        // Feed packets until the decoder produces the target frame.
        'feed: loop {
            match decoder.receive_frame(&mut decoded) {
                Ok(()) => {
                    stats.decoded_frames += 1;
                    let Some(pts) = decoded.timestamp() else {
                        continue;
                    };
                    last_pts = Some(pts);
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
                    // Convert once, emit for every request of this frame.
                    let scaler = match &mut scaler {
                        Some(s) => s,
                        None => scaler.insert(
                            Scaler::get(
                                decoded.format(),
                                decoded.width(),
                                decoded.height(),
                                format::Pixel::RGB24,
                                scale_w,
                                scale_h,
                                Flags::BILINEAR,
                            )
                            .map_err(ff_err("creating the scaler"))?,
                        ),
                    };
                    scaler.run(&decoded, &mut rgb).map_err(ff_err("scaling"))?;
                    let (data, stride) = if rotated || info.rotation == 180 {
                        rotate_rgb(
                            rgb.data(0),
                            rgb.stride(0),
                            scale_w as usize,
                            scale_h as usize,
                            info.rotation,
                            &mut rotated_buf,
                        );
                        (rotated_buf.as_slice(), 3 * pre.width as usize)
                    } else {
                        (rgb.data(0), rgb.stride(0))
                    };
                    while next < indices.len()
                        && indices[next] < info.frames
                        && info.frame_pts[indices[next]] == pts
                    {
                        let meta = FrameMeta {
                            index: indices[next],
                            pts,
                            seconds: info.seconds(pts),
                        };
                        emit(meta, data, stride, &pre);
                        stats.returned_frames += 1;
                        next += 1;
                    }
                    break 'feed;
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
            if at_eof {
                return Err(corrupt(
                    next,
                    format!(
                        "the stream ended before frame {} (pts {target})",
                        indices[next]
                    ),
                ));
            }
            match packet.read(&mut input) {
                Ok(()) => {
                    if packet.stream() != index {
                        continue;
                    }
                    match decoder.send_packet(&packet) {
                        Ok(()) => {}
                        Err(FfError::Other { errno }) if errno == ff::error::EAGAIN => {}
                        Err(e) => {
                            return Err(corrupt(
                                next,
                                format!("bad packet at pts {:?}: {e}", packet.pts()),
                            ));
                        }
                    }
                }
                Err(FfError::Eof) => {
                    decoder.send_eof().map_err(ff_err("flushing the decoder"))?;
                    at_eof = true;
                }
                Err(e) => return Err(corrupt(next, format!("reading failed: {e}"))),
            }
        }
    }
    Ok(())
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
