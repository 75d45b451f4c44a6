//! The wgmma backward ([`super::backward`]) against the f64 reference, through the path the
//! model takes: `flash_forward` then `flash_backward` with kernel `Auto` on bf16 inputs
//! (the wgmma forward's O and LSE, delta from them), each case first asserting that both
//! calls route to the wgmma kernels. dQ, dK and dV within 1e-2 of max(|ref|, 1) (the
//! bf16 tolerance of `flash_bench --checks`). Cases: full and causal, lengths that are not
//! a multiple of the 64-query or 128-key tiles, GQA, the model's `[B, S, H, D]` buffers
//! seen as strided `[B, H, S, D]` with a scale other than 1/sqrt(D), and head dims 72
//! (SigLIP's shape, full), 64 and 80 besides 128.

use half::bf16;

use super::check::{heads_inside, heads_inside_view, reference_f64, reference_masked};
use crate::reference::{max_relative_error, random_values};
use crate::{AttnError, DeviceTensor, FlashKernel, FlashOptions};

/// `flash_forward` into `o` and `lse`, then `flash_backward` (kernel `Auto`): `(dQ, dK, dV)`,
/// or `None` when either call would not run on the wgmma kernels.
#[allow(clippy::type_complexity)]
fn routed_forward_backward(
    client: &cubecl::prelude::Client,
    (q, k, v, d_o): (&DeviceTensor, &DeviceTensor, &DeviceTensor, &DeviceTensor),
    o: &DeviceTensor,
    lse: &DeviceTensor,
    opts: &FlashOptions,
) -> Result<Option<(DeviceTensor, DeviceTensor, DeviceTensor)>, AttnError> {
    use crate::flash::{flash_backward_with, flash_forward_with};
    let delta_like = DeviceTensor::poisoned::<f32>(client, 0.0, &lse.shape);
    let routed = crate::wgmma::forward::routes(client, true, (q, k, v), (o, lse), opts)
        && crate::wgmma::backward_launch::routes(
            client,
            true,
            (q, k, v, d_o),
            (lse, &delta_like),
            opts,
        );
    if !routed {
        return Ok(None);
    }
    let auto = FlashKernel::Auto;
    flash_forward_with::<bf16>(client, q, k, v, o, lse, opts, auto)?;
    flash_backward_with::<bf16>(client, q, k, v, o, lse, d_o, opts, auto).map(Some)
}

/// dQ, dK and dV (bf16) against the f64 reference: `Ok(line)` when each is within 1e-2 of
/// max(|ref|, 1), `Err(line)` otherwise.
fn judge_gradients(
    client: &cubecl::prelude::Client,
    label: &str,
    (dq, dk, dv): (&DeviceTensor, &DeviceTensor, &DeviceTensor),
    want: &crate::reference::AttentionF64,
) -> Result<Result<String, String>, AttnError> {
    let widen = |t: &DeviceTensor| -> Result<Vec<f32>, AttnError> {
        Ok(t.to_vec::<bf16>(client)?
            .into_iter()
            .map(f32::from)
            .collect())
    };
    let errors = [
        max_relative_error(&widen(dq)?, &want.dq),
        max_relative_error(&widen(dk)?, &want.dk),
        max_relative_error(&widen(dv)?, &want.dv),
    ];
    let line = format!(
        "{label}: dQ {:.1e} dK {:.1e} dV {:.1e}",
        errors[0], errors[1], errors[2]
    );
    Ok(if errors.iter().all(|&e| e <= 1e-2) {
        Ok(line)
    } else {
        Err(line)
    })
}

/// Runs every case; returns one line per case that passed and one per case that failed.
pub fn check_backward(
    client: &cubecl::prelude::Client,
) -> Result<(Vec<String>, Vec<String>), AttnError> {
    let (mut passed, mut failed) = (Vec::new(), Vec::new());
    // (batch, heads, kv_heads, seq, causal, [B, S, H, D] views with scale 0.05, head dim)
    let cases = [
        (1usize, 2usize, 2usize, 300usize, false, false, 128usize),
        (1, 2, 2, 300, true, false, 128),
        (2, 4, 2, 256, true, true, 128),
        (1, 2, 1, 1000, true, false, 128),
        (1, 3, 1, 200, false, true, 128),
        (1, 1, 1, 64, true, false, 128),
        (3, 2, 2, 729, false, true, 72),
        (1, 4, 2, 300, true, false, 64),
        (1, 2, 1, 200, true, true, 80),
    ];
    for (case, &(batch, heads, kv_heads, seq, causal, strided, head_dim)) in
        cases.iter().enumerate()
    {
        let data = |h: usize, seed: u64| -> Vec<bf16> {
            random_values(batch * h * seq * head_dim, seed)
                .into_iter()
                .map(bf16::from_f32)
                .collect()
        };
        let seed = 100 + 10 * case as u64;
        let (q, k, v, d_o) = (
            data(heads, seed),
            data(kv_heads, seed + 1),
            data(kv_heads, seed + 2),
            data(heads, seed + 3),
        );
        let upload = |x: &[bf16], h: usize| -> DeviceTensor {
            if !strided {
                return DeviceTensor::from_slice(client, x, &[batch, h, seq, head_dim]);
            }
            let bshd = [batch, seq, h, head_dim];
            let t = DeviceTensor::from_slice(client, &heads_inside(x, h, seq, head_dim), &bshd);
            heads_inside_view(&t, (batch, h, seq, head_dim))
        };
        let (qt, kt, vt, dot) = (
            upload(&q, heads),
            upload(&k, kv_heads),
            upload(&v, kv_heads),
            upload(&d_o, heads),
        );
        let zeros = vec![bf16::ZERO; q.len()];
        let ot = upload(&zeros, heads);
        let lse = DeviceTensor::poisoned::<f32>(client, f32::NAN, &[batch, heads, seq]);
        let mut opts = FlashOptions::new(head_dim).causal(causal);
        if strided {
            opts.scale = 0.05;
        }
        let label = format!(
            "wgmma backward B{batch} H{heads}/{kv_heads} S{seq} D{head_dim} causal {causal}{}",
            if strided {
                ", [B, S, H, D] views, scale 0.05"
            } else {
                ""
            }
        );
        let Some((dq, dk, dv)) =
            routed_forward_backward(client, (&qt, &kt, &vt, &dot), &ot, &lse, &opts)?
        else {
            failed.push(format!("{label}: not routed to the wgmma kernels"));
            continue;
        };
        let shape = (batch, heads, kv_heads, seq, causal);
        let scale = f64::from(opts.scale);
        let want = reference_f64(shape, head_dim, scale, (&q, &k, &v), Some(&d_o));
        match judge_gradients(client, &label, (&dq, &dk, &dv), &want)? {
            Ok(line) => passed.push(line),
            Err(line) => failed.push(line),
        }
    }
    Ok((passed, failed))
}

