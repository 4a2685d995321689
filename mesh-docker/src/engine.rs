//! The Docker API, through bollard, turned into [`Container`]s. Everything that
//! knows bollard's types is here.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::Duration;

use bollard::Docker;
use bollard::models::{ContainerInspectResponse, EventMessage, HealthStatusEnum};
use bollard::query_parameters::{EventsOptionsBuilder, ListContainersOptionsBuilder};
use futures_util::Stream;
use mesh_core::{Health, Protocol};

use crate::container::{Container, NetworkAddress, Published};

/// Requests other than the event stream give up after this long, body included
/// (bollard's own timeout covers only the wait for the response's headers).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Longer container names are cut: a name travels in every gossip message about the
/// task, and those must fit a datagram.
const MAX_NAME: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{endpoint}: {source}")]
    Api {
        endpoint: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("unsupported Docker host {0:?}: use unix:///path/to/docker.sock or tcp://host:port")]
    Host(String),
    #[error("{endpoint}: no complete answer to {what} within {} s", REQUEST_TIMEOUT.as_secs())]
    Timeout { endpoint: String, what: String },
    /// The engine answered, but not with a container mesh can read.
    #[error("{0}")]
    Container(String),
}

impl EngineError {
    /// An error about one container, not about the connection: that container is
    /// reported and the others are served.
    pub fn is_about_container(&self) -> bool {
        match self {
            EngineError::Container(_) => true,
            EngineError::Api { source, .. } => matches!(
                source,
                bollard::errors::Error::DockerResponseServerError { .. }
                    | bollard::errors::Error::JsonDataError { .. }
                    | bollard::errors::Error::JsonSerdeError { .. }
            ),
            _ => false,
        }
    }
}

/// Checks a Docker host address without connecting: `--check-config` and the start
/// refuse one that can never work.
pub fn check_host(host: &str) -> Result<(), EngineError> {
    let ok = host
        .strip_prefix("unix://")
        .is_some_and(|p| p.starts_with('/'))
        || host.starts_with('/')
        || host
            .strip_prefix("tcp://")
            .or(host.strip_prefix("http://"))
            .is_some_and(|a| !a.is_empty());
    if ok {
        Ok(())
    } else {
        Err(EngineError::Host(host.to_string()))
    }
}

/// A connection to one engine, at the API version it speaks.
pub struct Engine {
    docker: Docker,
    endpoint: String,
}

/// One thing the event stream reports about a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub container: String,
    pub action: String,
    /// The `signal` attribute of a `kill`.
    pub signal: Option<String>,
    /// A container event's attributes, which hold the container's labels; `None`
    /// for a network event.
    pub labels: Option<BTreeMap<String, String>>,
}

impl Engine {
    /// Connects to `host` (`unix://…`, a socket path, or `tcp://…`) and negotiates
    /// the API version down to the engine's.
    pub async fn connect(host: &str) -> Result<Engine, EngineError> {
        let endpoint = host.to_string();
        let timeout = REQUEST_TIMEOUT.as_secs();
        let version = bollard::API_DEFAULT_VERSION;
        let docker = if let Some(path) = host.strip_prefix("unix://") {
            Docker::connect_with_unix(path, timeout, version)
        } else if host.starts_with('/') {
            Docker::connect_with_unix(host, timeout, version)
        } else if let Some(addr) = host.strip_prefix("tcp://") {
            Docker::connect_with_http(&format!("http://{addr}"), timeout, version)
        } else if host.starts_with("http://") {
            Docker::connect_with_http(host, timeout, version)
        } else {
            return Err(EngineError::Host(host.to_string()));
        };
        let api = |source| EngineError::Api {
            endpoint: endpoint.clone(),
            source,
        };
        let docker = docker.map_err(api)?;
        let docker = bounded(&endpoint, "the version request", docker.negotiate_version())
            .await?
            .map_err(api)?;
        Ok(Engine { docker, endpoint })
    }

    fn api(&self, source: bollard::errors::Error) -> EngineError {
        EngineError::Api {
            endpoint: self.endpoint.clone(),
            source,
        }
    }

    /// The API version in use, e.g. `1.41`.
    pub fn api_version(&self) -> String {
        self.docker.client_version().to_string()
    }

    /// The engine's clock, in Unix seconds: event times are the engine's.
    pub async fn now(&self) -> Option<i64> {
        let info = bounded(&self.endpoint, "info", self.docker.info())
            .await
            .ok()?
            .ok()?;
        unix_seconds(&info.system_time?)
    }

