//! Every wgmma helper against an f64 product of the same bf16 inputs, on the device: the
//! K-major tile products (step by step and chained) and the register-A / N-major-B products,
//! 64 x n x depth for n = 64, 128 and depth 16 to 128, outputs NaN-poisoned. Tolerance:
//! |c - ref| <= 1e-5 * sum_k |a_ik b_kj| + 1e-6 (f32 accumulation of exact bf16 products).
//! Used by `kernels/tests/wgmma.rs` (which asserts) and `flash_bench --wgmma` (which prints).

use half::bf16;

use super::{DescriptorOffsets, tile_product, tile_product_register_a};
use crate::reference::random_values;

/// The largest violation of the tolerance as (row, col, got, want), or `None`; `b_at(col, k)`
/// is the product's B element.
fn worst_violation(
    got: &[f32],
    a: &[bf16],
    b_at: impl Fn(usize, usize) -> f64,
    n: usize,
    depth: usize,
) -> Option<(usize, usize, f32, f64)> {
    let mut worst: Option<(f64, (usize, usize, f32, f64))> = None;
    for row in 0..64 {
        for col in 0..n {
            let (mut want, mut magnitude) = (0.0f64, 0.0f64);
            for kk in 0..depth {
                let p = a[row * depth + kk].to_f64() * b_at(col, kk);
                want += p;
                magnitude += p.abs();
            }
            let value = got[row * n + col];
            let excess = if value.is_nan() {
                f64::INFINITY
            } else {
                (value as f64 - want).abs() - (1e-5 * magnitude + 1e-6)
            };
            if excess > 0.0 && worst.is_none_or(|w| excess > w.0) {
                worst = Some((excess, (row, col, value, want)));
            }
        }
    }
    worst.map(|w| w.1)
}

fn bf16s(n: usize, seed: u64) -> Vec<bf16> {
    random_values(n, seed)
        .into_iter()
        .map(bf16::from_f32)
        .collect()
}

/// Runs every case; returns one line per case that passed and one per case that failed
/// (with the worst element and whether exchanging the descriptor's two byte offsets fixes
/// it, which tells a layout mix-up from any other mistake).
pub fn check_tile_products(
    client: &cubecl::prelude::Client,
) -> Result<(Vec<String>, Vec<String>), crate::AttnError> {
    let (mut passed, mut failed) = (Vec::new(), Vec::new());
    for n in [64usize, 128] {
        for depth in [16usize, 32, 64, 128] {
            let seed = (n * 1000 + depth) as u64;
            let a = bf16s(64 * depth, seed);
            // K-major B (n x depth): the product is a b^T.
            let b = bf16s(n * depth, seed + 1);
            let b_kmajor = |col: usize, kk: usize| b[col * depth + kk].to_f64();
            // N-major B (depth x n): the product is a b.
            let b_nmajor = |col: usize, kk: usize| b[kk * n + col].to_f64();
            let chains = depth == 128 || (depth == 64 && n == 64);
            let mut cases = vec![("k-major", false, false)];
            if chains {
                cases.push(("k-major chained", true, false));
            }
            cases.push(("register a, n-major b", false, true));
            for (name, chained, register_a) in cases {
                let run = |offsets| {
                    if register_a {
                        tile_product_register_a(client, &a, &b, n, depth, offsets)
                    } else {
                        tile_product(client, &a, &b, n, depth, offsets, chained)
                    }
                };
                let reference: &dyn Fn(usize, usize) -> f64 =
                    if register_a { &b_nmajor } else { &b_kmajor };
                let label = format!("{name} n {n} depth {depth}");
                let Some((row, col, got, want)) = worst_violation(
                    &run(DescriptorOffsets::Documented)?,
                    &a,
                    reference,
                    n,
                    depth,
                ) else {
                    passed.push(format!("{label}: within tolerance"));
                    continue;
                };
                let exchanged = run(DescriptorOffsets::Exchanged)?;
                let hint = match worst_violation(&exchanged, &a, reference, n, depth) {
                    None => "with the two descriptor offsets exchanged it matches",
                    Some(_) => "exchanging the descriptor offsets does not fix it",
                };
                failed.push(format!(
                    "{label}: c[{row}][{col}] = {got} against {want} ({hint})"
                ));
            }
        }
    }
    Ok((passed, failed))
}

