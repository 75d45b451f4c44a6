//! longview patch: how new tensors lay out their rows. The published crate pads every
//! row of a new tensor to a multiple of up to 512 bytes ("pitched", as `cuMallocPitch`
//! does), so a `[n, 1152]` bf16 activation (2,304-byte rows) gets rows of 2,560 bytes
//! and is no longer contiguous. Every consumer that needs dense rows then copies it:
//! a reshape, a cuBLASLt GEMM, the fused kernels. On SigLIP's widths (1152, 4304)
//! that was two full copies before every linear layer of the vision tower (CubeCL
//! profile of the 1.5B step, benchmarks/gemm.md, 2026-12-06). Dense rows (what the
//! other runtimes use) are the default here; `CUBECL_CUDA_PITCHED_ROWS=1` restores the
//! published layout.

use cubecl_common::device::ServiceId;
use cubecl_environment::stream::StreamId;
use cubecl_server::{
    allocator::{ContiguousMemoryLayoutPolicy, PitchedMemoryLayoutPolicy},
    server::{Handle, MemoryLayout, MemoryLayoutDescriptor, MemoryLayoutPolicy},
};

/// Dense rows (the default) or the published crate's pitched rows.
pub(crate) enum RowLayoutPolicy {
    Dense(ContiguousMemoryLayoutPolicy),
    Pitched(PitchedMemoryLayoutPolicy),
}

impl RowLayoutPolicy {
    /// The policy `CUBECL_CUDA_PITCHED_ROWS` selects, for buffers aligned to `alignment`.
    pub(crate) fn from_env(alignment: usize) -> Self {
        if std::env::var("CUBECL_CUDA_PITCHED_ROWS").is_ok_and(|v| v == "1") {
            RowLayoutPolicy::Pitched(PitchedMemoryLayoutPolicy::new(alignment))
        } else {
            RowLayoutPolicy::Dense(ContiguousMemoryLayoutPolicy::new(alignment))
        }
    }
}

impl MemoryLayoutPolicy for RowLayoutPolicy {
    fn apply(
        &self,
        service: ServiceId,
        stream_id: StreamId,
        descriptors: &[MemoryLayoutDescriptor],
    ) -> (Handle, Vec<MemoryLayout>) {
        match self {
            RowLayoutPolicy::Dense(policy) => policy.apply(service, stream_id, descriptors),
            RowLayoutPolicy::Pitched(policy) => policy.apply(service, stream_id, descriptors),
        }
    }
}
