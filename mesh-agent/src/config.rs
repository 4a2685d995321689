//! The agent's TOML config file: agent settings plus statically declared services and
//! tasks. Every error names the file and line.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use mesh_core::{Cidr, ServiceSpec, TaskSpec};
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
    pub proxy: ProxySettings,
    #[serde(default)]
    pub dns: DnsSettings,
    #[serde(default)]
    pub vip: VipSettings,
    #[serde(default)]
    pub cluster: ClusterSettings,
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxySettings {
    /// Bind published ports to this address only. Default: all IPv4 and IPv6 addresses.
    pub bind: Option<IpAddr>,
    #[serde(default = "d_connect", with = "mesh_core::duration")]
    pub connect_timeout: Duration,
    #[serde(default = "d_eject", with = "mesh_core::duration")]
    pub eject_backoff: Duration,
    #[serde(default = "d_udp_idle", with = "mesh_core::duration")]
    pub udp_idle_timeout: Duration,
    /// On shutdown, how long open connections may finish before they are closed.
    #[serde(default = "d_grace", with = "mesh_core::duration")]
    pub shutdown_grace: Duration,
    /// Threads serving TCP connections. 0 (the default): one per CPU the agent may
    /// run on, so `taskset` or a cgroup cpuset limits them too.
    #[serde(default)]
    pub workers: usize,
}

fn d_connect() -> Duration {
    Duration::from_secs(2)
}
fn d_eject() -> Duration {
    Duration::from_secs(5)
}
fn d_udp_idle() -> Duration {
    Duration::from_secs(60)
}
fn d_grace() -> Duration {
    Duration::from_secs(10)
}

