//! The eBPF plane end to end: a real agent with `--dataplane ebpf` on host1 of a
//! namespace cluster, its socket programs attached to a cgroup of the test's own, and
//! clients started inside that cgroup from the client namespace. The client namespace
//! has no route to the VIP range, so a connect that the programs failed to rewrite
//! fails instead of reaching anything.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::process::Stdio;

use integration::cluster::{Cluster, Host};
use integration::ebpf::{Cgroup, PinDir, config, skip_unless_ebpf, xdp_took};
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

/// Starts an agent with `--dataplane ebpf` and `config` (its own data directory and
/// API socket) in `ns`, which must refuse to start: what it said.
fn ebpf_agent_refuses(ns: &Netns, config: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mesh.toml");
    std::fs::write(&path, config).unwrap();
    let data = dir.path().join("data");
    let api = format!("unix:{}", dir.path().join("mesh.sock").display());
    agent_refuses_entered(
        ns,
        &[
            "--config",
            path.to_str().unwrap(),
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
    )
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
    let err = ebpf_agent_refuses(&h1.ns, &config(&cg, &pins));
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

/// That the TC path's flow counts of `service` (`mesh_connections_total`, read every
/// 2 s) come to exactly `answered` per task: the kernel took every flow, each to the
/// task that answered it. `answers` is shown on failure.
fn kernel_took_every_flow(agent: &Agent, service: &str, answered: &[(&str, usize)], answers: &str) {
    let kernel = |task: &str| {
        agent.metric(
            "mesh_connections_total",
            &[("service", service), ("task", task)],
        )
    };
    let total: usize = answered.iter().map(|(_, n)| n).sum();
    eventually(
        "mesh_connections_total counts every flow as the kernel's",
        || {
            let counted: f64 = answered.iter().map(|(task, _)| kernel(task)).sum();
            (counted >= total as f64).then_some(())
        },
    );
    let counted: Vec<(&str, f64)> = answered.iter().map(|(t, _)| (*t, kernel(t))).collect();
    let want: Vec<(&str, f64)> = answered.iter().map(|(t, n)| (*t, *n as f64)).collect();
    assert_eq!(
        counted, want,
        "the kernel's flows per task are the answers per task: {answers}"
    );
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

/// The tcx links pinned under `pins`/port-links that the kernel holds: (pin name,
/// the start of the program's name). bpftool 7.1 shows a tcx link only as "type 11
/// prog N", so the program is looked up by its id.
fn tcx_links(pins: &PinDir) -> Vec<(String, String)> {
    let bpftool = |args: &[&str]| {
        let out = std::process::Command::new("bpftool")
            .args(args)
            .output()
            .expect("bpftool (apt-get install bpftool)");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let mut out = Vec::new();
    let dir = pins.path.join("port-links");
    for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let link = bpftool(&["link", "show", "pinned", entry.path().to_str().unwrap()]);
        if !link.contains("type 11") {
            continue;
        }
        let Some(id) = link.split_whitespace().skip_while(|w| *w != "prog").nth(1) else {
            continue;
        };
        let prog = bpftool(&["prog", "show", "id", id]);
        let name = prog
            .split_whitespace()
            .skip_while(|w| *w != "name")
            .nth(1)
            .unwrap_or_default();
        // The kernel keeps 15 characters of a name; compare what both sides have.
        let short: String = name.chars().take(14).collect();
        out.push((entry.file_name().to_string_lossy().to_string(), short));
    }
    out.sort();
    out
}

/// A published port on host1 with a task on each of host1, host2 and host3 (each
/// host's agent registers its own). Every new flow is taken by the TC program to its
/// Maglev pick: host1's task by DNAT, and it sees the client's own address; host2's
/// and host3's tasks by SNAT from host1's address, sent out of eth0 past the stack,
/// with the reply translated back. nftables, serving the same port beside it, takes none. A service
/// with a userspace-only option is not taken in the kernel at all.
#[test]
fn a_published_port_is_balanced_at_tcx_to_tasks_on_every_host() {
    balanced_to_tasks_on_every_host(
        "a_published_port_is_balanced_at_tcx_to_tasks_on_every_host",
        "tcx",
    );
}

/// The same with `ebpf.port_hook = "xdp"`: native XDP on host1's veth takes the flows
/// to host1's task (and counts them) once they carry whole checksums, and leaves
/// offloaded ones to tcx; tcx hops the rest. A restart after `kill -9` replaces the
/// XDP link.
#[test]
fn a_published_port_is_balanced_at_xdp_to_tasks_on_every_host() {
    balanced_to_tasks_on_every_host(
        "a_published_port_is_balanced_at_xdp_to_tasks_on_every_host",
        "xdp",
    );
}

/// `ebpf.published_ports = "userspace"`: no nftables table (a stale one a previous run
/// left is removed), so no conntrack; the kernel path still takes every flow from
/// outside, to host1's task and host2's, and the userspace plane serves what it
/// leaves: here, a client on host1 itself.
#[test]
fn published_ports_beside_the_kernel_path_can_be_the_userspace_plane() {
    let test = "published_ports_beside_the_kernel_path_can_be_the_userspace_plane";
    if skip_unless_ebpf(test) {
        return;
    }
    let c = Cluster::new(2);
    let (h1, h2) = (&c.hosts[0], &c.hosts[1]);
    let cg = Cgroup::new();
    let pins = PinDir::new();
    let tables = || {
        let out = h1
            .ns
            .command("nft")
            .args(["list", "tables"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    h1.ns.run("nft", &["add", "table", "inet", "mesh"]);
    assert!(
        tables().contains("inet mesh"),
        "a stale table: {}",
        tables()
    );
    let _b1 = Backend::start_in_at(&h1.ns, "web.1", &h1.ip, 8001);
    let _b2 = Backend::start_in_at(&h2.ns, "web.2", &h2.ip, 8002);
    let service = "[[service]]\nname = \"web\"\nports = [{ target = 8000, published = 8080 }]\n\
                   health = { check = \"tcp\", interval = \"200ms\" }\n";
    let task = |n: u8, ip: &str| {
        format!("[[task]]\nservice = \"web\"\nid = \"web.{n}\"\nip = \"{ip}\"\nport = 800{n}\n")
    };
    let cfg1 = format!(
        "{service}{}{}interfaces = [\"eth0\"]\npublished_ports = \"userspace\"\n",
        task(1, &h1.ip),
        config(&cg, &pins)
    );
    let agent = host_agent(h1, 1, &cfg1, true, None);
    let join = format!("{}:7946", h1.ip);
    let cfg2 = format!("{service}{}", task(2, &h2.ip));
    let _agent2 = host_agent(h2, 2, &cfg2, false, Some(&join));
    agent.wait_routable("web", 2);
    agent.wait_applied();

    assert!(
        !tables().contains("inet mesh"),
        "no nftables table: {}",
        tables()
    );
    let status = agent.cli_json(&["status"]);
    let names: Vec<&str> = status["planes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert!(!names.contains(&"nftables"), "no nftables plane: {names:?}");
    assert!(
        ebpf_detail(&agent).contains("published ports at tcx on eth0"),
        "{}",
        ebpf_detail(&agent)
    );
    // mesh_connections_total counts the userspace plane's flows too, so what shows
    // the kernel took a flow is what the task saw: the client's own address (DNAT),
    // or host1's address with the client's own port, 20000 and up (a hop keeps a
    // port outside ip_local_port_range; the proxy's would lie inside it).
    let out = c
        .client
        .ns
        .command(backend_bin())
        .args(["--who-from", &format!("{}:8080", h1.ip), "20000", "30"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "GETs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answers = String::from_utf8_lossy(&out.stdout).to_string();
    let mut on = BTreeMap::new();
    for line in answers.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        let [port, task, client, seen] = w[..] else {
            panic!("port, task, client, port: {line:?}");
        };
        let want = if task == "web.1" {
            (c.client.ip.as_str(), port)
        } else {
            (h1.ip.as_str(), port)
        };
        assert_eq!(
            (client, seen),
            want,
            "{task} saw the flow as the kernel path makes it: {answers}"
        );
        *on.entry(task.to_string()).or_insert(0) += 1;
    }
    assert!(
        on.contains_key("web.1") && on.contains_key("web.2"),
        "both tasks answer: {answers}"
    );
    // host1's own client never crosses eth0's programs: the userspace plane serves it.
    let (task, _) = who(&h1.ns, &format!("{}:8080", h1.ip));
    assert!(task == "web.1" || task == "web.2", "{task}");
    assert!(
        agent.metric(
            "mesh_connections_total",
            &[("service", "web"), ("task", &task)]
        ) > 0.0,
        "counted"
    );
}

/// The agent of host `n`, gossiping at its address and joining `join` if given:
/// `--dataplane ebpf` on the host under test, `userspace` (serving its own tasks,
/// without VIPs) on the others.
fn host_agent(host: &Host, n: u8, cfg: &str, ebpf: bool, join: Option<&str>) -> Agent {
    let bind = format!("{}:7946", host.ip);
    let mut args = vec!["--bind", bind.as_str(), "--insecure"];
    if ebpf {
        args.extend(["--dataplane", "ebpf"]);
    } else {
        args.extend(["--dataplane", "userspace", "--no-vips"]);
    }
    if let Some(join) = join {
        args.extend(["--join", join]);
    }
    Agent::start_entered(&host.ns, &format!("host{n}"), Some(cfg), &args)
}

/// A GET of `addr` from `ns` (`--who`): the task that answered, and the client
/// address it saw.
fn who(ns: &Netns, addr: &str) -> (String, String) {
    let out = ns
        .command(backend_bin())
        .args(["--who", addr])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "GET {addr}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let (task, client) = text.split_once(' ').expect("task and client");
    (task.to_string(), client.to_string())
}

/// Checksum offload off on each namespace's eth0: every sender computes whole
/// checksums and every receiver checks them, so a wrong rewrite of the programs' is
/// dropped, not trusted; and packets arrive as from another machine, not with a
/// checksum a veth peer left for offload (CHECKSUM_PARTIAL).
fn checksums_in_full(namespaces: &[&Netns]) {
    for ns in namespaces {
        let out = ns
            .command("ethtool")
            .args(["-K", "eth0", "tx", "off", "rx", "off"])
            .output()
            .expect("ethtool (apt-get install ethtool)");
        assert!(
            out.status.success(),
            "ethtool -K eth0 tx off rx off: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The XDP link pinned under `pins` for eth0, as the kernel holds it: (link id,
/// program id).
fn xdp_link(pins: &PinDir) -> Option<(u64, u64)> {
    let pin = pins.path.join("port-links/mesh_port_xdp@eth0");
    let out = std::process::Command::new("bpftool")
        .args(["-j", "link", "show", "pinned"])
        .arg(&pin)
        .output()
        .expect("bpftool (apt-get install bpftool)");
    let link: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    if link["type"] != "xdp" {
        return None;
    }
    Some((link["id"].as_u64()?, link["prog_id"].as_u64()?))
}

/// What `mesh status` says of the ebpf plane.
fn ebpf_detail(agent: &Agent) -> String {
    let status = agent.cli_json(&["status"]);
    let ebpf = status["planes"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "ebpf"))
        .unwrap_or_else(|| panic!("an ebpf plane in {status}"));
    ebpf["detail"].as_str().unwrap_or_default().to_string()
}

fn balanced_to_tasks_on_every_host(test: &str, hook: &str) {
    if skip_unless_ebpf(test) {
        return;
    }
    let c = Cluster::new(3);
    let (h1, h2, h3) = (&c.hosts[0], &c.hosts[1], &c.hosts[2]);
    let cg = Cgroup::new();
    let pins = PinDir::new();
    // nftables serves the ports beside the TC path, and would hop a flow the kernel
    // leaves to it by forwarding.
    let forward = h1
        .ns
        .command("sysctl")
        .args(["-qw", "net.ipv4.ip_forward=1"])
        .status()
        .unwrap();
    assert!(forward.success());
    let _b1 = Backend::start_in_at(&h1.ns, "web.1", &h1.ip, 8001);
    let _b2 = Backend::start_in_at(&h2.ns, "web.2", &h2.ip, 8002);
    let _b3 = Backend::start_in_at(&h3.ns, "web.3", &h3.ip, 8003);
    // `slow` asks for an idle timeout, which only the userspace plane keeps.
    let services = "[[service]]\nname = \"web\"\nports = [{ target = 8000, published = 8080 }]\n\
                    health = { check = \"tcp\", interval = \"200ms\" }\n\
                    [[service]]\nname = \"slow\"\nports = [{ target = 8000, published = 8090 }]\n\
                    idle_timeout = \"1h\"\n\
                    health = { check = \"tcp\", interval = \"200ms\" }\n";
    let tasks = |n: u8, ip: &str| {
        format!(
            "[[task]]\nservice = \"web\"\nid = \"web.{n}\"\nip = \"{ip}\"\nport = 800{n}\n\
             [[task]]\nservice = \"slow\"\nid = \"slow.{n}\"\nip = \"{ip}\"\nport = 800{n}\n"
        )
    };
    let cfg1 = format!(
        "{services}{}{}interfaces = [\"eth0\"]\nport_hook = \"{hook}\"\n",
        tasks(1, &h1.ip),
        config(&cg, &pins)
    );
    let mut agent = host_agent(h1, 1, &cfg1, true, None);
    // host2 and host3 serve their own tasks with the userspace plane.
    let join = format!("{}:7946", h1.ip);
    let _others: Vec<Agent> = [(2, h2), (3, h3)]
        .into_iter()
        .map(|(n, h)| {
            let cfg = format!("{services}{}", tasks(n, &h.ip));
            host_agent(h, n, &cfg, false, Some(&join))
        })
        .collect();
    agent.wait_routable("web", 3);
    agent.wait_routable("slow", 3);
    agent.wait_applied();

    let attached = tcx_links(&pins);
    assert_eq!(
        attached,
        [
            (
                "mesh_port_egress@eth0".to_string(),
                "mesh_port_egre".to_string()
            ),
            (
                "mesh_port_ingress@eth0".to_string(),
                "mesh_port_ingr".to_string()
            )
        ],
        "a tcx link per program on host1's eth0"
    );
    let eth0 = |ns: &Netns| {
        let out = ns
            .command("ip")
            .args(["-d", "link", "show", "eth0"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let xdp = hook == "xdp";
    let link = xdp_link(&pins);
    assert_eq!(
        link.is_some(),
        xdp,
        "an XDP link only with port_hook xdp: {link:?}"
    );
    assert_eq!(
        eth0(&h1.ns).contains("xdp"),
        xdp,
        "the driver's XDP hook: {}",
        eth0(&h1.ns)
    );
    let detail = ebpf_detail(&agent);
    let at = if xdp { "XDP (native) and tcx" } else { "tcx" };
    assert!(
        detail.contains(&format!("published ports at {at} on eth0"))
            && detail.contains("mesh_ports 1/"),
        "only web's port is taken in the kernel: {detail}"
    );
    assert!(
        detail.contains("2 of 2 other hosts' task addresses routed through these interfaces"),
        "host2's and host3's tasks are reached through eth0: {detail}"
    );
    assert!(
        ring_of(&pins, 8090).is_empty(),
        "slow's port is not in mesh_ports"
    );

    // Each connect comes from a new client port, so Maglev spreads them over both
    // tasks.
    let get = |port: u16| -> Vec<(String, String)> {
        let addr = format!("{}:{port}", h1.ip);
        (0..40).map(|_| who(&c.client.ns, &addr)).collect()
    };
    let answers = get(8080);
    let on = |task: &str| answers.iter().filter(|(t, _)| t == task).count();
    assert!(
        on("web.1") > 0 && on("web.2") > 0 && on("web.3") > 0,
        "every task answers: {answers:?}"
    );
    for (task, client) in &answers {
        let want = if task == "web.1" {
            &c.client.ip
        } else {
            &h1.ip
        };
        assert_eq!(
            client, want,
            "{task} saw the client as {client}: {answers:?}"
        );
    }
    // Only the kernel's flows count here (nftables keeps its own counters): the
    // kernel took every flow, each to the task that answered it.
    kernel_took_every_flow(
        &agent,
        "web",
        &[
            ("web.1", on("web.1")),
            ("web.2", on("web.2")),
            ("web.3", on("web.3")),
        ],
        &format!("{answers:?}"),
    );
    // The userspace plane serves `slow`: every task sees host1's address.
    let slow = get(8090);
    assert!(
        slow.iter().all(|(_, client)| *client == h1.ip),
        "no flow of slow's is taken in the kernel: {slow:?}"
    );
    if xdp {
        // The client's veth leaves its checksums to offload (CHECKSUM_PARTIAL): XDP
        // cannot update those, so it left every packet above to tcx.
        assert_eq!(
            xdp_took(&pins.path).unwrap(),
            0,
            "XDP took offloaded packets"
        );
        // Whole checksums, as from another machine: XDP takes web.1's flows, each
        // of several packets (SYN, ACK, request, FIN), and every receiver checks
        // the checksums it wrote.
        checksums_in_full(&[&c.client.ns, &h1.ns, &h2.ns, &h3.ns]);
        let local = |answers: &[(String, String)]| {
            answers.iter().filter(|(t, _)| t == "web.1").count() as u64
        };
        let full = get(8080);
        assert!(local(&full) > 0, "web.1 answers: {full:?}");
        let took = xdp_took(&pins.path).unwrap();
        assert!(
            took >= 3 * local(&full),
            "XDP took {took} packets for {} connections",
            local(&full)
        );
        // A restart after kill -9 detaches the old XDP link and attaches its own.
        let (_, prog_id) = link.unwrap();
        agent.kill9();
        agent.spawn(Some(&cfg1), &[]);
        agent.wait_routable("web", 3);
        agent.wait_applied();
        let (_, prog) = xdp_link(&pins).expect("the XDP link after the restart");
        assert_ne!(prog, prog_id, "the restarted agent's program");
        assert_eq!(
            eth0(&h1.ns).matches("prog/xdp").count(),
            1,
            "one XDP program: {}",
            eth0(&h1.ns)
        );
        let again = get(8080);
        assert!(
            local(&again) > 0,
            "web.1 answers after the restart: {again:?}"
        );
        assert!(
            xdp_took(&pins.path).unwrap() >= took + 3 * local(&again),
            "XDP takes web.1's flows after the restart"
        );
    }

    // SIGTERM removes the programs from the interface and every pin.
    assert!(agent.stop().success());
    let left: Vec<_> = std::fs::read_dir(&pins.path)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "pins left: {left:?}");
    assert!(!eth0(&h1.ns).contains("xdp"), "XDP detached");

    // A name that is no interface here stops the agent before anything is attached.
    let err = ebpf_agent_refuses(
        &h1.ns,
        &format!("{}interfaces = [\"eth0\", \"nope0\"]\n", config(&cg, &pins)),
    );
    assert!(
        err.contains("ebpf.interfaces") && err.contains("\"nope0\""),
        "{err}"
    );
    assert!(
        pins.contents().is_empty(),
        "nothing attached: {:?}",
        pins.contents()
    );
}

/// The Maglev ring of `port` (TCP) in the `mesh_ports` map pinned under `pins`: the
/// task index of each slot. The map has no BTF, so bpftool prints its bytes; the
/// value is `count`, `pad`, 256 backends of 8 bytes, then the ring (u16 each).
fn ring_of(pins: &PinDir, port: u16) -> Vec<u16> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(pins.path.join(mesh_ebpf::programs::MAPS).join("mesh_ports"))
        .output()
        .expect("bpftool");
    let entries: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "bpftool map dump: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let bytes = |v: &serde_json::Value| -> Vec<u8> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|b| u8::from_str_radix(b.as_str()?.trim_start_matches("0x"), 16).ok())
            .collect()
    };
    let [hi, lo] = port.to_be_bytes();
    entries
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| bytes(&e["key"]) == [hi, lo, 6, 0])
        .map(|e| {
            bytes(&e["value"])[8 + 8 * 256..]
                .chunks_exact(2)
                .take(16381)
                .map(|c| u16::from_ne_bytes([c[0], c[1]]))
                .collect()
        })
        .unwrap_or_default()
}

/// Two hosts, both with the TC path: their rings agree, so a flow's pick is the same
/// on either; UDP is taken too, with the reply from the published port; and a TCP
/// connection taken in the kernel keeps its task while the ring changes and after a
/// kill -9 of the agent, whose successor adopts the pinned state.
#[test]
fn published_ports_at_tcx_agree_across_hosts_keep_flows_and_outlive_the_agent() {
    let test = "published_ports_at_tcx_agree_across_hosts_keep_flows_and_outlive_the_agent";
    if skip_unless_ebpf(test) {
        return;
    }
    let c = Cluster::new(2);
    let (h1, h2) = (&c.hosts[0], &c.hosts[1]);
    let (cg1, cg2) = (Cgroup::new(), Cgroup::new());
    let (pins1, pins2) = (PinDir::new(), PinDir::new());
    let _b1 = Backend::start_in_at(&h1.ns, "web.1", &h1.ip, 8001);
    let _b2 = Backend::start_in_at(&h2.ns, "web.2", &h2.ip, 8002);
    let _b3 = Backend::start_in_at(&h1.ns, "web.3", &h1.ip, 8003);
    let _u1 = udp_echo(&h1.ns, "echo.1", &h1.ip);
    let _u2 = udp_echo(&h2.ns, "echo.2", &h2.ip);
    checksums_in_full(&[&c.client.ns, &h1.ns, &h2.ns]);
    // nftables serves the ports beside the TC path, and would hop a flow the kernel
    // leaves to it by forwarding.
    let forward = h1
        .ns
        .command("sysctl")
        .args(["-qw", "net.ipv4.ip_forward=1"])
        .status()
        .unwrap();
    assert!(forward.success());
    let services = "[[service]]\nname = \"web\"\nports = [{ target = 8000, published = 8080 }]\n\
                    health = { check = \"tcp\", interval = \"200ms\" }\n\
                    [[service]]\nname = \"echo\"\n\
                    ports = [{ target = 5301, published = 5300, protocol = \"udp\" }]\n\
                    health = { check = \"none\" }\n";
    let tasks = |n: u8, ip: &str| {
        format!(
            "[[task]]\nservice = \"web\"\nid = \"web.{n}\"\nip = \"{ip}\"\nport = 800{n}\n\
             [[task]]\nservice = \"echo\"\nid = \"echo.{n}\"\nip = \"{ip}\"\n"
        )
    };
    let cfg1 = format!(
        "{services}{}{}interfaces = [\"eth0\"]\n",
        tasks(1, &h1.ip),
        config(&cg1, &pins1)
    );
    let cfg2 = format!(
        "{services}{}{}interfaces = [\"eth0\"]\n",
        tasks(2, &h2.ip),
        config(&cg2, &pins2)
    );
    let mut agent = host_agent(h1, 1, &cfg1, true, None);
    let join = format!("{}:7946", h1.ip);
    let agent2 = host_agent(h2, 2, &cfg2, true, Some(&join));
    for a in [&agent, &agent2] {
        a.wait_routable("web", 2);
        a.wait_routable("echo", 2);
        a.wait_applied();
    }

    // Both hosts built the same ring for the port: a flow picks the same task on
    // either.
    let ring = eventually("host1 and host2 hold the same ring for 8080", || {
        let (r1, r2) = (ring_of(&pins1, 8080), ring_of(&pins2, 8080));
        (!r1.is_empty() && r1 == r2).then_some(r1)
    });
    assert!(
        ring.contains(&0) && ring.contains(&1),
        "both tasks own slots"
    );
    // So the same client address and port get the same task through either host: 20
    // client ports each ask host1:8080, then host2:8080. Each host takes the flow to
    // its own task (which sees the client) or hops it to the other's (which sees the
    // hopping host). A hop keeps the client's port when it is outside the host's
    // ip_local_port_range (32768-60999 in a new namespace), as these are.
    let from = |host: &str, first: u16| -> Vec<(u16, String, String, u16)> {
        let out = c
            .client
            .ns
            .command(backend_bin())
            .args([
                "--who-from",
                &format!("{host}:8080"),
                &first.to_string(),
                "20",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "GETs through {host}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                let [port, task, client, seen] = w[..] else {
                    panic!("port, task, client, port: {l:?}");
                };
                let seen_from = if client == c.client.ip {
                    "the client"
                } else if client == host {
                    "the host asked"
                } else {
                    panic!("{task} saw {client} through {host}")
                };
                (
                    port.parse().unwrap(),
                    task.to_string(),
                    seen_from.to_string(),
                    seen.parse().unwrap(),
                )
            })
            .collect()
    };
    let (via1, via2) = (from(&h1.ip, 20000), from(&h2.ip, 20000));
    let tasks = |v: &[(u16, String, String, u16)]| -> Vec<(u16, String)> {
        v.iter().map(|(p, t, _, _)| (*p, t.clone())).collect()
    };
    assert_eq!(
        tasks(&via1),
        tasks(&via2),
        "a client port gets the same task through either host"
    );
    for (via, here) in [(&via1, "web.1"), (&via2, "web.2")] {
        for (port, task, seen_from, seen_port) in via.iter() {
            let want = if task == here {
                "the client"
            } else {
                "the host asked"
            };
            assert_eq!(seen_from, want, "{task} through {here}'s host: {via:?}");
            assert_eq!(seen_port, port, "the client's port is kept: {via:?}");
        }
    }
    assert!(
        via1.iter().any(|(_, t, _, _)| t == "web.1")
            && via1.iter().any(|(_, t, _, _)| t == "web.2"),
        "both tasks are picked: {via1:?}"
    );
    // A client port inside that range is never a hop's: another port is bound.
    let inside = from(&h1.ip, 40000);
    let hopped: Vec<_> = inside.iter().filter(|(_, t, _, _)| t == "web.2").collect();
    assert!(!hopped.is_empty(), "some flows hop: {inside:?}");
    for (_, _, _, seen_port) in hopped {
        assert!(
            (1024..32768).contains(seen_port) || (61000..=65535).contains(seen_port),
            "a hop's port is outside 32768-60999: {inside:?}"
        );
    }

    // UDP: each query from a new socket. A connected client socket accepts only
    // answers from host1:5300, so every answer proves the reply was translated back.
    let udp = format!("{}:5300", h1.ip);
    let out = c
        .client
        .ns
        .command(backend_bin())
        .args(["--udp-ask", &udp, "20"])
        .output()
        .unwrap();
    let answers = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "20 answers from {udp}: {answers}");
    assert!(
        answers.contains("echo.1:") && answers.contains("echo.2:"),
        "both tasks answer: {answers}"
    );
    // Only the kernel's UDP flows count here (nftables keeps its own counters): it
    // took every query, each to the task that answered it, host2's by a hop.
    let answered = |task: &str| answers.matches(&format!("{task}:")).count();
    kernel_took_every_flow(
        &agent,
        "echo",
        &[
            ("echo.1", answered("echo.1")),
            ("echo.2", answered("echo.2")),
        ],
        &answers,
    );

    // Held connections, each with its own client port, each taken in the kernel: to
    // web.1 by DNAT, to web.2 by a hop.
    let addr = format!("{}:8080", h1.ip);
    let mut held = Vec::new();
    for _ in 0..48 {
        let mut cmd = c.client.ns.command(backend_bin());
        cmd.args(["--held", &addr, "stdin"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let mut child = ChildGuard(cmd.spawn().unwrap());
        let mut out = std::io::BufReader::new(child.0.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "connected");
        held.push((child, out));
    }
    // A third task changes the ring on both hosts.
    let web3 = format!("{}:8003", h1.ip);
    assert_ok(agent.cli(&["task", "add", "web", &web3, "--id", "web.3"]));
    eventually("the ring changed for web.3", || {
        let r = ring_of(&pins1, 8080);
        (r.contains(&2) && r == ring_of(&pins2, 8080)).then_some(())
    });
    // Then the agent dies. Both kernel planes' connections go on, each with its task:
    // a kernel flow whose ring slot moved to web.3 would be reset by web.3.
    agent.kill9();
    let mut finished = Vec::new();
    for (child, out) in &mut held {
        writeln!(child.0.stdin.as_mut().unwrap()).unwrap();
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        finished.push(line.trim().to_string());
    }
    assert!(
        finished
            .iter()
            .all(|l| *l == "ok web.1" || *l == "ok web.2"),
        "every held connection finished, on the task it began with: {finished:?}"
    );
    assert!(!pins1.contents().is_empty(), "the pins outlive the agent");
    // New connections are still served with no agent: host1's own tasks see the
    // client, host2's sees host1.
    for _ in 0..12 {
        let out = c
            .client
            .ns
            .command(backend_bin())
            .args(["--who", &addr])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let ok = [
            format!("web.1 {}", c.client.ip),
            format!("web.3 {}", c.client.ip),
            format!("web.2 {}", h1.ip),
        ];
        assert!(
            out.status.success() && ok.contains(&text),
            "with no agent: {text:?} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // A restarted agent adopts the pinned maps, replaces its links and goes on.
    agent.spawn(Some(&cfg1), &[]);
    agent.wait_routable("web", 3);
    agent.wait_applied();
    assert_eq!(tcx_links(&pins1).len(), 2, "one link per program, not two");
    let out = c
        .client
        .ns
        .command(backend_bin())
        .args(["--udp-ask", &udp, "6"])
        .output()
        .unwrap();
    assert!(out.status.success(), "UDP after the restart");
}
