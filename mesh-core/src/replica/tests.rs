use super::*;
use crate::error::StateError;
use crate::health::Health;
use crate::service::HealthKind;
use crate::service::Mode;
use crate::service::PortSpec;
use crate::task::TaskSource;

fn replica(name: &str) -> Replica {
    Replica::new(name, 1, VipPool::default(), ReplicaConfig::default())
}

fn web(port: u16) -> ServiceSpec {
    ServiceSpec::new("web", vec![PortSpec::tcp(Some(port), 80)])
}

fn task(service: &str, id: &str, ip: &str) -> TaskSpec {
    TaskSpec::new(service, id, ip.parse().unwrap())
}

/// The ids of the `web` tasks a replica routes, in id order.
fn web_task_ids(r: &Replica) -> Vec<String> {
    r.snapshot().services["web"]
        .tasks
        .iter()
        .map(|t| t.id.clone())
        .collect()
}

/// The routing-relevant view, for comparing replicas.
fn view(r: &Replica) -> String {
    serde_json::to_string(&r.snapshot().services).unwrap()
}

/// One anti-entropy round between `a` and `b`, both ways.
fn sync(a: &mut Replica, b: &mut Replica, now: u64) -> usize {
    for (n, _, _) in b.digest().origins {
        a.member_up(&n);
    }
    for (n, _, _) in a.digest().origins {
        b.member_up(&n);
    }
    let to_a = b.sync_for(&a.digest());
    let to_b = a.sync_for(&b.digest());
    let n = to_a.len() + to_b.len();
    for i in to_a {
        a.apply_sync(i, now);
    }
    for i in to_b {
        b.apply_sync(i, now);
    }
    n
}

/// Gossip delivery; the receiver's membership has seen the sender alive.
fn deliver(to: &mut Replica, deltas: &[Delta], now: u64) {
    for d in deltas {
        if let Delta::Task { origin, .. } = d {
            to.member_up(origin);
        }
        to.apply_delta(d.clone(), now);
    }
}

#[test]
fn deltas_and_anti_entropy_both_converge() {
    let (mut a, mut b, mut c) = (replica("a"), replica("b"), replica("c"));
    let mut log = a.create_service(web(8080), 1).unwrap();
    log.extend(
        a.add_task(task("web", "web.1", "10.0.0.1"), crate::TaskSource::Api, 2)
            .unwrap()
            .1,
    );
    log.extend(a.set_health("web", "web.1", Health::Healthy, 3));
    deliver(&mut b, &log, 4);
    assert_eq!(view(&a), view(&b));
    // c hears nothing by gossip; one anti-entropy round brings it level.
    assert!(sync(&mut a, &mut c, 5) > 0);
    assert_eq!(view(&a), view(&c));
    assert_eq!(a.digest(), c.digest());
    assert_eq!(sync(&mut a, &mut c, 6), 0, "in sync: nothing to send");
    let web = &c.snapshot().services["web"];
    assert_eq!(web.tasks[0].node, "a");
    assert!(web.tasks[0].routable());
}

#[test]
fn out_of_order_and_lost_deltas_heal_by_anti_entropy() {
    let (mut a, mut b) = (replica("a"), replica("b"));
    let mut log = a.create_service(web(8080), 1).unwrap();
    for i in 0..20 {
        log.extend(
            a.add_task(
                task("web", &format!("t{i}"), "10.0.0.1"),
                crate::TaskSource::Api,
                2,
            )
            .unwrap()
            .1,
        );
    }
    log.extend(a.remove_task("web", "t3", 3).unwrap());
    // Reversed, with every third delta lost.
    for (i, d) in log.iter().rev().enumerate() {
        if i % 3 != 0 {
            b.apply_delta(d.clone(), 4);
        }
    }
    assert_ne!(view(&a), view(&b));
    sync(&mut a, &mut b, 5);
    assert_eq!(view(&a), view(&b));
    assert_eq!(b.digest(), a.digest());
}

