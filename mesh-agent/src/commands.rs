//! The client-side commands: build API requests and print answers as tables or JSON.

use std::net::{IpAddr, SocketAddr};

use anyhow::{Result, bail};
use hyper::Method;
use serde_json::{Value, json};

use crate::cli::{CreateArgs, Format, ServiceCommand, TaskCommand};
use crate::client::Client;
use crate::views::{ServiceView, StatusView, TaskView};

/// `[PUBLISHED:]TARGET[/udp|/tcp]` into a port object.
pub fn parse_port(text: &str) -> Result<Value> {
    let (ports, proto) = match text.rsplit_once('/') {
        Some((p, proto @ ("tcp" | "udp"))) => (p, proto),
        Some((_, other)) => bail!("-p {text:?}: unknown protocol {other:?}; use tcp or udp"),
        None => (text, "tcp"),
    };
    let num = |s: &str, what: &str| -> Result<u16> {
        match s.parse::<u16>() {
            Ok(n) if n > 0 => Ok(n),
            _ => bail!("-p {text:?}: {what} port {s:?} must be a number from 1 to 65535"),
        }
    };
    Ok(match ports.split_once(':') {
        Some((published, target)) => {
            json!({"published": num(published, "published")?, "target": num(target, "target")?, "protocol": proto})
        }
        None => json!({"target": num(ports, "target")?, "protocol": proto}),
    })
}

fn health(args: &CreateArgs, udp_only: bool) -> Result<Value> {
    let mut h = match args.health.as_deref() {
        None if udp_only => json!({"check": "none"}),
        None | Some("tcp") => json!({"check": "tcp"}),
        Some("none") => json!({"check": "none"}),
        Some(s) if s.starts_with("http:") => json!({"check": "http", "path": &s[5..]}),
        Some("http") => json!({"check": "http", "path": "/"}),
        Some(other) => bail!("--health {other:?}: use tcp, http:/PATH or none"),
    };
    if let Some(i) = &args.health_interval {
        h["interval"] = json!(i);
    }
    Ok(h)
}

