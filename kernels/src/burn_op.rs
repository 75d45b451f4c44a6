//! Flash attention as a Burn autodiff op: one call gives O (tracked: its backward runs
//! the flash backward kernels from the stored LSE, never materialising the score
//! matrix) and LSE (for callers that merge partial results, e.g. ring attention).
//!
//! Burn 0.22's `#[backend_extension]` routes the call to the CubeCL backend (any
//! cubecl runtime: CUDA, wgpu) or, on an autodiff device, to the hand-written
//! `Autodiff<B, C>` implementation below, which records the backward step.

use burn::backend::autodiff::{
    Autodiff,
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
};
use burn::backend::{
    AutodiffBackend, Dispatch, DispatchDevice, backend_extension, tensor::FloatTensor,
};
use burn::tensor::{DType, Shape, Tensor};
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;

use crate::flash::{self, AttnError, DeviceTensor, FlashOptions};

#[backend_extension(Autodiff, Cube: cfg(any(feature = "wgpu", feature = "cuda")))]
pub trait FlashAttentionBackend: burn::backend::Backend {
    /// `(O, LSE)`; shapes already checked by [`flash_attention`].
    fn flash_attention_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: FlashMask,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// `(dQ, dK, dV)`.
    fn flash_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        o: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        d_o: FloatTensor<Self>,
        mask: FlashMask,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// `(dQ, dK, dV)` from the final output's LSE and `delta = rowsum(dO * O)` (ring
    /// attention: one key block of many). Not differentiable.
    fn flash_attention_backward_delta(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        delta: FloatTensor<Self>,
        d_o: FloatTensor<Self>,
        mask: FlashMask,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// `t` as the forward kernels read it: as it is when its strides already suit the
/// tensor-core loads (unit stride along head_dim, the others multiples of 8, a 16-byte
/// aligned start), e.g. the filled part of a KV cache's buffers or heads split by a
/// transpose; otherwise a contiguous copy. The decoding step then reads the cache in
/// place instead of copying all of it.
fn readable(t: CubeTensor) -> CubeTensor {
    let strides = t.meta.strides();
    let start = t.handle.offset_start.unwrap_or(0);
    let strided_ok = !t.meta.is_tiled()
        && strides.len() == 4
        && strides[3] == 1
        && strides[..3].iter().all(|s| s.is_multiple_of(8))
        && start.is_multiple_of(16);
    if strided_ok { t } else { into_contiguous(t) }
}

pub(crate) fn view(t: &CubeTensor) -> DeviceTensor {
    DeviceTensor {
        handle: t.handle.clone(),
        shape: t.meta.shape().to_vec(),
        strides: t.meta.strides().to_vec(),
    }
}

fn wrap(like: &CubeTensor, t: DeviceTensor, dtype: DType) -> CubeTensor {
    CubeTensor::new_contiguous(
        like.client.clone(),
        like.device.clone(),
        Shape::from(t.shape),
        t.handle,
        dtype,
    )
}

/// The mask and scale arguments of the flash kernels, passed as one value through
/// the backend extension (the tensors travel separately).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FlashMask {
    pub scale: f32,
    pub causal: bool,
    /// Global positions of the first query and key rows (ring steps, KV caches).
    pub q_offset: usize,
    pub k_offset: usize,
}

impl FlashMask {
    /// The mask of `options` (packed sequences do not go through the Burn op).
    pub fn of(options: &FlashOptions) -> Self {
        FlashMask {
            scale: options.scale,
            causal: options.causal,
            q_offset: options.q_offset,
            k_offset: options.k_offset,
        }
    }

