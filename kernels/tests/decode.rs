//! The decoding kernels on a CubeCL runtime (wgpu; Mesa's lavapipe in CI) against
//! the f64 reference: the split-key kernels, and the sliced path that runs a
//! decoding step on the tensor-core forward with its keys folded into the batch
//! (checked here with the scalar forward in its place: lavapipe has no tensor cores).
//! Outputs are poisoned with NaN before every launch.

use cubecl::prelude::Client;
use longview_kernels::reference::cache_rows_then;
use longview_kernels::{DeviceTensor, FlashKernel, FlashOptions, flash_forward_with};

mod common;
use common::*;

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
        // next tile loaded during a tile's work or after it (both named: the default
        // comes from the environment).
        let variants = [
            ("64 units", case.options.clone().decode_units(Some(64))),
            ("256 units", case.options.clone().decode_units(Some(256))),
            ("prefetch", case.options.clone().prefetch_decode(true)),
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

/// The sliced decoding path (`flash_decode_sliced`, what
/// `FlashOptions::tensor_core_decode` runs on the tensor-core forward) with the scalar
/// forward in its place: keys folded into the batch through strided views, q
/// repeated at batch stride 0, the keys past the last whole slice run on views offset
/// into the same buffers, the slices merged. Against the f64 reference, including
/// slice counts that leave a remainder and one slice; a kv head's query heads folded
/// into its rows (every contiguous case) and a q whose layout does not allow that; calls
/// whose rows do not all see every key, or with two sequences, are refused.
#[test]
fn sliced_decoding_matches_the_f64_reference() {
    use longview_kernels::flash_decode_sliced;
    let client = client();
    // (case, slices): the 1.5B grouping, one new token at the end of 1001 keys (7
    // slices of 143); a GRPO-like group of 5 rows against 600 keys with no mask (4
    // slices, remainder 0); the 7B grouping, 3 rows, 301 keys (1 slice + a remainder
    // of 0: one launch); and 9 slices of 28 keys plus a 1-key remainder.
    let cases = [
        (
            Case::new(1, 12, 2, 1, 1001, 64).with(|o| o.causal(true).offsets(1000, 0)),
            Some(7),
        ),
        (Case::new(1, 12, 2, 5, 600, 128), Some(4)),
        (Case::new(1, 28, 4, 3, 301, 64), None),
        (
            Case::new(1, 4, 1, 1, 253, 64).with(|o| o.causal(true).offsets(252, 0)),
            Some(9),
        ),
    ];
    for (n, (case, slices)) in cases.iter().enumerate() {
        let seed = 900 + 10 * n as u64;
        let q = random(case.hq * case.sq * case.d, seed);
        let k = random(case.hkv * case.sk * case.d, seed + 1);
        let v = random(case.hkv * case.sk * case.d, seed + 2);
        let want = reference(case, &q, &k, &v, &random(q.len(), seed + 3));
        let up =
            |x: &[f32], heads, len| DeviceTensor::from_slice(&client, x, &[1, heads, len, case.d]);
        let (qt, kt, vt) = (
            up(&q, case.hq, case.sq),
            up(&k, case.hkv, case.sk),
            up(&v, case.hkv, case.sk),
        );
        let label = format!("sliced case {n} ({slices:?} slices)");
        check_sliced(&client, case, (&qt, &kt, &vt), *slices, &want, &label);
    }
    // q laid out positions-major (`[1, Sq, Hq, D]` read as `[1, Hq, Sq, D]`, what a
    // projection followed by `swap_dims(1, 2)` gives): with 5 positions its query heads
    // cannot be folded into the kv heads' rows by a view, so the call runs a head at a
    // time; with 1 position they can.
    for (n, sq) in [(0usize, 5usize), (1, 1)] {
        let case = Case::new(1, 12, 2, sq, 300, 64);
        let seed = 960 + 10 * n as u64;
        let q = random(case.hq * sq * case.d, seed);
        let k = random(case.hkv * case.sk * case.d, seed + 1);
        let v = random(case.hkv * case.sk * case.d, seed + 2);
        let want = reference(&case, &q, &k, &v, &random(q.len(), seed + 3));
        // q[h][i][:] stored at position-major index (i * Hq + h) * D.
        let mut stored = vec![0f32; q.len()];
        for h in 0..case.hq {
            for i in 0..sq {
                let (from, to) = ((h * sq + i) * case.d, (i * case.hq + h) * case.d);
                stored[to..to + case.d].copy_from_slice(&q[from..from + case.d]);
            }
        }
        let physical = DeviceTensor::from_slice(&client, &stored, &[1, sq, case.hq, case.d]);
        let qt = DeviceTensor {
            shape: vec![1, case.hq, sq, case.d],
            strides: vec![sq * case.hq * case.d, case.d, case.hq * case.d, 1],
            ..physical
        };
        let up = |x: &[f32]| DeviceTensor::from_slice(&client, x, &[1, case.hkv, case.sk, case.d]);
        let (kt, vt) = (up(&k), up(&v));
        let label = format!("the positions-major q, {sq} positions");
        check_sliced(&client, &case, (&qt, &kt, &vt), Some(3), &want, &label);
    }
    // Refused: rows that do not all see every key (three rows at the end of the
    // keys), and two sequences.
    let refused = |b: usize, sq: usize, options: &FlashOptions| {
        let q = DeviceTensor::filled(&client, 0f32, &[b, 4, sq, 64]);
        let kv = DeviceTensor::filled(&client, 0f32, &[b, 1, 300, 64]);
        let o = DeviceTensor::filled(&client, 0f32, &[b, 4, sq, 64]);
        let lse = DeviceTensor::filled(&client, 0f32, &[b, 4, sq]);
        flash_decode_sliced::<f32>(
            &client,
            &q,
            &kv,
            &kv,
            &o,
            &lse,
            options,
            FlashKernel::Scalar,
            None,
        )
        .unwrap_err()
        .to_string()
    };
    let partly = FlashOptions::new(64).causal(true).offsets(297, 0);
    let e = refused(1, 3, &partly);
    assert!(e.contains("see every key"), "{e}");
    let e = refused(2, 1, &FlashOptions::new(64));
    assert!(e.contains("batch 2"), "{e}");
    // Outputs of the wrong shape (the merge would size its launch by them).
    let q = DeviceTensor::filled(&client, 0f32, &[1, 4, 1, 64]);
    let kv = DeviceTensor::filled(&client, 0f32, &[1, 1, 300, 64]);
    let o = DeviceTensor::filled(&client, 0f32, &[1, 8, 1, 64]);
    let lse = DeviceTensor::filled(&client, 0f32, &[1, 8, 1]);
    let options = FlashOptions::new(64);
    let e = flash_decode_sliced::<f32>(
        &client,
        &q,
        &kv,
        &kv,
        &o,
        &lse,
        &options,
        FlashKernel::Scalar,
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("outputs o"), "{e}");
}

/// `flash_decode_sliced` over `slices` slices with the scalar forward, into NaN-filled
/// outputs, against `want` (O and LSE within `TOL_F32`).
fn check_sliced(
    client: &Client,
    case: &Case,
    (q, k, v): (&DeviceTensor, &DeviceTensor, &DeviceTensor),
    slices: Option<usize>,
    want: &longview_kernels::reference::AttentionF64,
    label: &str,
) {
    let o = DeviceTensor::filled(client, f32::NAN, &[1, case.hq, case.sq, case.d]);
    let lse = DeviceTensor::filled(client, f32::NAN, &[1, case.hq, case.sq]);
    longview_kernels::flash_decode_sliced::<f32>(
        client,
        q,
        k,
        v,
        &o,
        &lse,
        &case.options,
        FlashKernel::Scalar,
        slices,
    )
    .unwrap();
    let got_o = o.to_vec::<f32>(client).unwrap();
    assert_close(&format!("O of {label}"), &got_o, &want.o, TOL_F32);
    let got_lse = lse.to_vec::<f32>(client).unwrap();
    assert_close(&format!("LSE of {label}"), &got_lse, &want.lse, TOL_F32);
}

/// The outputs the kernels allocate start NaN-filled in test builds (release builds
/// leave them uninitialised), so every test here sees an element a kernel forgot to
/// write.
#[test]
fn test_builds_poison_the_kernels_outputs() {
    if std::env::var_os("LONGVIEW_FLASH_POISON").is_none() {
        assert!(longview_kernels::flash::poison_outputs());
    }
}

/// Counted decoding (`flash_decode_counted`: what a decoding step captured as a device
/// graph runs) reads only the first `count` rows of buffers longer than that: rows
/// past the count hold keys of 0 and values of 1e6 (a row read by mistake weighs
/// about as much as a real key and moves O far past the tolerance; NaN would not
/// show, as the kernels treat a NaN score as masked), and O and LSE still match the
/// f64 reference over the counted keys. Counts that end inside a slice, on a tile edge, at the capacity;
/// the 1.5B and 7B groupings; several rows a sequence (a GRPO group is batch rows).
#[test]
fn counted_decoding_reads_only_the_counted_keys() {
    use longview_kernels::flash::flash_decode_counted;
    let client = client();
    // (case over the counted keys, buffer capacity)
    let cases = [
        (Case::new(2, 12, 2, 1, 300, 64), 512),
        (Case::new(1, 12, 2, 1, 256, 128), 700),
        (Case::new(3, 28, 4, 1, 77, 64), 77),
        (Case::new(1, 4, 1, 1, 1, 72), 40),
    ];
    for (index, (case, capacity)) in cases.into_iter().enumerate() {
        let seed = 90 + 4 * index as u64;
        let (q, k, v) = (
            random(case.b * case.hq * case.d, seed),
            random(case.b * case.hkv * case.sk * case.d, seed + 1),
            random(case.b * case.hkv * case.sk * case.d, seed + 2),
        );
        let want = reference(&case, &q, &k, &v, &random(q.len(), seed + 3));
        // The counted rows first in each (sequence, kv head), `past` after them.
        let padded = |x: &[f32], past| cache_rows_then(x, case.sk, capacity, case.d, past);
        let kv_shape = [case.b, case.hkv, capacity, case.d];
        let kt = DeviceTensor::from_slice(&client, &padded(&k, 0.0), &kv_shape);
        let vt = DeviceTensor::from_slice(&client, &padded(&v, 1e6), &kv_shape);
        let qt = DeviceTensor::from_slice(&client, &q, &[case.b, case.hq, 1, case.d]);
        let count = DeviceTensor::from_slice(&client, &[case.sk as u32], &[1]);
        let o = DeviceTensor::filled(&client, f32::NAN, &[case.b, case.hq, 1, case.d]);
        let lse = DeviceTensor::filled(&client, f32::NAN, &[case.b, case.hq, 1]);
        flash_decode_counted::<f32>(&client, &qt, &kt, &vt, &o, &lse, &count, &case.options)
            .unwrap();
        let name = format!("case {index} ({} of {capacity} rows)", case.sk);
        let o = o.to_vec::<f32>(&client).unwrap();
        assert_close(&format!("O, {name}"), &o, &want.o, TOL_F32);
        let lse = lse.to_vec::<f32>(&client).unwrap();
        assert_close(&format!("LSE, {name}"), &lse, &want.lse, TOL_F32);
    }
    // A mask is refused (the counted keys are all visible).
    let case = Case::new(1, 2, 1, 1, 8, 64).with(|o| o.causal(true));
    let t = |heads| DeviceTensor::filled(&client, 0f32, &[1, heads, 8, 64]);
    let (q, k) = (DeviceTensor::filled(&client, 0f32, &[1, 2, 1, 64]), t(1));
    let (o, lse) = (
        DeviceTensor::filled(&client, 0f32, &[1, 2, 1, 64]),
        DeviceTensor::filled(&client, 0f32, &[1, 2, 1]),
    );
    let count = DeviceTensor::from_slice(&client, &[8u32], &[1]);
    let refused = flash_decode_counted::<f32>(&client, &q, &k, &k, &o, &lse, &count, &case.options);
    assert!(refused.is_err());
}

/// Counted decoding on the sliced path (what a captured step runs where an eager step
/// would take the tensor-core slices: `flash_decode_counted_with`, here with the
/// scalar forward as the inner kernel, as lavapipe has no tensor cores): the keys are
/// cut into slices over the whole buffer, each slice reads only its rows before the
/// count, slices past the count and a tail past the last whole slice merge in as
/// empty. Rows past the count hold keys of 0 and values of 1e6 rather than NaN (the
/// scalar forward treats a NaN score as masked): a row read by mistake weighs about
/// as much as a real key and moves O by far more than the tolerance. Counts inside the first slice, inside a later one with empty
/// slices after it, with a tail; one key; the 1.5B grouping folded and a 1:1 grouping.
#[test]
fn counted_sliced_decoding_reads_only_the_counted_keys() {
    use longview_kernels::flash::flash_decode_counted_with;
    let client = client();
    // (heads, kv heads, counted keys, head dim, buffer capacity, slices); at most
    // about 150 keys a slice at head dim 128 and 300 at 64, under lavapipe's cap on a
    // shader's loop iterations (see the first test).
    let cases = [
        (12, 2, 150, 128, 400, 2),
        (12, 2, 256, 64, 700, 3),
        (12, 2, 256, 64, 700, 64),
        (4, 4, 130, 64, 300, 7),
        (4, 1, 1, 72, 40, 4),
    ];
    for (index, (hq, hkv, sk, d, capacity, slices)) in cases.into_iter().enumerate() {
        let case = Case::new(1, hq, hkv, 1, sk, d).with(|mut o| {
            o.decode.splits = Some(slices);
            o
        });
        let seed = 130 + 4 * index as u64;
        let (q, k, v) = (
            random(hq * d, seed),
            random(hkv * sk * d, seed + 1),
            random(hkv * sk * d, seed + 2),
        );
        let want = reference(&case, &q, &k, &v, &random(q.len(), seed + 3));
        let padded = |x: &[f32], past| {
            let rows = cache_rows_then(x, sk, capacity, d, past);
            DeviceTensor::from_slice(&client, &rows, &[1, hkv, capacity, d])
        };
        let (kt, vt) = (padded(&k, 0.0), padded(&v, 1e6));
        let qt = DeviceTensor::from_slice(&client, &q, &[1, hq, 1, d]);
        let count = DeviceTensor::from_slice(&client, &[sk as u32], &[1]);
        let o = DeviceTensor::filled(&client, f32::NAN, &[1, hq, 1, d]);
        let lse = DeviceTensor::filled(&client, f32::NAN, &[1, hq, 1]);
        let (scalar, opts) = (FlashKernel::Scalar, &case.options);
        flash_decode_counted_with::<f32>(&client, &qt, &kt, &vt, &o, &lse, &count, opts, scalar)
            .unwrap();
        let name = format!("case {index} ({sk} of {capacity} rows, {slices} slices)");
        let o = o.to_vec::<f32>(&client).unwrap();
        assert_close(&format!("O, {name}"), &o, &want.o, TOL_F32);
        let lse = lse.to_vec::<f32>(&client).unwrap();
        assert_close(&format!("LSE, {name}"), &lse, &want.lse, TOL_F32);
    }
}
