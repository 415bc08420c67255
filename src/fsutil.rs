//! File writing with the right permissions for key material, and the check
//! that a key file is not readable by other users.

use std::io::Write as _;
use std::path::{Path, PathBuf};

/// Writes `contents` to `path`; secret files get mode 0600.
///
/// Never writes through a link planted at `path` (issue 12, item 9): the data
/// goes to a new file in the same directory, created exclusively and without
/// following symlinks (`O_CREAT|O_EXCL|O_NOFOLLOW`) with its final mode, and
/// is then renamed over `path`, which replaces a symlink there instead of
/// its target. Readers see the old file or the new one, never a partial one.
pub fn write_file(path: &Path, contents: &[u8], secret: bool) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path"))?;
    let (tmp, mut file) = create_exclusive(dir, name, secret)?;
    let written = file
        .write_all(contents)
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    // The rename is durable once the directory is synced; a failure here
    // leaves a complete file either way.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// A new file `.<name>.<random>.tmp` in `dir`, created exclusively.
fn create_exclusive(
    dir: &Path,
    name: &std::ffi::OsStr,
    secret: bool,
) -> std::io::Result<(PathBuf, std::fs::File)> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options
            .mode(if secret { 0o600 } else { 0o644 })
            .custom_flags(libc::O_NOFOLLOW);
    }
    let mut last = None;
    for _ in 0..8 {
        let mut random = [0u8; 8];
        getrandom::fill(&mut random).map_err(|e| std::io::Error::other(e.to_string()))?;
        let tmp = dir.join(format!(
            ".{}.{:016x}.tmp",
            name.to_string_lossy(),
            u64::from_le_bytes(random)
        ));
        match options.open(&tmp) {
            Ok(file) => return Ok((tmp, file)),
            // Someone else's name (or a planted link): try another.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free temporary file name")))
}

/// How a key file can be read by users other than this process's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyExposure {
    /// The file's permission bits.
    pub mode: u32,
    /// Readable by every user.
    pub world: bool,
    /// Readable by a group this process is not in.
    pub group: bool,
}

impl std::fmt::Display for KeyExposure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let who = match (self.world, self.group) {
            (true, _) => "every user",
            (false, _) => "its group (one this process is not in)",
        };
        write!(f, "mode {:04o}: readable by {who}", self.mode)
    }
}

/// `Some` when `path` (followed through symlinks, like Kubernetes' secret
/// files) can be read by other users: world-readable, or group-readable by a
/// group this process is not in. Group-readable by our own group is what the
/// Kubernetes `fsGroup` setup does (0440 root:fsGroup) and is not reported.
pub fn key_exposure(path: &Path) -> Option<KeyExposure> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt as _;
        let meta = std::fs::metadata(path).ok()?;
        let mode = meta.mode() & 0o7777;
        let world = mode & 0o004 != 0;
        let group = mode & 0o040 != 0 && !own_groups().contains(&meta.gid());
        (world || group).then_some(KeyExposure { mode, world, group })
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

/// The real, effective and supplementary group ids of this process, from
/// `/proc/self/status` (no unsafe `getgroups`); empty when unknown, so a
/// group-readable key is then reported.
fn own_groups() -> Vec<u32> {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return Vec::new();
    };
    status
        .lines()
        .filter_map(|l| l.strip_prefix("Gid:").or_else(|| l.strip_prefix("Groups:")))
        .flat_map(str::split_whitespace)
        .filter_map(|g| g.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn a_planted_symlink_is_replaced_and_its_target_left_alone() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let key = dir.path().join("ca-key.pem");
        std::os::unix::fs::symlink(&victim, &key).unwrap();
        write_file(&key, b"secret", true).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        let meta = std::fs::symlink_metadata(&key).unwrap();
        assert!(
            meta.file_type().is_file(),
            "the link was replaced by a file"
        );
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read_to_string(&key).unwrap(), "secret");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 2, "no temporary file is left behind");
    }

    #[cfg(unix)]
    #[test]
    fn world_readable_keys_are_exposed_and_private_ones_are_not() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k");
        std::fs::write(&key, "k").unwrap();
        for (mode, exposed) in [(0o600, false), (0o400, false), (0o644, true), (0o604, true)] {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(key_exposure(&key).is_some(), exposed, "mode {mode:o}");
        }
        // Our own group (the test's files belong to it) may read it.
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(key_exposure(&key), None);
    }
}
