//! The dead-letter store: where a record goes when Kinesis can never take
//! it (too large, rejected again and again), so that it still counts as
//! done and the source position can move on without losing it.
//!
//! One JSON object per line in `<dir>/dead-letters.jsonl`:
//! `{"at":"<RFC 3339>","stream":..,"partition_key":..,"reason":..,"envelope":<the envelope>}`,
//! or `"data_base64"` in place of `"envelope"` when the data is not JSON.
//! Every write is synced to disk before the records are reported done; a
//! write that fails stops the sink (a record is never dropped).

use std::path::{Path, PathBuf};

use serde::de::IgnoredAny;
use tokio::fs::{File, OpenOptions};
use tokio::io::AsyncWriteExt as _;
use tokio::sync::Mutex;
use tributary_envelope::{Record, json, time};

use crate::error::KinesisError;

/// The file name inside the dead-letter directory.
pub const DEAD_LETTER_FILE: &str = "dead-letters.jsonl";

/// An append-only, synced JSON Lines file of records Kinesis cannot take.
#[derive(Debug)]
pub struct DeadLetterStore {
    path: PathBuf,
    file: Mutex<File>,
}

impl DeadLetterStore {
    /// Creates `dir` if needed and opens `dir/dead-letters.jsonl` for appending.
    pub async fn open(dir: &Path) -> Result<Self, KinesisError> {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|source| KinesisError::DeadLetter {
                path: dir.to_path_buf(),
                source,
            })?;
        let path = dir.join(DEAD_LETTER_FILE);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .await
            .map_err(|source| KinesisError::DeadLetter {
                path: path.clone(),
                source,
            })?;
        // Make the file's directory entry durable too: a line synced into a
        // file that vanishes with its directory entry after a crash is lost.
        let synced = async { File::open(dir).await?.sync_all().await }.await;
        synced.map_err(|source| KinesisError::DeadLetter {
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(Self {
            path,
            file: Mutex::new(file),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one line per record (each with its reason) and syncs the
    /// file. Only after this returns `Ok` may the records be reported done.
    pub async fn write<'r>(
        &self,
        records: impl IntoIterator<Item = (&'r Record, &'r str)>,
    ) -> Result<(), KinesisError> {
        let at = time::now();
        let mut lines = Vec::new();
        for (record, reason) in records {
            render_line(&mut lines, &at, record, reason);
        }
        if lines.is_empty() {
            return Ok(());
        }
        let mut file = self.file.lock().await;
        let result = async {
            file.write_all(&lines).await?;
            file.flush().await?;
            file.sync_data().await
        }
        .await;
        result.map_err(|source| KinesisError::DeadLetter {
            path: self.path.clone(),
            source,
        })
    }
}

/// Appends one dead-letter line (with its newline) to `out`.
fn render_line(out: &mut Vec<u8>, at: &[u8], record: &Record, reason: &str) {
    out.reserve(record.data.len() + record.partition_key.len() + reason.len() + 128);
    out.extend_from_slice(b"{\"at\":\"");
    out.extend_from_slice(at);
    out.extend_from_slice(b"\",\"stream\":");
    json::write_str(out, &record.stream);
    out.extend_from_slice(b",\"partition_key\":");
    json::write_str(out, &record.partition_key);
    out.extend_from_slice(b",\"reason\":");
    json::write_str(out, reason);
    if is_json(&record.data) {
        out.extend_from_slice(b",\"envelope\":");
        // Raw CR/LF in valid JSON can only be whitespace between tokens
        // (strings must escape them): blanking them keeps the value and
        // keeps the line one line.
        out.extend(record.data.iter().map(|&b| match b {
            b'\n' | b'\r' => b' ',
            other => other,
        }));
    } else {
        out.extend_from_slice(b",\"data_base64\":");
        json::write_base64(out, &record.data);
    }
    out.extend_from_slice(b"}\n");
}

/// True when `data` is one complete JSON value.
pub(crate) fn is_json(data: &[u8]) -> bool {
    serde_json::from_slice::<IgnoredAny>(data).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: &str, data: &[u8]) -> Record {
        Record::new("orders".into(), key.to_owned(), data.to_vec())
    }

    #[tokio::test]
    async fn lines_embed_json_and_base64_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let store = DeadLetterStore::open(&dir.path().join("state/dlq"))
            .await
            .unwrap();
        let envelope = record("public.t:1", b"{\"v\":1,\n \"id\":\"a\\nb\"}");
        let binary = record("public.t:\"x\"", &[0xff, 0xfe]);
        store
            .write([(&envelope, "too large"), (&binary, "rejected: \"x\"")])
            .await
            .unwrap();
        store.write([(&envelope, "again")]).await.unwrap();

        let text = std::fs::read_to_string(store.path()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0]["stream"], "orders");
        assert_eq!(lines[0]["partition_key"], "public.t:1");
        assert_eq!(lines[0]["reason"], "too large");
        assert_eq!(
            lines[0]["envelope"],
            serde_json::json!({"v": 1, "id": "a\nb"})
        );
        assert!(lines[0].get("data_base64").is_none());
        assert_eq!(lines[1]["data_base64"], "//4=");
        assert_eq!(lines[1]["reason"], "rejected: \"x\"");
        assert!(lines[1].get("envelope").is_none());
        let at = lines[2]["at"].as_str().unwrap();
        assert_eq!(at.len(), 27);
        assert!(at.ends_with('Z') && at.as_bytes()[10] == b'T', "{at}");
    }

    #[tokio::test]
    async fn an_unwritable_directory_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        let err = DeadLetterStore::open(&file.join("sub")).await.unwrap_err();
        assert!(matches!(err, KinesisError::DeadLetter { .. }), "{err}");
    }
}
