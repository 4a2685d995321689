//! The agent's TOML config file: agent settings plus statically declared services and
//! tasks. Each section that configures one crate is that crate's own serde type, so a
//! default is written once, where it is used. Every error names the file and, where
//! it can, the line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mesh_core::{
    Cidr, ModelError, Replica, ReplicaConfig, ServiceSpec, TaskSource, TaskSpec, VipPool,
};
use mesh_dns::DnsConfig;
use mesh_gossip::GossipConfig;
use mesh_proxy::ProxyConfig;
use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This host's name in `mesh service ps` and in the cluster. Default: the hostname.
    pub node_name: Option<String>,
    /// Where services and tasks registered through the API are kept across restarts.
    pub data_dir: Option<PathBuf>,
    /// `text` (default) or `json`.
    pub log_format: Option<LogFormat>,
    #[serde(default)]
    pub api: ApiConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub proxy: ProxyConfig,
    #[serde(default)]
    pub dns: DnsConfig,
    #[serde(default)]
    pub vip: VipConfig,
    #[serde(default)]
    pub cluster: ClusterConfig,
    #[serde(default)]
    pub docker: mesh_docker::DockerConfig,
    #[serde(default)]
    pub ebpf: mesh_ebpf::EbpfConfig,
    #[serde(default)]
    pub service: Vec<Spanned<ServiceSpec>>,
    #[serde(default)]
    pub task: Vec<Spanned<TaskSpec>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Unix socket path. Default: /run/mesh/mesh.sock as root.
    pub socket: Option<PathBuf>,
    /// Also serve the API on this TCP address; needs a token.
    pub tcp: Option<SocketAddr>,
    /// Bearer token required on TCP.
    pub token: Option<String>,
    /// File holding the token, so it stays out of the config.
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// A separate TCP address that serves only /metrics, for scrapers.
    pub listen: Option<SocketAddr>,
}

/// `[vip]`: the VIP pools (the replica's) and the address plane's interface.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VipConfig {
    /// Pool for IPv4 VIPs, or "none".
    #[serde(deserialize_with = "cidr_or_none")]
    pub ipv4_cidr: Option<Cidr>,
    /// Pool for IPv6 VIPs, or "none".
    #[serde(deserialize_with = "cidr_or_none")]
    pub ipv6_cidr: Option<Cidr>,
    /// Put VIPs on `interface` and listen on them (needs CAP_NET_ADMIN).
    pub manage: bool,
    pub interface: String,
}

fn cidr_or_none<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Cidr>, D::Error> {
    let text = String::deserialize(d)?;
    if text.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    text.parse().map(Some).map_err(serde::de::Error::custom)
}

impl Default for VipConfig {
    fn default() -> Self {
        let pool = VipPool::default();
        Self {
            ipv4_cidr: pool.v4,
            ipv6_cidr: pool.v6,
            manage: true,
            interface: "lo".into(),
        }
    }
}

impl VipConfig {
    /// A pool must be a range VIPs can be taken from without shadowing anything
    /// real: not so wide it covers the internet or loopback, not too small to hold a
    /// VIP.
    pub fn validate(&self) -> Result<(), ModelError> {
        let check = |field: &str, c: &Cidr, v4: bool, prefixes: std::ops::RangeInclusive<u8>| {
            if c.is_ipv4() != v4 {
                let family = if v4 { "IPv4" } else { "IPv6" };
                return Err(ModelError::new(
                    field,
                    format!("{c} is not an {family} network"),
                ));
            }
            if !prefixes.contains(&c.prefix()) {
                return Err(ModelError::new(
                    field,
                    format!(
                        "{c}: the prefix must be /{} to /{}, a private range VIPs can be taken from (or \"none\")",
                        prefixes.start(),
                        prefixes.end()
                    ),
                ));
            }
            let special: Vec<std::net::IpAddr> = if v4 {
                vec![
                    [127, 0, 0, 1].into(),
                    [0, 0, 0, 0].into(),
                    [255, 255, 255, 255].into(),
                ]
            } else {
                vec![
                    std::net::Ipv6Addr::LOCALHOST.into(),
                    std::net::Ipv6Addr::UNSPECIFIED.into(),
                ]
            };
            if let Some(ip) = special.iter().find(|ip| c.contains(**ip)) {
                return Err(ModelError::new(
                    field,
                    format!("{c} contains {ip}; choose a private range such as 10.254.0.0/16"),
                ));
            }
            Ok(())
        };
        if let Some(c) = &self.ipv4_cidr {
            check("ipv4_cidr", c, true, 8..=30)?;
        }
        if let Some(c) = &self.ipv6_cidr {
            check("ipv6_cidr", c, false, 48..=126)?;
        }
        if self.interface.is_empty() {
            return Err(ModelError::new(
                "interface",
                "must name an interface, such as lo",
            ));
        }
        Ok(())
    }

    pub fn pool(&self) -> VipPool {
        VipPool {
            v4: self.ipv4_cidr,
            v6: self.ipv6_cidr,
        }
    }
}

