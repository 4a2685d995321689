//! mesh-dns against real clients over real sockets: hickory-resolver, raw queries and
//! `dig` where installed.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::{Resolver, TokioResolver};
use mesh_core::{
    Health, Mode, PortSpec, Replica, ReplicaConfig, ServiceSpec, Snapshot, TaskSpec, TaskState,
    VipPool,
};
use mesh_dns::{DnsConfig, DnsMetrics, DnsServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;

fn snapshot() -> Snapshot {
    let mut s = Replica::new("h1", 1, VipPool::default(), ReplicaConfig::default());
    let mut web = ServiceSpec::new(
        "web",
        vec![PortSpec {
            name: "http".into(),
            ..PortSpec::tcp(Some(8080), 80)
        }],
    );
    web.normalize().unwrap();
    s.create_service(web, 0).unwrap();
    let mut rr = ServiceSpec::new(
        "rr",
        vec![PortSpec {
            name: "pg".into(),
            ..PortSpec::tcp(None, 5432)
        }],
    );
    rr.mode = Mode::Dnsrr;
    s.create_service(rr, 0).unwrap();
    s.create_service(ServiceSpec::new("big", vec![PortSpec::tcp(None, 80)]), 0)
        .unwrap();
    s.create_service(ServiceSpec::new("forty", vec![PortSpec::tcp(None, 80)]), 0)
        .unwrap();
    // "ns" is a valid service name: it must not collide with the zone's name server.
    s.create_service(ServiceSpec::new("ns", vec![PortSpec::tcp(None, 53)]), 0)
        .unwrap();
    let mut add = |svc: &str, id: &str, ip: &str| {
        s.add_task(
            TaskSpec {
                service: svc.into(),
                id: Some(id.into()),
                ip: ip.parse().unwrap(),
                port: None,
                state: TaskState::Active,
                observed: None,
            },
            mesh_core::TaskSource::Api,
            0,
        )
        .unwrap();
        s.set_health(svc, id, Health::Healthy, 0);
    };
    for i in 1..=3 {
        add("web", &format!("web.{i}"), &format!("10.0.0.{i}"));
    }
    add("rr", "rr.1", "10.0.1.1");
    add("rr", "rr.2", "10.0.1.2");
    for i in 0..150 {
        add(
            "big",
            &format!("big.{i}"),
            &format!("10.1.{}.{}", i / 200, i % 200 + 1),
        );
    }
    for i in 1..=40 {
        add("forty", &format!("forty.{i}"), &format!("10.2.0.{i}"));
    }
    // An unhealthy task is never answered.
    add("web", "web.sick", "10.0.0.99");
    s.set_health("web", "web.sick", Health::Unhealthy, 0);
    s.snapshot()
}

struct Running {
    addr: SocketAddr,
    registry: prometheus::Registry,
    server: Arc<DnsServer>,
    stop: CancellationToken,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn start(config: DnsConfig, snap: &Snapshot) -> Running {
    let registry = prometheus::Registry::new();
    let metrics = DnsMetrics::new(&registry).unwrap();
    let config = DnsConfig {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        ..config
    };
    config.validate().unwrap();
    // No resolv.conf: only the tests that configure upstreams forward.
    let upstreams = config.upstreams_or_resolv_conf("");
    let server = DnsServer::new(config, upstreams, metrics);
    server.update(snap);
    let bound = server.bind().await.unwrap();
    let addr = bound.local_addrs()[0];
    let stop = CancellationToken::new();
    tokio::spawn(server.clone().serve(bound, stop.clone()));
    Running {
        addr,
        registry,
        server,
        stop,
    }
}

fn resolver(addr: SocketAddr) -> TokioResolver {
    let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
    for c in &mut ns.connections {
        c.port = addr.port();
    }
    let mut builder = Resolver::builder_with_config(
        ResolverConfig::from_name_servers(vec![ns]),
        TokioRuntimeProvider::default(),
    );
    builder.options_mut().cache_size = 0;
    builder.build().unwrap()
}

fn request(name: &str, qtype: RecordType, edns: Option<u16>) -> Message {
    let mut m = Message::new(rand_id(), MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    m
}

fn rand_id() -> u16 {
    static NEXT: AtomicUsize = AtomicUsize::new(1);
    NEXT.fetch_add(7919, Ordering::Relaxed) as u16
}

/// A UDP exchange from `from`, resent until an answer arrives (UDP may drop).
async fn udp_from(from: &str, server: SocketAddr, raw: &[u8]) -> Option<Vec<u8>> {
    let socket = UdpSocket::bind(from).await.unwrap();
    socket.connect(server).await.unwrap();
    let mut buf = vec![0u8; 65_535];
    for _ in 0..20 {
        socket.send(raw).await.unwrap();
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(500), socket.recv(&mut buf)).await
        {
            return Some(buf[..n].to_vec());
        }
    }
    None
}

async fn udp(server: SocketAddr, req: &Message) -> Message {
    let raw = udp_from("127.0.0.1:0", server, &req.to_vec().unwrap())
        .await
        .expect("an answer");
    let m = Message::from_vec(&raw).unwrap();
    assert_eq!(m.metadata.id, req.metadata.id);
    m
}

/// One UDP query, sent once, and its answer: for tests that count what reaches an
/// upstream, where a resend would be forwarded again. Loopback does not drop.
async fn udp_once(server: SocketAddr, req: &Message) -> Message {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.connect(server).await.unwrap();
    socket.send(&req.to_vec().unwrap()).await.unwrap();
    let mut buf = vec![0u8; 65_535];
    let n = tokio::time::timeout(Duration::from_secs(60), socket.recv(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    let m = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(m.metadata.id, req.metadata.id);
    m
}

async fn tcp(server: SocketAddr, req: &Message) -> Message {
    let mut s = TcpStream::connect(server).await.unwrap();
    let raw = req.to_vec().unwrap();
    s.write_all(&(raw.len() as u16).to_be_bytes())
        .await
        .unwrap();
    s.write_all(&raw).await.unwrap();
    let n = s.read_u16().await.unwrap() as usize;
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).await.unwrap();
    Message::from_vec(&buf).unwrap()
}

fn ips(records: &[Record]) -> HashSet<IpAddr> {
    records
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

fn has_soa(m: &Message) -> bool {
    m.authorities
        .iter()
        .any(|r| r.record_type() == RecordType::SOA)
}

#[tokio::test]
async fn a_resolver_gets_every_mesh_record_type() {
    let snap = snapshot();
    let vips = snap.services["web"].vips;
    let dns = start(DnsConfig::default(), &snap).await;
    let r = resolver(dns.addr);

    let vip4 = IpAddr::V4(vips.v4.unwrap());
    let vip6 = IpAddr::V6(vips.v6.unwrap());
    for name in ["web.mesh.", "web.", "WeB.MeSh."] {
        let got = ips(r.lookup(name, RecordType::A).await.unwrap().answers());
        assert_eq!(got, HashSet::from([vip4]), "{name}");
    }
    assert_eq!(
        ips(r
            .lookup("web.mesh.", RecordType::AAAA)
            .await
            .unwrap()
            .answers()),
        HashSet::from([vip6])
    );

    let tasks = ips(r
        .lookup("tasks.web.mesh.", RecordType::A)
        .await
        .unwrap()
        .answers());
    let expected: HashSet<IpAddr> = (1..=3)
        .map(|i| IpAddr::V4(Ipv4Addr::new(10, 0, 0, i)))
        .collect();
    assert_eq!(tasks, expected, "healthy tasks only");
    assert_eq!(
        ips(r
            .lookup("tasks.web.", RecordType::A)
            .await
            .unwrap()
            .answers()),
        expected
    );
    assert_eq!(
        ips(r
            .lookup("web.2.tasks.web.mesh.", RecordType::A)
            .await
            .unwrap()
            .answers()),
        HashSet::from(["10.0.0.2".parse().unwrap()])
    );

    // dnsrr: the service name itself returns the task IPs.
    let rr = ips(r.lookup("rr.mesh.", RecordType::A).await.unwrap().answers());
    assert_eq!(
        rr,
        HashSet::from(["10.0.1.1".parse().unwrap(), "10.0.1.2".parse().unwrap()])
    );

    // SRV (RFC 2782): VIP services point at the service name and the target port.
    let srv = r
        .lookup("_http._tcp.web.mesh.", RecordType::SRV)
        .await
        .unwrap();
    let RData::SRV(s) = &srv.answers()[0].data else {
        panic!("{:?}", srv.answers())
    };
    assert_eq!((s.port, s.target.to_ascii()), (80, "web.mesh.".to_string()));
    let srv = r
        .lookup("_pg._tcp.rr.mesh.", RecordType::SRV)
        .await
        .unwrap();
    let targets: HashSet<String> = srv
        .answers()
        .iter()
        .filter_map(|a| match &a.data {
            RData::SRV(s) => Some(format!("{}:{}", s.target.to_ascii(), s.port)),
            _ => None,
        })
        .collect();
    assert_eq!(
        targets,
        HashSet::from([
            "rr.1.tasks.rr.mesh.:5432".to_string(),
            "rr.2.tasks.rr.mesh.:5432".to_string()
        ])
    );

    // PTR for the VIP (Docker has none) and for task IPs.
    let ptr = |ip: IpAddr| {
        let r = &r;
        async move {
            let l = r.reverse_lookup(ip).await.unwrap();
            match &l.answers()[0].data {
                RData::PTR(p) => p.0.to_ascii(),
                other => panic!("{other:?}"),
            }
        }
    };
    assert_eq!(ptr(vip4).await, "web.mesh.");
    assert_eq!(ptr(vip6).await, "web.mesh.");
    assert_eq!(
        ptr("10.0.0.3".parse().unwrap()).await,
        "web.3.tasks.web.mesh."
    );
}

#[tokio::test]
async fn negative_answers_are_nxdomain_or_nodata_with_an_soa() {
    let dns = start(DnsConfig::default(), &snapshot()).await;
    let nx = udp(dns.addr, &request("nope.mesh.", RecordType::A, None)).await;
    assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
    assert!(
        nx.metadata.authoritative && nx.answers.is_empty() && has_soa(&nx),
        "{nx:?}"
    );
    let nx = udp(
        dns.addr,
        &request("web.sick.tasks.web.mesh.", RecordType::A, None),
    )
    .await;
    assert_eq!(
        nx.metadata.response_code,
        ResponseCode::NXDomain,
        "unhealthy tasks are not named"
    );

    // Tasks are IPv4 only: AAAA is NODATA, not NXDOMAIN.
    for (name, qtype) in [
        ("tasks.web.mesh.", RecordType::AAAA),
        ("web.mesh.", RecordType::MX),
        ("_http._tcp.web.mesh.", RecordType::A),
    ] {
        let nodata = udp(dns.addr, &request(name, qtype, None)).await;
        assert_eq!(
            nodata.metadata.response_code,
            ResponseCode::NoError,
            "{name} {qtype}"
        );
        assert!(
            nodata.answers.is_empty() && has_soa(&nodata),
            "{name} {qtype}: {nodata:?}"
        );
    }
    let soa = udp(dns.addr, &request("mesh.", RecordType::SOA, None)).await;
    assert_eq!(soa.answers[0].record_type(), RecordType::SOA);
    assert_eq!(soa.answers[0].ttl, 5, "TTL is 5 s by default");
}

#[tokio::test]
async fn tasks_rotate_per_query() {
    let dns = start(DnsConfig::default(), &snapshot()).await;
    let mut firsts = HashSet::new();
    for _ in 0..3 {
        let m = udp(dns.addr, &request("tasks.web.mesh.", RecordType::A, None)).await;
        firsts.insert(ips(&m.answers[..1]).into_iter().next().unwrap());
    }
    assert_eq!(
        firsts.len(),
        3,
        "each task comes first once in three queries"
    );
}

#[tokio::test]
async fn a_large_answer_is_truncated_over_udp_and_complete_over_tcp() {
    let dns = start(DnsConfig::default(), &snapshot()).await;
    for edns in [None, Some(1232), Some(4096)] {
        let m = udp(dns.addr, &request("tasks.big.mesh.", RecordType::A, edns)).await;
        assert!(m.metadata.truncation, "{edns:?}");
        assert!(m.to_vec().unwrap().len() <= 1232);
    }
    let full = tcp(dns.addr, &request("tasks.big.mesh.", RecordType::A, None)).await;
    assert!(!full.metadata.truncation);
    assert_eq!(ips(&full.answers).len(), 150);
    // A real resolver follows TC to TCP by itself.
    let r = resolver(dns.addr);
    assert_eq!(
        ips(r
            .lookup("tasks.big.mesh.", RecordType::A)
            .await
            .unwrap()
            .answers())
        .len(),
        150
    );
    assert!(metric(&dns.registry, "mesh_dns_truncated_total") >= 3.0);
}

#[tokio::test]
async fn answers_follow_snapshot_updates() {
    let mut s = Replica::new("h1", 1, VipPool::default(), ReplicaConfig::default());
    let add = |s: &mut Replica, svc: &str, id: &str, ip: &str| {
        let task = TaskSpec {
            service: svc.into(),
            id: Some(id.into()),
            ip: ip.parse().unwrap(),
            port: None,
            state: TaskState::Active,
            observed: None,
        };
        s.add_task(task, mesh_core::TaskSource::Api, 0).unwrap();
        s.set_health(svc, id, Health::Healthy, 0);
    };
    s.create_service(ServiceSpec::new("web", vec![PortSpec::tcp(None, 80)]), 0)
        .unwrap();
    add(&mut s, "web", "web.1", "10.0.0.1");
    let dns = start(DnsConfig::default(), &s.snapshot()).await;
    let tasks = udp(dns.addr, &request("tasks.web.mesh.", RecordType::A, None)).await;
    assert_eq!(
        ips(&tasks.answers),
        HashSet::from(["10.0.0.1".parse().unwrap()])
    );

    // A task and a service appear.
    add(&mut s, "web", "web.2", "10.0.0.2");
    s.create_service(ServiceSpec::new("api", vec![PortSpec::tcp(None, 443)]), 1)
        .unwrap();
    let snap = s.snapshot();
    dns.server.update(&snap);
    let tasks = udp(dns.addr, &request("tasks.web.mesh.", RecordType::A, None)).await;
    assert_eq!(
        ips(&tasks.answers),
        HashSet::from(["10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap()])
    );
    let api = udp(dns.addr, &request("api.mesh.", RecordType::A, None)).await;
    assert_eq!(
        ips(&api.answers),
        HashSet::from([IpAddr::V4(snap.services["api"].vips.v4.unwrap())])
    );
    let ptr = udp(
        dns.addr,
        &request("2.0.0.10.in-addr.arpa.", RecordType::PTR, None),
    )
    .await;
    assert!(
        matches!(&ptr.answers[0].data, RData::PTR(p) if p.0.to_ascii() == "web.2.tasks.web.mesh."),
        "{ptr:?}"
    );

    // And go away again.
    s.remove_service("web", 2).unwrap();
    dns.server.update(&s.snapshot());
    let gone = udp(dns.addr, &request("web.mesh.", RecordType::A, None)).await;
    assert_eq!(gone.metadata.response_code, ResponseCode::NXDomain);
    let api = udp(dns.addr, &request("api.mesh.", RecordType::A, None)).await;
    assert_eq!(api.answers.len(), 1);
}

/// A small upstream DNS server: `example.test` is 192.0.2.7, everything else NXDOMAIN.
async fn upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                return;
            };
            seen.fetch_add(1, Ordering::Relaxed);
            let req = Message::from_vec(&buf[..n]).unwrap();
            let q = req.queries[0].clone();
            let mut resp = Message::response(req.metadata.id, OpCode::Query);
            resp.metadata.recursion_desired = req.metadata.recursion_desired;
            resp.metadata.recursion_available = true;
            resp.add_query(q.clone());
            if q.name().to_ascii().eq_ignore_ascii_case("example.test.") {
                resp.add_answer(Record::from_rdata(
                    q.name().clone(),
                    60,
                    RData::A(A(Ipv4Addr::new(192, 0, 2, 7))),
                ));
            } else {
                resp.metadata.response_code = ResponseCode::NXDomain;
            }
            let _ = socket.send_to(&resp.to_vec().unwrap(), from).await;
        }
    });
    (addr, count)
}

#[tokio::test]
async fn other_names_are_forwarded_and_cached() {
    let (up, count) = upstream().await;
    let dns = start(
        DnsConfig {
            upstreams: Some(vec!["127.0.0.1:9".parse().unwrap(), up]),
            ..DnsConfig::default()
        },
        &snapshot(),
    )
    .await;
    let r = resolver(dns.addr);
    // The first upstream (discard port) never answers: failover to the second.
    let got = ips(r
        .lookup("example.test.", RecordType::A)
        .await
        .unwrap()
        .answers());
    assert_eq!(got, HashSet::from(["192.0.2.7".parse().unwrap()]));
    let before = count.load(Ordering::Relaxed);
    let m = udp(dns.addr, &request("EXAMPLE.test.", RecordType::A, None)).await;
    assert_eq!(
        ips(&m.answers),
        HashSet::from(["192.0.2.7".parse().unwrap()])
    );
    assert_eq!(
        count.load(Ordering::Relaxed),
        before,
        "answered from the cache"
    );
    let nx = udp(dns.addr, &request("missing.test.", RecordType::A, None)).await;
    assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
    // Single-label names that are not services are forwarded too.
    let nx = udp(dns.addr, &request("nosuchservice.", RecordType::A, None)).await;
    assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
    assert!(metric(&dns.registry, "mesh_dns_forwarded_total") >= 3.0);
    assert!(metric(&dns.registry, "mesh_dns_cache_hits_total") >= 1.0);
}

#[tokio::test]
async fn clients_outside_the_allowed_networks_are_refused() {
    let (up, count) = upstream().await;
    let config = DnsConfig {
        allow: vec!["127.0.0.1/32".parse().unwrap()],
        upstreams: Some(vec![up]),
        ..DnsConfig::default()
    };
    let dns = start(config, &snapshot()).await;
    for name in ["web.mesh.", "example.test."] {
        let req = request(name, RecordType::A, None);
        let raw = udp_from("127.0.0.2:0", dns.addr, &req.to_vec().unwrap())
            .await
            .expect("an answer");
        let m = Message::from_vec(&raw).unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::Refused, "{name}");
        assert!(m.answers.is_empty());
    }
    assert_eq!(
        count.load(Ordering::Relaxed),
        0,
        "nothing was forwarded for a refused client"
    );
    let ok = udp(dns.addr, &request("web.mesh.", RecordType::A, None)).await;
    assert_eq!(ok.metadata.response_code, ResponseCode::NoError);
}

