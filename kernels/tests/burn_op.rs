//! The Burn autodiff op on a wgpu device (lavapipe in CI) against the same attention
//! written with plain Burn tensor ops (repeat kv heads, matmul, mask, softmax) on the
//! same device: O, LSE and the gradients of q, k, v.

use burn::tensor::{Device, DeviceKind, Distribution, Tensor, TensorData};
use longview_kernels::FlashOptions;
use longview_kernels::burn_op::{flash_attention, flash_attention_backward_delta, supported};

fn device() -> Device {
    Device::wgpu(DeviceKind::DefaultDevice).autodiff()
}

fn values(t: Tensor<4>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}

fn assert_close(name: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{name}");
    let scale = want.iter().fold(1.0f32, |m, x| m.max(x.abs()));
    let worst = got
        .iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs() / scale)
        .fold(0.0f32, f32::max);
    assert!(
        worst <= tol,
        "{name}: relative error {worst:.2e} > {tol:.0e}"
    );
}

/// Attention from plain tensor ops: returns (O, LSE).
fn reference(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    opts: &FlashOptions,
) -> (Tensor<4>, Tensor<3>) {
    let [b, hq, sq, d] = q.dims();
    let [_, hkv, sk, _] = k.dims();
    let g = hq / hkv;
    // With one query head per kv head the repeat is skipped: on the wgpu backend the
    // gradient through `unsqueeze_dim(2).repeat_dim(2, 1).reshape(..)` followed by
    // `swap_dims` + `matmul` came out wrong (dK off by 13-57% here), while this
    // reference without the no-op repeat and the f64 checks of tests/flash.rs agree
    // with the kernels to 1e-7.
    let repeat = |t: Tensor<4>| {
        if g == 1 {
            t
        } else {
            t.unsqueeze_dim::<5>(2)
                .repeat_dim(2, g)
                .reshape([b, hq, sk, d])
        }
    };
    let scores = q.matmul(repeat(k).swap_dims(2, 3)) * opts.scale;
    let mut bias = vec![0f32; sq * sk];
    for i in 0..sq {
        for j in 0..sk {
            if opts.causal && opts.k_offset + j > opts.q_offset + i {
                bias[i * sk + j] = -1e30;
            }
        }
    }
    let bias = Tensor::<2>::from_data(TensorData::new(bias, [sq, sk]), &scores.device())
        .reshape([1, 1, sq, sk]);
    let scores = scores + bias;
    let max = scores.clone().max_dim(3);
    let exp = (scores - max.clone()).exp();
    let sum = exp.clone().sum_dim(3);
    let lse = (max + sum.clone().log()).reshape([b, hq, sq]);
    let o = (exp / sum).matmul(repeat(v));
    (o, lse)
}

#[test]
fn burn_op_matches_plain_tensor_attention_forward_and_backward() {
    let device = device();
    assert!(supported(&device));
    for (hq, hkv, sq, sk, d, causal, q_offset) in [
        (4, 2, 37, 53, 64, false, 0),
        (4, 1, 40, 40, 72, true, 0),
        (2, 2, 30, 50, 128, true, 25),
        (2, 2, 30, 50, 64, false, 0),
    ] {
        let opts = FlashOptions::new(d).causal(causal).offsets(q_offset, 0);
        let leaf = |shape: [usize; 4]| {
            Tensor::<4>::random(shape, Distribution::Uniform(-1.0, 1.0), &device).require_grad()
        };
        let q = leaf([2, hq, sq, d]);
        let k = leaf([2, hkv, sk, d]);
        let v = leaf([2, hkv, sk, d]);
        let w = Tensor::<4>::random([2, hq, sq, d], Distribution::Uniform(-1.0, 1.0), &device);
        let (o, lse) = flash_attention(q.clone(), k.clone(), v.clone(), &opts).unwrap();
        let (o_ref, lse_ref) = reference(q.clone(), k.clone(), v.clone(), &opts);
        let label =
            format!("Hq {hq} Hkv {hkv} Sq {sq} Sk {sk} D {d} causal {causal} offset {q_offset}");
        assert_close(
            &format!("O {label}"),
            &values(o.clone()),
            &values(o_ref.clone()),
            2e-5,
        );
        assert_close(
            &format!("LSE {label}"),
            &lse.clone().into_data().try_to_vec::<f32>().unwrap(),
            &lse_ref.into_data().try_to_vec::<f32>().unwrap(),
            2e-5,
        );
        // The ring's entry point: gradients from (LSE, delta = rowsum(dO * O)).
        let [b, _, _, _] = o.dims();
        let inner = |t: &Tensor<4>| t.clone().detach();
        let delta = (o.clone().detach() * w.clone())
            .sum_dim(3)
            .reshape([b, hq, sq]);
        let from_delta = flash_attention_backward_delta(
            (inner(&q), inner(&k), inner(&v)),
            lse.clone(),
            delta,
            w.clone(),
            &opts,
        )
        .unwrap();
        let grads = (o * w.clone()).sum().backward();
        let grads_ref = (o_ref * w).sum().backward();
        let from_delta = [from_delta.0, from_delta.1, from_delta.2];
        for ((name, t), via_delta) in [("dQ", &q), ("dK", &k), ("dV", &v)].iter().zip(from_delta) {
            let want = values(t.grad(&grads_ref).unwrap());
            assert_close(
                &format!("{name} {label}"),
                &values(t.grad(&grads).unwrap()),
                &want,
                5e-5,
            );
            assert_close(
                &format!("{name} from delta {label}"),
                &values(via_delta),
                &want,
                5e-5,
            );
        }
    }
}

