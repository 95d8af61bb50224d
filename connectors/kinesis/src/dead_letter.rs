//! The dead-letter store: where a record goes when Kinesis can never take
//! it (too large, rejected again and again), so that it still counts as
//! done and the source position can move on without losing it.
//!
//! One JSON object per line in `<dir>/dead-letters.jsonl`:
//! `{"id":..,"at":"<RFC 3339>","stream":..,"partition_key":..,"reason":..,
//! "error":..,"attempts":N,"size":N,"limit":N,"envelope":<the envelope>}`
//! (`limit` only for `too_large`; `explicit_hash_key` for a copy of a
//! fanned-out record; `data_base64` in place of `envelope` when the data is
//! not JSON). `id` is the envelope's own `id` when it has one.
//!
//! Crash safety: every write appends whole lines (a long one a piece at a
//! time), synced to disk before the records are reported done; a write that fails stops the sink
//! (a record is never dropped). A crash in the middle of an append can
//! leave a torn last line, whose records were never reported done (the
//! source sends them again): opening the store cuts it off, so later
//! entries never glue onto it, and readers skip an unfinished last line.
//! A write that failed halfway while the store stays open (another lane
//! may write before the sink stops) is cut off the same way before the
//! next write.
//!
//! With `[dead_letter] stream`, entries go to that Kinesis stream instead
//! (`dead_letter_stream.rs`); only those it cannot hold come here.
//!
//! `tributary dead-letter replay` never rewrites the file (the running sink
//! appends to it): it appends the byte offsets of the entries Kinesis
//! accepted to `<dir>/dead-letters.replayed`, and readers leave those out.

use std::collections::HashSet;
use std::fmt;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};

use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::fs::{File, OpenOptions};
use tokio::io::AsyncWriteExt as _;
use tokio::sync::Mutex;
use tributary_envelope::{Record, json, time};

use crate::dead_letter_stream::{DeadLetterStream, StreamEntry};
use crate::error::KinesisError;

/// The file name inside the dead-letter directory.
pub const DEAD_LETTER_FILE: &str = "dead-letters.jsonl";
/// The file of replayed entries (their byte offsets), beside the store.
pub const REPLAYED_FILE: &str = "dead-letters.replayed";

/// Why a record was dead-lettered; the `reason` field of an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// Data and partition key exceed the stream's maximum record size.
    TooLarge,
    /// The partition key is empty or longer than Kinesis allows.
    InvalidPartitionKey,
    /// Kinesis refused the record with a non-retryable error every time.
    Rejected,
}

impl DeadLetterReason {
    /// The name in the `reason` field and for `dead-letter replay --reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TooLarge => "too_large",
            Self::InvalidPartitionKey => "invalid_partition_key",
            Self::Rejected => "rejected",
        }
    }
}

impl fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A record on its way to the dead-letter store, with what to tell about it.
#[derive(Debug)]
pub(crate) struct DeadLetter {
    pub(crate) record: Record,
    pub(crate) reason: DeadLetterReason,
    /// What went wrong, for a person.
    pub(crate) error: String,
    /// PutRecords attempts that carried the record (0: never sent).
    pub(crate) attempts: u32,
    /// The stream's maximum record size, for `too_large`.
    pub(crate) limit: Option<usize>,
}

/// An append-only, synced JSON Lines file of records Kinesis cannot take.
#[derive(Debug)]
pub struct DeadLetterStore {
    path: PathBuf,
    file: Mutex<Appender>,
    stream: Option<DeadLetterStream>,
}

/// The open file, and whether a failed write may have left part of a line
/// at its end.
#[derive(Debug)]
struct Appender {
    file: File,
    /// Set by a failed write: the next one first cuts the file after its
    /// last newline, or its line would be glued onto the torn one.
    torn: bool,
}

