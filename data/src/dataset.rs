//! JSONL dataset readers: LLaVA/VILA conversations (`image`/`video` + `conversations`),
//! LongVideo-Reason rows (`videos`, `problem`, `answer` with `<think>`/`<answer>`),
//! VideoMME-style multiple choice, and longview's own haystack rows.
//!
//! A row that cannot be used (bad JSON, missing field, marker/media mismatch, media
//! file missing when checked) is either skipped and recorded with its line number and
//! reason ([`BadRows::Skip`], the default), or stops the read with an error naming the
//! file and line ([`BadRows::Fail`]). Nothing is dropped without being counted:
//! [`Rows::skipped`] lists every skipped line and [`Rows::summary`] says how many.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::DataError;
use crate::synthetic::HaystackSample;
use crate::text::{IMAGE_MARKER, Message, Role, VIDEO_MARKER};

/// What to do with a row that cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BadRows {
    /// Skip it, record line and reason in [`Rows::skipped`].
    #[default]
    Skip,
    /// Stop with [`DataError::Dataset`].
    Fail,
}

/// How the readers treat rows and media paths.
#[derive(Debug, Clone, Default)]
pub struct ReadOptions {
    pub bad_rows: BadRows,
    /// Folder media paths are relative to (default: the JSONL file's folder).
    pub media_root: Option<PathBuf>,
    /// Reject rows whose media files do not exist.
    pub check_media: bool,
}

/// A line that was skipped, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedRow {
    /// 1-based line number in the file.
    pub line: usize,
    pub reason: String,
}

/// A usable row and its 1-based line number.
#[derive(Debug, Clone, PartialEq)]
pub struct Row<T> {
    pub line: usize,
    pub sample: T,
}

/// Everything a reader got from one file.
#[derive(Debug, Clone)]
pub struct Rows<T> {
    pub path: PathBuf,
    pub rows: Vec<Row<T>>,
    pub skipped: Vec<SkippedRow>,
}

impl<T> Rows<T> {
    pub fn samples(&self) -> impl Iterator<Item = &T> {
        self.rows.iter().map(|r| &r.sample)
    }

    /// One line for logs: counts plus the first few skipped lines.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{}: {} samples, {} rows skipped",
            self.path.display(),
            self.rows.len(),
            self.skipped.len()
        );
        for skipped in self.skipped.iter().take(3) {
            s.push_str(&format!("; line {}: {}", skipped.line, skipped.reason));
        }
        if self.skipped.len() > 3 {
            s.push_str("; ...");
        }
        s
    }
}

/// Reads a JSONL file, turning each non-empty line into a `T` with `parse`.
pub fn read_jsonl<T>(
    path: impl AsRef<Path>,
    options: &ReadOptions,
    mut parse: impl FnMut(&Value, &MediaResolver) -> Result<T, String>,
) -> Result<Rows<T>, DataError> {
    let path = path.as_ref();
    if !path.exists() {
        return Err(DataError::NotFound { path: path.into() });
    }
    let io = |source| DataError::Io {
        path: path.into(),
        source,
    };
    // Streamed line by line: a large file is never held whole, and a line that is not
    // UTF-8 is one bad row, not a failed file.
    let mut reader = std::io::BufReader::new(std::fs::File::open(path).map_err(io)?);
    let resolver = MediaResolver {
        root: options
            .media_root
            .clone()
            .unwrap_or_else(|| path.parent().map(Path::to_path_buf).unwrap_or_default()),
        check: options.check_media,
    };
    let mut rows = Rows {
        path: path.into(),
        rows: Vec::new(),
        skipped: Vec::new(),
    };
    let mut bytes = Vec::new();
    let mut line_no = 0;
    loop {
        bytes.clear();
        if std::io::BufRead::read_until(&mut reader, b'\n', &mut bytes).map_err(io)? == 0 {
            break;
        }
        line_no += 1;
        let line = match std::str::from_utf8(&bytes) {
            Ok(line) => line,
            Err(e) => {
                let reason = format!("not UTF-8 text: {e}");
                match options.bad_rows {
                    BadRows::Skip => {
                        rows.skipped.push(SkippedRow {
                            line: line_no,
                            reason,
                        });
                        continue;
                    }
                    BadRows::Fail => {
                        return Err(DataError::Dataset {
                            path: path.into(),
                            line: line_no,
                            reason,
                        });
                    }
                }
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        let result = serde_json::from_str::<Value>(line)
            .map_err(|e| format!("not JSON: {e}"))
            .and_then(|value| {
                if value.is_object() {
                    parse(&value, &resolver)
                } else {
                    Err("not a JSON object".into())
                }
            });
        match result {
            Ok(sample) => rows.rows.push(Row {
                line: line_no,
                sample,
            }),
            Err(reason) => match options.bad_rows {
                BadRows::Skip => rows.skipped.push(SkippedRow {
                    line: line_no,
                    reason,
                }),
                BadRows::Fail => {
                    return Err(DataError::Dataset {
                        path: path.into(),
                        line: line_no,
                        reason,
                    });
                }
            },
        }
    }
    Ok(rows)
}

/// Turns media paths of a row into files (relative to the media root).
#[derive(Debug, Clone)]
pub struct MediaResolver {
    root: PathBuf,
    check: bool,
}

impl MediaResolver {
    pub fn resolve(&self, relative: &str) -> Result<PathBuf, String> {
        if relative.trim().is_empty() {
            return Err("empty media path".into());
        }
        let path = self.root.join(relative);
        if self.check && !path.is_file() {
            return Err(format!("media file {} not found", path.display()));
        }
        Ok(path)
    }
}

fn field<'a>(row: &'a Value, name: &str) -> Result<&'a Value, String> {
    row.get(name)
        .filter(|v| !v.is_null())
        .ok_or_else(|| format!("missing field `{name}`"))
}

