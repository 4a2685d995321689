//! VIPs and DNS end to end: inside a network namespace the agent puts each service's
//! VIP on `lo`, DNS answers it, VIP:port balances like the published port, and the
//! addresses go away when the service does and when the agent stops.

use std::process::Command;

use integration::*;

fn dig(ns: &Netns, args: &[&str]) -> String {
    let mut all = vec!["@127.0.0.1", "-p", "53", "+short", "+time=5", "+tries=3"];
    all.extend_from_slice(args);
    ns.run("dig", &all)
}

fn have_dig() -> bool {
    Command::new("dig").arg("-v").output().is_ok()
}

#[test]
fn vips_and_dns_work_inside_a_namespace() {
    if skip_unless_root("vips_and_dns_work_inside_a_namespace") {
        return;
    }
    let ns = Netns::new();
    let b1 = Backend::start_in(&ns, "web.1");
    let b2 = Backend::start_in(&ns, "web.2");
    let config = "[dns]\nlisten = [\"127.0.0.1:53\"]\nupstreams = []\n";
    let mut agent = Agent::start_in(&ns, Some(config), &[]);
    let out = agent.cli(&[
        "service",
        "create",
        "web",
        "-p",
        "8080:80",
        "--health-interval",
        "200ms",
        "--drain-timeout",
        "1s",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for b in [&b1, &b2] {
        let out = agent.cli(&[
            "task",
            "add",
            "web",
            &format!("127.0.0.1:{}", b.port),
            "--id",
            &b.name,
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    agent.wait_routable("web", 2);
    let (_, service) = agent.http("GET", "/v1/services/web", None);
    let vip = service["vips"]["v4"]
        .as_str()
        .expect("a v4 VIP")
        .to_string();
    let vip6 = service["vips"]["v6"]
        .as_str()
        .expect("a v6 VIP")
        .to_string();
    let status = agent.cli_json(&["status"]);
    assert_eq!(status["vips"], "reachable on lo", "{status}");

    eventually("VIPs on lo", || {
        let lo = ns.lo_addresses();
        (lo.contains(&format!("{vip}/32")) && lo.contains(&format!("{vip6}/128"))).then_some(())
    });
    // VIP:target balances over the tasks, for IPv4 and IPv6.
    let get = |addr: &str| {
        ns.run(backend_bin().to_str().unwrap(), &["--get", addr])
            .trim()
            .to_string()
    };
    let answers: Vec<String> = (0..4).map(|_| get(&format!("{vip}:80"))).collect();
    let mut distinct = answers.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct, ["web.1", "web.2"], "{answers:?}");
    assert_ne!(
        answers[0], answers[1],
        "round robin alternates: {answers:?}"
    );
    assert!(get(&format!("[{vip6}]:80")).starts_with("web."));
    // The published port still works next to the VIP listener.
    assert!(get("127.0.0.1:8080").starts_with("web."));

    if have_dig() {
        assert_eq!(dig(&ns, &["web.mesh"]).trim(), vip);
        assert_eq!(dig(&ns, &["AAAA", "web"]).trim(), vip6);
        assert_eq!(dig(&ns, &["-x", &vip]).trim(), "web.mesh.");
        let tasks = dig(&ns, &["tasks.web.mesh"]);
        assert_eq!(
            tasks.trim(),
            "127.0.0.1",
            "both tasks share one address: {tasks}"
        );
    } else {
        eprintln!(
            "SKIPPED the dig part of this test: dig is not installed (apt-get install bind9-dnsutils)"
        );
    }

    // Deleting the service removes its VIP once the drain_timeout has passed, and the
    // name from DNS at once.
    let out = agent.cli(&["service", "rm", "web"]);
    assert!(out.status.success());
    if have_dig() {
        let status = ns.run("dig", &["@127.0.0.1", "-p", "53", "web.mesh"]);
        assert!(status.contains("NXDOMAIN"), "{status}");
    }
    eventually("VIP removed from lo", || {
        (!ns.lo_addresses().contains(&vip)).then_some(())
    });

    // A new service's VIPs are removed when the agent stops.
    let out = agent.cli(&["service", "create", "api", "-p", "81", "--health", "none"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, api) = agent.http("GET", "/v1/services/api", None);
    let api_vip = api["vips"]["v4"].as_str().unwrap().to_string();
    eventually("api VIP on lo", || {
        ns.lo_addresses().contains(&api_vip).then_some(())
    });
    assert!(agent.stop().success(), "{}", agent.log());
    let lo = ns.lo_addresses();
    assert!(
        !lo.contains("10.254.") && !lo.contains("fd6d:"),
        "no VIP left behind:\n{lo}"
    );
}

#[test]
fn without_net_admin_dns_still_answers_and_the_agent_warns_once() {
    if skip_unless_root("without_net_admin_dns_still_answers_and_the_agent_warns_once") {
        return;
    }
    if Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("SKIPPED without_net_admin...: setpriv (util-linux) is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("mesh.sock");
    let dns_port = free_udp_port();
    let log = dir.path().join("agent.log");
    // Dropping CAP_NET_ADMIN from the bounding set removes it from the agent's
    // effective set, even as root.
    let mut child = Command::new("setpriv")
        .args(["--bounding-set", "-net_admin", "--"])
        .arg(mesh_bin())
        .args([
            "agent",
            "--bind",
            "127.0.0.1:0",
            "--api",
            &format!("unix:{}", socket.display()),
            "--dns",
            &format!("127.0.0.1:{dns_port}"),
        ])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let guard = scopeguard(&mut child);
    let client = |args: &[&str]| {
        Command::new(mesh_bin())
            .arg("--api")
            .arg(format!("unix:{}", socket.display()))
            .args(args)
            .output()
            .unwrap()
    };
    eventually("agent up", || {
        client(&["status"]).status.success().then_some(())
    });
    let out = client(&["service", "create", "web", "-p", "9", "--health", "none"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = client(&["status", "--format", "json"]);
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        status["vips"].as_str().unwrap().contains("CAP_NET_ADMIN"),
        "{status}"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        text.matches("VIPs are not reachable on this host").count(),
        1,
        "{text}"
    );
    if have_dig() {
        let out = Command::new("dig")
            .args([
                "@127.0.0.1",
                "-p",
                &dns_port.to_string(),
                "+short",
                "web.mesh",
            ])
            .output()
            .unwrap();
        let vip = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(vip.starts_with("10.254."), "DNS answers the VIP: {vip:?}");
    }
    drop(guard);
}

struct Kill<'a>(&'a mut std::process::Child);

impl Drop for Kill<'_> {
    fn drop(&mut self) {
        // SAFETY: kill(2) with a pid we own.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

fn scopeguard(child: &mut std::process::Child) -> Kill<'_> {
    Kill(child)
}
