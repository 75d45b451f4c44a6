//! On/off switches read from `LONGVIEW_*` environment variables (A/B settings of the
//! kernels). A value is one of `1`/`on`/`true`/`yes` or `0`/`off`/`false`/`no` (any
//! case); anything else is not guessed at: it is reported once on stderr, naming the
//! variable and the accepted values, and the default is kept.

/// `name`'s setting: unset or empty gives `default`.
pub fn switch(name: &str, default: bool) -> bool {
    parse(name, std::env::var(name).ok().as_deref(), default)
}

fn parse(name: &str, value: Option<&str>, default: bool) -> bool {
    let Some(value) = value.map(str::trim).filter(|v| !v.is_empty()) else {
        return default;
    };
    match value.to_ascii_lowercase().as_str() {
        "1" | "on" | "true" | "yes" => true,
        "0" | "off" | "false" | "no" => false,
        _ => {
            warn_once(
                name,
                &format!(
                    "{name}=`{value}` is not a switch (1/on/true/yes or 0/off/false/no); \
                     keeping the default ({})",
                    if default { "on" } else { "off" }
                ),
            );
            default
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
    fn switches_accept_the_usual_spellings_and_keep_the_default_otherwise() {
        for on in ["1", "on", "ON", "True", " yes "] {
            assert!(parse("T", Some(on), false), "{on}");
        }
        for off in ["0", "off", "OFF", "false", "No"] {
            assert!(!parse("T", Some(off), true), "{off}");
        }
        for default in [true, false] {
            assert_eq!(parse("T", None, default), default);
            assert_eq!(parse("T", Some(""), default), default);
            assert_eq!(parse("T", Some("disabled"), default), default);
        }
    }
}
