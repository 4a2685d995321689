//! A private Docker engine (dockerd in a network namespace of its own) runs real
//! containers, and leaves nothing behind. Times are printed for the record, never
//! asserted.

use std::path::Path;
use std::time::Instant;

use integration::cluster::Cluster;
use integration::docker::{BUSYBOX_IMAGE, DockerHost, skip_unless_docker};
use integration::load::{Load, count, unix_ms};
use integration::{Agent, eventually};

#[test]
fn a_private_docker_engine_runs_a_busybox_container_that_serves_http() {
    if skip_unless_docker("a_private_docker_engine_runs_a_busybox_container_that_serves_http") {
        return;
    }
    let t = Instant::now();
    let host = DockerHost::start();
    eprintln!("engine with {BUSYBOX_IMAGE} in {:?}", t.elapsed());
    let dir = host.dir.clone();
    let pid = host.pid().expect("dockerd runs");
    let ns = host.ns.name.clone();

    host.docker_ok(&[
        "run",
        "-d",
        "--name",
        "t1",
        BUSYBOX_IMAGE,
        "sh",
        "-c",
        "echo hi from t1 > /www/index.html && exec httpd -f -p 80 -h /www",
    ]);
    let ip = host.container_ip("t1");
    assert!(ip.starts_with("172.17."), "t1 is on docker0: {ip}");
    let t = Instant::now();
    let body = eventually(&format!("t1 serves http://{ip}/"), || {
        host.wget(&format!("http://{ip}/")).ok()
    });
    eprintln!("t1 answered {:?} after the run", t.elapsed());
    assert_eq!(body.trim(), "hi from t1");

    let t = Instant::now();
    drop(host);
    eprintln!("engine removed in {:?}", t.elapsed());
    assert!(!dir.exists(), "{} is left", dir.display());
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    assert_ne!(comm.trim(), "dockerd", "dockerd {pid} still runs");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let dir_s = dir.to_string_lossy().into_owned();
    assert!(
        !mounts.contains(&dir_s),
        "mounts left under {dir_s}:\n{mounts}"
    );
    assert!(
        !Path::new("/run/netns").join(&ns).exists(),
        "namespace {ns} is left"
    );
}

/// A web container: serves its hostname (its short id, the task id) on port 80, and
/// on SIGTERM goes on serving for 2 s before it exits, as a graceful server does.
fn web(host: &DockerHost, name: &str, labels: &[&str], extra: &[&str]) -> String {
    let mut args = vec!["run", "-d", "--name", name];
    for l in labels {
        args.extend(["--label", l]);
    }
    args.extend_from_slice(extra);
    args.extend([
        BUSYBOX_IMAGE,
        "sh",
        "-c",
        "hostname > /www/index.html; touch /www/ok; httpd -f -p 80 -h /www & trap \"sleep 2; kill $!; exit 0\" TERM; wait",
    ]);
    let id = host.docker_ok(&args);
    id.trim()[..12].to_string()
}

fn docker_agent(host: &DockerHost, extra: &str) -> Agent {
    let config = format!(
        "[docker]\nenabled = true\nhost = \"{}\"\n{extra}",
        host.host_env()
    );
    Agent::start_in(&host.ns, Some(&config), &["--bind", "127.0.0.1:0"])
}

/// The docker tasks of `service` as (id, address, health, state).
fn tasks(agent: &Agent, service: &str) -> Vec<(String, String, String, String)> {
    let (status, v) = agent.http("GET", &format!("/v1/services/{service}/tasks"), None);
    if status != 200 {
        return Vec::new();
    }
    let mut out: Vec<_> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["source"] == "docker")
        .map(|t| {
            let s = |k: &str| t[k].as_str().unwrap_or_default().to_string();
            (s("id"), s("ip"), s("health"), s("state"))
        })
        .collect();
    out.sort();
    out
}

