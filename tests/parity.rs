//! Parity with the Hugging Face reference implementation (transformers 5.23, torch 2.15,
//! f32 on CPU): forward outputs, losses and gradients of tiny random checkpoints dumped
//! by `tests/fixtures/make_fixtures.py`, loaded through longview's checkpoint loaders.
//!
//! Tolerances (relative to the largest magnitude of the reference tensor):
//! forward outputs, losses and gradients 1e-5 (measured: at most 1.7e-6). These are f32 round-off levels
//! (different summation orders); a wrong mapping or formula is off by O(1).

use burn::module::Param;
use burn::tensor::Tensor;
use longview_models::hf::{KeyMap, load_into, load_qwen2, load_siglip, load_vila};
use longview_models::vila::{
    ProjectorConfig, ProjectorKind, VisionFeature, VisualInput, VlmInput, causal_lm_loss,
};
use longview_tests::{Reference, TempDir, assert_close, device, fixture};

const FWD_TOL: f32 = 1e-5;
const GRAD_TOL: f32 = 1e-5;

/// Gradient of a Linear weight in Hugging Face layout (`[out, in]`).
fn linear_grad(weight: &Param<Tensor<2>>, grads: &burn::tensor::Gradients) -> Tensor<2> {
    weight
        .val()
        .grad(grads)
        .expect("weight has a gradient")
        .transpose()
}

fn grad<const D: usize>(param: &Param<Tensor<D>>, grads: &burn::tensor::Gradients) -> Tensor<D> {
    param.val().grad(grads).expect("parameter has a gradient")
}

#[test]
fn qwen2_matches_transformers_forward_loss_and_gradients() {
    let device = device();
    let (model, config) = load_qwen2(&fixture("qwen2"), &device).unwrap();
    assert_eq!(
        (config.num_heads, config.num_kv_heads),
        (4, 2),
        "fixture is GQA"
    );
    let r = Reference::open("qwen2");
    let ids = r.int::<2>("input_ids", &device);
    let positions = r.int::<2>("position_ids", &device);
    let labels = r.int::<2>("labels", &device);

    let out = model.forward_embeds(model.embed(ids), positions, true);
    assert_close(
        "hidden_states.0",
        out.hidden_states[0].clone(),
        r.float("hidden_states.0", &device),
        FWD_TOL,
    );
    assert_close(
        "hidden_states.1",
        out.hidden_states[1].clone(),
        r.float("hidden_states.1", &device),
        FWD_TOL,
    );
    assert_close(
        "hidden_states.last",
        out.hidden_states[2].clone(),
        r.float("hidden_states.last", &device),
        FWD_TOL,
    );
    assert_close(
        "logits",
        out.logits.clone(),
        r.float("logits", &device),
        FWD_TOL,
    );

    let loss = causal_lm_loss(out.logits, labels);
    assert_close("loss", loss.clone(), r.float("loss", &device), FWD_TOL);

    let grads = loss.backward();
    let m = &model.model;
    let l0 = &m.layers[0];
    let l1 = &m.layers[1];
    assert_close(
        "grad embed_tokens",
        grad(&m.embed_tokens.weight, &grads),
        r.float("grad.model.embed_tokens.weight", &device),
        GRAD_TOL,
    );
    assert_close(
        "grad q_proj",
        linear_grad(&l0.self_attn.q_proj.weight, &grads),
        r.float("grad.model.layers.0.self_attn.q_proj.weight", &device),
        GRAD_TOL,
    );
    assert_close(
        "grad k_proj.bias",
        grad(l0.self_attn.k_proj.bias.as_ref().unwrap(), &grads),
        r.float("grad.model.layers.0.self_attn.k_proj.bias", &device),
        GRAD_TOL,
    );
    assert_close(
        "grad o_proj",
        linear_grad(&l0.self_attn.o_proj.weight, &grads),
        r.float("grad.model.layers.0.self_attn.o_proj.weight", &device),
        GRAD_TOL,
    );
    assert_close(
        "grad down_proj",
        linear_grad(&l1.mlp.down_proj.weight, &grads),
        r.float("grad.model.layers.1.mlp.down_proj.weight", &device),
        GRAD_TOL,
    );
    assert_close(
        "grad gate_proj",
        linear_grad(&l1.mlp.gate_proj.weight, &grads),
        r.float("grad.model.layers.1.mlp.gate_proj.weight", &device),
        GRAD_TOL,
    );
    assert_close(
        "grad post_attention_layernorm",
        grad(&l1.post_attention_layernorm.gamma, &grads),
        r.float(
            "grad.model.layers.1.post_attention_layernorm.weight",
            &device,
        ),
        GRAD_TOL,
    );
    assert_close(
        "grad norm",
        grad(&m.norm.gamma, &grads),
        r.float("grad.model.norm.weight", &device),
        GRAD_TOL,
    );
    let head = model
        .lm_head
        .as_ref()
        .expect("untied fixture has an lm_head");
    assert_close(
        "grad lm_head",
        linear_grad(&head.weight, &grads),
        r.float("grad.lm_head.weight", &device),
        GRAD_TOL,
    );
}

