//! Generation on the debug VLM (random weights, CPU): a group of samples over one
//! shared prefill gives what separate runs give, the sampling log-probabilities equal
//! those a training forward recomputes, the decoders never emit the visual
//! placeholder or ids past the tokenizer's vocabulary, and top-p's nucleus equals a
//! full sort's.

use burn::tensor::{Device, Tensor, TensorData};
use longview_infer::generate::{Decoding, GenerateOptions, generate, generate_group};
use longview_infer::prefill::{embed_prompt, prefill};
use longview_models::vila::default_position_ids;
use longview_models::{KvCache, VisualInput, VlmInput};

mod common;
use common::{decodings, host, ids_tensor, model_and_prompt};

#[test]
fn a_group_over_one_prefill_equals_separate_runs() {
    let device = Device::flex();
    let (model, ids, pixels) = model_and_prompt(&device);
    // Stop on a few common ids so that sequences leave the batch at different steps.
    let options = GenerateOptions {
        prefill_chunk: 4,
        ..GenerateOptions::new(12, Decoding::Greedy, vec![0, 1, 2])
    };
    let visual = || VisualInput::Pixels(pixels.clone());
    let group = generate_group(&model, &ids, visual(), &decodings(), &options, &device).unwrap();
    assert_eq!(group.len(), decodings().len());
    let mut lengths = Vec::new();
    for (decoding, got) in decodings().into_iter().zip(&group) {
        let alone = generate(
            &model,
            &ids,
            visual(),
            &GenerateOptions {
                decoding,
                prefill_chunk: 0,
                ..options.clone()
            },
            &device,
        )
        .unwrap();
        assert_eq!(got.tokens, alone, "{decoding:?}");
        assert_eq!(got.logprobs.len(), got.tokens.len());
        lengths.push(got.tokens.len());
    }
    // The samples really differ (else the test shows nothing about batching).
    let distinct: std::collections::HashSet<_> = group.iter().map(|g| g.tokens.clone()).collect();
    assert!(distinct.len() >= 3, "samples {group:?}");
    println!("sample lengths {lengths:?}");
}

#[test]
fn sampling_logprobs_equal_a_recomputed_forward() {
    let device = Device::flex();
    let (model, ids, pixels) = model_and_prompt(&device);
    let options = GenerateOptions::new(10, Decoding::Greedy, vec![]);
    let samples = decodings();
    let visual = VisualInput::Embeddings(model.encode_frames(pixels));
    let group = generate_group(&model, &ids, visual.clone(), &samples, &options, &device).unwrap();
    for (decoding, generation) in samples.iter().zip(&group) {
        let mut full = ids.clone();
        full.extend(&generation.tokens);
        let logits = model
            .forward(VlmInput {
                input_ids: ids_tensor(&full, &device),
                position_ids: default_position_ids(1, full.len(), &device),
                visual: visual.clone(),
            })
            .unwrap();
        // Generation never emits the visual placeholder: its log-probs are over the
        // other tokens (`Vlm::generation_logits`).
        let logits = longview_models::vila::mask_token(logits, model.placeholder_token_id);
        let scaled = logits.div_scalar(decoding.temperature());
        let logp = burn::tensor::activation::log_softmax(scaled, 2);
        let vocab = logp.dims()[2];
        let logp = host(logp);
        for (k, (&token, &sampled)) in generation
            .tokens
            .iter()
            .zip(&generation.logprobs)
            .enumerate()
        {
            let row = ids.len() - 1 + k;
            let recomputed = logp[row * vocab + token as usize];
            let error = (recomputed - sampled).abs() / recomputed.abs().max(1.0);
            assert!(
                error < 1e-5,
                "{decoding:?} token {k}: sampled {sampled} vs recomputed {recomputed}"
            );
        }
    }
}