    fn options(self) -> FlashOptions {
        FlashOptions {
            scale: self.scale,
            causal: self.causal,
            q_offset: self.q_offset,
            k_offset: self.k_offset,
            cu_seqlens: None,
            decode: crate::flash::DecodeTuning::from_env(),
        }
    }
}

const CHECKED: &str = "flash attention inputs are checked before the op runs";

impl FlashAttentionBackend for CubeBackend {
    fn flash_attention_backward_delta(
        q: CubeTensor,
        k: CubeTensor,
        v: CubeTensor,
        lse: CubeTensor,
        delta: CubeTensor,
        d_o: CubeTensor,
        mask: FlashMask,
    ) -> (CubeTensor, CubeTensor, CubeTensor) {
        // q, k, v and dO are read where they are, as the forward reads its inputs (the
        // model's are heads split by a transpose); LSE and delta come dense.
        let [q, k, v, d_o] = [q, k, v, d_o].map(readable);
        let [lse, delta] = [lse, delta].map(into_contiguous);
        let client = q.client.clone();
        let opts = mask.options();
        let a = [&q, &k, &v, &lse, &delta, &d_o].map(view);
        let (dq, dk, dv) = match q.dtype {
            DType::F32 => flash::flash_backward_from_delta::<f32>(
                &client,
                &a[0],
                &a[1],
                &a[2],
                &a[3],
                &a[4],
                &a[5],
                &opts,
                flash::FlashKernel::Auto,
            ),
            DType::F16 => flash::flash_backward_from_delta::<half::f16>(
                &client,
                &a[0],
                &a[1],
                &a[2],
                &a[3],
                &a[4],
                &a[5],
                &opts,
                flash::FlashKernel::Auto,
            ),
            DType::BF16 => flash::flash_backward_from_delta::<half::bf16>(
                &client,
                &a[0],
                &a[1],
                &a[2],
                &a[3],
                &a[4],
                &a[5],
                &opts,
                flash::FlashKernel::Auto,
            ),
            other => panic!("flash attention: unsupported dtype {other:?}"),
        }
        .expect(CHECKED);
        (
            wrap(&q, dq, q.dtype),
            wrap(&k, dk, k.dtype),
            wrap(&v, dv, v.dtype),
        )
    }

    fn flash_attention_forward(
        q: CubeTensor,
        k: CubeTensor,
        v: CubeTensor,
        mask: FlashMask,
    ) -> (CubeTensor, CubeTensor) {
        let (q, k, v) = (readable(q), readable(k), readable(v));
        let client = q.client.clone();
        let opts = mask.options();
        let (o, lse) = match q.dtype {
            DType::F32 => {
                flash::flash_forward::<f32>(&client, &view(&q), &view(&k), &view(&v), &opts)
            }
            DType::F16 => {
                flash::flash_forward::<half::f16>(&client, &view(&q), &view(&k), &view(&v), &opts)
            }
            DType::BF16 => {
                flash::flash_forward::<half::bf16>(&client, &view(&q), &view(&k), &view(&v), &opts)
            }
            other => panic!("flash attention: unsupported dtype {other:?}"),
        }
        .expect(CHECKED);
        (wrap(&q, o, q.dtype), wrap(&q, lse, DType::F32))
    }

    fn flash_attention_backward(
        q: CubeTensor,
        k: CubeTensor,
        v: CubeTensor,
        o: CubeTensor,
        lse: CubeTensor,
        d_o: CubeTensor,
        mask: FlashMask,
    ) -> (CubeTensor, CubeTensor, CubeTensor) {
        let [q, k, v, o, d_o] = [q, k, v, o, d_o].map(readable);
        let lse = into_contiguous(lse);
        let client = q.client.clone();
        let opts = mask.options();
        let args = (
            view(&q),
            view(&k),
            view(&v),
            view(&o),
            view(&lse),
            view(&d_o),
        );
        let (dq, dk, dv) = match q.dtype {
            DType::F32 => flash::flash_backward::<f32>(
                &client, &args.0, &args.1, &args.2, &args.3, &args.4, &args.5, &opts,
            ),
            DType::F16 => flash::flash_backward::<half::f16>(
                &client, &args.0, &args.1, &args.2, &args.3, &args.4, &args.5, &opts,
            ),
            DType::BF16 => flash::flash_backward::<half::bf16>(
                &client, &args.0, &args.1, &args.2, &args.3, &args.4, &args.5, &opts,
            ),
            other => panic!("flash attention: unsupported dtype {other:?}"),
        }
        .expect(CHECKED);
        (
            wrap(&q, dq, q.dtype),
            wrap(&k, dk, k.dtype),
            wrap(&v, dv, v.dtype),
        )
    }
}

impl<B: FlashAttentionBackend, C: CheckpointStrategy> FlashAttentionBackend for Autodiff<B, C> {
    fn flash_attention_backward_delta(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        delta: FloatTensor<Self>,
        d_o: FloatTensor<Self>,
        mask: FlashMask,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (dq, dk, dv) = B::flash_attention_backward_delta(
            q.into_primitive(),
            k.into_primitive(),
            v.into_primitive(),
            lse.into_primitive(),
            delta.into_primitive(),
            d_o.into_primitive(),
            mask,
        );
        (
            Self::from_inner(dq),
            Self::from_inner(dk),
            Self::from_inner(dv),
        )
    }