impl DeadLetterStore {
    /// Creates `dir` if needed and opens `dir/dead-letters.jsonl` for
    /// appending, cutting off a torn last line left by a crash.
    pub async fn open(dir: &Path) -> Result<Self, KinesisError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| KinesisError::DeadLetter { path, source }
        };
        tokio::fs::create_dir_all(dir).await.map_err(io(dir))?;
        let path = dir.join(DEAD_LETTER_FILE);
        let repair_path = path.clone();
        tokio::task::spawn_blocking(move || cut_torn_tail(&repair_path))
            .await
            .map_err(|e| KinesisError::DeadLetter {
                path: path.clone(),
                source: std::io::Error::other(e),
            })?
            .map_err(io(&path))?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .await
            .map_err(io(&path))?;
        // Make the file's directory entry durable too: a line synced into a
        // file that vanishes with its directory entry after a crash is lost.
        let synced = async { File::open(dir).await?.sync_all().await }.await;
        synced.map_err(io(dir))?;
        Ok(Self {
            path,
            file: Mutex::new(Appender { file, torn: false }),
            stream: None,
        })
    }

    /// Sends entries to the Kinesis stream `name` from now on; the file
    /// keeps only those the stream cannot hold.
    pub(crate) fn with_stream(mut self, stream: DeadLetterStream) -> Self {
        self.stream = Some(stream);
        self
    }

    /// The dead-letter stream, if entries go to one.
    pub fn stream(&self) -> Option<&str> {
        self.stream.as_ref().map(DeadLetterStream::name)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes one entry per dead letter: to the dead-letter stream when
    /// there is one and it can hold the entry, else appended to the file,
    /// which is synced. Only after this returns `Ok` may the records be
    /// reported done.
    pub(crate) async fn write(&self, letters: &[DeadLetter]) -> Result<(), KinesisError> {
        let at = time::now();
        let mut to_file = Vec::new();
        let mut to_stream = Vec::new();
        for letter in letters {
            let Some(stream) = &self.stream else {
                to_file.push(letter);
                continue;
            };
            // An entry holds at least the record's data: one that cannot
            // fit is not rendered just to find out (a too-large record can
            // be tens of MiB).
            if letter.record.data.len() > stream.max_record_bytes().await? {
                to_file.push(letter);
                continue;
            }
            let mut line = Vec::new();
            render_line(&mut line, &at, letter);
            line.pop(); // the newline
            let entry = StreamEntry::new(&letter.record.partition_key, line);
            if stream.fits(&entry).await? {
                to_stream.push(entry);
            } else {
                to_file.push(letter);
            }
        }
        if let Some(stream) = &self.stream
            && !to_stream.is_empty()
        {
            stream.write(to_stream).await?;
        }
        if to_file.is_empty() {
            return Ok(());
        }
        let mut appender = self.file.lock().await;
        let Appender { file, torn } = &mut *appender;
        let result = async {
            if *torn {
                let path = self.path.clone();
                tokio::task::spawn_blocking(move || cut_torn_tail(&path))
                    .await
                    .map_err(std::io::Error::other)??;
                *torn = false;
            }
            // Written a piece at a time: a dead letter can be tens of MiB,
            // and its line in one buffer would cost as much again.
            let lines: usize = to_file
                .iter()
                .map(|letter| letter.record.data.len() / 3 * 4 + 1024)
                .sum();
            let mut pending = Vec::with_capacity(lines.min(PIECE_BYTES + 1024));
            for letter in to_file {
                let line = Line::new(&at, letter);
                pending.extend_from_slice(&line.head);
                for piece in line.data.chunks(PIECE_BYTES) {
                    line.render_data(&mut pending, piece);
                    if pending.len() >= PIECE_BYTES {
                        file.write_all(&pending).await?;
                        pending.clear();
                    }
                }
                pending.extend_from_slice(line.tail());
            }
            file.write_all(&pending).await?;
            file.flush().await?;
            file.sync_data().await
        }
        .await;
        *torn |= result.is_err();
        result.map_err(|source| KinesisError::DeadLetter {
            path: self.path.clone(),
            source,
        })
    }
}

/// How much of a dead letter's data is rendered and written at a time (a
/// multiple of 3, so that base64 pieces join without padding).
const PIECE_BYTES: usize = 3 << 18;

/// Truncates `path` after its last newline (a crash mid-append leaves a
/// line without one). A missing file is fine.
fn cut_torn_tail(path: &Path) -> std::io::Result<()> {
    let mut file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(err),
    };
    let len = file.metadata()?.len();
    let mut end = len;
    let mut chunk = vec![0u8; 64 * 1024];
    while end > 0 {
        let start = end.saturating_sub(chunk.len() as u64);
        let buf = &mut chunk[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(buf)?;
        if let Some(newline) = buf.iter().rposition(|&b| b == b'\n') {
            end = start + newline as u64 + 1;
            break;
        }
        end = start;
    }
    if end < len {
        file.set_len(end)?;
        file.sync_all()?;
    }
    Ok(())
}

