//! The DNS view of a snapshot, indexed for lookups by lowercase name.
//!
//! The maps are persistent (imbl), like the snapshot's: a new zone is the old one
//! patched with the services that differ between two snapshots, in O(what changed),
//! and the old zone stays intact for the queries still reading it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use hickory_proto::rr::Name;
use imbl::OrdMap;
use imbl::ordmap::DiffItem;
use mesh_core::{Mode, Protocol, ServiceEntry, Snapshot, Vips};

#[derive(Debug, Clone, PartialEq)]
pub struct ZoneService {
    pub mode: Mode,
    pub vips: Vips,
    /// Routable tasks: (id, ip, port).
    pub tasks: Vec<(String, IpAddr, u16)>,
    /// (port name, protocol, target port).
    pub ports: Vec<(String, Protocol, u16)>,
}

impl ZoneService {
    fn new(entry: &ServiceEntry) -> Self {
        let default_port = entry.spec.ports.first().map_or(0, |p| p.target);
        Self {
            mode: entry.spec.mode,
            vips: entry.vips,
            tasks: entry
                .tasks
                .iter()
                .filter(|t| t.routable())
                .map(|t| (t.id.clone(), t.ip, t.port.unwrap_or(default_port)))
                .collect(),
            ports: entry
                .spec
                .ports
                .iter()
                .map(|p| (p.name.clone(), p.protocol, p.target))
                .collect(),
        }
    }
}

/// A name that claims an address for PTR answers. Several can (a task IP reused by
/// another service, a task on its service's VIP); the smallest wins: a VIP before any
/// task, then by service name and task id. That order depends only on the snapshot,
/// never on the order changes arrived in, so a patched zone equals a rebuilt one.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Claim {
    Vip { service: String },
    Task { service: String, id: String },
}

/// A claim of one service as it appears in a snapshot entry, borrowed so that
/// comparing an old and a new entry allocates nothing. `None`: the VIP.
type ClaimRef<'a> = (IpAddr, Option<&'a str>);

#[derive(Debug)]
pub struct Zone {
    pub domain: String,
    pub apex: Name,
    pub ttl: u32,
    pub serial: u32,
    /// The addresses of the zone's name server, whose name is the apex itself: the
    /// target of the apex NS record and the SOA's MNAME, answered as `<domain>.` A and
    /// AAAA. See [`Zone::with_listen`].
    pub nameservers: Vec<IpAddr>,
    services: OrdMap<String, Arc<ZoneService>>,
    /// VIPs and task IPs → every name that claims them; PTR answers the first.
    reverse: OrdMap<IpAddr, OrdMap<Claim, Name>>,
    rotation: AtomicUsize,
}

/// Cloning is O(1) (the maps are shared) and carries the rotation on, so an update
/// does not restart every client at the first address.
impl Clone for Zone {
    fn clone(&self) -> Self {
        Self {
            domain: self.domain.clone(),
            apex: self.apex.clone(),
            ttl: self.ttl,
            serial: self.serial,
            nameservers: self.nameservers.clone(),
            services: self.services.clone(),
            reverse: self.reverse.clone(),
            rotation: AtomicUsize::new(self.rotation.load(Ordering::Relaxed)),
        }
    }
}

/// Equal content: the rotation is per-query state, not part of what the zone says.
impl PartialEq for Zone {
    fn eq(&self, other: &Self) -> bool {
        self.domain == other.domain
            && self.apex == other.apex
            && self.ttl == other.ttl
            && self.serial == other.serial
            && self.nameservers == other.nameservers
            && self.services == other.services
            && self.reverse == other.reverse
    }
}

impl Zone {
    /// A zone without services. The domain is expected normalized (see
    /// `DnsConfig::normalized`); it is normalized again here so that a caller that
    /// skipped it still gets a zone that matches lowercase query names.
    pub fn empty(domain: &str, ttl: u32) -> Self {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let apex = Name::from_ascii(format!("{domain}.")).unwrap_or_else(|_| Name::root());
        Zone {
            domain,
            apex,
            ttl,
            serial: 0,
            nameservers: nameserver_addrs(&[]),
            services: OrdMap::new(),
            reverse: OrdMap::new(),
            rotation: AtomicUsize::new(0),
        }
    }

