//! What this host's data planes should install, derived from a [`Snapshot`] by a pure
//! function: frontends keyed by where they listen, each with its service, policy,
//! routable backends and the plane that serves it; the tasks of each service (so a
//! plane can tell a drained task from an unhealthy one); and the VIP addresses to put
//! on an interface. [`Plan::diff`] lists what changed between two plans, which is what
//! a plane reconciles.
//!
//! Plans are persistent maps like snapshots: [`Plan::update`] derives the next plan
//! from the snapshot diff, and [`Plan::diff`] skips shared subtrees, so both cost
//! O(what changed) however many services there are.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use imbl::OrdMap;
use imbl::ordmap::DiffItem;
use serde::{Deserialize, Serialize};

use crate::balance::Balance;
use crate::protocol::Protocol;
use crate::service::ClientIp;
use crate::service::{Mode, ProxyProtocol};
use crate::snapshot::{ServiceEntry, Snapshot};
use crate::task::TaskState;

/// Where a frontend listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind", content = "ip")]
pub enum Listen {
    /// A published port: every host address (or `proxy.bind`), the routing mesh.
    Published,
    /// A service VIP.
    Vip(IpAddr),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FrontendKey {
    pub listen: Listen,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for FrontendKey {
    /// `8080/tcp` for a published port, `10.254.0.7:80/tcp` for a VIP.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.listen {
            Listen::Published => write!(f, "{}/{}", self.port, self.protocol),
            Listen::Vip(ip) => write!(f, "{}/{}", SocketAddr::new(ip, self.port), self.protocol),
        }
    }
}

/// The data planes mesh has or will have.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum PlaneKind {
    /// The tokio proxy in mesh-proxy: every feature.
    #[default]
    Userspace,
    Nftables,
    Ebpf,
}

impl fmt::Display for PlaneKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PlaneKind::Userspace => "userspace",
            PlaneKind::Nftables => "nftables",
            PlaneKind::Ebpf => "ebpf",
        })
    }
}

/// Which plane an agent asks for (`--dataplane`, `[proxy] dataplane`). `Auto` takes
/// the best plane that works on the host, falling back with a logged reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataplaneChoice {
    #[default]
    Userspace,
    Nftables,
    /// VIPs by the eBPF plane's socket balancing; published ports by nftables where
    /// it works, else userspace.
    Ebpf,
    Auto,
}

impl fmt::Display for DataplaneChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DataplaneChoice::Userspace => "userspace",
            DataplaneChoice::Nftables => "nftables",
            DataplaneChoice::Ebpf => "ebpf",
            DataplaneChoice::Auto => "auto",
        })
    }
}

impl std::str::FromStr for DataplaneChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "userspace" => Ok(DataplaneChoice::Userspace),
            "nftables" => Ok(DataplaneChoice::Nftables),
            "ebpf" => Ok(DataplaneChoice::Ebpf),
            "auto" => Ok(DataplaneChoice::Auto),
            other => Err(format!(
                "unknown data plane {other:?}; expected userspace, nftables, ebpf or auto"
            )),
        }
    }
}

/// Service options only some planes implement. Connect retry is not among them: no
/// service asks for it, the userspace plane always does it, and kernel planes rely on
/// health checks instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Features {
    pub proxy_protocol: bool,
    pub max_connections: bool,
    pub idle_timeout: bool,
    /// `balance = "least-conn"`: a kernel NAT plane picks by counter, not by load.
    pub least_conn: bool,
}

impl Features {
    pub const ALL: Features = Features {
        proxy_protocol: true,
        max_connections: true,
        idle_timeout: true,
        least_conn: true,
    };

    /// What a plane that only balances round robin implements.
    pub const NONE: Features = Features {
        proxy_protocol: false,
        max_connections: false,
        idle_timeout: false,
        least_conn: false,
    };

    /// The options of `self` that `plane` lacks, by their config names.
    pub fn missing_from(&self, plane: &Features) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.proxy_protocol && !plane.proxy_protocol {
            out.push("proxy_protocol");
        }
        if self.max_connections && !plane.max_connections {
            out.push("max_connections");
        }
        if self.idle_timeout && !plane.idle_timeout {
            out.push("idle_timeout");
        }
        if self.least_conn && !plane.least_conn {
            out.push("balance = least-conn");
        }
        out
    }
}

