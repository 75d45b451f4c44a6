//! ZeRO stage 1 over a run's ranks (`run.shard_optimizer`, Megatron's "distributed
//! optimizer"): every trainable parameter has one owner rank, which alone keeps its
//! AdamW moments and applies its update; the updated values are then broadcast from
//! their owners, so every rank holds the whole model again for the next step.
//!
//! The gradients are still all-reduced whole (`grad_sync`), then each rank drops the
//! ones it does not own before the optimizer step. Only the moments are sharded: with
//! 16-bit compute a rank keeps 4 (f32 master) + 2 (working copy) + 4 (f32 gradient) +
//! 8 / N (moments) bytes per trained parameter instead of 18; at the 7B shape (8058 M
//! parameters) 90.1 GiB on 4 ranks and 75.3 GiB on 256 instead of 135.1 GiB. The f32
//! master weights stay whole on every rank (Megatron's distributed optimizer shards
//! them too; not built here).
//!
//! Ownership is greedy by size over the trainable parameters in the module's
//! parameter order (largest first, to the rank with the fewest elements so far), the
//! same on every rank since all hold the same model; it never depends on parameter
//! ids, which differ between ranks of a fresh run.
//!
//! Checkpoints: at a checkpoint step every rank stages its shard, the moments
//! (`optimizer-RRR-of-WWW.bpk`, keyed by this rank's parameter ids) and those ids
//! (`param_ids-RRR-of-WWW.json`), in `checkpoints/.step-NNNNNN.shards/`; after every
//! rank has reported success the writer moves them into the checkpoint folder before
//! it is renamed into place, so a checkpoint is complete or absent (`run.out` must be
//! on a file system every rank sees, as resuming already requires; a shard the writer
//! cannot find is an error naming the rank). A sharded
//! checkpoint resumes on the same number of ranks only; anything else is refused with
//! the counts (`shard_files`).

use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor};
use longview_comm::Communicator;
use longview_models::{Vlm, VlmConfig};

use crate::checkpoint::{self, OptimizerState, TrainerState};
use crate::error::TrainError;
use crate::grad_sync::broadcast_params_from;
use crate::trainer::StepRunner;

/// One rank's shard of a sharded optimizer state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardId {
    pub rank: usize,
    pub world: usize,
}

impl ShardId {
    /// The moments file of this shard in a checkpoint.
    pub fn optimizer_file(&self) -> String {
        format!("optimizer-{:03}-of-{:03}.bpk", self.rank, self.world)
    }

    /// The parameter ids the moments are keyed by (this rank's).
    pub fn ids_file(&self) -> String {
        format!("param_ids-{:03}-of-{:03}.json", self.rank, self.world)
    }
}

/// The sizes of `model`'s trainable parameters, in parameter order.
fn trainable_sizes<M: Module>(model: &M) -> Vec<usize> {
    struct Sizes(Vec<usize>);
    impl ModuleVisitor for Sizes {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if param.is_require_grad() {
                self.0.push(param.lazy_shape().num_elements());
            }
        }
    }
    let mut sizes = Sizes(Vec::new());
    model.visit(&mut sizes);
    sizes.0
}

/// The owner rank of every trainable parameter of `model` (in parameter order) over
/// `world` ranks.
pub fn owners<M: Module>(model: &M, world: usize) -> Vec<usize> {
    let sizes = trainable_sizes(model);
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    // Largest first; equal sizes in parameter order (a stable sort).
    order.sort_by_key(|&i| std::cmp::Reverse(sizes[i]));
    let mut load = vec![0usize; world.max(1)];
    let mut owner = vec![0usize; sizes.len()];
    for i in order {
        let least = (0..load.len())
            .min_by_key(|&r| (load[r], r))
            .expect("a rank");
        owner[i] = least;
        load[least] += sizes[i];
    }
    owner
}

