//! What the agent keeps in its data directory so that a restart loses nothing: the
//! replicated service records (with their stamps, so a restart never overrules newer
//! writes made elsewhere) and the tasks registered through the API. Declared and
//! observed tasks are not kept: their sources report them again.
//!
//! Two files:
//! - `state.json`, a complete copy, rewritten atomically (temp file, fsync, rename,
//!   fsync of the directory) when the log has grown as large as the state, and every
//!   few seconds when peers changed the table;
//! - `state.wal`, a log with one JSON line per durable change, appended and fsynced
//!   before the change takes effect.
//!
//! A write therefore costs one small append, whatever the size of the table, and the
//! rewrites are amortised over as many writes as the state holds. A crash leaves the
//! old copy or the new one, and at worst a torn last log line, which was never
//! acknowledged and is dropped. Anything else that does not parse stops the agent
//! instead of being overwritten.
//!
//! The directory is locked (`flock` on `lock`) for the life of the agent, so a second
//! agent pointed at it is refused before it reads or writes anything.
//!
//! A third file, `generation`, holds the generation this host last started as, so
//! the next start is above it even when the clock went back (see
//! [`DataDir::next_generation`]).

mod log;

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use mesh_core::TaskSpec;
use mesh_core::replica::services::ServiceRecord;
use serde::{Deserialize, Serialize};

pub use log::Op;
use log::{Log, LogEntry};

const STATE: &str = "state.json";
const WAL: &str = "state.wal";
const LOCK: &str = "lock";
const GENERATION: &str = "generation";
/// Format 2 (the single-file store) is still read; format 3 adds the log position.
const FORMAT: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create data dir {}", .dir.display())]
    Create {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "data dir {} is in use by another mesh agent{}; stop it, or give this agent its own --data-dir",
        .dir.display(),
        .holder.as_deref().map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    Locked {
        dir: PathBuf,
        holder: Option<String>,
    },
    #[error("cannot read {}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not a valid mesh state file; move it away to start empty", .path.display())]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "{}:{line}: not a valid log entry; move the file away to start from {STATE} alone",
        .path.display()
    )]
    CorruptLog {
        path: PathBuf,
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}: unknown format {format}", .path.display())]
    Format { path: PathBuf, format: u32 },
    #[error("cannot write {}", .path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{} could not be repaired after a failed write; changes are refused until the next successful save",
        .path.display()
    )]
    Poisoned { path: PathBuf },
}

/// The state as saved.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saved {
    pub records: Vec<ServiceRecord>,
    /// Tasks registered through the API.
    pub tasks: Vec<TaskSpec>,
}

#[derive(Deserialize)]
struct Header {
    format: u32,
}

#[derive(Serialize, Deserialize)]
struct StateFile<R, T> {
    format: u32,
    /// The last log entry this copy includes.
    #[serde(default)]
    seq: u64,
    #[serde(default = "Vec::new")]
    records: Vec<R>,
    #[serde(default = "Vec::new")]
    tasks: Vec<T>,
}

pub struct DataDir {
    dir: PathBuf,
    /// Held for the life of the agent: the lock is the open file.
    _lock: File,
    log: Log,
}

