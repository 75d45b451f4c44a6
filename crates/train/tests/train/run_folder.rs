//! Resume, checkpoints and the run folder: a stopped-and-resumed run repeats the
//! uninterrupted one, a named checkpoint can be resumed, one process per folder, a
//! config that changes the run is refused, a damaged checkpoint names the one before,
//! and the event files TensorBoard reads.

use super::*;

#[test]
fn a_resumed_run_repeats_the_uninterrupted_loss_curve() {
    let _serial = serial();
    let tmp = TempDir::new("resume");
    let cache = tmp.0.join("cache");
    let options = no_progress();

    let whole = tiny(&tmp.0.join("whole"), &cache);
    let straight = train(&whole, &options, &device(), &mut quiet()).unwrap();
    assert_eq!(straight.losses.len(), 6);
    assert!(straight.losses.iter().all(|l| l.is_finite()));

    // Stop after 3 steps (a checkpoint is written at the stop), then resume twice:
    // once with an unfinished checkpoint lying around as a crash would leave it.
    let split = tiny(&tmp.0.join("split"), &cache);
    let first = train(
        &split,
        &TrainOptions {
            stop_after: Some(3),
            ..options.clone()
        },
        &device(),
        &mut quiet(),
    )
    .unwrap();
    assert_eq!(first.last_step, 3);
    let partial = split.run.out.join("checkpoints/.step-000004.partial");
    std::fs::create_dir_all(partial.join("model")).unwrap();
    std::fs::write(partial.join("trainer.json"), "{ truncated").unwrap();

    let err = train(&split, &options, &device(), &mut quiet()).unwrap_err();
    assert!(
        err.to_string().contains("--resume"),
        "a second run into a folder with checkpoints must ask for --resume: {err}"
    );
    assert!(
        !partial.exists(),
        "the crashed run's partial checkpoint is removed"
    );

    let mut logs = Vec::new();
    let resumed = train(
        &split,
        &TrainOptions {
            resume: true,
            ..options.clone()
        },
        &device(),
        &mut |l: &str| logs.push(l.to_string()),
    )
    .unwrap();
    assert!(
        logs.iter()
            .any(|l| l.contains("resuming") && l.contains("step 3")),
        "{logs:?}"
    );
    assert_eq!(resumed.first_step, 3);
    assert_eq!(resumed.losses.len(), 6);
    for (step, (a, b)) in straight.losses.iter().zip(&resumed.losses).enumerate() {
        assert!(
            (a - b).abs() <= 1e-6 * a.abs().max(1.0),
            "step {}: uninterrupted {a} vs resumed {b}",
            step + 1
        );
    }
    // The metrics file is one curve of 6 steps.
    let metrics = std::fs::read_to_string(split.run.out.join("metrics.jsonl")).unwrap();
    assert!(
        !metrics.contains("\"phases\""),
        "steps are timed by part only with phase_timings"
    );
    let steps: Vec<u64> = metrics
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, vec![1, 2, 3, 4, 5, 6]);
    // One TensorBoard event file per invocation that trained.
    let event_files = std::fs::read_dir(split.run.out.join("tensorboard"))
        .unwrap()
        .filter(|e| {
            let e = e.as_ref().unwrap();
            e.file_name()
                .to_string_lossy()
                .starts_with("events.out.tfevents.")
                && e.metadata().unwrap().len() > 0
        })
        .count();
    assert_eq!(event_files, 2, "one event file per training invocation");
    // Only the newest two checkpoints are kept, and `latest` names the last.
    let mut kept: Vec<String> = std::fs::read_dir(split.run.out.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-"))
        .collect();
    kept.sort();
    assert_eq!(kept, vec!["step-000004", "step-000006"]);
    let latest = std::fs::read_to_string(split.run.out.join("checkpoints/latest")).unwrap();
    assert_eq!(latest.trim(), "step-000006");
    // The held-out set was scored at the end: 6 depths x 1 video.
    let report = resumed.eval.expect("scored at the last step");
    assert_eq!(report.total, 6);
    assert_eq!(report.per_depth.len(), 6);

    // `latest` pointing at a missing folder is an error naming it, not a fresh start.
    std::fs::write(split.run.out.join("checkpoints/latest"), "step-000099").unwrap();
    let err = train(
        &split,
        &TrainOptions {
            resume: true,
            ..options.clone()
        },
        &device(),
        &mut quiet(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("step-000099"), "{err}");
}

#[test]
fn tensorboard_events_match_tensorboards_own_writer() {
    let _serial = serial();
    // tests/fixtures/tensorboard_events.bin: TensorBoard 2.21's RecordWriter and protos
    // (make_tensorboard_fixture.py) for the same events.
    let tmp = TempDir::new("tensorboard");
    let path = tmp.0.join("events.out.tfevents.test");
    let mut writer =
        longview_train::tensorboard::EventWriter::create_at(&path, 1700000000.5).unwrap();
    writer.scalar("train/loss", 1, 2.5, 1700000001.25).unwrap();
    writer.scalar("train/lr", 1, 0.001, 1700000001.25).unwrap();
    writer.scalar("train/loss", 2, 1.75, 1700000002.0).unwrap();
    writer
        .scalar("eval/needle_accuracy", 300, 0.0, 1700000003.0)
        .unwrap();
    writer.session_start(301, 1700000004.0).unwrap();
    writer.flush().unwrap();
    let ours = std::fs::read(&path).unwrap();
    let reference = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tensorboard_events.bin"),
    )
    .unwrap();
    assert_eq!(ours.len(), reference.len());
    assert!(
        ours == reference,
        "event bytes differ from TensorBoard's writer"
    );
}

