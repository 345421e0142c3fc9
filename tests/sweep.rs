//! `bnlab sweep` as a user runs it: the grid in parallel processes, a killed sweep resumed
//! without rerunning finished runs, and the same grid run from `--plan` through GNU parallel
//! giving the same table as the built-in runner.

use std::path::Path;
use std::process::{Command, Output, Stdio};

fn bnlab(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bnlab"))
        .args(args)
        .output()
        .expect("bnlab runs")
}

fn ok(args: &[&str]) -> Output {
    let out = bnlab(args);
    assert!(
        out.status.success(),
        "{args:?}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A tiny grid: 2 learning rates × 2 seeds, one epoch of 3 batches each.
fn grid_args(out: &Path) -> Vec<String> {
    [
        "sweep",
        "lenet-bn-scratch",
        "--set",
        "lr=0.5,1.0",
        "--set",
        "epochs=1",
        "--set",
        "limit_batches=3",
        "--set",
        "batch_size=64",
        "--seeds",
        "0-1",
        "--jobs",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec()
}

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The table without its time column, which differs between any two executions.
fn accuracy_columns(table: &str) -> Vec<String> {
    table
        .lines()
        .filter(|l| l.starts_with("| lr="))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').collect();
            cells[..cells.len() - 2].join("|")
        })
        .collect()
}

#[test]
fn a_sweep_runs_its_grid_resumes_and_reports_as_gnu_parallel_does() {
    let tmp = tempfile::tempdir().unwrap();
    let built_in = tmp.path().join("built-in");
    let out = ok(&args(&grid_args(&built_in)));
    let table = std::fs::read_to_string(built_in.join("table.md")).unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), table);
    let rows = accuracy_columns(&table);
    assert_eq!(rows.len(), 2, "{table}");
    for row in &rows {
        assert!(row.contains("| 2/2 |"), "{row}");
    }
    let runs = built_in.join("runs");
    let finished: Vec<_> = std::fs::read_dir(&runs)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("model.bpk").is_file())
        .collect();
    assert_eq!(finished.len(), 4);
    for plot in ["curves.svg", "curves.png", "final-acc.svg", "final-acc.png"] {
        let len = std::fs::metadata(built_in.join(plot)).unwrap().len();
        assert!(len > 1000, "{plot}: {len} bytes");
    }

    // The mean in the table is the mean of the runs' own last test accuracies.
    let last_acc = |run: &str| -> f64 {
        let text = std::fs::read_to_string(runs.join(run).join("metrics.jsonl")).unwrap();
        let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        last["test_acc"].as_f64().unwrap()
    };
    let setting = "lr=0.5,epochs=1,limit_batches=3,batch_size=64";
    let mean =
        (last_acc(&format!("{setting},seed=0")) + last_acc(&format!("{setting},seed=1"))) / 2.0;
    assert!(
        rows[0].contains(&format!("| {mean:.4} ± ")),
        "{mean:.4} in {}",
        rows[0]
    );

    // A killed sweep: one run never finished. Only that one runs again.
    let lost = runs.join(format!("{setting},seed=1"));
    std::fs::remove_dir_all(&lost).unwrap();
    let kept = runs.join(format!("{setting},seed=0")).join("model.bpk");
    let kept_time = std::fs::metadata(&kept).unwrap().modified().unwrap();
    let again = ok(&args(&grid_args(&built_in)));
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("(3 finished before)"), "{stderr}");
    assert!(lost.join("model.bpk").is_file());
    assert_eq!(
        std::fs::metadata(&kept).unwrap().modified().unwrap(),
        kept_time
    );
    let table_again = std::fs::read_to_string(built_in.join("table.md")).unwrap();
    assert_eq!(
        accuracy_columns(&table_again),
        rows,
        "training is deterministic"
    );

    // The same grid through --plan and GNU parallel, then --report.
    let planned = tmp.path().join("planned");
    let mut plan_args = grid_args(&planned);
    plan_args.push("--plan".into());
    let plan = ok(&args(&plan_args));
    let lines = String::from_utf8_lossy(&plan.stdout).into_owned();
    assert_eq!(lines.lines().count(), 4, "{lines}");
    let mut parallel = Command::new("parallel")
        .args(["--jobs", "2", "--halt", "now,fail=1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("GNU parallel (apt-get install parallel)");
    use std::io::Write;
    parallel
        .stdin
        .take()
        .unwrap()
        .write_all(lines.as_bytes())
        .unwrap();
    assert!(parallel.wait().unwrap().success());
    ok(&["sweep", "--report", planned.to_str().unwrap()]);
    let reported = std::fs::read_to_string(planned.join("table.md")).unwrap();
    assert_eq!(accuracy_columns(&reported), rows);
    // Nothing is left to plan.
    let plan = ok(&args(&plan_args));
    assert!(plan.stdout.is_empty());

    // More seeds for the same grid join it: only the new ones run.
    let mut more = grid_args(&built_in);
    let at = more.iter().position(|a| a == "0-1").unwrap();
    more[at] = "0-2".into();
    let grown = ok(&args(&more));
    assert!(String::from_utf8_lossy(&grown.stderr).contains("(4 finished before)"));
    let table = std::fs::read_to_string(built_in.join("table.md")).unwrap();
    assert_eq!(accuracy_columns(&table).len(), 2);
    assert!(
        accuracy_columns(&table)
            .iter()
            .all(|r| r.contains("| 3/3 |")),
        "{table}"
    );
    // Another grid there is refused.
    let mut other = grid_args(&built_in);
    other[3] = "lr=0.1".into();
    let refused = bnlab(&args(&other));
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("another sweep"));
}

