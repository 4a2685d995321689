//! The request path, once, as pure functions: bytes and a client in, what to send out.
//! The UDP and TCP servers, the fuzz target and the mutation test all run this code,
//! so what is fuzzed is what is served. No I/O and no metrics here: the server records
//! metrics from the returned [`Reply`].

use std::net::IpAddr;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::RecordType;
use mesh_core::Cidr;

use crate::answer::{Resolution, resolve, response_to};
use crate::wire::{check_edns_version, check_query, echo_edns, encode, formerr, udp_limit};
use crate::zone::Zone;

/// What to do with one request.
#[derive(Debug)]
pub enum Step {
    /// Send these bytes to the client.
    Reply(Reply),
    /// Not a mesh name: ask the upstream resolvers, then answer with [`relay`].
    Forward(Message),
    /// Send nothing: the packet is a response (answering those is how loops start),
    /// unparseable without even a query header, or its answer would not encode.
    Drop {
        /// The packet did not parse.
        malformed: bool,
    },
}

/// An answer ready to send, with what the metrics need to know about it.
#[derive(Debug, Clone)]
pub struct Reply {
    pub bytes: Vec<u8>,
    /// The type of the question; `Unknown(0)` when there was none.
    pub qtype: RecordType,
    pub rcode: ResponseCode,
    /// The answer did not fit the size limit: the question and the answer records
    /// that fit went, with TC set (see [`crate::wire::encode`]).
    pub truncated: bool,
    /// REFUSED because the client is outside the allow list.
    pub refused: bool,
    /// A FORMERR for a packet that did not parse.
    pub malformed: bool,
}

/// Answers `raw`, received from `client`, from `zone`. `limit` is the largest answer
/// the transport takes: `None` for UDP (the client's EDNS size, 512 without EDNS),
/// `Some(65_535)` for TCP.
pub fn respond(
    zone: &Zone,
    allow: &[Cidr],
    raw: &[u8],
    client: IpAddr,
    limit: Option<usize>,
) -> Step {
    let req = match Message::from_vec(raw) {
        Ok(m) => m,
        Err(_) => {
            return match formerr(raw) {
                Some(bytes) => Step::Reply(Reply {
                    bytes,
                    qtype: RecordType::Unknown(0),
                    rcode: ResponseCode::FormErr,
                    truncated: false,
                    refused: false,
                    malformed: true,
                }),
                None => Step::Drop { malformed: true },
            };
        }
    };
    if req.metadata.message_type != MessageType::Query {
        return Step::Drop { malformed: false };
    }
    // Before any lookup or forward, so that this is never an open resolver.
    if !allow.iter().any(|c| c.contains(client)) {
        return finish(&req, response_to(&req, ResponseCode::Refused), limit, true);
    }
    // Before the rest: a client that speaks a newer EDNS learns ours and retries.
    if let Err(code) = check_edns_version(&req).and_then(|()| check_query(&req)) {
        return finish(&req, response_to(&req, code), limit, false);
    }
    match resolve(zone, &req) {
        Resolution::Answer(resp) => finish(&req, resp, limit, false),
        Resolution::Forward => Step::Forward(req),
    }
}

/// The answer to a forwarded `req`: the upstream's answer (fresh or cached) under the
/// client's id and RD bit, or SERVFAIL when no upstream gave one (`None`). `None` out:
/// nothing to send.
pub fn relay(req: &Message, upstream: Option<Message>, limit: Option<usize>) -> Option<Reply> {
    let resp = match upstream {
        Some(mut resp) => {
            resp.metadata.id = req.metadata.id;
            // RFC 1035 §4.1.1: RD is copied from the query. A cached answer was
            // fetched for another client, who may have asked otherwise.
            resp.metadata.recursion_desired = req.metadata.recursion_desired;
            // The upstream's OPT describes its link to us, not ours to the client;
            // `finish` adds ours when the client sent one.
            resp.edns = None;
            resp
        }
        None => response_to(req, ResponseCode::ServFail),
    };
    match finish(req, resp, limit, false) {
        Step::Reply(reply) => Some(reply),
        Step::Forward(_) | Step::Drop { .. } => None,
    }
}

