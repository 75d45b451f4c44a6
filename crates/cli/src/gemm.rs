//! `longview gemm`: the cuBLASLt GEMMs on the GPU. `--check` runs the linear layer's
//! correctness cases (forward, dX, dW, bias gradient against Burn's f32 linear on
//! the CPU) and
//! fails past the tolerance; the benchmark times the 1.5B model's forward and
//! backward products (`benchmarks/gemm_reference.py` times torch's in the same call).

use anyhow::{Result, bail};
use clap::Args;

use crate::DeviceArgs;

#[derive(Args, Debug)]
pub struct GemmArgs {
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Run the correctness cases first and stop with an error past this tolerance
    /// (largest |difference| / largest |reference| of y, dX, dW, db).
    #[arg(long)]
    pub check: Option<f32>,
    /// LLM tokens of the benchmark shapes (vision rows: 729 per 196 LLM tokens).
    #[arg(long, default_value_t = 32768)]
    pub tokens: usize,
    /// Timed repetitions per product (after as many untimed ones).
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    /// Skip the benchmark (with --check: only check).
    #[arg(long)]
    pub no_bench: bool,
    /// Append one JSON line per product to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

#[cfg(feature = "cuda")]
/// `(name, rows, in, out)` of the 1.5B LongVILA model's linear layers at `tokens`
/// LLM tokens (SigLIP so400m: 729 patches a frame; projector: 196 tokens a frame).
pub fn shapes(tokens: usize) -> Vec<(&'static str, usize, usize, usize)> {
    let frames = tokens.div_ceil(197);
    let patches = frames * 729;
    vec![
        ("llm gate/up", tokens, 1536, 8960),
        ("llm down", tokens, 8960, 1536),
        ("llm q/o", tokens, 1536, 1536),
        ("llm k/v", tokens, 1536, 256),
        ("vision fc1", patches, 1152, 4304),
        ("vision fc2", patches, 4304, 1152),
        ("vision qkv/out", patches, 1152, 1152),
        ("projector 1", frames * 196, 4608, 1536),
    ]
}

#[cfg(feature = "cuda")]
pub fn run(args: GemmArgs) -> Result<()> {
    use burn::tensor::{Distribution, Tensor};
    use longview_kernels::gemm::{Transposes, applies, check, matmul_2d};

    let device = args.device.device()?;
    let dtype: burn::tensor::DType = device.settings().float_dtype.into();
    if !applies(&device, dtype) {
        bail!(
            "cuBLASLt GEMMs need --device cuda and --dtype bf16 or f16 (and LONGVIEW_GEMM unset); got {} {}",
            args.device.device,
            args.device.dtype
        );
    }
    if let Some(tolerance) = args.check {
        // The reference: Burn's f32 linear on the CPU backend (flex).
        let reference = burn::tensor::Device::flex().autodiff();
        match check::run_all(dtype, &device, &reference, tolerance) {
            Ok(results) => {
                for (case, worst) in results {
                    println!("check {case:?}: worst relative difference {worst:.2e}");
                }
                let (worst, burn_conv) = check_patch_embed(&device)?;
                println!(
                    "check patch embedding (y and the filter and bias gradients against an f32 \
                     convolution on the CPU): GEMM path {worst:.2e}, Burn's convolution on this \
                     device {burn_conv:.2e} (for scale; not checked)"
                );
                if worst > tolerance {
                    bail!("gemm check failed: patch embedding {worst:.2e} > {tolerance:.1e}");
                }
                let norm = check_fused_rms_norm(&device)?;
                println!(
                    "check fused RMSNorm (the inference path's one-launch kernel, [3, 37, 1536] \
                     against f64 on the host): {norm:.2e}"
                );
                if norm > tolerance {
                    bail!("gemm check failed: fused RMSNorm {norm:.2e} > {tolerance:.1e}");
                }
                let rope = check_fused_rope(&device)?;
                println!(
                    "check fused RoPE ([2, 12, 37, 128] viewed from [2, 37, 12, 128], against \
                     f64 on the host): {rope:.2e}"
                );
                if rope > tolerance {
                    bail!("gemm check failed: fused RoPE {rope:.2e} > {tolerance:.1e}");
                }
                let swiglu = check_fused_swiglu(&device)?;
                println!(
                    "check fused SwiGLU ([4, 37, 8960] against f64 on the host): {swiglu:.2e}"
                );
                if swiglu > tolerance {
                    bail!("gemm check failed: fused SwiGLU {swiglu:.2e} > {tolerance:.1e}");
                }
                let backward = check_fused_backward(&device)?;
                println!(
                    "check fused RMSNorm / RoPE / SwiGLU gradients (autodiff on this device \
                     against Burn's ops in f32 on the CPU, same rounded inputs): {backward:.2e}"
                );
                if backward > tolerance {
                    bail!("gemm check failed: fused backward {backward:.2e} > {tolerance:.1e}");
                }
                println!("check passed: every case within {tolerance:.1e}");
            }
            Err(e) => bail!("gemm check failed: {e}"),
        }
    }
    if args.no_bench {
        return Ok(());
    }
    let sync = || {
        device
            .sync()
            .map_err(|e| anyhow::anyhow!("device sync failed: {e:?}"))
    };
    println!("| layer | pass | M x N x K | TFLOP/s |\n|---|---|---|---|");
    let mut lines = Vec::new();
    for (name, rows, k, n) in shapes(args.tokens) {
        // Normal(0, 1), as torch.randn in the reference script: tensor-core power draw
        // (and so clocks) depend on the data.
        let draw =
            |shape: [usize; 2]| Tensor::<2>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        let x = draw([rows, k]);
        let w = draw([k, n]);
        let dy = draw([rows, n]);
        // (pass, a, b, transposes, m, n, k)
        let passes = [
            ("fwd", &x, &w, Transposes::default(), rows, n, k),
            ("dX", &dy, &w, Transposes { a: false, b: true }, rows, k, n),
            ("dW", &x, &dy, Transposes { a: true, b: false }, k, n, rows),
        ];
        for (pass, a, b, t, m, nn, kk) in passes {
            let product = || matmul_2d(a.clone(), b.clone(), t);
            // As many untimed products as timed ones: the allocator then holds the
            // outputs' memory before the clock starts (no allocation is timed).
            let warm: Vec<_> = (0..args.iters).map(|_| product()).collect();
            sync()?;
            drop(warm);
            let start = std::time::Instant::now();
            let timed: Vec<_> = (0..args.iters).map(|_| product()).collect();
            sync()?;
            let seconds = start.elapsed().as_secs_f64() / args.iters as f64;
            drop(timed);
            let tflops = 2.0 * (m * nn * kk) as f64 / seconds / 1e12;
            println!("| {name} | {pass} | {m} x {nn} x {kk} | {tflops:.1} |");
            lines.push(serde_json::json!({
                "layer": name, "pass": pass, "m": m, "n": nn, "k": kk,
                "seconds": seconds, "tflops": tflops, "impl": "longview cuBLASLt",
            }));
        }
    }
    if let Some(path) = args.json {
        crate::device::append_json_lines(&path, &lines)?;
    }
    Ok(())
}

/// The fused ops' backward on `device` (autodiff, its dtype) against the same formulas
/// in Burn's ops in f32 on the CPU over the same rounded inputs: every input's gradient
/// under a random upstream gradient; the largest `max|difference| / max|reference|`.
#[cfg(feature = "cuda")]
fn check_fused_backward(device: &burn::tensor::Device) -> Result<f32> {
    use burn::tensor::activation::silu;
    use burn::tensor::{Distribution, Tensor};
    use longview_kernels::fused::{rms_norm, rope, swiglu};
    let device = device.clone().without_autodiff().autodiff();
    let cpu = burn::tensor::Device::flex().autodiff();
    fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
    }
    // The GPU leaf and an f32 CPU leaf with its (rounded) values.
    let pair = |t: Tensor<3>| {
        let cpu_t = Tensor::<3>::from_data(t.to_data().convert::<f32>(), &cpu).require_grad();
        (t.require_grad(), cpu_t)
    };
    let normal = |shape: [usize; 3], std: f64| {
        Tensor::<3>::random(shape, Distribution::Normal(0.0, std), &device)
    };
    let mut worst = 0.0f32;
    let mut compare = |got: Tensor<3>, want: Tensor<3>| {
        let want64: Vec<f64> = host(want).iter().map(|&x| x as f64).collect();
        worst = worst.max(worst_relative(&host(got), &want64));
    };

