//! Whole-cluster behaviour in the deterministic simulator: real foca and replicas,
//! virtual time, loss, partitions, crashes and restarts. Figures are printed, never
//! asserted; the invariants are.

use std::collections::BTreeSet;

use mesh_core::{Health, PortSpec, ServiceSpec, TaskSpec, TaskState};
use mesh_gossip::sim::{Sim, SimConfig};

fn views_equal(sim: &Sim) -> bool {
    let up = sim.up_nodes();
    let first = serde_json::to_string(&sim.replica(up[0]).snapshot().services).unwrap();
    up.iter()
        .all(|i| serde_json::to_string(&sim.replica(*i).snapshot().services).unwrap() == first)
}

fn add_task(sim: &mut Sim, i: usize, id: &str, ip: &str) {
    let (service, id, ip) = ("web".to_string(), id.to_string(), ip.parse().unwrap());
    sim.write(i, move |r, now| {
        let spec = TaskSpec {
            service: service.clone(),
            id: Some(id.clone()),
            ip,
            port: None,
            state: TaskState::Active,
            observed: None,
        };
        let mut d = r.add_task(spec, mesh_core::TaskSource::Api, now).unwrap().1;
        d.extend(r.set_health(&service, &id, Health::Healthy, now));
        d
    });
}

fn routed_ids(sim: &Sim, i: usize) -> BTreeSet<String> {
    let snap = sim.replica(i).snapshot();
    snap.services
        .get("web")
        .map(|w| {
            w.tasks
                .iter()
                .map(|t| format!("{}@{}", t.id, t.node))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_small_cluster_forms_and_replicates() {
    let mut sim = Sim::new(SimConfig {
        nodes: 16,
        ..SimConfig::default()
    });
    let formed = sim.until(100, 60_000, |s| {
        s.up_nodes().iter().all(|i| s.known_members(*i) == 15)
    });
    assert!(formed.is_some(), "membership formed");
    sim.write(0, |r, now| {
        r.create_service(
            ServiceSpec::new("web", vec![PortSpec::tcp(Some(8080), 80)]),
            now,
        )
        .unwrap()
    });
    assert!(
        sim.until(10, 60_000, |s| (0..16)
            .all(|i| s.replica(i).service("web").is_some()))
            .is_some()
    );
    for i in 0..16 {
        add_task(&mut sim, i, &format!("t{i}"), &format!("10.0.0.{}", i + 1));
    }
    let t = sim.until(50, 60_000, |s| {
        routed_ids(s, 15).len() == 16 && views_equal(s)
    });
    assert!(t.is_some(), "all 16 tasks everywhere");
    // A graceful leave withdraws at once (by gossip, before any failure detection).
    sim.leave(3);
    let t = sim.until(10, 60_000, |s| {
        s.up_nodes()
            .iter()
            .all(|i| routed_ids(s, *i).iter().all(|t| !t.ends_with("@n3")))
    });
    eprintln!(
        "16 nodes: graceful leave withdrawn everywhere after {} ms (virtual)",
        t.expect("withdrawn")
    );
}

#[test]
fn five_hundred_nodes_survive_loss_partitions_crashes_and_restarts() {
    const N: usize = 500;
    let mut sim = Sim::new(SimConfig {
        nodes: N,
        seed: 7,
        ..SimConfig::default()
    });
    // SWIM views converge with high probability; after a 500-node join storm a few
    // nodes may still miss a member or two, which anti-entropy does not need.
    let formed = sim.until(500, 300_000, |s| {
        s.up_nodes()
            .iter()
            .all(|i| s.known_members(*i) >= N - 1 - N / 100)
    });
    let full = sim
        .up_nodes()
        .iter()
        .filter(|i| sim.known_members(**i) == N - 1)
        .count();
    eprintln!("500 nodes: 99% views in {formed:?} ms (virtual); {full}/{N} nodes see every member");
    assert!(formed.is_some());

    sim.write(0, |r, now| {
        r.create_service(
            ServiceSpec::new("web", vec![PortSpec::tcp(Some(8080), 80)]),
            now,
        )
        .unwrap()
    });
    let t = sim.until(10, 120_000, |s| {
        s.up_nodes()
            .iter()
            .all(|i| s.replica(*i).service("web").is_some())
    });
    eprintln!("500 nodes: a new service reached every node in {t:?} ms (virtual, 0% loss)");
    assert!(t.is_some());
    for i in 0..N {
        add_task(&mut sim, i, &format!("t{i}"), "10.0.0.1");
    }
    let t = sim.until(200, 300_000, |s| {
        routed_ids(s, N - 1).len() == N && views_equal(s)
    });
    eprintln!(
        "500 tasks registered on 500 hosts, everywhere in {:?} ms",
        t
    );
    assert!(t.is_some());

    // 10% loss from here on; a symmetric partition with writes on both sides; a
    // one-way cut; crashes, one of them restarted as a new generation.
    sim.set_loss(0.10);
    let a: Vec<usize> = (0..N / 2).collect();
    let b: Vec<usize> = (N / 2..N).collect();
    sim.partition(&a, &b);
    sim.write(1, |r, now| r.remove_task("web", "t1", now).unwrap());
    sim.write(300, |r, now| r.remove_task("web", "t300", now).unwrap());
    add_task(&mut sim, 2, "late2", "10.0.0.2");
    sim.run_for(10_000);
    sim.cut(&[10], &(0..N).filter(|i| *i != 10).collect::<Vec<_>>());
    for dead in [5, 6, 7] {
        sim.crash(dead);
    }
    sim.run_for(20_000);
    sim.restart(6);
    let t = sim.until(100, 120_000, |s| s.replica(6).service("web").is_some());
    eprintln!("a restarted host (new generation) had the service table again after {t:?} ms");
    assert!(t.is_some());
    add_task(&mut sim, 6, "t6b", "10.0.0.6");
    sim.heal();
    let t = sim.until(500, 600_000, |s| {
        views_equal(s)
            && s.up_nodes().iter().all(|i| {
                let ids = routed_ids(s, *i);
                !ids.iter().any(|t| t.ends_with("@n5") || t.ends_with("@n7"))
            })
    });
    eprintln!("after heal: reconverged in {:?} ms with 10% loss", t);
    assert!(t.is_some(), "all live hosts agree again");

    let up = sim.up_nodes();
    let ids = routed_ids(&sim, up[0]);
    // Deleted tasks stay deleted; writes from both sides of the partition survive.
    assert!(
        !ids.contains("t1@n1") && !ids.contains("t300@n300"),
        "no resurrection"
    );
    assert!(
        ids.contains("late2@n2") && ids.contains("t6b@n6"),
        "{} tasks",
        ids.len()
    );
    // The crashed hosts' tasks are withdrawn everywhere, the restarted one routes.
    assert!(!ids.iter().any(|t| t.ends_with("@n5") || t.ends_with("@n7")));
    // Every host agrees on the VIP.
    let vips: BTreeSet<String> = up
        .iter()
        .map(|i| format!("{:?}", sim.replica(*i).snapshot().services["web"].vips))
        .collect();
    assert_eq!(vips.len(), 1);
    let bytes = sim.total_bytes() as f64 / N as f64 / (sim.now_ms as f64 / 1000.0);
    eprintln!(
        "500 nodes: {:.0} bytes/s per node on average over {} s (virtual)",
        bytes,
        sim.now_ms / 1000
    );
}

/// A host that was declared down while alive renews itself (generation + 1). When it
/// is later restarted, its new identity must be above every one it had: one equal to
/// an identity its peers hold down is ignored by them, and the host stays out of the
/// cluster until it hears of that verdict and renews again. The simulator gave a
/// restart its boot count as the generation, and a host with two renewals behind it
/// came back as the identity its peers had just declared down.
#[test]
fn a_restart_after_false_downs_comes_back_above_every_earlier_identity() {
    let mut sim = Sim::new(SimConfig {
        nodes: 3,
        seed: 11,
        ..SimConfig::default()
    });
    let formed = sim.until(100, 60_000, |s| {
        s.up_nodes().iter().all(|i| s.known_members(*i) == 2)
    });
    assert!(formed.is_some(), "3 nodes formed");
    let first = sim.generation(2).expect("n2 is up");
    // Two false downs: n2 is cut off until the others declare it down, then healed
    // until they take its renewed identity back.
    for round in 0..2 {
        sim.partition(&[2], &[0, 1]);
        let down = sim.until(100, 60_000, |s| {
            s.known_members(0) == 1 && s.known_members(1) == 1
        });
        assert!(down.is_some(), "round {round}: n2 declared down");
        sim.heal();
        let back = sim.until(100, 60_000, |s| {
            s.up_nodes().iter().all(|i| s.known_members(*i) == 2)
        });
        assert!(back.is_some(), "round {round}: n2 back");
    }
    let renewed = sim.generation(2).expect("n2 is up");
    assert!(
        renewed >= first + 2,
        "n2 renewed itself after each false down: generation {first} → {renewed}"
    );
    sim.crash(2);
    let down = sim.until(100, 60_000, |s| s.known_members(0) == 1);
    assert!(down.is_some(), "the crash of n2 detected");
    sim.restart(2);
    let restarted = sim.generation(2).expect("n2 is up again");
    assert!(
        restarted > renewed,
        "the restarted n2 runs as generation {restarted}, not above its renewed {renewed}"
    );
    let back = sim.until(100, 60_000, |s| {
        s.up_nodes().iter().all(|i| s.known_members(*i) == 2)
    });
    assert!(back.is_some(), "the restarted n2 rejoined");
}
