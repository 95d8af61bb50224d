//! `tributary dead-letter list|replay`: the records the Kinesis writer
//! could never write (the dead-letter store under `[state] dir`), shown and
//! sent again.
//!
//! `list` prints one line per entry (or, with `--json`, the entry as a
//! JSON object); `replay` sends the selected entries to their streams in
//! their original order per key and marks what Kinesis accepted as
//! replayed, so it is neither listed nor sent again. Exit code 0 when every
//! selected entry was accepted, 1 when some stay in the store.
//!
//! A replayed record is the envelope as it was dead-lettered, with its
//! original `id` and `source.position`. The pipeline kept going after it,
//! so newer changes of its key may be in the stream already, and the
//! replayed record lands after them. Replay does not read the stream to
//! find out; it says so, and consumers that skip an event whose position is
//! not above the last one applied for its key (docs/consumers.md) ignore
//! such a record, while one that no newer change overtook is applied.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::Deserialize;
use tributary_kinesis::{DeadLetterEntry, mark_replayed, read_dead_letters};

use crate::settings::{SinkSettings, StateSettings};

/// Only `[sink]` and `[state]` matter here; other sections are read by `run`.
#[derive(Debug, Deserialize)]
struct StoreSettings {
    sink: Option<SinkSettings>,
    #[serde(default)]
    state: StateSettings,
    #[serde(default)]
    dead_letter: crate::settings::DeadLetterSettings,
}

/// The directory of the store, as `run` uses it.
fn store_dir(state: &StateSettings) -> PathBuf {
    state.dir.join("dead-letters")
}

/// Prints the entries not replayed yet; exit code 0.
pub fn list(config: &Path, json: bool) -> anyhow::Result<u8> {
    let settings: StoreSettings = crate::settings::load(config, false)?;
    let dir = store_dir(&settings.state);
    if let Some(stream) = &settings.dead_letter.stream {
        eprintln!(
            "dead letters go to kinesis stream {stream} (read it with `tributary tail --stream {stream}`); \
             this lists only those that stream could not hold"
        );
    }
    let found = read_dead_letters(&dir)?;
    for (offset, error) in &found.unreadable {
        eprintln!("warning: entry at byte {offset} is not readable: {error}");
    }
    for entry in &found.entries {
        if json {
            println!("{}", serde_json::to_string(entry)?);
        } else {
            println!("{}", describe(entry));
        }
    }
    if !json {
        eprintln!(
            "{} dead-lettered record(s) in {}",
            found.entries.len(),
            dir.display()
        );
    }
    Ok(0)
}

/// One line for a person: handle, time, reason, where it was going, error.
fn describe(entry: &DeadLetterEntry) -> String {
    let mut line = format!(
        "entry={} at={} reason={} stream={} partition_key={} attempts={}",
        entry.offset, entry.at, entry.reason, entry.stream, entry.partition_key, entry.attempts
    );
    if let Some(id) = &entry.id {
        line.push_str(&format!(" id={id}"));
    }
    if let (Some(size), Some(limit)) = (entry.size, entry.limit) {
        line.push_str(&format!(" size={size} limit={limit}"));
    }
    if !entry.error.is_empty() {
        line.push_str(&format!(" error={:?}", entry.error));
    }
    line
}

/// What replay tells the operator about order once it sent something.
const REPLAY_ORDER_NOTE: &str = "note: replayed records keep their original source.position and id; \
     a newer change of the same key written since it was dead-lettered is already in the stream \
     before it: consumers that skip an event whose position is not above the last one applied \
     for its key (docs/consumers.md) ignore the replayed record, others would apply it over the newer change";

/// Sends the selected entries again and marks the accepted ones replayed.
pub async fn replay(config: &Path, reason: Option<&str>, id: Option<&str>) -> anyhow::Result<u8> {
    let settings: StoreSettings = crate::settings::load(config, false)?;
    let dir = store_dir(&settings.state);
    let found = read_dead_letters(&dir)?;
    let selected: Vec<&DeadLetterEntry> = found
        .entries
        .iter()
        .filter(|e| reason.is_none_or(|r| e.reason == r))
        .filter(|e| id.is_none_or(|i| e.id.as_deref() == Some(i)))
        .collect();
    if selected.is_empty() {
        eprintln!("no dead-lettered record matches; nothing to replay");
        return Ok(0);
    }
    let client = crate::tail::checked_client_for(settings.sink.as_ref()).await?;
    let (report, failure) = match tributary_kinesis::replay(&client, &selected).await {
        Ok(report) => (report, None),
        Err((report, err)) => (report, Some(err)),
    };
    // Mark what was accepted before reporting anything else: a record
    // Kinesis took must not be sent again by the next replay.
    mark_replayed(&dir, &report.accepted)
        .context("kinesis accepted records but they cannot be marked replayed")?;
    for (offset, why) in &report.kept {
        eprintln!("kept entry={offset}: {why}");
    }
    eprintln!(
        "replayed {} of {} selected record(s); {} stay in {}",
        report.accepted.len(),
        selected.len(),
        selected.len() - report.accepted.len(),
        dir.display()
    );
    if !report.accepted.is_empty() {
        eprintln!("{REPLAY_ORDER_NOTE}");
    }
    if let Some(err) = failure {
        return Err(anyhow::Error::new(err).context("replay stopped"));
    }
    Ok(if report.accepted.len() == selected.len() {
        0
    } else {
        1
    })
}