    // RMSNorm (x; gamma's gradient is a sum over rows, compared via x's path).
    let (x, x_cpu) = pair(normal([2, 37, 1536], 2.0));
    let gamma = Tensor::<1>::random([1536], Distribution::Normal(1.0, 0.3), &device);
    let gamma_cpu = Tensor::<1>::from_data(gamma.to_data().convert::<f32>(), &cpu);
    let (w, w_cpu) = pair(normal([2, 37, 1536], 1.0));
    let y = rms_norm(x.clone(), gamma, 1e-6)
        .ok_or_else(|| anyhow::anyhow!("the fused RMSNorm did not run on {device:?}"))?;
    let grads = (y * w.detach()).sum().backward();
    let rms = (x_cpu.clone().square().mean_dim(2) + 1e-6).sqrt();
    let y_cpu = x_cpu.clone() / rms * gamma_cpu.unsqueeze::<3>();
    let grads_cpu = (y_cpu * w_cpu.detach()).sum().backward();
    compare(x.grad(&grads).unwrap(), x_cpu.grad(&grads_cpu).unwrap());

    // SwiGLU.
    let (gate, gate_cpu) = pair(normal([2, 37, 8960], 4.0));
    let (up, up_cpu) = pair(normal([2, 37, 8960], 1.0));
    let (w, w_cpu) = pair(normal([2, 37, 8960], 1.0));
    let y = swiglu(gate.clone(), up.clone())
        .ok_or_else(|| anyhow::anyhow!("the fused SwiGLU did not run on {device:?}"))?;
    let grads = (y * w.detach()).sum().backward();
    let y_cpu = silu(gate_cpu.clone()) * up_cpu.clone();
    let grads_cpu = (y_cpu * w_cpu.detach()).sum().backward();
    compare(
        gate.grad(&grads).unwrap(),
        gate_cpu.grad(&grads_cpu).unwrap(),
    );
    compare(up.grad(&grads).unwrap(), up_cpu.grad(&grads_cpu).unwrap());

