//! Flash attention on a CubeCL runtime (wgpu; Mesa's lavapipe software Vulkan in CI)
//! against a plain f64 reference written from the definition: scores, masked
//! softmax, weighted sum, LSE, and the analytic gradients. Outputs are poisoned with
//! NaN before every launch so an element a kernel forgets to write fails.

use cubecl::prelude::*;
use longview_kernels::{
    AttnError, DeviceTensor, FlashKernel, FlashOptions, flash_backward, flash_forward,
    flash_forward_with, merge_partials, tensor_cores_unsupported,
};

mod common;
use common::*;

#[test]
fn forward_and_backward_match_the_f64_reference() {
    let client = client();
    let cases = [
        // MHA-sized GQA, Sq != Sk, neither a multiple of the 64-row block.
        Case::new(2, 4, 2, 37, 53, 64),
        // SigLIP's head dim, causal, ragged length.
        Case::new(1, 2, 2, 70, 70, 72).with(|o| o.causal(true)),
        // Ring step, partly visible block: queries at 40..70, keys at 0..50.
        Case::new(1, 8, 2, 30, 50, 80).with(|o| o.causal(true).offsets(40, 0)),
        // Two batches, head dim 128, ring offset.
        Case::new(2, 2, 2, 30, 50, 128).with(|o| o.causal(true).offsets(25, 0)),
        // Ring step, whole key block visible (queries after every key).
        Case::new(1, 4, 1, 20, 50, 64).with(|o| o.causal(true).offsets(100, 0)),
        // Ring step, whole key block masked (keys after every query): O = 0, LSE = NO_KEYS.
        Case::new(1, 2, 1, 20, 30, 64).with(|o| o.causal(true).offsets(0, 100)),
        // Packed sequences (one of them empty), causal and not; head dim 128.
        Case::new(1, 3, 1, 50, 50, 128).with(|o| o.packed(vec![0, 5, 23, 23, 50])),
        Case::new(1, 4, 2, 50, 50, 128).with(|o| o.packed(vec![0, 17, 50]).causal(true)),
        // A single query (decoding) against 130 keys, custom scale.
        Case::new(1, 4, 4, 1, 130, 128).with(|mut o| {
            o.scale = 0.3;
            o
        }),
    ];
    for (n, case) in cases.iter().enumerate() {
        run_case(&client, case, 100 + 10 * n as u64);
    }
}

#[test]
fn merging_partial_results_equals_attention_over_all_keys() {
    let client = client();
    let (b, h, sq, sk, d) = (1, 2, 24, 40, 64);
    let q = random(b * h * sq * d, 7);
    let k = random(b * h * sk * d, 8);
    let v = random(b * h * sk * d, 9);
    let full = Case::new(b, h, h, sq, sk, d).with(|o| o.causal(true).offsets(30, 0));
    let want = reference(&full, &q, &k, &v, &q);
    let qt = DeviceTensor::from_slice(&client, &q, &[b, h, sq, d]);
    let split = 17;
    let part = |lo: usize, hi: usize| {
        let rows: Vec<f32> = (0..b * h)
            .flat_map(|bh| k[(bh * sk + lo) * d..(bh * sk + hi) * d].to_vec())
            .collect();
        let vals: Vec<f32> = (0..b * h)
            .flat_map(|bh| v[(bh * sk + lo) * d..(bh * sk + hi) * d].to_vec())
            .collect();
        (
            DeviceTensor::from_slice(&client, &rows, &[b, h, hi - lo, d]),
            DeviceTensor::from_slice(&client, &vals, &[b, h, hi - lo, d]),
        )
    };
    let (k1, v1) = part(0, split);
    let (k2, v2) = part(split, sk);
    let opts = |k_offset| FlashOptions::new(d).causal(true).offsets(30, k_offset);
    let (o1, l1) = flash_forward::<f32>(&client, &qt, &k1, &v1, &opts(0)).unwrap();
    let (o2, l2) = flash_forward::<f32>(&client, &qt, &k2, &v2, &opts(split)).unwrap();
    // A block nobody can see (keys after every query) merges as a no-op.
    let (o3, l3) = flash_forward::<f32>(&client, &qt, &k2, &v2, &opts(1000)).unwrap();
    merge_partials::<f32>(&client, &o1, &l1, &o3, &l3).unwrap();
    merge_partials::<f32>(&client, &o1, &l1, &o2, &l2).unwrap();
    assert_close(
        "merged O",
        &o1.to_vec::<f32>(&client).unwrap(),
        &want.o,
        TOL_F32,
    );
    let lse: Vec<f32> = l1.to_vec(&client).unwrap();
    for (g, w) in lse.iter().zip(&want.lse) {
        assert!(
            (*g as f64 - w).abs() <= 1e-5 * w.abs().max(1.0),
            "merged LSE {g} vs {w}"
        );
    }
    // Merging in the other order gives the same.
    let (o2b, l2b) = flash_forward::<f32>(&client, &qt, &k2, &v2, &opts(split)).unwrap();
    let (o1b, l1b) = flash_forward::<f32>(&client, &qt, &k1, &v1, &opts(0)).unwrap();
    merge_partials::<f32>(&client, &o2b, &l2b, &o1b, &l1b).unwrap();
    assert_close(
        "merged O (swapped)",
        &o2b.to_vec::<f32>(&client).unwrap(),
        &want.o,
        TOL_F32,
    );
}

