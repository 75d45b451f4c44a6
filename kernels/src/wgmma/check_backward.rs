//! The wgmma backward ([`super::backward`]) against the f64 reference, through the path the
//! model takes: `flash_forward` then `flash_backward` with kernel `Auto` on bf16 inputs
//! (the wgmma forward's O and LSE, delta from them), each case first asserting that both
//! calls route to the wgmma kernels. dQ, dK and dV within 1e-2 of max(|ref|, 1) (the
//! bf16 tolerance of `flash_bench --checks`). Cases: full and causal, lengths that are not
//! a multiple of the 64-query or 128-key tiles, GQA, the model's `[B, S, H, D]` buffers
//! seen as strided `[B, H, S, D]` with a scale other than 1/sqrt(D), and head dims 72
//! (SigLIP's shape, full), 64 and 80 besides 128.

use half::bf16;

use super::check::{heads_inside, heads_inside_view, reference_f64};
use crate::reference::{max_relative_error, random_values};
use crate::{AttnError, DeviceTensor, FlashKernel, FlashOptions};

/// Runs every case; returns one line per case that passed and one per case that failed.
pub fn check_backward(
    client: &cubecl::prelude::Client,
) -> Result<(Vec<String>, Vec<String>), AttnError> {
    use crate::flash::{flash_backward_with, flash_forward_with};
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
        let delta_like = DeviceTensor::poisoned::<f32>(client, 0.0, &[batch, heads, seq]);
        let routed =
            crate::wgmma::forward::routes(client, true, (&qt, &kt, &vt), (&ot, &lse), &opts)
                && crate::wgmma::backward_launch::routes(
                    client,
                    true,
                    (&qt, &kt, &vt, &dot),
                    (&lse, &delta_like),
                    &opts,
                );
        if !routed {
            failed.push(format!("{label}: not routed to the wgmma kernels"));
            continue;
        }
        let auto = FlashKernel::Auto;
        flash_forward_with::<bf16>(client, &qt, &kt, &vt, &ot, &lse, &opts, auto)?;
        let (dq, dk, dv) =
            flash_backward_with::<bf16>(client, &qt, &kt, &vt, &ot, &lse, &dot, &opts, auto)?;
        let widen = |t: &DeviceTensor| -> Result<Vec<f32>, AttnError> {
            Ok(t.to_vec::<bf16>(client)?
                .into_iter()
                .map(f32::from)
                .collect())
        };
        let shape = (batch, heads, kv_heads, seq, causal);
        let scale = f64::from(opts.scale);
        let want = reference_f64(shape, head_dim, scale, (&q, &k, &v), Some(&d_o));
        let errors = [
            max_relative_error(&widen(&dq)?, &want.dq),
            max_relative_error(&widen(&dk)?, &want.dk),
            max_relative_error(&widen(&dv)?, &want.dv),
        ];
        let line = format!(
            "{label}: dQ {:.1e} dK {:.1e} dV {:.1e}",
            errors[0], errors[1], errors[2]
        );
        if errors.iter().all(|&e| e <= 1e-2) {
            passed.push(line);
        } else {
            failed.push(line);
        }
    }
    Ok((passed, failed))
}