#[tokio::test]
async fn forwards_beyond_the_bound_get_servfail_at_once() {
    // An upstream that never answers keeps two forwards in flight for 60 s.
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let config = DnsConfig {
        upstreams: Some(vec![silent.local_addr().unwrap()]),
        max_inflight: 2,
        forward_timeout: Duration::from_secs(60),
        ..DnsConfig::default()
    };
    let dns = start(config, &snapshot()).await;
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.connect(dns.addr).await.unwrap();
    for name in ["a.test.", "b.test."] {
        client
            .send(&request(name, RecordType::A, None).to_vec().unwrap())
            .await
            .unwrap();
    }
    // Wait until both are in flight upstream.
    let mut buf = vec![0u8; 4096];
    for _ in 0..2 {
        tokio::time::timeout(Duration::from_secs(60), silent.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
    }
    let third = request("c.test.", RecordType::A, None);
    client.send(&third.to_vec().unwrap()).await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(60), client.recv(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let m = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(
        m.metadata.id, third.metadata.id,
        "the third answer comes first: the other two are still waiting"
    );
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(
        metric(&dns.registry, "mesh_dns_forward_overload_total"),
        1.0
    );
    // Local names are not affected by the full forwarding queue.
    assert_eq!(
        udp(dns.addr, &request("web.mesh.", RecordType::A, None))
            .await
            .answers
            .len(),
        1
    );
}

fn junk_packets() -> Vec<(&'static str, Vec<u8>)> {
    let good = request("web.mesh.", RecordType::A, None).to_vec().unwrap();
    let mut overlong = good[..12].to_vec();
    overlong.push(64); // a label length over 63
    overlong.extend(std::iter::repeat_n(b'a', 64));
    overlong.extend([0, 0, 1, 0, 1]);
    let mut looped = good[..12].to_vec();
    looped.extend([0xc0, 12, 0, 1, 0, 1]); // a compression pointer to itself
    let mut two_hop = good[..12].to_vec();
    two_hop.extend([0xc0, 14, 0xc0, 12, 0, 1, 0, 1]);
    let mut response = good.clone();
    response[2] |= 0x80; // QR set: a response, never answered
    let mut counted = good[..12].to_vec();
    counted[5] = 40; // 40 questions announced, none present
    vec![
        ("empty", vec![]),
        ("short header", good[..5].to_vec()),
        ("header only", good[..12].to_vec()),
        ("cut question", good[..good.len() - 3].to_vec()),
        ("overlong label", overlong),
        ("pointer loop", looped),
        ("two-hop loop", two_hop),
        ("a response", response),
        ("missing questions", counted),
        (
            "random",
            (0..300u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect(),
        ),
    ]
}

#[tokio::test]
async fn malformed_packets_get_formerr_or_are_dropped_and_good_clients_still_get_answers() {
    let dns = start(DnsConfig::default(), &snapshot()).await;
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.connect(dns.addr).await.unwrap();
    let mut buf = vec![0u8; 4096];
    for (what, packet) in junk_packets() {
        socket.send(&packet).await.unwrap();
        // Any answer must be a well-formed FORMERR or NOTIMP/REFUSED for the same id.
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(300), socket.recv(&mut buf)).await
        {
            let m = Message::from_vec(&buf[..n])
                .unwrap_or_else(|e| panic!("{what}: unparseable answer: {e}"));
            assert_eq!(m.metadata.message_type, MessageType::Response, "{what}");
            assert_ne!(m.metadata.response_code, ResponseCode::NoError, "{what}");
            assert_eq!(&buf[..2], &packet[..2], "{what}: same id");
        }
        // The server still answers a good query right after.
        assert_eq!(
            udp(dns.addr, &request("web.mesh.", RecordType::A, None))
                .await
                .answers
                .len(),
            1,
            "after {what}"
        );
    }
    // Over TCP too, a bad frame closes that connection only.
    let mut s = TcpStream::connect(dns.addr).await.unwrap();
    s.write_all(&[0, 3, 1, 2, 3]).await.unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut sink)).await;
    // A flood of junk from many sockets, then a good client.
    for i in 0..2000u32 {
        let packet = (0..(i % 97))
            .map(|k| (k.wrapping_mul(i) >> 3) as u8)
            .collect::<Vec<u8>>();
        socket.send(&packet).await.unwrap();
    }
    assert_eq!(
        tcp(dns.addr, &request("web.mesh.", RecordType::A, None))
            .await
            .answers
            .len(),
        1
    );
    assert_eq!(
        udp(dns.addr, &request("web.mesh.", RecordType::A, None))
            .await
            .answers
            .len(),
        1
    );
    assert!(metric(&dns.registry, "mesh_dns_malformed_total") >= 5.0);
}

