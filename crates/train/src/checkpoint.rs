//! Resumable checkpoints.
//!
//! ```text
//! <out>/checkpoints/
//!   step-000100/
//!     model/            VILA layout (config.json, llm/, vision_tower/, mm_projector/), f32
//!     optimizer.bpk     AdamW moments (burnpack, keyed by parameter id)
//!     param_ids.json    module path -> parameter id, so the moments find their tensors
//!     (sharded optimizer, `crate::zero`: optimizer-RRR-of-WWW.bpk and
//!      param_ids-RRR-of-WWW.json per rank instead of optimizer.bpk)
//!     trainer.json      step, data position, seed, losses so far, the run's config
//!   latest              the name of the newest complete checkpoint
//! ```
//!
//! A checkpoint is written into `.step-NNNNNN.partial/`, every file is synced, and the
//! folder is renamed into place; only then is `latest` replaced (write + rename). A crash
//! at any point leaves the previous `latest` intact; leftover `.partial` folders are
//! removed by the next run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::ModuleOptimizer;
use burn::tensor::{DType, Device, Tensor};
use longview_models::hf::checkpoint::{
    KeyMap, SaveOptions, load_into, load_vila, save_component, save_vila,
};
use longview_models::vila::lora::AttentionLora;
use longview_models::{Vlm, VlmConfig};
use serde::{Deserialize, Serialize};

use crate::error::TrainError;

/// Bumped when the checkpoint layout changes.
pub const FORMAT_VERSION: u32 = 1;

/// Trainer bookkeeping saved with every checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub format_version: u32,
    /// Optimizer steps completed.
    pub step: usize,
    /// Samples consumed from the data stream (the next one is at this position).
    pub samples_seen: usize,
    pub tokens_seen: u64,
    /// Seed of the run (initialisation and data order).
    pub seed: u64,
    /// Mean loss of every completed step.
    pub losses: Vec<f32>,
    /// Seconds spent training so far.
    pub elapsed_s: f64,
    /// The run's config (TOML) when the checkpoint was written.
    pub config: String,
    /// Samples skipped so far (unusable, replaced by substitutes; `skipped.jsonl`).
    #[serde(default)]
    pub skipped: usize,
}

/// Folder holding a run's checkpoints.
pub fn root(out: &Path) -> PathBuf {
    out.join("checkpoints")
}

/// The newest complete checkpoint under `out`, if any.
pub fn latest(out: &Path) -> Result<Option<PathBuf>, TrainError> {
    Ok(longview_infer::load::latest_checkpoint(out)?)
}

/// Removes `.partial` folders a crashed run left behind; returns their names.
pub fn clean_partial(out: &Path) -> Result<Vec<String>, TrainError> {
    let root = root(out);
    let mut removed = Vec::new();
    if !root.exists() {
        return Ok(removed);
    }
    for entry in std::fs::read_dir(&root).map_err(TrainError::io(&root))? {
        let entry = entry.map_err(TrainError::io(&root))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(step) = name.strip_prefix('.').and_then(|n| n.strip_suffix(".old")) {
            // A crash while replacing step folder `step`: the old copy goes back
            // when the new one never arrived.
            let done = root.join(step);
            if done.exists() {
                std::fs::remove_dir_all(entry.path()).map_err(TrainError::io(entry.path()))?;
            } else {
                std::fs::rename(entry.path(), &done).map_err(TrainError::io(&done))?;
            }
            removed.push(name);
            continue;
        }
        // `.partial`: a checkpoint being written; `.shards`: optimizer shards staged
        // for one (`crate::zero`).
        if name.ends_with(".partial") || name.ends_with(".shards") {
            std::fs::remove_dir_all(entry.path()).map_err(TrainError::io(entry.path()))?;
            removed.push(name);
        }
    }
    Ok(removed)
}

/// Where a checkpoint's optimizer state comes from.
pub enum OptimizerState<'a> {
    /// The whole state, written as `optimizer.bpk`.
    Whole(&'a ModuleOptimizer),
    /// `world` ranks' shards already staged in `staged` (`crate::zero`), moved in.
    Shards { staged: PathBuf, world: usize },
}