#[test]
fn a_peer_below_the_gc_floor_gets_a_full_copy_and_deletes_stick() {
    let cfg = ReplicaConfig {
        task_tombstone_ttl_ms: 100,
        ..ReplicaConfig::default()
    };
    let mut a = Replica::new("a", 1, VipPool::default(), cfg);
    let mut b = replica("b");
    let mut log = a.create_service(web(8080), 1).unwrap();
    log.extend(
        a.add_task(task("web", "keep", "10.0.0.1"), crate::TaskSource::Api, 1)
            .unwrap()
            .1,
    );
    log.extend(
        a.add_task(task("web", "gone", "10.0.0.2"), crate::TaskSource::Api, 1)
            .unwrap()
            .1,
    );
    deliver(&mut b, &log, 1);
    // b misses the delete; a collects the tombstone.
    a.remove_task("web", "gone", 10).unwrap();
    a.tick(500);
    assert!(a.digest().origins.iter().any(|(n, _, _)| n == "a"));
    let items = a.sync_for(&b.digest());
    assert!(
        items
            .iter()
            .any(|i| matches!(i, SyncItem::Origin { full: true, .. })),
        "b is below a's floor: full copy"
    );
    for i in items {
        b.apply_sync(i, 600);
    }
    let ids = web_task_ids(&b);
    assert_eq!(ids, ["keep"]);
    // Replaying the old add to b does nothing: it is below the floor.
    deliver(&mut b, &log, 700);
    let ids = web_task_ids(&b);
    assert_eq!(ids, ["keep"]);
}

#[test]
fn concurrent_service_writes_resolve_last_writer_wins_everywhere() {
    let (mut a, mut b) = (replica("a"), replica("b"));
    let d = a.create_service(web(8080), 1).unwrap();
    deliver(&mut b, &d, 1);
    let mut sa = web(8080);
    sa.drain_timeout = std::time::Duration::from_secs(1);
    let mut sb = web(8080);
    sb.drain_timeout = std::time::Duration::from_secs(2);
    let da = a.put_service(sa, 10).unwrap();
    let db = b.put_service(sb, 10).unwrap();
    deliver(&mut a, &db, 11);
    deliver(&mut b, &da, 11);
    assert_eq!(view(&a), view(&b));
    // Same HLC: the node name breaks the tie, so b's write wins on both.
    assert_eq!(a.service("web").unwrap().drain_timeout.as_secs(), 2);
}

#[test]
fn a_deleted_service_never_comes_back_after_its_tombstone_is_collected() {
    let cfg = ReplicaConfig {
        service_tombstone_ttl_ms: 100,
        ..ReplicaConfig::default()
    };
    let mut a = Replica::new("a", 1, VipPool::default(), cfg.clone());
    let mut stale = Replica::new("stale", 1, VipPool::default(), cfg);
    let d = a.create_service(web(8080), 1).unwrap();
    deliver(&mut stale, &d, 1);
    // `stale` is cut off; a deletes the service and collects the tombstone.
    a.remove_service("web", 10).unwrap();
    a.tick(1_000);
    assert!(a.services.records.is_empty());
    // Healing: the stale live record is neither accepted by a nor kept by stale.
    sync(&mut a, &mut stale, 2_000);
    assert!(a.service("web").is_none());
    assert!(
        stale.service("web").is_none(),
        "stale dropped its record below a's floor"
    );
    // And a newer service of the same name is accepted.
    let d = stale.create_service(web(8081), 3_000).unwrap();
    deliver(&mut a, &d, 3_000);
    assert!(a.service("web").is_some());
}

