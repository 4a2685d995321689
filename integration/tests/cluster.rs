//! Real agents on three hosts (network namespaces on one bridge): the routing mesh,
//! VIP and DNS agreement, crash, restart, partition, graceful leave, wrong key.
//! Times are printed for the record, never asserted.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Instant;

use integration::cluster::Cluster;
use integration::*;

fn config(c: &Cluster, i: usize, key: &str) -> String {
    let me = &c.hosts[i].ip;
    format!(
        "{}[dns]\nlisten = [\"{me}:53\"]\nupstreams = []\nallow = [\"10.77.0.0/24\", \"127.0.0.0/8\"]\n",
        c.cluster_config(i, key)
    )
}

fn start(c: &Cluster, i: usize, key: &str) -> Agent {
    start_on(c, i, key, "userspace")
}

/// Host `i` with data plane `plane`. A kernel plane forwards what it DNATs to another
/// host, so the host forwards.
fn start_on(c: &Cluster, i: usize, key: &str, plane: &str) -> Agent {
    if plane != "userspace" {
        c.hosts[i]
            .ns
            .run("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
    }
    Agent::start_named_in(
        &c.hosts[i].ns,
        &format!("host{}", i + 1),
        Some(&config(c, i, key)),
        &["--dataplane", plane],
    )
}

fn alive(agent: &Agent) -> usize {
    let (_, nodes) = agent.http("GET", "/v1/nodes", None);
    nodes
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["status"] == "alive")
        .count()
}

#[test]
fn three_hosts_form_a_routing_mesh_and_survive_crash_restart_partition_and_leave() {
    if skip_unless_root(
        "three_hosts_form_a_routing_mesh_and_survive_crash_restart_partition_and_leave",
    ) {
        return;
    }
    routing_mesh("userspace");
}

/// The same cluster, each host balancing in its kernel: the routing mesh, the VIP,
/// DNS, crash, restart, partition and leave behave as with the userspace plane.
#[test]
fn with_the_nftables_plane_three_hosts_form_a_routing_mesh_and_survive_crash_restart_partition_and_leave()
 {
    if skip_unless_root(
        "with_the_nftables_plane_three_hosts_form_a_routing_mesh_and_survive_crash_restart_partition_and_leave",
    ) {
        return;
    }
    routing_mesh("nftables");
}

