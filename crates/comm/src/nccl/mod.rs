//! The NCCL communicator: one process per GPU (torchrun's convention, the one that
//! scales to several nodes), tensors on Burn's CubeCL CUDA backend.
//!
//! NCCL runs on a stream of its own in the CUDA primary context that cubecl also uses,
//! directly on cubecl's buffers (`Client::get_resource` gives the device address).
//! Ordering: before an operation the calling thread's cubecl stream is synchronised
//! (the inputs are written); collectives then wait for NCCL's stream before returning.
//! A ring shift returns right after queueing its grouped send/recv, so the next block
//! travels while the caller computes; [`Shift::wait`] synchronises NCCL's stream.
//!
//! Rank 0 creates NCCL's unique id and hands it to the others through
//! [`longview_launch::share_from_rank0`] (`MASTER_ADDR:MASTER_PORT`). Sub-groups get
//! their own NCCL communicators: each group's first member creates an id, all ranks
//! exchange ids with one all-gather, and the members initialise together.
//!
//! Failures. NCCL itself has no timeout: a rank that dies, hangs, or calls another
//! collective leaves its peers blocked inside NCCL. So no call here blocks in CUDA:
//! completion is polled (`cuStreamQuery`) together with NCCL's asynchronous error
//! (`ncclCommGetAsyncError`), and past `LONGVIEW_NCCL_TIMEOUT_S` seconds (default
//! 600) the communicator is aborted (`ncclCommAbort`) and the call returns
//! [`CommError::Stalled`] naming the collective and its sequence number; the process
//! then exits with that error and the launcher (`cargo xtask launch`, or torchrun)
//! stops every other rank. Communicator init (`ncclCommInitRank`, which waits for
//! every rank) is bounded by the same timeout: it runs on a helper thread
//! ([`crate::deadline::within`]) and a rank that never joins ends it with an error
//! naming the call. With `LONGVIEW_NCCL_CHECK=1` every collective first
//! all-gathers its signature (sequence number, operation, dtype, element count) and
//! a rank whose peers called something else fails at once with
//! [`CommError::Mismatch`] naming both calls (one small extra all-gather per
//! collective: a debugging switch, like torch's `TORCH_DISTRIBUTED_DEBUG=DETAIL`).

use std::ffi::c_void;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use burn::tensor::kind::Basic;
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::{result as nccl, sys};
use longview_launch::{ProcessEnv, share_from_rank0};

use crate::{CommError, Communicator, ReduceOp, Result, Shift, check_partition};

mod buffers;
mod raw;
mod watchdog;

use buffers::{nccl_type, unpin};
use raw::{RawComm, init_rank_within};
use watchdog::{Op, Watchdog};

/// One rank's NCCL communicator (world or sub-group).
pub struct NcclComm {
    /// Locked for the length of every NCCL call or group, so that the communicator can
    /// be shared (autodiff keeps it in its graph) without interleaved groups.
    comm: Mutex<RawComm>,
    rank: usize,
    world_size: usize,
    /// The CUDA device of this rank (`LOCAL_RANK`).
    device: Device,
    stream: Arc<CudaStream>,
    _context: Arc<CudaContext>,
    watchdog: Watchdog,
    /// Collectives started on this communicator (the signature's sequence number).
    calls: AtomicU64,
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclComm")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .finish_non_exhaustive()
    }
}

fn backend_error(rank: usize, op: &str, reason: impl std::fmt::Display) -> CommError {
    CommError::InvalidArgument {
        rank,
        op: op.into(),
        reason: reason.to_string(),
    }
}

impl NcclComm {
    /// The world communicator of a torchrun/SLURM job (`None` for a single process):
    /// binds GPU `LOCAL_RANK` and fetches NCCL's unique id from rank 0 (waiting up to
    /// `timeout` for the other ranks to start).
    pub fn from_env(timeout: Duration) -> Result<Option<Self>> {
        let env = ProcessEnv::from_env().map_err(|e| backend_error(0, "init", e))?;
        env.map(|env| Self::init(&env, timeout)).transpose()
    }

