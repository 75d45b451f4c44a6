//! Training-loop tests on the CPU backend, one module per concern: the run folder
//! (resume, checkpoints, locks, event files), training samples, scoring and decoding,
//! the step's arithmetic, and stage settings. One test binary: every test takes the
//! shared lock (`common::serial`) before it initialises a model.

use std::path::Path;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor};
use longview_data::TextTokenizer;
use longview_models::VlmConfig;
use longview_models::vila::causal_lm_loss_sum;
use longview_train::data::{Encoder, collate, haystack};
use longview_train::remat::Recompute;
use longview_train::trainer::{global_grad_norm, model_config, scale_grads};
use longview_train::{OptimConfig, TrainConfig, TrainError, TrainOptions, learning_rate, train};

#[path = "../common/mod.rs"]
mod common;
use common::{TempDir, device, no_progress, quiet, serial};

mod optim;
mod run_folder;
mod samples;
mod scoring;
mod stages;

/// A run small enough for a unit test: 8-frame videos, 6 of them, 2 micro-batches of 2.
fn tiny(out: &Path, cache: &Path) -> TrainConfig {
    let mut config = TrainConfig::default();
    config.run.out = out.into();
    config.run.steps = 6;
    config.run.batch_size = 2;
    config.run.grad_accum = 2;
    config.run.checkpoint_every = 2;
    config.run.keep_checkpoints = 2;
    config.optim.warmup_steps = 2;
    config.optim.clip_grad_norm = 0.5;
    config.data.frames = 8;
    config.data.min_frames = 4;
    config.data.needle_copies = 1;
    config.data.eval_per_depth = 1;
    config.data.cache = Some(cache.into());
    config
}

/// Every gradient on the host, as f64.
fn host_grads<M: Module>(model: &M, grads: &GradientsParams) -> Vec<f64> {
    struct Collect<'a> {
        grads: &'a GradientsParams,
        out: Vec<f64>,
    }
    impl ModuleVisitor for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                let data = g.into_data().convert::<f32>();
                self.out
                    .extend(data.as_slice::<f32>().unwrap().iter().map(|&x| x as f64));
            }
        }
    }
    let mut c = Collect {
        grads,
        out: Vec::new(),
    };
    model.visit(&mut c);
    c.out
}

/// Haystack samples at the debug VLM's 40x40 input.
fn encoder<'a>(tokenizer: &'a TextTokenizer, vlm: &'a VlmConfig) -> Encoder<'a> {
    Encoder {
        tokenizer,
        template: longview_data::ChatTemplate::qwen2(),
        model: vlm,
        width: 40,
        height: 40,
    }
}