/// Runs `dig @server -p port ARGS`; `None` (after saying so) when dig is not installed.
async fn dig(server: SocketAddr, args: &[&str]) -> Option<String> {
    if std::process::Command::new("dig")
        .arg("-v")
        .output()
        .is_err()
    {
        eprintln!(
            "SKIPPED: dig is not installed (apt-get install bind9-dnsutils); raw queries cover the same answers"
        );
        return None;
    }
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("dig")
            .arg(format!("@{}", server.ip()))
            .arg("-p")
            .arg(server.port().to_string())
            // Generous retries: the machine may be loaded.
            .args(["+tries=5", "+time=10"])
            .args(&args)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    Some(String::from_utf8(out.stdout).unwrap())
}

#[tokio::test]
async fn dig_sees_a_srv_and_ptr_answers() {
    let snap = snapshot();
    let vip = snap.services["web"].vips.v4.unwrap().to_string();
    let dns = start(DnsConfig::default(), &snap).await;
    let Some(web) = dig(dns.addr, &["+short", "web.mesh"]).await else {
        return;
    };
    assert_eq!(web.trim(), vip);
    let tasks = dig(dns.addr, &["+short", "tasks.web.mesh"]).await.unwrap();
    assert_eq!(tasks.lines().count(), 3, "{tasks}");
    assert_eq!(
        dig(dns.addr, &["+short", "SRV", "_http._tcp.web.mesh"])
            .await
            .unwrap()
            .trim(),
        "0 0 80 web.mesh."
    );
    assert_eq!(
        dig(dns.addr, &["+short", "-x", &vip]).await.unwrap().trim(),
        "web.mesh."
    );
    let big = dig(dns.addr, &["+short", "tasks.big.mesh"]).await.unwrap();
    assert_eq!(big.lines().count(), 150, "dig retries over TCP after TC");
}

