//! Runs that stop and continue: an interrupted run resumed ends with exactly the metrics of an
//! uninterrupted one; Ctrl-C saves and exits cleanly; a diverging run stops with a clear
//! message and keeps its last good state.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};

use bnlab::config::{OptimizerKind, RunConfig};
use bnlab::data::FashionMnist;
use bnlab::report::EpochMetrics;
use bnlab::train::{self, resume, Observer, Progress, Quiet, RunOptions};

/// Asks the run to stop after `after` training steps.
struct StopAfter<'a> {
    after: usize,
    steps: usize,
    stop: &'a AtomicBool,
}

impl Observer for StopAfter<'_> {
    fn step_done(&mut self) {
        self.steps += 1;
        if self.steps == self.after {
            self.stop.store(true, Ordering::SeqCst);
        }
    }
}

fn learning_values(metrics: &[EpochMetrics]) -> Vec<(usize, f64, f64, Option<f64>)> {
    metrics
        .iter()
        .map(|m| (m.epoch, m.train_loss, m.train_acc, m.test_acc))
        .collect()
}

fn run_interrupted_and_resumed(
    config: &RunConfig,
    data: &FashionMnist,
    stop_after: usize,
) -> Vec<EpochMetrics> {
    let dir = tempfile::tempdir().unwrap();
    bnlab::train::checkpoint::save_config(dir.path(), config).unwrap();
    let stop = AtomicBool::new(false);
    let options = RunOptions {
        dir: Some(dir.path()),
        stop: Some(&stop),
    };
    let model = config
        .model_spec()
        .init(config.seed, &train::train_device());
    let optim = train::optim::optimizer(config);
    let mut observer = StopAfter {
        after: stop_after,
        steps: 0,
        stop: &stop,
    };
    let first = train::run(
        config,
        data,
        model,
        optim,
        Progress::start(),
        &options,
        &mut observer,
    )
    .unwrap();
    assert!(first.interrupted, "the run stopped when asked");

    let resumed = resume::load(dir.path()).unwrap();
    assert_eq!(&resumed.config, config);
    let options = RunOptions {
        dir: Some(dir.path()),
        stop: None,
    };
    let p = resumed.progress;
    let rest = train::run(
        config,
        data,
        resumed.model,
        resumed.optim,
        p,
        &options,
        &mut Quiet,
    )
    .unwrap();
    assert!(!rest.interrupted);
    rest.metrics
}

/// Mid-epoch and at an epoch's end, with momentum and Adam state and StepLR in play.
#[test]
fn a_resumed_run_ends_exactly_like_an_uninterrupted_one() {
    let data = FashionMnist::load_default().unwrap();
    for (optimizer, lr) in [
        (OptimizerKind::SgdMomentum, 0.5),
        (OptimizerKind::Adam, 0.01),
    ] {
        let config = RunConfig {
            optimizer,
            lr,
            lr_step_size: Some(1),
            lr_gamma: 0.7,
            epochs: 3,
            limit_batches: Some(6),
            batch_size: 64,
            ..Default::default()
        };
        let whole = train::train(&config, &data, &mut Quiet).unwrap();
        // Step 9 is inside epoch 2; step 6 is the end of epoch 1.
        for stop_after in [9, 6] {
            let pieced = run_interrupted_and_resumed(&config, &data, stop_after);
            assert_eq!(
                learning_values(&pieced),
                learning_values(&whole.metrics),
                "{optimizer:?}, stopped after step {stop_after}"
            );
        }
    }
}

fn bnlab() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bnlab"))
}

fn read_metrics(path: &Path) -> Vec<EpochMetrics> {
    bnlab::report::read_jsonl(path).unwrap()
}

