//! `AttentionImpl::Flash` inside the debug Qwen2 on a wgpu device (Mesa lavapipe in
//! CI) against `AttentionImpl::Reference` on the same device and weights: logits and
//! parameter gradients.

use burn::tensor::{Device, DeviceKind, Distribution, Int, Tensor, TensorData};
use longview_models::attention::{AttentionImpl, flash_available};
use longview_models::vila::{Qwen2, TextConfig, default_position_ids};

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().iter::<f32>().collect()
}

/// Largest |a - b| relative to max(|b|, 1).
fn relative_error<const D: usize>(got: Tensor<D>, want: Tensor<D>) -> f32 {
    let (got, want) = (values(got), values(want));
    let scale = want.iter().fold(1f32, |m, x| m.max(x.abs()));
    got.iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs() / scale)
        .fold(0f32, f32::max)
}

fn watched(model: &Qwen2) -> Vec<(&'static str, Tensor<2>)> {
    let layers = &model.model.layers;
    vec![
        ("embed_tokens", model.model.embed_tokens.weight.val()),
        ("layer0.q_proj", layers[0].self_attn.q_proj.weight.val()),
        ("layer0.k_proj", layers[0].self_attn.k_proj.weight.val()),
        ("layer1.v_proj", layers[1].self_attn.v_proj.weight.val()),
        ("lm_head", model.lm_head.as_ref().unwrap().weight.val()),
    ]
}

#[test]
fn flash_attention_in_the_llm_matches_the_reference() {
    let device = Device::wgpu(DeviceKind::DefaultDevice).autodiff();
    assert!(flash_available(&device));
    assert!(
        !flash_available(&Device::flex()),
        "flex has no CubeCL kernels"
    );
    // 4 query / 2 kv heads of 16 dims; 37 tokens: not a multiple of any tile size.
    let model = TextConfig::debug().init(&device);
    let flash = model.clone().with_attention(AttentionImpl::Flash);
    let (batch, seq) = (2, 37);
    let ids: Vec<i64> = (0..(batch * seq) as i64)
        .map(|i| (i * 31 + 7) % 300)
        .collect();
    let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [batch, seq]), &device);
    let positions = default_position_ids(batch, seq, &device);
    let weights = Tensor::<3>::random([batch, seq, 300], Distribution::Normal(0.0, 1.0), &device);

    let reference = model.forward(ids.clone(), positions.clone());
    let got = flash.forward(ids, positions);
    let error = relative_error(got.clone(), reference.clone());
    // f32 throughout; the two paths sum the softmax in different orders.
    assert!(error <= 1e-4, "logits: relative error {error:.2e}");

    let grads_ref = (reference * weights.clone()).sum().backward();
    let grads = (got * weights).sum().backward();
    for ((name, p_ref), (_, p)) in watched(&model).into_iter().zip(watched(&flash)) {
        let error = relative_error(p.grad(&grads).unwrap(), p_ref.grad(&grads_ref).unwrap());
        assert!(
            error <= 1e-3,
            "gradient of {name}: relative error {error:.2e}"
        );
    }
}

