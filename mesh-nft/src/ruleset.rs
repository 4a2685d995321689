//! The table this plane wants, derived from the plan without IO. [`Ruleset::render`]
//! gives the whole table as one transaction (the first apply, or a repair);
//! [`Ruleset::update`] moves the ruleset to a new plan one changed frontend at a time
//! and returns just the commands for what changed, so an apply costs what changed, as
//! in kube-proxy's nftables mode.
//!
//! Where the tasks live decides what a large table costs to load. The kernel finds a
//! set by walking the table's list of sets, once for each set created, each rule that
//! looks one up and each batch of elements; and every element added to a map is
//! checked against every rule bound to it. So one set per frontend costs the square of
//! the frontends (10,000 anonymous maps took 134 s; as many named ones, 6.9 s), and
//! one map for all of them costs elements × rules (17 s). Frontends therefore share a
//! task map in groups of [`GROUP`]: each frontend owns a slot in its group's map, and
//! its counter counts from the slot's base (`numgen inc mod N offset BASE`), so its
//! round robin stays its own.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use mesh_core::plan::PlaneKind;
use mesh_core::{ClientIp, FrontendKey, Listen, Plan, Protocol};

use crate::edit::{DnatRule, Edit, Family, TaskMap, dispatch_key, dispatch_map, task_element};
use crate::names::frontend_chain;

/// The table's name, in family `inet` (IPv4 and IPv6 in one table).
pub const TABLE: &str = "mesh";

/// Frontends per task map: few enough that an element is checked against few rules,
/// many enough that the table holds few sets.
pub const GROUP: u32 = 16;

/// Each frontend's share of its group's key space: the counter of slot `s` runs from
/// `(s % GROUP) << SLOT_BITS`, so a frontend can hold up to 2^20 tasks per family.
const SLOT_BITS: u32 = 20;

/// The packet-mark bit that asks for masquerade on the way out. kube-proxy uses
/// 0x4000; ours is another bit so both can run on one host.
pub const MASQUERADE_MARK: u32 = 0x0010_0000;

pub use crate::forward_accept::FORWARD_MARK;

/// One frontend: where it listens and the tasks it picks from, by family (a packet
/// can only be DNATed to an address of its own family).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Dispatch {
    chain: String,
    /// Where its tasks sit in the task maps; kept while the frontend lives.
    slot: u32,
    service: String,
    protocol: Protocol,
    v4: Vec<SocketAddr>,
    v6: Vec<SocketAddr>,
    /// The task at each address.
    tasks: BTreeMap<SocketAddr, String>,
    drain_timeout: std::time::Duration,
    client_ip: ClientIp,
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
    /// Slots freed by frontends that went, lowest first, so groups stay dense.
    free: std::collections::BTreeSet<u32>,
    /// One past the highest slot ever given.
    next_slot: u32,
    /// The task maps the table has. A map stays when its last element goes: the
    /// next frontend of its group fills it again.
    maps: std::collections::BTreeSet<TaskMap>,
    /// Each DNAT chain, with how many frontend chains jump to it.
    refs: BTreeMap<BackendKey, (usize, BackendOwner)>,
}

/// What one [`Ruleset::update`] changed.
#[derive(Debug, Default)]
pub struct Update {
    /// The edits, one transaction; empty when nothing changed.
    pub edits: Vec<Edit>,
    /// The edits make a task map: only `nft` writes a map's declaration (see
    /// [`crate::netlink`]).
    pub new_maps: bool,
    /// Backends no frontend sends to any more, with whose task they were.
    pub gone: Vec<(BackendKey, BackendOwner)>,
    /// Backends that came back (or came new): flows to them must not be forgotten.
    pub added: Vec<BackendKey>,
}

impl Dispatch {
    /// The frontend chain's one rule per family with tasks. The tasks sit in the
    /// group's map, not in a chain each: a table of 10,000 services has no 100,000
    /// task chains to load.
    fn rules(&self) -> Vec<DnatRule> {
        Family::BOTH
            .into_iter()
            .filter(|f| !self.addrs(*f).is_empty())
            .map(|family| DnatRule {
                map: self.map(family),
                modulus: self.addrs(family).len() as u32,
                offset: self.base(),
                // `client_ip = keep` goes to this host's tasks only, so no hop needs
                // the source rewritten: the task sees the client.
                masquerade: self.client_ip == ClientIp::Any,
            })
            .collect()
    }