#[test]
fn concurrent_vip_and_port_conflicts_resolve_the_same_everywhere() {
    // A /30 has two usable addresses: both services hash into it and may collide.
    let pool = VipPool {
        v4: Some("192.0.2.0/30".parse().unwrap()),
        v6: None,
    };
    let mut a = Replica::new("a", 1, pool.clone(), ReplicaConfig::default());
    let mut b = Replica::new("b", 1, pool, ReplicaConfig::default());
    let mut x = ServiceSpec::new("x", vec![PortSpec::tcp(Some(8080), 80)]);
    x.normalize().unwrap();
    let mut y = ServiceSpec::new("y", vec![PortSpec::tcp(Some(8080), 81)]);
    y.normalize().unwrap();
    let dx = a.create_service(x, 10).unwrap();
    let dy = b.create_service(y, 20).unwrap();
    // Force the clash: y wanted x's VIP.
    let Delta::Service(rx) = &dx[0] else { panic!() };
    let Delta::Service(mut ry) = dy[0].clone() else {
        panic!()
    };
    ry.vips = rx.vips;
    b.force_record(ry.clone(), 20);
    deliver(&mut a, &[Delta::Service(ry)], 21);
    deliver(&mut b, &dx, 21);
    assert_eq!(view(&a), view(&b));
    let snap = a.snapshot();
    assert_ne!(
        snap.services["x"].vips, snap.services["y"].vips,
        "one VIP each"
    );
    assert_eq!(
        snap.services["x"].vips, rx.vips,
        "the earlier creation keeps its VIP"
    );
    assert!(
        snap.services["y"].conflicts[0]
            .to_string()
            .contains("8080/tcp is held by service \"x\""),
        "{:?}",
        snap.services["y"].conflicts
    );
    assert_eq!(
        snap.services["y"].spec.ports[0].published, None,
        "the loser's port is not served"
    );
    // The derived VIP is written down, so it stays when the winner goes away.
    let y_vip = snap.services["y"].vips;
    let fixes = a.tick(30);
    deliver(&mut b, &fixes, 31);
    let (_, gone) = a.remove_service("x", 40).unwrap();
    let _ = gone;
    assert_eq!(a.snapshot().services["y"].vips, y_vip);
    assert_eq!(
        a.snapshot().services["y"].spec.ports[0].published,
        Some(8080),
        "the port is free again"
    );
}

#[test]
fn a_down_host_is_suspended_then_restored_then_purged() {
    let cfg = ReplicaConfig {
        purge_after_ms: 1_000,
        ..ReplicaConfig::default()
    };
    let mut a = replica("a");
    let mut b = Replica::new("b", 1, VipPool::default(), cfg);
    let mut log = a.create_service(web(8080), 1).unwrap();
    log.extend(
        a.add_task(task("web", "web.1", "10.0.0.1"), crate::TaskSource::Api, 1)
            .unwrap()
            .1,
    );
    log.extend(a.set_health("web", "web.1", Health::Healthy, 1));
    deliver(&mut b, &log, 1);
    let routed = |r: &Replica| r.snapshot().services["web"].tasks.len();
    assert_eq!(routed(&b), 1);
    b.member_down("a", 10);
    assert_eq!(routed(&b), 0, "withdrawn at once");
    b.member_up("a");
    assert_eq!(routed(&b), 1, "restored at once, same generation");
    b.member_down("a", 20);
    b.tick(2_000);
    assert!(
        b.nodes().iter().all(|n| n.name != "a"),
        "purged after the grace period"
    );
    // Old data of the purged generation is refused; a new generation is welcome.
    deliver(&mut b, &log, 2_001);
    assert_eq!(routed(&b), 0);
    let mut a2 = Replica::new("a", 2, VipPool::default(), ReplicaConfig::default());
    let d = a2.create_service(web(8080), 3).unwrap();
    deliver(&mut a2, &[], 3);
    let mut d2 = a2
        .add_task(task("web", "web.1", "10.0.0.9"), crate::TaskSource::Api, 3)
        .unwrap()
        .1;
    d2.extend(a2.set_health("web", "web.1", Health::Healthy, 3));
    let _ = d;
    deliver(&mut b, &d2, 2_002);
    b.member_up("a");
    assert_eq!(
        b.snapshot().services["web"].tasks[0].ip.to_string(),
        "10.0.0.9"
    );
}

#[test]
fn a_restarted_host_replaces_its_old_generation() {
    let (mut a, mut b) = (replica("a"), replica("b"));
    let mut log = a.create_service(web(8080), 1).unwrap();
    log.extend(
        a.add_task(task("web", "old", "10.0.0.1"), crate::TaskSource::Api, 1)
            .unwrap()
            .1,
    );
    deliver(&mut b, &log, 1);
    let mut a2 = Replica::new("a", 2, VipPool::default(), ReplicaConfig::default());
    sync(&mut a2, &mut b, 2); // a2 learns the service
    let (_, d) = a2
        .add_task(task("web", "new", "10.0.0.2"), crate::TaskSource::Api, 3)
        .unwrap();
    deliver(&mut b, &d, 3);
    let ids = web_task_ids(&b);
    assert_eq!(ids, ["new"]);
}

