//! Attention from its definition, in f64 on the host: the one reference every kernel
//! test, the GPU check binary and the model tests compare against. Also the fused
//! kernels' formulas (RMSNorm, rotary embedding, SwiGLU), for their tests and the GPU
//! checks of `longview gemm --check`.
//!
//! Forward: `S = scale q k^T` over the keys `visible(b, i, j)` allows, `P =
//! softmax(S)`, `O = P v`, `LSE = log sum exp S`. Backward for an upstream `dO`:
//! `dP = dO v^T`, `D = rowsum(P dP)`, `dS = P (dP - D)`, `dQ = scale dS k`,
//! `dK = scale dS^T q`, `dV = P^T dO`. A query row that sees no key gets O = 0, no
//! gradient, and `LSE = empty_lse` (the kernels' sentinel, or `-inf`).

/// Shape of one attention call, row-major `[batch, heads, len, head_dim]` buffers;
/// query head `h` reads kv head `h / (q_heads / kv_heads)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Geometry {
    pub batch: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub head_dim: usize,
    pub scale: f64,
    /// LSE of rows that see no key.
    pub empty_lse: f64,
}

/// O, LSE and (with an upstream gradient) dQ, dK, dV in f64, laid out like the inputs.
#[derive(Debug, Clone, Default)]
pub struct AttentionF64 {
    pub o: Vec<f64>,
    pub lse: Vec<f64>,
    pub dq: Vec<f64>,
    pub dk: Vec<f64>,
    pub dv: Vec<f64>,
}

/// Attention over `q`, `k`, `v` where `visible(batch, i, j)` says whether query `i`
/// may see key `j`; gradients too when `d_o` is given (else they are empty).
pub fn attention_f64(
    g: &Geometry,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d_o: Option<&[f32]>,
    visible: impl Fn(usize, usize, usize) -> bool,
) -> AttentionF64 {
    let d = g.head_dim;
    let groups = g.q_heads / g.kv_heads.max(1);
    assert!(
        g.kv_heads > 0 && g.q_heads == groups * g.kv_heads,
        "kv heads ({}) must divide query heads ({})",
        g.kv_heads,
        g.q_heads
    );
    assert_eq!(q.len(), g.batch * g.q_heads * g.q_len * d, "q length");
    assert_eq!(k.len(), g.batch * g.kv_heads * g.kv_len * d, "k length");
    assert_eq!(v.len(), k.len(), "v length");
    let qi = |b: usize, h: usize, i: usize| ((b * g.q_heads + h) * g.q_len + i) * d;
    let ki = |b: usize, h: usize, j: usize| ((b * g.kv_heads + h) * g.kv_len + j) * d;
    let grads = d_o.is_some();
    let mut r = AttentionF64 {
        o: vec![0.0; q.len()],
        lse: vec![g.empty_lse; g.batch * g.q_heads * g.q_len],
        dq: if grads {
            vec![0.0; q.len()]
        } else {
            Vec::new()
        },
        dk: if grads {
            vec![0.0; k.len()]
        } else {
            Vec::new()
        },
        dv: if grads {
            vec![0.0; v.len()]
        } else {
            Vec::new()
        },
    };
    for b in 0..g.batch {
        for h in 0..g.q_heads {
            let hk = h / groups;
            for i in 0..g.q_len {
                let keys: Vec<usize> = (0..g.kv_len).filter(|&j| visible(b, i, j)).collect();
                if keys.is_empty() {
                    continue;
                }
                let (qb, dot) = (qi(b, h, i), |x: &[f32], y: &[f32]| -> f64 {
                    x.iter().zip(y).map(|(a, b)| *a as f64 * *b as f64).sum()
                });
                let s: Vec<f64> = keys
                    .iter()
                    .map(|&j| dot(&q[qb..qb + d], &k[ki(b, hk, j)..ki(b, hk, j) + d]) * g.scale)
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let l: f64 = s.iter().map(|x| (x - m).exp()).sum();
                let p: Vec<f64> = s.iter().map(|x| (x - m).exp() / l).collect();
                r.lse[(b * g.q_heads + h) * g.q_len + i] = m + l.ln();
                for (n, &j) in keys.iter().enumerate() {
                    for x in 0..d {
                        r.o[qb + x] += p[n] * v[ki(b, hk, j) + x] as f64;
                    }
                }
                let Some(d_o) = d_o else { continue };
                let dp: Vec<f64> = keys
                    .iter()
                    .map(|&j| dot(&d_o[qb..qb + d], &v[ki(b, hk, j)..ki(b, hk, j) + d]))
                    .collect();
                let delta: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                for (n, &j) in keys.iter().enumerate() {
                    let ds = p[n] * (dp[n] - delta);
                    let kb = ki(b, hk, j);
                    for x in 0..d {
                        r.dq[qb + x] += g.scale * ds * k[kb + x] as f64;
                        r.dk[kb + x] += g.scale * ds * q[qb + x] as f64;
                        r.dv[kb + x] += p[n] * d_o[qb + x] as f64;
                    }
                }
            }
        }
    }
    r
}