    /// Joins the job described by `env`.
    pub fn init(env: &ProcessEnv, timeout: Duration) -> Result<Self> {
        let fail = |e: &dyn std::fmt::Display| backend_error(env.rank, "init", e);
        let context = CudaContext::new(env.local_rank).map_err(|e| fail(&e))?;
        let stream = context.new_stream().map_err(|e| fail(&e))?;
        let id_bytes = if env.rank == 0 {
            let id = nccl::get_uniqueid()
                .map_err(|e| fail(&format!("{e:?} (is libnccl.so on LD_LIBRARY_PATH?)")))?;
            let bytes: Vec<u8> = id.internal.iter().map(|&b| b as u8).collect();
            share_from_rank0(env, Some(&bytes), timeout).map_err(|e| fail(&e))?
        } else {
            share_from_rank0(env, None, timeout).map_err(|e| fail(&e))?
        };
        let watchdog = Watchdog::from_env(env.rank)?;
        let comm = init_rank_within(
            &context,
            id_bytes,
            env.rank,
            env.world_size,
            watchdog.timeout,
        )
        .map_err(|e| fail(&e))?;
        Ok(NcclComm {
            comm: Mutex::new(comm),
            rank: env.rank,
            world_size: env.world_size,
            device: Device::cuda(env.local_rank),
            stream,
            _context: context,
            watchdog,
            calls: AtomicU64::new(0),
        })
    }

    /// The CUDA device of this rank.
    pub fn device(&self) -> &Device {
        &self.device
    }

    fn fail(&self, op: &str, reason: impl std::fmt::Display) -> CommError {
        backend_error(self.rank, op, reason)
    }

    /// NCCL's all-gather along dim 0, without the signature check.
    fn gather_raw<const D: usize, K: Basic>(
        &self,
        name: &str,
        tensor: Tensor<D, K>,
    ) -> Result<Tensor<D, K>> {
        let input = self.pin(name, tensor)?;
        let mut shape = input.tensor.meta.shape().to_vec();
        shape[0] *= self.world_size;
        let output = self.alloc(name, &input, &shape)?;
        self.sync_inputs(name, &input)?;
        let dtype = nccl_type(input.tensor.dtype).expect("checked in pin");
        // SAFETY: the output holds world_size x count elements.
        unsafe {
            self.check(
                name,
                nccl::all_gather(
                    input.ptr() as *const c_void,
                    output.ptr() as *mut c_void,
                    input.count(),
                    dtype,
                    self.raw_comm().handle,
                    self.raw_stream(),
                ),
            )?;
        }
        self.finish(name)?;
        Ok(unpin(output))
    }

    fn raw_comm(&self) -> MutexGuard<'_, RawComm> {
        self.comm.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn raw_stream(&self) -> sys::cudaStream_t {
        self.stream.cu_stream() as sys::cudaStream_t
    }

    fn check<T>(
        &self,
        op: &str,
        result: std::result::Result<T, cudarc::nccl::result::NcclError>,
    ) -> Result<()> {
        result
            .map(|_| ())
            .map_err(|e| self.fail(op, format!("NCCL error {e:?}")))
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn send<const D: usize, K: Basic>(&self, _tensor: &Tensor<D, K>, _to: usize) -> Result<()> {
        Err(self.fail(
            "send",
            "NCCL transfers must be paired: use start_shift or all_to_all (an unpaired NCCL send \
             blocks until its receiver posts, which deadlocks a ring)",
        ))
    }

    fn recv<const D: usize, K: Basic>(
        &self,
        _from: usize,
        _device: &Device,
    ) -> Result<Tensor<D, K>> {
        Err(self.fail(
            "recv",
            "NCCL transfers must be paired: use start_shift or all_to_all",
        ))
    }

    fn start_shift<const D: usize, K: Basic>(
        &self,
        tensor: &Tensor<D, K>,
        to: usize,
        from: usize,
    ) -> Result<Shift<'_, D, K>> {
        let op = "shift";
        self.begin(Op::Shift, tensor.dtype(), 0)?;
        let send = self.pin(op, tensor.clone())?;
        let shape = send.tensor.meta.shape().to_vec();
        let recv = self.alloc(op, &send, &shape)?;
        self.sync_inputs(op, &send)?;
        let dtype = nccl_type(send.tensor.dtype).expect("checked in pin");
        let stream = self.raw_stream();
        // SAFETY: both buffers are pinned (kept alive until `wait`), sized for `count`
        // elements of `dtype`, and in the context NCCL's communicator uses.
        let comm = self.raw_comm();
        unsafe {
            self.check(op, nccl::group_start())?;
            self.check(
                op,
                nccl::send(
                    send.ptr() as *const c_void,
                    send.count(),
                    dtype,
                    to as i32,
                    comm.handle,
                    stream,
                ),
            )?;
            self.check(
                op,
                nccl::recv(
                    recv.ptr() as *mut c_void,
                    recv.count(),
                    dtype,
                    from as i32,
                    comm.handle,
                    stream,
                ),
            )?;
            self.check(op, nccl::group_end())?;
        }
        Ok(Shift::new(move || {
            self.finish(op)?;
            drop(send);
            Ok(unpin(recv))
        }))
    }

