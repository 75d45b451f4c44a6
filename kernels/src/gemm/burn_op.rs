//! The cuBLASLt GEMM and linear layer as Burn ops (a backend extension on CubeCL, with
//! a hand-written autodiff backward, as `crate::burn_op` does for flash attention).

use std::collections::HashMap;
use std::sync::Mutex;

use burn::backend::autodiff::{
    Autodiff,
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
};
use burn::backend::ops::FloatTensorOps;
use burn::backend::{
    AutodiffBackend, Dispatch, DispatchDevice, TensorMetadata, backend_extension,
    tensor::FloatTensor,
};
use burn::tensor::{DType, Device, FloatDType, Shape, Tensor};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeBackend, CubeDevice};

use super::cublaslt::{self, GemmDtype, RowMajorGemm};

type CudaServer = <cubecl::cuda::CudaRuntime as cubecl_runtime::runtime::Runtime>::Server;

/// Which operands of `C = op(A) op(B)` are read transposed (both stored row-major).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Transposes {
    pub a: bool,
    pub b: bool,
}

/// How a linear layer's weight is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightLayout {
    /// `[in, out]`: Burn's `nn::Linear`.
    InOut,
    /// `[out, in]`: PyTorch's layout, and a tied LM head (the embedding table).
    OutIn,
}

#[backend_extension(Autodiff, Cube: cfg(feature = "cuda"))]
pub trait GemmBackend: burn::backend::Backend {
    /// `op(a) op(b)` of two 2-D tensors. Not differentiable.
    fn gemm(
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        transposes: Transposes,
    ) -> FloatTensor<Self>;

    /// `x op(weight)`: x `[M, K]`, weight `[K, N]` (`InOut`) or `[N, K]` (`OutIn`).
    /// Differentiable in both.
    fn gemm_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        layout: WeightLayout,
    ) -> FloatTensor<Self>;

    /// `x op(weight) + bias` (bias `[N]`, added by cuBLASLt's epilogue).
    /// Differentiable in all three.
    fn gemm_linear_bias(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        layout: WeightLayout,
    ) -> FloatTensor<Self>;
}

fn gemm_dtype(dtype: DType) -> Option<GemmDtype> {
    match dtype {
        DType::BF16 => Some(GemmDtype::Bf16),
        DType::F16 => Some(GemmDtype::F16),
        _ => None,
    }
}

/// `[rows, cols]` of a 2-D tensor.
fn dims(t: &CubeTensor) -> [usize; 2] {
    let shape = t.meta.shape();
    assert_eq!(shape.num_dims(), 2, "gemm: 2-D operands, got {shape:?}");
    [shape[0], shape[1]]
}

/// cuBLASLt on CUDA; Burn's matmul on other CubeCL runtimes and dtypes (the public
/// functions route those away before they get here, so this is a safety net).
fn cube_gemm(a: CubeTensor, b: CubeTensor, t: Transposes, bias: Option<CubeTensor>) -> CubeTensor {
    let ([ar, ac], [br, bc]) = (dims(&a), dims(&b));
    let (m, k) = if t.a { (ac, ar) } else { (ar, ac) };
    let (kb, n) = if t.b { (bc, br) } else { (br, bc) };
    assert_eq!(
        k, kb,
        "gemm: inner sizes differ ({ar}x{ac}, {br}x{bc}, {t:?})"
    );
    let (CubeDevice::Cuda(cuda), Some(dtype)) = (&a.device, gemm_dtype(a.dtype)) else {
        type Ops = CubeBackend;
        let a = if t.a {
            Ops::float_swap_dims(a, 0, 1)
        } else {
            a
        };
        let b = if t.b {
            Ops::float_swap_dims(b, 0, 1)
        } else {
            b
        };
        let c = Ops::float_matmul(a, b);
        return match bias {
            Some(bias) => Ops::float_add(c, Ops::float_reshape(bias, Shape::new([1, n]))),
            None => c,
        };
    };
    if k == 0 && m * n > 0 {
        // An empty inner dimension: the product is zero, plus the bias.
        let dtype: FloatDType = a.dtype.into();
        let zeros = CubeBackend::float_zeros(Shape::new([m, n]), &a.device, dtype);
        return match bias {
            Some(bias) => {
                CubeBackend::float_add(zeros, CubeBackend::float_reshape(bias, Shape::new([1, n])))
            }
            None => zeros,
        };
    }
    let index = cuda.index;
    let (a, b) = (into_contiguous(a), into_contiguous(b));
    let bias = bias.map(into_contiguous);
    let client = a.client.clone();
    let out = CubeTensor::new_contiguous(
        client.clone(),
        a.device.clone(),
        Shape::new([m, n]),
        client.empty((m * n * a.dtype.size()).max(1)),
        a.dtype,
    );
    if m * n == 0 {
        return out;
    }
    let resource = |t: &CubeTensor| {
        client
            .get_resource::<CudaServer>(t.handle.clone())
            .unwrap_or_else(|e| panic!("gemm: the CUDA buffer of an operand: {e:?}"))
    };
    // Held until the GEMM is queued: the allocations stay where the addresses point;
    // after that, stream order protects them (CubeCL reuses memory in stream order).
    let (ra, rb, rc) = (resource(&a), resource(&b), resource(&out));
    let rbias = bias.as_ref().map(resource);
    let gemm = RowMajorGemm {
        dtype,
        m,
        n,
        k,
        a: ra.resource().ptr,
        a_transposed: t.a,
        b: rb.resource().ptr,
        b_transposed: t.b,
        c: rc.resource().ptr,
        bias: rbias.as_ref().map(|r| r.resource().ptr),
    };
    let stream = rc.resource().stream;
    assert!(
        !stream.is_null(),
        "gemm: cubecl-cuda gave no stream (is the patched crate in use?)"
    );
    // SAFETY: the buffers hold the shapes above (dense, checked contiguous) on device
    // `index`, and `stream` is CubeCL's current stream of that device.
    unsafe { cublaslt::run(index, stream, &gemm) }.unwrap_or_else(|e| panic!("gemm: {e}"));
    drop((ra, rb, rc, rbias));
    out
}

