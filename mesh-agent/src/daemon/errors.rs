//! Why an agent could not start. Each variant names the setting, address or file at
//! fault and keeps the underlying error as its source; the binary prints the chain.

use std::net::SocketAddr;
use std::path::PathBuf;

use mesh_core::StateError;

use crate::store::StoreError;
use crate::table::WriteError;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("--dataplane {plane} cannot run here (use --dataplane auto to fall back to userspace)")]
    Dataplane {
        plane: &'static str,
        #[source]
        source: mesh_nft::CommandError,
    },
    #[error("--dataplane ebpf cannot run here: {0} (use --dataplane auto to fall back)")]
    Ebpf(String),
    #[error("config: {0}")]
    EbpfConfig(String),
    #[error(
        "the TCP API on {addr} needs a bearer token: set api.token or api.token_file in the config, or MESH_API_TOKEN"
    )]
    TokenMissing { addr: SocketAddr },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{}: {what}", .path.display())]
    Restore {
        path: PathBuf,
        what: String,
        #[source]
        source: StateError,
    },
    #[error("config: service {name:?}")]
    ConfigService {
        name: String,
        #[source]
        source: WriteError,
    },
    #[error("config: task {id:?} of service {service:?}")]
    ConfigTask {
        id: String,
        service: String,
        #[source]
        source: StateError,
    },
    #[error(
        "another agent is already serving {}; stop it or pass --api unix:OTHER_PATH",
        .path.display()
    )]
    SocketTaken { path: PathBuf },
    #[error("cannot listen on {}", .path.display())]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr} for the API")]
    ApiListen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr} for metrics")]
    MetricsListen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot serve DNS on {listen:?}")]
    Dns {
        listen: Vec<SocketAddr>,
        #[source]
        source: std::io::Error,
    },
    /// A `[docker]` setting that can never work.
    #[error("{0}")]
    Docker(String),
    /// An interface named in `dns.listen` that cannot be served on.
    #[error("{0}")]
    DnsListen(mesh_core::ModelError),
    #[error("cluster.key_file {}", .path.display())]
    KeyFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cluster keys")]
    Keys(#[from] mesh_gossip::crypto::KeyError),
    #[error("--join {seed}: expected HOST:PORT")]
    Seed {
        seed: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Gossip(#[from] mesh_gossip::transport::StartError),
    #[error("metrics registry")]
    Metrics(#[from] prometheus::Error),
}
