//! bf16 compute with f32 master weights. Its own test binary: a device's default
//! float dtype is fixed for the process once set, and here it is bf16.

use std::path::PathBuf;

use burn::nn::{Linear, LinearConfig};
use burn::optim::GradientsParams;
use burn::tensor::{DType, Device, DeviceConfig, Distribution, FloatDType, Tensor};
use longview_train::trainer::{cast_grads, cast_params, optimizer};
use longview_train::{OptimConfig, TrainConfig, TrainOptions, train};

fn bf16_device() -> Device {
    let mut device = Device::flex().autodiff();
    // Both tests configure the same bf16 default; the second call finds it set.
    let _ = device.configure(DeviceConfig::default().float_dtype(FloatDType::BF16));
    assert_eq!(DType::from(device.settings().float_dtype), DType::BF16);
    device
}

/// Largest |a - b| over a Linear's weights, in f32.
fn moved(a: &Linear, b: &Linear) -> f32 {
    let (a, b) = (
        a.weight.val().cast(DType::F32),
        b.weight.val().cast(DType::F32),
    );
    (a - b).abs().max().into_scalar::<f32>()
}

#[test]
fn small_updates_survive_in_the_f32_master_and_vanish_in_bf16() {
    let device = bf16_device();
    let start = LinearConfig::new(16, 4).init(&device);
    let x = Tensor::<2>::random([8, 16], Distribution::Normal(0.0, 1.0), &device);
    let config = OptimConfig {
        weight_decay: 0.0,
        ..OptimConfig::default()
    };
    let lr = 1e-4; // Adam moves each weight by about lr a step: below bf16's spacing near 0.25 (2^-9)
    let steps = 10;

    // bf16 weights updated in place.
    let mut optim = optimizer(&config);
    let mut plain = start.clone();
    for _ in 0..steps {
        let loss = plain.forward(x.clone()).sum();
        let grads = GradientsParams::from_grads(loss.backward(), &plain);
        plain = optim.step(lr, plain, grads);
    }

    // The same with an f32 master: bf16 working copy each step, f32 update.
    let mut optim = optimizer(&config);
    let mut master = cast_params(start.clone(), DType::F32);
    assert_eq!(master.weight.val().dtype(), DType::F32);
    for _ in 0..steps {
        let working = cast_params(master.clone(), DType::BF16);
        assert_eq!(working.weight.val().dtype(), DType::BF16);
        let loss = working.forward(x.clone()).sum();
        let mut grads = GradientsParams::from_grads(loss.backward(), &working);
        cast_grads(&master, &mut grads, DType::F32);
        master = optim.step(lr, master, grads);
    }
    assert_eq!(master.weight.val().dtype(), DType::F32);

    let lost = moved(&plain, &start);
    let kept = moved(&master, &start);
    // Most bf16 weights cannot move by 1e-4 a step: the largest change bf16 kept is
    // at most one spacing of the smallest weights, while the master moved each weight
    // by about steps x lr = 1e-3 (Adam's first steps move by about lr each).
    assert!(
        kept > 0.5 * steps as f32 * lr as f32 && kept < 2.0 * steps as f32 * lr as f32,
        "master moved by {kept:.2e}, expected about {:.1e}",
        steps as f64 * lr
    );
    let plain_changed = {
        let (a, b) = (
            plain.weight.val().cast(DType::F32),
            start.weight.val().cast(DType::F32),
        );
        a.not_equal(b).int().sum().into_scalar::<i64>()
    };
    let master_changed = {
        let (a, b) = (master.weight.val(), start.weight.val().cast(DType::F32));
        a.not_equal(b).int().sum().into_scalar::<i64>()
    };
    assert_eq!(master_changed, 64, "every master weight moves");
    assert!(
        plain_changed < 32,
        "{plain_changed} of 64 bf16 weights moved (largest change {lost:.2e}): bf16 should lose most updates"
    );
}