/// Largest `|got - want|` over `max(max |want|, 1)`; infinite when any element of
/// `got` is NaN (outputs start as NaN, so an element no kernel wrote fails).
pub fn max_relative_error(got: &[f32], want: &[f64]) -> f64 {
    let scale = want.iter().fold(1.0f64, |m, x| m.max(x.abs()));
    got.iter()
        .zip(want)
        .map(|(g, w)| {
            let e = (*g as f64 - w).abs() / scale;
            if e.is_nan() { f64::INFINITY } else { e }
        })
        .fold(0.0, f64::max)
}

/// Largest `|got - want|` over the largest `|want|` (for outputs that are small
/// averages, such as a decoding step's O over many keys, where `max(|want|, 1)` would
/// hide errors); infinite when any element of `got` is NaN or infinite.
pub fn error_of_largest(got: &[f32], want: &[f64]) -> f64 {
    if got.iter().any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    let largest = want.iter().fold(1e-30f64, |m, x| m.max(x.abs()));
    got.iter()
        .zip(want)
        .fold(0f64, |m, (&g, &w)| m.max((g as f64 - w).abs()))
        / largest
}

/// A KV cache buffer for counted decoding tests: `x` holds heads of `rows` rows of
/// `d` values each; every head is followed by `capacity - rows` rows of `past` (rows a
/// kernel must not read).
pub fn cache_rows_then(x: &[f32], rows: usize, capacity: usize, d: usize, past: f32) -> Vec<f32> {
    let heads = x.len() / (rows * d).max(1);
    let mut out = vec![past; heads * capacity * d];
    for (head, values) in x.chunks(rows * d).enumerate() {
        out[head * capacity * d..][..values.len()].copy_from_slice(values);
    }
    out
}

/// RMSNorm in f64 of the rows of `x` (length a multiple of `gamma`'s):
/// `x / sqrt(mean(x^2) + eps) * gamma`.
pub fn rms_norm_f64(x: &[f32], gamma: &[f32], eps: f64) -> Vec<f64> {
    let d = gamma.len();
    x.chunks(d)
        .flat_map(|row| {
            let mean = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / d as f64;
            let inv = 1.0 / (mean + eps).sqrt();
            row.iter()
                .zip(gamma)
                .map(move |(&v, &g)| v as f64 * inv * g as f64)
        })
        .collect()
}

/// LayerNorm over rows of `gamma.len()` values, in f64: `(x - mean) / sqrt(var + eps)
/// * gamma + beta` with the biased variance (`torch.nn.LayerNorm`).
pub fn layer_norm_f64(x: &[f32], gamma: &[f32], beta: &[f32], eps: f64) -> Vec<f64> {
    let d = gamma.len();
    x.chunks(d)
        .flat_map(|row| {
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
            let inv = 1.0 / (var + eps).sqrt();
            row.iter()
                .zip(gamma.iter().zip(beta))
                .map(move |(&v, (&g, &b))| (v as f64 - mean) * inv * g as f64 + b as f64)
        })
        .collect()
}

/// GELU's tanh approximation in f64: `x / 2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
pub fn gelu_tanh_f64(x: &[f32]) -> Vec<f64> {
    let k = (2.0 / std::f64::consts::PI).sqrt();
    x.iter()
        .map(|&v| {
            let v = v as f64;
            0.5 * v * (1.0 + (k * (v + 0.044715 * v * v * v)).tanh())
        })
        .collect()
}