/// LightSeq's attention-aware recomputation with the flash kernels (the backward runs
/// from the kept O and LSE, the attention forward is not recomputed) against plain
/// autodiff of the reference model: the whole debug VLM, frames included, on wgpu.
#[test]
fn attention_aware_recompute_with_flash_matches_plain_autodiff() {
    use longview_models::VlmInput;
    use longview_models::vila::{IGNORE_INDEX, VisualInput, VlmConfig};
    use longview_train::remat::{Recompute, loss_and_grads};

    let device = Device::wgpu(DeviceKind::DefaultDevice).autodiff();
    let config = VlmConfig::debug();
    let reference = config.init(&device);
    let flash = reference.clone();
    let flash = longview_models::Vlm {
        vision_tower: {
            let mut tower = flash.vision_tower;
            for layer in &mut tower.encoder.layers {
                layer.self_attn.attention = AttentionImpl::Flash;
            }
            tower
        },
        llm: flash.llm.with_attention(AttentionImpl::Flash),
        ..flash
    };
    let per_frame = config.tokens_per_frame();
    let placeholder = config.placeholder_token_id as i64;
    let mut row: Vec<i64> = vec![11, 12, 13];
    for _ in 0..3 {
        row.extend(std::iter::repeat_n(placeholder, per_frame));
        row.push(298);
    }
    let prompt = row.len();
    row.extend([40, 41, 42, 43, 44]);
    let seq = row.len();
    let mut labels = vec![IGNORE_INDEX; prompt];
    labels.extend_from_slice(&row[prompt..]);
    let side = config.vision.image_size;
    let pixels = Tensor::<4>::random([3, 3, side, side], Distribution::Normal(0.0, 1.0), &device);
    let input = || VlmInput {
        input_ids: Tensor::from_data(TensorData::new(row.clone(), [1, seq]), &device),
        position_ids: default_position_ids(1, seq, &device),
        visual: VisualInput::Pixels(pixels.clone()),
    };
    let labels = Tensor::<2, Int>::from_data(TensorData::new(labels, [1, seq]), &device);

    let (want_loss, want) =
        loss_and_grads(&reference, input(), labels.clone(), 5.0, Recompute::None).unwrap();
    let (got_loss, got) =
        loss_and_grads(&flash, input(), labels, 5.0, Recompute::AttentionAware).unwrap();
    assert!(
        (got_loss - want_loss).abs() <= 1e-4 * want_loss.abs(),
        "loss {got_loss} vs {want_loss}"
    );
    let layers = (
        &reference.vision_tower.encoder.layers,
        &reference.llm.model.layers,
    );
    let params = [
        (
            "vision layer0 q_proj",
            layers.0[0].self_attn.q_proj.weight.id,
        ),
        (
            "vision layer1 k_proj",
            layers.0[1].self_attn.k_proj.weight.id,
        ),
        ("llm layer0 q_proj", layers.1[0].self_attn.q_proj.weight.id),
        ("llm layer1 v_proj", layers.1[1].self_attn.v_proj.weight.id),
        ("embed_tokens", reference.llm.model.embed_tokens.weight.id),
    ];
    for (name, id) in params {
        let (got, want) = (got.get::<2>(id).unwrap(), want.get::<2>(id).unwrap());
        let error = relative_error(got, want);
        // f32; the flash backward sums in another order than autodiff of the reference.
        assert!(
            error <= 1e-3,
            "gradient of {name}: relative error {error:.2e}"
        );
    }
}

/// GRPO's one-device log-prob passes with the flash kernels: the group's prompt once,
/// its responses attending to the prompt's keys then their own (causal, fewer queries
/// than keys, forward and backward), attention-aware recomputation; against plain
/// autodiff of the reference model over prompt + response, G times.
#[test]
fn grpo_shared_prefix_passes_with_flash_match_the_whole_sequences() {
    use longview_models::vila::VlmConfig;
    use longview_train::grpo::actor::actor_grads_plain;
    use longview_train::grpo::logprobs::{ResponseLogprobs, Rollout, response_logprobs};
    use longview_train::grpo::passes::{OneDevice, Passes};
    use longview_train::remat::Recompute;

    let device = Device::wgpu(DeviceKind::DefaultDevice).autodiff();
    let config = VlmConfig::debug();
    let reference = config.init(&device);
    let flash = reference
        .clone()
        .with_attention(AttentionImpl::Flash, AttentionImpl::Flash);
    let side = config.vision.image_size;
    let pixels = Tensor::<4>::random([2, 3, side, side], Distribution::Normal(0.0, 1.0), &device);
    let visual = reference.encode_frames(pixels).detach();
    let mut prompt: Vec<u32> = vec![4, 9];
    prompt.extend(std::iter::repeat_n(
        config.placeholder_token_id,
        2 * config.tokens_per_frame(),
    ));
    prompt.extend([11, 6]);
    // 70 response rows: more than one tile of queries for the longest response.
    let responses = vec![
        (0..71).map(|i| 20 + i % 200).collect::<Vec<u32>>(),
        vec![30],
        vec![40, 41, 42],
    ];
    let rollout = Rollout {
        prompt: &prompt,
        visual: Some(&visual),
        responses: &responses,
        temperature: 0.8,
    };
    let mut loss_of = |actor: ResponseLogprobs| {
        let logp = actor.logp;
        let loss = logp.clone().mul_scalar(0.7).sum() + (logp.clone() * logp).sum().mul_scalar(0.1);
        let value = loss.clone().inner().into_scalar::<f32>();
        Ok((loss, vec![value]))
    };
    let (want_stats, want) = actor_grads_plain(
        &reference,
        response_logprobs(&reference, &rollout, &device).unwrap(),
        &mut loss_of,
    )
    .unwrap()
    .unwrap();
    for mode in [Recompute::None, Recompute::AttentionAware] {
        let (stats, got) = OneDevice { recompute: mode }
            .actor_grads(&flash, &rollout, &device, &mut loss_of)
            .unwrap()
            .unwrap();
        assert!(
            (stats[0] - want_stats[0]).abs() <= 1e-4 * want_stats[0].abs(),
            "{mode}: loss {} vs {}",
            stats[0],
            want_stats[0]
        );
        let layers = &reference.llm.model.layers;
        for (name, id) in [
            ("llm layer0 q_proj", layers[0].self_attn.q_proj.weight.id),
            ("llm layer0 k_proj", layers[0].self_attn.k_proj.weight.id),
            ("llm layer1 v_proj", layers[1].self_attn.v_proj.weight.id),
            ("embed_tokens", reference.llm.model.embed_tokens.weight.id),
        ] {
            let error = relative_error(got.get::<2>(id).unwrap(), want.get::<2>(id).unwrap());
            // f32; the flash kernels sum in another order than the reference's autodiff.
            assert!(
                error <= 1e-3,
                "{mode}: gradient of {name}: relative error {error:.2e}"
            );
        }
    }
}

