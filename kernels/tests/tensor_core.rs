//! The tensor-core flash kernels (`mma.sync` + `ldmatrix`, bf16/f16 on CUDA sm_80+),
//! the CUDA default, against the shared f64 reference (`longview_kernels::reference`)
//! on the 16-bit-rounded inputs: O, LSE, dQ, dK, dV over causal/full masks, ring
//! offsets, GQA, packed sequences and head dims 64/72/80/128, and counted decoding
//! steps on the tensor-core slices. Every output starts as
//! NaN, so an element no kernel writes fails. Tolerances relative to max(|ref|, 1):
//! O and gradients 1e-2 (bf16) / 2e-3 (f16), LSE 1e-3.
//!
//! Needs an NVIDIA GPU, so ignored by default. On the device machine (the binary built
//! here with `cargo test -p longview-kernels --no-default-features --features cuda
//! --test tensor_core --no-run --release` and carried there):
//!     tensor_core-<hash> --ignored --test-threads 1

#![cfg(feature = "cuda")]

use cubecl::prelude::*;
use longview_kernels::flash::NO_KEYS;
use longview_kernels::flash::flash_decode_counted_with;
use longview_kernels::reference::random_values as random;
use longview_kernels::reference::{
    Geometry, attention_f64, cache_rows_then, error_of_largest, max_relative_error as max_rel,
};
use longview_kernels::{
    DeviceTensor, FlashKernel, FlashOptions, flash_backward_with, flash_forward_with,
};

fn client() -> Client {
    cubecl::Device::cuda(0).expect("CUDA device 0").client()
}

struct Case {
    dims: [usize; 6], // b, hq, hkv, sq, sk, d
    options: FlashOptions,
}

