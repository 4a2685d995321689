//! The client-side commands: build API requests and print answers as tables or JSON.

use std::net::{IpAddr, SocketAddr};

use anyhow::{Result, bail};
use hyper::Method;
use mesh_api::{NewTask, NodeView, ServiceView, StatusView, TaskView};
use mesh_core::{HealthCheck, HealthKind, PortSpec, Protocol, ServiceSpec};
use serde_json::{Value, json};

use crate::cli::{
    CreateArgs, Format, ListArgs, ServiceCommand, ServiceSettings, TaskCommand, UpdateArgs,
};
use crate::client::Client;
use crate::listing::{self, Column, Row, col};

/// `[PUBLISHED:]TARGET[/udp|/tcp]`, or Docker's `published=…,target=…`, into a port.
pub fn parse_port(text: &str) -> Result<PortSpec> {
    PortSpec::parse_flag(text).map_err(|e| anyhow::anyhow!("-p {text:?}: {e}"))
}

fn duration(flag: &str, value: &str) -> Result<std::time::Duration> {
    mesh_core::duration::parse(value).map_err(|e| anyhow::anyhow!("{flag}: {e}"))
}

fn ports(texts: &[String]) -> Result<Vec<PortSpec>> {
    texts.iter().map(|p| parse_port(p)).collect()
}

/// The settings given as flags, as a JSON merge patch of a service: only the fields
/// given, each checked here so a typo is refused before anything is sent.
fn settings_patch(s: &ServiceSettings) -> Result<serde_json::Map<String, Value>> {
    let mut patch = serde_json::Map::new();
    for (key, value) in [
        ("mode", &s.mode),
        ("balance", &s.balance),
        ("proxy_protocol", &s.proxy_protocol),
        ("client_ip", &s.client_ip),
    ] {
        if let Some(v) = value {
            patch.insert(key.into(), json!(v));
        }
    }
    let mut health = serde_json::Map::new();
    if let Some(h) = &s.health {
        let h = HealthCheck::parse_short(h).map_err(|e| anyhow::anyhow!("--health {e}"))?;
        health.insert("check".into(), serde_json::to_value(h.check)?);
        health.insert("path".into(), json!(h.path));
    }
    if let Some(i) = &s.health_interval {
        duration("--health-interval", i)?;
        health.insert("interval".into(), json!(i));
    }
    if !health.is_empty() {
        patch.insert("health".into(), Value::Object(health));
    }
    if let Some(d) = &s.drain_timeout {
        duration("--drain-timeout", d)?;
        patch.insert("drain_timeout".into(), json!(d));
    }
    if let Some(d) = &s.idle_timeout {
        if !d.trim().eq_ignore_ascii_case("none") {
            duration("--idle-timeout", d)?;
        }
        patch.insert("idle_timeout".into(), json!(d.trim()));
    }
    if let Some(n) = s.max_connections {
        patch.insert("max_connections".into(), json!(n));
    }
    Ok(patch)
}

/// The service `mesh service create` asks for: the defaults, with the flags' settings
/// over them. The agent validates it.
pub fn service_body(args: &CreateArgs) -> Result<ServiceSpec> {
    let ports = ports(&args.ports)?;
    let udp_only = ports.iter().all(|p| p.protocol == Protocol::Udp);
    let mut spec = ServiceSpec::new(args.name.clone(), ports);
    if udp_only {
        // A UDP-only service has no TCP port to probe.
        spec.health.check = HealthKind::None;
    }
    let mut value = serde_json::to_value(&spec)?;
    mesh_api::merge_patch(&mut value, &Value::Object(settings_patch(&args.settings)?));
    Ok(serde_json::from_value(value)?)
}

/// The JSON merge patch `mesh service update` sends.
pub fn update_body(args: &UpdateArgs) -> Result<Value> {
    let mut patch = settings_patch(&args.settings)?;
    if !args.ports.is_empty() {
        patch.insert("ports".into(), serde_json::to_value(ports(&args.ports)?)?);
    }
    if patch.is_empty() {
        bail!("nothing to change: give at least one setting, such as --balance least-conn");
    }
    Ok(Value::Object(patch))
}

