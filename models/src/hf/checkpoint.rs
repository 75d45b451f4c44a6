//! Hugging Face safetensors checkpoints: single files and sharded folders
//! (`model.safetensors.index.json`), f32/f16/bf16, and VILA's folder layout
//! (`llm/`, `vision_tower/`, `mm_projector/`, each with `config.json` + safetensors).
//!
//! Reading and applying tensors goes through burn-store (`PyTorchToBurnAdapter`
//! transposes Linear weights and renames norm `weight/bias` to `gamma/beta`;
//! `FloatCastAdapter` converts the file's dtype). The mapping between checkpoint keys
//! and module paths lives in [`KeyMap`], one table per component. Writing uses the
//! `safetensors` crate directly because burn-store has no sharding.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::store::burn_pack::Tensor as PackTensor;
use burn::store::{
    ApplyError, BurnToPyTorchAdapter, FloatCastAdapter, ModuleAdapter, ModuleSnapshot, ModuleStore,
    PyTorchToBurnAdapter, SafetensorsStore,
};
use burn::tensor::{DType, Device};
use serde_json::{Value, json};

use super::config::{HfQwen2Config, HfSiglipVisionConfig, VilaConfig, read_json};
use crate::error::ModelError;
use crate::vila::config::{
    ProjectorConfig, ProjectorKind, TextConfig, VisionConfig, VisionFeature, VlmConfig,
};
use crate::vila::{Projector, Qwen2, SiglipVision, Vlm};

const INDEX_FILE: &str = "model.safetensors.index.json";
const SINGLE_FILE: &str = "model.safetensors";

/// How checkpoint keys map to module paths, for one component.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyMap {
    /// Qwen2ForCausalLM: module fields mirror the Hugging Face names.
    Qwen2,
    /// SiglipVisionModel: 4.x files prefix `vision_model.`, 5.x files do not; the
    /// pooling head (`head.*`) is not part of VILA's tower and is left unused.
    /// Written with the prefix, which both transformers generations read.
    Siglip,
    /// VILA's projector `nn.Sequential` indices.
    Projector(ProjectorKind),
}

impl KeyMap {
    /// (checkpoint prefix, module prefix) pairs; the first matching pair applies.
    fn table(self) -> &'static [(&'static str, &'static str)] {
        match self {
            KeyMap::Qwen2 => &[("", "")],
            KeyMap::Siglip => &[("vision_model.", ""), ("", "")],
            KeyMap::Projector(ProjectorKind::MlpDownsample) => &[
                ("layers.1.", "norm."),
                ("layers.2.", "linear_1."),
                ("layers.4.", "linear_2."),
            ],
            KeyMap::Projector(ProjectorKind::Mlp2xGelu) => {
                &[("layers.0.", "linear_1."), ("layers.2.", "linear_2.")]
            }
        }
    }

    /// Module path of a checkpoint key (`None`: not a parameter of ours).
    pub fn to_module(self, key: &str) -> Option<String> {
        self.table()
            .iter()
            .find_map(|(ckpt, module)| key.strip_prefix(ckpt).map(|rest| format!("{module}{rest}")))
    }

    /// Checkpoint key of a module path (the layout we write).
    pub fn to_checkpoint(self, path: &str) -> String {
        match self {
            KeyMap::Siglip => format!("vision_model.{path}"),
            _ => self
                .table()
                .iter()
                .find_map(|(ckpt, module)| {
                    path.strip_prefix(module)
                        .map(|rest| format!("{ckpt}{rest}"))
                })
                .unwrap_or_else(|| path.to_string()),
        }
    }
}

/// The safetensors files of a checkpoint folder: the shards listed by
/// A file name with no directory part: what a shard name in an index may be (an
/// index from elsewhere must not make the loader read outside the checkpoint).
fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\', '\0'])
        && !Path::new(name).is_absolute()
}

