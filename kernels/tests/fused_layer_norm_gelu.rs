//! The fused LayerNorm and tanh GELU (SigLIP's) on a wgpu device (lavapipe in CI):
//! forward against the f64 formulas of `longview_kernels::reference`, backward against
//! autodiff of `burn::nn::LayerNorm` and Burn's `gelu_approximate` in f32.

use burn::nn::LayerNormConfig;
use burn::tensor::activation::gelu_approximate;
use burn::tensor::{Device, DeviceKind, Distribution, Tensor, TensorData};
use longview_kernels::fused::{LAYER_NORM_MAX_WIDTH, gelu_tanh, layer_norm};
use longview_kernels::reference::{gelu_tanh_f64, layer_norm_f64, max_relative_error};

fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

fn f64s(values: Vec<f32>) -> Vec<f64> {
    values.into_iter().map(f64::from).collect()
}

fn assert_within(name: &str, got: Vec<f32>, want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{name}: lengths");
    assert!(
        got.iter().all(|v| v.is_finite()),
        "{name}: a non-finite value"
    );
    let worst = max_relative_error(&got, want);
    assert!(
        worst <= tol,
        "{name}: relative error {worst:.2e} > {tol:.0e}"
    );
}

/// Rows of 37 (fewer than a cube's units), 1,152 (SigLIP's width) and 8 values, more
/// rows than one grid row of cubes holds, inputs far from zero mean (the variance
/// takes two passes), and a transposed view read in its logical order.
#[test]
fn fused_layer_norm_matches_the_f64_formula() {
    let device = Device::wgpu(DeviceKind::DefaultDevice);
    let eps = 1e-6;
    for [a, b, d] in [[3, 5, 37], [2, 4, 1152], [70_000, 1, 8]] {
        let x = Tensor::<3>::random([a, b, d], Distribution::Normal(20.0, 2.0), &device);
        let gamma = Tensor::<1>::random([d], Distribution::Normal(1.0, 0.3), &device);
        let beta = Tensor::<1>::random([d], Distribution::Normal(0.0, 0.5), &device);
        let want = layer_norm_f64(
            &host(x.clone()),
            &host(gamma.clone()),
            &host(beta.clone()),
            eps,
        );
        let got = layer_norm(x, gamma, Some(beta), eps).expect("wgpu f32 without autodiff");
        // A row's f32 sums over up to 1,152 values about a mean of 20.
        assert_within(
            &format!("layer_norm [{a}, {b}, {d}]"),
            host(got),
            &want,
            1e-5,
        );
    }
    let x = Tensor::<3>::random([4, 6, 16], Distribution::Normal(0.0, 1.0), &device);
    let gamma = Tensor::<1>::random([6], Distribution::Normal(1.0, 0.3), &device);
    let beta = Tensor::<1>::random([6], Distribution::Normal(0.0, 0.5), &device);
    let view = x.swap_dims(1, 2);
    let want = layer_norm_f64(
        &host(view.clone()),
        &host(gamma.clone()),
        &host(beta.clone()),
        eps,
    );
    let got = layer_norm(view, gamma.clone(), Some(beta.clone()), eps).unwrap();
    assert_within("layer_norm of a transposed view", host(got), &want, 1e-5);
    // Refused: no beta, rows past the widest the backward keeps, off CubeCL devices.
    let x = Tensor::<3>::ones([1, 2, 6], &device);
    assert!(layer_norm(x, gamma, None, eps).is_none());
    let wide = LAYER_NORM_MAX_WIDTH + 1;
    let ones = |n: usize| Tensor::<1>::ones([n], &device);
    let x = Tensor::<2>::ones([2, wide], &device);
    assert!(layer_norm(x, ones(wide), Some(ones(wide)), eps).is_none());
    let cpu = Device::flex();
    let x = Tensor::<2>::ones([2, 6], &cpu);
    let (g, b) = (Tensor::<1>::ones([6], &cpu), Tensor::<1>::zeros([6], &cpu));
    assert!(layer_norm(x, g, Some(b), eps).is_none());
}