/// O and LSE of a forward (`[B, H, S, D]`, O widened from bf16) against the f64 reference
/// on the same bf16 inputs: the line to print, `Ok` when O is within 1e-2 of max(|ref|, 1)
/// and LSE within 1e-3.
fn against_f64(
    (batch, heads, kv_heads, seq, causal): (usize, usize, usize, usize, bool),
    head_dim: usize,
    scale: f64,
    (q, k, v): (&[bf16], &[bf16], &[bf16]),
    (o, lse): (&[f32], &[f32]),
    label: String,
) -> Result<String, String> {
    use crate::reference::max_relative_error;
    let want = reference_f64(
        (batch, heads, kv_heads, seq, causal),
        head_dim,
        scale,
        (q, k, v),
        None,
    );
    let (o_err, lse_err) = (
        max_relative_error(o, &want.o),
        max_relative_error(lse, &want.lse),
    );
    let line = format!("{label}: O {o_err:.1e} LSE {lse_err:.1e}");
    if o_err <= 1e-2 && lse_err <= 1e-3 {
        Ok(line)
    } else {
        Err(line)
    }
}

/// The wgmma forward ([`super::forward`]) against the f64 reference on bf16-rounded inputs:
/// O within 1e-2 of max(|ref|, 1) (bf16 output), LSE within 1e-3. Head dim 128, and 72
/// (SigLIP), 64 and 80 (padded to 128 inside). Returns (passed, failed).
pub fn check_forward(
    client: &cubecl::prelude::Client,
) -> Result<(Vec<String>, Vec<String>), crate::AttnError> {
    use super::forward::{ForwardShape, forward};
    let (mut passed, mut failed) = (Vec::new(), Vec::new());
    // (batch, heads, kv_heads, seq, causal, head dim)
    let cases = [
        (1usize, 2usize, 2usize, 300usize, false, 128usize),
        (1, 2, 2, 300, true, 128),
        (2, 4, 2, 256, true, 128),
        (1, 2, 1, 1000, true, 128),
        (1, 2, 1, 1000, false, 128),
        (2, 3, 3, 729, false, 72),
        (1, 4, 2, 300, true, 64),
        (1, 2, 1, 200, true, 80),
    ];
    for (case, &(batch, heads, kv_heads, seq, causal, head_dim)) in cases.iter().enumerate() {
        let round = |x: Vec<f32>| -> Vec<bf16> { x.into_iter().map(bf16::from_f32).collect() };
        let q = round(random_values(
            batch * heads * seq * head_dim,
            10 + case as u64,
        ));
        let k = round(random_values(
            batch * kv_heads * seq * head_dim,
            20 + case as u64,
        ));
        let v = round(random_values(
            batch * kv_heads * seq * head_dim,
            30 + case as u64,
        ));
        let shape = ForwardShape {
            batch,
            heads,
            kv_heads,
            seq_q: seq,
            seq_k: seq,
            head_dim,
            causal,
        };
        let upload = |x: &[bf16], h: usize| {
            crate::DeviceTensor::from_slice(client, x, &[batch, h, seq, head_dim])
        };
        let (o, lse) = forward(
            client,
            &upload(&q, heads),
            &upload(&k, kv_heads),
            &upload(&v, kv_heads),
            shape,
        )?;
        let o: Vec<f32> = o
            .to_vec::<bf16>(client)?
            .into_iter()
            .map(f32::from)
            .collect();
        let lse = lse.to_vec::<f32>(client)?;
        let label = format!(
            "wgmma forward B{batch} H{heads}/{kv_heads} S{seq} D{head_dim} causal {causal}"
        );
        let shape = (batch, heads, kv_heads, seq, causal);
        let scale = 1.0 / (head_dim as f64).sqrt();
        match against_f64(shape, head_dim, scale, (&q, &k, &v), (&o, &lse), label) {
            Ok(line) => passed.push(line),
            Err(line) => failed.push(line),
        }
    }
    Ok((passed, failed))
}

/// Attention in f64 (`crate::reference::attention_f64`) over bf16 `[b, h, s, head_dim]`
/// inputs, queries and keys of one length, causal or full; gradients when `d_o` is given.
/// Rows that see no key get the kernels' LSE sentinel (-1e38).
pub(super) fn reference_f64(
    (batch, heads, kv_heads, seq, causal): (usize, usize, usize, usize, bool),
    head_dim: usize,
    scale: f64,
    (q, k, v): (&[bf16], &[bf16], &[bf16]),
    d_o: Option<&[bf16]>,
) -> crate::reference::AttentionF64 {
    let shape = (batch, heads, kv_heads, seq, seq);
    reference_masked(
        shape,
        causal.then_some(0),
        (head_dim, scale),
        (q, k, v),
        d_o,
    )
}