/// The rotary embedding in the rotate-half layout, in f64: `x` row-major
/// `[b, h, s, d]`, the tables `cos` and `signed_sin` row-major `[tb, 1, s, d]` with
/// `tb` = `b` or 1; `y_i = x_i cos_i + x_o(i) signed_sin_i`, `o(i)` the same place in
/// the other half.
pub fn rope_f64(
    x: &[f32],
    cos: &[f32],
    signed_sin: &[f32],
    [b, h, s, d]: [usize; 4],
    table_batch: usize,
) -> Vec<f64> {
    let mut y = vec![0.0f64; x.len()];
    for bi in 0..b {
        let tb = if table_batch == 1 { 0 } else { bi };
        for hi in 0..h {
            for si in 0..s {
                let row = ((bi * h + hi) * s + si) * d;
                for i in 0..d {
                    let other = if i < d / 2 { i + d / 2 } else { i - d / 2 };
                    let t = (tb * s + si) * d + i;
                    y[row + i] = x[row + i] as f64 * cos[t] as f64
                        + x[row + other] as f64 * signed_sin[t] as f64;
                }
            }
        }
    }
    y
}

/// Qwen2's SwiGLU in f64: `silu(gate) * up` elementwise.
pub fn swiglu_f64(gate: &[f32], up: &[f32]) -> Vec<f64> {
    gate.iter()
        .zip(up)
        .map(|(&g, &u)| {
            let g = g as f64;
            g / (1.0 + (-g).exp()) * u as f64
        })
        .collect()
}

/// Deterministic test inputs in [-1, 1): a 64-bit LCG's top 24 bits per value, the
/// same for every test, check binary and benchmark that asks for `(n, seed)`.
pub fn random_values(n: usize, seed: u64) -> Vec<f32> {
    let step = |s: u64| {
        s.wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407)
    };
    let mut s = step(seed);
    (0..n)
        .map(|_| {
            s = step(s);
            ((s >> 40) as f64 / (1u64 << 24) as f64 * 2.0 - 1.0) as f32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_of_largest_scales_by_the_largest_value_and_fails_unwritten_elements() {
        let want = [0.1, -0.25, 0.05];
        let e = error_of_largest(&[0.1, -0.2, 0.05], &want);
        assert!((e - 0.2).abs() < 1e-6, "{e}");
        assert_eq!(
            error_of_largest(&[0.1, f32::NAN, 0.05], &want),
            f64::INFINITY
        );
        assert_eq!(
            error_of_largest(&[f32::INFINITY, 0.0, 0.0], &want),
            f64::INFINITY
        );
    }

    #[test]
    fn one_query_two_keys_by_hand() {
        // q = [1, 0], keys [1, 0] and [0, 1], scale 1: scores 1 and 0.
        let g = Geometry {
            batch: 1,
            q_heads: 1,
            kv_heads: 1,
            q_len: 1,
            kv_len: 2,
            head_dim: 2,
            scale: 1.0,
            empty_lse: f64::NEG_INFINITY,
        };
        let r = attention_f64(
            &g,
            &[1.0, 0.0],
            &[1.0, 0.0, 0.0, 1.0],
            &[2.0, 0.0, 0.0, 4.0],
            None,
            |_, _, _| true,
        );
        let e = std::f64::consts::E;
        let (p0, p1) = (e / (e + 1.0), 1.0 / (e + 1.0));
        assert!(
            (r.o[0] - 2.0 * p0).abs() < 1e-12 && (r.o[1] - 4.0 * p1).abs() < 1e-12,
            "{:?}",
            r.o
        );
        assert!((r.lse[0] - (e + 1.0).ln()).abs() < 1e-12);
        let none = attention_f64(
            &g,
            &[1.0, 0.0],
            &[1.0, 0.0, 0.0, 1.0],
            &[2.0, 0.0, 0.0, 4.0],
            None,
            |_, _, _| false,
        );
        assert_eq!((none.o, none.lse[0]), (vec![0.0, 0.0], f64::NEG_INFINITY));
    }
}
