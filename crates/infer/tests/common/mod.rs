//! What the inference test binaries share: the debug VLM with a two-frame video
//! prompt, the samplings they decode with, and host-side comparisons.
#![allow(dead_code)] // each test binary uses a part

use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};
use longview_infer::generate::Decoding;
use longview_models::{Vlm, VlmConfig};

pub const FRAMES: usize = 2;

pub fn model_and_prompt(device: &Device) -> (Vlm, Vec<u32>, Tensor<4>) {
    device.seed(11);
    let config = VlmConfig::debug();
    let model = config.init(device);
    let placeholder = model.placeholder_token_id;
    let mut ids: Vec<u32> = vec![5, 17, 3];
    ids.extend(std::iter::repeat_n(
        placeholder,
        FRAMES * config.tokens_per_frame(),
    ));
    ids.extend([41, 7, 9, 12]);
    let side = config.vision.image_size;
    let pixels = Tensor::<4>::random(
        [FRAMES, 3, side, side],
        Distribution::Normal(0.0, 1.0),
        device,
    );
    (model, ids, pixels)
}

pub fn host(t: Tensor<3>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

/// max |a - b| / max(|b|, 1): relative where values are large, absolute near zero.
pub fn worst_error(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
        .fold(0.0, f32::max)
}

pub fn ids_tensor(ids: &[u32], device: &Device) -> Tensor<2, Int> {
    let data: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
    Tensor::from_data(TensorData::new(data, [1, ids.len()]), device)
}

/// Greedy and four top-p samplings (different p, temperatures and seeds).
pub fn decodings() -> Vec<Decoding> {
    vec![
        Decoding::Greedy,
        Decoding::TopP {
            top_p: 0.99,
            temperature: 1.0,
            seed: 1,
        },
        Decoding::TopP {
            top_p: 0.99,
            temperature: 1.0,
            seed: 2,
        },
        Decoding::TopP {
            top_p: 0.8,
            temperature: 0.7,
            seed: 3,
        },
        Decoding::TopP {
            top_p: 1.0,
            temperature: 1.3,
            seed: 4,
        },
    ]
}