/// Appends one dead-letter line (with its newline) to `out`.
fn render_line(out: &mut Vec<u8>, at: &[u8], letter: &DeadLetter) {
    let line = Line::new(at, letter);
    let data = if line.data_is_json {
        line.data.len()
    } else {
        line.data.len().div_ceil(3) * 4
    };
    out.reserve(line.head.len() + data + 3);
    out.extend_from_slice(&line.head);
    line.render_data(out, line.data);
    out.extend_from_slice(line.tail());
}

/// A dead-letter line in three parts: every field but the data, the data
/// (rendered piece by piece), and what closes the line.
struct Line<'a> {
    /// `{"id":..` up to `,"envelope":` or `,"data_base64":"`.
    head: Vec<u8>,
    data: &'a [u8],
    data_is_json: bool,
}

impl<'a> Line<'a> {
    fn new(at: &[u8], letter: &'a DeadLetter) -> Self {
        let record = &letter.record;
        let data_is_json = is_json(&record.data);
        let id = data_is_json.then(|| envelope_id(&record.data)).flatten();
        let mut out = Vec::with_capacity(
            id.as_ref().map_or(0, String::len)
                + record.stream.len()
                + record.partition_key.len()
                + letter.error.len()
                + 320,
        );
        out.extend_from_slice(b"{\"id\":");
        match id {
            Some(id) => json::write_str(&mut out, &id),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"at\":\"");
        out.extend_from_slice(at);
        out.extend_from_slice(b"\",\"stream\":");
        json::write_str(&mut out, &record.stream);
        out.extend_from_slice(b",\"partition_key\":");
        json::write_str(&mut out, &record.partition_key);
        if let Some(hash) = record.explicit_hash_key {
            out.extend_from_slice(b",\"explicit_hash_key\":");
            json::write_str(&mut out, &hash.to_string());
        }
        out.extend_from_slice(b",\"reason\":");
        json::write_str(&mut out, letter.reason.as_str());
        out.extend_from_slice(b",\"error\":");
        json::write_str(&mut out, &letter.error);
        out.extend_from_slice(b",\"attempts\":");
        json::write_u64(&mut out, u64::from(letter.attempts));
        out.extend_from_slice(b",\"size\":");
        json::write_u64(&mut out, record.weight() as u64);
        if let Some(limit) = letter.limit {
            out.extend_from_slice(b",\"limit\":");
            json::write_u64(&mut out, limit as u64);
        }
        out.extend_from_slice(if data_is_json {
            b",\"envelope\":"
        } else {
            b",\"data_base64\":\""
        });
        Self {
            head: out,
            data: &record.data,
            data_is_json,
        }
    }

    /// Appends `piece` of the data as the line holds it; pieces other than
    /// the last must be a multiple of 3 bytes long.
    fn render_data(&self, out: &mut Vec<u8>, piece: &[u8]) {
        if self.data_is_json {
            // Raw CR/LF in valid JSON can only be whitespace between tokens
            // (strings must escape them): blanking them keeps the value and
            // keeps the line one line.
            out.extend(piece.iter().map(|&b| match b {
                b'\n' | b'\r' => b' ',
                other => other,
            }));
        } else {
            json::write_base64_unquoted(out, piece);
        }
    }

    /// What follows the data.
    fn tail(&self) -> &'static [u8] {
        if self.data_is_json { b"}\n" } else { b"\"}\n" }
    }
}

/// The `id` of a Tributary envelope (v1 writes `{"v":1,"id":"..."` first),
/// read off its first bytes: a dead letter can be tens of MiB, and parsing
/// it into a struct costs as much again. Other formats get no id.
fn envelope_id(data: &[u8]) -> Option<String> {
    const PREFIX: &[u8] = b"\"id\":\"";
    let head = data.get(..data.len().min(256))?;
    if !head.starts_with(b"{\"v\":") {
        return None;
    }
    let start = head.windows(PREFIX.len()).position(|w| w == PREFIX)? + PREFIX.len();
    let len = head[start..].iter().position(|&b| b == b'"')?;
    let id = &head[start..start + len];
    if id.contains(&b'\\') {
        return None;
    }
    std::str::from_utf8(id).ok().map(str::to_owned)
}

