//! Moving bytes between the client and the task.
//!
//! On Linux the bytes go socket → pipe → socket with splice(2), so they are never
//! copied into userspace. Each direction ends with a half-close (shutdown(SHUT_WR)) of
//! the other side, which propagates FIN both ways. Written by hand rather than with
//! `tokio::io::copy_bidirectional` because that copies through userspace buffers and
//! reports byte counts only at the end, while the metrics want them live.

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus::IntCounter;
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::metrics::TaskMetrics;

/// Why a proxied connection ended.
#[derive(Debug)]
pub enum End {
    /// Both sides closed their half.
    Closed,
    /// No byte moved either way for the service's idle_timeout.
    Idle,
    /// A drain deadline passed.
    Killed,
    Error(io::Error),
}

pub async fn proxy(
    client: &TcpStream,
    upstream: &TcpStream,
    metrics: &TaskMetrics,
    idle_timeout: Option<Duration>,
    task_kill: &CancellationToken,
    listener_kill: &CancellationToken,
) -> End {
    let start = Instant::now();
    let activity = AtomicU64::new(0);
    let both = async {
        tokio::try_join!(
            one_way(client, upstream, &metrics.bytes_in, &activity, start),
            one_way(upstream, client, &metrics.bytes_out, &activity, start),
        )
    };
    let idle = async {
        let Some(limit) = idle_timeout else {
            return std::future::pending().await;
        };
        loop {
            let last = Duration::from_millis(activity.load(Ordering::Relaxed));
            let quiet = start.elapsed().saturating_sub(last);
            if quiet >= limit {
                return;
            }
            tokio::time::sleep(limit - quiet).await;
        }
    };
    tokio::select! {
        r = both => match r {
            Ok(_) => End::Closed,
            Err(e) => End::Error(e),
        },
        _ = idle => End::Idle,
        _ = task_kill.cancelled() => End::Killed,
        _ = listener_kill.cancelled() => End::Killed,
    }
}

async fn one_way(
    src: &TcpStream,
    dst: &TcpStream,
    bytes: &IntCounter,
    activity: &AtomicU64,
    start: Instant,
) -> io::Result<()> {
    match Pipe::new() {
        Ok(pipe) => splice_loop(src, dst, &pipe, bytes, activity, start).await?,
        // Out of file descriptors for a pipe: still serve the connection.
        Err(_) => buffered_loop(src, dst, bytes, activity, start).await?,
    }
    // FIN from src: pass it on, and keep the other direction open (half-close).
    let _ = SockRef::from(dst).shutdown(Shutdown::Write);
    Ok(())
}

const PIPE_CHUNK: usize = 1 << 20;

async fn splice_loop(
    src: &TcpStream,
    dst: &TcpStream,
    pipe: &Pipe,
    bytes: &IntCounter,
    activity: &AtomicU64,
    start: Instant,
) -> io::Result<()> {
    loop {
        // The pipe is empty here, so a splice into it only waits for the socket.
        let n = loop {
            src.readable().await?;
            match src.try_io(Interest::READABLE, || {
                splice(src.as_raw_fd(), pipe.write.as_raw_fd(), PIPE_CHUNK)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            return Ok(());
        }
        let mut left = n;
        while left > 0 {
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || {
                splice(pipe.read.as_raw_fd(), dst.as_raw_fd(), left)
            }) {
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        bytes.inc_by(n as u64);
        activity.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

async fn buffered_loop(
    src: &TcpStream,
    dst: &TcpStream,
    bytes: &IntCounter,
    activity: &AtomicU64,
    start: Instant,
) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        src.readable().await?;
        let n = match src.try_read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        let mut at = 0;
        while at < n {
            dst.writable().await?;
            match dst.try_write(&buf[at..n]) {
                Ok(m) => at += m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        bytes.inc_by(n as u64);
        activity.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 writes two descriptors into the array on success.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors are fresh and owned by nobody else.
        Ok(unsafe {
            Self {
                read: OwnedFd::from_raw_fd(fds[0]),
                write: OwnedFd::from_raw_fd(fds[1]),
            }
        })
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain syscall on descriptors we hold; null offsets mean "current position".
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}