fn run<E: Float + CubeElement>(
    client: &Client,
    c: &Case,
    to: fn(f32) -> E,
    from: fn(E) -> f32,
    tol: f64,
) {
    let [b, hq, hkv, sq, sk, d] = c.dims;
    let round = |x: Vec<f32>| -> Vec<E> { x.into_iter().map(to).collect() };
    let (q, k, v, g) = (
        round(random(b * hq * sq * d, 1)),
        round(random(b * hkv * sk * d, 2)),
        round(random(b * hkv * sk * d, 3)),
        round(random(b * hq * sq * d, 4)),
    );
    let back = |x: &[E]| -> Vec<f32> { x.iter().map(|&e| from(e)).collect() };
    let o = &c.options;
    let segment = |p: usize| {
        o.cu_seqlens.as_ref().map(|cu| {
            cu.windows(2)
                .position(|w| (w[0] as usize..w[1] as usize).contains(&p))
        })
    };
    let geometry = Geometry {
        batch: b,
        q_heads: hq,
        kv_heads: hkv,
        q_len: sq,
        kv_len: sk,
        head_dim: d,
        scale: o.scale as f64,
        empty_lse: NO_KEYS as f64,
    };
    let want = attention_f64(
        &geometry,
        &back(&q),
        &back(&k),
        &back(&v),
        Some(&back(&g)),
        |_, i, j| !(o.causal && o.k_offset + j > o.q_offset + i) && segment(i) == segment(j),
    );
    let t = |x: &[E], shape: &[usize]| DeviceTensor::from_slice(client, x, shape);
    let (qt, kt, vt, gt) = (
        t(&q, &[b, hq, sq, d]),
        t(&k, &[b, hkv, sk, d]),
        t(&v, &[b, hkv, sk, d]),
        t(&g, &[b, hq, sq, d]),
    );
    let ot = DeviceTensor::filled(client, to(f32::NAN), &[b, hq, sq, d]);
    let lt = DeviceTensor::filled(client, f32::NAN, &[b, hq, sq]);
    flash_forward_with::<E>(client, &qt, &kt, &vt, &ot, &lt, o, FlashKernel::TensorCore).unwrap();
    let label = format!("{:?} {}", c.dims, std::any::type_name::<E>());
    let checks: [(&str, Vec<f32>, &Vec<f64>, f64); 2] = [
        ("O", back(&ot.to_vec::<E>(client).unwrap()), &want.o, tol),
        ("LSE", lt.to_vec::<f32>(client).unwrap(), &want.lse, 1e-3),
    ];
    for (name, got, want, tol) in checks {
        let e = max_rel(&got, want);
        assert!(
            e <= tol,
            "{name} {label}: max relative error {e:.2e} > {tol:.0e}"
        );
    }
    let (dq, dk, dv) = flash_backward_with::<E>(
        client,
        &qt,
        &kt,
        &vt,
        &ot,
        &lt,
        &gt,
        o,
        FlashKernel::TensorCore,
    )
    .unwrap();
    for (name, got, want) in [
        ("dQ", dq, &want.dq),
        ("dK", dk, &want.dk),
        ("dV", dv, &want.dv),
    ] {
        let e = max_rel(&back(&got.to_vec::<E>(client).unwrap()), want);
        assert!(
            e <= tol,
            "{name} {label}: max relative error {e:.2e} > {tol:.0e}"
        );
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU (sm_80+); run on the device machine, see the module docs"]
fn tensor_core_kernels_match_the_f64_reference() {
    let client = client();
    let cases = [
        Case {
            dims: [1, 4, 4, 256, 256, 128],
            options: FlashOptions::new(128).causal(true),
        },
        Case {
            dims: [2, 12, 2, 200, 200, 128],
            options: FlashOptions::new(128).causal(true),
        },
        Case {
            dims: [1, 8, 2, 96, 160, 64],
            options: FlashOptions::new(64).causal(true).offsets(100, 0),
        },
        Case {
            dims: [2, 4, 4, 129, 129, 72],
            options: FlashOptions::new(72),
        },
        Case {
            dims: [1, 4, 2, 150, 150, 80],
            options: FlashOptions::new(80)
                .packed(vec![0, 40, 41, 150])
                .causal(true),
        },
        Case {
            dims: [1, 2, 1, 64, 64, 64],
            options: FlashOptions::new(64).causal(true).offsets(0, 100),
        },
    ];
    for case in &cases {
        run::<half::bf16>(
            &client,
            case,
            half::bf16::from_f32,
            half::bf16::to_f32,
            1e-2,
        );
        run::<half::f16>(&client, case, half::f16::from_f32, half::f16::to_f32, 2e-3);
    }
}

/// Counted decoding on the tensor cores (what a decoding step captured as a device
/// graph runs where an eager step takes the tensor-core slices): the first `sk` rows
/// of buffers of `capacity` rows are keys, the rows after them hold keys of 0 and
/// values of 1e6 (a row read by mistake moves O by far more than the tolerance).
/// bf16 against the f64 reference of the counted keys: O within 1e-2 of its largest
/// value (a decoding step's O is an average over many keys, so small), LSE within
/// 1e-3 relative (a slice left out moves it by the log of the share it held).
#[test]
#[ignore = "needs an NVIDIA GPU (sm_80+); run on the device machine, see the module docs"]
fn counted_tensor_core_decoding_matches_the_f64_reference() {
    use half::bf16;
    let client = client();
    // (heads, kv heads, rows a head, counted keys, capacity, head dim, slices)
    let cases = [
        (12, 2, 1, 1000, 1100, 128, None),
        (12, 2, 1, 1000, 1100, 128, Some(3)),
        (28, 4, 1, 517, 600, 128, Some(8)),
        (12, 2, 5, 333, 400, 64, Some(4)),
        (4, 4, 1, 64, 64, 80, None),
    ];
    for (index, (hq, hkv, sq, sk, capacity, d, slices)) in cases.into_iter().enumerate() {
        let seed = 200 + 4 * index as u64;
        let round = |x: Vec<f32>| -> Vec<f32> {
            x.into_iter().map(|v| bf16::from_f32(v).to_f32()).collect()
        };
        let (q, k, v) = (
            round(random(hq * sq * d, seed)),
            round(random(hkv * sk * d, seed + 1)),
            round(random(hkv * sk * d, seed + 2)),
        );
        let mut options = FlashOptions::new(d);
        options.decode.splits = slices;
        let geometry = Geometry {
            batch: 1,
            q_heads: hq,
            kv_heads: hkv,
            q_len: sq,
            kv_len: sk,
            head_dim: d,
            scale: options.scale as f64,
            empty_lse: NO_KEYS as f64,
        };
        let want = attention_f64(&geometry, &q, &k, &v, None, |_, _, _| true);
        let up = |x: &[f32], shape: &[usize]| {
            let x: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
            DeviceTensor::from_slice(&client, &x, shape)
        };
        let padded = |x: &[f32], past| {
            up(
                &cache_rows_then(x, sk, capacity, d, past),
                &[1, hkv, capacity, d],
            )
        };
        let (qt, kt, vt) = (up(&q, &[1, hq, sq, d]), padded(&k, 0.0), padded(&v, 1e6));
        let count = DeviceTensor::from_slice(&client, &[sk as u32], &[1]);
        let ot = DeviceTensor::filled(&client, bf16::NAN, &[1, hq, sq, d]);
        let lt = DeviceTensor::filled(&client, f32::NAN, &[1, hq, sq]);
        let tc = FlashKernel::TensorCore;
        flash_decode_counted_with::<bf16>(&client, &qt, &kt, &vt, &ot, &lt, &count, &options, tc)
            .unwrap();
        let label = format!("case {index} ({sk} of {capacity} rows, slices {slices:?})");
        let got: Vec<f32> = ot
            .to_vec::<bf16>(&client)
            .unwrap()
            .iter()
            .map(|x| x.to_f32())
            .collect();
        let e_o = error_of_largest(&got, &want.o);
        assert!(
            e_o <= 1e-2,
            "O {label}: error {e_o:.2e} of the largest value > 1e-2"
        );
        let e_l = max_rel(&lt.to_vec::<f32>(&client).unwrap(), &want.lse);
        assert!(
            e_l <= 1e-3,
            "LSE {label}: max relative error {e_l:.2e} > 1e-3"
        );
    }
}
