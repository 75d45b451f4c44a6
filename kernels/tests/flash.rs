//! Flash attention on a CubeCL runtime (wgpu; Mesa's lavapipe software Vulkan in CI)
//! against a plain f64 reference written from the definition: scores, masked
//! softmax, weighted sum, LSE, and the analytic gradients. Outputs are poisoned with
//! NaN before every launch so an element a kernel forgets to write fails.

use cubecl::Device;
use cubecl::device::WgpuDeviceKind;
use cubecl::prelude::*;
use longview_kernels::flash::{NO_KEYS, flash_forward_into};
use longview_kernels::reference::{AttentionF64, Geometry, attention_f64};
use longview_kernels::{
    AttnError, DeviceTensor, FlashKernel, FlashOptions, flash_backward, flash_forward,
    flash_forward_with, merge_partials, tensor_cores_unsupported,
};

fn client() -> Client {
    Device::wgpu(WgpuDeviceKind::DefaultDevice)
        .expect("a wgpu device (CI: Mesa lavapipe, `apt-get install mesa-vulkan-drivers`)")
        .client()
}

/// Deterministic values in [-1, 1).
fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f64 / (1u64 << 24) as f64 * 2.0 - 1.0) as f32
        })
        .collect()
}

#[derive(Clone, Debug)]
struct Case {
    b: usize,
    hq: usize,
    hkv: usize,
    sq: usize,
    sk: usize,
    d: usize,
    options: FlashOptions,
}

impl Case {
    fn new(b: usize, hq: usize, hkv: usize, sq: usize, sk: usize, d: usize) -> Self {
        Case {
            b,
            hq,
            hkv,
            sq,
            sk,
            d,
            options: FlashOptions::new(d),
        }
    }
    fn with(mut self, f: impl FnOnce(FlashOptions) -> FlashOptions) -> Self {
        self.options = f(self.options);
        self
    }
    fn allowed(&self, i: usize, j: usize) -> bool {
        let o = &self.options;
        if o.causal && o.k_offset + j > o.q_offset + i {
            return false;
        }
        if let Some(cu) = &o.cu_seqlens {
            let seg = |p: usize| {
                cu.windows(2)
                    .position(|w| (w[0] as usize..w[1] as usize).contains(&p))
            };
            return seg(i) == seg(j);
        }
        true
    }
}

/// The definition, in f64 (`longview_kernels::reference`).
fn reference(c: &Case, q: &[f32], k: &[f32], v: &[f32], d_o: &[f32]) -> AttentionF64 {
    let geometry = Geometry {
        batch: c.b,
        q_heads: c.hq,
        kv_heads: c.hkv,
        q_len: c.sq,
        kv_len: c.sk,
        head_dim: c.d,
        scale: c.options.scale as f64,
        empty_lse: NO_KEYS as f64,
    };
    attention_f64(&geometry, q, k, v, Some(d_o), |_, i, j| c.allowed(i, j))
}

/// Max |got - want| relative to max(|want|, 1), asserted below `tol`.
fn assert_close(name: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let scale = want.iter().fold(1.0f64, |m, x| m.max(x.abs()));
    let mut worst = (0.0f64, 0usize);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs() / scale;
        assert!(!g.is_nan(), "{name}[{i}] is NaN (never written?)");
        if err > worst.0 {
            worst = (err, i);
        }
    }
    assert!(
        worst.0 <= tol,
        "{name}: relative error {:.2e} at {} (got {}, want {}) exceeds {tol:.0e}",
        worst.0,
        worst.1,
        got[worst.1],
        want[worst.1]
    );
}

/// f32 tolerance relative to max(|ref|, 1): the kernels accumulate in f32 over at
/// most a few hundred terms.
const TOL_F32: f64 = 2e-5;

