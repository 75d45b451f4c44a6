//! `longview infer-bench`: the inference engine's phases timed on generated frames for a
//! named model size: vision encoding (SigLIP + projector, `--frame-batch` frames at a
//! time), prefill (the prompt through the LLM in chunks of `--prefill-chunk` rows, time
//! to the first token's logits), greedy decoding of `--new-tokens` tokens, and the
//! allocator's reservation (decode tokens/s counts every generated token; the first
//! comes from the prefill's logits). Every phase ends with a device synchronisation;
//! the model
//! is random (the 1.5B/7B shapes use Qwen2's initialisation). Frames are generated
//! pixels, not decoded video (FFmpeg decoding is measured in
//! `benchmarks/video_sampling.md`).

use std::time::Instant;

use anyhow::{Result, bail};
use burn::module::Module;
use burn::tensor::Device;
use clap::Args;
use serde_json::json;

use crate::demo::named_config;
use crate::ranks::Ranks;
use crate::{DeviceArgs, synthetic};
use longview_infer::generate::{
    Decoding, GenerateOptions, decode_group, decode_logits, next_token_rows, next_token_rows_of,
};
use longview_infer::graph_decode::{GraphDecoder, graph_decoding};
use longview_infer::prefill::{
    DEFAULT_CHUNK, DEFAULT_FRAME_BATCH, embed_prompt, encode_in_batches, prefill,
};
use longview_infer::shared_prefix::SharedPrefixBatch;
use longview_models::attention::{AttentionImpl, flash_available};
use longview_models::{KvCache, VisualInput};

#[derive(Args, Debug)]
pub struct InferBenchArgs {
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Model size: debug, small, 1.5b or 7b.
    #[arg(long, default_value = "debug")]
    pub size: String,
    /// Frames of the video (each adds tokens_per_frame + 1 prompt tokens).
    #[arg(long, default_value_t = 8)]
    pub frames: usize,
    /// Text tokens of the prompt besides the visual ones.
    #[arg(long, default_value_t = 32)]
    pub text_tokens: usize,
    /// Tokens generated greedily after the prompt.
    #[arg(long, default_value_t = 32)]
    pub new_tokens: usize,
    /// Prompt rows per prefill pass (0: the whole prompt in one pass).
    #[arg(long, default_value_t = DEFAULT_CHUNK)]
    pub prefill_chunk: usize,
    /// Frames per vision-encoder batch.
    #[arg(long, default_value_t = DEFAULT_FRAME_BATCH)]
    pub frame_batch: usize,
    /// Also append the result as one JSON line to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// Token budget: each frame's projector tokens average-pooled to S x S.
    #[arg(long, value_name = "S")]
    pub token_pool: Option<usize>,
    /// Token budget over time: every K consecutive frames' tokens averaged into one
    /// frame's worth (--frames must be a multiple of K).
    #[arg(long, value_name = "K")]
    pub temporal_pool: Option<usize>,
    /// On this many sequence-parallel ranks: frames encoded in shares and gathered,
    /// the prompt prefilled with --sp-scheme attention, the answer decoded against
    /// the KV cache sharded over the ranks. In-process ranks (CPU threads), or on GPUs
    /// one process per rank over NCCL: `--nproc SP --device cuda --parallel SP` (a
    /// build with the `nccl` feature).
    #[arg(long, default_value_t = 1, value_name = "SP")]
    pub parallel: usize,
    /// Start N processes on this machine, one per GPU, each running this command
    /// without `--nproc` as one rank over NCCL; N must equal --parallel.
    #[arg(long, value_name = "N")]
    pub nproc: Option<usize>,
    /// Runs of the whole request (single device): each is reported. The first
    /// includes compiling the kernels and tuning cuBLASLt for new shapes; the
    /// following ones are warm.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub runs: usize,
    /// With --parallel: the prefill's attention: `ring` (zigzag), `ulysses` or `2d:U`.
    #[arg(long, default_value = "ring", value_name = "SCHEME")]
    pub sp_scheme: longview_parallel::inference::SpScheme,
    /// Sample this many answers over the one prefill, decoded as one batch with GRPO's
    /// sampling (top-p 0.99, temperature 1.0, a seed each) over the prompt's cache held
    /// once, as a GRPO rollout does (single device); decode tok/s then counts every
    /// sample's tokens. 1: greedy.
    #[arg(long, default_value_t = 1, value_name = "G")]
    pub samples: usize,
    /// Instead of timing: decode --new-tokens steps both as captured device graphs
    /// and eagerly from the same prompt and tokens, and fail when their logits differ
    /// by more than bf16 allows (single device, flash kernels).
    #[arg(long)]
    pub check_graph_decode: bool,
}

