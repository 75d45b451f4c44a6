//! Flash-attention throughput and large-size correctness on a GPU. Build here, run on
//! the GPU machine:
//!
//!     cargo build --release -p longview-kernels --no-default-features --features cuda --bin flash_bench
//!     flash_bench [--quick] [--128k]     (checks, then throughput)
//!     flash_bench --decode                (one decoding step's attention only)
//!     flash_bench --no-checks ...         (throughput without the checks)
//!
//! For each scenario: forward and forward+backward wall time (device synchronised
//! before the clock stops; one warm-up call first), TFLOP/s with FlashAttention's
//! convention (forward 4 B H Sq Sk D, halved when causal; backward 2.5x the
//! forward), and peak memory is linear by construction (no Sq x Sk buffer).
//! Before timing, a B1 H2 S1024 D128 causal case is checked on the GPU against an f64
//! CPU reference (O and LSE; f32 within 2e-5, bf16 within 3e-2 of max |ref|).
//! benchmarks/flash_reference.py times torch's SDPA (flash and cuDNN) on the same
//! shapes for the comparison column.

use longview_kernels::reference::{Geometry, attention_f64, max_relative_error as max_rel};
use std::time::Instant;

mod decode;
mod wgmma;
use decode::bench_decode;

use cubecl::prelude::*;
use half::bf16;
use longview_kernels::reference::random_values as random;
use longview_kernels::{
    DeviceTensor, FlashKernel, FlashOptions, flash_backward, flash_backward_with, flash_forward,
    flash_forward_with,
};

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
    let geometry = Geometry {
        batch: 1,
        q_heads: h,
        kv_heads: h,
        q_len: s,
        kv_len: s,
        head_dim: d,
        scale,
        empty_lse: longview_kernels::flash::NO_KEYS as f64,
    };
    let r = attention_f64(&geometry, q, k, v, None, |_, i, j| j <= i);
    (r.o, r.lse)
}

/// One case of the tensor-core check.
struct Case {
    b: usize,
    hq: usize,
    hkv: usize,
    sq: usize,
    sk: usize,
    d: usize,
    causal: bool,
    q_offset: usize,
    k_offset: usize,
    cu: Option<Vec<u32>>,
}

/// Attention in f64 from the definition (`longview_kernels::reference`), any
/// geometry of [`Case`]: O, LSE (rows without a visible key: O = 0, LSE = NO_KEYS)
/// and, for the upstream gradient `g`, dQ, dK, dV.
fn reference_general(c: &Case, [q, k, v, g]: [&[f32]; 4], scale: f64) -> [Vec<f64>; 5] {
    let seg = |pos: usize| -> usize {
        match &c.cu {
            Some(cu) => cu
                .windows(2)
                .position(|w| pos >= w[0] as usize && pos < w[1] as usize)
                .unwrap_or(0),
            None => 0,
        }
    };
    let geometry = Geometry {
        batch: c.b,
        q_heads: c.hq,
        kv_heads: c.hkv,
        q_len: c.sq,
        kv_len: c.sk,
        head_dim: c.d,
        scale,
        empty_lse: longview_kernels::flash::NO_KEYS as f64,
    };
    let r = attention_f64(&geometry, q, k, v, Some(g), |_, i, j| {
        !(c.causal && c.k_offset + j > c.q_offset + i) && (c.cu.is_none() || seg(i) == seg(j))
    });
    [r.o, r.lse, r.dq, r.dk, r.dv]
}