#[test]
fn qwen2_tied_embeddings_match_transformers() {
    let device = device();
    let (model, config) = load_qwen2(&fixture("qwen2_tied"), &device).unwrap();
    assert!(config.tie_word_embeddings);
    assert!(model.lm_head.is_none());
    let r = Reference::open("qwen2_tied");
    let logits = model.forward(r.int("input_ids", &device), r.int("position_ids", &device));
    assert_close(
        "tied logits",
        logits.clone(),
        r.float("logits", &device),
        FWD_TOL,
    );
    let loss = causal_lm_loss(logits, r.int("labels", &device));
    assert_close("tied loss", loss.clone(), r.float("loss", &device), FWD_TOL);
    // The embedding gradient sums the input-embedding and LM-head contributions.
    let grads = loss.backward();
    assert_close(
        "tied grad embed_tokens",
        grad(&model.model.embed_tokens.weight, &grads),
        r.float("grad.model.embed_tokens.weight", &device),
        GRAD_TOL,
    );
}

#[test]
fn siglip_matches_transformers_layers_gradients_and_interpolation() {
    let device = device();
    let (model, _) = load_siglip(&fixture("siglip"), &device).unwrap();
    let r = Reference::open("siglip");
    let pixels = r.float::<4>("pixel_values", &device);

    let layer_m2 = model.forward(pixels.clone(), VisionFeature::Layer(-2));
    assert_close(
        "hidden_states[-2] (VILA feature)",
        layer_m2,
        r.float("hidden_states.-2", &device),
        FWD_TOL,
    );
    let layer_1 = model.forward(pixels.clone(), VisionFeature::Layer(-3));
    assert_close(
        "hidden_states[1]",
        layer_1,
        r.float("hidden_states.1", &device),
        FWD_TOL,
    );
    let last = model.forward(pixels, VisionFeature::Last);
    assert_close(
        "last_hidden_state",
        last.clone(),
        r.float("last_hidden_state", &device),
        FWD_TOL,
    );

    let loss = (last * r.float::<3>("probe", &device)).sum();
    let grads = loss.backward();
    let emb = &model.embeddings;
    let l0 = &model.encoder.layers[0];
    assert_close(
        "grad patch_embedding.weight",
        grad(&emb.patch_embedding.weight, &grads),
        r.float("grad.embeddings.patch_embedding.weight", &device),
        GRAD_TOL,
    );
    assert_close(
        "grad patch_embedding.bias",
        grad(emb.patch_embedding.bias.as_ref().unwrap(), &grads),
        r.float("grad.embeddings.patch_embedding.bias", &device),
        GRAD_TOL,
    );
    assert_close(
        "grad position_embedding",
        grad(&emb.position_embedding.weight, &grads),
        r.float("grad.embeddings.position_embedding.weight", &device),
        GRAD_TOL,
    );
    assert_close(
        "grad q_proj",
        linear_grad(&l0.self_attn.q_proj.weight, &grads),
        r.float("grad.encoder.layers.0.self_attn.q_proj.weight", &device),
        GRAD_TOL,
    );
    assert_close(
        "grad layer_norm1",
        grad(&l0.layer_norm1.gamma, &grads),
        r.float("grad.encoder.layers.0.layer_norm1.weight", &device),
        GRAD_TOL,
    );
    assert_close(
        "grad fc1.bias",
        grad(
            model.encoder.layers[2].mlp.fc1.bias.as_ref().unwrap(),
            &grads,
        ),
        r.float("grad.encoder.layers.2.mlp.fc1.bias", &device),
        GRAD_TOL,
    );
    assert_close(
        "grad post_layernorm",
        grad(&model.post_layernorm.gamma, &grads),
        r.float("grad.post_layernorm.weight", &device),
        GRAD_TOL,
    );

    // 56x40 pixels = 7x5 patches: bicubic interpolation of the 5x5 position grid.
    let big = model.forward(r.float("pixel_values_56x40", &device), VisionFeature::Last);
    assert_close(
        "last_hidden_state 56x40 (interpolated positions)",
        big,
        r.float("last_hidden_state_56x40", &device),
        FWD_TOL,
    );
}

