//! What an operator monitors mesh with, checked against the real thing: the alert rules
//! in deploy/ pass promtool and their unit tests; every metric the rules and the
//! Grafana dashboard query is one a running agent exports (a renamed metric breaks
//! this test, not a dashboard in production); the systemd unit passes
//! `systemd-analyze verify`; the cluster-wide task series follow a host going down;
//! JSON logs carry lists as lists.

use std::collections::BTreeSet;
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use integration::*;

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file)
}

fn read(file: &str) -> String {
    std::fs::read_to_string(deploy(file))
        .unwrap_or_else(|e| panic!("{}: {e}", deploy(file).display()))
}

/// `tool`, or None after a SKIPPED line; a panic instead when `require` is set to 1.
fn tool(test: &str, tool: &str, require: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(tool))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        integration::skip::skip(
            test,
            require,
            &format!("{tool} is not installed (Debian: apt-get install prometheus / systemd)"),
        );
    }
    found
}

fn promtool(test: &str) -> Option<PathBuf> {
    tool(test, "promtool", "MESH_REQUIRE_PROMTOOL")
}

/// Runs `cmd`; its stdout and stderr together, and whether it succeeded.
fn output(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The metric names in PromQL (or any text): identifiers that start with `mesh_`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut i = 0;
    while let Some(at) = text[i..].find("mesh_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && ident(bytes[end]) {
            end += 1;
        }
        // Part of a longer identifier (`xmesh_`) or a label value: not a metric name.
        let inside = start > 0 && (ident(bytes[start - 1]) || bytes[start - 1] == b'"');
        if !inside {
            names.insert(text[start..end].to_string());
        }
        i = end;
    }
    names
}

/// The PromQL of the alert rules: every `expr`, block or single line.
fn alert_exprs(rules: &str) -> Vec<String> {
    let mut exprs = Vec::new();
    let mut lines = rules.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(rest) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let indent = line.len() - line.trim_start().len();
        let rest = rest.trim();
        if rest != "|" && rest != ">-" && rest != "|-" {
            exprs.push(rest.to_string());
            continue;
        }
        let mut block = String::new();
        while let Some(next) = lines.peek() {
            let deeper = next.len() - next.trim_start().len() > indent;
            if !next.trim().is_empty() && !deeper {
                break;
            }
            block.push_str(next.trim());
            block.push('\n');
            lines.next();
        }
        exprs.push(block);
    }
    exprs
}

fn dashboard() -> Value {
    let text = read("grafana-dashboard.json");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("grafana-dashboard.json: {e}"))
}

/// Every panel of the dashboard, those inside collapsed rows included.
fn panels(dash: &Value) -> Vec<Value> {
    let mut all = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        all.extend(p["panels"].as_array().into_iter().flatten().cloned());
        all.push(p.clone());
    }
    all
}

/// The PromQL of the dashboard: its panels' targets and its query variables.
fn dashboard_exprs(dash: &Value) -> Vec<String> {
    let mut exprs: Vec<String> = panels(dash)
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(String::from))
        .collect();
    for v in dash["templating"]["list"].as_array().into_iter().flatten() {
        if v["type"] != "query" {
            continue;
        }
        if let Some(q) = v["query"]["query"].as_str().or(v["query"].as_str()) {
            exprs.push(q.to_string());
        }
    }
    exprs
}

#[test]
fn the_alert_rules_pass_promtool_check_and_their_unit_tests() {
    let test = "the_alert_rules_pass_promtool_check_and_their_unit_tests";
    let Some(promtool) = promtool(test) else {
        return;
    };
    let (ok, text) = output(
        Command::new(&promtool)
            .args(["check", "rules"])
            .arg(deploy("alerts.yml")),
    );
    assert!(ok, "promtool check rules deploy/alerts.yml:\n{text}");
    assert!(text.contains("SUCCESS: 5 rules found"), "{text}");
    // The unit tests name alerts.yml relative to themselves.
    let (ok, text) = output(
        Command::new(&promtool)
            .args(["test", "rules", "alerts.test.yml"])
            .current_dir(deploy("")),
    );
    assert!(ok, "promtool test rules deploy/alerts.test.yml:\n{text}");
    assert!(text.contains("SUCCESS"), "{text}");
    for alert in [
        "MeshHostDown",
        "MeshServiceNoHealthyTask",
        "MeshConnectFailuresRising",
        "MeshGossipAuthFailures",
        "MeshDnsServfailRate",
    ] {
        assert!(
            read("alerts.test.yml").contains(&format!("alertname: {alert}")),
            "alerts.test.yml tests {alert}"
        );
    }
}

