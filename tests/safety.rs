//! Nothing a user has is lost (issue 13): outputs never replace what is not bnlab's to
//! replace, two processes never share a run directory, damaged or non-finite weights are
//! refused, and extreme inputs neither hang nor exhaust the machine.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn bnlab() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bnlab"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `cmd`, expects failure with one line on stderr (no panic), and returns that line.
fn one_line_error(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{cmd:?} should fail");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{cmd:?}:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr.trim_end().to_string()
}

const QUICK: [&str; 6] = [
    "--epochs",
    "1",
    "--limit-batches",
    "1",
    "--batch-size",
    "32",
];

/// A finished one-epoch run in `dir`.
fn quick_run(dir: &Path) {
    let out = bnlab()
        .arg("train")
        .args(QUICK)
        .arg("--out")
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo");
}

/// What is at `path`, without following a link.
fn kind(path: &Path) -> &'static str {
    let t = std::fs::symlink_metadata(path).unwrap().file_type();
    match () {
        _ if t.is_symlink() => "symlink",
        _ if t.is_fifo() => "fifo",
        _ if t.is_char_device() => "device",
        _ if t.is_dir() => "dir",
        _ if t.is_file() => "file",
        _ => "other",
    }
}

#[test]
fn outputs_never_replace_devices_fifos_links_or_directories() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    quick_run(&run);
    let metrics = run.join("metrics.jsonl");
    let kept = tmp.path().join("kept.txt");
    std::fs::write(&kept, b"the user's").unwrap();

    // Each special file is named STEM.svg so that `plot --out STEM` meets it too.
    let mut targets: Vec<PathBuf> = Vec::new();
    let fifo = tmp.path().join("fifo.svg");
    mkfifo(&fifo);
    targets.push(fifo);
    let link = tmp.path().join("link.svg");
    std::os::unix::fs::symlink(&kept, &link).unwrap();
    targets.push(link);
    let dir = tmp.path().join("dir.svg");
    std::fs::create_dir(&dir).unwrap();
    targets.push(dir);
    if unsafe { libc::geteuid() } == 0 {
        // /dev/null's numbers: as root, `--metrics /dev/null` once replaced the real one.
        let null = tmp.path().join("null.svg");
        let made = Command::new("mknod")
            .arg(&null)
            .args(["c", "1", "3"])
            .status();
        if made.is_ok_and(|s| s.success()) {
            targets.push(null);
        }
    }
    for target in &targets {
        let before = kind(target);
        let t = target.to_str().unwrap();
        let stem = target.with_extension("");
        let mut new_run = bnlab();
        new_run
            .arg("train")
            .args(QUICK)
            .args(["--force", "--metrics", t, "--out"])
            .arg(tmp.path().join("unused"));
        let mut eval = bnlab();
        // A missing data directory: --logits is checked before anything is evaluated.
        eval.args([
            "eval",
            "--data",
            "/nonexistent",
            "--logits",
            t,
            "--checkpoint",
        ])
        .arg(&run);
        let mut export = bnlab();
        export.arg("export").arg(&run).args(["--force", "--out", t]);
        let mut plot = bnlab();
        plot.arg("plot").arg(&metrics).arg("--out").arg(&stem);
        for (flag, cmd) in [
            ("--metrics", &mut new_run),
            ("--logits", &mut eval),
            ("--out", &mut export),
            ("--out", &mut plot),
        ] {
            let line = one_line_error(cmd);
            assert!(
                line.contains(&format!("{flag} {t}: is a")) && line.contains("never replaces"),
                "{line}"
            );
            assert_eq!(kind(target), before, "{t} after {cmd:?}");
        }
        assert!(!tmp.path().join("unused").exists(), "no run was started");
    }
    assert_eq!(std::fs::read(&kept).unwrap(), b"the user's");
}

#[test]
fn an_existing_file_is_replaced_only_with_force() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    quick_run(&run);
    let out = tmp.path().join("model.safetensors");
    std::fs::write(&out, b"the user's").unwrap();
    let line = one_line_error(bnlab().arg("export").arg(&run).arg("--out").arg(&out));
    assert!(
        line.contains(&format!(
            "--out {}: already exists (pass --force",
            out.display()
        )),
        "{line}"
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"the user's");
    // Another run's metrics are no scratch space either.
    let theirs = run.join("metrics.jsonl");
    let before = std::fs::read(&theirs).unwrap();
    let line = one_line_error(
        bnlab()
            .arg("train")
            .args(QUICK)
            .arg("--metrics")
            .arg(&theirs)
            .arg("--out")
            .arg(tmp.path().join("second")),
    );
    assert!(line.contains("--metrics"), "{line}");
    assert_eq!(std::fs::read(&theirs).unwrap(), before);

    let status = bnlab()
        .arg("export")
        .arg(&run)
        .arg("--force")
        .arg("--out")
        .arg(&out)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    assert_ne!(std::fs::read(&out).unwrap(), b"the user's");
}

