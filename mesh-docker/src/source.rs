//! The source's loop: connect, list and inspect the running containers, publish the
//! observation, then follow the event stream, inspecting each container an event
//! names. Any error ends the session; the next one starts after a backoff and lists
//! everything again, so nothing missed while disconnected stays missed. While the
//! engine is unreachable the last observation stands: the containers probably still
//! run, and the prober still checks the tasks it probes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{FutureExt, StreamExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::SourceStatus;
use crate::container::Container;
use crate::engine::{Engine, EngineError, Event};
use crate::labels;
use crate::observe::{Observation, Settings, observe};

const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Events handled before the observation is published even if more are waiting,
/// so a burst cannot hold back what already changed.
const BATCH: usize = 256;

/// What the source needs: the engine's address and the rules' settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `unix:///var/run/docker.sock`, a socket path, or `tcp://host:port`.
    pub host: String,
    pub settings: Settings,
}

/// What the running source publishes.
pub struct DockerSource {
    pub observations: watch::Receiver<Arc<Observation>>,
    pub status: watch::Receiver<SourceStatus>,
}

impl DockerSource {
    pub fn spawn(config: Target, stop: CancellationToken) -> (DockerSource, JoinHandle<()>) {
        let (obs_tx, observations) = watch::channel(Arc::new(Observation::default()));
        let (status_tx, status) = watch::channel(SourceStatus {
            endpoint: config.host.clone(),
            ..SourceStatus::default()
        });
        let task = tokio::spawn(async move {
            tokio::select! {
                _ = run(config, obs_tx, status_tx) => {}
                _ = stop.cancelled() => {}
            }
        });
        (
            DockerSource {
                observations,
                status,
            },
            task,
        )
    }
}

async fn run(
    config: Target,
    obs: watch::Sender<Arc<Observation>>,
    status: watch::Sender<SourceStatus>,
) {
    let mut backoff = BACKOFF_MIN;
    let mut failures = 0u64;
    loop {
        let error = session(&config, &obs, &status, &mut backoff).await;
        failures += 1;
        let now = unix_now();
        status.send_modify(|s| {
            s.connected = false;
            s.reconnects += u64::from(s.last_error.is_some() || s.events > 0);
            s.last_error = Some(error.to_string());
            s.last_error_at = Some(now.max(0) as u64);
        });
        // Every attempt is logged: the backoff bounds them to two a minute.
        warn!(endpoint = %config.host, error = %error, retry_in = ?backoff, attempt = failures,
            "Docker source disconnected; keeping its last tasks and retrying");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("the engine closed the event stream")]
    Ended,
}

async fn session(
    config: &Target,
    obs: &watch::Sender<Arc<Observation>>,
    status: &watch::Sender<SourceStatus>,
    backoff: &mut Duration,
) -> SessionError {
    match follow(config, obs, status, backoff).await {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

enum Never {}

async fn follow(
    config: &Target,
    obs: &watch::Sender<Arc<Observation>>,
    status: &watch::Sender<SourceStatus>,
    backoff: &mut Duration,
) -> Result<Never, SessionError> {
    let engine = Engine::connect(&config.host).await?;
    // Events from a little before the listing are replayed, so a change during it
    // is seen twice rather than missed; seeing one twice is harmless.
    let since = engine.now().await.unwrap_or_else(unix_now) - 2;
    let mut view = View {
        compose: config.settings.compose,
        containers: BTreeMap::new(),
        stopping: BTreeSet::new(),
    };
    for id in engine.running().await? {
        view.refresh(&engine, &id).await?;
    }
    let events = engine.events(since);
    tokio::pin!(events);
    publish(obs, &view, &config.settings);
    let version = engine.api_version();
    info!(endpoint = %config.host, api = %version, containers = view.containers.len(), "Docker source connected");
    status.send_modify(|s| {
        s.connected = true;
        s.api_version = Some(version);
        s.containers = view.containers.len();
    });
    *backoff = BACKOFF_MIN;
    loop {
        let mut handled = 0;
        let first = events.next().await;
        let mut next = Some(first);
        while let Some(item) = next {
            let Some(item) = item else {
                return Err(SessionError::Ended);
            };
            if let Some(event) = item? {
                view.apply(&engine, event).await?;
                handled += 1;
            }
            // What is already waiting joins this batch.
            next = if handled < BATCH {
                events.next().now_or_never()
            } else {
                None
            };
        }
        status.send_modify(|s| {
            s.events += handled as u64;
            s.containers = view.containers.len();
        });
        publish(obs, &view, &config.settings);
    }
}

fn publish(obs: &watch::Sender<Arc<Observation>>, view: &View, settings: &Settings) {
    let new = observe(&view.containers, &view.stopping, settings);
    obs.send_if_modified(|current| {
        if **current == new {
            return false;
        }
        *current = Arc::new(new);
        true
    });
}

/// The running containers that concern mesh, and which of them are stopping.
struct View {
    compose: bool,
    containers: BTreeMap<String, Container>,
    stopping: BTreeSet<String>,
}

impl View {
    async fn apply(&mut self, engine: &Engine, e: Event) -> Result<(), EngineError> {
        let action = e.action.as_str();
        match action {
            // The engine signalled the container to stop: it drains from now on.
            // Signals sent for other reasons (`docker kill -s HUP` to reload) change
            // nothing.
            "kill" if self.stops(&e) => {
                self.stopping.insert(e.container);
            }
            "destroy" => {
                self.containers.remove(&e.container);
                self.stopping.remove(&e.container);
            }
            "start" | "restart" | "unpause" | "die" | "stop" | "pause" | "rename" | "update"
            | "connect" | "disconnect" => {
                if matches!(action, "start" | "restart" | "die") {
                    self.stopping.remove(&e.container);
                }
                self.refresh(engine, &e.container).await?;
            }
            a if a.starts_with("health_status") => self.refresh(engine, &e.container).await?,
            _ => {}
        }
        Ok(())
    }

    fn stops(&self, e: &Event) -> bool {
        let own = self
            .containers
            .get(&e.container)
            .and_then(|c| c.stop_signal.as_deref())
            .and_then(signal_number);
        match e.signal.as_deref().and_then(signal_number) {
            Some(n) => matches!(n, 2 | 3 | 9 | 15) || Some(n) == own,
            None => false,
        }
    }

    /// Reads one container again, keeping it only while it runs and concerns mesh.
    async fn refresh(&mut self, engine: &Engine, id: &str) -> Result<(), EngineError> {
        match engine.inspect(id).await? {
            Some(c) if c.running && self.concerns(&c) => {
                self.containers.insert(c.id.clone(), c);
            }
            _ => {
                self.containers.remove(id);
            }
        }
        Ok(())
    }

    fn concerns(&self, c: &Container) -> bool {
        c.labels
            .keys()
            .any(|k| k.starts_with("mesh.") || (self.compose && k == labels::COMPOSE_SERVICE))
    }
}

/// `15`, `TERM` or `SIGTERM` into 15; the signals a stop uses, by name.
fn signal_number(s: &str) -> Option<i32> {
    if let Ok(n) = s.parse() {
        return Some(n);
    }
    let name = s.trim_start_matches("SIG");
    Some(match name {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "KILL" => 9,
        "USR1" => 10,
        "USR2" => 12,
        "TERM" => 15,
        "WINCH" => 28,
        _ => return None,
    })
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
