//! The request path on arbitrary bytes, for the fuzz target and the mutation test:
//! both run [`respond`], the function the server runs, and check what it returns.

use std::net::{IpAddr, Ipv4Addr};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{DNSClass, RecordType};
use mesh_core::{
    Cidr, Health, Mode, PortSpec, Replica, ReplicaConfig, ServiceSpec, Snapshot, TaskSpec,
    TaskState, VipPool,
};

use crate::config::DnsConfig;
use crate::respond::{Reply, Step, respond};
use crate::wire::udp_limit;
use crate::zone::Zone;

/// Runs `raw` through [`respond`] as the server would: from an allowed client over
/// UDP and over TCP, and from a client outside the allow list. Panics when the result
/// breaks a promise the server makes to every client.
pub fn exercise(zone: &Zone, raw: &[u8]) {
    let allow: Vec<Cidr> = DnsConfig::default().allow;
    let inside = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let outside = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    for (client, limit) in [(inside, None), (inside, Some(65_535)), (outside, None)] {
        let step = respond(zone, &allow, raw, client, limit);
        let reply = match step {
            Step::Reply(reply) => reply,
            Step::Forward(_) => {
                assert_eq!(client, inside, "forwarded for a refused client: {raw:?}");
                continue;
            }
            Step::Drop { .. } => continue,
        };
        // Whatever we send must itself parse.
        let sent = Message::from_vec(&reply.bytes)
            .unwrap_or_else(|e| panic!("unparseable answer ({e}) to {raw:?}"));
        // Never answer a response: two servers doing so bounce packets forever.
        assert!(
            raw.get(2).is_some_and(|b| b & 0x80 == 0),
            "answered a response: {raw:?}"
        );
        assert_eq!(
            reply.bytes.get(..2),
            raw.get(..2),
            "an answer under another id to {raw:?}"
        );
        // By number: 16 decodes as BADSIG, the code BADVERS shares.
        assert_eq!(
            u16::from(sent.metadata.response_code),
            u16::from(reply.rcode),
            "{raw:?}"
        );
        if client == outside {
            assert!(
                matches!(reply.rcode, ResponseCode::Refused | ResponseCode::FormErr),
                "a refused client got {:?} for {raw:?}",
                reply.rcode
            );
        }
        if let Ok(req) = Message::from_vec(raw) {
            check_reply(&req, &sent, &reply, limit, raw);
        }
    }
}

/// The promises an answer to a query that parsed keeps.
fn check_reply(req: &Message, sent: &Message, reply: &Reply, limit: Option<usize>, raw: &[u8]) {
    let bytes = &reply.bytes;
    // Within the transport's limit: truncation makes it fit.
    let limit = limit.unwrap_or_else(|| udp_limit(req));
    assert!(
        bytes.len() <= limit || sent.answers.is_empty(),
        "{} bytes over a limit of {limit} for {raw:?}",
        bytes.len()
    );
    // An OPT record for a client that sent one (RFC 6891 §6.1.1), version 0 and with
    // the client's DO bit (RFC 3225 §3); none for a client that did not.
    assert_eq!(sent.edns.is_some(), req.edns.is_some(), "OPT for {raw:?}");
    if let (Some(ours), Some(theirs)) = (&sent.edns, &req.edns) {
        assert_eq!(ours.version(), 0, "{raw:?}");
        assert_eq!(
            ours.flags().dnssec_ok,
            theirs.flags().dnssec_ok,
            "DO for {raw:?}"
        );
        if theirs.version() > 0 && !reply.refused {
            assert_eq!(u16::from(sent.metadata.response_code), 16, "{raw:?}");
        }
    }
    assert_eq!(
        sent.metadata.recursion_desired, req.metadata.recursion_desired,
        "RD for {raw:?}"
    );
    if let Some(q) = req.queries.first() {
        // No IN data for another class, and no zone transfer.
        if q.query_class() != DNSClass::IN {
            assert!(
                sent.answers
                    .iter()
                    .chain(&sent.authorities)
                    .chain(&sent.additionals)
                    .all(|r| r.dns_class == q.query_class()),
                "IN data for class {} in {raw:?}",
                q.query_class()
            );
        }
        if matches!(q.query_type(), RecordType::AXFR | RecordType::IXFR) {
            assert!(sent.answers.is_empty(), "a transfer for {raw:?}");
        }
    }
}