/// How a frontend treats its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Policy {
    pub balance: Balance,
    pub proxy_protocol: ProxyProtocol,
    /// `Keep` on a kernel plane: the backends are this host's tasks only, and the
    /// plane leaves the source address alone.
    pub client_ip: ClientIp,
    pub idle_timeout: Option<Duration>,
    pub max_connections: Option<u32>,
    pub drain_timeout: Duration,
}

impl Policy {
    pub fn needs(&self) -> Features {
        Features {
            proxy_protocol: self.proxy_protocol != ProxyProtocol::Off,
            max_connections: self.max_connections.is_some(),
            idle_timeout: self.idle_timeout.is_some(),
            least_conn: self.balance == Balance::LeastConn,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlanBackend {
    pub task: String,
    pub addr: SocketAddr,
    /// Whether this host runs the task: a kernel plane may take a flow to it directly,
    /// and hand a flow for another host's task to the plane that hops.
    pub local: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Frontend {
    pub service: String,
    pub plane: PlaneKind,
    /// Why this frontend is not on the host's chosen plane, e.g. "proxy_protocol is
    /// served by the userspace plane only".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
    pub policy: Policy,
    /// Routable tasks, in task-id order.
    pub backends: Vec<PlanBackend>,
}

/// Every task of a service, whatever its health, so a plane can tell a drained or
/// removed task (its connections end after `drain_timeout`) from an unhealthy one
/// (its connections go on).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceTasks {
    pub drain_timeout: Duration,
    pub tasks: BTreeMap<String, TaskState>,
}

/// A VIP to put on the host's interface, so connections to it reach a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Address {
    /// How long it stays after its service is gone, for connections still draining.
    pub drain_timeout: Duration,
}

/// What the planner needs to know about this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// This host's node name: its tasks are the ones `client_ip = "keep"` reaches.
    pub node: String,
    /// The plane that serves published ports by default.
    pub plane: PlaneKind,
    /// What that plane implements; frontends needing more go to userspace.
    pub features: Features,
    /// The plane that serves VIPs, and what it implements. The eBPF plane balances
    /// VIPs at connect() while published ports stay with another plane.
    pub vip_plane: PlaneKind,
    pub vip_features: Features,
    /// Whether VIPs are served here (the host can put them on an interface).
    pub serve_vips: bool,
}

impl Host {
    /// A host whose one plane serves published ports and VIPs alike.
    pub fn on(node: &str, plane: PlaneKind, features: Features, serve_vips: bool) -> Host {
        Host {
            node: node.to_string(),
            plane,
            features,
            vip_plane: plane,
            vip_features: features,
            serve_vips,
        }
    }
}

impl Default for Host {
    fn default() -> Self {
        Self {
            node: String::new(),
            plane: PlaneKind::Userspace,
            features: Features::ALL,
            vip_plane: PlaneKind::Userspace,
            vip_features: Features::ALL,
            serve_vips: false,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// The version of the snapshot it was derived from.
    pub version: u64,
    pub frontends: OrdMap<FrontendKey, Arc<Frontend>>,
    pub services: OrdMap<String, Arc<ServiceTasks>>,
    pub addresses: OrdMap<IpAddr, Address>,
    /// Frontends per plane, kept as frontends come and go so status need not count.
    #[serde(skip)]
    served: BTreeMap<PlaneKind, usize>,
}

/// What happened to one item between two plans.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    Added,
    Updated,
    Removed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum PlanChange {
    Frontend(FrontendKey, Change),
    Service(String, Change),
    Address(IpAddr, Change),
}

/// The frontends, tasks and addresses one service contributes to a plan.
struct Contribution {
    frontends: Vec<(FrontendKey, Arc<Frontend>)>,
    tasks: Arc<ServiceTasks>,
    addresses: Vec<(IpAddr, Address)>,
}

/// The plane a frontend goes to, with the policy that plane applies and why it is not
/// the host's choice.
struct Placement {
    plane: PlaneKind,
    policy: Policy,
    fallback: Option<String>,
}

impl Placement {
    fn new(mut policy: Policy, plane: PlaneKind, features: &Features) -> Placement {
        let missing = policy.needs().missing_from(features);
        let (plane, mut fallback) = if missing.is_empty() {
            (plane, None)
        } else {
            (
                PlaneKind::Userspace,
                Some(format!(
                    "{} served by the userspace plane only",
                    missing.join(", ")
                )),
            )
        };
        if policy.client_ip == ClientIp::Keep && plane == PlaneKind::Userspace {
            // A proxy opens its own connection: it cannot hand over the client's
            // address. Serving anyway keeps the service up; status says what the tasks
            // see.
            let why = "client_ip = keep needs a kernel plane; from userspace the tasks see this host's address (PROXY headers can carry the client's)";
            fallback = Some(match fallback {
                Some(f) => format!("{f}; {why}"),
                None => why.to_string(),
            });
            policy.client_ip = ClientIp::Any;
        }
        Placement {
            plane,
            policy,
            fallback,
        }
    }
}

fn contribution(name: &str, entry: &ServiceEntry, host: &Host) -> Contribution {
    let spec = &entry.spec;
    let policy = Policy {
        balance: spec.balance,
        proxy_protocol: spec.proxy_protocol,
        client_ip: spec.client_ip,
        idle_timeout: spec.idle_timeout,
        max_connections: spec.max_connections,
        drain_timeout: spec.drain_timeout,
    };
    let mut frontends = Vec::new();
    let vips: Vec<IpAddr> = if host.serve_vips && spec.mode == Mode::Vip {
        entry.vips.iter().collect()
    } else {
        Vec::new()
    };
    let local: BTreeSet<&str> = entry
        .tasks
        .iter()
        .filter(|t| t.node == host.node)
        .map(|t| t.id.as_str())
        .collect();
    let published = Placement::new(policy, host.plane, &host.features);
    let vip = Placement::new(policy, host.vip_plane, &host.vip_features);
    for port in &spec.ports {
        let mut shared: Option<Arc<Frontend>> = None;
        let listens = port
            .published
            .map(|n| (Listen::Published, n, &published))
            .into_iter()
            .chain(vips.iter().map(|ip| (Listen::Vip(*ip), port.target, &vip)));
        for (listen, n, placement) in listens {
            // Published and VIP frontends share one value when they are placed alike.
            let frontend = match &shared {
                Some(f) if f.plane == placement.plane && f.policy == placement.policy => f.clone(),
                _ => {
                    let on = (placement.policy.client_ip == ClientIp::Keep)
                        .then_some(host.node.as_str());
                    let backends = entry
                        .backends(port, on)
                        .backends
                        .into_iter()
                        .map(|b| PlanBackend {
                            local: local.contains(b.task.as_str()),
                            task: b.task,
                            addr: b.addr,
                        })
                        .collect::<Vec<_>>();
                    let f = Arc::new(Frontend {
                        service: name.to_string(),
                        plane: placement.plane,
                        fallback: placement.fallback.clone(),
                        policy: placement.policy,
                        backends,
                    });
                    shared = Some(f.clone());
                    f
                }
            };
            let key = FrontendKey {
                listen,
                port: n,
                protocol: port.protocol,
            };
            frontends.push((key, frontend));
        }
    }
    Contribution {
        frontends,
        tasks: Arc::new(ServiceTasks {
            drain_timeout: spec.drain_timeout,
            tasks: entry
                .tasks
                .iter()
                .map(|t| (t.id.clone(), t.state))
                .collect(),
        }),
        addresses: vips
            .into_iter()
            .map(|ip| {
                (
                    ip,
                    Address {
                        drain_timeout: spec.drain_timeout,
                    },
                )
            })
            .collect(),
    }
}

impl Plan {
    /// The plan for `snapshot` on `host`.
    pub fn from_snapshot(snapshot: &Snapshot, host: &Host) -> Plan {
        let mut plan = Plan {
            version: snapshot.version,
            ..Plan::default()
        };
        for (name, entry) in &snapshot.services {
            plan.add(name, entry, host);
        }
        plan
    }

    /// The plan for `next`, derived from this plan (made for `prev` on the same host)
    /// by visiting only the services that changed.
    pub fn update(&self, prev: &Snapshot, next: &Snapshot, host: &Host) -> Plan {
        let mut plan = self.clone();
        plan.version = next.version;
        let mut added = Vec::new();
        // Removals first: a port or VIP may move from one service to another.
        for item in prev.services.diff(&next.services) {
            match item {
                DiffItem::Add(name, entry) => added.push((name, entry)),
                DiffItem::Update {
                    old: (name, old),
                    new: (_, new),
                } => {
                    plan.remove(name, old, host);
                    added.push((name, new));
                }
                DiffItem::Remove(name, old) => plan.remove(name, old, host),
            }
        }
        for (name, entry) in added {
            plan.add(name, entry, host);
        }
        plan
    }

    fn add(&mut self, name: &str, entry: &ServiceEntry, host: &Host) {
        let c = contribution(name, entry, host);
        for (key, frontend) in c.frontends {
            *self.served.entry(frontend.plane).or_default() += 1;
            if let Some(old) = self.frontends.insert(key, frontend) {
                self.unserve(old.plane);
            }
        }
        self.services.insert(name.to_string(), c.tasks);
        for (ip, address) in c.addresses {
            self.addresses.insert(ip, address);
        }
    }

    fn remove(&mut self, name: &str, entry: &ServiceEntry, host: &Host) {
        let c = contribution(name, entry, host);
        for (key, _) in c.frontends {
            if self.frontends.get(&key).is_some_and(|f| f.service == name)
                && let Some(old) = self.frontends.remove(&key)
            {
                self.unserve(old.plane);
            }
        }
        self.services.remove(name);
        for (ip, _) in c.addresses {
            self.addresses.remove(&ip);
        }
    }

    fn unserve(&mut self, plane: PlaneKind) {
        if let Some(n) = self.served.get_mut(&plane) {
            *n = n.saturating_sub(1);
        }
    }

    /// How many frontends `plane` serves. O(1).
    pub fn served_by(&self, plane: PlaneKind) -> usize {
        self.served.get(&plane).copied().unwrap_or(0)
    }

    /// What changed from `old` to `new`.
    pub fn diff(old: &Plan, new: &Plan) -> Vec<PlanChange> {
        fn changes<'a, K: Ord + Clone + 'a, V: PartialEq + Clone + 'a>(
            old: &'a OrdMap<K, V>,
            new: &'a OrdMap<K, V>,
            wrap: impl Fn(K, Change) -> PlanChange,
            out: &mut Vec<PlanChange>,
        ) {
            for item in old.diff(new) {
                out.push(match item {
                    DiffItem::Add(k, _) => wrap(k.clone(), Change::Added),
                    DiffItem::Update { new: (k, _), .. } => wrap(k.clone(), Change::Updated),
                    DiffItem::Remove(k, _) => wrap(k.clone(), Change::Removed),
                });
            }
        }
        let mut out = Vec::new();
        changes(&old.services, &new.services, PlanChange::Service, &mut out);
        changes(
            &old.frontends,
            &new.frontends,
            PlanChange::Frontend,
            &mut out,
        );
        changes(
            &old.addresses,
            &new.addresses,
            PlanChange::Address,
            &mut out,
        );
        out
    }

    /// The frontends one plane serves.
    pub fn frontends_of(
        &self,
        plane: PlaneKind,
    ) -> impl Iterator<Item = (&FrontendKey, &Arc<Frontend>)> {
        self.frontends.iter().filter(move |(_, f)| f.plane == plane)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::Health;
    use crate::replica::{Replica, ReplicaConfig};
    use crate::service::{PortSpec, ServiceSpec};
    use crate::task::{TaskSource, TaskSpec};
    use crate::vip::VipPool;

    fn replica() -> Replica {
        Replica::new("h1", 1, VipPool::default(), ReplicaConfig::default())
    }

    fn task(r: &mut Replica, service: &str, id: &str, ip: &str) {
        let spec = TaskSpec::new(service, id, ip.parse().unwrap());
        r.add_task(spec, TaskSource::Api, 0).unwrap();
        r.set_health(service, id, Health::Healthy, 0);
    }

    fn host(serve_vips: bool) -> Host {
        Host {
            serve_vips,
            ..Host::default()
        }
    }

    #[test]
    fn frontends_for_published_ports_and_vips() {
        let mut r = replica();
        r.create_service(
            ServiceSpec::new(
                "web",
                vec![PortSpec::tcp(Some(8080), 80), PortSpec::tcp(None, 443)],
            ),
            0,
        )
        .unwrap();
        task(&mut r, "web", "web.1", "10.0.0.1");
        let snap = r.snapshot();
        let vip = snap.services["web"].vips.v4.unwrap();

        let plan = Plan::from_snapshot(&snap, &host(false));
        assert_eq!(plan.frontends.len(), 1, "only the published port");
        assert!(plan.addresses.is_empty());

        let plan = Plan::from_snapshot(&snap, &host(true));
        // 8080 published, and VIP:80 and VIP:443 on each of the v4 and v6 VIPs.
        assert_eq!(plan.frontends.len(), 5);
        assert_eq!(plan.addresses.len(), 2);
        let f = &plan.frontends[&FrontendKey {
            listen: Listen::Vip(IpAddr::V4(vip)),
            port: 443,
            protocol: Protocol::Tcp,
        }];
        assert_eq!(f.backends[0].addr, "10.0.0.1:443".parse().unwrap());
        let published = &plan.frontends[&FrontendKey {
            listen: Listen::Published,
            port: 8080,
            protocol: Protocol::Tcp,
        }];
        assert_eq!(published.backends[0].addr, "10.0.0.1:80".parse().unwrap());
        assert_eq!(published.plane, PlaneKind::Userspace);
    }

    #[test]
    fn unroutable_tasks_are_no_backends_but_stay_in_the_service() {
        let mut r = replica();
        r.create_service(
            ServiceSpec::new("web", vec![PortSpec::tcp(Some(8080), 80)]),
            0,
        )
        .unwrap();
        task(&mut r, "web", "web.1", "10.0.0.1");
        task(&mut r, "web", "web.2", "10.0.0.2");
        r.set_health("web", "web.1", Health::Unhealthy, 1);
        r.set_task_state("web", "web.2", TaskState::Draining, 1)
            .unwrap();
        let plan = Plan::from_snapshot(&r.snapshot(), &host(false));
        let (_, f) = plan.frontends.iter().next().unwrap();
        assert!(f.backends.is_empty());
        let tasks = &plan.services["web"].tasks;
        assert_eq!(tasks["web.1"], TaskState::Active);
        assert_eq!(tasks["web.2"], TaskState::Draining);
    }

    #[test]
    fn client_ip_keep_reaches_only_this_hosts_tasks_on_a_kernel_plane() {
        // h1 and h2 both run a task of `keep` and of `any`; h1 learns h2's by delta.
        let mut h1 = replica();
        let mut h2 = Replica::new("h2", 1, VipPool::default(), ReplicaConfig::default());
        h1.member_up("h2");
        let mut keep = ServiceSpec::new("keep", vec![PortSpec::tcp(Some(81), 80)]);
        keep.client_ip = ClientIp::Keep;
        let any = ServiceSpec::new("any", vec![PortSpec::tcp(Some(82), 80)]);
        for spec in [keep, any] {
            for d in h1.create_service(spec, 0).unwrap() {
                h2.apply_delta(d, 0);
            }
        }
        for (service, n) in [("keep", 1), ("any", 1)] {
            task(&mut h1, service, &format!("{service}.{n}"), "10.0.0.1");
            let (_, deltas) = h2
                .add_task(
                    TaskSpec::new(
                        service,
                        &format!("{service}.2"),
                        "10.0.0.2".parse().unwrap(),
                    ),
                    TaskSource::Api,
                    0,
                )
                .unwrap();
            let health = h2.set_health(service, &format!("{service}.2"), Health::Healthy, 0);
            for d in deltas.into_iter().chain(health) {
                h1.apply_delta(d, 0);
            }
        }
        let backends = |plan: &Plan, port: u16| -> Vec<String> {
            let key = FrontendKey {
                listen: Listen::Published,
                port,
                protocol: Protocol::Tcp,
            };
            plan.frontends[&key]
                .backends
                .iter()
                .map(|b| b.task.clone())
                .collect()
        };
        let nft = Host::on("h1", PlaneKind::Nftables, Features::NONE, false);
        let plan = Plan::from_snapshot(&h1.snapshot(), &nft);
        assert_eq!(
            backends(&plan, 81),
            ["keep.1"],
            "keep: this host's task only"
        );
        assert_eq!(backends(&plan, 82), ["any.1", "any.2"]);
        // Each backend says whether this host runs it, for a kernel fast path.
        let any = FrontendKey {
            listen: Listen::Published,
            port: 82,
            protocol: Protocol::Tcp,
        };
        let local: Vec<bool> = plan.frontends[&any]
            .backends
            .iter()
            .map(|b| b.local)
            .collect();
        assert_eq!(local, [true, false], "any.1 runs on h1, any.2 on h2");
        let keep = &plan
            .frontends
            .values()
            .find(|f| f.service == "keep")
            .unwrap();
        assert_eq!(keep.policy.client_ip, ClientIp::Keep);
        assert_eq!(keep.plane, PlaneKind::Nftables);
        assert_eq!(keep.fallback, None);

        // The userspace plane cannot keep the address: it serves every task, and says so.
        let plan = Plan::from_snapshot(&h1.snapshot(), &host(false));
        assert_eq!(backends(&plan, 81), ["keep.1", "keep.2"]);
        let keep = &plan
            .frontends
            .values()
            .find(|f| f.service == "keep")
            .unwrap();
        assert_eq!(keep.policy.client_ip, ClientIp::Any);
        assert!(
            keep.fallback
                .as_deref()
                .is_some_and(|f| f.contains("client_ip = keep needs a kernel plane")),
            "{:?}",
            keep.fallback
        );
    }

    #[test]
    fn a_kernel_plane_sends_services_it_cannot_serve_to_userspace() {
        let mut r = replica();
        let mut pp = ServiceSpec::new("pp", vec![PortSpec::tcp(Some(81), 80)]);
        pp.proxy_protocol = ProxyProtocol::V2;
        pp.max_connections = Some(10);
        r.create_service(pp, 0).unwrap();
        r.create_service(
            ServiceSpec::new("plain", vec![PortSpec::tcp(Some(82), 80)]),
            0,
        )
        .unwrap();
        let mut lc = ServiceSpec::new("lc", vec![PortSpec::tcp(Some(83), 80)]);
        lc.balance = Balance::LeastConn;
        r.create_service(lc, 0).unwrap();
        let host = Host::on("h1", PlaneKind::Nftables, Features::NONE, false);
        let plan = Plan::from_snapshot(&r.snapshot(), &host);
        let by_service: BTreeMap<&str, &Frontend> = plan
            .frontends
            .values()
            .map(|f| (f.service.as_str(), f.as_ref()))
            .collect();
        assert_eq!(by_service["plain"].plane, PlaneKind::Nftables);
        assert_eq!(by_service["plain"].fallback, None);
        assert_eq!(by_service["pp"].plane, PlaneKind::Userspace);
        assert_eq!(
            by_service["pp"].fallback.as_deref(),
            Some("proxy_protocol, max_connections served by the userspace plane only")
        );
        assert_eq!(by_service["lc"].plane, PlaneKind::Userspace);
        assert_eq!(
            by_service["lc"].fallback.as_deref(),
            Some("balance = least-conn served by the userspace plane only")
        );
        assert_eq!(plan.frontends_of(PlaneKind::Nftables).count(), 1);
        assert_eq!(plan.served_by(PlaneKind::Nftables), 1);
        assert_eq!(plan.served_by(PlaneKind::Userspace), 2);
    }

    #[test]
    fn diff_lists_exactly_what_changed_and_nothing_for_the_same_plan() {
        let mut r = replica();
        r.create_service(
            ServiceSpec::new("web", vec![PortSpec::tcp(Some(8080), 80)]),
            0,
        )
        .unwrap();
        r.create_service(ServiceSpec::new("db", vec![PortSpec::tcp(None, 5432)]), 0)
            .unwrap();
        let h = host(true);
        let s1 = r.snapshot();
        let p1 = Plan::from_snapshot(&s1, &h);
        assert!(Plan::diff(&p1, &p1).is_empty());
        assert!(Plan::diff(&p1, &Plan::from_snapshot(&s1, &h)).is_empty());

        task(&mut r, "web", "web.1", "10.0.0.1");
        let s2 = r.snapshot();
        let p2 = p1.update(&s1, &s2, &h);
        assert_eq!(p2, Plan::from_snapshot(&s2, &h));
        let changes = Plan::diff(&p1, &p2);
        assert!(changes.contains(&PlanChange::Service("web".into(), Change::Updated)));
        assert!(
            changes
                .iter()
                .all(|c| !matches!(c, PlanChange::Service(s, _) if s == "db")),
            "db did not change: {changes:?}"
        );
        assert!(
            changes
                .iter()
                .all(|c| matches!(c, PlanChange::Service(..) | PlanChange::Frontend(..))),
            "{changes:?}"
        );

        r.remove_service("web", 5).unwrap();
        let s3 = r.snapshot();
        let p3 = p2.update(&s2, &s3, &h);
        assert_eq!(p3, Plan::from_snapshot(&s3, &h));
        let changes = Plan::diff(&p2, &p3);
        assert!(changes.contains(&PlanChange::Service("web".into(), Change::Removed)));
        assert!(changes.contains(&PlanChange::Frontend(
            FrontendKey {
                listen: Listen::Published,
                port: 8080,
                protocol: Protocol::Tcp
            },
            Change::Removed
        )));
        assert_eq!(
            changes
                .iter()
                .filter(|c| matches!(c, PlanChange::Address(_, Change::Removed)))
                .count(),
            2,
            "both VIPs of web go: {changes:?}"
        );
    }

    #[test]
    fn a_port_that_changes_hands_in_one_step_stays_planned() {
        let mut r = replica();
        r.create_service(
            ServiceSpec::new("a", vec![PortSpec::tcp(Some(9000), 80)]),
            0,
        )
        .unwrap();
        let h = host(false);
        let s1 = r.snapshot();
        let p1 = Plan::from_snapshot(&s1, &h);
        r.remove_service("a", 1).unwrap();
        r.create_service(
            ServiceSpec::new("b", vec![PortSpec::tcp(Some(9000), 80)]),
            2,
        )
        .unwrap();
        let s2 = r.snapshot();
        let p2 = p1.update(&s1, &s2, &h);
        assert_eq!(p2, Plan::from_snapshot(&s2, &h));
        assert_eq!(p2.frontends.values().next().unwrap().service, "b");
        assert_eq!(
            Plan::diff(&p1, &p2),
            vec![
                PlanChange::Service("a".into(), Change::Removed),
                PlanChange::Service("b".into(), Change::Added),
                PlanChange::Frontend(
                    FrontendKey {
                        listen: Listen::Published,
                        port: 9000,
                        protocol: Protocol::Tcp
                    },
                    Change::Updated
                ),
            ]
        );
    }

    #[test]
    fn vips_and_published_ports_go_to_their_own_planes() {
        let mut r = replica();
        let mut web = ServiceSpec::new("web", vec![PortSpec::tcp(Some(8080), 80)]);
        web.client_ip = ClientIp::Keep;
        r.create_service(web, 0).unwrap();
        let mut pp = ServiceSpec::new("pp", vec![PortSpec::tcp(Some(8081), 80)]);
        pp.proxy_protocol = ProxyProtocol::V2;
        r.create_service(pp, 0).unwrap();
        task(&mut r, "web", "web.1", "10.0.0.1");
        let host = Host {
            node: "h1".into(),
            plane: PlaneKind::Nftables,
            features: Features::NONE,
            vip_plane: PlaneKind::Ebpf,
            vip_features: Features::NONE,
            serve_vips: true,
        };
        let plan = Plan::from_snapshot(&r.snapshot(), &host);
        let placed: Vec<(Listen, &str, PlaneKind, usize)> = plan
            .frontends
            .iter()
            .map(|(k, f)| (k.listen, f.service.as_str(), f.plane, f.backends.len()))
            .collect();
        let kinds: Vec<(bool, &str, PlaneKind, usize)> = placed
            .iter()
            .map(|(l, s, p, n)| (matches!(l, Listen::Vip(_)), *s, *p, *n))
            .collect();
        // client_ip = keep stays on both kernel planes.
        assert!(
            kinds.contains(&(false, "web", PlaneKind::Nftables, 1)),
            "{kinds:?}"
        );
        assert!(
            kinds.contains(&(true, "web", PlaneKind::Ebpf, 1)),
            "{kinds:?}"
        );
        // PROXY headers need userspace whatever the listener.
        assert!(
            kinds.contains(&(false, "pp", PlaneKind::Userspace, 0)),
            "{kinds:?}"
        );
        assert!(
            kinds.contains(&(true, "pp", PlaneKind::Userspace, 0)),
            "{kinds:?}"
        );
        // One per VIP of web (IPv4 and IPv6).
        let web_vips = kinds.iter().filter(|k| k.0 && k.1 == "web").count();
        assert_eq!(plan.served_by(PlaneKind::Ebpf), web_vips);
    }
}
