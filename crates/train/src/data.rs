//! Samples for training and evaluation: generated needle-in-a-haystack videos decoded
//! with FFmpeg at the encoder's resolution, wrapped in the Qwen2 chat template, and
//! batched (right-padded, padding unsupervised) into model inputs.

use std::path::{Path, PathBuf};

use longview_data::dataset::{
    MediaKind, MediaRef, ReadOptions, read_conversations, read_jsonl, read_reason,
};
use longview_data::synthetic::{
    HaystackSample, HaystackSpec, Needle, SyntheticVideo, write_haystack_set,
};
use longview_data::{Media, Message, Preprocess, Role, TextTokenizer, load_image};

use crate::config::{AnswerFormat, DataKind};
use crate::error::TrainError;

pub use longview_infer::sample::{
    Batch, Encoder, NEEDLE_QUESTION, Sample, collate, decode_frames, frames_tensor, mix,
    single_input,
};

/// Training needles and held-out haystack samples.
pub struct HaystackData {
    pub train: NeedleSet,
    pub eval: Vec<Sample>,
}

/// The haystack lengths of the training set: `min_frames`, doubling, up to `frames`.
pub fn train_lengths(min_frames: usize, frames: usize) -> Vec<usize> {
    let mut lengths = Vec::new();
    let mut n = min_frames.clamp(1, frames);
    while n < frames {
        lengths.push(n);
        n *= 2;
    }
    lengths.push(frames);
    lengths
}

/// The two-digit numbers a needle can show.
const NUMBERS: std::ops::Range<u32> = 10..100;

/// Training data built the way LongVILA builds its needle test: needle frames
/// inserted into a haystack video. Both come from generated H.264 videos decoded like
/// any input: one needle-free haystack per length of [`train_lengths`], and a bank
/// of needle frames (every two-digit number on `needle_copies` frames with different
/// backgrounds). Sample `i` of the stream is a function of `(seed, i)` only, so a
/// resumed run reads exactly what an uninterrupted one would, and there is no fixed
/// set of (video, answer) pairs to memorise.
pub struct NeedleSet {
    /// `(frames, pixels)` of each needle-free haystack.
    haystacks: Vec<(usize, Vec<f32>)>,
    /// Needle frames, planar, one after another; `numbers[k]` is frame `k`'s number.
    bank: Vec<f32>,
    numbers: Vec<u32>,
    frame_len: usize,
    /// How answers are written.
    answer_format: AnswerFormat,
}

impl NeedleSet {
    /// Distinct needle frames (a stream has no epochs: this is the data's variety).
    pub fn needle_frames(&self) -> usize {
        self.numbers.len()
    }

    /// The haystack lengths.
    pub fn lengths(&self) -> Vec<usize> {
        self.haystacks.iter().map(|(n, _)| *n).collect()
    }

    /// Sample `index` of the stream: a haystack length in equal shares, a needle frame
    /// from the bank, and a uniformly drawn frame of the haystack that it replaces.
    pub fn sample(
        &self,
        encoder: &Encoder<'_>,
        seed: u64,
        index: usize,
    ) -> Result<Sample, TrainError> {
        let mut draw = mix(seed ^ 0x6E65_6564_6C65_7321, index as u64);
        let mut next = |n: usize| {
            draw = mix(draw, 0x9E37_79B9_7F4A_7C15);
            (draw % n as u64) as usize
        };
        let (frames, haystack) = &self.haystacks[next(self.haystacks.len())];
        let needle = next(self.numbers.len());
        let at = next(*frames);
        let mut pixels = haystack.clone();
        let len = self.frame_len;
        pixels[at * len..(at + 1) * len]
            .copy_from_slice(&self.bank[needle * len..(needle + 1) * len]);
        let depth = if *frames > 1 {
            at as f64 / (*frames - 1) as f64
        } else {
            0.0
        };
        let answer = format_answer(&self.numbers[needle].to_string(), self.answer_format);
        Ok(encoder.conversation(pixels, *frames, NEEDLE_QUESTION, &answer, depth)?)
    }

    /// The set with answers written as `format` says.
    pub fn with_answer_format(mut self, format: AnswerFormat) -> Self {
        self.answer_format = format;
        self
    }
}

/// A needle number as an answer of `format`.
pub fn format_answer(number: &str, format: AnswerFormat) -> String {
    match format {
        AnswerFormat::Plain => number.to_string(),
        AnswerFormat::Think => crate::grpo::reward::needle_cot_answer(number),
    }
}

