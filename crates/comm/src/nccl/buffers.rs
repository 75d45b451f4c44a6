//! Tensors handed to NCCL: made contiguous, pinned in place with their device address
//! (cubecl's binding held while NCCL uses the buffer), and turned back into Burn
//! tensors of the same kind afterwards.

use burn::backend::{BackendTensor, Cube, DispatchKindConversion, DispatchTensor};
use burn::tensor::kind::Basic;
use burn::tensor::{DType, Shape, Tensor};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use cudarc::nccl::sys;

use super::NcclComm;
use crate::Result;

type CudaServer = <cubecl::cuda::CudaRuntime as cubecl_runtime::runtime::Runtime>::Server;

pub(super) fn nccl_type(dtype: DType) -> Option<sys::ncclDataType_t> {
    use sys::ncclDataType_t::*;
    Some(match dtype {
        DType::F32 => ncclFloat32,
        DType::F16 => ncclFloat16,
        DType::BF16 => ncclBfloat16,
        DType::F64 => ncclFloat64,
        DType::I32 => ncclInt32,
        DType::I64 => ncclInt64,
        DType::U32 => ncclUint32,
        DType::U64 => ncclUint64,
        DType::I8 => ncclInt8,
        DType::U8 => ncclUint8,
        other if other.size() == 1 => ncclUint8,
        other if other.size() == 4 => ncclUint32,
        _ => return None,
    })
}

/// Which tensor kind a CubeCL primitive came from, to rebuild the same kind.
#[derive(Clone, Copy)]
pub(super) enum Kind {
    Float,
    Int,
    Bool,
}

/// A contiguous tensor pinned in place with its device address.
pub(super) struct Pinned {
    pub(super) tensor: CubeTensor,
    pub(super) kind: Kind,
    /// cubecl's binding of the buffer: while held, the allocation stays where `ptr`
    /// points.
    _binding: Box<dyn std::any::Any + Send>,
    ptr: u64,
}

impl Pinned {
    pub(super) fn ptr(&self) -> u64 {
        self.ptr
    }

    pub(super) fn count(&self) -> usize {
        self.tensor.meta.shape().num_elements()
    }
}

impl NcclComm {
    pub(super) fn pin<const D: usize, K: Basic>(
        &self,
        op: &str,
        tensor: Tensor<D, K>,
    ) -> Result<Pinned> {
        let dispatch: DispatchTensor = tensor.into_dispatch();
        let (tensor, kind) =
            match <DispatchTensor as DispatchKindConversion<Cube>>::try_into_backend(dispatch) {
                Ok(BackendTensor::Float(t)) => (t, Kind::Float),
                Ok(BackendTensor::Int(t)) => (t, Kind::Int),
                Ok(BackendTensor::Bool(t)) => (t, Kind::Bool),
                Ok(_) => return Err(self.fail(op, "quantized tensors are not supported")),
                Err(e) => {
                    return Err(self.fail(
                        op,
                        format!(
                            "NCCL needs CUDA tensors without autodiff tracking (.inner()): {e}"
                        ),
                    ));
                }
            };
        if nccl_type(tensor.dtype).is_none() {
            return Err(self.fail(op, format!("dtype {:?} has no NCCL type", tensor.dtype)));
        }
        let tensor = into_contiguous(tensor);
        self.pinned(op, tensor, kind)
    }

    /// A new contiguous buffer like `like` with `shape`, pinned.
    pub(super) fn alloc(&self, op: &str, like: &Pinned, shape: &[usize]) -> Result<Pinned> {
        let bytes = shape.iter().product::<usize>() * like.tensor.dtype.size();
        let client = like.tensor.client.clone();
        let handle = client.empty(bytes.max(1));
        let tensor = CubeTensor::new_contiguous(
            client,
            like.tensor.device.clone(),
            Shape::from(shape.to_vec()),
            handle,
            like.tensor.dtype,
        );
        self.pinned(op, tensor, like.kind)
    }

    fn pinned(&self, op: &str, tensor: CubeTensor, kind: Kind) -> Result<Pinned> {
        let resource = tensor
            .client
            .get_resource::<CudaServer>(tensor.handle.clone())
            .map_err(|e| self.fail(op, format!("{e:?}")))?;
        // The address includes the handle's offset into its memory page.
        let ptr = resource.resource().ptr;
        Ok(Pinned {
            tensor,
            kind,
            _binding: Box::new(resource),
            ptr,
        })
    }

    /// Waits for cubecl's work on this thread (the inputs) before NCCL reads them.
    pub(super) fn sync_inputs(&self, op: &str, pinned: &Pinned) -> Result<()> {
        cubecl::future::block_on(pinned.tensor.client.sync())
            .map_err(|e| self.fail(op, format!("{e:?}")))
    }
}

pub(super) fn unpin<const D: usize, K: Basic>(pinned: Pinned) -> Tensor<D, K> {
    let Pinned { tensor, kind, .. } = pinned;
    let backend = match kind {
        Kind::Float => BackendTensor::Float(tensor),
        Kind::Int => BackendTensor::Int(tensor),
        Kind::Bool => BackendTensor::Bool(tensor),
    };
    Tensor::from_dispatch(<DispatchTensor as DispatchKindConversion<Cube>>::from_backend(backend))
}
