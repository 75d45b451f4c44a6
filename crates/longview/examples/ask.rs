//! Ask a question about a video with a trained model.
//!
//! ```sh
//! cargo xtask train                       # writes runs/debug-haystack
//! cargo run -p longview --example ask -- runs/debug-haystack \
//!     runs/debug-haystack/data/eval-*/haystack-d2-0.mp4 "What number appears in the video?"
//! ```
//! Arguments: model (run, checkpoint or VILA folder), video, question, and optionally
//! the number of frames to sample uniformly (default 32).

use burn::tensor::Device;
use longview::{Sampling, Vlm};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        eprintln!("usage: ask MODEL_DIR VIDEO QUESTION [FRAMES]");
        std::process::exit(2);
    }
    let frames: usize = match args.get(3) {
        Some(n) => n
            .parse()
            .map_err(|_| format!("FRAMES `{n}` is not a number"))?,
        None => 32,
    };
    let vlm = Vlm::load(&args[0], &Device::flex())?;
    println!("model: {}", vlm.dir().display());
    let video = vlm.embed_video(&args[1], &Sampling::Uniform { count: frames })?;
    println!(
        "video: {} frames embedded, {} visual tokens, pooled vector of {} values",
        video.frames,
        video.tokens.dims()[0] * video.tokens.dims()[1],
        video.pooled.len()
    );
    let answer = vlm.ask(&video, &args[2], 16)?;
    println!("Q: {}\nA: {answer}", args[2]);
    Ok(())
}