    fn all_reduce<const D: usize>(&self, tensor: Tensor<D>, op: ReduceOp) -> Result<Tensor<D>> {
        let name = "all_reduce";
        self.begin(Op::AllReduce, tensor.dtype(), tensor.shape().num_elements())?;
        let input = self.pin(name, tensor)?;
        let shape = input.tensor.meta.shape().to_vec();
        let output = self.alloc(name, &input, &shape)?;
        self.sync_inputs(name, &input)?;
        let red = nccl_op(op);
        let dtype = nccl_type(input.tensor.dtype).expect("checked in pin");
        // SAFETY: pinned buffers of `count` elements each.
        unsafe {
            self.check(
                name,
                nccl::all_reduce(
                    input.ptr() as *const c_void,
                    output.ptr() as *mut c_void,
                    input.count(),
                    dtype,
                    red,
                    self.raw_comm().handle,
                    self.raw_stream(),
                ),
            )?;
        }
        self.finish(name)?;
        Ok(unpin(output))
    }

    fn all_gather<const D: usize, K: Basic>(
        &self,
        tensor: Tensor<D, K>,
        dim: usize,
    ) -> Result<Tensor<D, K>> {
        let name = "all_gather";
        if dim >= D {
            return Err(self.fail(name, format!("dim {dim} out of range for rank {D}")));
        }
        self.begin(Op::AllGather, tensor.dtype(), tensor.shape().num_elements())?;
        let gathered = self.gather_raw(name, tensor)?;
        // NCCL concatenates along the outermost dim; move the rank blocks to `dim`.
        Ok(if dim == 0 {
            gathered
        } else {
            Tensor::cat(gathered.chunk(self.world_size, 0), dim)
        })
    }

    fn reduce_scatter<const D: usize>(
        &self,
        tensor: Tensor<D>,
        dim: usize,
        op: ReduceOp,
    ) -> Result<Tensor<D>> {
        let name = "reduce_scatter";
        if dim >= D || !tensor.dims()[dim].is_multiple_of(self.world_size) {
            return Err(self.fail(
                name,
                format!(
                    "dim {dim} of shape {:?} must exist and be divisible by the {} ranks",
                    tensor.dims(),
                    self.world_size
                ),
            ));
        }
        self.begin(
            Op::ReduceScatter,
            tensor.dtype(),
            tensor.shape().num_elements(),
        )?;
        // NCCL scatters along the outermost dim.
        let input = self.pin(name, tensor.swap_dims(0, dim))?;
        let mut shape = input.tensor.meta.shape().to_vec();
        shape[0] /= self.world_size;
        let output = self.alloc(name, &input, &shape)?;
        self.sync_inputs(name, &input)?;
        let red = nccl_op(op);
        let dtype = nccl_type(input.tensor.dtype).expect("checked in pin");
        // SAFETY: the output holds count / world_size elements.
        unsafe {
            self.check(
                name,
                nccl::reduce_scatter(
                    input.ptr() as *const c_void,
                    output.ptr() as *mut c_void,
                    output.count(),
                    dtype,
                    red,
                    self.raw_comm().handle,
                    self.raw_stream(),
                ),
            )?;
        }
        self.finish(name)?;
        let scattered: Tensor<D> = unpin(output);
        Ok(scattered.swap_dims(0, dim))
    }

    fn broadcast<const D: usize>(&self, tensor: Tensor<D>, root: usize) -> Result<Tensor<D>> {
        let name = "broadcast";
        if root >= self.world_size {
            return Err(self.fail(
                name,
                format!("root {root} out of range for {} ranks", self.world_size),
            ));
        }
        self.begin(Op::Broadcast, tensor.dtype(), tensor.shape().num_elements())?;
        let input = self.pin(name, tensor)?;
        let shape = input.tensor.meta.shape().to_vec();
        let output = self.alloc(name, &input, &shape)?;
        self.sync_inputs(name, &input)?;
        let dtype = nccl_type(input.tensor.dtype).expect("checked in pin");
        // SAFETY: pinned buffers of `count` elements each.
        unsafe {
            self.check(
                name,
                nccl::broadcast(
                    input.ptr() as *const c_void,
                    output.ptr() as *mut c_void,
                    input.count(),
                    dtype,
                    root as i32,
                    self.raw_comm().handle,
                    self.raw_stream(),
                ),
            )?;
        }
        self.finish(name)?;
        Ok(unpin(output))
    }