#[test]
fn a_graceful_leave_withdraws_at_once() {
    let (mut a, mut b) = (replica("a"), replica("b"));
    let mut log = a.create_service(web(8080), 1).unwrap();
    log.extend(
        a.add_task(task("web", "web.1", "10.0.0.1"), crate::TaskSource::Api, 1)
            .unwrap()
            .1,
    );
    deliver(&mut b, &log, 1);
    assert!(b.apply_delta(a.leave(), 2));
    assert!(b.snapshot().services["web"].tasks.is_empty());
    assert!(matches!(
        b.nodes().iter().find(|n| n.name == "a").unwrap().liveness,
        Liveness::Left { .. }
    ));
}

#[test]
fn only_the_owner_changes_its_tasks_and_ids_stay_unique() {
    let (mut a, mut b) = (replica("a"), replica("b"));
    let mut log = a.create_service(web(8080), 1).unwrap();
    log.extend(
        a.add_task(task("web", "web.1", "10.0.0.1"), crate::TaskSource::Api, 1)
            .unwrap()
            .1,
    );
    deliver(&mut b, &log, 1);
    let err = b.remove_task("web", "web.1", 2).unwrap_err();
    assert!(err.to_string().contains("runs on host \"a\""), "{err}");
    assert!(matches!(
        b.add_task(task("web", "web.1", "10.0.0.2"), crate::TaskSource::Api, 2),
        Err(StateError::TaskExists { .. })
    ));
    let (id, _) = b
        .add_task(
            TaskSpec {
                id: None,
                ..task("web", "", "10.0.0.2")
            },
            crate::TaskSource::Api,
            2,
        )
        .unwrap();
    // Chosen ids carry the host's name, so two hosts never pick the same one.
    assert_eq!(id, "web.b.1");
    // Concurrent adds of one id on two hosts: the first host by name keeps it.
    let (mut c, mut d) = (replica("c"), replica("d"));
    let s = c.create_service(web(8080), 1).unwrap();
    deliver(&mut d, &s, 1);
    let dc = c
        .add_task(task("web", "x", "10.0.0.3"), crate::TaskSource::Api, 2)
        .unwrap()
        .1;
    let dd = d
        .add_task(task("web", "x", "10.0.0.4"), crate::TaskSource::Api, 2)
        .unwrap()
        .1;
    deliver(&mut c, &dd, 3);
    deliver(&mut d, &dc, 3);
    assert_eq!(view(&c), view(&d));
    let web = &c.snapshot().services["web"];
    assert_eq!(web.tasks.len(), 1);
    assert_eq!(web.tasks[0].node, "c");
    assert!(
        web.conflicts[0].to_string().contains("host \"d\""),
        "{:?}",
        web.conflicts
    );
}

#[test]
fn deleting_a_service_removes_the_owners_tasks() {
    let (mut a, mut b) = (replica("a"), replica("b"));
    let mut log = a.create_service(web(8080), 1).unwrap();
    deliver(&mut b, &log, 1);
    log = b
        .add_task(task("web", "web.1", "10.0.0.1"), crate::TaskSource::Api, 2)
        .unwrap()
        .1;
    deliver(&mut a, &log, 2);
    let (_, d) = a.remove_service("web", 3).unwrap();
    deliver(&mut b, &d, 3);
    let cleanup = b.tick(4);
    assert!(
        matches!(&cleanup[..], [Delta::Task { value: None, .. }]),
        "{cleanup:?}"
    );
    assert!(b.own_tasks(None).is_empty());
}