    /// This zone served on `listen`: the name server's addresses (the apex A and AAAA,
    /// and the glue of the apex NS) become the listen addresses. A wildcard address
    /// (0.0.0.0, ::) says nothing a client can use, so it is skipped; when only
    /// wildcards (or nothing) are left, loopback stands in: 127.0.0.1 for 0.0.0.0, ::1
    /// for ::, both for no address at all. Updates carry the addresses on.
    pub fn with_listen(mut self, listen: &[SocketAddr]) -> Self {
        self.nameservers = nameserver_addrs(listen);
        self
    }

    /// The zone of a whole snapshot: every service is an addition to an empty zone.
    pub fn build(snapshot: &Snapshot, domain: &str, ttl: u32) -> Self {
        Self::empty(domain, ttl).updated(&Snapshot::default(), snapshot)
    }

    /// This zone, which must have been built from `prev`, brought to `next`. The
    /// snapshots' diff skips the subtrees they share, so this costs O(services that
    /// changed × their tasks), not O(all services).
    pub fn updated(&self, prev: &Snapshot, next: &Snapshot) -> Self {
        let mut zone = self.clone();
        // Serials only need to change when the content does; wrapping is fine (RFC 1982).
        zone.serial = next.version as u32;
        for item in prev.services.diff(&next.services) {
            match item {
                DiffItem::Add(name, entry) => zone.replace(name, None, Some(entry)),
                DiffItem::Update {
                    old: (name, old),
                    new: (_, new),
                } => zone.replace(name, Some(old), Some(new)),
                DiffItem::Remove(name, entry) => zone.replace(name, Some(entry), None),
            }
        }
        zone
    }

    /// Replaces the zone's view of service `name` (`old` as it was, `new` as it is),
    /// touching only the reverse entries that differ between the two.
    fn replace(&mut self, name: &str, old: Option<&ServiceEntry>, new: Option<&ServiceEntry>) {
        let old_claims = old.map(claims).unwrap_or_default();
        let new_claims = new.map(claims).unwrap_or_default();
        for claim in old_claims
            .iter()
            .filter(|c| new_claims.binary_search(c).is_err())
        {
            self.unclaim(name, *claim);
        }
        for claim in new_claims
            .iter()
            .filter(|c| old_claims.binary_search(c).is_err())
        {
            self.claim(name, *claim);
        }
        match new {
            Some(entry) => {
                self.services
                    .insert(name.to_string(), Arc::new(ZoneService::new(entry)));
            }
            None => {
                self.services.remove(name);
            }
        }
    }

    fn claim(&mut self, service: &str, (ip, task): ClaimRef<'_>) {
        let domain = &self.domain;
        let (claim, target) = match task {
            None => (
                Claim::Vip {
                    service: service.into(),
                },
                format!("{service}.{domain}."),
            ),
            Some(id) => (
                Claim::Task {
                    service: service.into(),
                    id: id.into(),
                },
                format!("{id}.tasks.{service}.{domain}."),
            ),
        };
        // A name too long for DNS is not answered (the forward lookup cannot answer
        // it either); the removal of its claim is then a no-op.
        if let Ok(target) = Name::from_ascii(target) {
            self.reverse.entry(ip).or_default().insert(claim, target);
        }
    }

    fn unclaim(&mut self, service: &str, (ip, task): ClaimRef<'_>) {
        let claim = match task {
            None => Claim::Vip {
                service: service.into(),
            },
            Some(id) => Claim::Task {
                service: service.into(),
                id: id.into(),
            },
        };
        if let Some(claims) = self.reverse.get_mut(&ip) {
            claims.remove(&claim);
            if claims.is_empty() {
                self.reverse.remove(&ip);
            }
        }
    }

    /// A service by its lowercase name, with the name as stored.
    pub fn service(&self, name: &str) -> Option<(&str, &ZoneService)> {
        self.services
            .get_key_value(name)
            .map(|(k, v)| (k.as_str(), v.as_ref()))
    }

    pub fn services(&self) -> impl Iterator<Item = (&str, &ZoneService)> {
        self.services.iter().map(|(k, v)| (k.as_str(), v.as_ref()))
    }