#[test]
fn burn_op_refuses_what_it_cannot_do() {
    let flex = Device::flex();
    let t = Tensor::<4>::zeros([1, 2, 4, 8], &flex);
    let err = flash_attention(t.clone(), t.clone(), t, &FlashOptions::new(8)).unwrap_err();
    assert!(err.to_string().contains("needs a CubeCL device"), "{err}");
    let device = device();
    let q = Tensor::<4>::zeros([1, 3, 4, 8], &device);
    let kv = Tensor::<4>::zeros([1, 2, 4, 8], &device);
    let err = flash_attention(q, kv.clone(), kv, &FlashOptions::new(8)).unwrap_err();
    assert!(err.to_string().contains("Hkv dividing Hq"), "{err}");
}

/// The forward reads strided inputs where they are: heads split by a transpose (q)
/// and the filled part of larger buffers (k, v, as a KV cache holds them). The
/// result equals the same call on contiguous copies bit for bit, and the plain-ops
/// reference within the tolerance above; so do the backward's gradients.
#[test]
fn burn_op_reads_strided_views_as_they_are() {
    let device = Device::wgpu(DeviceKind::DefaultDevice);
    let (b, hq, hkv, sq, sk, capacity, d) = (1, 4, 2, 3, 45, 64, 64);
    let random =
        |shape: [usize; 4]| Tensor::<4>::random(shape, Distribution::Uniform(-1.0, 1.0), &device);
    let q = random([b, sq, hq, d]).swap_dims(1, 2);
    let k = random([b, hkv, capacity, d]).narrow(2, 0, sk);
    let v = random([b, hkv, capacity, d]).narrow(2, 0, sk);
    // Causal with the queries at the end, as a decoding step continues its cache.
    let opts = FlashOptions::new(d).causal(true).offsets(sk - sq, 0);
    let dense = |t: &Tensor<4>| Tensor::<4>::from_data(t.to_data(), &device);
    let (o, lse) = flash_attention(q.clone(), k.clone(), v.clone(), &opts).unwrap();
    let (o_dense, lse_dense) = flash_attention(dense(&q), dense(&k), dense(&v), &opts).unwrap();
    assert_eq!(values(o.clone()), values(o_dense));
    assert_eq!(
        lse.into_data().try_to_vec::<f32>().unwrap(),
        lse_dense.clone().into_data().try_to_vec::<f32>().unwrap()
    );
    let (o_ref, _) = reference(q.clone(), k.clone(), v.clone(), &opts);
    assert_close("O strided", &values(o.clone()), &values(o_ref), 2e-5);
    // The backward from (LSE, delta) reads q, k, v and dO as strided too (dO split by a
    // transpose, as the model's gradient arrives), with the same bits as on dense copies.
    let d_o = random([b, sq, hq, d]).swap_dims(1, 2);
    let delta = (d_o.clone() * o).sum_dim(3).squeeze_dim(3);
    let grads = |q: &Tensor<4>, k: &Tensor<4>, v: &Tensor<4>, d_o: &Tensor<4>| {
        let (dq, dk, dv) = flash_attention_backward_delta(
            (q.clone(), k.clone(), v.clone()),
            lse_dense.clone(),
            delta.clone(),
            d_o.clone(),
            &opts,
        )
        .unwrap();
        [dq, dk, dv].map(values)
    };
    let strided = grads(&q, &k, &v, &d_o);
    let dense_grads = grads(&dense(&q), &dense(&k), &dense(&v), &dense(&d_o));
    for (name, (got, want)) in ["dQ", "dK", "dV"]
        .iter()
        .zip(strided.iter().zip(&dense_grads))
    {
        assert!(
            got.iter().all(|x| x.is_finite()),
            "{name} strided: not finite"
        );
        assert_eq!(got, want, "{name} from strided inputs");
    }
}