/// Attention in f64 (`crate::reference::attention_f64`) over bf16 `[b, h, s, head_dim]`
/// inputs, `seq_q` queries and `seq_k` keys; `causal = Some(shift)`: query `i` sees keys
/// `j <= i + shift`, `None`: every key; gradients when `d_o` is given. Rows that see no key
/// get the kernels' LSE sentinel (-1e38).
pub(super) fn reference_masked(
    (batch, heads, kv_heads, seq_q, seq_k): (usize, usize, usize, usize, usize),
    causal: Option<usize>,
    (head_dim, scale): (usize, f64),
    (q, k, v): (&[bf16], &[bf16], &[bf16]),
    d_o: Option<&[bf16]>,
) -> crate::reference::AttentionF64 {
    use crate::reference::{Geometry, attention_f64};
    let wide = |x: &[bf16]| -> Vec<f32> { x.iter().map(|e| e.to_f32()).collect() };
    let geometry = Geometry {
        batch,
        q_heads: heads,
        kv_heads,
        q_len: seq_q,
        kv_len: seq_k,
        head_dim,
        scale,
        empty_lse: -1.0e38,
    };
    let d_o = d_o.map(wide);
    attention_f64(
        &geometry,
        &wide(q),
        &wide(k),
        &wide(v),
        d_o.as_deref(),
        |_, i, j| causal.is_none_or(|shift| j <= i + shift),
    )
}

/// A `[b, s, h, d]` buffer seen as `[b, h, s, d]` (how the model passes its projections).
pub(super) fn heads_inside_view(
    t: &crate::DeviceTensor,
    (b, h, s, d): (usize, usize, usize, usize),
) -> crate::DeviceTensor {
    crate::DeviceTensor {
        handle: t.handle.clone(),
        shape: vec![b, h, s, d],
        strides: vec![s * h * d, d, h * d, 1],
    }
}

/// `[b, h, s, d]` row-major data reordered as `[b, s, h, d]` (the model's layout).
pub(super) fn heads_inside(x: &[bf16], h: usize, s: usize, d: usize) -> Vec<bf16> {
    let mut out = vec![bf16::ZERO; x.len()];
    for (i, chunk) in x.chunks(d).enumerate() {
        let (bi, hi, si) = (i / (h * s), (i / s) % h, i % s);
        let to = ((bi * s + si) * h + hi) * d;
        out[to..to + d].copy_from_slice(chunk);
    }
    out
}