/// Writes a checkpoint of `step` atomically, points `latest` at it and keeps the
/// newest `keep` checkpoints. Returns its folder.
#[allow(clippy::too_many_arguments)]
pub fn save(
    out: &Path,
    model: &Vlm,
    config: &VlmConfig,
    optimizer: OptimizerState<'_>,
    state: &TrainerState,
    tokenizer_json: &str,
    keep: usize,
) -> Result<PathBuf, TrainError> {
    let root = root(out);
    std::fs::create_dir_all(&root).map_err(TrainError::io(&root))?;
    let name = format!("step-{:06}", state.step);
    let partial = root.join(format!(".{name}.partial"));
    let done = root.join(&name);
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(TrainError::io(&partial))?;
    }
    std::fs::create_dir_all(&partial).map_err(TrainError::io(&partial))?;
    let needed = estimated_bytes(model.num_params());
    if let Some(free) = free_bytes(&root)
        && let Err(message) = room_for(needed, free)
    {
        let _ = std::fs::remove_dir_all(&partial);
        let newest = newest_note(out);
        return Err(TrainError::checkpoint(
            &done,
            format!("{message} on the file system of {}{newest}", root.display()),
        ));
    }

    if let Err(e) = write_contents(&partial, model, config, optimizer, state, tokenizer_json) {
        // A full disk or a failing device: no unfinished folder is left behind.
        let _ = std::fs::remove_dir_all(&partial);
        let newest = newest_note(out);
        return Err(TrainError::checkpoint(
            &done,
            format!("writing it failed ({e}); its unfinished folder was removed{newest}"),
        ));
    }

    // A resumed run writing the same step again replaces the old copy: moved aside
    // first, so that one complete copy exists at every moment.
    let old = root.join(format!(".{name}.old"));
    if done.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(TrainError::io(&old))?;
        }
        std::fs::rename(&done, &old).map_err(TrainError::io(&done))?;
    }
    std::fs::rename(&partial, &done).map_err(TrainError::io(&done))?;
    sync_dir(&root)?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(TrainError::io(&old))?;
    }
    let pointer = root.join("latest");
    let tmp = root.join(".latest.tmp");
    std::fs::write(&tmp, &name).map_err(TrainError::io(&tmp))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(TrainError::io(&tmp))?;
    std::fs::rename(&tmp, &pointer).map_err(TrainError::io(&pointer))?;
    sync_dir(&root)?;
    prune(&root, &name, keep)?;
    Ok(done)
}

/// "; the newest complete checkpoint is ..." for an error message (empty when none).
fn newest_note(out: &Path) -> String {
    match latest(out) {
        Ok(Some(dir)) => format!("; the newest complete checkpoint is {}", dir.display()),
        _ => String::new(),
    }
}

/// Bytes a checkpoint of `params` parameters takes at most: the f32 weights, AdamW's
/// two f32 moments, 64 MiB for the rest (tokenizer, configs, trainer state).
pub fn estimated_bytes(params: usize) -> u64 {
    params as u64 * 4 * 3 + (64 << 20)
}

/// `Err` with the numbers when `needed` bytes do not fit in `free` (checked before a
/// checkpoint is written, so a full disk stops the run with the reason instead of a
/// half-written folder and a failed write minutes later).
pub fn room_for(needed: u64, free: u64) -> Result<(), String> {
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    if needed > free {
        return Err(format!(
            "not enough free space for the checkpoint: about {:.2} GiB needed (f32 weights and \
             optimizer moments), {:.2} GiB free; free some space, lower run.keep_checkpoints or \
             point run.out at a larger disk",
            gib(needed),
            gib(free)
        ));
    }
    Ok(())
}

/// Free bytes for an unprivileged writer on the file system holding `dir` (`None` when
/// the system cannot say).
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut stats = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a NUL-terminated string; statvfs fills `stats` on success.
    let status = unsafe { libc::statvfs(path.as_ptr(), stats.as_mut_ptr()) };
    if status != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so `stats` is initialised.
    let stats = unsafe { stats.assume_init() };
    // The field types differ across platforms (u64 on x86_64 Linux, u32 elsewhere).
    #[allow(clippy::unnecessary_cast)]
    Some(stats.f_bavail as u64 * stats.f_frsize as u64)
}

/// Everything a checkpoint holds, written into `partial` (then synced).
fn write_contents(
    partial: &Path,
    model: &Vlm,
    config: &VlmConfig,
    optimizer: OptimizerState<'_>,
    state: &TrainerState,
    tokenizer_json: &str,
) -> Result<(), TrainError> {
    let model_dir = partial.join("model");
    let options = SaveOptions {
        dtype: DType::F32,
        max_shard_bytes: Some(5 << 30),
    };
    if model.llm.has_lora() {
        // model/ holds the merged weights (a plain VILA model for eval and
        // inference); lora/ the adapters, to give the base weights back on resume.
        let merged = Vlm {
            llm: model.llm.clone().merge_lora(),
            ..model.clone()
        };
        save_vila(&merged, config, &model_dir, options)?;
        let adapters = adapters(model);
        let first = &adapters[0].q;
        let rank = first.lora_a.weight.dims()[1];
        let meta = serde_json::json!({
            "peft_type": "LORA",
            "r": rank,
            "lora_alpha": first.scale * rank as f64,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        });
        save_component(
            &adapters,
            &meta,
            &partial.join("lora"),
            KeyMap::Qwen2,
            options,
        )?;
    } else {
        save_vila(model, config, &model_dir, options)?;
    }
    let tokenizer = model_dir.join("llm").join("tokenizer.json");
    std::fs::write(&tokenizer, tokenizer_json).map_err(TrainError::io(&tokenizer))?;
    match optimizer {
        OptimizerState::Whole(optimizer) => {
            let optim = partial.join("optimizer.bpk");
            optimizer.save(&optim).map_err(|e| {
                TrainError::checkpoint(&optim, format!("writing the optimizer state: {e}"))
            })?;
        }
        OptimizerState::Shards { staged, world } => {
            crate::zero::move_shards(&staged, partial, world)?;
        }
    }
    write_json(&partial.join("param_ids.json"), &param_ids(model))?;
    write_json(&partial.join("trainer.json"), state)?;
    sync_tree(partial)?;
    Ok(())
}

