//! The `[ebpf]` section of the agent's config, deserialized straight into
//! [`EbpfConfig`], so the defaults below are the only ones there are.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Where maps and links are pinned unless the config says otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/mesh";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EbpfConfig {
    /// The cgroup (v2) whose processes get socket balancing to VIPs. Default: the
    /// root of the cgroup v2 hierarchy, so every process on the host; it is mounted at
    /// /run/mesh/cgroup2 when the host mounts none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
    /// The bpffs directory for this agent's maps and links. Two agents on one host
    /// need two directories.
    pub pin_dir: PathBuf,
}

impl Default for EbpfConfig {
    fn default() -> Self {
        Self {
            cgroup: None,
            pin_dir: PathBuf::from(DEFAULT_PIN_DIR),
        }
    }
}

impl EbpfConfig {
    /// What is wrong with the section, naming the field.
    pub fn check(&self) -> Result<(), String> {
        if !self.pin_dir.is_absolute() {
            return Err(format!(
                "ebpf.pin_dir {:?} must be an absolute path on bpffs",
                self.pin_dir
            ));
        }
        if let Some(c) = &self.cgroup
            && !c.is_absolute()
        {
            return Err(format!(
                "ebpf.cgroup {c:?} must be an absolute path to a cgroup v2 directory"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_are_refused_by_field() {
        let c = EbpfConfig {
            pin_dir: "mesh".into(),
            ..EbpfConfig::default()
        };
        assert!(c.check().unwrap_err().contains("ebpf.pin_dir"));
        let c = EbpfConfig {
            cgroup: Some("x".into()),
            ..EbpfConfig::default()
        };
        assert!(c.check().unwrap_err().contains("ebpf.cgroup"));
        assert!(EbpfConfig::default().check().is_ok());
    }
}
