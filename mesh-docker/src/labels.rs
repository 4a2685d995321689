//! The labels that make a container a task of a service, and how they are read.
//! Every label under `mesh.` is checked: a typo (`mesh.prot=80`) is an error that
//! names the label, not a setting silently ignored.

use std::collections::BTreeMap;

use mesh_core::name::check_label;
use mesh_core::{HealthCheck, Mode, PortSpec};

pub const SERVICE: &str = "mesh.service";
pub const PORT: &str = "mesh.port";
pub const PUBLISH: &str = "mesh.publish";
pub const HEALTH: &str = "mesh.health";
pub const MODE: &str = "mesh.mode";
pub const NETWORK: &str = "mesh.network";
const KNOWN: [&str; 6] = [SERVICE, PORT, PUBLISH, HEALTH, MODE, NETWORK];

/// Compose's labels on the containers of a project.
pub const COMPOSE_SERVICE: &str = "com.docker.compose.service";
/// Set on `docker-compose run` containers: one-off commands, not tasks.
pub const COMPOSE_ONEOFF: &str = "com.docker.compose.oneoff";

/// What a container's labels ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Labels {
    pub service: String,
    /// The label `service` came from, for messages.
    pub service_label: &'static str,
    /// `mesh.port`: the port the container serves on.
    pub port: Option<u16>,
    /// `mesh.publish`: the service's published port, and the target.
    pub publish: Option<PortSpec>,
    pub health: Option<HealthCheck>,
    pub mode: Option<Mode>,
    pub network: Option<String>,
}

/// A label that cannot be used, with what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("label {label}={value:?}: {message}")]
pub struct LabelError {
    pub label: String,
    pub value: String,
    pub message: String,
}

/// The most of a label's name or value an error repeats: labels are the container
/// owner's text, and errors go to logs and `mesh status`.
const MAX_SHOWN: usize = 200;

impl LabelError {
    /// The error about `label` set to `value`, both cut to what a log line shows.
    pub fn new(label: &str, value: &str, message: impl Into<String>) -> LabelError {
        LabelError {
            label: shown(label),
            value: shown(value),
            message: message.into(),
        }
    }
}