/// The A records of a dig answer section.
fn dig_a_records(out: &str) -> usize {
    out.lines()
        .filter(|l| !l.starts_with(';') && l.split_whitespace().nth(3) == Some("A"))
        .count()
}

#[tokio::test]
async fn a_truncated_udp_answer_carries_the_records_that_fit() {
    let dns = start(DnsConfig::default(), &snapshot()).await;
    // Without EDNS the limit is 512 bytes: the header, the question and then as many
    // 16-byte A records (the owner a compression pointer) as fit.
    let name = "tasks.forty.mesh.";
    let question = Name::from_ascii(name).unwrap().len() + 4;
    let fit = (512 - 12 - question) / 16;
    assert!(fit > 0 && fit < 40);
    let req = request(name, RecordType::A, None);
    let raw = udp_from("127.0.0.1:0", dns.addr, &req.to_vec().unwrap())
        .await
        .expect("an answer");
    assert!(raw.len() <= 512, "{} bytes", raw.len());
    let m = Message::from_vec(&raw).unwrap();
    assert!(m.metadata.truncation, "TC is set");
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(m.queries, req.queries, "the question is kept");
    assert_eq!(ips(&m.answers).len(), fit, "as many records as fit");
    assert!(m.edns.is_none(), "no OPT for a client without EDNS");
    // With EDNS the OPT record is kept, and it all fits in 1232 bytes.
    let m = udp(dns.addr, &request(name, RecordType::A, Some(1232))).await;
    assert!(!m.metadata.truncation && m.edns.is_some());
    assert_eq!(ips(&m.answers).len(), 40);
    // A 512-byte EDNS client gets the truncated answer with the OPT record.
    let m = udp(dns.addr, &request(name, RecordType::A, Some(512))).await;
    assert!(m.metadata.truncation && m.edns.is_some());
    assert!(!m.answers.is_empty() && m.answers.len() < 40);
    let full = tcp(dns.addr, &request(name, RecordType::A, None)).await;
    assert!(!full.metadata.truncation);
    assert_eq!(ips(&full.answers).len(), 40);

    // What a client without a TCP retry (musl before 1.2.4) sees, through dig.
    let Some(out) = dig(dns.addr, &["+noedns", "+ignore", "tasks.forty.mesh"]).await else {
        return;
    };
    assert!(out.contains(" tc"), "TC in the flags: {out}");
    assert_eq!(dig_a_records(&out), fit, "{out}");
    let out = dig(dns.addr, &["+tcp", "tasks.forty.mesh"]).await.unwrap();
    assert_eq!(dig_a_records(&out), 40, "{out}");
}

