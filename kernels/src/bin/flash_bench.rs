//! Flash-attention throughput and large-size correctness on a GPU. Build here, run on
//! the GPU machine:
//!
//!     cargo build --release -p longview-kernels --no-default-features --features cuda --bin flash_bench
//!     flash_bench [--quick] [--128k]
//!
//! For each scenario: forward and forward+backward wall time (device synchronised
//! before the clock stops; one warm-up call first), TFLOP/s with FlashAttention's
//! convention (forward 4 B H Sq Sk D, halved when causal; backward 2.5x the
//! forward), and peak memory is linear by construction (no Sq x Sk buffer).
//! Before timing, a B1 H2 S1024 D128 causal case is checked on the GPU against an f64
//! CPU reference (O and LSE; f32 within 2e-5, bf16 within 3e-2 of max |ref|).
//! benchmarks/flash_reference.py times torch's SDPA (flash and cuDNN) on the same
//! shapes for the comparison column.

use std::time::Instant;

use cubecl::prelude::*;
use half::bf16;
use longview_kernels::{DeviceTensor, FlashOptions, flash_backward, flash_forward};

fn client() -> Client {
    #[cfg(feature = "cuda")]
    {
        cubecl::Device::cuda(0).expect("CUDA device 0").client()
    }
    #[cfg(not(feature = "cuda"))]
    {
        cubecl::Device::wgpu(cubecl::device::WgpuDeviceKind::DefaultDevice)
            .expect("a wgpu device")
            .client()
    }
}

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

fn sync(client: &Client) {
    cubecl::future::block_on(client.sync()).expect("device sync");
}

/// O and LSE in f64 for B = 1, Hq = Hkv, causal.
fn reference(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    h: usize,
    s: usize,
    d: usize,
    scale: f64,
) -> (Vec<f64>, Vec<f64>) {
    let mut o = vec![0.0; h * s * d];
    let mut lse = vec![0.0; h * s];
    for hh in 0..h {
        for i in 0..s {
            let base = (hh * s + i) * d;
            let scores: Vec<f64> = (0..=i)
                .map(|j| {
                    let kb = (hh * s + j) * d;
                    (0..d)
                        .map(|x| q[base + x] as f64 * k[kb + x] as f64)
                        .sum::<f64>()
                        * scale
                })
                .collect();
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let l: f64 = scores.iter().map(|x| (x - m).exp()).sum();
            lse[hh * s + i] = m + l.ln();
            for (j, sc) in scores.iter().enumerate() {
                let p = (sc - m).exp() / l;
                let vb = (hh * s + j) * d;
                for x in 0..d {
                    o[base + x] += p * v[vb + x] as f64;
                }
            }
        }
    }
    (o, lse)
}

fn max_rel(got: &[f32], want: &[f64]) -> f64 {
    let scale = want.iter().fold(1.0f64, |m, x| m.max(x.abs()));
    got.iter()
        .zip(want)
        .map(|(g, w)| (*g as f64 - w).abs() / scale)
        .fold(0.0, f64::max)
}