/// The newest complete checkpoint of `out` older than `dir` (what to resume from
/// when `dir` turns out to be damaged).
pub fn previous(out: &Path, dir: &Path) -> Option<PathBuf> {
    let step_of =
        |p: &Path| -> Option<u64> { p.file_name()?.to_str()?.strip_prefix("step-")?.parse().ok() };
    let current = step_of(dir)?;
    std::fs::read_dir(root(out))
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("trainer.json").is_file())
        .filter_map(|p| Some((step_of(&p)?, p)))
        .filter(|(step, _)| *step < current)
        .max_by_key(|(step, _)| *step)
        .map(|(_, p)| p)
}

/// A loaded checkpoint.
pub struct Loaded {
    pub model: Vlm,
    pub config: VlmConfig,
    pub optimizer: ModuleOptimizer,
    pub state: TrainerState,
}

/// Loads a checkpoint folder: weights with their original parameter ids, the
/// optimizer state (into `optimizer`, freshly configured; with `shard`, that rank's
/// shard of a sharded state, the weights taking the ids its moments are keyed by)
/// and the trainer state.
pub fn load(
    dir: &Path,
    optimizer: ModuleOptimizer,
    shard: Option<crate::zero::ShardId>,
    device: &Device,
) -> Result<Loaded, TrainError> {
    let (optim, shard_ids) = crate::zero::shard_files(dir, shard)?;
    let state: TrainerState = read_json(&dir.join("trainer.json"))?;
    if state.format_version != FORMAT_VERSION {
        return Err(TrainError::checkpoint(
            dir.join("trainer.json"),
            format!(
                "format_version {} (this build reads {FORMAT_VERSION})",
                state.format_version
            ),
        ));
    }
    let (mut model, config) = load_vila(&dir.join("model"), device)?;
    let lora_dir = dir.join("lora");
    if lora_dir.exists() {
        let meta_path = lora_dir.join("config.json");
        let meta: serde_json::Value = read_json(&meta_path)?;
        let (rank, alpha) = match (meta["r"].as_u64(), meta["lora_alpha"].as_f64()) {
            (Some(r), Some(a)) if r > 0 => (r as usize, a),
            _ => {
                return Err(TrainError::checkpoint(
                    &meta_path,
                    "needs a positive `r` and a `lora_alpha`",
                ));
            }
        };
        let mut llm = model.llm.with_lora(rank, alpha, 0, device);
        let mut loaded: Vec<AttentionLora> = llm
            .model
            .layers
            .iter_mut()
            .map(|l| l.self_attn.lora.take().expect("with_lora added adapters"))
            .collect();
        load_into(&mut loaded, &lora_dir, KeyMap::Qwen2, DType::F32)?;
        model.llm = llm.unmerge_lora(loaded);
    }
    let ids_path = dir.join("param_ids.json");
    let ids: BTreeMap<String, u64> = read_json(&ids_path)?;
    let mut model =
        restore_param_ids(model, &ids).map_err(|m| TrainError::checkpoint(&ids_path, m))?;
    if let Some(ids_path) = shard_ids {
        let ids: BTreeMap<String, u64> = read_json(&ids_path)?;
        model = restore_param_ids(model, &ids).map_err(|m| TrainError::checkpoint(&ids_path, m))?;
    }
    let optimizer = optimizer
        .load(&optim)
        .map_err(|e| TrainError::checkpoint(&optim, format!("reading the optimizer state: {e}")))?;
    Ok(Loaded {
        model,
        config,
        optimizer,
        state,
    })
}

/// Module path (`llm.layers.0.self_attn.q_proj.weight`) to parameter id.
/// The adapters of every layer (the model has LoRA).
fn adapters(model: &Vlm) -> Vec<AttentionLora> {
    model
        .llm
        .model
        .layers
        .iter()
        .map(|l| l.self_attn.lora.clone().expect("every layer has adapters"))
        .collect()
}

