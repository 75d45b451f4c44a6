use crate::LaunchError;

/// This process's place in a multi-process job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessEnv {
    pub rank: usize,
    pub world_size: usize,
    /// Rank on this node: the GPU index to use.
    pub local_rank: usize,
    /// Processes on this node.
    pub local_world_size: usize,
    pub master_addr: String,
    pub master_port: u16,
}

const MASTER_HINT: &str = "set it to rank 0's host and a free port (torchrun sets both; under \
                           SLURM use e.g. MASTER_ADDR=$(scontrol show hostnames \
                           $SLURM_JOB_NODELIST | head -n1) MASTER_PORT=29500)";

/// Node `node`'s entry of a SLURM task-count list (`4`, `3(x2),2`: 3, 3, 2).
fn tasks_on_node(spec: &str, node: usize) -> Option<usize> {
    let mut seen = 0;
    for part in spec.split(',') {
        let (count, repeat) = match part.trim().split_once("(x") {
            Some((count, rest)) => (count, rest.trim_end_matches(')').trim().parse().ok()?),
            None => (part, 1),
        };
        let count: usize = count.trim().parse().ok()?;
        if node < seen + repeat {
            return Some(count);
        }
        seen += repeat;
    }
    None
}

impl ProcessEnv {
    /// Reads the process environment; `None` when neither torchrun's nor SLURM's
    /// variables are present (a single-process run).
    pub fn from_env() -> Result<Option<Self>, LaunchError> {
        // A value that is not UTF-8 is read lossily, so that it fails to parse with the
        // variable named instead of passing as unset.
        Self::from_vars(|name| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned()))
    }

    /// As [`ProcessEnv::from_env`], reading variables through `get` (for tests).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, LaunchError> {
        let number = |name: &'static str| -> Result<Option<usize>, LaunchError> {
            get(name)
                .map(|value| {
                    value
                        .trim()
                        .parse::<usize>()
                        .map_err(|_| LaunchError::Variable {
                            name,
                            value: value.clone(),
                            reason: "expected a non-negative integer".into(),
                        })
                })
                .transpose()
        };
        let (rank, world_size, local_rank, local_world_size) = if get("RANK").is_some() {
            let rank = number("RANK")?.expect("checked");
            let world = number("WORLD_SIZE")?.ok_or_else(|| LaunchError::Missing {
                name: "WORLD_SIZE",
                hint: "RANK is set, so the number of processes is needed too".into(),
            })?;
            let local_rank = number("LOCAL_RANK")?.unwrap_or(rank);
            let local_world = number("LOCAL_WORLD_SIZE")?.unwrap_or(world);
            (rank, world, local_rank, local_world)
        } else if get("SLURM_PROCID").is_some() {
            let rank = number("SLURM_PROCID")?.expect("checked");
            let world = number("SLURM_NTASKS")?.ok_or_else(|| LaunchError::Missing {
                name: "SLURM_NTASKS",
                hint: "SLURM_PROCID is set; run the job with srun so SLURM sets both".into(),
            })?;
            let local_rank = number("SLURM_LOCALID")?.unwrap_or(0);
            // Tasks on this node: SLURM_NTASKS_PER_NODE (set under --ntasks-per-node,
            // the same on every node), else SLURM_TASKS_PER_NODE ("3(x2),2": the
            // counts of the nodes in order) at SLURM_NODEID, else every task.
            let node = number("SLURM_NODEID")?.unwrap_or(0);
            let per_node = get("SLURM_NTASKS_PER_NODE")
                .and_then(|v| tasks_on_node(&v, 0))
                .or_else(|| get("SLURM_TASKS_PER_NODE").and_then(|v| tasks_on_node(&v, node)))
                .unwrap_or(world);
            (rank, world, local_rank, per_node)
        } else {
            return Ok(None);
        };
        if world_size == 0 || rank >= world_size {
            return Err(LaunchError::Variable {
                name: "RANK",
                value: rank.to_string(),
                reason: format!("must be below the world size {world_size}"),
            });
        }
        if local_world_size == 0 || local_rank >= local_world_size {
            return Err(LaunchError::Variable {
                name: "LOCAL_RANK",
                value: local_rank.to_string(),
                reason: format!("must be below the local world size {local_world_size}"),
            });
        }
        let master_addr = get("MASTER_ADDR").ok_or_else(|| LaunchError::Missing {
            name: "MASTER_ADDR",
            hint: MASTER_HINT.into(),
        })?;
        let port = get("MASTER_PORT").ok_or_else(|| LaunchError::Missing {
            name: "MASTER_PORT",
            hint: MASTER_HINT.into(),
        })?;
        let master_port = port
            .trim()
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| LaunchError::Variable {
                name: "MASTER_PORT",
                value: port.clone(),
                reason: "expected a TCP port (1-65535)".into(),
            })?;
        Ok(Some(ProcessEnv {
            rank,
            world_size,
            local_rank,
            local_world_size,
            master_addr,
            master_port,
        }))
    }
}

/// Variables naming the job, most specific first; the first one set (and not blank) is
/// the job id that every rank puts in its rendezvous hello.
pub const JOB_ID_VARIABLES: [&str; 3] = ["LONGVIEW_JOB_ID", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"];

/// The job id when none of [`JOB_ID_VARIABLES`] is set: such jobs are told apart only
/// by their port and world size.
pub const DEFAULT_JOB_ID: &str = "longview-default-job";

/// This job's identity for the rendezvous, from the process environment (see
/// [`job_id_from_vars`]).
pub fn job_id_from_env() -> Result<String, LaunchError> {
    job_id_from_vars(|name| std::env::var(name).ok())
}

/// The first of `LONGVIEW_JOB_ID` (set by [`crate::launch_local`] for its ranks),
/// `SLURM_JOB_ID` and `TORCHELASTIC_RUN_ID` (torchrun's `--rdzv-id`) that is set and not
/// blank, trimmed; [`DEFAULT_JOB_ID`] when none is. Every rank of a job must see the
/// same value. An id over [`crate::MAX_JOB_ID_BYTES`] bytes is an error naming the
/// variable.
pub fn job_id_from_vars(get: impl Fn(&str) -> Option<String>) -> Result<String, LaunchError> {
    for name in JOB_ID_VARIABLES {
        let Some(value) = get(name) else { continue };
        let id = value.trim();
        if id.is_empty() {
            continue;
        }
        if id.len() > crate::MAX_JOB_ID_BYTES {
            let reason = format!(
                "a job id may be at most {} bytes (MAX_JOB_ID_BYTES), this one is {}",
                crate::MAX_JOB_ID_BYTES,
                id.len()
            );
            return Err(LaunchError::Variable {
                name,
                value,
                reason,
            });
        }
        return Ok(id.to_string());
    }
    Ok(DEFAULT_JOB_ID.to_string())
}