    /// The name a PTR query for `ip` answers with.
    pub fn ptr(&self, ip: IpAddr) -> Option<&Name> {
        self.reverse.get(&ip)?.get_min().map(|(_, name)| name)
    }

    /// A per-query rotation offset, so clients that take the first address spread.
    pub fn next_rotation(&self) -> usize {
        self.rotation.fetch_add(1, Ordering::Relaxed)
    }
}

/// See [`Zone::with_listen`].
fn nameserver_addrs(listen: &[SocketAddr]) -> Vec<IpAddr> {
    let mut addrs: Vec<IpAddr> = Vec::new();
    for ip in listen.iter().map(SocketAddr::ip) {
        if !ip.is_unspecified() && !addrs.contains(&ip) {
            addrs.push(ip);
        }
    }
    if addrs.is_empty() {
        let v4 = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
        let (any4, any6) = (
            listen.iter().any(SocketAddr::is_ipv4),
            listen.iter().any(SocketAddr::is_ipv6),
        );
        match (any4, any6) {
            (true, false) => addrs.push(v4),
            (false, true) => addrs.push(v6),
            _ => addrs.extend([v4, v6]),
        }
    }
    addrs
}

/// The addresses one service entry claims for PTR (its VIPs and its routable tasks'
/// IPs), sorted and deduplicated for binary search.
fn claims(entry: &ServiceEntry) -> Vec<ClaimRef<'_>> {
    let mut claims: Vec<ClaimRef<'_>> = entry
        .vips
        .iter()
        .map(|ip| (ip, None))
        .chain(
            entry
                .tasks
                .iter()
                .filter(|t| t.routable())
                .map(|t| (t.ip, Some(t.id.as_str()))),
        )
        .collect();
    claims.sort_unstable();
    claims.dedup();
    claims
}

#[cfg(test)]
mod tests {
    use hickory_proto::op::{Message, MessageType, OpCode, Query};
    use hickory_proto::rr::{RData, RecordType};
    use mesh_core::{
        Health, PortSpec, Replica, ReplicaConfig, ServiceSpec, TaskEntry, TaskSource, TaskSpec,
        TaskState, VipPool,
    };

    use super::*;
    use crate::answer::{Resolution, resolve};
    use crate::fuzzing::sample_snapshot;

    fn add_task(r: &mut Replica, service: &str, id: &str, ip: &str, now: u64) {
        let spec = TaskSpec::new(service, id, ip.parse().unwrap());
        r.add_task(spec, TaskSource::Api, now).unwrap();
        r.set_health(service, id, Health::Healthy, now);
    }

    /// The answers to one query, as text, sorted.
    fn ask(zone: &Zone, name: &str, qtype: RecordType) -> Vec<String> {
        let mut req = Message::new(1, MessageType::Query, OpCode::Query);
        req.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        let Resolution::Answer(resp) = resolve(zone, &req) else {
            panic!("{name} was forwarded");
        };
        let mut out: Vec<String> = resp
            .answers
            .iter()
            .map(|r| match &r.data {
                RData::A(a) => a.0.to_string(),
                RData::AAAA(a) => a.0.to_string(),
                RData::PTR(p) => p.0.to_ascii(),
                RData::SRV(s) => format!("{} {}", s.port, s.target.to_ascii()),
                other => format!("{other:?}"),
            })
            .collect();
        out.sort();
        out
    }

    fn ptr(zone: &Zone, ip: &str) -> Option<String> {
        zone.ptr(ip.parse().unwrap()).map(Name::to_ascii)
    }

    /// The zone patched through every snapshot in turn equals the zone built from
    /// each one from scratch, whatever changed.
    fn follow(snapshots: &[Snapshot]) -> Zone {
        let mut prev = Snapshot::default();
        let mut zone = Zone::empty("mesh", 5);
        for (step, next) in snapshots.iter().enumerate() {
            zone = zone.updated(&prev, next);
            assert_eq!(zone, Zone::build(next, "mesh", 5), "after step {step}");
            prev = next.clone();
        }
        zone
    }