/// The wgmma forward as `flash_forward` (kernel `Auto`) runs it for the model: Q, K, V and O
/// stored `[B, S, H, D]` and passed as strided `[B, H, S, D]` views, a scale other than
/// 1/sqrt(D), causal with equal block offsets and full attention, GQA, head dims 128 and 72
/// (SigLIP's shape). Each case first
/// asserts that the call routes to this kernel (`routes`), then compares O and LSE with the
/// f64 reference (O within 1e-2 of max(|ref|, 1), LSE 1e-3). Returns (passed, failed).
pub fn check_forward_routed(
    client: &cubecl::prelude::Client,
) -> Result<(Vec<String>, Vec<String>), crate::AttnError> {
    use super::forward::routes;
    use crate::{DeviceTensor, FlashKernel, FlashOptions, flash::flash_forward_with};
    let (mut passed, mut failed) = (Vec::new(), Vec::new());
    // (batch, heads, kv_heads, seq, causal, block offsets, head dim)
    let cases = [
        (2usize, 4usize, 2usize, 300usize, true, 64usize, 128usize),
        (1, 3, 1, 200, false, 0, 128),
        (3, 2, 2, 729, false, 0, 72),
    ];
    for (case, &(batch, heads, kv_heads, seq, causal, offset, head_dim)) in cases.iter().enumerate()
    {
        let data = |h: usize, seed: u64| -> Vec<bf16> {
            random_values(batch * h * seq * head_dim, seed)
                .into_iter()
                .map(bf16::from_f32)
                .collect()
        };
        let (q, k, v) = (
            data(heads, 40 + case as u64),
            data(kv_heads, 50),
            data(kv_heads, 60),
        );
        let view = |t: &DeviceTensor, h: usize| heads_inside_view(t, (batch, h, seq, head_dim));
        let upload = |x: &[bf16], h: usize| {
            let bshd = [batch, seq, h, head_dim];
            DeviceTensor::from_slice(client, &heads_inside(x, h, seq, head_dim), &bshd)
        };
        let (qb, kb, vb) = (
            upload(&q, heads),
            upload(&k, kv_heads),
            upload(&v, kv_heads),
        );
        let ob = DeviceTensor::poisoned::<bf16>(client, f32::NAN, &[batch, seq, heads, head_dim]);
        let lse = DeviceTensor::poisoned::<f32>(client, f32::NAN, &[batch, heads, seq]);
        let mut opts = FlashOptions::new(head_dim).causal(causal);
        opts.scale = 0.05;
        opts.q_offset = offset;
        opts.k_offset = offset;
        let (qv, kv, vv, ov) = (
            view(&qb, heads),
            view(&kb, kv_heads),
            view(&vb, kv_heads),
            view(&ob, heads),
        );
        let label = format!(
            "flash_forward (Auto) B{batch} H{heads}/{kv_heads} S{seq} D{head_dim} causal {causal} offsets {offset}, [B, S, H, D] views"
        );
        if !routes(client, true, (&qv, &kv, &vv), (&ov, &lse), &opts) {
            failed.push(format!("{label}: not routed to the wgmma forward"));
            continue;
        }
        flash_forward_with::<bf16>(client, &qv, &kv, &vv, &ov, &lse, &opts, FlashKernel::Auto)?;
        let o_bshd = ob.to_vec::<bf16>(client)?;
        // Back to [B, H, S, D] for the comparison.
        let mut o = vec![0f32; o_bshd.len()];
        for bi in 0..batch {
            for hi in 0..heads {
                for si in 0..seq {
                    let from = ((bi * seq + si) * heads + hi) * head_dim;
                    let to = ((bi * heads + hi) * seq + si) * head_dim;
                    for d in 0..head_dim {
                        o[to + d] = o_bshd[from + d].to_f32();
                    }
                }
            }
        }
        let lse = lse.to_vec::<f32>(client)?;
        let shape = (batch, heads, kv_heads, seq, causal);
        let scale = f64::from(opts.scale);
        match against_f64(shape, head_dim, scale, (&q, &k, &v), (&o, &lse), label) {
            Ok(line) => passed.push(line),
            Err(line) => failed.push(line),
        }
    }
    Ok((passed, failed))
}

