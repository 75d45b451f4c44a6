//! Synthetic haystack videos for tests, benchmarks and the default training task:
//! H.264 (libx264) files of any length, size, frame rate and GOP, with a frame-number
//! barcode on every frame and needle frames showing digits at chosen depths.

use std::path::Path;

use ff::{Dictionary, Packet, Rational, codec, encoder, format, frame};
use ffmpeg_next as ff;

use crate::error::DataError;
pub use crate::synthetic_frames::{BARCODE_BITS, needle_frames, read_barcode, shows_needle};
use crate::synthetic_frames::{YuvPlanes, draw_frame};

/// A needle: `text` (digits) shown on frame `frame`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Needle {
    pub frame: usize,
    pub text: String,
}

/// Description of a synthetic video.
#[derive(Debug, Clone)]
pub struct SyntheticVideo {
    pub width: u32,
    pub height: u32,
    pub fps: i32,
    pub frames: usize,
    /// Keyframe interval (frames); scene-cut keyframes are disabled so the GOP is exact.
    pub gop: u32,
    pub needles: Vec<Needle>,
    /// Clockwise display rotation written as metadata (0, 90, 180, 270).
    pub rotation: u32,
}

impl SyntheticVideo {
    pub fn new(width: u32, height: u32, fps: i32, frames: usize, gop: u32) -> Self {
        SyntheticVideo {
            width,
            height,
            fps,
            frames,
            gop,
            needles: Vec::new(),
            rotation: 0,
        }
    }

    pub fn with_needles(mut self, needles: Vec<Needle>) -> Self {
        self.needles = needles;
        self
    }

    pub fn with_rotation(mut self, rotation: u32) -> Self {
        self.rotation = rotation;
        self
    }

    /// Encodes the video to `path` (container from the extension, e.g. `.mp4`).
    pub fn write(&self, path: impl AsRef<Path>) -> Result<(), DataError> {
        let path = path.as_ref();
        crate::video::init_ffmpeg();
        let fail = |context: &'static str| {
            move |source| DataError::Ffmpeg {
                path: path.into(),
                context: context.into(),
                source,
            }
        };
        if !self.width.is_multiple_of(2)
            || !self.height.is_multiple_of(2)
            || self.frames == 0
            || self.fps <= 0
        {
            return Err(DataError::Sampling(format!(
                "synthetic video {}x{} with {} frames at {} fps: sizes must be even, frames and fps positive",
                self.width, self.height, self.frames, self.fps
            )));
        }
        let codec = encoder::find_by_name("libx264")
            .or_else(|| encoder::find(codec::Id::H264))
            .ok_or_else(|| fail("finding an H.264 encoder")(ff::Error::EncoderNotFound))?;
        let mut output = format::output(path).map_err(fail("creating the output"))?;
        let global_header = output
            .format()
            .flags()
            .contains(format::Flags::GLOBAL_HEADER);
        let mut enc = codec::context::Context::new_with_codec(codec)
            .encoder()
            .video()
            .map_err(fail("creating the encoder"))?;
        let time_base = Rational(1, self.fps);
        enc.set_width(self.width);
        enc.set_height(self.height);
        enc.set_format(format::Pixel::YUV420P);
        enc.set_time_base(time_base);
        enc.set_frame_rate(Some(Rational(self.fps, 1)));
        enc.set_gop(self.gop);
        enc.set_max_b_frames(0);
        if global_header {
            enc.set_flags(codec::Flags::GLOBAL_HEADER);
        }
        let mut opts = Dictionary::new();
        opts.set("preset", "ultrafast");
        opts.set("crf", "18");
        opts.set(
            "x264-params",
            &format!("keyint={0}:min-keyint={0}:scenecut=0:threads=2", self.gop),
        );
        let mut enc = enc.open_with(opts).map_err(fail("opening the encoder"))?;
        let stream_index = {
            let mut stream = output.add_stream(codec).map_err(fail("adding a stream"))?;
            stream.set_parameters(&enc);
            stream.set_time_base(time_base);
            stream.index()
        };
        if self.rotation != 0 {
            // Display matrix side data on the stream (what players and probes read).
            unsafe {
                let ctx = output.as_mut_ptr();
                let stream = *(*ctx).streams.add(stream_index);
                let matrix = ff::ffi::av_stream_new_side_data(
                    stream,
                    ff::ffi::AVPacketSideDataType::AV_PKT_DATA_DISPLAYMATRIX,
                    36,
                ) as *mut i32;
                if matrix.is_null() {
                    return Err(fail("adding rotation metadata")(ff::Error::Other {
                        errno: ff::error::ENOMEM,
                    }));
                }
                // A matrix that rotates the coded frame clockwise by `rotation` for display.
                ff::ffi::av_display_rotation_set(matrix, self.rotation as f64);
            }
        }
        output.write_header().map_err(fail("writing the header"))?;
        let stream_tb = output.stream(stream_index).expect("added").time_base();
        let drain = |enc: &mut encoder::video::Encoder,
                     output: &mut format::context::Output|
         -> Result<(), ff::Error> {
            let mut packet = Packet::empty();
            while enc.receive_packet(&mut packet).is_ok() {
                // Without a duration the MP4 muxer's edit list ends at the last
                // packet's start, and demuxers then discard that frame.
                if packet.duration() == 0 {
                    packet.set_duration(1);
                }
                packet.set_stream(stream_index);
                packet.rescale_ts(time_base, stream_tb);
                packet.write_interleaved(output)?;
            }
            Ok(())
        };
        for i in 0..self.frames {
            let mut frame = frame::Video::new(format::Pixel::YUV420P, self.width, self.height);
            let needle = self
                .needles
                .iter()
                .find(|n| n.frame == i)
                .map(|n| n.text.as_str());
            {
                let (ys, us, vs) = (frame.stride(0), frame.stride(1), frame.stride(2));
                // Split the frame's buffer into its three planes.
                let (y, u, v) = unsafe {
                    let f = &mut *frame.as_mut_ptr();
                    let h = self.height as usize;
                    let hc = h.div_ceil(2);
                    (
                        std::slice::from_raw_parts_mut(f.data[0], ys * h),
                        std::slice::from_raw_parts_mut(f.data[1], us * hc),
                        std::slice::from_raw_parts_mut(f.data[2], vs * hc),
                    )
                };
                let mut planes = YuvPlanes {
                    y,
                    y_stride: ys,
                    u,
                    u_stride: us,
                    v,
                    v_stride: vs,
                    width: self.width as usize,
                    height: self.height as usize,
                };
                draw_frame(&mut planes, i, needle);
            }
            frame.set_pts(Some(i as i64));
            enc.send_frame(&frame).map_err(fail("encoding"))?;
            drain(&mut enc, &mut output).map_err(fail("writing packets"))?;
        }
        enc.send_eof().map_err(fail("flushing the encoder"))?;
        drain(&mut enc, &mut output).map_err(fail("writing packets"))?;
        output
            .write_trailer()
            .map_err(fail("writing the trailer"))?;
        Ok(())
    }
}