    // RoPE on a strided view, [2, 37, 12, 128] seen as [2, 12, 37, 128].
    let (base, base_cpu) = pair(normal([2 * 37, 12, 128], 1.0));
    let view = |t: Tensor<3>| t.reshape([2, 37, 12, 128]).swap_dims(1, 2);
    let table = |seed_std: f64| {
        Tensor::<4>::random(
            [2, 1, 37, 128],
            Distribution::Normal(0.0, seed_std),
            &device,
        )
    };
    let (cos, sin) = (table(0.7), table(0.7));
    let to_cpu = |t: &Tensor<4>| Tensor::<4>::from_data(t.to_data().convert::<f32>(), &cpu);
    let (cos_cpu, sin_cpu) = (to_cpu(&cos), to_cpu(&sin));
    let w = Tensor::<4>::random([2, 12, 37, 128], Distribution::Normal(0.0, 1.0), &device);
    let w_cpu = to_cpu(&w);
    let y = rope(view(base.clone()), &cos, &sin)
        .ok_or_else(|| anyhow::anyhow!("the fused RoPE did not run on {device:?}"))?;
    let grads = (y * w).sum().backward();
    let x = view(base_cpu.clone());
    let swapped = Tensor::cat(
        vec![x.clone().narrow(3, 64, 64), x.clone().narrow(3, 0, 64)],
        3,
    );
    let y_cpu = x * cos_cpu + swapped * sin_cpu;
    let grads_cpu = (y_cpu * w_cpu).sum().backward();
    compare(
        base.grad(&grads).unwrap(),
        base_cpu.grad(&grads_cpu).unwrap(),
    );
    Ok(worst)
}

/// `max|got - want| / max|want|` (f64 reference).
#[cfg(feature = "cuda")]
fn worst_relative(got: &[f32], want: &[f64]) -> f32 {
    let scale = want.iter().fold(1e-6f64, |m, x| m.max(x.abs()));
    let worst = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w).abs() / scale)
        .fold(0.0f64, f64::max);
    worst as f32
}