#[test]
fn the_dashboard_is_valid_and_every_panel_queries_something_promtool_can_parse() {
    let dash = dashboard();
    assert!(
        dash["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
        "schemaVersion"
    );
    let variables: Vec<&str> = dash["templating"]["list"]
        .as_array()
        .expect("templating")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert!(
        variables.contains(&"DS_PROMETHEUS") && variables.contains(&"service"),
        "{variables:?}"
    );
    let mut graphs = 0;
    for panel in panels(&dash) {
        if panel["type"] == "row" {
            continue;
        }
        graphs += 1;
        let title = panel["title"].as_str().expect("a panel has a title");
        let targets = panel["targets"].as_array().cloned().unwrap_or_default();
        assert!(!targets.is_empty(), "panel {title:?} has no target");
        for t in &targets {
            let expr = t["expr"].as_str().unwrap_or_default();
            assert!(
                expr.contains("mesh_"),
                "panel {title:?}: a target without a mesh query: {t}"
            );
        }
        assert_eq!(
            panel["datasource"]["uid"], "${DS_PROMETHEUS}",
            "panel {title:?} uses the templated data source"
        );
    }
    assert!(graphs >= 10, "{graphs} panels");

    // Each query parses: promtool checks them as recording rules, with Grafana's
    // variables replaced by what Grafana would put there.
    let Some(promtool) =
        promtool("the_dashboard_is_valid_and_every_panel_queries_something_promtool_can_parse")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, expr) in dashboard_exprs(&dash).iter().enumerate() {
        let expr = expr
            .replace("$__rate_interval", "5m")
            .replace("$service", ".*");
        // label_values() is Grafana's, not PromQL: its metric is checked below.
        let expr = match expr.strip_prefix("label_values(") {
            Some(rest) => rest.split(',').next().unwrap().to_string(),
            None => expr,
        };
        rules.push_str(&format!(
            "      - record: dashboard:query{i}\n        expr: {}\n",
            serde_json::to_string(&expr).unwrap()
        ));
    }
    let file = dir.path().join("dashboard-rules.yml");
    std::fs::write(&file, &rules).unwrap();
    let (ok, text) = output(Command::new(&promtool).args(["check", "rules"]).arg(&file));
    assert!(ok, "a dashboard query does not parse:\n{text}\n{rules}");
}

/// A DNS query for `name` (type A) to `server`; the response code of the answer.
fn dns_rcode(server: u16, name: &str) -> u8 {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    socket.send_to(&q, ("127.0.0.1", server)).unwrap();
    let mut buf = [0u8; 512];
    let (n, _) = socket.recv_from(&mut buf).expect("a DNS answer");
    assert!(n >= 12 && buf[..2] == [0x12, 0x34], "{:?}", &buf[..n]);
    buf[3] & 0x0f
}

#[test]
fn every_metric_the_alerts_and_the_dashboard_query_is_exported_by_a_running_agent() {
    let dns = free_udp_port();
    let agent = Agent::start(
        Some(&format!(
            "[dns]\nlisten = [\"127.0.0.1:{dns}\"]\nupstreams = []\n"
        )),
        &[],
    );
    let backend = Backend::start("web.1");
    let port = free_port();
    assert_ok(agent.cli(&[
        "service",
        "create",
        "web",
        "-p",
        &format!("{port}:80"),
        "--health",
        "tcp",
        "--health-interval",
        "200ms",
    ]));
    assert_ok(agent.cli(&[
        "task",
        "add",
        "web",
        &format!("127.0.0.1:{}", backend.port),
        "--id",
        "web.1",
    ]));
    agent.wait_routable("web", 1);
    for _ in 0..2 {
        assert_eq!(get(port).unwrap(), "web.1");
    }
    // One name the mesh answers, one it would forward but has no upstream for.
    assert_eq!(dns_rcode(dns, "web.mesh"), 0, "NOERROR for web.mesh");
    assert_eq!(
        dns_rcode(dns, "example.org"),
        2,
        "SERVFAIL without upstreams"
    );

    let (_, exposition) = agent.try_http("GET", "/metrics", None).unwrap();
    // The names as Prometheus stores them: a histogram's samples are NAME_bucket,
    // NAME_sum and NAME_count, which is what a query must use.
    let exported: BTreeSet<String> = exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(String::from)
        .collect();

    let rules = read("alerts.yml");
    let exprs = alert_exprs(&rules);
    assert_eq!(exprs.len(), 5, "{exprs:?}");
    let mut used: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    // The annotations point operators at metrics too.
    used.extend(
        rules
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .flat_map(metric_names),
    );
    used.extend(
        dashboard_exprs(&dashboard())
            .iter()
            .flat_map(|e| metric_names(e)),
    );
    for sure in [
        "mesh_connect_seconds_bucket",
        "mesh_task_healthy",
        "mesh_dns_queries_total",
        "mesh_gossip_member_status",
    ] {
        assert!(used.contains(sure), "the name parser found {used:?}");
    }
    let missing: Vec<&String> = used.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "queried by deploy/alerts.yml or deploy/grafana-dashboard.json, but not exported: {missing:?}\n{exposition}"
    );

    // The series the alerts compute on say what happened.
    assert!(
        exposition.contains(r#"mesh_dns_queries_total{qtype="A",rcode="SERVFAIL"} 1"#),
        "{exposition}"
    );
    assert_eq!(
        agent.metric("mesh_service_routable_tasks", &[("service", "web")]),
        1.0
    );
    assert_eq!(
        agent.metric("mesh_connections_total", &[("service", "web")]),
        2.0
    );
}