impl GemmBackend for CubeBackend {
    fn gemm(a: CubeTensor, b: CubeTensor, transposes: Transposes) -> CubeTensor {
        cube_gemm(a, b, transposes, None)
    }

    fn gemm_linear(x: CubeTensor, weight: CubeTensor, layout: WeightLayout) -> CubeTensor {
        cube_gemm(x, weight, layout.transposes(), None)
    }

    fn gemm_linear_bias(
        x: CubeTensor,
        weight: CubeTensor,
        bias: CubeTensor,
        layout: WeightLayout,
    ) -> CubeTensor {
        cube_gemm(x, weight, layout.transposes(), Some(bias))
    }
}

impl WeightLayout {
    /// The transposes of `x op(weight)`.
    fn transposes(self) -> Transposes {
        Transposes {
            a: false,
            b: self == WeightLayout::OutIn,
        }
    }
}

/// dX, dW (in the weight's own layout) and the bias gradient of `y = x op(W) + b`.
fn linear_grads<B: GemmBackend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    layout: WeightLayout,
    dy: FloatTensor<B>,
    [want_x, want_w, want_b]: [bool; 3],
) -> [Option<FloatTensor<B>>; 3] {
    let out_in = layout == WeightLayout::OutIn;
    let dx = want_x.then(|| {
        B::gemm(
            dy.clone(),
            weight,
            Transposes {
                a: false,
                b: !out_in,
            },
        )
    });
    let dw = want_w.then(|| {
        let t = Transposes { a: true, b: false };
        if out_in {
            B::gemm(dy.clone(), x, t)
        } else {
            B::gemm(x, dy.clone(), t)
        }
    });
    let db = want_b.then(|| {
        // The column sums of dY as the GEMM `1^T dY` (f32 accumulation). Burn's
        // reduction did this before: in the profile of a 32k-token step a reduction
        // kernel called once per LLM layer took ~28 ms a call, most likely this sum for
        // the q projection. Checked on the GPU by `longview gemm --check` (db of every
        // case against Burn's f32 linear on the CPU); not yet run there.
        let [m, n] = [dy.shape()[0], dy.shape()[1]];
        let ones = B::float_ones(Shape::new([1, m]), &dy.device(), dy.dtype().into());
        let sums = B::gemm(ones, dy, Transposes::default());
        B::float_reshape(sums, Shape::new([n]))
    });
    [dx, dw, db]
}

impl<B: GemmBackend, C: CheckpointStrategy> GemmBackend for Autodiff<B, C> {
    fn gemm(
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        transposes: Transposes,
    ) -> FloatTensor<Self> {
        <Self as AutodiffBackend>::from_inner(B::gemm(
            a.into_primitive(),
            b.into_primitive(),
            transposes,
        ))
    }

    fn gemm_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        layout: WeightLayout,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct LinearNoBias;

        impl<B: GemmBackend> Backward<B, 2> for LinearNoBias {
            type State = (FloatTensor<B>, FloatTensor<B>, WeightLayout);

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let dy = grads.consume::<B>(&ops.node);
                let (x, w, layout) = ops.state;
                let [px, pw] = ops.parents;
                let [dx, dw, _] =
                    linear_grads::<B>(x, w, layout, dy, [px.is_some(), pw.is_some(), false]);
                for (node, grad) in [(px, dx), (pw, dw)] {
                    if let (Some(node), Some(grad)) = (node, grad) {
                        grads.register::<B>(node.id, grad);
                    }
                }
            }
        }

        // compute_bound: the output is kept, the GEMM never runs twice for autodiff.
        match LinearNoBias
            .prepare::<C>([x.node(), weight.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (x, w) = (x.into_primitive(), weight.into_primitive());
                let y = B::gemm_linear(x.clone(), w.clone(), layout);
                prep.finish((x, w, layout), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::gemm_linear(
                x.into_primitive(),
                weight.into_primitive(),
                layout,
            )),
        }
    }

    fn gemm_linear_bias(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        layout: WeightLayout,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct LinearBias;

        impl<B: GemmBackend> Backward<B, 3> for LinearBias {
            type State = (FloatTensor<B>, FloatTensor<B>, WeightLayout);

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let dy = grads.consume::<B>(&ops.node);
                let (x, w, layout) = ops.state;
                let want = ops.parents.each_ref().map(Option::is_some);
                let got = linear_grads::<B>(x, w, layout, dy, want);
                for (node, grad) in ops.parents.into_iter().zip(got) {
                    if let (Some(node), Some(grad)) = (node, grad) {
                        grads.register::<B>(node.id, grad);
                    }
                }
            }
        }

        match LinearBias
            .prepare::<C>([x.node(), weight.node(), bias.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (x, w) = (x.into_primitive(), weight.into_primitive());
                let y = B::gemm_linear_bias(x.clone(), w.clone(), bias.into_primitive(), layout);
                prep.finish((x, w, layout), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::gemm_linear_bias(
                x.into_primitive(),
                weight.into_primitive(),
                bias.into_primitive(),
                layout,
            )),
        }
    }
}