/// The debug Qwen2 on wgpu runs its RMSNorms, rotary embeddings and SwiGLU
/// activations as one fused kernel each (`longview_kernels::fused`, forward and
/// backward); the same weights on the CPU backend run Burn's ops. Logits and
/// parameter gradients agree, with and without autodiff.
#[test]
fn fused_kernels_in_the_llm_give_the_burn_logits_and_gradients() {
    use burn::module::Module;
    let device = Device::wgpu(DeviceKind::DefaultDevice).autodiff();
    let cpu = Device::flex().autodiff();
    let model = TextConfig::debug().init(&device);
    let reference = model.clone().fork(&cpu);
    let (batch, seq) = (2, 37);
    let ids: Vec<i64> = (0..(batch * seq) as i64)
        .map(|i| (i * 17 + 3) % 300)
        .collect();
    let ids = |device: &Device| {
        Tensor::<2, Int>::from_data(TensorData::new(ids.clone(), [batch, seq]), device)
    };
    let weights = Tensor::<3>::random([batch, seq, 300], Distribution::Normal(0.0, 1.0), &device);
    let cpu_weights = Tensor::<3>::from_data(weights.to_data(), &cpu);

    let got = model.forward(ids(&device), default_position_ids(batch, seq, &device));
    let want = reference.forward(ids(&cpu), default_position_ids(batch, seq, &cpu));
    let error = relative_error(Tensor::<3>::from_data(got.to_data(), &cpu), want.clone());
    // f32; the fused kernels and the CPU sum in other orders.
    assert!(error <= 1e-5, "logits: relative error {error:.2e}");
    // Without autodiff (inference) as well.
    let plain = model.valid().forward(
        ids(&device).inner(),
        default_position_ids(batch, seq, &device).inner(),
    );
    let error = relative_error(Tensor::<3>::from_data(plain.to_data(), &cpu), want.clone());
    assert!(
        error <= 1e-5,
        "logits without autodiff: relative error {error:.2e}"
    );

    let grads = (got * weights).sum().backward();
    let grads_ref = (want * cpu_weights).sum().backward();
    for ((name, p), (_, p_ref)) in watched(&model).into_iter().zip(watched(&reference)) {
        let g = p.grad(&grads).unwrap();
        let g = Tensor::<2>::from_data(g.to_data(), &Device::flex());
        let error = relative_error(g, p_ref.grad(&grads_ref).unwrap());
        assert!(
            error <= 1e-4,
            "gradient of {name}: relative error {error:.2e}"
        );
    }
    let norm =
        |m: &longview_models::vila::Qwen2| m.model.layers[1].post_attention_layernorm.gamma.val();
    let g = norm(&model).grad(&grads).unwrap();
    let error = relative_error(
        Tensor::<1>::from_data(g.to_data(), &Device::flex()),
        norm(&reference).grad(&grads_ref).unwrap(),
    );
    assert!(
        error <= 1e-4,
        "gradient of a norm's gamma: relative error {error:.2e}"
    );
}

