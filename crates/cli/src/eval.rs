//! `longview eval`: scores a saved model on the needle-in-a-haystack grid and writes a
//! table, JSON and a heatmap next to it.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;

use crate::DeviceArgs;

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub device: DeviceArgs,
    /// A run folder (its latest checkpoint), a checkpoint folder, or a VILA model folder.
    #[arg(long, default_value = "runs/debug-haystack")]
    pub checkpoint: PathBuf,
    /// What to evaluate: `needle` (haystack length x depth grid).
    #[arg(long, default_value = "needle")]
    pub task: String,
    /// Haystack lengths (frames), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "32,64,128")]
    pub frames: Vec<usize>,
    /// Videos per (length, depth) cell.
    #[arg(long, default_value_t = 4)]
    pub per_depth: usize,
    /// Where results go (default: `<checkpoint>/eval`).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(args: EvalArgs) -> Result<()> {
    if args.task != "needle" {
        bail!(
            "--task `{}`: only `needle` is implemented (multiple choice and open-ended generation are not yet)",
            args.task
        );
    }
    if args.frames.is_empty() || args.frames.contains(&0) || args.per_depth == 0 {
        bail!("--frames needs positive lengths and --per-depth at least 1");
    }
    let device = args.device.device()?;
    let model = longview_train::eval::load(&args.checkpoint, &device)?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| args.checkpoint.join("eval"));
    std::fs::create_dir_all(&out)?;
    println!(
        "longview eval: needle in a haystack, {} ({} frames x 6 depths x {} videos)",
        model.dir.display(),
        args.frames
            .iter()
            .map(|f| f.to_string())
            .collect::<Vec<_>>()
            .join("/"),
        args.per_depth
    );
    // The eval videos use their own seed, never the training set's.
    let grid = longview_train::eval::needle_grid(
        &model,
        &args.frames,
        args.per_depth,
        args.device.seed + 424_242,
        &out.join("videos"),
        &device,
        &mut |line| println!("  {line}"),
    )?;
    let table = grid.table();
    std::fs::write(out.join("needle.md"), &table)?;
    std::fs::write(
        out.join("needle.json"),
        serde_json::to_string_pretty(&grid)?,
    )?;
    grid.write_heatmap(&out.join("needle.png"))?;
    println!("{table}");
    println!(
        "  wrote {}, needle.json and needle.png",
        out.join("needle.md").display()
    );
    Ok(())
}