/// An f64 reference as the f32 values `assert_close` compares.
fn f32s(values: Vec<f64>) -> Vec<f32> {
    values.into_iter().map(|x| x as f32).collect()
}

/// The fused RMSNorm (one launch) against the f64 host formula on wgpu: rows of 37
/// (fewer than the cube's units) and 1,536 (the 1.5B's width) elements, more rows
/// than one grid row holds, a transposed (non-contiguous) input; refused (`None`) off
/// CubeCL devices.
#[test]
fn fused_rms_norm_matches_the_f64_formula() {
    use longview_kernels::fused::rms_norm;
    use longview_kernels::reference::rms_norm_f64;
    let device = Device::wgpu(DeviceKind::DefaultDevice);
    let eps = 1e-6;
    let host = |t: Tensor<3>| t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
    for [a, b, d] in [[3, 5, 37], [2, 4, 1536], [70_000, 1, 8]] {
        let x = Tensor::<3>::random([a, b, d], Distribution::Normal(0.5, 2.0), &device);
        let gamma = Tensor::<1>::random([d], Distribution::Normal(1.0, 0.3), &device);
        let want = f32s(rms_norm_f64(
            &host(x.clone()),
            &gamma.clone().into_data().try_to_vec::<f32>().unwrap(),
            eps,
        ));
        let got = host(rms_norm(x, gamma, eps).expect("wgpu f32 without autodiff"));
        // f32 sums of squares over up to 1,536 values.
        assert_close(&format!("rms_norm [{a}, {b}, {d}]"), &got, &want, 2e-6);
    }
    // A transposed view is read in its logical order.
    let x = Tensor::<3>::random([4, 6, 16], Distribution::Normal(0.0, 1.0), &device);
    let gamma = Tensor::<1>::random([6], Distribution::Normal(1.0, 0.3), &device);
    let view = x.swap_dims(1, 2);
    let want = f32s(rms_norm_f64(
        &host(view.clone()),
        &gamma.clone().into_data().try_to_vec::<f32>().unwrap(),
        eps,
    ));
    let got = host(rms_norm(view, gamma.clone(), eps).unwrap());
    assert_close("rms_norm of a transposed view", &got, &want, 2e-6);
    // Refused off CubeCL devices.
    let cpu = Tensor::<3>::ones([1, 2, 6], &Device::flex());
    assert!(rms_norm(cpu, Tensor::<1>::ones([6], &Device::flex()), eps).is_none());
}

/// The fused rotary embedding against the rotate-half formula on the host (f64):
/// contiguous input with a table per batch row, a `[B, S, H, D]` projection viewed as
/// `[B, H, S, D]` (strided, as the model's q and k are) with one table row for the
/// batch; refused for an odd head dim.
#[test]
fn fused_rope_matches_the_rotate_half_formula() {
    use longview_kernels::fused::rope;
    use longview_kernels::reference::rope_f64;
    let device = Device::wgpu(DeviceKind::DefaultDevice);
    let host = |t: Tensor<4>| t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
    for (batch_tables, strided) in [(true, false), (false, true)] {
        let [b, h, s, d] = [2, 3, 5, 8];
        let x = if strided {
            Tensor::<4>::random([b, s, h, d], Distribution::Normal(0.0, 1.0), &device)
                .swap_dims(1, 2)
        } else {
            Tensor::<4>::random([b, h, s, d], Distribution::Normal(0.0, 1.0), &device)
        };
        let tb = if batch_tables { b } else { 1 };
        let cos = Tensor::<4>::random([tb, 1, s, d], Distribution::Uniform(-1.0, 1.0), &device);
        let sin = Tensor::<4>::random([tb, 1, s, d], Distribution::Uniform(-1.0, 1.0), &device);
        let want = f32s(rope_f64(
            &host(x.clone()),
            &host(cos.clone()),
            &host(sin.clone()),
            [b, h, s, d],
            tb,
        ));
        let got = host(rope(x, &cos, &sin).expect("wgpu f32 without autodiff"));
        assert_close(
            &format!("rope (tables per row {batch_tables}, strided {strided})"),
            &got,
            &want,
            1e-6,
        );
    }
    let odd = Tensor::<4>::ones([1, 1, 2, 7], &device);
    let table = Tensor::<4>::ones([1, 1, 2, 7], &device);
    assert!(rope(odd, &table, &table).is_none());
}

