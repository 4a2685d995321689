//! The table this plane wants, as a pure function of the plan: what the kernel will
//! hold is exactly [`Ruleset::render`]'s text, so the same plan always gives the same
//! bytes and an unchanged plan costs no transaction.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use mesh_core::plan::PlaneKind;
use mesh_core::{FrontendKey, Listen, Plan, Protocol};

use crate::names::{backend_chain, frontend_chain};

/// The table's name, in family `inet` (IPv4 and IPv6 in one table).
pub const TABLE: &str = "mesh";

/// The packet-mark bit that asks for masquerade on the way out. kube-proxy uses
/// 0x4000; ours is another bit so both can run on one host.
pub const MASQUERADE_MARK: u32 = 0x0010_0000;

/// One frontend: where it listens and the tasks it picks from, by family (a packet
/// can only be DNATed to an address of its own family).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Dispatch {
    chain: String,
    service: String,
    protocol: Protocol,
    v4: Vec<SocketAddr>,
    v6: Vec<SocketAddr>,
    /// The task at each address.
    tasks: BTreeMap<SocketAddr, String>,
    drain_timeout: std::time::Duration,
}

/// Where a DNAT chain sends: a task's address and protocol.
pub type BackendKey = (SocketAddr, Protocol);

/// Whose task a backend is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendOwner {
    pub service: String,
    pub task: String,
    /// The service's, when the task was installed: a deleted service's connections
    /// drain for it too.
    pub drain_timeout: std::time::Duration,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ruleset {
    frontends: BTreeMap<FrontendKey, Dispatch>,
}

impl Ruleset {
    /// The frontends the plan gives this plane. A frontend without a routable task
    /// gets no rule: its packets reach the host's own (closed) port and are refused
    /// at once, as the userspace plane refuses them.
    pub fn from_plan(plan: &Plan) -> Ruleset {
        let mut frontends = BTreeMap::new();
        for (key, f) in plan.frontends_of(PlaneKind::Nftables) {
            let family = |v4: bool| -> Vec<SocketAddr> {
                f.backends
                    .iter()
                    .map(|b| b.addr)
                    .filter(|a| a.is_ipv4() == v4)
                    .collect()
            };
            let (mut v4, mut v6) = (family(true), family(false));
            // A VIP is of one family; only tasks of that family can take its packets.
            match key.listen {
                Listen::Vip(IpAddr::V4(_)) => v6.clear(),
                Listen::Vip(IpAddr::V6(_)) => v4.clear(),
                Listen::Published => {}
            }
            if v4.is_empty() && v6.is_empty() {
                continue;
            }
            frontends.insert(
                *key,
                Dispatch {
                    chain: frontend_chain(&f.service, key),
                    service: f.service.clone(),
                    protocol: key.protocol,
                    v4,
                    v6,
                    tasks: f
                        .backends
                        .iter()
                        .map(|b| (b.addr, b.task.clone()))
                        .collect(),
                    drain_timeout: f.policy.drain_timeout,
                },
            );
        }
        Ruleset { frontends }
    }

    pub fn frontends(&self) -> usize {
        self.frontends.len()
    }

    /// Every address the table DNATs to, and whose task it is.
    pub fn backends(&self) -> BTreeMap<BackendKey, BackendOwner> {
        let mut out = BTreeMap::new();
        for d in self.frontends.values() {
            for addr in d.v4.iter().chain(&d.v6) {
                let task = d.tasks.get(addr).cloned().unwrap_or_default();
                out.insert(
                    (*addr, d.protocol),
                    BackendOwner {
                        service: d.service.clone(),
                        task,
                        drain_timeout: d.drain_timeout,
                    },
                );
            }
        }
        out
    }