/// The wgmma backward for causal queries after their keys' block (`shift = q_offset -
/// k_offset`, query `i` seeing keys `j <= i + shift`): the causal ring's later blocks,
/// lengths apart, tile-aligned and not, GQA, head dims 128, 72 and 64, and one case whose
/// last keys no query sees (their dK and dV must be zero). `flash_forward` then
/// `flash_backward` with kernel `Auto`, each asserted to route to the wgmma kernels; dQ, dK
/// and dV against f64 attention within 1e-2 of max(|ref|, 1). Fails at once with
/// `LONGVIEW_FLASH_WGMMA_SHIFTED=0` (nothing routes then). Returns (passed, failed).
pub fn check_backward_shifted(
    client: &cubecl::prelude::Client,
) -> Result<(Vec<String>, Vec<String>), AttnError> {
    let (mut passed, mut failed) = (Vec::new(), Vec::new());
    if !super::forward::shifted_enabled() {
        failed.push(super::check::SHIFTED_OFF.to_string());
        return Ok((passed, failed));
    }
    // (heads, kv_heads, seq_q, seq_k, q_offset, k_offset, head dim)
    let cases = [
        (
            2usize, 1usize, 300usize, 1000usize, 700usize, 0usize, 128usize,
        ),
        (4, 2, 256, 512, 256, 0, 128),
        (2, 2, 200, 200, 100, 0, 128),
        (4, 2, 130, 400, 300, 30, 64),
        (2, 2, 200, 729, 529, 0, 72),
        (2, 1, 100, 600, 200, 0, 128),
    ];
    for (case, &(heads, kv_heads, seq_q, seq_k, q_offset, k_offset, head_dim)) in
        cases.iter().enumerate()
    {
        let data = |n: usize, seed: u64| -> Vec<bf16> {
            random_values(n, seed)
                .into_iter()
                .map(bf16::from_f32)
                .collect()
        };
        let seed = 300 + 10 * case as u64;
        let (q, k, v, d_o) = (
            data(heads * seq_q * head_dim, seed),
            data(kv_heads * seq_k * head_dim, seed + 1),
            data(kv_heads * seq_k * head_dim, seed + 2),
            data(heads * seq_q * head_dim, seed + 3),
        );
        let upload = |x: &[bf16], h: usize, s: usize| {
            DeviceTensor::from_slice(client, x, &[1, h, s, head_dim])
        };
        let (qt, kt, vt, dot) = (
            upload(&q, heads, seq_q),
            upload(&k, kv_heads, seq_k),
            upload(&v, kv_heads, seq_k),
            upload(&d_o, heads, seq_q),
        );
        let ot = upload(&vec![bf16::ZERO; q.len()], heads, seq_q);
        let lse = DeviceTensor::poisoned::<f32>(client, f32::NAN, &[1, heads, seq_q]);
        let opts = FlashOptions::new(head_dim)
            .causal(true)
            .offsets(q_offset, k_offset);
        let label = format!(
            "wgmma backward H{heads}/{kv_heads} Sq{seq_q} Sk{seq_k} D{head_dim} causal offsets \
             q {q_offset} k {k_offset}"
        );
        let Some((dq, dk, dv)) =
            routed_forward_backward(client, (&qt, &kt, &vt, &dot), &ot, &lse, &opts)?
        else {
            failed.push(format!("{label}: not routed to the wgmma kernels"));
            continue;
        };
        let want = reference_masked(
            (1, heads, kv_heads, seq_q, seq_k),
            Some(q_offset - k_offset),
            (head_dim, f64::from(opts.scale)),
            (&q, &k, &v),
            Some(&d_o),
        );
        match judge_gradients(client, &label, (&dq, &dk, &dv), &want)? {
            Ok(line) => passed.push(line),
            Err(line) => failed.push(line),
        }
    }
    Ok((passed, failed))
}
