//! On/off switches read from `LONGVIEW_*` environment variables (A/B settings of the
//! kernels). A value is one of `1`/`on`/`true`/`yes` or `0`/`off`/`false`/`no` (any
//! case); anything else is not guessed at: it is reported once on stderr, naming the
//! variable and the accepted values, and the default is kept.

/// `name`'s setting: unset, empty or not a switch gives `default`.
pub fn switch(name: &str, default: bool) -> bool {
    optional_switch(name).unwrap_or(default)
}

/// `name`'s setting, `None` when unset, empty or not a switch (the caller's default
/// then applies; a value that is not a switch is reported once).
pub fn optional_switch(name: &str) -> Option<bool> {
    parse(name, std::env::var(name).ok().as_deref())
}

fn parse(name: &str, value: Option<&str>) -> Option<bool> {
    let value = value.map(str::trim).filter(|v| !v.is_empty())?;
    match value.to_ascii_lowercase().as_str() {
        "1" | "on" | "true" | "yes" => Some(true),
        "0" | "off" | "false" | "no" => Some(false),
        _ => {
            warn_once(
                name,
                &format!(
                    "{name}=`{value}` is not a switch (1/on/true/yes or 0/off/false/no); \
                     ignored, the default applies"
                ),
            );
            None
        }
    }
}

/// Prints `message` on stderr the first time `name` is reported.
pub fn warn_once(name: &str, message: &str) {
    static SEEN: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if !seen.iter().any(|n| n == name) {
        seen.push(name.to_string());
        eprintln!("warning: {message}");
    }
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn switches_accept_the_usual_spellings_and_leave_anything_else_to_the_default() {
        for on in ["1", "on", "ON", "True", " yes "] {
            assert_eq!(parse("T", Some(on)), Some(true), "{on}");
        }
        for off in ["0", "off", "OFF", "false", "No"] {
            assert_eq!(parse("T", Some(off)), Some(false), "{off}");
        }
        for unset in [None, Some(""), Some("  "), Some("disabled")] {
            assert_eq!(parse("T", unset), None, "{unset:?}");
        }
    }
}