/// `model.safetensors.index.json`, else `model.safetensors`.
pub fn checkpoint_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    if !dir.is_dir() {
        return Err(ModelError::checkpoint(
            dir,
            "checkpoint folder does not exist",
        ));
    }
    let index = dir.join(INDEX_FILE);
    if index.exists() {
        let value = read_json(&index)?;
        let map = value
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| ModelError::config(&index, "missing object `weight_map`"))?;
        let mut files: Vec<PathBuf> = map
            .values()
            .map(|v| match v.as_str() {
                Some(name) if is_plain_file_name(name) => Ok(dir.join(name)),
                Some(name) => Err(ModelError::config(
                    &index,
                    format!(
                        "weight_map names shard `{name}`: shards must be plain file names inside the checkpoint folder (no `/`, `\\`, `..` or absolute paths)"
                    ),
                )),
                None => Err(ModelError::config(
                    &index,
                    format!("weight_map value {v} is not a file name"),
                )),
            })
            .collect::<Result<_, _>>()?;
        files.sort();
        files.dedup();
        for f in &files {
            if !f.exists() {
                return Err(ModelError::checkpoint(
                    f,
                    format!("shard listed in {INDEX_FILE} is missing"),
                ));
            }
        }
        return Ok(files);
    }
    let single = dir.join(SINGLE_FILE);
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(ModelError::checkpoint(
        dir,
        format!("no {SINGLE_FILE} and no {INDEX_FILE}"),
    ))
}

/// Where a module path's tensor came from, for error messages.
type Origins = HashMap<String, (String, PathBuf)>;

fn read_tensors(dir: &Path, map: KeyMap) -> Result<(Vec<PackTensor>, Origins), ModelError> {
    let mut tensors = Vec::new();
    let mut origins = Origins::new();
    for file in checkpoint_files(dir)? {
        let mut store = SafetensorsStore::from_file(&file);
        let all = store
            .get_all_tensors()
            .map_err(|e| ModelError::checkpoint(&file, format!("cannot read safetensors: {e}")))?;
        for (key, tensor) in all {
            let Some(path) = map.to_module(key) else {
                continue;
            };
            let mut tensor = tensor.clone();
            tensor.name = path.clone();
            origins.insert(path, (key.clone(), file.clone()));
            tensors.push(tensor);
        }
    }
    Ok((tensors, origins))
}

/// Loads a component's parameters from `dir` into `module`, converting to `dtype`.
///
/// Every parameter of the module must be found with the right shape; tensors of the
/// checkpoint that the module does not have are ignored.
pub fn load_into<M: Module>(
    module: &mut M,
    dir: &Path,
    map: KeyMap,
    dtype: DType,
) -> Result<(), ModelError> {
    let (tensors, origins) = read_tensors(dir, map)?;
    let adapter = PyTorchToBurnAdapter.chain(FloatCastAdapter::to(dtype));
    let result = module.apply(tensors, None, Some(Box::new(adapter)), false);
    if let Some(error) = result.errors.first() {
        return Err(apply_error(dir, map, &origins, error, result.errors.len()));
    }
    if !result.missing.is_empty() {
        let keys: Vec<String> = result
            .missing
            .iter()
            .map(|(path, _)| map.to_checkpoint(path))
            .collect();
        return Err(ModelError::MissingTensors {
            path: dir.to_path_buf(),
            keys,
        });
    }
    Ok(())
}

fn apply_error(
    dir: &Path,
    map: KeyMap,
    origins: &Origins,
    error: &ApplyError,
    count: usize,
) -> ModelError {
    let origin = |path: &str| {
        origins
            .get(path)
            .cloned()
            .unwrap_or_else(|| (map.to_checkpoint(path), dir.to_path_buf()))
    };
    match error {
        ApplyError::ShapeMismatch {
            path,
            expected,
            found,
        } => {
            let (key, file) = origin(path);
            ModelError::ShapeMismatch {
                path: file,
                key,
                param: path.clone(),
                expected: expected.to_vec(),
                found: found.to_vec(),
            }
        }
        other => ModelError::checkpoint(dir, format!("{other:?} ({count} error(s) in all)")),
    }
}