/// Generation never emits the visual placeholder (a sampled one would be read back as
/// a visual slot by the next forward over prompt + response, as GRPO runs, and fail
/// the placeholder count: seen as a flaky test here): `Vlm::generation_logits` masks
/// its column, the decoders then never pick it, greedy or top-p at p = 1, and the
/// log-probs of the other tokens still sum to 1.
#[test]
fn generation_never_emits_the_visual_placeholder() {
    use longview_infer::generate::{Sampler, log_prob};
    use longview_models::vila::{MASKED_LOGIT, mask_token};
    let device = Device::flex();
    let (model, ids, pixels) = model_and_prompt(&device);
    let placeholder = model.placeholder_token_id;
    // The model's own rows: only the placeholder's column changes.
    let embeds = embed_prompt(&model, &ids, VisualInput::Pixels(pixels), 8, &device).unwrap();
    let hidden = prefill(&model, embeds, 0, &mut KvCache::new(), 0);
    let (plain, masked) = (
        host(model.logits(hidden.clone())),
        host(model.generation_logits(hidden.clone())),
    );
    let vocab = plain.len() / ids.len();
    // The decoders' host rows are masked the same way (the last row of the sequence).
    let rows = longview_infer::generate::next_token_rows(&model, hidden).unwrap();
    assert_eq!(rows, vec![masked[masked.len() - vocab..].to_vec()]);
    for (i, (a, b)) in plain.iter().zip(&masked).enumerate() {
        if i % vocab == placeholder as usize {
            assert_eq!(*b, MASKED_LOGIT);
        } else {
            assert_eq!(a, b);
        }
    }
    // A row where the placeholder would win by far.
    let mut row = vec![0.0f32; vocab];
    row[placeholder as usize] = 50.0;
    row[7] = 1.0;
    let row = Tensor::<3>::from_data(TensorData::new(row, [1, 1, vocab]), &device);
    let row = host(mask_token(row, placeholder));
    assert_eq!(Sampler::new(Decoding::Greedy).pick(&row), 7);
    for seed in 0..200 {
        let mut sampler = Sampler::new(Decoding::TopP {
            top_p: 1.0,
            temperature: 1.3,
            seed,
        });
        for _ in 0..5 {
            assert_ne!(sampler.pick(&row), placeholder, "seed {seed}");
        }
    }
    let total: f64 = (0..vocab as u32)
        .filter(|&t| t != placeholder)
        .map(|t| (log_prob(&row, t, 1.3) as f64).exp())
        .sum();
    assert!((total - 1.0).abs() < 1e-5, "{total}");
}

/// A model whose vocabulary is larger than its tokenizer's (the 1.5B shape run with
/// the embedded tokenizer: GRPO stopped on an id the tokenizer could not decode)
/// never generates the ids past `generation_vocab`: the device logits and the
/// decoders' host rows mask them alike, and many sampled tokens stay below.
#[test]
fn generation_stays_inside_the_tokenizers_vocabulary() {
    use longview_infer::batch::{BatchOptions, BatchRequest, generate_batch};
    use longview_infer::generate::Limits;
    use longview_models::vila::MASKED_LOGIT;
    let device = Device::flex();
    let (mut model, ids, pixels) = model_and_prompt(&device);
    let vocab = model.llm.vocab_size();
    let limit = vocab / 3;
    assert!(model.placeholder_token_id as usize >= limit);
    model.generation_vocab = Some(limit);
    let embeds = embed_prompt(
        &model,
        &ids,
        VisualInput::Pixels(pixels.clone()),
        8,
        &device,
    )
    .unwrap();
    let hidden = prefill(&model, embeds, 0, &mut KvCache::new(), ids.len() - 1);
    let (plain, masked) = (
        host(model.logits(hidden.clone())),
        host(model.generation_logits(hidden.clone())),
    );
    assert_eq!(
        longview_infer::generate::next_token_rows(&model, hidden).unwrap(),
        vec![masked.clone()]
    );
    for (i, (a, b)) in plain.iter().zip(&masked).enumerate() {
        match i >= limit {
            true => assert_eq!(*b, MASKED_LOGIT, "id {i}"),
            false => assert_eq!(a, b, "id {i}"),
        }
    }
    // Hot sampling on the one-device and the batched decoders.
    let hot = |seed| Decoding::TopP {
        top_p: 1.0,
        temperature: 1.5,
        seed,
    };
    let samples: Vec<Decoding> = (0..6).map(hot).collect();
    let options = GenerateOptions::new(12, Decoding::Greedy, vec![]);
    let group = generate_group(
        &model,
        &ids,
        VisualInput::Pixels(pixels.clone()),
        &samples,
        &options,
        &device,
    )
    .unwrap();
    let batch = generate_batch(
        &model,
        vec![BatchRequest {
            prompt: ids.clone(),
            visual: VisualInput::Pixels(pixels),
            samples,
            limits: Limits {
                max_new_tokens: 12,
                stop: vec![],
            },
        }],
        &BatchOptions::default(),
        &device,
    )
    .unwrap();
    let tokens: Vec<u32> = group
        .iter()
        .chain(&batch[0])
        .flat_map(|g| g.tokens.clone())
        .collect();
    assert_eq!(tokens.len(), 12 * 12);
    assert!(
        tokens.iter().all(|&t| (t as usize) < limit),
        "{tokens:?} has ids at or past {limit}"
    );
}

/// The nucleus as a full sort computes it: every token ordered by probability (ties
/// to the lower id), kept until the mass reaches `top_p`, renormalised.
fn nucleus_by_full_sort(logits: &[f32], top_p: f64, temperature: f64) -> Vec<(u32, f64)> {
    let max = logits
        .iter()
        .copied()
        .filter(|x| !x.is_nan())
        .fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            let p = if x.is_nan() {
                0.0
            } else {
                ((x as f64 - max) / temperature).exp()
            };
            (i as u32, p)
        })
        .collect();
    let total: f64 = probs.iter().map(|(_, p)| p).sum();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let (mut kept, mut mass) = (Vec::new(), 0.0);
    for (id, p) in probs {
        if p == 0.0 {
            break;
        }
        kept.push((id, p / total));
        mass += p / total;
        if mass >= top_p {
            break;
        }
    }
    kept.iter().map(|&(id, p)| (id, p / mass)).collect()
}

