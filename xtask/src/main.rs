//! `cargo xtask <command>`: the thin entry point of longview. It never links burn; it
//! runs the real binary (`longview`, crate `longview-cli`) through cargo with the right
//! profile and features, so the command line stays the same whatever needs rebuilding.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "longview developer and user commands")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// A smoke test (no GPU, no downloads): debug VLM, one random video batch,
    /// forward/backward and a few AdamW steps. Extra arguments (`--help` too) go to
    /// `longview demo`.
    #[command(disable_help_flag = true)]
    Demo {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Forward+backward throughput (release build). Extra arguments (`--help` too) go
    /// to `longview bench`.
    #[command(disable_help_flag = true)]
    Bench {
        /// Build with the CUDA backend (needs `xtask/setup.sh --cuda` once).
        #[arg(long)]
        cuda: bool,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build the CUDA release binary and compress it into dist/ for a GPU machine.
    Package,
    /// Start N local processes of a command with torchrun's variables (RANK,
    /// WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), one per GPU;
    /// output lines are prefixed with the rank, and when one rank fails the others are
    /// stopped. Example: `cargo xtask launch --nproc 4 -- target/release/longview ...`.
    Launch {
        /// Processes to start.
        #[arg(long)]
        nproc: usize,
        /// Rank 0's rendezvous port (default: a free port).
        #[arg(long, default_value_t = 0)]
        master_port: u16,
        /// The command (after `--`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<String>,
    },
    /// Train from a TOML config (configs/); with no arguments, the debug VLM on
    /// generated needle-in-a-haystack videos on the CPU. Extra arguments (`--help` too)
    /// go to `longview train`.
    #[command(disable_help_flag = true)]
    Train {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Score a saved model (default: the default train run's) on the
    /// needle-in-a-haystack grid. Extra arguments (`--help` too) go to `longview eval`.
    #[command(disable_help_flag = true)]
    Eval {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

fn run(mut cmd: Command) -> ExitCode {
    match cmd.status() {
        Ok(status) if status.success() => ExitCode::SUCCESS,
        Ok(status) => ExitCode::from(status.code().unwrap_or(1).clamp(1, 255) as u8),
        Err(e) => {
            eprintln!("xtask: cannot run {cmd:?}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Task::Demo { args } => {
            // The dev profile (dependencies at opt-level 3) shares its build with `cargo test`.
            let mut cmd = cargo();
            cmd.args(["run", "-p", "longview-cli", "--", "demo"])
                .args(args);
            run(cmd)
        }
        Task::Bench { cuda, args } => {
            let mut cmd = cargo();
            cmd.args(["run", "--release", "-p", "longview-cli"]);
            if cuda {
                cmd.args(["--features", "cuda"]);
            }
            cmd.args(["--", "bench"]).args(args);
            run(cmd)
        }
        Task::Package => package(),
        Task::Launch {
            nproc,
            master_port,
            command,
        } => {
            let options = longview_launch::LaunchOptions {
                nproc,
                master_port,
                command: command.into_iter().map(Into::into).collect(),
            };
            match longview_launch::launch_local(&options) {
                Ok(0) => ExitCode::SUCCESS,
                Ok(code) => ExitCode::from(code.clamp(1, 255) as u8),
                Err(e) => {
                    eprintln!("xtask: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Task::Train { args } => {
            // The dev profile (dependencies at opt-level 3) shares its build with `cargo test`.
            // Cargo's own progress stays visible: a first build takes minutes.
            let mut cmd = cargo();
            cmd.args(["run", "-p", "longview-cli", "--", "train"])
                .args(args);
            run(cmd)
        }
        Task::Eval { args } => {
            let mut cmd = cargo();
            cmd.args(["run", "-p", "longview-cli", "--", "eval"])
                .args(args);
            run(cmd)
        }
    }
}

/// Release build with CUDA and NCCL, then `dist/bin/longview-cuda.xz`, where the GPU
/// scripts (`benchmarks/gpu_prelude.sh`) look for it (the device tool carries at
/// most 64 MiB; the GPU machine unpacks it with python3's lzma module).
fn package() -> ExitCode {
    let mut cmd = cargo();
    cmd.args([
        "build",
        "--release",
        "-p",
        "longview-cli",
        "--features",
        "nccl",
    ]);
    let code = run(cmd);
    if code != ExitCode::SUCCESS {
        return code;
    }
    let binary = root().join("target/release/longview");
    let dist = root().join("dist/bin");
    if let Err(e) = std::fs::create_dir_all(&dist) {
        eprintln!("xtask: {}: {e}", dist.display());
        return ExitCode::FAILURE;
    }
    let out = dist.join("longview-cuda.xz");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "xz -T0 -6 -c '{}' > '{}'",
            binary.display(),
            out.display()
        ))
        .status();
    match status {
        Ok(s) if s.success() => {
            let size = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
            println!(
                "packaged {} ({:.1} MiB)",
                out.display(),
                size as f64 / (1 << 20) as f64
            );
            println!(
                "carry dist/libs (benchmarks/pack_ffmpeg_libs.sh) in one device call and dist/bin in the next; benchmarks/gpu_prelude.sh unpacks both"
            );
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("xtask: compressing with xz failed (apt-get install xz-utils)");
            ExitCode::FAILURE
        }
    }
}
