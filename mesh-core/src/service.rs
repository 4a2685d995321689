//! A service: a name, its ports, how its tasks are balanced and probed.

use std::collections::HashSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::ModelError;
use crate::name::check_label;
pub use crate::protocol::Protocol;

/// How the service is reached by name: one virtual IP, or DNS round robin over task IPs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Vip,
    Dnsrr,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Vip => "vip",
            Mode::Dnsrr => "dnsrr",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ProxyProtocol {
    #[default]
    Off,
    V1,
    V2,
}

/// What source address a task sees on a connection through a published port or VIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ClientIp {
    /// Connections may go to tasks on any host; a kernel plane masquerades a hop to
    /// another host, and the userspace plane connects from this host. The task sees a
    /// mesh host's address unless PROXY headers carry the client's.
    #[default]
    Any,
    /// Only this host's tasks, with no source rewrite: the task sees the client's own
    /// address (Kubernetes' `externalTrafficPolicy: Local`). A host with no healthy
    /// task of the service refuses the connection, so clients or an outside balancer
    /// must spread over the hosts that run tasks. Needs the nftables plane.
    Keep,
}

impl std::fmt::Display for ClientIp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ClientIp::Any => "any",
            ClientIp::Keep => "keep",
        })
    }
}

pub use crate::balance::Balance;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    /// The port every host listens on (the routing mesh). `None`: reachable only
    /// through the service VIP and DNS, like an unpublished Swarm port.
    #[serde(default)]
    pub published: Option<u16>,
    /// The port the tasks listen on, unless a task overrides it.
    pub target: u16,
    #[serde(default)]
    pub protocol: Protocol,
    /// The name used in SRV records (`_<name>._<protocol>.<service>`). Defaults to
    /// `<protocol><target>`, e.g. `tcp80`.
    #[serde(default)]
    pub name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum HealthKind {
    /// A task is healthy when a TCP connect to it succeeds.
    #[default]
    Tcp,
    /// A task is healthy when `GET path` answers 2xx or 3xx.
    Http,
    /// No active probe: a task is healthy from the moment it is registered.
    None,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    #[serde(default)]
    pub check: HealthKind,
    /// Path of the HTTP probe; only for `check = "http"`.
    #[serde(default = "default_path")]
    pub path: String,
    #[serde(default = "default_interval", with = "crate::duration")]
    pub interval: Duration,
    #[serde(default = "default_timeout", with = "crate::duration")]
    pub timeout: Duration,
    /// Consecutive successes that turn an unhealthy task healthy.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Consecutive failures that turn a healthy task unhealthy.
    #[serde(default = "default_fall")]
    pub fall: u32,
}

fn default_path() -> String {
    "/".into()
}
fn default_interval() -> Duration {
    Duration::from_secs(2)
}
fn default_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    3
}