#[test]
fn ten_thousand_services_with_ten_tasks_each_sync_to_a_new_host() {
    let mut a = replica("a");
    let mut owners: Vec<Replica> = (0..10).map(|i| replica(&format!("h{i}"))).collect();
    for s in 0..10_000 {
        let mut spec = ServiceSpec::new(format!("s{s}"), vec![PortSpec::tcp(None, 80)]);
        spec.health.check = HealthKind::None;
        let d = a.create_service(spec, 1).unwrap();
        for o in owners.iter_mut() {
            deliver(o, &d, 1);
        }
    }
    for (i, o) in owners.iter_mut().enumerate() {
        for s in 0..10_000 {
            let d = o
                .add_task(
                    task(&format!("s{s}"), &format!("t{i}"), "10.0.0.1"),
                    crate::TaskSource::Api,
                    2,
                )
                .unwrap()
                .1;
            deliver(&mut a, &d, 2);
        }
    }
    let mut fresh = replica("fresh");
    for i in 0..10 {
        fresh.member_up(&format!("h{i}"));
    }
    let started = std::time::Instant::now();
    let items = a.sync_for(&fresh.digest());
    let bytes: usize = items
        .iter()
        .map(|i| serde_json::to_vec(i).unwrap().len())
        .sum();
    for i in items {
        fresh.apply_sync(i, 3);
    }
    eprintln!(
        "full sync of 10,000 services x 10 tasks: {} ms, {} MB as JSON",
        started.elapsed().as_millis(),
        bytes / 1_000_000
    );
    assert_eq!(view(&fresh), view(&a));
    assert_eq!(
        fresh
            .snapshot()
            .services
            .values()
            .map(|s| s.tasks.len())
            .sum::<usize>(),
        100_000
    );
    assert_eq!(sync(&mut a, &mut fresh, 4), 0);
}

#[test]
fn deltas_round_trip_through_a_non_self_describing_format() {
    // Gossip uses postcard, which cannot skip absent fields: every optional field
    // must be written, present or not.
    let mut a = replica("a");
    let mut spec = web(8080);
    spec.max_connections = Some(5);
    spec.ports.push(PortSpec::tcp(None, 81));
    let mut deltas = a.create_service(spec, 1).unwrap();
    deltas.extend(
        a.add_task(
            TaskSpec {
                port: None,
                ..task("web", "x", "10.0.0.1")
            },
            crate::TaskSource::Api,
            2,
        )
        .unwrap()
        .1,
    );
    deltas.push(a.leave());
    for d in deltas {
        let bytes = postcard::to_allocvec(&d).unwrap();
        assert_eq!(postcard::from_bytes::<Delta>(&bytes).unwrap(), d);
    }
    let digest = a.digest();
    let items = a.sync_for(&replica("b").digest());
    assert_eq!(
        postcard::from_bytes::<Digest>(&postcard::to_allocvec(&digest).unwrap()).unwrap(),
        digest
    );
    let round: Vec<SyncItem> =
        postcard::from_bytes(&postcard::to_allocvec(&items).unwrap()).unwrap();
    assert_eq!(round, items);
}

#[test]
fn tasks_of_a_host_membership_never_saw_alive_are_not_routed() {
    let (mut a, mut b) = (replica("a"), replica("b"));
    let mut log = a.create_service(web(8080), 1).unwrap();
    log.extend(
        a.add_task(task("web", "web.1", "10.0.0.1"), crate::TaskSource::Api, 1)
            .unwrap()
            .1,
    );
    log.extend(a.set_health("web", "web.1", Health::Healthy, 1));
    for d in &log {
        b.apply_delta(d.clone(), 2);
    }
    assert!(
        b.snapshot().services["web"].tasks.is_empty(),
        "unknown host: suspended"
    );
    b.member_up("a");
    assert_eq!(b.snapshot().services["web"].tasks.len(), 1);
}