fn finish(req: &Message, mut resp: Message, limit: Option<usize>, refused: bool) -> Step {
    let limit = limit.unwrap_or_else(|| udp_limit(req));
    echo_edns(req, &mut resp);
    let Some((bytes, truncated)) = encode(&resp, limit) else {
        return Step::Drop { malformed: false };
    };
    Step::Reply(Reply {
        bytes,
        qtype: req
            .queries
            .first()
            .map_or(RecordType::Unknown(0), |q| q.query_type()),
        rcode: resp.metadata.response_code,
        truncated,
        refused,
        malformed: false,
    })
}

#[cfg(test)]
mod tests {
    use hickory_proto::op::{Edns, OpCode, Query};
    use hickory_proto::rr::{DNSClass, Name, RData};

    use super::*;
    use crate::config::DnsConfig;
    use crate::fuzzing::sample_snapshot;

    fn query(name: &str, qtype: RecordType) -> Message {
        let mut m = Message::new(42, MessageType::Query, OpCode::Query);
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        m
    }

    fn run(m: &Message, client: &str, limit: Option<usize>) -> Step {
        let zone = Zone::build(&sample_snapshot(), "mesh", 5);
        let allow = DnsConfig::default().allow;
        respond(
            &zone,
            &allow,
            &m.to_vec().unwrap(),
            client.parse().unwrap(),
            limit,
        )
    }

    fn reply(step: Step) -> (Reply, Message) {
        let Step::Reply(reply) = step else {
            panic!("no reply: {step:?}");
        };
        let m = Message::from_vec(&reply.bytes).unwrap();
        (reply, m)
    }

    #[test]
    fn mesh_names_are_answered_and_others_forwarded() {
        let (r, m) = reply(run(&query("web.mesh.", RecordType::A), "127.0.0.1", None));
        assert_eq!((r.rcode, r.qtype), (ResponseCode::NoError, RecordType::A));
        assert!(!r.refused && !r.malformed && !r.truncated);
        assert_eq!((m.metadata.id, m.answers.len()), (42, 1));
        assert!(matches!(
            run(&query("example.test.", RecordType::A), "::1", None),
            Step::Forward(req) if req.metadata.id == 42
        ));
    }

    #[test]
    fn clients_outside_the_allow_list_are_refused_before_any_lookup() {
        for name in ["web.mesh.", "example.test."] {
            let (r, m) = reply(run(&query(name, RecordType::A), "192.0.2.1", None));
            assert!(r.refused, "{name}");
            assert_eq!(m.metadata.response_code, ResponseCode::Refused);
            assert!(m.answers.is_empty());
        }
    }

    #[test]
    fn queries_we_cannot_answer_get_an_error_code_not_silence() {
        let mut notify = query("web.mesh.", RecordType::SOA);
        notify.metadata.op_code = OpCode::Notify;
        let mut two = query("web.mesh.", RecordType::A);
        two.add_query(Query::query(
            Name::from_ascii("rr.mesh.").unwrap(),
            RecordType::A,
        ));
        for (m, code) in [(notify, ResponseCode::NotImp), (two, ResponseCode::FormErr)] {
            let (r, sent) = reply(run(&m, "127.0.0.1", None));
            assert_eq!((r.rcode, sent.metadata.response_code), (code, code));
            assert!(!r.malformed);
        }
    }