    /// One `nft -f` transaction that replaces the table atomically: packets see
    /// either the old table or the new one. Established connections keep their NAT
    /// in conntrack, so replacing the table never breaks them.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Creating an empty table first makes the delete valid on a host without one.
        let _ = writeln!(out, "table inet {TABLE} {{}}");
        let _ = writeln!(out, "delete table inet {TABLE}");
        let _ = writeln!(out, "table inet {TABLE} {{");
        self.maps(&mut out);
        self.base_chains(&mut out);
        let mut backends: BTreeMap<String, (SocketAddr, Protocol)> = BTreeMap::new();
        for d in self.frontends.values() {
            let _ = writeln!(out, "\tchain {} {{", d.chain);
            for (family, addrs) in [("ipv4", &d.v4), ("ipv6", &d.v6)] {
                if addrs.is_empty() {
                    continue;
                }
                let arms: Vec<String> = addrs
                    .iter()
                    .enumerate()
                    .map(|(i, a)| {
                        let chain = backend_chain(a, d.protocol);
                        backends.insert(chain.clone(), (*a, d.protocol));
                        format!("{i} : goto {chain}")
                    })
                    .collect();
                let _ = writeln!(
                    out,
                    "\t\tmeta nfproto {family} numgen inc mod {} vmap {{ {} }}",
                    addrs.len(),
                    arms.join(", ")
                );
            }
            let _ = writeln!(out, "\t}}");
        }
        for (chain, (addr, protocol)) in &backends {
            let _ = writeln!(out, "\tchain {chain} {{");
            let _ = writeln!(out, "\t\tmeta mark set meta mark | {MASQUERADE_MARK:#010x}");
            let (family, target) = match addr {
                SocketAddr::V4(a) => ("ip", a.to_string()),
                SocketAddr::V6(a) => ("ip6", format!("[{}]:{}", a.ip(), a.port())),
            };
            let _ = writeln!(out, "\t\tmeta l4proto {protocol} dnat {family} to {target}");
            let _ = writeln!(out, "\t}}");
        }
        let _ = writeln!(out, "}}");
        out
    }

    fn maps(&self, out: &mut String) {
        let mut published = Vec::new();
        let mut vip4 = Vec::new();
        let mut vip6 = Vec::new();
        for (key, d) in &self.frontends {
            let element = format!("{} . {} : goto {}", key.protocol, key.port, d.chain);
            match key.listen {
                Listen::Published => published.push(element),
                Listen::Vip(ip @ IpAddr::V4(_)) => vip4.push(format!("{ip} . {element}")),
                Listen::Vip(ip @ IpAddr::V6(_)) => vip6.push(format!("{ip} . {element}")),
            }
        }
        for (name, key_type, elements) in [
            ("published", "inet_proto . inet_service", published),
            ("vip4", "ipv4_addr . inet_proto . inet_service", vip4),
            ("vip6", "ipv6_addr . inet_proto . inet_service", vip6),
        ] {
            let _ = writeln!(out, "\tmap {name} {{");
            let _ = writeln!(out, "\t\ttype {key_type} : verdict");
            if !elements.is_empty() {
                let _ = writeln!(out, "\t\telements = {{ {} }}", elements.join(", "));
            }
            let _ = writeln!(out, "\t}}");
        }
    }

    fn base_chains(&self, out: &mut String) {
        // Published ports answer on the host's own addresses, not on loopback: DNAT
        // from 127.0.0.1 to another host would need route_localnet, which opens
        // loopback to the network. The userspace plane serves 127.0.0.1.
        out.push_str(
            "\tchain dispatch {\n\
             \t\tip daddr . meta l4proto . th dport vmap @vip4\n\
             \t\tip6 daddr . meta l4proto . th dport vmap @vip6\n\
             \t\tfib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @published\n\
             \t\tfib daddr type local ip6 daddr != ::1 meta l4proto . th dport vmap @published\n\
             \t}\n\
             \tchain prerouting {\n\
             \t\ttype nat hook prerouting priority dstnat; policy accept;\n\
             \t\tjump dispatch\n\
             \t}\n\
             \tchain output {\n\
             \t\ttype nat hook output priority -100; policy accept;\n\
             \t\tjump dispatch\n\
             \t}\n\
             \tchain postrouting {\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n",
        );
        let _ = writeln!(
            out,
            "\t\tmeta mark & {MASQUERADE_MARK:#010x} == {MASQUERADE_MARK:#010x} masquerade"
        );
        out.push_str("\t}\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::plan::{Features, Host};
    use mesh_core::replica::{Replica, ReplicaConfig};
    use mesh_core::service::{PortSpec, ServiceSpec};
    use mesh_core::task::{TaskSource, TaskSpec};
    use mesh_core::vip::VipPool;
    use mesh_core::{Balance, Health};

    fn host() -> Host {
        Host {
            plane: PlaneKind::Nftables,
            features: Features::NONE,
            serve_vips: true,
        }
    }

    fn replica() -> Replica {
        let mut r = Replica::new("h1", 1, VipPool::default(), ReplicaConfig::default());
        r.create_service(
            ServiceSpec::new(
                "web",
                vec![PortSpec::tcp(Some(8080), 80), PortSpec::udp(Some(5353), 53)],
            ),
            0,
        )
        .unwrap();
        for (id, ip) in [
            ("web.1", "10.0.0.1"),
            ("web.2", "10.0.0.2"),
            ("web.3", "fd00::3"),
        ] {
            r.add_task(
                TaskSpec::new("web", id, ip.parse().unwrap()),
                TaskSource::Api,
                0,
            )
            .unwrap();
            r.set_health("web", id, Health::Healthy, 0);
        }
        r
    }

    #[test]
    fn each_frontend_picks_its_family_by_counter_and_dnats() {
        let r = replica();
        let snap = r.snapshot();
        let text = Ruleset::from_plan(&Plan::from_snapshot(&snap, &host())).render();
        let vips = &snap.services["web"].vips;
        let (v4, v6) = (vips.v4.unwrap(), vips.v6.unwrap());
        // Published: both families, each counted apart.
        assert!(
            text.contains("tcp . 8080 : goto svc_web_tcp_8080"),
            "{text}"
        );
        assert!(
            text.contains("udp . 5353 : goto svc_web_udp_5353"),
            "{text}"
        );
        assert!(
            text.contains("meta nfproto ipv4 numgen inc mod 2 vmap { 0 : goto to_10_0_0_1_80_tcp_"),
            "{text}"
        );
        assert!(
            text.contains("meta nfproto ipv6 numgen inc mod 1 vmap { 0 : goto to_fd00__3_80_tcp_"),
            "{text}"
        );
        assert!(
            text.contains("meta l4proto tcp dnat ip to 10.0.0.1:80"),
            "{text}"
        );
        assert!(
            text.contains("meta l4proto udp dnat ip to 10.0.0.2:53"),
            "{text}"
        );
        assert!(
            text.contains("meta l4proto tcp dnat ip6 to [fd00::3]:80"),
            "{text}"
        );
        // A VIP of one family goes only to tasks of that family.
        assert!(
            text.contains(&format!("{v4} . tcp . 80 : goto svc_web_vip_tcp_80_")),
            "{text}"
        );
        assert!(
            text.contains(&format!("{v6} . tcp . 80 : goto svc_web_vip_tcp_80_")),
            "{text}"
        );
        let mut vip_chains = 0;
        let mut lines = text.lines();
        while let Some(line) = lines.next() {
            if !line.trim_start().starts_with("chain svc_web_vip_") {
                continue;
            }
            vip_chains += 1;
            let body: Vec<&str> = lines.by_ref().take_while(|l| l.trim() != "}").collect();
            assert_eq!(body.len(), 1, "one family per VIP chain: {body:?}");
        }
        assert_eq!(vip_chains, 4, "two VIPs by two ports: {text}");
    }

    #[test]
    fn the_same_plan_renders_the_same_bytes_and_a_change_shows() {
        let mut r = replica();
        let plan = Plan::from_snapshot(&r.snapshot(), &host());
        let a = Ruleset::from_plan(&plan).render();
        assert_eq!(a, Ruleset::from_plan(&plan).render());
        r.set_health("web", "web.2", Health::Unhealthy, 1);
        let b = Ruleset::from_plan(&Plan::from_snapshot(&r.snapshot(), &host())).render();
        assert_ne!(a, b);
        assert!(
            !b.contains("10.0.0.2"),
            "an unhealthy task leaves the table: {b}"
        );
    }

    #[test]
    fn no_routable_task_no_rule_and_userspace_features_stay_out() {
        let mut r = replica();
        for id in ["web.1", "web.2", "web.3"] {
            r.set_health("web", id, Health::Unhealthy, 1);
        }
        let mut lc = ServiceSpec::new("lc", vec![PortSpec::tcp(Some(9090), 80)]);
        lc.balance = Balance::LeastConn;
        r.create_service(lc, 1).unwrap();
        r.add_task(
            TaskSpec::new("lc", "lc.1", "10.0.0.9".parse().unwrap()),
            TaskSource::Api,
            1,
        )
        .unwrap();
        r.set_health("lc", "lc.1", Health::Healthy, 1);
        let rules = Ruleset::from_plan(&Plan::from_snapshot(&r.snapshot(), &host()));
        assert_eq!(rules.frontends(), 0);
        let text = rules.render();
        assert!(!text.contains("svc_"), "{text}");
        assert!(!text.contains("elements"), "{text}");
    }
}
