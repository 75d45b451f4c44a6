//! The trainer's AdamW: Burn's `AdamW` (burn-optim 0.22; AMSGrad and cautious decay
//! off), whose update is about fifteen elementwise launches a parameter tensor, each a
//! full pass over f32 tensors. Built with the `cuda` feature, an f32 parameter's update on
//! a CubeCL device runs instead as one kernel (`longview_kernels::fused::adamw_step`: the
//! same formula, checked against Burn's `AdamW` on wgpu in `kernels/tests/burn_op.rs`; on
//! an H100 it took the 1.5B 32k step from 3.52 to 3.32 s, `benchmarks/gemm.md`);
//! `LONGVIEW_FUSED_ADAMW=0` keeps Burn's update. The state is Burn's `AdamWState` either
//! way, so checkpoints and the sharded moments (`zero`) do not depend on which path ran,
//! and a run may switch between them on resume.

use burn::optim::{AdamW, AdamWConfig, AdamWState, Optimizer};
use burn::tensor::{Device, Tensor};

use crate::config::OptimConfig;

/// Burn's AdamW with the run's settings, with the fused update where it runs (module
/// docs).
#[derive(Clone)]
// The settings are read by the fused update only (the `cuda` feature).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub struct TrainerAdamW {
    burn: AdamW,
    beta_1: f32,
    beta_2: f32,
    epsilon: f32,
    weight_decay: f32,
}

impl TrainerAdamW {
    /// With the run's betas and epsilon and this group's weight decay (no gradient
    /// clipping here: the trainer clips).
    pub fn new(optim: &OptimConfig, weight_decay: f64) -> Self {
        let (beta_1, beta_2) = (optim.beta1 as f32, optim.beta2 as f32);
        let (epsilon, weight_decay) = (optim.eps as f32, weight_decay as f32);
        let burn = AdamWConfig::new()
            .with_beta_1(beta_1)
            .with_beta_2(beta_2)
            .with_epsilon(epsilon)
            .with_weight_decay(weight_decay)
            .build();
        TrainerAdamW {
            burn,
            beta_1,
            beta_2,
            epsilon,
            weight_decay,
        }
    }

    /// The fused update, or `None` where it does not run (not built with `cuda`, not
    /// switched on, or a tensor the kernel does not take).
    #[allow(unused_variables)]
    fn fused_step<const D: usize>(
        &self,
        lr: f64,
        tensor: &Tensor<D>,
        grad: &Tensor<D>,
        state: Option<&AdamWState<D>>,
    ) -> Option<(Tensor<D>, AdamWState<D>)> {
        #[cfg(feature = "cuda")]
        {
            use burn::optim::AdaptiveMomentumState;
            use longview_kernels::fused::{AdamWStep, adamw_step};
            if !fused_enabled() {
                return None;
            }
            let time = state.map_or(1, |s| s.momentum.time + 1);
            let step = AdamWStep {
                lr,
                beta_1: self.beta_1,
                beta_2: self.beta_2,
                epsilon: self.epsilon,
                weight_decay: self.weight_decay,
                time,
            };
            let moments = state.map(|s| (s.momentum.moment_1.clone(), s.momentum.moment_2.clone()));
            let (param, m, v) = adamw_step(tensor.clone(), grad.clone(), moments, step)?;
            Some((
                param,
                AdamWState::new(AdaptiveMomentumState::new(time, m, v)),
            ))
        }
        #[cfg(not(feature = "cuda"))]
        None
    }
}

/// Whether the fused update runs: unless `LONGVIEW_FUSED_ADAMW=0` (read once).
#[cfg(feature = "cuda")]
fn fused_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("LONGVIEW_FUSED_ADAMW").map_or(true, |v| v != "0"))
}

impl Optimizer for TrainerAdamW {
    type State<const D: usize> = AdamWState<D>;

    fn step<const D: usize>(
        &self,
        lr: f64,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        if let Some((param, state)) = self.fused_step(lr, &tensor, &grad, state.as_ref()) {
            return (param, Some(state));
        }
        self.burn.step(lr, tensor, grad, state)
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        <AdamW as Optimizer>::to_device(state, device)
    }
}