    #[test]
    fn junk_gets_formerr_and_responses_are_never_answered() {
        let zone = Zone::build(&sample_snapshot(), "mesh", 5);
        let allow = DnsConfig::default().allow;
        let client = "127.0.0.1".parse().unwrap();
        let mut junk = query("web.mesh.", RecordType::A).to_vec().unwrap();
        junk.truncate(15);
        let (r, m) = reply(respond(&zone, &allow, &junk, client, None));
        assert!(r.malformed);
        assert_eq!((m.metadata.id, r.rcode), (42, ResponseCode::FormErr));
        assert!(matches!(
            respond(&zone, &allow, &junk[..5], client, None),
            Step::Drop { malformed: true }
        ));
        let mut response = query("web.mesh.", RecordType::A);
        response.metadata.message_type = MessageType::Response;
        assert!(matches!(
            run(&response, "127.0.0.1", None),
            Step::Drop { malformed: false }
        ));
    }

    #[test]
    fn a_truncated_answer_keeps_the_records_that_fit() {
        let mut m = query("tasks.web.mesh.", RecordType::ANY);
        m.set_edns(Edns::new());
        let (r, full) = reply(run(&m, "127.0.0.1", Some(65_535)));
        assert!(!r.truncated && !full.metadata.truncation);
        assert!(full.edns.is_some(), "our OPT echoes the client's");
        assert_eq!(full.answers.len(), 2);
        let (r, cut) = reply(run(&m, "127.0.0.1", Some(r.bytes.len() - 1)));
        assert!(r.truncated && cut.metadata.truncation);
        assert_eq!(cut.answers.len(), 1, "one record fits");
        assert_eq!((cut.queries, cut.edns.is_some()), (m.queries.clone(), true));
        assert!(r.bytes.len() < full.to_vec().unwrap().len());

        // Additional records go first, and without TC (RFC 2181 §9): the answer is
        // complete without them.
        let srv = query("_tcp5432._tcp.rr.mesh.", RecordType::SRV);
        let (r, full) = reply(run(&srv, "127.0.0.1", None));
        assert!(!r.truncated && !full.additionals.is_empty());
        let (r, cut) = reply(run(&srv, "127.0.0.1", Some(r.bytes.len() - 1)));
        assert!(!r.truncated && !cut.metadata.truncation);
        assert_eq!(cut.answers, full.answers);
        assert!(cut.additionals.is_empty());

        // Not even one record fits: the question alone, with TC.
        let q = query("tasks.web.mesh.", RecordType::A).to_vec().unwrap();
        let (r, cut) = reply(run(
            &query("tasks.web.mesh.", RecordType::A),
            "127.0.0.1",
            Some(q.len()),
        ));
        assert!(r.truncated && cut.answers.is_empty() && r.bytes.len() == q.len());
    }

    #[test]
    fn the_do_bit_is_copied_into_the_answer() {
        for dnssec_ok in [false, true] {
            let mut m = query("web.mesh.", RecordType::A);
            let mut edns = Edns::new();
            edns.set_dnssec_ok(dnssec_ok);
            m.set_edns(edns);
            let (_, sent) = reply(run(&m, "127.0.0.1", None));
            assert_eq!(sent.edns.unwrap().flags().dnssec_ok, dnssec_ok);
            // And on a relayed answer, whatever the upstream's OPT said.
            let mut upstream = Message::response(7, OpCode::Query);
            let mut theirs = Edns::new();
            theirs.set_dnssec_ok(!dnssec_ok);
            upstream.set_edns(theirs);
            let r = relay(&m, Some(upstream), None).unwrap();
            let sent = Message::from_vec(&r.bytes).unwrap();
            assert_eq!(sent.edns.unwrap().flags().dnssec_ok, dnssec_ok);
            let r = relay(&m, None, None).unwrap();
            let sent = Message::from_vec(&r.bytes).unwrap();
            assert_eq!(sent.edns.unwrap().flags().dnssec_ok, dnssec_ok);
        }
    }

    #[test]
    fn edns_versions_above_0_get_badvers() {
        for name in ["web.mesh.", "example.test."] {
            let mut m = query(name, RecordType::A);
            let mut edns = Edns::new();
            edns.set_version(1);
            m.set_edns(edns);
            let (r, sent) = reply(run(&m, "127.0.0.1", None));
            assert_eq!(u16::from(r.rcode), 16, "{name}");
            assert_eq!(u16::from(sent.metadata.response_code), 16, "{name}");
            assert_eq!(r.bytes[3] & 0x0f, 0, "the low bits are in the header");
            let edns = sent.edns.expect("an OPT record carries the high bits");
            assert_eq!((edns.rcode_high(), edns.version()), (1, 0));
            assert!(sent.answers.is_empty());
        }
    }