/// The wgmma forward as chunked prefill and the causal ring's later blocks run it through
/// `flash_forward` (kernel `Auto`): causal queries whose block starts `shift = q_offset -
/// k_offset >= 0` keys after the keys' block (query `i` sees keys `j <= i + shift`), query
/// and key lengths apart, GQA, head dims 128, 72 and 64; in one case K and V are views of
/// the first `seq_k` rows of a longer cache whose rows past them hold NaN (a read past the
/// keys fails). Each case asserts the call routes to this kernel, then compares O and LSE
/// with f64 attention (O within 1e-2 of max(|ref|, 1), LSE 1e-3). A query block starting
/// before its keys' must not route. Fails at once with `LONGVIEW_FLASH_WGMMA_SHIFTED=0`
/// (nothing routes then: [`super::forward_launch::shifted_enabled`]). Returns (passed,
/// failed).
pub fn check_forward_shifted(
    client: &cubecl::prelude::Client,
) -> Result<(Vec<String>, Vec<String>), crate::AttnError> {
    use super::forward::{routes, shifted_enabled};
    use crate::reference::max_relative_error;
    use crate::{DeviceTensor, FlashKernel, FlashOptions, flash::flash_forward_with};
    let (mut passed, mut failed) = (Vec::new(), Vec::new());
    if !shifted_enabled() {
        failed.push(SHIFTED_OFF.to_string());
        return Ok((passed, failed));
    }
    // (heads, kv_heads, seq_q, seq_k, q_offset, k_offset, head dim, cache rows)
    let cases = [
        (
            12usize, 2usize, 300usize, 1000usize, 700usize, 0usize, 128usize, 0usize,
        ),
        (4, 2, 256, 640, 384, 0, 128, 0),
        (2, 1, 500, 500, 100, 0, 128, 0),
        (2, 2, 200, 729, 529, 0, 72, 0),
        (4, 2, 130, 400, 300, 30, 64, 0),
        (6, 2, 100, 1000, 900, 0, 128, 1200),
    ];
    for (case, &(heads, kv_heads, seq_q, seq_k, q_offset, k_offset, head_dim, cache)) in
        cases.iter().enumerate()
    {
        let data = |n: usize, seed: u64| -> Vec<bf16> {
            random_values(n, seed)
                .into_iter()
                .map(bf16::from_f32)
                .collect()
        };
        let seed = 70 + 3 * case as u64;
        let q = data(heads * seq_q * head_dim, seed);
        let k = data(kv_heads * seq_k * head_dim, seed + 1);
        let v = data(kv_heads * seq_k * head_dim, seed + 2);
        let keys = |x: &[bf16]| -> DeviceTensor {
            if cache == 0 {
                return DeviceTensor::from_slice(client, x, &[1, kv_heads, seq_k, head_dim]);
            }
            // `[1, kv_heads, cache, D]` with NaN past `seq_k`, seen as its first `seq_k` rows.
            let mut full = vec![bf16::NAN; kv_heads * cache * head_dim];
            for (h, rows) in x.chunks(seq_k * head_dim).enumerate() {
                full[h * cache * head_dim..][..rows.len()].copy_from_slice(rows);
            }
            let buffer = DeviceTensor::from_slice(client, &full, &[1, kv_heads, cache, head_dim]);
            DeviceTensor {
                handle: buffer.handle,
                shape: vec![1, kv_heads, seq_k, head_dim],
                strides: vec![kv_heads * cache * head_dim, cache * head_dim, head_dim, 1],
            }
        };
        let qt = DeviceTensor::from_slice(client, &q, &[1, heads, seq_q, head_dim]);
        let (kt, vt) = (keys(&k), keys(&v));
        let ot = DeviceTensor::poisoned::<bf16>(client, f32::NAN, &[1, heads, seq_q, head_dim]);
        let lse = DeviceTensor::poisoned::<f32>(client, f32::NAN, &[1, heads, seq_q]);
        let opts = FlashOptions::new(head_dim)
            .causal(true)
            .offsets(q_offset, k_offset);
        let label = format!(
            "flash_forward (Auto) H{heads}/{kv_heads} Sq{seq_q} Sk{seq_k} D{head_dim} causal \
             offsets q {q_offset} k {k_offset}{}",
            if cache > 0 {
                format!(", K/V views of a {cache}-row cache")
            } else {
                String::new()
            }
        );
        if !routes(client, true, (&qt, &kt, &vt), (&ot, &lse), &opts) {
            failed.push(format!("{label}: not routed to the wgmma forward"));
            continue;
        }
        flash_forward_with::<bf16>(client, &qt, &kt, &vt, &ot, &lse, &opts, FlashKernel::Auto)?;
        let o: Vec<f32> = ot
            .to_vec::<bf16>(client)?
            .into_iter()
            .map(f32::from)
            .collect();
        let lse = lse.to_vec::<f32>(client)?;
        let want = reference_masked(
            (1, heads, kv_heads, seq_q, seq_k),
            Some(q_offset - k_offset),
            (head_dim, f64::from(opts.scale)),
            (&q, &k, &v),
            None,
        );
        let (o_err, lse_err) = (
            max_relative_error(&o, &want.o),
            max_relative_error(&lse, &want.lse),
        );
        let line = format!("{label}: O {o_err:.1e} LSE {lse_err:.1e}");
        if o_err <= 1e-2 && lse_err <= 1e-3 {
            passed.push(line);
        } else {
            failed.push(line);
        }
    }
    // Queries starting before their keys: the first rows see no key; not this kernel's.
    let q = DeviceTensor::from_slice(client, &vec![bf16::ONE; 2 * 64 * 128], &[1, 2, 64, 128]);
    let lse = DeviceTensor::poisoned::<f32>(client, f32::NAN, &[1, 2, 64]);
    let opts = FlashOptions::new(128).causal(true).offsets(0, 10);
    let label = "causal queries 10 keys before their keys' block";
    if routes(client, true, (&q, &q, &q), (&q, &lse), &opts) {
        failed.push(format!("{label}: routed to the wgmma forward"));
    } else {
        passed.push(format!(
            "{label}: not routed (the mma.sync kernels take it)"
        ));
    }
    Ok((passed, failed))
}

/// What the shifted checks report when the routing they check is off.
pub(super) const SHIFTED_OFF: &str = "shifted causal calls are not routed to the wgmma kernels \
     while LONGVIEW_FLASH_WGMMA_SHIFTED=0: unset it to run these checks";
