//! The chapter's experiments from the command line: every recipe runs, `compare` writes its
//! table and plots, `plot` redraws them, and saved models can be evaluated and inspected.

use std::path::Path;
use std::process::{Command, Output};

fn bnlab(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bnlab"))
        .args(args)
        .output()
        .expect("bnlab runs")
}

fn ok(args: &[&str]) -> String {
    let out = bnlab(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The recipes `bnlab recipes` lists: its lines up to the blank one before the sweeps.
fn recipe_names() -> Vec<String> {
    ok(&["recipes"])
        .lines()
        .take_while(|l| !l.is_empty())
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .collect()
}

#[test]
fn recipes_lists_the_chapter_experiments() {
    let names = recipe_names();
    for want in [
        "lenet-sgdm",
        "lenet-adam",
        "lenet-bn-sgdm",
        "lenet-bn-adam",
        "lenet-bn-scratch",
        "lenet-bn-concise",
        "lenet-bn-adam-128",
        "lenet-gluon-bn",
        "resnet18",
        "densenet",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
}

/// Every recipe, one epoch of a few batches (the big networks on smaller batches).
#[test]
fn every_recipe_runs_one_quick_epoch() {
    let dir = tempfile::tempdir().unwrap();
    for name in recipe_names() {
        let out = dir.path().join(&name);
        let mut args = vec![
            "run",
            &name,
            "--epochs",
            "1",
            "--limit-batches",
            "2",
            "--json",
        ];
        if name == "densenet" || name == "resnet18" {
            args.extend(["--batch-size", "8"]);
        }
        args.extend(["--out", out.to_str().unwrap()]);
        let stdout = ok(&args);
        let m: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(m["epoch"], 1, "{name}");
        assert!(m["train_loss"].as_f64().unwrap().is_finite(), "{name}");
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(
            config["epochs"], 1,
            "{name}: overrides reach the saved config"
        );
        assert!(out.join("model.bpk").is_file(), "{name}");
    }
}

#[test]
fn compare_writes_table_and_plots_and_plot_redraws_them() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cmp");
    let stdout = ok(&[
        "compare",
        "lenet-sgdm",
        "lenet-bn-sgdm",
        "--epochs",
        "2",
        "--limit-batches",
        "6",
        "--out",
        out.to_str().unwrap(),
    ]);
    let table = std::fs::read_to_string(out.join("comparison.md")).unwrap();
    assert!(
        stdout.trim_end().ends_with(table.trim()),
        "the table ends stdout:\n{stdout}"
    );
    assert!(
        table.contains("| lenet-sgdm | 2 |") && table.contains("| lenet-bn-sgdm | 2 |"),
        "{table}"
    );
    for header in [
        "final test acc",
        "best test acc",
        "first epoch ≥ 0.85",
        "wall time",
        "examples/s",
    ] {
        assert!(table.contains(header), "{header}");
    }
    check_plot(&out.join("curves"), &["lenet-sgdm", "lenet-bn-sgdm"]);

    let redrawn = dir.path().join("again");
    ok(&[
        "plot",
        out.join("lenet-sgdm/metrics.jsonl").to_str().unwrap(),
        out.join("lenet-bn-sgdm/metrics.jsonl").to_str().unwrap(),
        "--out",
        redrawn.to_str().unwrap(),
    ]);
    check_plot(&redrawn, &["lenet-sgdm", "lenet-bn-sgdm"]);
}

fn check_plot(stem: &Path, labels: &[&str]) {
    let svg = std::fs::read_to_string(stem.with_extension("svg")).unwrap();
    for text in ["train loss", "train accuracy", "test accuracy", "epoch"]
        .iter()
        .chain(labels)
    {
        assert!(svg.contains(text), "the plot shows {text}");
    }
    let png = std::fs::read(stem.with_extension("png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(png.len() > 20_000, "a real picture, not an empty one");
}

#[test]
fn shapes_match_the_notebooks() {
    let resnet = ok(&["shapes", "resnet18", "--resize", "224"]);
    for (block, dims) in [
        ("stem", "[1, 64, 56, 56]"),
        ("b2", "[1, 64, 56, 56]"),
        ("b3", "[1, 128, 28, 28]"),
        ("b4", "[1, 256, 14, 14]"),
        ("b5", "[1, 512, 7, 7]"),
        ("fc", "[1, 10]"),
    ] {
        let line = resnet
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{block} ")));
        assert!(
            line.is_some_and(|l| l.ends_with(dims)),
            "{block} {dims}:\n{resnet}"
        );
    }
    let densenet = ok(&["shapes", "densenet"]);
    assert!(densenet.contains("1x1x96x96"), "{densenet}");
    for dims in [
        "[1, 192, 24, 24]",
        "[1, 96, 12, 12]",
        "[1, 248, 3, 3]",
        "[1, 248]",
        "[1, 10]",
    ] {
        assert!(densenet.contains(dims), "{dims}:\n{densenet}");
    }
    let lenet = ok(&["shapes", "lenet-bn"]);
    assert!(
        lenet.contains("[1, 16, 4, 4]") && lenet.contains("[1, 256]"),
        "{lenet}"
    );
}

#[test]
fn saved_models_evaluate_and_inspect() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let run_s = run.to_str().unwrap();
    let stdout = ok(&[
        "train",
        "--epochs",
        "2",
        "--limit-batches",
        "20",
        "--save-every",
        "1",
        "--json",
        "--out",
        run_s,
    ]);
    let last: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    for file in ["epoch-001.bpk", "epoch-002.bpk", "model.bpk"] {
        assert!(run.join(file).is_file(), "{file}");
    }
    // The saved model gives the accuracy training reported (same 20 test batches).
    let eval = ok(&[
        "eval",
        "--checkpoint",
        run_s,
        "--limit-batches",
        "20",
        "--json",
    ]);
    let eval: serde_json::Value = serde_json::from_str(&eval).unwrap();
    // Folded by default: within one of the 5120 images of the unfolded figure.
    let diff = (eval["test_acc"].as_f64().unwrap() - last["test_acc"].as_f64().unwrap()).abs();
    assert!(diff <= 1.0 / 5120.0 + 1e-12, "{eval} vs {last}");
    // Epoch 1's checkpoint is a different model.
    let first = ok(&[
        "eval",
        "--checkpoint",
        run.join("epoch-001.bpk").to_str().unwrap(),
        "--limit-batches",
        "20",
        "--json",
    ]);
    let first: serde_json::Value = serde_json::from_str(&first).unwrap();
    assert_ne!(first["test_acc"], last["test_acc"]);
    let unfolded = ok(&[
        "eval",
        "--checkpoint",
        run_s,
        "--no-fold",
        "--limit-batches",
        "20",
        "--json",
    ]);
    let unfolded: serde_json::Value = serde_json::from_str(&unfolded).unwrap();
    assert_eq!(
        (unfolded["folded"].clone(), eval["folded"].clone()),
        (false.into(), true.into())
    );
    assert_eq!(
        unfolded["test_acc"], last["test_acc"],
        "unfolded: exactly training's figure"
    );
    let recalibrated = ok(&[
        "eval",
        "--checkpoint",
        run_s,
        "--recalibrate-bn",
        "--limit-batches",
        "20",
        "--json",
    ]);
    let recalibrated: serde_json::Value = serde_json::from_str(&recalibrated).unwrap();
    assert_eq!(recalibrated["recalibrate_bn"], true);
    assert_ne!(
        recalibrated["test_acc"], last["test_acc"],
        "recalibration moves the statistics"
    );

    let inspect = ok(&["inspect", run_s]);
    for layer in [
        "bn1 (6 channels)",
        "bn2 (16 channels)",
        "bn3 (120 channels)",
        "bn4 (84 channels)",
    ] {
        assert!(inspect.contains(layer), "{layer}:\n{inspect}");
    }
    for quantity in ["gamma", "beta", "running_mean", "running_var"] {
        assert_eq!(
            inspect.matches(quantity).count(),
            4,
            "{quantity}:\n{inspect}"
        );
    }
    let full = ok(&["inspect", run_s, "--full"]);
    let gamma = full
        .lines()
        .find(|l| l.trim_start().starts_with("gamma"))
        .unwrap();
    assert_eq!(
        gamma.split_whitespace().count(),
        1 + 6,
        "all six values of bn1's gamma: {gamma}"
    );
}

#[test]
fn a_damaged_checkpoint_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let run_s = run.to_str().unwrap();
    ok(&[
        "train",
        "--epochs",
        "1",
        "--limit-batches",
        "2",
        "--out",
        run_s,
    ]);
    let model = run.join("model.bpk");
    let bytes = std::fs::read(&model).unwrap();
    for damaged in [
        bytes[..bytes.len() / 2].to_vec(),
        vec![0u8; 100],
        b"not a model".to_vec(),
    ] {
        std::fs::write(&model, &damaged).unwrap();
        for args in [vec!["eval", "--checkpoint", run_s], vec!["inspect", run_s]] {
            let out = bnlab(&args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success());
            assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
            assert!(
                stderr.contains("model.bpk: truncated or corrupt checkpoint"),
                "{stderr}"
            );
        }
    }
    let out = bnlab(&["eval", "--checkpoint", "/nonexistent/run"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/nonexistent/run: no such run directory"),
        "{stderr}"
    );
}

#[test]
fn bench_reports_every_workload() {
    let stdout = ok(&["bench", "--quick", "--json"]);
    let records: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    let named = |prefix: &'static str| {
        records
            .iter()
            .filter(move |r| r["workload"].as_str().unwrap().starts_with(prefix))
    };
    let norms = |prefix| {
        named(prefix)
            .map(|r| r["norm"].as_str().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        norms("W1"),
        ["fused", "scratch", "burn"],
        "W1 per norm: {stdout}"
    );
    assert_eq!(
        norms("W6"),
        ["fused", "scratch", "burn"],
        "W6 per norm: {stdout}"
    );
    let peak = named("W0").next().expect("W0")["gflops"].as_f64().unwrap();
    assert!(peak > 0.0, "W0: {stdout}");
    for r in named("W4").chain(named("W5")).chain(named("W8")) {
        let gflops = r["gflops"].as_f64().expect("conv GFLOP/s");
        let share = r["share_of_peak"].as_f64().expect("share of W0");
        assert!(gflops > 0.0 && (share - gflops / peak).abs() < 1e-9, "{r}");
    }
    assert_eq!(named("W5").count(), 1, "W5: {stdout}");
    assert_eq!(named("W8").count(), 1, "W8: {stdout}");
    assert!(named("W5")
        .chain(named("W8"))
        .all(|r| r["peak_rss_mb"].as_f64().unwrap() > 0.0));
    assert!(named("W1")
        .chain(named("W4"))
        .chain(named("W5"))
        .chain(named("W7"))
        .chain(named("W8"))
        .all(|r| r["examples_per_sec"].as_f64().unwrap() > 0.0));
    assert!(named("W6").all(|r| r["ms_per_fwd_bwd"].as_f64().unwrap() > 0.0));
    // W6's least traffic (five float32 tensors of (128, 64, 28, 28)) over its median time,
    // beside the two copies' rates it is shown against.
    for r in named("W6") {
        let median_ms = r["ms_per_fwd_bwd_median"].as_f64().expect("median");
        let rate = r["gb_per_sec"].as_f64().expect("GB/s");
        let least_traffic = 5.0 * (128 * 64 * 28 * 28 * 4) as f64;
        let want = least_traffic / (median_ms / 1e3) / 1e9;
        assert!((rate - want).abs() <= 1e-9 * want, "{r}");
        for copy in ["copy_gb_per_sec", "copy_in_cache_gb_per_sec"] {
            assert!(r[copy].as_f64().expect(copy) > 0.0, "{r}");
        }
    }
    let inference: Vec<(&str, bool)> = named("W7")
        .map(|r| {
            (
                r["workload"].as_str().unwrap(),
                r["folded"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        inference,
        [
            ("W7 inference_lenet-bn", false),
            ("W7 inference_lenet-bn", true),
            ("W7 inference_resnet18", false),
            ("W7 inference_resnet18", true),
        ],
        "LeNet-BN and ResNet-18, folded and unfolded"
    );
    let rss = named("RSS").next().expect("peak RSS")["peak_rss_mb"]
        .as_f64()
        .unwrap();
    assert!((20.0..5000.0).contains(&rss), "{rss} MB");
    let err = bnlab(&["bench", "--only", "W9"]);
    assert!(String::from_utf8_lossy(&err.stderr).contains("--only W9: unknown workload"));
    // Only the BN layers bench times are accepted (and listed) for --norm.
    let err = bnlab(&["bench", "--norm", "none"]);
    let stderr = String::from_utf8_lossy(&err.stderr);
    assert!(!err.status.success());
    assert!(
        stderr.contains("'none'") && stderr.contains("[possible values: fused, scratch, burn]"),
        "{stderr}"
    );
}

/// `export`, `eval --weights` and `train --init` on the same file give the same model.
#[test]
fn torch_weights_go_out_and_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let file = dir.path().join("m.safetensors");
    let (run_s, file_s) = (run.to_str().unwrap(), file.to_str().unwrap());
    ok(&[
        "train",
        "--epochs",
        "1",
        "--limit-batches",
        "10",
        "--out",
        run_s,
    ]);
    ok(&["export", run_s, "--format", "torch", "--out", file_s]);
    fn args<'a>(src: &'a str, path: &'a str) -> Vec<&'a str> {
        vec![
            "eval",
            src,
            path,
            "--no-fold",
            "--limit-batches",
            "8",
            "--json",
        ]
    }
    let from_run: serde_json::Value =
        serde_json::from_str(&ok(&args("--checkpoint", run_s))).unwrap();
    let logits = dir.path().join("l.npy");
    let mut weights_args = args("--weights", file_s);
    weights_args.extend(["--logits", logits.to_str().unwrap()]);
    let from_file: serde_json::Value = serde_json::from_str(&ok(&weights_args)).unwrap();
    assert_eq!(from_run["test_acc"], from_file["test_acc"]);
    let npy = std::fs::read(&logits).unwrap();
    assert_eq!(&npy[..6], b"\x93NUMPY");
    assert!(
        npy.len() > 8 * 256 * 10 * 4,
        "{} bytes of logits",
        npy.len()
    );

    // Training from the file starts where the run ended: its first loss is far below a fresh
    // run's.
    let fresh = ok(&[
        "train",
        "--epochs",
        "1",
        "--limit-batches",
        "2",
        "--json",
        "--out",
        dir.path().join("a").to_str().unwrap(),
    ]);
    let init = ok(&[
        "train",
        "--init",
        file_s,
        "--epochs",
        "1",
        "--limit-batches",
        "2",
        "--json",
        "--out",
        dir.path().join("b").to_str().unwrap(),
    ]);
    let loss = |s: &str| {
        serde_json::from_str::<serde_json::Value>(s).unwrap()["train_loss"]
            .as_f64()
            .unwrap()
    };
    assert!(
        loss(&init) < loss(&fresh) - 0.3,
        "init {} vs fresh {}",
        loss(&init),
        loss(&fresh)
    );
    let config = std::fs::read_to_string(dir.path().join("b/config.json")).unwrap();
    assert!(
        config.contains("m.safetensors"),
        "the run records where it started"
    );

    // Wrong architecture: a one-line error naming the file.
    let out = bnlab(&["eval", "--weights", file_s, "--model", "resnet18"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.trim_end().lines().count() == 1,
        "{stderr}"
    );
    assert!(
        stderr.contains("m.safetensors") && stderr.contains("missing keys"),
        "{stderr}"
    );
    let out = bnlab(&[
        "train",
        "--init",
        "/nonexistent.safetensors",
        "--out",
        dir.path().join("c").to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--init /nonexistent.safetensors"));
}
