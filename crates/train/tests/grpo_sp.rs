//! GRPO's sequence-parallel log-prob pass on in-process ranks (CPU) against one
//! device: the summed log-probs and the group-summed gradients of a loss on them.

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Distribution, Tensor, TensorData};
use longview_comm::LocalWorld;
use longview_models::VlmConfig;
use longview_parallel::inference::{Heads, SpScheme};
use longview_train::grpo::logprobs::{Rollout, response_logprobs};
use longview_train::grpo::sp_logprobs::SpLogprobs;
use longview_train::mmsp::all_reduce_grads;

mod common;
use common::{ActorCase, assert_grads_close, nonlinear_loss};

fn host2(t: Tensor<2>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

fn host1(t: Tensor<1>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

fn worst(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(1.0))
        .fold(0.0, f32::max)
}

#[test]
fn sequence_parallel_log_probs_and_gradients_equal_one_device() {
    let device = Device::flex().autodiff();
    device.seed(9);
    let config = VlmConfig::debug();
    let model = config.init(&device);
    let per_frame = config.tokens_per_frame();
    let mut prompt: Vec<u32> = vec![4, 9, 2];
    prompt.extend(std::iter::repeat_n(
        model.placeholder_token_id,
        2 * per_frame,
    ));
    prompt.extend([11, 6, 13]);
    // Lengths 5, 1 and 3: padding inside the batch and a total that zigzag does not
    // divide.
    let responses = vec![vec![20, 21, 22, 23, 24], vec![30], vec![40, 41, 42]];
    let side = config.vision.image_size;
    let pixels = Tensor::<4>::random([2, 3, side, side], Distribution::Normal(0.0, 1.0), &device);
    let visual = model.valid().encode_frames(pixels.inner()).autodiff();
    let weights = Tensor::<2>::from_data(
        TensorData::new(
            (0..15).map(|i| 0.3 + 0.1 * i as f32).collect::<Vec<_>>(),
            [3, 5],
        ),
        &device,
    );
    let gamma =
        |grads: &GradientsParams| host1(grads.get::<1>(model.llm.model.norm.gamma.id).unwrap());

    let rollout = |visual| Rollout {
        prompt: &prompt,
        visual: Some(visual),
        responses: &responses,
        temperature: 0.8,
    };
    let single = response_logprobs(&model, &rollout(&visual), &device)
        .unwrap()
        .unwrap();
    let expected_logp = host2(single.logp.clone());
    let expected_mask = host2(single.mask.clone());
    let loss = (single.logp * weights.clone()).sum();
    let expected_grad = gamma(&GradientsParams::from_grads(loss.backward(), &model));
    assert!(expected_grad.iter().any(|&g| g != 0.0));

    let head_dim = config.text.head_dim();
    for world in [2, 4] {
        let comms = LocalWorld::communicators(world);
        let results: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = std::thread::scope(|scope| {
            let handles: Vec<_> = comms
                .into_iter()
                .map(|comm| {
                    let (model, visual, weights) = (&model, &visual, &weights);
                    let (prompt, responses, device) = (&prompt, &responses, &device);
                    scope.spawn(move || {
                        let sp = SpLogprobs::new(comm, head_dim).unwrap();
                        let inner = device.clone().inner();
                        let plain_visual = visual.clone().inner();
                        let plain = Rollout {
                            prompt,
                            visual: Some(&plain_visual),
                            responses,
                            temperature: 0.8,
                        };
                        let whole = sp.whole(&model.valid(), &plain, &inner).unwrap().unwrap();
                        let part = sp
                            .local(
                                model,
                                &Rollout {
                                    visual: Some(visual),
                                    ..plain
                                },
                                device,
                            )
                            .unwrap()
                            .unwrap();
                        let mask = host2(part.mask.clone());
                        let loss = (part.logp * weights.clone()).sum();
                        let grads = GradientsParams::from_grads(loss.backward(), model);
                        let summed = all_reduce_grads(model, grads, sp.comm()).unwrap();
                        (host2(whole), mask, gamma(&summed))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut mask_sum = vec![0.0f32; expected_mask.len()];
        for (rank, (whole, mask, grad)) in results.iter().enumerate() {
            let e = worst(whole, &expected_logp);
            assert!(e < 1e-5, "{world} ranks, rank {rank}: log-probs off by {e}");
            let g = worst(grad, &expected_grad);
            assert!(g < 1e-4, "{world} ranks, rank {rank}: gradients off by {g}");
            for (s, m) in mask_sum.iter_mut().zip(mask) {
                *s += m;
            }
        }
        // Every response token is some rank's, exactly once.
        assert_eq!(mask_sum, expected_mask, "{world} ranks");
    }
}

#[test]
fn frames_sharded_over_the_group_encode_to_the_one_device_tokens() {
    use longview_train::grpo::passes::{Passes, SpPasses};
    let device = Device::flex();
    device.seed(4);
    let config = VlmConfig::debug();
    let model = config.init(&device);
    let side = config.vision.image_size;
    let pixels = Tensor::<4>::random([3, 3, side, side], Distribution::Normal(0.0, 1.0), &device);
    let head_dim = config.text.head_dim();
    let expected = model
        .encode_frames(pixels.clone())
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap();
    for world in [2, 4] {
        let comms = LocalWorld::communicators(world);
        let got: Vec<Vec<f32>> = std::thread::scope(|scope| {
            let handles: Vec<_> = comms
                .into_iter()
                .map(|comm| {
                    let (model, pixels) = (&model, &pixels);
                    scope.spawn(move || {
                        let passes = SpPasses::new(&comm, head_dim).unwrap();
                        let tokens = passes.encode(model, pixels.clone()).unwrap();
                        tokens
                            .into_data()
                            .convert::<f32>()
                            .try_to_vec::<f32>()
                            .unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for tokens in got {
            // 3 frames over 2 ranks (2 + 1 padded) and over 4 (one rank pads only).
            assert!(worst(&tokens, &expected) < 1e-6, "{world} ranks");
        }
    }
}

/// The actor's pass on each rank's rows with the text layers recomputed in the
/// backward (LightSeq's attention-aware mode replays the scheme's backward from the
/// kept output and LSE), on the zigzag ring, Ulysses and 2D attention, summed over
/// the group, against one device's plain autodiff: every LLM parameter's gradient and
/// the summed loss.
#[test]
fn sequence_parallel_recomputed_actor_gradients_equal_one_device() {
    use longview_train::remat::Recompute;

    let case = ActorCase::new(5);
    let (config, model, device) = (&case.config, &case.model, &case.device);
    let rollout = case.rollout();
    let loss_of = nonlinear_loss;
    let single = response_logprobs(model, &rollout, device).unwrap().unwrap();
    let (loss, _) = loss_of(single).unwrap();
    let expected_loss = loss.clone().inner().into_scalar::<f32>();
    let expected = GradientsParams::from_grads(loss.backward(), model);

    let heads = Heads {
        head_dim: config.text.head_dim(),
        q_heads: config.text.num_heads,
        kv_heads: config.text.num_kv_heads,
    };
    let cases = [
        (SpScheme::ZigzagRing, 2),
        (SpScheme::ZigzagRing, 4),
        (SpScheme::Ulysses, 2),
        (SpScheme::Ulysses, 4),
        (SpScheme::TwoD { ulysses: 2 }, 4),
    ];
    for (scheme, world) in cases {
        for mode in [Recompute::Layers, Recompute::AttentionAware] {
            let comms = LocalWorld::communicators(world);
            let results: Vec<(f32, GradientsParams)> = std::thread::scope(|scope| {
                let handles: Vec<_> = comms
                    .into_iter()
                    .map(|comm| {
                        let rollout = &rollout;
                        scope.spawn(move || {
                            let sp = SpLogprobs::with_scheme(comm, heads, scheme).unwrap();
                            let mut loss_of = loss_of;
                            let (stats, grads) = sp
                                .actor_grads(model, rollout, mode, device, &mut loss_of)
                                .unwrap()
                                .unwrap();
                            let summed = all_reduce_grads(model, grads, sp.comm()).unwrap();
                            (stats[0], summed)
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let total: f32 = results.iter().map(|(l, _)| l).sum();
            assert!(
                (total - expected_loss).abs() <= 1e-5 * expected_loss.abs().max(1.0),
                "SP{world} {scheme} {mode}: loss {total} vs {expected_loss}"
            );
            for (rank, (_, grads)) in results.iter().enumerate() {
                let label = format!("SP{world} {scheme} {mode} rank {rank}");
                // f32 on the CPU: the ring's and the ranks' sums run in other orders.
                let compared = assert_grads_close(model, grads, &expected, 1e-4, &label);
                assert!(compared > 10, "{label}: {compared} gradients compared");
            }
        }
    }
}
