//! The nftables plane end to end: a real agent with `--dataplane nftables` in a network
//! namespace, real backends on two hosts, a client in a third namespace. Published
//! ports and VIPs are balanced by the kernel's DNAT (exact round robin per host), a
//! task that turns unhealthy leaves the table, a service that needs a userspace-only
//! option is served by the userspace plane (and status says so), the rules survive a
//! `kill -9` of the agent, a restarted agent adopts them, and SIGTERM removes them.

use std::collections::BTreeMap;

use integration::cluster::Cluster;
use integration::load::Held;
use integration::*;

fn tally(c: &Cluster, addr: &str, n: usize) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let name = c
            .get(addr)
            .unwrap_or_else(|| panic!("GET {addr} through nftables failed"));
        *seen.entry(name).or_default() += 1;
    }
    seen
}

/// An agent on `host` with the nftables plane.
fn nft_agent(host: &integration::cluster::Host, config: &str) -> Agent {
    Agent::start_named_in(
        &host.ns,
        "host1",
        Some(config),
        &[
            "--dataplane",
            "nftables",
            "--bind",
            &format!("{}:7946", host.ip),
        ],
    )
}

fn has_table(ns: &integration::netns::Netns) -> bool {
    ns.command("nft")
        .args(["list", "table", "inet", "mesh"])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn nftables_balances_in_the_kernel_survives_the_agent_and_cleans_up() {
    if skip_unless_root("nftables_balances_in_the_kernel_survives_the_agent_and_cleans_up") {
        return;
    }
    let c = Cluster::new(2);
    let (h1, h2) = (&c.hosts[0], &c.hosts[1]);
    // host1 forwards the connections it DNATs to host2's task.
    h1.ns.run("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
    let _b1 = Backend::start_in_at(&h1.ns, "web.1", &h1.ip, 8001);
    let _b2 = Backend::start_in_at(&h1.ns, "web.2", &h1.ip, 8002);
    let b3 = Backend::start_in_at(&h2.ns, "web.3", &h2.ip, 8003);
    let config = "[[service]]\nname = \"web\"\nports = [{ published = 8080, target = 8000 }]\n\
                  health = { check = \"tcp\", interval = \"200ms\" }\n\
                  [[service]]\nname = \"pp\"\nports = [{ published = 8081, target = 8000 }]\n\
                  proxy_protocol = \"v2\"\nhealth = { check = \"none\" }\n";
    let mut agent = nft_agent(h1, config);
    for (id, addr) in [
        ("web.1", format!("{}:8001", h1.ip)),
        ("web.2", format!("{}:8002", h1.ip)),
        ("web.3", format!("{}:8003", h2.ip)),
    ] {
        assert_ok(agent.cli(&["task", "add", "web", &addr, "--id", id]));
    }
    agent.wait_routable("web", 3);

    // The table is there and readable.
    let listed = h1.ns.run("nft", &["list", "table", "inet", "mesh"]);
    assert!(listed.contains("numgen inc mod 3"), "{listed}");
    assert!(listed.contains(&format!("{} . 8003", h2.ip)), "{listed}");

    // Exact round robin through the published port, across both hosts.
    let target = format!("{}:8080", h1.ip);
    let seen = tally(&c, &target, 30);
    assert_eq!(
        seen,
        BTreeMap::from([
            ("web.1".to_string(), 10),
            ("web.2".to_string(), 10),
            ("web.3".to_string(), 10)
        ]),
        "nftables round robin"
    );

    // The VIP, from host1 itself (the output hook), reaches the tasks too.
    let (_, web) = agent.http("GET", "/v1/services/web", None);
    let vip = web["vips"]["v4"]
        .as_str()
        .expect("web has an IPv4 VIP")
        .to_string();
    let out = h1
        .ns
        .command(backend_bin())
        .args(["--get", &format!("{vip}:8000")])
        .output()
        .unwrap();
    let via_vip = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        via_vip.starts_with("web."),
        "through the VIP: {via_vip:?} {out:?}"
    );

    // A service that needs PROXY headers is served by the userspace plane, and status
    // says so.
    let (_, status) = agent.http("GET", "/v1/status", None);
    let fallbacks = status["fallbacks"].to_string();
    assert!(
        fallbacks.contains("pp") && fallbacks.contains("proxy_protocol"),
        "{status}"
    );
    let planes = status["planes"].as_array().expect("planes");
    assert!(
        planes.iter().any(|p| p["name"] == "nftables"
            && p["active"] == true
            && p["frontends"].as_u64() >= Some(1)),
        "{status}"
    );

    // A task that turns unhealthy leaves the kernel's table; the rest share exactly.
    drop(b3);
    eventually("web.3 unhealthy", || {
        (agent.task_health("web", "web.3") == "unhealthy").then_some(())
    });
    agent.wait_applied();
    eventually("web.3 left the nftables table", || {
        let listed = h1.ns.run("nft", &["list", "table", "inet", "mesh"]);
        (!listed.contains(&format!("{} . 8003", h2.ip))).then_some(())
    });
    let seen = tally(&c, &target, 20);
    assert_eq!(
        seen,
        BTreeMap::from([("web.1".to_string(), 10), ("web.2".to_string(), 10)]),
        "after web.3 turned unhealthy"
    );

    // The rules live in the kernel: a kill -9 of the agent costs no request.
    agent.kill9();
    assert!(has_table(&h1.ns), "the table outlives the agent");
    let seen = tally(&c, &target, 10);
    assert_eq!(seen.values().sum::<usize>(), 10, "{seen:?}");

    // A restarted agent adopts the table and reconciles it.
    agent.spawn(Some(config), &[]);
    agent.wait_routable("web", 2);
    assert!(
        agent.log().contains("adopting the table"),
        "{}",
        agent.log()
    );
    let seen = tally(&c, &target, 10);
    assert_eq!(seen.values().sum::<usize>(), 10, "{seen:?}");

    // SIGTERM removes the table.
    assert!(agent.stop().success());
    assert!(!has_table(&h1.ns), "SIGTERM removes table inet mesh");
}

#[test]
fn an_explicit_nftables_that_cannot_run_refuses_to_start_and_auto_falls_back() {
    // Without nft on PATH, `--dataplane nftables` names the problem and stops; `auto`
    // serves from userspace and says why. No root needed: the plane fails before it
    // touches the kernel.
    let empty = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let path = empty.path().to_str().unwrap();
    let data_dir = data.path().join("data");
    let socket = data.path().join("mesh.sock");
    let common = [
        "--bind",
        "127.0.0.1:0",
        "--no-vips",
        "--data-dir",
        data_dir.to_str().unwrap(),
        "--api",
    ];
    let api = format!("unix:{}", socket.display());
    let mut args: Vec<&str> = common.to_vec();
    args.push(&api);
    let mut explicit = args.clone();
    explicit.extend(["--dataplane", "nftables"]);
    let err = agent_refuses_with_env(&explicit, &[("PATH", path)]);
    assert!(
        err.contains("--dataplane nftables cannot run here") && err.contains("nft"),
        "{err}"
    );

    let log = data.path().join("auto.log");
    let mut auto = args.clone();
    auto.extend(["--dataplane", "auto"]);
    let mut child = ChildGuard(
        std::process::Command::new(mesh_bin())
            .arg("agent")
            .args(&auto)
            .env("PATH", path)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    eventually("auto falls back to userspace and starts", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        (text.contains("dataplane auto: nftables does not work here")
            && text.contains("mesh agent started"))
        .then_some(())
    });
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "the agent keeps running on the userspace plane"
    );
}