#[test]
fn a_source_reconciles_its_own_set_and_leaves_the_others_alone() {
    let mut a = replica("a");
    a.create_service(web(8080), 1).unwrap();
    a.add_task(task("web", "api.1", "10.0.0.9"), TaskSource::Api, 1)
        .unwrap();
    let SourceOutcome {
        deltas: d, errors, ..
    } = a.replace_source(
        TaskSource::Docker,
        vec![
            task("web", "c1", "10.0.0.1"),
            task("web", "c2", "10.0.0.2"),
            task("web", "api.1", "10.0.0.3"),
            task("nope", "c3", "10.0.0.3"),
        ],
        2,
    );
    assert_eq!(d.len(), 2, "two new tasks");
    let refused: Vec<&str> = errors.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(refused, ["api.1", "c3"], "{errors:?}");
    assert!(matches!(errors[1].error, StateError::ServiceNotFound(_)));
    a.set_health("web", "c1", Health::Healthy, 3);
    // The same set again changes nothing, and keeps what health learned.
    let SourceOutcome {
        deltas: d, errors, ..
    } = a.replace_source(
        TaskSource::Docker,
        vec![task("web", "c1", "10.0.0.1"), task("web", "c2", "10.0.0.2")],
        4,
    );
    assert!(d.is_empty() && errors.is_empty());
    // A smaller set removes what is gone, and only from its own source.
    let d = a
        .replace_source(TaskSource::Docker, vec![task("web", "c2", "10.0.0.2")], 5)
        .deltas;
    assert_eq!(d.len(), 1);
    assert_eq!(web_task_ids(&a), ["api.1", "c2"]);
    let snap = a.snapshot();
    let sources: Vec<TaskSource> = snap.services["web"]
        .tasks
        .iter()
        .map(|t| t.source)
        .collect();
    assert_eq!(sources, [TaskSource::Api, TaskSource::Docker]);
    assert_eq!(a.own_tasks(Some(TaskSource::Api)).len(), 1);
    // The config source takes over an id registered through the API.
    let out = a.replace_source(
        TaskSource::Config,
        vec![task("web", "api.1", "10.0.0.4")],
        6,
    );
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    assert_eq!(out.taken_over, [("web".to_string(), "api.1".to_string())]);
    assert_eq!(a.task_source("web", "api.1"), Ok(TaskSource::Config));
}

#[test]
fn an_engines_health_check_is_the_tasks_health_and_the_prober_cannot_overrule_it() {
    let mut a = replica("a");
    a.create_service(web(8080), 1).unwrap();
    let observed = |health| {
        let mut t = task("web", "c1", "10.0.0.1");
        t.observed = Some(crate::task::Observed {
            container: "web-1".into(),
            health,
        });
        t
    };
    let entry = |a: &Replica| a.snapshot().services["web"].tasks[0].clone();
    a.replace_source(TaskSource::Docker, vec![observed(Some(Health::Healthy))], 2);
    assert_eq!(entry(&a).health, Health::Healthy, "no probe needed");
    assert!(!entry(&a).probed());
    assert_eq!(entry(&a).observed.unwrap().container, "web-1");
    // A probe loop that has not stopped yet loses against the engine.
    assert!(a.set_health("web", "c1", Health::Unhealthy, 3).is_empty());
    assert_eq!(entry(&a).health, Health::Healthy);
    // The engine's next word is taken, on the same endpoint too.
    let d = a
        .replace_source(
            TaskSource::Docker,
            vec![observed(Some(Health::Unhealthy))],
            4,
        )
        .deltas;
    assert_eq!(d.len(), 1);
    assert_eq!(entry(&a).health, Health::Unhealthy);
    // Without a check of its own, the container is probed, starting from unknown
    // like any new task.
    a.replace_source(TaskSource::Docker, vec![observed(None)], 5);
    assert!(entry(&a).probed());
    assert_eq!(
        entry(&a).health,
        Health::Unhealthy,
        "kept until a probe says"
    );
    a.set_health("web", "c1", Health::Healthy, 6);
    assert_eq!(entry(&a).health, Health::Healthy);
    // An operator cannot drain or remove it: the next report would undo that.
    let e = a
        .prepare_task_state("web", "c1", crate::task::TaskState::Draining)
        .unwrap_err();
    assert!(
        e.to_string().contains("container web-1") && e.to_string().contains("docker"),
        "{e}"
    );
    assert!(a.prepare_remove_task("web", "c1").is_err());
    // Peers read what a container engine reported (gossip's encoding is postcard).
    let mut c2 = observed(None);
    c2.id = Some("c2".into());
    c2.ip = "10.0.0.2".parse().unwrap();
    let delta = a
        .replace_source(TaskSource::Docker, vec![c2.clone(), observed(None)], 7)
        .deltas
        .remove(0);
    assert!(matches!(&delta, Delta::Task { value: Some(v), .. } if v.observed.is_some()));
    let bytes = postcard::to_stdvec(&delta).unwrap();
    assert_eq!(postcard::from_bytes::<Delta>(&bytes).unwrap(), delta);
    // And the same report again changes nothing.
    assert!(
        a.replace_source(TaskSource::Docker, vec![c2, observed(None)], 8)
            .deltas
            .is_empty()
    );
}

