//! Real backends and snapshot builders for data-plane tests.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mesh_core::plan::Host;
use mesh_core::{
    Health, PortSpec, Protocol, Replica, ReplicaConfig, ServiceSpec, Snapshot, TaskSpec, TaskState,
    VipPool,
};
use mesh_dataplane::{Driver, DriverHandle};
use mesh_proxy::{ProxyConfig, ProxyMetrics, ProxyPlane};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Raises the soft open-file limit to the hard one: a thousand proxied connections need
/// four sockets and four pipe ends each.
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
}

/// A port free a moment ago for TCP and UDP on every address, outside the ephemeral
/// range (see `integration::ports`).
pub fn free_port(_proto: Protocol) -> u16 {
    integration::ports::free_port()
}

/// A TCP backend. Dropping it stops the accept loop and closes the listener.
pub struct Backend {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    /// Writes `name` to every connection, then reads until the client closes.
    pub async fn named(name: &str) -> Backend {
        let name = name.to_string();
        Self::spawn(move |mut s| {
            let name = name.clone();
            async move {
                let _ = s.write_all(name.as_bytes()).await;
                let _ = s.shutdown().await;
                let mut sink = [0u8; 1024];
                while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
            }
        })
        .await
    }

    /// Echoes everything and half-closes after the client does.
    pub async fn echo() -> Backend {
        Self::spawn(|mut s| async move {
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        })
        .await
    }

    pub async fn spawn<F, Fut>(handler: F) -> Backend
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        // A backlog as large as the proxy's, so a burst of proxied connects is not
        // dropped by the test backend itself.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(4096).unwrap();
        let addr = listener.local_addr().unwrap();
        let handler = Arc::new(handler);
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    return;
                };
                conns.spawn(handler(s));
            }
        });
        Backend { addr, task }
    }
}

/// A UDP backend that answers each datagram with `<name>:<datagram>`.
pub struct UdpBackend {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for UdpBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl UdpBackend {
    pub async fn named(name: &str) -> UdpBackend {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let name = name.to_string();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                    return;
                };
                let mut reply = format!("{name}:").into_bytes();
                reply.extend_from_slice(&buf[..n]);
                let _ = socket.send_to(&reply, from).await;
            }
        });
        UdpBackend { addr, task }
    }
}

/// The desired state, built through the real `State` so tests use the same paths as
/// the agent. Every task is marked healthy, as a passing probe would.
pub struct Desired {
    pub state: Replica,
}

impl Desired {
    pub fn new() -> Self {
        Self {
            state: Replica::new("test", 1, VipPool::default(), ReplicaConfig::default()),
        }
    }

    pub fn service(&mut self, spec: ServiceSpec) -> &mut Self {
        self.state.put_service(spec, 0).unwrap();
        self
    }

    pub fn task(&mut self, service: &str, id: &str, addr: SocketAddr) -> &mut Self {
        self.state
            .add_task(
                TaskSpec {
                    service: service.into(),
                    id: Some(id.into()),
                    ip: addr.ip(),
                    port: Some(addr.port()),
                    state: TaskState::Active,
                    observed: None,
                },
                mesh_core::TaskSource::Api,
                0,
            )
            .unwrap();
        self.state.set_health(service, id, Health::Healthy, 0);
        self
    }

    pub fn snapshot(&self) -> Snapshot {
        self.state.snapshot()
    }
}

pub fn tcp_service(name: &str, published: u16) -> ServiceSpec {
    ServiceSpec::new(name, vec![PortSpec::tcp(Some(published), 1)])
}

pub fn udp_service(name: &str, published: u16) -> ServiceSpec {
    ServiceSpec::new(
        name,
        vec![PortSpec {
            protocol: Protocol::Udp,
            ..PortSpec::tcp(Some(published), 1)
        }],
    )
}

/// The userspace plane under the real driver, fed snapshots by the test.
pub struct TestPlane {
    snapshots: watch::Sender<Arc<Snapshot>>,
    handle: DriverHandle,
    stop: CancellationToken,
}

impl TestPlane {
    /// Hands the driver `snapshot` and waits until the plane has applied it.
    pub async fn apply(&mut self, snapshot: &Snapshot) {
        let version = snapshot.version;
        self.snapshots.send_replace(Arc::new(snapshot.clone()));
        let mut status = self.handle.client.status.clone();
        tokio::time::timeout(
            Duration::from_secs(60),
            status.wait_for(|s| s.applied >= version),
        )
        .await
        .expect("the plane applied the snapshot in time")
        .expect("the driver runs");
    }

    /// Frontends the plane could not serve, by service: "8080/tcp: Address in use".
    pub fn errors(&self) -> std::collections::BTreeMap<String, Vec<String>> {
        let mut out = std::collections::BTreeMap::<String, Vec<String>>::new();
        for e in self.handle.client.status.borrow().errors() {
            out.entry(e.service.clone().unwrap_or_default())
                .or_default()
                .push(e.to_string());
        }
        out
    }
}

impl Drop for TestPlane {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub fn plane() -> (TestPlane, ProxyMetrics, prometheus::Registry) {
    plane_with(ProxyConfig {
        connect_timeout: Duration::from_secs(5),
        ..ProxyConfig::default()
    })
}

/// The userspace plane with `config`, under the real driver.
pub fn plane_with(config: ProxyConfig) -> (TestPlane, ProxyMetrics, prometheus::Registry) {
    let registry = prometheus::Registry::new();
    let metrics = ProxyMetrics::new(&registry).unwrap();
    let plane = ProxyPlane::new(config, metrics.clone());
    let (snapshots, rx) = watch::channel(Arc::new(Snapshot::default()));
    let stop = CancellationToken::new();
    let handle = Driver::new(Host::default()).plane(Box::new(plane)).spawn(
        rx,
        stop.clone(),
        Duration::from_secs(1),
    );
    (
        TestPlane {
            snapshots,
            handle,
            stop,
        },
        metrics,
        registry,
    )
}

pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Connects and reads everything until EOF.
pub async fn fetch(port: u16) -> std::io::Result<String> {
    let mut s = TcpStream::connect(local(port)).await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

/// Polls `cond` until it holds, failing the test after a generous deadline.
pub async fn eventually<F: FnMut() -> bool>(what: &str, mut cond: F) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads from `s` until EOF, with a generous deadline so a hang fails the test. A
/// reset fails the test too: a clean close is expected.
pub async fn read_until_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut out)).await;
    let r = r.expect("connection did not close");
    r.unwrap_or_else(|e| panic!("connection failed after {} bytes: {e}", out.len()));
    out
}

/// A new connection to `port` is refused promptly: reset during or right after the
/// handshake, never left hanging.
pub async fn assert_refused(port: u16) {
    let Ok(mut s) = TcpStream::connect(local(port)).await else {
        return;
    };
    let _ = s.write_all(b"x").await;
    let mut b = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_secs(60), s.read(&mut b))
        .await
        .expect("refused, not hung");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
}

pub fn metric(registry: &prometheus::Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
    for family in registry.gather() {
        if family.get_name() != name {
            continue;
        }
        for m in family.get_metric() {
            if labels.iter().all(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.get_name() == *k && l.get_value() == *v)
            }) {
                return if family.get_field_type() == prometheus::proto::MetricType::COUNTER {
                    m.get_counter().get_value()
                } else {
                    m.get_gauge().get_value()
                };
            }
        }
    }
    0.0
}