    /// The running containers, with their labels.
    pub async fn running(&self) -> Result<Vec<(String, BTreeMap<String, String>)>, EngineError> {
        let options = ListContainersOptionsBuilder::new().all(false).build();
        let list = bounded(
            &self.endpoint,
            "the container list",
            self.docker.list_containers(Some(options)),
        )
        .await?
        .map_err(|e| self.api(e))?;
        Ok(list
            .into_iter()
            .filter_map(|c| Some((c.id?, c.labels.unwrap_or_default().into_iter().collect())))
            .collect())
    }

    /// One container; `None` when it no longer exists.
    pub async fn inspect(&self, id: &str) -> Result<Option<Container>, EngineError> {
        let what = format!("inspect {}", id.chars().take(12).collect::<String>());
        match bounded(
            &self.endpoint,
            &what,
            self.docker.inspect_container(id, None),
        )
        .await?
        {
            Ok(c) => container(c).map(Some).map_err(EngineError::Container),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(e) => Err(self.api(e)),
        }
    }

    /// Container and network events from `since` (Unix seconds) on: the engine
    /// replays what happened since then, so nothing between a listing and the
    /// start of the stream is missed.
    pub fn events(
        &self,
        since: i64,
    ) -> impl Stream<Item = Result<Option<Event>, EngineError>> + '_ {
        use futures_util::StreamExt;
        let filters = HashMap::from([("type", vec!["container", "network"])]);
        let options = EventsOptionsBuilder::new()
            .since(&since.to_string())
            .filters(&filters)
            .build();
        self.docker
            .events(Some(options))
            .map(move |e| e.map(event).map_err(|e| self.api(e)))
    }
}

/// The container an event is about: the actor of a container event, the
/// `container` attribute of a network (dis)connect.
fn event(m: EventMessage) -> Option<Event> {
    use bollard::models::EventMessageTypeEnum as Type;
    let actor = m.actor?;
    let attributes = actor.attributes.unwrap_or_default();
    let (container, labels) = match m.typ? {
        Type::CONTAINER => (actor.id?, Some(attributes.clone().into_iter().collect())),
        Type::NETWORK => (attributes.get("container")?.clone(), None),
        _ => return None,
    };
    Some(Event {
        container,
        action: m.action.unwrap_or_default(),
        signal: attributes.get("signal").cloned(),
        labels,
    })
}

/// `work`, given up after [`REQUEST_TIMEOUT`] with an error that says what.
async fn bounded<T>(
    endpoint: &str,
    what: &str,
    work: impl std::future::Future<Output = T>,
) -> Result<T, EngineError> {
    tokio::time::timeout(REQUEST_TIMEOUT, work)
        .await
        .map_err(|_| EngineError::Timeout {
            endpoint: endpoint.to_string(),
            what: what.to_string(),
        })
}

/// A container from the engine's JSON for it, as the API sends it (the fuzz target
/// feeds this).
pub fn container_from_json(bytes: &[u8]) -> Result<Container, String> {
    let c = serde_json::from_slice::<ContainerInspectResponse>(bytes).map_err(|e| e.to_string())?;
    container(c)
}

fn container(c: ContainerInspectResponse) -> Result<Container, String> {
    let Some(id) = c.id.filter(|id| !id.is_empty()) else {
        return Err("the engine described a container without an id".into());
    };
    let config = c.config.unwrap_or_default();
    let state = c.state.unwrap_or_default();
    let settings = c.network_settings.unwrap_or_default();
    let ip = |s: Option<String>| s.and_then(|s| s.parse::<IpAddr>().ok());
    let networks = settings
        .networks
        .unwrap_or_default()
        .into_iter()
        .map(|(name, e)| {
            let v6 = ip(e.global_ipv6_address).filter(|a| !is_link_local(a));
            (
                name,
                NetworkAddress {
                    v4: ip(e.ip_address),
                    v6,
                },
            )
        })
        .collect();
    let mut published = Vec::new();
    for (port, bindings) in settings.ports.unwrap_or_default() {
        let Some((target, protocol)) = port_key(&port) else {
            continue;
        };
        for b in bindings.unwrap_or_default() {
            let Some(host_port) = b.host_port.and_then(|p| p.parse().ok()) else {
                continue;
            };
            published.push(Published {
                target,
                protocol,
                host_ip: ip(b.host_ip),
                host_port,
            });
        }
    }
    published.sort_by_key(|p| (p.target, p.protocol, p.host_port));
    let mut exposed: Vec<(u16, Protocol)> = config
        .exposed_ports
        .unwrap_or_default()
        .iter()
        .filter_map(|p| port_key(p))
        .collect();
    exposed.sort();
    exposed.dedup();
    let health = state.health.and_then(|h| match h.status? {
        HealthStatusEnum::HEALTHY => Some(Health::Healthy),
        HealthStatusEnum::UNHEALTHY => Some(Health::Unhealthy),
        HealthStatusEnum::STARTING => Some(Health::Unknown),
        HealthStatusEnum::NONE | HealthStatusEnum::EMPTY => None,
    });
    let mut name = c
        .name
        .unwrap_or_default()
        .trim_start_matches('/')
        .to_string();
    mesh_core::text::truncate_at_char(&mut name, MAX_NAME);
    Ok(Container {
        id,
        name,
        labels: config
            .labels
            .unwrap_or_default()
            .into_iter()
            .collect::<BTreeMap<_, _>>(),
        running: state.running == Some(true) && state.paused != Some(true),
        health,
        networks,
        exposed,
        published,
        stop_signal: config.stop_signal,
        stop_timeout: config.stop_timeout.and_then(|t| u64::try_from(t).ok()),
    })
}

