//! Where a training step's time goes (`longview train --phase-timings`): the step cut
//! into its parts, each ended by a device synchronisation so that its kernels are
//! counted in it and not in a later part. The synchronisations stall the queue between
//! parts (the host stops running ahead of the device), so a step timed this way is a
//! little slower than one that is not; the parts are for finding what to speed up, the
//! untimed steps for the rate.

use std::time::Instant;

use burn::tensor::Device;
use serde::Serialize;

use crate::error::TrainError;

/// Seconds of each part of one step, in the order they run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StepPhases {
    /// The f32 master weights cast to the compute dtype (0 without master weights).
    pub compute_copy_s: f64,
    /// Forward and backward over the step's micro-batches (inputs uploaded, loss read).
    pub forward_backward_s: f64,
    /// The gradients cast back to f32 (0 without master weights).
    pub grads_to_f32_s: f64,
    /// The global gradient norm and, when it is over the limit, the clipping.
    pub clip_s: f64,
    /// The optimizer update (with a sharded optimizer: and the owners' broadcast).
    pub update_s: f64,
}

impl StepPhases {
    /// One line for the console: `copy 0.010 fwd+bwd 2.900 ...` in seconds.
    pub fn describe(&self) -> String {
        format!(
            "copy {:.3} fwd+bwd {:.3} grads-f32 {:.3} clip {:.3} update {:.3} s",
            self.compute_copy_s,
            self.forward_backward_s,
            self.grads_to_f32_s,
            self.clip_s,
            self.update_s
        )
    }
}

/// Laps between device synchronisations; does nothing when switched off.
pub(crate) struct PhaseClock<'a> {
    device: Option<&'a Device>,
    last: Instant,
}

impl<'a> PhaseClock<'a> {
    /// A clock that times (`on`) or only passes through.
    pub(crate) fn new(device: &'a Device, on: bool) -> Self {
        PhaseClock {
            device: on.then_some(device),
            last: Instant::now(),
        }
    }

    pub(crate) fn on(&self) -> bool {
        self.device.is_some()
    }

    /// Waits for the device's queued work and returns the seconds since the previous
    /// lap (0 when off, without waiting).
    pub(crate) fn lap(&mut self) -> Result<f64, TrainError> {
        let Some(device) = self.device else {
            return Ok(0.0);
        };
        device
            .sync()
            .map_err(|e| TrainError::Device(format!("synchronising to time a step: {e:?}")))?;
        let now = Instant::now();
        let seconds = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        Ok(seconds)
    }
}
