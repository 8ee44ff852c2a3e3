//! The state directory: created private (0700) with a `.gitignore`, and locked by the one
//! `mesh` that uses it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

/// An error taking the state directory.
#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    #[error("already running (pid {pid})")]
    AlreadyRunning { pid: String },
    #[error("cannot prepare state_dir {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The lock on a state directory, held for as long as this value lives.
#[derive(Debug)]
pub struct StateDir {
    path: PathBuf,
    _lock: Flock<File>,
}

impl StateDir {
    /// Create `path` (mode 0700, with a `.gitignore` holding `*`) if needed, and lock it.
    /// A second `mesh` on the same directory gets [`StateDirError::AlreadyRunning`].
    pub fn acquire(path: &Path) -> Result<StateDir, StateDirError> {
        let io_err = |source| StateDirError::Io {
            path: path.to_path_buf(),
            source,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(io_err)?;
        // An existing directory keeps whatever mode it had unless it is ours to tighten.
        fs::set_permissions(path, fs::Permissions::from_mode(0o700)).map_err(io_err)?;
        let ignore = path.join(".gitignore");
        if !ignore.exists() {
            fs::write(&ignore, "*\n").map_err(io_err)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path.join("mesh.pid"))
            .map_err(io_err)?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((mut file, _)) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = pid.trim();
                return Err(StateDirError::AlreadyRunning {
                    pid: if pid.is_empty() {
                        "unknown".into()
                    } else {
                        pid.into()
                    },
                });
            }
        };
        lock.set_len(0).map_err(io_err)?;
        lock.rewind().map_err(io_err)?;
        writeln!(lock, "{}", std::process::id()).map_err(io_err)?;
        Ok(StateDir {
            path: path.to_path_buf(),
            _lock: lock,
        })
    }

    /// Block until no `mesh` holds the lock on `path` (at once if none does, or if the
    /// directory has no lock file).
    pub fn wait_released(path: &Path) -> Result<(), StateDirError> {
        let io_err = |source| StateDirError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = match File::open(path.join("mesh.pid")) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err(e)),
        };
        match Flock::lock(file, FlockArg::LockShared) {
            Ok(_released_on_drop) => Ok(()),
            Err((_, errno)) => Err(io_err(io::Error::from(errno))),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where replicas' log files are kept.
    pub fn logs_dir(&self) -> PathBuf {
        self.path.join("logs")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_private_dir_and_refuses_a_second_holder() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("state");
        let held = StateDir::acquire(&dir).expect("first");
        let mode = fs::metadata(&dir).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert_eq!(
            fs::read_to_string(dir.join(".gitignore")).expect("gi"),
            "*\n"
        );
        match StateDir::acquire(&dir) {
            Err(StateDirError::AlreadyRunning { pid }) => {
                assert_eq!(pid, std::process::id().to_string())
            }
            other => panic!("expected AlreadyRunning, got {other:?}"),
        }
        drop(held);
        StateDir::acquire(&dir).expect("free again after drop");
    }
}