/// GET / through the published port inside the engine's namespace: the task's id.
fn get(host: &DockerHost, addr: &str) -> Option<String> {
    let out = host
        .ns
        .command(integration::backend_bin())
        .args(["--get", addr])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Two labelled containers on `plane`, a client throughout, and a `docker stop` and
/// `docker start` of one. The client targets docker0's address: the nftables plane
/// serves published ports on the host's addresses, not on loopback.
fn labelled_containers_become_tasks_and_docker_stop_drains_one(plane: &str) {
    let host = DockerHost::start();
    let agent = docker_agent(&host, &format!("[proxy]\ndataplane = \"{plane}\"\n"));
    let addr = "172.17.0.1:8080";
    let labels = [
        "mesh.service=web",
        "mesh.publish=8080:80",
        "mesh.health=http:/ok",
    ];
    let t = Instant::now();
    let a = web(&host, "web-1", &labels, &[]);
    let b = web(&host, "web-2", &labels, &[]);
    eventually("both are tasks", || {
        (tasks(&agent, "web").len() == 2).then_some(())
    });
    eprintln!(
        "docker run of 2 containers to both tasks: {:?}",
        t.elapsed()
    );
    agent.wait_routable("web", 2);
    eprintln!(
        "... to both routed (their health checks passed): {:?}",
        t.elapsed()
    );
    // The service was created from the labels.
    let (_, svc) = agent.http("GET", "/v1/services/web", None);
    assert_eq!(svc["ports"][0]["published"], 8080, "{svc}");
    assert_eq!(svc["health"]["check"], "http", "{svc}");
    let ps = String::from_utf8_lossy(&agent.cli(&["service", "ps", "web"]).stdout).to_string();
    assert!(
        ps.contains("docker web-1") && ps.contains("docker web-2"),
        "{ps}"
    );
    let ids = [a.clone(), b.clone()];
    let ips: Vec<String> = tasks(&agent, "web").into_iter().map(|t| t.1).collect();
    let mut want_ips = vec![host.container_ip("web-1"), host.container_ip("web-2")];
    want_ips.sort();
    let mut got_ips = ips.clone();
    got_ips.sort();
    assert_eq!(got_ips, want_ips);
    // Round robin over both.
    let seen: std::collections::BTreeSet<String> = (0..4)
        .map(|_| get(&host, addr).expect("GET through the published port"))
        .collect();
    assert_eq!(
        seen,
        ids.iter().cloned().collect(),
        "both containers answer"
    );

    let load = Load::start(&host.ns, addr, 50, &[]);
    let start = unix_ms();
    eventually("the load is running", || {
        (load.samples().len() >= 20).then_some(())
    });
    let t = Instant::now();
    let mut drained_at = 0;
    std::thread::scope(|s| {
        s.spawn(|| host.docker_ok(&["stop", "web-1"]));
        // web-1 serves 2 s after its SIGTERM: it is drained at once, withdrawn when
        // it exits.
        eventually("web-1's task drains", || {
            tasks(&agent, "web")
                .iter()
                .any(|t| t.0 == a && t.3 == "draining")
                .then_some(())
        });
        eprintln!("docker stop web-1 to its task draining: {:?}", t.elapsed());
        agent.wait_applied();
        drained_at = unix_ms();
        eventually("web-1's task is gone", || {
            (!tasks(&agent, "web").iter().any(|t| t.0 == a)).then_some(())
        });
        eprintln!(
            "docker stop web-1 to its task withdrawn (2 s of it the container's own grace): {:?}",
            t.elapsed()
        );
    });
    let restarted_at = unix_ms();
    let t = Instant::now();
    host.docker_ok(&["start", "web-1"]);
    agent.wait_routable("web", 2);
    eprintln!("docker start web-1 to routed: {:?}", t.elapsed());
    eventually("web-1 answers again", || {
        (0..4)
            .filter_map(|_| get(&host, addr))
            .any(|id| id == a)
            .then_some(())
    });
    let end = unix_ms();
    load.settle(start, end);
    let counts = count(&load.samples(), start, end);
    eprintln!("through stop and start: {counts:?}");
    assert!(counts.requests > 50, "{counts:?}");
    let failed: Vec<_> = load
        .samples()
        .into_iter()
        .filter(|s| !s.ok && s.at_ms >= start && s.at_ms < end)
        .collect();
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    // Drained means no new connection: nothing sent between the drain being
    // applied and the restart reached web-1 (the userspace plane's connect retry
    // would hide a refused one, so this is what shows the drain).
    let to_drained: Vec<_> = load
        .samples()
        .into_iter()
        .filter(|s| s.ok && s.at_ms >= drained_at && s.at_ms < restarted_at && s.what == a)
        .collect();
    assert!(
        to_drained.is_empty(),
        "sent to web-1 while it drained: {to_drained:?}"
    );
    let others = load
        .samples()
        .iter()
        .filter(|s| s.ok && s.at_ms >= drained_at && s.at_ms < restarted_at)
        .count();
    assert!(others > 0, "the client ran while web-1 drained");
}

#[test]
fn labelled_containers_become_tasks_and_docker_stop_drains_one_on_the_userspace_plane() {
    let test = "labelled_containers_become_tasks_and_docker_stop_drains_one_on_the_userspace_plane";
    if skip_unless_docker(test) {
        return;
    }
    labelled_containers_become_tasks_and_docker_stop_drains_one("userspace");
}

#[test]
fn labelled_containers_become_tasks_and_docker_stop_drains_one_on_the_nftables_plane() {
    let test = "labelled_containers_become_tasks_and_docker_stop_drains_one_on_the_nftables_plane";
    if skip_unless_docker(test) {
        return;
    }
    labelled_containers_become_tasks_and_docker_stop_drains_one("nftables");
}

/// Whether the prober has a series for task `id`: its transitions, counted from the
/// first probe on. (`mesh_task_healthy` is the table's, for every task.)
fn probed(metrics: &str, id: &str) -> bool {
    metrics.lines().any(|l| {
        l.starts_with("mesh_health_transitions_total{") && l.contains(&format!("task=\"{id}\""))
    })
}

#[test]
fn a_failing_healthcheck_makes_the_task_unhealthy_and_recovery_brings_it_back() {
    let test = "a_failing_healthcheck_makes_the_task_unhealthy_and_recovery_brings_it_back";
    if skip_unless_docker(test) {
        return;
    }
    let host = DockerHost::start();
    let agent = docker_agent(&host, "");
    let health = [
        "--health-cmd",
        "test -f /www/ok",
        "--health-interval",
        "1s",
        "--health-retries",
        "1",
        "--health-timeout",
        "5s",
    ];
    let id = web(&host, "h-1", &["mesh.service=hc", "mesh.port=80"], &health);
    agent.wait_routable("hc", 1);
    let ps = agent.cli_json(&["service", "ps", "hc"]);
    assert_eq!(ps[0]["observed"]["health"], "healthy", "{ps}");
    host.docker_ok(&["exec", "h-1", "rm", "/www/ok"]);
    // Docker's word holds even though a TCP probe of port 80 would pass.
    eventually("the task is unhealthy", || {
        (agent.task_health("hc", &id) == "unhealthy").then_some(())
    });
    // The prober keeps no series for a task Docker checks: it never probed it.
    let (_, metrics) = agent.try_http("GET", "/metrics", None).unwrap();
    assert!(
        !probed(&metrics, &id),
        "mesh probes a task Docker checks:\n{metrics}"
    );
    host.docker_ok(&["exec", "h-1", "touch", "/www/ok"]);
    eventually("the task is healthy again", || {
        (agent.task_health("hc", &id) == "healthy").then_some(())
    });
    // Without a HEALTHCHECK, mesh probes the container itself.
    let plain = web(&host, "h-2", &["mesh.service=hc", "mesh.port=80"], &[]);
    agent.wait_routable("hc", 2);
    let ps = agent.cli_json(&["service", "ps", "hc"]);
    let entry = ps
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == plain)
        .unwrap()
        .clone();
    assert!(entry["observed"]["health"].is_null(), "{entry}");
    eventually("mesh probes h-2 (its series appears)", || {
        let (_, metrics) = agent.try_http("GET", "/metrics", None).ok()?;
        probed(&metrics, &plain).then_some(())
    });
    let (_, metrics) = agent.try_http("GET", "/metrics", None).unwrap();
    assert!(!probed(&metrics, &id), "{metrics}");
}