/// The partial-selection nucleus equals the full sort's exactly (same tokens, same
/// order, same probabilities) on flat, peaked, tied, masked and NaN-holding rows.
#[test]
fn the_nucleus_equals_a_full_sort() {
    use longview_infer::generate::nucleus;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut uniform = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let vocab = 5_000;
    let mut rows: Vec<Vec<f32>> = Vec::new();
    rows.push((0..vocab).map(|_| uniform() as f32).collect());
    rows.push(
        (0..vocab)
            .map(|_| (uniform().powi(3) * 30.0) as f32)
            .collect(),
    );
    // Many exact ties (ids decide), a masked tail and a masked placeholder.
    rows.push(
        (0..vocab)
            .map(|i| match i {
                7 => longview_models::vila::MASKED_LOGIT,
                i if i >= 4_000 => longview_models::vila::MASKED_LOGIT,
                i => (i % 5) as f32,
            })
            .collect(),
    );
    let mut with_nan: Vec<f32> = (0..vocab).map(|_| (uniform() * 4.0) as f32).collect();
    with_nan[3] = f32::NAN;
    with_nan[900] = f32::NAN;
    rows.push(with_nan);
    rows.push(vec![1.0; 3]);
    for row in &rows {
        for top_p in [0.01, 0.3, 0.9, 0.99, 1.0] {
            for temperature in [0.5, 1.0, 2.0] {
                assert_eq!(
                    nucleus(row, top_p, temperature),
                    nucleus_by_full_sort(row, top_p, temperature),
                    "top_p {top_p}, temperature {temperature}, row of {}",
                    row.len()
                );
            }
        }
    }
}

/// Rows sampled together (on threads: the vocabulary is past the threaded size) give
/// each sequence exactly what it gets decoded alone: same tokens, log-probs, stops.
/// The "model" is a hash of the sequence's last token and its length, so the logits
/// depend only on the sequence's own history.
#[test]
fn threaded_sampling_equals_one_sequence_at_a_time() {
    use longview_infer::generate::{Limits, decode_rows};
    let vocab = 40_000;
    let logits = |token: i64, len: usize| -> Vec<f32> {
        (0..vocab)
            .map(|i| {
                let h = longview_infer::sample::mix(token as u64 ^ (len as u64) << 32, i as u64);
                // Flat rows with a few peaks: the nucleus keeps many tokens.
                ((h >> 40) as f32 / (1u64 << 24) as f32)
                    * if h.is_multiple_of(97) { 6.0 } else { 1.0 }
            })
            .collect()
    };
    let samples: Vec<Decoding> = (0..5)
        .map(|seed| Decoding::TopP {
            top_p: if seed == 3 { 0.5 } else { 0.99 },
            temperature: 1.0 + seed as f64 * 0.1,
            seed,
        })
        .collect();
    // Sequence 2 stops early on any token below 400; the others run to their limits.
    let limits: Vec<Limits> = (0..5)
        .map(|i| Limits {
            max_new_tokens: 6 + i,
            stop: if i == 2 {
                (0..400).collect()
            } else {
                Vec::new()
            },
        })
        .collect();
    let run = |which: &[usize]| {
        let mut lens: Vec<usize> = vec![0; which.len()];
        let mut seqs: Vec<usize> = (0..which.len()).collect();
        decode_rows(
            which.iter().map(|_| logits(-1, 0)).collect(),
            &which.iter().map(|&i| samples[i]).collect::<Vec<_>>(),
            &which.iter().map(|&i| limits[i].clone()).collect::<Vec<_>>(),
            |tokens, kept| {
                seqs = kept.iter().map(|&r| seqs[r]).collect();
                Ok(tokens
                    .iter()
                    .zip(&seqs)
                    .map(|(&t, &s)| {
                        lens[s] += 1;
                        logits(t, lens[s])
                    })
                    .collect())
            },
        )
        .unwrap()
    };
    let together = run(&[0, 1, 2, 3, 4]);
    for (i, grouped) in together.iter().enumerate() {
        let alone = run(&[i]).remove(0);
        assert_eq!(grouped.tokens, alone.tokens, "tokens of sequence {i}");
        assert_eq!(
            grouped.logprobs, alone.logprobs,
            "log-probs of sequence {i}"
        );
        assert_eq!(grouped.stopped, alone.stopped, "stop of sequence {i}");
    }
    assert!(together.iter().map(|g| g.tokens.len()).sum::<usize>() > 20);
}