/// One UDP flow, driven line by line.
struct Flow {
    _child: ChildGuard,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl Flow {
    fn open(ns: &integration::netns::Netns, addr: &str) -> Flow {
        let mut child = ns
            .command(backend_bin())
            .args(["--udp-flow", addr])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        Flow {
            _child: ChildGuard(child),
            stdin,
            stdout,
        }
    }

    /// Which task answers the flow's next datagram.
    fn ask(&mut self) -> String {
        use std::io::{BufRead, Write};
        writeln!(self.stdin, "q").unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line.trim().to_string()
    }
}

#[test]
fn a_udp_flow_moves_when_its_task_is_removed() {
    if skip_unless_root("a_udp_flow_moves_when_its_task_is_removed") {
        return;
    }
    let c = Cluster::new(1);
    let h1 = &c.hosts[0];
    let bin = backend_bin().to_string_lossy().to_string();
    let _u1 = integration::load::spawn_in(&h1.ns, &bin, &["--udp", "u.1", "5301", &h1.ip]);
    let _u2 = integration::load::spawn_in(&h1.ns, &bin, &["--udp", "u.2", "5302", &h1.ip]);
    let config = "[[service]]\nname = \"dns\"\nports = [{ published = 5353, target = 5300, protocol = \"udp\" }]\n\
                  health = { check = \"none\" }\n";
    let agent = nft_agent(h1, config);
    for (id, port) in [("u.1", 5301), ("u.2", 5302)] {
        assert_ok(agent.cli(&[
            "task",
            "add",
            "dns",
            &format!("{}:{port}", h1.ip),
            "--id",
            id,
        ]));
    }
    agent.wait_routable("dns", 2);

    let mut flow = Flow::open(&c.client.ns, &format!("{}:5353", h1.ip));
    let first = flow.ask();
    assert!(first == "u.1" || first == "u.2", "{first}");
    assert_eq!(flow.ask(), first, "a flow sticks to its task (conntrack)");

    // Its task is removed while its backend still answers: the flow must move, not
    // stay pinned by a stale conntrack entry.
    assert_ok(agent.cli(&["task", "rm", "dns", &first]));
    agent.wait_applied();
    let other = if first == "u.1" { "u.2" } else { "u.1" };
    assert_eq!(flow.ask(), other, "the flow moved off the removed task");
    assert!(
        agent
            .log()
            .contains("flows to a task that left the table forgotten"),
        "{}",
        agent.log()
    );
}

#[test]
fn client_ip_keep_goes_to_this_hosts_tasks_and_they_see_the_client() {
    if skip_unless_root("client_ip_keep_goes_to_this_hosts_tasks_and_they_see_the_client") {
        return;
    }
    let c = Cluster::new(2);
    let key = keygen();
    c.hosts[0]
        .ns
        .run("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
    let _backends: Vec<Backend> = (0..2)
        .flat_map(|i| {
            let h = &c.hosts[i];
            [
                Backend::start_in_at(&h.ns, &format!("kept.{}", i + 1), &h.ip, 8001),
                Backend::start_in_at(&h.ns, &format!("any.{}", i + 1), &h.ip, 8002),
            ]
        })
        .collect();
    let agents: Vec<Agent> = (0..2)
        .map(|i| {
            let (h, n) = (&c.hosts[i], i + 1);
            let config = format!(
                "{}[[service]]\nname = \"kept\"\nports = [{{ published = 8090, target = 8001 }}]\n\
                 client_ip = \"keep\"\nhealth = {{ check = \"tcp\", interval = \"200ms\" }}\n\
                 [[service]]\nname = \"any\"\nports = [{{ published = 8091, target = 8002 }}]\n\
                 health = {{ check = \"tcp\", interval = \"200ms\" }}\n\
                 [[task]]\nservice = \"kept\"\nid = \"kept.{n}\"\nip = \"{ip}\"\n\
                 [[task]]\nservice = \"any\"\nid = \"any.{n}\"\nip = \"{ip}\"\n",
                c.cluster_config(i, &key),
                ip = h.ip
            );
            Agent::start_named_in(
                &h.ns,
                &format!("host{n}"),
                Some(&config),
                &["--dataplane", "nftables"],
            )
        })
        .collect();
    for a in &agents {
        a.wait_routable("kept", 2);
        a.wait_routable("any", 2);
        a.wait_applied();
    }
    let client = &c.client.ip;
    // keep: each host's own task only, and the task sees the client's address.
    for (i, h) in c.hosts.iter().enumerate() {
        for _ in 0..6 {
            let (task, seen) = c.who(&format!("{}:8090", h.ip));
            assert_eq!(task, format!("kept.{}", i + 1), "through host{}", i + 1);
            assert_eq!(&seen, client, "kept.{} saw {seen}", i + 1);
        }
    }
    // The default: tasks on both hosts; the hop to host2 is masqueraded, so that task
    // sees host1's address. That is the trade-off keep makes the other way.
    let mut seen = BTreeMap::new();
    for _ in 0..6 {
        let (task, addr) = c.who(&format!("{}:8091", c.hosts[0].ip));
        *seen.entry((task, addr)).or_insert(0) += 1;
    }
    assert_eq!(
        seen,
        BTreeMap::from([
            (("any.1".to_string(), client.clone()), 3),
            (("any.2".to_string(), c.hosts[0].ip.clone()), 3),
        ]),
        "round robin over both hosts' tasks"
    );
    let listed = c.hosts[0].ns.run("nft", &["list", "table", "inet", "mesh"]);
    let kept_rule = listed
        .lines()
        .find(|l| l.contains("dnat") && l.contains("mod 1"))
        .unwrap_or_else(|| panic!("no rule for kept: {listed}"));
    // No masquerade mark; the conntrack mark that lets a host firewall pass the
    // plane's connections is on every rule.
    assert!(!kept_rule.contains("meta mark set"), "{kept_rule}");
    assert!(kept_rule.contains("ct mark set"), "{kept_rule}");
}

#[test]
fn nftables_balances_ipv6_across_hosts() {
    if skip_unless_root("nftables_balances_ipv6_across_hosts") {
        return;
    }
    let c = Cluster::new(2);
    let v6 = |i: usize| format!("fd77::{}", i + 1);
    for (i, h) in c.hosts.iter().enumerate() {
        h.ns.run(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/64", v6(i)),
                "dev",
                "eth0",
                "nodad",
            ],
        );
    }
    let client = "fd77::c8";
    c.client.ns.run(
        "ip",
        &[
            "addr",
            "add",
            &format!("{client}/64"),
            "dev",
            "eth0",
            "nodad",
        ],
    );
    // host1 forwards what it DNATs to host2's task.
    c.hosts[0]
        .ns
        .run("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"]);
    let _b1 = Backend::start_in_at(&c.hosts[0].ns, "web6.1", &v6(0), 8001);
    let _b2 = Backend::start_in_at(&c.hosts[1].ns, "web6.2", &v6(1), 8002);
    let config = "[[service]]\nname = \"web6\"\nports = [{ published = 8080, target = 8000 }]\n\
                  health = { check = \"tcp\", interval = \"200ms\" }\n";
    let agent = nft_agent(&c.hosts[0], config);
    for (id, addr) in [
        ("web6.1", format!("[{}]:8001", v6(0))),
        ("web6.2", format!("[{}]:8002", v6(1))),
    ] {
        assert_ok(agent.cli(&["task", "add", "web6", &addr, "--id", id]));
    }
    agent.wait_routable("web6", 2);
    agent.wait_applied();
    let listed = c.hosts[0].ns.run("nft", &["list", "table", "inet", "mesh"]);
    assert!(listed.contains("dnat ip6 to numgen inc mod 2"), "{listed}");

