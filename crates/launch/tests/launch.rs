//! Rank variables, the rendezvous and the local launcher.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use longview_launch::{
    DEFAULT_JOB_ID, LaunchOptions, ProcessEnv, job_id_from_vars, launch_local, share_from_rank0,
};

fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |name| map.get(name).cloned()
}

#[test]
fn torchrun_and_slurm_variables_are_read_and_bad_ones_named() {
    let env = ProcessEnv::from_vars(vars(&[
        ("RANK", "5"),
        ("WORLD_SIZE", "8"),
        ("LOCAL_RANK", "1"),
        ("LOCAL_WORLD_SIZE", "4"),
        ("MASTER_ADDR", "node0"),
        ("MASTER_PORT", "29500"),
    ]))
    .unwrap()
    .unwrap();
    assert_eq!(
        (
            env.rank,
            env.world_size,
            env.local_rank,
            env.local_world_size
        ),
        (5, 8, 1, 4)
    );
    assert_eq!(
        (env.master_addr.as_str(), env.master_port),
        ("node0", 29500)
    );

    let slurm = ProcessEnv::from_vars(vars(&[
        ("SLURM_PROCID", "6"),
        ("SLURM_NTASKS", "8"),
        ("SLURM_LOCALID", "2"),
        ("SLURM_NTASKS_PER_NODE", "4(x2)"),
        ("MASTER_ADDR", "node0"),
        ("MASTER_PORT", "29501"),
    ]))
    .unwrap()
    .unwrap();
    assert_eq!(
        (
            slurm.rank,
            slurm.world_size,
            slurm.local_rank,
            slurm.local_world_size
        ),
        (6, 8, 2, 4)
    );

    assert_eq!(
        ProcessEnv::from_vars(vars(&[])).unwrap(),
        None,
        "no variables: one process"
    );

    let err = |pairs: &[(&str, &str)]| ProcessEnv::from_vars(vars(pairs)).unwrap_err().to_string();
    let e = err(&[("RANK", "0")]);
    assert!(e.contains("WORLD_SIZE is not set"), "{e}");
    let e = err(&[("RANK", "two"), ("WORLD_SIZE", "4")]);
    assert!(
        e.contains("RANK=\"two\"") && e.contains("non-negative integer"),
        "{e}"
    );
    let e = err(&[("RANK", "4"), ("WORLD_SIZE", "4")]);
    assert!(e.contains("below the world size 4"), "{e}");
    let e = err(&[("RANK", "0"), ("WORLD_SIZE", "2")]);
    assert!(e.contains("MASTER_ADDR is not set"), "{e}");
    let e = err(&[
        ("RANK", "0"),
        ("WORLD_SIZE", "2"),
        ("MASTER_ADDR", "h"),
        ("MASTER_PORT", "99999"),
    ]);
    assert!(e.contains("MASTER_PORT=\"99999\""), "{e}");
    // Port 0 is no port a peer can dial.
    let e = err(&[
        ("RANK", "0"),
        ("WORLD_SIZE", "2"),
        ("MASTER_ADDR", "h"),
        ("MASTER_PORT", "0"),
    ]);
    assert!(e.contains("MASTER_PORT=\"0\""), "{e}");
    // Without --ntasks-per-node SLURM sets only SLURM_TASKS_PER_NODE ("3(x2),2": 3
    // tasks on nodes 0 and 1, 2 on node 2).
    for (rank, node, local, per_node) in [("4", "1", "1", 3), ("7", "2", "1", 2)] {
        let slurm = ProcessEnv::from_vars(vars(&[
            ("SLURM_PROCID", rank),
            ("SLURM_NTASKS", "8"),
            ("SLURM_NODEID", node),
            ("SLURM_LOCALID", local),
            ("SLURM_TASKS_PER_NODE", "3(x2),2"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29501"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(slurm.local_world_size, per_node, "rank {rank}");
    }
}

#[test]
fn the_job_id_comes_from_longview_then_slurm_then_torchrun() {
    let id = |pairs: &[(&str, &str)]| job_id_from_vars(vars(pairs)).unwrap();
    let all = [
        ("LONGVIEW_JOB_ID", "lv-7"),
        ("SLURM_JOB_ID", "123456"),
        ("TORCHELASTIC_RUN_ID", "run-9"),
    ];
    assert_eq!(id(&all), "lv-7");
    assert_eq!(id(&all[1..]), "123456");
    assert_eq!(id(&all[2..]), "run-9");
    // Blank values do not count; nothing set gives the documented default.
    assert_eq!(
        id(&[("LONGVIEW_JOB_ID", "  "), ("SLURM_JOB_ID", " 42 ")]),
        "42"
    );
    assert_eq!(id(&[]), DEFAULT_JOB_ID);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn env(rank: usize, world: usize, port: u16) -> ProcessEnv {
    ProcessEnv {
        rank,
        world_size: world,
        local_rank: rank,
        local_world_size: world,
        master_addr: "127.0.0.1".into(),
        master_port: port,
    }
}

#[test]
fn rank0_bytes_reach_every_rank() {
    let port = free_port();
    let payload: Vec<u8> = (0..128u8).collect();
    let results: Vec<Vec<u8>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .rev() // the others start before rank 0 listens: they must retry
            .map(|rank| {
                let payload = &payload;
                scope.spawn(move || {
                    let mine = (rank == 0).then_some(payload.as_slice());
                    share_from_rank0(&env(rank, 4, port), mine, Duration::from_secs(20)).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for got in results {
        assert_eq!(got, payload);
    }
}

#[test]
fn a_missing_rank0_or_peer_ends_in_a_timeout_error() {
    let port = free_port();
    let start = Instant::now();
    let e = share_from_rank0(&env(1, 2, port), None, Duration::from_millis(400)).unwrap_err();
    assert!(e.to_string().contains("could not fetch from rank 0"), "{e}");
    assert!(start.elapsed() < Duration::from_secs(5));
    let e =
        share_from_rank0(&env(0, 3, port), Some(b"id"), Duration::from_millis(400)).unwrap_err();
    assert!(
        e.to_string().contains("ranks [1, 2] never connected"),
        "{e}"
    );
}

#[test]
fn launcher_sets_the_variables_and_stops_everyone_when_a_rank_fails() {
    let dir = std::env::temp_dir().join(format!("longview-launch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = format!(
        "echo \"$RANK $WORLD_SIZE $LOCAL_RANK $LOCAL_WORLD_SIZE $MASTER_ADDR $LONGVIEW_JOB_ID\" > {}/$RANK",
        dir.display()
    );
    let options = LaunchOptions {
        nproc: 3,
        master_port: 0,
        command: vec!["sh".into(), "-c".into(), script.into()],
    };
    assert_eq!(launch_local(&options).unwrap(), 0);
    let mut job_ids = Vec::new();
    for rank in 0..3 {
        let line = std::fs::read_to_string(dir.join(rank.to_string())).unwrap();
        let (fields, job_id) = line.trim().rsplit_once(' ').expect("a job id");
        assert_eq!(fields, format!("{rank} 3 {rank} 3 127.0.0.1"));
        job_ids.push(job_id.to_string());
    }
    // One fresh job id for the launch, the same for every rank.
    assert!(job_ids[0].starts_with("local-"), "{job_ids:?}");
    assert!(job_ids.iter().all(|id| *id == job_ids[0]), "{job_ids:?}");
    std::fs::remove_dir_all(&dir).unwrap();

    // Rank 1 fails at once; the others would sleep for a minute.
    let failing = LaunchOptions {
        nproc: 3,
        master_port: 0,
        command: vec![
            "sh".into(),
            "-c".into(),
            "if [ \"$RANK\" = 1 ]; then exit 3; fi; sleep 60".into(),
        ],
    };
    let start = Instant::now();
    assert_eq!(launch_local(&failing).unwrap(), 3);
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "the launcher waited for the sleepers"
    );
}