    fn map(&self, family: Family) -> TaskMap {
        TaskMap {
            family,
            protocol: self.protocol,
            group: self.slot / GROUP,
        }
    }

    fn addrs(&self, family: Family) -> &[SocketAddr] {
        match family {
            Family::V4 => &self.v4,
            Family::V6 => &self.v6,
        }
    }

    /// The first key of this frontend's slot in its group's map.
    fn base(&self) -> u32 {
        (self.slot % GROUP) << SLOT_BITS
    }

    /// The map elements of one family: the counter's value, then the task.
    fn elements(&self, family: Family) -> Vec<(u32, SocketAddr)> {
        self.addrs(family)
            .iter()
            .enumerate()
            .map(|(i, a)| (self.base() + i as u32, *a))
            .collect()
    }

    fn owner(&self, addr: &SocketAddr) -> BackendOwner {
        BackendOwner {
            service: self.service.clone(),
            task: self.tasks.get(addr).cloned().unwrap_or_default(),
            drain_timeout: self.drain_timeout,
        }
    }
}

impl Ruleset {
    /// The frontends the plan gives this plane. A frontend without a routable task
    /// gets no rule: its packets reach the host's own (closed) port and are refused
    /// at once, as the userspace plane refuses them.
    pub fn from_plan(plan: &Plan) -> Ruleset {
        let mut r = Ruleset::default();
        for (key, _) in plan.frontends_of(PlaneKind::Nftables) {
            if let Some(mut d) = dispatch_for(plan, key) {
                d.slot = r.take_slot();
                r.reference(&d, true);
                for family in Family::BOTH {
                    if !d.addrs(family).is_empty() {
                        r.maps.insert(d.map(family));
                    }
                }
                r.frontends.insert(*key, d);
            }
        }
        r
    }

    fn take_slot(&mut self) -> u32 {
        if let Some(slot) = self.free.pop_first() {
            return slot;
        }
        self.next_slot += 1;
        self.next_slot - 1
    }

    /// Counts (`add`) or uncounts a frontend's jumps to its backends; returns
    /// the backends that appeared or disappeared.
    fn reference(&mut self, d: &Dispatch, add: bool) -> Vec<(BackendKey, BackendOwner)> {
        let mut flipped = Vec::new();
        for addr in d.v4.iter().chain(&d.v6) {
            let b = (*addr, d.protocol);
            if add {
                let owner = d.owner(addr);
                let entry = self.refs.entry(b).or_insert((0, owner.clone()));
                entry.0 += 1;
                entry.1 = owner;
                if entry.0 == 1 {
                    flipped.push((b, entry.1.clone()));
                }
            } else if let Some(entry) = self.refs.get_mut(&b) {
                entry.0 = entry.0.saturating_sub(1);
                if entry.0 == 0 {
                    let (_, owner) = self.refs.remove(&b).expect("present");
                    flipped.push((b, owner));
                }
            }
        }
        flipped
    }