#[test]
fn bad_sweeps_are_one_line_errors_before_any_run() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("s");
    let out = out.to_str().unwrap();
    for (args, says) in [
        (
            vec!["sweep", "lenet-bn-scratch", "--set", "lr"],
            "KEY=V1,V2",
        ),
        (
            vec!["sweep", "lenet-bn-scratch", "--set", "lr=0,1", "--out", out],
            "--lr",
        ),
        (
            vec![
                "sweep",
                "lenet-bn-scratch",
                "--set",
                "speed=1",
                "--out",
                out,
            ],
            "speed",
        ),
        (
            vec!["sweep", "lenet-bn-scratch", "--seeds", "5-1", "--out", out],
            "--seeds",
        ),
        (vec!["sweep", "lenet-bn-scratch"], "--out"),
        (vec!["sweep", "--report", out], "sweep.json"),
        (
            vec!["sweep", "bn-lit", "--out", out],
            "did you mean bn-lite?",
        ),
    ] {
        let o = bnlab(&args);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
    assert!(!tmp.path().join("s").join("runs").exists());
}

#[test]
fn a_shipped_sweep_runs_its_variants_and_reports_each() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("noise");
    let listed = String::from_utf8_lossy(&ok(&["recipes"]).stdout).into_owned();
    assert!(listed.contains("bn-eval-noise"), "{listed}");
    #[rustfmt::skip]
    ok(&[
        "sweep", "bn-eval-noise", "--seeds", "0", "--set", "epochs=1", "--set", "limit_batches=2",
        "--set", "batch_size=32", "--jobs", "2", "--out", out.to_str().unwrap(),
    ]);
    let table = std::fs::read_to_string(out.join("table.md")).unwrap();
    for variant in [
        "bn-all",
        "bn-conv-only",
        "bn-fc-only",
        "precise-bn",
        "momentum-0.01",
    ] {
        let row = format!("| variant={variant},epochs=1,limit_batches=2,batch_size=32 ");
        assert!(table.contains(&row), "{row} in\n{table}");
    }
    // Each run took its variant's settings.
    let config = |run: &str| -> serde_json::Value {
        let path = out.join("runs").join(run).join("config.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    };
    let run = "variant=bn-conv-only,epochs=1,limit_batches=2,batch_size=32,seed=0";
    assert_eq!(config(run)["bn_layers"], "conv");
    // With a numeric axis beside the variants, the plot against it is drawn too.
    let lite = dir.path().join("lite");
    #[rustfmt::skip]
    ok(&[
        "sweep", "bn-lite", "--seeds", "0", "--set", "epochs=1", "--set", "limit_batches=1",
        "--set", "batch_size=16", "--jobs", "2", "--out", lite.to_str().unwrap(),
    ]);
    assert!(lite.join("final-acc.svg").is_file() && lite.join("curves.svg").is_file());
    let run = "variant=momentum-0.01,epochs=1,limit_batches=2,batch_size=32,seed=0";
    assert_eq!(config(run)["bn_momentum"], 0.01);
    assert_eq!(config(run)["norm"], "fused");
}

#[test]
fn a_sweep_directory_takes_over_what_a_newer_sweep_file_says() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("small");
    let args = |seeds: &'static str| -> Vec<String> {
        let out = out.to_str().unwrap().to_string();
        [
            "sweep",
            "bn-small-batches",
            "--seeds",
            seeds,
            "--plan",
            "--out",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([out])
        .collect()
    };
    let run = |seeds| ok(&args(seeds).iter().map(String::as_str).collect::<Vec<_>>());
    run("0");
    let path = out.join("sweep.json");
    let read = || -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
    };
    assert_eq!(read()["plot_against"], "batch_size");
    // As an older bnlab wrote it: no name, no plot_against.
    let mut older = read();
    let fields = older.as_object_mut().unwrap();
    fields.remove("plot_against");
    fields.remove("name");
    std::fs::write(&path, serde_json::to_string_pretty(&older).unwrap()).unwrap();
    let plan = String::from_utf8(run("0-1").stdout).unwrap();
    // Seed 0's runs were planned, not run: both seeds are pending.
    assert_eq!(plan.lines().count(), 2 * 30, "{plan}");
    let now = read();
    assert_eq!(now["plot_against"], "batch_size");
    assert_eq!(now["name"], "bn-small-batches");
    assert_eq!(now["seeds"], serde_json::json!([0, 1]));
}