fn routing_mesh(plane: &str) {
    let key = keygen();
    let c = Cluster::new(3);
    let mut hosts: Vec<Agent> = (0..3).map(|i| start_on(&c, i, &key, plane)).collect();
    eventually("three hosts alive everywhere", || {
        hosts.iter().all(|h| alive(h) == 3).then_some(())
    });

    assert_ok(hosts[0].cli(&[
        "service",
        "create",
        "web",
        "-p",
        "8080:80",
        "--health-interval",
        "200ms",
        "--drain-timeout",
        "2s",
    ]));
    eventually("web known on every host", || {
        hosts
            .iter()
            .all(|h| h.http("GET", "/v1/services/web", None).0 == 200)
            .then_some(())
    });
    let b1 = Backend::start_in_at(&c.hosts[0].ns, "web.1", &c.hosts[0].ip, 0);
    let b2 = Backend::start_in_at(&c.hosts[1].ns, "web.2", &c.hosts[1].ip, 0);
    assert_ok(hosts[0].cli(&[
        "task",
        "add",
        "web",
        &format!("{}:{}", c.hosts[0].ip, b1.port),
        "--id",
        "web.1",
    ]));
    let added = Instant::now();
    assert_ok(hosts[1].cli(&[
        "task",
        "add",
        "web",
        &format!("{}:{}", c.hosts[1].ip, b2.port),
        "--id",
        "web.2",
    ]));
    eventually("web.2 routed on host1 and host3", || {
        (hosts[0].routed("web").contains("web.2") && hosts[2].routed("web").contains("web.2"))
            .then_some(())
    });
    eprintln!(
        "FIGURE {plane}: new task on host2 routed by host1 and host3 after {:?} (includes its first health probe)",
        added.elapsed()
    );
    eventually("both tasks on host3", || {
        (hosts[2].routed("web") == ids(&["web.1", "web.2"])).then_some(())
    });
    hosts[2].wait_applied();

    // The routing mesh: host3 runs no task, and balances over host1's and host2's.
    let answers: Vec<String> = (0..4)
        .map(|_| {
            c.get(&format!("{}:8080", c.hosts[2].ip))
                .expect("connection through host3")
        })
        .collect();
    assert_eq!(
        answers.iter().cloned().collect::<BTreeSet<_>>(),
        ids(&["web.1", "web.2"]),
        "{answers:?}"
    );
    assert_ne!(answers[0], answers[1], "round robin: {answers:?}");

    // One VIP, agreed everywhere; reached through host2 from the client.
    let vips: BTreeSet<String> = hosts
        .iter()
        .map(|h| h.http("GET", "/v1/services/web", None).1["vips"]["v4"].to_string())
        .collect();
    assert_eq!(vips.len(), 1, "{vips:?}");
    let vip = vips
        .into_iter()
        .next()
        .unwrap()
        .trim_matches('"')
        .to_string();
    let route = Command::new("ip")
        .args([
            "-n",
            &c.client.ns.name,
            "route",
            "add",
            "10.254.0.0/16",
            "via",
            &c.hosts[1].ip,
        ])
        .output()
        .unwrap();
    assert!(route.status.success());
    let dig = |server: &str, args: &[&str]| {
        let mut all = vec![
            format!("@{server}"),
            "+short".into(),
            "+time=3".into(),
            "+tries=2".into(),
        ];
        all.extend(args.iter().map(|a| a.to_string()));
        c.client
            .ns
            .run("dig", &all.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let have_dig = Command::new("dig").arg("-v").output().is_ok();
    if have_dig {
        assert_eq!(
            dig(&c.hosts[1].ip, &["web.mesh"]).trim(),
            vip,
            "host2's DNS answers the VIP"
        );
    }
    let via_vip: BTreeSet<String> = (0..4).filter_map(|_| c.get(&format!("{vip}:80"))).collect();
    assert_eq!(
        via_vip,
        ids(&["web.1", "web.2"]),
        "VIP:80 through host2 balances over host1 and host2"
    );

    // kill -9 host2's agent and task: withdrawn on every host.
    let port2 = b2.port;
    let killed = Instant::now();
    hosts[1].kill9();
    drop(b2);
    eventually("web.2 withdrawn on host1 and host3", || {
        (!hosts[0].routed("web").contains("web.2") && !hosts[2].routed("web").contains("web.2"))
            .then_some(())
    });
    eprintln!(
        "FIGURE {plane}: kill -9 of host2: its task withdrawn everywhere after {:?}",
        killed.elapsed()
    );
    // Withdrawn, not hidden: `service ps` shows it suspended, with why, and `service
    // ls` counts it apart.
    let ps = eventually("host1 shows web.2 suspended", || {
        let text =
            String::from_utf8_lossy(&hosts[0].cli(&["service", "ps", "web"]).stdout).to_string();
        text.lines()
            .any(|l| l.starts_with("web.2 ") && l.contains("suspended (host "))
            .then_some(text)
    });
    let ls = String::from_utf8_lossy(&hosts[0].cli(&["service", "ls"]).stdout).to_string();
    assert!(ls.contains("+1 suspended"), "{ls}\n{ps}");
    // Status has a cluster section: members by state, and anti-entropy keeps going.
    eventually("host1's status counts host2 out and has synced", || {
        let c = hosts[0].cli_json(&["status"])["cluster"].clone();
        (c["members"]["alive"] == 2
            && c["members"]["suspect"].as_u64().unwrap_or(0)
                + c["members"]["down"].as_u64().unwrap_or(0)
                == 1
            && c["anti_entropy_age_seconds"].as_u64().is_some())
        .then_some(())
    });
    let text = String::from_utf8_lossy(&hosts[0].cli(&["status"]).stdout).to_string();
    assert!(
        text.contains("Cluster:     2 alive") && text.contains("last anti-entropy"),
        "{text}"
    );
    // The other hosts say so in their logs.
    eventually("host1 logs that host2 stopped answering", || {
        let log = hosts[0].log();
        (log.contains("host host2 is suspect") || log.contains("host host2 is down")).then_some(())
    });
    assert!(
        hosts[0].log().contains("host host2 joined the cluster"),
        "{}",
        hosts[0].log()
    );
    hosts[2].wait_applied();
    if have_dig {
        let tasks = dig(&c.hosts[0].ip, &["tasks.web.mesh"]);
        assert!(
            !tasks.contains(&c.hosts[1].ip),
            "tasks.web drops the dead host: {tasks}"
        );
    }
    for _ in 0..4 {
        assert_eq!(
            c.get(&format!("{}:8080", c.hosts[2].ip)).as_deref(),
            Some("web.1")
        );
    }

    // Restart host2 (same data dir, new generation): its task comes back by itself.
    let _b2 = Backend::start_in_at(&c.hosts[1].ns, "web.2", &c.hosts[1].ip, port2);
    let restarted = Instant::now();
    let cfg = config(&c, 1, &key);
    hosts[1].spawn(Some(&cfg), &[]);
    if plane == "nftables" {
        assert!(
            hosts[1].log().contains("adopting the table"),
            "the restarted agent adopts the table its killed run left: {}",
            hosts[1].log()
        );
    }
    eventually("web.2 routed again on host3", || {
        hosts[2].routed("web").contains("web.2").then_some(())
    });
    eventually("host3 logs that host2 is back", || {
        let log = hosts[2].log();
        (log.contains("host host2 is back") || log.contains("host host2 answers again"))
            .then_some(())
    });
    eprintln!(
        "FIGURE {plane}: host2 restarted: its task routed again on host3 after {:?}",
        restarted.elapsed()
    );

    // Partition host2 away, change the table on the other side, heal.
    c.link(1, false);
    let b3 = Backend::start_in_at(&c.hosts[0].ns, "web.3", &c.hosts[0].ip, 0);
    assert_ok(hosts[0].cli(&[
        "task",
        "add",
        "web",
        &format!("{}:{}", c.hosts[0].ip, b3.port),
        "--id",
        "web.3",
    ]));
    eventually("web.3 routed on host3", || {
        hosts[2].routed("web").contains("web.3").then_some(())
    });
    assert!(
        !hosts[1].routed("web").contains("web.3"),
        "host2 is cut off"
    );
    let healed = Instant::now();
    c.link(1, true);
    eventually("host2 reconverged", || {
        (hosts[1].routed("web") == hosts[0].routed("web")
            && hosts[1].routed("web").contains("web.3"))
        .then_some(())
    });
    eprintln!(
        "FIGURE {plane}: partition healed: host2 reconverged after {:?}",
        healed.elapsed()
    );

    // Graceful leave: withdrawn at once, no failure detection needed.
    let left = Instant::now();
    assert!(hosts[1].stop().success());
    if plane == "nftables" {
        let listed = c.hosts[1]
            .ns
            .command("nft")
            .args(["list", "table", "inet", "mesh"])
            .output()
            .expect("run nft");
        assert!(
            !listed.status.success(),
            "SIGTERM removes host2's table inet mesh"
        );
    }
    eventually("web.2 withdrawn after leave", || {
        (!hosts[0].routed("web").contains("web.2") && !hosts[2].routed("web").contains("web.2"))
            .then_some(())
    });
    eprintln!(
        "FIGURE {plane}: host2 left gracefully: withdrawn everywhere after {:?}",
        left.elapsed()
    );
    eventually("host1 logs that host2 left", || {
        hosts[0]
            .log()
            .contains("host host2 left the cluster")
            .then_some(())
    });
    eventually("host2 shown as left", || {
        let (_, nodes) = hosts[0].http("GET", "/v1/nodes", None);
        nodes
            .as_array()?
            .iter()
            .any(|n| n["name"] == "host2" && n["status"] == "left")
            .then_some(())
    });

    // A deleted service is gone everywhere, DNS included.
    assert_ok(hosts[2].cli(&["service", "rm", "web"]));
    eventually("web gone on host1", || {
        (hosts[0].http("GET", "/v1/services/web", None).0 == 404).then_some(())
    });
    if have_dig {
        for live in [0, 2] {
            let ip = &c.hosts[live].ip;
            eventually("NXDOMAIN on every live host", || {
                c.client
                    .ns
                    .run("dig", &[&format!("@{ip}"), "web.mesh"])
                    .contains("NXDOMAIN")
                    .then_some(())
            });
        }
    }
}

#[test]
fn concurrent_creation_on_two_hosts_agrees_on_one_vip_each() {
    if skip_unless_root("concurrent_creation_on_two_hosts_agrees_on_one_vip_each") {
        return;
    }
    let key = keygen();
    let c = Cluster::new(3);
    let hosts: Vec<Agent> = (0..3).map(|i| start(&c, i, &key)).collect();
    eventually("three hosts alive everywhere", || {
        hosts.iter().all(|h| alive(h) == 3).then_some(())
    });
    // Two services at once on two hosts, and one name created on both at once.
    let (h1, h3) = (&hosts[0], &hosts[2]);
    std::thread::scope(|s| {
        s.spawn(|| {
            assert_ok(h1.cli(&[
                "service", "create", "api", "-p", "9000:80", "--health", "none",
            ]))
        });
        s.spawn(|| {
            assert_ok(h3.cli(&[
                "service", "create", "db", "-p", "9001:80", "--health", "none",
            ]))
        });
        s.spawn(|| {
            let _ = h1.cli(&[
                "service", "create", "same", "-p", "9100:80", "--health", "none",
            ]);
        });
        s.spawn(|| {
            let _ = h3.cli(&[
                "service",
                "create",
                "same",
                "-p",
                "9100:80",
                "--health",
                "none",
                "--drain-timeout",
                "9s",
            ]);
        });
    });
    let view = |h: &Agent| {
        let (_, list) = h.http("GET", "/v1/services", None);
        list.as_array()
            .unwrap()
            .iter()
            .map(|s| {
                format!(
                    "{} {} {} {}",
                    s["name"], s["vips"]["v4"], s["vips"]["v6"], s["drain_timeout"]
                )
            })
            .collect::<Vec<_>>()
    };
    eventually("every host agrees", || {
        let v = view(&hosts[0]);
        (v.len() == 3 && hosts.iter().all(|h| view(h) == v)).then_some(())
    });
    let v = view(&hosts[1]);
    let vips: BTreeSet<&str> = v.iter().map(|l| l.split(' ').nth(1).unwrap()).collect();
    assert_eq!(vips.len(), 3, "one VIP each: {v:?}");
}

#[test]
fn a_host_with_the_wrong_key_cannot_join_and_says_why() {
    if skip_unless_root("a_host_with_the_wrong_key_cannot_join_and_says_why") {
        return;
    }
    let c = Cluster::new(2);
    let h1 = start(&c, 0, &keygen());
    let h2 = start(&c, 1, &keygen());
    eventually("host1 logs the rejected packets", || {
        h1.log().contains("authentication failed").then_some(())
    });
    eventually("host2 says why it cannot join", || {
        h2.log().contains("no seed has answered").then_some(())
    });
    assert_eq!(alive(&h1), 1);
    assert_eq!(alive(&h2), 1);
}

#[test]
fn a_task_id_two_hosts_claim_is_a_conflict_shown_in_ps_status_and_the_log() {
    if skip_unless_root("a_task_id_two_hosts_claim_is_a_conflict_shown_in_ps_status_and_the_log") {
        return;
    }
    let c = Cluster::new(2);
    let key = keygen();
    let hosts: Vec<Agent> = (0..2).map(|i| start(&c, i, &key)).collect();
    eventually("two hosts see each other", || {
        (alive(&hosts[0]) == 2 && alive(&hosts[1]) == 2).then_some(())
    });
    assert_ok(hosts[0].cli(&["service", "create", "web", "-p", "8080:8000"]));
    eventually("host2 knows web", || {
        (hosts[1].http("GET", "/v1/services/web", None).0 == 200).then_some(())
    });
    let add = |i: usize| {
        let addr = format!("{}:8000", c.hosts[i].ip);
        assert_ok(hosts[i].cli(&["task", "add", "web", &addr, "--id", "web.x"]));
    };
    // The same id added on both sides of a partition: neither host can know.
    c.link(1, false);
    add(0);
    add(1);
    c.link(1, true);
    eventually("the partition heals", || {
        (alive(&hosts[0]) == 2 && alive(&hosts[1]) == 2).then_some(())
    });
    // Every host resolves it alike: the first host by name keeps the id.
    let ps = eventually("host2's service ps shows the conflict", || {
        let text =
            String::from_utf8_lossy(&hosts[1].cli(&["service", "ps", "web"]).stdout).to_string();
        text.contains("conflict: ").then_some(text)
    });
    assert!(ps.contains("web.x"), "{ps}");
    let status = String::from_utf8_lossy(&hosts[1].cli(&["status"]).stdout).to_string();
    assert!(status.contains("Conflict:    web: "), "{status}");
    eventually("host2 logs the conflict", || {
        hosts[1]
            .log()
            .lines()
            .any(|l| l.contains("WARN") && l.contains("conflict service=web"))
            .then_some(())
    });
    // Removing the losing task resolves it, and the log says so.
    assert_ok(hosts[1].cli(&["task", "rm", "web", "web.x"]));
    eventually("host2 logs that the conflict is resolved", || {
        hosts[1].log().contains("conflict resolved").then_some(())
    });
}

/// Three agents on loopback (no namespaces, so no root): each one's `node ls` lists
/// every host with the mesh release it runs, learned through gossip.
#[test]
fn node_ls_shows_every_hosts_version_on_every_host() {
    let out = assert_ok(Command::new(mesh_bin()).arg("--version").output().unwrap());
    // `mesh 0.1.0 (data planes: ...)`
    let version = out.split_whitespace().nth(1).unwrap().to_string();
    let key = keygen();
    let config = "[cluster]\nanti_entropy = \"1s\"\n";
    let first = Agent::start_named("host1", Some(config), &["--cluster-key", &key]);
    let (_, nodes) = first.http("GET", "/v1/nodes", None);
    let seed = nodes[0]["address"].as_str().unwrap().to_string();
    let join = ["--cluster-key", &key, "--join", &seed];
    let hosts = [
        first,
        Agent::start_named("host2", Some(config), &join),
        Agent::start_named("host3", Some(config), &join),
    ];
    let want: Vec<(String, Value)> = ["host1", "host2", "host3"]
        .iter()
        .map(|h| (h.to_string(), json!(version)))
        .collect();
    for host in &hosts {
        eventually(
            &format!("{}'s node ls shows every version", host.name),
            || {
                let nodes = host.cli_json(&["node", "ls"]);
                let got: Vec<(String, Value)> = nodes
                    .as_array()?
                    .iter()
                    .map(|n| {
                        (
                            n["name"].as_str().unwrap_or("").to_string(),
                            n["version"].clone(),
                        )
                    })
                    .collect();
                (got == want).then_some(())
            },
        );
        let table = assert_ok(host.cli(&["node", "ls"]));
        let mut lines = table.lines();
        assert!(lines.next().unwrap().contains("VERSION"), "{table}");
        assert!(
            lines.all(|row| row.split_whitespace().any(|cell| cell == version)),
            "{table}"
        );
    }
}

/// Host `host`'s generation as `agent` sees it, while it is alive there.
fn alive_generation(agent: &Agent, host: &str) -> Option<u64> {
    let (_, nodes) = agent.http("GET", "/v1/nodes", None);
    nodes
        .as_array()?
        .iter()
        .find(|n| n["name"] == host && n["status"] == "alive")?["generation"]
        .as_u64()
}

/// A host whose clock was an hour ahead when it last started (an RTC set wrong at
/// boot, put right later by NTP) is restarted with its clock right. Its peers know it
/// by the generation of that start, an hour in the future, and take the higher
/// generation of a host for the newer one: a start from the clock alone comes back
/// below its old self, on the same gossip address, and peers ignore it until they
/// forget the old one an hour later. The data dir's `generation` file keeps every
/// start above the last.
#[test]
fn a_host_restarted_after_its_clock_went_back_rejoins() {
    let test = "a_host_restarted_after_its_clock_went_back_rejoins";
    // libfaketime itself, preloaded by `env`, which execs the agent: the `faketime`
    // command would stay the parent, and a kill -9 would miss the agent.
    let Some(lib) = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|arch| arch.path().join("faketime/libfaketime.so.1"))
        .find(|lib| lib.exists())
    else {
        integration::skip::skip(
            test,
            "MESH_REQUIRE_FAKETIME",
            "libfaketime is not installed",
        );
        return;
    };
    let key = keygen();
    let config = "[cluster]\nanti_entropy = \"1s\"\n";
    let first = Agent::start_named("host1", Some(config), &["--cluster-key", &key]);
    let (_, nodes) = first.http("GET", "/v1/nodes", None);
    let seed = nodes[0]["address"].as_str().unwrap().to_string();
    let bind = format!("127.0.0.1:{}", free_port());
    let args = [
        "--no-vips",
        "--bind",
        &bind,
        "--cluster-key",
        &key,
        "--join",
        &seed,
    ];
    let preload = format!("LD_PRELOAD={}", lib.display());
    let ahead = [
        "env",
        &preload,
        "FAKETIME=+1h",
        "FAKETIME_DONT_FAKE_MONOTONIC=1",
    ];
    let mut second = Agent::start_named_under(&ahead, "host2", Some(config), &args);
    let before = eventually("host1 sees host2 alive, started an hour ahead", || {
        alive_generation(&first, "host2")
    });
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(
        before > now_ms + 30 * 60 * 1000,
        "host2's first start ran with its clock an hour ahead: generation {before}, now {now_ms}"
    );
    second.kill9();
    eventually("host1 no longer sees host2 alive", || {
        alive_generation(&first, "host2").is_none().then_some(())
    });
    second.set_prefix(&[]);
    second.spawn(Some(config), &[]);
    let after = eventually("host1 sees the restarted host2 alive", || {
        alive_generation(&first, "host2").filter(|g| *g > before)
    });
    assert!(
        second.log().contains("the clock is behind"),
        "the restart says its clock was behind; generation {before} → {after}; log:\n{}",
        second.log()
    );
}
