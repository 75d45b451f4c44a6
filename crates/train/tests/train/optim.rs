//! The step's arithmetic: the learning-rate schedule, global-norm clipping, weight
//! decay groups, the FLOP count, and activation recomputation keeping the curve.

use super::*;

#[test]
fn recomputing_activations_keeps_the_loss_curve() {
    let _serial = serial();
    let tmp = TempDir::new("recompute");
    let cache = tmp.0.join("cache");
    let options = no_progress();
    let mut curves = Vec::new();
    for mode in [
        Recompute::None,
        Recompute::Layers,
        Recompute::AttentionAware,
    ] {
        let mut config = tiny(&tmp.0.join(mode.to_string()), &cache);
        config.run.steps = 4;
        config.run.recompute = mode;
        let summary = train(&config, &options, &device(), &mut quiet()).unwrap();
        curves.push((mode, summary.losses));
    }
    let (_, want) = &curves[0];
    assert_eq!(want.len(), 4);
    for (mode, got) in &curves[1..] {
        for (step, (a, b)) in got.iter().zip(want).enumerate() {
            // f32 on the CPU: the same arithmetic in another order (summation of the
            // loss over supervised rows, gradients per segment), over 4 AdamW steps.
            assert!(
                (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                "{mode}, step {}: {a} vs {b} without recomputation",
                step + 1
            );
        }
    }
}

#[test]
fn the_schedule_warms_up_linearly_then_decays_by_cosine_to_the_floor() {
    let _serial = serial();
    let optim = OptimConfig {
        lr: 1e-3,
        warmup_steps: 10,
        min_lr_ratio: 0.1,
        ..OptimConfig::default()
    };
    let total = 110;
    for step in 0..10 {
        let expected = 1e-3 * (step + 1) as f64 / 10.0;
        assert!((learning_rate(&optim, step, total) - expected).abs() < 1e-15);
    }
    // Cosine over steps 10..=109 (99 intervals): peak, a middle step, floor.
    assert!((learning_rate(&optim, 10, total) - 1e-3).abs() < 1e-15);
    let mid = 1e-4 + 0.9e-3 * 0.5 * (1.0 + (std::f64::consts::PI * 49.0 / 99.0).cos());
    assert!((learning_rate(&optim, 59, total) - mid).abs() < 1e-12);
    // Exactly half-way between peak and floor lies at 49.5 intervals: between 59 and 60.
    let half = 1e-4 + 0.9e-3 * 0.5;
    assert!(learning_rate(&optim, 59, total) > half && learning_rate(&optim, 60, total) < half);
    assert!((learning_rate(&optim, 109, total) - 1e-4).abs() < 1e-15);
    for step in 10..109 {
        assert!(learning_rate(&optim, step + 1, total) <= learning_rate(&optim, step, total));
    }
}

#[test]
fn clipping_uses_the_global_norm_and_scaling_scales_every_gradient() {
    let _serial = serial();
    let tmp = TempDir::new("clip");
    let tokenizer = TextTokenizer::debug();
    let vlm = model_config(&TrainConfig::default(), &tokenizer).unwrap();
    let device = device();
    let model = vlm.init(&device);
    let encoder = encoder(&tokenizer, &vlm);
    let data = haystack(&encoder, &tmp.0, 4, 4, 2, 0, 7).unwrap();
    let samples = [
        data.train.sample(&encoder, 7, 0).unwrap(),
        data.train.sample(&encoder, 7, 1).unwrap(),
    ];
    let batch = collate(&[&samples[0], &samples[1]], &device);
    let (sum, count) = causal_lm_loss_sum(model.forward(batch.input).unwrap(), batch.labels);
    assert_eq!(count, batch.supervised);
    let mut grads = GradientsParams::from_grads(sum.backward(), &model);

    let host = host_grads(&model, &grads);
    let reference = host.iter().map(|g| g * g).sum::<f64>().sqrt();
    let norm = global_grad_norm(&model, &grads) as f64;
    assert!(
        (norm - reference).abs() <= 1e-4 * reference,
        "global norm {norm} vs host {reference}"
    );
    scale_grads(&model, &mut grads, 0.25);
    let scaled = host_grads(&model, &grads);
    assert_eq!(scaled.len(), host.len());
    for (a, b) in host.iter().zip(&scaled) {
        assert!((a * 0.25 - b).abs() <= 1e-6 * a.abs().max(1e-6));
    }
}

#[test]
fn weight_decay_skips_biases_and_norms() {
    let _serial = serial();
    use burn::module::ModuleVisitor;
    use longview_train::trainer::optimizer;

    // Zero gradients: Adam's update is 0, so a step only applies the decoupled decay,
    // p * (1 - lr * wd), to the decayed parameters.
    let tokenizer = TextTokenizer::debug();
    let vlm = model_config(&TrainConfig::default(), &tokenizer).unwrap();
    let device = device();
    let model = vlm.init(&device);
    struct Zeros(GradientsParams);
    impl ModuleVisitor for Zeros {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.0
                .register::<D>(param.id, param.val().zeros_like().inner());
        }
    }
    let mut zeros = Zeros(GradientsParams::new());
    model.visit(&mut zeros);
    struct Host(Vec<(usize, Vec<f32>)>);
    impl ModuleVisitor for Host {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let data = param.val().into_data().convert::<f32>();
            self.0.push((D, data.as_slice::<f32>().unwrap().to_vec()));
        }
    }
    let mut before = Host(Vec::new());
    model.visit(&mut before);

    let (lr, wd) = (0.1, 0.5);
    let config = OptimConfig {
        weight_decay: wd,
        ..OptimConfig::default()
    };
    let mut optim = optimizer(&config);
    let model = optim.step(lr, model, zeros.0);
    let mut after = Host(Vec::new());
    model.visit(&mut after);

    let (mut decayed, mut kept) = (0, 0);
    for ((rank, a), (_, b)) in before.0.iter().zip(&after.0) {
        let factor = if *rank >= 2 { 1.0 - lr * wd } else { 1.0 };
        for (x, y) in a.iter().zip(b) {
            assert!(
                (*x as f64 * factor - *y as f64).abs() <= 1e-6 * x.abs().max(1e-3) as f64,
                "rank-{rank} parameter: {x} -> {y}, expected factor {factor}"
            );
        }
        if *rank >= 2 { decayed += 1 } else { kept += 1 }
    }
    assert!(decayed > 10 && kept > 10, "{decayed} decayed, {kept} kept");
}

