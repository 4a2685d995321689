//! The eBPF plane end to end: a real agent with `--dataplane ebpf` on host1 of a
//! namespace cluster, its socket programs attached to a cgroup of the test's own, and
//! clients started inside that cgroup from the client namespace. The client namespace
//! has no route to the VIP range, so a connect that the programs failed to rewrite
//! fails instead of reaching anything.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::process::Stdio;

use integration::cluster::Cluster;
use integration::ebpf::{Cgroup, PinDir, config, skip_unless_ebpf};
use integration::*;

fn vip_of(agent: &Agent, service: &str) -> String {
    let (_, s) = agent.http("GET", &format!("/v1/services/{service}"), None);
    s["vips"]["v4"].as_str().expect("a v4 VIP").to_string()
}

/// `--who-peer ADDR` from the client namespace inside the cgroup: (task, client
/// address the task saw, peer address the client's socket reports).
fn who_peer(c: &Cluster, cg: &Cgroup, addr: &str) -> Result<(String, String, String), String> {
    let out = cg
        .command(&c.client.ns, backend_bin())
        .args(["--who-peer", addr])
        .output()
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    let parts: Vec<&str> = text.split(' ').collect();
    match parts[..] {
        [task, client, peer] => Ok((task.into(), client.into(), peer.into())),
        _ => Err(format!("unexpected answer {text:?}")),
    }
}

fn tasks_in_order(c: &Cluster, cg: &Cgroup, addr: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            who_peer(c, cg, addr)
                .unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
                .0
        })
        .collect()
}

/// Round robin over two tasks: every answer differs from the one before.
fn alternates(seq: &[String]) -> bool {
    seq.windows(2).all(|w| w[0] != w[1])
}

/// A UDP echo task on port 5301 of `ip`, answering with its name.
fn udp_echo(ns: &Netns, name: &str, ip: &str) -> ChildGuard {
    let mut child = ns
        .command(backend_bin())
        .args(["--udp", name, "5301", ip])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut port = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut port)
        .unwrap();
    ChildGuard(child)
}