/// Held-out samples re-encoded with answers of `format` (their frames kept).
pub fn reformat_answers(
    encoder: &Encoder<'_>,
    samples: Vec<Sample>,
    format: AnswerFormat,
) -> Result<Vec<Sample>, TrainError> {
    if format == AnswerFormat::Plain {
        return Ok(samples);
    }
    samples
        .into_iter()
        .map(|s| {
            let answer = format_answer(&s.answer, format);
            Ok(encoder.conversation(s.pixels, s.frames, NEEDLE_QUESTION, &answer, s.depth)?)
        })
        .collect()
}

/// Generates (or reuses) the videos in `dir` and decodes them: the training
/// haystacks and needle bank of a [`NeedleSet`] (skipped when `needle_copies` is 0),
/// and `eval_per_depth` held-out videos per depth of LongVILA's grid {0, .2, .4, .6,
/// .8, 1}, `frames` long, with the needle encoded into the video (another seed).
pub fn haystack(
    encoder: &Encoder<'_>,
    dir: &Path,
    frames: usize,
    min_frames: usize,
    needle_copies: usize,
    eval_per_depth: usize,
    seed: u64,
) -> Result<HaystackData, TrainError> {
    let (w, h) = (encoder.width, encoder.height);
    let mut haystacks = Vec::new();
    let mut bank = Vec::new();
    let mut numbers = Vec::new();
    if needle_copies > 0 {
        for n in train_lengths(min_frames, frames) {
            let path = dir.join(format!("haystack-{n}f-{w}x{h}.mp4"));
            write_once(&path, &SyntheticVideo::new(w, h, 8, n, 32))?;
            haystacks.push((n, encoder.decode(&path, n)?));
        }
        // Frame i shows number 10 + i % 90; copies see other background phases.
        let count = needle_copies * NUMBERS.len();
        numbers = (0..count)
            .map(|i| NUMBERS.start + (i % NUMBERS.len()) as u32)
            .collect();
        let needles = numbers
            .iter()
            .enumerate()
            .map(|(frame, n)| Needle {
                frame,
                text: n.to_string(),
            })
            .collect();
        let path = dir.join(format!("needles-{needle_copies}x90-{w}x{h}.mp4"));
        write_once(
            &path,
            &SyntheticVideo::new(w, h, 8, count, 32).with_needles(needles),
        )?;
        bank = encoder.decode(&path, count)?;
    }
    let side = encoder.side();
    let train = NeedleSet {
        haystacks,
        bank,
        numbers,
        frame_len: 3 * side * side,
        answer_format: AnswerFormat::Plain,
    };
    let eval = if eval_per_depth == 0 {
        Vec::new()
    } else {
        let (eval_dir, rows) = held_out_videos(dir, (w, h), frames, eval_per_depth, seed)?;
        rows.iter()
            .map(|r| held_out_sample(encoder, &eval_dir, r))
            .collect::<Result<_, _>>()?
    };
    Ok(HaystackData { train, eval })
}

/// One held-out row of [`held_out_videos`] (its video under `dir`) decoded and asked
/// the needle question.
pub fn held_out_sample(
    encoder: &Encoder<'_>,
    dir: &Path,
    row: &HaystackSample,
) -> Result<Sample, TrainError> {
    Ok(encoder.sample(
        &dir.join(&row.video),
        row.frames,
        NEEDLE_QUESTION,
        &row.answer,
        row.depth,
    )?)
}

/// The held-out set of `frames`-frame haystacks under `dir` (`per_depth` videos per
/// depth of LongVILA's grid, the needle encoded into the video, another seed than
/// training): its folder and rows, the videos written unless a complete set is there.
pub fn held_out_videos(
    dir: &Path,
    (width, height): (u32, u32),
    frames: usize,
    per_depth: usize,
    seed: u64,
) -> Result<(PathBuf, Vec<HaystackSample>), TrainError> {
    let eval_seed = seed + 1_000_003;
    let eval_dir = dir.join(format!(
        "eval-{frames}f-{width}x{height}-{per_depth}x6-seed{eval_seed}"
    ));
    let spec = HaystackSpec {
        width,
        height,
        fps: 8,
        frames,
        gop: 32,
        depths: (0..=5).map(|i| i as f64 / 5.0).collect(),
        per_depth,
        seed: eval_seed,
    };
    let rows = rows(&eval_dir, &spec)?;
    Ok((eval_dir, rows))
}

/// Writes `video` to `path` unless it is there (written under a temporary name and
/// renamed, so an existing file is complete).
fn write_once(path: &Path, video: &SyntheticVideo) -> Result<(), TrainError> {
    if path.exists() {
        return Ok(());
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(TrainError::io(parent))?;
    }
    let partial = path.with_extension("partial.mp4");
    video.write(&partial)?;
    std::fs::rename(&partial, path).map_err(TrainError::io(path))?;
    Ok(())
}

