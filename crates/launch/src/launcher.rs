use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::LaunchError;

static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);

#[cfg(unix)]
extern "C" fn request_stop(_signal: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    STOP_REQUESTED.store(true, Ordering::SeqCst);
}

#[cfg(unix)]
fn install_stop_handlers() {
    let handler = request_stop as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

/// What [`launch_local`] starts.
#[derive(Debug, Clone)]
pub struct LaunchOptions {
    /// Processes to start (one per GPU).
    pub nproc: usize,
    /// Rank 0's rendezvous port; 0 picks a free one.
    pub master_port: u16,
    /// The program and its arguments, run once per rank.
    pub command: Vec<OsString>,
}

/// Starts `nproc` copies of the command with torchrun's variables (`RANK`,
/// `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR=127.0.0.1`,
/// `MASTER_PORT`) and `LONGVIEW_JOB_ID` (a fresh id for this launch, unless the
/// launcher's own environment sets one, which is passed on), prefixes each output line
/// with `[rank r]`, and waits. When a rank fails, the others are killed and its exit
/// code is returned; 0 when all succeed.
pub fn launch_local(options: &LaunchOptions) -> Result<i32, LaunchError> {
    let (program, args) = options
        .command
        .split_first()
        .ok_or_else(|| LaunchError::Launch("no command to launch".into()))?;
    if options.nproc == 0 {
        return Err(LaunchError::Launch("--nproc must be at least 1".into()));
    }
    let port = if options.master_port == 0 {
        free_port()?
    } else {
        options.master_port
    };
    let job_id = launch_job_id(port);
    // The ranks sit in their own process groups, out of reach of the terminal's Ctrl-C:
    // the launcher catches it (and SIGTERM) and stops them itself, from before the
    // first rank starts (a Ctrl-C while they start would otherwise leave them running).
    #[cfg(unix)]
    install_stop_handlers();
    let mut children: Vec<Child> = Vec::new();
    let mut pipes = Vec::new();
    for rank in 0..options.nproc {
        let mut command = Command::new(program);
        // Each rank leads its own process group so that stopping it also stops whatever
        // it started (shell wrappers, data workers) and their hold on the output pipes.
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let spawned = command
            .args(args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", options.nproc.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("LOCAL_WORLD_SIZE", options.nproc.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env("LONGVIEW_JOB_ID", &job_id)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => {
                for mut c in children {
                    stop(&mut c);
                }
                return Err(LaunchError::Launch(format!(
                    "cannot start {program:?}: {e}"
                )));
            }
        };
        let out = child.stdout.take().expect("piped");
        let err = child.stderr.take().expect("piped");
        pipes.push(std::thread::spawn(move || forward(out, rank, false)));
        pipes.push(std::thread::spawn(move || forward(err, rank, true)));
        children.push(child);
    }
    let mut running: Vec<Option<Child>> = children.into_iter().map(Some).collect();
    let mut failure: Option<(usize, i32)> = None;
    while running.iter().any(Option::is_some) {
        if STOP_REQUESTED.load(Ordering::SeqCst) {
            eprintln!("[launcher] interrupted; stopping every rank");
            for child in running.iter_mut().flatten() {
                stop(child);
            }
            return Ok(130);
        }
        for (rank, slot) in running.iter_mut().enumerate() {
            let Some(child) = slot else { continue };
            match child.try_wait() {
                Ok(Some(status)) => {
                    *slot = None;
                    if !status.success() && failure.is_none() {
                        // Killed by a signal: there is no exit code; report 1 so failure stays visible.
                        failure = Some((rank, status.code().unwrap_or(1)));
                    }
                }
                Ok(None) => {}
                Err(e) => return Err(LaunchError::Launch(format!("waiting for rank {rank}: {e}"))),
            }
        }
        if let Some((rank, code)) = failure {
            let others: Vec<usize> = (0..running.len())
                .filter(|&r| running[r].is_some())
                .collect();
            if !others.is_empty() {
                eprintln!(
                    "[launcher] rank {rank} exited with code {code}; stopping ranks {others:?}"
                );
            }
            for child in running.iter_mut().flatten() {
                stop(child);
            }
            running.iter_mut().for_each(|slot| *slot = None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for pipe in pipes {
        let _ = pipe.join();
    }
    Ok(failure.map_or(0, |(_, code)| code))
}

/// Kills the rank's whole process group, then reaps the rank.
fn stop(child: &mut Child) {
    #[cfg(unix)]
    // SAFETY: kill(2) with a negative pid signals the process group we created for this
    // child (its pid is the group id); no memory is touched.
    unsafe {
        libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL);
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn forward(stream: impl std::io::Read, rank: usize, to_stderr: bool) {
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { break };
        if to_stderr {
            let _ = writeln!(std::io::stderr().lock(), "[rank {rank}] {line}");
        } else {
            let _ = writeln!(std::io::stdout().lock(), "[rank {rank}] {line}");
        }
    }
}

/// The job id for the ranks of one launch: the launcher's `LONGVIEW_JOB_ID` when set,
/// else one made from this process, the port and the time, so that two launches on one
/// machine never take each other's ranks.
fn launch_job_id(port: u16) -> String {
    if let Ok(id) = std::env::var("LONGVIEW_JOB_ID")
        && !id.trim().is_empty()
    {
        return id;
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("local-{}-{port}-{nanos:x}", std::process::id())
}

fn free_port() -> Result<u16, LaunchError> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))
        .map_err(|e| LaunchError::Launch(format!("cannot find a free port: {e}")))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| LaunchError::Launch(format!("cannot find a free port: {e}")))
}