/// The fused SwiGLU (`longview_kernels::fused::swiglu`) in the device's dtype at the
/// 1.5B's MLP width against `silu(gate) * up` in f64 on the host over the same
/// rounded inputs: the largest `max|difference| / max|reference|`.
#[cfg(feature = "cuda")]
fn check_fused_swiglu(device: &burn::tensor::Device) -> Result<f32> {
    use burn::tensor::{Distribution, Tensor};
    let device = device.clone().without_autodiff();
    let gate = Tensor::<3>::random([4, 37, 8960], Distribution::Normal(0.0, 4.0), &device);
    let up = Tensor::<3>::random([4, 37, 8960], Distribution::Normal(0.0, 1.0), &device);
    let host = |t: Tensor<3>| t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
    let (gs, us) = (host(gate.clone()), host(up.clone()));
    let got = longview_kernels::fused::swiglu(gate, up)
        .ok_or_else(|| anyhow::anyhow!("the fused SwiGLU did not run on {device:?}"))?;
    let want: Vec<f64> = gs
        .iter()
        .zip(&us)
        .map(|(&g, &u)| g as f64 / (1.0 + (-(g as f64)).exp()) * u as f64)
        .collect();
    Ok(worst_relative(&host(got), &want))
}

/// The fused rotary embedding (`longview_kernels::fused::rope`) in the device's dtype
/// on a strided `[B, H, S, D]` view against the rotate-half formula in f64 on the
/// host over the same rounded inputs: the largest `max|difference| / max|reference|`.
#[cfg(feature = "cuda")]
fn check_fused_rope(device: &burn::tensor::Device) -> Result<f32> {
    use burn::tensor::{Distribution, Tensor};
    let device = device.clone().without_autodiff();
    let [b, h, s, d] = [2, 12, 37, 128];
    let x =
        Tensor::<4>::random([b, s, h, d], Distribution::Normal(0.0, 1.0), &device).swap_dims(1, 2);
    let cos = Tensor::<4>::random([b, 1, s, d], Distribution::Uniform(-1.0, 1.0), &device);
    let sin = Tensor::<4>::random([b, 1, s, d], Distribution::Uniform(-1.0, 1.0), &device);
    let host = |t: Tensor<4>| t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
    let (xs, cs, ss) = (host(x.clone()), host(cos.clone()), host(sin.clone()));
    let got = longview_kernels::fused::rope(x, &cos, &sin)
        .ok_or_else(|| anyhow::anyhow!("the fused RoPE did not run on {device:?}"))?;
    let got = host(got);
    let mut want = vec![0.0f64; got.len()];
    for bi in 0..b {
        for hi in 0..h {
            for si in 0..s {
                for i in 0..d {
                    let other = if i < d / 2 { i + d / 2 } else { i - d / 2 };
                    let row = ((bi * h + hi) * s + si) * d;
                    let t = (bi * s + si) * d + i;
                    want[row + i] =
                        xs[row + i] as f64 * cs[t] as f64 + xs[row + other] as f64 * ss[t] as f64;
                }
            }
        }
    }
    Ok(worst_relative(&got, &want))
}

/// The fused RMSNorm kernel (`longview_kernels::fused`, what inference runs for every
/// Qwen2 norm) in the device's dtype against the f64 formula on the host over the same
/// rounded inputs: the largest `max|difference| / max|reference|`.
#[cfg(feature = "cuda")]
fn check_fused_rms_norm(device: &burn::tensor::Device) -> Result<f32> {
    use burn::tensor::{Distribution, Tensor};
    let device = device.clone().without_autodiff();
    let d = 1536;
    let x = Tensor::<3>::random([3, 37, d], Distribution::Normal(0.5, 2.0), &device);
    let gamma = Tensor::<1>::random([d], Distribution::Normal(1.0, 0.3), &device);
    let host = |t: burn::tensor::TensorData| t.convert::<f32>().try_to_vec::<f32>().unwrap();
    let (xs, gs) = (host(x.clone().into_data()), host(gamma.clone().into_data()));
    let got = longview_kernels::fused::rms_norm(x, gamma, 1e-6)
        .ok_or_else(|| anyhow::anyhow!("the fused RMSNorm did not run on {device:?}"))?;
    let got = host(got.into_data());
    let want: Vec<f64> = xs
        .chunks(d)
        .flat_map(|row| {
            let mean = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / d as f64;
            let inv = 1.0 / (mean + 1e-6).sqrt();
            row.iter()
                .zip(&gs)
                .map(move |(&v, &g)| v as f64 * inv * g as f64)
        })
        .collect();
    Ok(worst_relative(&got, &want))
}

