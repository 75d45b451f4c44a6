//! `longview gemm --check`'s checks of the fused kernels (`longview_kernels::fused`)
//! on the GPU, in the device's dtype: the forward against the f64 formulas of
//! `longview_kernels::reference` over the same rounded inputs, the backward against
//! Burn's ops in f32 on the CPU. Each figure is `max|difference| / max(max|reference|,
//! 1)` (`reference::max_relative_error`).

use anyhow::{Result, anyhow, bail};
use burn::tensor::activation::{gelu_approximate, silu};
use burn::tensor::{Device, Distribution, Tensor};
use longview_kernels::fused::{gelu_tanh, layer_norm, rms_norm, rope, swiglu};
use longview_kernels::reference::{
    gelu_tanh_f64, layer_norm_f64, max_relative_error, rms_norm_f64, rope_f64, swiglu_f64,
};

fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

fn missing(what: &str, device: &Device) -> anyhow::Error {
    anyhow!("the fused {what} did not run on {device:?}")
}

/// One check: its worst error.
type Check = fn(&Device) -> Result<f64>;

/// Runs every check, printing each figure; an error past `tolerance`.
pub fn run(device: &Device, tolerance: f32) -> Result<()> {
    // The flash kernels' outputs start NaN-filled for the check, as in the tests.
    longview_kernels::flash::set_poison_outputs(true);
    let device = device.clone().without_autodiff();
    let checks: [(&str, Check); 8] = [
        ("RMSNorm, [3, 37, 1536], against f64", forward_rms_norm),
        (
            "RoPE, [2, 12, 37, 128] viewed from [2, 37, 12, 128], against f64",
            forward_rope,
        ),
        ("SwiGLU, [4, 37, 8960], against f64", forward_swiglu),
        (
            "RMSNorm / RoPE / SwiGLU gradients against Burn's ops in f32 on the CPU",
            backward,
        ),
        ("LayerNorm, [3, 37, 1152], against f64", forward_layer_norm),
        ("tanh GELU, [4, 37, 4304], against f64", forward_gelu),
        (
            "LayerNorm / tanh GELU gradients against Burn's ops in f32 on the CPU",
            backward_layer_norm_gelu,
        ),
        (
            "flash backward from strided q/k/v/dO (heads split by a transpose) against dense copies, 12:2 heads x 300 x 128",
            flash_backward_strided,
        ),
    ];
    for (what, check) in checks {
        let worst = check(&device)?;
        println!("check fused {what}: {worst:.2e}");
        if worst > tolerance as f64 {
            bail!("gemm check failed: fused {what}: {worst:.2e} > {tolerance:.1e}");
        }
    }
    Ok(())
}

fn forward_rms_norm(device: &Device) -> Result<f64> {
    let d = 1536;
    let x = Tensor::<3>::random([3, 37, d], Distribution::Normal(0.5, 2.0), device);
    let gamma = Tensor::<1>::random([d], Distribution::Normal(1.0, 0.3), device);
    let want = rms_norm_f64(&host(x.clone()), &host(gamma.clone()), 1e-6);
    let got = rms_norm(x, gamma, 1e-6).ok_or_else(|| missing("RMSNorm", device))?;
    Ok(max_relative_error(&host(got), &want))
}

fn forward_layer_norm(device: &Device) -> Result<f64> {
    let d = 1152;
    let x = Tensor::<3>::random([3, 37, d], Distribution::Normal(3.0, 2.0), device);
    let gamma = Tensor::<1>::random([d], Distribution::Normal(1.0, 0.3), device);
    let beta = Tensor::<1>::random([d], Distribution::Normal(0.0, 0.5), device);
    let want = layer_norm_f64(
        &host(x.clone()),
        &host(gamma.clone()),
        &host(beta.clone()),
        1e-6,
    );
    let got = layer_norm(x, gamma, Some(beta), 1e-6).ok_or_else(|| missing("LayerNorm", device))?;
    Ok(max_relative_error(&host(got), &want))
}

fn forward_gelu(device: &Device) -> Result<f64> {
    let x = Tensor::<3>::random([4, 37, 4304], Distribution::Normal(0.0, 3.0), device);
    let want = gelu_tanh_f64(&host(x.clone()));
    let got = gelu_tanh(x).ok_or_else(|| missing("tanh GELU", device))?;
    Ok(max_relative_error(&host(got), &want))
}

fn forward_rope(device: &Device) -> Result<f64> {
    let [b, h, s, d] = [2, 12, 37, 128];
    let x =
        Tensor::<4>::random([b, s, h, d], Distribution::Normal(0.0, 1.0), device).swap_dims(1, 2);
    let cos = Tensor::<4>::random([b, 1, s, d], Distribution::Uniform(-1.0, 1.0), device);
    let sin = Tensor::<4>::random([b, 1, s, d], Distribution::Uniform(-1.0, 1.0), device);
    let want = rope_f64(
        &host(x.clone()),
        &host(cos.clone()),
        &host(sin.clone()),
        [b, h, s, d],
        b,
    );
    let got = rope(x, &cos, &sin).ok_or_else(|| missing("RoPE", device))?;
    Ok(max_relative_error(&host(got), &want))
}

