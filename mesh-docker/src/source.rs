//! The source's loop, which only does IO: connect, list and inspect the running
//! containers, publish the observation, then follow the event stream, inspecting
//! each container an event names ([`View`] decides which). Every minute it lists
//! everything again, so an event the engine dropped (it drops them for a slow
//! reader) is made good, and an engine that stopped answering ends the session.
//! Any connection error ends the session; the next one starts after a backoff.
//!
//! While the engine is unreachable the last set of tasks stands, since the
//! containers probably still run, but the engine's health checks no longer count:
//! mesh probes every task until the engine is back.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{FutureExt, StreamExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::SourceStatus;
use crate::engine::{Engine, EngineError};
use crate::observe::{Observation, Settings};
use crate::view::{Step, View};

const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A session that lasted this long resets the backoff: an engine that restarts in a
/// loop is not listed again every second.
const STEADY: Duration = Duration::from_secs(30);
/// How often everything is listed again.
const RESYNC: Duration = Duration::from_secs(60);
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
            let mut loop_ = Loop {
                view: View::new(config.settings.compose),
                config,
                obs: obs_tx,
                status: status_tx,
            };
            tokio::select! {
                _ = loop_.run() => {}
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

struct Loop {
    config: Target,
    obs: watch::Sender<Arc<Observation>>,
    status: watch::Sender<SourceStatus>,
    /// Kept across sessions: a container that was stopping when the engine went
    /// away is still stopping when it comes back, until a listing says otherwise.
    view: View,
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("the engine closed the event stream")]
    Ended,
}

impl Loop {
    async fn run(&mut self) {
        let mut backoff = BACKOFF_MIN;
        let mut attempt = 0u64;
        loop {
            let started = Instant::now();
            let error = match self.session().await {
                Ok(never) => match never {},
                Err(e) => e,
            };
            if started.elapsed() >= STEADY {
                backoff = BACKOFF_MIN;
            }
            attempt += 1;
            let now = unix_now();
            self.status.send_modify(|s| {
                s.reconnects += u64::from(s.connected);
                s.connected = false;
                s.last_error = Some(error.to_string());
                s.last_error_at = Some(now.max(0) as u64);
            });
            self.publish(false);
            // Every attempt is logged: the backoff bounds them to two a minute.
            warn!(endpoint = %self.config.host, error = %error, retry_in = ?backoff, attempt,
                "Docker source disconnected; keeping its tasks (probed by mesh) and retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    async fn session(&mut self) -> Result<Never, SessionError> {
        let engine = Engine::connect(&self.config.host).await?;
        // Events from a little before the listing are replayed, so a change during
        // it is seen twice rather than missed; seeing one twice is harmless.
        let since = engine.now().await.unwrap_or_else(unix_now) - 2;
        self.list(&engine).await?;
        let events = engine.events(since);
        tokio::pin!(events);
        self.publish(true);
        let version = engine.api_version();
        info!(endpoint = %self.config.host, api = %version, containers = self.view.len(), "Docker source connected");
        let containers = self.view.len();
        self.status.send_modify(|s| {
            s.connected = true;
            s.api_version = Some(version);
            s.containers = containers;
        });
        let mut resync = tokio::time::interval_at((Instant::now() + RESYNC).into(), RESYNC);
        loop {
            let deadline = self.view.next_deadline();
            let mut handled = 0;
            tokio::select! {
                first = events.next() => {
                    let mut next = Some(first);
                    while let Some(item) = next {
                        let Some(item) = item else {
                            return Err(SessionError::Ended);
                        };
                        if let Some(event) = item? {
                            if let Step::Inspect(id) = self.view.event(&event, Instant::now()) {
                                self.inspect(&engine, &id).await?;
                            }
                            handled += 1;
                        }
                        // What is already waiting joins this batch.
                        next = if handled < BATCH { events.next().now_or_never() } else { None };
                    }
                }
                _ = resync.tick() => self.list(&engine).await?,
                _ = sleep_until(deadline) => {
                    for name in self.view.expire(Instant::now()) {
                        warn!(container = %name, "the container was signalled to stop but still runs after its stop timeout; it takes connections again");
                    }
                }
            }
            let containers = self.view.len();
            self.status.send_modify(|s| {
                s.events += handled as u64;
                s.containers = containers;
            });
            self.publish(true);
        }
    }

    /// Lists the running containers and reads again those that concern mesh.
    async fn list(&mut self, engine: &Engine) -> Result<(), EngineError> {
        let running = engine.running().await?;
        let ids: BTreeSet<String> = running.iter().map(|(id, _)| id.clone()).collect();
        self.view.listed(&ids);
        for (id, labels) in running {
            if self.view.concerns(&labels) {
                self.inspect(engine, &id).await?;
            }
        }
        Ok(())
    }

    /// Reads one container; an error about that container alone is reported with
    /// it, and only a connection error ends the session.
    async fn inspect(&mut self, engine: &Engine, id: &str) -> Result<(), EngineError> {
        match engine.inspect(id).await {
            Ok(c) => self.view.inspected(id, Ok(c)),
            Err(e) if e.is_about_container() => self.view.inspected(id, Err(e.to_string())),
            Err(e) => return Err(e),
        }
        Ok(())
    }

    fn publish(&self, engine_health: bool) {
        let new = self.view.observe(&self.config.settings, engine_health);
        self.obs.send_if_modified(|current| {
            if **current == new {
                return false;
            }
            *current = Arc::new(new);
            true
        });
    }
}

enum Never {}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
