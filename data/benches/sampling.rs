//! Frame-sampling throughput on long videos, with a sequential full decode as the
//! in-process baseline. Run:
//!
//!     cargo bench -p longview-data --bench sampling -- [--gop 30] [--minutes 60] [--frames 1024,3600]
//!
//! Generates (once, under target/bench-videos) a 640x360 30 fps H.264 haystack video
//! of the given length and GOP, then samples N uniform frames resized to 384x384 and
//! normalised, reporting seconds, frames decoded, seeks and the process's peak
//! resident memory for each N (peak reset before each run through
//! /proc/self/clear_refs). benchmarks/video_reference.py measures PyAV, torchcodec
//! and decord on the same file for the comparison column; `ffmpeg -i FILE -f null -`
//! times a sequential decoding pass.

use std::path::PathBuf;
use std::time::Instant;

use longview_data::synthetic::SyntheticVideo;
use longview_data::video::{DecodeOptions, Sampling, decode};

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn main() {
    let gop: u32 = arg("--gop", "30").parse().expect("--gop N");
    let minutes: usize = arg("--minutes", "60").parse().expect("--minutes N");
    let counts: Vec<usize> = arg("--frames", "1024,3600")
        .split(',')
        .map(|s| s.parse().expect("--frames N,M"))
        .collect();
    let threads: usize = arg("--threads", "0").parse().expect("--threads N");
    let workers: usize = arg("--workers", "0").parse().expect("--workers N");
    let seek_skip: Option<usize> = match arg("--seek-skip", "auto").as_str() {
        "auto" => None,
        n => Some(n.parse().expect("--seek-skip N|auto")),
    };
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench-videos");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("haystack-{minutes}min-640x360-30fps-gop{gop}.mp4"));
    if !path.exists() {
        let frames = minutes * 60 * 30;
        eprintln!("generating {} ({frames} frames)...", path.display());
        let t = Instant::now();
        let tmp = path.with_extension("partial.mp4");
        SyntheticVideo::new(640, 360, 30, frames, gop)
            .write(&tmp)
            .unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        eprintln!("generated in {:.1}s", t.elapsed().as_secs_f64());
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let t = Instant::now();
    let info = longview_data::video::probe(&path).unwrap();
    println!(
        "video: {} ({cores} cores, workers {workers}, decoder threads {threads}, seek skip {seek_skip:?}; 0 = auto); probe {:.3} s from {:?}",
        path.display(),
        t.elapsed().as_secs_f64(),
        info.source
    );
    println!(
        "| method | frames | seconds | frames decoded | seeks | segments / workers | peak RSS MiB |"
    );
    println!("|---|---|---|---|---|---|---|");
    let options = DecodeOptions {
        threads,
        workers,
        seek_skip_frames: seek_skip,
        ..DecodeOptions::default()
    };
    for &count in &counts {
        reset_peak_rss();
        let t = Instant::now();
        let mut received = 0usize;
        let mut checksum = 0f64;
        let (_, stats) = decode(&path, &Sampling::Uniform { count }, &options, |batch| {
            received += batch.frames.len();
            checksum += batch
                .pixels
                .iter()
                .step_by(997)
                .map(|&v| v as f64)
                .sum::<f64>();
        })
        .unwrap();
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(received, count);
        println!(
            "| longview | {count} | {secs:.2} | {} | {} | {} / {} | {:.0} |",
            stats.decoded_frames,
            stats.seeks,
            stats.segments,
            stats.workers,
            peak_rss_mib()
        );
        std::hint::black_box(checksum);
    }
}
