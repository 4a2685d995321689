//! Answers for mesh names, computed from a [`Zone`]. Sans-IO: a query message in, a
//! response message (or "forward it") out.

use std::net::IpAddr;

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, NS, PTR, SOA, SRV, TXT};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use mesh_core::{Mode, Protocol};

use crate::zone::{Zone, ZoneService};

pub enum Resolution {
    Answer(Message),
    /// Not a mesh name: ask the upstream resolvers.
    Forward,
}

enum Target<'z> {
    Apex,
    Service(&'z ZoneService),
    Tasks(&'z ZoneService),
    Task(&'z ZoneService, &'z str),
    Srv(&'z str, &'z ZoneService, &'z str, Protocol),
}

/// `rest` is the query name without the domain, lowercase, no trailing dot.
fn classify<'z>(zone: &'z Zone, rest: &'z str, in_domain: bool) -> Option<Target<'z>> {
    if rest.is_empty() {
        return in_domain.then_some(Target::Apex);
    }
    let (prefix, svc) = match rest.rsplit_once('.') {
        Some((p, s)) => (Some(p), s),
        None => (None, rest),
    };
    let (svc_name, service) = zone.service(svc)?;
    let Some(prefix) = prefix else {
        return Some(Target::Service(service));
    };
    if prefix == "tasks" {
        return Some(Target::Tasks(service));
    }
    if let Some(id) = prefix.strip_suffix(".tasks") {
        return service
            .tasks
            .iter()
            .any(|(t, _, _)| t == id)
            .then_some(Target::Task(service, id));
    }
    let (port, proto) = prefix.split_once('.')?;
    let port = port.strip_prefix('_')?;
    let proto = match proto {
        "_tcp" => Protocol::Tcp,
        "_udp" => Protocol::Udp,
        _ => return None,
    };
    service
        .ports
        .iter()
        .any(|(n, p, _)| n == port && *p == proto)
        .then_some(Target::Srv(svc_name, service, port, proto))
}

fn address(owner: &Name, ttl: u32, ip: IpAddr) -> Record {
    match ip {
        IpAddr::V4(v4) => Record::from_rdata(owner.clone(), ttl, RData::A(A(v4))),
        IpAddr::V6(v6) => Record::from_rdata(owner.clone(), ttl, RData::AAAA(AAAA(v6))),
    }
}

fn wants(qtype: RecordType, ip: &IpAddr) -> bool {
    match qtype {
        RecordType::A => ip.is_ipv4(),
        RecordType::AAAA => ip.is_ipv6(),
        RecordType::ANY => true,
        _ => false,
    }
}

/// Routable task addresses, deduplicated, rotated per query.
fn task_ips(zone: &Zone, service: &ZoneService) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = Vec::with_capacity(service.tasks.len());
    for (_, ip, _) in &service.tasks {
        if !ips.contains(ip) {
            ips.push(*ip);
        }
    }
    if !ips.is_empty() {
        let k = zone.next_rotation() % ips.len();
        ips.rotate_left(k);
    }
    ips
}

/// The zone's SOA. Its MNAME, the primary name server, is the apex itself, which
/// answers A/AAAA with the server's addresses (see [`Zone::with_listen`]): the apex is
/// the one name under the domain that no service can take, since services are the
/// labels below it.
pub fn soa(zone: &Zone) -> Record {
    let rname = Name::from_ascii(format!("hostmaster.{}.", zone.domain))
        .unwrap_or_else(|_| zone.apex.clone());
    let rdata = SOA::new(
        zone.apex.clone(),
        rname,
        zone.serial,
        3600,
        600,
        86400,
        zone.ttl,
    );
    Record::from_rdata(zone.apex.clone(), zone.ttl, RData::SOA(rdata))
}

/// The response skeleton: same id, question echoed, authoritative, recursion
/// available (we forward).
pub fn response_to(req: &Message, code: ResponseCode) -> Message {
    let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
    resp.metadata.recursion_desired = req.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    resp.metadata.response_code = code;
    resp.add_queries(req.queries.iter().cloned());
    resp
}

/// Answers class CH (CHAOS) questions: only the server-identification names that
/// monitoring and `dig CH TXT version.bind` ask, as BIND does (RFC 4892):
/// `version.bind` and `version.server` are TXT "mesh <version>", `id.server` is TXT
/// "mesh" (the software, not the host: no host name leaks). Every other CH name is
/// REFUSED, and none is ever forwarded: upstreams answer for themselves.
fn chaos(req: &Message, q: &Query) -> Message {
    let name = q.name().to_lowercase().to_ascii();
    let text = match name.as_str() {
        "version.bind." | "version.server." => format!("mesh {}", env!("CARGO_PKG_VERSION")),
        "id.server." => "mesh".to_string(),
        _ => return response_to(req, ResponseCode::Refused),
    };
    let mut resp = response_to(req, ResponseCode::NoError);
    resp.metadata.authoritative = true;
    if matches!(q.query_type(), RecordType::TXT | RecordType::ANY) {
        // TTL 0: the version changes with an upgrade.
        let mut record = Record::from_rdata(q.name().clone(), 0, RData::TXT(TXT::new(vec![text])));
        record.dns_class = DNSClass::CH;
        resp.add_answer(record);
    }
    resp
}

pub fn resolve(zone: &Zone, req: &Message) -> Resolution {
    let Some(q) = req.queries.first() else {
        return Resolution::Forward;
    };
    // Zone transfers are refused, for every name: the zone is rebuilt from each
    // snapshot and has no secondaries, and a forwarder passes no transfers on.
    if matches!(q.query_type(), RecordType::AXFR | RecordType::IXFR) {
        return Resolution::Answer(response_to(req, ResponseCode::Refused));
    }
    // The zone and the upstreams are class IN: other classes never get IN data and
    // are never forwarded.
    match q.query_class() {
        DNSClass::IN => {}
        DNSClass::CH => return Resolution::Answer(chaos(req, q)),
        _ => return Resolution::Answer(response_to(req, ResponseCode::Refused)),
    }
    let qtype = q.query_type();
    let owner = q.name();
    let lower = owner.to_lowercase().to_ascii();
    let text = lower.trim_end_matches('.');

    if text.ends_with(".in-addr.arpa") || text.ends_with(".ip6.arpa") {
        let Some(target) = owner
            .parse_arpa_name()
            .ok()
            .and_then(|net| zone.ptr(net.addr()))
        else {
            return Resolution::Forward;
        };
        let mut resp = response_to(req, ResponseCode::NoError);
        resp.metadata.authoritative = true;
        if matches!(qtype, RecordType::PTR | RecordType::ANY) {
            resp.add_answer(Record::from_rdata(
                owner.clone(),
                zone.ttl,
                RData::PTR(PTR(target.clone())),
            ));
        }
        return Resolution::Answer(resp);
    }

    let domain = zone.domain.as_str();
    let (rest, in_domain) = if text == domain {
        ("", true)
    } else if text.len() > domain.len() + 1
        && text.ends_with(domain)
        && text.as_bytes()[text.len() - domain.len() - 1] == b'.'
    {
        (&text[..text.len() - domain.len() - 1], true)
    } else {
        (text, false)
    };

    let Some(target) = classify(zone, rest, in_domain) else {
        if !in_domain {
            return Resolution::Forward;
        }
        let mut resp = response_to(req, ResponseCode::NXDomain);
        resp.metadata.authoritative = true;
        resp.add_authority(soa(zone));
        return Resolution::Answer(resp);
    };

    let mut resp = response_to(req, ResponseCode::NoError);
    resp.metadata.authoritative = true;
    let ttl = zone.ttl;
    match target {
        Target::Apex => {
            // The apex is also the name server's name: NS points at it, with its
            // addresses as glue, and it answers A/AAAA with them.
            if matches!(qtype, RecordType::SOA | RecordType::ANY) {
                resp.add_answer(soa(zone));
            }
            if matches!(qtype, RecordType::NS | RecordType::ANY) {
                resp.add_answer(Record::from_rdata(
                    owner.clone(),
                    ttl,
                    RData::NS(NS(zone.apex.clone())),
                ));
            }
            resp.add_answers(
                zone.nameservers
                    .iter()
                    .filter(|ip| wants(qtype, ip))
                    .map(|ip| address(owner, ttl, *ip)),
            );
            if qtype == RecordType::NS {
                resp.add_additionals(
                    zone.nameservers
                        .iter()
                        .map(|ip| address(&zone.apex, ttl, *ip)),
                );
            }
        }
        Target::Service(service) => {
            let ips: Vec<IpAddr> = match service.mode {
                Mode::Vip => service.vips.iter().collect(),
                Mode::Dnsrr => task_ips(zone, service),
            };
            resp.add_answers(
                ips.iter()
                    .filter(|ip| wants(qtype, ip))
                    .map(|ip| address(owner, ttl, *ip)),
            );
        }
        Target::Tasks(service) => {
            resp.add_answers(
                task_ips(zone, service)
                    .iter()
                    .filter(|ip| wants(qtype, ip))
                    .map(|ip| address(owner, ttl, *ip)),
            );
        }
        Target::Task(service, id) => {
            let ips = service
                .tasks
                .iter()
                .filter(|(t, ip, _)| t == id && wants(qtype, ip))
                .map(|(_, ip, _)| *ip);
            resp.add_answers(ips.map(|ip| address(owner, ttl, ip)));
        }
        Target::Srv(svc, service, port, proto) => {
            if matches!(qtype, RecordType::SRV | RecordType::ANY) {
                let target_port = service
                    .ports
                    .iter()
                    .find(|(n, p, _)| n == port && *p == proto)
                    .map(|(_, _, t)| *t)
                    .unwrap_or(0);
                match service.mode {
                    Mode::Vip => {
                        if let Ok(name) = Name::from_ascii(format!("{svc}.{domain}.")) {
                            resp.add_answer(Record::from_rdata(
                                owner.clone(),
                                ttl,
                                RData::SRV(SRV::new(0, 0, target_port, name.clone())),
                            ));
                            resp.add_additionals(
                                service.vips.iter().map(|ip| address(&name, ttl, ip)),
                            );
                        }
                    }
                    Mode::Dnsrr => {
                        for (id, ip, task_port) in &service.tasks {
                            let Ok(name) = Name::from_ascii(format!("{id}.tasks.{svc}.{domain}."))
                            else {
                                continue;
                            };
                            let p = if service.ports.len() == 1 {
                                *task_port
                            } else {
                                target_port
                            };
                            resp.add_answer(Record::from_rdata(
                                owner.clone(),
                                ttl,
                                RData::SRV(SRV::new(0, 0, p, name.clone())),
                            ));
                            resp.add_additional(address(&name, ttl, *ip));
                        }
                    }
                }
            }
        }
    }
    if resp.answers.is_empty() {
        // NODATA: the name exists, not with this type. The SOA makes it cacheable.
        resp.add_authority(soa(zone));
    }
    Resolution::Answer(resp)
}