    #[test]
    fn a_patched_zone_equals_a_rebuilt_one() {
        let mut r = Replica::new("h1", 1, VipPool::default(), ReplicaConfig::default());
        let mut snaps = Vec::new();
        let mut now = 0;
        let mut tick = || {
            now += 1;
            now
        };

        // Services and tasks appear.
        let mut web = ServiceSpec::new(
            "web",
            vec![PortSpec {
                name: "http".into(),
                ..PortSpec::tcp(None, 80)
            }],
        );
        r.create_service(web.clone(), tick()).unwrap();
        let mut rr = ServiceSpec::new("rr", vec![PortSpec::tcp(None, 5432)]);
        rr.mode = Mode::Dnsrr;
        r.create_service(rr, tick()).unwrap();
        snaps.push(r.snapshot());
        add_task(&mut r, "web", "web.1", "10.0.0.1", tick());
        add_task(&mut r, "web", "web.2", "10.0.0.2", tick());
        add_task(&mut r, "rr", "rr.1", "10.0.1.1", tick());
        snaps.push(r.snapshot());

        // Two services' tasks on one IP: the first by service name answers PTR.
        add_task(&mut r, "rr", "rr.2", "10.0.0.1", tick());
        add_task(&mut r, "web", "web.3", "10.0.0.3", tick());
        snaps.push(r.snapshot());
        assert_eq!(
            ptr(&follow(&snaps), "10.0.0.1").as_deref(),
            Some("rr.2.tasks.rr.mesh.")
        );

        // Health and state changes: unroutable tasks leave the zone.
        r.set_health("rr", "rr.2", Health::Unhealthy, tick());
        r.set_task_state("web", "web.3", TaskState::Draining, tick())
            .unwrap();
        snaps.push(r.snapshot());
        let zone = follow(&snaps);
        assert_eq!(
            ptr(&zone, "10.0.0.1").as_deref(),
            Some("web.1.tasks.web.mesh.")
        );
        assert_eq!(ptr(&zone, "10.0.0.3"), None);

        // A service changes its spec (ports, same VIPs), another appears.
        web.ports = vec![
            PortSpec {
                name: "http".into(),
                ..PortSpec::tcp(None, 8080)
            },
            PortSpec {
                name: "admin".into(),
                ..PortSpec::tcp(None, 9090)
            },
        ];
        r.put_service(web, tick()).unwrap();
        r.create_service(
            ServiceSpec::new("api", vec![PortSpec::tcp(None, 443)]),
            tick(),
        )
        .unwrap();
        add_task(&mut r, "api", "api.1", "10.0.2.1", tick());
        snaps.push(r.snapshot());

        // Tasks and a whole service go away.
        r.remove_task("web", "web.2", tick()).unwrap();
        r.remove_service("rr", tick()).unwrap();
        snaps.push(r.snapshot());

        // What the table does not produce on its own, written into a snapshot by hand:
        // a service whose VIPs change, a task on another service's VIP, and an IPv6 task.
        let mut last = r.snapshot();
        let api_vip = last.services["api"].vips.v4.unwrap();
        let mut web = (*last.services["web"]).clone();
        web.vips = Vips {
            v4: Some("10.254.9.9".parse().unwrap()),
            v6: None,
        };
        web.tasks.push(TaskEntry {
            id: "web.4".into(),
            node: "h2".into(),
            ip: IpAddr::V4(api_vip),
            port: Some(8081),
            state: TaskState::Active,
            health: Health::Healthy,
            source: TaskSource::Docker,
            observed: None,
        });
        web.tasks.push(TaskEntry {
            id: "web.5".into(),
            node: "h2".into(),
            ip: "fd00::5".parse().unwrap(),
            port: None,
            state: TaskState::Active,
            health: Health::Healthy,
            source: TaskSource::Docker,
            observed: None,
        });
        last.services.insert("web".into(), Arc::new(web));
        last.version += 1;
        snaps.push(last.clone());

        let zone = follow(&snaps);
        assert_eq!(zone.serial, last.version as u32);
        assert_eq!(ask(&zone, "web.mesh.", RecordType::A), ["10.254.9.9"]);
        assert!(ask(&zone, "web.mesh.", RecordType::AAAA).is_empty());
        let mut tasks = vec!["10.0.0.1".to_string(), api_vip.to_string()];
        tasks.sort();
        assert_eq!(ask(&zone, "tasks.web.mesh.", RecordType::A), tasks);
        assert_eq!(ask(&zone, "tasks.web.mesh.", RecordType::AAAA), ["fd00::5"]);
        assert_eq!(
            ask(&zone, "_admin._tcp.web.mesh.", RecordType::SRV),
            ["9090 web.mesh."]
        );
        assert_eq!(
            ask(&zone, "api.mesh.", RecordType::A),
            [api_vip.to_string()]
        );
        // The VIP claim beats the task on the same address.
        assert_eq!(
            ptr(&zone, &api_vip.to_string()).as_deref(),
            Some("api.mesh.")
        );
        assert_eq!(ptr(&zone, "10.254.9.9").as_deref(), Some("web.mesh."));
        assert_eq!(
            ptr(&zone, "fd00::5").as_deref(),
            Some("web.5.tasks.web.mesh.")
        );
        for gone in ["10.0.1.1", "10.0.0.2"] {
            assert_eq!(ptr(&zone, gone), None, "{gone}");
        }
        let old_vip = snaps[0].services["web"].vips.v4.unwrap().to_string();
        assert_eq!(ptr(&zone, &old_vip), None, "the old VIP is released");
        assert!(zone.service("rr").is_none());

        // Back to nothing, and the other way round: a jump between any two snapshots
        // is one diff.
        let mut jumps = vec![Snapshot::default(), last.clone(), snaps[1].clone()];
        jumps.push(Snapshot::default());
        let empty = follow(&jumps);
        assert_eq!(empty.services().count(), 0);
        assert_eq!(empty, Zone::empty("mesh", 5));
    }

