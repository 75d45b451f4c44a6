//! Checkpoint I/O: sharded bf16 round trips, both transformers config layouts, VILA
//! layout round trips, and the errors a user sees for broken checkpoints.

use std::path::Path;

use burn::tensor::DType;
use longview_models::ModelError;
use longview_models::hf::{
    HfQwen2Config, HfSiglipVisionConfig, SaveOptions, checkpoint_files, load_qwen2, load_vila,
    save_qwen2, save_vila,
};
use longview_models::vila::{VisualInput, VlmInput};
use longview_tests::{Reference, TempDir, assert_close, device, fixture};

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn sharded_bf16_checkpoint_matches_reference_and_round_trips() {
    let device = device();
    let source = fixture("qwen2_bf16_sharded");
    assert!(
        checkpoint_files(&source).unwrap().len() > 1,
        "fixture must be sharded"
    );
    let (model, config) = load_qwen2(&source, &device).unwrap();
    let r = Reference::open("qwen2_bf16_sharded");
    let ids = r.int::<2>("input_ids", &device);
    let positions = r.int::<2>("position_ids", &device);
    let logits = model.forward(ids.clone(), positions.clone());
    // Reference: transformers on the same bf16 weights upcast to f32.
    assert_close(
        "bf16 sharded logits",
        logits.clone(),
        r.float("logits", &device),
        1e-5,
    );

    // save (bf16, sharded) -> load -> same outputs, bit for bit (bf16 -> f32 -> bf16 is exact).
    let out = TempDir::new("bf16-roundtrip");
    let options = SaveOptions {
        dtype: DType::BF16,
        max_shard_bytes: Some(40 * 1024),
    };
    save_qwen2(&model, &config, &out.0, options).unwrap();
    let files = checkpoint_files(&out.0).unwrap();
    assert!(files.len() > 1, "expected several shards, got {files:?}");
    assert!(out.0.join("model.safetensors.index.json").exists());
    let (reloaded, reloaded_config) = load_qwen2(&out.0, &device).unwrap();
    assert_eq!(reloaded_config, config);
    assert_close(
        "bf16 round trip",
        reloaded.forward(ids, positions),
        logits,
        0.0,
    );
}

#[test]
fn f16_checkpoint_round_trips_within_f16_precision() {
    let device = device();
    let (model, config) = load_qwen2(&fixture("qwen2"), &device).unwrap();
    let r = Reference::open("qwen2");
    let ids = r.int::<2>("input_ids", &device);
    let positions = r.int::<2>("position_ids", &device);
    let out = TempDir::new("f16-roundtrip");
    let options = SaveOptions {
        dtype: DType::F16,
        max_shard_bytes: None,
    };
    save_qwen2(&model, &config, &out.0, options).unwrap();
    let written = std::fs::read(out.0.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&written).unwrap();
    assert_eq!(
        st.tensor("model.norm.weight").unwrap().dtype(),
        safetensors::Dtype::F16
    );
    let (reloaded, _) = load_qwen2(&out.0, &device).unwrap();
    // f16 keeps 11 significant bits: weights move by up to 2^-11 relative.
    assert_close(
        "f16 round trip logits",
        reloaded.forward(ids.clone(), positions.clone()),
        model.forward(ids, positions),
        5e-3,
    );
}

#[test]
fn vila_layout_round_trips_in_f32() {
    let device = device();
    let (mut model, mut config) = load_vila(&fixture("vila"), &device).unwrap();
    assert_eq!(model.generation_vocab, None);
    // A limit on the generated ids (a tokenizer smaller than the table) is saved too.
    let limit = Some(config.text.vocab_size - 3);
    (model.generation_vocab, config.generation_vocab) = (limit, limit);
    let r = Reference::open("vila");
    let input = VlmInput {
        input_ids: r.int("input_ids", &device),
        position_ids: r.int("position_ids", &device),
        visual: VisualInput::Pixels(r.float("pixel_values", &device)),
    };
    let before = model.forward(input.clone()).unwrap();
    let out = TempDir::new("vila-roundtrip");
    let options = SaveOptions {
        dtype: DType::F32,
        max_shard_bytes: None,
    };
    save_vila(&model, &config, &out.0, options).unwrap();
    for part in ["llm", "vision_tower", "mm_projector"] {
        assert!(
            out.0.join(part).join("model.safetensors").exists(),
            "{part}"
        );
        assert!(out.0.join(part).join("config.json").exists(), "{part}");
    }
    let (reloaded, reloaded_config) = load_vila(&out.0, &device).unwrap();
    assert_eq!(reloaded_config, config);
    assert_eq!(reloaded.generation_vocab, limit);
    assert_close(
        "VILA round trip",
        reloaded.forward(input).unwrap(),
        before,
        0.0,
    );
}

