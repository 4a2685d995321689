//! `mesh demo`: one agent, three HTTP backends that answer with their task name, and
//! a published port — the hostname demo from Swarm's docs, on one host.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use mesh_core::{HealthCheck, HealthKind, PortSpec, Protocol, ServiceSpec, TaskSpec, TaskState};
use mesh_dns::DnsConfig;
use mesh_proxy::ProxyConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use std::net::SocketAddr;

use crate::config::{ClusterConfig, VipConfig};
use crate::daemon::{self, AgentError, Settings};

/// A backend on `ip` (a loopback address of its own, so `tasks.web` lists three).
async fn backend(name: String, ip: std::net::IpAddr) -> Result<(u16, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind((ip, 0))
        .await
        .with_context(|| format!("cannot listen on {ip} for the demo backend {name}"))?;
    let port = listener.local_addr()?.port();
    let handle = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        while let Ok((mut s, _)) = listener.accept().await {
            let body = format!("{name}\n");
            conns.spawn(async move {
                // Read the request head (bounded), then answer and close.
                let mut buf = [0u8; 4096];
                let mut n = 0;
                while n < buf.len() {
                    match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf[n..])).await {
                        Ok(Ok(k)) if k > 0 => n += k,
                        _ => break,
                    }
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
            while conns.try_join_next().is_some() {}
        }
    });
    Ok((port, handle))
}

pub async fn run(port: u16, dns_port: u16, api: Option<String>) -> Result<()> {
    if let Err(e) = mesh_proxy::check_port_free(None, port, Protocol::Tcp) {
        bail!(
            "port {port} is not free ({e}); try `mesh demo --port {}`",
            port.wrapping_add(1).max(1024)
        );
    }
    let dir = tempfile::Builder::new()
        .prefix("mesh-demo-")
        .tempdir()
        .context("cannot create a temporary directory")?;
    let socket = match api
        .as_deref()
        .map(crate::client::Endpoint::parse)
        .transpose()?
    {
        Some(crate::client::Endpoint::Unix(p)) => p,
        Some(other) => bail!("mesh demo serves its API on a unix socket; --api {other} is not one"),
        None => dir.path().join("mesh.sock"),
    };
    let mut backends = Vec::new();
    let mut tasks = Vec::new();
    for i in 1..=3u8 {
        let name = format!("web.{i}");
        // Linux answers on all of 127.0.0.0/8 without configuring anything.
        let ip = std::net::IpAddr::from([127, 0, 0, i]);
        let (backend_port, handle) = backend(name.clone(), ip).await?;
        backends.push(handle);
        tasks.push(TaskSpec {
            service: "web".into(),
            id: Some(name),
            ip,
            port: Some(backend_port),
            state: TaskState::Active,
            observed: None,
        });
    }
    let mut web = ServiceSpec::new("web", vec![PortSpec::tcp(Some(port), 80)]);
    web.health = HealthCheck {
        check: HealthKind::Http,
        path: "/".into(),
        interval: Duration::from_secs(1),
        ..HealthCheck::default()
    };
    web.drain_timeout = Duration::from_secs(5);
    let settings = Settings {
        node_name: "demo".into(),
        data_dir: dir.path().join("data"),
        socket: socket.clone(),
        tcp_api: None,
        token: None,
        metrics: None,
        proxy: ProxyConfig {
            shutdown_grace: Duration::from_secs(2),
            ..ProxyConfig::default()
        },
        dns: DnsConfig {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], dns_port))],
            ..DnsConfig::default()
        },
        vip: VipConfig::default(),
        // A one-host cluster on loopback, beside any real agent on :7946.
        cluster: ClusterConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            ..ClusterConfig::default()
        },
        services: vec![web],
        tasks,
        docker: None,
        ebpf: mesh_ebpf::EbpfConfig::default(),
    };
    let signals = daemon::Termination::catch().context("cannot catch SIGTERM and SIGINT")?;
    let agent = match daemon::start(settings).await {
        Ok(agent) => agent,
        Err(e @ AgentError::Dns { .. }) => {
            // The cause first, then what to do about it.
            bail!(
                "{}; try `mesh demo --dns-port {}`",
                crate::error_chain(&e),
                dns_port.wrapping_add(1).max(1024)
            );
        }
        Err(e) => return Err(e.into()),
    };
    let mut snapshots = agent.table.subscribe();
    let ready = async {
        loop {
            let routable = snapshots
                .borrow_and_update()
                .services
                .get("web")
                .map(|w| w.tasks.iter().filter(|t| t.routable()).count());
            if routable == Some(3) {
                return;
            }
            if snapshots.changed().await.is_err() {
                return;
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(30), ready)
        .await
        .is_err()
    {
        tracing::warn!("the demo backends did not all pass their health check within 30s");
    }
    let api = format!("unix:{}", socket.display());
    let sock = socket.display();
    let vip = agent
        .table
        .snapshot()
        .services
        .get("web")
        .and_then(|w| w.vips.v4)
        .map(|v| v.to_string())
        .unwrap_or_default();
    let vip_line = if mesh_dataplane::has_net_admin() {
        format!("curl -s {vip}                    # the service VIP, balanced the same way")
    } else {
        format!("# {vip} is the VIP; run the demo as root to reach it on this host")
    };
    println!(
        "\nmesh demo is running: service \"web\" on port {port}, balanced round-robin over 3 tasks.\n\n\
         Try:\n  \
         for i in 1 2 3 4 5 6; do curl -s localhost:{port}; done     # web.1, web.2, web.3, web.1, ...\n  \
         dig @127.0.0.1 -p {dns_port} web.mesh                 # the service VIP\n  \
         dig @127.0.0.1 -p {dns_port} tasks.web.mesh           # the task IPs\n  \
         dig @127.0.0.1 -p {dns_port} SRV _tcp80._tcp.web.mesh\n  \
         dig @127.0.0.1 -p {dns_port} -x {vip}\n  \
         {vip_line}\n  \
         MESH_API={api} mesh service ls\n  \
         MESH_API={api} mesh service ps web\n  \
         MESH_API={api} mesh task drain web web.2                  # web.2 gets no new connections\n  \
         MESH_API={api} mesh status\n  \
         MESH_API={api} mesh node ls\n  \
         curl -s --unix-socket {sock} http://mesh/v1/services/web    # the HTTP API\n  \
         curl -s --unix-socket {sock} http://mesh/metrics | grep mesh_connections_total\n\n\
         (from a checkout, `mesh` is `cargo run --release --`). Ctrl-C stops everything.\n"
    );
    signals.wait().await;
    agent.shutdown().await;
    for b in backends {
        b.abort();
    }
    drop(dir);
    Ok(())
}
