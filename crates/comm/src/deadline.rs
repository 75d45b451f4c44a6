//! Calls that have no deadline of their own (NCCL's communicator init waits for every
//! rank for ever), run on a helper thread and waited on for a bounded time.

use std::time::Duration;

/// `work` on a helper thread: its result, or `None` when it has not finished within
/// `timeout` (or ended without one). A call past the timeout keeps its thread: the
/// caller is expected to fail and end the process.
pub fn within<T: Send + 'static>(
    timeout: Duration,
    work: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let (done, result) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("bounded-call".into())
        .spawn(move || {
            let _ = done.send(work());
        })
        .ok()?;
    result.recv_timeout(timeout).ok()
}

#[cfg(test)]
mod tests {
    use super::within;
    use std::time::{Duration, Instant};

    #[test]
    fn a_call_that_never_returns_is_bounded_by_the_timeout() {
        let start = Instant::now();
        let never = within(Duration::from_millis(200), || {
            std::thread::sleep(Duration::from_secs(3600));
        });
        assert!(never.is_none());
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(within(Duration::from_secs(5), || 7), Some(7));
    }
}
