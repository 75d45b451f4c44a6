//! `flash_bench --decode`: one decoding step's attention on every kernel variant.

use std::time::Instant;

use half::bf16;
use longview_kernels::reference::{Geometry, attention_f64, max_relative_error as max_rel};
use longview_kernels::{DeviceTensor, FlashKernel, FlashOptions, flash_forward_with};

use cubecl::prelude::*;

use super::{random, sync};

/// One decoding step's attention (`sq` query rows per head against `sk` cached keys,
/// all visible, bf16: `sq` = 1 is one sequence's step, `sq` = G the G samples of a
/// GRPO group over their shared prompt, as `SharedPrefixBatch` asks): the split-key
/// decode kernels (inner loops unrolled or kept as loops: `unroll_decode`; the next
/// tile loaded during a tile's work or after: `prefetch_decode`; 128, 256 and 512
/// units a cube: `decode_units`), the tensor-core forward, and the tensor-core forward
/// with the keys split into the batch ([`split_keys`]); ms per call and the K/V bytes
/// read per second.
pub fn bench_decode(client: &Client, (hq, hkv): (usize, usize), sq: usize, sk: usize, reps: usize) {
    let d = 128;
    let data = |seed, heads, len| -> Vec<f32> {
        random(heads * len * d, seed)
            .iter()
            .map(|&v| bf16::from_f32(v).to_f32())
            .collect()
    };
    let (qh, kh, vh) = (data(1, hq, sq), data(2, hkv, sk), data(3, hkv, sk));
    let up = |x: &[f32], heads, len| {
        let x: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        DeviceTensor::from_slice(client, &x, &[1, heads, len, d])
    };
    let (q, k, v) = (up(&qh, hq, sq), up(&kh, hkv, sk), up(&vh, hkv, sk));
    // One row: causal at the end of the keys (every key visible), as the decoder
    // calls it; several: no mask, as the group's prompt keys are called.
    let opts = if sq == 1 {
        FlashOptions::new(d).causal(true).offsets(sk - 1, 0)
    } else {
        FlashOptions::new(d)
    };
    // The f64 reference of this step (every key visible to the last position).
    let geometry = Geometry {
        batch: 1,
        q_heads: hq,
        kv_heads: hkv,
        q_len: sq,
        kv_len: sk,
        head_dim: d,
        scale: opts.scale as f64,
        empty_lse: longview_kernels::flash::NO_KEYS as f64,
    };
    let want = attention_f64(&geometry, &qh, &kh, &vh, None, |_, _, _| true);
    let bytes = (2 * hkv * sk * d * 2) as f64;
    let mut line = format!("| decode | B1 H{hq}:{hkv} Sq{sq} Sk{sk} D{d} |");
    // (kernel, unrolled, units, prefetch, name)
    let variants = [
        (FlashKernel::Decode, true, None, true, "Decode"),
        (FlashKernel::Decode, false, None, true, "Decode (loops)"),
        (
            FlashKernel::Decode,
            true,
            None,
            false,
            "Decode (no prefetch)",
        ),
        (
            FlashKernel::Decode,
            true,
            Some(256),
            true,
            "Decode (256 units)",
        ),
        (
            FlashKernel::Decode,
            true,
            Some(512),
            true,
            "Decode (512 units)",
        ),
        (FlashKernel::TensorCore, true, None, true, "TensorCore"),
    ];
    for (kernel, unroll, units, prefetch, name) in variants {
        let o = DeviceTensor::poisoned::<bf16>(client, f32::NAN, &[1, hq, sq, d]);
        let lse = DeviceTensor::poisoned::<f32>(client, f32::NAN, &[1, hq, sq]);
        let opts = opts
            .clone()
            .unroll_decode(unroll)
            .decode_units(units)
            .prefetch_decode(prefetch);
        let run = || flash_forward_with::<bf16>(client, &q, &k, &v, &o, &lse, &opts, kernel);
        if let Err(e) = run() {
            line += &format!(" {name}: {e} |");
            continue;
        }
        // Checked before timing against the f64 values: O within 1e-2 of its largest
        // value (an average over many keys is small, so not against max(|ref|, 1)),
        // LSE within 1e-3.
        let got: Vec<f32> = o
            .to_vec::<bf16>(client)
            .unwrap()
            .iter()
            .map(|x| x.to_f32())
            .collect();
        assert!(
            got.iter().all(|x| x.is_finite()),
            "{name} decode step Sq {sq} Sk {sk}: O holds NaN or infinities (unwritten?)"
        );
        let largest = want.o.iter().fold(1e-30f64, |m, x| m.max(x.abs()));
        let e_o = got
            .iter()
            .zip(&want.o)
            .fold(0f64, |m, (&g, &w)| m.max((g as f64 - w).abs()))
            / largest;
        let e_l = max_rel(&lse.to_vec::<f32>(client).unwrap(), &want.lse);
        assert!(
            e_o <= 1e-2 && e_l <= 1e-3,
            "{name} decode step Sq {sq} Sk {sk}: O error {e_o:.1e}, LSE error {e_l:.1e}"
        );
        sync(client);
        let t = Instant::now();
        for _ in 0..reps {
            run().unwrap();
        }
        sync(client);
        let s = t.elapsed().as_secs_f64() / reps as f64;
        line += &format!(
            " {name} {:.3} ms, {:.0} GB/s (O err {e_o:.1e}) |",
            s * 1e3,
            bytes / s / 1e9
        );
    }
    line += &split_keys(
        client,
        (&q, &k, &v),
        (hq, hkv, sq, sk),
        (&want.o, &want.lse),
        reps,
    );
    println!("{line}");
}

