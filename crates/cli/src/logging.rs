//! Log lines of the long commands (`train`, GRPO, `eval`): `tracing` events on stdout
//! with a UTC timestamp and a level, filtered by `RUST_LOG` (default `info`; e.g.
//! `RUST_LOG=warn` keeps warnings and errors only). Under a multi-rank run every line
//! names its rank (`rank{rank=N}:`). Reports printed at the end (summaries, tables)
//! stay plain output.

use tracing::Level;
use tracing_subscriber::EnvFilter;

/// The filter `RUST_LOG` asks for (`info` when unset or unreadable; the error is
/// printed).
pub fn filter() -> EnvFilter {
    match std::env::var("RUST_LOG") {
        Err(_) => EnvFilter::new("info"),
        Ok(value) => EnvFilter::try_new(&value).unwrap_or_else(|e| {
            eprintln!("warning: RUST_LOG=`{value}`: {e}; logging at info");
            EnvFilter::new("info")
        }),
    }
}

/// Installs the subscriber (once; later calls do nothing).
pub fn init() {
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_target(false)
        // Colours for a terminal only: log files and CI keep plain text.
        .with_ansi(std::io::stdout().is_terminal())
        .with_writer(std::io::stdout)
        .try_init();
}

/// This process's rank in a torchrun/SLURM-style multi-process job of more than one
/// process (the launcher's variables, as `longview_launch::ProcessEnv` reads them).
pub fn process_rank() -> Option<usize> {
    let env = longview_launch::ProcessEnv::from_env().ok().flatten()?;
    (env.world_size > 1).then_some(env.rank)
}

/// How important a run's line is: skipped data (training samples, evaluation rows) is
/// a warning, the rest information.
pub fn level_of(line: &str) -> Level {
    if line.starts_with("skipped sample")
        || line.contains(" skipped: ")
        || line.starts_with("warning")
    {
        Level::WARN
    } else {
        Level::INFO
    }
}

/// Logs one line of this process's run, under its rank in a multi-process job (read
/// from the environment once).
pub fn log(text: &str) {
    static RANK: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    line(*RANK.get_or_init(process_rank), text)
}

/// Logs one line of a run, under its rank when the run has several.
pub fn line(rank: Option<usize>, text: &str) {
    // At the top level so that every filter that lets a line through keeps its rank.
    let span = rank.map(|rank| tracing::error_span!("rank", rank).entered());
    match level_of(text) {
        Level::WARN => tracing::warn!("{text}"),
        _ => tracing::info!("{text}"),
    }
    drop(span);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::fmt::MakeWriter;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    /// Lines as a run logs them, under a `warn` filter: the warning stays, the
    /// information goes, and the rank is named.
    #[test]
    fn levels_filter_and_every_line_names_its_rank() {
        let out = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(EnvFilter::new("warn"))
            .with_target(false)
            .with_ansi(false)
            .with_writer(out.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            line(Some(3), "step 1/10: loss 2.0");
            line(Some(3), "skipped sample 7: video.mp4 does not decode");
            line(None, "skipped sample 8: too long");
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(
            lines[0].contains("WARN") && lines[0].contains("rank{rank=3}"),
            "{text}"
        );
        assert!(lines[0].contains("skipped sample 7"), "{text}");
        assert!(!lines[1].contains("rank{"), "{text}");
        assert!(
            !text.contains("loss 2.0"),
            "info lines pass a warn filter: {text}"
        );
    }

    #[test]
    fn skipped_data_is_a_warning() {
        assert_eq!(level_of("skipped sample 1: x"), Level::WARN);
        assert_eq!(
            level_of("row 4 skipped: clip.mp4 does not decode"),
            Level::WARN
        );
        assert_eq!(level_of("step 2/3: loss"), Level::INFO);
    }
}