fn run_case(client: &Client, c: &Case, seed: u64) {
    let q = random(c.b * c.hq * c.sq * c.d, seed);
    let k = random(c.b * c.hkv * c.sk * c.d, seed + 1);
    let v = random(c.b * c.hkv * c.sk * c.d, seed + 2);
    let d_o = random(c.b * c.hq * c.sq * c.d, seed + 3);
    let want = reference(c, &q, &k, &v, &d_o);
    let qt = DeviceTensor::from_slice(client, &q, &[c.b, c.hq, c.sq, c.d]);
    let kt = DeviceTensor::from_slice(client, &k, &[c.b, c.hkv, c.sk, c.d]);
    let vt = DeviceTensor::from_slice(client, &v, &[c.b, c.hkv, c.sk, c.d]);
    let gt = DeviceTensor::from_slice(client, &d_o, &[c.b, c.hq, c.sq, c.d]);
    // Forward into NaN-poisoned outputs.
    let o = DeviceTensor::filled(client, f32::NAN, &[c.b, c.hq, c.sq, c.d]);
    let lse = DeviceTensor::filled(client, f32::NAN, &[c.b, c.hq, c.sq]);
    flash_forward_into::<f32>(client, &qt, &kt, &vt, &o, &lse, &c.options).unwrap();
    let label = format!("{c:?}");
    assert_close(
        &format!("O {label}"),
        &o.to_vec::<f32>(client).unwrap(),
        &want.o,
        TOL_F32,
    );
    let lse_got = lse.to_vec::<f32>(client).unwrap();
    for (i, (&g, &w)) in lse_got.iter().zip(&want.lse).enumerate() {
        if w <= NO_KEYS as f64 {
            assert_eq!(g, NO_KEYS, "LSE[{i}] of a row without keys {label}");
        } else {
            assert!(
                (g as f64 - w).abs() <= 1e-5 * w.abs().max(1.0),
                "LSE[{i}]: {g} vs {w} {label}"
            );
        }
    }
    // Backward (its outputs start as NaN inside flash_backward).
    let (dq, dk, dv) =
        flash_backward::<f32>(client, &qt, &kt, &vt, &o, &lse, &gt, &c.options).unwrap();
    assert_close(
        &format!("dQ {label}"),
        &dq.to_vec::<f32>(client).unwrap(),
        &want.dq,
        TOL_F32,
    );
    assert_close(
        &format!("dK {label}"),
        &dk.to_vec::<f32>(client).unwrap(),
        &want.dk,
        TOL_F32,
    );
    assert_close(
        &format!("dV {label}"),
        &dv.to_vec::<f32>(client).unwrap(),
        &want.dv,
        TOL_F32,
    );
}

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

