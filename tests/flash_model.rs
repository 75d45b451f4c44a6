//! `AttentionImpl::Flash` inside the debug Qwen2 on a wgpu device (Mesa lavapipe in
//! CI) against `AttentionImpl::Reference` on the same device and weights: logits and
//! parameter gradients.

use burn::tensor::{Device, DeviceKind, Distribution, Int, Tensor, TensorData};
use longview_models::attention::{AttentionImpl, flash_available};
use longview_models::vila::{Qwen2, TextConfig, default_position_ids};

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().iter::<f32>().collect()
}

/// Largest |a - b| relative to max(|b|, 1).
fn relative_error<const D: usize>(got: Tensor<D>, want: Tensor<D>) -> f32 {
    let (got, want) = (values(got), values(want));
    let scale = want.iter().fold(1f32, |m, x| m.max(x.abs()));
    got.iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs() / scale)
        .fold(0f32, f32::max)
}

fn watched(model: &Qwen2) -> Vec<(&'static str, Tensor<2>)> {
    let layers = &model.model.layers;
    vec![
        ("embed_tokens", model.model.embed_tokens.weight.val()),
        ("layer0.q_proj", layers[0].self_attn.q_proj.weight.val()),
        ("layer0.k_proj", layers[0].self_attn.k_proj.weight.val()),
        ("layer1.v_proj", layers[1].self_attn.v_proj.weight.val()),
        ("lm_head", model.lm_head.as_ref().unwrap().weight.val()),
    ]
}

#[test]
fn flash_attention_in_the_llm_matches_the_reference() {
    let device = Device::wgpu(DeviceKind::DefaultDevice).autodiff();
    assert!(flash_available(&device));
    assert!(
        !flash_available(&Device::flex()),
        "flex has no CubeCL kernels"
    );
    // 4 query / 2 kv heads of 16 dims; 37 tokens: not a multiple of any tile size.
    let model = TextConfig::debug().init(&device);
    let flash = model.clone().with_attention(AttentionImpl::Flash);
    let (batch, seq) = (2, 37);
    let ids: Vec<i64> = (0..(batch * seq) as i64)
        .map(|i| (i * 31 + 7) % 300)
        .collect();
    let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [batch, seq]), &device);
    let positions = default_position_ids(batch, seq, &device);
    let weights = Tensor::<3>::random([batch, seq, 300], Distribution::Normal(0.0, 1.0), &device);

    let reference = model.forward(ids.clone(), positions.clone());
    let got = flash.forward(ids, positions);
    let error = relative_error(got.clone(), reference.clone());
    // f32 throughout; the two paths sum the softmax in different orders.
    assert!(error <= 1e-4, "logits: relative error {error:.2e}");

    let grads_ref = (reference * weights.clone()).sum().backward();
    let grads = (got * weights).sum().backward();
    for ((name, p_ref), (_, p)) in watched(&model).into_iter().zip(watched(&flash)) {
        let error = relative_error(p.grad(&grads).unwrap(), p_ref.grad(&grads_ref).unwrap());
        assert!(
            error <= 1e-3,
            "gradient of {name}: relative error {error:.2e}"
        );
    }
}