/// Over more elements than one grid row of cubes, read 2 and 4 values at a time, and
/// from a view whose start is not aligned to 4 values; values out to +-40, where `tanh`
/// saturates (a form through `exp` must give +-1 there, not NaN).
#[test]
fn fused_gelu_tanh_matches_the_f64_formula() {
    let device = Device::wgpu(DeviceKind::DefaultDevice);
    for shape in [[2, 3, 37], [1, 70_000, 300]] {
        let x = Tensor::<3>::random(shape, Distribution::Normal(0.0, 3.0), &device);
        let want = gelu_tanh_f64(&host(x.clone()));
        let got = gelu_tanh(x).expect("wgpu f32 without autodiff");
        assert_within(&format!("gelu_tanh {shape:?}"), host(got), &want, 1e-6);
    }
    // A view starting 37 values into its buffer (148 bytes: the kernel cannot read it
    // four values at a time from there).
    let whole = Tensor::<2>::random([3, 37], Distribution::Normal(0.0, 3.0), &device);
    let view = whole.narrow(0, 1, 2);
    let want = gelu_tanh_f64(&host(view.clone()));
    assert_within(
        "gelu_tanh of an offset view",
        host(gelu_tanh(view).unwrap()),
        &want,
        1e-6,
    );
    let edges = [-40.0f32, -12.0, -1e-4, 0.0, 1e-4, 12.0, 40.0];
    let x = Tensor::<1>::from_data(TensorData::new(edges.to_vec(), [edges.len()]), &device);
    let got = host(gelu_tanh(x).unwrap());
    assert_within("gelu_tanh at the edges", got, &gelu_tanh_f64(&edges), 1e-6);
}

/// Gradients on a wgpu autodiff device against autodiff of Burn's own LayerNorm module
/// and `gelu_approximate` (f32, same device, own copy of the inputs), under a random
/// upstream gradient: LayerNorm's x, gamma and beta over 65 rows (two full blocks of
/// the backward's 32 rows and a partial one), GELU's x.
#[test]
fn fused_layer_norm_and_gelu_backward_match_burn_autodiff() {
    let device = Device::wgpu(DeviceKind::DefaultDevice).autodiff();
    let twins = |t: Tensor<3>| (t.clone().detach().require_grad(), t.detach().require_grad());
    let normal = |shape: [usize; 3], mean: f64, std: f64| {
        Tensor::<3>::random(shape, Distribution::Normal(mean, std), &device)
    };
    let compare = |name: &str, got: Tensor<1>, want: Tensor<1>, tol: f64| {
        assert_within(name, host(got), &f64s(host(want)), tol);
    };

    let (shape, d, eps) = ([5, 13, 300], 300, 1e-5);
    let (x_a, x_b) = twins(normal(shape, 3.0, 2.0));
    let mut module = LayerNormConfig::new(d).with_epsilon(eps).init(&device);
    module.gamma = module
        .gamma
        .map(|_| Tensor::<1>::random([d], Distribution::Normal(1.0, 0.3), &device).require_grad());
    let beta = module.beta.take().unwrap();
    module.beta =
        Some(beta.map(|_| {
            Tensor::<1>::random([d], Distribution::Normal(0.0, 0.5), &device).require_grad()
        }));
    let (gamma, beta) = (module.gamma.val(), module.beta.as_ref().unwrap().val());
    let (g_a, _) = twins(gamma.clone().unsqueeze::<3>());
    let (b_a, _) = twins(beta.clone().unsqueeze::<3>());
    let w = normal(shape, 0.0, 1.0);
    let fused = layer_norm(
        x_a.clone(),
        g_a.clone().reshape([d]),
        Some(b_a.clone().reshape([d])),
        eps,
    )
    .expect("wgpu");
    let grads = (fused.clone() * w.clone()).sum().backward();
    let want = module.forward(x_b.clone());
    let grads_b = (want.clone() * w).sum().backward();
    let flat = |t: Tensor<3>| t.flatten::<1>(0, 2);
    compare("layer_norm forward", flat(fused), flat(want), 1e-5);
    compare(
        "layer_norm dx",
        flat(x_a.grad(&grads).unwrap()),
        flat(x_b.grad(&grads_b).unwrap()),
        1e-5,
    );
    compare(
        "layer_norm dgamma",
        flat(g_a.grad(&grads).unwrap()),
        module.gamma.val().grad(&grads_b).unwrap(),
        1e-5,
    );
    compare(
        "layer_norm dbeta",
        flat(b_a.grad(&grads).unwrap()),
        module.beta.as_ref().unwrap().val().grad(&grads_b).unwrap(),
        1e-5,
    );

    let shape = [2, 7, 301];
    let (x_a, x_b) = twins(normal(shape, 0.0, 3.0));
    let w = normal(shape, 0.0, 1.0);
    let fused = gelu_tanh(x_a.clone()).expect("wgpu");
    let grads = (fused.clone() * w.clone()).sum().backward();
    let want = gelu_approximate(x_b.clone());
    let grads_b = (want.clone() * w).sum().backward();
    compare("gelu_tanh forward", flat(fused), flat(want), 1e-5);
    compare(
        "gelu_tanh dx",
        flat(x_a.grad(&grads).unwrap()),
        flat(x_b.grad(&grads_b).unwrap()),
        1e-5,
    );
}