impl Default for HealthCheck {
    // HAProxy's defaults (inter 2s, rise 2, fall 3), which operators already know.
    fn default() -> Self {
        Self {
            check: HealthKind::Tcp,
            path: default_path(),
            interval: default_interval(),
            timeout: default_timeout(),
            rise: default_rise(),
            fall: default_fall(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    pub name: String,
    pub ports: Vec<PortSpec>,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub balance: Balance,
    #[serde(default)]
    pub health: HealthCheck,
    #[serde(default)]
    pub proxy_protocol: ProxyProtocol,
    /// `keep`: only this host's tasks, and they see the client's address.
    #[serde(default)]
    pub client_ip: ClientIp,
    /// Close a proxied connection after this long without a byte either way. The
    /// default is no idle limit: TCP keepalive on both legs finds dead peers instead of
    /// a silent timer (Swarm's IPVS kills idle flows after 900 s).
    #[serde(default, with = "crate::duration::optional")]
    pub idle_timeout: Option<Duration>,
    /// How long connections to a drained or removed task may go on before they are closed.
    #[serde(default = "default_drain", with = "crate::duration")]
    pub drain_timeout: Duration,
    /// Concurrent connections (or UDP flows) per published port on this host. Beyond
    /// it, new connections are refused at once.
    #[serde(default)]
    pub max_connections: Option<u32>,
}

fn default_drain() -> Duration {
    Duration::from_secs(30)
}

impl ServiceSpec {
    /// A service with defaults for everything but its name and ports.
    pub fn new(name: impl Into<String>, ports: Vec<PortSpec>) -> Self {
        Self {
            name: name.into(),
            ports,
            mode: Mode::default(),
            balance: Balance::default(),
            health: HealthCheck::default(),
            proxy_protocol: ProxyProtocol::default(),
            client_ip: ClientIp::default(),
            idle_timeout: None,
            drain_timeout: default_drain(),
            max_connections: None,
        }
    }

    /// Fills derived defaults (port names) and checks every field. The error names the
    /// field as the user wrote it.
    pub fn normalize(&mut self) -> Result<(), ModelError> {
        check_label("name", &self.name)?;
        if self.name == "tasks" {
            return Err(ModelError::new(
                "name",
                "\"tasks\" is reserved for DNS (tasks.<service>)",
            ));
        }
        if self.ports.is_empty() {
            return Err(ModelError::new(
                "ports",
                "a service needs at least one port",
            ));
        }
        let mut published = HashSet::new();
        let mut targets = HashSet::new();
        let mut names = HashSet::new();
        for (i, port) in self.ports.iter_mut().enumerate() {
            let field = format!("ports[{i}]");
            port.normalize().map_err(|e| e.within(&field))?;
            if let Some(p) = port.published
                && !published.insert((p, port.protocol))
            {
                return Err(ModelError::new(
                    format!("{field}.published"),
                    format!("port {p}/{} is published twice", port.protocol),
                ));
            }
            if !targets.insert((port.target, port.protocol)) {
                return Err(ModelError::new(
                    format!("{field}.target"),
                    format!("target {}/{} is listed twice", port.target, port.protocol),
                ));
            }
            if !names.insert(port.name.clone()) {
                return Err(ModelError::new(
                    format!("{field}.name"),
                    format!("{:?} is used twice", port.name),
                ));
            }
        }
        if self.proxy_protocol != ProxyProtocol::Off
            && let Some(i) = self.ports.iter().position(|p| p.protocol == Protocol::Udp)
        {
            return Err(ModelError::new(
                "proxy_protocol",
                format!(
                    "PROXY headers are sent on TCP connections only, and ports[{i}] is udp; use a separate service for it"
                ),
            ));
        }
        self.health.validate().map_err(|e| e.within("health"))?;
        if self.idle_timeout == Some(Duration::ZERO) {
            return Err(ModelError::new(
                "idle_timeout",
                "must be positive, or \"none\" for no limit",
            ));
        }
        if self.max_connections == Some(0) {
            return Err(ModelError::new(
                "max_connections",
                "must be at least 1 (omit it for no limit)",
            ));
        }
        Ok(())
    }

    pub fn published_ports(&self) -> impl Iterator<Item = (u16, &PortSpec)> {
        self.ports
            .iter()
            .filter_map(|p| p.published.map(|n| (n, p)))
    }
}

impl PortSpec {
    pub fn tcp(published: Option<u16>, target: u16) -> Self {
        Self {
            published,
            target,
            protocol: Protocol::Tcp,
            name: String::new(),
        }
    }

    pub fn udp(published: Option<u16>, target: u16) -> Self {
        Self {
            protocol: Protocol::Udp,
            ..Self::tcp(published, target)
        }
    }

    /// The short form [`PortSpec::parse_short`] reads: `8080:80/tcp`, or `80/tcp`.
    pub fn short(&self) -> String {
        match self.published {
            Some(n) => format!("{n}:{}/{}", self.target, self.protocol),
            None => format!("{}/{}", self.target, self.protocol),
        }
    }

    /// Docker's short form, `[PUBLISHED:]TARGET[/tcp|/udp]`, as `-p` and the
    /// `mesh.publish` label write it. The error says what is wrong with which part;
    /// the caller names where the text came from.
    pub fn parse_short(text: &str) -> Result<PortSpec, String> {
        let (ports, protocol) = match text.rsplit_once('/') {
            Some((p, "tcp")) => (p, Protocol::Tcp),
            Some((p, "udp")) => (p, Protocol::Udp),
            Some((_, other)) => return Err(format!("unknown protocol {other:?}; use tcp or udp")),
            None => (text, Protocol::Tcp),
        };
        let num = |s: &str, what: &str| match s.parse::<u16>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!(
                "{what} port {s:?} must be a number from 1 to 65535"
            )),
        };
        let (published, target) = match ports.split_once(':') {
            Some((published, target)) => {
                (Some(num(published, "published")?), num(target, "target")?)
            }
            None => (None, num(ports, "target")?),
        };
        Ok(PortSpec {
            protocol,
            ..PortSpec::tcp(published, target)
        })
    }

    /// Docker's long form, `published=8080,target=80[,protocol=udp][,mode=ingress]`,
    /// plus `name=http` for SRV; or the short form when the text has no `=`.
    pub fn parse_flag(text: &str) -> Result<PortSpec, String> {
        if !text.contains('=') {
            return PortSpec::parse_short(text);
        }
        let mut published = None;
        let mut target = None;
        let mut protocol = Protocol::Tcp;
        let mut name = String::new();
        let mut seen: Vec<&str> = Vec::new();
        for part in text.split(',') {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?} is not key=value"))?;
            if seen.contains(&key) {
                return Err(format!("{key} is given twice"));
            }
            seen.push(key);
            let num = |what: &str| match value.parse::<u16>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(format!("{what}={value:?} must be a number from 1 to 65535")),
            };
            match key {
                "published" => published = Some(num("published")?),
                "target" => target = Some(num("target")?),
                "protocol" => {
                    protocol = match value {
                        "tcp" => Protocol::Tcp,
                        "udp" => Protocol::Udp,
                        other => return Err(format!("protocol={other:?}: use tcp or udp")),
                    }
                }
                // Every host publishes every port: the routing mesh is Swarm's
                // ingress mode, and host mode has no counterpart.
                "mode" => match value {
                    "ingress" => {}
                    "host" => {
                        return Err(
                            "mode=host is not supported: every host publishes the port (ingress)"
                                .into(),
                        );
                    }
                    other => return Err(format!("mode={other:?}: use ingress")),
                },
                "name" => {
                    check_label("name", value).map_err(|e| e.to_string())?;
                    name = value.to_string();
                }
                other => {
                    return Err(format!(
                        "unknown key {other:?}; use published, target, protocol, mode or name"
                    ));
                }
            }
        }
        let target = target.ok_or("target= is missing")?;
        Ok(PortSpec {
            protocol,
            name,
            ..PortSpec::tcp(published, target)
        })
    }

    fn normalize(&mut self) -> Result<(), ModelError> {
        if self.target == 0 {
            return Err(ModelError::new("target", "must be between 1 and 65535"));
        }
        if self.published == Some(0) {
            return Err(ModelError::new("published", "must be between 1 and 65535"));
        }
        if self.name.is_empty() {
            self.name = format!("{}{}", self.protocol, self.target);
        }
        check_label("name", &self.name)
    }
}