#[tokio::test]
async fn the_do_bit_is_echoed_on_mesh_and_forwarded_answers() {
    let (up, _) = upstream().await;
    let config = DnsConfig {
        upstreams: Some(vec![up]),
        ..DnsConfig::default()
    };
    let dns = start(config, &snapshot()).await;
    for name in ["web.mesh.", "example.test."] {
        for dnssec_ok in [true, false] {
            let mut req = request(name, RecordType::A, Some(1232));
            req.edns.as_mut().unwrap().set_dnssec_ok(dnssec_ok);
            let m = udp(dns.addr, &req).await;
            assert_eq!(m.answers.len(), 1, "{name}");
            assert_eq!(
                m.edns.expect("an OPT record").flags().dnssec_ok,
                dnssec_ok,
                "{name} DO={dnssec_ok}"
            );
        }
    }
    let Some(out) = dig(dns.addr, &["+dnssec", "web.mesh"]).await else {
        return;
    };
    assert!(out.contains("flags: do;"), "{out}");
}

#[tokio::test]
async fn an_unknown_edns_version_gets_badvers() {
    let dns = start(DnsConfig::default(), &snapshot()).await;
    let mut req = request("web.mesh.", RecordType::A, Some(1232));
    req.edns.as_mut().unwrap().set_version(1);
    let raw = udp_from("127.0.0.1:0", dns.addr, &req.to_vec().unwrap())
        .await
        .expect("an answer");
    let m = Message::from_vec(&raw).unwrap();
    // BADVERS is 16: 0 in the header, 1 in the OPT record's extended RCODE.
    assert_eq!(raw[3] & 0x0f, 0);
    assert_eq!(u16::from(m.metadata.response_code), 16);
    let edns = m.edns.expect("an OPT record");
    assert_eq!((edns.rcode_high(), edns.version()), (1, 0));
    assert!(m.answers.is_empty());
    let Some(out) = dig(dns.addr, &["+edns=1", "+noednsnegotiation", "web.mesh"]).await else {
        return;
    };
    assert!(out.contains("status: BADVERS"), "{out}");
}