fn check_large(client: &Client) {
    let (h, s, d) = (2, 1024, 128);
    let q = random(h * s * d, 1);
    let k = random(h * s * d, 2);
    let v = random(h * s * d, 3);
    let opts = FlashOptions::new(d).causal(true);
    let (o_ref, lse_ref) = reference(&q, &k, &v, h, s, d, opts.scale as f64);
    let shape = [1, h, s, d];
    let t = |x: &[f32]| DeviceTensor::from_slice(client, x, &shape);
    let (o, lse) = flash_forward::<f32>(client, &t(&q), &t(&k), &t(&v), &opts).unwrap();
    let e_o = max_rel(&o.to_vec::<f32>(client).unwrap(), &o_ref);
    let e_l = max_rel(&lse.to_vec::<f32>(client).unwrap(), &lse_ref);
    println!("check f32 B1 H2 S1024 D128 causal: O rel err {e_o:.2e}, LSE rel err {e_l:.2e}");
    assert!(e_o <= 2e-5 && e_l <= 2e-5, "f32 check failed");
    let h16 = |x: &[f32]| -> Vec<bf16> { x.iter().map(|&v| bf16::from_f32(v)).collect() };
    let tb = |x: &[f32]| DeviceTensor::from_slice(client, &h16(x), &shape);
    let (o, lse) = flash_forward::<bf16>(client, &tb(&q), &tb(&k), &tb(&v), &opts).unwrap();
    let o: Vec<f32> = o
        .to_vec::<bf16>(client)
        .unwrap()
        .iter()
        .map(|x| x.to_f32())
        .collect();
    let e_o = max_rel(&o, &o_ref);
    let e_l = max_rel(&lse.to_vec::<f32>(client).unwrap(), &lse_ref);
    println!("check bf16 B1 H2 S1024 D128 causal: O rel err {e_o:.2e}, LSE rel err {e_l:.2e}");
    assert!(e_o <= 3e-2 && e_l <= 3e-2, "bf16 check failed");
}

fn bench(
    client: &Client,
    name: &str,
    b: usize,
    h: usize,
    s: usize,
    d: usize,
    causal: bool,
    reps: usize,
) {
    let shape = [b, h, s, d];
    let n = b * h * s * d;
    let mk = |seed| {
        let x: Vec<bf16> = random(n, seed).iter().map(|&v| bf16::from_f32(v)).collect();
        DeviceTensor::from_slice(client, &x, &shape)
    };
    let (q, k, v, g) = (mk(1), mk(2), mk(3), mk(4));
    let opts = FlashOptions::new(d).causal(causal);
    let fwd_flops =
        4.0 * (b * h) as f64 * (s as f64) * (s as f64) * d as f64 / if causal { 2.0 } else { 1.0 };
    // Warm-up (kernel compilation).
    let (o, lse) = flash_forward::<bf16>(client, &q, &k, &v, &opts).unwrap();
    let _ = flash_backward::<bf16>(client, &q, &k, &v, &o, &lse, &g, &opts).unwrap();
    sync(client);
    let t = Instant::now();
    for _ in 0..reps {
        let _ = flash_forward::<bf16>(client, &q, &k, &v, &opts).unwrap();
    }
    sync(client);
    let fwd = t.elapsed().as_secs_f64() / reps as f64;
    let t = Instant::now();
    for _ in 0..reps {
        let (o, lse) = flash_forward::<bf16>(client, &q, &k, &v, &opts).unwrap();
        let _ = flash_backward::<bf16>(client, &q, &k, &v, &o, &lse, &g, &opts).unwrap();
    }
    sync(client);
    let both = t.elapsed().as_secs_f64() / reps as f64;
    println!(
        "| {name} | B{b} H{h} S{s} D{d} | {} | {:.1} ms | {:.1} | {:.1} ms | {:.1} |",
        if causal { "causal" } else { "full" },
        fwd * 1e3,
        fwd_flops / fwd / 1e12,
        both * 1e3,
        3.5 * fwd_flops / both / 1e12
    );
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let client = client();
    check_large(&client);
    println!("| scenario | shape | mask | fwd | fwd TFLOP/s | fwd+bwd | fwd+bwd TFLOP/s |");
    println!("|---|---|---|---|---|---|---|");
    let long: &[usize] = if quick { &[8192] } else { &[8192, 32768] };
    for &s in long {
        for causal in [true, false] {
            bench(
                &client,
                "LLM",
                1,
                16,
                s,
                128,
                causal,
                if s > 8192 { 1 } else { 3 },
            );
        }
    }
    bench(&client, "SigLIP (16 frames)", 16, 16, 729, 72, false, 3);
    if !quick && std::env::args().any(|a| a == "--128k") {
        bench(&client, "LLM", 1, 16, 131072, 128, true, 1);
    }
}