    #[test]
    fn the_name_server_answers_the_listen_addresses() {
        let ns = |listen: &[&str]| {
            let listen: Vec<SocketAddr> = listen.iter().map(|a| a.parse().unwrap()).collect();
            Zone::empty("mesh", 5)
                .with_listen(&listen)
                .nameservers
                .iter()
                .map(IpAddr::to_string)
                .collect::<Vec<_>>()
        };
        assert_eq!(ns(&[]), ["127.0.0.1", "::1"]);
        assert_eq!(ns(&["0.0.0.0:53"]), ["127.0.0.1"]);
        assert_eq!(ns(&["[::]:53"]), ["::1"]);
        assert_eq!(ns(&["0.0.0.0:53", "[::]:5353"]), ["127.0.0.1", "::1"]);
        assert_eq!(
            ns(&[
                "0.0.0.0:53",
                "172.17.0.1:53",
                "172.17.0.1:5353",
                "[fd00::1]:53"
            ]),
            ["172.17.0.1", "fd00::1"],
            "wildcards skipped, duplicates once"
        );
        // Updates carry the addresses on.
        let listen = ["192.0.2.1:53".parse().unwrap()];
        let zone = Zone::empty("mesh", 5).with_listen(&listen);
        let next = zone.updated(&Snapshot::default(), &sample_snapshot());
        assert_eq!(next.nameservers, zone.nameservers);
        assert_eq!(
            next,
            Zone::build(&sample_snapshot(), "mesh", 5).with_listen(&listen)
        );
    }

    #[test]
    fn an_update_shares_every_unchanged_service() {
        let mut r = Replica::new("h1", 1, VipPool::default(), ReplicaConfig::default());
        for i in 0..2_000 {
            let name = format!("svc{i}");
            r.create_service(ServiceSpec::new(&name, vec![PortSpec::tcp(None, 80)]), 0)
                .unwrap();
            add_task(&mut r, &name, &format!("{name}.1"), "10.0.0.1", 0);
        }
        let before = r.snapshot();
        let zone = Zone::build(&before, "mesh", 5);
        add_task(&mut r, "svc7", "svc7.2", "10.0.0.2", 1);
        let after = r.snapshot();
        let next = zone.updated(&before, &after);
        assert_eq!(next, Zone::build(&after, "mesh", 5));
        let rebuilt = next
            .services
            .iter()
            .filter(|(name, s)| !Arc::ptr_eq(s, &zone.services[name.as_str()]))
            .map(|(name, _)| name.as_str())
            .collect::<Vec<_>>();
        assert_eq!(rebuilt, ["svc7"], "only the changed service is rebuilt");
        // The old zone is untouched, for queries still reading it.
        assert_eq!(zone, Zone::build(&before, "mesh", 5));
    }
}
