//! The rules that turn this host's containers into tasks, and the services their
//! labels ask for. Pure: containers and settings in, an [`Observation`] out, so the
//! source can recompute the whole set after every event and the table diffs it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use mesh_core::{Observed, PortSpec, Protocol, ServiceSpec, TaskSpec, TaskState};
use serde::{Deserialize, Serialize};

use crate::container::Container;
use crate::labels::{LabelError, Labels};

/// Which address other hosts reach a container task at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AddressMode {
    /// The container's own address on its network. Other hosts reach it only when
    /// the operator routes container subnets between hosts (or uses an overlay).
    #[default]
    Container,
    /// This host's address and the host port Docker published for the container's
    /// port: reachable wherever this host is, at the cost of publishing the port.
    HostPort,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub address: AddressMode,
    /// Containers of Compose projects join the service named by their Compose
    /// service, without mesh labels.
    pub compose: bool,
    /// The network to take a container's address from, when it has several and no
    /// `mesh.network` label.
    pub network: Option<String>,
    /// This host's address for other hosts: the task address in `host-port` mode,
    /// and for containers in the host's network namespace.
    pub host_ip: Option<IpAddr>,
}

/// What this host's containers amount to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Observation {
    /// The complete set of this host's container tasks.
    pub tasks: Vec<TaskSpec>,
    /// The services the labels describe, by name, with the container each
    /// description was taken from. Created when missing; compared when present.
    pub services: BTreeMap<String, Wanted>,
    /// Containers that are not tasks because of their labels or their addresses.
    pub skipped: Vec<Skip>,
    /// Containers of one service whose labels disagree, by service, as
    /// [`differences`] words it.
    pub differences: BTreeMap<String, Vec<String>>,
    /// Task addresses only this host can reach (a container's address on a local
    /// bridge), for the warning when the cluster has other hosts.
    pub local_only: Vec<(String, IpAddr)>,
}

/// A service as one container's labels describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub spec: ServiceSpec,
    pub container: String,
    /// Which settings the labels gave; the others are defaults, which an existing
    /// service is not compared on.
    pub set: BTreeSet<&'static str>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skip {
    pub container: String,
    pub error: LabelError,
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "container {}: {}", self.container, self.error)
    }
}

/// The tasks of `containers`. A container in `stopping` (the engine sent it its
/// stop signal) is a draining task: it finishes its connections and gets no new ones.
pub fn observe(
    containers: &BTreeMap<String, Container>,
    stopping: &BTreeSet<String>,
    settings: &Settings,
) -> Observation {
    let mut out = Observation::default();
    let mut described: BTreeMap<String, Vec<Wanted>> = BTreeMap::new();
    for c in containers.values().filter(|c| c.running) {
        let labels = match Labels::read(&c.labels, settings.compose) {
            Ok(Some(l)) => l,
            Ok(None) => continue,
            Err(error) => {
                out.skipped.push(Skip {
                    container: c.name.clone(),
                    error,
                });
                continue;
            }
        };
        if labels.service_label == crate::labels::COMPOSE_SERVICE
            && labels.port.is_none()
            && labels.publish.is_none()
            && c.exposed.is_empty()
        {
            // A Compose container that serves no port (a worker, a client) is part
            // of the project, not a task.
            continue;
        }
        match task(c, &labels, stopping.contains(&c.id), settings) {
            Ok((task, wanted, local)) => {
                if let Some(ip) = local {
                    out.local_only.push((c.name.clone(), ip));
                }
                if let Some(w) = wanted {
                    described.entry(w.spec.name.clone()).or_default().push(w);
                }
                out.tasks.push(task);
            }
            Err(error) => out.skipped.push(Skip {
                container: c.name.clone(),
                error,
            }),
        }
    }
    // The container whose labels set the most (then the first by name) describes
    // the service; the others are compared with it, as with a service that exists.
    for (name, mut all) in described {
        all.sort_by(|a, b| (b.set.len(), &a.container).cmp(&(a.set.len(), &b.container)));
        let mut all = all.into_iter();
        let Some(first) = all.next() else { continue };
        let lines: Vec<String> = all
            .flat_map(|w| differences(&first.spec, &w))
            .map(|d| format!("{d} (as container {} describes it)", first.container))
            .collect();
        if !lines.is_empty() {
            out.differences.insert(name.clone(), lines);
        }
        out.services.insert(name, first);
    }
    out
}