/// The engine's `SystemTime` (`2026-12-02T13:30:01.232314868+02:00`, local time with
/// its offset, or `…Z`) in Unix seconds.
fn unix_seconds(system_time: &str) -> Option<i64> {
    let local = humantime::parse_rfc3339_weak(system_time.get(..19)?).ok()?;
    let local = local.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs() as i64;
    let rest = system_time.get(19..)?;
    let zone = rest.trim_start_matches(|c: char| c == '.' || c.is_ascii_digit());
    let offset = match zone.as_bytes() {
        [] | [b'Z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let digits = [h1, h2, m1, m2].map(|d| (*d as char).to_digit(10));
            let [Some(h1), Some(h2), Some(m1), Some(m2)] = digits else {
                return None;
            };
            let secs = i64::from((h1 * 10 + h2) * 3600 + (m1 * 10 + m2) * 60);
            if *sign == b'+' { secs } else { -secs }
        }
        _ => return None,
    };
    Some(local - offset)
}

/// `80/tcp` into its parts; other protocols (sctp) are not served by mesh.
fn port_key(key: &str) -> Option<(u16, Protocol)> {
    let (port, protocol) = key.split_once('/').unwrap_or((key, "tcp"));
    let protocol = match protocol {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        _ => return None,
    };
    Some((port.parse().ok()?, protocol))
}

fn is_link_local(a: &IpAddr) -> bool {
    matches!(a, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_engines_clock_reads_as_unix_seconds() {
        let t = Some(1_796_211_001);
        assert_eq!(unix_seconds("2026-12-02T11:30:01.232314868Z"), t);
        assert_eq!(unix_seconds("1970-01-01T00:00:10Z"), Some(10));
        // Local time with its offset, as a dockerd whose zone is not UTC writes it.
        assert_eq!(unix_seconds("2026-12-02T13:30:01.5+02:00"), t);
        assert_eq!(unix_seconds("2026-12-02T06:30:01-05:00"), t);
        assert_eq!(unix_seconds("yesterday"), None);
        assert_eq!(unix_seconds("2026-12-02T11:30:01\u{e9}"), None);
        assert_eq!(
            unix_seconds("2026-12-\u{e9}2T11:30:01"),
            None,
            "not a char boundary"
        );
    }

    #[test]
    fn event_kinds_name_their_container() {
        let m: EventMessage = serde_json::from_str(
            r#"{"Type":"network","Action":"connect","Actor":{"ID":"net1","Attributes":{"container":"abc","name":"bridge"}}}"#,
        )
        .unwrap();
        assert_eq!(event(m).unwrap().container, "abc");
        let m: EventMessage = serde_json::from_str(
            r#"{"Type":"container","Action":"kill","Actor":{"ID":"abc","Attributes":{"signal":"15"}}}"#,
        )
        .unwrap();
        let e = event(m).unwrap();
        assert_eq!(
            (e.action.as_str(), e.signal.as_deref()),
            ("kill", Some("15"))
        );
        let m: EventMessage =
            serde_json::from_str(r#"{"Type":"image","Action":"pull","Actor":{"ID":"x"}}"#).unwrap();
        assert_eq!(event(m), None);
    }
}
