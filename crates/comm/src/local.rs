//! The in-process communicator: ranks are threads, messages are host copies of tensors.
//!
//! Each (group, sender, receiver) triple has its own FIFO mailbox, so as long as ranks
//! call operations in the same order (NCCL's rule) messages pair up without tags. Every
//! message still carries the name of the operation that sent it and its position in
//! the sender's sequence of operations, so ranks that call different collectives get
//! a [`CommError::Mismatch`] instead of silently combining unrelated tensors.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use burn::tensor::kind::Basic;
use burn::tensor::{DType, Device, Tensor, TensorData};

use crate::{CommError, Communicator, ReduceOp, Result, Shift, check_partition};

/// How long a receive waits for a live peer before giving up, unless set with
/// [`LocalWorld::communicators_with_timeout`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// How often a waiting receive checks whether its peer is still alive.
const POLL: Duration = Duration::from_millis(20);

struct Message {
    /// `"<op>#<sequence number>"` of the sending rank.
    tag: String,
    data: TensorData,
    /// When a simulated link ([`LinkModel`]) delivers it; `None`: at once.
    ready_at: Option<Instant>,
}

#[derive(Default)]
struct Mailbox {
    queue: Mutex<VecDeque<Message>>,
    arrived: Condvar,
    /// When the simulated link from sender to receiver finishes its last transfer.
    link_free_at: Mutex<Option<Instant>>,
}

struct Shared {
    /// Keyed by (group id, sender's global rank, receiver's global rank).
    mailboxes: Mutex<HashMap<(u64, usize, usize), Arc<Mailbox>>>,
    alive: Vec<AtomicBool>,
    timeout: Duration,
    link: Option<LinkModel>,
}

/// A simulated network link between every ordered pair of ranks (per group), for
/// testing how communication overlaps computation: a message of `b` bytes sent at `t`
/// starts when the link has finished the previous one (`start = max(t, free)`),
/// occupies it for `b / bytes_per_s`, and arrives `latency` after that. Messages on one
/// link are serialised by bandwidth and pipelined through the latency, as on a real
/// link; messages on different links do not interact.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkModel {
    pub latency: Duration,
    /// Bytes per second; `f64::INFINITY` for latency only.
    pub bytes_per_s: f64,
}

impl LinkModel {
    /// When a message of `bytes` posted at `now` arrives, and when the link is free
    /// again, given when it was free before.
    fn schedule(&self, bytes: usize, now: Instant, free: Option<Instant>) -> (Instant, Instant) {
        let start = free.map_or(now, |f| f.max(now));
        let busy = if self.bytes_per_s.is_finite() && self.bytes_per_s > 0.0 {
            Duration::from_secs_f64(bytes as f64 / self.bytes_per_s)
        } else {
            Duration::ZERO
        };
        let done = start + busy;
        (done + self.latency, done)
    }
}

impl Shared {
    fn mailbox(&self, group: u64, from: usize, to: usize) -> Arc<Mailbox> {
        let mut boxes = self.mailboxes.lock().unwrap_or_else(|e| e.into_inner());
        boxes.entry((group, from, to)).or_default().clone()
    }
}

/// Marks its global rank as gone when the last communicator of that rank (the world
/// communicator and every sub-group made from it) is dropped, e.g. while a panicking
/// rank thread unwinds. Waiting peers then fail with [`CommError::PeerGone`].
struct RankLife {
    shared: Arc<Shared>,
    global_rank: usize,
}

impl Drop for RankLife {
    fn drop(&mut self) {
        self.shared.alive[self.global_rank].store(false, Ordering::SeqCst);
        // Wake every waiter so it notices promptly instead of at its next poll.
        let boxes = self
            .shared
            .mailboxes
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for mailbox in boxes.values() {
            mailbox.arrived.notify_all();
        }
    }
}

/// Creates the communicators of an in-process group.
pub struct LocalWorld;

impl LocalWorld {
    /// One communicator per rank, in rank order; hand each to its own thread.
    pub fn communicators(world_size: usize) -> Vec<LocalComm> {
        Self::communicators_with_timeout(world_size, DEFAULT_TIMEOUT)
    }

    /// As [`LocalWorld::communicators`], with the longest a receive waits for a live peer.
    pub fn communicators_with_timeout(world_size: usize, timeout: Duration) -> Vec<LocalComm> {
        Self::build(world_size, timeout, None)
    }

    /// As [`LocalWorld::communicators`], every message crossing a simulated link
    /// ([`LinkModel`]): for tests of communication/computation overlap.
    pub fn communicators_with_links(world_size: usize, link: LinkModel) -> Vec<LocalComm> {
        Self::build(world_size, DEFAULT_TIMEOUT, Some(link))
    }

