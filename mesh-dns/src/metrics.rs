//! DNS metrics. Counter handles for every (qtype, rcode) pair are resolved once, so
//! the per-query path does no label hashing.

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry};

const QTYPES: [&str; 8] = ["A", "AAAA", "SRV", "PTR", "SOA", "ANY", "TXT", "other"];
const RCODES: [&str; 7] = [
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "other",
];

#[derive(Clone)]
pub struct DnsMetrics {
    queries: Vec<IntCounter>,
    pub forwarded: IntCounter,
    pub forward_failures: IntCounter,
    pub overloaded: IntCounter,
    pub cache_hits: IntCounter,
    pub refused: IntCounter,
    pub truncated: IntCounter,
    pub malformed: IntCounter,
    pub latency: Histogram,
}

fn qtype_index(t: RecordType) -> usize {
    match t {
        RecordType::A => 0,
        RecordType::AAAA => 1,
        RecordType::SRV => 2,
        RecordType::PTR => 3,
        RecordType::SOA => 4,
        RecordType::ANY => 5,
        RecordType::TXT => 6,
        _ => 7,
    }
}

fn rcode_index(r: ResponseCode) -> usize {
    match r {
        ResponseCode::NoError => 0,
        ResponseCode::FormErr => 1,
        ResponseCode::ServFail => 2,
        ResponseCode::NXDomain => 3,
        ResponseCode::NotImp => 4,
        ResponseCode::Refused => 5,
        _ => 6,
    }
}

impl DnsMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let queries = IntCounterVec::new(
            Opts::new(
                "mesh_dns_queries_total",
                "DNS queries answered, by type and response code",
            ),
            &["qtype", "rcode"],
        )?;
        registry.register(Box::new(queries.clone()))?;
        let counter = |name: &str, help: &str| -> prometheus::Result<IntCounter> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let latency = Histogram::with_opts(
            HistogramOpts::new(
                "mesh_dns_request_duration_seconds",
                "Time from receiving a query to sending its answer",
            )
            .buckets(vec![
                0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.005, 0.025,
                0.1, 0.5, 2.0, 5.0,
            ]),
        )?;
        registry.register(Box::new(latency.clone()))?;
        let mut handles = Vec::with_capacity(QTYPES.len() * RCODES.len());
        for q in QTYPES {
            for r in RCODES {
                handles.push(queries.with_label_values(&[q, r]));
            }
        }
        Ok(Self {
            queries: handles,
            forwarded: counter(
                "mesh_dns_forwarded_total",
                "Queries forwarded to an upstream resolver",
            )?,
            forward_failures: counter(
                "mesh_dns_forward_failures_total",
                "Forwarded queries no upstream answered (SERVFAIL)",
            )?,
            overloaded: counter(
                "mesh_dns_forward_overload_total",
                "Queries answered SERVFAIL at once because too many forwards were in flight",
            )?,
            cache_hits: counter(
                "mesh_dns_cache_hits_total",
                "Forwarded names answered from the cache",
            )?,
            refused: counter(
                "mesh_dns_refused_total",
                "Queries from clients outside the allowed networks",
            )?,
            truncated: counter(
                "mesh_dns_truncated_total",
                "UDP answers sent with TC set because they did not fit",
            )?,
            malformed: counter(
                "mesh_dns_malformed_total",
                "Packets that did not parse (FORMERR or dropped)",
            )?,
            latency,
        })
    }

    pub fn query(&self, qtype: RecordType, rcode: ResponseCode) {
        self.queries[qtype_index(qtype) * RCODES.len() + rcode_index(rcode)].inc();
    }
}