/// Services in every mode, with healthy and unhealthy tasks, IPv4 and IPv6.
pub fn sample_snapshot() -> Snapshot {
    let mut s = Replica::new("fuzz", 1, VipPool::default(), ReplicaConfig::default());
    let mut rr = ServiceSpec::new("rr", vec![PortSpec::tcp(None, 5432)]);
    rr.mode = Mode::Dnsrr;
    let services = [
        ServiceSpec::new("web", vec![PortSpec::tcp(Some(8080), 80)]),
        rr,
    ];
    for spec in services {
        let name = spec.name.clone();
        s.create_service(spec, 0).expect("valid");
        for (i, ip) in ["10.0.0.1", "10.0.0.2", "fd00::3"].iter().enumerate() {
            let id = format!("{name}.{i}");
            let task = TaskSpec {
                service: name.clone(),
                id: Some(id.clone()),
                ip: ip.parse().expect("ip"),
                port: None,
                state: TaskState::Active,
                observed: None,
            };
            s.add_task(task, mesh_core::TaskSource::Api, 0)
                .expect("valid");
            s.set_health(
                &name,
                &id,
                if i == 1 {
                    Health::Unhealthy
                } else {
                    Health::Healthy
                },
                0,
            );
        }
    }
    s.snapshot()
}

/// Queries to start the fuzzer and the mutation test from: every record type for
/// every kind of name, with and without EDNS, DO, a newer EDNS version, and the CH and
/// HS classes.
pub fn seeds() -> Vec<Vec<u8>> {
    use hickory_proto::op::{Edns, MessageType, OpCode, Query};
    use hickory_proto::rr::Name;

    let names = [
        "web.mesh.",
        "tasks.web.mesh.",
        "_tcp80._tcp.web.mesh.",
        "rr.",
        "3.0.0.10.in-addr.arpa.",
        "mesh.",
        "x.mesh.",
        "version.bind.",
    ];
    let types = [
        RecordType::A,
        RecordType::AAAA,
        RecordType::SRV,
        RecordType::PTR,
        RecordType::ANY,
        RecordType::SOA,
        RecordType::NS,
        RecordType::TXT,
        RecordType::AXFR,
        RecordType::IXFR,
    ];
    let mut seeds = Vec::new();
    let query = |name: &str, t, class| {
        let mut m = Message::new(7, MessageType::Query, OpCode::Query);
        let mut q = Query::query(Name::from_ascii(name).expect("name"), t);
        q.set_query_class(class);
        m.add_query(q);
        m
    };
    for name in names {
        for t in types {
            let mut m = query(name, t, DNSClass::IN);
            m.set_edns(Edns::new());
            seeds.push(m.to_vec().expect("encode"));
        }
    }
    // Without EDNS (512 bytes: the big answers truncate), with DO, with an EDNS
    // version we do not speak, and in the CH and HS classes.
    for name in ["tasks.web.mesh.", "_tcp5432._tcp.rr.mesh.", "mesh."] {
        let mut m = query(name, RecordType::ANY, DNSClass::IN);
        m.metadata.recursion_desired = true;
        seeds.push(m.to_vec().expect("encode"));
    }
    for version in [0, 1] {
        let mut m = query("web.mesh.", RecordType::A, DNSClass::IN);
        let mut edns = Edns::new();
        edns.set_dnssec_ok(true).set_version(version);
        m.set_edns(edns);
        seeds.push(m.to_vec().expect("encode"));
    }
    for name in ["version.bind.", "id.server.", "web.mesh.", "example.test."] {
        for class in [DNSClass::CH, DNSClass::HS] {
            seeds.push(
                query(name, RecordType::TXT, class)
                    .to_vec()
                    .expect("encode"),
            );
        }
    }
    seeds
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes the seeds where `scripts/fuzz.sh` starts the fuzzer from
    /// (`MESH_FUZZ_SEEDS`); does nothing without it.
    #[test]
    #[ignore = "run by scripts/fuzz.sh"]
    fn write_fuzz_seeds() {
        mesh_core::mutate::write_seeds("dns_request", &seeds()).unwrap();
    }

    /// A deterministic stand-in for the fuzzer that runs in every CI: valid queries,
    /// mutated by bit flips, truncation and splices, through the whole request path.
    #[test]
    fn mutated_queries_never_panic() {
        let zone = Zone::build(&sample_snapshot(), "mesh", 5);
        let seeds = seeds();
        let mut mutator = mesh_core::mutate::Mutator::new(0x9e37_79b9_7f4a_7c15);
        for round in 0..200_000u64 {
            let mut p = mutator.mutate(&seeds);
            // DNS's own trap: a compression pointer where a label was.
            if round % 5 == 0 && !p.is_empty() {
                let i = mutator.next_u64() as usize % p.len();
                p[i] = 0xc0 | (mutator.next_u64() as u8 & 0x3f);
            }
            exercise(&zone, &p);
        }
    }
}