/// `IP`, `IP:PORT` or `[IPv6]:PORT`.
pub fn parse_task_address(text: &str) -> Result<(IpAddr, Option<u16>)> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok((ip, None));
    }
    match text.parse::<SocketAddr>() {
        Ok(a) if a.port() > 0 => Ok((a.ip(), Some(a.port()))),
        _ => bail!("{text:?} is not an address; use IP, IP:PORT or [IPv6]:PORT"),
    }
}

pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}   ", w = *w));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(headers.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

fn ports_column(v: &ServiceView) -> String {
    v.spec
        .ports
        .iter()
        .map(|p| match p.published {
            Some(n) => format!("*:{n}->{}/{}", p.target, p.protocol),
            None => format!("{}/{}", p.target, p.protocol),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn print_json(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(v).expect("json"));
}

pub async fn service(client: &Client, format: &Format, cmd: ServiceCommand) -> Result<()> {
    match cmd {
        ServiceCommand::Create(args) => {
            let v: ServiceView = client
                .call(Method::POST, "/v1/services", Some(&service_body(&args)?))
                .await?;
            // `-p 80` alone is a target port, as in a Swarm service without
            // `published=`: say so, since whoever wrote it may have meant 80:80.
            for p in v.spec.ports.iter().filter(|p| p.published.is_none()) {
                eprintln!(
                    "note: port {}/{} is not published: it is reached through the service's VIP and DNS; write -p {}:{} to publish it on every host",
                    p.target, p.protocol, p.target, p.target
                );
            }
            match format {
                Format::Json => print_json(&v),
                _ => println!("{}", v.spec.name),
            }
        }
        ServiceCommand::Update(args) => {
            let v: ServiceView = client
                .call(
                    Method::PATCH,
                    &format!("/v1/services/{}", args.name),
                    Some(&update_body(&args)?),
                )
                .await?;
            match format {
                Format::Json => print_json(&v),
                _ => println!("{}", v.spec.name),
            }
        }
        ServiceCommand::Ls(list) => {
            let views: Vec<ServiceView> = client.request(Method::GET, "/v1/services").await?;
            let rows = views
                .into_iter()
                .map(|v| {
                    let mut ports = ports_column(&v);
                    if !v.errors.is_empty() {
                        ports.push_str(&format!("  (error: {})", v.errors.join("; ")));
                    }
                    if !v.conflicts.is_empty() {
                        let conflicts: Vec<String> =
                            v.conflicts.iter().map(|c| c.to_string()).collect();
                        ports.push_str(&format!("  (conflict: {})", conflicts.join("; ")));
                    }
                    let cells = vec![
                        v.spec.name.clone(),
                        v.spec.mode.to_string(),
                        v.vips
                            .v4
                            .map(|ip| ip.to_string())
                            .or(v.vips.v6.map(|ip| ip.to_string()))
                            .unwrap_or_else(|| "-".into()),
                        v.spec.balance.to_string(),
                        if v.suspended > 0 {
                            format!("{}/{} +{} suspended", v.routable, v.tasks, v.suspended)
                        } else {
                            format!("{}/{}", v.routable, v.tasks)
                        },
                        ports,
                    ];
                    Row {
                        cells,
                        marked: false,
                        value: v,
                    }
                })
                .collect();
            listing::print(format, &list, &SERVICE_COLUMNS, rows)?;
        }
        ServiceCommand::Inspect { name } => {
            let v: Value = client
                .request(Method::GET, &format!("/v1/services/{name}"))
                .await?;
            print_json(&v);
        }
        ServiceCommand::Rm { name } => {
            let v: ServiceView = client
                .request(Method::DELETE, &format!("/v1/services/{name}"))
                .await?;
            match format {
                Format::Json => print_json(&v),
                _ => println!("{}", v.spec.name),
            }
        }
        ServiceCommand::Ps { name, list } => {
            let tasks: Vec<TaskView> = client
                .request(Method::GET, &format!("/v1/services/{name}/tasks"))
                .await?;
            let service: ServiceView = client
                .request(Method::GET, &format!("/v1/services/{name}"))
                .await?;
            let rows = tasks
                .into_iter()
                .map(|t| {
                    let addr = match (t.task.port, service.spec.ports.first()) {
                        (Some(p), _) => SocketAddr::new(t.task.ip, p).to_string(),
                        (None, Some(port)) if service.spec.ports.len() == 1 => {
                            SocketAddr::new(t.task.ip, port.target).to_string()
                        }
                        _ => t.task.ip.to_string(),
                    };
                    let cells = vec![
                        t.task.id.clone(),
                        addr,
                        t.task.node.clone(),
                        t.task.health.to_string(),
                        match &t.suspended {
                            Some(why) => format!("suspended ({why})"),
                            None => t.task.state.to_string(),
                        },
                        // A container task shows its container, and a health that
                        // is the engine's own check says so.
                        match &t.task.observed {
                            Some(o) if o.health.is_some() => {
                                format!("{} {} (health by docker)", t.task.source, o.container)
                            }
                            Some(o) => format!("{} {}", t.task.source, o.container),
                            None => t.task.source.to_string(),
                        },
                        t.active_connections.to_string(),
                    ];
                    Row {
                        cells,
                        marked: false,
                        value: t,
                    }
                })
                .collect();
            listing::print(format, &list, &TASK_COLUMNS, rows)?;
            // Conflicts this service lost (a task id another host holds, a port, a
            // VIP) follow its tasks, so they are seen where they bite.
            if *format == Format::Table && !list.quiet {
                for c in &service.conflicts {
                    println!("conflict: {c}");
                }
            }
        }
    }
    Ok(())
}

pub async fn task(client: &Client, format: &Format, cmd: TaskCommand) -> Result<()> {
    let (v, id): (Option<TaskView>, String) = match cmd {
        TaskCommand::Add {
            service,
            address,
            id,
        } => {
            let (ip, port) = parse_task_address(&address)?;
            let body = NewTask {
                id,
                ip,
                port,
                state: Default::default(),
            };
            let v: TaskView = client
                .call(
                    Method::POST,
                    &format!("/v1/services/{service}/tasks"),
                    Some(&body),
                )
                .await?;
            let id = v.task.id.clone();
            (Some(v), id)
        }
        TaskCommand::Rm { service, id } => {
            let _: Value = client
                .request(
                    Method::DELETE,
                    &format!("/v1/services/{service}/tasks/{id}"),
                )
                .await?;
            (None, id)
        }
        TaskCommand::Drain { service, id } => {
            let v: TaskView = client
                .request(
                    Method::POST,
                    &format!("/v1/services/{service}/tasks/{id}/drain"),
                )
                .await?;
            (Some(v), id)
        }
        TaskCommand::Undrain { service, id } => {
            let v: TaskView = client
                .request(
                    Method::POST,
                    &format!("/v1/services/{service}/tasks/{id}/undrain"),
                )
                .await?;
            (Some(v), id)
        }
    };
    match (format, v) {
        (Format::Json, Some(v)) => print_json(&v),
        (Format::Json, None) => print_json(&json!({"id": id, "removed": true})),
        (_, _) => println!("{id}"),
    }
    Ok(())
}

pub async fn status(client: &Client, format: &Format) -> Result<()> {
    let s: StatusView = client.request(Method::GET, "/v1/status").await?;
    if *format == Format::Json {
        print_json(&s);
        return Ok(());
    }
    println!("Node:        {}", s.node);
    let c = &s.cluster;
    let members: Vec<String> = c.members.iter().map(|(k, n)| format!("{n} {k}")).collect();
    let age = match (&c.gossip, c.anti_entropy_age_seconds) {
        (None, _) => "no gossip".to_string(),
        (Some(addr), Some(age)) => format!("gossip on {addr}, last anti-entropy {age}s ago"),
        (Some(addr), None) => format!("gossip on {addr}, no anti-entropy exchange yet"),
    };
    println!("Cluster:     {}; {age}", members.join(", "));
    for conflict in &c.conflicts {
        println!("Conflict:    {conflict}");
    }
    println!("Version:     {}", s.version);
    println!("Uptime:      {}s", s.uptime_seconds);
    println!("Services:    {}", s.services);
    println!("Tasks:       {} ({} routable)", s.tasks, s.routable_tasks);
    println!("API:         {}", s.api.join(", "));
    if let Some(m) = &s.metrics {
        println!("Metrics:     {m}");
    }
    println!("Data dir:    {}", s.data_dir);
    if !s.dns.is_empty() {
        println!("DNS:         {}", s.dns.join(", "));
    }
    println!("VIPs:        {}", s.vips);
    for p in &s.planes {
        let state = if p.active { "active" } else { "off" };
        println!(
            "Plane:       {} ({state}, {} frontends): {}",
            p.name, p.frontends, p.detail
        );
    }
    for f in &s.fallbacks {
        println!("Fallback:    {f}");
    }
    for (service, errors) in &s.errors {
        for e in errors {
            println!("Error:       service {service}: {e}");
        }
    }
    if let Some(d) = &s.docker {
        print_docker(d);
    }
    Ok(())
}

fn print_docker(d: &mesh_api::DockerView) {
    let e = &d.engine;
    let state = if e.connected {
        format!(
            "connected (API {})",
            e.api_version.as_deref().unwrap_or("?")
        )
    } else {
        "disconnected, retrying".to_string()
    };
    println!(
        "Docker:      {} {state}: {} containers, {} tasks, {} events, {} reconnects",
        e.endpoint, e.containers, d.tasks, e.events, e.reconnects
    );
    if let Some(err) = &e.last_error {
        println!("Docker:      last error: {err}");
    }
    for skip in &d.skipped {
        println!("Skipped:     {skip}");
    }
    for (service, lines) in &d.differences {
        for line in lines {
            println!("Labels:      service {service}: {line}");
        }
    }
}

pub async fn nodes(client: &Client, format: &Format, list: &ListArgs) -> Result<()> {
    let nodes: Vec<NodeView> = client.request(Method::GET, "/v1/nodes").await?;
    let rows = nodes
        .into_iter()
        .map(|n| {
            let cells = vec![
                n.name.clone(),
                n.address.clone(),
                n.status.to_string(),
                n.version.clone().unwrap_or_else(|| "-".into()),
                n.tasks.to_string(),
                n.started.clone(),
            ];
            Row {
                cells,
                marked: n.local,
                value: n,
            }
        })
        .collect();
    listing::print(format, list, &NODE_COLUMNS, rows)
}

const SERVICE_COLUMNS: [Column; 6] = [
    col("NAME", "name"),
    col("MODE", "mode"),
    col("VIP", "vip"),
    col("BALANCE", "balance"),
    col("TASKS", "tasks"),
    col("PORTS", "ports"),
];

const TASK_COLUMNS: [Column; 7] = [
    col("ID", "id"),
    col("ADDRESS", "address"),
    col("HOST", "host"),
    col("HEALTH", "health"),
    col("STATE", "state"),
    col("SOURCE", "source"),
    // Open connections through this host's planes only: another host's are its own.
    col("CONNECTIONS HERE", "connections"),
];

const NODE_COLUMNS: [Column; 6] = [
    col("NAME", "name"),
    col("ADDRESS", "address"),
    col("STATUS", "status"),
    // Mixed during an upgrade; `-` until the host's version has reached this one.
    col("VERSION", "version"),
    col("TASKS", "tasks"),
    col("STARTED", "started"),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_parse() {
        assert_eq!(
            parse_port("8080:80").unwrap(),
            PortSpec::tcp(Some(8080), 80)
        );
        assert_eq!(
            parse_port("53/udp").unwrap(),
            PortSpec {
                protocol: Protocol::Udp,
                ..PortSpec::tcp(None, 53)
            }
        );
        assert!(
            parse_port("80/sctp")
                .unwrap_err()
                .to_string()
                .contains("sctp")
        );
        assert!(
            parse_port("x:80")
                .unwrap_err()
                .to_string()
                .contains("published")
        );
        assert!(parse_port("0").is_err());
    }

    #[test]
    fn task_addresses_parse() {
        assert_eq!(
            parse_task_address("10.0.0.1").unwrap(),
            ("10.0.0.1".parse().unwrap(), None)
        );
        assert_eq!(
            parse_task_address("[::1]:8080").unwrap(),
            ("::1".parse().unwrap(), Some(8080))
        );
        assert!(parse_task_address("nope").is_err());
    }

    #[test]
    fn tables_align() {
        let t = table(&["A", "BB"], &[vec!["xxx".into(), "y".into()]]);
        assert_eq!(t, "A     BB\nxxx   y\n");
    }
}