#[test]
fn resume_from_a_named_checkpoint_repeats_the_curve_from_there() {
    let _serial = serial();
    let tmp = TempDir::new("resume-from");
    let cache = tmp.0.join("cache");
    let options = no_progress();
    let config = tiny(&tmp.0.join("run"), &cache);
    let straight = train(&config, &options, &device(), &mut quiet()).unwrap();
    // keep_checkpoints = 2: steps 4 and 6 are on disk; go back to step 4.
    let step4 = config.run.out.join("checkpoints/step-000004");
    assert!(step4.join("trainer.json").exists());
    let from4 = TrainOptions {
        resume_from: Some(step4),
        ..options.clone()
    };
    let again = train(&config, &from4, &device(), &mut quiet()).unwrap();
    assert_eq!((again.first_step, again.last_step), (4, 6));
    assert_eq!(again.losses, straight.losses);
    // A folder that is no checkpoint is named in the error.
    let bogus = TrainOptions {
        resume_from: Some(tmp.0.join("nothing-here")),
        ..options
    };
    let message = train(&config, &bogus, &device(), &mut quiet())
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("nothing-here") && message.contains("not a complete checkpoint"),
        "{message}"
    );
}

#[test]
fn a_second_process_on_the_same_run_folder_is_refused() {
    let _serial = serial();
    let tmp = TempDir::new("lock");
    let config = tiny(&tmp.0.join("run"), &tmp.0.join("cache"));
    let options = no_progress();
    std::fs::create_dir_all(&config.run.out).unwrap();
    // A live process (this one) holds the lock.
    let lock = config.run.out.join(".lock");
    std::fs::write(&lock, std::process::id().to_string()).unwrap();
    let message = train(&config, &options, &device(), &mut quiet())
        .unwrap_err()
        .to_string();
    assert!(
        message.contains(&format!("process {}", std::process::id())),
        "{message}"
    );
    assert!(
        !config.run.out.join("checkpoints").exists(),
        "nothing was written"
    );
    // A lock left by a process that is gone is taken over, and released at the end.
    std::fs::write(&lock, "4294967").unwrap();
    let mut short = config.clone();
    short.run.steps = 2;
    short.optim.warmup_steps = 1;
    train(&short, &options, &device(), &mut quiet()).unwrap();
    assert!(!lock.exists(), "the lock is released when the run ends");
}

#[test]
fn resuming_with_a_config_that_changes_the_run_is_refused_unless_allowed() {
    let _serial = serial();
    let tmp = TempDir::new("resume-config");
    let config = tiny(&tmp.0.join("run"), &tmp.0.join("cache"));
    let options = TrainOptions {
        progress: false,
        stop_after: Some(2),
        ..TrainOptions::default()
    };
    train(&config, &options, &device(), &mut quiet()).unwrap();
    let mut changed = config.clone();
    changed.run.batch_size = 1;
    changed.optim.lr = 5e-4;
    changed.run.checkpoint_every = 3; // cadence may change
    let resume = TrainOptions {
        resume: true,
        stop_after: Some(1),
        ..options.clone()
    };
    let message = train(&changed, &resume, &device(), &mut quiet())
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("run.batch_size: 2 -> 1") && message.contains("optim.lr"),
        "{message}"
    );
    assert!(!message.contains("checkpoint_every"), "{message}");
    // Fewer steps than the checkpoint has done: refused, naming both numbers.
    let mut shorter = config.clone();
    shorter.run.steps = 1;
    shorter.optim.warmup_steps = 1;
    let message = train(&shorter, &resume, &device(), &mut quiet())
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("at step 2 but run.steps is 1"),
        "{message}"
    );
    let allowed = TrainOptions {
        allow_config_change: true,
        ..resume
    };
    let summary = train(&changed, &allowed, &device(), &mut quiet()).unwrap();
    assert_eq!(summary.last_step, 3);
}

#[test]
fn a_damaged_latest_checkpoint_names_the_file_and_the_one_before() {
    let _serial = serial();
    let tmp = TempDir::new("damaged");
    let config = tiny(&tmp.0.join("run"), &tmp.0.join("cache"));
    let options = no_progress();
    train(&config, &options, &device(), &mut quiet()).unwrap();
    // keep_checkpoints = 2 leaves steps 4 and 6; cut step 6's LLM weights short.
    let weights = config
        .run
        .out
        .join("checkpoints/step-000006/model/llm/model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let mut longer = config.clone();
    longer.run.steps = 8;
    let resume = TrainOptions {
        resume: true,
        ..options
    };
    let message = train(&longer, &resume, &device(), &mut quiet())
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("step-000006") && message.contains("--resume"),
        "{message}"
    );
    assert!(message.contains("step-000004"), "{message}");
    assert!(message.contains("llm"), "names the damaged part: {message}");
}