/// One question about a generated haystack video (a row of the JSONL file).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HaystackSample {
    /// Video file name, relative to the JSONL file's folder.
    pub video: String,
    pub frames: usize,
    /// Frame showing the needle, and its relative depth in the video.
    pub needle_frame: usize,
    pub depth: f64,
    pub question: String,
    /// Needle-in-a-haystack answer: the digits shown.
    pub answer: String,
    /// Multiple-choice variant: options "A. ..", "B. .." and the correct letter.
    pub options: Vec<String>,
    pub choice: String,
}

/// What [`write_haystack_set`] generates: one video per (depth, seed) pair.
#[derive(Debug, Clone)]
pub struct HaystackSpec {
    pub width: u32,
    pub height: u32,
    pub fps: i32,
    pub frames: usize,
    pub gop: u32,
    /// Needle depths, LongVILA's grid is {0, .2, .4, .6, .8, 1}.
    pub depths: Vec<f64>,
    /// Videos per depth (each with another needle number).
    pub per_depth: usize,
    pub seed: u64,
}

/// Writes the videos and `haystack.jsonl` into `dir`; returns the rows.
pub fn write_haystack_set(
    dir: impl AsRef<Path>,
    spec: &HaystackSpec,
) -> Result<Vec<HaystackSample>, DataError> {
    let dir = dir.as_ref();
    std::fs::create_dir_all(dir).map_err(|source| DataError::Io {
        path: dir.into(),
        source,
    })?;
    let mut state = spec.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut rows = Vec::new();
    for (d, &depth) in spec.depths.iter().enumerate() {
        for k in 0..spec.per_depth {
            let number = 10 + (next() % 90) as u32; // two digits
            let frame = needle_frames(spec.frames, &[depth])[0];
            let name = format!("haystack-d{d}-{k}.mp4");
            SyntheticVideo::new(spec.width, spec.height, spec.fps, spec.frames, spec.gop)
                .with_needles(vec![Needle {
                    frame,
                    text: number.to_string(),
                }])
                .write(dir.join(&name))?;
            // Four distinct two-digit options, the answer at a random letter.
            let mut options = vec![number];
            while options.len() < 4 {
                let other = 10 + (next() % 90) as u32;
                if !options.contains(&other) {
                    options.push(other);
                }
            }
            let correct = (next() % 4) as usize;
            options.swap(0, correct);
            let letters = ["A", "B", "C", "D"];
            rows.push(HaystackSample {
                video: name,
                frames: spec.frames,
                needle_frame: frame,
                depth,
                question: "What number appears in the video? Answer with the number only.".into(),
                answer: number.to_string(),
                options: options
                    .iter()
                    .zip(letters)
                    .map(|(o, l)| format!("{l}. {o}"))
                    .collect(),
                choice: letters[correct].into(),
            });
        }
    }
    let path = dir.join("haystack.jsonl");
    let mut text = String::new();
    for row in &rows {
        text.push_str(&serde_json::to_string(row).expect("rows serialise"));
        text.push('\n');
    }
    let tmp = dir.join(".haystack.jsonl.tmp");
    std::fs::write(&tmp, text).map_err(|source| DataError::Io {
        path: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, &path).map_err(|source| DataError::Io {
        path: path.clone(),
        source,
    })?;
    Ok(rows)
}