/// One run's phases: what the table row and the JSON line report.
pub struct Measured {
    pub prompt: usize,
    pub encode_s: f64,
    pub prefill_s: f64,
    pub decode_s: f64,
    pub decoded: usize,
    pub reserved: Option<u64>,
    /// Single device: whether the steps were captured, and for one greedy row where
    /// its decoding time went (`queue_s` 0 for groups); `None` sequence-parallel.
    pub decode_split: Option<DecodeSplit>,
}

/// A greedy decode's seconds, summed over its steps: queueing each step's operations
/// (embedding, text layers, LM head: what the host does before anything waits for
/// the device), then waiting for and reading the logits back; the rest of `decode_s`
/// is the host's sampling between steps (the tokens' log-probs are computed while
/// the next step runs). When queueing takes most of a
/// step, the device runs behind the host: the step is bound by the host's work per
/// operation, not by the device's.
/// With `graph`, the steps were captured once as a device graph and replayed
/// (`longview_infer::graph_decode`): queueing is then writing the step's inputs and
/// one replay, and `capture_s` (in `queue_s`) the first step's capture.
#[derive(Clone, Copy, Default)]
pub struct DecodeSplit {
    pub queue_s: f64,
    pub read_s: f64,
    pub graph: bool,
    pub capture_s: f64,
}

pub fn run(args: InferBenchArgs) -> Result<()> {
    if crate::ranks::launch_here(args.nproc)? {
        return Ok(());
    }
    if args.new_tokens == 0
        || args.frames == 0
        || args.parallel == 0
        || args.runs == 0
        || args.samples == 0
    {
        bail!("--frames, --new-tokens, --parallel, --runs and --samples must be at least 1");
    }
    if args.samples > 1 && args.parallel > 1 {
        bail!(
            "--samples {} with --parallel {}: sampled groups are timed on one device only",
            args.samples,
            args.parallel
        );
    }
    if args.runs > 1 && args.parallel > 1 {
        bail!(
            "--runs {} with --parallel {}: repeated runs are single-device only",
            args.runs,
            args.parallel
        );
    }
    let mut config = named_config(&args.size)?;
    config.projector.token_pool = args.token_pool;
    config.projector.temporal_pool = args.temporal_pool;
    let ranks = Ranks::resolve(args.parallel, &format!("--parallel {}", args.parallel))?;
    // Inference keeps no autodiff graph.
    let device: Device = match &ranks {
        Ranks::Process(env) => args.device.for_local_rank(env)?,
        Ranks::InProcess { .. } => args.device.device()?,
    }
    .without_autodiff();
    let attention = if flash_available(&device) {
        AttentionImpl::Flash
    } else {
        AttentionImpl::Reference
    };
    config.vision.attention = attention;
    config.text.attention = attention;
    if args.parallel > 1 || ranks.process_rank().is_some() {
        if let Ranks::InProcess { .. } = ranks
            && args.device.device != "cpu"
        {
            bail!(
                "--parallel on `{}`: in-process ranks run on the CPU; for GPUs start one \
                 process per rank: `longview infer-bench --nproc {p} --device cuda --parallel \
                 {p}` (a build with --features nccl)",
                args.device.device,
                p = args.parallel
            );
        }
        if let Some((measured, extra)) = crate::infer_bench_sp::run(&args, &config, &ranks)? {
            report(&args, attention, &measured, extra)?;
        }
        return Ok(());
    }
    let model = config.init(&device);
    crate::check_cpu_memory(&args.device, model.num_params(), 1)?;
    let sample = synthetic::batch(
        &config,
        1,
        args.frames,
        args.text_tokens,
        0,
        args.device.seed(),
        &device,
    )?;
    let ids: Vec<u32> = sample
        .input
        .input_ids
        .clone()
        .into_data()
        .convert::<i64>()
        .try_into_vec::<i64>()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?
        .into_iter()
        .map(|t| t as u32)
        .collect();
    let VisualInput::Pixels(pixels) = sample.input.visual else {
        bail!("the generated prompt has no frames");
    };
    if args.check_graph_decode {
        return crate::graph_decode_check::run(&model, &ids, pixels, &args, &device);
    }
    for run in 1..=args.runs {
        let measured = measure(&model, &ids, pixels.clone(), &args, &device)?;
        let extra = if args.runs > 1 {
            json!({"run": run, "runs": args.runs})
        } else {
            json!({})
        };
        if args.runs > 1 {
            println!(
                "run {run} of {}{}",
                args.runs,
                if run == 1 {
                    " (cold: kernel compilation and GEMM tuning included)"
                } else {
                    " (warm)"
                }
            );
        }
        report(&args, attention, &measured, extra)?;
    }
    Ok(())
}