#[test]
fn impossible_shapes_and_options_are_refused_with_reasons() {
    let client = client();
    let t = |shape: &[usize]| DeviceTensor::filled(&client, 0f32, shape);
    let err = |r: Result<(DeviceTensor, DeviceTensor), AttnError>| r.unwrap_err().to_string();
    let q = t(&[1, 6, 8, 64]);
    let e = err(flash_forward::<f32>(
        &client,
        &q,
        &t(&[1, 4, 8, 64]),
        &t(&[1, 4, 8, 64]),
        &FlashOptions::new(64),
    ));
    assert!(e.contains("4 kv heads must divide 6 query heads"), "{e}");
    let big = t(&[1, 1, 4, 300]);
    let e = err(flash_forward::<f32>(
        &client,
        &big,
        &big,
        &big,
        &FlashOptions::new(300),
    ));
    assert!(e.contains("head_dim 300 unsupported"), "{e}");
    let q = t(&[1, 2, 10, 64]);
    let e = err(flash_forward::<f32>(
        &client,
        &q,
        &q,
        &t(&[1, 2, 9, 64]),
        &FlashOptions::new(64),
    ));
    assert!(e.contains("must match k"), "{e}");
    let e = err(flash_forward::<f32>(
        &client,
        &q,
        &q,
        &q,
        &FlashOptions::new(64).packed(vec![0, 4, 9]),
    ));
    assert!(
        e.contains("must rise from 0 to the sequence length 10"),
        "{e}"
    );
    let q2 = t(&[2, 2, 10, 64]);
    let e = err(flash_forward::<f32>(
        &client,
        &q2,
        &q2,
        &q2,
        &FlashOptions::new(64).packed(vec![0, 10]),
    ));
    assert!(e.contains("packed sequences need batch 1"), "{e}");
    let e = err(flash_forward::<f32>(
        &client,
        &t(&[2, 10, 64]),
        &q,
        &q,
        &FlashOptions::new(64),
    ));
    assert!(e.contains("q must be [batch, heads, seq, head_dim]"), "{e}");
    let mut bad_scale = FlashOptions::new(64);
    bad_scale.scale = f32::NAN;
    let e = err(flash_forward::<f32>(&client, &q, &q, &q, &bad_scale));
    assert!(e.contains("scale"), "{e}");
}