    // Exact round robin over both hosts' IPv6 tasks, through host1's IPv6 address. The
    // local task sees the client; the hop to host2 is masqueraded to host1's address.
    let mut seen = BTreeMap::new();
    for _ in 0..6 {
        let (task, addr) = c.who(&format!("[{}]:8080", v6(0)));
        *seen.entry((task, addr)).or_insert(0) += 1;
    }
    assert_eq!(
        seen,
        BTreeMap::from([
            (("web6.1".to_string(), client.to_string()), 3),
            (("web6.2".to_string(), v6(0)), 3),
        ]),
        "IPv6 round robin through the nftables plane"
    );
}

#[test]
fn a_drained_tasks_connections_go_on_until_drain_timeout_then_end() {
    if skip_unless_root("a_drained_tasks_connections_go_on_until_drain_timeout_then_end") {
        return;
    }
    let c = Cluster::new(1);
    let h = &c.hosts[0];
    let _d1 = Backend::start_in_at(&h.ns, "d.1", &h.ip, 8001);
    let _d2 = Backend::start_in_at(&h.ns, "d.2", &h.ip, 8002);
    // Long enough that the first held connection is surely done inside it.
    let config = "[[service]]\nname = \"d\"\nports = [{ published = 8090, target = 8000 }]\n\
                  health = { check = \"none\" }\ndrain_timeout = \"15s\"\n";
    let agent = nft_agent(h, config);
    assert_ok(agent.cli(&["task", "add", "d", &format!("{}:8001", h.ip), "--id", "d.1"]));
    agent.wait_routable("d", 1);
    agent.wait_applied();
    let addr = format!("{}:8090", h.ip);
    // Two established connections, both to d.1, the only task.
    let mut during = Held::open_until_go(&c.client.ns, &addr);
    let mut after = Held::open_until_go(&c.client.ns, &addr);

    assert_ok(agent.cli(&["task", "add", "d", &format!("{}:8002", h.ip), "--id", "d.2"]));
    assert_ok(agent.cli(&["task", "drain", "d", "d.1"]));
    agent.wait_applied();
    eventually("new connections go to d.2 only", || {
        (0..3)
            .all(|_| c.get(&addr).as_deref() == Some("d.2"))
            .then_some(())
    });
    // Inside drain_timeout, an established connection to the drained task goes on.
    during.go();
    assert_eq!(during.outcome(), Ok("d.1".to_string()), "during the drain");

    // Then the plane deletes the drained task's conntrack entries, and what was still
    // open ends: its next segment is a new flow to a task that never saw it.
    let port = "8001";
    eventually("conntrack forgets d.1's flows after drain_timeout", || {
        h.ns.run(
            "conntrack",
            &[
                "-L",
                "-p",
                "tcp",
                "--reply-src",
                &h.ip,
                "--reply-port-src",
                port,
            ],
        )
        .trim()
        .is_empty()
        .then_some(())
    });
    after.go();
    let ended = after.outcome();
    assert!(ended.is_err(), "after drain_timeout: {ended:?}");
}
