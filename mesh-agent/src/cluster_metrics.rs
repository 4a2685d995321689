//! The cluster as this host sees it, as Prometheus series: every task's health and
//! drain state with the host that owns it, each service's routable tasks, and each
//! member's state. They are read from the table's snapshot and the membership at
//! scrape time, so the series set is always exactly the cluster's: a removed task or
//! a purged host has no series left to forget.

use std::sync::{Arc, Mutex, PoisonError};

use mesh_core::{Health, Snapshot, TaskEntry, TaskState};
use mesh_gossip::transport::MemberView;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntGaugeVec, Opts};
use tokio::sync::watch;

pub struct ClusterMetrics {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    members: watch::Receiver<Vec<MemberView>>,
    task_healthy: IntGaugeVec,
    task_draining: IntGaugeVec,
    routable: IntGaugeVec,
    member_status: IntGaugeVec,
    /// The gauges are refilled for each scrape: two scrapes at once take turns.
    scrape: Mutex<()>,
}

const TASK: &[&str] = &["service", "task", "host"];

impl ClusterMetrics {
    pub fn new(
        snapshots: watch::Receiver<Arc<Snapshot>>,
        members: watch::Receiver<Vec<MemberView>>,
    ) -> prometheus::Result<Self> {
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            IntGaugeVec::new(Opts::new(name, help), labels)
        };
        Ok(Self {
            snapshots,
            members,
            task_healthy: gauge(
                "mesh_task_healthy",
                "1 when the task passes its health check and its host is up, as this host sees it; every task of the cluster, by the host that owns it",
                TASK,
            )?,
            task_draining: gauge(
                "mesh_task_draining",
                "1 while the task is drained (keeps its connections, gets no new ones)",
                TASK,
            )?,
            routable: gauge(
                "mesh_service_routable_tasks",
                "Tasks of the service that take new connections: active, healthy, on a host that is up",
                &["service"],
            )?,
            member_status: gauge(
                "mesh_gossip_member_status",
                "1 for each cluster member this host knows, itself included, labelled with its state (alive, suspect, down, left)",
                &["member", "status"],
            )?,
            scrape: Mutex::new(()),
        })
    }

    fn fill(&self) {
        let snapshot = self.snapshots.borrow().clone();
        for (service, entry) in &snapshot.services {
            let mut routable = 0;
            let live = entry.tasks.iter().map(|t| (t, true));
            let suspended = entry.suspended.iter().map(|t| (t, false));
            for (task, host_up) in live.chain(suspended) {
                self.task(service, task, host_up);
                routable += i64::from(host_up && task.routable());
            }
            self.routable.with_label_values(&[service]).set(routable);
        }
        for member in self.members.borrow().iter() {
            self.member_status
                .with_label_values(&[&member.name, &member.status.to_string()])
                .set(1);
        }
    }

    fn task(&self, service: &str, task: &TaskEntry, host_up: bool) {
        let labels = [service, &task.id, &task.node];
        // A suspended task's last health is stale: its host is not there to probe it.
        let healthy = host_up && task.health == Health::Healthy;
        self.task_healthy
            .with_label_values(&labels)
            .set(i64::from(healthy));
        self.task_draining
            .with_label_values(&labels)
            .set(i64::from(task.state == TaskState::Draining));
    }

    fn all(&self) -> [&IntGaugeVec; 4] {
        [
            &self.task_healthy,
            &self.task_draining,
            &self.routable,
            &self.member_status,
        ]
    }
}

impl Collector for ClusterMetrics {
    fn desc(&self) -> Vec<&Desc> {
        self.all().into_iter().flat_map(|g| g.desc()).collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let _turn = self.scrape.lock().unwrap_or_else(PoisonError::into_inner);
        for gauge in self.all() {
            gauge.reset();
        }
        self.fill();
        self.all().into_iter().flat_map(|g| g.collect()).collect()
    }
}
