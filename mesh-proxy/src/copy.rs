//! Moving bytes between the client and the task.
//!
//! Small exchanges are copied through a 16 KiB buffer; once a read fills it, the
//! bytes go socket → pipe → socket with splice(2) and are never copied into userspace. Each direction ends with a half-close (shutdown(SHUT_WR)) of
//! the other side, which propagates FIN both ways. Written by hand rather than with
//! `tokio::io::copy_bidirectional` because that copies through userspace buffers and
//! reports byte counts only at the end, while the metrics want them live.

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    let finished = AtomicBool::new(false);
    let both = async {
        tokio::try_join!(
            one_way(
                client,
                upstream,
                &metrics.bytes_in,
                &activity,
                start,
                &finished
            ),
            one_way(
                upstream,
                client,
                &metrics.bytes_out,
                &activity,
                start,
                &finished
            ),
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
    let keepalive = async {
        tokio::time::sleep(KEEPALIVE_AFTER).await;
        crate::sockopt::set_keepalive(SockRef::from(upstream));
        std::future::pending::<()>().await
    };
    tokio::select! {
        r = both => match r {
            Ok(_) => End::Closed,
            Err(e) => End::Error(e),
        },
        _ = idle => End::Idle,
        _ = keepalive => unreachable!("never completes"),
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
    finished: &AtomicBool,
) -> io::Result<()> {
    // Small exchanges go through a userspace buffer: one read, one write, and no pipe
    // to create. A read that fills the buffer means bulk transfer; from then on the
    // bytes move by splice(2) and never enter userspace.
    if buffered_loop(src, dst, bytes, activity, start).await? == Copied::Bulk {
        match Pipe::new() {
            Ok(pipe) => splice_loop(src, dst, &pipe, bytes, activity, start).await?,
            // Out of file descriptors for a pipe: keep copying through the buffer.
            Err(_) => {
                while buffered_loop(src, dst, bytes, activity, start).await? == Copied::Bulk {}
            }
        }
    }
    // FIN from src: pass it on, and keep the other direction open (half-close). When
    // the other direction has already finished, both sockets are closed right after
    // this, and close sends the FIN: dst's receive queue was read to EOF, so close
    // cannot turn into a RST. That saves a shutdown(2) per connection.
    if finished.swap(true, Ordering::AcqRel) {
        return Ok(());
    }
    let _ = SockRef::from(dst).shutdown(Shutdown::Write);
    Ok(())
}

const PIPE_CHUNK: usize = 1 << 20;
/// When the upstream leg gets TCP keepalive (60 s idle, then probes). The client leg
/// inherits it from the listener at accept.
const KEEPALIVE_AFTER: Duration = Duration::from_secs(30);
/// Large enough for any request/response exchange; a read that fills it starts splice.
const BUF: usize = 16 * 1024;

fn account(bytes: &IntCounter, activity: &AtomicU64, start: Instant, n: usize) {
    bytes.inc_by(n as u64);
    activity.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
}

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
        account(bytes, activity, start, n);
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Copied {
    /// The source closed its half.
    Eof,
    /// A read filled the buffer: bulk data is flowing.
    Bulk,
}

async fn buffered_loop(
    src: &TcpStream,
    dst: &TcpStream,
    bytes: &IntCounter,
    activity: &AtomicU64,
    start: Instant,
) -> io::Result<Copied> {
    // Capacity only: reads fill the spare capacity, so nothing is zeroed per connection.
    let mut buf: Vec<u8> = Vec::with_capacity(BUF);
    loop {
        let n = read_some(src, &mut buf).await?;
        if n == 0 {
            return Ok(Copied::Eof);
        }
        let mut at = 0;
        while at < n {
            dst.writable().await?;
            match dst.try_write(&buf[at..n]) {
                Ok(m) => at += m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        account(bytes, activity, start, n);
        if n == buf.capacity() {
            return Ok(Copied::Bulk);
        }
    }
}

/// One read into `buf` (cleared first). A short read means the socket's receive queue
/// is empty: readiness is cleared right away, so the next read waits for epoll instead
/// of costing a recv that fails with EAGAIN. Returning WouldBlock from try_io is
/// tokio's way to clear readiness; the bytes read are kept in `got`.
async fn read_some(src: &TcpStream, buf: &mut Vec<u8>) -> io::Result<usize> {
    buf.clear();
    loop {
        src.readable().await?;
        let mut got = None;
        let r = src.try_io(Interest::READABLE, || {
            let n = recv_spare(src.as_raw_fd(), buf)?;
            got = Some(n);
            if n > 0 && n < buf.capacity() {
                Err(io::ErrorKind::WouldBlock.into())
            } else {
                Ok(n)
            }
        });
        match (r, got) {
            (_, Some(n)) => return Ok(n),
            (Err(e), None) if e.kind() == io::ErrorKind::WouldBlock => continue,
            (Err(e), None) => return Err(e),
            (Ok(n), None) => return Ok(n),
        }
    }
}

/// recv(2) into the spare capacity of `buf`, extending its length by what was read.
fn recv_spare(fd: RawFd, buf: &mut Vec<u8>) -> io::Result<usize> {
    let spare = buf.spare_capacity_mut();
    // SAFETY: the kernel writes at most spare.len() bytes into memory we own; the
    // length is extended only by what it reports as written.
    let n = unsafe { libc::recv(fd, spare.as_mut_ptr().cast(), spare.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    // SAFETY: recv initialised the first n bytes of the spare capacity.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
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