/// `grads` with only the gradients of the parameters `rank` owns.
pub fn keep_owned<M: Module>(
    model: &M,
    owners: &[usize],
    rank: usize,
    mut grads: GradientsParams,
) -> GradientsParams {
    struct Drop<'a> {
        owners: std::slice::Iter<'a, usize>,
        rank: usize,
        grads: &'a mut GradientsParams,
    }
    impl ModuleVisitor for Drop<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if !param.is_require_grad() {
                return;
            }
            if self.owners.next() != Some(&self.rank) {
                let _ = self.grads.remove::<D>(param.id);
            }
        }
    }
    model.visit(&mut Drop {
        owners: owners.iter(),
        rank,
        grads: &mut grads,
    });
    grads
}

/// One AdamW step of a sharded optimizer: this rank updates the parameters it owns
/// (and keeps only their moments), then every parameter is broadcast from its owner.
pub fn sharded_step<M: Module, C: Communicator>(
    optim: &mut ModuleOptimizer,
    lr: f64,
    model: M,
    grads: GradientsParams,
    comm: &C,
) -> Result<M, TrainError> {
    let owners = owners(&model, comm.world_size());
    let grads = keep_owned(&model, &owners, comm.rank(), grads);
    let model = optim.step(lr, model, grads);
    let mut next = owners.into_iter();
    broadcast_params_from(
        model,
        comm,
        "updated weights from their owners",
        &mut |trains| if trains { next.next() } else { None },
    )
}

/// The folder where the ranks stage their shards of step `step`'s checkpoint.
fn staging(out: &Path, step: usize) -> PathBuf {
    checkpoint::root(out).join(format!(".step-{step:06}.shards"))
}

/// Writes this rank's shard (moments and the ids they are keyed by) into the staging
/// folder of `step`, synced.
fn stage_shard(
    out: &Path,
    step: usize,
    shard: ShardId,
    optim: &ModuleOptimizer,
    model: &Vlm,
) -> Result<PathBuf, TrainError> {
    let dir = staging(out, step);
    std::fs::create_dir_all(&dir).map_err(TrainError::io(&dir))?;
    let moments = dir.join(shard.optimizer_file());
    optim.save(&moments).map_err(|e| {
        TrainError::checkpoint(&moments, format!("writing the optimizer shard: {e}"))
    })?;
    let ids = dir.join(shard.ids_file());
    let json = serde_json::to_vec_pretty(&checkpoint::param_ids(model))
        .map_err(|e| TrainError::checkpoint(&ids, e.to_string()))?;
    std::fs::write(&ids, json).map_err(TrainError::io(&ids))?;
    for file in [&moments, &ids] {
        std::fs::File::open(file)
            .and_then(|f| f.sync_all())
            .map_err(TrainError::io(file))?;
    }
    Ok(dir)
}

/// Moves the `world` staged shards into the checkpoint folder being written.
pub(crate) fn move_shards(staged: &Path, partial: &Path, world: usize) -> Result<(), TrainError> {
    for rank in 0..world {
        let shard = ShardId { rank, world };
        for name in [shard.optimizer_file(), shard.ids_file()] {
            let from = staged.join(&name);
            if !from.is_file() {
                return Err(TrainError::checkpoint(
                    staged,
                    format!("rank {rank}'s optimizer shard {name} is missing"),
                ));
            }
            let to = partial.join(&name);
            std::fs::rename(&from, &to).map_err(TrainError::io(&to))?;
        }
    }
    std::fs::remove_dir_all(staged).map_err(TrainError::io(staged))?;
    Ok(())
}

/// The optimizer file a rank resumes from in checkpoint `dir` and, for a shard, the
/// ids file its moments are keyed by. Refuses a layout other than the one written.
pub(crate) fn shard_files(
    dir: &Path,
    shard: Option<ShardId>,
) -> Result<(PathBuf, Option<PathBuf>), TrainError> {
    let written = written_shards(dir)?;
    let whole = dir.join("optimizer.bpk");
    match (shard, written) {
        (None, None) => Ok((whole, None)),
        (Some(shard), Some(world)) if world == shard.world => Ok((
            dir.join(shard.optimizer_file()),
            Some(dir.join(shard.ids_file())),
        )),
        (Some(shard), Some(world)) => Err(TrainError::checkpoint(
            dir,
            format!(
                "holds the optimizer state in {world} shards (run.shard_optimizer over {world} \
                 ranks) but this run has {} ranks; resume on {world} ranks",
                shard.world
            ),
        )),
        (Some(shard), None) => Err(TrainError::checkpoint(
            dir,
            format!(
                "holds the whole optimizer state in one file (optimizer.bpk) but this run \
                 shards it over {} ranks (run.shard_optimizer = true); resume with \
                 run.shard_optimizer = false",
                shard.world
            ),
        )),
        (None, Some(world)) => Err(TrainError::checkpoint(
            dir,
            format!(
                "holds the optimizer state in {world} shards (run.shard_optimizer over \
                 {world} ranks); resume on {world} ranks with run.shard_optimizer = true"
            ),
        )),
    }
}