#[tokio::test]
async fn other_classes_get_no_in_data_and_are_never_forwarded() {
    let (up, count) = upstream().await;
    let config = DnsConfig {
        upstreams: Some(vec![up]),
        ..DnsConfig::default()
    };
    let dns = start(config, &snapshot()).await;
    let classed = |name: &str, qtype, class| {
        let mut m = request(name, qtype, None);
        m.queries[0].set_query_class(class);
        m
    };
    let txt = |m: &Message| -> Vec<String> {
        m.answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::TXT(t) => Some(t.to_string()),
                _ => None,
            })
            .collect()
    };
    let version = udp(
        dns.addr,
        &classed("version.bind.", RecordType::TXT, DNSClass::CH),
    )
    .await;
    assert_eq!(version.metadata.response_code, ResponseCode::NoError);
    assert_eq!(
        txt(&version),
        [format!("mesh {}", env!("CARGO_PKG_VERSION"))]
    );
    assert_eq!(version.answers[0].dns_class, DNSClass::CH);
    let id = udp(
        dns.addr,
        &classed("ID.SERVER.", RecordType::TXT, DNSClass::CH),
    )
    .await;
    assert_eq!(txt(&id), ["mesh"]);
    for (name, class) in [
        ("web.mesh.", DNSClass::CH),
        ("web.mesh.", DNSClass::HS),
        ("example.test.", DNSClass::CH),
        ("example.test.", DNSClass::HS),
        ("version.bind.", DNSClass::HS),
        ("hostname.example.", DNSClass::CH),
    ] {
        let m = udp(dns.addr, &classed(name, RecordType::A, class)).await;
        assert_eq!(
            m.metadata.response_code,
            ResponseCode::Refused,
            "{name} {class}"
        );
        assert!(m.answers.is_empty(), "{name} {class}: {m:?}");
    }
    assert_eq!(count.load(Ordering::Relaxed), 0, "nothing was forwarded");
    assert_eq!(metric(&dns.registry, "mesh_dns_forwarded_total"), 0.0);
    let Some(out) = dig(dns.addr, &["+short", "CH", "TXT", "version.bind"]).await else {
        return;
    };
    assert_eq!(
        out.trim(),
        format!("\"mesh {}\"", env!("CARGO_PKG_VERSION"))
    );
    let out = dig(dns.addr, &["CH", "A", "web.mesh"]).await.unwrap();
    assert!(out.contains("status: REFUSED"), "{out}");
}