    fn build(world_size: usize, timeout: Duration, link: Option<LinkModel>) -> Vec<LocalComm> {
        assert!(world_size > 0, "a group needs at least one rank");
        let shared = Arc::new(Shared {
            mailboxes: Mutex::new(HashMap::new()),
            alive: (0..world_size).map(|_| AtomicBool::new(true)).collect(),
            timeout,
            link,
        });
        let members: Arc<[usize]> = (0..world_size).collect();
        (0..world_size)
            .map(|rank| LocalComm {
                life: Arc::new(RankLife {
                    shared: shared.clone(),
                    global_rank: rank,
                }),
                group: 0,
                members: members.clone(),
                rank,
                sequence: AtomicU64::new(0),
            })
            .collect()
    }
}

/// One rank's end of an in-process group. See [`Communicator`].
pub struct LocalComm {
    life: Arc<RankLife>,
    group: u64,
    /// Global rank of each member, in group order.
    members: Arc<[usize]>,
    rank: usize,
    /// Operations this rank has started in this group (the same on every rank that
    /// follows the rules).
    sequence: AtomicU64,
}

impl std::fmt::Debug for LocalComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalComm")
            .field("rank", &self.rank)
            .field("global_ranks", &self.members)
            .finish_non_exhaustive()
    }
}

impl LocalComm {
    fn shared(&self) -> &Shared {
        &self.life.shared
    }

    fn begin(&self, op: &str) -> String {
        let n = self.sequence.fetch_add(1, Ordering::Relaxed);
        format!("{op}#{n}")
    }

    fn invalid(&self, op: &str, reason: impl Into<String>) -> CommError {
        CommError::InvalidArgument {
            rank: self.rank,
            op: op.into(),
            reason: reason.into(),
        }
    }

    /// NCCL takes tensors without autodiff (`.inner()`); refused here too, so the
    /// in-process tests hold callers to the contract of the GPU path.
    fn check_plain(&self, op: &str, device: &Device) -> Result<()> {
        match device.is_autodiff() {
            true => Err(self.invalid(
                op,
                "takes tensors without autodiff tracking (`.inner()`), as NCCL does",
            )),
            false => Ok(()),
        }
    }

    fn check_peer(&self, op: &str, peer: usize) -> Result<()> {
        if peer < self.members.len() {
            Ok(())
        } else {
            Err(self.invalid(
                op,
                format!(
                    "rank {peer} is out of range for a group of {}",
                    self.members.len()
                ),
            ))
        }
    }

    fn post(&self, tag: &str, data: TensorData, to: usize) {
        let mailbox = self
            .shared()
            .mailbox(self.group, self.members[self.rank], self.members[to]);
        let ready_at = self.shared().link.map(|link| {
            let mut free = mailbox
                .link_free_at
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let (arrive, done) = link.schedule(data.as_bytes().len(), Instant::now(), *free);
            *free = Some(done);
            arrive
        });
        let mut queue = mailbox.queue.lock().unwrap_or_else(|e| e.into_inner());
        queue.push_back(Message {
            tag: tag.to_owned(),
            data,
            ready_at,
        });
        mailbox.arrived.notify_all();
    }

