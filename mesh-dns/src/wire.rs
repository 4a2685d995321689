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

/// Adds our OPT record when the client sent one.
pub fn echo_edns(req: &Message, resp: &mut Message) {
    if req.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(MAX_UDP);
        resp.set_edns(edns);
    }
}

/// Encodes `resp`; if it exceeds `limit`, sends the question alone with TC set, and the
/// client retries over TCP. Returns the bytes and whether they were truncated.
pub fn encode(resp: &Message, limit: usize) -> Option<(Vec<u8>, bool)> {
    let bytes = resp.to_vec().ok()?;
    if bytes.len() <= limit {
        return Some((bytes, false));
    }
    let bytes = resp.truncate().to_vec().ok()?;
    Some((bytes, true))
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
