//! The `bnlab` binary as a user meets it: help, errors, and the per-epoch output.

use std::process::{Command, Output};

fn bnlab(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bnlab"))
        .args(args)
        .output()
        .expect("bnlab runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `args`, expects failure with exactly one line on stderr, and returns that line.
fn one_line_error(args: &[&str]) -> String {
    let out = bnlab(args);
    assert!(!out.status.success(), "{args:?} should fail");
    let stderr = text(&out.stderr);
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "{args:?}: one line, got:\n{stderr}"
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "{args:?}: nothing on stdout");
    stderr.trim_end().to_string()
}

#[test]
fn help_explains_every_flag() {
    let top = text(&bnlab(&["--help"]).stdout);
    for command in [
        "train", "run", "recipes", "compare", "plot", "shapes", "eval", "inspect",
    ] {
        assert!(
            top.lines().any(|l| l.trim_start().starts_with(command)),
            "{command}:\n{top}"
        );
    }
    let help = text(&bnlab(&["train", "--help"]).stdout);
    let lines: Vec<&str> = help.lines().collect();
    let is_flag_line =
        |l: &str| l.trim_start().starts_with("--") || l.trim_start().starts_with("-h");
    #[rustfmt::skip]
    let flags = [
        "--model", "--norm", "--epochs", "--lr", "--batch-size", "--data", "--seed", "--threads",
        "--json", "--metrics", "--limit-batches", "--no-shuffle", "--bn-eps", "--bn-momentum",
        "--bn-convention", "--pool", "--activation", "--weight-init", "--init-std", "--init", "--optimizer",
        "--momentum", "--lr-step-size", "--lr-gamma", "--resize", "--recalibrate-bn", "--out",
        "--save-every", "--device", "--lr-schedule", "--lr-warmup", "--weight-decay", "--nesterov",
        "--label-smoothing", "--augment-crop", "--augment-flip", "--tta-flip", "--time-budget",
        "--recalibrate-batches", "--freeze-affine", "--bn-layers", "--bn-position", "--conv-bias",
        "--dropout",
    ];
    for flag in flags {
        let at = lines
            .iter()
            .position(|l| l.trim_start().split([' ', '=', '[']).next() == Some(flag))
            .unwrap_or_else(|| panic!("{flag} missing from help:\n{help}"));
        // Its explanation: the rest of its line and the lines up to the next flag.
        let rest: Vec<&str> = std::iter::once(lines[at].trim_start().trim_start_matches(flag))
            .chain(
                lines[at + 1..]
                    .iter()
                    .copied()
                    .take_while(|l| !is_flag_line(l)),
            )
            .collect();
        let text = rest.join(" ");
        let words = text
            .split_whitespace()
            .filter(|w| w.chars().all(char::is_alphabetic));
        assert!(words.count() >= 3, "{flag} is explained in help: {rest:?}");
    }
    for default in [
        "lenet-bn",
        "scratch",
        "[default: 10]",
        "[default: 1]",
        "[default: 256]",
    ] {
        assert!(help.contains(default), "default {default} in help");
    }
}

#[test]
fn invalid_values_are_one_line_errors() {
    let cases: &[(&[&str], &str)] = &[
        (&["train", "--lr", "0"], "--lr"),
        (&["train", "--lr", "-0.5"], "--lr"),
        (&["train", "--lr", "fast"], "--lr"),
        (&["train", "--batch-size", "0"], "--batch-size"),
        (&["train", "--model", "alexnet"], "--model"),
        (&["train", "--norm", "layr"], "--norm"),
        (&["train", "--norm", "ghost"], "ghost:N"),
        (&["train", "--norm", "ghost:1"], "--norm ghost:N"),
        (&["train", "--norm", "group:4"], "--norm group:4"),
        (&["train", "--norm", "instance"], "--bn-layers conv"),
        (
            &["train", "--norm", "burn", "--freeze-affine"],
            "--freeze-affine",
        ),
        (
            &["train", "--model", "resnet18", "--bn-layers", "conv"],
            "--bn-layers",
        ),
        (&["train", "--conv-bias", "maybe"], "--conv-bias"),
        (&["train", "--dropout", "1"], "--dropout"),
        (
            &["train", "--model", "resnet18", "--dropout", "0.5"],
            "--dropout",
        ),
        (&["train", "--epochs", "0"], "--epochs"),
        (&["train", "--batch-size", "1"], "--batch-size 1"),
        (&["train", "--bn-eps", "0"], "--bn-eps"),
        (&["train", "--bn-momentum", "1.5"], "--bn-momentum"),
        (&["train", "--bn-momentum", "-0.1"], "--bn-momentum"),
        (
            &["train", "--norm", "burn", "--bn-convention", "d2l"],
            "--norm burn",
        ),
        (&["train", "--momentum", "1.2"], "--momentum"),
        (&["train", "--model", "resnet18", "--pool", "max"], "--pool"),
        (
            &["train", "--model", "lenet", "--norm", "scratch"],
            "--model lenet has no batch norm",
        ),
        (&["train", "--model", "densenet"], "--resize"),
        (&["train", "--resize", "32"], "--resize 32"),
        (
            &["train", "--model", "lenet-gluon", "--resize", "64"],
            "--resize 64",
        ),
        (&["run", "alexnet"], "unknown recipe 'alexnet'"),
        (&["train", "--device", "tpu"], "--device"),
        // > 0 but infinite in float32, which the model computes in.
        (&["train", "--lr", "1e39"], "float32"),
        (
            &["train", "--momentum", "0.5"],
            "--momentum: only --optimizer sgd-momentum",
        ),
        (&["run", "lenet", "--momentum", "0.5"], "--momentum"),
        (&["train", "--nesterov"], "--nesterov"),
        (&["train", "--lr-warmup", "0.3"], "--lr-warmup"),
        (&["train", "--lr-schedule", "linear"], "--lr-schedule"),
        (&["train", "--label-smoothing", "1"], "--label-smoothing"),
        (&["train", "--augment-flip=maybe"], "--augment-flip"),
        (&["train", "--augment-crop", "12"], "--augment-crop"),
        (&["train", "--time-budget", "0"], "--time-budget"),
        (
            &["train", "--recalibrate-batches", "3"],
            "--recalibrate-batches",
        ),
        (
            &["eval", "--checkpoint", "runs/x", "--model", "lenet"],
            "--model",
        ),
    ];
    for (args, flag) in cases {
        let line = one_line_error(args);
        assert!(
            line.contains(flag),
            "{args:?}: the error names {flag}: {line}"
        );
    }
    let line = one_line_error(&["run", "lenet-bn-scrach"]);
    assert!(line.contains("did you mean lenet-bn-scratch?"), "{line}");
    let line = one_line_error(&["train", "--model", "alexnet"]);
    assert!(line.contains("lenet-bn"), "lists the models: {line}");
}

#[test]
fn missing_data_says_how_to_fix_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let line = one_line_error(&["train", "--data", "/nonexistent/dir", "--out", out]);
    // A failed start leaves no empty run directory behind (and keeps one that existed).
    let new = dir.path().join("new");
    one_line_error(&[
        "train",
        "--data",
        "/nonexistent/dir",
        "--out",
        new.to_str().unwrap(),
    ]);
    assert!(!new.exists());
    assert!(dir.path().is_dir());
    assert!(
        line.contains("/nonexistent/dir/train-images-idx3-ubyte.gz"),
        "{line}"
    );
    assert!(
        line.contains("put the Fashion-MNIST files in --data /nonexistent/dir"),
        "{line}"
    );
    assert_eq!(line.matches("train-images").count(), 1, "said once: {line}");
}