#[test]
fn the_task_set_is_exact_after_dockerd_restarts_and_after_the_agent_restarts() {
    let test = "the_task_set_is_exact_after_dockerd_restarts_and_after_the_agent_restarts";
    if skip_unless_docker(test) {
        return;
    }
    let mut host = DockerHost::start_with(&["--shutdown-timeout=1"]);
    let mut agent = docker_agent(&host, "");
    let labels = ["mesh.service=web", "mesh.port=80"];
    for name in ["r-1", "r-2", "r-3"] {
        web(&host, name, &labels, &["--restart", "always"]);
    }
    // One that is not running: not a task.
    host.docker_ok(&[
        "create",
        "--name",
        "r-off",
        "--label",
        "mesh.service=web",
        BUSYBOX_IMAGE,
        "true",
    ]);
    let want = |host: &DockerHost| -> Vec<(String, String)> {
        let ps = host.docker_ok(&[
            "ps",
            "-q",
            "--no-trunc",
            "--filter",
            "label=mesh.service=web",
        ]);
        let mut v: Vec<(String, String)> = ps
            .lines()
            .map(|id| {
                let ip = host.docker_ok(&[
                    "inspect",
                    "-f",
                    "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                    id,
                ]);
                (id[..12].to_string(), ip.trim().to_string())
            })
            .collect();
        v.sort();
        v
    };
    let have = |agent: &Agent| -> Vec<(String, String)> {
        tasks(agent, "web")
            .into_iter()
            .map(|t| (t.0, t.1))
            .collect()
    };
    let first = want(&host);
    assert_eq!(first.len(), 3);
    eventually("the agent has the 3 running containers", || {
        (have(&agent) == first).then_some(())
    });

    host.stop_daemon();
    eventually("the status says the engine is gone", || {
        let (_, s) = agent.http("GET", "/v1/status", None);
        (s["docker"]["connected"] == false && s["docker"]["last_error"].is_string()).then_some(())
    });
    host.start_daemon();
    eventually("the containers run again", || {
        (want(&host).len() == 3).then_some(())
    });
    // The tasks kept while the engine was away may already equal the restarted
    // containers (same addresses) before the source has reconnected: wait for both.
    eventually(
        "the agent is connected again and its set is exactly the running containers",
        || {
            let w = want(&host);
            let (_, s) = agent.http("GET", "/v1/status", None);
            (w.len() == 3 && s["docker"]["connected"] == true && have(&agent) == w).then_some(())
        },
    );
    let (_, s) = agent.http("GET", "/v1/status", None);
    assert_eq!(s["docker"]["connected"], true, "{s}");
    assert!(s["docker"]["reconnects"].as_u64().unwrap() >= 1, "{s}");

    agent.stop();
    host.docker_ok(&["rm", "-f", "r-2"]);
    agent.spawn(
        Some(&format!(
            "[docker]\nenabled = true\nhost = \"{}\"\n",
            host.host_env()
        )),
        &[],
    );
    let w = want(&host);
    assert_eq!(w.len(), 2);
    eventually(
        "after the agent restarts, its set is exactly the 2 running containers",
        || (have(&agent) == w).then_some(()),
    );
}

