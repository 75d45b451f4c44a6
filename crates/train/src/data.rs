//! Samples for training and evaluation: generated needle-in-a-haystack videos decoded
//! with FFmpeg at the encoder's resolution, wrapped in the Qwen2 chat template, and
//! batched (right-padded, padding unsupervised) into model inputs.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use longview_data::dataset::{
    MediaKind, MediaRef, ReadOptions, read_conversations, read_jsonl, read_reason,
};
use longview_data::synthetic::{
    HaystackSample, HaystackSpec, Needle, SyntheticVideo, write_haystack_set,
};
use longview_data::text::IGNORE_INDEX;
use longview_data::{
    ChatTemplate, DecodeOptions, Media, Message, Preprocess, Role, Sampling, TextTokenizer,
    decode_all, load_image,
};
use longview_models::vila::default_position_ids;
use longview_models::{VisualInput, VlmConfig, VlmInput};

use crate::config::DataKind;
use crate::error::TrainError;

/// The question every haystack sample asks.
pub const NEEDLE_QUESTION: &str = "What number appears in the video? Answer with the number only.";

/// One tokenized conversation with its frames.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Prompt and answer ids, visual placeholders expanded.
    pub ids: Vec<u32>,
    /// Aligned with `ids`; [`IGNORE_INDEX`] where unsupervised.
    pub labels: Vec<i64>,
    /// Length of the prompt (everything before the answer's first token).
    pub prompt_len: usize,
    /// Planar `[frames, 3, height, width]` in `[-1, 1]`.
    pub pixels: Vec<f32>,
    pub frames: usize,
    /// Frame side in pixels.
    pub side: usize,
    /// The answer text (for exact-match scoring).
    pub answer: String,
    /// Needle depth in the video (haystack samples).
    pub depth: f64,
}

impl Sample {
    /// Supervised next-token targets (labels after the first position).
    pub fn supervised(&self) -> usize {
        self.labels
            .iter()
            .skip(1)
            .filter(|&&l| l != IGNORE_INDEX)
            .count()
    }
}

/// Frame geometry and tokenization shared by all samples.
pub struct Encoder<'a> {
    pub tokenizer: &'a TextTokenizer,
    pub template: ChatTemplate,
    pub model: &'a VlmConfig,
    pub width: u32,
    pub height: u32,
}

impl Encoder<'_> {
    /// Decodes every frame of `video` and encodes the conversation around it.
    pub fn sample(
        &self,
        video: &Path,
        frames: usize,
        question: &str,
        answer: &str,
        depth: f64,
    ) -> Result<Sample, TrainError> {
        let pixels = self.decode(video, frames)?;
        self.conversation(pixels, frames, question, answer, depth)
    }

    /// Every one of `frames` uniformly sampled frames of `video`, planar, normalised.
    fn decode(&self, video: &Path, frames: usize) -> Result<Vec<f32>, TrainError> {
        let options = DecodeOptions {
            workers: 1,
            ..DecodeOptions::siglip(self.side() as u32)
        };
        let (_, batch) = decode_all(video, &Sampling::Uniform { count: frames }, &options)?;
        Ok(batch.pixels)
    }

    fn side(&self) -> usize {
        self.model.vision.image_size
    }

    /// The chat-template conversation of one video question around already decoded
    /// `pixels`.
    fn conversation(
        &self,
        pixels: Vec<f32>,
        frames: usize,
        question: &str,
        answer: &str,
        depth: f64,
    ) -> Result<Sample, TrainError> {
        let messages = [
            Message::user(format!("<video>\n{question}")),
            Message::assistant(answer),
        ];
        self.encode(pixels, &messages, &[Media::Video { frames }], answer, depth)
    }

    /// Any conversation: `media` in marker order, `pixels` their frames in order.
    fn encode(
        &self,
        pixels: Vec<f32>,
        messages: &[Message],
        media: &[Media],
        answer: &str,
        depth: f64,
    ) -> Result<Sample, TrainError> {
        let frames = media.iter().map(|m| m.frames()).sum();
        let encoded = self.template.encode(
            self.tokenizer,
            messages,
            media,
            self.model.tokens_per_frame(),
            false,
        )?;
        let prompt_len = encoded
            .labels
            .iter()
            .position(|&l| l != IGNORE_INDEX)
            .unwrap_or(encoded.labels.len());
        Ok(Sample {
            ids: encoded.ids,
            labels: encoded.labels,
            prompt_len,
            pixels,
            frames,
            side: self.side(),
            answer: answer.into(),
            depth,
        })
    }
}

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
        encoder.conversation(
            pixels,
            *frames,
            NEEDLE_QUESTION,
            &self.numbers[needle].to_string(),
            depth,
        )
    }
}