#[tokio::test]
async fn cached_answers_copy_rd_from_the_query() {
    let (up, count) = upstream().await;
    let config = DnsConfig {
        upstreams: Some(vec![up]),
        ..DnsConfig::default()
    };
    let dns = start(config, &snapshot()).await;
    for rd in [true, false, true, false] {
        let mut req = request("example.test.", RecordType::A, None);
        req.metadata.recursion_desired = rd;
        // Sent once: a resend could be forwarded a second time.
        let m = udp_once(dns.addr, &req).await;
        assert_eq!(m.answers.len(), 1);
        assert_eq!(m.metadata.recursion_desired, rd);
        assert_eq!(m.metadata.id, req.metadata.id);
    }
    assert_eq!(count.load(Ordering::Relaxed), 1, "the rest from the cache");
    assert_eq!(metric(&dns.registry, "mesh_dns_cache_hits_total"), 3.0);
}

#[tokio::test]
async fn zone_transfers_are_refused_over_udp_and_tcp() {
    let (up, count) = upstream().await;
    let config = DnsConfig {
        upstreams: Some(vec![up]),
        ..DnsConfig::default()
    };
    let dns = start(config, &snapshot()).await;
    for name in ["mesh.", "web.mesh.", "example.test."] {
        for qtype in [RecordType::AXFR, RecordType::IXFR] {
            let req = request(name, qtype, None);
            for m in [udp(dns.addr, &req).await, tcp(dns.addr, &req).await] {
                assert_eq!(
                    m.metadata.response_code,
                    ResponseCode::Refused,
                    "{name} {qtype}"
                );
                assert!(m.answers.is_empty() && m.authorities.is_empty(), "{m:?}");
            }
        }
    }
    assert_eq!(count.load(Ordering::Relaxed), 0, "nothing was forwarded");
    let Some(out) = dig(dns.addr, &["AXFR", "mesh"]).await else {
        return;
    };
    assert!(out.contains("Transfer failed"), "{out}");
}

