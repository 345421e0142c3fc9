//! `sweep`: a recipe over a grid of settings and seeds, run as child `bnlab` processes (or
//! printed as command lines for a scheduler), and the table of what they say together.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bnlab::recipes;
use bnlab::report::metrics::read_jsonl;
use bnlab::train::resume::has_resume_point;
use bnlab::train::sweep::{self, finished, run_dir, Grid, Point, SWEEP_FILE};

use super::args::{at_least_one, unit_interval, EnvArgs};

/// What `bnlab sweep` was asked.
#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["recipe", "report"])))]
pub(crate) struct SweepCommand {
    /// A shipped sweep (its grid, seeds and settings; see `bnlab recipes`), or a recipe to
    /// sweep over the --set values.
    pub(crate) recipe: Option<String>,
    /// A setting to vary, by its recipe-file name, and its values (repeatable; the grid is
    /// every combination): --set lr=0.1,1.0 --set norm=fused,none.
    #[arg(long = "set", value_name = "KEY=V1,V2,...", requires = "recipe")]
    pub(crate) set: Vec<String>,
    /// The seeds each setting runs with: A-B or A,B,C [default: the sweep's, or 0-4].
    #[arg(long, value_name = "SEEDS")]
    pub(crate) seeds: Option<String>,
    /// Runs at a time, each with an equal share of the cores [default: one per core].
    #[arg(long, value_name = "N", value_parser = at_least_one)]
    pub(crate) jobs: Option<usize>,
    /// The sweep's directory: sweep.json, runs/ (one run directory and log per run),
    /// table.md. Runs finished there are not run again.
    #[arg(long, value_name = "DIR")]
    pub(crate) out: Option<PathBuf>,
    /// Print each pending run as one self-contained bnlab command line and run nothing
    /// (for GNU parallel or a Slurm array on a shared filesystem; then --report DIR).
    #[arg(long, requires = "recipe")]
    pub(crate) plan: bool,
    /// Rewrite the table from the runs in a sweep directory.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["recipe", "plan", "out"])]
    pub(crate) report: Option<PathBuf>,
    /// Test accuracy of the "first epoch ≥" column [default: the sweep's, or 0.85].
    #[arg(long, value_name = "ACC", value_parser = unit_interval)]
    pub(crate) threshold: Option<f64>,
    #[command(flatten)]
    pub(crate) env: EnvArgs,
}