#[test]
fn train_flops_match_a_count_of_every_llm_matmul() {
    let _serial = serial();
    use longview_models::vila::train_flops;
    let tokenizer = TextTokenizer::debug();
    let vlm = model_config(&TrainConfig::default(), &tokenizer).unwrap();
    let device = device();
    let model = vlm.init(&device);
    let t = &vlm.text;
    let (h, d) = (t.hidden_size as f64, t.head_dim() as f64);
    let (q, kv) = (t.num_heads as f64 * d, t.num_kv_heads as f64 * d);
    let i = t.intermediate_size as f64;
    let seqs = [40usize, 17];
    // Forward: 2 FLOPs per multiply-add of every projection, the LM head, and
    // causal attention (QK^T and PV, half the square); backward twice the forward.
    let mut forward = 0.0;
    for &s in &seqs {
        let s = s as f64;
        let per_token = h * q + 2.0 * h * kv + q * h + 3.0 * h * i;
        forward += 2.0 * s * (per_token * t.num_layers as f64 + h * t.vocab_size as f64);
        forward += 2.0 * 2.0 * s * s * q * t.num_layers as f64 * 0.5;
    }
    let counted = 3.0 * forward;
    let estimate = train_flops(&model, &vlm, &seqs, 0);
    // The estimate also counts biases and norm scales as matmul parameters.
    assert!(
        (estimate - counted).abs() <= 0.01 * counted,
        "estimate {estimate:.4e} vs counted {counted:.4e}"
    );
}

#[test]
fn model_states_that_cannot_fit_are_refused_before_the_first_step() {
    let _serial = serial();
    let tmp = TempDir::new("states");
    let config = tiny(&tmp.0.join("run"), &tmp.0.join("cache"));
    // A budget below the debug model's gradients and moments (12 bytes a parameter).
    let options = TrainOptions {
        memory_budget: Some(1024.0),
        ..no_progress()
    };
    let err = train(&config, &options, &device(), &mut quiet())
        .unwrap_err()
        .to_string();
    assert!(err.contains("the model states do not fit"), "{err}");
    assert!(err.contains("AdamW moments"), "{err}");
    // Nothing was trained or written.
    assert!(!config.run.out.join("checkpoints").exists());
    assert!(!config.run.out.join("metrics.jsonl").exists());
}