pub fn service_body(args: &CreateArgs) -> Result<Value> {
    let ports = args
        .ports
        .iter()
        .map(|p| parse_port(p))
        .collect::<Result<Vec<_>>>()?;
    let udp_only = ports.iter().all(|p| p["protocol"] == "udp");
    let mut body = json!({
        "name": args.name,
        "ports": ports,
        "mode": args.mode,
        "balance": args.balance,
        "health": health(args, udp_only)?,
        "proxy_protocol": args.proxy_protocol,
    });
    if let Some(d) = &args.drain_timeout {
        body["drain_timeout"] = json!(d);
    }
    if let Some(d) = &args.idle_timeout {
        body["idle_timeout"] = json!(d);
    }
    if let Some(m) = args.max_connections {
        body["max_connections"] = json!(m);
    }
    Ok(body)
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

pub async fn service(client: &Client, format: Format, cmd: ServiceCommand) -> Result<()> {
    match cmd {
        ServiceCommand::Create(args) => {
            let v: ServiceView = client
                .call(Method::POST, "/v1/services", Some(service_body(&args)?))
                .await?;
            match format {
                Format::Json => print_json(&v),
                Format::Table => println!("{}", v.spec.name),
            }
        }
        ServiceCommand::Ls => {
            let list: Vec<ServiceView> = client.call(Method::GET, "/v1/services", None).await?;
            if format == Format::Json {
                print_json(&list);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|v| {
                    let mut ports = ports_column(v);
                    if !v.errors.is_empty() {
                        ports.push_str(&format!("  (error: {})", v.errors.join("; ")));
                    }
                    if !v.conflicts.is_empty() {
                        ports.push_str(&format!("  (conflict: {})", v.conflicts.join("; ")));
                    }
                    vec![
                        v.spec.name.clone(),
                        format!("{:?}", v.spec.mode).to_lowercase(),
                        v.vips
                            .v4
                            .map(|ip| ip.to_string())
                            .or(v.vips.v6.map(|ip| ip.to_string()))
                            .unwrap_or_else(|| "-".into()),
                        v.spec.balance.to_string(),
                        format!("{}/{}", v.routable, v.tasks),
                        ports,
                    ]
                })
                .collect();
            print!(
                "{}",
                table(&["NAME", "MODE", "VIP", "BALANCE", "TASKS", "PORTS"], &rows)
            );
        }
        ServiceCommand::Inspect { name } => {
            let v: Value = client
                .call(Method::GET, &format!("/v1/services/{name}"), None)
                .await?;
            print_json(&v);
        }
        ServiceCommand::Rm { name } => {
            let v: ServiceView = client
                .call(Method::DELETE, &format!("/v1/services/{name}"), None)
                .await?;
            match format {
                Format::Json => print_json(&v),
                Format::Table => println!("{}", v.spec.name),
            }
        }
        ServiceCommand::Ps { name } => {
            let list: Vec<TaskView> = client
                .call(Method::GET, &format!("/v1/services/{name}/tasks"), None)
                .await?;
            if format == Format::Json {
                print_json(&list);
                return Ok(());
            }
            let service: ServiceView = client
                .call(Method::GET, &format!("/v1/services/{name}"), None)
                .await?;
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|t| {
                    let addr = match (t.task.port, service.spec.ports.first()) {
                        (Some(p), _) => SocketAddr::new(t.task.ip, p).to_string(),
                        (None, Some(port)) if service.spec.ports.len() == 1 => {
                            SocketAddr::new(t.task.ip, port.target).to_string()
                        }
                        _ => t.task.ip.to_string(),
                    };
                    vec![
                        t.task.id.clone(),
                        addr,
                        t.task.node.clone(),
                        t.task.health.to_string(),
                        t.task.state.to_string(),
                        t.active_connections.to_string(),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &["ID", "ADDRESS", "HOST", "HEALTH", "STATE", "CONNECTIONS"],
                    &rows
                )
            );
        }
    }
    Ok(())
}

pub async fn task(client: &Client, format: Format, cmd: TaskCommand) -> Result<()> {
    let (v, id): (Option<TaskView>, String) = match cmd {
        TaskCommand::Add {
            service,
            address,
            id,
        } => {
            let (ip, port) = parse_task_address(&address)?;
            let mut body = json!({"ip": ip});
            if let Some(p) = port {
                body["port"] = json!(p);
            }
            if let Some(id) = id {
                body["id"] = json!(id);
            }
            let v: TaskView = client
                .call(
                    Method::POST,
                    &format!("/v1/services/{service}/tasks"),
                    Some(body),
                )
                .await?;
            let id = v.task.id.clone();
            (Some(v), id)
        }
        TaskCommand::Rm { service, id } => {
            let _: Value = client
                .call(
                    Method::DELETE,
                    &format!("/v1/services/{service}/tasks/{id}"),
                    None,
                )
                .await?;
            (None, id)
        }
        TaskCommand::Drain { service, id } => {
            let v: TaskView = client
                .call(
                    Method::POST,
                    &format!("/v1/services/{service}/tasks/{id}/drain"),
                    None,
                )
                .await?;
            (Some(v), id)
        }
    };
    match (format, v) {
        (Format::Json, Some(v)) => print_json(&v),
        (Format::Json, None) => print_json(&json!({"id": id, "removed": true})),
        (Format::Table, _) => println!("{id}"),
    }
    Ok(())
}

pub async fn status(client: &Client, format: Format) -> Result<()> {
    let s: StatusView = client.call(Method::GET, "/v1/status", None).await?;
    if format == Format::Json {
        print_json(&s);
        return Ok(());
    }
    println!("Node:        {}", s.node);
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
    for (service, errors) in &s.errors {
        for e in errors {
            println!("Error:       service {service}: {e}");
        }
    }
    Ok(())
}

pub async fn nodes(client: &Client, format: Format) -> Result<()> {
    let list: Vec<crate::views::NodeView> = client.call(Method::GET, "/v1/nodes", None).await?;
    if format == Format::Json {
        print_json(&list);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|n| {
            vec![
                n.name.clone(),
                n.address.clone(),
                n.status.clone(),
                n.tasks.to_string(),
                n.generation.to_string(),
            ]
        })
        .collect();
    print!(
        "{}",
        table(&["NAME", "ADDRESS", "STATUS", "TASKS", "GENERATION"], &rows)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_parse() {
        assert_eq!(
            parse_port("8080:80").unwrap(),
            json!({"published": 8080, "target": 80, "protocol": "tcp"})
        );
        assert_eq!(
            parse_port("53/udp").unwrap(),
            json!({"target": 53, "protocol": "udp"})
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