/// f16 inputs (f32 accumulation) where the runtime supports f16 buffers: O and the
/// gradients within 1e-2 of max(|ref|, 1) against the f64 reference computed from
/// the same f16-rounded inputs; LSE within 1e-3 relative.
#[test]
fn f16_inputs_where_the_runtime_has_them() {
    use cubecl::features::TypeUsage;
    use half::f16;
    let client = client();
    if !f16::supported_uses(&client).contains(TypeUsage::Buffer) {
        eprintln!("f16 buffers unsupported on this runtime: f16 path not exercised here");
        return;
    }
    let c = Case::new(1, 4, 2, 45, 45, 64).with(|o| o.causal(true));
    let round = |x: Vec<f32>| -> Vec<f16> { x.into_iter().map(f16::from_f32).collect() };
    let q = round(random(c.b * c.hq * c.sq * c.d, 1));
    let k = round(random(c.b * c.hkv * c.sk * c.d, 2));
    let v = round(random(c.b * c.hkv * c.sk * c.d, 3));
    let g = round(random(c.b * c.hq * c.sq * c.d, 4));
    let wide = |x: &[f16]| -> Vec<f32> { x.iter().map(|h| h.to_f32()).collect() };
    let want = reference(&c, &wide(&q), &wide(&k), &wide(&v), &wide(&g));
    let t = |x: &[f16], shape: &[usize]| DeviceTensor::from_slice(&client, x, shape);
    let (qt, kt, vt, gt) = (
        t(&q, &[1, 4, 45, 64]),
        t(&k, &[1, 2, 45, 64]),
        t(&v, &[1, 2, 45, 64]),
        t(&g, &[1, 4, 45, 64]),
    );
    let (o, lse) = flash_forward::<f16>(&client, &qt, &kt, &vt, &c.options).unwrap();
    let read = |x: &DeviceTensor| wide(&x.to_vec::<f16>(&client).unwrap());
    assert_close("f16 O", &read(&o), &want.o, 1e-2);
    for (got, w) in lse.to_vec::<f32>(&client).unwrap().iter().zip(&want.lse) {
        assert!(
            (*got as f64 - w).abs() <= 1e-3 * w.abs().max(1.0),
            "f16 LSE {got} vs {w}"
        );
    }
    let (dq, dk, dv) =
        flash_backward::<f16>(&client, &qt, &kt, &vt, &o, &lse, &gt, &c.options).unwrap();
    assert_close("f16 dQ", &read(&dq), &want.dq, 1e-2);
    assert_close("f16 dK", &read(&dk), &want.dk, 1e-2);
    assert_close("f16 dV", &read(&dv), &want.dv, 1e-2);
}

/// The tensor-core kernels run only where the device has `mma` m16n8k16 and
/// `ldmatrix` for the 16-bit input type (CUDA sm_80+; checked on an H100 by
/// `flash_bench`, benchmarks/flash_attention.md). Here (wgpu) they must be refused
/// with the reason when asked for by name, and `Auto` must fall back to the scalar
/// kernel and still be right.
#[test]
fn tensor_cores_are_refused_with_a_reason_where_the_device_lacks_them() {
    let client = client();
    let q = DeviceTensor::filled(&client, 0f32, &[1, 2, 16, 64]);
    let why = tensor_cores_unsupported::<f32>(&client, &[("q", &q)]).expect("f32 is refused");
    assert!(why.contains("not a 16-bit float"), "{why}");
    if !client.properties().supports_type(half::f16::cube_type()) {
        return;
    }
    let x = random(2 * 16 * 64, 7);
    let h: Vec<half::f16> = x.iter().map(|&v| half::f16::from_f32(v)).collect();
    let q = DeviceTensor::from_slice(&client, &h, &[1, 2, 16, 64]);
    let Some(why) = tensor_cores_unsupported::<half::f16>(&client, &[("q", &q)]) else {
        // A device with tensor cores behind wgpu: nothing to refuse.
        return;
    };
    assert!(why.contains("mma") || why.contains("ldmatrix"), "{why}");
    let o = DeviceTensor::filled(&client, half::f16::from_f32(f32::NAN), &[1, 2, 16, 64]);
    let lse = DeviceTensor::filled(&client, f32::NAN, &[1, 2, 16]);
    let opts = FlashOptions::new(64);
    let e = flash_forward_with::<half::f16>(
        &client,
        &q,
        &q,
        &q,
        &o,
        &lse,
        &opts,
        FlashKernel::TensorCore,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("tensor-core kernels cannot run"), "{e}");
    // Auto: the scalar kernel, same result as the plain call.
    flash_forward_with::<half::f16>(&client, &q, &q, &q, &o, &lse, &opts, FlashKernel::Auto)
        .unwrap();
    let (o2, _) = flash_forward::<half::f16>(&client, &q, &q, &q, &opts).unwrap();
    assert_eq!(
        o.to_vec::<half::f16>(&client).unwrap(),
        o2.to_vec::<half::f16>(&client).unwrap()
    );
}