    fn flash_attention_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: FlashMask,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        #[derive(Debug)]
        struct FlashBackward;

        impl<B: FlashAttentionBackend> Backward<B, 3> for FlashBackward {
            /// q, k, v, o, lse and the options: the backward never reruns the forward.
            type State = (
                FloatTensor<B>,
                FloatTensor<B>,
                FloatTensor<B>,
                FloatTensor<B>,
                FloatTensor<B>,
                FlashMask,
            );

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let [node_q, node_k, node_v] = ops.parents;
                let d_o = grads.consume::<B>(&ops.node);
                let (q, k, v, o, lse, mask) = ops.state;
                let (dq, dk, dv) = B::flash_attention_backward(q, k, v, o, lse, d_o, mask);
                if let Some(node) = node_q {
                    grads.register::<B>(node.id, dq);
                }
                if let Some(node) = node_k {
                    grads.register::<B>(node.id, dk);
                }
                if let Some(node) = node_v {
                    grads.register::<B>(node.id, dv);
                }
            }
        }

        // compute_bound: keep O and LSE, never recompute the attention forward.
        match FlashBackward
            .prepare::<C>([q.node(), k.node(), v.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (q, k, v) = (q.into_primitive(), k.into_primitive(), v.into_primitive());
                let (o, lse) = B::flash_attention_forward(q.clone(), k.clone(), v.clone(), mask);
                let state = (q, k, v, o.clone(), lse.clone(), mask);
                (
                    prep.finish(state, o),
                    <Self as AutodiffBackend>::from_inner(lse),
                )
            }
            OpsKind::UnTracked(prep) => {
                let (o, lse) = B::flash_attention_forward(
                    q.into_primitive(),
                    k.into_primitive(),
                    v.into_primitive(),
                    mask,
                );
                (prep.finish(o), <Self as AutodiffBackend>::from_inner(lse))
            }
        }
    }

    fn flash_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        o: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        d_o: FloatTensor<Self>,
        mask: FlashMask,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (dq, dk, dv) = B::flash_attention_backward(
            q.into_primitive(),
            k.into_primitive(),
            v.into_primitive(),
            o.into_primitive(),
            lse.into_primitive(),
            d_o.into_primitive(),
            mask,
        );
        (
            Self::from_inner(dq),
            Self::from_inner(dk),
            Self::from_inner(dv),
        )
    }
}

/// Whether `device` runs CubeCL kernels (CUDA, wgpu), i.e. whether
/// [`flash_attention`] can run there.
pub fn supported(device: &burn::tensor::Device) -> bool {
    matches!(
        device.clone().without_autodiff().as_dispatch(),
        DispatchDevice::Cube(_)
    )
}