/// The tensor-core kernels against the f64 reference (on the 16-bit-rounded inputs),
/// and the scalar kernels beside them, over masks, GQA, packed sequences, offsets,
/// ragged lengths and head dims 64/72/80/128, in bf16 and f16: O, LSE, dQ, dK, dV.
/// Panics past the tolerances, relative to max(|ref|, 1): O and gradients 1e-2
/// (bf16) / 2e-3 (f16), LSE 1e-3.
fn check_tensor_cores(client: &Client, only: Option<&[usize]>) {
    #[rustfmt::skip]
    let cases = [
        Case { b: 1, hq: 2, hkv: 2, sq: 256, sk: 256, d: 128, causal: true, q_offset: 0, k_offset: 0, cu: None },
        Case { b: 2, hq: 4, hkv: 1, sq: 200, sk: 333, d: 64, causal: false, q_offset: 0, k_offset: 0, cu: None },
        Case { b: 1, hq: 4, hkv: 2, sq: 190, sk: 190, d: 80, causal: true, q_offset: 0, k_offset: 0, cu: None },
        Case { b: 3, hq: 2, hkv: 2, sq: 77, sk: 77, d: 72, causal: false, q_offset: 0, k_offset: 0, cu: None },
        Case { b: 1, hq: 2, hkv: 1, sq: 128, sk: 160, d: 128, causal: true, q_offset: 256, k_offset: 200, cu: None },
        Case { b: 1, hq: 2, hkv: 1, sq: 100, sk: 100, d: 64, causal: true, q_offset: 0, k_offset: 500, cu: None },
        Case { b: 1, hq: 2, hkv: 2, sq: 300, sk: 300, d: 64, causal: true, q_offset: 0, k_offset: 0, cu: Some(vec![0, 37, 37, 170, 300]) },
        Case { b: 1, hq: 8, hkv: 2, sq: 1, sk: 130, d: 128, causal: false, q_offset: 0, k_offset: 0, cu: None },
    ];
    let mut failures = 0;
    let mut checks = 0;
    for (n, c) in cases.iter().enumerate() {
        if only.is_some_and(|o| !o.contains(&n)) {
            continue;
        }
        let qn = c.b * c.hq * c.sq * c.d;
        let kn = c.b * c.hkv * c.sk * c.d;
        let mut opts = FlashOptions::new(c.d)
            .causal(c.causal)
            .offsets(c.q_offset, c.k_offset);
        if let Some(cu) = &c.cu {
            opts = opts.packed(cu.clone());
        }
        for dtype in ["bf16", "f16"] {
            let round = |x: Vec<f32>| -> Vec<f32> {
                x.iter()
                    .map(|&v| {
                        if dtype == "bf16" {
                            bf16::from_f32(v).to_f32()
                        } else {
                            half::f16::from_f32(v).to_f32()
                        }
                    })
                    .collect()
            };
            let q = round(random(qn, 10 + n as u64));
            let k = round(random(kn, 20 + n as u64).iter().map(|x| x * 2.0).collect());
            let v = round(random(kn, 30 + n as u64));
            let g = round(random(qn, 40 + n as u64));
            let want = reference_general(c, [&q, &k, &v, &g], opts.scale as f64);
            let qs = [c.b, c.hq, c.sq, c.d];
            let ks = [c.b, c.hkv, c.sk, c.d];
            let mut line = format!(
                "check {n} {dtype} B{} H{}/{} Sq{} Sk{} D{} causal {} offsets {}/{} packed {}:",
                c.b,
                c.hq,
                c.hkv,
                c.sq,
                c.sk,
                c.d,
                c.causal,
                c.q_offset,
                c.k_offset,
                c.cu.is_some()
            );
            // `--tc-only`: skip the scalar kernels (each geometry compiles for ~30 s).
            let mut kernels = vec![FlashKernel::TensorCore];
            if !std::env::args().any(|a| a == "--tc-only") {
                kernels.push(FlashKernel::Scalar);
            }
            // The split-key decode kernels where they apply (forward; the backward
            // from their O/LSE runs the tensor-core kernels).
            if c.cu.is_none() && c.hq / c.hkv * c.sq <= longview_kernels::flash::DECODE_MAX_ROWS {
                kernels.push(FlashKernel::Decode);
            }
            // bf16 D128: `Auto` too, which on an sm_90 device runs the wgmma forward
            // where it applies (the backward then starts from its O and LSE).
            if dtype == "bf16" && c.d == 128 {
                kernels.push(FlashKernel::Auto);
            }
            for &kernel in &kernels {
                let started = Instant::now();
                let got = if dtype == "bf16" {
                    let conv: Conversions<bf16> = (bf16::from_f32, bf16::to_f32);
                    run_both::<bf16>(client, [&q, &k, &v, &g], &qs, &ks, &opts, kernel, conv)
                } else {
                    let conv: Conversions<half::f16> = (half::f16::from_f32, half::f16::to_f32);
                    run_both::<half::f16>(client, [&q, &k, &v, &g], &qs, &ks, &opts, kernel, conv)
                };
                let tol = if dtype == "bf16" { 1e-2 } else { 2e-3 };
                line += &format!(" {kernel:?} ({:.1} s)", started.elapsed().as_secs_f64());
                for (i, name) in ["O", "LSE", "dQ", "dK", "dV"].iter().enumerate() {
                    let e = max_rel(&got[i], &want[i]);
                    let ok = e <= if i == 1 { 1e-3 } else { tol };
                    checks += 1;
                    if !ok {
                        failures += 1;
                    }
                    line += &format!(" {name} {e:.1e}{}", if ok { "" } else { " FAIL" });
                }
            }
            println!("{line}");
        }
    }
    assert_eq!(failures, 0, "{failures} of {checks} kernel checks failed");
    println!("kernel checks: all {checks} run passed");
}

/// f32 to the element type and back.
type Conversions<E> = (fn(f32) -> E, fn(E) -> f32);

