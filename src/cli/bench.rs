//! `bench`: the chapter's workloads timed, as `shared/bench/torch_bench.py` times PyTorch's.

use anyhow::Context;

use bnlab::data::FashionMnist;
use bnlab::models::ModelKind;
use bnlab::norm::NormKind;

use super::args::*;
use super::set_up;

pub(crate) fn bench(
    json: bool,
    quick: bool,
    only: &[String],
    norms: &[NormKind],
    env: &EnvArgs,
) -> anyhow::Result<()> {
    use bnlab::bench::{self, Scale, NORMS};
    const ALL: [&str; 8] = ["W0", "W1", "W4", "W5", "W6", "W7", "W8", "RSS"];
    let only: Vec<String> = only.iter().map(|w| w.trim().to_uppercase()).collect();
    if let Some(bad) = only.iter().find(|w| !ALL.contains(&w.as_str())) {
        anyhow::bail!(
            "--only {bad}: unknown workload (choose from {})",
            ALL.join(", ")
        );
    }
    let wanted = |w: &str| only.is_empty() || only.iter().any(|o| o == w);
    let norms = if norms.is_empty() { &NORMS[..] } else { norms };
    set_up(env)?;
    let scale = if quick { Scale::quick() } else { Scale::full() };
    let data = FashionMnist::load(&env.data)?;
    let emit = |r: bench::Record| {
        if json {
            println!("{}", serde_json::to_string(&r).expect("record serializes"));
        } else {
            let mut figure = match (r.examples_per_sec, r.ms_per_fwd_bwd, r.peak_rss_mb) {
                (Some(x), _, Some(mb)) => format!("{x:>9.1} examples/s, {mb:.0} MB peak RSS"),
                (Some(x), _, _) => format!("{x:>9.1} examples/s"),
                (_, Some(ms), _) => format!("{ms:>9.2} ms per fwd+bwd"),
                (_, _, Some(mb)) => format!("{mb:>9.0} MB peak RSS"),
                _ => String::new(),
            };
            if let (Some(rate), Some(copy)) = (r.gb_per_sec, r.copy_gb_per_sec) {
                let in_cache = r.copy_in_cache_gb_per_sec.unwrap_or(f64::NAN);
                figure += &format!(
                    ", {rate:.1} GB/s of its least traffic at the median ({:.0}% of a copy's \
                     {copy:.1} from memory; {in_cache:.1} in cache)",
                    100.0 * rate / copy
                );
            }
            match (r.gflops, r.share_of_peak, figure.is_empty()) {
                (Some(g), None, true) => figure = format!("{g:>9.1} GFLOP/s"),
                (Some(g), Some(share), _) => {
                    figure += &format!(", convs {g:.1} GFLOP/s ({:.0}% of W0)", 100.0 * share)
                }
                _ => {}
            }
            let norm = match (&r.norm, r.folded) {
                (Some(n), _) => format!(" --norm {n}"),
                (None, Some(true)) => " folded".into(),
                (None, Some(false)) => " unfolded".into(),
                (None, None) => String::new(),
            };
            println!(
                "{:<34} {figure}   ({}, {} threads)",
                format!("{}{norm}", r.workload),
                r.detail,
                r.threads
            );
        }
    };
    // First, while this process is small: a child's peak counts this process's resident
    // memory at the fork (see bench::reset_peak_rss).
    if wanted("RSS") {
        emit(peak_rss_of_training(quick, env)?);
    }
    // The matrix product's rate, the reference for the convolutions' share of it.
    let peak = ["W0", "W4", "W5", "W8"]
        .into_iter()
        .any(wanted)
        .then(|| bench::matmul_peak(scale));
    let peak_gflops = peak.as_ref().and_then(|r| r.gflops);
    let with_share = |mut r: bench::Record| {
        r.share_of_peak = r.gflops.zip(peak_gflops).map(|(g, p)| g / p);
        r
    };
    if let Some(r) = peak.clone().filter(|_| wanted("W0")) {
        emit(r);
    }
    if wanted("W1") {
        for &norm in norms {
            emit(bench::lenet_training(&data, norm, scale)?);
        }
    }
    if wanted("W4") {
        emit(with_share(bench::resnet_training(
            &data,
            NormKind::Fused,
            scale,
        )?));
    }
    if wanted("W5") {
        emit(with_share(bench::densenet_training(
            &data,
            NormKind::Fused,
            scale,
        )?));
    }
    if wanted("W8") {
        emit(with_share(bench::densenet_large_batch_training(
            &data,
            NormKind::Fused,
            scale,
        )?));
    }
    if wanted("W6") {
        for &norm in norms {
            emit(bench::bn_layer(norm, scale));
        }
    }
    if wanted("W7") {
        for kind in [ModelKind::LenetBn, ModelKind::Resnet18] {
            for folded in [false, true] {
                emit(bench::inference(&data, kind, folded, scale));
            }
        }
    }
    Ok(())
}

/// Peak RSS of a separate `bnlab train --epochs 1` process (LeNet-BN).
pub(crate) fn peak_rss_of_training(
    quick: bool,
    env: &EnvArgs,
) -> anyhow::Result<bnlab::bench::Record> {
    let tmp = tempfile::tempdir().context("cannot make a temporary directory")?;
    let exe = std::env::current_exe().context("cannot find the bnlab executable")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["train", "--epochs", "1", "--json", "--out"])
        .arg(tmp.path().join("run"));
    cmd.arg("--data").arg(&env.data);
    cmd.args(["--threads", &rayon::current_num_threads().to_string()]);
    cmd.args(["--device", &env.device.to_string()]);
    if quick {
        cmd.args(["--limit-batches", "3"]);
    }
    // Else the child's figure would include this process's own peak (W5's, say).
    bnlab::bench::reset_peak_rss();
    let started = std::time::Instant::now();
    let out = cmd.output().context("cannot run bnlab train")?;
    if !out.status.success() {
        anyhow::bail!(
            "the measured training run failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let mut r = bnlab::bench::Record::new(
        "RSS lenet_bn_train",
        started.elapsed().as_secs_f64(),
        "peak RSS of bnlab train --epochs 1 (LeNet-BN, batch 256)".into(),
    );
    r.peak_rss_mb = Some(bnlab::bench::children_peak_rss_mb());
    Ok(r)
}