/// The fused SwiGLU (`silu(gate) * up`) against the formula in f64 on the host, over
/// more elements than one grid row of cubes; refused for mismatched shapes.
#[test]
fn fused_swiglu_matches_the_formula() {
    use longview_kernels::fused::swiglu;
    use longview_kernels::reference::swiglu_f64;
    let device = Device::wgpu(DeviceKind::DefaultDevice);
    let host = |t: Tensor<3>| t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
    for shape in [[2, 3, 37], [1, 70_000, 300]] {
        let gate = Tensor::<3>::random(shape, Distribution::Normal(0.0, 4.0), &device);
        let up = Tensor::<3>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        let want = f32s(swiglu_f64(&host(gate.clone()), &host(up.clone())));
        let got = host(swiglu(gate, up).expect("wgpu f32 without autodiff"));
        assert_close(&format!("swiglu {shape:?}"), &got, &want, 1e-6);
    }
    let a = Tensor::<3>::ones([1, 2, 3], &device);
    assert!(swiglu(a.clone(), Tensor::<3>::ones([1, 3, 2], &device)).is_none());
}

/// The fused ops' backward on a wgpu autodiff device against autodiff of the same
/// formulas written in Burn's tensor ops (f32), each on its own copy of the inputs:
/// the gradients of every input under a random upstream gradient, and the forward
/// values.
#[test]
fn fused_ops_backward_matches_burn_autodiff() {
    use burn::tensor::activation::silu;
    use longview_kernels::fused::{rms_norm, rope, swiglu};
    let device = Device::wgpu(DeviceKind::DefaultDevice).autodiff();
    fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
    }
    // Two independent leaves holding the same values.
    fn twins<const D: usize>(t: Tensor<D>) -> (Tensor<D>, Tensor<D>) {
        (t.clone().detach().require_grad(), t.detach().require_grad())
    }
    let normal3 = |shape: [usize; 3], mean: f64, std: f64| {
        Tensor::<3>::random(shape, Distribution::Normal(mean, std), &device)
    };

    // RMSNorm: x and gamma.
    let (shape, d, eps) = ([3, 5, 300], 300, 1e-6);
    let (x_a, x_b) = twins(normal3(shape, 0.5, 2.0));
    let (g_a, g_b) = twins(Tensor::<1>::random(
        [d],
        Distribution::Normal(1.0, 0.3),
        &device,
    ));
    let w = normal3(shape, 0.0, 1.0);
    let fused = rms_norm(x_a.clone(), g_a.clone(), eps).expect("wgpu");
    let grads = (fused.clone() * w.clone()).sum().backward();
    let (dx, dg) = (x_a.grad(&grads).unwrap(), g_a.grad(&grads).unwrap());
    let rms = (x_b.clone().square().mean_dim(2) + eps).sqrt();
    let want = x_b.clone() / rms * g_b.clone().unsqueeze::<3>();
    let grads = (want.clone() * w).sum().backward();
    assert_close("rms_norm forward", &host(fused), &host(want), 2e-6);
    assert_close(
        "rms_norm dx",
        &host(dx),
        &host(x_b.grad(&grads).unwrap()),
        1e-5,
    );
    assert_close(
        "rms_norm dgamma",
        &host(dg),
        &host(g_b.grad(&grads).unwrap()),
        1e-5,
    );

    // RoPE: x (strided, as the model's q and k), the tables constant.
    let [b, h, s, hd] = [2, 3, 5, 8];
    let (base_a, base_b) = twins(Tensor::<4>::random(
        [b, s, h, hd],
        Distribution::Normal(0.0, 1.0),
        &device,
    ));
    let cos = Tensor::<4>::random([b, 1, s, hd], Distribution::Uniform(-1.0, 1.0), &device);
    let sin = Tensor::<4>::random([b, 1, s, hd], Distribution::Uniform(-1.0, 1.0), &device);
    let w = Tensor::<4>::random([b, h, s, hd], Distribution::Normal(0.0, 1.0), &device);
    let fused = rope(base_a.clone().swap_dims(1, 2), &cos, &sin).expect("wgpu");
    let grads = (fused.clone() * w.clone()).sum().backward();
    let got = base_a.grad(&grads).unwrap();
    let x = base_b.clone().swap_dims(1, 2);
    let swapped = Tensor::cat(
        vec![
            x.clone().narrow(3, hd / 2, hd / 2),
            x.clone().narrow(3, 0, hd / 2),
        ],
        3,
    );
    let want = x * cos + swapped * sin;
    let grads = (want.clone() * w).sum().backward();
    assert_close("rope forward", &host(fused), &host(want), 1e-6);
    assert_close(
        "rope dx",
        &host(got),
        &host(base_b.grad(&grads).unwrap()),
        1e-6,
    );

    // SwiGLU: gate and up.
    let shape = [2, 7, 301];
    let (gate_a, gate_b) = twins(normal3(shape, 0.0, 4.0));
    let (up_a, up_b) = twins(normal3(shape, 0.0, 1.0));
    let w = normal3(shape, 0.0, 1.0);
    let fused = swiglu(gate_a.clone(), up_a.clone()).expect("wgpu");
    let grads = (fused.clone() * w.clone()).sum().backward();
    let (d_gate, d_up) = (gate_a.grad(&grads).unwrap(), up_a.grad(&grads).unwrap());
    let want = silu(gate_b.clone()) * up_b.clone();
    let grads = (want.clone() * w).sum().backward();
    assert_close("swiglu forward", &host(fused), &host(want), 1e-6);
    assert_close(
        "swiglu d_gate",
        &host(d_gate),
        &host(gate_b.grad(&grads).unwrap()),
        1e-5,
    );
    assert_close(
        "swiglu d_up",
        &host(d_up),
        &host(up_b.grad(&grads).unwrap()),
        1e-5,
    );
}

