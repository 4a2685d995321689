//! The DNS view of a snapshot, indexed for lookups by lowercase name.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use hickory_proto::rr::Name;
use mesh_core::{Mode, Protocol, Snapshot, Vips};

pub struct ZoneService {
    pub mode: Mode,
    pub vips: Vips,
    /// Routable tasks: (id, ip, port).
    pub tasks: Vec<(String, IpAddr, u16)>,
    /// (port name, protocol, target port).
    pub ports: Vec<(String, Protocol, u16)>,
}

pub struct Zone {
    pub domain: String,
    pub apex: Name,
    pub ttl: u32,
    pub serial: u32,
    pub services: HashMap<String, ZoneService>,
    /// VIPs and task IPs → the name PTR answers with.
    pub reverse: HashMap<IpAddr, Name>,
    rotation: AtomicUsize,
}

impl Zone {
    pub fn empty(domain: &str, ttl: u32) -> Self {
        Self::build(&Snapshot::default(), domain, ttl)
    }

    pub fn build(snapshot: &Snapshot, domain: &str, ttl: u32) -> Self {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let apex = Name::from_ascii(format!("{domain}.")).unwrap_or_else(|_| Name::root());
        let mut services = HashMap::new();
        let mut reverse = HashMap::new();
        for (name, entry) in &snapshot.services {
            let ports: Vec<(String, Protocol, u16)> = entry
                .spec
                .ports
                .iter()
                .map(|p| (p.name.clone(), p.protocol, p.target))
                .collect();
            let default_port = entry.spec.ports.first().map(|p| p.target).unwrap_or(0);
            let tasks: Vec<(String, IpAddr, u16)> = entry
                .tasks
                .iter()
                .filter(|t| t.routable())
                .map(|t| (t.id.clone(), t.ip, t.port.unwrap_or(default_port)))
                .collect();
            if let Ok(fqdn) = Name::from_ascii(format!("{name}.{domain}.")) {
                for vip in entry.vips.iter() {
                    reverse.insert(vip, fqdn.clone());
                }
            }
            for (id, ip, _) in &tasks {
                if let Ok(n) = Name::from_ascii(format!("{id}.tasks.{name}.{domain}.")) {
                    reverse.entry(*ip).or_insert(n);
                }
            }
            services.insert(
                name.clone(),
                ZoneService {
                    mode: entry.spec.mode,
                    vips: entry.vips,
                    tasks,
                    ports,
                },
            );
        }
        Zone {
            domain,
            apex,
            ttl,
            serial: snapshot.version as u32,
            services,
            reverse,
            rotation: AtomicUsize::new(0),
        }
    }

    /// A per-query rotation offset, so clients that take the first address spread.
    pub fn next_rotation(&self) -> usize {
        self.rotation.fetch_add(1, Ordering::Relaxed)
    }
}
