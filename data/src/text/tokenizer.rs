//! Hugging Face `tokenizer.json` files through the `tokenizers` crate (byte-level BPE
//! for Qwen2 and the debug model), with errors that name the file and the token.

use std::path::Path;

use tokenizers::{AddedToken, Tokenizer};

use crate::error::DataError;

/// The debug model's tokenizer: a 1024-entry byte-level BPE with Qwen2's pipeline,
/// trained by `data/assets/make_debug_tokenizer.py`. Ids 0..=3 are `<|endoftext|>`,
/// `<|im_start|>`, `<|im_end|>` and `<image>`.
const DEBUG_TOKENIZER: &str = include_str!("../../assets/debug-tokenizer.json");

/// Byte range `[start, end)` of the text each token covers.
pub type Offsets = Vec<(usize, usize)>;

/// A tokenizer plus where it came from (for error messages).
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    source: String,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

impl TextTokenizer {
    /// The embedded tokenizer of the `debug` model (no file needed).
    pub fn debug() -> Self {
        TextTokenizer {
            inner: Tokenizer::from_bytes(DEBUG_TOKENIZER.as_bytes())
                .expect("the embedded debug tokenizer parses"),
            source: "debug (embedded)".into(),
        }
    }

    /// Loads a `tokenizer.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, DataError> {
        let path = path.as_ref();
        if !path.exists() {
            return Err(DataError::NotFound { path: path.into() });
        }
        let inner = Tokenizer::from_file(path).map_err(|e| DataError::Tokenizer {
            source_name: path.display().to_string(),
            reason: format!("not a tokenizer.json: {e}"),
        })?;
        Ok(TextTokenizer {
            inner,
            source: path.display().to_string(),
        })
    }

    /// Loads `tokenizer.json` from a checkpoint folder: the folder itself, or its
    /// `llm/` part (VILA's layout).
    pub fn from_checkpoint_dir(dir: impl AsRef<Path>) -> Result<Self, DataError> {
        let dir = dir.as_ref();
        for candidate in [
            dir.join("tokenizer.json"),
            dir.join("llm").join("tokenizer.json"),
        ] {
            if candidate.exists() {
                return Self::from_file(candidate);
            }
        }
        Err(DataError::NotFound {
            path: dir.join("tokenizer.json"),
        })
    }

    /// Where the tokenizer came from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Entries including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The id of `token`, or an error naming the tokenizer and the token.
    pub fn require(&self, token: &str) -> Result<u32, DataError> {
        self.token_id(token).ok_or_else(|| DataError::Tokenizer {
            source_name: self.source.clone(),
            reason: format!("has no token `{token}`"),
        })
    }

    /// Adds `token` as a special token when it is missing (VILA adds `<image>` to the
    /// Qwen2 tokenizer this way); returns its id.
    pub fn ensure_special_token(&mut self, token: &str) -> Result<u32, DataError> {
        if let Some(id) = self.token_id(token) {
            return Ok(id);
        }
        self.inner
            .add_special_tokens([AddedToken::from(token.to_string(), true)])
            .map_err(|e| DataError::Tokenizer {
                source_name: self.source.clone(),
                reason: format!("adding `{token}` failed: {e}"),
            })?;
        self.require(token)
    }

    /// Token ids of `text` (special tokens written in the text are recognised; no
    /// BOS/EOS is added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, DataError> {
        Ok(self.encode_with_offsets(text)?.0)
    }

    /// Ids and the byte range of `text` each one covers.
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Offsets), DataError> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| DataError::Tokenizer {
                source_name: self.source.clone(),
                reason: format!("encoding failed: {e}"),
            })?;
        Ok((encoding.get_ids().to_vec(), encoding.get_offsets().to_vec()))
    }

    /// Text of `ids`; `skip_special` drops special tokens.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, DataError> {
        let vocab = self.vocab_size();
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(DataError::Tokenizer {
                source_name: self.source.clone(),
                reason: format!("id {bad} is outside the vocabulary of {vocab}"),
            });
        }
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| DataError::Tokenizer {
                source_name: self.source.clone(),
                reason: format!("decoding failed: {e}"),
            })
    }

    /// The underlying `tokenizers` object.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}