#[test]
fn siglip_4x_layout_loads_the_same_weights() {
    let device = device();
    let (model_5x, config) = load_siglip(&fixture("siglip"), &device).unwrap();
    // The same tensors under transformers 4.x's `vision_model.` prefix.
    let dir = TempDir::new("siglip4x");
    std::fs::copy(
        fixture("config_4x/siglip_4x.safetensors"),
        dir.0.join("model.safetensors"),
    )
    .unwrap();
    let mut model_4x = config.init(&device);
    load_into(
        &mut model_4x,
        &dir.0,
        KeyMap::Siglip,
        burn::tensor::DType::F32,
    )
    .unwrap();
    let r = Reference::open("siglip");
    let pixels = r.float::<4>("pixel_values", &device);
    assert_close(
        "4.x-layout SigLIP output",
        model_4x.forward(pixels.clone(), VisionFeature::Last),
        model_5x.forward(pixels, VisionFeature::Last),
        0.0,
    );
}

#[test]
fn mlp2x_gelu_projector_matches_reference() {
    let device = device();
    let mut projector = ProjectorConfig::new(ProjectorKind::Mlp2xGelu, 32, 64).init(&device);
    load_into(
        &mut projector,
        &fixture("projector_mlp2x"),
        KeyMap::Projector(ProjectorKind::Mlp2xGelu),
        burn::tensor::DType::F32,
    )
    .unwrap();
    let r = Reference::open("projector_mlp2x");
    let out = projector.forward(r.float("input", &device), (5, 5));
    assert_close(
        "mlp2x_gelu output",
        out,
        r.float("output", &device),
        FWD_TOL,
    );
}

#[test]
fn vila_vlm_matches_reference_forward_loss_and_gradients() {
    let device = device();
    let (model, config) = load_vila(&fixture("vila"), &device).unwrap();
    assert_eq!(config.projector.kind, ProjectorKind::MlpDownsample);
    assert_eq!(config.vision_feature, VisionFeature::Layer(-2));
    assert_eq!(
        config.tokens_per_frame(),
        9,
        "5x5 patches padded to 6x6, 2x2 merged"
    );
    let r = Reference::open("vila");
    let pixels = r.float::<4>("pixel_values", &device);

    let visual = model.encode_frames(pixels.clone());
    assert_close(
        "visual tokens (SigLIP[-2] + mlp_downsample)",
        visual,
        r.float("visual_tokens", &device),
        FWD_TOL,
    );

    let input = VlmInput {
        input_ids: r.int("input_ids", &device),
        position_ids: r.int("position_ids", &device),
        visual: VisualInput::Pixels(pixels),
    };
    let logits = model.forward(input.clone()).unwrap();
    assert_close("VLM logits", logits, r.float("logits", &device), FWD_TOL);

    let loss = model.loss(input, r.int("labels", &device)).unwrap();
    assert_close("VLM loss", loss.clone(), r.float("loss", &device), FWD_TOL);

    let grads = loss.backward();
    let v = &model.vision_tower;
    let p = &model.mm_projector;
    let l = &model.llm;
    assert_close(
        "grad vision patch_embedding",
        grad(&v.embeddings.patch_embedding.weight, &grads),
        r.float(
            "grad.vision_tower.embeddings.patch_embedding.weight",
            &device,
        ),
        GRAD_TOL,
    );
    assert_close(
        "grad vision q_proj",
        linear_grad(&v.encoder.layers[0].self_attn.q_proj.weight, &grads),
        r.float(
            "grad.vision_tower.encoder.layers.0.self_attn.q_proj.weight",
            &device,
        ),
        GRAD_TOL,
    );
    assert_close(
        "grad projector layernorm",
        grad(&p.norm.as_ref().unwrap().gamma, &grads),
        r.float("grad.mm_projector.layers.1.weight", &device),
        GRAD_TOL,
    );
    assert_close(
        "grad projector linear_1",
        linear_grad(&p.linear_1.weight, &grads),
        r.float("grad.mm_projector.layers.2.weight", &device),
        GRAD_TOL,
    );
    assert_close(
        "grad projector linear_2.bias",
        grad(p.linear_2.bias.as_ref().unwrap(), &grads),
        r.float("grad.mm_projector.layers.4.bias", &device),
        GRAD_TOL,
    );
    assert_close(
        "grad llm embed_tokens",
        grad(&l.model.embed_tokens.weight, &grads),
        r.float("grad.llm.model.embed_tokens.weight", &device),
        GRAD_TOL,
    );
    assert_close(
        "grad llm q_proj",
        linear_grad(&l.model.layers[0].self_attn.q_proj.weight, &grads),
        r.float("grad.llm.model.layers.0.self_attn.q_proj.weight", &device),
        GRAD_TOL,
    );
    assert_close(
        "grad llm lm_head",
        linear_grad(&l.lm_head.as_ref().unwrap().weight, &grads),
        r.float("grad.llm.lm_head.weight", &device),
        GRAD_TOL,
    );
}