/// The rows of a generated set, writing it first unless a complete one is there
/// (`haystack.jsonl` is renamed into place last, so its presence means complete).
fn rows(dir: &Path, spec: &HaystackSpec) -> Result<Vec<HaystackSample>, TrainError> {
    let index = dir.join("haystack.jsonl");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(TrainError::io(&index))?;
        let parsed: Result<Vec<HaystackSample>, _> =
            text.lines().map(serde_json::from_str).collect();
        if let Ok(rows) = parsed
            && rows.len() == spec.depths.len() * spec.per_depth
            && rows.iter().all(|r| dir.join(&r.video).exists())
        {
            return Ok(rows);
        }
    }
    Ok(write_haystack_set(dir, spec)?)
}

/// Position `i` of a stream over `n` rows: epoch `i / n` visits the rows in a seeded
/// permutation, so a resumed run reads exactly what an uninterrupted one would.
pub fn stream_index(seed: u64, n: usize, i: usize) -> usize {
    let epoch = (i / n) as u64;
    let mut order: Vec<usize> = (0..n).collect();
    let mut state =
        (seed ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03)).wrapping_add(0x9E37_79B9_7F4A_7C15) | 1;
    for k in (1..n).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        order.swap(k, (state % (k as u64 + 1)) as usize);
    }
    order[i % n]
}

/// One conversation row: media in marker order, messages, and where it came from.
#[derive(Debug, Clone)]
struct Row {
    line: usize,
    media: Vec<MediaRef>,
    messages: Vec<Message>,
}

/// Training rows of a JSONL file (LLaVA/VILA conversations or LongVideo-Reason
/// chain-of-thought rows), their media decoded when a row is drawn: videos sampled
/// uniformly at `frames` frames, images resized as SigLIP's processor does.
pub struct RowSet {
    path: PathBuf,
    rows: Vec<Row>,
    frames: usize,
    /// What the reader reported (rows read, lines skipped and why).
    pub summary: String,
    /// Rows with several assistant turns are refused ([`RowSet::one_answer_per_row`]).
    one_answer: bool,
}

impl RowSet {
    /// Reads `path` as `kind` rows (media paths relative to the file's folder must
    /// exist; unreadable lines are skipped and counted in [`RowSet::summary`]).
    pub fn read(kind: DataKind, path: &Path, frames: usize) -> Result<Self, TrainError> {
        let options = ReadOptions {
            check_media: true,
            ..ReadOptions::default()
        };
        // Media in marker order and the messages of every readable row.
        fn rows_of<T>(
            read: longview_data::dataset::Rows<T>,
            split: impl Fn(&T) -> (Vec<MediaRef>, Vec<Message>),
        ) -> (Vec<Row>, String) {
            let rows = read
                .rows
                .iter()
                .map(|r| {
                    let (media, messages) = split(&r.sample);
                    Row {
                        line: r.line,
                        media,
                        messages,
                    }
                })
                .collect();
            (rows, read.summary())
        }
        let (rows, summary) = match kind {
            DataKind::Conversations => rows_of(read_conversations(path, &options)?, |c| {
                (c.media.clone(), c.messages.clone())
            }),
            DataKind::Cot => rows_of(read_reason(path, &options)?, |r| {
                let media = r
                    .videos
                    .iter()
                    .map(|v| MediaRef {
                        kind: MediaKind::Video,
                        path: v.clone(),
                    })
                    .collect();
                (media, r.messages())
            }),
            DataKind::Haystack | DataKind::Text => {
                return Err(TrainError::Request(
                    "RowSet::read reads conversation and CoT rows only".into(),
                ));
            }
        };
        if rows.is_empty() {
            return Err(TrainError::row(
                path,
                0,
                format!("no usable rows ({summary})"),
            ));
        }
        Ok(RowSet {
            path: path.into(),
            rows,
            frames,
            summary,
            one_answer: false,
        })
    }

