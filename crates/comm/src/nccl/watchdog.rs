//! When a collective fails instead of hanging: the timeout and the optional signature
//! check (`LONGVIEW_NCCL_TIMEOUT_S`, `LONGVIEW_NCCL_CHECK`), completion polled together
//! with NCCL's asynchronous error, the communicator aborted past the deadline.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use burn::tensor::{DType, Int, Tensor, TensorData};
use cudarc::driver::sys as cuda;
use cudarc::nccl::{result as nccl, sys};

use super::{NcclComm, backend_error};
use crate::{CommError, Result};

/// How long a collective may take, and whether signatures are compared.
#[derive(Debug, Clone, Copy)]
pub(super) struct Watchdog {
    pub(super) timeout: Duration,
    check: bool,
}

impl Watchdog {
    /// `LONGVIEW_NCCL_TIMEOUT_S` (seconds, default 600) and `LONGVIEW_NCCL_CHECK` (`1`).
    pub(super) fn from_env(rank: usize) -> Result<Self> {
        let timeout = match std::env::var("LONGVIEW_NCCL_TIMEOUT_S") {
            Err(_) => Duration::from_secs(600),
            Ok(v) => match v.trim().parse::<f64>() {
                Ok(s) if s.is_finite() && s > 0.0 => Duration::from_secs_f64(s),
                _ => {
                    return Err(backend_error(
                        rank,
                        "init",
                        format!(
                            "LONGVIEW_NCCL_TIMEOUT_S=`{v}`: expected a positive number of seconds"
                        ),
                    ));
                }
            },
        };
        let check = match std::env::var("LONGVIEW_NCCL_CHECK").as_deref() {
            Err(_) | Ok("") | Ok("0") => false,
            Ok("1") => true,
            Ok(other) => {
                return Err(backend_error(
                    rank,
                    "init",
                    format!("LONGVIEW_NCCL_CHECK=`{other}`: expected 0 or 1"),
                ));
            }
        };
        Ok(Watchdog { timeout, check })
    }
}

impl NcclComm {
    /// Waits for NCCL's stream without blocking inside CUDA: polls completion and
    /// NCCL's asynchronous error, and aborts the communicator past the timeout.
    pub(super) fn finish(&self, op: &str) -> Result<()> {
        let start = Instant::now();
        let mut pause = Duration::from_micros(2);
        loop {
            // SAFETY: the stream handle is alive for as long as `self.stream`.
            match unsafe { cuda::cuStreamQuery(self.stream.cu_stream()) } {
                cuda::CUresult::CUDA_SUCCESS => return Ok(()),
                cuda::CUresult::CUDA_ERROR_NOT_READY => {}
                other => return Err(self.fail(op, format!("waiting for NCCL's stream: {other:?}"))),
            }
            let mut async_error = sys::ncclResult_t::ncclSuccess;
            {
                let comm = self.raw_comm();
                // SAFETY: a live (not aborted: aborting returns below) handle.
                unsafe { sys::ncclCommGetAsyncError(comm.handle, &mut async_error) };
            }
            let failed = !matches!(
                async_error,
                sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress
            );
            let waited = start.elapsed();
            if failed || waited >= self.watchdog.timeout {
                self.abort();
                let seq = self.calls.load(Ordering::Relaxed);
                return Err(if failed {
                    self.fail(
                        op,
                        format!(
                            "NCCL reported {async_error:?} during collective #{seq} (a peer rank \
                             failed or the network broke); the communicator was aborted"
                        ),
                    )
                } else {
                    CommError::Stalled {
                        rank: self.rank,
                        op: format!("{op} (collective #{seq})"),
                        waited_s: waited.as_secs_f64(),
                    }
                });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_micros(200));
        }
    }

    /// Aborts the communicator (its pending operations end; it cannot be used again).
    pub(super) fn abort(&self) {
        let mut comm = self.raw_comm();
        if !comm.aborted {
            comm.aborted = true;
            // SAFETY: a live handle, aborted once and never destroyed afterwards.
            unsafe {
                let _ = nccl::comm_abort(comm.handle);
            }
        }
    }

    /// Counts a collective and, with `LONGVIEW_NCCL_CHECK=1`, compares its signature
    /// (sequence number, operation, dtype, element count; the count only where every
    /// rank must pass the same) with every rank's before running it.
    pub(super) fn begin(&self, op: Op, dtype: DType, count: usize) -> Result<()> {
        let seq = self.calls.fetch_add(1, Ordering::Relaxed) + 1;
        if self.comm.lock().map(|c| c.aborted).unwrap_or(true) {
            return Err(self.fail(
                op.name(),
                "the communicator was aborted after an earlier failure",
            ));
        }
        if !self.watchdog.check {
            return Ok(());
        }
        let count = if op.same_count() { count as i64 } else { -1 };
        let mine = vec![seq as i64, op as i64, dtype_code(dtype), count];
        let signature = Tensor::<1, Int>::from_data(
            TensorData::new(mine.clone(), [4]),
            (&self.device, DType::I64),
        );
        let all: Tensor<1, Int> = self.gather_raw("signature check", signature)?;
        let all: Vec<i64> = all
            .into_data()
            .convert::<i64>()
            .try_into_vec::<i64>()
            .map_err(|e| self.fail(op.name(), format!("{e:?}")))?;
        for (peer, theirs) in all.chunks(4).enumerate() {
            if theirs != mine.as_slice() {
                return Err(CommError::Mismatch {
                    rank: self.rank,
                    peer,
                    expected: describe(&mine),
                    found: describe(theirs),
                });
            }
        }
        Ok(())
    }
}

/// The collectives, as the signature check names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Op {
    AllReduce = 1,
    AllGather = 2,
    ReduceScatter = 3,
    Broadcast = 4,
    AllToAll = 5,
    Shift = 6,
}

impl Op {
    const ALL: [Op; 6] = [
        Op::AllReduce,
        Op::AllGather,
        Op::ReduceScatter,
        Op::Broadcast,
        Op::AllToAll,
        Op::Shift,
    ];

    pub(super) fn name(self) -> &'static str {
        match self {
            Op::AllReduce => "all_reduce",
            Op::AllGather => "all_gather",
            Op::ReduceScatter => "reduce_scatter",
            Op::Broadcast => "broadcast",
            Op::AllToAll => "all_to_all",
            Op::Shift => "shift",
        }
    }

    /// Whether every rank must pass the same number of elements.
    fn same_count(self) -> bool {
        !matches!(self, Op::AllToAll | Op::Shift)
    }
}

const DTYPES: [DType; 10] = [
    DType::F32,
    DType::F16,
    DType::BF16,
    DType::F64,
    DType::I32,
    DType::I64,
    DType::U32,
    DType::U64,
    DType::I8,
    DType::U8,
];

fn dtype_code(dtype: DType) -> i64 {
    DTYPES
        .iter()
        .position(|&d| d == dtype)
        .map_or(99, |i| i as i64)
}

/// `all_reduce #12 (f32, 4096 elements)` from a signature.
fn describe(signature: &[i64]) -> String {
    let op = Op::ALL
        .iter()
        .find(|o| **o as i64 == signature[1])
        .map_or("an unknown collective", |o| o.name());
    let dtype = DTYPES
        .get(signature[2] as usize)
        .map_or("another dtype".to_string(), |d| {
            format!("{d:?}").to_lowercase()
        });
    let count = if signature[3] < 0 {
        String::new()
    } else {
        format!(", {} elements", signature[3])
    };
    format!("{op} #{} ({dtype}{count})", signature[0])
}
