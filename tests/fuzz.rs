//! Seeded mutations of every file format a user hands longview (run config TOML,
//! Hugging Face config.json, JSONL rows, safetensors headers): each mutated input
//! must give a result or an error, never a panic. The rendezvous messages have their
//! own fuzz test (`crates/launch/tests/hostile.rs`). Bounded in count; the seed is
//! fixed so a failure reproduces (LONGVIEW_FUZZ_SEED changes it).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use longview_data::dataset::{ReadOptions, read_conversations, read_multiple_choice, read_reason};
use longview_models::hf::{HfQwen2Config, HfSiglipVisionConfig, load_qwen2};
use longview_tests::{TempDir, device, fixture};
use longview_train::TrainConfig;

/// xorshift64*: a small seeded generator.
struct Rng(u64);

impl Rng {
    fn new(salt: u64) -> Self {
        let seed = std::env::var("LONGVIEW_FUZZ_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x5eed_f022);
        Rng((seed ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Replacement values that break assumptions: huge, zero, negative, non-finite,
/// wrong types, empty.
const NASTY: &[&str] = &[
    "0",
    "-1",
    "1e308",
    "18446744073709551615",
    "-9223372036854775808",
    "nan",
    "inf",
    "\"\"",
    "\"x\"",
    "[]",
    "{}",
    "true",
    "null",
    "3.5",
    "1e-320",
    "4294967296",
];

/// One text mutation: a character deleted, inserted or replaced, a number-like token
/// replaced by a nasty value, or a line dropped or doubled.
fn mutate_text(text: &str, rng: &mut Rng) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    if chars.is_empty() {
        return NASTY[rng.below(NASTY.len())].to_string();
    }
    match rng.below(6) {
        0 => {
            chars.remove(rng.below(chars.len()));
        }
        1 => {
            const SPICE: &[u8] = b"{}[]\"=,:.-0123456789\nx\\";
            let c = SPICE[rng.below(SPICE.len())] as char;
            chars.insert(rng.below(chars.len() + 1), c);
        }
        2 => {
            let i = rng.below(chars.len());
            chars[i] = (rng.below(95) as u8 + 32) as char;
        }
        3 => {
            // A value after `=` or `:` replaced.
            let text: String = chars.iter().collect();
            let cuts: Vec<usize> = text.match_indices(['=', ':']).map(|(i, _)| i + 1).collect();
            if let Some(&at) = cuts.get(rng.below(cuts.len())) {
                let end = text[at..]
                    .find([',', '\n', '}'])
                    .map_or(text.len(), |e| at + e);
                return format!(
                    "{} {}{}",
                    &text[..at],
                    NASTY[rng.below(NASTY.len())],
                    &text[end..]
                );
            }
        }
        4 | 5 => {
            let mut lines: Vec<&str> = text.lines().collect();
            if lines.is_empty() {
                return text.to_string();
            }
            let i = rng.below(lines.len());
            if rng.below(2) == 0 {
                lines.remove(i);
            } else {
                lines.insert(i, lines[i]);
            }
            return lines.join("\n");
        }
        _ => unreachable!(),
    }
    chars.into_iter().collect()
}

/// Runs `inputs` mutations of `base` through `check`; returns how many were tried
/// and which ones panicked.
fn fuzz(
    base: &[String],
    inputs: usize,
    salt: u64,
    mut check: impl FnMut(&str),
) -> (usize, Vec<String>) {
    // The panic hook is process-wide: one fuzz loop at a time silences it.
    static HOOK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = HOOK.lock().unwrap_or_else(|p| p.into_inner());
    let mut rng = Rng::new(salt);
    let mut panicked = Vec::new();
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    for _ in 0..inputs {
        let mut text = base[rng.below(base.len())].clone();
        for _ in 0..1 + rng.below(3) {
            text = mutate_text(&text, &mut rng);
        }
        if catch_unwind(AssertUnwindSafe(|| check(&text))).is_err() {
            panicked.push(text);
        }
    }
    std::panic::set_hook(hook);
    (inputs, panicked)
}

fn report(what: &str, (tried, panicked): (usize, Vec<String>)) {
    println!("fuzz {what}: {tried} inputs, {} panics", panicked.len());
    assert!(
        panicked.is_empty(),
        "{what}: {} of {tried} inputs panicked; first:\n{}",
        panicked.len(),
        panicked[0]
    );
}

fn repo_file(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)).unwrap()
}

#[test]
fn mutated_run_configs_never_panic() {
    let mut base = vec![TrainConfig::default().to_toml()];
    for name in [
        "debug-haystack",
        "debug-grpo",
        "debug-cot-sft",
        "debug-stage4-context-extension",
    ] {
        base.push(repo_file(&format!("configs/{name}.toml")));
    }
    report(
        "run config TOML",
        fuzz(&base, 3000, 1, |text| {
            let _ = TrainConfig::from_toml(text, "fuzz.toml");
        }),
    );
}

#[test]
fn mutated_hf_configs_never_panic() {
    let tmp = TempDir::new("fuzz-config");
    let path = tmp.0.join("config.json");
    let qwen = std::fs::read_to_string(fixture("qwen2/config.json")).unwrap();
    let siglip = std::fs::read_to_string(fixture("siglip/config.json")).unwrap();
    report(
        "Hugging Face config.json",
        fuzz(&[qwen, siglip], 1500, 2, |text| {
            std::fs::write(&path, text).unwrap();
            if let Ok(c) = HfQwen2Config::read(&path) {
                let _ = c.into_config(&path);
            }
            if let Ok(c) = HfSiglipVisionConfig::read(&path) {
                let _ = c.into_config(&path);
            }
        }),
    );
}

#[test]
fn mutated_jsonl_rows_never_panic() {
    let tmp = TempDir::new("fuzz-jsonl");
    let path = tmp.0.join("rows.jsonl");
    let rows = [
        r#"{"id": "a", "video": "v.mp4", "conversations": [{"from": "human", "value": "<video>\nWhat?"}, {"from": "gpt", "value": "42"}]}"#,
        r#"{"videos": ["v.mp4"], "problem": "How many?", "answer": "<think>t</think><answer>3</answer>"}"#,
        r#"{"question": "Which?", "options": ["A. x", "B. y"], "answer": "B", "video": "v.mp4", "duration": "short"}"#,
    ];
    let base: Vec<String> = rows.iter().map(|r| format!("{r}\n{r}\n")).collect();
    let options = ReadOptions::default();
    report(
        "JSONL rows",
        fuzz(&base, 1500, 3, |text| {
            std::fs::write(&path, text).unwrap();
            let _ = read_conversations(&path, &options);
            let _ = read_reason(&path, &options);
            let _ = read_multiple_choice(&path, &options);
        }),
    );
}

#[test]
fn mutated_safetensors_headers_never_panic() {
    let tmp = TempDir::new("fuzz-safetensors");
    let dir = tmp.0.join("qwen2");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture("qwen2/config.json"), dir.join("config.json")).unwrap();
    let bytes = std::fs::read(fixture("qwen2/model.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + header_len].to_vec()).unwrap();
    let body = bytes[8 + header_len..].to_vec();
    let device = device();
    let mut rng = Rng::new(4);
    let (tried, panicked) = fuzz(&[header], 300, 4, |text| {
        // Half the inputs also lie about the header's length.
        let len = match rng.below(4) {
            0 => rng.next(),
            _ => text.len() as u64,
        };
        let mut file = len.to_le_bytes().to_vec();
        file.extend_from_slice(text.as_bytes());
        file.extend_from_slice(&body);
        std::fs::write(dir.join("model.safetensors"), file).unwrap();
        let _ = load_qwen2(&dir, &device);
    });
    report("safetensors headers", (tried, panicked));
}
