//! A device allocation that fails deep inside a tensor operation (Burn and CubeCL
//! report it by panicking) becomes an error that says what happened and what to
//! lower, instead of a panic message and a backtrace.

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};

use anyhow::{Result, anyhow};

use crate::ranks::panic_message;

/// Whether a panic message reports an exhausted device (CubeCL's "out of device
/// memory allocating N bytes", CUDA's `CUDA_ERROR_OUT_OF_MEMORY`).
pub fn is_out_of_memory(message: &str) -> bool {
    let lower = message.to_lowercase();
    lower.contains("out of device memory")
        || lower.contains("out_of_memory")
        || lower.contains("outofmemory")
}

/// The error a command ends with when the device ran out of memory.
pub fn explain(message: &str) -> String {
    // The allocator's own line (with the size asked for) is the useful part.
    let cause = message
        .lines()
        .map(str::trim)
        .find(|line| is_out_of_memory(line))
        .unwrap_or(message.trim());
    format!(
        "the GPU ran out of memory ({cause}). The run stopped there; a training run \
         resumes from its last checkpoint with --resume. To fit, lower what is held at \
         once: fewer frames (--frames, data.frames), a token budget per frame or over \
         time (model.token_pool, model.temporal_pool), run.recompute = \"attention-aware\", \
         a smaller run.batch_size (GRPO: grpo.group_size, grpo.max_response_tokens), or \
         a smaller --prefill-chunk for inference"
    )
}

/// Keeps the default panic output for every panic but an out-of-memory one, which
/// [`run_reporting`] turns into an error.
pub fn install_quiet_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if !is_out_of_memory(message) {
            default(info);
        }
    }));
}

/// Runs `command`; an out-of-memory panic becomes [`explain`]'s error, any other
/// panic continues unwinding.
pub fn run_reporting(command: impl FnOnce() -> Result<()>) -> Result<()> {
    match catch_unwind(AssertUnwindSafe(command)) {
        Ok(result) => result,
        Err(payload) => {
            let message = panic_message(&*payload);
            if is_out_of_memory(&message) {
                Err(anyhow!(explain(&message)))
            } else {
                resume_unwind(payload)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The panic the H100 run ended with (a 256-frame GRPO step, 2026-12-05).
    const SEEN: &str = "gemm: the CUDA buffer of an operand: Several failures at once\n\
        Caused by:\n  The bytes were never written (failure #257672, still claiming 2 buffer(s))\n\
        Caused by:\n  An IO error happened\nCaused by:\n  out of device memory allocating 9022996480 bytes";

    #[test]
    fn an_out_of_memory_panic_becomes_an_error_naming_the_allocation_and_the_settings() {
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let oom = run_reporting(|| panic!("{SEEN}"));
        let other = catch_unwind(|| run_reporting(|| panic!("index out of bounds")));
        std::panic::set_hook(hook);
        let text = oom.unwrap_err().to_string();
        assert!(
            text.contains("out of device memory allocating 9022996480 bytes")
                && text.contains("--resume")
                && text.contains("model.token_pool"),
            "{text}"
        );
        // Any other panic is not disguised.
        assert_eq!(panic_message(&*other.unwrap_err()), "index out of bounds");
        assert!(run_reporting(|| Ok(())).is_ok());
        assert!(!is_out_of_memory("index out of bounds"));
        assert!(is_out_of_memory(
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")"
        ));
    }
}