#[test]
fn the_tasks_of_a_host_that_goes_down_turn_unhealthy_in_another_hosts_metrics() {
    let key = keygen();
    let config = format!("[cluster]\nkeys = [\"{key}\"]\n");
    let a = Agent::start_named("a", Some(&config), &[]);
    let (_, nodes) = a.http("GET", "/v1/nodes", None);
    let seed = nodes[0]["address"].as_str().unwrap().to_string();
    let mut b = Agent::start_named("b", Some(&config), &["--join", &seed]);
    let backend = Backend::start("web.1");
    // Not published: two agents on one machine would both listen on the port.
    assert_ok(a.cli(&[
        "service",
        "create",
        "web",
        "-p",
        "80",
        "--health",
        "tcp",
        "--health-interval",
        "200ms",
    ]));
    eventually("b has the service", || {
        (b.http("GET", "/v1/services/web", None).0 == 200).then_some(())
    });
    assert_ok(b.cli(&[
        "task",
        "add",
        "web",
        &format!("127.0.0.1:{}", backend.port),
        "--id",
        "web.1",
    ]));
    let on_b = [("host", "b"), ("service", "web"), ("task", "web.1")];
    // a probes nothing of b's: its series is b's word, gossiped.
    eventually("a exports b's healthy task", || {
        (a.metric("mesh_task_healthy", &on_b) == 1.0
            && a.metric("mesh_service_routable_tasks", &[("service", "web")]) == 1.0)
            .then_some(())
    });
    let (_, metrics) = a.try_http("GET", "/metrics", None).unwrap();
    assert!(
        !metrics.contains(r#"mesh_health_transitions_total{service="web""#),
        "a probes b's task:\n{metrics}"
    );

    b.kill9();
    eventually(
        "a sees b down, with its task unhealthy and the service without a task",
        || {
            (a.metric(
                "mesh_gossip_member_status",
                &[("member", "b"), ("status", "down")],
            ) == 1.0
                && a.metric("mesh_task_healthy", &on_b) == 0.0
                && a.metric("mesh_service_routable_tasks", &[("service", "web")]) == 0.0)
                .then_some(())
        },
    );
    // The task is still there (suspended), so its series is too, at 0.
    let (_, metrics) = a.try_http("GET", "/metrics", None).unwrap();
    assert!(
        metrics.contains(r#"mesh_task_healthy{host="b",service="web",task="web.1"} 0"#),
        "{metrics}"
    );
}

#[test]
fn json_logs_carry_lists_as_json_arrays() {
    let seed = format!("127.0.0.1:{}", free_udp_port());
    let agent = Agent::start(
        None,
        &["--log-format", "json", "--insecure", "--join", &seed],
    );
    let log = agent.log();
    let started = log
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .find(|e| e["message"] == "gossip started")
        .unwrap_or_else(|| panic!("no gossip start line in\n{log}"));
    assert_eq!(started["seeds"], json!([seed]), "{started}");
    assert_eq!(started["encrypted"], false, "{started}");
    assert_eq!(started["level"], "INFO", "{started}");
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let test = "the_systemd_unit_passes_systemd_analyze_verify";
    let Some(analyze) = tool(test, "systemd-analyze", "MESH_REQUIRE_SYSTEMD") else {
        return;
    };
    // verify checks that ExecStart's binary exists and is executable: point it at the
    // one this build made, the unit otherwise as shipped.
    let unit = read("mesh.service");
    assert!(unit.contains("ExecStart=/usr/bin/mesh "), "{unit}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mesh.service");
    let bin = mesh_bin();
    std::fs::write(
        &file,
        unit.replace("/usr/bin/mesh ", &format!("{} ", bin.display())),
    )
    .unwrap();
    let (ok, text) = output(
        Command::new(&analyze)
            .args(["verify", "--man=no"])
            .arg(&file)
            .env("SYSTEMD_LOG_COLOR", "0"),
    );
    if !ok && (text.contains("System has not been booted") || text.contains("Failed to connect")) {
        if std::env::var("MESH_REQUIRE_SYSTEMD").is_ok_and(|v| v == "1") {
            panic!("{test}: systemd-analyze cannot run here: {text}");
        }
        eprintln!("SKIPPED {test}: systemd-analyze cannot run in this environment: {text}");
        return;
    }
    assert!(ok, "systemd-analyze verify mesh.service:\n{text}");
    for bad in [
        "Unknown key",
        "Unknown section",
        "ignoring",
        "is not executable",
    ] {
        assert!(
            !text.contains(bad),
            "systemd-analyze verify mesh.service: {text}"
        );
    }
}
