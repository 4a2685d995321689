//! The request path, once, as pure functions: bytes and a client in, what to send out.
//! The UDP and TCP servers, the fuzz target and the mutation test all run this code,
//! so what is fuzzed is what is served. No I/O and no metrics here: the server records
//! metrics from the returned [`Reply`].

use std::net::IpAddr;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::RecordType;
use mesh_core::Cidr;

use crate::answer::{Resolution, resolve, response_to};
use crate::wire::{check_query, echo_edns, encode, formerr, udp_limit};
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
    /// The answer did not fit the size limit: the question alone went, with TC set.
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
    if let Err(code) = check_query(&req) {
        return finish(&req, response_to(&req, code), limit, false);
    }
    match resolve(zone, &req) {
        Resolution::Answer(resp) => finish(&req, resp, limit, false),
        Resolution::Forward => Step::Forward(req),
    }
}

/// The answer to a forwarded `req`: the upstream's answer under the client's id, or
/// SERVFAIL when no upstream gave one (`None`). `None` out: nothing to send.
pub fn relay(req: &Message, upstream: Option<Message>, limit: Option<usize>) -> Option<Reply> {
    let resp = match upstream {
        Some(mut resp) => {
            resp.metadata.id = req.metadata.id;
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
    use hickory_proto::rr::Name;

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
    fn the_limit_truncates() {
        let mut m = query("tasks.web.mesh.", RecordType::ANY);
        m.set_edns(Edns::new());
        let (r, full) = reply(run(&m, "127.0.0.1", Some(65_535)));
        assert!(!r.truncated && !full.metadata.truncation);
        assert!(full.edns.is_some(), "our OPT echoes the client's");
        let (r, cut) = reply(run(&m, "127.0.0.1", Some(r.bytes.len() - 1)));
        assert!(r.truncated && cut.metadata.truncation && cut.answers.is_empty());
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