#[test]
fn vila_placeholder_id_falls_back_to_the_tokenizer_image_token() {
    let device = device();
    let dir = TempDir::new("vila-tokenizer");
    copy_dir(&fixture("vila"), &dir.0);
    let config_path = dir.0.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config.as_object_mut().unwrap().remove("image_token_id");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let text = error_text(load_vila(&dir.0, &device));
    assert!(
        text.contains("image_token_id") && text.contains("tokenizer_config.json"),
        "{text}"
    );
    std::fs::write(
        dir.0.join("llm/tokenizer_config.json"),
        r#"{"added_tokens_decoder": {"295": {"content": "<|endoftext|>"}, "296": {"content": "<image>"}}}"#,
    )
    .unwrap();
    let (model, config) = load_vila(&dir.0, &device).unwrap();
    assert_eq!(config.placeholder_token_id, 296);
    assert_eq!(model.placeholder_token_id, 296);
    // An id the tiny model's 300-row vocabulary cannot embed is refused, naming where
    // it came from.
    std::fs::write(
        dir.0.join("llm/tokenizer_config.json"),
        r#"{"added_tokens_decoder": {"151646": {"content": "<image>"}}}"#,
    )
    .unwrap();
    let text = error_text(load_vila(&dir.0, &device));
    assert!(
        text.contains("151646") && text.contains("tokenizer_config.json") && text.contains("300"),
        "{text}"
    );
}

#[test]
fn transformers_4x_and_5x_configs_agree() {
    let v5 = fixture("qwen2/config.json");
    let v4 = fixture("config_4x/qwen2_config.json");
    let text5 = HfQwen2Config::read(&v5).unwrap().into_config(&v5).unwrap();
    let text4 = HfQwen2Config::read(&v4).unwrap().into_config(&v4).unwrap();
    assert_eq!(text4, text5);
    assert_eq!(text5.rope_theta, 10_000.0);

    let s5 = fixture("siglip/config.json");
    let s4 = fixture("config_4x/siglip_config.json");
    let vis5 = HfSiglipVisionConfig::read(&s5)
        .unwrap()
        .into_config(&s5)
        .unwrap();
    let vis4 = HfSiglipVisionConfig::read(&s4)
        .unwrap()
        .into_config(&s4)
        .unwrap();
    assert_eq!(vis4, vis5);
}

#[test]
fn siglip_so400m_config_parses_to_the_named_size() {
    // The shape of google/siglip-so400m-patch14-384's vision config (384 px, 14 px patches).
    let dir = TempDir::new("so400m-config");
    let path = dir.0.join("config.json");
    std::fs::write(
        &path,
        r#"{"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
            "num_hidden_layers": 27, "num_attention_heads": 16, "image_size": 384, "patch_size": 14}"#,
    )
    .unwrap();
    let config = HfSiglipVisionConfig::read(&path)
        .unwrap()
        .into_config(&path)
        .unwrap();
    assert_eq!(
        config,
        longview_models::vila::VisionConfig::siglip_so400m_384()
    );
    assert_eq!(config.grid_side(), 27);
}