/// One request's phases on one device: encode, prefill, greedy decode.
fn measure(
    model: &longview_models::Vlm,
    ids: &[u32],
    pixels: burn::tensor::Tensor<4>,
    args: &InferBenchArgs,
    device: &Device,
) -> Result<Measured> {
    let sync = || {
        device
            .sync()
            .map_err(|e| anyhow::anyhow!("device sync failed: {e:?}"))
    };
    sync()?;

    let start = Instant::now();
    let visual = encode_in_batches(model, pixels, args.frame_batch);
    sync()?;
    let encode_s = start.elapsed().as_secs_f64();

    // Refused with the numbers when the KV cache and a prefill chunk would not fit.
    longview_infer::prefill::check_request_fits(
        model,
        (ids.len(), args.new_tokens, args.samples),
        args.prefill_chunk,
        None,
        device,
    )?;

    let start = Instant::now();
    let embeds = embed_prompt(
        model,
        ids,
        VisualInput::Embeddings(visual),
        args.frame_batch,
        device,
    )?;
    let mut cache = KvCache::new();
    // One sample appends its answer to this cache; several keep theirs apart.
    let answer_room = if args.samples == 1 {
        args.new_tokens
    } else {
        0
    };
    cache.reserve(ids.len() + answer_room);
    let last = prefill(model, embeds, args.prefill_chunk, &mut cache, ids.len() - 1);
    let first = next_token_rows(model, last)?.remove(0);
    let prefill_s = start.elapsed().as_secs_f64();

    let samples: Vec<Decoding> = match args.samples {
        1 => vec![Decoding::Greedy],
        g => (0..g as u64)
            .map(|seed| Decoding::TopP {
                top_p: 0.99,
                temperature: 1.0,
                seed,
            })
            .collect(),
    };
    let options = GenerateOptions::new(args.new_tokens, Decoding::Greedy, Vec::new());
    let mut decode_split = DecodeSplit::default();
    let start = Instant::now();
    let generated = if samples.len() > 1 {
        // As a GRPO rollout decodes: the prompt's cache held once for all samples.
        let g = samples.len();
        let layers = model.text_layers().len();
        let mut batch = SharedPrefixBatch::new(
            vec![(cache, g)],
            layers,
            vec![ids.len(); g],
            args.new_tokens,
        );
        if graph_decoding(model, device) {
            let mut decoder = batch.into_graph(model, device)?;
            let generated = decode_group(first, &samples, &options, |tokens, kept| {
                decoder.step(tokens, kept)
            })?;
            decode_split.graph = decoder.is_captured();
            decode_split.capture_s = decoder.capture_seconds();
            generated
        } else {
            decode_group(first, &samples, &options, |tokens, kept| {
                if kept.len() != batch.rows() {
                    batch.select(kept, device);
                }
                batch.step(model, tokens, device)
            })?
        }
    } else if graph_decoding(model, device) {
        let mut decoder = GraphDecoder::new(model, cache, ids.len() + args.new_tokens, device)?;
        let split = &mut decode_split;
        let generated = decode_group(first, &samples, &options, |tokens, kept| {
            let start = Instant::now();
            let logits = decoder.queue(tokens, kept)?;
            let queued = start.elapsed().as_secs_f64();
            let rows = decoder.rows_of(logits);
            split.queue_s += queued;
            split.read_s += start.elapsed().as_secs_f64() - queued;
            rows
        })?;
        split.graph = decoder.is_captured();
        split.capture_s = decoder.capture_seconds();
        generated
    } else {
        let split = &mut decode_split;
        decode_group(first, &samples, &options, |tokens, _| {
            let start = Instant::now();
            let logits = decode_logits(model, &mut cache, tokens, device);
            let queued = start.elapsed().as_secs_f64();
            let rows = next_token_rows_of(model, logits);
            split.queue_s += queued;
            split.read_s += start.elapsed().as_secs_f64() - queued;
            rows
        })?
    };
    sync()?;
    let decode_s = start.elapsed().as_secs_f64();
    Ok(Measured {
        prompt: ids.len(),
        encode_s,
        prefill_s,
        decode_s,
        decoded: generated.iter().map(|g| g.tokens.len()).sum(),
        reserved: device.memory_pool_usage().map(|m| m.bytes_reserved),
        decode_split: Some(decode_split),
    })
}

