//! Ending the sockets the programs balanced to tasks that left, on a thread of its
//! own. Listing every namespace's sockets can take a while on a busy host, and the
//! plane driver, which applies every plane's changes, must not wait for it.
//!
//! A socket is ended only when `mesh_revnat` says the programs sent it to that task
//! (its cookie and the task's address are a key there): a client that dialled the
//! task's own address is left alone.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::thread::JoinHandle;

use aya::maps::{HashMap, MapData};
use mesh_core::Protocol;
use tracing::{info, warn};

use crate::layout::{RevnatKey, RevnatValue};
use crate::sockets::SockDiag;

/// Jobs waiting for the thread; beyond, a job is dropped and counted as a failure.
const QUEUE: usize = 64;

type Revnat = HashMap<MapData, RevnatKey, RevnatValue>;
type Job = Vec<(SocketAddr, Protocol)>;

#[derive(Default)]
struct Counts {
    ended: AtomicU64,
    failed: AtomicU64,
    stop: AtomicBool,
}

pub struct Endings {
    tx: Option<SyncSender<Job>>,
    counts: Arc<Counts>,
    thread: Option<JoinHandle<()>>,
}

impl Endings {
    /// Starts the thread, which owns the handle on `mesh_revnat`.
    pub fn start(revnat: Revnat) -> std::io::Result<Endings> {
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let counts = Arc::new(Counts::default());
        let shared = counts.clone();
        let thread = std::thread::Builder::new()
            .name("mesh-endings".into())
            .spawn(move || run(rx, revnat, &shared))?;
        Ok(Endings {
            tx: Some(tx),
            counts,
            thread: Some(thread),
        })
    }

    /// Ends, soon, the sockets the programs sent to each of `tasks`.
    pub fn end(&self, tasks: Job) {
        if tasks.is_empty() {
            return;
        }
        let Some(tx) = &self.tx else { return };
        match tx.try_send(tasks) {
            Ok(()) => {}
            Err(TrySendError::Full(tasks)) => {
                self.counts.failed.fetch_add(1, Ordering::Relaxed);
                warn!(
                    tasks = tasks.len(),
                    "too many socket endings queued; the connections to these tasks go on"
                );
            }
            Err(TrySendError::Disconnected(_)) => {
                self.counts.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Sockets ended so far, and failures (a namespace or socket that could not be
    /// handled, a job dropped).
    pub fn counts(&self) -> (u64, u64) {
        (
            self.counts.ended.load(Ordering::Relaxed),
            self.counts.failed.load(Ordering::Relaxed),
        )
    }
}

impl Drop for Endings {
    /// Stops the thread between two namespaces or sockets, and waits for it.
    fn drop(&mut self) {
        self.counts.stop.store(true, Ordering::Relaxed);
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(rx: Receiver<Job>, revnat: Revnat, counts: &Counts) {
    while let Ok(job) = rx.recv() {
        if counts.stop.load(Ordering::Relaxed) {
            return;
        }
        let tasks: BTreeSet<(SocketAddr, Protocol)> = job.into_iter().collect();
        let ended = end(&tasks, &revnat, counts);
        counts.ended.fetch_add(ended, Ordering::Relaxed);
        let names: Vec<String> = tasks.iter().map(|(a, p)| format!("{a}/{p}")).collect();
        info!(
            tasks = %names.join(" "),
            sockets = ended,
            "sockets balanced to tasks that left were ended"
        );
    }
}

/// One job: every namespace listed once per protocol, whatever the number of tasks.
fn end(tasks: &BTreeSet<(SocketAddr, Protocol)>, revnat: &Revnat, counts: &Counts) -> u64 {
    let (namespaces, errors) = SockDiag::every_namespace();
    for e in errors {
        warn!(error = %e, "cannot list the sockets of a network namespace; its connections to tasks that left go on");
        counts.failed.fetch_add(1, Ordering::Relaxed);
    }
    let mut ended = 0;
    for mut diag in namespaces {
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            if counts.stop.load(Ordering::Relaxed) {
                return ended;
            }
            let peers: Vec<SocketAddr> = tasks
                .iter()
                .filter(|(_, p)| *p == protocol)
                .map(|(a, _)| *a)
                .collect();
            if peers.is_empty() {
                continue;
            }
            let sockets = match diag.connected_to_any(protocol, &peers) {
                Ok(s) => s,
                Err(e) => {
                    warn!(%protocol, error = %e, "cannot list the sockets connected to tasks that left");
                    counts.failed.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            };
            for s in sockets {
                if counts.stop.load(Ordering::Relaxed) {
                    return ended;
                }
                if revnat.get(&RevnatKey::new(s.cookie, s.peer), 0).is_err() {
                    continue;
                }
                match diag.destroy(&s) {
                    Ok(()) => ended += 1,
                    Err(e) => {
                        warn!(task = %s.peer, %protocol, local = %s.local, error = %e, "cannot end a socket connected to a task that left");
                        counts.failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }
    ended
}
