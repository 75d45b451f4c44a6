//! Sequence-parallel inference on in-process ranks (CPU) against one device: the
//! prefill's last-row logits agree within float tolerance and greedy (and seeded
//! top-p) generations agree token for token, for 1, 2 and 4 ranks, with GQA (the
//! debug LLM has 4 query heads over 2 kv heads) and prompts whose length zigzag
//! sharding does not divide.

use burn::tensor::{Device, Distribution, Tensor};
use longview_comm::LocalWorld;
use longview_infer::generate::{Decoding, GenerateOptions, generate_group, next_token_rows};
use longview_infer::prefill::{embed_prompt, prefill};
use longview_models::{KvCache, VisualInput, Vlm, VlmConfig};
use longview_parallel::inference::{ShardedCache, SpInference, SpScheme};

fn model_and_prompt(text_after: usize) -> (Vlm, Vec<u32>, Tensor<3>) {
    let device = Device::flex();
    device.seed(21);
    let config = VlmConfig::debug();
    let model = config.init(&device);
    let mut ids: Vec<u32> = vec![5, 17, 3];
    ids.extend(std::iter::repeat_n(
        model.placeholder_token_id,
        2 * config.tokens_per_frame(),
    ));
    ids.extend((0..text_after).map(|i| 20 + i as u32));
    let side = config.vision.image_size;
    let pixels = Tensor::<4>::random([2, 3, side, side], Distribution::Normal(0.0, 1.0), &device);
    let visual = model.encode_frames(pixels);
    (model, ids, visual)
}

fn decodings() -> Vec<Decoding> {
    vec![
        Decoding::Greedy,
        Decoding::TopP {
            top_p: 0.95,
            temperature: 1.0,
            seed: 7,
        },
        Decoding::TopP {
            top_p: 0.9,
            temperature: 0.8,
            seed: 8,
        },
    ]
}

