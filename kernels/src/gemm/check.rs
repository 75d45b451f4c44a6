//! Correctness checks of the cuBLASLt linear layer against Burn's f32 linear on a
//! reference device (the CPU backend: an independent implementation), shared by the
//! ignored GPU test (`kernels/tests/gemm.rs`) and `longview gemm --check` (the
//! packaged binary the GPU machine runs).
//!
//! Each case draws bf16/f16 inputs, runs [`linear`] forward and backward (loss
//! `sum(y * g)` with a random `g`, so dY = g), and the same layer in f32 with Burn's
//! `linear` on copies of the same (rounded) inputs on the reference device (an
//! autodiff device: `Device::flex().autodiff()`). Tolerance: every element of y,
//! dX, dW and db within `tolerance x max|reference|` of the reference (bf16 keeps 8
//! mantissa bits: one rounding of the output is 2^-9 relative; the f32 accumulations
//! differ in order only).

use burn::tensor::{DType, Device, Distribution, Tensor};

use super::{WeightLayout, applies, linear};

/// One linear-layer case: `rows x input -> output`.
#[derive(Debug, Clone, Copy)]
pub struct Case {
    pub rows: usize,
    pub input: usize,
    pub output: usize,
    pub bias: bool,
    pub layout: WeightLayout,
    /// Feed x as a transposed view (a strided tensor) rather than a dense one.
    pub strided_input: bool,
}

/// Non-square shapes, odd sizes, both weight layouts, with and without bias, dense and
/// strided inputs.
pub fn cases() -> Vec<Case> {
    let c = |rows, input, output, bias, layout, strided_input| Case {
        rows,
        input,
        output,
        bias,
        layout,
        strided_input,
    };
    use WeightLayout::{InOut, OutIn};
    vec![
        c(256, 128, 64, false, InOut, false),
        c(333, 97, 211, true, InOut, false),
        c(1000, 1536, 256, true, InOut, false),
        c(517, 1152, 4304, true, InOut, true),
        c(64, 1536, 7001, false, OutIn, false),
        c(3, 5, 7, true, OutIn, true),
        c(1, 1536, 8960, false, InOut, false),
        c(2048, 8960, 1536, false, InOut, false),
    ]
}

/// The largest `max|got - want| / max|want|` over y, dX, dW (and db) of `case`.
pub fn run_case(
    case: &Case,
    dtype: DType,
    device: &Device,
    reference: &Device,
) -> Result<f32, String> {
    if !applies(device, dtype) {
        return Err(format!(
            "cuBLASLt GEMMs do not apply to {dtype:?} on {device:?} (CUDA, bf16/f16, LONGVIEW_GEMM unset)"
        ));
    }
    let Case {
        rows,
        input,
        output,
        bias,
        layout,
        strided_input,
    } = *case;
    let draw = |shape: [usize; 2]| {
        Tensor::<2>::random(shape, Distribution::Normal(0.0, 1.0), device).cast(dtype)
    };
    let x = if strided_input {
        draw([input, rows]).transpose()
    } else {
        draw([rows, input])
    };
    let w = match layout {
        WeightLayout::InOut => draw([input, output]),
        WeightLayout::OutIn => draw([output, input]),
    };
    let b = bias.then(|| draw([1, output]).reshape([output]));
    let g = draw([rows, output]);

    let grads_of =
        |x: Tensor<2>, w: Tensor<2>, b: Option<Tensor<1>>, g: Tensor<2>, f32_reference: bool| {
            let (x, w) = (x.require_grad(), w.require_grad());
            let b = b.map(|b| b.require_grad());
            let y = if f32_reference {
                let w = match layout {
                    WeightLayout::InOut => w.clone(),
                    WeightLayout::OutIn => w.clone().transpose(),
                };
                burn::tensor::module::linear(x.clone(), w, b.clone())
            } else {
                linear(x.clone(), w.clone(), b.clone(), layout)
            };
            let loss = (y.clone() * g.cast(y.dtype())).cast(DType::F32).sum();
            let grads = loss.backward();
            let mut out = vec![
                y.inner(),
                x.grad(&grads).expect("dX"),
                w.grad(&grads).expect("dW"),
            ];
            if let Some(b) = b {
                out.push(b.grad(&grads).expect("db").unsqueeze::<2>());
            }
            out.into_iter()
                .map(|t| t.cast(DType::F32))
                .collect::<Vec<_>>()
        };
    let got = grads_of(x.clone(), w.clone(), b.clone(), g.clone(), false);
    let copy = |t: Tensor<2>| {
        Tensor::<2>::from_data(t.cast(DType::F32).into_data().convert::<f32>(), reference)
    };
    let b = b.map(|b| copy(b.unsqueeze::<2>()).reshape([output]));
    let want = grads_of(copy(x), copy(w), b, copy(g), true);
    let mut worst = 0f32;
    for (name, (got, want)) in ["y", "dX", "dW", "db"]
        .iter()
        .zip(got.into_iter().zip(want))
    {
        if got.dims() != want.dims() {
            return Err(format!(
                "{name}: shape {:?}, reference {:?}",
                got.dims(),
                want.dims()
            ));
        }
        let got = Tensor::<2>::from_data(got.into_data(), &want.device());
        let scale = want.clone().abs().max().into_scalar::<f32>().max(1e-6);
        let diff = (got - want).abs().max().into_scalar::<f32>();
        let relative = diff / scale;
        if !relative.is_finite() {
            return Err(format!("{name}: non-finite difference ({diff} of {scale})"));
        }
        worst = worst.max(relative);
    }
    Ok(worst)
}

/// Runs every case; `Err` lists the cases past `tolerance`.
pub fn run_all(
    dtype: DType,
    device: &Device,
    reference: &Device,
    tolerance: f32,
) -> Result<Vec<(Case, f32)>, String> {
    let mut results = Vec::new();
    let mut failures = Vec::new();
    for case in cases() {
        let worst = run_case(&case, dtype, device, reference)?;
        if worst > tolerance {
            failures.push(format!("{case:?}: {worst:.2e} > {tolerance:.1e}"));
        }
        results.push((case, worst));
    }
    if failures.is_empty() {
        Ok(results)
    } else {
        Err(failures.join("; "))
    }
}
