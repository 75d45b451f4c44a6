//! The decoders behind [`decode`](super::decode): requested frames cut into
//! keyframe-aligned segments, each decoded by its own FFmpeg decoder (in parallel
//! when there are several), frames converted and rotated on the way out.

use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, SyncSender};

use ff::software::scaling::{Context as Scaler, Flags};
use ff::{Error as FfError, Packet, format, frame};
use ffmpeg_next as ff;

use super::stream_info::open;
use super::{DecodeStats, FrameMeta, VideoInfo};
use crate::error::DataError;
use crate::preprocess::Preprocess;

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
pub(super) fn plan_segments(
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
pub(super) fn decode_parallel(
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
pub(super) struct SegmentDecoder<'a> {
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
    pub(super) stats: DecodeStats,
}

impl<'a> SegmentDecoder<'a> {
    pub(super) fn open(
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
    pub(super) fn run(
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
        // A stream whose size or pixel format changes midway (concatenated clips,
        // screen recordings) gets a scaler for its new frames.
        let decoded = (
            self.decoded.format(),
            self.decoded.width(),
            self.decoded.height(),
        );
        if self.scaler.as_ref().is_some_and(|s| {
            let input = s.input();
            (input.format, input.width, input.height) != decoded
        }) {
            self.scaler = None;
        }
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
