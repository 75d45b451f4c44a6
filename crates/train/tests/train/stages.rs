//! Stage settings: config errors naming key and value, LoRA and context extension,
//! and the token budget.

use super::*;

#[test]
fn configs_fail_with_the_key_and_value_named() {
    let _serial = serial();
    let cases = [
        ("[optim]\nlr = -1.0\n", "optim.lr"),
        ("[run]\nsteps = 0\n", "run.steps"),
        ("[run]\nbatch_size = 0\n", "run.batch_size"),
        ("[optim]\nwarmup_steps = 5000\n", "optim.warmup_steps"),
        ("[data]\nneedle_copies = 0\n", "data.needle_copies"),
        ("[data]\nkind = \"cot\"\n", "data.path"),
        ("[data]\npath = \"rows.jsonl\"\n", "data.path"),
        ("[model]\nsize = \"13b\"\n", "13b"),
        ("[model]\ntrainable = [\"llm\", \"llm-lora\"]\n", "keep one"),
        ("[model]\nrope_theta = 0.5\n", "model.rope_theta"),
        (
            "[data]\nkind = \"text\"\npath = \"t.jsonl\"\nmax_tokens = 1\n",
            "data.max_tokens",
        ),
        ("[model]\nstage = \"fine-tune\"\n", "fine-tune"),
        ("[model]\ntrainable = []\n", "model.trainable"),
        ("[data]\nwidth = 15\n", "data.width"),
        ("[run]\nstpes = 3\n", "stpes"),
        ("[optim]\nlr = \"fast\"\n", "lr"),
        (
            "[model]\nstage = \"grpo\"\n[data]\nkind = \"text\"\n",
            "data.kind",
        ),
        (
            "[model]\nstage = \"grpo\"\ntrainable = [\"projector\", \"llm\"]\n",
            "grpo.reencode_video",
        ),
        (
            "[model]\nstage = \"grpo\"\n[run]\nbatch_size = 5\n[grpo]\nminibatches = 2\n",
            "grpo.minibatches",
        ),
    ];
    for (text, needle) in cases {
        let err = TrainConfig::from_toml(text, "bad.toml").unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("bad.toml") && message.contains(needle),
            "{text:?}: expected the message to name `{needle}`: {message}"
        );
    }
    // Every shipped config parses.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let mut seen = 0;
    for entry in std::fs::read_dir(&root).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            TrainConfig::from_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            seen += 1;
        }
    }
    assert!(
        seen >= 5,
        "expected the stage configs in configs/, found {seen}"
    );
    let missing = TrainConfig::from_file("no/such/config.toml").unwrap_err();
    assert!(matches!(missing, TrainError::Io { .. }));
    assert!(missing.to_string().contains("no/such/config.toml"));
}

#[test]
fn lora_adapters_merge_into_the_same_function_and_unmerge_back() {
    let _serial = serial();
    use burn::nn::LinearConfig;
    use burn::tensor::{Distribution, Int};
    use longview_models::vila::config::TextConfig;
    use longview_models::vila::default_position_ids;

    let device = device();
    device.seed(21);
    let base = TextConfig::debug().init(&device);
    let ids = Tensor::<2, Int>::random([2, 12], Distribution::Uniform(0.0, 299.0), &device);
    let positions = default_position_ids(2, 12, &device);
    let host = |t: Tensor<3>| t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
    let reference = host(base.forward(ids.clone(), positions.clone()));

    // Fresh adapters (B = 0) change nothing.
    let mut adapted = base.clone().with_lora(4, 8.0, 3, &device);
    assert!(adapted.has_lora());
    let fresh = host(adapted.forward(ids.clone(), positions.clone()));
    let max_diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    assert_eq!(max_diff(&fresh, &reference), 0.0);

    // Trained-looking adapters: x W + s (x A) B equals x (W + s A B) after merging.
    for layer in &mut adapted.model.layers {
        let lora = layer.self_attn.lora.as_mut().unwrap();
        for adapter in [&mut lora.q, &mut lora.k, &mut lora.v, &mut lora.o] {
            let [rank, out] = adapter.lora_b.weight.dims();
            adapter.lora_b = LinearConfig::new(rank, out).with_bias(false).init(&device);
        }
    }
    let with_adapters = host(adapted.forward(ids.clone(), positions.clone()));
    assert!(
        max_diff(&with_adapters, &reference) > 1e-3,
        "the adapters act"
    );
    let scale = with_adapters.iter().fold(0f32, |m, v| m.max(v.abs()));
    let adapters: Vec<_> = adapted
        .model
        .layers
        .iter()
        .map(|l| l.self_attn.lora.clone().unwrap())
        .collect();
    let merged = adapted.clone().merge_lora();
    assert!(!merged.has_lora());
    let merged_out = host(merged.forward(ids.clone(), positions.clone()));
    assert!(
        max_diff(&merged_out, &with_adapters) <= 1e-5 * scale,
        "merged {} vs adapters (scale {scale})",
        max_diff(&merged_out, &with_adapters)
    );
    // Unmerging gives the base weights back to f32 rounding.
    let unmerged = merged.unmerge_lora(adapters);
    let w = |m: &longview_models::vila::Qwen2| {
        m.model.layers[1]
            .self_attn
            .o_proj
            .weight
            .val()
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap()
    };
    let (a, b) = (w(&unmerged), w(&base));
    assert!(
        max_diff(&a, &b) <= 1e-6,
        "unmerged o_proj off by {}",
        max_diff(&a, &b)
    );
    let again = host(unmerged.forward(ids, positions));
    assert!(max_diff(&again, &with_adapters) <= 1e-5 * scale);
}