/// The patch embedding as one GEMM (`longview_models::linear::patch_embed`) and
/// Burn's strided convolution, both on `device`, each against the same convolution
/// in f32 on the CPU (the independent reference): the output and the filter and bias
/// gradients, on a frame size that is not a multiple of the patch. Largest
/// `max|difference| / max|reference|` of (the GEMM path, Burn's convolution).
#[cfg(feature = "cuda")]
fn check_patch_embed(device: &burn::tensor::Device) -> Result<(f32, f32)> {
    use burn::module::Param;
    use burn::nn::conv::{Conv2d, Conv2dConfig};
    use burn::tensor::{DType, Device, Distribution, Tensor};
    let patch = 14;
    let config = Conv2dConfig::new([3, 48], [patch, patch]).with_stride([patch, patch]);
    let conv = config.init(device);
    let pixels = Tensor::<4>::random([2, 3, 100, 130], Distribution::Normal(0.0, 1.0), device);
    let g = Tensor::<3>::random([2, 7 * 9, 48], Distribution::Normal(0.0, 1.0), device);
    // The reference: the same (16-bit rounded) values as f32 on the CPU.
    let cpu = Device::flex().autodiff();
    fn to<const D: usize>(t: Tensor<D>, device: &Device) -> Tensor<D> {
        Tensor::from_data(t.into_data().convert::<f32>(), device)
    }
    let mut reference = config.init(&cpu);
    reference.weight = Param::from_tensor(to(conv.weight.val(), &cpu));
    reference.bias = conv
        .bias
        .as_ref()
        .map(|b| Param::from_tensor(to(b.val(), &cpu)));
    let run =
        |conv: &Conv2d, pixels: &Tensor<4>, g: &Tensor<3>, gemm: bool| -> Result<[Vec<f32>; 3]> {
            let y = if gemm {
                longview_models::linear::patch_embed(conv, pixels, patch)
                    .ok_or_else(|| anyhow::anyhow!("patch_embed did not take the GEMM path"))?
            } else {
                let y = conv.forward(pixels.clone());
                let [f, h, gh, gw] = y.dims();
                y.reshape([f, h, gh * gw]).swap_dims(1, 2)
            };
            let grads = (y.clone() * g.clone()).cast(DType::F32).sum().backward();
            let w = conv.weight.grad(&grads).expect("filter gradient");
            let b = conv
                .bias
                .as_ref()
                .and_then(|b| b.grad(&grads))
                .expect("bias gradient");
            let host =
                |t: burn::tensor::TensorData| t.convert::<f32>().try_to_vec::<f32>().unwrap();
            Ok([
                host(y.inner().into_data()),
                host(w.into_data()),
                host(b.into_data()),
            ])
        };
    let want = run(
        &reference,
        &to(pixels.clone(), &cpu),
        &to(g.clone(), &cpu),
        false,
    )?;
    let worst = |got: [Vec<f32>; 3]| {
        got.iter()
            .zip(&want)
            .map(|(got, want)| {
                let scale = want.iter().fold(1e-6f32, |m, x| m.max(x.abs()));
                let diff = got
                    .iter()
                    .zip(want)
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                diff / scale
            })
            .fold(0f32, f32::max)
    };
    Ok((
        worst(run(&conv, &pixels, &g, true)?),
        worst(run(&conv, &pixels, &g, false)?),
    ))
}

#[cfg(not(feature = "cuda"))]
pub fn run(_args: GemmArgs) -> Result<()> {
    bail!(
        "`longview gemm` runs cuBLASLt on a GPU: build with `--features cuda` (cargo xtask package)"
    )
}
