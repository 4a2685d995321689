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
    /// Interfaces whose traffic to published ports gets the TC fast path: a flow
    /// whose Maglev pick is a task on this host goes to it in the kernel, keeping the
    /// client's address. List the Ethernet uplinks clients arrive on (not container
    /// bridges). Empty (the default): none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<String>,
    /// Where those flows are first met: `tcx` (the default), or `xdp`, which puts the
    /// DNAT to this host's tasks at the driver's XDP hook, ahead of tcx. tcx is the
    /// default by measurement: on veth it was the faster (README, "XDP or tcx").
    /// Generic XDP is not offered (see there).
    pub port_hook: PortHook,
    /// The plane that serves published ports beside the kernel path: the flows it
    /// leaves (IPv6, this host's own clients, interfaces not listed, a flow with no
    /// route or no free port, and every flow when `interfaces` is empty).
    /// `nftables` (the default, where it works) keeps the client's address for
    /// them, but its table turns conntrack on for every packet the host forwards,
    /// the kernel path's included. `userspace` makes no table, so no conntrack: the
    /// kernel path then costs about what plain forwarding does, and the flows it
    /// leaves are proxied (the task sees this host's address).
    pub published_ports: PublishedPorts,
}

/// See [`EbpfConfig::published_ports`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PublishedPorts {
    #[default]
    Nftables,
    Userspace,
}

/// The hook that first meets a published port's packets on `ebpf.interfaces`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PortHook {
    /// Everything at tcx, ingress and egress.
    #[default]
    Tcx,
    /// Native XDP (in the driver) takes the flows to this host's tasks; tcx does
    /// the rest. An interface whose driver has no XDP refuses it.
    Xdp,
}

impl PortHook {
    /// Its name in the config.
    pub fn name(self) -> &'static str {
        match self {
            PortHook::Tcx => "tcx",
            PortHook::Xdp => "xdp",
        }
    }
}

impl Default for EbpfConfig {
    fn default() -> Self {
        Self {
            cgroup: None,
            pin_dir: PathBuf::from(DEFAULT_PIN_DIR),
            interfaces: Vec::new(),
            port_hook: PortHook::Tcx,
            published_ports: PublishedPorts::Nftables,
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
        if self.port_hook != PortHook::Tcx && self.interfaces.is_empty() {
            return Err(format!(
                "ebpf.port_hook {:?} needs ebpf.interfaces: it is where published ports' packets are met",
                self.port_hook.name()
            ));
        }
        for (i, name) in self.interfaces.iter().enumerate() {
            // IFNAMSIZ is 16 with the NUL; a name is also a file name in the pin dir.
            let valid = !name.is_empty()
                && name.len() < 16
                && !name.contains(['/', '@'])
                && !name.chars().any(char::is_whitespace)
                && name != "."
                && name != "..";
            if !valid {
                return Err(format!(
                    "ebpf.interfaces[{i}] {name:?} is not an interface name (1 to 15 characters, no '/', '@' or spaces)"
                ));
            }
            if self.interfaces[..i].contains(name) {
                return Err(format!("ebpf.interfaces names {name:?} twice"));
            }
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

    #[test]
    fn port_hook_is_read_by_name_and_a_wrong_one_is_named() {
        let c: EbpfConfig = toml::from_str("port_hook = \"xdp\"").unwrap();
        assert_eq!(c.port_hook, PortHook::Xdp);
        assert_eq!(EbpfConfig::default().port_hook, PortHook::Tcx);
        let e = c.check().unwrap_err();
        assert!(
            e.contains("ebpf.port_hook") && e.contains("ebpf.interfaces"),
            "{e}"
        );
        let c: EbpfConfig = toml::from_str("published_ports = \"userspace\"").unwrap();
        assert_eq!(c.published_ports, PublishedPorts::Userspace);
        let e = toml::from_str::<EbpfConfig>("published_ports = \"iptables\"")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("published_ports") && e.contains("iptables"),
            "{e}"
        );
        let e = toml::from_str::<EbpfConfig>("port_hook = \"xpd\"")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("port_hook") && e.contains("xpd") && e.contains("`tcx` or `xdp`"),
            "{e}"
        );
    }

    #[test]
    fn bad_interface_names_are_refused_by_index() {
        for bad in ["", "a/b", "veth@x", "sixteen-chars-xx", "a b", ".."] {
            let c = EbpfConfig {
                interfaces: vec!["eth0".into(), bad.into()],
                ..EbpfConfig::default()
            };
            let e = c.check().unwrap_err();
            assert!(e.contains("ebpf.interfaces[1]"), "{bad:?}: {e}");
        }
        let c = EbpfConfig {
            interfaces: vec!["eth0".into(), "eth0".into()],
            ..EbpfConfig::default()
        };
        assert!(c.check().unwrap_err().contains("twice"));
    }
}