#[test]
fn unwritable_outputs_fail_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let line = one_line_error(&[
        "train",
        "--out",
        out,
        "--metrics",
        "/nonexistent/dir/m.jsonl",
    ]);
    assert!(
        line.contains("--metrics /nonexistent/dir/m.jsonl"),
        "{line}"
    );
    let line = one_line_error(&["train", "--out", "/proc/bnlab-run"]);
    assert!(
        line.contains("--out /proc/bnlab-run: cannot write there"),
        "{line}"
    );
}

const KEYS: [&str; 7] = [
    "elapsed",
    "epoch",
    "train_loss",
    "train_acc",
    "test_acc",
    "examples_per_sec",
    "seconds",
];

#[test]
fn json_mode_prints_only_json_lines_and_writes_the_metrics_file() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("metrics.jsonl");
    let run_dir = dir.path().join("run");
    #[rustfmt::skip]
    let out = bnlab(&[
        "train", "--epochs", "2", "--limit-batches", "4", "--batch-size", "64", "--json",
        "--metrics", metrics.to_str().unwrap(), "--out", run_dir.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "one line per epoch:\n{stdout}");
    for (i, line) in lines.iter().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line).expect("each line is JSON");
        let obj = v.as_object().unwrap();
        let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        keys.sort();
        let mut want = KEYS.to_vec();
        want.sort();
        assert_eq!(keys, want);
        assert_eq!(obj["epoch"].as_u64(), Some(i as u64 + 1));
        for k in ["train_loss", "examples_per_sec", "seconds"] {
            assert!(obj[k].as_f64().unwrap() > 0.0, "{k} > 0");
        }
        for k in ["train_acc", "test_acc"] {
            assert!(
                (0.0..=1.0).contains(&obj[k].as_f64().unwrap()),
                "{k} in [0, 1]"
            );
        }
    }
    assert_eq!(
        std::fs::read_to_string(&metrics).unwrap(),
        stdout,
        "the file holds the lines"
    );
    let in_run_dir = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    assert_eq!(in_run_dir, stdout, "the run directory holds them too");
    assert!(run_dir.join("model.bpk").is_file() && run_dir.join("config.json").is_file());
}

