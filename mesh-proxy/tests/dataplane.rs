//! The userspace data plane against real sockets: balancing, retry, integrity,
//! half-close, PROXY v2, UDP flows, drain and reconfiguration.

mod support;

use std::collections::HashMap;
use std::hash::Hasher;
use std::time::Duration;

use mesh_core::{Balance, Protocol, ProxyProtocol, TaskState};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

async fn named_backends(n: usize) -> Vec<Backend> {
    let mut v = Vec::new();
    for i in 1..=n {
        v.push(Backend::named(&format!("web.{i}")).await);
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_gives_each_task_exactly_its_share() {
    let backends = named_backends(3).await;
    let port = free_port(Protocol::Tcp);
    let mut d = Desired::new();
    d.service(tcp_service("web", port));
    for (i, b) in backends.iter().enumerate() {
        d.task("web", &format!("web.{}", i + 1), b.addr);
    }
    let (mut plane, _, _) = plane();
    plane.apply(&d.snapshot()).await;
    assert!(plane.errors().is_empty(), "{:?}", plane.errors());

    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..300 {
        *counts.entry(fetch(port).await.unwrap()).or_default() += 1;
    }
    assert_eq!(counts.len(), 3, "{counts:?}");
    for (task, n) in &counts {
        assert_eq!(*n, 100, "{task}: {counts:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_conn_prefers_the_task_with_fewest_connections() {
    let a = Backend::named("a").await;
    let b = Backend::named("b").await;
    let port = free_port(Protocol::Tcp);
    let mut spec = tcp_service("web", port);
    spec.balance = Balance::LeastConn;
    let mut d = Desired::new();
    d.service(spec).task("web", "a", a.addr);
    let (mut plane, _, _) = plane();
    plane.apply(&d.snapshot()).await;

    // Three long-lived connections pile onto the only task, a.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(local(port)).await.unwrap();
        let mut name = [0u8; 1];
        s.read_exact(&mut name).await.unwrap();
        assert_eq!(&name, b"a");
        held.push(s);
    }
    // With b added, round robin would alternate; least-conn sends the next three to b.
    d.task("web", "b", b.addr);
    plane.apply(&d.snapshot()).await;
    for _ in 0..3 {
        assert_eq!(fetch(port).await.unwrap(), "b");
    }
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_task_costs_clients_nothing() {
    let mut backends = named_backends(3).await;
    let port = free_port(Protocol::Tcp);
    let mut d = Desired::new();
    d.service(tcp_service("web", port));
    for (i, b) in backends.iter().enumerate() {
        d.task("web", &format!("web.{}", i + 1), b.addr);
    }
    let (mut plane, _, registry) = plane();
    plane.apply(&d.snapshot()).await;

    // web.2 dies, and the plane has not heard of it: only connects can tell.
    drop(backends.remove(1));
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..90 {
        let got = fetch(port).await.expect("every connection succeeds");
        *counts.entry(got).or_default() += 1;
    }
    assert_eq!(counts.get("web.2"), None);
    assert_eq!(counts.values().sum::<usize>(), 90);
    assert!(
        metric(
            &registry,
            "mesh_connect_failures_total",
            &[("task", "web.2")]
        ) >= 1.0
    );
    assert!(
        metric(
            &registry,
            "mesh_connect_retries_total",
            &[("service", "web")]
        ) >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_healthy_task_refuses_at_once() {
    let port = free_port(Protocol::Tcp);
    let mut d = Desired::new();
    d.service(tcp_service("web", port));
    let (mut plane, _, registry) = plane();
    plane.apply(&d.snapshot()).await;
    assert_refused(port).await;
    eventually("refusal counted", || {
        metric(
            &registry,
            "mesh_listener_refused_total",
            &[("reason", "no_healthy_task")],
        ) >= 1.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_propagates_both_ways() {
    // Server → client FIN first: the server sends a banner and closes its half, then
    // counts what the client still sends.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<usize>();
    let server = Backend::spawn(move |mut s| {
        let tx = tx.clone();
        async move {
            s.write_all(b"banner").await.unwrap();
            s.shutdown().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            tx.send(got.len()).unwrap();
        }
    })
    .await;
    let echo = Backend::echo().await;
    let (p1, p2) = (free_port(Protocol::Tcp), free_port(Protocol::Tcp));
    let mut d = Desired::new();
    d.service(tcp_service("banner", p1))
        .task("banner", "b.1", server.addr);
    d.service(tcp_service("echo", p2))
        .task("echo", "e.1", echo.addr);
    let (mut plane, _, _) = plane();
    plane.apply(&d.snapshot()).await;

    let mut s = TcpStream::connect(local(p1)).await.unwrap();
    let mut banner = Vec::new();
    s.read_to_end(&mut banner).await.unwrap();
    assert_eq!(banner, b"banner", "server FIN reached the client");
    let payload = vec![7u8; 1 << 20];
    s.write_all(&payload).await.unwrap();
    s.shutdown().await.unwrap();
    assert_eq!(
        rx.recv().await,
        Some(payload.len()),
        "client data and FIN reached the server after its half-close"
    );

    // Client → server FIN first: the echo server answers only after it sees EOF.
    let mut s = TcpStream::connect(local(p2)).await.unwrap();
    s.write_all(b"ping").await.unwrap();
    s.shutdown().await.unwrap();
    assert_eq!(read_until_closed(&mut s).await, b"ping");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_from_the_task_reaches_the_client_as_a_reset() {
    // The task sends part of an answer and resets the connection: the client must
    // see the reset, not a clean end that makes the cut-off answer look whole.
    let server = Backend::spawn(|s| async move {
        let mut buf = [0u8; 64];
        let mut s = s;
        let _ = s.read(&mut buf).await;
        s.write_all(b"HTTP/1.0 200 OK\r\n\r\npart").await.unwrap();
        s.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(s);
    })
    .await;
    let port = free_port(Protocol::Tcp);
    let mut d = Desired::new();
    d.service(tcp_service("cut", port))
        .task("cut", "c.1", server.addr);
    let (mut plane, _, _) = plane();
    plane.apply(&d.snapshot()).await;

    let mut s = TcpStream::connect(local(port)).await.unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let mut got = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut got))
        .await
        .expect("the connection ends");
    let err = end.expect_err("a reset, not a clean end");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Sends `total` bytes through the echo service and checks the echo by digest.
async fn echo_transfer(port: u16, seed: u64, total: usize, chunk: usize) {
    let s = TcpStream::connect(local(port)).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let data = pattern(seed, chunk);
    let writer = tokio::spawn(async move {
        let mut sent = std::collections::hash_map::DefaultHasher::new();
        let mut left = total;
        while left > 0 {
            let n = left.min(data.len());
            w.write_all(&data[..n]).await.unwrap();
            sent.write(&data[..n]);
            left -= n;
            tokio::task::yield_now().await;
        }
        w.shutdown().await.unwrap();
        sent.finish()
    });
    let mut got = std::collections::hash_map::DefaultHasher::new();
    let mut n = 0;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let k = r.read(&mut buf).await.unwrap();
        if k == 0 {
            break;
        }
        got.write(&buf[..k]);
        n += k;
    }
    assert_eq!(n, total);
    assert_eq!(got.finish(), writer.await.unwrap(), "echoed bytes differ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mb_transfer_arrives_intact() {
    let echo = Backend::echo().await;
    let port = free_port(Protocol::Tcp);
    let mut d = Desired::new();
    d.service(tcp_service("echo", port))
        .task("echo", "e.1", echo.addr);
    let (mut plane, _, registry) = plane();
    plane.apply(&d.snapshot()).await;
    let total = 100 * 1024 * 1024;
    echo_transfer(port, 42, total, 1 << 20).await;
    // And a smaller transfer compared byte for byte.
    let mut s = TcpStream::connect(local(port)).await.unwrap();
    let data = pattern(9, 300_000);
    s.write_all(&data).await.unwrap();
    s.shutdown().await.unwrap();
    assert!(read_until_closed(&mut s).await == data, "echo differs");
    eventually("bytes counted", || {
        metric(&registry, "mesh_bytes_in_total", &[("task", "e.1")]) >= (total + 300_000) as f64
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_connections_all_complete() {
    raise_fd_limit();
    let echo = Backend::echo().await;
    let port = free_port(Protocol::Tcp);
    let mut d = Desired::new();
    d.service(tcp_service("echo", port))
        .task("echo", "e.1", echo.addr);
    let (mut plane, _, _) = plane();
    plane.apply(&d.snapshot()).await;
    let gate = std::sync::Arc::new(tokio::sync::Barrier::new(1000));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..1000u64 {
        let gate = gate.clone();
        tasks.spawn(async move {
            let mut s = TcpStream::connect(local(port)).await.unwrap();
            // Every connection is open at once before any finishes.
            gate.wait().await;
            let data = pattern(i, 4096);
            s.write_all(&data).await.unwrap();
            s.shutdown().await.unwrap();
            assert!(
                read_until_closed(&mut s).await == data,
                "connection {i}: echo differs"
            );
        });
    }
    let mut done = 0;
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
        done += 1;
    }
    assert_eq!(done, 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_v2_tells_the_task_the_real_client() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let backend = Backend::spawn(move |mut s| {
        let tx = tx.clone();
        async move {
            let mut buf = vec![0u8; 256];
            let mut n = 0;
            // 16-byte fixed part, then the address block.
            while n < 16 || n < 16 + u16::from_be_bytes([buf[14], buf[15]]) as usize {
                n += s.read(&mut buf[n..]).await.unwrap();
            }
            let header = ppp::v2::Header::try_from(&buf[..n]).expect("valid PROXY v2 header");
            let src = match header.addresses {
                ppp::v2::Addresses::IPv4(a) => format!("{}:{}", a.source_address, a.source_port),
                ppp::v2::Addresses::IPv6(a) => format!("[{}]:{}", a.source_address, a.source_port),
                other => format!("{other:?}"),
            };
            tx.send(src).unwrap();
            s.write_all(b"ok").await.unwrap();
        }
    })
    .await;
    let port = free_port(Protocol::Tcp);
    let mut spec = tcp_service("web", port);
    spec.proxy_protocol = ProxyProtocol::V2;
    let mut d = Desired::new();
    d.service(spec).task("web", "web.1", backend.addr);
    let (mut plane, _, _) = plane();
    plane.apply(&d.snapshot()).await;

    for target in ["127.0.0.1", "[::1]"] {
        let mut s = TcpStream::connect(format!("{target}:{port}"))
            .await
            .unwrap();
        let client = s.local_addr().unwrap().to_string();
        let mut ok = [0u8; 2];
        s.read_exact(&mut ok).await.unwrap();
        assert_eq!(rx.recv().await.unwrap(), client);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_echo_and_flows_move_off_a_removed_task() {
    let a = UdpBackend::named("a").await;
    let b = UdpBackend::named("b").await;
    let port = free_port(Protocol::Udp);
    let mut d = Desired::new();
    d.service(udp_service("dns", port))
        .task("dns", "a", a.addr)
        .task("dns", "b", b.addr);
    let (mut plane, _, registry) = plane();
    plane.apply(&d.snapshot()).await;

    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.connect(local(port)).await.unwrap();
    let ask = |msg: &'static str| {
        let client = &client;
        async move {
            let mut buf = [0u8; 128];
            // UDP may drop: resend until an answer comes, within a generous deadline.
            for _ in 0..300 {
                client.send(msg.as_bytes()).await.unwrap();
                if let Ok(Ok(n)) =
                    tokio::time::timeout(Duration::from_millis(200), client.recv(&mut buf)).await
                {
                    return String::from_utf8_lossy(&buf[..n]).to_string();
                }
            }
            panic!("no UDP answer");
        }
    };
    let first = ask("hello").await;
    let (task, rest) = first.split_once(':').unwrap();
    assert_eq!(rest, "hello");
    // One flow sticks to its task.
    for _ in 0..5 {
        assert_eq!(ask("again").await, format!("{task}:again"));
    }
    assert_eq!(
        metric(&registry, "mesh_udp_flows_active", &[("service", "dns")]),
        1.0
    );

    // Remove the flow's task: the next datagram of the same flow goes to the other.
    let other = if task == "a" { "b" } else { "a" };
    d.state.remove_task("dns", task, 0).unwrap();
    plane.apply(&d.snapshot()).await;
    assert_eq!(ask("moved").await, format!("{other}:moved"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_task_keeps_its_connections_until_drain_timeout() {
    let a = Backend::echo().await;
    let b = Backend::named("b").await;
    let port = free_port(Protocol::Tcp);
    let mut spec = tcp_service("web", port);
    spec.drain_timeout = Duration::from_secs(10);
    let mut d = Desired::new();
    d.service(spec).task("web", "a", a.addr);
    let (mut plane, _, registry) = plane();
    plane.apply(&d.snapshot()).await;
    let mut long = TcpStream::connect(local(port)).await.unwrap();
    long.write_all(b"1").await.unwrap();
    let mut one = [0u8; 1];
    long.read_exact(&mut one).await.unwrap();

    d.task("web", "b", b.addr);
    d.state
        .set_task_state("web", "a", TaskState::Draining, 0)
        .unwrap();
    plane.apply(&d.snapshot()).await;
    // New connections go elsewhere; the old one goes on.
    for _ in 0..5 {
        assert_eq!(fetch(port).await.unwrap(), "b");
    }
    long.write_all(b"2").await.unwrap();
    long.read_exact(&mut one).await.unwrap();
    assert_eq!(&one, b"2");
    // At the deadline the plane closes it.
    assert_eq!(read_until_closed(&mut long).await, b"");
    eventually("drain close counted", || {
        metric(&registry, "mesh_drain_closed_total", &[("service", "web")]) >= 1.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_refuses_beyond_the_limit() {
    let a = Backend::echo().await;
    let port = free_port(Protocol::Tcp);
    let mut spec = tcp_service("web", port);
    spec.max_connections = Some(2);
    let mut d = Desired::new();
    d.service(spec).task("web", "a", a.addr);
    let (mut plane, _, registry) = plane();
    plane.apply(&d.snapshot()).await;
    let mut held = Vec::new();
    for i in 0..2u8 {
        let mut s = TcpStream::connect(local(port)).await.unwrap();
        s.write_all(&[i]).await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        held.push(s);
    }
    assert_refused(port).await;
    eventually("refusal counted", || {
        metric(
            &registry,
            "mesh_listener_refused_total",
            &[("reason", "max_connections")],
        ) >= 1.0
    })
    .await;
    // Once a held connection has closed through the proxy, a new one is admitted.
    let mut closing = held.pop().unwrap();
    closing.shutdown().await.unwrap();
    assert_eq!(read_until_closed(&mut closing).await, b"");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut b = [0u8; 1];
        let echoed = match TcpStream::connect(local(port)).await {
            Ok(mut s) => s.write_all(b"y").await.is_ok() && s.read_exact(&mut b).await.is_ok(),
            Err(_) => false,
        };
        if echoed && &b == b"y" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no connection admitted below the limit"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_closes_quiet_connections() {
    let a = Backend::echo().await;
    let port = free_port(Protocol::Tcp);
    let mut spec = tcp_service("web", port);
    spec.idle_timeout = Some(Duration::from_millis(300));
    let mut d = Desired::new();
    d.service(spec).task("web", "a", a.addr);
    let (mut plane, _, _) = plane();
    plane.apply(&d.snapshot()).await;
    let mut s = TcpStream::connect(local(port)).await.unwrap();
    s.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(read_until_closed(&mut s).await, b"");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_service_stops_listening() {
    let a = Backend::named("a").await;
    let port = free_port(Protocol::Tcp);
    let mut d = Desired::new();
    d.service(tcp_service("web", port)).task("web", "a", a.addr);
    let (mut plane, _, _) = plane();
    plane.apply(&d.snapshot()).await;
    assert_eq!(fetch(port).await.unwrap(), "a");
    d.state.remove_service("web", 0).unwrap();
    plane.apply(&d.snapshot()).await;
    let err = TcpStream::connect(local(port))
        .await
        .expect_err("listener closed");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_survive_reconfiguration_under_load() {
    raise_fd_limit();
    let echo = Backend::echo().await;
    let spare = Backend::named("spare").await;
    let port = free_port(Protocol::Tcp);
    let mut d = Desired::new();
    d.service(tcp_service("echo", port))
        .task("echo", "e.1", echo.addr);
    let (mut plane, _, _) = plane();
    plane.apply(&d.snapshot()).await;

    let mut streams = tokio::task::JoinSet::new();
    for i in 0..100u64 {
        streams.spawn(echo_transfer(port, i, 4 << 20, 16 * 1024));
    }
    // Churn other tasks and services, and the echo service's own spec, while the
    // streams run.
    let mut round = 0;
    while !streams.is_empty() {
        round += 1;
        let other = format!("other{}", round % 3);
        let other_port = free_port(Protocol::Tcp);
        if d.state.service(&other).is_some() {
            d.state.remove_service(&other, 0).unwrap();
        } else {
            d.service(tcp_service(&other, other_port))
                .task(&other, "s.1", spare.addr);
        }
        let id = format!("extra{round}");
        d.task("echo", &id, echo.addr);
        let mut spec = d.state.service("echo").unwrap().clone();
        spec.drain_timeout = Duration::from_secs(3600 + round);
        d.state.put_service(spec, 0).unwrap();
        plane.apply(&d.snapshot()).await;
        d.state.remove_task("echo", &id, 0).unwrap();
        plane.apply(&d.snapshot()).await;
        tokio::select! {
            r = streams.join_next() => { if let Some(r) = r { r.expect("stream intact"); } }
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    assert!(round > 1, "reconfiguration happened during the streams");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_service_drains_its_open_connections() {
    let a = Backend::echo().await;
    let port = free_port(Protocol::Tcp);
    let mut spec = tcp_service("web", port);
    spec.drain_timeout = Duration::from_secs(5);
    let mut d = Desired::new();
    d.service(spec).task("web", "a", a.addr);
    let (mut plane, _, _) = plane();
    plane.apply(&d.snapshot()).await;
    let mut long = TcpStream::connect(local(port)).await.unwrap();
    long.write_all(b"1").await.unwrap();
    let mut one = [0u8; 1];
    long.read_exact(&mut one).await.unwrap();

    d.state.remove_service("web", 0).unwrap();
    plane.apply(&d.snapshot()).await;
    assert!(
        TcpStream::connect(local(port)).await.is_err(),
        "no new connections"
    );
    long.write_all(b"2").await.unwrap();
    long.read_exact(&mut one).await.unwrap();
    assert_eq!(&one, b"2", "the open connection goes on while draining");
    assert_eq!(
        read_until_closed(&mut long).await,
        b"",
        "closed at the drain deadline"
    );
}

/// A flood of one-datagram flows holds at most `udp_max_flows` sockets: the flows idle
/// longest make room, and new clients are still answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_flows_are_capped_and_the_idlest_make_room() {
    let a = UdpBackend::named("a").await;
    let port = free_port(Protocol::Udp);
    let mut d = Desired::new();
    d.service(udp_service("dns", port)).task("dns", "a", a.addr);
    let (mut plane, _, registry) = plane_with(mesh_proxy::ProxyConfig {
        udp_max_flows: 4,
        ..mesh_proxy::ProxyConfig::default()
    });
    plane.apply(&d.snapshot()).await;
    let mut clients = Vec::new();
    for i in 0..10 {
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(local(port)).await.unwrap();
        let mut buf = [0u8; 64];
        let mut answered = false;
        for _ in 0..300 {
            client.send(format!("q{i}").as_bytes()).await.unwrap();
            if let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(200), client.recv(&mut buf)).await
            {
                assert_eq!(&buf[..n], format!("a:q{i}").as_bytes());
                answered = true;
                break;
            }
        }
        assert!(answered, "client {i} got no answer");
        clients.push(client);
    }
    assert!(
        metric(&registry, "mesh_udp_flows_active", &[("service", "dns")]) <= 4.0,
        "flows over the cap"
    );
    assert!(
        metric(
            &registry,
            "mesh_udp_flows_evicted_total",
            &[("service", "dns")]
        ) >= 6.0,
        "the idlest flows made room"
    );
}