/// How to write a checkpoint.
#[derive(Debug, Clone, Copy)]
pub struct SaveOptions {
    /// dtype of the written tensors (F32, F16 or BF16).
    pub dtype: DType,
    /// Start a new shard once a shard holds this many bytes (`None`: one file).
    pub max_shard_bytes: Option<usize>,
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions {
            dtype: DType::BF16,
            max_shard_bytes: Some(5 << 30),
        }
    }
}

fn safetensors_dtype(dtype: DType) -> Result<safetensors::Dtype, String> {
    Ok(match dtype {
        DType::F64 => safetensors::Dtype::F64,
        DType::F32 | DType::Flex32 => safetensors::Dtype::F32,
        DType::F16 => safetensors::Dtype::F16,
        DType::BF16 => safetensors::Dtype::BF16,
        DType::I64 => safetensors::Dtype::I64,
        DType::I32 => safetensors::Dtype::I32,
        other => return Err(format!("cannot write dtype {other:?} to safetensors")),
    })
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
}

/// Writes a component's parameters (plus `config` as `config.json`) into `dir`,
/// sharded by [`SaveOptions::max_shard_bytes`]. Each file is written to a temporary
/// name and renamed, so a crash never leaves a truncated file under the final name.
pub fn save_component<M: Module>(
    module: &M,
    config: &Value,
    dir: &Path,
    map: KeyMap,
    options: SaveOptions,
) -> Result<(), ModelError> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let adapter = BurnToPyTorchAdapter.chain(FloatCastAdapter::to(options.dtype));
    let mut named: Vec<(String, PackTensor)> = module
        .collect(None, Some(Box::new(adapter)), false)
        .into_iter()
        .map(|t| (map.to_checkpoint(&t.name), t))
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));

    // Greedy sharding in key order.
    let mut shards: Vec<Vec<(String, PackTensor)>> = vec![Vec::new()];
    let mut bytes_in_shard = 0;
    for (key, tensor) in named {
        let size = tensor.byte_len();
        if let Some(max) = options.max_shard_bytes
            && bytes_in_shard > 0
            && bytes_in_shard + size > max
        {
            shards.push(Vec::new());
            bytes_in_shard = 0;
        }
        bytes_in_shard += size;
        shards.last_mut().expect("one shard").push((key, tensor));
    }

    let count = shards.len();
    let mut weight_map = BTreeMap::new();
    let mut total = 0usize;
    for (i, shard) in shards.into_iter().enumerate() {
        let name = if count == 1 {
            SINGLE_FILE.to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, count)
        };
        let path = dir.join(&name);
        let mut owned = Vec::with_capacity(shard.len());
        for (key, tensor) in shard {
            let dtype =
                safetensors_dtype(tensor.dtype).map_err(|m| ModelError::checkpoint(&path, m))?;
            let shape = tensor.shape.to_vec();
            let bytes = tensor.to_bytes().map_err(|e| {
                ModelError::checkpoint(&path, format!("cannot read `{key}`: {e:?}"))
            })?;
            total += bytes.len();
            weight_map.insert(key.clone(), name.clone());
            owned.push((key, dtype, shape, bytes));
        }
        let views = owned
            .iter()
            .map(|(key, dtype, shape, bytes)| {
                safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
                    .map(|view| (key.clone(), view))
                    .map_err(|e| ModelError::checkpoint(&path, format!("`{key}`: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
        let tmp = dir.join(format!(".{name}.tmp"));
        safetensors::serialize_to_file(views, metadata, &tmp)
            .map_err(|e| ModelError::checkpoint(&tmp, e.to_string()))?;
        std::fs::rename(&tmp, &path).map_err(|e| ModelError::io(&path, e))?;
    }
    if count > 1 {
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        write_json(&dir.join(INDEX_FILE), &index)?;
    }
    let mut config = config.clone();
    if let Some(obj) = config.as_object_mut() {
        obj.insert("dtype".into(), json!(dtype_name(options.dtype)));
    }
    write_json(&dir.join("config.json"), &config)
}

/// Writes JSON through a temporary file and a rename.
pub fn write_json(path: &Path, value: &Value) -> Result<(), ModelError> {
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_string_pretty(value).expect("JSON values serialise");
    std::fs::write(&tmp, text).map_err(|e| ModelError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| ModelError::io(path, e))
}

/// Loads a Qwen2 checkpoint folder (`config.json` + safetensors).
pub fn load_qwen2(dir: &Path, device: &Device) -> Result<(Qwen2, TextConfig), ModelError> {
    let config_path = dir.join("config.json");
    let config = HfQwen2Config::read(&config_path)?.into_config(&config_path)?;
    let mut model = config.init(device);
    load_into(&mut model, dir, KeyMap::Qwen2, DType::F32)?;
    Ok((model, config))
}

/// The LLM's shape of a VILA/LongVILA checkpoint folder (`llm/config.json`), without
/// reading any weights.
pub fn read_vila_text_config(dir: &Path) -> Result<TextConfig, ModelError> {
    let config_path = dir.join("llm").join("config.json");
    HfQwen2Config::read(&config_path)?.into_config(&config_path)
}

/// Loads a SigLIP vision tower folder.
pub fn load_siglip(
    dir: &Path,
    device: &Device,
) -> Result<(SiglipVision, VisionConfig), ModelError> {
    let config_path = dir.join("config.json");
    let config = HfSiglipVisionConfig::read(&config_path)?.into_config(&config_path)?;
    let mut model = config.init(device);
    load_into(&mut model, dir, KeyMap::Siglip, DType::F32)?;
    Ok((model, config))
}

/// Loads a VILA/LongVILA checkpoint folder (`llm/`, `vision_tower/`, `mm_projector/`).
pub fn load_vila(dir: &Path, device: &Device) -> Result<(Vlm, VlmConfig), ModelError> {
    let vila = VilaConfig::read(dir)?;
    let (llm, text) = load_qwen2(&dir.join("llm"), device)?;
    let (vision_tower, vision) = load_siglip(&dir.join("vision_tower"), device)?;
    if let VisionFeature::Layer(k) = vila.vision_feature {
        let layers = vision.num_layers;
        if k >= 0 || (-k) as usize > layers {
            return Err(ModelError::config(
                dir.join("config.json"),
                format!(
                    "mm_vision_select_layer {k} is out of range for a vision tower of {layers} layers (use -1..=-{layers})"
                ),
            ));
        }
    }
    let projector_config =
        ProjectorConfig::new(vila.projector, vision.hidden_size, text.hidden_size)
            .with_token_pool(vila.token_pool)
            .with_temporal_pool(vila.temporal_pool);
    let mut mm_projector: Projector = projector_config.init(device);
    load_into(
        &mut mm_projector,
        &dir.join("mm_projector"),
        KeyMap::Projector(vila.projector),
        DType::F32,
    )?;
    let placeholder = match vila.placeholder_token_id {
        Some(id) => id,
        None => image_token_from_tokenizer(dir)?,
    };
    if placeholder as usize >= text.vocab_size {
        let source = match vila.placeholder_token_id {
            Some(_) => "config.json `image_token_id`",
            None => "`<image>` in llm/tokenizer_config.json",
        };
        return Err(ModelError::config(
            dir.join("config.json"),
            format!(
                "the visual placeholder id {placeholder} (from {source}) is outside the LLM's vocabulary of {} (llm/config.json vocab_size)",
                text.vocab_size
            ),
        ));
    }
    if let Some(n) = vila.generation_vocab.filter(|&n| n > text.vocab_size) {
        return Err(ModelError::config(
            dir.join("config.json"),
            format!(
                "longview_generation_vocab {n} is larger than the LLM's vocabulary of {} (llm/config.json vocab_size)",
                text.vocab_size
            ),
        ));
    }
    let config = VlmConfig::new(vision, projector_config, text, placeholder)
        .with_vision_feature(vila.vision_feature)
        .with_generation_vocab(vila.generation_vocab);
    let model = Vlm {
        vision_tower,
        mm_projector,
        llm,
        vision_feature: config.vision_feature,
        placeholder_token_id: placeholder,
        generation_vocab: config.generation_vocab,
    };
    Ok((model, config))
}

/// The id of the `<image>` token VILA adds to its tokenizer, from
/// `llm/tokenizer_config.json` (`added_tokens_decoder`), for checkpoints whose
/// `config.json` has no `image_token_id`.
fn image_token_from_tokenizer(dir: &Path) -> Result<u32, ModelError> {
    let path = dir.join("llm").join("tokenizer_config.json");
    let missing = || {
        ModelError::config(
            dir.join("config.json"),
            format!(
                "no `image_token_id`, and no `<image>` token in {} (the visual placeholder id is needed)",
                path.display()
            ),
        )
    };
    if !path.exists() {
        return Err(missing());
    }
    let value = read_json(&path)?;
    value
        .get("added_tokens_decoder")
        .and_then(Value::as_object)
        .and_then(|tokens| {
            tokens.iter().find_map(|(id, token)| {
                (token.get("content").and_then(Value::as_str) == Some("<image>"))
                    .then(|| id.parse::<u32>().ok())
                    .flatten()
            })
        })
        .ok_or_else(missing)
}

/// Saves a Qwen2 model as a Hugging Face folder.
pub fn save_qwen2(
    model: &Qwen2,
    config: &TextConfig,
    dir: &Path,
    options: SaveOptions,
) -> Result<(), ModelError> {
    let hf = HfQwen2Config::from_config(config, dtype_name(options.dtype));
    save_component(model, &hf, dir, KeyMap::Qwen2, options)
}

/// Saves a VLM in VILA's folder layout.
pub fn save_vila(
    model: &Vlm,
    config: &VlmConfig,
    dir: &Path,
    options: SaveOptions,
) -> Result<(), ModelError> {
    save_qwen2(&model.llm, &config.text, &dir.join("llm"), options)?;
    let vision = HfSiglipVisionConfig::from_config(&config.vision, dtype_name(options.dtype));
    save_component(
        &model.vision_tower,
        &vision,
        &dir.join("vision_tower"),
        KeyMap::Siglip,
        options,
    )?;
    let kind = config.projector.kind;
    let mut projector = json!({
        "architectures": ["MultimodalProjector"],
        "model_type": "v2l_projector",
        "mm_projector_type": kind.vila_name(),
    });
    if let Some(side) = config.projector.token_pool {
        // Not a VILA key: longview's token budget (VILA ignores unknown keys).
        projector["longview_token_pool"] = json!(side);
    }
    if let Some(k) = config.projector.temporal_pool.filter(|&k| k > 1) {
        projector["longview_temporal_pool"] = json!(k);
    }
    save_component(
        &model.mm_projector,
        &projector,
        &dir.join("mm_projector"),
        KeyMap::Projector(kind),
        options,
    )?;
    let select_layer = match config.vision_feature {
        crate::vila::VisionFeature::Layer(k) => json!(k),
        // Not a VILA option: VILA's -1 is the last layer *before* the post-layernorm.
        crate::vila::VisionFeature::Last => json!("post_layernorm"),
    };
    let mut top = json!({
        "architectures": ["LlavaLlamaModel"],
        "model_type": "llava_llama",
        "mm_projector_type": kind.vila_name(),
        "mm_vision_select_layer": select_layer,
        "mm_vision_select_feature": "cls_patch",
        "image_token_id": config.placeholder_token_id,
    });
    if let Some(n) = model.generation_vocab {
        // Not a VILA key: the ids past the tokenizer's are never generated or scored.
        top["longview_generation_vocab"] = json!(n);
    }
    write_json(&dir.join("config.json"), &top)
}
