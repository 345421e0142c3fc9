//! The run orchestration of `bnlab train`, `run`, `compare` and `--resume`, called as a library
//! (`bnlab::train::session`): what a run directory holds, a resumed run's metrics against an
//! uninterrupted one's, a comparison's directories and table, and what a resume may change.

use std::path::Path;

use bnlab::config::RunConfig;
use bnlab::data::DEFAULT_DATA_DIR;
use bnlab::report::{read_jsonl, EpochMetrics};
use bnlab::train::session::{Outputs, Session};
use bnlab::train::Quiet;

fn tiny(epochs: usize) -> RunConfig {
    RunConfig {
        epochs,
        batch_size: 64,
        limit_batches: Some(3),
        ..Default::default()
    }
}

fn session<'a>(quiet: &'a mut Quiet, outputs: Outputs) -> Session<'a> {
    Session {
        data_dir: Path::new(DEFAULT_DATA_DIR),
        outputs,
        observer: quiet,
        stop: None,
    }
}

/// What training computed, without the timings.
fn learned(metrics: &[EpochMetrics]) -> Vec<(usize, f64, f64, Option<f64>)> {
    metrics
        .iter()
        .map(|m| (m.epoch, m.train_loss, m.train_acc, m.test_acc))
        .collect()
}

#[test]
fn a_run_writes_its_directory_and_resumes_to_the_uninterrupted_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let (short, whole) = (tmp.path().join("short"), tmp.path().join("whole"));
    let copy = tmp.path().join("copy.jsonl");
    let outputs = Outputs {
        metrics: Some(copy.clone()),
        force: false,
        save_every: Some(1),
    };
    let mut quiet = Quiet;
    let first = session(&mut quiet, outputs)
        .start(&tiny(1), "short", Some(&short))
        .unwrap();
    assert!(!first.interrupted);
    assert_eq!(first.dir, short);
    for file in ["config.json", "metrics.jsonl", "model.bpk", "epoch-001.bpk"] {
        assert!(short.join(file).is_file(), "{file} missing");
    }
    assert_eq!(read_jsonl(&copy).unwrap().len(), 1);

    // Two more epochs on resume equal three in one go.
    let resumed = session(&mut quiet, Outputs::default())
        .resume(&short, Some(3), None)
        .unwrap();
    let uninterrupted = session(&mut quiet, Outputs::default())
        .start(&tiny(3), "whole", Some(&whole))
        .unwrap();
    assert_eq!(resumed.metrics.len(), 3);
    assert_eq!(learned(&resumed.metrics), learned(&uninterrupted.metrics));
    assert_eq!(
        learned(&read_jsonl(&short.join("metrics.jsonl")).unwrap()),
        learned(&resumed.metrics)
    );
}

#[test]
fn a_resume_may_lower_the_learning_rate_but_not_raise_it_or_cut_epochs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let mut quiet = Quiet;
    session(&mut quiet, Outputs::default())
        .start(&tiny(2), "run", Some(&dir))
        .unwrap();
    let raise = session(&mut quiet, Outputs::default()).resume(&dir, Some(3), Some(2.0));
    assert!(raise.unwrap_err().to_string().contains("may only lower"));
    let cut = session(&mut quiet, Outputs::default()).resume(&dir, Some(1), None);
    assert!(cut
        .unwrap_err()
        .to_string()
        .contains("already finished 2 epochs"));
    let lowered = session(&mut quiet, Outputs::default())
        .resume(&dir, Some(3), Some(0.5))
        .unwrap();
    assert_eq!(lowered.metrics.len(), 3);
    let config: RunConfig =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!((config.epochs, config.lr), (3, 0.5));
}

#[test]
fn a_comparison_gives_each_run_its_directory_and_writes_the_table_and_curves() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("cmp");
    let configs = [
        ("lenet-bn".to_string(), tiny(1)),
        ("lenet-bn".to_string(), tiny(1)),
    ];
    let mut quiet = Quiet;
    let (dir, markdown) = session(&mut quiet, Outputs::default())
        .compare(&configs, Some(&out), false)
        .unwrap();
    assert_eq!(dir, out);
    for run in ["lenet-bn", "lenet-bn-2"] {
        assert!(out.join(run).join("model.bpk").is_file(), "{run}");
        assert!(markdown.contains(run), "{markdown}");
    }
    for file in ["comparison.md", "curves.svg", "curves.png"] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    // The same seed and settings: both runs learned the same.
    let a = read_jsonl(&out.join("lenet-bn/metrics.jsonl")).unwrap();
    let b = read_jsonl(&out.join("lenet-bn-2/metrics.jsonl")).unwrap();
    assert_eq!(learned(&a), learned(&b));
    // A second comparison into the same directory is refused, not mixed in.
    let again = session(&mut quiet, Outputs::default()).compare(&configs, Some(&out), false);
    assert!(again.is_err());
}