fn string(row: &Value, name: &str) -> Result<String, String> {
    field(row, name)?
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("field `{name}` is not a string"))
}

/// A string or a list of strings (absent: empty).
fn strings(row: &Value, name: &str) -> Result<Vec<String>, String> {
    match row.get(name) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("field `{name}` holds a non-string"))
            })
            .collect(),
        Some(_) => Err(format!("field `{name}` is neither a string nor a list")),
    }
}

fn id_of(row: &Value) -> Option<String> {
    match row.get("id") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaKind {
    Image,
    Video,
}

/// A media file a sample refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaRef {
    pub kind: MediaKind,
    pub path: PathBuf,
}

/// A LLaVA/VILA conversation: media in marker order, messages with `<image>` /
/// `<video>` markers (added at the start of the first user turn when the row has
/// media but no markers, as LLaVA does).
#[derive(Debug, Clone, PartialEq)]
pub struct ConversationSample {
    pub id: Option<String>,
    pub media: Vec<MediaRef>,
    pub messages: Vec<Message>,
}

/// Reads LLaVA/VILA rows: `{"id", "image": path | [paths], "video": path | [paths],
/// "conversations": [{"from": "human" | "gpt" | "system", "value": text}]}`.
pub fn read_conversations(
    path: impl AsRef<Path>,
    options: &ReadOptions,
) -> Result<Rows<ConversationSample>, DataError> {
    read_jsonl(path, options, parse_conversation)
}

fn parse_conversation(row: &Value, media: &MediaResolver) -> Result<ConversationSample, String> {
    let turns = field(row, "conversations")?
        .as_array()
        .ok_or("field `conversations` is not a list")?;
    if turns.is_empty() {
        return Err("`conversations` is empty".into());
    }
    let mut messages = Vec::with_capacity(turns.len());
    for (i, turn) in turns.iter().enumerate() {
        let from = string(turn, "from").map_err(|e| format!("conversations[{i}]: {e}"))?;
        let value = string(turn, "value").map_err(|e| format!("conversations[{i}]: {e}"))?;
        let role = match from.as_str() {
            "human" | "user" => Role::User,
            "gpt" | "assistant" => Role::Assistant,
            "system" => Role::System,
            other => return Err(format!("conversations[{i}]: unknown speaker `{other}`")),
        };
        messages.push(Message {
            role,
            content: value,
        });
    }
    if !messages.iter().any(|m| m.role == Role::Assistant) {
        return Err("no assistant turn (nothing to learn from)".into());
    }
    let images = strings(row, "image")?;
    let videos = strings(row, "video")?;
    let count = |marker: &str| -> usize {
        messages
            .iter()
            .map(|m| m.content.matches(marker).count())
            .sum()
    };
    let (image_markers, video_markers) = (count(IMAGE_MARKER), count(VIDEO_MARKER));
    if image_markers + video_markers == 0 && !(images.is_empty() && videos.is_empty()) {
        let first_user = messages
            .iter_mut()
            .find(|m| m.role == Role::User)
            .ok_or("media but no user turn to attach them to")?;
        let prefix: String = std::iter::repeat_n(format!("{IMAGE_MARKER}\n"), images.len())
            .chain(std::iter::repeat_n(
                format!("{VIDEO_MARKER}\n"),
                videos.len(),
            ))
            .collect();
        first_user.content = prefix + &first_user.content;
    } else if image_markers != images.len() || video_markers != videos.len() {
        return Err(format!(
            "{image_markers} {IMAGE_MARKER} and {video_markers} {VIDEO_MARKER} markers for {} images and {} videos",
            images.len(),
            videos.len()
        ));
    }
    // Media in the order their markers appear.
    let (mut images, mut videos) = (images.into_iter(), videos.into_iter());
    let mut refs = Vec::new();
    for message in &messages {
        let mut rest = message.content.as_str();
        while let Some((at, marker)) = [IMAGE_MARKER, VIDEO_MARKER]
            .iter()
            .filter_map(|m| rest.find(m).map(|at| (at, *m)))
            .min()
        {
            let (kind, file) = if marker == IMAGE_MARKER {
                (MediaKind::Image, images.next())
            } else {
                (MediaKind::Video, videos.next())
            };
            let file = file.expect("marker counts checked");
            refs.push(MediaRef {
                kind,
                path: media.resolve(&file)?,
            });
            rest = &rest[at + marker.len()..];
        }
    }
    if messages.iter().any(|m| {
        m.role == Role::Assistant
            && (m.content.contains(IMAGE_MARKER) || m.content.contains(VIDEO_MARKER))
    }) {
        return Err("a media marker in an assistant turn".into());
    }
    Ok(ConversationSample {
        id: id_of(row),
        media: refs,
        messages,
    })
}