/// The fused AdamW update (one launch) against Burn's `AdamW` optimizer on the same wgpu
/// device, three steps from no moments, a learning rate that changes between steps: the
/// new parameter and both moments within 1e-6 of the largest reference value (both f32;
/// they differ only in how the compiler contracts the products). A 37 x 29 tensor (not a
/// multiple of any vector width) without weight decay and an 8 x 128 one with it;
/// refused (`None`) off CubeCL devices and for bf16.
#[test]
fn fused_adamw_matches_burns_adamw() {
    use burn::optim::{AdamWConfig, Optimizer};
    use longview_kernels::fused::{AdamWStep, adamw_step};
    let device = Device::wgpu(DeviceKind::DefaultDevice);
    let host = |t: Tensor<2>| t.into_data().try_to_vec::<f32>().unwrap();
    let (beta_1, beta_2, epsilon) = (0.9f32, 0.95f32, 1e-8f32);
    for (dims, weight_decay) in [([37usize, 29usize], 0.0f32), ([8, 128], 0.1)] {
        let burn_adamw = AdamWConfig::new()
            .with_beta_1(beta_1)
            .with_beta_2(beta_2)
            .with_epsilon(epsilon)
            .with_weight_decay(weight_decay)
            .build();
        let start = Tensor::<2>::random(dims, Distribution::Normal(0.0, 0.5), &device);
        let (mut want_param, mut state) = (start.clone(), None);
        let (mut param, mut moments) = (start, None);
        for time in 1..=3usize {
            let grad = Tensor::<2>::random(dims, Distribution::Normal(0.0, 1e-2), &device);
            let lr = 1e-3 * time as f64;
            let (p, s) = burn_adamw.step(lr, want_param, grad.clone(), state);
            (want_param, state) = (p, s);
            let step = AdamWStep {
                lr,
                beta_1,
                beta_2,
                epsilon,
                weight_decay,
                time,
            };
            let (p, m, v) = adamw_step(param, grad, moments.take(), step).expect("wgpu f32");
            let want = &state.as_ref().expect("AdamW keeps state").momentum;
            let label = |what: &str| format!("{what} {dims:?} decay {weight_decay} step {time}");
            assert_close(
                &label("param"),
                &host(p.clone()),
                &host(want_param.clone()),
                1e-6,
            );
            assert_close(
                &label("m"),
                &host(m.clone()),
                &host(want.moment_1.clone()),
                1e-6,
            );
            assert_close(
                &label("v"),
                &host(v.clone()),
                &host(want.moment_2.clone()),
                1e-6,
            );
            (param, moments) = (p, Some((m, v)));
        }
    }
    let step = AdamWStep {
        lr: 1e-3,
        beta_1,
        beta_2,
        epsilon,
        weight_decay: 0.0,
        time: 1,
    };
    let cpu = Tensor::<2>::ones([2, 3], &Device::flex());
    assert!(adamw_step(cpu.clone(), cpu, None, step).is_none());
    let half = Tensor::<2>::ones([2, 3], &device).cast(burn::tensor::DType::BF16);
    assert!(adamw_step(half.clone(), half, None, step).is_none());
}