#[test]
fn ctrl_c_saves_and_resume_finishes_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (whole, pieced) = (tmp.path().join("whole"), tmp.path().join("pieced"));
    let args = [
        "train",
        "--epochs",
        "3",
        "--limit-batches",
        "25",
        "--batch-size",
        "64",
        "--json",
    ];
    let status = bnlab()
        .args(args)
        .arg("--out")
        .arg(&whole)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());

    let mut child = bnlab()
        .args(args)
        .arg("--out")
        .arg(&pieced)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupt once the first epoch is reported, i.e. somewhere in epoch 2.
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.contains("\"epoch\":1"), "{first}");
    let sigint = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sigint.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("interrupted: progress saved in"),
        "{stderr}"
    );
    assert!(stderr.contains("bnlab train --resume"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        !pieced.join("model.bpk").exists(),
        "no final model for an unfinished run"
    );

    let status = bnlab()
        .args(["train", "--resume"])
        .arg(&pieced)
        .stderr(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let (a, b) = (
        read_metrics(&whole.join("metrics.jsonl")),
        read_metrics(&pieced.join("metrics.jsonl")),
    );
    assert_eq!(learning_values(&a), learning_values(&b));
    assert!(pieced.join("model.bpk").is_file());

    // A finished run can be extended.
    let status = bnlab()
        .args(["train", "--epochs", "4", "--resume"])
        .arg(&pieced)
        .stderr(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(read_metrics(&pieced.join("metrics.jsonl")).len(), 4);
    // Other settings cannot change on resume.
    let out = bnlab()
        .args(["train", "--batch-size", "32", "--resume"])
        .arg(&pieced)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("only --epochs and a lower --lr may be given"));
}

#[test]
fn divergence_stops_with_a_clear_message_and_keeps_the_last_good_state() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    // No BN, and StepLR multiplies the learning rate by 1e37 after epoch 1: epoch 2 blows up.
    let out = bnlab()
        .args([
            "train",
            "--model",
            "lenet",
            "--lr",
            "0.5",
            "--lr-step-size",
            "1",
            "--lr-gamma",
            "1e37",
        ])
        .args(["--epochs", "3", "--limit-batches", "3", "--json", "--out"])
        .arg(&dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    let last = stderr.trim_end().lines().last().unwrap();
    assert!(
        last.contains("training diverged at epoch 2, step"),
        "{stderr}"
    );
    assert!(last.contains("try a lower --lr"), "{last}");
    assert!(
        last.contains(&format!(
            "the last good model, after epoch 1, is saved as {}",
            dir.join("last-good.bpk").display()
        )),
        "{last}"
    );
    // Nothing but finite numbers reached the metrics, and the good state can be resumed from.
    let metrics = read_metrics(&dir.join("metrics.jsonl"));
    assert_eq!(metrics.len(), 1);
    assert!(metrics[0].train_loss.is_finite());
    assert_eq!(resume::saved_epochs(&dir), Some(1));
    assert!(resume::load(&dir).is_ok());
    assert!(!String::from_utf8_lossy(&out.stdout).contains("NaN"));
    // The last good model is one that eval, export and inspect open, and the run directory
    // points to it.
    let out = bnlab().arg("inspect").arg(&dir).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("its last good model is"), "{stderr}");
    let kept = dir.join("last-good.bpk");
    let exported = tmp.path().join("kept.safetensors");
    for args in [
        vec![
            "eval",
            "--limit-batches",
            "1",
            "--checkpoint",
            kept.to_str().unwrap(),
        ],
        vec![
            "export",
            kept.to_str().unwrap(),
            "--out",
            exported.to_str().unwrap(),
        ],
        vec!["inspect", kept.to_str().unwrap()],
    ] {
        let out = bnlab().args(&args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Resuming may lower the learning rate, never raise it.
    let out = bnlab()
        .args(["train", "--lr", "1", "--resume"])
        .arg(&dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("may only lower its learning rate"),
        "{stderr}"
    );
}

/// With BN the loss can grow without ever becoming NaN; past a sane bound it counts as
/// divergence too, and a lower --lr on resume gets the run past the step that diverged.
#[test]
fn a_huge_finite_loss_stops_the_run_and_a_lower_lr_recovers_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    // Epoch 1 at lr 1, epoch 2 at lr 1e8.
    let out = bnlab()
        .args([
            "train",
            "--lr",
            "1",
            "--lr-step-size",
            "1",
            "--lr-gamma",
            "1e8",
        ])
        .args([
            "--epochs",
            "2",
            "--limit-batches",
            "6",
            "--batch-size",
            "64",
            "--out",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("training diverged at epoch 2"), "{stderr}");
    assert_eq!(resume::saved_epochs(&dir), Some(1));
    // 1e-8 × 1e8: epoch 2 now trains at lr 1.
    let out = bnlab()
        .args(["train", "--lr", "1e-8", "--resume"])
        .arg(&dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("learning rate 1 -> 0.00000001"), "{stderr}");
    let metrics = read_metrics(&dir.join("metrics.jsonl"));
    assert_eq!(metrics.len(), 2);
    assert!(metrics[1].train_loss < 10.0, "{:?}", metrics[1]);
    let config = bnlab::train::checkpoint::load_config(&dir).unwrap();
    assert_eq!(config.lr, 1e-8);
}

/// A run stopped before its first resume point holds only its config: `--resume` starts it
/// again in place, and removes the temporary files a killed process left.
#[test]
fn a_run_without_a_resume_point_restarts_in_place() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let ok = bnlab()
        .args(["train", "--epochs", "1", "--limit-batches", "2", "--out"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(ok.status.success());
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        if entry.file_name() != "config.json" {
            let path = entry.path();
            match path.is_dir() {
                true => std::fs::remove_dir_all(&path).unwrap(),
                false => std::fs::remove_file(&path).unwrap(),
            }
        }
    }
    // Starting over is refused while anything it would replace is there.
    std::fs::write(dir.join("model.bpk"), b"a model from elsewhere").unwrap();
    let out = bnlab()
        .args(["train", "--resume"])
        .arg(&dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("would replace its model.bpk"), "{stderr}");
    std::fs::remove_file(dir.join("model.bpk")).unwrap();
    let leftover = dir.join(".bnlab-Xy12ab.tmp");
    std::fs::write(&leftover, b"half a checkpoint").unwrap();
    let out = bnlab()
        .args(["train", "--resume"])
        .arg(&dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("has no resume point yet"), "{stderr}");
    assert!(dir.join("model.bpk").is_file());
    assert!(!leftover.exists(), "the leftover temporary file is removed");
    // Fewer epochs than are done is an error, and config.json keeps its value.
    let out = bnlab()
        .args(["train", "--epochs", "1", "--resume"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "as many as are done is fine");
    let status = bnlab()
        .args(["train", "--epochs", "2", "--resume"])
        .arg(&dir)
        .stderr(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let out = bnlab()
        .args(["train", "--epochs", "1", "--resume"])
        .arg(&dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--epochs 1: ") && stderr.contains("already finished 2 epochs"));
    let config = bnlab::train::checkpoint::load_config(&dir).unwrap();
    assert_eq!(config.epochs, 2);
}

#[test]
fn a_damaged_resume_state_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let ok = bnlab()
        .args(["train", "--epochs", "1", "--limit-batches", "2", "--out"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(ok.status.success());
    let resume_dir = dir.join("resume");
    let optim = std::fs::read_dir(&resume_dir)
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("optimizer"))
        .unwrap()
        .path();
    std::fs::write(&optim, b"garbage").unwrap();
    let out = bnlab()
        .args(["train", "--epochs", "2", "--resume"])
        .arg(&dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("truncated or corrupt optimizer state"),
        "{stderr}"
    );
    std::fs::write(resume_dir.join("state.json"), b"{").unwrap();
    let out = bnlab()
        .args(["train", "--resume"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("state.json: corrupt resume state"));
}

/// SIGTERM (`kill`, systemd, docker, Slurm) and two SIGINTs in the same instant (a terminal's
/// process group, `timeout -s INT`) both finish the step, save a resume point and exit 143 or
/// 130; the resumed run ends with an uninterrupted run's metrics.
#[test]
fn sigterm_and_a_double_sigint_leave_resumable_runs() {
    let tmp = tempfile::tempdir().unwrap();
    // Steps of 256 examples take about 25 ms here: the signals come 0.1 s into epoch 2's 20
    // steps, and the second SIGINT lands while a step runs or the resume point is written,
    // which is when quitting at once would lose them.
    let args = [
        "train",
        "--epochs",
        "2",
        "--limit-batches",
        "20",
        "--batch-size",
        "256",
        "--json",
    ];
    let whole = tmp.path().join("whole");
    let status = bnlab()
        .args(args)
        .arg("--out")
        .arg(&whole)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let expected = learning_values(&read_metrics(&whole.join("metrics.jsonl")));

    for (name, signals, code) in [
        ("term", &[libc::SIGTERM][..], 143),
        ("int-int", &[libc::SIGINT, libc::SIGINT], 130),
    ] {
        let dir = tmp.path().join(name);
        let mut child = bnlab()
            .args(args)
            .arg("--out")
            .arg(&dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = String::new();
        // Kept open until the child ends, so that its writes to stdout keep working.
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        stdout.read_line(&mut first).unwrap();
        assert!(first.contains("\"epoch\":1"), "{first}");
        std::thread::sleep(std::time::Duration::from_millis(100));
        for &signal in signals {
            assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
            // Apart enough to arrive as two signals, well within one "instant".
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let out = child.wait_with_output().unwrap();
        drop(stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{name}: {stderr}");
        assert!(
            stderr.contains("interrupted: progress saved in"),
            "{stderr}"
        );
        let stopped = resume::load(&dir).unwrap().progress;
        assert_eq!(stopped.epoch, 2, "{name}");
        assert!(stopped.steps_done > 0, "{name}: stopped mid-epoch");

        let status = bnlab()
            .args(["train", "--resume"])
            .arg(&dir)
            .stderr(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "{name}");
        let resumed = learning_values(&read_metrics(&dir.join("metrics.jsonl")));
        assert_eq!(resumed, expected, "{name}");
    }
}

/// Dropout's masks, batch renormalization's schedule (its step count lives in the model's
/// `num_batches_tracked`) and ghost BN's chunks come back the same after a resume.
#[test]
fn runs_with_dropout_renorm_or_ghost_bn_resume_exactly() {
    let data = FashionMnist::load_default().unwrap();
    let base = RunConfig {
        epochs: 2,
        limit_batches: Some(4),
        batch_size: 64,
        ..Default::default()
    };
    let configs = [
        RunConfig {
            dropout: 0.3,
            ..base.clone()
        },
        RunConfig {
            norm: Some("renorm".parse().unwrap()),
            renorm_warmup: 2,
            renorm_ramp: 4,
            ..base.clone()
        },
        RunConfig {
            norm: Some("ghost:16".parse().unwrap()),
            ..base.clone()
        },
    ];
    for config in configs {
        let whole = train::train(&config, &data, &mut Quiet).unwrap();
        let pieced = run_interrupted_and_resumed(&config, &data, 5);
        assert_eq!(
            learning_values(&pieced),
            learning_values(&whole.metrics),
            "{:?} dropout {}",
            config.norm,
            config.dropout
        );
    }
}
