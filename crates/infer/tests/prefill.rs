//! Prefill and its memory checks on the debug VLM (random weights, CPU): chunked
//! prefill gives the one-pass logits, a video encoded in pieces pools its frames as
//! when encoded whole, and requests too large for the memory are refused with the
//! numbers before they run.

use burn::tensor::{Device, Distribution, Tensor, TensorData};
use longview_infer::generate::{Decoding, GenerateOptions, generate};
use longview_infer::prefill::{check_fits, embed_prompt, estimate, prefill};
use longview_models::vila::default_position_ids;
use longview_models::{KvCache, VisualInput, VlmConfig, VlmInput};

mod common;
use common::{host, ids_tensor, model_and_prompt, worst_error};

#[test]
fn chunked_prefill_gives_the_one_pass_logits() {
    let device = Device::flex();
    let (model, ids, pixels) = model_and_prompt(&device);
    let expected = host(
        model
            .forward(VlmInput {
                input_ids: ids_tensor(&ids, &device),
                position_ids: default_position_ids(1, ids.len(), &device),
                visual: VisualInput::Pixels(pixels.clone()),
            })
            .unwrap(),
    );
    let vocab = expected.len() / ids.len();
    // Chunks smaller than a frame, straddling the visual tokens, one row, and one
    // pass; frames encoded one at a time.
    for chunk in [1, 3, 5, ids.len() - 1, 0] {
        let embeds = embed_prompt(
            &model,
            &ids,
            VisualInput::Pixels(pixels.clone()),
            1,
            &device,
        )
        .unwrap();
        let mut cache = KvCache::new();
        let keep_from = 2;
        let hidden = prefill(&model, embeds, chunk, &mut cache, keep_from);
        assert_eq!(cache.len(), ids.len());
        let got = host(model.logits(hidden));
        let worst = worst_error(&got, &expected[keep_from * vocab..]);
        // Same f32 arithmetic split at other row boundaries: summation order in the
        // attention's softmax differs, nothing else.
        assert!(worst < 1e-5, "chunk {chunk}: worst error {worst}");
    }
}

#[test]
fn a_video_encoded_in_pieces_pools_the_frames_it_pools_whole() {
    use longview_infer::prefill::encode_in_batches;
    use longview_infer::sample::pad_to_pool;
    let device = Device::flex();
    device.seed(5);
    let mut config = VlmConfig::debug();
    config.projector.temporal_pool = Some(3);
    let model = config.init(&device);
    let side = config.vision.image_size;
    let frames = 7;
    let pixels = Tensor::<4>::random(
        [frames, 3, side, side],
        Distribution::Normal(0.0, 1.0),
        &device,
    );
    let whole = model.encode_frames(pixels.clone());
    assert_eq!(whole.dims()[0], config.visual_frames(frames));
    assert_eq!(config.visual_frames(frames), 3);
    // Batches of 1, 2 and 4 frames are rounded up to whole groups of 3.
    for batch in [1, 2, 4] {
        let pieces = encode_in_batches(&model, pixels.clone(), batch);
        let worst = worst_error(&host(pieces), &host(whole.clone()));
        assert!(worst < 1e-6, "batches of {batch}: {worst}");
    }
    // Padding the frames to whole groups by hand (what the sample encoder does for
    // batched samples) gives the same tokens.
    let frame_len = 3 * side * side;
    let flat = pixels
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap();
    let (padded, media) = pad_to_pool(
        flat.into(),
        &[longview_data::Media::Video { frames }],
        3,
        frame_len,
    );
    assert_eq!(padded.len(), 9 * frame_len);
    assert_eq!(media, vec![longview_data::Media::Video { frames: 3 }]);
    let padded = Tensor::<4>::from_data(
        TensorData::new(padded.to_vec(), [9, 3, side, side]),
        &device,
    );
    let worst = worst_error(&host(model.encode_frames(padded)), &host(whole));
    assert!(worst < 1e-6, "padded by hand: {worst}");
}

