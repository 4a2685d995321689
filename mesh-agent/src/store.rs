//! Services and tasks registered through the API, kept in the data directory so that
//! they survive a restart. Writes are atomic: a crash leaves the old file or the new
//! one, never a torn one.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use std::collections::BTreeMap;

use mesh_core::replica::services::ServiceRecord;
use mesh_core::{ServiceSpec, TaskSpec, Vips};
use serde::{Deserialize, Serialize};

const FILE: &str = "state.json";
const FORMAT: u32 = 2;

/// Format 2 keeps the replicated service records with their stamps and VIPs, and the
/// tasks this host owns. Format 1 (single host) kept plain specs; it is still read.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Persisted {
    pub format: u32,
    #[serde(default)]
    pub records: Vec<ServiceRecord>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceSpec>,
    pub tasks: Vec<TaskSpec>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub vips: BTreeMap<String, Vips>,
}

pub struct DataDir {
    dir: PathBuf,
}

impl DataDir {
    pub fn open(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir)
            .with_context(|| format!("cannot create data dir {}", dir.display()))?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    /// The saved state, or an empty one on first start. A file that cannot be read is
    /// an error: starting empty would overwrite it and lose the user's data.
    pub fn load(&self) -> Result<Persisted> {
        let path = self.path();
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Persisted {
                    format: FORMAT,
                    ..Default::default()
                });
            }
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let state: Persisted = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a valid mesh state file; move it away to start empty",
                path.display()
            )
        })?;
        anyhow::ensure!(
            state.format == FORMAT,
            "{}: unknown format {}",
            path.display(),
            state.format
        );
        Ok(state)
    }

    pub fn save(&self, state: &Persisted) -> Result<()> {
        let path = self.path();
        let tmp = self.dir.join(format!(".{FILE}.tmp"));
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(&serde_json::to_vec_pretty(state).expect("serializable"))?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            // The rename is durable only once the directory entry is.
            File::open(&self.dir)?.sync_all()
        };
        write().with_context(|| format!("cannot write {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corrupt_file() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::open(dir.path()).unwrap();
        assert!(data.load().unwrap().services.is_empty());
        let state = Persisted {
            format: FORMAT,
            tasks: vec![TaskSpec {
                service: "web".into(),
                id: Some("web.1".into()),
                ip: "10.0.0.1".parse().unwrap(),
                port: None,
                state: mesh_core::TaskState::Active,
            }],
            ..Persisted::default()
        };
        data.save(&state).unwrap();
        assert_eq!(data.load().unwrap().tasks, state.tasks);
        fs::write(data.path(), "{ torn").unwrap();
        let err = format!("{:#}", data.load().unwrap_err());
        assert!(err.contains("state.json"), "{err}");
    }
}
