//! The Docker source on the table's seam: its observations become the Docker
//! source's task set (one `ReplaceSource` write, which the table diffs), services its
//! labels describe are created when missing and compared when present, and what it
//! could not do is logged once and kept for `mesh status` and `service inspect`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use mesh_api::DockerView;
use mesh_core::{StateError, TaskSource};
use mesh_docker::observe::{AddressMode, Observation, differences};
use mesh_docker::{DockerSource, Target};
use mesh_gossip::transport::MemberView;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::table::{Outcome, TableHandle, Write, WriteError};

/// How soon writes the table refused are tried again: a port another service held,
/// or a service another host created meanwhile, may have changed.
const RETRY: Duration = Duration::from_secs(5);

/// Starts the source and the task that applies what it sees. The returned view is
/// what `mesh status` and `service inspect` show.
pub fn spawn(
    target: Target,
    table: TableHandle,
    members: watch::Receiver<Vec<MemberView>>,
    stop: CancellationToken,
    tasks: &mut JoinSet<()>,
) -> watch::Receiver<DockerView> {
    let address = target.settings.address;
    let (source, source_task) = DockerSource::spawn(target, stop.clone());
    let (view_tx, view) = watch::channel(DockerView::default());
    tasks.spawn(async move {
        let applier = Applier {
            table,
            members,
            address,
            logged: BTreeSet::new(),
            warned_local: false,
        };
        tokio::select! {
            _ = applier.run(source, view_tx) => {}
            _ = stop.cancelled() => {}
        }
        source_task.abort();
    });
    view
}

struct Applier {
    table: TableHandle,
    members: watch::Receiver<Vec<MemberView>>,
    address: AddressMode,
    /// Problems logged already: each is logged when it appears, not at every event.
    logged: BTreeSet<String>,
    warned_local: bool,
}

/// What one apply could not do.
#[derive(Default)]
struct Problems {
    skipped: Vec<String>,
    differences: BTreeMap<String, Vec<String>>,
    /// Writes the table refused; they are tried again after [`RETRY`].
    refused: usize,
    /// Observed tasks that are not in the table.
    refused_tasks: usize,
}

impl Applier {
    async fn run(mut self, mut source: DockerSource, view: watch::Sender<DockerView>) {
        let mut applied: Option<Arc<Observation>> = None;
        let mut problems = Problems::default();
        loop {
            let observation = source.observations.borrow_and_update().clone();
            let new = applied
                .as_ref()
                .is_none_or(|a| !Arc::ptr_eq(a, &observation));
            if new || problems.refused > 0 {
                problems = self.apply(&observation).await;
                applied = Some(observation.clone());
            }
            self.warn_local(&observation);
            let engine = source.status.borrow_and_update().clone();
            view.send_replace(DockerView {
                engine,
                tasks: observation
                    .tasks
                    .len()
                    .saturating_sub(problems.refused_tasks),
                skipped: problems.skipped.clone(),
                differences: problems.differences.clone(),
            });
            let retry = problems.refused > 0;
            tokio::select! {
                r = source.observations.changed() => if r.is_err() { return },
                r = source.status.changed() => if r.is_err() { return },
                r = self.members.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(RETRY), if retry => {}
            }
        }
    }

    async fn apply(&mut self, o: &Observation) -> Problems {
        let mut p = Problems {
            skipped: o.skipped.iter().map(|s| s.to_string()).collect(),
            differences: o.differences.clone(),
            ..Problems::default()
        };
        let snapshot = self.table.snapshot();
        for (name, wanted) in &o.services {
            if let Some(entry) = snapshot.services.get(name) {
                let d = differences(&entry.spec, wanted);
                if !d.is_empty() {
                    p.differences.entry(name.clone()).or_default().extend(d);
                }
                continue;
            }
            match self
                .table
                .write(Write::CreateService(wanted.spec.clone()))
                .await
            {
                Ok(_) => {
                    info!(service = %name, container = %wanted.container, "service created from container labels")
                }
                // Created meanwhile (by a peer, or the API): compared at the retry.
                Err(WriteError::State(StateError::ServiceExists(_))) => p.refused += 1,
                Err(e) => {
                    p.refused += 1;
                    p.skipped.push(format!(
                        "service {name} from the labels of container {}: {e}",
                        wanted.container
                    ));
                }
            }
        }
        let containers: BTreeMap<(&str, &str), &str> = o
            .tasks
            .iter()
            .filter_map(|t| {
                Some((
                    (t.service.as_str(), t.id.as_deref()?),
                    t.observed.as_ref()?.container.as_str(),
                ))
            })
            .collect();
        let write = Write::ReplaceSource {
            source: TaskSource::Docker,
            tasks: o.tasks.clone(),
        };
        match self.table.write(write).await {
            Ok(Outcome::Source(errors)) => {
                p.refused += errors.len();
                p.refused_tasks = errors.len();
                p.skipped.extend(errors.iter().map(|e| {
                    let container = containers
                        .get(&(e.service.as_str(), e.id.as_str()))
                        .copied()
                        .unwrap_or("?");
                    format!(
                        "container {container} (task {} of {}): {}",
                        e.id, e.service, e.error
                    )
                }));
            }
            Ok(_) => {}
            Err(e) => {
                p.refused += 1;
                p.refused_tasks = o.tasks.len();
                p.skipped
                    .push(format!("the container tasks were not applied: {e}"));
            }
        }
        self.log_new(&p);
        p
    }

    /// Logs each problem once when it appears; one that goes away and comes back is
    /// logged again.
    fn log_new(&mut self, p: &Problems) {
        let skipped: BTreeSet<String> = p.skipped.iter().cloned().collect();
        let differences: BTreeSet<String> = p
            .differences
            .iter()
            .flat_map(|(s, d)| d.iter().map(move |d| format!("service {s}: {d}")))
            .collect();
        for line in skipped.difference(&self.logged) {
            warn!("Docker container skipped: {line}");
        }
        for line in differences.difference(&self.logged) {
            warn!("Docker labels differ from the service, which is left as it is: {line}");
        }
        self.logged = skipped.into_iter().chain(differences).collect();
    }

    /// Once: container addresses on a local bridge, in a cluster of several hosts,
    /// which the others can reach only if the operator routes container subnets.
    fn warn_local(&mut self, o: &Observation) {
        if self.warned_local || self.address != AddressMode::Container {
            return;
        }
        let node = self.table.node().to_string();
        let others = self
            .members
            .borrow()
            .iter()
            .filter(|m| m.name != node)
            .count();
        if let Some((container, ip)) = o.local_only.first()
            && others > 0
        {
            warn!(
                container = %container, address = %ip, other_hosts = others,
                "container tasks use the containers' own addresses, which other hosts reach only if container subnets are routed between hosts; otherwise set [docker] address = \"host-port\""
            );
            self.warned_local = true;
        }
    }
}