/// Runs `f` on `world` in-process ranks and returns every rank's result.
fn on_ranks<T: Send>(
    world: usize,
    f: impl Fn(SpInference<longview_comm::LocalComm>) -> T + Sync,
) -> Vec<T> {
    let head_dim = VlmConfig::debug().text.head_dim();
    let comms = LocalWorld::communicators(world);
    std::thread::scope(|scope| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                let f = &f;
                scope.spawn(move || f(SpInference::new(comm, head_dim).unwrap()))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// The prompt's embeddings and one device's one-pass logits after its last row.
fn one_device_prefill(model: &Vlm, ids: &[u32], visual: &Tensor<3>) -> (Tensor<3>, Vec<f32>) {
    let device = Device::flex();
    let embeds = embed_prompt(
        model,
        ids,
        VisualInput::Embeddings(visual.clone()),
        8,
        &device,
    )
    .unwrap();
    let mut cache = KvCache::new();
    let last = prefill(model, embeds.clone(), 0, &mut cache, ids.len() - 1);
    (embeds, next_token_rows(model, last).unwrap().remove(0))
}

#[test]
fn sequence_parallel_prefill_gives_the_one_device_logits() {
    for text_after in [4, 9] {
        let (model, ids, visual) = model_and_prompt(text_after);
        let (embeds, expected) = one_device_prefill(&model, &ids, &visual);
        for world in [1, 2, 4] {
            let got = on_ranks(world, |sp| {
                let mut cache = ShardedCache {
                    local: KvCache::new(),
                    counts: vec![0; world],
                };
                let last = sp.prefill(&model, embeds.clone(), &mut cache).unwrap();
                assert_eq!(cache.total(), ids.len());
                // The same from the prompt's ids and visual tokens (what multiple
                // choice asks for).
                let visual = VisualInput::Embeddings(visual.clone());
                let direct = sp.last_logits(&model, &ids, visual, &Device::flex());
                [
                    next_token_rows(&model, last).unwrap().remove(0),
                    direct.unwrap(),
                ]
            });
            for (rank, logits) in got.iter().flatten().enumerate() {
                let worst = logits
                    .iter()
                    .zip(&expected)
                    .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
                    .fold(0.0f32, f32::max);
                assert!(
                    worst < 1e-5,
                    "{world} ranks, result {rank} (2 a rank), prompt {}: worst error {worst}",
                    ids.len()
                );
            }
        }
    }
}

#[test]
fn sequence_parallel_generation_equals_one_device_token_for_token() {
    let (model, ids, visual) = model_and_prompt(6);
    let device = Device::flex();
    let options = GenerateOptions::new(10, Decoding::Greedy, vec![0, 1, 2]);
    let expected = generate_group(
        &model,
        &ids,
        VisualInput::Embeddings(visual.clone()),
        &decodings(),
        &options,
        &device,
    )
    .unwrap();
    for world in [1, 2, 4] {
        let got = on_ranks(world, |sp| {
            sp.generate_group(
                &model,
                &ids,
                VisualInput::Embeddings(visual.clone()),
                &decodings(),
                &options,
                &device,
            )
            .unwrap()
        });
        for (rank, generations) in got.iter().enumerate() {
            for (g, e) in generations.iter().zip(&expected) {
                assert_eq!(g.tokens, e.tokens, "{world} ranks, rank {rank}");
                for (a, b) in g.logprobs.iter().zip(&e.logprobs) {
                    assert!((a - b).abs() < 1e-4, "{world} ranks: log-prob {a} vs {b}");
                }
            }
        }
    }
}

#[test]
fn sequence_parallel_teacher_forced_answers_equal_one_device() {
    use longview_infer::needle::teacher_forced_ids;
    use longview_infer::sample::Sample;
    let device = Device::flex();
    device.seed(5);
    let config = VlmConfig::debug();
    let model = config.init(&device);
    let side = config.vision.image_size;
    let frames = 3;
    let mut ids: Vec<u32> = vec![8, 9];
    ids.extend(std::iter::repeat_n(
        model.placeholder_token_id,
        frames * config.tokens_per_frame(),
    ));
    ids.extend([30, 31, 32, 33, 34, 35, 36]);
    let prompt_len = ids.len() - 4;
    let pixels = Tensor::<4>::random(
        [frames, 3, side, side],
        Distribution::Normal(0.0, 1.0),
        &device,
    );
    let sample = Sample {
        labels: vec![-100; ids.len()],
        ids,
        prompt_len,
        pixels: pixels
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap()
            .into(),
        frames,
        side,
        answer: String::new(),
        depth: 0.0,
    };
    for answer_len in [1, 4] {
        let expected = teacher_forced_ids(&model, &sample, answer_len, 0, &device).unwrap();
        assert_eq!(expected.len(), answer_len);
        for world in [2, 4] {
            let got = on_ranks(world, |sp| {
                sp.teacher_forced_ids(&model, &sample, answer_len, &device)
                    .unwrap()
            });
            for ids in got {
                assert_eq!(ids, expected, "{world} ranks, {answer_len} answer tokens");
            }
        }
    }
}

/// [`on_ranks`] with the prefill's `scheme`.
fn on_ranks_with<T: Send>(
    world: usize,
    scheme: SpScheme,
    f: impl Fn(SpInference<longview_comm::LocalComm>) -> T + Sync,
) -> Vec<T> {
    let text = VlmConfig::debug().text;
    let comms = LocalWorld::communicators(world);
    std::thread::scope(|scope| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                let (f, text) = (&f, &text);
                scope.spawn(move || {
                    f(SpInference::with_scheme(
                        comm,
                        text.head_dim(),
                        text.num_heads,
                        text.num_kv_heads,
                        scheme,
                    )
                    .unwrap())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn ulysses_and_2d_prefills_give_the_one_device_logits_and_generations() {
    // The debug LLM: 4 query heads over 2 kv heads (Ulysses at 4 ranks replicates
    // each kv head twice).
    let (model, ids, visual) = model_and_prompt(9);
    let device = Device::flex();
    let (embeds, expected) = one_device_prefill(&model, &ids, &visual);
    let options = GenerateOptions::new(8, Decoding::Greedy, vec![0, 1, 2]);
    let generations = generate_group(
        &model,
        &ids,
        VisualInput::Embeddings(visual.clone()),
        &decodings(),
        &options,
        &device,
    )
    .unwrap();
    for (world, scheme) in [
        (2, SpScheme::Ulysses),
        (4, SpScheme::Ulysses),
        (4, SpScheme::TwoD { ulysses: 2 }),
    ] {
        let got = on_ranks_with(world, scheme, |sp| {
            let mut cache = ShardedCache {
                local: KvCache::new(),
                counts: vec![0; world],
            };
            let last = sp.prefill(&model, embeds.clone(), &mut cache).unwrap();
            let logits = next_token_rows(&model, last).unwrap().remove(0);
            let generated = sp
                .generate_group(
                    &model,
                    &ids,
                    VisualInput::Embeddings(visual.clone()),
                    &decodings(),
                    &options,
                    &device,
                )
                .unwrap();
            (logits, generated)
        });
        for (rank, (logits, generated)) in got.iter().enumerate() {
            let worst = logits
                .iter()
                .zip(&expected)
                .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
                .fold(0.0f32, f32::max);
            assert!(
                worst < 1e-5,
                "{scheme:?} on {world} ranks, rank {rank}: {worst}"
            );
            for (g, e) in generated.iter().zip(&generations) {
                assert_eq!(
                    g.tokens, e.tokens,
                    "{scheme:?} on {world} ranks, rank {rank}"
                );
            }
        }
    }
}

#[test]
fn a_prefill_scheme_the_heads_do_not_allow_is_refused_with_the_rule() {
    let text = VlmConfig::debug().text;
    for (world, scheme) in [(3, SpScheme::Ulysses), (4, SpScheme::TwoD { ulysses: 3 })] {
        let errors = std::thread::scope(|scope| {
            let handles: Vec<_> = LocalWorld::communicators(world)
                .into_iter()
                .map(|comm| {
                    let text = &text;
                    scope.spawn(move || {
                        SpInference::with_scheme(
                            comm,
                            text.head_dim(),
                            text.num_heads,
                            text.num_kv_heads,
                            scheme,
                        )
                        .err()
                        .map(|e| e.to_string())
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect::<Vec<_>>()
        });
        for error in errors {
            let error = error.expect("refused");
            assert!(
                error.contains("Ulysses") || error.contains("heads") || error.contains("divide"),
                "{scheme:?} on {world} ranks: {error}"
            );
        }
    }
    assert_eq!("2d:2".parse(), Ok(SpScheme::TwoD { ulysses: 2 }));
    assert_eq!("ring".parse(), Ok(SpScheme::ZigzagRing));
    assert!("2d:x".parse::<SpScheme>().unwrap_err().contains("2d:U"));
}

/// Different prompts (lengths 3, 15+ and 20+, two with visual tokens; the shortest
/// lands whole on one rank, so the others hold only padding for it) with their own
/// samples, limits and stop tokens, decoded as one batch over the sharded caches:
/// every sequence equals one device's batched generation token for token, log-probs
/// within 1e-4, on the zigzag ring at 1, 2 and 4 ranks and 2D attention 2x2.
#[test]
fn sequence_parallel_batched_generation_equals_one_device() {
    use longview_infer::batch::{BatchOptions, BatchRequest, generate_batch};
    use longview_infer::generate::Limits;
    let (model, long_ids, visual) = model_and_prompt(9);
    let (_, mid_ids, _) = model_and_prompt(2);
    let device = Device::flex();
    let requests = || {
        let request = |prompt: Vec<u32>, visual: VisualInput, samples, max, stop| BatchRequest {
            prompt,
            visual,
            samples,
            limits: Limits {
                max_new_tokens: max,
                stop,
            },
        };
        vec![
            request(
                long_ids.clone(),
                VisualInput::Embeddings(visual.clone()),
                decodings(),
                10,
                vec![0, 1, 2],
            ),
            request(
                vec![7, 8, 9],
                VisualInput::None,
                vec![Decoding::Greedy],
                4,
                vec![],
            ),
            request(
                mid_ids.clone(),
                VisualInput::Embeddings(visual.clone()),
                decodings()[1..].to_vec(),
                7,
                vec![3],
            ),
        ]
    };
    let expected = generate_batch(&model, requests(), &BatchOptions::default(), &device).unwrap();
    assert_eq!(
        expected.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![3, 1, 2]
    );
    let check = |what: &str, got: Vec<Vec<Vec<longview_infer::generate::Generation>>>| {
        for (rank, out) in got.iter().enumerate() {
            for (request, (g, e)) in out.iter().zip(&expected).enumerate() {
                for (sample, (g, e)) in g.iter().zip(e).enumerate() {
                    let at = format!("{what}, rank {rank}, request {request}, sample {sample}");
                    assert_eq!(g.tokens, e.tokens, "{at}");
                    assert_eq!(g.stopped, e.stopped, "{at}");
                    for (a, b) in g.logprobs.iter().zip(&e.logprobs) {
                        assert!((a - b).abs() < 1e-4, "{at}: log-prob {a} vs {b}");
                    }
                }
            }
        }
    };
    for world in [1, 2, 4] {
        let got = on_ranks(world, |sp| {
            sp.generate_batch(&model, requests(), &device).unwrap()
        });
        check(&format!("ring, {world} ranks"), got);
    }
    let got = on_ranks_with(4, SpScheme::TwoD { ulysses: 2 }, |sp| {
        sp.generate_batch(&model, requests(), &device).unwrap()
    });
    check("2D 2x2", got);
}