type Made = (TaskSpec, Option<Wanted>, Option<IpAddr>);

fn task(c: &Container, l: &Labels, stopping: bool, s: &Settings) -> Result<Made, LabelError> {
    // The port the labels name overrides the service's target for this task; one the
    // image merely exposes only describes a service that does not exist yet, since an
    // override on a service with several ports is refused.
    let explicit = l.port.or(l.publish.as_ref().map(|p| p.target));
    let exposed = match explicit {
        Some(_) => None,
        None => single_exposed(c)?,
    };
    let port = explicit.or(exposed.map(|(p, _)| p));
    let protocol = match (&l.publish, exposed) {
        (Some(p), _) => p.protocol,
        (None, Some((_, protocol))) => protocol,
        (None, None) => Protocol::Tcp,
    };
    let (ip, task_port, local) = address(c, l, (explicit, port), protocol, s)?;
    let wanted = port.map(|target| {
        let mut set = BTreeSet::new();
        let ports = match &l.publish {
            Some(p) => {
                set.insert("ports");
                vec![p.clone()]
            }
            None => vec![PortSpec {
                protocol,
                ..PortSpec::tcp(None, target)
            }],
        };
        let mut spec = ServiceSpec::new(l.service.clone(), ports);
        if let Some(h) = &l.health {
            spec.health = h.clone();
            set.insert("health");
        }
        if let Some(m) = l.mode {
            spec.mode = m;
            set.insert("mode");
        }
        Wanted {
            spec,
            container: c.name.clone(),
            set,
        }
    });
    let task = TaskSpec {
        service: l.service.clone(),
        id: Some(c.short_id().to_string()),
        ip,
        port: task_port,
        state: if stopping {
            TaskState::Draining
        } else {
            TaskState::Active
        },
        observed: Some(Observed {
            container: c.name.clone(),
            health: c.health,
        }),
    };
    Ok((task, wanted, local))
}