#[test]
fn bad_labels_skip_one_container_with_one_clear_line_and_a_missing_engine_is_retried() {
    let test = "bad_labels_skip_one_container_with_one_clear_line_and_a_missing_engine_is_retried";
    if skip_unless_docker(test) {
        return;
    }
    let host = DockerHost::start();
    let agent = docker_agent(&host, "");
    web(
        &host,
        "bad-port",
        &["mesh.service=web", "mesh.port=eighty"],
        &[],
    );
    web(
        &host,
        "bad-option",
        &["mesh.service=web", "mesh.prot=80"],
        &[],
    );
    web(&host, "good", &["mesh.service=web", "mesh.port=80"], &[]);
    agent.wait_routable("web", 1);
    eventually("both bad containers are in the status", || {
        let (_, s) = agent.http("GET", "/v1/status", None);
        (s["docker"]["skipped"].as_array()?.len() == 2).then_some(())
    });
    // A later event (another container) does not log the same problem again.
    web(&host, "good-2", &["mesh.service=web", "mesh.port=80"], &[]);
    agent.wait_routable("web", 2);
    let log = agent.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("container bad-port"))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains("mesh.port") && lines[0].contains("eighty"),
        "{}",
        lines[0]
    );
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("container bad-option"))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains("mesh.prot") && lines[0].contains("unknown label"),
        "{}",
        lines[0]
    );
    let status = String::from_utf8_lossy(&agent.cli(&["status"]).stdout).to_string();
    assert!(
        status.contains("Skipped:     container bad-port"),
        "{status}"
    );

    // Labels that disagree with an existing service are reported, not obeyed.
    integration::assert_ok(agent.cli(&[
        "service", "create", "shop", "-p", "9090:80", "--health", "tcp",
    ]));
    web(
        &host,
        "shop-1",
        &[
            "mesh.service=shop",
            "mesh.publish=8081:80",
            "mesh.health=http:/ok",
        ],
        &[],
    );
    agent.wait_routable("shop", 1);
    let inspect = eventually("service inspect shows the differences", || {
        let v = agent.cli_json(&["service", "inspect", "shop"]);
        (v["label_differences"].as_array()?.len() == 2).then_some(v)
    });
    let d = inspect["label_differences"].to_string();
    assert!(
        d.contains("shop-1") && d.contains("8081:80") && d.contains("9090:80"),
        "{d}"
    );
    assert!(d.contains("http:/ok"), "{d}");
    assert_eq!(
        inspect["ports"][0]["published"], 9090,
        "left as it was: {inspect}"
    );
    assert_eq!(
        inspect["health"]["check"], "tcp",
        "left as it was: {inspect}"
    );
    let lines = agent
        .log()
        .lines()
        .filter(|l| l.contains("mesh.publish=8081:80"))
        .count();
    assert_eq!(lines, 1, "logged once:\n{}", agent.log());

    // An engine that is not there: the agent starts, says so, retries, and serves
    // the tasks it has from other sources.
    let missing = format!("{}/nothing.sock", host.dir.display());
    let lonely = Agent::start_in(
        &host.ns,
        Some(&format!(
            "[docker]\nenabled = true\nhost = \"unix://{missing}\"\n"
        )),
        &["--bind", "127.0.0.1:0"],
    );
    let backend = integration::Backend::start_in(&host.ns, "api.1");
    let port = backend.port;
    integration::assert_ok(lonely.cli(&[
        "service",
        "create",
        "api",
        "-p",
        &format!("18081:{port}"),
    ]));
    integration::assert_ok(lonely.cli(&["task", "add", "api", "127.0.0.1", "--id", "api.1"]));
    lonely.wait_routable("api", 1);
    assert_eq!(get(&host, "127.0.0.1:18081").as_deref(), Some("api.1"));
    eventually("the engine's absence is retried", || {
        let (_, s) = lonely.http("GET", "/v1/status", None);
        let e = s["docker"]["last_error"].as_str()?.to_string();
        (s["docker"]["connected"] == false && e.contains("nothing.sock")).then_some(())
    });
    eventually("at least two attempts are logged", || {
        (lonely.log().matches("Docker source disconnected").count() >= 2).then_some(())
    });
}