/// One entry of the dead-letter store, as `dead-letter list` shows it.
#[derive(Debug, Deserialize, Serialize)]
pub struct DeadLetterEntry {
    /// The entry's byte offset in the file: its handle for replay.
    #[serde(skip_deserializing, rename = "entry")]
    pub offset: u64,
    /// The envelope's `id`, when it has one.
    pub id: Option<String>,
    /// When it was dead-lettered (RFC 3339, UTC).
    pub at: String,
    /// The stream it was meant for.
    pub stream: String,
    /// Its partition key.
    pub partition_key: String,
    /// The explicit hash key of a copy of a fanned-out record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub explicit_hash_key: Option<String>,
    /// Why: `too_large`, `invalid_partition_key` or `rejected` (entries
    /// from before the reason codes hold the whole message here).
    pub reason: String,
    /// What went wrong, for a person.
    #[serde(default)]
    pub error: String,
    /// PutRecords attempts that carried it.
    #[serde(default)]
    pub attempts: u32,
    /// Data plus partition key, in bytes.
    #[serde(default)]
    pub size: Option<u64>,
    /// The stream's maximum record size when it was refused as too large.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    /// The envelope, exactly as it was to be sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envelope: Option<Box<RawValue>>,
    /// The data, when it is not JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_base64: Option<String>,
}

impl DeadLetterEntry {
    /// The record data to send again.
    pub fn data(&self) -> Result<Vec<u8>, String> {
        use base64::Engine as _;
        match (&self.envelope, &self.data_base64) {
            (Some(envelope), _) => Ok(envelope.get().as_bytes().to_vec()),
            (None, Some(encoded)) => base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .map_err(|e| format!("data_base64 is not base64: {e}")),
            (None, None) => Err("the entry holds no data".to_owned()),
        }
    }
}

/// What [`read_dead_letters`] found.
#[derive(Debug, Default)]
pub struct DeadLetters {
    /// Entries not replayed yet, in file order (per key: source order).
    pub entries: Vec<DeadLetterEntry>,
    /// Lines that are not entries (with their offsets), skipped.
    pub unreadable: Vec<(u64, String)>,
}

/// Reads the entries of the store in `dir` that were not replayed. A last
/// line without its newline (being written, or torn) is left out.
pub fn read_dead_letters(dir: &Path) -> Result<DeadLetters, KinesisError> {
    let path = dir.join(DEAD_LETTER_FILE);
    let text = match std::fs::read(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(source) => return Err(KinesisError::DeadLetter { path, source }),
    };
    let replayed = read_replayed(dir)?;
    let mut found = DeadLetters::default();
    let mut offset = 0u64;
    for line in text.split_inclusive(|&b| b == b'\n') {
        let at = offset;
        offset += line.len() as u64;
        let Some(line) = line.strip_suffix(b"\n") else {
            break;
        };
        if line.iter().all(u8::is_ascii_whitespace) || replayed.contains(&at) {
            continue;
        }
        match serde_json::from_slice::<DeadLetterEntry>(line) {
            Ok(mut entry) => {
                entry.offset = at;
                found.entries.push(entry);
            }
            Err(err) => found.unreadable.push((at, err.to_string())),
        }
    }
    Ok(found)
}

fn read_replayed(dir: &Path) -> Result<HashSet<u64>, KinesisError> {
    let path = dir.join(REPLAYED_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(text
            .lines()
            .filter_map(|line| line.trim().parse().ok())
            .collect()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(HashSet::new()),
        Err(source) => Err(KinesisError::DeadLetter { path, source }),
    }
}

/// Records entries (by offset) as replayed: later reads leave them out.
/// Appends whole lines and syncs; a torn last line parses as nothing.
pub fn mark_replayed(dir: &Path, offsets: &[u64]) -> Result<(), KinesisError> {
    use std::io::Write as _;
    if offsets.is_empty() {
        return Ok(());
    }
    let path = dir.join(REPLAYED_FILE);
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        let mut text = String::from("\n");
        for offset in offsets {
            text.push_str(&offset.to_string());
            text.push('\n');
        }
        file.write_all(text.as_bytes())?;
        file.sync_data()
    })();
    result.map_err(|source| KinesisError::DeadLetter { path, source })
}