    fn take(&self, tag: &str, from: usize) -> Result<TensorData> {
        let shared = self.shared();
        let peer_global = self.members[from];
        let mailbox = shared.mailbox(self.group, peer_global, self.members[self.rank]);
        let start = Instant::now();
        let mut queue = mailbox.queue.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            // A message still crossing its simulated link is not there yet.
            let in_flight = queue
                .front()
                .and_then(|m| m.ready_at)
                .and_then(|ready| ready.checked_duration_since(Instant::now()));
            if let Some(left) = in_flight {
                queue = mailbox
                    .arrived
                    .wait_timeout(queue, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                continue;
            }
            if let Some(message) = queue.pop_front() {
                if message.tag != tag {
                    return Err(CommError::Mismatch {
                        rank: self.rank,
                        peer: from,
                        expected: tag.to_owned(),
                        found: message.tag,
                    });
                }
                return Ok(message.data);
            }
            if !shared.alive[peer_global].load(Ordering::SeqCst) {
                return Err(CommError::PeerGone {
                    rank: self.rank,
                    peer: from,
                    op: tag.to_owned(),
                });
            }
            let waited = start.elapsed();
            if waited >= shared.timeout {
                return Err(CommError::Timeout {
                    rank: self.rank,
                    peer: from,
                    op: tag.to_owned(),
                    waited_s: waited.as_secs_f64(),
                });
            }
            queue = mailbox
                .arrived
                .wait_timeout(queue, POLL.min(shared.timeout - waited))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn take_tensor<const D: usize, K: Basic>(
        &self,
        tag: &str,
        from: usize,
        device: &Device,
    ) -> Result<Tensor<D, K>> {
        let data = self.take(tag, from)?;
        if data.rank() != D {
            return Err(self.invalid(
                tag,
                format!(
                    "rank {from} sent a tensor of rank {} (shape {:?}), this rank expects rank {D}",
                    data.rank(),
                    data.shape().to_vec()
                ),
            ));
        }
        let dtype = data.dtype();
        Ok(Tensor::from_data(data, (device, dtype)))
    }

    /// Sends `tensor` to every other rank and returns all ranks' tensors in rank order.
    fn exchange<const D: usize, K: Basic>(
        &self,
        tag: &str,
        tensor: Tensor<D, K>,
    ) -> Result<Vec<Tensor<D, K>>> {
        let device = tensor.device();
        let data = tensor.to_data();
        for peer in (0..self.members.len()).filter(|&p| p != self.rank) {
            self.post(tag, data.clone(), peer);
        }
        let mut all = Vec::with_capacity(self.members.len());
        for peer in 0..self.members.len() {
            if peer == self.rank {
                all.push(tensor.clone());
            } else {
                all.push(self.take_tensor(tag, peer, &device)?);
            }
        }
        Ok(all)
    }

    /// NCCL sizes every rank's buffers alike: the tensors of a collective must have
    /// one shape and one dtype.
    fn check_same_shape<const D: usize, K: Basic>(
        &self,
        tag: &str,
        tensors: &[Tensor<D, K>],
    ) -> Result<()> {
        let (mine, dtype) = (tensors[self.rank].dims(), tensors[self.rank].dtype());
        for (peer, t) in tensors.iter().enumerate() {
            if t.dims() != mine || t.dtype() != dtype {
                return Err(self.invalid(
                    tag,
                    format!(
                        "rank {peer} passed a {:?} {:?} tensor, this rank a {mine:?} {dtype:?} \
                         one; shapes and dtypes must match",
                        t.dims(),
                        t.dtype()
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Reduces in rank order in f32 and returns the input dtype, so every rank computes
/// the same bits whatever the order messages arrived in.
fn reduce<const D: usize>(tensors: Vec<Tensor<D>>, op: ReduceOp) -> Tensor<D> {
    let dtype = tensors[0].dtype();
    let mut parts = tensors.into_iter().map(|t| t.cast(DType::F32));
    let first = parts.next().expect("a group has at least one rank");
    let total = parts.fold(first, |acc, t| match op {
        ReduceOp::Sum => acc.add(t),
        ReduceOp::Max => acc.max_pair(t),
    });
    total.cast(dtype)
}

impl Communicator for LocalComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.members.len()
    }

    fn send<const D: usize, K: Basic>(&self, tensor: &Tensor<D, K>, to: usize) -> Result<()> {
        self.check_plain("send", &tensor.device())?;
        self.check_peer("send", to)?;
        self.post("send/recv", tensor.to_data(), to);
        Ok(())
    }

    fn recv<const D: usize, K: Basic>(&self, from: usize, device: &Device) -> Result<Tensor<D, K>> {
        self.check_plain("recv", device)?;
        self.check_peer("recv", from)?;
        self.take_tensor("send/recv", from, device)
    }

    fn start_shift<const D: usize, K: Basic>(
        &self,
        tensor: &Tensor<D, K>,
        to: usize,
        from: usize,
    ) -> Result<Shift<'_, D, K>> {
        let tag = self.begin("shift");
        self.check_plain(&tag, &tensor.device())?;
        self.check_peer(&tag, to)?;
        self.check_peer(&tag, from)?;
        let (dims, dtype, device) = (tensor.dims(), tensor.dtype(), tensor.device());
        self.post(&tag, tensor.to_data(), to);
        Ok(Shift::new(move || {
            let received: Tensor<D, K> = self.take_tensor(&tag, from, &device)?;
            if received.dims() != dims || received.dtype() != dtype {
                return Err(self.invalid(
                    &tag,
                    format!(
                        "rank {from} shifted a {:?} {:?} tensor, this rank a {dims:?} {dtype:?} one",
                        received.dims(),
                        received.dtype()
                    ),
                ));
            }
            Ok(received)
        }))
    }

    fn all_reduce<const D: usize>(&self, tensor: Tensor<D>, op: ReduceOp) -> Result<Tensor<D>> {
        let tag = self.begin("all_reduce");
        self.check_plain(&tag, &tensor.device())?;
        let all = self.exchange(&tag, tensor)?;
        self.check_same_shape(&tag, &all)?;
        Ok(reduce(all, op))
    }

    fn all_gather<const D: usize, K: Basic>(
        &self,
        tensor: Tensor<D, K>,
        dim: usize,
    ) -> Result<Tensor<D, K>> {
        let tag = self.begin("all_gather");
        self.check_plain(&tag, &tensor.device())?;
        if dim >= D {
            return Err(self.invalid(&tag, format!("dim {dim} out of range for rank {D}")));
        }
        let all = self.exchange(&tag, tensor)?;
        self.check_same_shape(&tag, &all)?;
        Ok(Tensor::cat(all, dim))
    }

    fn reduce_scatter<const D: usize>(
        &self,
        tensor: Tensor<D>,
        dim: usize,
        op: ReduceOp,
    ) -> Result<Tensor<D>> {
        let tag = self.begin("reduce_scatter");
        self.check_plain(&tag, &tensor.device())?;
        let world = self.members.len();
        if dim >= D || !tensor.dims()[dim].is_multiple_of(world) {
            return Err(self.invalid(
                &tag,
                format!(
                    "dim {dim} of shape {:?} must exist and be divisible by the {world} ranks",
                    tensor.dims()
                ),
            ));
        }
        let parts = tensor.chunk(world, dim);
        let mine = self.route(&tag, parts)?;
        self.check_same_shape(&tag, &mine)?;
        Ok(reduce(mine, op))
    }

    fn broadcast<const D: usize>(&self, tensor: Tensor<D>, root: usize) -> Result<Tensor<D>> {
        let tag = self.begin("broadcast");
        self.check_plain(&tag, &tensor.device())?;
        self.check_peer(&tag, root)?;
        if self.rank == root {
            let data = tensor.to_data();
            for peer in (0..self.members.len()).filter(|&p| p != root) {
                self.post(&tag, data.clone(), peer);
            }
            Ok(tensor)
        } else {
            let received: Tensor<D> = self.take_tensor(&tag, root, &tensor.device())?;
            if received.dims() != tensor.dims() {
                return Err(self.invalid(
                    &tag,
                    format!(
                        "root {root} broadcast shape {:?}, this rank's buffer is {:?}",
                        received.dims(),
                        tensor.dims()
                    ),
                ));
            }
            Ok(received)
        }
    }

    fn all_to_all<const D: usize>(&self, parts: Vec<Tensor<D>>) -> Result<Vec<Tensor<D>>> {
        let tag = self.begin("all_to_all");
        if let Some(part) = parts.first() {
            self.check_plain(&tag, &part.device())?;
        }
        if parts.len() != self.members.len() {
            return Err(self.invalid(
                &tag,
                format!(
                    "got {} parts for a group of {} ranks (one part per rank)",
                    parts.len(),
                    self.members.len()
                ),
            ));
        }
        self.route(&tag, parts)
    }

    fn split(&self, groups: &[Vec<usize>]) -> Result<Self> {
        let tag = self.begin("split");
        check_partition(self.members.len(), groups).map_err(|reason| self.invalid(&tag, reason))?;
        let (index, group) = groups
            .iter()
            .enumerate()
            .find(|(_, g)| g.contains(&self.rank))
            .expect("checked: every rank is in a group");
        // Same on every member: derived from the parent group, this split's position in
        // the parent's sequence of operations, and the member list.
        let mut hasher = DefaultHasher::new();
        (self.group, &tag, index, group).hash(&mut hasher);
        let members: Arc<[usize]> = group.iter().map(|&r| self.members[r]).collect();
        Ok(LocalComm {
            life: self.life.clone(),
            group: hasher.finish(),
            rank: group.iter().position(|&r| r == self.rank).expect("member"),
            members,
            sequence: AtomicU64::new(0),
        })
    }
}

impl LocalComm {
    /// Sends `parts[j]` to rank `j` and returns what every rank sent here, in rank order.
    fn route<const D: usize>(&self, tag: &str, parts: Vec<Tensor<D>>) -> Result<Vec<Tensor<D>>> {
        let device = parts[self.rank].device();
        let mut own = None;
        for (peer, part) in parts.into_iter().enumerate() {
            if peer == self.rank {
                own = Some(part);
            } else {
                self.post(tag, part.into_data(), peer);
            }
        }
        (0..self.members.len())
            .map(|peer| {
                if peer == self.rank {
                    Ok(own.take().expect("own part"))
                } else {
                    self.take_tensor(tag, peer, &device)
                }
            })
            .collect()
    }
}