pub(crate) fn sweep(command: SweepCommand) -> anyhow::Result<()> {
    let env = &command.env;
    if let Some(dir) = &command.report {
        return report(dir, command.threshold);
    }
    let name = command
        .recipe
        .clone()
        .expect("clap requires RECIPE or --report");
    let axes = command
        .set
        .iter()
        .map(|s| sweep::parse_axis(s))
        .collect::<Result<Vec<_>, _>>()?;
    let seeds = command.seeds.as_deref();
    let mut grid = match recipes::load_sweep(&name) {
        Some(file) => file?.grid(seeds)?,
        None if !recipes::names().contains(&name.as_str()) => {
            let all: Vec<&str> = recipes::names()
                .into_iter()
                .chain(recipes::sweep_names())
                .collect();
            let hint = bnlab::choice::closest(&name, &all)
                .map(|n| format!(": did you mean {n}?"))
                .unwrap_or_default();
            anyhow::bail!(
                "unknown recipe or sweep '{name}'{hint} (bnlab recipes lists them: {})",
                all.join(", ")
            );
        }
        None => Grid {
            recipe: name,
            axes: Vec::new(),
            seeds: sweep::parse_seeds(seeds.unwrap_or("0-4"))?,
            base: Vec::new(),
            variants: Vec::new(),
            threshold: None,
            name: None,
            plot_against: None,
        },
    };
    grid.axes.extend(axes);
    grid.threshold = command.threshold.or(grid.threshold);
    grid.check(&recipes::load(&grid.recipe)?)?;
    let dir = command.out.clone().ok_or_else(|| {
        anyhow::anyhow!(
            "--out DIR: name the sweep's directory (its runs, sweep.json and table.md go there)"
        )
    })?;
    record_grid(&dir, &grid)?;

    let points = grid.points();
    let pending: Vec<&Point> = points
        .iter()
        .filter(|p| !finished(&run_dir(&dir, p)))
        .collect();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let jobs = command.jobs.unwrap_or(cores).clamp(1, cores.max(1));
    // Each run gets its share of the cores, so the machine is not oversubscribed.
    let threads = (cores / jobs).max(1);
    if command.plan {
        // Another machine has its own cores: threads are named only if --jobs was.
        let plan_threads = command.jobs.map(|_| threads);
        for point in &pending {
            println!(
                "{}",
                shell_line(&run_command(&grid, &dir, point, plan_threads, env))
            );
        }
        return Ok(());
    }
    eprintln!(
        "sweep: {} runs in {} ({} finished before), {jobs} at a time, {threads} threads each",
        points.len(),
        dir.display(),
        points.len() - pending.len()
    );
    let failed = run_all(&grid, &dir, &pending, jobs, threads, env, points.len())?;
    report(&dir, command.threshold)?;
    if !failed.is_empty() {
        anyhow::bail!(
            "{} of the sweep's runs failed (their logs: {}); run the same sweep again to retry \
             them",
            failed.len(),
            failed
                .iter()
                .map(|d| log_path(d).display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

/// Writes `DIR/sweep.json`, or checks that the one there is this grid's.
fn record_grid(dir: &Path, grid: &Grid) -> anyhow::Result<()> {
    let path = dir.join(SWEEP_FILE);
    if path.exists() {
        let there = Grid::load(dir)?;
        if !there.same_runs_as(grid) {
            let axes: Vec<String> = there
                .axes
                .iter()
                .map(|(k, v)| format!("--set {k}={}", v.join(",")))
                .collect();
            anyhow::bail!(
                "--out {}: it holds another sweep ({} {}); choose another --out",
                dir.display(),
                there.recipe,
                axes.join(" ")
            );
        }
        // The same grid with other seeds: the sweep now covers both; and what a newer sweep
        // file says about the grid (its name, the plot's x axis) is taken over.
        let mut seeds = there.seeds.clone();
        seeds.extend(grid.seeds.iter().filter(|s| !there.seeds.contains(s)));
        let grown = Grid {
            seeds,
            name: grid.name.clone().or(there.name.clone()),
            plot_against: grid.plot_against.clone().or(there.plot_against.clone()),
            ..there.clone()
        };
        if grown == there {
            return Ok(());
        }
        let text = serde_json::to_string_pretty(&grown)? + "\n";
        return bnlab::report::output::write_output("--out", &path, text.as_bytes(), true);
    }
    std::fs::create_dir_all(dir.join("runs"))
        .map_err(|e| anyhow::anyhow!("--out {}: {e}", dir.display()))?;
    let text = serde_json::to_string_pretty(grid)? + "\n";
    bnlab::report::output::write_output("--out", &path, text.as_bytes(), false)
}

/// The log of the run in `run_dir`: beside it, so that the run directory holds only the run.
fn log_path(run_dir: &Path) -> PathBuf {
    run_dir.with_extension("log")
}

/// The `bnlab` command that runs (or continues) `point`; `threads` if set.
fn run_command(
    grid: &Grid,
    dir: &Path,
    point: &Point,
    threads: Option<usize>,
    env: &EnvArgs,
) -> Vec<String> {
    let exe = std::env::current_exe().map_or("bnlab".into(), |p| p.display().to_string());
    let out = run_dir(dir, point);
    let mut args = vec![exe];
    if has_resume_point(&out) {
        args.extend(["train".into(), "--resume".into(), out.display().to_string()]);
    } else {
        args.extend(["run".into(), grid.recipe.clone()]);
        for (key, value) in grid.settings_of(point) {
            args.extend(["--set".into(), format!("{key}={value}")]);
        }
        args.extend(["--seed".into(), point.seed.to_string()]);
        args.extend(["--out".into(), out.display().to_string()]);
    }
    args.extend([
        "--json".into(),
        "--data".into(),
        env.data.display().to_string(),
    ]);
    if let Some(threads) = threads {
        args.extend(["--threads".into(), threads.to_string()]);
    }
    args
}

/// One shell line: each argument quoted where the shell would read it otherwise.
fn shell_line(args: &[String]) -> String {
    args.iter()
        .map(|a| {
            let plain = a
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "=,._/-:+".contains(c));
            match plain && !a.is_empty() {
                true => a.clone(),
                false => format!("'{}'", a.replace('\'', r"'\''")),
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `pending`, `jobs` at a time, each with its log; returns the directories of the runs
/// that failed.
fn run_all(
    grid: &Grid,
    dir: &Path,
    pending: &[&Point],
    jobs: usize,
    threads: usize,
    env: &EnvArgs,
    total: usize,
) -> anyhow::Result<Vec<PathBuf>> {
    let mut queue = pending.iter();
    let mut running: Vec<(PathBuf, Child)> = Vec::new();
    let mut failed = Vec::new();
    let mut done = total - pending.len();
    let mut shown = String::new();
    loop {
        while running.len() < jobs {
            let Some(point) = queue.next() else { break };
            let out = run_dir(dir, point);
            let args = run_command(grid, dir, point, Some(threads), env);
            let log = std::fs::File::create(log_path(&out))
                .map_err(|e| anyhow::anyhow!("{}: {e}", log_path(&out).display()))?;
            let child = Command::new(&args[0])
                .args(&args[1..])
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .map_err(|e| anyhow::anyhow!("{}: {e}", args[0]))?;
            running.push((out, child));
        }
        if running.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
        let mut still = Vec::new();
        for (out, mut child) in running {
            match child.try_wait()? {
                None => still.push((out, child)),
                Some(status) => {
                    done += 1;
                    if !status.success() {
                        failed.push(out);
                    }
                }
            }
        }
        running = still;
        let line = format!(
            "sweep: {done}/{total} runs done, {} running, {} failed",
            running.len(),
            failed.len()
        );
        if line != shown {
            eprint!("\r{line}   ");
            shown = line;
        }
    }
    eprintln!();
    Ok(failed)
}

/// Reads the runs of the sweep in `dir` and writes (and prints) `DIR/table.md`.
fn report(dir: &Path, threshold: Option<f64>) -> anyhow::Result<()> {
    let grid = Grid::load(dir)?;
    let threshold = threshold.or(grid.threshold).unwrap_or(0.85);
    let metrics = |p: &Point| {
        let run = run_dir(dir, p);
        finished(&run)
            .then(|| read_jsonl(&run.join("metrics.jsonl")).ok())
            .flatten()
    };
    let rows = sweep::summarize(&grid, metrics, threshold);
    let table = format!(
        "Sweep {}of `{}` over {} seeds ({}); mean ± std over the finished runs of each \
         setting.\n\n{}",
        grid.name
            .as_ref()
            .map_or(String::new(), |n| format!("`{n}` ")),
        grid.recipe,
        grid.seeds.len(),
        grid.seeds
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        sweep::markdown(&rows, threshold)
    );
    // The table and plots are the sweep's own files: rewritten each time.
    bnlab::report::output::write_output("--report", &dir.join("table.md"), table.as_bytes(), true)?;
    plots(dir, &grid, &rows, &metrics)?;
    print!("{table}");
    Ok(())
}

/// `curves.svg/png`: each setting's training curves averaged over its seeds; and, when a swept
/// setting has numbers for values (or the sweep file names one in `plot_against`),
/// `final-acc.svg/png`: the final test accuracy against it, mean ± std over seeds, a line per
/// combination of the other settings.
fn plots(
    dir: &Path,
    grid: &Grid,
    rows: &[sweep::SettingSummary],
    metrics: &dyn Fn(&Point) -> Option<Vec<bnlab::report::EpochMetrics>>,
) -> anyhow::Result<()> {
    use bnlab::report::plot::{band_svg, curves_svg, svg_to_png};
    let write = |stem: &str, svg: String| -> anyhow::Result<()> {
        let png = svg_to_png(&svg)?;
        let out = |ext: &str| dir.join(format!("{stem}.{ext}"));
        bnlab::report::output::write_output("--report", &out("svg"), svg.as_bytes(), true)?;
        bnlab::report::output::write_output("--report", &out("png"), &png, true)
    };
    let points = grid.points();
    let curves: Vec<(String, Vec<bnlab::report::EpochMetrics>)> = points
        .chunks(grid.seeds.len().max(1))
        .filter_map(|group| {
            let runs: Vec<_> = group.iter().filter_map(metrics).collect();
            (!runs.is_empty()).then(|| (group[0].setting_name(), sweep::mean_curve(&runs)))
        })
        .collect();
    if curves.is_empty() {
        return Ok(());
    }
    write("curves", curves_svg(&curves)?)?;
    let Some((key, series)) = sweep::band_series(grid, rows) else {
        return Ok(());
    };
    let xs: Vec<f64> = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|q| q.0))
        .collect();
    let (lo, hi) = xs
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    let log_x = lo > 0.0 && hi / lo >= 10.0;
    write(
        "final-acc",
        band_svg(&series, &key, "final test accuracy", log_x)?,
    )
}