fn bpftool_cgroup(cg: &Cgroup) -> String {
    let out = std::process::Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(&cg.path)
        .output()
        .expect("bpftool (apt-get install bpftool)");
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn ebpf_balances_vips_at_connect_keeps_the_client_address_and_survives_the_agent() {
    let test = "ebpf_balances_vips_at_connect_keeps_the_client_address_and_survives_the_agent";
    if skip_unless_ebpf(test) {
        return;
    }
    let c = Cluster::new(2);
    let (h1, h2) = (&c.hosts[0], &c.hosts[1]);
    let cg = Cgroup::new();
    let pins = PinDir::new();
    let _b1 = Backend::start_in_at(&h1.ns, "web.1", &h1.ip, 8001);
    let b2 = Backend::start_in_at(&h2.ns, "web.2", &h2.ip, 8002);
    let cfg = format!(
        "[[service]]\nname = \"web\"\nports = [{{ target = 8000 }}]\n\
         health = {{ check = \"tcp\", interval = \"200ms\" }}\n\
         [[task]]\nservice = \"web\"\nid = \"web.1\"\nip = \"{}\"\nport = 8001\n\
         [[task]]\nservice = \"web\"\nid = \"web.2\"\nip = \"{}\"\nport = 8002\n{}",
        h1.ip,
        h2.ip,
        config(&cg, &pins)
    );
    let bind = format!("{}:7946", h1.ip);
    let args = ["--dataplane", "ebpf", "--bind", bind.as_str(), "--insecure"];
    let mut agent = Agent::start_entered(&h1.ns, "host1", Some(&cfg), &args);
    agent.wait_routable("web", 2);
    agent.wait_applied();
    let vip = vip_of(&agent, "web");
    let addr = format!("{vip}:8000");

    // A second agent on the same pin directory would detach these programs: it is
    // refused, and the first goes on.
    let other = tempfile::tempdir().unwrap();
    let other_cfg = other.path().join("mesh.toml");
    std::fs::write(&other_cfg, config(&cg, &pins)).unwrap();
    let data = other.path().join("data");
    let api = format!("unix:{}", other.path().join("mesh.sock").display());
    let err = agent_refuses_entered(
        &h1.ns,
        &[
            "--config",
            other_cfg.to_str().unwrap(),
            "--dataplane",
            "ebpf",
            "--bind",
            "127.0.0.1:0",
            "--insecure",
            "--data-dir",
            data.to_str().unwrap(),
            "--api",
            &api,
        ],
    );
    assert!(
        err.contains("another mesh agent uses ebpf.pin_dir"),
        "{err}"
    );

    // Status names the plane of the VIP frontend and what is attached where.
    let status = agent.cli_json(&["status"]);
    let planes = status["planes"].as_array().expect("planes");
    let ebpf = planes
        .iter()
        .find(|p| p["name"] == "ebpf")
        .unwrap_or_else(|| panic!("an ebpf plane in {status}"));
    assert!(ebpf["frontends"].as_u64() >= Some(1), "{ebpf}");
    let detail = ebpf["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains(&cg.path.display().to_string()) && detail.contains("mesh_connect4"),
        "{detail}"
    );
    let attached = bpftool_cgroup(&cg);
    for hook in [
        "connect4",
        "connect6",
        "sendmsg4",
        "recvmsg4",
        "getpeername4",
    ] {
        assert!(attached.contains(hook), "{hook} attached: {attached}");
    }

    // Exact round robin; the task sees the client's own address (no NAT), and the
    // client's socket reports the VIP as its peer.
    let (_, client, peer) = who_peer(&c, &cg, &addr).expect("first connect");
    assert_eq!(client, c.client.ip, "the task sees the client itself");
    assert_eq!(peer, addr, "getpeername returns the VIP");
    let seq = tasks_in_order(&c, &cg, &addr, 8);
    assert!(alternates(&seq), "round robin: {seq:?}");
    let seen: BTreeMap<&str, usize> = seq.iter().fold(BTreeMap::new(), |mut m, t| {
        *m.entry(t.as_str()).or_default() += 1;
        m
    });
    assert_eq!(seen, BTreeMap::from([("web.1", 4), ("web.2", 4)]));

    // The programs count each connect per task, and /metrics shows it under the
    // other planes' name: nine connects so far.
    eventually("mesh_connections_total counts the nine connects", || {
        let count = |task| {
            agent.metric(
                "mesh_connections_total",
                &[("service", "web"), ("task", task)],
            )
        };
        let (one, two) = (count("web.1"), count("web.2"));
        (one + two == 9.0 && one >= 4.0 && two >= 4.0).then_some(())
    });
    // Read in one batch per round, not id by id.
    assert!(
        !agent.log().contains("refused a batch read"),
        "{}",
        agent.log()
    );

    // A drained task gets no new connections, and an undrained one gets them again.
    assert_ok(agent.cli(&["task", "drain", "web", "web.1"]));
    eventually("new connections skip the drained web.1", || {
        let seq: Vec<String> = (0..4)
            .filter_map(|_| who_peer(&c, &cg, &addr).ok().map(|w| w.0))
            .collect();
        (seq.len() == 4 && seq.iter().all(|t| t == "web.2")).then_some(())
    });
    assert_ok(agent.cli(&["task", "undrain", "web", "web.1"]));
    eventually("web.1 takes new connections again", || {
        let seq: Vec<String> = (0..4)
            .filter_map(|_| who_peer(&c, &cg, &addr).ok().map(|w| w.0))
            .collect();
        (seq.len() == 4 && alternates(&seq)).then_some(())
    });

    // Outside the cgroup nothing is rewritten: the VIP has no route from the client.
    let outside = c
        .client
        .ns
        .command(backend_bin())
        .args(["--get", &addr])
        .output()
        .unwrap();
    assert!(
        !outside.status.success(),
        "a process outside the cgroup is not balanced"
    );

    // A connection established before a kill -9 of the agent goes on after it, and
    // new connections keep being balanced with no agent at all.
    let mut held = cg.command(&c.client.ns, backend_bin());
    held.args(["--held", &addr, "stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut held = ChildGuard(held.spawn().unwrap());
    let mut held_out = std::io::BufReader::new(held.0.stdout.take().unwrap());
    let mut line = String::new();
    held_out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "connected");
    agent.kill9();
    let seq = tasks_in_order(&c, &cg, &addr, 6);
    assert!(alternates(&seq), "balanced with the agent dead: {seq:?}");
    writeln!(held.0.stdin.as_mut().unwrap()).unwrap();
    line.clear();
    held_out.read_line(&mut line).unwrap();
    assert!(
        line.starts_with("ok web."),
        "the held connection finished: {line:?}"
    );
    assert!(!pins.contents().is_empty(), "the pins outlive the agent");

    // A restarted agent adopts the pinned maps and goes on.
    agent.spawn(Some(&cfg), &[]);
    agent.wait_routable("web", 2);
    agent.wait_applied();
    eventually("the restarted agent says it adopted the maps", || {
        agent.log().contains("adopting the eBPF maps").then_some(())
    });
    let seq = tasks_in_order(&c, &cg, &addr, 6);
    assert!(alternates(&seq), "balanced after the restart: {seq:?}");

    // An unhealthy task leaves the maps at the next apply.
    b2.kill();
    eventually("web.2 is no longer picked", || {
        let seq: Vec<String> = (0..4)
            .filter_map(|_| who_peer(&c, &cg, &addr).ok().map(|w| w.0))
            .collect();
        (seq.len() == 4 && seq.iter().all(|t| t == "web.1")).then_some(())
    });

    // SIGTERM removes programs, links and maps.
    assert!(agent.stop().success(), "clean exit; log:\n{}", agent.log());
    assert!(
        pins.contents().is_empty(),
        "pins left: {:?}",
        pins.contents()
    );
    let attached = bpftool_cgroup(&cg);
    assert!(!attached.contains("mesh_"), "programs left: {attached}");
    assert!(
        who_peer(&c, &cg, &addr).is_err(),
        "with the programs gone, the VIP has no route from the client"
    );
}

#[test]
fn udp_to_a_vip_moves_when_its_task_is_removed_and_answers_come_from_the_vip() {
    let test = "udp_to_a_vip_moves_when_its_task_is_removed_and_answers_come_from_the_vip";
    if skip_unless_ebpf(test) {
        return;
    }
    let c = Cluster::new(2);
    let (h1, h2) = (&c.hosts[0], &c.hosts[1]);
    let cg = Cgroup::new();
    let pins = PinDir::new();
    let _u1 = udp_echo(&h1.ns, "u.1", &h1.ip);
    let _u2 = udp_echo(&h2.ns, "u.2", &h2.ip);
    let cfg = format!(
        "[[service]]\nname = \"u\"\nports = [{{ target = 5301, protocol = \"udp\" }}]\n\
         health = {{ check = \"none\" }}\n\
         [[task]]\nservice = \"u\"\nid = \"u.1\"\nip = \"{}\"\n\
         [[task]]\nservice = \"u\"\nid = \"u.2\"\nip = \"{}\"\n{}",
        h1.ip,
        h2.ip,
        config(&cg, &pins)
    );
    let bind = format!("{}:7946", h1.ip);
    let args = ["--dataplane", "ebpf", "--bind", bind.as_str(), "--insecure"];
    let agent = Agent::start_entered(&h1.ns, "host1", Some(&cfg), &args);
    agent.wait_routable("u", 2);
    agent.wait_applied();
    let vip = vip_of(&agent, "u");
    let addr = format!("{vip}:5301");

    // One unconnected socket: its datagrams stay with one task, and the answers
    // appear to come from the VIP.
    let mut flow = cg.command(&c.client.ns, backend_bin());
    flow.args(["--udp-flow", &addr, "sendto"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut flow = ChildGuard(flow.spawn().unwrap());
    let mut input = flow.0.stdin.take().unwrap();
    let mut output = std::io::BufReader::new(flow.0.stdout.take().unwrap());
    let mut ask = move || {
        writeln!(input, "q").unwrap();
        input.flush().unwrap();
        let mut line = String::new();
        output.read_line(&mut line).unwrap();
        let (task, from) = line.trim().split_once(' ').expect("task and source");
        (task.to_string(), from.to_string())
    };
    let (first, from) = ask();
    assert!(first.starts_with("u."), "{first}");
    assert_eq!(from, addr, "the answer comes from the VIP");
    for _ in 0..4 {
        assert_eq!(ask(), (first.clone(), addr.clone()), "the flow stays");
    }

    // Remove the task the flow uses: its next datagram goes to the other task.
    assert_ok(agent.cli(&["task", "rm", "u", &first]));
    agent.wait_applied();
    let (next, from) = ask();
    assert_ne!(next, first, "the flow moved");
    assert!(next.starts_with("u."), "{next}");
    assert_eq!(from, addr);
}

#[test]
fn an_explicit_ebpf_that_cannot_run_refuses_to_start_and_auto_falls_back() {
    let test = "an_explicit_ebpf_that_cannot_run_refuses_to_start_and_auto_falls_back";
    if skip_unless_root(test) {
        return;
    }
    // A pin directory that is not on bpffs: `ebpf` names the problem and stops,
    // `auto` says why in one line and serves VIPs with another plane. (A binary
    // without the programs fails the same way, with its own reason.)
    let ns = Netns::new();
    ns.run("ip", &["link", "set", "lo", "up"]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "[ebpf]\npin_dir = \"{}\"\n",
        dir.path().join("pins").display()
    );
    let cfg_path = dir.path().join("mesh.toml");
    std::fs::write(&cfg_path, &cfg).unwrap();
    let data = dir.path().join("data");
    let api = format!("unix:{}", dir.path().join("mesh.sock").display());
    let common = [
        "--config",
        cfg_path.to_str().unwrap(),
        "--bind",
        "127.0.0.1:0",
        "--insecure",
        "--data-dir",
        data.to_str().unwrap(),
        "--api",
        &api,
    ];
    let mut explicit: Vec<&str> = common.to_vec();
    explicit.extend(["--dataplane", "ebpf"]);
    let err = agent_refuses_in(&ns, &explicit);
    assert!(err.contains("--dataplane ebpf cannot run here"), "{err}");
    assert!(
        err.contains("not on bpffs") || err.contains("built without the eBPF programs"),
        "{err}"
    );

    let mut auto = Agent::start_in(
        &ns,
        Some(&cfg),
        &["--dataplane", "auto", "--bind", "127.0.0.1:0", "--insecure"],
    );
    eventually("auto falls back with one line", || {
        agent_log_has(&auto, "dataplane auto: the eBPF plane does not work here")
    });
    let lines = auto
        .log()
        .lines()
        .filter(|l| l.contains("the eBPF plane does not work here"))
        .count();
    assert_eq!(lines, 1, "{}", auto.log());
    let status = auto.stop();
    assert!(status.success(), "{status}: {}", auto.log());
}

fn agent_log_has(agent: &Agent, text: &str) -> Option<()> {
    agent.log().contains(text).then_some(())
}

#[test]
fn an_ipv6_vip_is_balanced_at_connect_and_getpeername_returns_it() {
    let test = "an_ipv6_vip_is_balanced_at_connect_and_getpeername_returns_it";
    if skip_unless_ebpf(test) {
        return;
    }
    // One namespace: the tasks on ::1, the client beside them in the cgroup.
    let ns = Netns::new();
    ns.run("ip", &["link", "set", "lo", "up"]);
    let cg = Cgroup::new();
    let pins = PinDir::new();
    let _b1 = Backend::start_in_at(&ns, "web.1", "::1", 8001);
    let _b2 = Backend::start_in_at(&ns, "web.2", "::1", 8002);
    let cfg = format!(
        "[[service]]\nname = \"web\"\nports = [{{ target = 8000 }}]\n\
         health = {{ check = \"tcp\", interval = \"200ms\" }}\n\
         [[task]]\nservice = \"web\"\nid = \"web.1\"\nip = \"::1\"\nport = 8001\n\
         [[task]]\nservice = \"web\"\nid = \"web.2\"\nip = \"::1\"\nport = 8002\n{}",
        config(&cg, &pins)
    );
    let args = ["--dataplane", "ebpf", "--bind", "127.0.0.1:0", "--insecure"];
    let agent = Agent::start_entered(&ns, "host1", Some(&cfg), &args);
    agent.wait_routable("web", 2);
    agent.wait_applied();
    let (_, s) = agent.http("GET", "/v1/services/web", None);
    let vip6 = s["vips"]["v6"].as_str().expect("a v6 VIP").to_string();
    let addr = format!("[{vip6}]:8000");
    let ask = || {
        let out = cg
            .command(&ns, backend_bin())
            .args(["--who-peer", &addr])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{addr}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let parts: Vec<String> = text.split(' ').map(str::to_string).collect();
        assert_eq!(parts.len(), 3, "{text}");
        (parts[0].clone(), parts[2].clone())
    };
    let seq: Vec<String> = (0..6)
        .map(|_| {
            let (task, peer) = ask();
            assert_eq!(peer, addr, "getpeername returns the VIP");
            task
        })
        .collect();
    assert!(alternates(&seq), "round robin: {seq:?}");
    // The IPv4 VIP of the same service has no IPv4 task: its connects are refused,
    // not sent to an IPv6 address an IPv4 socket cannot use.
    let vip4 = s["vips"]["v4"].as_str().expect("a v4 VIP").to_string();
    let out = cg
        .command(&ns, backend_bin())
        .args(["--get", &format!("{vip4}:8000")])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("refused"), "{err}");
}

/// The sockets the programs balanced to a task that left end as the other planes'
/// flows do: a drained task's TCP connections at `drain_timeout`, a connected UDP
/// socket to a removed task at once. The clients are in another network namespace
/// than the agent, as containers are.
#[test]
fn sockets_balanced_to_a_task_that_left_are_ended_at_drain_timeout_or_at_once() {
    let test = "sockets_balanced_to_a_task_that_left_are_ended_at_drain_timeout_or_at_once";
    if skip_unless_ebpf(test) {
        return;
    }
    let c = Cluster::new(2);
    let (h1, h2) = (&c.hosts[0], &c.hosts[1]);
    let cg = Cgroup::new();
    let pins = PinDir::new();
    let _b1 = Backend::start_in_at(&h1.ns, "web.1", &h1.ip, 8001);
    let _b2 = Backend::start_in_at(&h2.ns, "web.2", &h2.ip, 8002);
    let _u1 = udp_echo(&h1.ns, "u.1", &h1.ip);
    let _u2 = udp_echo(&h2.ns, "u.2", &h2.ip);
    let cfg = format!(
        "[[service]]\nname = \"web\"\nports = [{{ target = 8000 }}]\ndrain_timeout = \"2s\"\n\
         health = {{ check = \"none\" }}\n\
         [[task]]\nservice = \"web\"\nid = \"web.1\"\nip = \"{h1}\"\nport = 8001\n\
         [[task]]\nservice = \"web\"\nid = \"web.2\"\nip = \"{h2}\"\nport = 8002\n\
         [[service]]\nname = \"u\"\nports = [{{ target = 5301, protocol = \"udp\" }}]\n\
         health = {{ check = \"none\" }}\n\
         [[task]]\nservice = \"u\"\nid = \"u.1\"\nip = \"{h1}\"\n\
         [[task]]\nservice = \"u\"\nid = \"u.2\"\nip = \"{h2}\"\n{}",
        config(&cg, &pins),
        h1 = h1.ip,
        h2 = h2.ip,
    );
    let bind = format!("{}:7946", h1.ip);
    let args = ["--dataplane", "ebpf", "--bind", bind.as_str(), "--insecure"];
    let agent = Agent::start_entered(&h1.ns, "host1", Some(&cfg), &args);
    agent.wait_routable("web", 2);
    agent.wait_routable("u", 2);
    agent.wait_applied();
    let ended = || -> u64 {
        let status = agent.cli_json(&["status"]);
        let detail = status["planes"]
            .as_array()
            .and_then(|p| p.iter().find(|p| p["name"] == "ebpf"))
            .and_then(|p| p["detail"].as_str())
            .unwrap_or_default()
            .to_string();
        detail
            .split_once("sockets ended after their task left: ")
            .and_then(|(_, n)| n.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no count of ended sockets in {detail:?}"))
    };
    assert_eq!(ended(), 0);

    // Two held connections through the VIP: round robin gives one to each task.
    let web = format!("{}:8000", vip_of(&agent, "web"));
    let hold = |to: &str| {
        let mut cmd = cg.command(&c.client.ns, backend_bin());
        cmd.args(["--held", to, "stdin"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let mut child = ChildGuard(cmd.spawn().unwrap());
        let mut out = std::io::BufReader::new(child.0.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "connected");
        (child, out)
    };
    // And one dialled to web.1's own address, which the programs did not balance.
    let direct = format!("{}:8001", h1.ip);
    let held = [hold(&web), hold(&web), hold(&direct)];

    // Drain web.1: its connection goes on until drain_timeout, then is aborted.
    assert_ok(agent.cli(&["task", "drain", "web", "web.1"]));
    eventually("web.1's connection ended", || (ended() >= 1).then_some(()));
    let outcomes: std::collections::BTreeSet<String> = held
        .into_iter()
        .map(|(mut child, mut out)| {
            let mut input = child.0.stdin.take().unwrap();
            writeln!(input, "go").unwrap();
            let mut line = String::new();
            out.read_line(&mut line).unwrap();
            line.trim().to_string()
        })
        .collect();
    assert_eq!(
        outcomes,
        ["fail connection_aborted", "ok web.1", "ok web.2"]
            .map(String::from)
            .into(),
        "the drained task's balanced connection is aborted; the other one, and the one dialled to web.1 itself, answer"
    );
    assert_eq!(ended(), 1, "only the drained task's socket is ended");

    // A connected UDP socket: removing its task disconnects it at once; without
    // that it would go on talking to the removed task, which still answers.
    let u = format!("{}:5301", vip_of(&agent, "u"));
    let mut flow = cg.command(&c.client.ns, backend_bin());
    flow.args(["--udp-flow", &u])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut flow = ChildGuard(flow.spawn().unwrap());
    let mut input = flow.0.stdin.take().unwrap();
    let mut output = std::io::BufReader::new(flow.0.stdout.take().unwrap());
    let mut ask = move || {
        writeln!(input, "q").unwrap();
        input.flush().unwrap();
        let mut line = String::new();
        output.read_line(&mut line).unwrap();
        line.trim().to_string()
    };
    let first = ask();
    assert!(first.starts_with("u."), "{first}");
    assert_ok(agent.cli(&["task", "rm", "u", &first]));
    eventually("the connected UDP socket ended", || {
        (ended() >= 2).then_some(())
    });
    assert_eq!(
        ask(),
        "none",
        "the socket no longer reaches the removed task"
    );
    assert_eq!(ended(), 2);
    assert!(
        agent
            .log()
            .contains("sockets balanced to tasks that left were ended"),
        "the log says so"
    );
}
