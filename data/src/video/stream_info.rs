//! What a video holds before any frame is decoded: frame timestamps, keyframes,
//! rotation and damage, from the container's index or one demuxing pass.

use std::path::{Path, PathBuf};
use std::sync::Once;

use ff::codec::packet::side_data::Type as SideDataType;
use ff::{Error as FfError, Packet, format, media};
use ffmpeg_next as ff;

use crate::error::DataError;

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
    pub(super) fn keyframe_index_at_or_before(&self, index: usize) -> usize {
        let keyframe = self.keyframe_at_or_before(self.frame_pts[index]);
        self.frame_pts.partition_point(|&p| p < keyframe)
    }

    /// Pts of the keyframe at or before `pts`.
    pub(super) fn keyframe_at_or_before(&self, pts: i64) -> i64 {
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

pub(super) fn open(path: &Path) -> Result<(format::context::Input, usize), DataError> {
    init_ffmpeg();
    if !path.exists() {
        return Err(DataError::NotFound { path: path.into() });
    }
    // FFmpeg takes UTF-8 paths, and reads `name:rest` as a protocol (`10:30.mp4`
    // would be "protocol not found"): such a path goes through `file:`.
    let Some(text) = path.to_str() else {
        return Err(DataError::NotAVideo {
            path: path.into(),
            reason: "the path is not valid UTF-8 (FFmpeg takes UTF-8 paths)".into(),
        });
    };
    let url = if text.contains(':') {
        format!("file:{text}")
    } else {
        text.to_string()
    };
    let input = format::input(&url).map_err(|e| DataError::NotAVideo {
        path: path.into(),
        reason: e.to_string(),
    })?;
    // A cover picture (an audio file's album art) is a video stream of one frame:
    // not a video. The best stream that is not one.
    let cover = |s: &ff::Stream<'_>| {
        s.disposition()
            .contains(ff::format::stream::Disposition::ATTACHED_PIC)
    };
    let best = input.streams().best(media::Type::Video);
    let index = match best {
        Some(s) if !cover(&s) => s.index(),
        _ => input
            .streams()
            .find(|s| s.parameters().medium() == media::Type::Video && !cover(s))
            .map(|s| s.index())
            .ok_or_else(|| DataError::NotAVideo {
                path: path.into(),
                reason: match best {
                    Some(_) => "no video stream, only a cover picture (an audio file?)".into(),
                    None => "no video stream".into(),
                },
            })?,
    };
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

/// What the container says about the video stream's length.
struct Declared {
    /// The stream's sample count (0: not given).
    nb_frames: i64,
    /// Frames the container counts that are never shown: packets or index entries
    /// marked as discard (an MP4 edit list).
    hidden: usize,
    /// The video stream's own duration.
    stream_seconds: Option<f64>,
    /// The whole file's duration (every stream).
    container_seconds: Option<f64>,
    /// Streams in the file (video, audio, subtitles...).
    streams: usize,
    fps: f64,
}

/// Frames the container declares for the video stream: its sample count, else its
/// duration times the frame rate, less the hidden ones; else, for a file holding
/// only the video stream, the file's duration times the frame rate (with an audio
/// track, the file's duration is the longer of the two: a WebM whose audio outlasts
/// its video would look truncated). `None` when nothing says.
fn declared_frames(d: &Declared) -> Option<usize> {
    let frames = |seconds: f64| ((seconds * d.fps).round() as usize).saturating_sub(d.hidden);
    if d.nb_frames > 0 {
        Some((d.nb_frames as usize).saturating_sub(d.hidden))
    } else if d.fps > 0.0
        && let Some(seconds) = d.stream_seconds
    {
        Some(frames(seconds))
    } else if d.fps > 0.0
        && d.streams == 1
        && let Some(seconds) = d.container_seconds
    {
        Some(frames(seconds))
    } else {
        None
    }
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
    let streams = input.streams().count();
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
    let mut discarded = 0usize;
    let mut packet = Packet::empty();
    let mut source = ProbeSource::Demux;
    match use_index
        .then(|| frames_from_index(&mut input, index, path))
        .flatten()
    {
        Some((pts, keys, hidden)) => {
            (frame_pts, keyframe_pts, source) = (pts, keys, ProbeSource::ContainerIndex);
            discarded = hidden;
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
            discarded += 1;
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
    let hidden = discarded;
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
    let declared_frames = declared_frames(&Declared {
        nb_frames,
        hidden,
        stream_seconds: (stream_duration > 0 && stream_duration != ff::ffi::AV_NOPTS_VALUE)
            .then(|| stream_duration as f64 * f64::from(time_base)),
        container_seconds: (container_duration > 0)
            .then(|| container_duration as f64 / ff::ffi::AV_TIME_BASE as f64),
        streams,
        fps,
    });
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

/// Every shown frame's pts, the keyframes' and the count of entries an edit list
/// discards, from an MP4/MOV sample index, when that index
/// can stand in for a demuxing pass: the stream has no reordered frames (so the
/// index's decode timestamps are the presentation timestamps), every sample's bytes
/// lie inside the file (not truncated), and the first packets read agree with it.
/// May read packets: reopen the input before demuxing when it returns `None`.
fn frames_from_index(
    input: &mut format::context::Input,
    index: usize,
    path: &Path,
) -> Option<(Vec<i64>, Vec<i64>, usize)> {
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
    let mut discarded = 0;
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
                discarded += 1;
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
    agrees.then_some((frame_pts, keyframe_pts, discarded))
}

#[cfg(test)]
mod tests {
    use super::{Declared, declared_frames};

    #[test]
    fn the_declared_length_comes_from_the_video_stream_only() {
        let base = Declared {
            nb_frames: 0,
            hidden: 0,
            stream_seconds: None,
            container_seconds: Some(10.2),
            streams: 1,
            fps: 30.0,
        };
        // A file holding only the video: its duration is the video's.
        assert_eq!(declared_frames(&base), Some(306));
        // With an audio track the file's duration may be the audio's: not used.
        let with_audio = Declared { streams: 2, ..base };
        assert_eq!(declared_frames(&with_audio), None);
        // The video stream's own duration is.
        let own = Declared {
            stream_seconds: Some(10.0),
            ..with_audio
        };
        assert_eq!(declared_frames(&own), Some(300));
        // A sample count wins, less the samples an edit list hides.
        let counted = Declared {
            nb_frames: 302,
            hidden: 2,
            ..own
        };
        assert_eq!(declared_frames(&counted), Some(300));
        // A duration counts the hidden frames too.
        let cut = Declared { hidden: 4, ..own };
        assert_eq!(declared_frames(&cut), Some(296));
        // No frame rate: nothing to convert a duration with.
        let no_rate = Declared { fps: 0.0, ..own };
        assert_eq!(declared_frames(&no_rate), None);
    }
}
