//! Qwen2/VILA chat template (ChatML) with media placeholders, and the label mask of a
//! conversation: only assistant answers (and the `<|im_end|>` that closes them) are
//! supervised.
//!
//! Rendering, for a conversation with a video of F frames:
//!
//! ```text
//! <|im_start|>system\nYou are a helpful assistant.<|im_end|>\n
//! <|im_start|>user\n<image><image>...(F times)\nWhat happens?<|im_end|>\n
//! <|im_start|>assistant\nA dog runs.<|im_end|>\n
//! ```
//!
//! Message text marks media with `<image>` (one image) and `<video>` (one video);
//! [`ChatTemplate::encode`] renders each frame as the media token, tokenizes the whole
//! text once (as Hugging Face does), then expands every media token to the number of
//! visual tokens a frame becomes in the model (`tokens_per_frame`). Labels are
//! aligned with the ids (the loss shifts them), [`IGNORE_INDEX`] where unsupervised.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::error::DataError;
use crate::text::TextTokenizer;

/// Label of a position that is not supervised (PyTorch's cross-entropy default).
pub const IGNORE_INDEX: i64 = -100;
/// Marks an image in message text.
pub const IMAGE_MARKER: &str = "<image>";
/// Marks a video in message text.
pub const VIDEO_MARKER: &str = "<video>";

const IM_START: &str = "<|im_start|>";
const IM_END: &str = "<|im_end|>";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn system(content: impl Into<String>) -> Self {
        Message {
            role: Role::System,
            content: content.into(),
        }
    }
    pub fn user(content: impl Into<String>) -> Self {
        Message {
            role: Role::User,
            content: content.into(),
        }
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Message {
            role: Role::Assistant,
            content: content.into(),
        }
    }
}

/// One media item of a conversation, in the order its marker appears.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Media {
    Image,
    Video { frames: usize },
}

impl Media {
    pub fn frames(self) -> usize {
        match self {
            Media::Image => 1,
            Media::Video { frames } => frames,
        }
    }
}

/// Rendered conversation text and the byte ranges whose tokens are supervised.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub text: String,
    pub supervised: Vec<Range<usize>>,
}

/// Where a media item's visual tokens lie in [`EncodedChat::ids`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MediaSpan {
    pub start: usize,
    /// One past the last visual token of the item's last frame.
    pub end: usize,
    pub frames: usize,
}

/// Token ids, aligned labels and media positions of a conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedChat {
    pub ids: Vec<u32>,
    pub labels: Vec<i64>,
    pub media: Vec<MediaSpan>,
    /// Id of the media token (the model's visual placeholder).
    pub media_token: u32,
}

impl EncodedChat {
    /// Positions holding visual tokens.
    pub fn visual_tokens(&self) -> usize {
        self.ids.iter().filter(|&&t| t == self.media_token).count()
    }
}

/// The Qwen2/VILA ChatML template.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatTemplate {
    /// System message used when the conversation has none.
    pub default_system: Option<String>,
    /// Token standing for one frame before expansion (VILA: `<image>`).
    pub media_token: String,
    /// Text after every frame of a video (`None`: frames back to back).
    pub frame_separator: Option<String>,
}

impl Default for ChatTemplate {
    fn default() -> Self {
        Self::qwen2()
    }
}

impl ChatTemplate {
    /// Qwen2 / VILA: default system "You are a helpful assistant.", media token
    /// `<image>`, video frames back to back.
    pub fn qwen2() -> Self {
        ChatTemplate {
            default_system: Some("You are a helpful assistant.".into()),
            media_token: IMAGE_MARKER.into(),
            frame_separator: None,
        }
    }

    /// The conversation's text, with each media marker replaced by one media token
    /// per frame; `add_generation_prompt` appends the opening of an assistant turn.
    pub fn render(
        &self,
        messages: &[Message],
        media: &[Media],
        add_generation_prompt: bool,
    ) -> Result<Rendered, DataError> {
        if messages.is_empty() {
            return Err(DataError::Template(
                "the conversation has no messages".into(),
            ));
        }
        if let Some(i) = messages.iter().skip(1).position(|m| m.role == Role::System) {
            return Err(DataError::Template(format!(
                "message {} is a system message; only the first may be",
                i + 1
            )));
        }
        let mut text = String::new();
        let mut supervised = Vec::new();
        let mut media_iter = media.iter().enumerate();
        if messages[0].role != Role::System
            && let Some(system) = &self.default_system
        {
            text.push_str(&format!("{IM_START}system\n{system}{IM_END}\n"));
        }
        for (i, message) in messages.iter().enumerate() {
            text.push_str(IM_START);
            text.push_str(message.role.as_str());
            text.push('\n');
            let start = text.len();
            if message.role == Role::Assistant {
                if [IMAGE_MARKER, VIDEO_MARKER]
                    .iter()
                    .any(|m| message.content.contains(m))
                {
                    return Err(DataError::Template(format!(
                        "message {i} (assistant) contains a media marker; media belong to user turns"
                    )));
                }
                text.push_str(&message.content);
            } else {
                self.render_media(&message.content, i, &mut media_iter, &mut text)?;
            }
            text.push_str(IM_END);
            if message.role == Role::Assistant {
                supervised.push(start..text.len());
            }
            text.push('\n');
        }
        if let Some((i, _)) = media_iter.next() {
            return Err(DataError::Template(format!(
                "{} media items given but the messages mark only {i}",
                media.len()
            )));
        }
        if add_generation_prompt {
            text.push_str(&format!("{IM_START}assistant\n"));
        }
        Ok(Rendered { text, supervised })
    }