/// The tensor-core forward with the keys cut into `splits` equal chunks folded into
/// the batch: k and v as a strided view `[splits, hkv, sk / splits, d]` of the same
/// buffer (no copy), q repeated with a zero batch stride. One launch runs `splits x
/// hq` cubes over `sk / splits` keys each where the plain launch runs `hq` cubes over
/// every key (a decoding step has one query block). The partials are merged by their
/// LSEs on the host to check them against `want` (same tolerances as the other
/// variants); the timing is the launch alone, the merge (`splits x hq x sq x d`
/// values) is not in it. The table cell for the split-key decision: if it beats the
/// decode kernels, `SharedPrefixBatch` can fold its prompt's keys this way.
fn split_keys(
    client: &Client,
    (q, k, v): (&DeviceTensor, &DeviceTensor, &DeviceTensor),
    (hq, hkv, sq, sk): (usize, usize, usize, usize),
    (want_o, want_lse): (&[f64], &[f64]),
    reps: usize,
) -> String {
    let d = 128;
    let Some(splits) = [64, 32, 16, 8]
        .into_iter()
        .find(|s| sk % s == 0 && sk / s >= 64)
    else {
        return " TC split: no even split |".into();
    };
    let chunk = sk / splits;
    let fold = |t: &DeviceTensor| DeviceTensor {
        handle: t.handle.clone(),
        shape: vec![splits, hkv, chunk, d],
        strides: vec![chunk * d, sk * d, d, 1],
    };
    let (k, v) = (fold(k), fold(v));
    let q = DeviceTensor {
        handle: q.handle.clone(),
        shape: vec![splits, hq, sq, d],
        strides: vec![0, sq * d, d, 1],
    };
    let o = DeviceTensor::poisoned::<bf16>(client, f32::NAN, &[splits, hq, sq, d]);
    let lse = DeviceTensor::poisoned::<f32>(client, f32::NAN, &[splits, hq, sq]);
    let opts = FlashOptions::new(d);
    let run =
        || flash_forward_with::<bf16>(client, &q, &k, &v, &o, &lse, &opts, FlashKernel::TensorCore);
    if let Err(e) = run() {
        return format!(" TC split x{splits}: {e} |");
    }
    let parts: Vec<f32> = o
        .to_vec::<bf16>(client)
        .unwrap()
        .iter()
        .map(|x| x.to_f32())
        .collect();
    let lses = lse.to_vec::<f32>(client).unwrap();
    let rows = hq * sq;
    let (mut got_o, mut got_lse) = (vec![0f64; rows * d], vec![0f64; rows]);
    for row in 0..rows {
        let l = |s: usize| lses[s * rows + row] as f64;
        let top = (0..splits).map(l).fold(f64::NEG_INFINITY, f64::max);
        let weights: Vec<f64> = (0..splits).map(|s| (l(s) - top).exp()).collect();
        let total: f64 = weights.iter().sum();
        got_lse[row] = top + total.ln();
        for x in 0..d {
            got_o[row * d + x] = (0..splits)
                .map(|s| weights[s] * parts[(s * rows + row) * d + x] as f64)
                .sum::<f64>()
                / total;
        }
    }
    let largest = want_o.iter().fold(1e-30f64, |m, x| m.max(x.abs()));
    let e_o = got_o
        .iter()
        .zip(want_o)
        .fold(0f64, |m, (g, w)| m.max((g - w).abs()))
        / largest;
    let got_lse: Vec<f32> = got_lse.iter().map(|&x| x as f32).collect();
    let e_l = max_rel(&got_lse, want_lse);
    assert!(
        e_o <= 1e-2 && e_l <= 1e-3,
        "TC split x{splits} Sq {sq} Sk {sk}: merged O error {e_o:.1e}, LSE error {e_l:.1e}"
    );
    sync(client);
    let t = Instant::now();
    for _ in 0..reps {
        run().unwrap();
    }
    sync(client);
    let s = t.elapsed().as_secs_f64() / reps as f64;
    let bytes = (2 * hkv * sk * d * 2) as f64;
    format!(
        " TC split x{splits} {:.3} ms, {:.0} GB/s (O err {e_o:.1e}) |",
        s * 1e3,
        bytes / s / 1e9
    )
}
