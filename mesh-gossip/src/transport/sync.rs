//! Anti-entropy over TCP: the three messages of [`crate::anti_entropy`] as
//! length-prefixed frames sealed by the keyring. The replica side of each step runs in
//! the table; the membership side, and the hosts' versions riding along in each frame
//! ([`super::frame`]), go to the gossip loop.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_core::io_error::{AcceptBackoff, AcceptFailure, classify_accept};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::frame::{self, Frame};
use super::metrics::GossipMetrics;
use super::table::ToTable;
use crate::anti_entropy::{Back, Hello, Members, Reply};
use crate::crypto::{Keyring, OpenError};
use crate::log_limit::LogLimit;
use crate::versions::VersionNote;

/// The first frame of a connection comes before anything proved the peer holds the
/// key: it is a digest and a member list, so it is small, and a larger claim is refused
/// before a byte of it is buffered.
const MAX_OPENING: usize = 4 << 20;
/// Later frames carry state (a full copy of 10,000 services of 10 tasks is about
/// 3 MB). Memory follows the bytes that actually arrive, not the length claimed.
const MAX_FRAME: usize = 256 << 20;
pub(super) const SYNC_TIMEOUT: Duration = Duration::from_secs(30);
/// Sync connections served at once; beyond it a connection is closed at once.
const MAX_SYNCS: usize = 32;

/// What hosts tell each other about the cluster besides the replica: foca's members
/// and the versions the hosts run.
#[derive(Clone, Default)]
pub(super) struct Roster {
    pub members: Members,
    pub versions: Vec<VersionNote>,
}

#[derive(Clone)]
pub(super) struct SyncCtx {
    pub keyring: Keyring,
    pub table: mpsc::Sender<ToTable>,
    /// The gossip loop's roster, kept current by it.
    pub roster: watch::Receiver<Roster>,
    /// What a peer sent, for the gossip loop to apply.
    pub learned: mpsc::Sender<Roster>,
    pub metrics: GossipMetrics,
    /// Warnings about peers' frames, rate-limited.
    pub log: Arc<Mutex<LogLimit>>,
}

#[derive(Debug, thiserror::Error)]
pub(super) enum SyncError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("undecodable frame")]
    Decode(#[from] postcard::Error),
    #[error("frame of {0} bytes exceeds the limit")]
    TooBig(usize),
    #[error("the table is shutting down")]
    TableGone,
}

impl SyncCtx {
    async fn write<T: Serialize>(
        &self,
        s: &mut TcpStream,
        msg: &T,
        versions: &[VersionNote],
    ) -> Result<(), SyncError> {
        let sealed = self.keyring.seal(&frame::encode(msg, versions)?);
        s.write_all(&(sealed.len() as u32).to_be_bytes()).await?;
        s.write_all(&sealed).await?;
        self.metrics.bytes_out.inc_by(sealed.len() as u64 + 4);
        Ok(())
    }