    fn all_to_all<const D: usize>(&self, parts: Vec<Tensor<D>>) -> Result<Vec<Tensor<D>>> {
        let name = "all_to_all";
        if parts.len() != self.world_size {
            return Err(self.fail(
                name,
                format!(
                    "got {} parts for a group of {} ranks (one part per rank)",
                    parts.len(),
                    self.world_size
                ),
            ));
        }
        self.begin(Op::AllToAll, parts[0].dtype(), 0)?;
        let sends = parts
            .into_iter()
            .map(|p| self.pin(name, p))
            .collect::<Result<Vec<_>>>()?;
        // Every rank sends part j to rank j; what arrives from rank i has the shape of
        // this rank's part i (equal shards, as the in-process group checks).
        let recvs = sends
            .iter()
            .map(|s| self.alloc(name, s, &s.tensor.meta.shape().to_vec()))
            .collect::<Result<Vec<_>>>()?;
        self.sync_inputs(name, &sends[0])?;
        let stream = self.raw_stream();
        // SAFETY: every buffer is pinned and sized for its count.
        let comm = self.raw_comm();
        unsafe {
            self.check(name, nccl::group_start())?;
            for (peer, (send, recv)) in sends.iter().zip(&recvs).enumerate() {
                let dtype = nccl_type(send.tensor.dtype).expect("checked in pin");
                self.check(
                    name,
                    nccl::send(
                        send.ptr() as *const c_void,
                        send.count(),
                        dtype,
                        peer as i32,
                        comm.handle,
                        stream,
                    ),
                )?;
                self.check(
                    name,
                    nccl::recv(
                        recv.ptr() as *mut c_void,
                        recv.count(),
                        dtype,
                        peer as i32,
                        comm.handle,
                        stream,
                    ),
                )?;
            }
            self.check(name, nccl::group_end())?;
        }
        self.finish(name)?;
        drop(sends);
        Ok(recvs.into_iter().map(unpin).collect())
    }

    fn split(&self, groups: &[Vec<usize>]) -> Result<Self> {
        let name = "split";
        check_partition(self.world_size, groups).map_err(|r| self.fail(name, r))?;
        let group = groups
            .iter()
            .find(|g| g.contains(&self.rank))
            .expect("checked: every rank is in a group");
        let leader = group[0];
        // Each group's first member creates an id; one all-gather hands every rank all
        // ids (128 bytes each, as i32 values for the transfer).
        let mine: Vec<i32> = if leader == self.rank {
            let id = nccl::get_uniqueid().map_err(|e| self.fail(name, format!("{e:?}")))?;
            id.internal.iter().map(|&b| b as u8 as i32).collect()
        } else {
            vec![0; 128]
        };
        let ids =
            Tensor::<1, Int>::from_data(TensorData::new(mine, [128]), (&self.device, DType::I32));
        let all = self.all_gather(ids, 0)?;
        let all: Vec<i32> = all
            .into_data()
            .convert::<i32>()
            .try_into_vec::<i32>()
            .map_err(|e| self.fail(name, format!("{e:?}")))?;
        let bytes: Vec<u8> = all[leader * 128..(leader + 1) * 128]
            .iter()
            .map(|&v| v as u8)
            .collect();
        let rank = group.iter().position(|&r| r == self.rank).expect("member");
        let comm = init_rank_within(
            &self._context,
            bytes,
            rank,
            group.len(),
            self.watchdog.timeout,
        )
        .map_err(|e| self.fail(name, e))?;
        Ok(NcclComm {
            comm: Mutex::new(comm),
            rank,
            world_size: group.len(),
            device: self.device.clone(),
            stream: self.stream.clone(),
            _context: self._context.clone(),
            watchdog: self.watchdog,
            calls: AtomicU64::new(0),
        })
    }
}

/// NCCL's name for a reduction.
fn nccl_op(op: ReduceOp) -> sys::ncclRedOp_t {
    match op {
        ReduceOp::Sum => sys::ncclRedOp_t::ncclSum,
        ReduceOp::Max => sys::ncclRedOp_t::ncclMax,
    }
}
