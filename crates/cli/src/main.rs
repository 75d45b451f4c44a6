//! `longview`: the command-line front end. `cargo xtask <command>` runs this binary
//! with the right cargo features; it can also be run directly (`longview --help`).

mod bench;
mod demo;
mod device;
mod eval;
mod eval_parallel;
#[cfg(feature = "cuda")]
mod fused_check;
mod gemm;
mod graph_decode_check;
mod infer_bench;
mod infer_bench_sp;
mod logging;
mod out_of_memory;
mod ranks;
mod synthetic;
mod train;

use anyhow::Result;
use clap::{Parser, Subcommand};

pub use device::{DeviceArgs, check_cpu_memory, matmul_ceiling};

#[derive(Parser, Debug)]
#[command(
    name = "longview",
    version,
    about = "Long-video vision-language models in Rust"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Build a model, run forward and backward on a generated video batch, then a few
    /// AdamW steps, and print a summary (a smoke test; `train` is the real job).
    Demo(demo::DemoArgs),
    /// Forward+backward throughput (tokens/s) of a named model size.
    Bench(bench::BenchArgs),
    /// cuBLASLt GEMMs on the GPU: correctness checks (--check) and the 1.5B model's
    /// GEMM shapes timed.
    Gemm(gemm::GemmArgs),
    /// Inference phases timed on generated frames: vision encoding, chunked prefill
    /// (time to first token), greedy decoding, memory.
    InferBench(infer_bench::InferBenchArgs),
    /// Train from a TOML config (default: the debug VLM on generated
    /// needle-in-a-haystack videos), with checkpoints, metrics and --resume.
    Train(train::TrainArgs),
    /// Score a saved model on the needle-in-a-haystack grid (table, JSON, heatmap).
    Eval(eval::EvalArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    logging::init();
    // Requests that would not fit on a GPU are refused with the numbers before they
    // allocate (generation, batched and sequence-parallel inference).
    #[cfg(feature = "cuda")]
    longview_infer::prefill::set_device_memory_probe(
        longview_kernels::device_memory::available_bytes,
    );
    // A device allocation that fails inside a tensor operation ends the command with
    // an error naming the allocation and what to lower, not a panic.
    out_of_memory::install_quiet_hook();
    out_of_memory::run_reporting(|| match cli.command {
        Command::Demo(args) => demo::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Gemm(args) => gemm::run(args),
        Command::InferBench(args) => infer_bench::run(args),
        Command::Train(args) => train::run(args),
        Command::Eval(args) => eval::run(args),
    })
}