/// Whether [`linear`] and [`matmul_2d`] run cuBLASLt for `dtype` tensors on `device`:
/// a CUDA device, bf16 or f16, `LONGVIEW_GEMM` not `burn` (or `off`), and cuBLASLt loaded (the
/// first failure to load is printed once, then Burn's matmul is used).
pub fn applies(device: &Device, dtype: DType) -> bool {
    static PROBED: Mutex<Option<HashMap<usize, bool>>> = Mutex::new(None);
    // Read once: every linear layer of every step asks.
    static BURN_ONLY: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let burn_only = *BURN_ONLY.get_or_init(|| match std::env::var("LONGVIEW_GEMM") {
        Ok(v) if v.trim() == "burn" => true,
        Ok(v) if v.trim() == "cublaslt" => false,
        // Otherwise a switch of cuBLASLt: `off` / `0` is Burn's matmul.
        _ => !crate::env_switch::switch("LONGVIEW_GEMM", true),
    });
    if gemm_dtype(dtype).is_none() || burn_only {
        return false;
    }
    let plain = device.clone().without_autodiff();
    let DispatchDevice::Cube(CubeDevice::Cuda(cuda)) = plain.as_dispatch() else {
        return false;
    };
    let index = cuda.index;
    let mut probed = PROBED.lock().unwrap_or_else(|e| e.into_inner());
    *probed
        .get_or_insert_with(HashMap::new)
        .entry(index)
        .or_insert_with(|| match cublaslt::probe(index) {
            Ok(()) => true,
            Err(e) => {
                eprintln!("warning: {e}; linear layers on cuda:{index} use Burn's matmul");
                false
            }
        })
}

/// `x op(weight) + bias` over the last dimension of x (any leading dimensions):
/// weight `[in, out]` (`InOut`) or `[out, in]` (`OutIn`), bias `[out]`. cuBLASLt where
/// [`applies`] says so, Burn's ops otherwise; differentiable either way.
pub fn linear<const D: usize>(
    x: Tensor<D>,
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
    layout: WeightLayout,
) -> Tensor<D> {
    let dims = x.dims();
    let k = dims[D - 1];
    let [r, c] = weight.dims();
    let (wk, n) = match layout {
        WeightLayout::InOut => (r, c),
        WeightLayout::OutIn => (c, r),
    };
    assert_eq!(
        k, wk,
        "linear: input width {k} but weight {r}x{c} ({layout:?})"
    );
    if !applies(&x.device(), x.dtype()) || weight.dtype() != x.dtype() {
        let w = match layout {
            WeightLayout::InOut => weight,
            WeightLayout::OutIn => weight.transpose(),
        };
        return burn::tensor::module::linear(x, w, bias);
    }
    let rows = dims[..D - 1].iter().product::<usize>();
    let dtype = x.dtype();
    let x = x.reshape([rows, k]).into_dispatch();
    let y = match bias {
        Some(b) => <Dispatch as GemmBackend>::gemm_linear_bias(
            x,
            weight.into_dispatch(),
            b.cast(dtype).into_dispatch(),
            layout,
        ),
        None => <Dispatch as GemmBackend>::gemm_linear(x, weight.into_dispatch(), layout),
    };
    let mut out = dims;
    out[D - 1] = n;
    Tensor::<2>::from_dispatch(y).reshape(out)
}

/// `op(a) op(b)` of 2-D tensors, not differentiable (tests and benchmarks): cuBLASLt
/// where [`applies`] says so, Burn's matmul otherwise.
pub fn matmul_2d(a: Tensor<2>, b: Tensor<2>, transposes: Transposes) -> Tensor<2> {
    if !applies(&a.device(), a.dtype()) || b.dtype() != a.dtype() {
        let a = if transposes.a { a.transpose() } else { a };
        let b = if transposes.b { b.transpose() } else { b };
        return a.matmul(b);
    }
    Tensor::from_dispatch(<Dispatch as GemmBackend>::gemm(
        a.into_dispatch(),
        b.into_dispatch(),
        transposes,
    ))
}