/// A LongVideo-Reason row: videos, a problem, and an answer that may carry its
/// reasoning (`<think>...</think><answer>...</answer>`).
#[derive(Debug, Clone, PartialEq)]
pub struct ReasonSample {
    pub id: Option<String>,
    pub videos: Vec<PathBuf>,
    pub problem: String,
    /// Text inside `<think>...</think>`, when present.
    pub thinking: Option<String>,
    /// Text inside `<answer>...</answer>`, or the whole answer field without tags.
    pub answer: String,
}

impl ReasonSample {
    /// Chain-of-thought SFT conversation: the video(s) and the problem, answered with
    /// `<think>...</think><answer>...</answer>`.
    pub fn messages(&self) -> Vec<Message> {
        let markers: String = self
            .videos
            .iter()
            .map(|_| format!("{VIDEO_MARKER}\n"))
            .collect();
        let reply = match &self.thinking {
            Some(t) => format!("<think>{t}</think><answer>{}</answer>", self.answer),
            None => format!("<answer>{}</answer>", self.answer),
        };
        vec![
            Message::user(format!("{markers}{}", self.problem)),
            Message::assistant(reply),
        ]
    }
}

/// Text between `<tag>` and `</tag>`; `Ok(None)` when the tag is absent.
pub fn tagged<'a>(text: &'a str, tag: &str) -> Result<Option<&'a str>, String> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    match (text.find(&open), text.find(&close)) {
        (None, None) => Ok(None),
        (Some(a), Some(b)) if a + open.len() <= b => Ok(Some(&text[a + open.len()..b])),
        _ => Err(format!("unbalanced <{tag}> tags")),
    }
}

/// Reads LongVideo-Reason rows: `{"videos": [paths] (or "video"), "problem",
/// "answer"}`.
pub fn read_reason(
    path: impl AsRef<Path>,
    options: &ReadOptions,
) -> Result<Rows<ReasonSample>, DataError> {
    read_jsonl(path, options, |row, media| {
        let mut videos = strings(row, "videos")?;
        videos.extend(strings(row, "video")?);
        if videos.is_empty() {
            return Err("no `videos`".into());
        }
        let videos = videos
            .iter()
            .map(|v| media.resolve(v))
            .collect::<Result<Vec<_>, _>>()?;
        let problem = string(row, "problem")?;
        let raw = string(row, "answer")?;
        let thinking = tagged(&raw, "think")?.map(|t| t.trim().to_string());
        let answer = match tagged(&raw, "answer")? {
            Some(a) => a.trim().to_string(),
            None if thinking.is_some() => {
                return Err("`answer` has <think> but no <answer>".into());
            }
            None => raw.trim().to_string(),
        };
        if answer.is_empty() {
            return Err("empty answer".into());
        }
        Ok(ReasonSample {
            id: id_of(row),
            videos,
            problem,
            thinking,
            answer,
        })
    })
}

/// A VideoMME-style multiple-choice question.
#[derive(Debug, Clone, PartialEq)]
pub struct ChoiceSample {
    pub id: Option<String>,
    pub video: PathBuf,
    pub question: String,
    /// Options as given, normally "A. ...", "B. ...".
    pub options: Vec<String>,
    /// Correct letter.
    pub answer: char,
    /// VideoMME's `duration` (short / medium / long), when given.
    pub duration: Option<String>,
}