/// `[cluster]`: gossip and the replicated table. Timer defaults are gossip's and the
/// replica's own.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Bound into every packet's authentication: hosts of another cluster are refused.
    pub name: String,
    /// UDP (gossip) and TCP (sync) address.
    pub bind: SocketAddr,
    /// The address peers reach this host at, when `bind` is a wildcard.
    pub advertise: Option<SocketAddr>,
    /// Seeds, `host:port`; none starts a new cluster.
    pub join: Vec<String>,
    /// Base64 keys from `mesh keygen`; the first seals, all open (rotation).
    pub keys: Vec<String>,
    /// A file with one key per line, kept out of the config.
    pub key_file: Option<PathBuf>,
    /// Accept peers without a key: plaintext and unauthenticated. Without a key and
    /// without this, the agent runs alone.
    pub insecure: bool,
    #[serde(with = "mesh_core::duration")]
    pub anti_entropy: Duration,
    #[serde(with = "mesh_core::duration")]
    pub probe_period: Duration,
    #[serde(with = "mesh_core::duration")]
    pub probe_timeout: Duration,
    /// Default: 4·max(1, log10(n+1))·probe_period, n being the cluster size but at
    /// least 16 (memberlist's LAN formula, at our probe period).
    #[serde(with = "mesh_core::duration::optional")]
    pub suspect_timeout: Option<Duration>,
    /// How long a down host's records are kept, suspended, before they are purged.
    #[serde(with = "mesh_core::duration")]
    pub purge_after: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        let gossip = GossipConfig::default();
        Self {
            name: "mesh".into(),
            bind: SocketAddr::from(([0, 0, 0, 0], 7946)),
            advertise: None,
            join: Vec::new(),
            keys: Vec::new(),
            key_file: None,
            insecure: false,
            anti_entropy: Duration::from_secs(5),
            probe_period: gossip.probe_period,
            probe_timeout: gossip.probe_rtt,
            suspect_timeout: gossip.suspect_to_down_after,
            purge_after: Duration::from_millis(mesh_core::ReplicaConfig::default().purge_after_ms),
        }
    }
}

impl ClusterConfig {
    /// Refuses timers gossip cannot run with; the error names the field.
    pub fn validate(&self) -> Result<(), ModelError> {
        let at_least = |field: &str, d: Duration, min: Duration| {
            if d < min {
                Err(ModelError::new(
                    field,
                    format!("must be at least {}", mesh_core::duration::format(min)),
                ))
            } else {
                Ok(())
            }
        };
        at_least(
            "probe_period",
            self.probe_period,
            Duration::from_millis(100),
        )?;
        at_least(
            "probe_timeout",
            self.probe_timeout,
            Duration::from_millis(10),
        )?;
        if self.probe_timeout >= self.probe_period {
            return Err(ModelError::new(
                "probe_timeout",
                "must be shorter than probe_period",
            ));
        }
        at_least(
            "anti_entropy",
            self.anti_entropy,
            Duration::from_millis(100),
        )?;
        at_least("purge_after", self.purge_after, Duration::from_secs(1))?;
        if let Some(s) = self.suspect_timeout {
            at_least("suspect_timeout", s, Duration::from_millis(100))?;
        }
        if self.name.is_empty() {
            return Err(ModelError::new("name", "must not be empty"));
        }
        Ok(())
    }
}

/// A config that cannot be used; it names the file and, where known, the line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read config")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}:{line}: {message}")]
    At {
        file: String,
        line: usize,
        message: String,
    },
    #[error("{file}: {message}")]
    In { file: String, message: String },
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1
}

impl AgentConfig {
    /// Declared services and tasks go through a scratch table, the real code path, so
    /// everything the agent would refuse at start (a port published twice, a task of
    /// an undeclared service, a port override on a two-port service) is refused here,
    /// with the line.
    fn check_declarations(&self, text: &str, file: &str) -> Result<(), ConfigError> {
        let at = |line: usize, message: String| ConfigError::At {
            file: file.to_string(),
            line,
            message,
        };
        let mut scratch = Replica::new("check", 1, self.vip.pool(), ReplicaConfig::default());
        for svc in &self.service {
            let line = line_of(text, svc.span().start);
            let spec = svc.get_ref();
            scratch
                .put_service(spec.clone(), 0)
                .map_err(|e| at(line, format!("service {:?}: {e}", spec.name)))?;
        }
        for task in &self.task {
            let line = line_of(text, task.span().start);
            let t = task.get_ref();
            scratch
                .add_task(t.clone(), TaskSource::Config, 0)
                .map_err(|e| {
                    at(
                        line,
                        format!(
                            "task {:?} of service {:?}: {e}",
                            t.id.as_deref().unwrap_or(""),
                            t.service
                        ),
                    )
                })?;
        }
        Ok(())
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        Self::parse(&text, &file)
    }