#[test]
fn requests_too_large_for_memory_are_refused_with_the_numbers() {
    let config = VlmConfig::named("1.5b").unwrap();
    // An hour of video at 197 tokens a frame, 5 samples, in bf16.
    let prompt = 3600 * config.tokens_per_frame() + 64;
    let need = estimate(&config.text, prompt, 512, 5, 2048, 2);
    assert!(need.kv_cache > 1e9, "{need:?}");
    let err = check_fits(&need, 8.0 * (1u64 << 30) as f64, prompt, 2048).unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("KV cache") && message.contains("GiB"),
        "{message}"
    );
    assert!(message.contains(&prompt.to_string()), "{message}");
    // Enough memory: accepted.
    check_fits(&need, need.total() * 1.01, prompt, 2048).unwrap();
}

/// The flash kernels keep no score matrix, so the estimate of a model that calls them
/// has no `heads x chunk x prompt` term: an hour of video without a token budget
/// (1.5B, ~706k tokens, one sample, bf16) needs about 21 GiB, which an 80 GB GPU has,
/// where the reference attention's estimate (about 90 GiB) would refuse it.
#[test]
fn the_estimate_follows_the_attention_the_model_calls() {
    use longview_models::attention::AttentionImpl;
    let mut config = VlmConfig::named("1.5b").unwrap();
    let prompt = 3600 * config.tokens_per_frame() + 64;
    let gib = (1u64 << 30) as f64;
    let reference = estimate(&config.text, prompt, 64, 1, 2048, 2);
    config.text.attention = AttentionImpl::Flash;
    let flash = estimate(&config.text, prompt, 64, 1, 2048, 2);
    assert_eq!(flash.kv_cache, reference.kv_cache);
    assert!(reference.total() > 80.0 * gib, "{reference:?}");
    assert!(flash.total() < 25.0 * gib, "{flash:?}");
    check_fits(&flash, 78.0 * gib, prompt, 2048).unwrap();
    // Linear in the prompt: the activations do not depend on it.
    let longer = estimate(&config.text, 2 * prompt, 64, 1, 2048, 2);
    assert_eq!(longer.activations, flash.activations);
}

#[test]
fn generation_refuses_a_request_over_its_memory_budget_before_running() {
    let device = Device::flex();
    let (model, ids, pixels) = model_and_prompt(&device);
    let shape = model.text_shape();
    assert_eq!(shape.num_layers, VlmConfig::debug().text.num_layers);
    assert_eq!(shape.head_dim(), VlmConfig::debug().text.head_dim());
    // The shape the request check reads says which attention the model calls (the
    // estimate depends on it).
    {
        use longview_models::attention::AttentionImpl;
        assert_eq!(shape.attention, AttentionImpl::Reference);
        let flash = model
            .clone()
            .with_attention(AttentionImpl::Reference, AttentionImpl::Flash);
        assert_eq!(flash.text_shape().attention, AttentionImpl::Flash);
    }
    let options = GenerateOptions {
        memory_budget: Some(1000.0),
        ..GenerateOptions::new(4, Decoding::Greedy, vec![])
    };
    let err = generate(&model, &ids, VisualInput::Pixels(pixels), &options, &device).unwrap_err();
    assert!(err.to_string().contains("available"), "{err}");
}

