//! Gradient and parameter helpers of the training loop: the learning-rate schedule,
//! AdamW with its decay groups, global-norm clipping, and the casts of mixed
//! precision (f32 master weights, bf16/f16 working copies).

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamGroup};
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{DType, Tensor};

use crate::adamw::TrainerAdamW;
use crate::config::OptimConfig;

/// Learning rate of step `step` (0-based): linear warmup to `lr`, then cosine decay to
/// `lr * min_lr_ratio` at the last step.
pub fn learning_rate(optim: &OptimConfig, step: usize, total: usize) -> f64 {
    if step < optim.warmup_steps {
        return optim.lr * (step + 1) as f64 / optim.warmup_steps as f64;
    }
    let span = total.saturating_sub(optim.warmup_steps + 1).max(1);
    let progress = ((step - optim.warmup_steps) as f64 / span as f64).min(1.0);
    let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    optim.lr * (optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * cosine)
}

/// Parameters that AdamW does not decay: biases and normalisation scales/shifts
/// (every one-dimensional parameter of the models), matched by module path.
pub const NO_DECAY: &str = r"\.(bias|gamma|beta)$";

/// AdamW with `optim.weight_decay` on weight matrices, embeddings and convolution
/// kernels, and no decay on [`NO_DECAY`] parameters (the usual split of
/// transformers' Trainer and Megatron).
pub fn optimizer(optim: &OptimConfig) -> ModuleOptimizer {
    let no_decay = ParamGroup::from_regex(NO_DECAY).expect("NO_DECAY is a valid regex");
    ModuleOptimizer::from(TrainerAdamW::new(optim, optim.weight_decay)).with_group(
        no_decay,
        TrainerAdamW::new(optim, 0.0),
        None,
    )
}

/// Global L2 norm of all gradients (one device sync).
pub fn global_grad_norm<M: Module>(model: &M, grads: &GradientsParams) -> f32 {
    struct Norm<'a> {
        grads: &'a GradientsParams,
        sum: Option<Tensor<1>>,
    }
    impl ModuleVisitor for Norm<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                let s = (g.clone() * g).sum();
                self.sum = Some(match self.sum.take() {
                    Some(acc) => acc + s,
                    None => s,
                });
            }
        }
    }
    let mut norm = Norm { grads, sum: None };
    model.visit(&mut norm);
    norm.sum.map_or(0.0, |s| s.into_scalar::<f32>().sqrt())
}

/// Multiplies every gradient by `factor`.
pub fn scale_grads<M: Module>(model: &M, grads: &mut GradientsParams, factor: f32) {
    struct Scale<'a> {
        grads: &'a mut GradientsParams,
        factor: f32,
    }
    impl ModuleVisitor for Scale<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.remove::<D>(param.id) {
                self.grads
                    .register::<D>(param.id, g.mul_scalar(self.factor));
            }
        }
    }
    model.visit(&mut Scale { grads, factor });
}

/// `module` with every float parameter cast to `dtype`, ids and gradient
/// requirements kept (mixed precision: the f32 master copy and its bf16/f16 working
/// copy share parameter ids, so the working copy's gradients name the master's
/// parameters).
pub fn cast_params<M: Module>(module: M, dtype: DType) -> M {
    struct Cast(DType);
    impl ModuleMapper for Cast {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let (id, value, mapper) = param.consume();
            if value.dtype() == self.0 {
                return Param::from_mapped_value(id, value, mapper);
            }
            let require_grad = value.is_require_grad();
            let value = value.cast(self.0).detach().set_require_grad(require_grad);
            Param::from_mapped_value(id, value, mapper)
        }
    }
    module.map(&mut Cast(dtype))
}

/// Casts every gradient of `model`'s parameters in `grads` to `dtype`.
pub fn cast_grads<M: Module>(model: &M, grads: &mut GradientsParams, dtype: DType) {
    struct Cast<'a> {
        grads: &'a mut GradientsParams,
        dtype: DType,
    }
    impl ModuleVisitor for Cast<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.remove::<D>(param.id) {
                self.grads.register::<D>(param.id, g.cast(self.dtype));
            }
        }
    }
    model.visit(&mut Cast { grads, dtype });
}

pub(crate) fn count_params<M: Module>(model: &M) -> (usize, usize) {
    struct Count {
        all: usize,
        trainable: usize,
    }
    impl ModuleVisitor for Count {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let n = param.lazy_shape().num_elements();
            self.all += n;
            if param.is_require_grad() {
                self.trainable += n;
            }
        }
    }
    let mut count = Count {
        all: 0,
        trainable: 0,
    };
    model.visit(&mut count);
    (count.all, count.trainable)
}