/// splitmix64 of `a` combined with `b`: a stateless, well-mixed hash.
pub(crate) fn mix(a: u64, b: u64) -> u64 {
    let mut z = a
        .wrapping_add(b.wrapping_mul(0xBF58_476D_1CE4_E5B9))
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
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
    };
    let eval = if eval_per_depth == 0 {
        Vec::new()
    } else {
        let eval_seed = seed + 1_000_003;
        let eval_dir = dir.join(format!(
            "eval-{frames}f-{w}x{h}-{eval_per_depth}x6-seed{eval_seed}"
        ));
        let spec = HaystackSpec {
            width: w,
            height: h,
            fps: 8,
            frames,
            gop: 32,
            depths: (0..=5).map(|i| i as f64 / 5.0).collect(),
            per_depth: eval_per_depth,
            seed: eval_seed,
        };
        let rows = rows(&eval_dir, &spec)?;
        rows.iter()
            .map(|r| {
                encoder.sample(
                    &eval_dir.join(&r.video),
                    r.frames,
                    NEEDLE_QUESTION,
                    &r.answer,
                    r.depth,
                )
            })
            .collect::<Result<_, _>>()?
    };
    Ok(HaystackData { train, eval })
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

/// The frames `sampling` picks from `video`, decoded at a square `side` x `side`
/// SigLIP input: `[frames, 3, side, side]` and the source frame indices.
pub fn decode_frames(
    video: &Path,
    sampling: &Sampling,
    side: usize,
    device: &Device,
) -> Result<(Tensor<4>, Vec<usize>), TrainError> {
    let (_, batch) = decode_all(video, sampling, &DecodeOptions::siglip(side as u32))?;
    let frames = batch.frames.len();
    let pixels = Tensor::from_data(
        TensorData::new(batch.pixels, [frames, 3, side, side]),
        device,
    );
    Ok((pixels, batch.frames.iter().map(|f| f.index).collect()))
}

/// One unpadded sequence as model input: `ids` at positions `0..len`.
pub fn single_input(ids: &[u32], visual: VisualInput, device: &Device) -> VlmInput {
    let len = ids.len();
    VlmInput {
        input_ids: Tensor::from_data(
            TensorData::new(ids.iter().map(|&t| t as i64).collect(), [1, len]),
            device,
        ),
        position_ids: default_position_ids(1, len, device),
        visual,
    }
}

/// Model inputs and labels of a micro-batch.
pub struct Batch {
    pub input: VlmInput,
    pub labels: Tensor<2, Int>,
    /// Supervised next-token targets in the batch.
    pub supervised: usize,
}

/// Right-pads `samples` to one length (padding id 0, unsupervised) and stacks frames.
pub fn collate(samples: &[&Sample], device: &Device) -> Batch {
    let len = samples.iter().map(|s| s.ids.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(samples.len() * len);
    let mut labels = Vec::with_capacity(samples.len() * len);
    let mut pixels = Vec::new();
    let mut frames = 0;
    let side = samples.first().map_or(0, |s| s.side);
    for s in samples {
        ids.extend(s.ids.iter().map(|&t| t as i64));
        ids.extend(std::iter::repeat_n(0, len - s.ids.len()));
        labels.extend(&s.labels);
        labels.extend(std::iter::repeat_n(IGNORE_INDEX, len - s.labels.len()));
        pixels.extend_from_slice(&s.pixels);
        frames += s.frames;
    }
    let b = samples.len();
    let visual = if frames == 0 {
        VisualInput::None
    } else {
        VisualInput::Pixels(Tensor::from_data(
            TensorData::new(pixels, [frames, 3, side, side]),
            device,
        ))
    };
    Batch {
        input: VlmInput {
            input_ids: Tensor::from_data(TensorData::new(ids, [b, len]), device),
            position_ids: default_position_ids(b, len, device),
            visual,
        },
        labels: Tensor::from_data(TensorData::new(labels, [b, len]), device),
        supervised: samples.iter().map(|s| s.supervised()).sum(),
    }
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
        })
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
        let pre = Preprocess::siglip(encoder.side() as u32);
        let mut pixels = Vec::new();
        let mut media = Vec::with_capacity(row.media.len());
        for m in &row.media {
            match m.kind {
                MediaKind::Video => {
                    pixels.extend(encoder.decode(&m.path, self.frames).map_err(fail)?);
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
            .map_err(fail)
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
            prompt_len: 0,
            pixels: Vec::new(),
            frames: 0,
            side: self.side,
            answer: String::new(),
            depth: 0.0,
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