#[tokio::test]
async fn the_apex_names_its_name_server_and_the_name_resolves() {
    let snap = snapshot();
    let dns = start(DnsConfig::default(), &snap).await;
    let ns = udp(dns.addr, &request("mesh.", RecordType::NS, None)).await;
    assert_eq!(ns.metadata.response_code, ResponseCode::NoError);
    assert!(ns.metadata.authoritative);
    let [record] = &ns.answers[..] else {
        panic!("one NS record: {ns:?}")
    };
    let RData::NS(target) = &record.data else {
        panic!("{record:?}")
    };
    let target = target.0.clone();
    // Glue: the name server's address, the one the harness listens on.
    let listen = HashSet::from([dns.addr.ip()]);
    assert_eq!(ips(&ns.additionals), listen, "{ns:?}");
    assert!(ns.additionals.iter().all(|r| r.name == target));

    // The SOA names the same server, and that name resolves.
    let soa = udp(dns.addr, &request("mesh.", RecordType::SOA, None)).await;
    let RData::SOA(soa) = &soa.answers[0].data else {
        panic!("{soa:?}")
    };
    assert_eq!(soa.mname, target);
    let a = udp(dns.addr, &request(&target.to_ascii(), RecordType::A, None)).await;
    assert_eq!(ips(&a.answers), listen);
    // Only an IPv4 listen address: AAAA is NODATA.
    let aaaa = udp(
        dns.addr,
        &request(&target.to_ascii(), RecordType::AAAA, None),
    )
    .await;
    assert_eq!(aaaa.metadata.response_code, ResponseCode::NoError);
    assert!(aaaa.answers.is_empty() && has_soa(&aaaa));

    // A service named "ns" keeps its name: the name server cannot shadow it.
    let vip = IpAddr::V4(snap.services["ns"].vips.v4.unwrap());
    let svc = udp(dns.addr, &request("ns.mesh.", RecordType::A, None)).await;
    assert_eq!(ips(&svc.answers), HashSet::from([vip]));

    let Some(out) = dig(dns.addr, &["NS", "mesh"]).await else {
        return;
    };
    let additional = out
        .split(";; ADDITIONAL SECTION:")
        .nth(1)
        .unwrap_or_else(|| panic!("no glue: {out}"));
    let glue: Vec<Vec<&str>> = additional
        .lines()
        .filter(|l| !l.starts_with(';'))
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| !f.is_empty())
        .collect();
    let ip = dns.addr.ip().to_string();
    assert_eq!(glue, [vec!["mesh.", "5", "IN", "A", ip.as_str()]], "{out}");
    let short = dig(dns.addr, &["+short", "NS", "mesh"]).await.unwrap();
    let ns_a = dig(dns.addr, &["+short", short.trim()]).await.unwrap();
    assert_eq!(ns_a.trim(), dns.addr.ip().to_string());
}

#[tokio::test]
async fn a_failed_forward_is_cached_briefly_as_servfail() {
    // An upstream that never answers, and a failure remembered for the TTL (300 s
    // here, so a loaded machine cannot let it expire between the two queries).
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    silent.set_nonblocking(true).unwrap();
    let config = DnsConfig {
        upstreams: Some(vec![silent.local_addr().unwrap()]),
        forward_timeout: Duration::from_millis(200),
        ttl: 300,
        ..DnsConfig::default()
    };
    let dns = start(config, &snapshot()).await;
    // Sent once each, not resent: a resend would be a second forward of its own.
    let ask = async |name: &str, qtype| {
        udp_once(dns.addr, &request(name, qtype, None))
            .await
            .metadata
            .response_code
    };
    assert_eq!(
        ask("down.test.", RecordType::A).await,
        ResponseCode::ServFail
    );
    assert_eq!(metric(&dns.registry, "mesh_dns_forwarded_total"), 1.0);
    assert_eq!(
        metric(&dns.registry, "mesh_dns_forward_failures_total"),
        1.0
    );
    // The same question again, in another case: SERVFAIL without a second forward.
    assert_eq!(
        ask("DOWN.test.", RecordType::A).await,
        ResponseCode::ServFail
    );
    assert_eq!(metric(&dns.registry, "mesh_dns_forwarded_total"), 1.0);
    assert_eq!(
        metric(&dns.registry, "mesh_dns_forward_failures_total"),
        1.0
    );
    assert_eq!(metric(&dns.registry, "mesh_dns_cache_hits_total"), 1.0);
    // Another type is another question: it is forwarded.
    assert_eq!(
        ask("down.test.", RecordType::AAAA).await,
        ResponseCode::ServFail
    );
    assert_eq!(metric(&dns.registry, "mesh_dns_forwarded_total"), 2.0);
    // On loopback a datagram is queued at the receiver when sent: exactly the two
    // forwards reached the upstream.
    let (mut buf, mut received) = ([0u8; 512], 0);
    while silent.recv(&mut buf).is_ok() {
        received += 1;
    }
    assert_eq!(received, 2);
}

fn metric(registry: &prometheus::Registry, name: &str) -> f64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.get_name() == name)
        .flat_map(|f| f.get_metric().iter().map(|m| m.get_counter().get_value()))
        .sum()
}

/// Connections that send a length prefix and nothing more cannot lock other clients
/// out of DNS over TCP: each client address gets a share of the slots, and a client
/// that may not query gets none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_tcp_queries_do_not_starve_other_clients() {
    let config = DnsConfig {
        allow: vec![
            "127.0.0.1/32".parse().unwrap(),
            "127.0.0.3/32".parse().unwrap(),
        ],
        ..DnsConfig::default()
    };
    let dns = start(config, &snapshot()).await;
    let mut held = Vec::new();
    for from in ["127.0.0.2", "127.0.0.3"] {
        for _ in 0..300 {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
            if let Ok(mut s) = socket.connect(dns.addr).await {
                let _ = s.write_all(&[0, 40]).await;
                held.push(s);
            }
        }
    }
    // A third client is answered at once, while the 600 connections are still open.
    let ok = tcp(dns.addr, &request("web.mesh.", RecordType::A, None)).await;
    assert_eq!(ok.metadata.response_code, ResponseCode::NoError);
    assert!(metric(&dns.registry, "mesh_dns_refused_total") >= 300.0);
    drop(held);
}