/// Runs `sh -c SCRIPT` in a throwaway container that uses mesh DNS on the bridge.
fn in_container(host: &DockerHost, script: &str) -> Result<String, String> {
    let out = host.docker(&[
        "run",
        "--rm",
        "--dns",
        "172.17.0.1",
        "--dns-search",
        "mesh",
        BUSYBOX_IMAGE,
        "sh",
        "-c",
        script,
    ]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("{text}{}", String::from_utf8_lossy(&out.stderr)))
    }
}

fn a_container_resolves_the_service_and_reaches_its_vip(plane: &str) {
    let host = DockerHost::start();
    let agent = docker_agent(
        &host,
        &format!("[dns]\nlisten = [\"docker0\"]\n[proxy]\ndataplane = \"{plane}\"\n"),
    );
    let a = web(&host, "v-1", &["mesh.service=web", "mesh.port=80"], &[]);
    let b = web(&host, "v-2", &["mesh.service=web", "mesh.port=80"], &[]);
    agent.wait_routable("web", 2);
    let (_, status) = agent.http("GET", "/v1/status", None);
    let active: Vec<&str> = status["planes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["active"] == true && p["frontends"].as_u64() > Some(0))
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(active, [plane], "{status}");
    let (_, svc) = agent.http("GET", "/v1/services/web", None);
    let vip = svc["vips"]["v4"]
        .as_str()
        .expect("web has a VIP")
        .to_string();
    let out = eventually("a container resolves web through mesh DNS", || {
        in_container(&host, "nslookup web.mesh 172.17.0.1").ok()
    });
    assert!(out.contains(&vip), "web.mesh is the VIP {vip}:\n{out}");
    let out = in_container(&host, "nslookup tasks.web.mesh 172.17.0.1").unwrap();
    for name in ["v-1", "v-2"] {
        let ip = host.container_ip(name);
        assert!(out.contains(&ip), "tasks.web has {ip}:\n{out}");
    }
    // By the short name, through the search domain, and on to the VIP: each fetch
    // is a new connection, balanced over both containers.
    let out = in_container(
        &host,
        "for i in 1 2 3 4; do wget -q -O- http://web/ || exit 1; done",
    )
    .unwrap_or_else(|e| panic!("a container fetches http://web/ on the {plane} plane: {e}"));
    let seen: std::collections::BTreeSet<&str> = out.lines().collect();
    assert_eq!(
        seen,
        [a.as_str(), b.as_str()].into_iter().collect(),
        "{out}"
    );
}

#[test]
fn a_container_resolves_the_service_and_reaches_its_vip_on_the_userspace_plane() {
    if skip_unless_docker(
        "a_container_resolves_the_service_and_reaches_its_vip_on_the_userspace_plane",
    ) {
        return;
    }
    a_container_resolves_the_service_and_reaches_its_vip("userspace");
}

#[test]
fn a_container_resolves_the_service_and_reaches_its_vip_on_the_nftables_plane() {
    if skip_unless_docker(
        "a_container_resolves_the_service_and_reaches_its_vip_on_the_nftables_plane",
    ) {
        return;
    }
    a_container_resolves_the_service_and_reaches_its_vip("nftables");
}

/// Host 1 runs Docker and an agent in `host-port` mode; host 2 runs an agent on
/// `plane` and no containers. A client reaches the container through host 2's
/// published port.
fn another_host_routes_to_a_container_through_its_published_port(plane: &str) {
    let cluster = Cluster::new(2);
    let key = integration::keygen();
    // Declared after the cluster, so the engine goes before the namespace.
    let host = DockerHost::start_in_existing(&cluster.hosts[0].ns);
    let h1 = Agent::start_named_in(
        &cluster.hosts[0].ns,
        "host1",
        Some(&format!(
            "{}[docker]\nenabled = true\nhost = \"{}\"\naddress = \"host-port\"\n",
            cluster.cluster_config(0, &key),
            host.host_env()
        )),
        &[],
    );
    if plane != "userspace" {
        cluster.hosts[1]
            .ns
            .run("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
    }
    let h2 = Agent::start_named_in(
        &cluster.hosts[1].ns,
        "host2",
        Some(&cluster.cluster_config(1, &key)),
        &["--dataplane", plane],
    );
    let id = web(
        &host,
        "m-1",
        &["mesh.service=web", "mesh.publish=8080:80"],
        &["-p", "18080:80"],
    );
    h2.wait_routable("web", 1);
    let t = tasks(&h2, "web");
    assert_eq!(t.len(), 1, "{t:?}");
    assert_eq!(t[0].1, "10.77.0.1", "the task is host 1's address: {t:?}");
    let ps = h2.cli_json(&["service", "ps", "web"]);
    assert_eq!(ps[0]["port"], 18080, "and the published host port: {ps}");
    let body = eventually("the client reaches the container through host 2", || {
        cluster.get(&format!("{}:8080", cluster.hosts[1].ip))
    });
    assert_eq!(body, id);

    // The same host in `container` mode: other hosts cannot reach 172.17.0.0/16
    // here, and the agent says so, once.
    let mut h1 = h1;
    h1.stop();
    h1.spawn(
        Some(&format!(
            "{}[docker]\nenabled = true\nhost = \"{}\"\n",
            cluster.cluster_config(0, &key),
            host.host_env()
        )),
        &[],
    );
    let warning = "which other hosts reach only if container subnets are routed";
    eventually(
        "host 1 warns that host 2 cannot reach the container's address",
        || h1.log().contains(warning).then_some(()),
    );
    web(&host, "m-2", &["mesh.service=web"], &[]);
    eventually("m-2 is a task too", || {
        (tasks(&h1, "web").len() == 2).then_some(())
    });
    assert_eq!(h1.log().matches(warning).count(), 1, "{}", h1.log());
}

#[test]
fn another_host_routes_to_a_container_on_the_userspace_plane() {
    if skip_unless_docker("another_host_routes_to_a_container_on_the_userspace_plane") {
        return;
    }
    another_host_routes_to_a_container_through_its_published_port("userspace");
}

#[test]
fn another_host_routes_to_a_container_on_the_nftables_plane() {
    if skip_unless_docker("another_host_routes_to_a_container_on_the_nftables_plane") {
        return;
    }
    another_host_routes_to_a_container_through_its_published_port("nftables");
}

#[test]
fn the_compose_example_works_as_its_readme_says() {
    if skip_unless_docker("the_compose_example_works_as_its_readme_says") {
        return;
    }
    if std::process::Command::new("docker-compose")
        .arg("version")
        .output()
        .is_err()
    {
        eprintln!(
            "SKIPPED the_compose_example_works_as_its_readme_says: docker-compose is not installed (apt-get install docker-compose; the README's test command does)"
        );
        return;
    }
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/compose");
    let host = DockerHost::start();
    // Step 1: the image.
    integration::assert_ok(
        std::process::Command::new(example.join("../../scripts/busybox-image.sh"))
            .arg("mesh-example/busybox:1")
            .env("DOCKER_HOST", host.host_env())
            .output()
            .unwrap(),
    );
    // Step 2: the example's config, pointed at this engine.
    let config = std::fs::read_to_string(example.join("mesh.toml")).unwrap();
    assert!(
        config.trim_end().ends_with("compose = true"),
        "[docker] is the last section"
    );
    let agent = Agent::start_in(
        &host.ns,
        Some(&format!("{config}host = \"{}\"\n", host.host_env())),
        &["--bind", "127.0.0.1:0"],
    );
    let compose = |args: &[&str]| {
        let out = std::process::Command::new("docker-compose")
            .args(["-p", "meshex"])
            .args(args)
            .current_dir(&example)
            .env("DOCKER_HOST", host.host_env())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "docker-compose {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    // Step 3.
    compose(&["up", "-d", "--scale", "web=3"]);
    agent.wait_routable("web", 3);
    // Step 4: three replicas answer on the published port.
    let seen: std::collections::BTreeSet<String> = (0..6)
        .map(|_| get(&host, "127.0.0.1:8080").expect("GET :8080"))
        .collect();
    assert_eq!(seen.len(), 3, "{seen:?}");
    // Step 5: the client finds web by name.
    let out = compose(&["exec", "-T", "client", "nslookup", "web.mesh", "172.17.0.1"]);
    let (_, svc) = agent.http("GET", "/v1/services/web", None);
    assert!(out.contains(svc["vips"]["v4"].as_str().unwrap()), "{out}");
    let body = compose(&["exec", "-T", "client", "wget", "-qO-", "http://web/"]);
    assert!(seen.contains(body.trim()), "{body}");
    // Step 6: the replicas show their containers; the client is not a task.
    let ps = String::from_utf8_lossy(&agent.cli(&["service", "ps", "web"]).stdout).to_string();
    assert!(ps.contains("docker meshex_web_1"), "{ps}");
    let (_, status) = agent.http("GET", "/v1/status", None);
    assert_eq!(status["docker"]["tasks"], 3, "{status}");
    assert!(status["docker"].get("skipped").is_none(), "{status}");
    // Step 7.
    compose(&["down"]);
    eventually("the replicas leave the service", || {
        tasks(&agent, "web").is_empty().then_some(())
    });
}

/// Docker and the nftables plane on one host. Docker's iptables(-nft) rules drop
/// forwarded traffic by default (FORWARD policy DROP); the mesh still forwards what it
/// DNATs to another host, Docker's own published ports still work beside the mesh's,
/// and after the agent leaves, Docker's rules are as they were.
#[test]
fn the_nftables_plane_and_dockers_rules_coexist_on_one_host() {
    if skip_unless_docker("the_nftables_plane_and_dockers_rules_coexist_on_one_host") {
        return;
    }
    let cluster = Cluster::new(2);
    let key = integration::keygen();
    let host = DockerHost::start_in_existing(&cluster.hosts[0].ns);
    let ns1 = &cluster.hosts[0].ns;
    let rules = |ns: &integration::netns::Netns| ns.run("iptables", &["-S"]);
    let docker_rules = rules(ns1);
    assert!(
        docker_rules.contains("-P FORWARD DROP"),
        "Docker's policy:\n{docker_rules}"
    );
    assert!(!docker_rules.contains("mesh"), "{docker_rules}");
    let mut h1 = Agent::start_named_in(
        ns1,
        "host1",
        Some(&format!(
            "{}[docker]\nenabled = true\nhost = \"{}\"\n",
            cluster.cluster_config(0, &key),
            host.host_env()
        )),
        &["--dataplane", "nftables"],
    );
    let h2 = Agent::start_named_in(
        &cluster.hosts[1].ns,
        "host2",
        Some(&cluster.cluster_config(1, &key)),
        &[],
    );
    let local = web(
        &host,
        "c-1",
        &["mesh.service=web", "mesh.publish=8080:80"],
        &["-p", "18080:80"],
    );
    h1.wait_routable("web", 1);
    let remote = integration::Backend::start_in_at(&cluster.hosts[1].ns, "remote", "10.77.0.2", 0);
    integration::assert_ok(h2.cli(&[
        "task",
        "add",
        "web",
        &format!("10.77.0.2:{}", remote.port),
        "--id",
        "remote",
    ]));
    h1.wait_routable("web", 2);
    let (_, status) = h1.http("GET", "/v1/status", None);
    assert!(
        status["planes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "nftables" && p["active"] == true),
        "{status}"
    );
    // Both tasks through host 1's kernel: the container beside Docker's rules, and
    // the other host's task through Docker's FORWARD chain.
    let seen: std::collections::BTreeSet<String> = (0..4)
        .map(|_| {
            cluster
                .get("10.77.0.1:8080")
                .expect("GET host1:8080 through the nftables plane with Docker's rules in place")
        })
        .collect();
    assert_eq!(
        seen,
        [local.clone(), "remote".to_string()].into_iter().collect()
    );
    // Docker's own published port, beside ours.
    assert_eq!(
        cluster.get("10.77.0.1:18080").as_deref(),
        Some(local.as_str())
    );
    let (_, status) = h1.http("GET", "/v1/status", None);
    assert!(
        status.to_string().contains("DOCKER-USER"),
        "status says so: {status}"
    );
    // The one rule the plane adds, in Docker's chain for rules of one's own.
    let with_mesh = rules(ns1);
    let ours: Vec<&str> = with_mesh
        .lines()
        .filter(|l| l.contains("mesh: forward"))
        .collect();
    assert_eq!(ours.len(), 1, "{with_mesh}");
    assert!(ours[0].starts_with("-A DOCKER-USER "), "{with_mesh}");
    // Docker made afresh (its chains emptied, as a new dockerd would find them):
    // the plane puts its rule back, and the other host is reached again.
    ns1.run("iptables", &["-F", "DOCKER-USER"]);
    ns1.run("iptables", &["-A", "DOCKER-USER", "-j", "RETURN"]);
    eventually("the accept is back in DOCKER-USER", || {
        rules(ns1).contains("mesh: forward").then_some(())
    });
    let seen: std::collections::BTreeSet<String> = (0..4)
        .filter_map(|_| cluster.get("10.77.0.1:8080"))
        .collect();
    assert!(seen.contains("remote"), "{seen:?}");
    h1.stop();
    let without: String = with_mesh
        .lines()
        .filter(|l| !l.contains("mesh: forward"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(rules(ns1), without, "Docker's rules are as they were");
    assert_eq!(
        cluster.get("10.77.0.1:18080").as_deref(),
        Some(local.as_str())
    );
}

/// Docker settings that can never work stop the agent at start, naming the setting;
/// they need no engine to be found out.
#[test]
fn docker_settings_that_cannot_work_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "[docker]\nenabled = true\nhost = \"ftp://somewhere\"\n",
            &[][..],
            "docker.host",
        ),
        (
            "[docker]\nenabled = true\naddress = \"host-port\"\n",
            &["--bind", "0.0.0.0:0"][..],
            "docker.host_address",
        ),
        (
            "[docker]\nenabled = true\naddress = \"bridge\"\n",
            &[][..],
            "2.toml:3: unknown variant `bridge`, expected `container` or `host-port`",
        ),
        ("[docker]\nenable = true\n", &[][..], "enable"),
    ];
    for (i, (config, extra, needle)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("{i}.toml"));
        std::fs::write(&path, config).unwrap();
        let socket = dir.path().join(format!("{i}.sock"));
        let data = dir.path().join(format!("data{i}"));
        let mut args = vec![
            "--config",
            path.to_str().unwrap(),
            "--api",
            socket.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
            "--no-vips",
        ];
        args.extend_from_slice(extra);
        let err = integration::agent_refuses(&args);
        assert!(err.contains(needle), "{config}: {err}");
    }
}