/// Batched decoding with each prompt's KV cache shared by its samples
/// (`longview_infer::shared_prefix`) on the flash kernels (wgpu, no autodiff: the
/// split-key decode kernels for the prompt's rows, LSE merge with the rows' own keys):
/// the same tokens as each prompt's samples decoded alone over a repeated cache, the
/// log-probs within 1e-4.
#[test]
fn shared_prompt_batches_with_flash_equal_separate_runs() {
    use longview_infer::batch::{BatchOptions, BatchRequest, generate_batch};
    use longview_infer::generate::{Decoding, GenerateOptions, Limits, generate_group};
    use longview_models::VisualInput;
    use longview_models::vila::VlmConfig;
    let device = Device::wgpu(DeviceKind::DefaultDevice);
    let model = VlmConfig::debug()
        .init(&device)
        .with_attention(AttentionImpl::Flash, AttentionImpl::Flash);
    let sampled = |seed| Decoding::TopP {
        top_p: 0.95,
        temperature: 1.0,
        seed,
    };
    let cases: Vec<(Vec<u32>, Vec<Decoding>)> = vec![
        (
            (0..83).map(|i| 10 + (i * 7) % 250).collect(),
            vec![Decoding::Greedy, sampled(1), sampled(2)],
        ),
        (
            (0..21).map(|i| 12 + (i * 5) % 250).collect(),
            vec![sampled(3)],
        ),
    ];
    let limits = Limits {
        max_new_tokens: 9,
        stop: vec![],
    };
    let requests = cases
        .iter()
        .map(|(prompt, samples)| BatchRequest {
            prompt: prompt.clone(),
            visual: VisualInput::None,
            samples: samples.clone(),
            limits: limits.clone(),
        })
        .collect();
    let batch = generate_batch(&model, requests, &BatchOptions::default(), &device).unwrap();
    for ((prompt, samples), got) in cases.iter().zip(&batch) {
        let options = GenerateOptions::new(limits.max_new_tokens, Decoding::Greedy, vec![]);
        let alone = generate_group(
            &model,
            prompt,
            VisualInput::None,
            samples,
            &options,
            &device,
        )
        .unwrap();
        for (g, a) in got.iter().zip(&alone) {
            assert_eq!(g.tokens, a.tokens, "prompt of {} tokens", prompt.len());
            let worst = g
                .logprobs
                .iter()
                .zip(&a.logprobs)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max);
            // f32; the merge sums the two key sets in another order.
            assert!(worst < 1e-4, "log-probs differ by {worst}");
        }
    }
}

/// Decoding steps captured as a device graph (`longview_infer::graph_decode`: token
/// ids and position in device buffers, the KV cache written and read up to a length
/// the device holds) against eager steps of the reference attention (`decode_step`
/// over `KvCache`), on the debug VLM with frames in the prompt, on wgpu: three rows
/// fed different tokens, then the first row dropped (its cache row keeps running
/// unread), every step's logits compared. The capture, or the re-run where wgpu
/// cannot capture, runs the same operations.
#[test]
fn captured_decoding_steps_match_eager_steps() {
    use longview_infer::generate::{decode_step, prefill_prompt};
    use longview_infer::graph_decode::GraphDecoder;
    use longview_models::vila::{VisualInput, VlmConfig};

    let device = Device::wgpu(DeviceKind::DefaultDevice);
    let config = VlmConfig::debug();
    let reference = config.init(&device);
    let flash = reference
        .clone()
        .with_attention(AttentionImpl::Flash, AttentionImpl::Flash);
    assert!(flash.counted_decoding_applies(&device));
    assert!(!reference.counted_decoding_applies(&device));
    let side = config.vision.image_size;
    let pixels = Tensor::<4>::random([2, 3, side, side], Distribution::Normal(0.0, 1.0), &device);
    let visual = reference.encode_frames(pixels);
    let mut prompt: Vec<u32> = vec![4, 9];
    prompt.extend(std::iter::repeat_n(
        config.placeholder_token_id,
        2 * config.tokens_per_frame(),
    ));
    prompt.extend((0..23).map(|i| 20 + (i * 37) % 200));
    let (steps, rows) = (6, 3);
    let room = prompt.len() + steps;
    let prefilled = |model| {
        let embeddings = VisualInput::Embeddings(visual.clone());
        let (cache, _) = prefill_prompt(model, &prompt, embeddings, 16, room, &device).unwrap();
        cache.repeat(rows)
    };
    let tokens_at = |step: usize, kept: &[usize]| -> Vec<i64> {
        kept.iter()
            .map(|&r| (50 + 17 * step + 31 * r) as i64 % 250)
            .collect()
    };
    let kept_at = |step: usize| -> Vec<usize> {
        if step == 3 {
            vec![1, 2]
        } else if step > 3 {
            vec![0, 1]
        } else {
            vec![0, 1, 2]
        }
    };

    let mut cache = prefilled(&reference);
    let mut decoder = GraphDecoder::new(&flash, prefilled(&flash), room, &device).unwrap();
    for step in 0..steps {
        let kept = kept_at(step);
        let tokens = tokens_at(step, &kept);
        if kept.len() != cache.batch() {
            cache = cache.select(&kept);
        }
        let want = decode_step(&reference, &mut cache, &tokens, &device).unwrap();
        let got = decoder.step(&tokens, &kept).unwrap();
        assert_eq!(got.len(), want.len(), "step {step}: rows");
        for (row, (g, w)) in got.iter().zip(&want).enumerate() {
            let error = open_logits_error(g, w);
            // f32 throughout, the two attentions summing the softmax in different
            // orders: about 3e-7 here (a key count one short gives 9e-3).
            assert!(
                error <= 1e-5,
                "step {step}, row {row}: relative error {error:.2e}"
            );
        }
    }
    assert_eq!(decoder.len(), prompt.len() + steps);
    // The buffers are full: one more step is refused, as is a row that is gone.
    let full = decoder.step(&[1, 2], &[0, 1]).unwrap_err().to_string();
    assert!(full.contains("full"), "{full}");
    let gone = decoder.step(&[1], &[2]).unwrap_err().to_string();
    assert!(gone.contains("rows [2] of 2"), "{gone}");
}