/// Random writes, gossip, anti-entropy, membership changes and upkeep on three
/// replicas with a tiny VIP pool and few ports, so conflicts are frequent. Debug
/// builds check after every change that the incremental snapshot equals one rebuilt
/// from nothing; at the end, full anti-entropy makes the replicas agree.
#[test]
fn the_incremental_snapshot_survives_random_histories() {
    let pool = VipPool {
        v4: Some("192.0.2.0/29".parse().unwrap()),
        v6: None,
    };
    for seed in 1..=8u64 {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut next = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let mut rs: Vec<Replica> = ["a", "b", "c"]
            .iter()
            .map(|n| Replica::new(*n, 1, pool.clone(), ReplicaConfig::default()))
            .collect();
        let mut inflight: Vec<(usize, Delta)> = Vec::new();
        for step in 0..400u64 {
            let now = 1_000 + step * 10;
            let i = next(3) as usize;
            let svc = ["s0", "s1", "s2", "s3"][next(4) as usize];
            let deltas = match next(10) {
                0 | 1 => {
                    let mut spec =
                        ServiceSpec::new(svc, vec![PortSpec::tcp(Some(8000 + next(3) as u16), 80)]);
                    if next(4) == 0 {
                        spec.mode = Mode::Dnsrr;
                    }
                    rs[i].put_service(spec, now).unwrap_or_default()
                }
                2 => rs[i]
                    .remove_service(svc, now)
                    .map(|(_, d)| d)
                    .unwrap_or_default(),
                3 | 4 => {
                    let id = format!("t{}", next(4));
                    rs[i]
                        .add_task(task(svc, &id, "10.0.0.1"), TaskSource::Api, now)
                        .map(|(_, d)| d)
                        .unwrap_or_default()
                }
                5 => {
                    let id = format!("t{}", next(4));
                    let h = if next(2) == 0 {
                        Health::Healthy
                    } else {
                        Health::Unhealthy
                    };
                    rs[i].set_health(svc, &id, h, now)
                }
                6 => {
                    let j = next(3) as usize;
                    let name = rs[j].node().to_string();
                    if next(2) == 0 {
                        rs[i].member_up(&name);
                    } else {
                        rs[i].member_down(&name, now);
                    }
                    Vec::new()
                }
                7 => rs[i].tick(now),
                _ => {
                    let j = next(3) as usize;
                    if i != j {
                        let (lo, hi) = if i < j { (i, j) } else { (j, i) };
                        let (l, r) = rs.split_at_mut(hi);
                        sync(&mut l[lo], &mut r[0], now);
                    }
                    Vec::new()
                }
            };
            for d in deltas {
                for to in 0..3 {
                    if to != i {
                        inflight.push((to, d.clone()));
                    }
                }
            }
            // Debug builds compare the snapshot with a rebuilt one on every rebuild.
            if step % 4 == 0 {
                let _ = rs[i].snapshot();
            }
            // Deliver some in-flight deltas, out of order.
            while !inflight.is_empty() && next(3) != 0 {
                let k = next(inflight.len() as u64) as usize;
                let (to, d) = inflight.swap_remove(k);
                rs[to].apply_delta(d, now);
            }
        }
        for (to, d) in inflight.drain(..) {
            rs[to].apply_delta(d, 9_000_000);
        }
        for _ in 0..3 {
            for (a, b) in [(0, 1), (1, 2), (0, 2)] {
                let (l, r) = rs.split_at_mut(b);
                sync(&mut l[a], &mut r[0], 9_000_000);
            }
        }
        assert_eq!(view(&rs[0]), view(&rs[1]), "seed {seed}");
        assert_eq!(view(&rs[1]), view(&rs[2]), "seed {seed}");
    }
}
