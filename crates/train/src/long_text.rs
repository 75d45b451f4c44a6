//! Generated long text for context extension (stage 4) when no `data.path` is given:
//! pass-key documents, the synthetic task long-context LLM work uses to check that a
//! model reads far back. Each document hides a five-digit key near its start, fills
//! the middle with sentences drawn from a small vocabulary, and asks for the key at
//! the end with the answer written out, so the loss on the last tokens rewards
//! attending across the whole window. Deterministic in the seed.

use std::io::Write;
use std::path::Path;

use crate::data::mix;
use crate::error::TrainError;

const WORDS: &[&str] = &[
    "the", "river", "stone", "light", "morning", "village", "quiet", "market", "green", "bridge",
    "slowly", "walked", "through", "garden", "under", "clouds", "old", "window", "bright",
    "evening", "road", "mountain", "small", "house", "near", "water", "children", "played",
    "while", "birds", "sang", "above", "fields", "of", "grass", "and", "wind",
];

/// Writes `documents` pass-key documents of about `words` words each to `path` as
/// JSONL rows `{"text": ...}` (unless a complete file is there), written under a
/// temporary name and renamed.
pub fn write_passkey_documents(
    path: &Path,
    documents: usize,
    words: usize,
    seed: u64,
) -> Result<(), TrainError> {
    if path.exists() {
        return Ok(());
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(TrainError::io(parent))?;
    }
    let partial = path.with_extension("partial");
    let mut file =
        std::io::BufWriter::new(std::fs::File::create(&partial).map_err(TrainError::io(&partial))?);
    for doc in 0..documents {
        let text = passkey_document(words, mix(seed ^ 0x7061_7373, doc as u64));
        let row = serde_json::json!({ "text": text });
        writeln!(file, "{row}").map_err(TrainError::io(&partial))?;
    }
    file.flush().map_err(TrainError::io(&partial))?;
    drop(file);
    std::fs::rename(&partial, path).map_err(TrainError::io(path))
}

/// One document: the key, filler sentences, the question and its answer.
pub fn passkey_document(words: usize, seed: u64) -> String {
    let mut state = seed;
    let mut next = |n: usize| {
        state = mix(state, 0x9E37_79B9_7F4A_7C15);
        (state % n as u64) as usize
    };
    let key = 10_000 + next(90_000);
    let mut text = format!("The pass key is {key}. Remember it. {key} is the pass key.");
    let mut written = 0;
    while written < words {
        let len = 6 + next(8);
        let sentence: Vec<&str> = (0..len).map(|_| WORDS[next(WORDS.len())]).collect();
        text.push(' ');
        text.push_str(&capitalise(&sentence.join(" ")));
        text.push('.');
        written += len;
    }
    text.push_str(&format!(" What is the pass key? The pass key is {key}."));
    text
}

fn capitalise(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_deterministic_and_ask_for_their_own_key() {
        let a = passkey_document(200, 7);
        assert_eq!(a, passkey_document(200, 7));
        assert_ne!(a, passkey_document(200, 8));
        let key: String = a["The pass key is ".len()..].chars().take(5).collect();
        assert!(key.chars().all(|c| c.is_ascii_digit()), "{a}");
        assert!(a.ends_with(&format!("The pass key is {key}.")), "{a}");
        assert!(a.split_whitespace().count() > 200);
    }
}
