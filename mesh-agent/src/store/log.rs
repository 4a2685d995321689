//! The write-ahead log: one JSON line per durable change, numbered, appended and
//! fsynced before the change takes effect.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::PathBuf;

use mesh_core::TaskSpec;
use mesh_core::replica::services::ServiceRecord;
use serde::{Deserialize, Serialize};

use super::StoreError;

/// One durable change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// A service record as written (a tombstone for a removal). Boxed: records are
    /// large and most ops are not.
    Record(Box<ServiceRecord>),
    /// A task registered through the API, added or changed.
    Task(TaskSpec),
    /// A task registered through the API, removed (or taken over by another source).
    TaskRemoved { service: String, id: String },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct LogEntry {
    pub seq: u64,
    pub op: Op,
}

pub struct Log {
    path: PathBuf,
    file: Option<File>,
    /// The number of the last entry written (or included in the state file).
    seq: u64,
    /// Entries in the file now.
    entries: u64,
    /// Its length, to undo a failed append.
    len: u64,
    /// A failed append could not be undone: appending more would corrupt it.
    poisoned: bool,
    slow_log: mesh_core::log_limit::LogLimit,
}

/// A write to disk slower than this is logged.
const SLOW_SYNC: std::time::Duration = std::time::Duration::from_secs(1);

impl Log {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            file: None,
            seq: 0,
            entries: 0,
            len: 0,
            poisoned: false,
            slow_log: mesh_core::log_limit::LogLimit::default(),
        }
    }

    pub fn seq(&self) -> u64 {
        self.seq
    }

    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// The entries after `after`. A torn last line (a crash mid-append: never
    /// acknowledged) is cut off; any other line that does not parse is an error.
    pub fn replay(&mut self, after: u64) -> Result<Vec<LogEntry>, StoreError> {
        self.seq = after;
        let text = match std::fs::read(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(StoreError::Read {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let mut out = Vec::new();
        let mut offset = 0usize;
        let lines: Vec<&[u8]> = text.split_inclusive(|b| *b == b'\n').collect();
        for (i, line) in lines.iter().enumerate() {
            let complete = line.ends_with(b"\n");
            match serde_json::from_slice::<LogEntry>(line) {
                Ok(entry) if complete => {
                    self.seq = self.seq.max(entry.seq);
                    if entry.seq > after {
                        out.push(entry);
                    }
                    self.entries += 1;
                    offset += line.len();
                }
                Err(_) | Ok(_) if !complete && i + 1 == lines.len() => {
                    tracing::warn!(path = %self.path.display(), "dropping a torn last log entry (a crash while writing it)");
                    let cut = OpenOptions::new()
                        .write(true)
                        .open(&self.path)
                        .and_then(|f| f.set_len(offset as u64).and_then(|_| f.sync_all()));
                    cut.map_err(|source| StoreError::Write {
                        path: self.path.clone(),
                        source,
                    })?;
                    break;
                }
                Err(source) => {
                    return Err(StoreError::CorruptLog {
                        path: self.path.clone(),
                        line: i + 1,
                        source,
                    });
                }
                Ok(_) => unreachable!("incomplete lines are the last"),
            }
        }
        self.len = offset as u64;
        Ok(out)
    }

    fn file(&mut self) -> io::Result<&mut File> {
        if self.file.is_none() {
            self.file = Some(
                OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(&self.path)?,
            );
        }
        Ok(self.file.as_mut().expect("opened above"))
    }

    pub fn append(&mut self, ops: &[Op]) -> Result<(), StoreError> {
        if ops.is_empty() {
            return Ok(());
        }
        if self.poisoned {
            return Err(StoreError::Poisoned {
                path: self.path.clone(),
            });
        }
        let mut buf = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            let entry = LogEntry {
                seq: self.seq + 1 + i as u64,
                op: op.clone(),
            };
            serde_json::to_writer(&mut buf, &entry).expect("log entries serialize");
            buf.push(b'\n');
        }
        let len = self.len;
        let started = std::time::Instant::now();
        let result = self.file().and_then(|f| {
            f.write_all(&buf)?;
            f.sync_data()
        });
        let took = started.elapsed();
        // A write waits for the disk before it is answered; when the disk is that slow
        // (another process's writeback), say so, or a slow API has no visible cause.
        if took >= SLOW_SYNC
            && let Some(suppressed) = self.slow_log.allow("sync", std::time::Instant::now())
        {
            tracing::warn!(
                path = %self.path.display(),
                took_ms = took.as_millis() as u64,
                suppressed,
                "writing the state log to disk was slow; API writes wait for it"
            );
        }
        if let Err(source) = result {
            // Undo the partial append, so the log never holds a torn line in the
            // middle.
            let undone = self
                .file()
                .and_then(|f| f.set_len(len).and_then(|_| f.sync_data()));
            if undone.is_err() {
                self.poisoned = true;
            }
            return Err(StoreError::Write {
                path: self.path.clone(),
                source,
            });
        }
        self.seq += ops.len() as u64;
        self.entries += ops.len() as u64;
        self.len += buf.len() as u64;
        Ok(())
    }

    /// Empties the log after the state file took in everything it held.
    pub fn truncate(&mut self) {
        let done = self
            .file()
            .and_then(|f| f.set_len(0).and_then(|_| f.sync_data()));
        match done {
            Ok(()) => {
                self.entries = 0;
                self.len = 0;
                self.poisoned = false;
            }
            // Harmless: every entry left is at or below the state file's seq, so a
            // load skips it. The log stays poisoned if it was.
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot empty the log")
            }
        }
    }
}