    fn classed(name: &str, qtype: RecordType, class: DNSClass) -> Message {
        let mut m = query(name, qtype);
        m.queries[0].set_query_class(class);
        m
    }

    fn txt(m: &Message) -> Vec<String> {
        m.answers
            .iter()
            .map(|r| match &r.data {
                RData::TXT(t) => t.to_string(),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn chaos_names_are_answered_and_other_classes_refused() {
        let version = format!("mesh {}", env!("CARGO_PKG_VERSION"));
        for (name, want) in [
            ("version.bind.", version.as_str()),
            ("VERSION.SERVER.", version.as_str()),
            ("id.server.", "mesh"),
        ] {
            for qtype in [RecordType::TXT, RecordType::ANY] {
                let (r, sent) = reply(run(&classed(name, qtype, DNSClass::CH), "127.0.0.1", None));
                assert_eq!(r.rcode, ResponseCode::NoError, "{name}");
                assert_eq!(txt(&sent), [want], "{name}");
                assert_eq!(sent.answers[0].dns_class, DNSClass::CH);
                assert_eq!(sent.queries[0].query_class(), DNSClass::CH);
            }
            // The name exists in CH, not with this type.
            let (r, sent) = reply(run(
                &classed(name, RecordType::A, DNSClass::CH),
                "127.0.0.1",
                None,
            ));
            assert_eq!(r.rcode, ResponseCode::NoError, "{name}");
            assert!(sent.answers.is_empty());
        }
        for class in [
            DNSClass::CH,
            DNSClass::HS,
            DNSClass::ANY,
            DNSClass::NONE,
            DNSClass::Unknown(77),
        ] {
            for name in [
                "web.mesh.",
                "tasks.web.mesh.",
                "mesh.",
                "example.test.",
                "3.0.0.10.in-addr.arpa.",
                "hostname.bind.",
            ] {
                let (r, sent) = reply(run(&classed(name, RecordType::A, class), "127.0.0.1", None));
                assert_eq!(r.rcode, ResponseCode::Refused, "{name} {class:?}");
                assert!(sent.answers.is_empty() && sent.authorities.is_empty());
            }
            let (r, _) = reply(run(
                &classed("version.bind.", RecordType::TXT, class),
                "127.0.0.1",
                None,
            ));
            let want = if class == DNSClass::CH {
                ResponseCode::NoError
            } else {
                ResponseCode::Refused
            };
            assert_eq!(r.rcode, want, "{class:?}");
        }
        // And for a client outside the allow list, still REFUSED before anything.
        let (r, _) = reply(run(
            &classed("version.bind.", RecordType::TXT, DNSClass::CH),
            "192.0.2.1",
            None,
        ));
        assert!(r.refused);
    }

    #[test]
    fn zone_transfers_are_refused_and_never_forwarded() {
        for name in ["mesh.", "web.mesh.", "example.test.", "0.10.in-addr.arpa."] {
            for qtype in [RecordType::AXFR, RecordType::IXFR] {
                for limit in [None, Some(65_535)] {
                    let (r, sent) = reply(run(&query(name, qtype), "127.0.0.1", limit));
                    assert_eq!(r.rcode, ResponseCode::Refused, "{name} {qtype}");
                    assert!(!r.refused, "not an allow-list refusal");
                    assert!(sent.answers.is_empty() && sent.authorities.is_empty());
                }
            }
        }
    }

    #[test]
    fn the_apex_has_ns_with_glue_and_the_ns_name_resolves() {
        let listen: Vec<std::net::SocketAddr> = vec![
            "192.0.2.53:53".parse().unwrap(),
            "[2001:db8::53]:53".parse().unwrap(),
        ];
        let zone = Zone::build(&sample_snapshot(), "mesh", 5).with_listen(&listen);
        let allow = DnsConfig::default().allow;
        let ask = |name: &str, qtype| {
            let raw = query(name, qtype).to_vec().unwrap();
            reply(respond(
                &zone,
                &allow,
                &raw,
                "127.0.0.1".parse().unwrap(),
                None,
            ))
            .1
        };
        let ns = ask("mesh.", RecordType::NS);
        assert!(ns.metadata.authoritative);
        let [ns_record] = &ns.answers[..] else {
            panic!("{ns:?}")
        };
        let RData::NS(target) = &ns_record.data else {
            panic!("{ns:?}")
        };
        let glue: Vec<String> = ns
            .additionals
            .iter()
            .map(|r| {
                assert_eq!(&r.name, &target.0);
                r.data.to_string()
            })
            .collect();
        assert_eq!(glue, ["192.0.2.53", "2001:db8::53"]);
        let soa = ask("mesh.", RecordType::SOA);
        let RData::SOA(soa) = &soa.answers[0].data else {
            panic!("{soa:?}")
        };
        assert_eq!(&soa.mname, &target.0, "MNAME is the name server");
        let target = target.0.to_ascii();
        let a = ask(&target, RecordType::A);
        assert_eq!(
            a.answers
                .iter()
                .map(|r| r.data.to_string())
                .collect::<Vec<_>>(),
            ["192.0.2.53"]
        );
        let aaaa = ask(&target, RecordType::AAAA);
        assert_eq!(
            aaaa.answers
                .iter()
                .map(|r| r.data.to_string())
                .collect::<Vec<_>>(),
            ["2001:db8::53"]
        );
        let any = ask("mesh.", RecordType::ANY);
        let mut types: Vec<RecordType> = any.answers.iter().map(|r| r.record_type()).collect();
        types.sort();
        let mut want = vec![
            RecordType::SOA,
            RecordType::NS,
            RecordType::A,
            RecordType::AAAA,
        ];
        want.sort();
        assert_eq!(types, want);
        // Types the apex does not have: NODATA with the SOA.
        let mx = ask("mesh.", RecordType::MX);
        assert_eq!(mx.metadata.response_code, ResponseCode::NoError);
        assert!(mx.answers.is_empty() && mx.authorities.len() == 1);
    }

    #[test]
    fn relayed_answers_copy_rd_from_the_query() {
        for rd in [false, true] {
            let mut req = query("example.test.", RecordType::A);
            req.metadata.recursion_desired = rd;
            let mut upstream = Message::response(7, OpCode::Query);
            upstream.metadata.recursion_desired = !rd;
            for up in [Some(upstream), None] {
                let r = relay(&req, up, None).unwrap();
                let sent = Message::from_vec(&r.bytes).unwrap();
                assert_eq!(sent.metadata.recursion_desired, rd);
            }
        }
    }

    #[test]
    fn relayed_answers_take_the_client_id_and_failures_servfail() {
        let mut req = query("example.test.", RecordType::A);
        req.set_edns(Edns::new());
        let mut upstream = Message::response(7, OpCode::Query);
        upstream.metadata.response_code = ResponseCode::NXDomain;
        let mut big = Edns::new();
        big.set_max_payload(4096);
        upstream.set_edns(big);
        let r = relay(&req, Some(upstream), None).unwrap();
        let m = Message::from_vec(&r.bytes).unwrap();
        assert_eq!((m.metadata.id, r.rcode), (42, ResponseCode::NXDomain));
        assert_eq!(m.edns.unwrap().max_payload(), crate::wire::MAX_UDP);
        let r = relay(&req, None, None).unwrap();
        assert_eq!(r.rcode, ResponseCode::ServFail);
        assert_eq!(Message::from_vec(&r.bytes).unwrap().metadata.id, 42);
    }
}
