//! Where the ranks of a parallel run come from.
//!
//! - **In-process**: `world` threads of this process over the in-process communicator
//!   (`LocalWorld`), on the CPU. What `--parallel` gives on a plain command line.
//! - **One process per rank**: a launcher started this process as one rank of a job
//!   (`cargo xtask launch --nproc N -- longview ...`, torchrun, or SLURM's `srun`:
//!   `RANK`/`WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`/`MASTER_PORT`). The process joins
//!   the job's NCCL communicator and runs its one rank on GPU `LOCAL_RANK` (a build with
//!   the `nccl` feature). Only rank 0 prints; every rank returns its own result.
//!
//! A job ([`RankJob`]) is written once for any communicator, so the same code runs a
//! rank in a thread or in a process. `--nproc N` ([`launch_here`]) starts the N
//! processes of a one-machine job itself.

use anyhow::{Result, anyhow, bail};
use burn::tensor::Device;
use longview_comm::{Communicator, LocalWorld};
use longview_launch::ProcessEnv;
use longview_train::TrainError;

use crate::DeviceArgs;

/// How long rank 0 waits for the other processes to fetch NCCL's unique id.
#[cfg(feature = "nccl")]
const RENDEZVOUS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// The work of one rank, for any communicator.
pub trait RankJob: Sync {
    type Output: Send;

    /// Runs this rank: `device` is where its tensors live (autodiff enabled), `log`
    /// prints on rank 0 only.
    fn run<C: Communicator + Send + Sync + 'static>(
        &self,
        comm: C,
        device: &Device,
        log: &mut dyn FnMut(&str),
    ) -> Result<Self::Output, TrainError>;
}

/// The ranks of this run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ranks {
    /// `world` threads of this process.
    InProcess { world: usize },
    /// This process is one rank of a launched job.
    Process(ProcessEnv),
}

impl Ranks {
    /// The launcher's variables, if any, checked against the `world` ranks that `flag`
    /// (e.g. `--parallel 2x2`) asks for.
    pub fn resolve(world: usize, flag: &str) -> Result<Ranks> {
        Self::resolve_with(ProcessEnv::from_env()?, world, flag)
    }

    fn resolve_with(env: Option<ProcessEnv>, world: usize, flag: &str) -> Result<Ranks> {
        match env {
            None => Ok(Ranks::InProcess { world }),
            Some(env) if env.world_size == world => Ok(Ranks::Process(env)),
            Some(env) => bail!(
                "{flag} makes {world} ranks but the launcher started {} processes \
                 (WORLD_SIZE={}, this is RANK={}): start one process per rank, e.g. \
                 `longview ... --nproc {world}` or `cargo xtask launch --nproc {world} -- \
                 longview ...`",
                env.world_size,
                env.world_size,
                env.rank
            ),
        }
    }

    /// The launched process's rank, `None` for in-process ranks.
    pub fn process_rank(&self) -> Option<usize> {
        match self {
            Ranks::InProcess { .. } => None,
            Ranks::Process(env) => Some(env.rank),
        }
    }

    /// Whether this process prints the run's header and summary: always for
    /// in-process ranks (rank 0 reports for all), rank 0 only for processes.
    pub fn prints(&self) -> bool {
        self.process_rank().is_none_or(|rank| rank == 0)
    }

    /// Runs `job` on these ranks. In-process: every thread, returning rank 0's result
    /// (the first failing rank's error otherwise, naming it). One process per rank:
    /// this process's rank over NCCL on the device `device` names for its local rank.
    pub fn run<J: RankJob>(&self, job: &J, device: &DeviceArgs) -> Result<J::Output> {
        match self {
            Ranks::InProcess { world } => in_process(*world, job),
            Ranks::Process(env) => over_nccl(env, job, device),
        }
    }
}

fn in_process<J: RankJob>(world: usize, job: &J) -> Result<J::Output> {
    let comms = LocalWorld::communicators(world);
    let results: Vec<Result<J::Output, TrainError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                scope.spawn(move || {
                    let index = comm.rank();
                    let mut log = |line: &str| {
                        if index == 0 {
                            crate::logging::line(Some(index), line)
                        }
                    };
                    job.run(comm, &Device::flex().autodiff(), &mut log)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                // A failed collective inside an autodiff backward can only panic: its
                // message names the rank and the collective.
                h.join().unwrap_or_else(|payload| {
                    let message = panic_message(&*payload);
                    Err(TrainError::Parallel(
                        if crate::out_of_memory::is_out_of_memory(&message) {
                            crate::out_of_memory::explain(&message)
                        } else {
                            format!("panicked: {message}")
                        },
                    ))
                })
            })
            .collect()
    });
    let mut first = None;
    for (r, result) in results.into_iter().enumerate() {
        match result {
            Ok(value) if r == 0 => first = Some(value),
            Ok(_) => {}
            Err(e) => bail!("rank {r}: {e}"),
        }
    }
    first.ok_or_else(|| anyhow!("rank 0 returned nothing"))
}

#[cfg(feature = "nccl")]
fn over_nccl<J: RankJob>(env: &ProcessEnv, job: &J, device: &DeviceArgs) -> Result<J::Output> {
    let device = device.for_local_rank(env)?;
    let comm = longview_comm::nccl::NcclComm::init(env, RENDEZVOUS_TIMEOUT)
        .map_err(|e| anyhow!("rank {} of {}: {e}", env.rank, env.world_size))?;
    let rank = env.rank;
    let mut log = |line: &str| {
        if rank == 0 {
            crate::logging::line(Some(rank), line)
        }
    };
    job.run(comm, &device, &mut log)
        .map_err(|e| anyhow!("rank {rank}: {e}"))
}

