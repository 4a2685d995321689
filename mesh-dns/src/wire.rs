//! Sizes, truncation and the answers a server gives before any lookup.

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};

/// The most we put in a UDP answer: the client's EDNS size, at least 512, at most
/// 1232 (no IP fragmentation on common paths, as DNS Flag Day 2020 advises).
pub const MAX_UDP: u16 = 1232;

pub fn udp_limit(req: &Message) -> usize {
    usize::from(
        req.edns
            .as_ref()
            .map_or(512, |e| e.max_payload().clamp(512, MAX_UDP)),
    )
}

/// Adds our OPT record when the client sent one: version 0, our payload size, and the
/// client's DO bit (RFC 3225 §3: the response copies it, so a validating client knows
/// its request for DNSSEC records was seen). The extended RCODE is filled in from the
/// response code when the message is encoded.
pub fn echo_edns(req: &Message, resp: &mut Message) {
    if let Some(theirs) = &req.edns {
        let mut edns = Edns::new();
        edns.set_max_payload(MAX_UDP);
        edns.set_dnssec_ok(theirs.flags().dnssec_ok);
        resp.set_edns(edns);
    }
}

/// The EDNS version we implement (RFC 6891).
pub const EDNS_VERSION: u8 = 0;

/// BADVERS for a client whose OPT record asks for an EDNS version above ours
/// (RFC 6891 §6.1.3); the answer carries our OPT record with version 0, so the client
/// can retry with it.
pub fn check_edns_version(req: &Message) -> Result<(), ResponseCode> {
    match &req.edns {
        Some(edns) if edns.version() > EDNS_VERSION => Err(ResponseCode::BADVERS),
        _ => Ok(()),
    }
}

/// Encodes `resp` within `limit` bytes. Returns the bytes and whether TC is set.
///
/// What does not fit goes in this order:
/// 1. the additional records, without TC: the answer is complete without them
///    (RFC 2181 §9);
/// 2. then the authority records, and as many answer records from the end as needed,
///    with TC set. The client retries over TCP for the complete answer; a client that
///    cannot (musl before 1.2.4) still gets the records that fit rather than none.
///
/// The question and the OPT record always stay, and the counts always match what is
/// sent: each candidate is encoded whole, never cut.
pub fn encode(resp: &Message, limit: usize) -> Option<(Vec<u8>, bool)> {
    let bytes = resp.to_vec().ok()?;
    if bytes.len() <= limit {
        return Some((bytes, false));
    }
    let mut cut = resp.clone();
    cut.additionals.clear();
    if !resp.additionals.is_empty() {
        let bytes = cut.to_vec().ok()?;
        if bytes.len() <= limit {
            return Some((bytes, false));
        }
    }
    cut.authorities.clear();
    cut.metadata.truncation = true;
    let answers = std::mem::take(&mut cut.answers);
    // Binary search for the most answer records that fit: a record more never makes
    // the message shorter. `fits` holds the best encoding found so far.
    let mut fits = cut.to_vec().ok()?;
    let (mut lo, mut hi) = (0, answers.len());
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        cut.answers = answers[..mid].to_vec();
        let bytes = cut.to_vec().ok()?;
        if bytes.len() <= limit {
            (lo, fits) = (mid, bytes);
        } else {
            hi = mid - 1;
        }
    }
    Some((fits, true))
}

/// A FORMERR for a packet that does not parse, when it at least has a header and is a
/// query; anything else is dropped (never answer a response: that is how loops start).
pub fn formerr(raw: &[u8]) -> Option<Vec<u8>> {
    if raw.len() < 12 || raw[2] & 0x80 != 0 {
        return None;
    }
    let mut out = vec![0u8; 12];
    out[0..2].copy_from_slice(&raw[0..2]);
    out[2] = 0x80 | (raw[2] & 0x79); // QR, the opcode and RD of the query
    out[3] = ResponseCode::FormErr.low();
    Some(out)
}

/// Checks that a parsed message is a plain query we can answer; otherwise the rcode.
pub fn check_query(req: &Message) -> Result<(), ResponseCode> {
    if req.metadata.message_type != MessageType::Query {
        return Err(ResponseCode::FormErr);
    }
    if req.metadata.op_code != OpCode::Query {
        return Err(ResponseCode::NotImp);
    }
    if req.queries.len() != 1 {
        return Err(ResponseCode::FormErr);
    }
    Ok(())
}