#[test]
fn readable_mode_prints_one_line_per_epoch_and_saves_the_run() {
    // Run where the default run directory (runs/lenet-bn-TIME) can be created and checked.
    let cwd = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_bnlab"))
        .args([
            "train",
            "--epochs",
            "2",
            "--limit-batches",
            "3",
            "--batch-size",
            "32",
        ])
        .current_dir(cwd.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    for (i, line) in lines.iter().enumerate() {
        assert!(line.starts_with(&format!("epoch {}/2", i + 1)), "{line}");
        for part in ["loss", "train acc", "test acc", "examples/s", "elapsed"] {
            assert!(line.contains(part), "{line}");
        }
    }
    let runs: Vec<_> = std::fs::read_dir(cwd.path().join("runs"))
        .unwrap()
        .collect();
    assert_eq!(runs.len(), 1);
    let run = runs[0].as_ref().unwrap().path();
    assert!(
        run.file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("lenet-bn-"),
        "{run:?}"
    );
    assert!(run.join("model.bpk").is_file());
}

/// Atomic writes go through a temporary file; the result is an ordinary readable file.
#[test]
fn written_files_are_readable_by_others() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let out = bnlab(&[
        "train",
        "--epochs",
        "1",
        "--limit-batches",
        "1",
        "--out",
        run.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    for file in ["config.json", "metrics.jsonl", "model.bpk"] {
        let mode = std::fs::metadata(run.join(file))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o644, "{file}");
    }
}

#[test]
fn no_arguments_prints_the_help_as_laid_out() {
    let out = bnlab(&[]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.lines().count() > 10, "{stderr}");
    assert!(
        stderr.lines().any(|l| l.trim_start().starts_with("train")),
        "{stderr}"
    );
}

/// The training options reach the run's config.json from flags, and `=false` turns a recipe's
/// switches off.
#[test]
fn training_options_are_recorded_and_can_be_turned_off() {
    let dir = tempfile::tempdir().unwrap();
    let config = |run: &str| -> serde_json::Value {
        let text = std::fs::read_to_string(dir.path().join(run).join("config.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    };
    let a = dir.path().join("a");
    let out = bnlab(&[
        "train",
        "--optimizer",
        "sgd-momentum",
        "--nesterov",
        "--lr-schedule",
        "one-cycle",
        "--lr-warmup",
        "0.2",
        "--weight-decay",
        "1e-4",
        "--label-smoothing",
        "0.1",
        "--augment-crop",
        "2",
        "--augment-flip",
        "--tta-flip",
        "--recalibrate-bn",
        "--recalibrate-batches",
        "2",
        "--time-budget",
        "100",
        "--model",
        "speednet",
        "--epochs",
        "1",
        "--limit-batches",
        "3",
        "--batch-size",
        "32",
        "--json",
        "--out",
        a.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let c = config("a");
    for (key, want) in [
        ("nesterov", serde_json::json!(true)),
        ("lr_schedule", serde_json::json!("one-cycle")),
        ("lr_warmup", serde_json::json!(0.2)),
        ("weight_decay", serde_json::json!(1e-4)),
        ("label_smoothing", serde_json::json!(0.1)),
        ("augment_crop", serde_json::json!(2)),
        ("augment_flip", serde_json::json!(true)),
        ("tta_flip", serde_json::json!(true)),
        ("recalibrate_bn", serde_json::json!(true)),
        ("recalibrate_batches", serde_json::json!(2)),
        ("time_budget", serde_json::json!(100.0)),
    ] {
        assert_eq!(c[key], want, "{key} in {c}");
    }
    let b = dir.path().join("b");
    let out = bnlab(&[
        "run",
        "speedrun",
        "--augment-flip=false",
        "--tta-flip=false",
        "--recalibrate-bn=false",
        "--nesterov=false",
        "--epochs",
        "1",
        "--limit-batches",
        "2",
        "--json",
        "--out",
        b.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let c = config("b");
    for key in ["augment_flip", "tta_flip", "recalibrate_bn", "nesterov"] {
        assert_eq!(c[key], serde_json::json!(false), "{key} in {c}");
    }
    assert_eq!(c["model"], serde_json::json!("speednet"));
    assert_eq!(c["lr_schedule"], serde_json::json!("one-cycle"));
}

#[test]
fn norm_variants_and_lenet_switches_are_recorded_and_reload() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("ghost");
    #[rustfmt::skip]
    let out = bnlab(&[
        "train", "--model", "lenet-bn", "--norm", "ghost:16", "--bn-layers", "conv",
        "--bn-position", "after-act", "--conv-bias", "off", "--freeze-affine", "--epochs", "1",
        "--limit-batches", "3", "--batch-size", "64", "--json", "--out", run.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    for (key, want) in [
        ("norm", serde_json::json!("ghost:16")),
        ("bn_layers", serde_json::json!("conv")),
        ("bn_position", serde_json::json!("after-act")),
        ("conv_bias", serde_json::json!(false)),
        ("freeze_affine", serde_json::json!(true)),
    ] {
        assert_eq!(config[key], want, "{key} in {config}");
    }
    // Two BN layers, without gamma and beta; the checkpoint evaluates as the run left it.
    let inspect = text(&bnlab(&["inspect", run.to_str().unwrap()]).stdout);
    assert!(
        inspect.contains("bn1") && inspect.contains("bn2"),
        "{inspect}"
    );
    assert!(
        !inspect.contains("bn3") && !inspect.contains("gamma"),
        "{inspect}"
    );
    let eval = bnlab(&[
        "eval",
        "--checkpoint",
        run.to_str().unwrap(),
        "--limit-batches",
        "2",
    ]);
    assert!(eval.status.success(), "{}", text(&eval.stderr));
}
