//! `flash_bench --decode`: one decoding step's attention on every kernel variant.

use std::time::Instant;

use half::bf16;
use longview_kernels::flash::flash_decode_counted_with;
use longview_kernels::reference::{
    Geometry, attention_f64, cache_rows_then, error_of_largest, max_relative_error as max_rel,
};
use longview_kernels::{
    DeviceTensor, FlashKernel, FlashOptions, flash_decode_sliced, flash_forward_with,
};

use cubecl::prelude::*;

use super::{random, sync};

/// Rows past the counted keys in the counted variants' buffers (a KV cache sized for
/// a whole answer holds its later tokens' rows).
const CAPACITY_SLACK: usize = 64;

/// One decoding step's attention (`sq` query rows per head against `sk` cached keys,
/// all visible, bf16: `sq` = 1 is one sequence's step, `sq` = G the G samples of a
/// GRPO group over their shared prompt, as `SharedPrefixBatch` asks): the split-key
/// decode kernels (inner loops unrolled or kept as loops: `unroll_decode`; the next
/// tile loaded during a tile's work or after: `prefetch_decode`; 128, 256 and 512
/// units a cube: `decode_units`), the tensor-core forward, and the tensor-core forward
/// with the keys sliced into the batch and merged (`tensor_core_decode`, what
/// `LONGVIEW_DECODE_TENSOR_CORES=1` runs), then the counted variants a step captured
/// as a device graph runs (`flash_decode_counted_with`: the keys are the first `sk`
/// rows of buffers [`CAPACITY_SLACK`] rows longer, whose later rows hold keys of 0 and
/// values of 1e6, so that a row read by mistake fails the check; split-key and
/// tensor-core slices); ms per call and the K/V bytes read per second.
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
    // The counted variants' buffers: each kv head's `sk` keys, then rows of `past`.
    let capacity = sk + CAPACITY_SLACK;
    let padded = |x: &[f32], past| up(&cache_rows_then(x, sk, capacity, d, past), hkv, capacity);
    let (k_cap, v_cap) = (padded(&kh, 0.0), padded(&vh, 1e6));
    let count = DeviceTensor::from_slice(client, &[sk as u32], &[1]);
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
    // (kernel, options, name)
    // The split-key variants never take the tensor-core path, whatever
    // LONGVIEW_DECODE_TENSOR_CORES says.
    let tuned = |unroll, units, prefetch| {
        opts.clone()
            .unroll_decode(unroll)
            .decode_units(units)
            .prefetch_decode(prefetch)
            .tensor_core_decode(false)
    };
    let variants = [
        (FlashKernel::Decode, tuned(true, None, true), "Decode"),
        (
            FlashKernel::Decode,
            tuned(false, None, true),
            "Decode (loops)",
        ),
        (
            FlashKernel::Decode,
            tuned(true, None, false),
            "Decode (no prefetch)",
        ),
        (
            FlashKernel::Decode,
            tuned(true, Some(256), true),
            "Decode (256 units)",
        ),
        (
            FlashKernel::Decode,
            tuned(true, Some(512), true),
            "Decode (512 units)",
        ),
        (
            FlashKernel::TensorCore,
            tuned(true, None, true),
            "TensorCore",
        ),
        // Run through flash_decode_sliced below (an error where tensor cores cannot
        // run, not a silent fallback to the split-key kernels).
        (
            FlashKernel::TensorCore,
            tuned(true, None, true),
            "TensorCore sliced",
        ),
        // Through flash_decode_counted_with (no mask: the counted keys are all visible).
        (FlashKernel::Decode, FlashOptions::new(d), "Decode counted"),
        (
            FlashKernel::TensorCore,
            FlashOptions::new(d),
            "TensorCore counted",
        ),
    ];
    for (kernel, opts, name) in variants {
        let o = DeviceTensor::poisoned::<bf16>(client, f32::NAN, &[1, hq, sq, d]);
        let lse = DeviceTensor::poisoned::<f32>(client, f32::NAN, &[1, hq, sq]);
        let sliced = name == "TensorCore sliced";
        let counted = name.ends_with("counted");
        let run = || {
            if counted {
                let (o_lse, kv) = ((&o, &lse), (&k_cap, &v_cap));
                flash_decode_counted_with::<bf16>(
                    client, &q, kv.0, kv.1, o_lse.0, o_lse.1, &count, &opts, kernel,
                )
            } else if sliced {
                flash_decode_sliced::<bf16>(client, &q, &k, &v, &o, &lse, &opts, kernel, None)
            } else {
                flash_forward_with::<bf16>(client, &q, &k, &v, &o, &lse, &opts, kernel)
            }
        };
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
        // NaN or infinities (an element left unwritten) give an infinite error.
        let e_o = error_of_largest(&got, &want.o);
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
    println!("{line}");
}
