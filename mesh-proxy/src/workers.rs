//! The threads that run TCP listeners and their connections: one single-threaded
//! runtime per CPU, each with its own SO_REUSEPORT listener per port, so the kernel
//! spreads connections over them and a connection never moves between threads. A
//! connection's tasks then pay no work-stealing or cross-thread wake-up costs.

use std::future::Future;
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tracing::warn;

pub struct Workers {
    handles: Vec<Handle>,
    stop: CancellationToken,
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    /// `n` workers; 0 means one per CPU this process may run on.
    pub fn start(n: usize) -> Workers {
        let n = if n == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            n
        };
        let stop = CancellationToken::new();
        let mut handles = Vec::new();
        let mut threads = Vec::new();
        for i in 0..n {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    warn!(error = %e, "cannot start a data-plane worker runtime");
                    break;
                }
            };
            let handle = rt.handle().clone();
            let stop = stop.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("mesh-proxy-{i}"))
                .spawn(move || rt.block_on(stop.cancelled()));
            match spawned {
                Ok(t) => {
                    handles.push(handle);
                    threads.push(t);
                }
                Err(e) => {
                    warn!(error = %e, "cannot start a data-plane worker thread");
                    break;
                }
            }
        }
        Workers {
            handles,
            stop,
            threads,
        }
    }

    /// How many listeners each TCP port gets: one per worker, or one on the caller's
    /// runtime when no worker could start.
    pub fn count(&self) -> usize {
        self.handles.len().max(1)
    }

    /// Runs `future` on worker `i`, or on the current runtime without workers.
    pub fn spawn<F>(&self, i: usize, future: F) -> tokio::task::JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        match self.handles.get(i) {
            Some(h) => h.spawn(future),
            None => tokio::spawn(future),
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        // Each runtime drops its remaining tasks, and with them their sockets.
        self.stop.cancel();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