    /// Reads a frame; versions a peer got wrong are logged and dropped, not fatal.
    async fn read<T: for<'de> Deserialize<'de>>(
        &self,
        s: &mut TcpStream,
        limit: usize,
    ) -> Result<(T, Vec<VersionNote>), SyncError> {
        let len = s.read_u32().await? as usize;
        if len > limit {
            return Err(SyncError::TooBig(len));
        }
        let mut buf = Vec::with_capacity(len.min(64 * 1024));
        (&mut *s).take(len as u64).read_to_end(&mut buf).await?;
        if buf.len() != len {
            return Err(SyncError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        self.metrics.bytes_in.inc_by(len as u64 + 4);
        let plain = self
            .keyring
            .open(&buf)
            .inspect_err(|_| self.metrics.auth_failures.inc())?;
        let Frame { message, versions } = frame::decode(&plain)?;
        let versions = versions.unwrap_or_else(|e| {
            let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
            self.log
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .warn("sync-versions", || {
                    format!("host versions from {peer} refused: {e}")
                });
            Vec::new()
        });
        Ok((message, versions))
    }

    /// Sends a request to the table and waits for its answer.
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> ToTable,
    ) -> Result<T, SyncError> {
        let (tx, rx) = oneshot::channel();
        self.table
            .send(make(tx))
            .await
            .map_err(|_| SyncError::TableGone)?;
        rx.await.map_err(|_| SyncError::TableGone)
    }

    fn roster(&self) -> Roster {
        self.roster.borrow().clone()
    }

    fn learn(&self, roster: Roster) {
        // The roster is exchanged every round: dropping one when the loop is busy
        // costs nothing.
        let _ = self.learned.try_send(roster);
    }

    /// Push-pull with `peer`.
    pub async fn initiate(&self, peer: SocketAddr) -> Result<(), SyncError> {
        let mut s = TcpStream::connect(peer).await?;
        let Roster { members, versions } = self.roster();
        let hello = self.ask(|reply| ToTable::Hello { members, reply }).await?;
        self.write(&mut s, &hello, &versions).await?;
        let (mut reply, theirs): (Reply, _) = self.read(&mut s, MAX_FRAME).await?;
        let members = std::mem::take(&mut reply.members);
        let back = self
            .ask(|back| ToTable::AbsorbReply { reply, back })
            .await?;
        // The responder has our versions from the hello already.
        self.write(&mut s, &back, &[]).await?;
        self.learn(Roster {
            members,
            versions: theirs,
        });
        Ok(())
    }

    async fn respond(&self, mut s: TcpStream) -> Result<(), SyncError> {
        let (mut hello, theirs): (Hello, _) = self.read(&mut s, MAX_OPENING).await?;
        let learned = Roster {
            members: std::mem::take(&mut hello.members),
            versions: theirs,
        };
        let Roster { members, versions } = self.roster();
        let reply = self
            .ask(|reply| ToTable::Reply {
                hello,
                members,
                reply,
            })
            .await?;
        self.write(&mut s, &reply, &versions).await?;
        let (back, _): (Back, _) = self.read(&mut s, MAX_FRAME).await?;
        self.table
            .send(ToTable::Absorb { items: back })
            .await
            .map_err(|_| SyncError::TableGone)?;
        self.learn(learned);
        Ok(())
    }
}

/// Accepts sync connections until `stop`.
pub(super) async fn serve(
    listener: TcpListener,
    allowed: impl Fn(std::net::IpAddr) -> bool,
    ctx: SyncCtx,
    stop: CancellationToken,
) {
    let log = ctx.log.clone();
    let warn = |kind: &'static str, message: String| {
        log.lock()
            .unwrap_or_else(|p| p.into_inner())
            .warn(kind, || message);
    };
    let slots = Arc::new(Semaphore::new(MAX_SYNCS));
    let mut backoff = AcceptBackoff::default();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => r,
        };
        let (s, src) = match accepted {
            Ok(x) => {
                backoff.accepted();
                x
            }
            Err(e) => {
                let failure = classify_accept(&e);
                if failure == AcceptFailure::Closed {
                    return;
                }
                warn("sync-accept", format!("sync accept failed: {e}"));
                // Out of descriptors: back off instead of spinning on a full table.
                tokio::time::sleep(backoff.after(failure)).await;
                continue;
            }
        };
        if !allowed(src.ip()) {
            ctx.metrics.refused_peers.inc();
            warn(
                "refused-sync",
                format!(
                    "refused sync from {src}: this agent has no cluster key, so it accepts no peer"
                ),
            );
            continue;
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            warn(
                "sync-busy",
                format!("refused sync from {src}: {MAX_SYNCS} syncs already in progress"),
            );
            continue;
        };
        let ctx = ctx.clone();
        let log = log.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let rejected = |e: &dyn std::fmt::Display| {
                log.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .warn("sync-rejected", || {
                        format!("sync frame from {src} rejected: {e}")
                    });
            };
            match tokio::time::timeout(SYNC_TIMEOUT, ctx.respond(s)).await {
                Ok(Ok(())) => ctx.metrics.synced(),
                Ok(Err(e @ (SyncError::Open(_) | SyncError::TooBig(_)))) => rejected(&e),
                Ok(Err(e)) => debug!(%src, error = %e, "sync failed"),
                Err(_) => debug!(%src, "sync timed out"),
            }
        });
    }
}