fn shown(text: &str) -> String {
    match text.char_indices().nth(MAX_SHOWN) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

impl Labels {
    /// The container's mesh labels; `Ok(None)` when it is not a task: no
    /// `mesh.service` label, and no Compose service when `compose` is on.
    pub fn read(
        labels: &BTreeMap<String, String>,
        compose: bool,
    ) -> Result<Option<Labels>, LabelError> {
        let (service, service_label) = match labels.get(SERVICE) {
            Some(s) => (s, SERVICE),
            None if compose
                && !labels
                    .get(COMPOSE_ONEOFF)
                    .is_some_and(|v| v.eq_ignore_ascii_case("true")) =>
            {
                match labels.get(COMPOSE_SERVICE) {
                    Some(s) => (s, COMPOSE_SERVICE),
                    None => return Ok(None),
                }
            }
            None => {
                // Settings without a service are a mistake, not a container to skip
                // quietly.
                if let Some((k, v)) = labels.iter().find(|(k, _)| k.starts_with("mesh.")) {
                    return Err(LabelError::new(
                        k,
                        v,
                        format!("needs {SERVICE} on the same container"),
                    ));
                }
                return Ok(None);
            }
        };
        if let Some((k, v)) = labels
            .iter()
            .find(|(k, _)| k.starts_with("mesh.") && !KNOWN.contains(&k.as_str()))
        {
            return Err(LabelError::new(
                k,
                v,
                format!("unknown label; mesh reads {}", KNOWN.join(", ")),
            ));
        }
        check_label("name", service)
            .map_err(|e| LabelError::new(service_label, service, e.message))?;
        let port = labels
            .get(PORT)
            .map(|v| match v.parse::<u16>() {
                Ok(p) if p > 0 => Ok(p),
                _ => Err(LabelError::new(
                    PORT,
                    v,
                    "must be a port number from 1 to 65535",
                )),
            })
            .transpose()?;
        let publish = labels
            .get(PUBLISH)
            .map(|v| PortSpec::parse_short(v).map_err(|m| LabelError::new(PUBLISH, v, m)))
            .transpose()?;
        if let (Some(port), Some(publish)) = (port, &publish)
            && port != publish.target
        {
            return Err(LabelError::new(
                PORT,
                &port.to_string(),
                format!("differs from the target of {PUBLISH}={}", labels[PUBLISH]),
            ));
        }
        let health = labels
            .get(HEALTH)
            .map(|v| HealthCheck::parse_short(v).map_err(|m| LabelError::new(HEALTH, v, m)))
            .transpose()?;
        let mode = labels
            .get(MODE)
            .map(|v| match v.as_str() {
                "vip" => Ok(Mode::Vip),
                "dnsrr" => Ok(Mode::Dnsrr),
                _ => Err(LabelError::new(MODE, v, "use vip or dnsrr")),
            })
            .transpose()?;
        let network = labels.get(NETWORK).cloned();
        if network.as_deref() == Some("") {
            return Err(LabelError::new(NETWORK, "", "must name a network"));
        }
        Ok(Some(Labels {
            service: service.clone(),
            service_label,
            port,
            publish,
            health,
            mode,
            network,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::{HealthKind, Protocol};

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn read(pairs: &[(&str, &str)]) -> Result<Option<Labels>, LabelError> {
        Labels::read(&labels(pairs), false)
    }

    #[test]
    fn a_service_label_with_every_option_reads() {
        let l = read(&[
            ("mesh.service", "web"),
            ("mesh.port", "80"),
            ("mesh.publish", "8080:80/udp"),
            ("mesh.health", "http:/ready"),
            ("mesh.mode", "dnsrr"),
            ("mesh.network", "front"),
            ("org.example.other", "anything"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(l.service, "web");
        assert_eq!(l.port, Some(80));
        let p = l.publish.unwrap();
        assert_eq!(
            (p.published, p.target, p.protocol),
            (Some(8080), 80, Protocol::Udp)
        );
        let h = l.health.unwrap();
        assert_eq!((h.check, h.path.as_str()), (HealthKind::Http, "/ready"));
        assert_eq!(l.mode, Some(Mode::Dnsrr));
        assert_eq!(l.network.as_deref(), Some("front"));
    }

    #[test]
    fn containers_without_mesh_labels_are_not_tasks() {
        assert_eq!(read(&[("maintainer", "x")]), Ok(None));
        // Compose containers only when compose is on, and never one-off runs.
        let compose = labels(&[(COMPOSE_SERVICE, "api")]);
        assert_eq!(Labels::read(&compose, false), Ok(None));
        assert_eq!(
            Labels::read(&compose, true).unwrap().unwrap().service,
            "api"
        );
        let oneoff = labels(&[(COMPOSE_SERVICE, "api"), (COMPOSE_ONEOFF, "True")]);
        assert_eq!(Labels::read(&oneoff, true), Ok(None));
        // A mesh label wins over Compose's name.
        let both = labels(&[(COMPOSE_SERVICE, "api"), (SERVICE, "web")]);
        assert_eq!(Labels::read(&both, true).unwrap().unwrap().service, "web");
    }

    #[test]
    fn every_bad_label_is_named_with_its_value() {
        // The labels, the label the error must name, and a word of its message.
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, &'a str);
        let cases: &[Case] = &[
            (
                &[("mesh.service", "web"), ("mesh.port", "eighty")],
                "mesh.port",
                "1 to 65535",
            ),
            (
                &[("mesh.service", "web"), ("mesh.port", "0")],
                "mesh.port",
                "1 to 65535",
            ),
            (
                &[("mesh.service", "web"), ("mesh.prot", "80")],
                "mesh.prot",
                "unknown label",
            ),
            (&[("mesh.service", "Web_1")], "mesh.service", "lowercase"),
            (
                &[("mesh.service", "web"), ("mesh.publish", "8080:80/sctp")],
                "mesh.publish",
                "sctp",
            ),
            (
                &[("mesh.service", "web"), ("mesh.publish", "x:80")],
                "mesh.publish",
                "published",
            ),
            (
                &[("mesh.service", "web"), ("mesh.health", "ping")],
                "mesh.health",
                "tcp, http",
            ),
            (
                &[("mesh.service", "web"), ("mesh.health", "http:nope")],
                "mesh.health",
                "'/'",
            ),
            (
                &[("mesh.service", "web"), ("mesh.mode", "rr")],
                "mesh.mode",
                "vip or dnsrr",
            ),
            (
                &[("mesh.service", "web"), ("mesh.network", "")],
                "mesh.network",
                "network",
            ),
            (&[("mesh.port", "80")], "mesh.port", "needs mesh.service"),
            (
                &[
                    ("mesh.service", "web"),
                    ("mesh.port", "81"),
                    ("mesh.publish", "8080:80"),
                ],
                "mesh.port",
                "differs",
            ),
        ];
        for (pairs, label, needle) in cases {
            let e = read(pairs).unwrap_err();
            assert_eq!(&e.label, label, "{pairs:?}: {e}");
            assert!(e.to_string().contains(needle), "{pairs:?}: {e}");
            assert!(e.to_string().contains(label), "{e}");
        }
        let long = "x".repeat(100_000);
        let e = read(&[("mesh.service", "web"), ("mesh.port", &long)]).unwrap_err();
        assert!(
            e.to_string().len() < 400,
            "a long value is cut: {} bytes",
            e.to_string().len()
        );
        let compose = labels(&[(COMPOSE_SERVICE, "my_app")]);
        let e = Labels::read(&compose, true).unwrap_err();
        assert_eq!(e.label, COMPOSE_SERVICE, "{e}");
    }
}