/// How many shards the optimizer state of checkpoint `dir` was written in (`None`
/// for one whole file).
fn written_shards(dir: &Path) -> Result<Option<usize>, TrainError> {
    let entries = std::fs::read_dir(dir).map_err(TrainError::io(dir))?;
    for entry in entries {
        let name = entry.map_err(TrainError::io(dir))?.file_name();
        let name = name.to_string_lossy();
        let world = name
            .strip_prefix("optimizer-")
            .and_then(|n| n.strip_suffix(".bpk"))
            .and_then(|n| n.split_once("-of-"))
            .and_then(|(_, w)| w.parse::<usize>().ok());
        if let Some(world) = world {
            return Ok(Some(world));
        }
    }
    Ok(None)
}

/// What a checkpoint of a run holds besides its optimizer state.
pub(crate) struct CheckpointOf<'a> {
    pub out: &'a Path,
    pub model: &'a Vlm,
    pub config: &'a VlmConfig,
    pub state: &'a TrainerState,
    pub tokenizer_json: &'a str,
    pub keep: usize,
}

/// Writes the checkpoint of `of.state.step`. Every rank calls it: with a sharded
/// optimizer each rank stages its shard and the writer goes on only when all have;
/// otherwise the writer alone writes. Returns the folder on the writer.
pub(crate) fn save_checkpoint(
    of: CheckpointOf<'_>,
    optim: &ModuleOptimizer,
    runner: &dyn StepRunner,
    device: &Device,
) -> Result<Option<PathBuf>, TrainError> {
    let save = |optimizer: OptimizerState<'_>| {
        checkpoint::save(
            of.out,
            of.model,
            of.config,
            optimizer,
            of.state,
            of.tokenizer_json,
            of.keep,
        )
    };
    let Some(shard) = runner.optimizer_shard() else {
        return match runner.writes() {
            true => save(OptimizerState::Whole(optim)).map(Some),
            false => Ok(None),
        };
    };
    let step = of.state.step;
    let staged = stage_shard(of.out, step, shard, optim, of.model);
    let others_failed = runner.any_failed(staged.is_err(), device)?;
    let staged = staged?;
    if others_failed {
        return Err(TrainError::checkpoint(
            &staged,
            format!(
                "another rank could not write its optimizer shard of step {step} (see its log)"
            ),
        ));
    }
    match runner.writes() {
        true => save(OptimizerState::Shards {
            staged,
            world: shard.world,
        })
        .map(Some),
        false => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use longview_models::VlmConfig;

    use super::*;

    #[test]
    fn owners_cover_every_trainable_parameter_once_and_balance_the_ranks() {
        let model = VlmConfig::debug().init(&Device::flex().autodiff());
        let sizes = trainable_sizes(&model);
        assert!(sizes.len() > 10);
        let largest = *sizes.iter().max().unwrap();
        for world in 1..=5 {
            let owner = owners(&model, world);
            assert_eq!(owner.len(), sizes.len());
            let mut load = vec![0usize; world];
            for (&rank, &size) in owner.iter().zip(&sizes) {
                assert!(rank < world);
                load[rank] += size;
            }
            // Greedy largest-first: no rank exceeds another by more than one tensor.
            let (min, max) = (load.iter().min().unwrap(), load.iter().max().unwrap());
            assert!(max - min <= largest, "{world} ranks: loads {load:?}");
            assert!(load.iter().all(|&l| l > 0), "{world} ranks: loads {load:?}");
        }
    }
}
