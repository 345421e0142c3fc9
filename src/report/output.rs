//! Every file bnlab writes goes through [`write_file`]: a temporary file in the same directory,
//! renamed over the target, so a reader sees the old content or the new, never a part. What is
//! already at the target decides whether the rename may happen at all: a device node, FIFO,
//! socket, directory or symbolic link is never replaced, and a regular file only when the
//! caller says so (bnlab's own files in a run directory it holds, or `--force`).

use std::io::Write;
use std::path::Path;

/// What a write may do to a regular file already at its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Fail if anything is there: a file the user named, without `--force`.
    Refuse,
    /// Replace it: a file this process owns, or a user-named one with `--force`.
    Replace,
}

impl Existing {
    /// The policy for a file the user named: replace only with `--force`.
    pub fn replace_if(force: bool) -> Self {
        if force {
            Self::Replace
        } else {
            Self::Refuse
        }
    }
}

/// Why `path` must not be written under `existing`, if it must not. Looks at the path itself,
/// not at what a symbolic link points to.
fn refusal(path: &Path, existing: Existing) -> Option<String> {
    use std::os::unix::fs::FileTypeExt;
    let kind = std::fs::symlink_metadata(path).ok()?.file_type();
    let what = if kind.is_file() {
        return (existing == Existing::Refuse)
            .then(|| "already exists (pass --force to replace it)".to_string());
    } else if kind.is_symlink() {
        "a symbolic link"
    } else if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_char_device() || kind.is_block_device() {
        "a device node"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    };
    Some(format!(
        "is {what}, which bnlab never replaces (name a regular file)"
    ))
}

fn refused(why: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::AlreadyExists, why)
}

/// Writes `bytes` to `path` atomically (mode 0644), doing to what is there only what
/// `existing` allows.
pub fn write_file(path: &Path, bytes: &[u8], existing: Existing) -> std::io::Result<()> {
    if let Some(why) = refusal(path, existing) {
        return Err(refused(why));
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".bnlab-")
        .suffix(".tmp")
        .tempfile_in(dir)?;
    // tempfile makes owner-only (0600) files; results are meant to be read like any other.
    use std::os::unix::fs::PermissionsExt;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o644))?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    // Something may have appeared at `path` since the check: the no-clobber rename refuses it
    // without a window; a replacing rename checks once more just before.
    let persisted = match existing {
        Existing::Refuse => tmp.persist_noclobber(path),
        Existing::Replace => match refusal(path, existing) {
            Some(why) => return Err(refused(why)),
            None => tmp.persist(path),
        },
    };
    persisted.map(|_| ()).map_err(|e| match e.error.kind() {
        std::io::ErrorKind::AlreadyExists => refusal(path, existing).map_or(e.error, refused),
        _ => e.error,
    })
}

/// Writes a file bnlab owns (in a run directory it holds), replacing its previous version.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_file(path, bytes, Existing::Replace)
}

/// Writes a file the user named with `flag`; the error names the flag and the path.
pub fn write_output(flag: &str, path: &Path, bytes: &[u8], force: bool) -> anyhow::Result<()> {
    write_file(path, bytes, Existing::replace_if(force))
        .map_err(|e| anyhow::anyhow!("{flag} {}: {e}", path.display()))
}

/// Fails now, before the work that produces it, if [`write_output`] would refuse `path` or
/// cannot write in its directory.
pub fn check_output(flag: &str, path: &Path, force: bool) -> anyhow::Result<()> {
    if let Some(why) = refusal(path, Existing::replace_if(force)) {
        anyhow::bail!("{flag} {}: {why}", path.display());
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    tempfile::tempfile_in(dir)
        .map_err(|e| anyhow::anyhow!("{flag} {}: cannot write there ({e})", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_regular_file_is_replaced_only_when_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.txt");
        write_file(&path, b"one", Existing::Refuse).unwrap();
        let err = write_file(&path, b"two", Existing::Refuse).unwrap_err();
        assert!(err.to_string().contains("--force"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
        write_file(&path, b"two", Existing::Replace).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
    }

    #[test]
    fn links_and_directories_are_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target.txt");
        std::fs::write(&target, b"kept").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        for (path, what) in [(&link, "symbolic link"), (&sub, "directory")] {
            let err = write_file(path, b"new", Existing::Replace).unwrap_err();
            assert!(err.to_string().contains(what), "{err}");
            let err = check_output("--out", path, true).unwrap_err().to_string();
            assert!(err.starts_with(&format!("--out {}: is a", path.display())));
        }
        assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
        assert_eq!(std::fs::read(&target).unwrap(), b"kept");
        assert!(sub.is_dir());
    }
}