fn forward_swiglu(device: &Device) -> Result<f64> {
    let gate = Tensor::<3>::random([4, 37, 8960], Distribution::Normal(0.0, 4.0), device);
    let up = Tensor::<3>::random([4, 37, 8960], Distribution::Normal(0.0, 1.0), device);
    let want = swiglu_f64(&host(gate.clone()), &host(up.clone()));
    let got = swiglu(gate, up).ok_or_else(|| missing("SwiGLU", device))?;
    Ok(max_relative_error(&host(got), &want))
}

/// The fused ops' backward on `device` (autodiff, its dtype) against the same formulas
/// in Burn's ops in f32 on the CPU over the same rounded inputs: every input's gradient
/// under a random upstream gradient; the largest `max|difference| / max|reference|`.
fn backward(device: &Device) -> Result<f64> {
    let device = device.clone().without_autodiff().autodiff();
    let cpu = Device::flex().autodiff();
    // The GPU leaf and an f32 CPU leaf with its (rounded) values.
    let pair = |t: Tensor<3>| {
        let cpu_t = Tensor::<3>::from_data(t.to_data().convert::<f32>(), &cpu).require_grad();
        (t.require_grad(), cpu_t)
    };
    let normal = |shape: [usize; 3], std: f64| {
        Tensor::<3>::random(shape, Distribution::Normal(0.0, std), &device)
    };
    let mut worst = 0.0f64;
    let mut compare = |got: Tensor<3>, want: Tensor<3>| {
        let want64: Vec<f64> = host(want).iter().map(|&x| x as f64).collect();
        worst = worst.max(max_relative_error(&host(got), &want64));
    };

    // RMSNorm: x and gamma (a [1, 1, d] leaf, as the kernel's [d] reshaped).
    let (x, x_cpu) = pair(normal([2, 37, 1536], 2.0));
    let (gamma, gamma_cpu) = pair(normal([1, 1, 1536], 0.3).add_scalar(1.0));
    let (w, w_cpu) = pair(normal([2, 37, 1536], 1.0));
    let y = rms_norm(x.clone(), gamma.clone().reshape([1536]), 1e-6)
        .ok_or_else(|| missing("RMSNorm", &device))?;
    let grads = (y * w.detach()).sum().backward();
    let rms = (x_cpu.clone().square().mean_dim(2) + 1e-6).sqrt();
    let y_cpu = x_cpu.clone() / rms * gamma_cpu.clone();
    let grads_cpu = (y_cpu * w_cpu.detach()).sum().backward();
    compare(x.grad(&grads).unwrap(), x_cpu.grad(&grads_cpu).unwrap());
    compare(
        gamma.grad(&grads).unwrap(),
        gamma_cpu.grad(&grads_cpu).unwrap(),
    );

    // SwiGLU.
    let (gate, gate_cpu) = pair(normal([2, 37, 8960], 4.0));
    let (up, up_cpu) = pair(normal([2, 37, 8960], 1.0));
    let (w, w_cpu) = pair(normal([2, 37, 8960], 1.0));
    let y = swiglu(gate.clone(), up.clone()).ok_or_else(|| missing("SwiGLU", &device))?;
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
    let table =
        |std: f64| Tensor::<4>::random([2, 1, 37, 128], Distribution::Normal(0.0, std), &device);
    let (cos, sin) = (table(0.7), table(0.7));
    let to_cpu = |t: &Tensor<4>| Tensor::<4>::from_data(t.to_data().convert::<f32>(), &cpu);
    let (cos_cpu, sin_cpu) = (to_cpu(&cos), to_cpu(&sin));
    let w = Tensor::<4>::random([2, 12, 37, 128], Distribution::Normal(0.0, 1.0), &device);
    let w_cpu = to_cpu(&w);
    let y = rope(view(base.clone()), &cos, &sin).ok_or_else(|| missing("RoPE", &device))?;
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

/// LayerNorm's (x, gamma, beta) and the tanh GELU's gradients on `device` (autodiff,
/// its dtype) against Burn's ops in f32 on the CPU over the same rounded inputs, as
/// [`backward`]; 74 LayerNorm rows (two full blocks of the backward's 32 and a part).
fn backward_layer_norm_gelu(device: &Device) -> Result<f64> {
    let device = device.clone().without_autodiff().autodiff();
    let cpu = Device::flex().autodiff();
    let pair = |t: Tensor<3>| {
        let cpu_t = Tensor::<3>::from_data(t.to_data().convert::<f32>(), &cpu).require_grad();
        (t.require_grad(), cpu_t)
    };
    let normal = |shape: [usize; 3], mean: f64, std: f64| {
        Tensor::<3>::random(shape, Distribution::Normal(mean, std), &device)
    };
    let mut worst = 0.0f64;
    let mut compare = |got: Tensor<3>, want: Tensor<3>| {
        let want64: Vec<f64> = host(want).iter().map(|&x| x as f64).collect();
        worst = worst.max(max_relative_error(&host(got), &want64));
    };

    let (d, eps) = (1152, 1e-6);
    let (x, x_cpu) = pair(normal([2, 37, d], 3.0, 2.0));
    let (gamma, gamma_cpu) = pair(normal([1, 1, d], 1.0, 0.3));
    let (beta, beta_cpu) = pair(normal([1, 1, d], 0.0, 0.5));
    let (w, w_cpu) = pair(normal([2, 37, d], 0.0, 1.0));
    let y = layer_norm(
        x.clone(),
        gamma.clone().reshape([d]),
        Some(beta.clone().reshape([d])),
        eps,
    )
    .ok_or_else(|| missing("LayerNorm", &device))?;
    let grads = (y * w.detach()).sum().backward();
    let mean = x_cpu.clone().mean_dim(2);
    let centred = x_cpu.clone() - mean;
    let var = centred.clone().square().mean_dim(2);
    let y_cpu = centred / (var + eps).sqrt() * gamma_cpu.clone() + beta_cpu.clone();
    let grads_cpu = (y_cpu * w_cpu.detach()).sum().backward();
    compare(x.grad(&grads).unwrap(), x_cpu.grad(&grads_cpu).unwrap());
    compare(
        gamma.grad(&grads).unwrap(),
        gamma_cpu.grad(&grads_cpu).unwrap(),
    );
    compare(
        beta.grad(&grads).unwrap(),
        beta_cpu.grad(&grads_cpu).unwrap(),
    );

    let (x, x_cpu) = pair(normal([2, 37, 4304], 0.0, 3.0));
    let (w, w_cpu) = pair(normal([2, 37, 4304], 0.0, 1.0));
    let y = gelu_tanh(x.clone()).ok_or_else(|| missing("tanh GELU", &device))?;
    let grads = (y * w.detach()).sum().backward();
    let grads_cpu = (gelu_approximate(x_cpu.clone()) * w_cpu.detach())
        .sum()
        .backward();
    compare(x.grad(&grads).unwrap(), x_cpu.grad(&grads_cpu).unwrap());
    Ok(worst)
}

/// The flash backward (from LSE and delta, as training calls it) on q, k, v and dO laid
/// out `[B, S, H, D]` and read as `[B, H, S, D]` views, against the same call on dense
/// copies (whose kernels `flash_bench`'s checks hold to the f64 reference). Not bit for
/// bit: the tensor-core dQ is summed with atomics in no fixed order.
fn flash_backward_strided(device: &Device) -> Result<f64> {
    use longview_kernels::FlashOptions;
    use longview_kernels::burn_op::{flash_attention, flash_attention_backward_delta};
    let (hq, hkv, s, d) = (12, 2, 300, 128);
    let split = |heads: usize| {
        Tensor::<4>::random([1, s, heads, d], Distribution::Normal(0.0, 1.0), device)
            .swap_dims(1, 2)
    };
    let (q, k, v, d_o) = (split(hq), split(hkv), split(hkv), split(hq));
    let dense = |t: &Tensor<4>| Tensor::<4>::from_data(t.to_data(), device);
    let opts = FlashOptions::new(d).causal(true);
    let (o, lse) = flash_attention(dense(&q), dense(&k), dense(&v), &opts)?;
    let delta = (dense(&d_o).cast(burn::tensor::DType::F32) * o.cast(burn::tensor::DType::F32))
        .sum_dim(3)
        .squeeze_dim(3);
    let grads =
        |q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, d_o: Tensor<4>| -> Result<Vec<Vec<f32>>> {
            let (dq, dk, dv) =
                flash_attention_backward_delta((q, k, v), lse.clone(), delta.clone(), d_o, &opts)?;
            Ok([dq, dk, dv].map(host).to_vec())
        };
    let strided = grads(q.clone(), k.clone(), v.clone(), d_o.clone())?;
    let want = grads(dense(&q), dense(&k), dense(&v), dense(&d_o))?;
    let mut worst = 0f64;
    for (got, want) in strided.iter().zip(&want) {
        if got.iter().any(|x| !x.is_finite()) {
            bail!("flash backward from strided inputs: a gradient is not finite");
        }
        let want: Vec<f64> = want.iter().map(|&x| x as f64).collect();
        worst = worst.max(max_relative_error(got, &want));
    }
    Ok(worst)
}
