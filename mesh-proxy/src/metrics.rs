//! Prometheus metrics of the data plane. Per-task handles are resolved once per task
//! (see [`TaskMetrics`]) so the per-connection path does no label hashing.

use mesh_core::{FrontendKey, Listen, Protocol};
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

#[derive(Clone)]
pub struct ProxyMetrics {
    connections: IntCounterVec,
    active: IntGaugeVec,
    bytes_in: IntCounterVec,
    bytes_out: IntCounterVec,
    connect_failures: IntCounterVec,
    retries: IntCounterVec,
    accepts: IntCounterVec,
    refused: IntCounterVec,
    udp_flows: IntGaugeVec,
    connect_seconds: HistogramVec,
    udp_evicted: IntCounterVec,
    drain_closed: IntCounterVec,
}

/// Counters of one task, shared by all its connections.
#[derive(Clone)]
pub struct TaskMetrics {
    pub connections: IntCounter,
    pub active: IntGauge,
    pub bytes_in: IntCounter,
    pub bytes_out: IntCounter,
    pub connect_failures: IntCounter,
}

/// Counters of one listener (one published port).
#[derive(Clone)]
pub struct ListenerMetrics {
    pub accepts: IntCounter,
    pub refused_no_task: IntCounter,
    pub refused_limit: IntCounter,
    /// Refused because this host ran out of descriptors or buffers.
    pub refused_local: IntCounter,
    pub retries: IntCounter,
    pub udp_flows: IntGauge,
    /// Flows dropped to make room under `udp_max_flows`.
    pub udp_evicted: IntCounter,
    pub drain_closed: IntCounter,
    /// How long successful upstream connects took (TCP).
    pub connect_seconds: Histogram,
}

const TASK: &[&str] = &["service", "task"];
/// A frontend: `frontend` is `published` or the VIP, `port` its port number.
const PORT: &[&str] = &["service", "frontend", "port", "protocol"];