/// Two `train` processes on one `--out`: one fails at once with one line, and every file in
/// the directory is the other's (its config, its metrics).
#[test]
fn two_runs_never_share_a_run_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let start = |seed: &str| {
        bnlab()
            .args(["train", "--epochs", "2", "--limit-batches", "4", "--json"])
            .args(["--batch-size", "32", "--seed", seed, "--out"])
            .arg(&dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (start("1"), start("2"));
    let results = [
        ("1", a.wait_with_output().unwrap()),
        ("2", b.wait_with_output().unwrap()),
    ];
    let (winners, losers): (Vec<_>, Vec<_>) = results.iter().partition(|(_, o)| o.status.success());
    assert_eq!((winners.len(), losers.len()), (1, 1), "exactly one runs");
    let (seed, won) = winners[0];
    let lost = &losers[0].1;
    let line = text(&lost.stderr);
    assert_eq!(line.trim_end().lines().count(), 1, "{line}");
    assert!(
        line.contains("another bnlab process") || line.contains("already holds a run"),
        "{line}"
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["seed"].to_string(), *seed);
    assert_eq!(
        std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap(),
        text(&won.stdout)
    );
}

/// Runs started in the same second in one directory get run directories of their own.
#[test]
fn default_run_names_are_unique() {
    let cwd = tempfile::tempdir().unwrap();
    let children: Vec<_> = (0..2)
        .map(|_| {
            bnlab()
                .arg("train")
                .args(QUICK)
                .current_dir(cwd.path())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let runs: Vec<PathBuf> = std::fs::read_dir(cwd.path().join("runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(runs.len(), 2, "{runs:?}");
    for run in runs {
        assert!(run.join("model.bpk").is_file(), "{run:?}");
    }
}

#[test]
fn compare_gives_a_recipe_named_twice_a_directory_of_its_own() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("cmp");
    let compare = || {
        let mut cmd = bnlab();
        cmd.args([
            "compare",
            "lenet",
            "lenet",
            "--epochs",
            "1",
            "--limit-batches",
            "1",
        ])
        .arg("--out")
        .arg(&out)
        .stdout(Stdio::null());
        cmd
    };
    let status = compare().stderr(Stdio::null()).status().unwrap();
    assert!(status.success());
    for name in ["lenet", "lenet-2"] {
        assert!(out.join(name).join("model.bpk").is_file(), "{name}");
    }
    let table = std::fs::read_to_string(out.join("comparison.md")).unwrap();
    assert!(table.contains("lenet-2"), "{table}");
    // A second comparison into the same directory refuses to replace the first one's files.
    let line = one_line_error(&mut compare());
    assert!(line.contains("already exists (pass --force"), "{line}");
}

/// The byte range of tensor `key`'s data in a safetensors file.
fn tensor_range(bytes: &[u8], key: &str) -> std::ops::Range<usize> {
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let offsets = &header[key]["data_offsets"];
    let start = 8 + header_len + offsets[0].as_u64().unwrap() as usize;
    start..8 + header_len + offsets[1].as_u64().unwrap() as usize
}

#[test]
fn damaged_and_non_finite_weights_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    quick_run(&run);
    let model = run.join("model.bpk");
    let good = std::fs::read(&model).unwrap();

    // A block of 0xFF in the middle: the checksum catches it, whatever the block hit.
    let mut damaged = good.clone();
    let mid = damaged.len() / 2;
    damaged[mid..mid + 64].fill(0xff);
    std::fs::write(&model, &damaged).unwrap();
    for args in [
        &["eval", "--limit-batches", "1", "--checkpoint"][..],
        &["inspect"],
    ] {
        let line = one_line_error(bnlab().args(args).arg(&run));
        assert!(line.contains("checksum does not match"), "{line}");
        assert!(line.contains("model.bpk"), "{line}");
    }
    // A checkpoint from before the checksum (no 12-byte seal) still loads.
    std::fs::write(&model, &good[..good.len() - 12]).unwrap();
    let status = bnlab()
        .arg("inspect")
        .arg(&run)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::write(&model, &good).unwrap();

    let weights = tmp.path().join("w.safetensors");
    let status = bnlab()
        .arg("export")
        .arg(&run)
        .arg("--out")
        .arg(&weights)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let clean = std::fs::read(&weights).unwrap();
    // LeNet-BN's state_dict: conv 0, BN 1, ...; the checker names Burn's fields.
    for (key, value, says) in [
        ("0.weight", f32::NAN, "conv1.weight holds NaN"),
        ("0.weight", f32::INFINITY, "conv1.weight holds inf"),
        (
            "1.running_var",
            -1.0,
            "bn1.running_var holds a negative variance",
        ),
    ] {
        let mut bytes = clean.clone();
        let range = tensor_range(&bytes, key);
        bytes[range.start..range.start + 4].copy_from_slice(&value.to_le_bytes());
        let bad = tmp.path().join("bad.safetensors");
        std::fs::write(&bad, &bytes).unwrap();
        let line = one_line_error(bnlab().arg("eval").arg("--weights").arg(&bad));
        assert!(line.contains(says), "{key}: {line}");
        assert!(line.contains("--weights"), "{line}");
        // Training from such weights is refused the same way.
        let line = one_line_error(
            bnlab()
                .arg("train")
                .args(QUICK)
                .arg("--init")
                .arg(&bad)
                .arg("--out")
                .arg(tmp.path().join("from-bad")),
        );
        assert!(line.contains(says) && line.contains("--init"), "{line}");
        assert!(
            !tmp.path().join("from-bad").exists(),
            "no run directory is left"
        );
    }
}

/// Waits for `child` at most `limit`; a hang kills it and fails.
fn wait_at_most(mut child: std::process::Child, limit: Duration) -> Output {
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            child.kill().unwrap();
            panic!("still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn plot_returns_on_metrics_near_the_largest_float() {
    let tmp = tempfile::tempdir().unwrap();
    let metrics = tmp.path().join("m.jsonl");
    let line = |epoch: usize, loss: f64| {
        format!(
            "{{\"epoch\":{epoch},\"train_loss\":{loss:e},\"train_acc\":0.1,\"test_acc\":0.1,\
             \"examples_per_sec\":1.0,\"seconds\":1.0}}\n"
        )
    };
    std::fs::write(
        &metrics,
        line(1, 0.5) + &line(2, 1.7e308) + &line(3, -1.7e308),
    )
    .unwrap();
    let child = bnlab()
        .arg("plot")
        .arg(&metrics)
        .arg("--out")
        .arg(tmp.path().join("curves"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_at_most(child, Duration::from_secs(20));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(tmp.path().join("curves.png").is_file());
}

#[test]
fn threads_beyond_the_cores_are_capped() {
    let tmp = tempfile::tempdir().unwrap();
    let child = bnlab()
        .arg("train")
        .args(QUICK)
        .args(["--threads", "100000", "--out"])
        .arg(tmp.path().join("run"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_at_most(child, Duration::from_secs(20));
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("--threads 100000: this machine has"),
        "{stderr}"
    );
}

/// A resumed run takes the run directory's lock too: while another process holds it (here
/// this test), `--resume` fails at once and writes nothing.
#[test]
fn a_resumed_run_takes_the_lock_too() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    quick_run(&run);
    let before = std::fs::read(run.join("config.json")).unwrap();
    let lock = std::fs::File::options()
        .write(true)
        .open(run.join(".lock"))
        .unwrap();
    lock.try_lock().unwrap();
    let line = one_line_error(
        bnlab()
            .args(["train", "--epochs", "2", "--resume"])
            .arg(&run),
    );
    assert!(line.contains("another bnlab process"), "{line}");
    assert_eq!(std::fs::read(run.join("config.json")).unwrap(), before);
    drop(lock);
    let status = bnlab()
        .args(["train", "--epochs", "2", "--resume"])
        .arg(&run)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
}

/// A checkpoint that does not fit its config says so in a line, not in Burn's 5 KB list.
#[test]
fn a_model_config_mismatch_is_a_short_error() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    quick_run(&run);
    let config = run.join("config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("\"lenet-bn\"", "\"resnet18\"")).unwrap();
    let line = one_line_error(bnlab().arg("inspect").arg(&run));
    assert!(
        line.contains("does not fit the model its run config describes (resnet18"),
        "{line}"
    );
    assert!(line.len() < 400, "{} bytes: {line}", line.len());
}
