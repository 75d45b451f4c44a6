//! What the trainer's test binaries share: the lock every test takes before it
//! initialises a model, a temporary folder, the autodiff CPU device, and quiet runs.
#![allow(dead_code)] // each test binary uses a part

use std::path::PathBuf;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Distribution, Tensor};
use longview_models::{Vlm, VlmConfig};
use longview_train::TrainError;
use longview_train::TrainOptions;
use longview_train::grpo::logprobs::{ResponseLogprobs, Rollout};

/// Burn's device RNG is one per process and model parameters are drawn lazily, on
/// first use: two models initialising at once in one process (tests run on several
/// threads) interleave their draws, and the same seed then gives different weights.
/// A training run is one process in real use; here every test takes this lock.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A folder under the system's temporary directory, emptied first and removed when
/// dropped; `tag` and the process id name it.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("longview-train-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The CPU device with autodiff.
pub fn device() -> Device {
    Device::flex().autodiff()
}

/// A log sink that drops every line.
pub fn quiet() -> impl FnMut(&str) {
    |_: &str| {}
}

/// Run options without a progress bar.
pub fn no_progress() -> TrainOptions {
    TrainOptions {
        progress: false,
        ..TrainOptions::default()
    }
}

/// Asserts that `got` and `want` agree on the gradient of every parameter of `model`,
/// within `tolerance` of the largest |want| of its tensor (at least 1e-3); a missing
/// gradient counts as zeros (an all-reduce fills in the parameters a rank did not
/// reach). Returns how many parameters had a nonzero gradient on either side.
/// `label` names the case in a failure.
pub fn assert_grads_close<M: Module>(
    model: &M,
    got: &GradientsParams,
    want: &GradientsParams,
    tolerance: f32,
    label: &str,
) -> usize {
    struct Compare<'a> {
        got: &'a GradientsParams,
        want: &'a GradientsParams,
        tolerance: f32,
        label: &'a str,
        compared: usize,
    }
    impl ModuleVisitor for Compare<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let host = |g: Option<Tensor<D>>| -> Vec<f32> {
                let n = param.shape().num_elements();
                g.map_or(vec![0.0; n], |g| g.into_data().iter::<f32>().collect())
            };
            let got = host(self.got.get::<D>(param.id));
            let want = host(self.want.get::<D>(param.id));
            if got.iter().chain(&want).all(|&x| x == 0.0) {
                return;
            }
            let scale = want.iter().fold(1e-3f32, |m, x| m.max(x.abs()));
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs() / scale)
                .fold(0.0f32, f32::max);
            assert!(
                worst <= self.tolerance,
                "{}: parameter {:?}: {worst:.2e}",
                self.label,
                param.shape()
            );
            self.compared += 1;
        }
    }
    let mut compare = Compare {
        got,
        want,
        tolerance,
        label,
        compared: 0,
    };
    model.visit(&mut compare);
    compare.compared
}

/// A GRPO group for the actor-pass tests: the debug VLM (seeded), a prompt with two
/// frames' placeholders between text, three responses of lengths 4, 1 and 2 (padding
/// inside the batch, a total zigzag does not divide) and the frames' visual tokens,
/// cached (constants of the pass, as in a GRPO update).
pub struct ActorCase {
    pub config: VlmConfig,
    pub model: Vlm,
    pub device: Device,
    pub prompt: Vec<u32>,
    pub responses: Vec<Vec<u32>>,
    pub visual: Tensor<3>,
}

impl ActorCase {
    pub fn new(seed: u64) -> Self {
        let device = Device::flex().autodiff();
        device.seed(seed);
        let config = VlmConfig::debug();
        let model = config.init(&device);
        let mut prompt: Vec<u32> = vec![4, 9];
        prompt.extend(std::iter::repeat_n(
            model.placeholder_token_id,
            2 * config.tokens_per_frame(),
        ));
        prompt.extend([11, 6]);
        let responses = vec![vec![20, 21, 22, 23], vec![30], vec![40, 41]];
        let side = config.vision.image_size;
        let pixels =
            Tensor::<4>::random([2, 3, side, side], Distribution::Normal(0.0, 1.0), &device);
        let visual = model.valid().encode_frames(pixels.inner()).autodiff();
        ActorCase {
            config,
            model,
            device,
            prompt,
            responses,
            visual,
        }
    }

    pub fn rollout(&self) -> Rollout<'_> {
        Rollout {
            prompt: &self.prompt,
            visual: Some(&self.visual),
            responses: &self.responses,
            temperature: 0.8,
        }
    }
}

/// A loss of the actor's log-probs that is not linear in them (so the head's backward
/// matters) but a sum over tokens (so ranks' losses on their own tokens add up to the
/// one-device loss); its value as the one statistic.
pub fn nonlinear_loss(actor: ResponseLogprobs) -> Result<(Tensor<1>, Vec<f32>), TrainError> {
    let logp = actor.logp;
    let loss = logp.clone().mul_scalar(0.7).sum() + (logp.clone() * logp).sum().mul_scalar(0.1);
    let value = loss.clone().inner().into_scalar::<f32>();
    Ok((loss, vec![value]))
}
