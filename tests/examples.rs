//! The examples in `examples/` run as a user runs them, and do what they say.
//!
//! `cargo test` builds the examples next to the test binaries (`target/<profile>/examples/`)
//! without running them; these tests run those binaries. A filtered run (`--test examples`) does
//! not build them: then build them first (`cargo build --release --features wgpu --examples`).

use std::path::PathBuf;
use std::process::{Command, Output};

/// The built example `name`, checked to exist and to be no older than its source.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    // target/<profile>/deps/<test binary> → target/<profile>/examples/<name>
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).unwrap();
    let path = profile_dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    let source = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("examples/{name}.rs"));
    let modified = |p: &PathBuf| p.metadata().and_then(|m| m.modified()).ok();
    let built = modified(&path).unwrap_or_else(|| {
        panic!(
            "{} is not built: run the whole suite (`cargo test` builds the examples) or \
             `cargo build --examples` with this test's profile and features first",
            path.display()
        )
    });
    assert!(
        modified(&source).is_some_and(|s| s <= built),
        "{} is older than {}: rebuild the examples",
        path.display(),
        source.display()
    );
    path
}

fn run(name: &str, args: &[&str]) -> Output {
    Command::new(example(name))
        .args(args)
        .output()
        .expect("the example runs")
}

/// The number after `label` on the line that starts with it.
fn value(stdout: &str, label: &str) -> f64 {
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix(label))
        .unwrap_or_else(|| panic!("no '{label}' line in:\n{stdout}"));
    line.trim()
        .parse()
        .unwrap_or_else(|_| panic!("'{label}{line}' is not a number"))
}

#[test]
fn own_model_trains_bnlab_batch_norm_in_a_users_cnn_and_evaluates_it() {
    let out = run("own_model", &["--batches", "20"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "exit {}:\n{stdout}\n{stderr}",
        out.status
    );
    let loss = value(&stdout, "train loss ");
    let accuracy = value(&stdout, "test accuracy ");
    assert!((0.0..=1.0).contains(&accuracy), "test accuracy {accuracy}");
    // 20 batches of 64 reach about 0.6 on the 10,000 test images in eval mode (seeded, so the
    // same every run); chance is 0.1, and the loss at chance is ln 10 = 2.30.
    assert!(accuracy > 0.35, "test accuracy {accuracy} after 20 batches");
    assert!(loss.is_finite() && loss < 2.0, "train loss {loss}");
}

#[test]
fn own_model_rejects_an_unknown_argument_in_one_line() {
    let out = run("own_model", &["--epochs", "3"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("'--epochs'"), "{stderr}");
}