    /// Refuses (as a bad row, skipped and counted) a row with more than one assistant
    /// turn: GRPO's prompt ends before the first answer while its reward reads the
    /// last one, so such a row would be scored against the wrong turn.
    pub fn one_answer_per_row(mut self) -> Self {
        self.one_answer = true;
        self
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Sample `index` of the stream (epochs over the rows in seeded permutations).
    pub fn sample(
        &self,
        encoder: &Encoder<'_>,
        seed: u64,
        index: usize,
    ) -> Result<Sample, TrainError> {
        let row = &self.rows[stream_index(seed, self.rows.len(), index)];
        let fail = |e: TrainError| TrainError::row(&self.path, row.line, e.to_string());
        let answers = row
            .messages
            .iter()
            .filter(|m| m.role == Role::Assistant)
            .count();
        if self.one_answer && answers > 1 {
            return Err(TrainError::row(
                &self.path,
                row.line,
                format!(
                    "{answers} assistant turns: GRPO takes one question and one answer a row \
                     (split the conversation into rows)"
                ),
            ));
        }
        let pre = Preprocess::siglip(encoder.side() as u32);
        let mut pixels = Vec::new();
        let mut media = Vec::with_capacity(row.media.len());
        for m in &row.media {
            match m.kind {
                MediaKind::Video => {
                    pixels.extend(
                        encoder
                            .decode(&m.path, self.frames)
                            .map_err(|e| fail(e.into()))?,
                    );
                    media.push(Media::Video {
                        frames: self.frames,
                    });
                }
                MediaKind::Image => {
                    pixels.extend(load_image(&m.path, &pre).map_err(|e| fail(e.into()))?);
                    media.push(Media::Image);
                }
            }
        }
        let answer = row
            .messages
            .iter()
            .rev()
            .find(|m| m.role == Role::Assistant)
            .map_or(String::new(), |m| m.content.clone());
        encoder
            .encode(pixels, &row.messages, &media, &answer, 0.0)
            .map_err(|e| fail(e.into()))
    }
}

/// Long text for stage 4: the documents of a JSONL file (`{"text": ...}`) tokenized,
/// joined with `<|endoftext|>` and cut into windows of `max_tokens` tokens (a last
/// shorter window is kept), every token supervised, positions from 0 in every window.
pub struct TextSet {
    windows: Vec<Vec<u32>>,
    side: usize,
    /// Documents read, tokens, windows, lines skipped.
    pub summary: String,
}

impl TextSet {
    pub fn read(
        path: &Path,
        tokenizer: &TextTokenizer,
        max_tokens: usize,
        side: usize,
    ) -> Result<Self, TrainError> {
        let rows = read_jsonl(path, &ReadOptions::default(), |row, _| {
            match row.get("text").and_then(|t| t.as_str()) {
                Some(text) if !text.is_empty() => Ok(text.to_string()),
                Some(_) => Err("empty `text`".into()),
                None => Err("no `text` string".into()),
            }
        })?;
        let separator = tokenizer.require("<|endoftext|>")?;
        let mut stream = Vec::new();
        for row in &rows.rows {
            stream.extend(
                tokenizer
                    .encode(&row.sample)
                    .map_err(|e| TrainError::row(path, row.line, e))?,
            );
            stream.push(separator);
        }
        let windows: Vec<Vec<u32>> = stream
            .chunks(max_tokens)
            .filter(|w| w.len() >= 2)
            .map(<[u32]>::to_vec)
            .collect();
        if windows.is_empty() {
            return Err(TrainError::row(
                path,
                0,
                format!("no text to train on ({})", rows.summary()),
            ));
        }
        let summary = format!(
            "{}; {} tokens in {} windows of up to {max_tokens}",
            rows.summary(),
            stream.len(),
            windows.len()
        );
        Ok(TextSet {
            windows,
            side,
            summary,
        })
    }

    pub fn len(&self) -> usize {
        self.windows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }

    /// Window `index` of the stream (epochs in seeded permutations).
    pub fn sample(&self, seed: u64, index: usize) -> Sample {
        let ids = self.windows[stream_index(seed, self.windows.len(), index)].clone();
        let labels = ids.iter().map(|&t| t as i64).collect();
        Sample {
            ids,
            labels,
            side: self.side,
            ..Default::default()
        }
    }
}

/// Where training samples come from.
pub enum TrainData {
    Needles(NeedleSet),
    Rows(RowSet),
    Text(TextSet),
}

impl TrainData {
    pub fn sample(
        &self,
        encoder: &Encoder<'_>,
        seed: u64,
        index: usize,
    ) -> Result<Sample, TrainError> {
        match self {
            TrainData::Needles(set) => set.sample(encoder, seed, index),
            TrainData::Rows(set) => set.sample(encoder, seed, index),
            TrainData::Text(set) => Ok(set.sample(seed, index)),
        }
    }

    /// One line for the run's summary.
    pub fn describe(&self) -> String {
        match self {
            TrainData::Needles(set) => format!(
                "{} distinct needle frames in haystacks of {:?} frames",
                set.needle_frames(),
                set.lengths()
            ),
            TrainData::Rows(set) => set.summary.clone(),
            TrainData::Text(set) => set.summary.clone(),
        }
    }
}