    /// Parses and validates. Services are normalized in place; tasks must carry ids,
    /// so that a restart re-applies the same tasks instead of adding copies.
    pub fn parse(text: &str, file: &str) -> Result<Self, ConfigError> {
        let at = |line: usize, message: String| ConfigError::At {
            file: file.to_string(),
            line,
            message,
        };
        let within = |message: String| ConfigError::In {
            file: file.to_string(),
            message,
        };
        let mut config: AgentConfig = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| line_of(text, s.start)).unwrap_or(1);
            at(line, e.message().trim_end().to_string())
        })?;
        let mut names = std::collections::HashMap::new();
        for svc in &mut config.service {
            let line = line_of(text, svc.span().start);
            let spec = svc.get_mut();
            spec.normalize()
                .map_err(|e| at(line, format!("service {:?}: {e}", spec.name)))?;
            if let Some(first) = names.insert(spec.name.clone(), line) {
                return Err(at(
                    line,
                    format!(
                        "service {:?} is already declared at line {first}",
                        spec.name
                    ),
                ));
            }
        }
        let mut ids = std::collections::HashSet::new();
        for task in &config.task {
            let line = line_of(text, task.span().start);
            let t = task.get_ref();
            let Some(id) = &t.id else {
                return Err(at(
                    line,
                    format!(
                        "task of service {:?}: id is required in the config file, so a restart does not add it twice",
                        t.service
                    ),
                ));
            };
            mesh_core::name::check_task_id("id", id).map_err(|e| at(line, format!("task: {e}")))?;
            if !ids.insert((t.service.clone(), id.clone())) {
                return Err(at(
                    line,
                    format!("task {id:?} of service {:?} is declared twice", t.service),
                ));
            }
        }
        config
            .vip
            .validate()
            .map_err(|e| within(e.within("vip").to_string()))?;
        config
            .cluster
            .validate()
            .map_err(|e| within(e.within("cluster").to_string()))?;
        config
            .proxy
            .validate()
            .map_err(|e| within(e.within("proxy").to_string()))?;
        config.check_declarations(text, file)?;
        config.dns = std::mem::take(&mut config.dns).normalized();
        config
            .dns
            .validate()
            .map_err(|e| within(e.within("dns").to_string()))?;
        if let Some(name) = &config.node_name {
            mesh_core::name::check_task_id("node_name", name).map_err(|e| within(e.to_string()))?;
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_config_parses() {
        let c = AgentConfig::parse(
            r#"
node_name = "host1"
[api]
tcp = "127.0.0.1:7947"
token = "s3cret"
[proxy]
connect_timeout = "500ms"

[[service]]
name = "web"
ports = [{ published = 8080, target = 80 }]
health = { check = "http", path = "/healthz" }

[[task]]
service = "web"
id = "web.1"
ip = "10.0.0.1"
"#,
            "mesh.toml",
        )
        .unwrap();
        assert_eq!(c.proxy.connect_timeout, Duration::from_millis(500));
        assert_eq!(c.service[0].get_ref().ports[0].name, "tcp80");
        assert_eq!(c.task.len(), 1);
        assert_eq!(c.dns.ttl, 5);
        assert!(c.vip.manage);
    }

    #[test]
    fn dns_and_vip_sections() {
        let c = AgentConfig::parse(
            "[dns]\nlisten = [\"127.0.0.1:5353\"]\nallow = [\"10.0.0.0/8\"]\n[vip]\nipv6_cidr = \"none\"\nipv4_cidr = \"10.9.0.0/16\"\n",
            "m.toml",
        )
        .unwrap();
        assert_eq!(c.dns.listen.len(), 1);
        assert_eq!(c.vip.ipv6_cidr, None);
        let err = AgentConfig::parse("[vip]\nipv4_cidr = \"10.9.0.0/99\"\n", "m.toml")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("m.toml:2: "), "{err}");
        let err = AgentConfig::parse("[vip]\nipv4_cidr = \"fd00::/64\"\n", "m.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("vip.ipv4_cidr"), "{err}");
    }

    #[test]
    fn errors_name_file_and_line() {
        let err = AgentConfig::parse("node_name = \"a\"\n\n[api]\ncolour = 1\n", "mesh.toml")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("mesh.toml:4: "), "{err}");
        assert!(err.contains("colour"), "{err}");

        let err = AgentConfig::parse(
            "[[service]]\nname = \"web\"\nports = [{ target = 80 }]\n\n[[service]]\nname = \"api\"\nports = [{ published = 1, target = 80 }, { published = 1, target = 81 }]\n",
            "mesh.toml",
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "mesh.toml:5: service \"api\": ports[1].published: port 1/tcp is published twice"
        );

        let err = AgentConfig::parse("[proxy]\nconnect_timeout = \"soon\"\n", "m.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("m.toml:2: ") && err.contains("soon"),
            "{err}"
        );

        let err = AgentConfig::parse("[[task]]\nservice = \"web\"\nip = \"10.0.0.1\"\n", "m.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("m.toml:1: ") && err.contains("id is required"),
            "{err}"
        );

        let err = AgentConfig::parse(
            "[[task]]\nservice = \"web\"\nid = \"a\"\nip = \"10.0.0.300\"\n",
            "m.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("m.toml:4: "), "{err}");
    }
}