#[test]
fn context_extension_trains_adapters_embeddings_and_norms_on_text_and_resumes() {
    let _serial = serial();
    use longview_models::hf::checkpoint::{SaveOptions, load_vila, save_vila};
    use longview_train::config::DataKind;

    let tmp = TempDir::new("stage4");
    let corpus = tmp.0.join("text.jsonl");
    let doc = |i: usize| {
        format!(
            "{{\"text\": \"Document {i}: the quick brown fox jumps over the lazy dog {} times, then rests.\"}}",
            i * 7
        )
    };
    let mut lines: Vec<String> = (0..12).map(doc).collect();
    lines.push("{\"title\": \"no text field\"}".into());
    std::fs::write(&corpus, lines.join("\n")).unwrap();

    // The starting model, saved so that frozen weights can be compared afterwards.
    let tokenizer = TextTokenizer::debug();
    let vlm = model_config(&TrainConfig::default(), &tokenizer).unwrap();
    let device = device();
    device.seed(5);
    let start = tmp.0.join("start");
    save_vila(
        &vlm.init(&device),
        &vlm,
        &start,
        SaveOptions {
            dtype: burn::tensor::DType::F32,
            max_shard_bytes: None,
        },
    )
    .unwrap();
    std::fs::write(
        start.join("llm").join("tokenizer.json"),
        tokenizer.inner().to_string(false).unwrap(),
    )
    .unwrap();

    let config = |out: &Path| {
        let mut c = TrainConfig::default();
        c.run.out = out.into();
        c.run.steps = 4;
        c.run.batch_size = 2;
        c.run.checkpoint_every = 2;
        c.optim.warmup_steps = 1;
        c.model.stage = longview_train::Stage::ContextExtension;
        c.model.init_from = Some(start.clone());
        c.model.rope_theta = Some(1_000_000.0);
        c.model.lora_rank = 4;
        c.data.kind = DataKind::Text;
        c.data.path = Some(corpus.clone());
        c.data.max_tokens = 48;
        c.validate("(test)").unwrap();
        c
    };
    let options = no_progress();
    let straight = train(
        &config(&tmp.0.join("whole")),
        &options,
        &device,
        &mut quiet(),
    )
    .unwrap();
    assert!(
        straight.data.contains("1 rows skipped"),
        "{}",
        straight.data
    );
    assert!(straight.losses.iter().all(|l| l.is_finite()));
    assert!(
        straight.trainable_params < straight.params / 2,
        "{} of {} parameters train",
        straight.trainable_params,
        straight.params
    );

    // Interrupted after 2 steps, resumed: the same curve (adapters reloaded, base
    // weights unmerged from the saved merged model).
    let split = config(&tmp.0.join("split"));
    let first = TrainOptions {
        stop_after: Some(2),
        ..options.clone()
    };
    train(&split, &first, &device, &mut quiet()).unwrap();
    let resumed = train(
        &split,
        &TrainOptions {
            resume: true,
            ..options.clone()
        },
        &device,
        &mut quiet(),
    )
    .unwrap();
    for (a, b) in straight.losses[2..].iter().zip(&resumed.losses[2..]) {
        assert!((a - b).abs() <= 1e-5 * a.abs(), "{a} vs {b}");
    }

    // The saved model is merged (plain VILA layout) with the new RoPE base; the MLP
    // and the vision tower are the starting weights bit for bit, q_proj is not.
    let dir = straight.checkpoint.unwrap();
    assert!(dir.join("lora").join("model.safetensors").exists());
    let (trained, trained_config) = load_vila(&dir.join("model"), &device).unwrap();
    assert_eq!(trained_config.text.rope_theta, 1_000_000.0);
    assert!(!trained.llm.has_lora());
    let (initial, _) = load_vila(&start, &device).unwrap();
    let host2 = |t: Tensor<2>| t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
    fn layer(m: &longview_models::Vlm) -> &longview_models::vila::text::Qwen2DecoderLayer {
        &m.llm.model.layers[0]
    }
    assert_eq!(
        host2(layer(&trained).mlp.gate_proj.weight.val()),
        host2(layer(&initial).mlp.gate_proj.weight.val())
    );
    assert_eq!(
        host2(
            trained.vision_tower.encoder.layers[0]
                .self_attn
                .q_proj
                .weight
                .val()
        ),
        host2(
            initial.vision_tower.encoder.layers[0]
                .self_attn
                .q_proj
                .weight
                .val()
        )
    );
    assert_ne!(
        host2(layer(&trained).self_attn.q_proj.weight.val()),
        host2(layer(&initial).self_attn.q_proj.weight.val())
    );
    assert_ne!(
        host2(trained.llm.model.embed_tokens.weight.val()),
        host2(initial.llm.model.embed_tokens.weight.val())
    );
}