/// Forward then backward with `kernel`; returns O, LSE, dQ, dK, dV as f32.
#[allow(clippy::too_many_arguments)]
fn run_both<E: Float + CubeElement>(
    client: &Client,
    [q, k, v, g]: [&[f32]; 4],
    qs: &[usize],
    ks: &[usize],
    opts: &FlashOptions,
    kernel: FlashKernel,
    (to, from): Conversions<E>,
) -> [Vec<f32>; 5] {
    let up = |x: &[f32], shape: &[usize]| {
        let e: Vec<E> = x.iter().map(|&v| to(v)).collect();
        DeviceTensor::from_slice(client, &e, shape)
    };
    let (q, k, v, g) = (up(q, qs), up(k, ks), up(v, ks), up(g, qs));
    let o = DeviceTensor::filled(client, to(f32::NAN), qs);
    let lse = DeviceTensor::filled(client, f32::NAN, &qs[..3]);
    flash_forward_with::<E>(client, &q, &k, &v, &o, &lse, opts, kernel).expect("forward");
    let (dq, dk, dv) =
        flash_backward_with::<E>(client, &q, &k, &v, &o, &lse, &g, opts, kernel).expect("backward");
    let down = |t: &DeviceTensor| -> Vec<f32> {
        t.to_vec::<E>(client)
            .unwrap()
            .into_iter()
            .map(from)
            .collect()
    };
    [
        down(&o),
        lse.to_vec::<f32>(client).unwrap(),
        down(&dq),
        down(&dk),
        down(&dv),
    ]
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

#[allow(clippy::too_many_arguments)]
fn bench(
    client: &Client,
    name: &str,
    b: usize,
    (h, hkv): (usize, usize),
    s: usize,
    d: usize,
    causal: bool,
    reps: usize,
    with_scalar: bool,
) {
    let mk = |seed, heads| {
        let shape = [b, heads, s, d];
        let x: Vec<bf16> = random(b * heads * s * d, seed)
            .iter()
            .map(|&v| bf16::from_f32(v))
            .collect();
        DeviceTensor::from_slice(client, &x, &shape)
    };
    let (q, k, v, g) = (mk(1, h), mk(2, hkv), mk(3, hkv), mk(4, h));
    let opts = FlashOptions::new(d).causal(causal);
    let fwd_flops =
        4.0 * (b * h) as f64 * (s as f64) * (s as f64) * d as f64 / if causal { 2.0 } else { 1.0 };
    // Warm-up (kernel compilation).
    let (o, lse) = flash_forward::<bf16>(client, &q, &k, &v, &opts).unwrap();
    let _ = flash_backward::<bf16>(client, &q, &k, &v, &o, &lse, &g, &opts).unwrap();
    let forward =
        |kernel| flash_forward_with::<bf16>(client, &q, &k, &v, &o, &lse, &opts, kernel).unwrap();
    if with_scalar {
        forward(FlashKernel::Scalar);
    }
    sync(client);
    let t = Instant::now();
    for _ in 0..reps {
        forward(FlashKernel::Auto);
    }
    sync(client);
    let fwd = t.elapsed().as_secs_f64() / reps as f64;
    let t = Instant::now();
    if with_scalar {
        forward(FlashKernel::Scalar);
    }
    sync(client);
    let scalar = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for _ in 0..reps {
        let (o, lse) = flash_forward::<bf16>(client, &q, &k, &v, &opts).unwrap();
        let _ = flash_backward::<bf16>(client, &q, &k, &v, &o, &lse, &g, &opts).unwrap();
    }
    sync(client);
    let both = t.elapsed().as_secs_f64() / reps as f64;
    let scalar_col = if with_scalar {
        format!("{:.1} ms, {:.1}", scalar * 1e3, fwd_flops / scalar / 1e12)
    } else {
        "not run".to_string()
    };
    let heads = if hkv == h {
        format!("H{h}")
    } else {
        format!("H{h}:{hkv}")
    };
    println!(
        "| {name} | B{b} {heads} S{s} D{d} | {} | {scalar_col} | {:.1} ms | {:.1} | {:.1} ms | {:.1} |",
        if causal { "causal" } else { "full" },
        fwd * 1e3,
        fwd_flops / fwd / 1e12,
        both * 1e3,
        3.5 * fwd_flops / both / 1e12
    );
}

fn main() {
    // Every output the kernels allocate starts NaN-filled here, as in the tests: the
    // checks below must see an element a kernel forgot to write.
    longview_kernels::flash::set_poison_outputs(true);
    let args: Vec<String> = std::env::args().collect();
    let has = |flag: &str| args.iter().any(|a| a == flag);
    let quick = has("--quick");
    // The scalar forward is slow at 32k+ (0.8-1.4 s per call): `--no-scalar` skips it.
    let with_scalar = !has("--no-scalar");
    let client = client();
    if has("--decode") {
        // `--decode`: the decoding step alone, the 1.5B and 7B groupings, one row a
        // head and a GRPO group of five (the 7B's 35 rows a kv head exceed the decode
        // kernels' 32, so `SharedPrefixBatch` runs its group as 3 + 2 samples: 21 and
        // 14 rows; the 3 is timed).
        println!(
            "| scenario | shape | split-key decode | loops | no prefetch | 256 units | 512 units | tensor-core forward | tensor-core, keys sliced into the batch | split-key, counted | tensor-core slices, counted |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|");
        for sk in [4096, 50_000, 200_000] {
            for (heads, sq) in [((12, 2), 1), ((28, 4), 1), ((12, 2), 5), ((28, 4), 3)] {
                bench_decode(&client, heads, sq, sk, 20);
            }
        }
        return;
    }
    if has("--wgmma") {
        wgmma::run(&client);
        // The mma.sync kernels on the same shape, for comparison in the same process.
        println!(
            "| scenario | shape | mask | scalar fwd (ms, TFLOP/s) | fwd | fwd TFLOP/s | fwd+bwd | fwd+bwd TFLOP/s |"
        );
        println!("|---|---|---|---|---|---|---|---|");
        // `Auto` (the wgmma forward and backward on sm_90), then with the `mma.sync`
        // backward (LONGVIEW_FLASH_WGMMA_BACKWARD=0), in the same process.
        for (label, wgmma_backward) in [("LLM", "1"), ("LLM, mma.sync backward", "0")] {
            // SAFETY: single-threaded here; the switch is read at each backward call.
            unsafe { std::env::set_var("LONGVIEW_FLASH_WGMMA_BACKWARD", wgmma_backward) };
            bench(&client, label, 1, (16, 16), 32768, 128, true, 3, false);
            bench(&client, label, 1, (16, 16), 32768, 128, false, 3, false);
            bench(&client, label, 1, (12, 2), 32768, 128, true, 3, false);
            bench(&client, label, 1, (28, 4), 32768, 128, true, 3, false);
        }
        // SAFETY: as above.
        unsafe { std::env::remove_var("LONGVIEW_FLASH_WGMMA_BACKWARD") };
        // SigLIP's head dim 72 (zero columns to 128 in the wgmma kernels' tiles), then both wgmma
        // kernels off (LONGVIEW_FLASH_WGMMA=0: the `mma.sync` forward and backward).
        for (label, wgmma) in [("SigLIP (16 frames)", "1"), ("SigLIP, mma.sync", "0")] {
            // SAFETY: single-threaded; the switch is read at each call.
            unsafe { std::env::set_var("LONGVIEW_FLASH_WGMMA", wgmma) };
            bench(&client, label, 16, (16, 16), 729, 72, false, 10, false);
        }
        // SAFETY: as above.
        unsafe { std::env::remove_var("LONGVIEW_FLASH_WGMMA") };
        return;
    }
    if has("--sweep") {
        // One scenario, no checks: compares tile sizes (LONGVIEW_FLASH_TILES) run to run.
        let tiles = std::env::var("LONGVIEW_FLASH_TILES").unwrap_or_else(|_| "default".into());
        print!("tiles {tiles}: ");
        bench(&client, "LLM", 1, (16, 16), 32768, 128, true, 3, false);
        return;
    }
    // `--no-checks`: timing only (the checks ran in an earlier step of the same call).
    if !has("--no-checks") {
        check_large(&client);
        // `--cases 0,3`: only those tensor-core check cases (every distinct geometry
        // flag set compiles new kernels).
        let only: Option<Vec<usize>> = args
            .iter()
            .position(|a| a == "--cases")
            .and_then(|i| args.get(i + 1))
            .map(|x| x.split(',').filter_map(|n| n.parse().ok()).collect());
        check_tensor_cores(&client, only.as_deref());
    }
    if has("--check-only") {
        return;
    }

    println!(
        "| scenario | shape | mask | scalar fwd (ms, TFLOP/s) | fwd | fwd TFLOP/s | fwd+bwd | fwd+bwd TFLOP/s |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let long: &[usize] = if quick { &[8192] } else { &[8192, 32768] };
    for &s in long {
        for causal in [true, false] {
            bench(
                &client,
                "LLM",
                1,
                (16, 16),
                s,
                128,
                causal,
                if s > 8192 { 2 } else { 10 },
                with_scalar,
            );
        }
    }
    bench(
        &client,
        "SigLIP (16 frames)",
        16,
        (16, 16),
        729,
        72,
        false,
        10,
        with_scalar,
    );
    if !quick {
        // The models' grouped-query shapes at 32k, causal: Qwen2-7B (28:4, the
        // kernels issue's target) and Qwen2-1.5B (12:2).
        for heads in [(28, 4), (12, 2)] {
            bench(&client, "LLM GQA", 1, heads, 32768, 128, true, 2, false);
        }
    }
    if !quick && has("--128k") {
        bench(&client, "LLM", 1, (16, 16), 131072, 128, true, 1, false);
    }
}