/// The split-key decode kernels (what `Auto` runs for at most `DECODE_MAX_ROWS` query
/// rows per kv head): O, LSE and the backward from their O/LSE against the f64
/// reference, over grouped heads, several key slices (lavapipe reports no
/// multiprocessor count: 64 assumed, so about 128 / (B * Hkv) slices), a slice count
/// that does not divide the keys, causal offsets with rows that see different key
/// counts, a row block that sees no key, the largest row count, head dim 72, cubes
/// that walk several tiles. The
/// explicit `FlashKernel::Decode` gives the same bits as `Auto`, and calls it cannot
/// take are refused.
///
/// The 1000-key case checks the forward only: on lavapipe the scalar forward and dQ
/// kernels leave most of each row unwritten (NaN) once a unit's loops pass about 65k
/// iterations (600 keys at head dim 64, 301 at 128), as llvmpipe caps the loop
/// iterations of a shader invocation at 65,535 (CUDA runs them at 1024+ keys in
/// `flash_bench`), so the backward is checked on the shorter cases.
#[test]
fn decode_kernels_match_the_f64_reference() {
    let client = client();
    // The 1.5B model's grouping (12:2), two sequences, one new token, 1000 keys:
    // O and LSE only.
    let long = Case::new(2, 12, 2, 1, 1000, 64).with(|o| o.causal(true).offsets(999, 0));
    let (q, k, v) = (
        random(long.b * long.hq * long.d, 41),
        random(long.b * long.hkv * long.sk * long.d, 42),
        random(long.b * long.hkv * long.sk * long.d, 43),
    );
    let want = reference(&long, &q, &k, &v, &random(q.len(), 44));
    let up = |x: &[f32], heads: usize, len: usize| {
        DeviceTensor::from_slice(&client, x, &[long.b, heads, len, long.d])
    };
    let o = DeviceTensor::filled(&client, f32::NAN, &[long.b, long.hq, 1, long.d]);
    let lse = DeviceTensor::filled(&client, f32::NAN, &[long.b, long.hq, 1]);
    let (qt, kt, vt) = (
        up(&q, long.hq, 1),
        up(&k, long.hkv, long.sk),
        up(&v, long.hkv, long.sk),
    );
    flash_forward_with::<f32>(
        &client,
        &qt,
        &kt,
        &vt,
        &o,
        &lse,
        &long.options,
        FlashKernel::Decode,
    )
    .unwrap();
    assert_close(
        "O, 1000 keys",
        &o.to_vec::<f32>(&client).unwrap(),
        &want.o,
        TOL_F32,
    );
    assert_close(
        "LSE, 1000 keys",
        &lse.to_vec::<f32>(&client).unwrap(),
        &want.lse,
        TOL_F32,
    );

    let cases = [
        // The 1.5B model's grouping, two sequences, one new token, 300 keys.
        Case::new(2, 12, 2, 1, 300, 64).with(|o| o.causal(true).offsets(299, 0)),
        // Three new tokens at the end of 201 keys (rows see 199, 200, 201 keys).
        Case::new(1, 4, 1, 3, 201, 128).with(|o| o.causal(true).offsets(198, 0)),
        // Keys after every query: O = 0, LSE = NO_KEYS.
        Case::new(1, 2, 1, 2, 30, 64).with(|o| o.causal(true).offsets(0, 100)),
        // 32 rows per kv head (16 heads x 2 positions), SigLIP's head dim, no mask.
        Case::new(1, 16, 1, 2, 77, 72),
        // Fewer keys than one tile.
        Case::new(1, 7, 1, 1, 5, 64),
        // A head dim that is not a multiple of 4 (the score's remainder loop).
        Case::new(1, 6, 2, 1, 90, 70).with(|o| o.causal(true).offsets(89, 0)),
        // 128 kv heads: one slice a head (128 cubes already), so each cube walks
        // several tiles (the next tile's loads overlap a tile's work), the last
        // one partial.
        Case::new(1, 128, 128, 1, 230, 32).with(|o| o.causal(true).offsets(229, 0)),
    ];
    for (n, case) in cases.iter().enumerate() {
        run_case(&client, case, 500 + 10 * n as u64);
        let q = DeviceTensor::from_slice(
            &client,
            &random(case.b * case.hq * case.sq * case.d, 1),
            &[case.b, case.hq, case.sq, case.d],
        );
        let kv = DeviceTensor::from_slice(
            &client,
            &random(case.b * case.hkv * case.sk * case.d, 2),
            &[case.b, case.hkv, case.sk, case.d],
        );
        let run = |kernel, options: &FlashOptions| {
            let o = DeviceTensor::filled(&client, f32::NAN, &q.shape);
            let lse = DeviceTensor::filled(&client, f32::NAN, &q.shape[..3]);
            flash_forward_with::<f32>(&client, &q, &kv, &kv, &o, &lse, options, kernel).unwrap();
            (
                o.to_vec::<f32>(&client).unwrap(),
                lse.to_vec::<f32>(&client).unwrap(),
            )
        };
        let auto = run(FlashKernel::Auto, &case.options);
        let decode = run(FlashKernel::Decode, &case.options);
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&auto.0), bits(&decode.0), "O of case {n}");
        assert_eq!(bits(&auto.1), bits(&decode.1), "LSE of case {n}");
        // The inner loops kept as loops (`LONGVIEW_DECODE_UNROLL=0`): the same sums in
        // the same order, but the shader compiler may contract them differently, so
        // within f32 rounding rather than bit for bit.
        let looped = run(
            FlashKernel::Decode,
            &case.options.clone().unroll_decode(false),
        );
        let wide = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<_>>();
        let name = |what| format!("{what} of case {n}, loops");
        assert_close(&name("O"), &looped.0, &wide(&decode.0), TOL_F32);
        assert_close(&name("LSE"), &looped.1, &wide(&decode.1), TOL_F32);
        // Other cube sizes (the same sums, spread over more or fewer units), and the
        // next tile loaded after a tile's work instead of during it.
        let variants = [
            ("64 units", case.options.clone().decode_units(Some(64))),
            ("256 units", case.options.clone().decode_units(Some(256))),
            ("no prefetch", case.options.clone().prefetch_decode(false)),
        ];
        for (variant, options) in variants {
            let other = run(FlashKernel::Decode, &options);
            let name = |what| format!("{what} of case {n}, {variant}");
            assert_close(&name("O"), &other.0, &wide(&decode.0), TOL_F32);
            assert_close(&name("LSE"), &other.1, &wide(&decode.1), TOL_F32);
        }
    }
    // Calls the decode kernels cannot take are refused with the numbers: `heads`
    // query heads over one kv head, one position, ten keys.
    let refusal = |heads: usize, options: &FlashOptions| {
        let q = DeviceTensor::filled(&client, 0f32, &[1, heads, 1, 64]);
        let kv = DeviceTensor::filled(&client, 0f32, &[1, 1, 10, 64]);
        let o = DeviceTensor::filled(&client, 0f32, &[1, heads, 1, 64]);
        let lse = DeviceTensor::filled(&client, 0f32, &[1, heads, 1]);
        flash_forward_with::<f32>(
            &client,
            &q,
            &kv,
            &kv,
            &o,
            &lse,
            options,
            FlashKernel::Decode,
        )
        .unwrap_err()
        .to_string()
    };
    // Cube sizes the kernel cannot use.
    for units in [16, 48, 2048] {
        let e = refusal(4, &FlashOptions::new(64).decode_units(Some(units)));
        assert!(e.contains(&format!("decode_units {units}")), "{e}");
    }
    // 33 rows per kv head.
    let e = refusal(33, &FlashOptions::new(64));
    assert!(e.contains("at most 32 query rows per kv head"), "{e}");
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