#[test]
fn a_token_budget_trains_saves_and_loads_with_the_checkpoint() {
    let _serial = serial();
    let tmp = TempDir::new("token-pool");
    let mut config = tiny(&tmp.0.join("run"), &tmp.0.join("cache"));
    config.run.steps = 2;
    config.run.checkpoint_every = 2;
    config.optim.warmup_steps = 1;
    // The debug projector makes a 3x3 token grid: 2x2 pooled tokens a frame.
    config.model.token_pool = Some(2);
    let options = no_progress();
    let summary = train(&config, &options, &device(), &mut quiet()).unwrap();
    assert!(summary.losses.iter().all(|l| l.is_finite()));
    let loaded = longview_infer::load(&config.run.out, &device()).unwrap();
    assert_eq!(loaded.config.projector.token_pool, Some(2));
    assert_eq!(loaded.config.tokens_per_frame(), 4);
    assert_eq!(loaded.model.mm_projector.token_pool, Some(2));
    // A budget larger than the token grid is refused, naming the key.
    let mut too_big = config.clone();
    too_big.run.out = tmp.0.join("too-big");
    too_big.model.token_pool = Some(5);
    let message = train(&too_big, &options, &device(), &mut quiet())
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("model.token_pool") && message.contains("3x3"),
        "{message}"
    );
}

#[test]
fn a_temporal_budget_trains_saves_and_loads_with_the_checkpoint() {
    let _serial = serial();
    let tmp = TempDir::new("temporal-pool");
    let mut config = tiny(&tmp.0.join("run"), &tmp.0.join("cache"));
    config.run.steps = 2;
    config.run.checkpoint_every = 2;
    config.optim.warmup_steps = 1;
    // Pairs of frames averaged; odd haystacks get their last frame repeated.
    config.model.temporal_pool = Some(2);
    let options = no_progress();
    let summary = train(&config, &options, &device(), &mut quiet()).unwrap();
    assert!(summary.losses.iter().all(|l| l.is_finite()));
    let loaded = longview_infer::load(&config.run.out, &device()).unwrap();
    assert_eq!(loaded.config.projector.temporal_pool, Some(2));
    assert_eq!(loaded.config.visual_frames(5), 3);
    assert_eq!(loaded.model.mm_projector.temporal_pool, Some(2));
    let mut zero = config.clone();
    zero.run.out = tmp.0.join("zero");
    zero.model.temporal_pool = Some(0);
    let message = train(&zero, &options, &device(), &mut quiet())
        .unwrap_err()
        .to_string();
    assert!(message.contains("model.temporal_pool"), "{message}");
}