/// KV-cache decoding: the prompt (every visual placeholder included) in one cached
/// call, then the remaining tokens one at a time, gives the reference's full-sequence
/// logits row for row.
#[test]
fn vila_kv_cache_decoding_matches_reference_logits() {
    use burn::tensor::{Int, TensorData};
    use longview_models::KvCache;

    let device = device();
    let (model, config) = load_vila(&fixture("vila"), &device).unwrap();
    let r = Reference::open("vila");
    let ids = r.int::<2>("input_ids", &device);
    let positions = r.int::<2>("position_ids", &device);
    let pixels = r.float::<4>("pixel_values", &device);
    let reference = r.float::<3>("logits", &device);
    let [batch, seq] = ids.dims();
    let host: Vec<i64> = ids.to_data().convert::<i64>().try_to_vec().unwrap();
    let per_frame = config.tokens_per_frame();
    let placeholder = config.placeholder_token_id as i64;
    // Frames belong to rows in placeholder order.
    let mut first_frame = 0;
    for b in 0..batch {
        let row = &host[b * seq..(b + 1) * seq];
        let last_visual = row.iter().rposition(|&t| t == placeholder).unwrap();
        let slots = row.iter().filter(|&&t| t == placeholder).count();
        assert_eq!(slots % per_frame, 0, "fixture row {b}: whole frames");
        let row_frames = first_frame..first_frame + slots / per_frame;
        first_frame = row_frames.end;
        let prompt = last_visual + 2;
        assert!(
            prompt < seq,
            "fixture row {b} has tokens after its visual tokens"
        );
        let slice = |t: &burn::tensor::Tensor<2, Int>, a: usize, z: usize| {
            t.clone().slice([b..b + 1, a..z])
        };
        let mut cache = KvCache::new();
        let frames = pixels.clone().slice([row_frames]);
        let mut rows = vec![
            model
                .forward_cached(
                    VlmInput {
                        input_ids: slice(&ids, 0, prompt),
                        position_ids: slice(&positions, 0, prompt),
                        visual: VisualInput::Pixels(frames),
                    },
                    &mut cache,
                )
                .unwrap(),
        ];
        for (t, &token) in row.iter().enumerate().skip(prompt) {
            let one =
                |v: i64| Tensor::<2, Int>::from_data(TensorData::new(vec![v], [1, 1]), &device);
            rows.push(
                model
                    .forward_cached(
                        VlmInput {
                            input_ids: one(token),
                            position_ids: slice(&positions, t, t + 1),
                            visual: VisualInput::None,
                        },
                        &mut cache,
                    )
                    .unwrap(),
            );
        }
        assert_eq!(cache.len(), seq);
        if b + 1 == batch {
            assert_eq!(first_frame, pixels.dims()[0], "every frame used");
        }
        let vocab = reference.dims()[2];
        assert_close(
            &format!("row {b}: cached logits"),
            Tensor::cat(rows, 1),
            reference.clone().slice([b..b + 1, 0..seq, 0..vocab]),
            FWD_TOL,
        );
    }
}