/// A scratch folder and a run small enough for a test (4-frame videos, batches of 2).
fn tiny_run(tag: &str) -> (PathBuf, TrainConfig) {
    let tmp = std::env::temp_dir().join(format!("{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let mut config = TrainConfig::default();
    config.run.out = tmp.join("run");
    config.run.batch_size = 2;
    config.optim.warmup_steps = 1;
    config.data.frames = 4;
    config.data.min_frames = 2;
    config.data.needle_copies = 1;
    config.data.eval_per_depth = 1;
    config.data.cache = Some(tmp.join("cache"));
    (tmp, config)
}

/// Also times the steps' parts (`phase_timings`): every part of the master-weight path
/// is in each `metrics.jsonl` row, and together they fit in the step's wall time.
#[test]
fn a_bf16_run_trains_with_f32_master_weights() {
    let device = bf16_device();
    let (tmp, mut config) = tiny_run("longview-master");
    config.run.steps = 3;
    config.run.checkpoint_every = 3;
    let mut logs = Vec::new();
    let summary = train(
        &config,
        &TrainOptions {
            progress: false,
            phase_timings: true,
            ..TrainOptions::default()
        },
        &device,
        &mut |l: &str| logs.push(l.to_string()),
    )
    .unwrap();
    assert!(
        logs.iter().any(|l| l.contains("f32 master weights")),
        "{logs:?}"
    );
    assert_eq!(summary.losses.len(), 3);
    assert!(
        summary.losses.iter().all(|l| l.is_finite()),
        "{:?}",
        summary.losses
    );
    let metrics = std::fs::read_to_string(config.run.out.join("metrics.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 3);
    for row in &rows {
        let parts = [
            "compute_copy_s",
            "forward_backward_s",
            "grads_to_f32_s",
            "clip_s",
            "update_s",
        ];
        let mut sum = 0.0;
        for part in parts {
            let seconds = row["phases"][part]
                .as_f64()
                .unwrap_or_else(|| panic!("no phases.{part} in {row}"));
            assert!(seconds > 0.0, "phases.{part} = {seconds} in {row}");
            sum += seconds;
        }
        let step_s = row["step_s"].as_f64().unwrap();
        assert!(
            sum <= step_s,
            "the parts ({sum} s) exceed the step ({step_s} s): {row}"
        );
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn resuming_a_bf16_run_is_refused_with_the_way_out() {
    let device = bf16_device();
    let (tmp, mut config) = tiny_run("longview-master-resume");
    config.run.steps = 4;
    config.run.checkpoint_every = 2;
    let options = TrainOptions {
        progress: false,
        ..TrainOptions::default()
    };
    train(
        &config,
        &TrainOptions {
            stop_after: Some(2),
            ..options.clone()
        },
        &device,
        &mut |_: &str| {},
    )
    .unwrap();
    // Burn 0.22 reloads AdamW's state in the device dtype (bf16), which would meet the
    // f32 master's gradients: a clear error instead of a panic inside Burn.
    let err = train(
        &config,
        &TrainOptions {
            resume: true,
            ..options
        },
        &device,
        &mut |_: &str| {},
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("--dtype f32") && err.contains("not supported yet"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn a_bf16_grpo_run_updates_the_f32_master_weights() {
    // GRPO in bf16 compute: rollouts, old/reference/actor log-prob passes and AdamW
    // on f32 master weights (until now only run in f32).
    let device = bf16_device();
    let (tmp, mut config) = tiny_run("longview-master-grpo");
    config.model.stage = longview_train::Stage::Grpo;
    config.run.steps = 2;
    config.run.checkpoint_every = 2;
    config.data.frames = 1;
    config.data.min_frames = 1;
    config.data.eval_per_depth = 0;
    config.optim.lr = 1e-3;
    config.grpo.group_size = 8;
    config.grpo.max_response_tokens = 5;
    // A reward a random policy earns sometimes (the share of digits in the answer),
    // so that groups differ and every step updates.
    struct Digits;
    impl longview_train::grpo::reward::Reward for Digits {
        fn score(&self, response: &str, _truth: &str) -> longview_train::grpo::reward::Scored {
            let chars = response.chars().count().max(1) as f32;
            let digits = response.chars().filter(char::is_ascii_digit).count() as f32;
            longview_train::grpo::reward::Scored {
                total: digits / chars,
                accuracy: 0.0,
                format: 0.0,
            }
        }
    }
    let mut logs = Vec::new();
    let summary = longview_train::grpo::train_grpo_with(
        &config,
        &TrainOptions {
            progress: false,
            ..TrainOptions::default()
        },
        &device,
        &mut |l: &str| logs.push(l.to_string()),
        &Digits,
    )
    .unwrap();
    assert!(
        logs.iter().any(|l| l.contains("f32 master weights")),
        "{logs:?}"
    );
    assert_eq!(summary.reports.len(), 2);
    for r in &summary.reports {
        assert!(
            r.loss.is_finite() && r.kl.is_finite() && r.grad_norm.is_finite(),
            "{r:?}"
        );
        // Rollout and training forward in bf16 agree to bf16 rounding, not f32's.
        assert!(
            r.logprob_mismatch < 0.1,
            "log-prob mismatch {}",
            r.logprob_mismatch
        );
        println!(
            "step: loss {:.4} kl {:.4} grad norm {:.3} mismatch {:.2e}",
            r.loss, r.kl, r.grad_norm, r.logprob_mismatch
        );
    }
    // A step whose groups all score alike has only the KL term's (small) gradient.
    assert!(
        summary.reports.iter().any(|r| r.grad_norm > 1e-2),
        "a step with a clear gradient"
    );
    assert!(
        summary.reports.iter().all(|r| r.skipped_updates == 0),
        "no update skipped for a non-finite gradient"
    );
    assert!(summary.checkpoint.is_some());
    let _ = std::fs::remove_dir_all(&tmp);
}

/// Frames travel as f32 and are cast on the device (not converted on the host):
/// the batch's pixels are bf16, each value rounded to nearest-even as `half` rounds
/// (the host conversion they replace), for a whole sample and a range across two.
#[test]
fn frames_reach_a_bf16_device_as_bf16_rounded_to_nearest() {
    use burn::tensor::bf16;
    use longview_train::data::{Sample, collate, frames_tensor};
    let device = bf16_device();
    // Values bf16 cannot hold, spread over [-1, 1].
    let sample = |frames: usize, phase: f32| Sample {
        ids: vec![1, 2, 3],
        labels: vec![-100, 2, 3],
        pixels: (0..frames * 12)
            .map(|i| (i as f32 * 0.7391 + phase).sin())
            .collect::<Vec<f32>>()
            .into(),
        frames,
        side: 2,
        ..Default::default()
    };
    let (a, b) = (sample(2, 0.0), sample(3, 0.5));
    let rounded = |values: &[f32]| -> Vec<f32> {
        values.iter().map(|&v| bf16::from_f32(v).to_f32()).collect()
    };
    let host = |t: Tensor<4>| -> Vec<f32> {
        assert_eq!(t.dtype(), DType::BF16);
        t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
    };
    let batch = collate(&[&a], &device);
    let longview_models::VisualInput::Pixels(pixels) = batch.input.visual else {
        panic!("a sample with frames collates to pixels");
    };
    assert_eq!(host(pixels), rounded(&a.pixels));
    let mut across = a.pixels[12..].to_vec();
    across.extend_from_slice(&b.pixels[..24]);
    assert_eq!(
        host(frames_tensor(&[&a, &b], 1, 3, &device)),
        rounded(&across)
    );
}