impl ProxyMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        fn counter(
            r: &Registry,
            name: &str,
            help: &str,
            labels: &[&str],
        ) -> prometheus::Result<IntCounterVec> {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            r.register(Box::new(c.clone()))?;
            Ok(c)
        }
        fn gauge(
            r: &Registry,
            name: &str,
            help: &str,
            labels: &[&str],
        ) -> prometheus::Result<IntGaugeVec> {
            let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
            r.register(Box::new(g.clone()))?;
            Ok(g)
        }
        Ok(Self {
            connections: counter(
                registry,
                "mesh_connections_total",
                "Connections and UDP flows proxied to a task",
                TASK,
            )?,
            active: gauge(
                registry,
                "mesh_connections_active",
                "Open proxied connections and UDP flows per task",
                TASK,
            )?,
            bytes_in: counter(
                registry,
                "mesh_bytes_in_total",
                "Bytes from clients to a task",
                TASK,
            )?,
            bytes_out: counter(
                registry,
                "mesh_bytes_out_total",
                "Bytes from a task to clients",
                TASK,
            )?,
            connect_failures: counter(
                registry,
                "mesh_connect_failures_total",
                "Failed connects to a task (each one is retried on another task)",
                TASK,
            )?,
            retries: counter(
                registry,
                "mesh_connect_retries_total",
                "Connects retried on another task after a failure",
                PORT,
            )?,
            accepts: counter(
                registry,
                "mesh_listener_accepts_total",
                "Connections accepted (TCP) or flows started (UDP) on a published port",
                PORT,
            )?,
            refused: counter(
                registry,
                "mesh_listener_refused_total",
                "Connections refused on a published port, by reason",
                &["service", "frontend", "port", "protocol", "reason"],
            )?,
            udp_flows: gauge(
                registry,
                "mesh_udp_flows_active",
                "Active UDP flows on a published port",
                PORT,
            )?,
            udp_evicted: counter(
                registry,
                "mesh_udp_flows_evicted_total",
                "UDP flows dropped, the longest idle first, to stay within proxy.udp_max_flows",
                PORT,
            )?,
            drain_closed: counter(
                registry,
                "mesh_drain_closed_total",
                "Connections closed because a drain_timeout expired",
                PORT,
            )?,
            connect_seconds: {
                let h = HistogramVec::new(
                    HistogramOpts::new(
                        "mesh_connect_seconds",
                        "How long the connects to tasks that succeeded took (TCP)",
                    )
                    .buckets(vec![
                        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                        0.25, 0.5, 1.0, 2.0,
                    ]),
                    PORT,
                )?;
                registry.register(Box::new(h.clone()))?;
                h
            },
        })
    }

    /// `mesh_connections_total{service, task}`, for a kernel plane that counts its
    /// own connections.
    pub fn connections(&self) -> IntCounterVec {
        self.connections.clone()
    }

    pub fn task(&self, service: &str, task: &str) -> TaskMetrics {
        let l = &[service, task];
        TaskMetrics {
            connections: self.connections.with_label_values(l),
            active: self.active.with_label_values(l),
            bytes_in: self.bytes_in.with_label_values(l),
            bytes_out: self.bytes_out.with_label_values(l),
            connect_failures: self.connect_failures.with_label_values(l),
        }
    }

    /// Drops a removed task's series so that churn does not grow the exposition forever.
    pub fn forget_task(&self, service: &str, task: &str) {
        let l = &[service, task];
        let _ = self.connections.remove_label_values(l);
        let _ = self.active.remove_label_values(l);
        let _ = self.bytes_in.remove_label_values(l);
        let _ = self.bytes_out.remove_label_values(l);
        let _ = self.connect_failures.remove_label_values(l);
    }

    /// The labels of a frontend: service, `published` or the VIP, port, protocol.
    fn frontend_labels(service: &str, key: &FrontendKey) -> [String; 4] {
        let frontend = match key.listen {
            Listen::Published => "published".to_string(),
            Listen::Vip(ip) => ip.to_string(),
        };
        [
            service.to_string(),
            frontend,
            key.port.to_string(),
            key.protocol.to_string(),
        ]
    }

    pub fn listener(&self, service: &str, key: &FrontendKey) -> ListenerMetrics {
        let owned = Self::frontend_labels(service, key);
        let l: [&str; 4] = [&owned[0], &owned[1], &owned[2], &owned[3]];
        let refused = |reason: &str| {
            self.refused
                .with_label_values(&[l[0], l[1], l[2], l[3], reason])
        };
        // UDP series exist only for UDP frontends; a TCP listener gets gauges that
        // are not exported.
        let udp = key.protocol == Protocol::Udp;
        ListenerMetrics {
            accepts: self.accepts.with_label_values(&l),
            refused_no_task: refused("no_healthy_task"),
            refused_limit: refused("max_connections"),
            refused_local: refused("local_resources"),
            retries: self.retries.with_label_values(&l),
            udp_flows: if udp {
                self.udp_flows.with_label_values(&l)
            } else {
                IntGauge::new("unexported", "-").expect("a valid name")
            },
            udp_evicted: if udp {
                self.udp_evicted.with_label_values(&l)
            } else {
                IntCounter::new("unexported", "-").expect("a valid name")
            },
            drain_closed: self.drain_closed.with_label_values(&l),
            connect_seconds: if udp {
                Histogram::with_opts(HistogramOpts::new("unexported", "-")).expect("a valid name")
            } else {
                self.connect_seconds.with_label_values(&l)
            },
        }
    }

    pub fn forget_listener(&self, service: &str, key: &FrontendKey) {
        let owned = Self::frontend_labels(service, key);
        let l: [&str; 4] = [&owned[0], &owned[1], &owned[2], &owned[3]];
        let _ = self.accepts.remove_label_values(&l);
        let _ = self.retries.remove_label_values(&l);
        let _ = self.udp_flows.remove_label_values(&l);
        let _ = self.udp_evicted.remove_label_values(&l);
        let _ = self.drain_closed.remove_label_values(&l);
        let _ = self.connect_seconds.remove_label_values(&l);
        for reason in ["no_healthy_task", "max_connections", "local_resources"] {
            let _ = self
                .refused
                .remove_label_values(&[l[0], l[1], l[2], l[3], reason]);
        }
    }

    /// Active connections of a task, for `mesh service ps`.
    pub fn active_connections(&self, service: &str, task: &str) -> i64 {
        self.active
            .get_metric_with_label_values(&[service, task])
            .map(|g| g.get())
            .unwrap_or(0)
    }
}
