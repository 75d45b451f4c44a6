//! `longview gemm`: the cuBLASLt GEMMs on the GPU. `--check` runs the linear layer's
//! correctness cases (forward, dX, dW, bias gradient against Burn's f32 linear on
//! the CPU), the patch embedding's and the fused kernels' (`crate::fused_check`), and
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
                crate::fused_check::run(&device, tolerance)?;
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