/// Flash attention on Burn tensors: q `[B, Hq, Sq, D]`, k/v `[B, Hkv, Sk, D]`.
/// Returns O `[B, Hq, Sq, D]` (differentiable in q, k, v) and LSE `[B, Hq, Sq]` (f32,
/// not differentiable). Packed sequences are not available through this op yet.
pub fn flash_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    options: &FlashOptions,
) -> Result<(Tensor<4>, Tensor<3>), AttnError> {
    if !supported(&q.device()) {
        return Err(AttnError::Options(format!(
            "flash attention needs a CubeCL device (cuda, wgpu), not {:?}",
            q.device()
        )));
    }
    if options.cu_seqlens.is_some() {
        return Err(AttnError::Options(
            "packed sequences are not available through the Burn op yet".into(),
        ));
    }
    let [b, hq, sq, d] = q.dims();
    let [bk, hkv, sk, dk] = k.dims();
    if v.dims() != [bk, hkv, sk, dk] || bk != b || dk != d || hkv == 0 || hq % hkv != 0 {
        return Err(AttnError::Shape(format!(
            "q {:?}, k {:?}, v {:?}: need q [B, Hq, Sq, D], k = v [B, Hkv, Sk, D] with Hkv dividing Hq",
            q.dims(),
            k.dims(),
            v.dims()
        )));
    }
    if d == 0 || d > flash::MAX_HEAD_DIM || sq == 0 || sk == 0 {
        return Err(AttnError::Shape(format!(
            "head_dim {d} (1 to {}) and non-empty sequences (Sq {sq}, Sk {sk}) required",
            flash::MAX_HEAD_DIM
        )));
    }
    if !options.scale.is_finite() || options.scale <= 0.0 {
        return Err(AttnError::Options(format!(
            "scale {} must be positive",
            options.scale
        )));
    }
    let (o, lse) = <Dispatch as FlashAttentionBackend>::flash_attention_forward(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        FlashMask::of(options),
    );
    Ok((Tensor::from_dispatch(o), Tensor::from_dispatch(lse)))
}

/// The backward of one key block from the FINAL output's LSE and
/// `delta = rowsum(dO * O)` (f32 `[B, Hq, Sq]` each): `(dQ, dK, dV)` in the dtype of q.
/// Not differentiable. Rows whose LSE is below `-1e38` (including `-inf`) contribute
/// nothing. Shapes are checked as by [`flash_attention`].
pub fn flash_attention_backward_delta(
    (q, k, v): (Tensor<4>, Tensor<4>, Tensor<4>),
    lse: Tensor<3>,
    delta: Tensor<3>,
    d_o: Tensor<4>,
    options: &FlashOptions,
) -> Result<(Tensor<4>, Tensor<4>, Tensor<4>), AttnError> {
    if !supported(&q.device()) || options.cu_seqlens.is_some() {
        return Err(AttnError::Options(format!(
            "flash attention backward needs a CubeCL device and no packed sequences ({:?})",
            q.device()
        )));
    }
    let [b, hq, sq, d] = q.dims();
    let [bk, hkv, sk, dk] = k.dims();
    let rows = [b, hq, sq];
    if v.dims() != [bk, hkv, sk, dk]
        || bk != b
        || dk != d
        || hkv == 0
        || hq % hkv != 0
        || d_o.dims() != q.dims()
        || lse.dims() != rows
        || delta.dims() != rows
        || d == 0
        || d > flash::MAX_HEAD_DIM
        || sq == 0
        || sk == 0
    {
        return Err(AttnError::Shape(format!(
            "q {:?}, k {:?}, v {:?}, dO {:?}, lse {:?}, delta {:?}",
            q.dims(),
            k.dims(),
            v.dims(),
            d_o.dims(),
            lse.dims(),
            delta.dims()
        )));
    }
    let dtype = q.dtype();
    let (dq, dk, dv) = <Dispatch as FlashAttentionBackend>::flash_attention_backward_delta(
        q.into_dispatch(),
        k.cast(dtype).into_dispatch(),
        v.cast(dtype).into_dispatch(),
        lse.cast(DType::F32).into_dispatch(),
        delta.cast(DType::F32).into_dispatch(),
        d_o.cast(dtype).into_dispatch(),
        FlashMask::of(options),
    );
    Ok((
        Tensor::from_dispatch(dq),
        Tensor::from_dispatch(dk),
        Tensor::from_dispatch(dv),
    ))
}