fn error_text(result: Result<impl Sized, ModelError>) -> String {
    match result {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn broken_checkpoints_give_errors_naming_file_and_key() {
    let device = device();

    // Missing folder.
    let text = error_text(load_qwen2(Path::new("/nonexistent/ckpt"), &device));
    assert!(text.contains("/nonexistent/ckpt"), "{text}");

    // Folder without weights.
    let dir = TempDir::new("no-weights");
    std::fs::copy(fixture("qwen2/config.json"), dir.0.join("config.json")).unwrap();
    let text = error_text(load_qwen2(&dir.0, &device));
    assert!(text.contains("no model.safetensors"), "{text}");

    // A missing tensor: drop q_proj of layer 1 from a copy of the checkpoint.
    let dir = TempDir::new("missing-tensor");
    copy_dir(&fixture("qwen2"), &dir.0);
    rewrite_safetensors(&dir.0.join("model.safetensors"), |key, shape| {
        (key != "model.layers.1.self_attn.q_proj.weight").then_some(shape)
    });
    let text = error_text(load_qwen2(&dir.0, &device));
    assert!(
        text.contains("model.layers.1.self_attn.q_proj.weight"),
        "{text}"
    );
    assert!(text.contains(&dir.0.display().to_string()), "{text}");

    // A shape mismatch: a config that disagrees with the weights.
    let dir = TempDir::new("shape-mismatch");
    copy_dir(&fixture("qwen2"), &dir.0);
    let config_path = dir.0.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["intermediate_size"] = 128.into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    let text = error_text(load_qwen2(&dir.0, &device));
    assert!(text.contains("mlp"), "{text}");
    assert!(text.contains("model.safetensors"), "{text}");
    assert!(text.contains("96") && text.contains("128"), "{text}");

    // Unknown architecture.
    config["model_type"] = "llama".into();
    config["intermediate_size"] = 96.into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    let text = error_text(load_qwen2(&dir.0, &device));
    assert!(
        text.contains("unknown architecture") && text.contains("llama"),
        "{text}"
    );

    // Impossible head split.
    config["model_type"] = "qwen2".into();
    config["num_key_value_heads"] = 3.into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    let text = error_text(load_qwen2(&dir.0, &device));
    assert!(text.contains("num_key_value_heads (3)"), "{text}");

    // Absurd sizes are refused before anything is allocated.
    config["num_key_value_heads"] = 2.into();
    config["hidden_size"] = 1_000_000_000u64.into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    let text = error_text(load_qwen2(&dir.0, &device));
    assert!(
        text.contains("hidden_size 1000000000 is not a plausible size"),
        "{text}"
    );
    config["hidden_size"] = 64.into();

    // Unsupported RoPE scaling is refused, not ignored.
    config["num_key_value_heads"] = 2.into();
    config["rope_parameters"] =
        serde_json::json!({"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0});
    std::fs::write(&config_path, config.to_string()).unwrap();
    let text = error_text(load_qwen2(&dir.0, &device));
    assert!(text.contains("rope_type `yarn`"), "{text}");
}

/// Rewrites a safetensors file keeping only the tensors `keep` returns a shape for.
fn rewrite_safetensors(path: &Path, keep: impl Fn(&str, Vec<usize>) -> Option<Vec<usize>>) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut kept = Vec::new();
    for (key, view) in st.tensors() {
        if let Some(shape) = keep(&key, view.shape().to_vec()) {
            kept.push((key, view.dtype(), shape, view.data().to_vec()));
        }
    }
    let views: Vec<_> = kept
        .iter()
        .map(|(k, d, s, b)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

#[test]
fn index_shard_names_outside_the_folder_are_refused() {
    let tmp = TempDir::new("index-escape");
    for bad in [
        "../outside.safetensors",
        "/etc/passwd",
        "sub/dir.safetensors",
        "..",
    ] {
        let dir = tmp.0.join("ckpt");
        std::fs::create_dir_all(&dir).unwrap();
        let index = serde_json::json!({ "weight_map": { "model.norm.weight": bad } });
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
        let message = error_text(checkpoint_files(&dir));
        assert!(
            message.contains(bad) && message.contains("plain file names"),
            "{bad}: {message}"
        );
    }
}

#[test]
fn vila_configs_out_of_range_fail_at_load_naming_key_and_value() {
    let device = device();
    let dir = TempDir::new("vila-ranges");
    copy_dir(&fixture("vila"), &dir.0);
    let config_path = dir.0.join("config.json");
    let original: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();

    let mut config = original.clone();
    config["mm_vision_select_layer"] = (-100).into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    let text = error_text(load_vila(&dir.0, &device));
    assert!(
        text.contains("mm_vision_select_layer -100") && text.contains("config.json"),
        "{text}"
    );

    let mut config = original.clone();
    config["longview_generation_vocab"] = 1_000_000.into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    let text = error_text(load_vila(&dir.0, &device));
    assert!(
        text.contains("longview_generation_vocab 1000000") && text.contains("config.json"),
        "{text}"
    );

    let mut config = original;
    config["image_token_id"] = 1_000_000.into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    let text = error_text(load_vila(&dir.0, &device));
    assert!(
        text.contains("placeholder id 1000000") && text.contains("image_token_id"),
        "{text}"
    );
}