impl Default for ProxySettings {
    fn default() -> Self {
        Self {
            bind: None,
            connect_timeout: d_connect(),
            eject_backoff: d_eject(),
            udp_idle_timeout: d_udp_idle(),
            shutdown_grace: d_grace(),
            workers: 0,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsSettings {
    /// UDP and TCP addresses to serve DNS on, e.g. the container bridge address:53.
    /// Empty (the default): no DNS server.
    #[serde(default)]
    pub listen: Vec<SocketAddr>,
    #[serde(default = "d_domain")]
    pub domain: String,
    #[serde(default = "d_ttl")]
    pub ttl: u32,
    /// Resolvers for other names. Default: the nameservers of /etc/resolv.conf.
    pub upstreams: Option<Vec<SocketAddr>>,
    /// Clients allowed to query. Default: loopback only.
    pub allow: Option<Vec<Cidr>>,
    #[serde(default = "d_inflight")]
    pub max_inflight: usize,
    #[serde(default = "d_forward_timeout", with = "mesh_core::duration")]
    pub forward_timeout: Duration,
}

fn d_domain() -> String {
    "mesh".into()
}
fn d_ttl() -> u32 {
    5
}
fn d_inflight() -> usize {
    1024
}
fn d_forward_timeout() -> Duration {
    Duration::from_secs(2)
}

impl Default for DnsSettings {
    fn default() -> Self {
        Self {
            listen: Vec::new(),
            domain: d_domain(),
            ttl: d_ttl(),
            upstreams: None,
            allow: None,
            max_inflight: d_inflight(),
            forward_timeout: d_forward_timeout(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipSettings {
    /// Pool for IPv4 VIPs, or "none".
    #[serde(default = "d_v4", deserialize_with = "cidr_or_none")]
    pub ipv4_cidr: Option<Cidr>,
    /// Pool for IPv6 VIPs, or "none".
    #[serde(default = "d_v6", deserialize_with = "cidr_or_none")]
    pub ipv6_cidr: Option<Cidr>,
    /// Put VIPs on this interface and listen on them (needs CAP_NET_ADMIN).
    #[serde(default = "d_true")]
    pub manage: bool,
    #[serde(default = "d_lo")]
    pub interface: String,
}

fn d_v4() -> Option<Cidr> {
    mesh_core::VipPool::default().v4
}
fn d_v6() -> Option<Cidr> {
    mesh_core::VipPool::default().v6
}
fn d_true() -> bool {
    true
}
fn d_lo() -> String {
    "lo".into()
}

fn cidr_or_none<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Cidr>, D::Error> {
    let text = String::deserialize(d)?;
    if text.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    text.parse().map(Some).map_err(serde::de::Error::custom)
}

impl Default for VipSettings {
    fn default() -> Self {
        Self {
            ipv4_cidr: d_v4(),
            ipv6_cidr: d_v6(),
            manage: true,
            interface: d_lo(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSettings {
    /// Bound into every packet's authentication: hosts of another cluster are refused.
    #[serde(default = "d_cluster")]
    pub name: String,
    /// UDP (gossip) and TCP (sync) address.
    #[serde(default = "d_bind")]
    pub bind: SocketAddr,
    /// The address peers reach this host at, when `bind` is a wildcard.
    pub advertise: Option<SocketAddr>,
    /// Seeds, `host:port`; none starts a new cluster.
    #[serde(default)]
    pub join: Vec<String>,
    /// Base64 keys from `mesh keygen`; the first seals, all open (rotation).
    #[serde(default)]
    pub keys: Vec<String>,
    /// A file with one key per line, kept out of the config.
    pub key_file: Option<PathBuf>,
    /// Accept peers off loopback without a key.
    #[serde(default)]
    pub insecure: bool,
    #[serde(default = "d_anti_entropy", with = "mesh_core::duration")]
    pub anti_entropy: Duration,
    #[serde(default = "d_probe", with = "mesh_core::duration")]
    pub probe_period: Duration,
    #[serde(default = "d_probe_timeout", with = "mesh_core::duration")]
    pub probe_timeout: Duration,
    /// Default: 4·max(1, log10 n)·probe_period, as memberlist's LAN profile.
    #[serde(default, with = "mesh_core::duration::optional")]
    pub suspect_timeout: Option<Duration>,
    /// How long a down host's records are kept, suspended, before they are purged.
    #[serde(default = "d_purge", with = "mesh_core::duration")]
    pub purge_after: Duration,
}

fn d_cluster() -> String {
    "mesh".into()
}
fn d_bind() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 7946))
}
fn d_anti_entropy() -> Duration {
    Duration::from_secs(5)
}
fn d_probe() -> Duration {
    Duration::from_secs(1)
}
fn d_probe_timeout() -> Duration {
    Duration::from_millis(500)
}
fn d_purge() -> Duration {
    Duration::from_secs(3600)
}

impl Default for ClusterSettings {
    fn default() -> Self {
        Self {
            name: d_cluster(),
            bind: d_bind(),
            advertise: None,
            join: Vec::new(),
            keys: Vec::new(),
            key_file: None,
            insecure: false,
            anti_entropy: d_anti_entropy(),
            probe_period: d_probe(),
            probe_timeout: d_probe_timeout(),
            suspect_timeout: None,
            purge_after: d_purge(),
        }
    }
}

/// A config error, already phrased as `file:line: what`.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("{}: cannot read config: {e}", path.display())))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates. Services are normalized in place; tasks must carry ids,
    /// so that a restart re-applies the same tasks instead of adding copies.
    pub fn parse(text: &str, file: &str) -> Result<Self, ConfigError> {
        let mut config: AgentConfig = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| line_of(text, s.start)).unwrap_or(1);
            ConfigError(format!("{file}:{line}: {}", e.message().trim_end()))
        })?;
        let mut names = std::collections::HashMap::new();
        for svc in &mut config.service {
            let line = line_of(text, svc.span().start);
            let spec = svc.get_mut();
            spec.normalize()
                .map_err(|e| ConfigError(format!("{file}:{line}: service {:?}: {e}", spec.name)))?;
            if let Some(first) = names.insert(spec.name.clone(), line) {
                return Err(ConfigError(format!(
                    "{file}:{line}: service {:?} is already declared at line {first}",
                    spec.name
                )));
            }
        }
        let mut ids = std::collections::HashSet::new();
        for task in &config.task {
            let line = line_of(text, task.span().start);
            let t = task.get_ref();
            let Some(id) = &t.id else {
                return Err(ConfigError(format!(
                    "{file}:{line}: task of service {:?}: id is required in the config file, so a restart does not add it twice",
                    t.service
                )));
            };
            mesh_core::name::check_task_id("id", id)
                .map_err(|e| ConfigError(format!("{file}:{line}: task: {e}")))?;
            if !ids.insert((t.service.clone(), id.clone())) {
                return Err(ConfigError(format!(
                    "{file}:{line}: task {id:?} of service {:?} is declared twice",
                    t.service
                )));
            }
        }
        if let Some(c) = config.vip.ipv4_cidr
            && !c.addr.is_ipv4()
        {
            return Err(ConfigError(format!(
                "{file}: vip.ipv4_cidr: {c} is not an IPv4 network"
            )));
        }
        if let Some(c) = config.vip.ipv6_cidr
            && c.addr.is_ipv4()
        {
            return Err(ConfigError(format!(
                "{file}: vip.ipv6_cidr: {c} is not an IPv6 network"
            )));
        }
        mesh_core::name::check_label("dns.domain", &config.dns.domain.replace('.', "x"))
            .map_err(|e| ConfigError(format!("{file}: {e}")))?;
        if let Some(name) = &config.node_name {
            mesh_core::name::check_task_id("node_name", name)
                .map_err(|e| ConfigError(format!("{file}: {e}")))?;
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
            .0;
        assert!(err.starts_with("m.toml:2: "), "{err}");
        let err = AgentConfig::parse("[vip]\nipv4_cidr = \"fd00::/64\"\n", "m.toml")
            .unwrap_err()
            .0;
        assert!(err.contains("vip.ipv4_cidr"), "{err}");
    }

    #[test]
    fn errors_name_file_and_line() {
        let err = AgentConfig::parse("node_name = \"a\"\n\n[api]\ncolour = 1\n", "mesh.toml")
            .unwrap_err()
            .0;
        assert!(err.starts_with("mesh.toml:4: "), "{err}");
        assert!(err.contains("colour"), "{err}");

        let err = AgentConfig::parse(
            "[[service]]\nname = \"web\"\nports = [{ target = 80 }]\n\n[[service]]\nname = \"api\"\nports = [{ published = 1, target = 80 }, { published = 1, target = 81 }]\n",
            "mesh.toml",
        )
        .unwrap_err()
        .0;
        assert_eq!(
            err,
            "mesh.toml:5: service \"api\": ports[1].published: port 1/tcp is published twice"
        );

        let err = AgentConfig::parse("[proxy]\nconnect_timeout = \"soon\"\n", "m.toml")
            .unwrap_err()
            .0;
        assert!(
            err.starts_with("m.toml:2: ") && err.contains("soon"),
            "{err}"
        );

        let err = AgentConfig::parse("[[task]]\nservice = \"web\"\nip = \"10.0.0.1\"\n", "m.toml")
            .unwrap_err()
            .0;
        assert!(
            err.starts_with("m.toml:1: ") && err.contains("id is required"),
            "{err}"
        );

        let err = AgentConfig::parse(
            "[[task]]\nservice = \"web\"\nid = \"a\"\nip = \"10.0.0.300\"\n",
            "m.toml",
        )
        .unwrap_err()
        .0;
        assert!(err.starts_with("m.toml:4: "), "{err}");
    }
}
