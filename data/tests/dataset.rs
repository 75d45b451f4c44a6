//! Dataset readers: good rows become samples, every bad row is counted with its line
//! number and reason (or stops the read under BadRows::Fail), media paths resolve.

use std::path::PathBuf;

use longview_data::DataError;
use longview_data::dataset::{
    BadRows, MediaKind, ReadOptions, read_conversations, read_multiple_choice, read_reason,
};
use longview_data::text::{Message, Role};

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(format!("longview-ds-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const CONVERSATIONS: &str = r#"{"id": 1, "video": "a.mp4", "conversations": [{"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "A dog runs."}]}
{"id": "2", "image": "b.jpg", "conversations": [{"from": "human", "value": "Describe."}, {"from": "gpt", "value": "A cat."}]}
this line is not json

{"id": 4, "video": "a.mp4", "conversations": [{"from": "human", "value": "Hi"}]}
{"id": 5, "conversations": [{"from": "robot", "value": "x"}, {"from": "gpt", "value": "y"}]}
{"id": 6, "video": ["a.mp4", "c.mp4"], "conversations": [{"from": "human", "value": "<video> then <video>?"}, {"from": "gpt", "value": "ok"}]}
{"id": 7, "video": "a.mp4", "conversations": [{"from": "human", "value": "<video><video>"}, {"from": "gpt", "value": "two markers, one video"}]}
{"id": 8, "image": "b.jpg", "video": "a.mp4", "conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "<video> and <image>"}, {"from": "gpt", "value": "both"}]}
[1, 2, 3]
{"id": 10, "conversations": [{"from": "human", "value": "text only"}, {"from": "gpt", "value": "fine"}]}
"#;

#[test]
fn conversations_are_read_and_bad_rows_counted_by_line() {
    let dir = TempDir::new("conv");
    let path = dir.write("train.jsonl", CONVERSATIONS);
    let rows = read_conversations(&path, &ReadOptions::default()).unwrap();
    let lines: Vec<usize> = rows.rows.iter().map(|r| r.line).collect();
    assert_eq!(lines, vec![1, 2, 7, 9, 11]);
    let skipped: Vec<(usize, &str)> = rows
        .skipped
        .iter()
        .map(|s| (s.line, s.reason.as_str()))
        .collect();
    assert_eq!(skipped.len(), 5, "{skipped:?}");
    assert_eq!(skipped[0].0, 3);
    assert!(skipped[0].1.starts_with("not JSON"), "{skipped:?}");
    assert_eq!(skipped[1], (5, "no assistant turn (nothing to learn from)"));
    assert_eq!(skipped[2], (6, "conversations[0]: unknown speaker `robot`"));
    assert_eq!(skipped[3].0, 8);
    assert!(
        skipped[3]
            .1
            .contains("2 <video> markers for 0 images and 1 videos"),
        "{skipped:?}"
    );
    assert_eq!(skipped[4], (10, "not a JSON object"));
    assert!(
        rows.summary()
            .contains("5 samples, 5 rows skipped; line 3: not JSON"),
        "{}",
        rows.summary()
    );

    let first = &rows.rows[0].sample;
    assert_eq!(first.id.as_deref(), Some("1"));
    assert_eq!(first.media.len(), 1);
    assert_eq!(first.media[0].kind, MediaKind::Video);
    assert_eq!(first.media[0].path, dir.0.join("a.mp4"));
    assert_eq!(first.messages[1], Message::assistant("A dog runs."));
    // No marker in the text: one is put at the start of the first user turn.
    let second = &rows.rows[1].sample;
    assert_eq!(second.messages[0].content, "<image>\nDescribe.");
    assert_eq!(second.media[0].kind, MediaKind::Image);
    // Media follow the order of the markers, whatever the field order.
    let both = &rows.rows[3].sample;
    assert_eq!(both.messages[0].role, Role::System);
    let kinds: Vec<MediaKind> = both.media.iter().map(|m| m.kind).collect();
    assert_eq!(kinds, vec![MediaKind::Video, MediaKind::Image]);
    assert!(rows.rows[4].sample.media.is_empty());

    // Fail policy: the first bad row stops the read, naming file and line.
    let fail = ReadOptions {
        bad_rows: BadRows::Fail,
        ..ReadOptions::default()
    };
    let err = read_conversations(&path, &fail).unwrap_err();
    assert!(matches!(err, DataError::Dataset { line: 3, .. }), "{err}");
    assert!(err.to_string().contains("train.jsonl:3: not JSON"), "{err}");

    // Media checks: only a.mp4 exists, so rows with b.jpg or c.mp4 are skipped.
    dir.write("a.mp4", "");
    let checked = ReadOptions {
        check_media: true,
        ..ReadOptions::default()
    };
    let rows = read_conversations(&path, &checked).unwrap();
    let lines: Vec<usize> = rows.rows.iter().map(|r| r.line).collect();
    assert_eq!(lines, vec![1, 11]);
    assert!(
        rows.skipped
            .iter()
            .any(|s| s.line == 2 && s.reason.contains("b.jpg not found"))
    );
    // Another media root.
    let rooted = ReadOptions {
        media_root: Some("/data/videos".into()),
        ..ReadOptions::default()
    };
    let rows = read_conversations(&path, &rooted).unwrap();
    assert_eq!(
        rows.rows[0].sample.media[0].path,
        PathBuf::from("/data/videos/a.mp4")
    );

    let err = read_conversations(dir.0.join("missing.jsonl"), &ReadOptions::default()).unwrap_err();
    assert!(err.to_string().contains("missing.jsonl"), "{err}");
}

#[test]
fn reason_rows_split_thinking_and_answer() {
    let dir = TempDir::new("reason");
    let path = dir.write(
        "reason.jsonl",
        concat!(
            r#"{"videos": ["v1.mp4"], "problem": "Who wins?", "answer": "<think>\nThe red team scores twice.\n</think>\n<answer>B</answer>"}"#,
            "\n",
            r#"{"video": "v2.mp4", "problem": "How many cars?", "answer": "3"}"#,
            "\n",
            r#"{"videos": ["v3.mp4"], "problem": "?", "answer": "<think>no answer tag</think>"}"#,
            "\n",
            r#"{"videos": [], "problem": "?", "answer": "A"}"#,
            "\n",
            r#"{"videos": ["v4.mp4"], "problem": "?", "answer": "<answer>A"}"#,
            "\n",
            r#"{"videos": ["v5.mp4"], "answer": "A"}"#,
            "\n",
        ),
    );
    let rows = read_reason(&path, &ReadOptions::default()).unwrap();
    assert_eq!(rows.rows.len(), 2);
    let first = &rows.rows[0].sample;
    assert_eq!(
        first.thinking.as_deref(),
        Some("The red team scores twice.")
    );
    assert_eq!(first.answer, "B");
    assert_eq!(first.videos, vec![dir.0.join("v1.mp4")]);
    assert_eq!(
        first.messages(),
        vec![
            Message::user("<video>\nWho wins?"),
            Message::assistant("<think>The red team scores twice.</think><answer>B</answer>")
        ]
    );
    let second = &rows.rows[1].sample;
    assert_eq!(
        (second.thinking.as_deref(), second.answer.as_str()),
        (None, "3")
    );
    let reasons: Vec<(usize, String)> = rows
        .skipped
        .iter()
        .map(|s| (s.line, s.reason.clone()))
        .collect();
    assert_eq!(
        reasons,
        vec![
            (3, "`answer` has <think> but no <answer>".to_string()),
            (4, "no `videos`".to_string()),
            (5, "unbalanced <answer> tags".to_string()),
            (6, "missing field `problem`".to_string()),
        ]
    );
}

#[test]
fn multiple_choice_rows_prompt_and_score() {
    let dir = TempDir::new("mcq");
    let path = dir.write(
        "videomme.jsonl",
        concat!(
            r#"{"videoID": "fFjv93ACGo8", "question_id": "001-1", "duration": "short", "question": "What colour is the car?", "options": ["A. Red", "B. Blue", "C. Green", "D. Black"], "answer": "C"}"#,
            "\n",
            r#"{"video": "clips/x.mp4", "question": "Q?", "options": ["A. yes", "B. no"], "answer": "E"}"#,
            "\n",
            r#"{"video": "clips/x.mp4", "question": "Q?", "options": ["A. only"], "answer": "A"}"#,
            "\n",
            r#"{"question": "Q?", "options": ["A. yes", "B. no"], "answer": "A"}"#,
            "\n",
        ),
    );
    let rows = read_multiple_choice(&path, &ReadOptions::default()).unwrap();
    assert_eq!(rows.rows.len(), 1);
    let s = &rows.rows[0].sample;
    assert_eq!(s.video, dir.0.join("fFjv93ACGo8.mp4"));
    assert_eq!(s.id.as_deref(), Some("001-1"));
    assert_eq!(s.answer, 'C');
    assert_eq!(
        s.prompt(),
        "<video>\nWhat colour is the car?\nA. Red\nB. Blue\nC. Green\nD. Black\nRespond with only the letter of the correct option."
    );
    // Options given without their letters get them in the prompt.
    let bare = longview_data::dataset::ChoiceSample {
        options: vec!["Red".into(), "(B) Blue".into(), "Cat".into()],
        ..s.clone()
    };
    assert_eq!(
        bare.prompt(),
        "<video>\nWhat colour is the car?\nA. Red\n(B) Blue\nC. Cat\nRespond with only the letter of the correct option."
    );
    for (reply, chosen) in [
        ("C", Some('C')),
        (" (C) Green", Some('C')),
        ("Answer: C.", Some('C')),
        ("C. Green", Some('C')),
        ("The answer is B", Some('B')),
        ("Cars are green", None),
        ("E", None),
        ("", None),
    ] {
        assert_eq!(s.chosen(reply), chosen, "{reply:?}");
    }
    assert!(s.is_correct("C") && !s.is_correct("B"));
    let reasons: Vec<(usize, String)> = rows
        .skipped
        .iter()
        .map(|r| (r.line, r.reason.clone()))
        .collect();
    assert_eq!(
        reasons,
        vec![
            (2, "answer `E` is not one of the letters A..B".to_string()),
            (3, "1 options (2 to 26 expected)".to_string()),
            (4, "missing field `video` (or `videoID`)".to_string()),
        ]
    );
}

#[test]
fn a_line_that_is_not_utf8_is_one_bad_row_not_a_failed_file() {
    let dir = TempDir::new("utf8");
    let good = r#"{"id": 1, "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ok"}]}"#;
    let mut bytes = format!("{good}\n").into_bytes();
    bytes.extend_from_slice(b"{\"id\": 2, \"bad\": \"\xff\xfe\"}\n");
    bytes.extend_from_slice(good.to_string().as_bytes()); // no final newline
    let path = dir.0.join("mixed.jsonl");
    std::fs::write(&path, bytes).unwrap();
    let rows = read_conversations(&path, &ReadOptions::default()).unwrap();
    let lines: Vec<usize> = rows.rows.iter().map(|r| r.line).collect();
    assert_eq!(lines, vec![1, 3]);
    assert_eq!(rows.skipped.len(), 1);
    assert_eq!(rows.skipped[0].line, 2);
    assert!(
        rows.skipped[0].reason.contains("UTF-8"),
        "{:?}",
        rows.skipped
    );
}
