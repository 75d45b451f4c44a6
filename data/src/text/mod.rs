//! Text side: tokenizers and the chat template with media placeholders.

pub mod chat;
mod tokenizer;

pub use chat::{
    ChatTemplate, EncodedChat, IGNORE_INDEX, IMAGE_MARKER, Media, MediaSpan, Message, Rendered,
    Role, VIDEO_MARKER,
};
pub use tokenizer::{Offsets, TextTokenizer};
