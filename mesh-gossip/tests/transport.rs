//! Gossip over real UDP and TCP sockets on loopback: three nodes replicate, a node
//! with the wrong key cannot join, a graceful leave withdraws at once.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_core::{
    Health, MemberStatus, PortSpec, Replica, ReplicaConfig, ServiceSpec, TaskSpec, TaskState,
    VipPool,
};
use mesh_gossip::GossipConfig;
use mesh_gossip::crypto::{Keyring, generate_key};
use mesh_gossip::transport::{GossipHandle, ToTable, TransportConfig, start, wall_ms};

struct Node {
    replica: Arc<Mutex<Replica>>,
    handle: GossipHandle,
    prom: prometheus::Registry,
}

async fn node(name: &str, seeds: Vec<SocketAddr>, key: &str) -> Node {
    node_of(name, "0.1.0", seeds, key).await
}

/// A node that says it runs release `version`.
async fn node_of(name: &str, version: &str, seeds: Vec<SocketAddr>, key: &str) -> Node {
    let replica = Arc::new(Mutex::new(Replica::new(
        name,
        1,
        VipPool::default(),
        ReplicaConfig::default(),
    )));
    let prom = prometheus::Registry::new();
    let config = TransportConfig {
        cluster: "test".into(),
        node: name.into(),
        generation: 1,
        version: version.into(),
        bind: "127.0.0.1:0".parse().unwrap(),
        advertise: None,
        seeds,
        keyring: Keyring::new("test", &[key.to_string()]).unwrap(),
        insecure: false,
        gossip: GossipConfig {
            probe_period: Duration::from_millis(200),
            probe_rtt: Duration::from_millis(100),
            suspect_to_down_after: Some(Duration::from_millis(600)),
            ..GossipConfig::default()
        },
        anti_entropy: Duration::from_millis(500),
    };
    // The table of this test: the one task that applies what gossip hands over.
    let (table, mut requests) = tokio::sync::mpsc::channel::<ToTable>(64);
    let owned = replica.clone();
    tokio::spawn(async move {
        while let Some(r) = requests.recv().await {
            r.run(&mut owned.lock().unwrap(), wall_ms());
        }
    });
    let handle = start(config, table, &prom).await.unwrap();
    Node {
        replica,
        handle,
        prom,
    }
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn routed(n: &Node) -> usize {
    n.replica
        .lock()
        .unwrap()
        .snapshot()
        .services
        .get("web")
        .map_or(0, |w| w.tasks.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_replicate_a_wrong_key_is_refused_and_leave_withdraws() {
    let key = generate_key();
    let a = node("a", vec![], &key).await;
    let b = node_of("b", "0.2.0-rc.1", vec![a.handle.local_addr], &key).await;
    let c = node("c", vec![a.handle.local_addr], &key).await;
    eventually("three members", || {
        c.handle
            .members
            .borrow()
            .iter()
            .filter(|m| m.status == MemberStatus::Alive)
            .count()
            == 3
    })
    .await;
    // Every node learns every node's release, its own included: a mixed cluster shows.
    for n in [&a, &b, &c] {
        eventually("every member's version", || {
            let mut versions: Vec<(String, Option<String>)> = n
                .handle
                .members
                .borrow()
                .iter()
                .map(|m| (m.name.clone(), m.version.clone()))
                .collect();
            versions.sort();
            versions
                == [
                    ("a".into(), Some("0.1.0".into())),
                    ("b".into(), Some("0.2.0-rc.1".into())),
                    ("c".into(), Some("0.1.0".into())),
                ]
        })
        .await;
    }

    let d = a
        .replica
        .lock()
        .unwrap()
        .create_service(
            ServiceSpec::new("web", vec![PortSpec::tcp(Some(8080), 80)]),
            1,
        )
        .unwrap();
    a.handle.deltas.try_send(d).unwrap();
    eventually("service on b", || {
        b.replica.lock().unwrap().service("web").is_some()
    })
    .await;
    let d = {
        let mut r = b.replica.lock().unwrap();
        let spec = TaskSpec {
            service: "web".into(),
            id: Some("web.1".into()),
            ip: "10.0.0.1".parse().unwrap(),
            port: None,
            state: TaskState::Active,
            observed: None,
        };
        let mut d = r.add_task(spec, mesh_core::TaskSource::Api, 2).unwrap().1;
        d.extend(r.set_health("web", "web.1", Health::Healthy, 2));
        d
    };
    b.handle.deltas.try_send(d).unwrap();
    eventually("b's task routed on c", || routed(&c) == 1).await;

    // A node with another key gets nowhere, and the cluster counts its packets.
    let intruder = node("x", vec![a.handle.local_addr], &generate_key()).await;
    eventually("auth failures counted", || {
        a.prom.gather().iter().any(|f| {
            f.get_name() == "mesh_gossip_auth_failures_total"
                && f.get_metric()[0].get_counter().get_value() > 0.0
        })
    })
    .await;
    assert!(intruder.replica.lock().unwrap().service("web").is_none());
    assert!(a.handle.members.borrow().iter().all(|m| m.name != "x"));

    // b leaves gracefully: its task is withdrawn on c at once, not after suspicion.
    let leave = b.replica.lock().unwrap().leave();
    b.handle.leave(leave).await;
    eventually("b's task withdrawn on c", || routed(&c) == 0).await;
    eventually("b shown as left", || {
        c.handle
            .members
            .borrow()
            .iter()
            .any(|m| m.name == "b" && matches!(m.status, MemberStatus::Left | MemberStatus::Down))
    })
    .await;
}

/// A host alone gossips nothing (it has no one to tell, and keeps no backlog for
/// later): what it wrote meanwhile must reach a host that joins afterwards by
/// anti-entropy alone. A guard on that path; it passed before the change too, when
/// the backlog carried the writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_lone_host_wrote_reaches_a_host_that_joins_later() {
    let key = generate_key();
    let a = node("a", vec![], &key).await;
    let deltas = {
        let mut r = a.replica.lock().unwrap();
        let mut d = r
            .create_service(
                ServiceSpec::new("web", vec![PortSpec::tcp(Some(8080), 80)]),
                1,
            )
            .unwrap();
        for i in 0..200 {
            let spec = TaskSpec {
                service: "web".into(),
                id: Some(format!("web.{i}")),
                ip: "10.0.0.1".parse().unwrap(),
                port: None,
                state: TaskState::Active,
                observed: None,
            };
            d.extend(r.add_task(spec, mesh_core::TaskSource::Api, 2).unwrap().1);
            d.extend(r.set_health("web", &format!("web.{i}"), Health::Healthy, 2));
            // Half are deleted again.
            if i % 2 == 1 {
                d.extend(r.remove_task("web", &format!("web.{i}"), 3).unwrap());
            }
        }
        d
    };
    a.handle.deltas.try_send(deltas).unwrap();
    // b starts only once a's gossip has taken the writes, alone.
    eventually("a's gossip took the writes", || {
        a.handle.deltas.capacity() == a.handle.deltas.max_capacity()
    })
    .await;
    let b = node("b", vec![a.handle.local_addr], &key).await;
    eventually("a's 100 live tasks routed on b", || routed(&b) == 100).await;
}
