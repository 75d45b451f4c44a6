//! Rewards of a generated response against the ground truth, as LongVILA-R1 scores
//! them: a format reward (the response is `<think>...</think>` then
//! `<answer>...</answer>`, nothing else) and an accuracy reward (the text inside
//! `<answer>`, or the whole response without one, with all whitespace removed,
//! equal to the stripped ground truth: numbers compare numerically, letters and
//! other strings case-folded). Total `0.9 * accuracy + 0.1 * format`.
//!
//! [`Reward`] is the trait a user implements for another task.

/// The scores of one response.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Scored {
    /// What the policy is trained on.
    pub total: f32,
    /// 1 when the answer is right.
    pub accuracy: f32,
    /// 1 when the response has the required shape.
    pub format: f32,
}

/// Scores a response to a prompt whose right answer is `truth`.
pub trait Reward: Send + Sync {
    fn score(&self, response: &str, truth: &str) -> Scored;
}

/// LongVILA-R1's reward: `accuracy_weight * accuracy + (1 - accuracy_weight) * format`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ThinkAnswerReward {
    pub accuracy_weight: f32,
}

impl Default for ThinkAnswerReward {
    fn default() -> Self {
        ThinkAnswerReward {
            accuracy_weight: 0.9,
        }
    }
}

impl Reward for ThinkAnswerReward {
    fn score(&self, response: &str, truth: &str) -> Scored {
        let format = f32::from(u8::from(has_think_answer_format(response)));
        let accuracy = f32::from(u8::from(is_correct(response, truth)));
        Scored {
            total: self.accuracy_weight * accuracy + (1.0 - self.accuracy_weight) * format,
            accuracy,
            format,
        }
    }
}

/// Whether the whole response is `<think>X</think>`, optional whitespace, then
/// `<answer>Y</answer>` (X and Y any text, newlines included, without the closing
/// tag; leading and trailing whitespace of the response allowed).
pub fn has_think_answer_format(response: &str) -> bool {
    let text = response.trim();
    let Some(rest) = text.strip_prefix("<think>") else {
        return false;
    };
    let Some(end) = rest.find("</think>") else {
        return false;
    };
    let rest = rest[end + "</think>".len()..].trim_start();
    let Some(rest) = rest.strip_prefix("<answer>") else {
        return false;
    };
    match rest.find("</answer>") {
        Some(end) => end + "</answer>".len() == rest.len(),
        None => false,
    }
}

/// Whether the response's answer (inside `<answer>`, else the whole response)
/// matches `truth` ([`answers_match`]).
pub fn is_correct(response: &str, truth: &str) -> bool {
    answers_match(extract_answer(response).unwrap_or(response), truth)
}

/// The right answer of a sample whose answer text may be a whole
/// `<think>...</think><answer>...</answer>` reply: what is inside `<answer>`.
pub fn ground_truth(answer: &str) -> &str {
    extract_answer(answer).unwrap_or(answer)
}

/// The text between the first `<answer>` and the next `</answer>`.
pub fn extract_answer(response: &str) -> Option<&str> {
    let start = response.find("<answer>")? + "<answer>".len();
    let len = response[start..].find("</answer>")?;
    Some(&response[start..start + len])
}

/// `answer` and `truth` with whitespace removed: equal as numbers when both parse
/// as numbers (`42`, `42.0`, `4.2e1`), else equal ignoring case.
pub fn answers_match(answer: &str, truth: &str) -> bool {
    let strip = |s: &str| s.chars().filter(|c| !c.is_whitespace()).collect::<String>();
    let (answer, truth) = (strip(answer), strip(truth));
    if answer.is_empty() {
        return false;
    }
    match (answer.parse::<f64>(), truth.parse::<f64>()) {
        (Ok(a), Ok(t)) => (a - t).abs() <= 1e-9 * t.abs().max(1.0),
        _ => answer.to_lowercase() == truth.to_lowercase(),
    }
}

/// The chain-of-thought answer the synthetic needle task teaches (CoT-SFT data):
/// `<think>...</think><answer>N</answer>`.
pub fn needle_cot_answer(number: &str) -> String {
    format!("<think>one frame shows {number}</think><answer>{number}</answer>")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_needs_think_then_answer_and_nothing_else() {
        assert!(has_think_answer_format(
            "<think>a\nb</think><answer>42</answer>"
        ));
        assert!(has_think_answer_format(
            "  <think>x</think>\n <answer>B</answer>\n"
        ));
        assert!(!has_think_answer_format("<answer>42</answer>"));
        assert!(!has_think_answer_format("<think>x</think>42"));
        assert!(!has_think_answer_format(
            "<think>x</think><answer>42</answer> extra"
        ));
        assert!(!has_think_answer_format(
            "hi <think>x</think><answer>42</answer>"
        ));
        assert!(!has_think_answer_format("<think>x<answer>42</answer>"));
    }

    #[test]
    fn accuracy_compares_numbers_numerically_and_text_case_folded() {
        assert!(answers_match(" 4 2 ", "42"));
        assert!(answers_match("42.0", "42"));
        assert!(!answers_match("43", "42"));
        assert!(answers_match("b", "B"));
        assert!(!answers_match("", ""));
        assert!(!answers_match("A", "B"));
    }

    #[test]
    fn total_is_nine_tenths_accuracy_plus_one_tenth_format() {
        let reward = ThinkAnswerReward::default();
        let right = reward.score("<think>t</think><answer>42</answer>", "42");
        assert_eq!((right.accuracy, right.format), (1.0, 1.0));
        assert!((right.total - 1.0).abs() < 1e-6);
        let no_format = reward.score("42", "42");
        assert!((no_format.total - 0.9).abs() < 1e-6, "{no_format:?}");
        let wrong = reward.score("<think>t</think><answer>41</answer>", "42");
        assert!((wrong.total - 0.1).abs() < 1e-6, "{wrong:?}");
        assert_eq!(extract_answer(&needle_cot_answer("17")), Some("17"));
    }
}