impl DataDir {
    /// Creates and locks `dir`. Fails at once if another agent holds it.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        fs::create_dir_all(dir).map_err(|source| StoreError::Create {
            dir: dir.to_path_buf(),
            source,
        })?;
        let lock_path = dir.join(LOCK);
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(|source| StoreError::Create {
                dir: dir.to_path_buf(),
                source,
            })?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let holder = fs::read_to_string(&lock_path)
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty());
            return Err(StoreError::Locked {
                dir: dir.to_path_buf(),
                holder,
            });
        }
        let _ = lock.set_len(0);
        let _ = writeln!(lock, "{}", std::process::id());
        Ok(Self {
            dir: dir.to_path_buf(),
            _lock: lock,
            log: Log::new(dir.join(WAL)),
        })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(STATE)
    }

    /// The saved state, or an empty one on first start. A file that cannot be read is
    /// an error: starting empty would overwrite it and lose the user's data.
    pub fn load(&mut self) -> Result<Saved, StoreError> {
        let path = self.path();
        let (seq, records, tasks) = match fs::read_to_string(&path) {
            Ok(text) => {
                let header: Header =
                    serde_json::from_str(&text).map_err(|source| StoreError::Corrupt {
                        path: path.clone(),
                        source,
                    })?;
                if header.format != 2 && header.format != FORMAT {
                    return Err(StoreError::Format {
                        path,
                        format: header.format,
                    });
                }
                let file: StateFile<ServiceRecord, TaskSpec> = serde_json::from_str(&text)
                    .map_err(|source| StoreError::Corrupt {
                        path: path.clone(),
                        source,
                    })?;
                (file.seq, file.records, file.tasks)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => (0, Vec::new(), Vec::new()),
            Err(source) => return Err(StoreError::Read { path, source }),
        };
        let mut records: BTreeMap<String, ServiceRecord> =
            records.into_iter().map(|r| (r.name.clone(), r)).collect();
        let mut tasks: BTreeMap<(String, String), TaskSpec> = tasks
            .into_iter()
            .map(|t| ((t.service.clone(), t.id.clone().unwrap_or_default()), t))
            .collect();
        for LogEntry { seq: _, op } in self.log.replay(seq)? {
            match op {
                Op::Record(r) => {
                    records.insert(r.name.clone(), *r);
                }
                Op::Task(t) => {
                    tasks.insert((t.service.clone(), t.id.clone().unwrap_or_default()), t);
                }
                Op::TaskRemoved { service, id } => {
                    tasks.remove(&(service, id));
                }
            }
        }
        Ok(Saved {
            records: records.into_values().collect(),
            tasks: tasks.into_values().collect(),
        })
    }

    /// Appends changes to the log and makes them durable. On error nothing was
    /// appended, and the caller must not apply the change.
    pub fn log(&mut self, ops: &[Op]) -> Result<(), StoreError> {
        self.log.append(ops)
    }

    /// Whether the log has grown as large as the state it extends (`live` items), so
    /// that a rewrite now keeps the cost of writes amortised.
    pub fn wants_compaction(&self, live: usize) -> bool {
        self.log.entries() >= live.max(1024) as u64
    }

    /// The generation to start as: the wall clock in ms, but above the generation
    /// of every earlier start, which is kept in `generation`. Peers take the higher
    /// generation of a host for the newer one, for its gossip identity and its tasks.
    /// A host whose clock went back (an unsynced RTC at boot) would otherwise come
    /// back below its old self, and peers would ignore it until they forgot the old
    /// one, an hour later. A file that does not parse is replaced, with a warning:
    /// the clock is right far more often than not.
    pub fn next_generation(&mut self, now_ms: u64) -> Result<u64, StoreError> {
        let path = self.dir.join(GENERATION);
        let last = match fs::read_to_string(&path) {
            Ok(text) => match text.trim().parse::<u64>() {
                Ok(g) => Some(g),
                Err(_) => {
                    let mut content = text.trim().to_string();
                    mesh_core::text::truncate_at_char(&mut content, 40);
                    tracing::warn!(
                        file = %path.display(),
                        content = %content,
                        "not a generation (a number of ms); starting from the clock"
                    );
                    None
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(source) => return Err(StoreError::Read { path, source }),
        };
        let generation = match last {
            Some(last) if last >= now_ms => {
                tracing::warn!(
                    last,
                    clock = now_ms,
                    "the clock is behind this host's previous start; starting just above it"
                );
                last.saturating_add(1)
            }
            _ => now_ms,
        };
        self.replace(GENERATION, format!("{generation}\n").as_bytes())?;
        Ok(generation)
    }

    /// Replaces file `name` with `contents` atomically and durably: a temp file,
    /// fsync, rename, fsync of the directory. A crash leaves the old file or the new.
    fn replace(&self, name: &str, contents: &[u8]) -> Result<(), StoreError> {
        let path = self.dir.join(name);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let write = || -> io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(contents)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            // The rename is durable only once the directory entry is.
            File::open(&self.dir)?.sync_all()
        };
        write().map_err(|source| StoreError::Write { path, source })
    }

    /// Rewrites the complete copy and empties the log.
    pub fn compact<'a>(
        &mut self,
        records: impl Iterator<Item = &'a ServiceRecord>,
        tasks: Vec<TaskSpec>,
    ) -> Result<(), StoreError> {
        let path = self.path();
        let state = StateFile {
            format: FORMAT,
            seq: self.log.seq(),
            records: records.collect::<Vec<_>>(),
            tasks,
        };
        let text = serde_json::to_vec_pretty(&state).map_err(|e| StoreError::Write {
            path: path.clone(),
            source: io::Error::other(e),
        })?;
        self.replace(STATE, &text)?;
        self.log.truncate();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::replica::services::Stamp;

    #[test]
    fn each_start_is_above_the_last_even_when_the_clock_went_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = DataDir::open(dir.path()).unwrap();
        assert_eq!(store.next_generation(5_000).unwrap(), 5_000);
        assert_eq!(store.next_generation(9_000).unwrap(), 9_000);
        // The clock went back two seconds.
        assert_eq!(store.next_generation(7_000).unwrap(), 9_001);
        assert_eq!(store.next_generation(9_001).unwrap(), 9_002);
        assert_eq!(
            fs::read_to_string(dir.path().join(GENERATION))
                .unwrap()
                .trim(),
            "9002"
        );
        // A file that is not a number is replaced; the clock decides.
        fs::write(dir.path().join(GENERATION), "not a number\n").unwrap();
        assert_eq!(store.next_generation(8_000).unwrap(), 8_000);
        assert_eq!(store.next_generation(8_000).unwrap(), 8_001);
    }

    fn task(id: &str) -> TaskSpec {
        TaskSpec::new("web", id, "10.0.0.1".parse().unwrap())
    }

    fn record(name: &str, wall_ms: u64) -> ServiceRecord {
        let stamp = Stamp {
            hlc: mesh_core::replica::hlc::Hlc {
                wall_ms,
                logical: 0,
            },
            node: "a".into(),
        };
        ServiceRecord {
            name: name.into(),
            spec: Some(mesh_core::ServiceSpec::new(
                name,
                vec![mesh_core::PortSpec::tcp(None, 80)],
            )),
            vips: Default::default(),
            created: stamp.clone(),
            stamp,
        }
    }

    #[test]
    fn the_log_and_the_copy_round_trip_and_a_torn_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let mut data = DataDir::open(dir.path()).unwrap();
        assert_eq!(data.load().unwrap(), Saved::default());
        data.log(&[
            Op::Record(Box::new(record("web", 1))),
            Op::Task(task("web.1")),
        ])
        .unwrap();
        data.log(&[Op::Task(task("web.2"))]).unwrap();
        data.log(&[Op::TaskRemoved {
            service: "web".into(),
            id: "web.1".into(),
        }])
        .unwrap();
        drop(data);
        // A crash mid-append leaves a torn last line.
        let mut wal = OpenOptions::new()
            .append(true)
            .open(dir.path().join(WAL))
            .unwrap();
        wal.write_all(b"{\"seq\":9,\"op\":{\"Ta").unwrap();
        let mut data = DataDir::open(dir.path()).unwrap();
        let saved = data.load().unwrap();
        assert_eq!(saved.records, [record("web", 1)]);
        assert_eq!(saved.tasks, [task("web.2")]);
        // Appends go on after the dropped tail; a rewrite empties the log.
        data.log(&[Op::Task(task("web.3"))]).unwrap();
        data.compact(saved.records.iter(), vec![task("web.2"), task("web.3")])
            .unwrap();
        assert_eq!(fs::metadata(dir.path().join(WAL)).unwrap().len(), 0);
        data.log(&[Op::Record(Box::new(record("api", 2)))]).unwrap();
        drop(data);
        let saved = DataDir::open(dir.path()).unwrap().load().unwrap();
        assert_eq!(saved.records.len(), 2);
        assert_eq!(saved.tasks, [task("web.2"), task("web.3")]);
    }

    #[test]
    fn corrupt_files_stop_the_agent_and_name_themselves() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(STATE), "{ torn").unwrap();
        let err = DataDir::open(dir.path()).unwrap().load().unwrap_err();
        assert!(err.to_string().contains("state.json"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join(WAL),
            "{\"seq\":1,\"op\":{\"TaskRemoved\":{\"service\":\"a\",\"id\":\"b\"}}}\nnonsense\n{\"seq\":3,\"op\":{\"TaskRemoved\":{\"service\":\"a\",\"id\":\"b\"}}}\n",
        )
        .unwrap();
        let err = DataDir::open(dir.path()).unwrap().load().unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("{}:2: ", dir.path().join(WAL).display())),
            "{err}"
        );

        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(STATE), "{\"format\": 7}").unwrap();
        let err = DataDir::open(dir.path()).unwrap().load().unwrap_err();
        assert!(err.to_string().contains("unknown format 7"), "{err}");
    }

    #[test]
    fn a_second_agent_is_refused_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let first = DataDir::open(dir.path()).unwrap();
        let err = DataDir::open(dir.path()).err().expect("locked");
        let text = err.to_string();
        assert!(text.contains("in use by another mesh agent"), "{text}");
        assert!(text.contains(&std::process::id().to_string()), "{text}");
        drop(first);
        DataDir::open(dir.path()).unwrap();
    }

    #[test]
    fn format_2_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let v2 = serde_json::json!({
            "format": 2,
            "records": [record("web", 5)],
            "tasks": [task("web.1")],
        });
        fs::write(dir.path().join(STATE), v2.to_string()).unwrap();
        let saved = DataDir::open(dir.path()).unwrap().load().unwrap();
        assert_eq!(saved.records, [record("web", 5)]);
        assert_eq!(saved.tasks, [task("web.1")]);
    }
}