/// "Until the stop token" asked as `usize::MAX` new tokens is refused with the room
/// left, not an overflow or an allocation failure.
#[test]
fn an_answer_length_past_the_position_limit_is_refused_with_the_room_left() {
    use longview_infer::generate::MAX_SEQUENCE_TOKENS;
    let device = Device::flex();
    let (model, ids, pixels) = model_and_prompt(&device);
    for max_new_tokens in [usize::MAX, MAX_SEQUENCE_TOKENS] {
        let options = GenerateOptions::new(max_new_tokens, Decoding::Greedy, vec![]);
        let err = generate(
            &model,
            &ids,
            VisualInput::Pixels(pixels.clone()),
            &options,
            &device,
        )
        .unwrap_err()
        .to_string();
        let room = MAX_SEQUENCE_TOKENS - ids.len();
        assert!(
            err.contains(&format!("max_new_tokens {max_new_tokens}"))
                && err.contains(&format!("room for {room} new tokens")),
            "{err}"
        );
    }
    // The estimate itself counts such sizes without overflowing.
    let need = estimate(&model.text_shape(), 10, usize::MAX, 4, 0, 2);
    assert!(need.kv_cache.is_finite() && need.kv_cache > 1e20);
}

/// A video whose visual tokens would not fit is refused before decoding, naming the
/// frames, the tokens and the settings that shrink them; the boundary is the tokens
/// (twice: parts and their concatenation) plus one batch of f32 frames.
#[test]
fn a_video_too_large_for_memory_is_refused_with_the_numbers() {
    use longview_infer::prefill::check_video_fits;
    let config = VlmConfig::debug();
    let (frames, batch, bytes) = (3600, 16, 2);
    let tokens = (frames * config.tokens_per_frame()) as f64;
    let side = config.vision.image_size as f64;
    let need = 2.0 * tokens * config.text.hidden_size as f64 * bytes as f64
        + batch as f64 * 3.0 * side * side * 4.0;
    assert!(check_video_fits(&config, frames, batch, bytes, need).is_ok());
    let err = check_video_fits(&config, frames, batch, bytes, need - 1.0).unwrap_err();
    assert!(
        err.contains("3600 frames")
            && err.contains(&format!("{tokens:.0} visual tokens"))
            && err.contains("model.token_pool"),
        "{err}"
    );
}

/// A sample of `frames` frames at side 2 whose every value names its sample and place.
fn numbered_sample(id: usize, frames: usize) -> longview_infer::sample::Sample {
    let values: Vec<f32> = (0..frames * 12).map(|i| (id * 1000 + i) as f32).collect();
    longview_infer::sample::Sample {
        pixels: values.into(),
        frames,
        side: 2,
        ..Default::default()
    }
}

#[test]
fn frame_ranges_come_from_the_samples_in_order_with_zeros_past_the_end() {
    use longview_infer::sample::{Sample, frames_tensor};
    let device = Device::flex();
    let samples = [
        numbered_sample(1, 2),
        numbered_sample(2, 3),
        numbered_sample(3, 1),
    ];
    let refs: Vec<&Sample> = samples.iter().collect();
    // Reference: the six frames concatenated by hand, then two zero frames.
    let mut all: Vec<f32> = samples.iter().flat_map(|s| s.pixels.to_vec()).collect();
    all.resize(8 * 12, 0.0);
    // Inside one sample (read in place), across samples, and past the end (gathered).
    for (first, count) in [
        (0, 2),
        (2, 3),
        (3, 2),
        (5, 1),
        (0, 6),
        (1, 3),
        (4, 4),
        (6, 2),
    ] {
        let got = frames_tensor(&refs, first, count, &device);
        assert_eq!(got.dims(), [count, 3, 2, 2]);
        let got = got
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap();
        assert_eq!(
            got,
            all[first * 12..(first + count) * 12],
            "frames {first}..{}",
            first + count
        );
    }
}

#[test]
fn pixel_data_reads_the_sample_buffer_in_place() {
    let sample = numbered_sample(4, 3);
    let data = sample.pixels.data(12, 24, [2, 3, 2, 2]);
    // The same memory, not a copy of it.
    assert_eq!(
        data.as_bytes().as_ptr(),
        sample.pixels[12..].as_ptr() as *const u8
    );
    assert_eq!(data.try_to_vec::<f32>().unwrap(), sample.pixels[12..36]);
    // Clones share the buffer too.
    let clone = sample.clone();
    assert_eq!(clone.pixels.as_ptr(), sample.pixels.as_ptr());
}