/// The container's only exposed port; `None` when it exposes none (the service's
/// target port applies); an error when it exposes several.
fn single_exposed(c: &Container) -> Result<Option<(u16, Protocol)>, LabelError> {
    match c.exposed.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(*one)),
        many => Err(LabelError {
            label: crate::labels::PORT.into(),
            value: String::new(),
            message: format!(
                "is missing, and the container exposes {} ports ({}); say which one serves",
                many.len(),
                many.iter()
                    .map(|(p, proto)| format!("{p}/{proto}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
}

/// The task's address and port override, and whether only this host reaches it.
fn address(
    c: &Container,
    l: &Labels,
    (explicit, port): (Option<u16>, Option<u16>),
    protocol: Protocol,
    s: &Settings,
) -> Result<(IpAddr, Option<u16>, Option<IpAddr>), LabelError> {
    let fail = |label: &str, value: &str, message: String| LabelError::new(label, value, message);
    let host_ip = || {
        s.host_ip.ok_or_else(|| {
            fail(
                crate::labels::NETWORK,
                "host",
                "this host's address is unknown; set [docker] host_address".into(),
            )
        })
    };
    let on_host_network = c.networks.len() == 1 && c.networks.contains_key("host");
    if s.address == AddressMode::HostPort && !on_host_network {
        let Some(target) = port else {
            return Err(fail(
                crate::labels::PORT,
                "",
                "is missing; with address = \"host-port\" mesh needs the container's port to find its published host port".into(),
            ));
        };
        let Some(p) = c
            .published
            .iter()
            .find(|p| p.target == target && p.protocol == protocol)
        else {
            return Err(fail(
                crate::labels::PORT,
                &target.to_string(),
                format!(
                    "{target}/{protocol} is not published on the host; with address = \"host-port\" run the container with -p {target}"
                ),
            ));
        };
        let ip = match p.host_ip {
            // Bound on loopback: no other host can reach it, and an address of
            // 127.0.0.1 would send them to their own loopback.
            Some(ip) if ip.is_loopback() => {
                return Err(fail(
                    crate::labels::PORT,
                    &target.to_string(),
                    format!(
                        "{target}/{protocol} is published on {ip} only, which other hosts cannot reach; publish it on all addresses (-p {}:{target})",
                        p.host_port
                    ),
                ));
            }
            Some(ip) if !ip.is_unspecified() => ip,
            _ => host_ip()?,
        };
        return Ok((ip, Some(p.host_port), None));
    }
    let (name, net) = match (&l.network, &s.network) {
        (Some(n), _) | (None, Some(n)) => match c.networks.get(n) {
            Some(a) => (n.as_str(), a),
            None => {
                let label = if l.network.is_some() {
                    crate::labels::NETWORK
                } else {
                    "[docker] network"
                };
                return Err(fail(
                    label,
                    n,
                    format!("the container is not on it; it is on {}", names(c)),
                ));
            }
        },
        (None, None) => match c.networks.iter().next() {
            Some((n, a)) if c.networks.len() == 1 => (n.as_str(), a),
            Some(_) => {
                return Err(fail(
                    crate::labels::NETWORK,
                    "",
                    format!(
                        "is missing, and the container is on {}; say which one other tasks reach it on",
                        names(c)
                    ),
                ));
            }
            None => {
                return Err(fail(
                    crate::labels::NETWORK,
                    "",
                    "the container has no network".into(),
                ));
            }
        },
    };
    if name == "host" {
        return Ok((host_ip()?, explicit, None));
    }
    match net.v4.or(net.v6) {
        Some(ip) => Ok((ip, explicit, Some(ip))),
        None => Err(fail(
            crate::labels::NETWORK,
            name,
            "the container has no address on it".into(),
        )),
    }
}

fn names(c: &Container) -> String {
    c.networks.keys().cloned().collect::<Vec<_>>().join(", ")
}

/// How a service differs from what a container's labels ask of it, on the settings
/// the labels give, one line each; empty when they agree. The service is never
/// changed to match: other hosts and operators may have set it on purpose.
pub fn differences(spec: &ServiceSpec, wanted: &Wanted) -> Vec<String> {
    let mut out = Vec::new();
    let w = &wanted.spec;
    let show_ports = |ports: &[PortSpec]| {
        ports
            .iter()
            .map(PortSpec::short)
            .collect::<Vec<_>>()
            .join(",")
    };
    if wanted.set.contains("ports") {
        let want = &w.ports[0];
        let has = spec.ports.iter().any(|p| {
            p.published == want.published && p.target == want.target && p.protocol == want.protocol
        });
        if !has {
            out.push(format!(
                "container {} has {}={}, the service has ports {}",
                wanted.container,
                crate::labels::PUBLISH,
                show_ports(&w.ports),
                show_ports(&spec.ports)
            ));
        }
    }
    if wanted.set.contains("health")
        && (spec.health.check, &spec.health.path) != (w.health.check, &w.health.path)
    {
        out.push(format!(
            "container {} has {}={}, the service checks {}",
            wanted.container,
            crate::labels::HEALTH,
            w.health.short(),
            spec.health.short()
        ));
    }
    if wanted.set.contains("mode") && spec.mode != w.mode {
        out.push(format!(
            "container {} has {}={}, the service's mode is {}",
            wanted.container,
            crate::labels::MODE,
            w.mode,
            spec.mode
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container::{NetworkAddress, Published};
    use mesh_core::{Health, HealthKind, Mode};

    fn container(id: &str, name: &str, labels: &[(&str, &str)]) -> Container {
        let ip = [172, 17, 0, id.len() as u8 + 1];
        Container::for_test(&format!("{id:0<64}"), name, labels, ip)
    }

    fn settings() -> Settings {
        Settings {
            address: AddressMode::Container,
            compose: false,
            network: None,
            host_ip: Some("10.0.0.1".parse().unwrap()),
        }
    }

    fn run(cs: Vec<Container>, stopping: &[&str], s: &Settings) -> Observation {
        let map = cs.into_iter().map(|c| (c.id.clone(), c)).collect();
        let stopping = stopping.iter().map(|id| format!("{id:0<64}")).collect();
        observe(&map, &stopping, s)
    }

    #[test]
    fn labelled_containers_become_tasks_of_the_service_they_describe() {
        let mut a = container(
            "a1",
            "web-1",
            &[
                ("mesh.service", "web"),
                ("mesh.publish", "8080:80"),
                ("mesh.health", "http:/ok"),
            ],
        );
        a.health = Some(Health::Healthy);
        let b = container("b22", "web-2", &[("mesh.service", "web")]);
        let mut off = container("c333", "old", &[("mesh.service", "web")]);
        off.running = false;
        let other = container("d4444", "db", &[("maintainer", "x")]);
        let o = run(vec![a, b, off, other], &["b22"], &settings());
        let t: Vec<_> = o
            .tasks
            .iter()
            .map(|t| (t.id.clone().unwrap(), t.ip.to_string(), t.port, t.state))
            .collect();
        assert_eq!(
            t,
            [
                (
                    "a10000000000".to_string(),
                    "172.17.0.3".to_string(),
                    Some(80),
                    TaskState::Active
                ),
                (
                    "b22000000000".to_string(),
                    "172.17.0.4".to_string(),
                    None,
                    TaskState::Draining
                ),
            ]
        );
        let observed = o.tasks[0].observed.clone().unwrap();
        assert_eq!(
            (observed.container.as_str(), observed.health),
            ("web-1", Some(Health::Healthy))
        );
        assert_eq!(
            o.tasks[1].observed.as_ref().unwrap().health,
            None,
            "probed by mesh"
        );
        let w = &o.services["web"];
        assert_eq!(w.container, "web-1");
        assert_eq!(w.spec.ports[0].published, Some(8080));
        assert_eq!(w.spec.health.check, HealthKind::Http);
        assert_eq!(w.set, BTreeSet::from(["ports", "health"]));
        assert_eq!(o.local_only.len(), 2);
        assert!(o.skipped.is_empty() && o.differences.is_empty());
    }

    #[test]
    fn a_bad_container_is_skipped_with_its_name_and_label_and_the_rest_go_on() {
        let bad = container(
            "a1",
            "broken",
            &[("mesh.service", "web"), ("mesh.port", "eighty")],
        );
        let good = container(
            "b22",
            "web-2",
            &[("mesh.service", "web"), ("mesh.port", "80")],
        );
        let mut two = container("c333", "two-nets", &[("mesh.service", "web")]);
        two.networks
            .insert("back".into(), NetworkAddress::default());
        let o = run(vec![bad, good, two], &[], &settings());
        assert_eq!(o.tasks.len(), 1);
        let skipped: Vec<String> = o.skipped.iter().map(|s| s.to_string()).collect();
        assert_eq!(skipped.len(), 2, "{skipped:?}");
        assert!(
            skipped[0].contains("container broken") && skipped[0].contains("mesh.port=\"eighty\""),
            "{skipped:?}"
        );
        assert!(
            skipped[1].contains("two-nets") && skipped[1].contains("mesh.network"),
            "{skipped:?}"
        );
    }

    #[test]
    fn containers_that_disagree_on_the_service_are_reported_not_obeyed() {
        let a = container(
            "a1",
            "web-1",
            &[
                ("mesh.service", "web"),
                ("mesh.publish", "8080:80"),
                ("mesh.mode", "vip"),
            ],
        );
        let b = container(
            "b22",
            "web-2",
            &[
                ("mesh.service", "web"),
                ("mesh.publish", "9090:80"),
                ("mesh.mode", "dnsrr"),
            ],
        );
        let o = run(vec![a, b], &[], &settings());
        assert_eq!(o.services["web"].spec.ports[0].published, Some(8080));
        let d = &o.differences["web"];
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d[0].contains("web-2") && d[0].contains("9090:80/tcp") && d[0].contains("web-1"));
        assert!(d[1].contains("dnsrr"));
        // Against an existing service: only what the labels set is compared.
        let mut existing = ServiceSpec::new("web", vec![PortSpec::tcp(Some(8080), 80)]);
        existing.health.check = HealthKind::None;
        existing.mode = Mode::Dnsrr;
        let d = differences(&existing, &o.services["web"]);
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(d[0].contains("mode"), "{d:?}");
    }

    #[test]
    fn host_port_mode_routes_to_this_hosts_address_and_the_published_port() {
        let mut s = settings();
        s.address = AddressMode::HostPort;
        let mut a = container(
            "a1",
            "web-1",
            &[("mesh.service", "web"), ("mesh.port", "80")],
        );
        a.published = vec![Published {
            target: 80,
            protocol: Protocol::Tcp,
            host_ip: None,
            host_port: 32768,
        }];
        let b = container(
            "b22",
            "web-2",
            &[("mesh.service", "web"), ("mesh.port", "80")],
        );
        let o = run(vec![a, b], &[], &s);
        assert_eq!(o.tasks.len(), 1);
        assert_eq!(
            (o.tasks[0].ip.to_string(), o.tasks[0].port),
            ("10.0.0.1".into(), Some(32768))
        );
        assert!(o.local_only.is_empty());
        assert!(
            o.skipped[0].to_string().contains("-p 80"),
            "{:?}",
            o.skipped
        );
    }

    #[test]
    fn compose_containers_join_their_compose_service_when_asked() {
        let mut s = settings();
        let mut c = container("a1", "proj_api_1", &[("com.docker.compose.service", "api")]);
        c.exposed = vec![(8000, Protocol::Tcp)];
        assert!(run(vec![c.clone()], &[], &s).tasks.is_empty());
        s.compose = true;
        let o = run(vec![c], &[], &s);
        assert_eq!(o.tasks[0].service, "api");
        assert_eq!(o.services["api"].spec.ports[0].target, 8000);
        assert_eq!(
            o.tasks[0].port, None,
            "an exposed port only describes a new service"
        );
    }

    #[test]
    fn review_cases_loopback_udp_compose_publish_host_network_and_the_fullest_description() {
        // A port Docker published on loopback only is not an address for others.
        let mut s = settings();
        s.address = AddressMode::HostPort;
        let mut c = container(
            "a1",
            "lo-only",
            &[("mesh.service", "web"), ("mesh.port", "80")],
        );
        c.published = vec![Published {
            target: 80,
            protocol: Protocol::Tcp,
            host_ip: Some("127.0.0.1".parse().unwrap()),
            host_port: 18080,
        }];
        let o = run(vec![c], &[], &s);
        assert!(o.tasks.is_empty());
        assert!(
            o.skipped[0].to_string().contains("127.0.0.1 only"),
            "{:?}",
            o.skipped
        );
        // A container on the host's network is this host's address and its port.
        let mut h = container(
            "b22",
            "on-host",
            &[("mesh.service", "web"), ("mesh.port", "8080")],
        );
        h.networks = BTreeMap::from([("host".to_string(), NetworkAddress::default())]);
        let o = run(vec![h], &[], &s);
        assert_eq!(
            (o.tasks[0].ip.to_string(), o.tasks[0].port),
            ("10.0.0.1".into(), Some(8080))
        );
        // A UDP port the image exposes makes a UDP service.
        let mut u = container("c333", "dns", &[("mesh.service", "dns")]);
        u.exposed = vec![(53, Protocol::Udp)];
        let o = run(vec![u], &[], &settings());
        assert_eq!(o.services["dns"].spec.ports[0].protocol, Protocol::Udp);
        // A Compose container with mesh.publish and no `expose:` is a task.
        let mut cs = settings();
        cs.compose = true;
        let p = container(
            "d4444",
            "proj_web_1",
            &[
                ("com.docker.compose.service", "web"),
                ("mesh.publish", "8080:80"),
            ],
        );
        let o = run(vec![p], &[], &cs);
        assert_eq!(o.tasks.len(), 1);
        assert_eq!(o.services["web"].spec.ports[0].published, Some(8080));
        // The container that says the most describes a new service, whatever its id.
        let bare = container(
            "a1",
            "a-bare",
            &[("mesh.service", "web"), ("mesh.port", "80")],
        );
        let full = container(
            "b22",
            "z-full",
            &[
                ("mesh.service", "web"),
                ("mesh.publish", "8080:80"),
                ("mesh.health", "tcp"),
            ],
        );
        let o = run(vec![bare, full], &[], &settings());
        assert_eq!(o.services["web"].container, "z-full");
        assert_eq!(o.services["web"].spec.ports[0].published, Some(8080));
    }
}