/// Prints the table row and appends the JSON line (`extra` merged into it).
fn report(
    args: &InferBenchArgs,
    attention: AttentionImpl,
    m: &Measured,
    extra: serde_json::Value,
) -> Result<()> {
    println!(
        "| size | device | dtype | ranks | frames | prompt tokens | encode s | prefill s (TTFT) | prefill tok/s | decode tok/s | reserved |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {} | {} | {} | {} | {} | {} | {:.3} | {:.3} | {:.0} | {:.1} | {} |",
        args.size,
        args.device.device,
        args.device.dtype,
        args.parallel,
        args.frames,
        m.prompt,
        m.encode_s,
        m.prefill_s,
        m.prompt as f64 / m.prefill_s,
        m.decoded as f64 / m.decode_s,
        m.reserved.map_or("n/a".into(), |b| format!(
            "{:.1} GiB",
            b as f64 / (1u64 << 30) as f64
        )),
    );
    // Steps after the first token (the first comes with the prefill).
    let steps = m.decoded.saturating_sub(1).max(1) as f64;
    if let Some(split) = m.decode_split {
        // Only one greedy row's decode is split (queue_s > 0).
        if split.queue_s > 0.0 {
            println!(
                "decode per step: {:.2} ms queueing its operations, {:.2} ms waiting for and \
                 reading the logits, {:.2} ms sampling on the host",
                1e3 * split.queue_s / steps,
                1e3 * split.read_s / steps,
                1e3 * (m.decode_s - split.queue_s - split.read_s) / steps,
            );
        }
        if split.graph {
            println!(
                "decode steps replayed as one device graph (captured in {:.1} ms, counted in the \
                 decode rate)",
                1e3 * split.capture_s
            );
        }
    }
    if let Some(path) = &args.json {
        let mut line = json!({
            "size": args.size, "device": args.device.device, "dtype": args.device.dtype,
            "attention": format!("{attention:?}"), "frames": args.frames,
            "token_pool": args.token_pool, "temporal_pool": args.temporal_pool,
            "prompt_tokens": m.prompt, "prefill_chunk": args.prefill_chunk,
            "frame_batch": args.frame_batch, "encode_s": m.encode_s, "prefill_s": m.prefill_s,
            "prefill_tokens_per_s": m.prompt as f64 / m.prefill_s,
            "samples": args.samples, "decoded_tokens": m.decoded, "decode_s": m.decode_s,
            "decode_tokens_per_s": m.decoded as f64 / m.decode_s,
            "reserved_bytes": m.reserved,
        });
        if let (Some(line), Some(split)) = (line.as_object_mut(), m.decode_split) {
            if split.queue_s > 0.0 {
                line.insert("decode_queue_s".into(), json!(split.queue_s));
                line.insert("decode_read_s".into(), json!(split.read_s));
            }
            line.insert("decode_graph".into(), json!(split.graph));
            line.insert("decode_capture_s".into(), json!(split.capture_s));
        }
        if let (Some(line), Some(extra)) = (line.as_object_mut(), extra.as_object()) {
            line.extend(extra.clone());
        }
        crate::device::append_json_lines(path, &[line])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{InferBenchArgs, run};
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: InferBenchArgs,
    }

    /// A greedy run's JSON line says where its decoding time went: queueing and
    /// reading back within the decode's wall time, one line per run.
    #[test]
    fn greedy_runs_report_the_decode_split() {
        let path = std::env::temp_dir().join(format!("infer_bench_{}.jsonl", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let cli = Cli::parse_from([
            "infer-bench",
            "--frames",
            "2",
            "--new-tokens",
            "4",
            "--runs",
            "2",
            "--json",
            path.to_str().unwrap(),
        ]);
        run(cli.args).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        for line in lines {
            let at = |key: &str| {
                line[key]
                    .as_f64()
                    .unwrap_or_else(|| panic!("{key}: {line}"))
            };
            let (queue, read, total) = (at("decode_queue_s"), at("decode_read_s"), at("decode_s"));
            assert!(queue > 0.0 && read >= 0.0, "{line}");
            assert!(queue + read <= total, "{line}");
        }
    }
}