    /// Moves this ruleset to `plan` at the frontends in `keys` (those the plan diff
    /// names), returning the edits that make the kernel's table follow. Each edit
    /// touches one frontend or one task map, so the cost is what changed.
    pub fn update(&mut self, plan: &Plan, keys: &[FrontendKey]) -> Update {
        let mut maps_add = Vec::new();
        let mut elements_out = Vec::new();
        let mut chains_refill = Vec::new();
        let mut elements_in = Vec::new();
        let mut chains_gone = Vec::new();
        let mut up = Update::default();
        let mut seen = std::collections::BTreeSet::new();
        let mut came = Vec::new();
        let mut went = Vec::new();
        for key in keys {
            if !seen.insert(*key) {
                continue;
            }
            let old = self.frontends.get(key).cloned();
            let mut new = dispatch_for(plan, key);
            if let Some(n) = &mut new {
                n.slot = match &old {
                    Some(o) => o.slot,
                    None => self.take_slot(),
                };
            }
            if old == new {
                continue;
            }
            if let Some(n) = &new {
                came.extend(self.reference(n, true));
            }
            if let Some(o) = &old {
                went.extend(self.reference(o, false));
            }
            // The task map's elements: only those whose task changed leave or come.
            // Both lists run from the same base (a frontend keeps its slot), so an
            // element is compared with the one at its own position.
            let either = new.as_ref().or(old.as_ref()).expect("one side differs");
            for family in Family::BOTH {
                let before = old.as_ref().map(|o| o.elements(family)).unwrap_or_default();
                let after = new.as_ref().map(|n| n.elements(family)).unwrap_or_default();
                let mut gone = Vec::new();
                let mut added = Vec::new();
                for i in 0..before.len().max(after.len()) {
                    let (b, a) = (before.get(i), after.get(i));
                    if b == a {
                        continue;
                    }
                    if let Some((k, _)) = b {
                        gone.push(*k);
                    }
                    if let Some(a) = a {
                        added.push(*a);
                    }
                }
                let map = either.map(family);
                if !gone.is_empty() {
                    elements_out.push(Edit::DeleteTasks { map, keys: gone });
                }
                if !added.is_empty() {
                    if self.maps.insert(map) {
                        maps_add.push(Edit::AddMap(map));
                    }
                    elements_in.push(Edit::AddTasks { map, tasks: added });
                }
            }
            match (&old, &new) {
                (Some(o), Some(n)) if o.chain == n.chain => {
                    let rules = n.rules();
                    if o.rules() != rules {
                        chains_refill.push(Edit::FlushChain(n.chain.clone()));
                        chains_refill.extend(rules.into_iter().map(|rule| Edit::AddRule {
                            chain: n.chain.clone(),
                            rule,
                        }));
                    }
                }
                _ => {
                    if let Some(o) = &old {
                        elements_out.push(Edit::DeleteFrontend(*key));
                        chains_gone.push(Edit::FlushChain(o.chain.clone()));
                        chains_gone.push(Edit::DeleteChain(o.chain.clone()));
                    }
                    if let Some(n) = &new {
                        chains_refill.push(Edit::AddChain(n.chain.clone()));
                        chains_refill.extend(n.rules().into_iter().map(|rule| Edit::AddRule {
                            chain: n.chain.clone(),
                            rule,
                        }));
                        elements_in.push(Edit::AddFrontend {
                            key: *key,
                            chain: n.chain.clone(),
                        });
                    }
                }
            }
            match new {
                Some(n) => {
                    self.frontends.insert(*key, n);
                }
                None => {
                    if let Some(o) = &old {
                        self.free.insert(o.slot);
                    }
                    self.frontends.remove(key);
                }
            }
        }
        // A backend that went and came back in one update (a task moved between
        // frontends) neither came nor went.
        let came_keys: std::collections::BTreeSet<BackendKey> =
            came.iter().map(|(k, _)| *k).collect();
        let went_keys: std::collections::BTreeSet<BackendKey> =
            went.iter().map(|(k, _)| *k).collect();
        for (b, _) in &came {
            if !went_keys.contains(b) && self.refs.contains_key(b) {
                up.added.push(*b);
            }
        }
        for (b, owner) in went {
            if !came_keys.contains(&b) && !self.refs.contains_key(&b) {
                up.gone.push((b, owner));
            }
        }
        // Order matters inside the transaction: a map or chain exists before anything
        // names it, an element leaves before another takes its key, and a chain is
        // deleted only once nothing jumps to it. A task map's elements change with
        // the rules that count over them, in the same transaction, so no packet sees
        // a counter and a map that disagree.
        up.new_maps = !maps_add.is_empty();
        up.edits = [
            maps_add,
            elements_out,
            chains_refill,
            elements_in,
            chains_gone,
        ]
        .concat();
        up
    }

    pub fn frontends(&self) -> usize {
        self.frontends.len()
    }

