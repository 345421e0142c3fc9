//! One process at a time writes a run directory. A run holds an exclusive `flock` on
//! `DIR/.lock` for as long as it writes there (a new run, a resumed one, each run of `compare`);
//! a second process that wants the directory fails at once instead of mixing its files in. The
//! kernel drops the lock when the process ends however it ends (SIGKILL included), so a stale
//! lock never needs clearing by hand; the empty `.lock` file stays behind, and unlinking it
//! would let two processes lock two different files of one name.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;

use super::checkpoint::CONFIG_FILE;
use super::checkpoint::RESUME_DIR;

const LOCK_FILE: &str = ".lock";

/// A run directory this process holds; others cannot take it until this is dropped.
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
    _lock: File,
    /// This process made the directory (so it may remove it again if nothing was written).
    created: bool,
}

impl RunDir {
    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A new run in `dir` (`--out`): created if missing, refused if it holds a run or another
    /// process holds it.
    pub fn create(dir: &Path) -> anyhow::Result<Self> {
        let created = !dir.exists();
        std::fs::create_dir_all(dir)
            .with_context(|| format!("--out {}: cannot write there", dir.display()))?;
        let run = Self::lock(dir, "--out", created)?;
        if holds_a_run(dir) {
            anyhow::bail!(
                "--out {0}: already holds a run (continue it with bnlab train --resume {0}, or \
                 choose another --out)",
                dir.display()
            );
        }
        Ok(run)
    }

    /// A new run under `parent` named `name-TIME`, with `-2`, `-3`, ... added if a run started
    /// in the same second took that name: `create_dir` fails on an existing directory, so two
    /// processes never get the same one.
    pub fn create_unique(parent: &Path, name: &str) -> anyhow::Result<Self> {
        let stamp = chrono::Local::now().format("%Y%m%d-%H%M%S");
        let fail = || {
            format!(
                "{}: cannot create a run directory there (pass --out DIR)",
                parent.display()
            )
        };
        std::fs::create_dir_all(parent).with_context(fail)?;
        for n in 1..=1000 {
            let suffix = if n == 1 {
                String::new()
            } else {
                format!("-{n}")
            };
            let dir = parent.join(format!("{name}-{stamp}{suffix}"));
            match std::fs::create_dir(&dir) {
                Ok(()) => return Self::lock(&dir, "--out", true),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e).with_context(fail),
            }
        }
        anyhow::bail!(
            "{}: no free run name for {name}; pass --out",
            parent.display()
        )
    }

    /// An existing run to continue (`--resume`). Temporary files that a killed process left
    /// are removed: with the lock held, no one else is writing them.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        if !dir.join(CONFIG_FILE).is_file() {
            anyhow::bail!(
                "--resume {}: not a bnlab run directory (it has no {CONFIG_FILE})",
                dir.display()
            );
        }
        let run = Self::lock(dir, "--resume", false)?;
        for sub in [dir.to_path_buf(), dir.join(RESUME_DIR)] {
            for entry in std::fs::read_dir(sub).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                if name.starts_with(".bnlab-") && name.ends_with(".tmp") {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        Ok(run)
    }

    fn lock(dir: &Path, flag: &str, created: bool) -> anyhow::Result<Self> {
        let lock_path = dir.join(LOCK_FILE);
        let mut file = File::options()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("{flag} {}: cannot write there", dir.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                anyhow::bail!(
                    "{flag} {}: another bnlab process ({}) is writing this run; wait for it or \
                     choose another directory",
                    dir.display(),
                    match holder.trim() {
                        "" => "pid unknown".to_string(),
                        pid => format!("pid {pid}"),
                    }
                );
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("{}: cannot lock", lock_path.display()));
            }
        }
        // Only for the message another process prints; the lock itself is what protects.
        let _ = file
            .set_len(0)
            .and_then(|_| file.rewind())
            .and_then(|_| write!(file, "{}", std::process::id()));
        Ok(Self {
            path: dir.to_path_buf(),
            _lock: file,
            created,
        })
    }

    /// After a failure: removes the directory if this process made it and wrote nothing into
    /// it but the lock, so a failed start leaves no empty run directory behind.
    pub fn remove_if_unused(self) {
        if !self.created {
            return;
        }
        let only_lock = std::fs::read_dir(&self.path).is_ok_and(|entries| {
            entries
                .flatten()
                .all(|e| e.file_name().to_str() == Some(LOCK_FILE))
        });
        if only_lock {
            let _ = std::fs::remove_file(self.path.join(LOCK_FILE));
            let _ = std::fs::remove_dir(&self.path);
        }
    }
}

/// A file in `dir` that a started-over run would replace: a model, the metrics, anything but
/// the config, the lock, temporary files and an empty or absent resume directory.
pub fn first_result(dir: &Path) -> Option<String> {
    let resume_empty = |p: &Path| std::fs::read_dir(p).is_ok_and(|mut e| e.next().is_none());
    std::fs::read_dir(dir).ok()?.flatten().find_map(|entry| {
        let name = entry.file_name().to_string_lossy().to_string();
        let ours = name == CONFIG_FILE
            || name == LOCK_FILE
            || (name.starts_with(".bnlab-") && name.ends_with(".tmp"))
            || (name == RESUME_DIR && resume_empty(&entry.path()));
        (!ours).then_some(name)
    })
}

/// `dir` holds (part of) a run: its config, or a resume point.
pub fn holds_a_run(dir: &Path) -> bool {
    dir.join(CONFIG_FILE).exists() || dir.join(RESUME_DIR).exists()
}