#[cfg(not(feature = "nccl"))]
fn over_nccl<J: RankJob>(env: &ProcessEnv, _job: &J, _device: &DeviceArgs) -> Result<J::Output> {
    bail!(
        "this process is rank {} of {} launched processes (RANK/WORLD_SIZE are set), but this \
         longview was built without NCCL: build it with `--features nccl` for multi-GPU runs, \
         or unset RANK and WORLD_SIZE to run the ranks as threads of one process on the CPU",
        env.rank,
        env.world_size
    )
}

/// `--nproc N`: makes this process the launcher of an N-process job on this machine
/// (one process per GPU, as `cargo xtask launch --nproc N` does): the same command
/// line without `--nproc`, run N times with torchrun's variables, every line prefixed
/// with its rank, all stopped when one fails. Returns `true` once the job has ended
/// well (this process has nothing else to do), `false` when there is nothing to
/// launch (no `--nproc`, or this process is already a rank of a job).
pub fn launch_here(nproc: Option<usize>) -> Result<bool> {
    let Some(nproc) = nproc else {
        return Ok(false);
    };
    if std::env::var_os("RANK").is_some() || std::env::var_os("SLURM_PROCID").is_some() {
        return Ok(false);
    }
    if nproc == 0 {
        bail!("--nproc 0: a job needs at least one process");
    }
    let mut command = without_nproc(std::env::args_os().collect());
    command[0] = std::env::current_exe()?.into();
    let options = longview_launch::LaunchOptions {
        nproc,
        master_port: 0,
        command,
    };
    match longview_launch::launch_local(&options)? {
        0 => Ok(true),
        code => bail!("a rank of the {nproc}-process job exited with status {code}"),
    }
}

/// The arguments without `--nproc N` / `--nproc=N`.
fn without_nproc(args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let mut out = Vec::with_capacity(args.len());
    let mut skip_value = false;
    for arg in args {
        if skip_value {
            skip_value = false;
            continue;
        }
        match arg.to_str() {
            Some("--nproc") => skip_value = true,
            Some(a) if a.starts_with("--nproc=") => {}
            _ => out.push(arg),
        }
    }
    out
}

/// The text of a panic payload (`panic!` with a message gives a `String` or `&str`).
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(no message)".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(rank: usize, world: usize) -> ProcessEnv {
        ProcessEnv {
            rank,
            world_size: world,
            local_rank: rank,
            local_world_size: world,
            master_addr: "127.0.0.1".into(),
            master_port: 29500,
        }
    }

    #[test]
    fn a_launch_must_start_one_process_per_rank() {
        assert_eq!(
            Ranks::resolve_with(None, 4, "--parallel 2x2").unwrap(),
            Ranks::InProcess { world: 4 }
        );
        let ranks = Ranks::resolve_with(Some(env(1, 4)), 4, "--parallel 2x2").unwrap();
        assert_eq!(ranks, Ranks::Process(env(1, 4)));
        assert!(!ranks.prints(), "rank 1 of a launch stays quiet");
        assert!(
            Ranks::resolve_with(Some(env(0, 4)), 4, "x")
                .unwrap()
                .prints()
        );
        let message = Ranks::resolve_with(Some(env(0, 2)), 4, "--parallel 2x2")
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("--parallel 2x2 makes 4 ranks")
                && message.contains("WORLD_SIZE=2")
                && message.contains("--nproc 4"),
            "{message}"
        );
    }

    #[cfg(not(feature = "nccl"))]
    #[test]
    fn a_launched_rank_without_nccl_says_how_to_build_it() {
        struct Nothing;
        impl RankJob for Nothing {
            type Output = ();
            fn run<C: Communicator + Send + Sync + 'static>(
                &self,
                _: C,
                _: &Device,
                _: &mut dyn FnMut(&str),
            ) -> Result<(), TrainError> {
                Ok(())
            }
        }
        let args = DeviceArgs {
            device: "cuda".into(),
            dtype: "bf16".into(),
            seed: None,
        };
        let message = Ranks::Process(env(0, 2))
            .run(&Nothing, &args)
            .unwrap_err()
            .to_string();
        assert!(message.contains("--features nccl"), "{message}");
    }

    #[test]
    fn the_ranks_run_the_command_line_without_nproc() {
        let args = |v: &[&str]| -> Vec<std::ffi::OsString> { v.iter().map(Into::into).collect() };
        assert_eq!(
            without_nproc(args(&["lv", "train", "--nproc", "4", "--parallel", "1x4"])),
            args(&["lv", "train", "--parallel", "1x4"])
        );
        assert_eq!(
            without_nproc(args(&["lv", "eval", "--nproc=2", "--parallel", "2"])),
            args(&["lv", "eval", "--parallel", "2"])
        );
    }

    #[test]
    fn a_rank_panic_is_reported_with_its_message() {
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let formatted = std::panic::catch_unwind(|| panic!("rank {}: all_gather gave up", 1));
        let literal = std::panic::catch_unwind(|| panic!("plain text"));
        std::panic::set_hook(hook);
        assert_eq!(
            panic_message(&*formatted.unwrap_err()),
            "rank 1: all_gather gave up"
        );
        assert_eq!(panic_message(&*literal.unwrap_err()), "plain text");
    }
}