    /// Every address the table DNATs to, and whose task it is.
    pub fn backends(&self) -> BTreeMap<BackendKey, BackendOwner> {
        self.refs
            .iter()
            .map(|(k, (_, o))| (*k, o.clone()))
            .collect()
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
        for d in self.frontends.values() {
            let _ = writeln!(out, "\tchain {} {{", d.chain);
            for rule in d.rules() {
                let _ = writeln!(out, "\t\t{rule}");
            }
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
            let list = match dispatch_map(key) {
                "published" => &mut published,
                "vip4" => &mut vip4,
                _ => &mut vip6,
            };
            list.push(format!("{} : goto {}", dispatch_key(key), d.chain));
        }
        let mut tasks: BTreeMap<TaskMap, Vec<String>> = BTreeMap::new();
        for d in self.frontends.values() {
            for family in Family::BOTH {
                for (k, a) in d.elements(family) {
                    tasks
                        .entry(d.map(family))
                        .or_default()
                        .push(task_element(k, &a));
                }
            }
        }
        for (map, elements) in tasks {
            let _ = writeln!(out, "\tmap {} {{", map.name());
            let _ = writeln!(out, "\t\t{}", map.declaration());
            let _ = writeln!(out, "\t\telements = {{ {} }}", elements.join(", "));
            let _ = writeln!(out, "\t}}");
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

/// The frontend at `key` as this plane installs it: `None` when the plan gives it to
/// another plane, or it has no task of a family it can reach.
fn dispatch_for(plan: &Plan, key: &FrontendKey) -> Option<Dispatch> {
    let f = plan.frontends.get(key)?;
    if f.plane != PlaneKind::Nftables {
        return None;
    }
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
        return None;
    }
    Some(Dispatch {
        chain: frontend_chain(&f.service, key),
        // Given by the ruleset that takes it in.
        slot: 0,
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
        client_ip: f.policy.client_ip,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use mesh_core::plan::{Features, Host};
    use mesh_core::replica::{Replica, ReplicaConfig};
    use mesh_core::service::{PortSpec, ServiceSpec};
    use mesh_core::task::{TaskSource, TaskSpec};
    use mesh_core::vip::VipPool;
    use mesh_core::{Balance, Health};

    fn host() -> Host {
        Host::on("h1", PlaneKind::Nftables, Features::NONE, true)
    }

    fn replica() -> Replica {
        replica_with(&["web.1", "web.2", "web.3"])
    }

    /// `web` (8080/tcp and 5353/udp published) with web.1, web.2 (IPv4) and web.3
    /// (IPv6); those in `healthy` are healthy, the others not.
    pub(crate) fn replica_with(healthy: &[&str]) -> Replica {
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
            let h = if healthy.contains(&id) {
                Health::Healthy
            } else {
                Health::Unhealthy
            };
            r.set_health("web", id, h, 0);
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
        // Each frontend counts over its own slot of its group's task map.
        let rules = Ruleset::from_plan(&Plan::from_snapshot(&snap, &host()));
        let published = |protocol| FrontendKey {
            listen: Listen::Published,
            port: if protocol == Protocol::Tcp {
                8080
            } else {
                5353
            },
            protocol,
        };
        let base = |key: &FrontendKey| rules.frontends[key].base();
        let (tcp, udp) = (
            base(&published(Protocol::Tcp)),
            base(&published(Protocol::Udp)),
        );
        assert_ne!(tcp, udp, "two frontends, two slots");
        let offset = |b: u32| {
            if b == 0 {
                String::new()
            } else {
                format!(" offset {b}")
            }
        };
        for rule in [
            format!(
                "meta nfproto ipv4 meta l4proto tcp ct mark set ct mark | 0x00100000 meta mark set meta mark | 0x00100000 dnat ip to numgen inc mod 2{} map @tasks_tcp4_0",
                offset(tcp)
            ),
            format!(
                "meta nfproto ipv4 meta l4proto udp ct mark set ct mark | 0x00100000 meta mark set meta mark | 0x00100000 dnat ip to numgen inc mod 2{} map @tasks_udp4_0",
                offset(udp)
            ),
            format!(
                "meta nfproto ipv6 meta l4proto tcp ct mark set ct mark | 0x00100000 meta mark set meta mark | 0x00100000 dnat ip6 to numgen inc mod 1{} map @tasks_tcp6_0",
                offset(tcp)
            ),
        ] {
            assert!(text.contains(&rule), "{rule} missing from\n{text}");
        }
        for element in [
            format!("{tcp} : 10.0.0.1 . 80, {} : 10.0.0.2 . 80", tcp + 1),
            format!("{udp} : 10.0.0.1 . 53, {} : 10.0.0.2 . 53", udp + 1),
            format!("{tcp} : fd00::3 . 80"),
        ] {
            assert!(text.contains(&element), "{element} missing from\n{text}");
        }
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
    fn client_ip_keep_rewrites_no_source() {
        let mut r = replica();
        let mut spec = r.snapshot().services["web"].spec.clone();
        spec.client_ip = ClientIp::Keep;
        r.put_service(spec, 1).unwrap();
        let text = Ruleset::from_plan(&Plan::from_snapshot(&r.snapshot(), &host())).render();
        assert!(text.contains("dnat ip to numgen inc mod 2"), "{text}");
        let frontend_rules: Vec<&str> = text.lines().filter(|l| l.contains("dnat")).collect();
        assert!(!frontend_rules.is_empty());
        for rule in frontend_rules {
            assert!(
                !rule.contains("meta mark set"),
                "keep marks nothing for masquerade: {rule}"
            );
        }
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