pub fn param_ids<M: Module>(module: &M) -> BTreeMap<String, u64> {
    struct Collect {
        path: Vec<String>,
        ids: BTreeMap<String, u64>,
    }
    impl ModuleVisitor for Collect {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.into());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.ids.insert(self.path.join("."), param.id.val());
        }
    }
    let mut collect = Collect {
        path: Vec::new(),
        ids: BTreeMap::new(),
    };
    module.visit(&mut collect);
    collect.ids
}

/// Gives every float parameter the id recorded for its path; every parameter must be
/// in `ids` and every entry must be used.
pub fn restore_param_ids<M: Module>(module: M, ids: &BTreeMap<String, u64>) -> Result<M, String> {
    struct Restore<'a> {
        path: Vec<String>,
        ids: &'a BTreeMap<String, u64>,
        used: usize,
        missing: Vec<String>,
    }
    impl ModuleMapper for Restore<'_> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.into());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let path = self.path.join(".");
            match self.ids.get(&path) {
                Some(&id) => {
                    self.used += 1;
                    let (_, value, mapper) = param.consume();
                    Param::from_mapped_value(ParamId::from(id), value, mapper)
                }
                None => {
                    self.missing.push(path);
                    param
                }
            }
        }
    }
    let mut restore = Restore {
        path: Vec::new(),
        ids,
        used: 0,
        missing: Vec::new(),
    };
    let module = module.map(&mut restore);
    if !restore.missing.is_empty() {
        return Err(format!(
            "no id for {} parameter(s), e.g. `{}`: the checkpoint belongs to another model shape",
            restore.missing.len(),
            restore.missing[0]
        ));
    }
    if restore.used != ids.len() {
        return Err(format!(
            "{} ids but the model has {} parameters: the checkpoint belongs to another model shape",
            ids.len(),
            restore.used
        ));
    }
    Ok(module)
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), TrainError> {
    let text = serde_json::to_string_pretty(value).expect("checkpoint metadata serialises");
    std::fs::write(path, text).map_err(TrainError::io(path))
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, TrainError> {
    let text = std::fs::read_to_string(path).map_err(TrainError::io(path))?;
    serde_json::from_str(&text)
        .map_err(|e| TrainError::checkpoint(path, format!("unreadable: {e}")))
}

fn sync_dir(dir: &Path) -> Result<(), TrainError> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(TrainError::io(dir))
}

/// fsyncs every file and folder under `dir`.
fn sync_tree(dir: &Path) -> Result<(), TrainError> {
    for entry in std::fs::read_dir(dir).map_err(TrainError::io(dir))? {
        let path = entry.map_err(TrainError::io(dir))?.path();
        if path.is_dir() {
            sync_tree(&path)?;
        } else {
            std::fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(TrainError::io(&path))?;
        }
    }
    sync_dir(dir)
}

/// Deletes the oldest `step-*` folders beyond `keep`, never `current`.
pub(crate) fn prune(root: &Path, current: &str, keep: usize) -> Result<(), TrainError> {
    let mut steps: Vec<(u64, String)> = std::fs::read_dir(root)
        .map_err(TrainError::io(root))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter_map(|n| Some((n.strip_prefix("step-")?.parse().ok()?, n)))
        .collect();
    // By step number: names are zero-padded to 6 digits, so past step 999,999 their
    // text order is not their step order.
    steps.sort();
    let steps: Vec<String> = steps.into_iter().map(|(_, name)| name).collect();
    let excess = steps.len().saturating_sub(keep.max(1));
    for name in steps.into_iter().take(excess) {
        if name != current {
            let path = root.join(&name);
            std::fs::remove_dir_all(&path).map_err(TrainError::io(&path))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pruning_keeps_the_newest_steps_by_number() {
        let root = std::env::temp_dir().join(format!("longview-prune-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for step in [999_998u64, 999_999, 1_000_000, 1_000_001] {
            std::fs::create_dir_all(root.join(format!("step-{step:06}"))).unwrap();
        }
        prune(&root, "step-1000001", 2).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let _ = std::fs::remove_dir_all(&root);
        // Text order would have kept step-999998 and step-999999.
        assert_eq!(left, ["step-1000000", "step-1000001"]);
    }
}

#[cfg(test)]
mod space_tests {
    use super::{estimated_bytes, free_bytes, room_for};

    #[test]
    fn a_checkpoint_that_does_not_fit_is_refused_with_the_numbers() {
        let needed = estimated_bytes(1_966_150_000); // the 1.5B shape: ~22 GiB
        assert!(needed > 22 << 30 && needed < 23 << 30, "{needed}");
        let err = room_for(needed, 10 << 30).unwrap_err();
        assert!(
            err.contains("22.0") && err.contains("10.00 GiB free"),
            "{err}"
        );
        assert!(room_for(needed, 30 << 30).is_ok());
        // The real query answers for an existing folder.
        assert!(free_bytes(std::path::Path::new(".")).is_some_and(|b| b > 0));
    }
}
