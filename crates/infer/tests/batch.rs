//! Batched generation over different prompts on the debug VLM (random weights, CPU):
//! every prompt's samples decoded in one batch, each prompt's KV cache shared by its
//! samples, give what each prompt's group decoded alone gives.

use burn::tensor::Device;
use longview_infer::generate::{Decoding, GenerateOptions, generate_group};
use longview_models::{VisualInput, Vlm};

mod common;
use common::{decodings, model_and_prompt, worst_error};

#[test]
fn different_prompts_in_one_batch_equal_their_separate_runs() {
    use longview_infer::batch::{BatchOptions, BatchRequest, generate_batch};
    use longview_infer::generate::Limits;
    let device = Device::flex();
    let (model, video_prompt, pixels) = model_and_prompt(&device);
    // Three prompts of different lengths (the video one is the longest, a text-only
    // one of 4 tokens), each with its own samples, stop tokens and length limit.
    let text_prompt: Vec<u32> = vec![9, 33, 4, 60];
    let mid_prompt: Vec<u32> = (0..11).map(|i| 20 + 3 * i).collect();
    let all = decodings();
    let cases: Vec<(Vec<u32>, bool, Vec<Decoding>, Limits)> = vec![
        (
            video_prompt.clone(),
            true,
            all[..3].to_vec(),
            Limits {
                max_new_tokens: 12,
                stop: vec![0, 1, 2],
            },
        ),
        (
            text_prompt,
            false,
            vec![all[0], all[3]],
            Limits {
                max_new_tokens: 7,
                stop: vec![],
            },
        ),
        (
            mid_prompt,
            false,
            vec![all[4], all[1]],
            Limits {
                max_new_tokens: 10,
                stop: vec![5, 6, 7, 8],
            },
        ),
    ];
    let visual = |video: bool| match video {
        true => VisualInput::Pixels(pixels.clone()),
        false => VisualInput::None,
    };
    let options = BatchOptions {
        prefill_chunk: 5,
        memory_budget: None,
    };
    let batch_cases: Vec<BatchCase> = cases
        .iter()
        .map(|(prompt, video, samples, limits)| {
            (
                prompt.clone(),
                visual(*video),
                samples.clone(),
                limits.clone(),
            )
        })
        .collect();
    let lengths = batch_equals_separate_runs(&model, batch_cases, &options, &device);
    // Sequences leave the batch at different steps (else ragged decoding is untested).
    let distinct: std::collections::HashSet<_> = lengths.iter().collect();
    assert!(distinct.len() >= 3, "lengths {lengths:?}");
    println!("lengths {lengths:?}");

    // A request without samples gets none, an empty batch nothing, an empty prompt a
    // clear error naming the request.
    let request = |prompt: Vec<u32>, samples: Vec<Decoding>| BatchRequest {
        prompt,
        visual: VisualInput::None,
        samples,
        limits: Limits {
            max_new_tokens: 3,
            stop: vec![],
        },
    };
    let out = generate_batch(
        &model,
        vec![
            request(vec![4, 5], vec![]),
            request(vec![6], vec![Decoding::Greedy]),
        ],
        &options,
        &device,
    )
    .unwrap();
    assert_eq!(out[0].len(), 0);
    assert_eq!(out[1][0].tokens.len(), 3);
    assert!(
        generate_batch(&model, Vec::new(), &options, &device)
            .unwrap()
            .is_empty()
    );
    let error = generate_batch(
        &model,
        vec![
            request(vec![4], vec![Decoding::Greedy]),
            request(vec![], vec![Decoding::Greedy]),
        ],
        &options,
        &device,
    )
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("request 1") && error.contains("empty prompt"),
        "{error}"
    );
}

/// Two requests on one prompt (GRPO's rollouts: each prompt's samples), rows leaving
/// the batch at different steps and selected out of the decoded keys' buffers: still
/// the separate runs' tokens, and log-probs within 1e-5.
#[test]
fn one_prompts_samples_in_a_batch_equal_their_separate_runs() {
    use longview_infer::batch::BatchOptions;
    use longview_infer::generate::Limits;
    let device = Device::flex();
    let (model, prompt, pixels) = model_and_prompt(&device);
    let all = decodings();
    // No stop tokens: the second request's rows leave the batch after 4 tokens, the
    // first's after 9, whatever the random weights.
    let cases = [(all[..3].to_vec(), 9), (all[3..].to_vec(), 4)]
        .into_iter()
        .map(|(samples, max_new_tokens)| {
            let visual = VisualInput::Pixels(pixels.clone());
            let limits = Limits {
                max_new_tokens,
                stop: vec![],
            };
            (prompt.clone(), visual, samples, limits)
        })
        .collect();
    let options = BatchOptions {
        prefill_chunk: 4,
        memory_budget: None,
    };
    let lengths = batch_equals_separate_runs(&model, cases, &options, &device);
    // Rows left the batch at different steps (selected out of the buffers).
    assert_eq!(lengths, [9, 9, 9, 4, 4]);
}

/// One batch request: prompt, its visual input, its samples and limits.
type BatchCase = (
    Vec<u32>,
    VisualInput,
    Vec<Decoding>,
    longview_infer::generate::Limits,
);