impl HealthCheck {
    /// The short form [`HealthCheck::parse_short`] reads: `tcp`, `http:/PATH` or `none`.
    pub fn short(&self) -> String {
        match self.check {
            HealthKind::Http => format!("http:{}", self.path),
            HealthKind::Tcp => "tcp".into(),
            HealthKind::None => "none".into(),
        }
    }

    /// The kind of check in its short form, `tcp`, `http`, `http:/PATH` or `none`, as
    /// `--health` and the `mesh.health` label write it; the rest keeps its defaults.
    pub fn parse_short(text: &str) -> Result<HealthCheck, String> {
        let mut h = HealthCheck::default();
        match text {
            "tcp" => h.check = HealthKind::Tcp,
            "none" => h.check = HealthKind::None,
            "http" => h.check = HealthKind::Http,
            s if s.starts_with("http:") => {
                h.check = HealthKind::Http;
                h.path = s[5..].to_string();
            }
            other => return Err(format!("{other:?}: use tcp, http:/PATH or none")),
        }
        h.validate().map_err(|e| e.to_string())?;
        Ok(h)
    }

    fn validate(&self) -> Result<(), ModelError> {
        if self.interval < Duration::from_millis(100) {
            return Err(ModelError::new("interval", "must be at least 100ms"));
        }
        if self.timeout.is_zero() {
            return Err(ModelError::new("timeout", "must be positive"));
        }
        if self.rise == 0 {
            return Err(ModelError::new("rise", "must be at least 1"));
        }
        if self.fall == 0 {
            return Err(ModelError::new("fall", "must be at least 1"));
        }
        if self.check == HealthKind::Http
            && (!self.path.starts_with('/')
                || self
                    .path
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control()))
        {
            return Err(ModelError::new(
                "path",
                format!("{:?} must start with '/' and contain no spaces", self.path),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_parse_in_dockers_long_form_too() {
        let p = PortSpec::parse_flag("published=8080,target=80,protocol=udp,mode=ingress,name=dns")
            .unwrap();
        assert_eq!(
            (p.published, p.target, p.protocol, p.name.as_str()),
            (Some(8080), 80, Protocol::Udp, "dns")
        );
        let p = PortSpec::parse_flag("target=80").unwrap();
        assert_eq!((p.published, p.protocol), (None, Protocol::Tcp));
        assert_eq!(
            PortSpec::parse_flag("8080:80").unwrap().published,
            Some(8080)
        );
        for (bad, why) in [
            ("published=8080", "target= is missing"),
            ("target=80,target=81", "target is given twice"),
            ("target=80,mode=host", "mode=host is not supported"),
            ("target=80,proto=udp", "unknown key \"proto\""),
            ("target=0", "target=\"0\" must be a number"),
            ("target=80,protocol=sctp", "protocol=\"sctp\""),
            ("target=80,name=Bad_Name", "name"),
            ("target=80,published", "\"published\" is not key=value"),
        ] {
            let err = PortSpec::parse_flag(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    fn web() -> ServiceSpec {
        ServiceSpec::new("web", vec![PortSpec::tcp(Some(8080), 80)])
    }

    #[test]
    fn defaults_fill_port_names() {
        let mut s = web();
        s.normalize().unwrap();
        assert_eq!(s.ports[0].name, "tcp80");
        assert_eq!(s.drain_timeout, Duration::from_secs(30));
        assert_eq!(s.idle_timeout, None);
    }

    #[test]
    fn errors_name_the_field() {
        let mut s = web();
        s.ports.push(PortSpec::tcp(Some(8080), 81));
        assert_eq!(s.normalize().unwrap_err().field, "ports[1].published");

        let mut s = web();
        s.ports[0].target = 0;
        assert_eq!(s.normalize().unwrap_err().field, "ports[0].target");

        let mut s = web();
        s.health.check = HealthKind::Http;
        s.health.path = "healthz".into();
        assert_eq!(s.normalize().unwrap_err().field, "health.path");

        let mut s = web();
        s.name = "Web!".into();
        assert_eq!(s.normalize().unwrap_err().field, "name");

        let mut s = web();
        s.ports.clear();
        assert_eq!(s.normalize().unwrap_err().field, "ports");
    }

    #[test]
    fn same_port_number_on_tcp_and_udp_is_fine() {
        let mut s = web();
        s.ports.push(PortSpec {
            protocol: Protocol::Udp,
            ..PortSpec::tcp(Some(8080), 80)
        });
        s.normalize().unwrap();
    }

    #[test]
    fn json_rejects_unknown_fields_and_parses_durations() {
        let ok: ServiceSpec = serde_json::from_str(
            r#"{"name":"web","ports":[{"target":80}],"drain_timeout":"5s","idle_timeout":"none"}"#,
        )
        .unwrap();
        assert_eq!(ok.drain_timeout, Duration::from_secs(5));
        let err =
            serde_json::from_str::<ServiceSpec>(r#"{"name":"web","ports":[],"colour":"red"}"#)
                .unwrap_err()
                .to_string();
        assert!(err.contains("colour"), "{err}");
    }
}