/// A shared-prefix batch (GRPO's rollouts: prompts' caches held once, each row's
/// decoded keys its own) decoded as captured steps
/// (`SharedPrefixBatch::into_graph`) against its eager steps, on wgpu with the flash
/// kernels: two prompts of different lengths, two rows each, fed different tokens,
/// then a row dropped; every step's logits compared.
#[test]
fn captured_shared_prefix_steps_match_eager_steps() {
    use longview_infer::generate::prefill_prompt;
    use longview_infer::shared_prefix::SharedPrefixBatch;
    use longview_models::vila::{VisualInput, VlmConfig};

    let device = Device::wgpu(DeviceKind::DefaultDevice);
    let config = VlmConfig::debug();
    let model = config
        .init(&device)
        .with_attention(AttentionImpl::Flash, AttentionImpl::Flash);
    let side = config.vision.image_size;
    let pixels = Tensor::<4>::random([1, 3, side, side], Distribution::Normal(0.0, 1.0), &device);
    let visual = model.encode_frames(pixels);
    let mut long: Vec<u32> = vec![4, 9];
    long.extend(std::iter::repeat_n(
        config.placeholder_token_id,
        config.tokens_per_frame(),
    ));
    long.extend((0..29).map(|i| 20 + (i * 37) % 200));
    let short: Vec<u32> = (0..11).map(|i| 30 + (i * 53) % 200).collect();
    let steps = 5;
    let (long_cache, _) = prefill_prompt(
        &model,
        &long,
        VisualInput::Embeddings(visual),
        16,
        long.len(),
        &device,
    )
    .unwrap();
    let (short_cache, _) =
        prefill_prompt(&model, &short, VisualInput::None, 16, short.len(), &device).unwrap();
    let layers = model.text_layers().len();
    let batch = || {
        SharedPrefixBatch::new(
            vec![(long_cache.clone(), 2), (short_cache.clone(), 2)],
            layers,
            vec![long.len(), long.len(), short.len(), short.len()],
            steps + 1,
        )
    };
    let mut eager = batch();
    let mut decoder = batch().into_graph(&model, &device).unwrap();
    let kept_at = |step: usize| -> Vec<usize> {
        match step {
            0..=1 => vec![0, 1, 2, 3],
            2 => vec![0, 2, 3],
            _ => vec![0, 1, 2],
        }
    };
    for step in 0..steps {
        let kept = kept_at(step);
        let tokens: Vec<i64> = kept
            .iter()
            .map(|&r| (40 + 13 * step + 29 * r) as i64 % 250)
            .collect();
        if kept.len() != eager.rows() {
            eager.select(&kept, &device);
        }
        let want = eager.step(&model, &tokens, &device).unwrap();
        let got = decoder.step(&tokens, &kept).unwrap();
        assert_eq!(got.len(), want.len(), "step {step}: rows");
        for (row, (g, w)) in got.iter().zip(&want).enumerate() {
            let error = open_logits_error(g, w);
            // Bit-equal here (the same kernels); the buffers' count one off gives 1.8e-3.
            assert!(
                error <= 1e-5,
                "step {step}, row {row}: relative error {error:.2e}"
            );
        }
    }
}

/// The largest |got - want| over the logits generation can pick (the masked ones are
/// `MASKED_LOGIT` on both sides), relative to the largest |want| there.
fn open_logits_error(got: &[f32], want: &[f32]) -> f32 {
    use longview_models::vila::MASKED_LOGIT;
    let open: Vec<(f32, f32)> = got
        .iter()
        .zip(want)
        .filter(|&(_, &b)| b > MASKED_LOGIT / 2.0)
        .map(|(&a, &b)| (a, b))
        .collect();
    assert!(open.len() > 100, "{} open logits", open.len());
    let scale = open.iter().fold(1f32, |m, &(_, b)| m.max(b.abs()));
    open.iter().map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / scale
}