/// True when `data` is one complete JSON value.
pub(crate) fn is_json(data: &[u8]) -> bool {
    serde_json::from_slice::<IgnoredAny>(data).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(key: &str, data: &[u8], reason: DeadLetterReason) -> DeadLetter {
        DeadLetter {
            record: Record::new("orders".into(), key.to_owned(), data.to_vec()),
            reason,
            error: format!("{reason} because \"x\""),
            attempts: 2,
            limit: (reason == DeadLetterReason::TooLarge).then_some(1024),
        }
    }

    #[tokio::test]
    async fn lines_embed_json_and_base64_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let dlq = dir.path().join("state/dlq");
        let store = DeadLetterStore::open(&dlq).await.unwrap();
        let envelope = b"{\"v\":1,\n \"id\":\"shop:0A:01\",\"s\":\"a\\nb\"}";
        store
            .write(&[
                letter("public.t:1", envelope, DeadLetterReason::TooLarge),
                letter("public.t:\"x\"", &[0xff, 0xfe], DeadLetterReason::Rejected),
            ])
            .await
            .unwrap();
        store
            .write(&[letter("", b"{}", DeadLetterReason::InvalidPartitionKey)])
            .await
            .unwrap();

        let text = std::fs::read_to_string(store.path()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0]["id"], "shop:0A:01");
        assert_eq!(lines[0]["stream"], "orders");
        assert_eq!(lines[0]["partition_key"], "public.t:1");
        assert_eq!(lines[0]["reason"], "too_large");
        assert_eq!(lines[0]["error"], "too_large because \"x\"");
        assert_eq!(lines[0]["attempts"], 2);
        assert_eq!(lines[0]["size"], envelope.len() + "public.t:1".len());
        assert_eq!(lines[0]["limit"], 1024);
        assert_eq!(
            lines[0]["envelope"],
            serde_json::json!({"v": 1, "id": "shop:0A:01", "s": "a\nb"})
        );
        assert!(lines[0].get("data_base64").is_none());
        assert_eq!(lines[1]["id"], serde_json::Value::Null);
        assert_eq!(lines[1]["data_base64"], "//4=");
        assert_eq!(lines[1]["reason"], "rejected");
        assert!(lines[1].get("envelope").is_none() && lines[1].get("limit").is_none());
        let at = lines[2]["at"].as_str().unwrap();
        assert_eq!(at.len(), 27);
        assert!(at.ends_with('Z') && at.as_bytes()[10] == b'T', "{at}");

        // Read back: the data comes out as it went in (JSON key order kept).
        let found = read_dead_letters(&dlq).unwrap();
        assert_eq!(found.entries.len(), 3);
        assert_eq!(
            found.entries[0].data().unwrap(),
            envelope.map(|b| if b == b'\n' { b' ' } else { b })
        );
        assert_eq!(found.entries[1].data().unwrap(), [0xff, 0xfe]);
        assert_eq!(found.entries[2].reason, "invalid_partition_key");

        // Replayed entries are left out from then on.
        mark_replayed(&dlq, &[found.entries[0].offset, found.entries[2].offset]).unwrap();
        let left = read_dead_letters(&dlq).unwrap();
        assert_eq!(left.entries.len(), 1);
        assert_eq!(left.entries[0].partition_key, "public.t:\"x\"");
    }

    #[tokio::test]
    async fn letters_longer_than_a_piece_read_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = DeadLetterStore::open(dir.path()).await.unwrap();
        // Sizes around piece boundaries, newlines across them, and binary
        // data whose base64 pieces must join without padding.
        let mut json = b"{\"v\":1,\"id\":\"big\",\"s\":\"".to_vec();
        json.extend((0..PIECE_BYTES * 2 + 8).map(|i| b"ab\\n"[i % 4]));
        json.extend_from_slice(b"\",\n\"t\":1}");
        let binary: Vec<u8> = (0..PIECE_BYTES * 3 + 2)
            .map(|i| (i * 7 % 256) as u8)
            .collect();
        let small = b"{\"v\":1,\"id\":\"small\"}";
        store
            .write(&[
                letter("k:1", &json, DeadLetterReason::TooLarge),
                letter("k:2", small, DeadLetterReason::Rejected),
                letter("k:3", &binary, DeadLetterReason::TooLarge),
            ])
            .await
            .unwrap();
        let found = read_dead_letters(dir.path()).unwrap();
        assert!(found.unreadable.is_empty(), "{:?}", found.unreadable);
        assert_eq!(found.entries.len(), 3);
        let blanked: Vec<u8> = json
            .iter()
            .map(|&b| if b == b'\n' { b' ' } else { b })
            .collect();
        assert!(
            found.entries[0].data().unwrap() == blanked,
            "the JSON differs"
        );
        assert_eq!(found.entries[0].id.as_deref(), Some("big"));
        assert_eq!(found.entries[1].data().unwrap(), small);
        assert!(
            found.entries[2].data().unwrap() == binary,
            "the bytes differ"
        );
        // The file holds the same bytes as lines rendered whole.
        let mut whole = Vec::new();
        let file = std::fs::read(store.path()).unwrap();
        let start = file.windows(6).position(|w| w == b"\"at\":\"").unwrap() + 6;
        let stamp = file[start..start + 27].to_vec();
        for (key, data) in [("k:1", &json[..]), ("k:2", small), ("k:3", &binary)] {
            let reason = if key == "k:2" {
                DeadLetterReason::Rejected
            } else {
                DeadLetterReason::TooLarge
            };
            render_line(&mut whole, &stamp, &letter(key, data, reason));
        }
        assert!(file == whole, "the pieces differ from the whole lines");
    }

    #[tokio::test]
    async fn a_torn_last_line_is_cut_off_and_never_corrupts_later_entries() {
        let dir = tempfile::tempdir().unwrap();
        let store = DeadLetterStore::open(dir.path()).await.unwrap();
        store
            .write(&[letter(
                "k:1",
                b"{\"v\":1,\"id\":\"a\"}",
                DeadLetterReason::Rejected,
            )])
            .await
            .unwrap();
        drop(store);
        // A crash in the middle of the next append.
        let path = dir.path().join(DEAD_LETTER_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(b"{\"id\":\"b\",\"at\":\"2026-");
        // (an envelope id that is not first, or not a string: no id)
        assert_eq!(envelope_id(b"{\"v\":1,\"op\":\"x\"}"), None);
        assert_eq!(envelope_id(b"{\"v\":1,\"id\":\"a\\\"b\"}"), None);
        std::fs::write(&path, &bytes).unwrap();
        // Readers skip the unfinished line.
        assert_eq!(read_dead_letters(dir.path()).unwrap().entries.len(), 1);

        let store = DeadLetterStore::open(dir.path()).await.unwrap();
        store
            .write(&[letter(
                "k:2",
                b"{\"v\":1,\"id\":\"c\"}",
                DeadLetterReason::Rejected,
            )])
            .await
            .unwrap();
        let found = read_dead_letters(dir.path()).unwrap();
        assert!(found.unreadable.is_empty(), "{:?}", found.unreadable);
        let ids: Vec<_> = found.entries.iter().map(|e| e.id.as_deref()).collect();
        assert_eq!(ids, [Some("a"), Some("c")]);
    }

    #[tokio::test]
    async fn a_write_that_failed_halfway_never_corrupts_the_next_entry() {
        let dir = tempfile::tempdir().unwrap();
        let store = DeadLetterStore::open(dir.path()).await.unwrap();
        let entry = |key: &str, id: &str| {
            letter(
                key,
                format!("{{\"v\":1,\"id\":\"{id}\"}}").as_bytes(),
                DeadLetterReason::Rejected,
            )
        };
        store.write(&[entry("k:1", "a")]).await.unwrap();
        // A write that failed after part of its line went out (a full disk,
        // say): the store stays open and another lane writes next.
        let path = dir.path().join(DEAD_LETTER_FILE);
        let mut torn = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        std::io::Write::write_all(&mut torn, b"{\"id\":\"b\",\"at\":\"2026-").unwrap();
        store.file.lock().await.torn = true;
        store.write(&[entry("k:2", "c")]).await.unwrap();

        let found = read_dead_letters(dir.path()).unwrap();
        assert!(found.unreadable.is_empty(), "{:?}", found.unreadable);
        let ids: Vec<_> = found.entries.iter().map(|e| e.id.as_deref()).collect();
        assert_eq!(ids, [Some("a"), Some("c")]);
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