/// Runs `cases` as one batch and each case alone ([`generate_group`], one-pass
/// prefill): the same tokens and stops, log-probs within 1e-5 (f32; the batch splits
/// each row's attention over its prompt's keys and its own and merges them by LSE,
/// and prefills in chunks: summation order only). Returns every sequence's length.
fn batch_equals_separate_runs(
    model: &Vlm,
    cases: Vec<BatchCase>,
    options: &longview_infer::batch::BatchOptions,
    device: &Device,
) -> Vec<usize> {
    use longview_infer::batch::{BatchRequest, generate_batch};
    let requests = cases
        .iter()
        .map(|(prompt, visual, samples, limits)| BatchRequest {
            prompt: prompt.clone(),
            visual: visual.clone(),
            samples: samples.clone(),
            limits: limits.clone(),
        })
        .collect();
    let batch = generate_batch(model, requests, options, device).unwrap();
    assert_eq!(batch.len(), cases.len());
    let mut lengths = Vec::new();
    for ((prompt, visual, samples, limits), got) in cases.into_iter().zip(&batch) {
        let alone = generate_group(
            model,
            &prompt,
            visual,
            &samples,
            &GenerateOptions {
                prefill_chunk: 0,
                ..GenerateOptions::new(limits.max_new_tokens, Decoding::Greedy, limits.stop.clone())
            },
            device,
        )
        .unwrap();
        assert_eq!(got.len(), samples.len());
        for (g, a) in got.iter().zip(&alone) {
            assert_eq!(g.tokens, a.tokens, "prompt of {} tokens", prompt.len());
            assert_eq!(g.stopped, a.stopped);
            let worst = worst_error(&g.logprobs, &a.logprobs);
            assert!(worst < 1e-5, "log-probs differ by {worst}");
            lengths.push(g.tokens.len());
        }
    }
    lengths
}

/// A batch over its memory budget is refused before anything runs; the budget counts
/// each prompt's cache once, so a group that fits with one copy of its prompt's cache
/// runs although G copies would not fit.
#[test]
fn a_batch_over_its_memory_budget_is_refused_before_running() {
    use longview_infer::batch::{BatchOptions, BatchRequest, generate_batch};
    use longview_infer::generate::Limits;
    use longview_infer::prefill::{estimate, kv_cache_bytes};
    let device = Device::flex();
    let (model, prompt, pixels) = model_and_prompt(&device);
    let samples = decodings();
    let (g, new) = (samples.len(), 3);
    let request = || {
        vec![BatchRequest {
            prompt: prompt.clone(),
            visual: VisualInput::Pixels(pixels.clone()),
            samples: samples.clone(),
            limits: Limits {
                max_new_tokens: new,
                stop: vec![],
            },
        }]
    };
    let shape = model.text_shape();
    let chunk = 4;
    let activations = estimate(&shape, prompt.len(), new, g, chunk, 4).activations;
    let shared = kv_cache_bytes(&shape, prompt.len() + g * new, 4) + activations;
    let repeated = kv_cache_bytes(&shape, g * (prompt.len() + new), 4) + activations;
    let options = |budget: f64| BatchOptions {
        prefill_chunk: chunk,
        memory_budget: Some(budget),
    };
    let error = generate_batch(&model, request(), &options(1000.0), &device)
        .unwrap_err()
        .to_string();
    assert!(error.contains("available"), "{error}");
    let budget = (shared + repeated) / 2.0;
    let out = generate_batch(&model, request(), &options(budget), &device).unwrap();
    assert_eq!(out[0].len(), g);
}

/// A prompt's rows cut into several attention calls over its keys (one row a call,
/// as a group over the decode kernels' 32 rows a kv head is cut on a GPU) decode as
/// the group does in one call: the same tokens, log-probs within 1e-5.
#[test]
fn a_group_cut_into_several_calls_equals_one_call() {
    use longview_infer::generate::{Limits, decode_rows, prefill_prompt};
    use longview_infer::shared_prefix::SharedPrefixBatch;
    let device = Device::flex();
    let (model, prompt, pixels) = model_and_prompt(&device);
    let samples = decodings();
    let limits = vec![
        Limits {
            max_new_tokens: 8,
            stop: vec![0, 1, 2],
        };
        samples.len()
    ];
    let run = |kv_head_rows: Option<usize>| {
        let visual = VisualInput::Pixels(pixels.clone());
        let (cache, first) =
            prefill_prompt(&model, &prompt, visual, 4, prompt.len(), &device).unwrap();
        let layers = model.text_layers().len();
        let positions = vec![prompt.len(); samples.len()];
        let mut batch = SharedPrefixBatch::new(vec![(cache, samples.len())], layers, positions, 8);
        if let Some(rows) = kv_head_rows {
            batch.limit_kv_head_rows(rows);
        }
        let firsts = vec![first; samples.len()];
        decode_rows(firsts, &samples, &limits, |tokens, kept| {
            if kept.len() != batch.rows() {
                batch.select(kept, &device);
            }
            batch.step(&model, tokens, &device)
        })
        .unwrap()
    };
    let whole = run(None);
    // One query row a kv head a call: every sample in a call of its own (the debug
    // model's query heads per kv head are all one row's).
    let cut = run(Some(1));
    for (w, c) in whole.iter().zip(&cut) {
        assert_eq!(w.tokens, c.tokens);
        assert_eq!(w.stopped, c.stopped);
        let worst = worst_error(&c.logprobs, &w.logprobs);
        assert!(worst < 1e-5, "log-probs differ by {worst}");
    }
    assert!(whole.iter().map(|g| g.tokens.len()).sum::<usize>() > samples.len());
}
