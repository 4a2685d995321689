//! The `mesh` binary end to end on one host: CLI, API, health checks, persistence,
//! metrics, config errors and the demo. Real agent and backend processes, real sockets.

use std::collections::HashMap;
use std::process::{Command, Stdio};

use integration::*;

fn create_web(agent: &Agent, port: u16, extra: &[&str]) {
    let published = format!("{port}:80");
    let mut args = vec!["service", "create", "web", "-p", &published];
    args.extend_from_slice(extra);
    let out = agent.cli(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn add_task(agent: &Agent, id: &str, port: u16) {
    let addr = format!("127.0.0.1:{port}");
    let out = agent.cli(&["task", "add", "web", &addr, "--id", id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn round_robin_through_the_agent_gives_exactly_100_each_and_drain_and_undrain_take_one_out_and_back()
 {
    let agent = Agent::start(None, &[]);
    let backends: Vec<Backend> = (1..=3)
        .map(|i| Backend::start(&format!("web.{i}")))
        .collect();
    let port = free_port();
    create_web(
        &agent,
        port,
        &["--health", "http:/", "--health-interval", "200ms"],
    );
    for b in &backends {
        add_task(&agent, &b.name, b.port);
    }
    agent.wait_routable("web", 3);
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..300 {
        *counts
            .entry(get(port).expect("connection succeeds"))
            .or_default() += 1;
    }
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(counts.values().all(|&n| n == 100), "{counts:?}");

    // `service ps` shows every task with its host, health and state.
    let ps = agent.cli(&["service", "ps", "web"]);
    let text = String::from_utf8_lossy(&ps.stdout);
    assert!(text.starts_with("ID "), "{text}");
    for b in &backends {
        let line = text
            .lines()
            .find(|l| l.starts_with(&b.name))
            .unwrap_or_else(|| panic!("{text}"));
        assert!(
            line.contains(&format!("127.0.0.1:{}", b.port))
                && line.contains(" it ")
                && line.contains("healthy")
                && line.contains("active"),
            "{line}"
        );
    }
    let ls = String::from_utf8_lossy(&agent.cli(&["service", "ls"]).stdout).to_string();
    assert!(
        ls.contains(&format!("*:{port}->80/tcp")) && ls.contains("3/3"),
        "{ls}"
    );

    // Drain one, and take it back: no new connection while drained, its share after.
    assert_ok(agent.cli(&["task", "drain", "web", "web.1"]));
    agent.wait_routable("web", 2);
    assert_eq!(
        agent.metric("mesh_task_draining", &[("task", "web.1")]),
        1.0
    );
    assert_eq!(agent.metric("mesh_service_routable_tasks", &[]), 2.0);
    assert!((0..30).all(|_| get(port).expect("connection succeeds") != "web.1"));
    let undrained = agent.cli_json(&["task", "undrain", "web", "web.1"]);
    assert_eq!(undrained["state"], "active", "{undrained}");
    agent.wait_routable("web", 3);
    assert_eq!(
        agent.metric("mesh_task_draining", &[("task", "web.1")]),
        0.0
    );
    let mut after: HashMap<String, usize> = HashMap::new();
    for _ in 0..30 {
        *after
            .entry(get(port).expect("connection succeeds"))
            .or_default() += 1;
    }
    assert_eq!(after.get("web.1"), Some(&10), "{after:?}");
}

#[test]
fn a_killed_task_costs_no_connection_turns_unhealthy_and_comes_back() {
    let agent = Agent::start(None, &[]);
    let mut backends: Vec<Backend> = (1..=3)
        .map(|i| Backend::start(&format!("web.{i}")))
        .collect();
    let port = free_port();
    create_web(
        &agent,
        port,
        &["--health", "tcp", "--health-interval", "200ms"],
    );
    for b in &backends {
        add_task(&agent, &b.name, b.port);
    }
    agent.wait_routable("web", 3);

    let dead_port = backends.remove(1).kill();
    // Before the prober notices, connects to web.2 fail and are retried elsewhere.
    for _ in 0..60 {
        let got = get(port).expect("no client sees the dead task");
        assert_ne!(got, "web.2");
    }
    eventually("web.2 unhealthy", || {
        (agent.task_health("web", "web.2") == "unhealthy").then_some(())
    });
    agent.wait_routable("web", 2);

    // The same task comes back on its port; after `rise` good probes it serves again.
    let _revived = Backend::on_port("web.2", dead_port);
    eventually("web.2 healthy again", || {
        (agent.task_health("web", "web.2") == "healthy").then_some(())
    });
    eventually("web.2 gets traffic again", || {
        (get(port).ok()? == "web.2").then_some(())
    });

    let (_, metrics) = agent.try_http("GET", "/metrics", None).unwrap();
    assert!(
        metrics.contains(
            r#"mesh_health_transitions_total{service="web",task="web.2",to="unhealthy"} 1"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            r#"mesh_health_transitions_total{service="web",task="web.2",to="healthy"} 2"#
        ),
        "{metrics}"
    );
    assert!(
        agent.log().contains("task is unhealthy"),
        "transition is logged"
    );

    // A removed task leaves no series behind: tasks come and go all day, and series
    // kept for every task that ever ran grow without bound.
    assert_ok(agent.cli(&["task", "rm", "web", "web.2"]));
    eventually("web.2's series are gone from /metrics", || {
        let (_, metrics) = agent.try_http("GET", "/metrics", None).ok()?;
        (!metrics.contains(r#"task="web.2""#)).then_some(())
    });
}

#[test]
fn bad_input_gets_clear_errors_and_the_agent_keeps_serving() {
    let agent = Agent::start(None, &[]);
    let backend = Backend::start("web.1");
    let port = free_port();
    create_web(&agent, port, &[]);
    add_task(&agent, "web.1", backend.port);
    agent.wait_routable("web", 1);

    let cases: &[(&str, &str, &str, u16, &str)] = &[
        ("POST", "/v1/services", "{not json", 400, "invalid JSON"),
        (
            "POST",
            "/v1/services",
            r#"{"name":"api","ports":[{"target":"x"}]}"#,
            400,
            "ports[0].target",
        ),
        (
            "POST",
            "/v1/services",
            r#"{"name":"api","ports":[{"target":80}],"colour":"red"}"#,
            400,
            "colour",
        ),
        (
            "POST",
            "/v1/services",
            r#"{"name":"Api!","ports":[{"target":80}]}"#,
            400,
            "name:",
        ),
        (
            "POST",
            "/v1/services",
            r#"{"name":"api","ports":[{"target":80}],"health":{"check":"http","path":"x"}}"#,
            400,
            "health.path",
        ),
        (
            "POST",
            "/v1/services",
            r#"{"name":"api","ports":[{"target":80}],"drain_timeout":"forever"}"#,
            400,
            "drain_timeout",
        ),
        (
            "POST",
            "/v1/services",
            r#"{"name":"web","ports":[{"target":80}]}"#,
            409,
            "already exists",
        ),
        ("GET", "/v1/services/nope", "", 404, "nope"),
        ("DELETE", "/v1/services/nope", "", 404, "nope"),
        (
            "POST",
            "/v1/services/nope/tasks",
            r#"{"ip":"10.0.0.1"}"#,
            404,
            "nope",
        ),
        (
            "POST",
            "/v1/services/web/tasks",
            r#"{"ip":"10.0.0.300"}"#,
            400,
            "ip",
        ),
        (
            "POST",
            "/v1/services/web/tasks",
            r#"{"ip":"10.0.0.1","id":"web.1"}"#,
            409,
            "web.1",
        ),
        ("DELETE", "/v1/services/web/tasks/nope", "", 404, "nope"),
        ("POST", "/v1/services/web/tasks/nope/drain", "", 404, "nope"),
        (
            "PUT",
            "/v1/services/web",
            r#"{"name":"other","ports":[{"target":80}]}"#,
            400,
            "renamed",
        ),
        ("GET", "/v2/whatever", "", 404, "no such endpoint"),
    ];
    for (method, path, body, status, needle) in cases {
        let (got, v) = agent.http(method, path, (!body.is_empty()).then_some(*body));
        assert_eq!(got, *status, "{method} {path} {body}: {v}");
        assert!(v["error"].is_string(), "{v}");
        let detail = v["detail"].as_str().unwrap_or_default();
        assert!(
            detail.contains(needle),
            "{method} {path} {body}: {detail:?} should mention {needle:?}"
        );
    }

    // A published port held by another service: 409 naming the holder.
    let body = format!(r#"{{"name":"api","ports":[{{"published":{port},"target":80}}]}}"#);
    let (status, v) = agent.http("POST", "/v1/services", Some(&body));
    assert_eq!(status, 409, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("\"web\""), "{v}");

    // A port held by another process on this host: 409, not a silent bind failure.
    let squatter = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let taken = squatter.local_addr().unwrap().port();
    let body = format!(r#"{{"name":"api","ports":[{{"published":{taken},"target":80}}]}}"#);
    let (status, v) = agent.http("POST", "/v1/services", Some(&body));
    assert_eq!(status, 409, "{v}");
    assert!(
        v["detail"].as_str().unwrap().contains(&taken.to_string()),
        "{v}"
    );

    // The CLI prints one line and exits non-zero.
    for args in [
        &["service", "create", "bad", "-p", "0"][..],
        &["service", "create", "bad", "-p", "80/sctp"],
        &["service", "inspect", "nope"],
        &["task", "add", "web", "not-an-ip"],
    ] {
        let out = agent.cli(args);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("error: "), "{args:?}: {err}");
    }

    // Nothing above broke the agent or the existing service.
    assert_eq!(get(port).unwrap(), "web.1");
    let (status, list) = agent.http("GET", "/v1/services", None);
    assert_eq!(status, 200);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
}

#[test]
fn config_errors_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let check = |text: &str| {
        let path = dir.path().join("mesh.toml");
        std::fs::write(&path, text).unwrap();
        let out = Command::new(mesh_bin())
            .args(["agent", "--check-config", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
            path,
        )
    };
    let (ok, out, _) =
        check("[[service]]\nname = \"web\"\nports = [{ published = 8080, target = 80 }]\n");
    assert!(ok, "{out}");
    let (ok, out, path) = check("node_name = \"a\"\n[proxy]\nconect_timeout = \"1s\"\n");
    assert!(!ok);
    assert!(
        out.contains(&format!("{}:3:", path.display())) && out.contains("conect_timeout"),
        "{out}"
    );
    let (ok, out, path) = check(
        "[[service]]\nname = \"web\"\nports = [{ published = 8080, target = 80 }, { published = 8080, target = 81 }]\n",
    );
    assert!(!ok);
    assert!(
        out.contains(&format!(
            "{}:1: service \"web\": ports[1].published",
            path.display()
        )),
        "{out}"
    );
    let (ok, out, _) = check("[metrics]\nlisten = \"nowhere\"\n");
    assert!(!ok && out.contains(":2:"), "{out}");
}

#[test]
fn config_declared_services_are_served_and_api_changes_survive_a_restart() {
    let b1 = Backend::start("web.1");
    let b2 = Backend::start("web.2");
    let port = free_port();
    let config = format!(
        "[[service]]\nname = \"web\"\nports = [{{ published = {port}, target = 80 }}]\nhealth = {{ check = \"tcp\", interval = \"200ms\" }}\n\n\
         [[task]]\nservice = \"web\"\nid = \"web.1\"\nip = \"127.0.0.1\"\nport = {}\n",
        b1.port
    );
    let mut agent = Agent::start(Some(&config), &[]);
    agent.wait_routable("web", 1);
    assert_eq!(get(port).unwrap(), "web.1");

    // Added through the API: kept in the data dir.
    add_task(&agent, "web.2", b2.port);
    let api_port = free_port();
    let out = agent.cli(&[
        "service",
        "create",
        "api",
        "-p",
        &format!("{api_port}:80"),
        "--health",
        "none",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    agent.wait_routable("web", 2);

    // An update through the API replaces the spec in place and is saved too.
    let (status, v) = agent.http(
        "PUT",
        "/v1/services/api",
        Some(&format!(r#"{{"name":"api","ports":[{{"published":{api_port},"target":80}}],"health":{{"check":"none"}},"drain_timeout":"7s","balance":"least-conn"}}"#)),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["drain_timeout"], "7s");

    assert!(agent.stop().success(), "clean exit; log:\n{}", agent.log());
    assert!(!agent.socket.exists(), "the socket file is removed on exit");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "published port closed on exit"
    );

    agent.spawn(Some(&config), &[]);
    agent.wait_routable("web", 2);
    let services = agent.cli_json(&["service", "ls"]);
    let names: Vec<&str> = services
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["api", "web"]);
    let api = agent.cli_json(&["service", "inspect", "api"]);
    assert_eq!(
        (api["drain_timeout"].as_str(), api["balance"].as_str()),
        (Some("7s"), Some("least-conn")),
        "{api}"
    );
    let seen: std::collections::HashSet<String> = (0..4).map(|_| get(port).unwrap()).collect();
    assert_eq!(seen.len(), 2, "{seen:?}");
}

#[test]
fn tcp_api_needs_the_bearer_token_and_metrics_have_their_own_address() {
    let api_port = free_port();
    let metrics_port = free_port();
    let config = format!("[api]\ntcp = \"127.0.0.1:{api_port}\"\ntoken = \"s3cret\"\n");
    let agent = Agent::start(
        Some(&config),
        &[
            "--metrics",
            &format!("127.0.0.1:{metrics_port}"),
            "--log-format",
            "json",
        ],
    );
    let log = agent.log();
    let first = log.lines().next().expect("a log line");
    let entry: Value = serde_json::from_str(first).unwrap_or_else(|e| panic!("{e}: {first}"));
    assert!(
        entry["level"].is_string() && entry["message"].is_string(),
        "fields at the top level: {entry}"
    );
    // A line with fields has them beside the message.
    let started = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|e| e["message"] == "mesh agent started")
        .unwrap_or_else(|| panic!("no start line in\n{log}"));
    assert_eq!(started["node"], "it", "{started}");
    let call = |token: Option<&str>| {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", api_port)).unwrap();
        http_exchange(&mut s, "GET", "/v1/status", None, token).unwrap()
    };
    let (status, body) = call(None);
    assert_eq!(status, 401, "{body}");
    assert_eq!(call(Some("wrong")).0, 401);
    let (status, body) = call(Some("s3cret"));
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"node\":\"it\""), "{body}");

    // The CLI reaches the TCP API with MESH_API and MESH_API_TOKEN.
    let out = Command::new(mesh_bin())
        .args(["status", "--format", "json"])
        .env("MESH_API", format!("http://127.0.0.1:{api_port}"))
        .env("MESH_API_TOKEN", "s3cret")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Traffic shows up in /metrics on the scrape address.
    let backend = Backend::start("web.1");
    let port = free_port();
    create_web(
        &agent,
        port,
        &["--health", "http:/", "--health-interval", "200ms"],
    );
    add_task(&agent, "web.1", backend.port);
    agent.wait_routable("web", 1);
    for _ in 0..5 {
        get(port).unwrap();
    }
    let mut s = std::net::TcpStream::connect(("127.0.0.1", metrics_port)).unwrap();
    let (status, text) = http_exchange(&mut s, "GET", "/metrics", None, None).unwrap();
    assert_eq!(status, 200);
    for needle in [
        r#"mesh_connections_total{service="web",task="web.1"} 5"#,
        &format!(
            r#"mesh_listener_accepts_total{{frontend="published",port="{port}",protocol="tcp",service="web"}}"#
        ),
        // Health and drain state come from the table, labelled with the owning host,
        // so every agent shows every task of the cluster.
        r#"mesh_task_healthy{host="it",service="web",task="web.1"} 1"#,
        r#"mesh_task_draining{host="it",service="web",task="web.1"} 0"#,
        r#"mesh_service_routable_tasks{service="web"} 1"#,
        r#"mesh_gossip_member_status{member="it",status="alive"} 1"#,
        "mesh_bytes_out_total",
        "mesh_connections_active",
        "process_resident_memory_bytes ",
        "process_open_fds ",
        "mesh_build_info{",
        r#"mesh_gossip_members_by_state{state="alive"} 1"#,
        "mesh_gossip_broadcast_backlog ",
        r#"mesh_dataplane_apply_seconds_count{plane="userspace"}"#,
        &format!(
            r#"mesh_connect_seconds_count{{frontend="published",port="{port}",protocol="tcp",service="web"}} 5"#
        ),
    ] {
        assert!(text.contains(needle), "{needle} missing from\n{text}");
    }
    // A TCP-only service has no UDP series.
    assert!(!text.contains("mesh_udp_flows_active{"), "{text}");
    // The allocator's figures: a live agent has heap in use.
    let in_use = text
        .lines()
        .find_map(|l| l.strip_prefix("mesh_heap_in_use_bytes "))
        .and_then(|v| v.trim().parse::<f64>().ok());
    assert!(
        in_use.is_some_and(|b| b > 0.0),
        "mesh_heap_in_use_bytes: {text}"
    );
    assert!(text.contains("mesh_heap_free_bytes "), "{text}");
}

#[test]
fn a_tcp_api_without_a_token_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(mesh_bin())
        .args([
            "agent",
            "--bind",
            "127.0.0.1:0",
            "--api",
            &format!("http://127.0.0.1:{}", free_port()),
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .env_remove("MESH_API_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("needs a bearer token"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn demo_cycles_through_three_tasks_and_stops_cleanly() {
    let port = free_port();
    let dns = free_udp_port();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("demo.sock");
    let demo_dirs = || -> std::collections::BTreeSet<String> {
        std::fs::read_dir(std::env::temp_dir())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.starts_with("mesh-demo-"))
            .collect()
    };
    let before = demo_dirs();
    let mut demo = ChildGuard(
        Command::new(mesh_bin())
            .args([
                "demo",
                "--port",
                &port.to_string(),
                "--dns-port",
                &dns.to_string(),
                "--api",
                &format!("unix:{}", socket.display()),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut stdout = std::io::BufReader::new(demo.0.stdout.take().unwrap());
    // The demo prints its instructions once all three tasks are healthy.
    let mut text = String::new();
    eventually("demo prints what to try", || {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut stdout, &mut line).ok()?;
        text.push_str(&line);
        text.contains("Ctrl-C").then_some(())
    });
    assert!(
        text.contains(&format!("curl -s localhost:{port}"))
            && text.contains("mesh node ls")
            && text.contains("/metrics"),
        "{text}"
    );
    // Three tasks on three loopback addresses: tasks.web lists three.
    let out = Command::new("dig")
        .args([
            "@127.0.0.1",
            "-p",
            &dns.to_string(),
            "+short",
            "tasks.web.mesh",
        ])
        .output()
        .unwrap();
    let mut ips: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    ips.sort();
    assert_eq!(ips, ["127.0.0.1", "127.0.0.2", "127.0.0.3"]);
    let answers: Vec<String> = (0..6).map(|_| get(port).unwrap()).collect();
    let first = answers[0].clone();
    let order = ["web.1", "web.2", "web.3"];
    let start = order.iter().position(|n| *n == first).expect("a demo task");
    let expected: Vec<&str> = (0..6).map(|i| order[(start + i) % 3]).collect();
    assert_eq!(answers, expected);
    // SAFETY: kill(2) with a pid we own.
    unsafe { libc::kill(demo.0.id() as i32, libc::SIGINT) };
    let status = eventually("demo exits", || demo.0.try_wait().ok().flatten());
    assert!(status.success());
    assert!(!socket.exists());
    let left: Vec<String> = demo_dirs().difference(&before).cloned().collect();
    assert!(left.is_empty(), "the demo leaves no temp dir: {left:?}");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[test]
fn service_update_changes_only_the_settings_it_is_given() {
    let agent = Agent::start(None, &[]);
    let port = free_port();
    create_web(
        &agent,
        port,
        &[
            "--health",
            "http:/ok",
            "--health-interval",
            "300ms",
            "--drain-timeout",
            "7s",
        ],
    );
    let inspect = || agent.cli_json(&["service", "inspect", "web"]);
    assert_ok(agent.cli(&["service", "update", "web", "--balance", "least-conn"]));
    let v = inspect();
    assert_eq!(v["balance"], "least-conn", "{v}");
    // What a full replacement used to reset stays as it was.
    assert_eq!(
        (
            &v["health"]["check"],
            &v["health"]["path"],
            &v["health"]["interval"],
            &v["drain_timeout"]
        ),
        (&json!("http"), &json!("/ok"), &json!("300ms"), &json!("7s")),
        "{v}"
    );
    assert_ok(agent.cli(&["service", "update", "web", "--health-interval", "1s"]));
    let v = inspect();
    assert_eq!(
        (&v["health"]["check"], &v["health"]["interval"]),
        (&json!("http"), &json!("1s")),
        "{v}"
    );
    let other = free_port();
    assert_ok(agent.cli(&["service", "update", "web", "-p", &format!("{other}:80")]));
    assert_eq!(inspect()["ports"][0]["published"], other);

    // Mistakes are refused, naming what is wrong, and change nothing.
    let err = |args: &[&str]| {
        let out = agent.cli(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    assert!(err(&["service", "update", "web"]).contains("nothing to change"));
    assert!(
        err(&["service", "update", "web", "--drain-timeout", "soon"]).contains("--drain-timeout")
    );
    assert!(err(&["service", "update", "nope", "--balance", "least-conn"]).contains("nope"));
    let (status, body) = agent.http("PATCH", "/v1/services/web", Some(r#"{"name":"other"}"#));
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("cannot be renamed"), "{body}");
    let (status, body) = agent.http(
        "PATCH",
        "/v1/services/web",
        Some(r#"{"max_connections":0}"#),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("max_connections"), "{body}");
    let (status, _) = agent.http("PATCH", "/v1/services/web", Some("[1]"));
    assert_eq!(status, 400);
    assert_eq!(
        inspect()["balance"],
        "least-conn",
        "unchanged by the refused ones"
    );

    // A port alone is a target only, and the CLI says so.
    let out = agent.cli(&["service", "create", "inner", "-p", "81"]);
    let note = assert_ok_stderr(out);
    assert!(
        note.contains("81/tcp is not published") && note.contains("-p 81:81"),
        "{note}"
    );
}

/// Asserts success and returns stderr (where notes go).
fn assert_ok_stderr(out: std::process::Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{err}");
    err
}

#[test]
fn the_cli_takes_dockers_port_syntax_aliases_filters_quiet_and_templates() {
    let dns = free_udp_port();
    let dns_addr = format!("127.0.0.1:{dns}");
    let agent = Agent::start(None, &["--dns", &dns_addr]);
    let backend = Backend::start("web.1");
    let port = free_port();
    // Docker's long form, with a port name for SRV, and --endpoint-mode for --mode.
    let published = format!("published={port},target=80,mode=ingress,name=http");
    assert_ok(agent.cli(&[
        "service",
        "create",
        "web",
        "-p",
        &published,
        "--endpoint-mode",
        "vip",
    ]));
    assert_ok(agent.cli(&[
        "service",
        "create",
        "api",
        "-p",
        "target=81,protocol=udp",
        "--mode",
        "dnsrr",
    ]));
    let web = agent.cli_json(&["service", "inspect", "web"]);
    assert_eq!(
        (&web["ports"][0]["published"], &web["ports"][0]["name"]),
        (&json!(port), &json!("http")),
        "{web}"
    );
    let refused = agent.cli(&["service", "create", "x", "-p", "target=80,mode=host"]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("mode=host is not supported"), "{err}");

    // The README's SRV example answers: the port has a name now.
    let addr = format!("127.0.0.1:{}", backend.port);
    assert_ok(agent.cli(&["task", "add", "web", &addr, "--id", "web.1"]));
    agent.wait_routable("web", 1);
    let srv = eventually("SRV _http._tcp.web.mesh answers", || {
        let out = Command::new("dig")
            .args(["@127.0.0.1", "-p", &dns.to_string(), "+short", "+time=5"])
            .args(["SRV", "_http._tcp.web.mesh"])
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (!text.is_empty()).then_some(text)
    });
    // A VIP service's SRV names the VIP's name and the target port.
    assert_eq!(srv, "0 0 80 web.mesh.");

    // Aliases, -q, --filter and templates.
    let text = |args: &[&str]| assert_ok(agent.cli(args));
    assert_eq!(text(&["service", "list", "-q"]), "api\nweb\n");
    assert_eq!(
        text(&["service", "ls", "--filter", "mode=dnsrr", "-q"]),
        "api\n"
    );
    assert_eq!(
        text(&[
            "service",
            "ls",
            "--filter",
            "name=w",
            "--format",
            "{{.Name}} {{.Mode}} {{.Tasks}}"
        ]),
        "web vip 1/1\n"
    );
    assert_eq!(
        text(&["service", "ps", "web", "--format", "{{.ID}}@{{.Host}}"]),
        "web.1@it\n"
    );
    assert_eq!(
        text(&["service", "ps", "web", "--filter", "health=unhealthy", "-q"]),
        ""
    );
    let listed = agent.cli_json(&["service", "ls", "--filter", "name=api"]);
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(text(&["node", "list", "-q"]), "it\n");
    // The answering host is marked, and its start time is a time, not a number.
    let nodes = text(&["node", "ls"]);
    assert!(
        nodes.lines().nth(1).is_some_and(|l| l.starts_with("it *")),
        "{nodes}"
    );
    let started = text(&["node", "ls", "--format", "{{.Started}}"]);
    assert!(
        started.starts_with("20") && started.trim_end().ends_with('Z'),
        "{started}"
    );
    for (args, says) in [
        (
            vec!["service", "ls", "--filter", "colour=red"],
            "unknown key \"colour\"",
        ),
        (
            vec!["service", "ls", "--format", "{{.Colour}}"],
            "no field \"Colour\"",
        ),
        (vec!["service", "ls", "--format", "yaml"], "use table, json"),
    ] {
        let out = agent.cli(&args);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }

    // Errors follow --format json.
    let out = agent.cli(&["--format", "json", "service", "inspect", "nope"]);
    assert!(!out.status.success());
    let err: Value = serde_json::from_slice(&out.stderr).expect("a JSON error");
    assert!(
        err["error"].as_str().is_some_and(|e| e.contains("nope")),
        "{err}"
    );
    // A bad duration in an API body says what to write, and where in the body is
    // left out: the field names it.
    let (status, body) = agent.http(
        "POST",
        "/v1/services",
        Some(r#"{"name":"d","ports":[{"target":80}],"drain_timeout":"5x"}"#),
    );
    let detail = body["detail"].as_str().unwrap_or_default();
    assert_eq!(status, 400, "{body}");
    assert!(
        detail.starts_with("drain_timeout:")
            && detail.contains("write it like")
            && !detail.contains("column"),
        "{detail}"
    );
    assert_ok(agent.cli(&["service", "remove", "api"]));
    assert_eq!(text(&["service", "ls", "-q"]), "web\n");
}

#[test]
fn a_sigterm_during_start_up_is_a_clean_stop() {
    // The signal arrives while the agent is still starting (gossip is up, the planes
    // and the API are not yet): it must not kill the process half-way, but stop it
    // cleanly once started.
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("agent.log");
    let socket = dir.path().join("mesh.sock");
    let mut child = ChildGuard(
        Command::new(mesh_bin())
            .args(["agent", "--no-vips", "--bind", "127.0.0.1:0", "--insecure"])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--api")
            .arg(format!("unix:{}", socket.display()))
            .env_remove("MESH_API")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    // Polled closely (not at `eventually`'s 50 ms): the rest of start-up takes tens of
    // milliseconds, and the signal must land inside it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("gossip started")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    // SAFETY: kill(2) with a pid we own.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    let status = eventually("the agent exits", || child.0.try_wait().ok().flatten());
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "{status}: {text}");
    assert!(text.contains("SIGTERM; shutting down"), "{text}");
    assert!(!socket.exists(), "the socket is removed");
}

/// `mesh ARGS` with no MESH_API/MESH_API_TOKEN from the caller's environment, plus `env`.
fn mesh(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    Command::new(mesh_bin())
        .args(args)
        .env_remove("MESH_API")
        .env_remove("MESH_API_TOKEN")
        .envs(env.iter().copied())
        .output()
        .expect("run mesh")
}

#[test]
fn the_api_flags_are_global_but_stay_out_of_keygen_and_demo_help() {
    let api_flags = ["--api", "--token", "--format", "MESH_API"];
    for offline in [&["keygen"][..], &["demo"], &["completions"], &["man"]] {
        let help = assert_ok(mesh(&[offline, &["--help"]].concat(), &[]));
        for flag in api_flags {
            assert!(
                !help.contains(flag),
                "`mesh {offline:?} --help` lists {flag}:\n{help}"
            );
        }
    }
    // Commands that talk to the agent, and the agent that serves the API, list them.
    for online in [
        &["service", "ls"][..],
        &["service", "create"],
        &["task", "drain"],
        &["node", "ls"],
        &["status"],
        &["agent"],
    ] {
        let help = assert_ok(mesh(&[online, &["--help"]].concat(), &[]));
        for flag in api_flags {
            assert!(
                help.contains(flag),
                "`mesh {online:?} --help` does not list {flag}:\n{help}"
            );
        }
    }

    // Both positions reach a real agent, as does MESH_API; a flag beats the variable.
    let agent = Agent::start(None, &[]);
    create_web(&agent, free_port(), &[]);
    let api = format!("unix:{}", agent.socket.display());
    let nowhere = "unix:/nonexistent/mesh.sock";
    for (args, env) in [
        (vec!["--api", &api, "service", "ls", "-q"], vec![]),
        (vec!["service", "ls", "-q", "--api", &api], vec![]),
        (
            vec!["service", "ls", "-q"],
            vec![("MESH_API", api.as_str())],
        ),
        (
            vec!["service", "ls", "-q", "--api", &api],
            vec![("MESH_API", nowhere)],
        ),
    ] {
        let out = assert_ok(mesh(&args, &env));
        assert_eq!(out, "web\n", "mesh {args:?} with {env:?}");
    }
    for args in [
        ["--format", "json", "service", "ls", "--api", &api],
        ["--api", &api, "service", "ls", "--format", "json"],
    ] {
        let out = assert_ok(mesh(&args, &[]));
        let list: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(list[0]["name"], "web", "mesh {args:?}: {out}");
    }
    // The offline commands still accept them (scripts may set them everywhere).
    let key = assert_ok(mesh(&["keygen", "--api", &api, "--format", "json"], &[]));
    assert!(!key.trim().is_empty());
}
