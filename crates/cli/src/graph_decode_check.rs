//! `longview infer-bench --check-graph-decode`: the decoding steps captured as a
//! device graph (`longview_infer::graph_decode`) against the eager steps
//! (`generate::decode_step`: the cache appended by Burn's ops, the flash attention's
//! own decode kernels) on the same prompt and the same tokens, every step's logits
//! compared. The CUDA counterpart of the wgpu test in `tests/flash_model.rs`, which
//! cannot show that a CUDA graph captures and replays the step.

use anyhow::{Result, bail};
use burn::tensor::{DType, Device, Tensor};
use longview_infer::generate::{decode_step, prefill_prompt};
use longview_infer::graph_decode::GraphDecoder;
use longview_infer::prefill::encode_in_batches;
use longview_infer::shared_prefix::SharedPrefixBatch;
use longview_models::vila::MASKED_LOGIT;
use longview_models::{KvCache, VisualInput, Vlm};

use crate::infer_bench::InferBenchArgs;

/// Largest difference allowed between the two paths' logits, relative to the largest
/// logit: f32, and 16-bit activations (two attention kernels that round differently;
/// on the 1.5B shape with random weights consecutive steps' logits differ by about
/// as much, so only f32 or an eager run on the same kernel
/// (`LONGVIEW_DECODE_TENSOR_CORES=0`) tells a wrong key count apart).
fn tolerance(dtype: DType) -> f32 {
    if dtype == DType::F32 { 1e-4 } else { 3e-2 }
}

/// `worst` and step `step`'s largest error over its rows (printed), NaN once any is.
fn worse(worst: f32, step: usize, got: &[Vec<f32>], want: &[Vec<f32>]) -> f32 {
    let error = got
        .iter()
        .zip(want)
        .map(|(g, w)| relative_error(g, w))
        .fold(0f32, |m, e| {
            if m.is_nan() || e.is_nan() {
                f32::NAN
            } else {
                m.max(e)
            }
        });
    println!("step {step}: relative error {error:.2e}");
    if worst.is_nan() || error.is_nan() {
        f32::NAN
    } else {
        worst.max(error)
    }
}

/// `samples` rows over one prompt's `cache` as a GRPO rollout decodes them
/// (`SharedPrefixBatch`), eager and captured, fed the same tokens (each row its
/// eager logits' argmax, the rows started on different tokens): the worst relative
/// error of the captured steps' logits.
fn check_group(
    model: &Vlm,
    prompt: usize,
    cache: KvCache,
    first: &[f32],
    samples: usize,
    steps: usize,
    device: &Device,
) -> Result<f32> {
    let layers = model.text_layers().len();
    let batch = |cache| {
        SharedPrefixBatch::new(
            vec![(cache, samples)],
            layers,
            vec![prompt; samples],
            steps + 1,
        )
    };
    // The captured steps write only each row's own buffers: the prompt's stay shared.
    let mut eager = batch(cache.clone());
    let mut decoder = batch(cache).into_graph(model, device)?;
    let vocab = first.len() as i64;
    let rows: Vec<usize> = (0..samples).collect();
    let mut tokens: Vec<i64> = rows
        .iter()
        .map(|&r| (argmax(first) + 7 * r as i64) % vocab)
        .collect();
    let mut worst = 0f32;
    for step in 0..steps {
        let want = eager.step(model, &tokens, device)?;
        let got = decoder.step(&tokens, &rows)?;
        worst = worse(worst, step, &got, &want);
        tokens = want.iter().map(|row| argmax(row)).collect();
    }
    Ok(worst)
}

/// The largest `|a - b|` over the logits generation can pick, relative to the largest
/// `|b|` there.
fn relative_error(got: &[f32], want: &[f32]) -> f32 {
    let open = || {
        got.iter()
            .zip(want)
            .filter(|&(_, &b)| b > MASKED_LOGIT / 2.0)
    };
    let scale = open().fold(1e-6f32, |m, (_, b)| m.max(b.abs()));
    open().map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / scale
}

fn argmax(row: &[f32]) -> i64 {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best as i64
}

pub fn run(
    model: &Vlm,
    ids: &[u32],
    pixels: Tensor<4>,
    args: &InferBenchArgs,
    device: &Device,
) -> Result<()> {
    if !model.counted_decoding_applies(device) {
        bail!(
            "--check-graph-decode: graph decoding does not apply here (it needs the flash kernels on a CUDA or wgpu device)"
        );
    }
    let tolerance = tolerance(model.llm.model.embed_tokens.weight.val().dtype());
    let visual = encode_in_batches(model, pixels, args.frame_batch);
    let steps = args.new_tokens;
    let room = ids.len() + steps;
    let prefilled = || {
        let embeddings = VisualInput::Embeddings(visual.clone());
        prefill_prompt(model, ids, embeddings, args.prefill_chunk, room, device)
    };
    if args.samples > 1 {
        let (cache, first) = prefilled()?;
        let worst = check_group(model, ids.len(), cache, &first, args.samples, steps, device)?;
        println!(
            "graph decode check, a group of {} over a shared prefix ({} tokens of prompt, \
             {steps} steps): worst relative error {worst:.2e} (tolerance {tolerance:.0e})",
            args.samples,
            ids.len()
        );
        if worst.is_nan() || worst > tolerance {
            bail!("graph decode check failed: relative error {worst:.2e} above {tolerance:.0e}");
        }
        return Ok(());
    }
    // The eager steps first, greedy; the graph then decodes the same tokens.
    let (mut cache, first) = prefilled()?;
    let (mut tokens, mut want) = (Vec::new(), Vec::new());
    let mut token = argmax(&first);
    for _ in 0..steps {
        tokens.push(token);
        let row = decode_step(model, &mut cache, &[token], device)?.remove(0);
        token = argmax(&row);
        want.push(row);
    }
    drop(cache);
    let (cache, _) = prefilled()?;
    let mut decoder = GraphDecoder::new(model, cache, room, device)?;
    let mut worst = 0f32;
    for (step, (&token, want)) in tokens.iter().zip(&want).enumerate() {
        let got = decoder.step(&[token], &[0])?.remove(0);
        worst = worse(worst, step, &[got], std::slice::from_ref(want));
    }
    // What a wrong answer looks like here: consecutive eager steps against each other.
    let apart = want
        .windows(2)
        .map(|w| relative_error(&w[1], &w[0]))
        .fold(f32::INFINITY, f32::min);
    println!(
        "graph decode check ({} tokens of prompt, {steps} steps, the graph {}): worst relative \
         error {worst:.2e} (tolerance {tolerance:.0e}); consecutive steps' logits differ by at \
         least {apart:.2e}",
        ids.len(),
        if decoder.is_captured() {
            "captured on the device"
        } else {
            "re-run at each step: this backend cannot capture"
        }
    );
    if worst.is_nan() || worst > tolerance {
        bail!("graph decode check failed: relative error {worst:.2e} above {tolerance:.0e}");
    }
    Ok(())
}
