//! The NCCL communicator handle: created by `ncclCommInitRank` (bounded by the
//! watchdog's timeout), destroyed on drop unless it was aborted.

use std::sync::Arc;
use std::time::Duration;

use cudarc::driver::CudaContext;
use cudarc::nccl::{result as nccl, sys};

/// `ncclComm_t` is a handle NCCL allows any thread to use (not concurrently: the
/// communicator is used from its owner's thread only).
pub(super) struct RawComm {
    pub(super) handle: sys::ncclComm_t,
    /// Aborted after a stall or an asynchronous error: not usable, not destroyed.
    pub(super) aborted: bool,
}
unsafe impl Send for RawComm {}

impl Drop for RawComm {
    fn drop(&mut self) {
        if self.aborted {
            return;
        }
        // SAFETY: the handle came from ncclCommInitRank and is destroyed once.
        unsafe {
            let _ = nccl::comm_destroy(self.handle);
        }
    }
}

/// [`init_rank`] bounded by `timeout`: `ncclCommInitRank` waits for every rank with no
/// deadline of its own, so a peer that dies after the rendezvous would block this one
/// for ever. It runs on a helper thread (with this rank's CUDA context bound); past
/// the timeout the error names the call and this rank, and the process exits with it
/// (the launcher then stops the others; the helper thread is left blocked).
pub(super) fn init_rank_within(
    context: &Arc<CudaContext>,
    id_bytes: Vec<u8>,
    rank: usize,
    world: usize,
    timeout: Duration,
) -> std::result::Result<RawComm, String> {
    let context = context.clone();
    crate::deadline::within(timeout, move || {
        context
            .bind_to_thread()
            .map_err(|e| format!("binding the CUDA context for NCCL init: {e:?}"))?;
        init_rank(&id_bytes, rank, world)
    })
    .unwrap_or_else(|| {
        Err(format!(
            "ncclCommInitRank (rank {rank} of {world}) did not finish within {timeout:?}: a rank \
             died or never called it after the rendezvous (LONGVIEW_NCCL_TIMEOUT_S sets the limit)"
        ))
    })
}

fn init_rank(id_bytes: &[u8], rank: usize, world: usize) -> std::result::Result<RawComm, String> {
    if id_bytes.len() != 128 {
        return Err(format!(
            "NCCL unique id has {} bytes, expected 128",
            id_bytes.len()
        ));
    }
    let mut id = sys::ncclUniqueId { internal: [0; 128] };
    for (dst, &src) in id.internal.iter_mut().zip(id_bytes) {
        *dst = src as _;
    }
    let mut comm: sys::ncclComm_t = std::ptr::null_mut();
    // SAFETY: `comm` is a valid out-pointer; NCCL blocks until all ranks have joined.
    unsafe { nccl::comm_init_rank(&mut comm, world as i32, id, rank as i32) }
        .map_err(|e| format!("ncclCommInitRank (rank {rank} of {world}): {e:?}"))?;
    Ok(RawComm {
        handle: comm,
        aborted: false,
    })
}