    fn render_media<'a>(
        &self,
        content: &str,
        message: usize,
        media: &mut impl Iterator<Item = (usize, &'a Media)>,
        out: &mut String,
    ) -> Result<(), DataError> {
        let mut rest = content;
        loop {
            let next = [IMAGE_MARKER, VIDEO_MARKER]
                .iter()
                .filter_map(|m| rest.find(m).map(|at| (at, *m)))
                .min();
            let Some((at, marker)) = next else {
                out.push_str(rest);
                return Ok(());
            };
            out.push_str(&rest[..at]);
            rest = &rest[at + marker.len()..];
            let Some((index, item)) = media.next() else {
                return Err(DataError::Template(format!(
                    "message {message} has a {marker} marker with no media item left for it"
                )));
            };
            match (marker, item) {
                (IMAGE_MARKER, Media::Image) => out.push_str(&self.media_token),
                (VIDEO_MARKER, Media::Video { frames }) => {
                    if *frames == 0 {
                        return Err(DataError::Template(format!(
                            "media item {index} is a video of 0 frames"
                        )));
                    }
                    for _ in 0..*frames {
                        out.push_str(&self.media_token);
                        if let Some(sep) = &self.frame_separator {
                            out.push_str(sep);
                        }
                    }
                }
                (marker, item) => {
                    return Err(DataError::Template(format!(
                        "message {message}: marker {marker} meets media item {index} ({item:?})"
                    )));
                }
            }
        }
    }

    /// Renders, tokenizes and expands a conversation. Each frame becomes
    /// `tokens_per_frame` media tokens; labels supervise assistant answers only.
    pub fn encode(
        &self,
        tokenizer: &TextTokenizer,
        messages: &[Message],
        media: &[Media],
        tokens_per_frame: usize,
        add_generation_prompt: bool,
    ) -> Result<EncodedChat, DataError> {
        if tokens_per_frame == 0 && !media.is_empty() {
            return Err(DataError::Template(
                "tokens_per_frame must be at least 1".into(),
            ));
        }
        let media_token = tokenizer.require(&self.media_token)?;
        tokenizer.require(IM_START)?;
        tokenizer.require(IM_END)?;
        let rendered = self.render(messages, media, add_generation_prompt)?;
        let (ids, offsets) = tokenizer.encode_with_offsets(&rendered.text)?;
        let frames: usize = media.iter().map(|m| m.frames()).sum();
        let found = ids.iter().filter(|&&t| t == media_token).count();
        if found != frames {
            return Err(DataError::Template(format!(
                "the text holds the media token `{}` {found} times but the media have {frames} frames \
                 (is `{}` written literally in a message?)",
                self.media_token, self.media_token
            )));
        }
        let visual = frames * tokens_per_frame;
        let mut out_ids = Vec::with_capacity(ids.len() - frames + visual);
        let mut labels = Vec::with_capacity(out_ids.capacity());
        let mut spans = Vec::with_capacity(media.len());
        let mut frame_budget = media.iter().map(|m| m.frames());
        let mut left_in_item = 0;
        for (&id, &(start, _)) in ids.iter().zip(&offsets) {
            if id == media_token {
                if left_in_item == 0 {
                    left_in_item = frame_budget.next().expect("counted above");
                    spans.push(MediaSpan {
                        start: out_ids.len(),
                        end: out_ids.len(),
                        frames: left_in_item,
                    });
                }
                out_ids.extend(std::iter::repeat_n(media_token, tokens_per_frame));
                labels.extend(std::iter::repeat_n(IGNORE_INDEX, tokens_per_frame));
                left_in_item -= 1;
                spans.last_mut().expect("pushed").end = out_ids.len();
                continue;
            }
            let supervised = rendered.supervised.iter().any(|r| r.contains(&start));
            out_ids.push(id);
            labels.push(if supervised { id as i64 } else { IGNORE_INDEX });
        }
        Ok(EncodedChat {
            ids: out_ids,
            labels,
            media: spans,
            media_token,
        })
    }
}
