//! Small state files in `[state] dir` (offsets, snapshot progress),
//! replaced atomically and durably.
//!
//! Beside the dataflow: a source writes here what it must find again after
//! a crash. A write is a temporary file written and fsynced, renamed over
//! the old one, and the directory fsynced, so a crash leaves the old
//! content or the new one, never a mix. This is the one place the envelope
//! crate touches the file system: both sources share it.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use crate::OffsetStore;

/// An [`OffsetStore`] in one file, replaced atomically.
#[derive(Debug)]
pub struct FileOffsetStore {
    path: PathBuf,
}

impl FileOffsetStore {
    /// A store at `path` (its directory is created on the first save).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl OffsetStore for FileOffsetStore {
    type Error = std::io::Error;

    fn load(&self) -> Result<Option<Vec<u8>>, std::io::Error> {
        match fs::read(&self.path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn save(&mut self, offset: &[u8]) -> Result<(), std::io::Error> {
        let dir = match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&dir)?;
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        {
            let mut file = fs::File::create(&tmp)?;
            file.write_all(offset)?;
            file.sync_all()?;
        }
        fs::rename(&tmp, &self.path)?;
        fs::File::open(&dir)?.sync_all()
    }
}