/// The instruction LongVILA's evaluation appends to multiple-choice questions.
pub const CHOICE_INSTRUCTION: &str = "Respond with only the letter of the correct option.";

impl ChoiceSample {
    /// The user turn: video marker, question, options, instruction. An option that
    /// does not start with its letter (`"cat"` rather than `"A. cat"`) is shown as
    /// `"A. cat"`: the instruction asks for a letter, so every option shows one.
    pub fn prompt(&self) -> String {
        let options: Vec<String> = self
            .options
            .iter()
            .zip(option_letters(self.options.len()))
            .map(|(option, letter)| {
                let text = option.trim_start();
                let labelled = [".", ")", ":"]
                    .iter()
                    .any(|end| text.starts_with(&format!("{letter}{end}")))
                    || text.starts_with(&format!("({letter})"));
                if labelled {
                    option.clone()
                } else {
                    format!("{letter}. {option}")
                }
            })
            .collect();
        format!(
            "{VIDEO_MARKER}\n{}\n{}\n{CHOICE_INSTRUCTION}",
            self.question,
            options.join("\n")
        )
    }

    /// The option letter a free-form reply chose: the first standalone letter among
    /// the options ("B", "(B)", "B. five", "Answer: B"), if any.
    pub fn chosen(&self, reply: &str) -> Option<char> {
        let letters = option_letters(self.options.len());
        let text = reply.trim();
        let text = text
            .strip_prefix("Answer:")
            .or_else(|| text.strip_prefix("answer:"))
            .unwrap_or(text)
            .trim_start();
        let chars: Vec<char> = text.chars().collect();
        (0..chars.len()).find_map(|i| {
            let c = chars[i];
            let before = i == 0 || !chars[i - 1].is_alphanumeric();
            let after = chars.get(i + 1).is_none_or(|n| !n.is_alphanumeric());
            (letters.contains(&c) && before && after).then_some(c)
        })
    }

    /// Whether `reply` picks the correct option.
    pub fn is_correct(&self, reply: &str) -> bool {
        self.chosen(reply) == Some(self.answer)
    }
}

fn option_letters(n: usize) -> Vec<char> {
    ('A'..='Z').take(n).collect()
}

/// Reads VideoMME-style rows: `{"question", "options": [..], "answer": "B", and
/// "video" (a path) or "videoID" (file `{videoID}.mp4`), "question_id"?, "duration"?}`.
pub fn read_multiple_choice(
    path: impl AsRef<Path>,
    options: &ReadOptions,
) -> Result<Rows<ChoiceSample>, DataError> {
    read_jsonl(path, options, |row, media| {
        let video = match (row.get("video"), row.get("videoID")) {
            (Some(Value::String(v)), _) => v.clone(),
            (_, Some(Value::String(id))) => format!("{id}.mp4"),
            _ => return Err("missing field `video` (or `videoID`)".into()),
        };
        let question = string(row, "question")?;
        let choices = strings(row, "options")?;
        if !(2..=26).contains(&choices.len()) {
            return Err(format!("{} options (2 to 26 expected)", choices.len()));
        }
        let answer = string(row, "answer")?;
        let letter = match answer.trim().chars().collect::<Vec<_>>().as_slice() {
            [c] if option_letters(choices.len()).contains(c) => *c,
            _ => {
                return Err(format!(
                    "answer `{answer}` is not one of the letters A..{}",
                    option_letters(choices.len()).last().expect("2+ options")
                ));
            }
        };
        Ok(ChoiceSample {
            id: row
                .get("question_id")
                .and_then(Value::as_str)
                .map(str::to_string)
                .or_else(|| id_of(row)),
            video: media.resolve(&video)?,
            question,
            options: choices,
            answer: letter,
            duration: row
                .get("duration")
                .and_then(Value::as_str)
                .map(str::to_string),
        })
    })
}

/// Reads the `haystack.jsonl` written by [`crate::synthetic::write_haystack_set`].
pub fn read_haystack(
    path: impl AsRef<Path>,
    options: &ReadOptions,
) -> Result<Rows<(PathBuf, HaystackSample)>, DataError> {
    read_jsonl(path, options, |row, media| {
        let sample: HaystackSample =
            serde_json::from_value(row.clone()).map_err(|e| format!("not a haystack row: {e}"))?;
        Ok((media.resolve(&sample.video)?, sample))
    })
}
