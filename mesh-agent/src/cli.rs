//! Command-line surface of the `mesh` binary. Doc comments here are `--help` text, where
//! brackets are syntax, not links.
#![allow(rustdoc::broken_intra_doc_links)]

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::config::LogFormat;

/// `mesh --version`: the version and the data planes this binary carries.
#[cfg(feature = "ebpf")]
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (data planes: userspace, nftables, ebpf)"
);
#[cfg(not(feature = "ebpf"))]
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (data planes: userspace, nftables; built without the eBPF programs)"
);

#[derive(Parser)]
#[command(
    name = "mesh",
    version = VERSION,
    about = "Routing mesh and L4 load balancer for a cluster of Linux hosts"
)]
pub struct Cli {
    /// The agent API: unix:PATH or http://HOST:PORT. The agent serves it; other
    /// commands connect to it. Default: unix:/run/mesh/mesh.sock as root.
    #[arg(long, env = "MESH_API", global = true, hide_env_values = true)]
    pub api: Option<String>,
    /// Bearer token for the API over TCP.
    #[arg(long, env = "MESH_API_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// Output: table, json, or a template such as '{{.Name}}\t{{.Vip}}' (list
    /// commands; `{{json .}}` is a row's JSON). Errors follow json too.
    #[arg(long, default_value = "table", global = true, value_parser = Format::parse)]
    pub format: Format,
    #[command(subcommand)]
    pub command: Command,
}

/// The global flags: they reach the agent or shape its answers.
const API_FLAGS: [&str; 3] = ["api", "token", "format"];

/// Subcommands that never talk to an agent's API as a client: the API flags mean
/// nothing to them. `demo` still takes a hidden `--api unix:PATH` for its own socket.
const OFFLINE_COMMANDS: [&str; 4] = ["keygen", "demo", "completions", "man"];

/// The command line as clap sees it, for parsing, completions and the man page.
///
/// The API flags are global, so `mesh --api X service ls` and `mesh service ls --api X`
/// both work. clap copies a global flag into every subcommand that has no argument of
/// that id yet, and offers no other opt-out (hiding the copies once built breaks clap's
/// lookup tables). So the offline subcommands get hidden copies of their own first.
pub fn command() -> clap::Command {
    let command = Cli::command();
    let hidden: Vec<clap::Arg> = command
        .get_arguments()
        .filter(|arg| API_FLAGS.contains(&arg.get_id().as_str()))
        .map(|arg| arg.clone().hide(true))
        .collect();
    OFFLINE_COMMANDS.iter().fold(command, |command, name| {
        command.mut_subcommand(name, |sub| sub.args(hidden.clone()))
    })
}

/// Parses the process's arguments, or exits with clap's message (and `--help`).
pub fn parse() -> Cli {
    let mut matches = command().get_matches();
    Cli::from_arg_matches_mut(&mut matches).unwrap_or_else(|e| e.exit())
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
    /// Go-template-like: `{{.Field}}` per row of a list command.
    Template(String),
}

impl Format {
    fn parse(text: &str) -> Result<Format, String> {
        match text {
            "table" => Ok(Format::Table),
            "json" => Ok(Format::Json),
            t if t.contains("{{") => Ok(Format::Template(t.to_string())),
            other => Err(format!(
                "{other:?}: use table, json, or a template such as '{{{{.Name}}}}'"
            )),
        }
    }
}

/// What every list command takes besides `--format`.
#[derive(Args, Clone, Default)]
pub struct ListArgs {
    /// Print only the first column (names or ids).
    #[arg(short, long)]
    pub quiet: bool,
    /// Keep rows whose KEY column is VALUE (`name` matches a prefix); repeat a key
    /// for either value, different keys for all.
    #[arg(short, long, value_name = "KEY=VALUE")]
    pub filter: Vec<String>,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the agent (the daemon).
    Agent(AgentArgs),
    /// Run an agent with three demo backends behind a published port.
    Demo(DemoArgs),
    /// Manage services.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Manage the tasks of a service.
    #[command(subcommand)]
    Task(TaskCommand),
    /// Show the agent's status.
    Status,
    /// Cluster members.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Print a new cluster key.
    Keygen,
    /// Print the shell completions for SHELL (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), e.g. `mesh man > mesh.1`.
    Man,
}

#[derive(Subcommand)]
pub enum NodeCommand {
    /// List the hosts of the cluster.
    #[command(visible_alias = "list")]
    Ls(ListArgs),
}

#[derive(Args)]
pub struct AgentArgs {
    /// TOML config file.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Validate the config and exit.
    #[arg(long)]
    pub check_config: bool,
    /// Also serve /metrics on this TCP address, for scrapers.
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    /// Where API-registered services and tasks are kept across restarts.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// This host's name. Default: the hostname.
    #[arg(long)]
    pub node_name: Option<String>,
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Serve DNS on this address (UDP and TCP); repeat for several. Adds to [dns] listen.
    #[arg(long)]
    pub dns: Vec<SocketAddr>,
    /// Do not put VIPs on an interface or listen on them (DNS still answers VIPs).
    #[arg(long)]
    pub no_vips: bool,
    /// The data plane: userspace, nftables, ebpf (VIPs by socket balancing, published
    /// ports by nftables) or auto (the best that works here). Overrides [proxy] dataplane.
    #[arg(long, value_parser = clap::value_parser!(mesh_core::plan::DataplaneChoice))]
    pub dataplane: Option<mesh_core::plan::DataplaneChoice>,
    /// Leave the kernel plane's rules in place at shutdown (for an upgrade).
    #[arg(long)]
    pub keep_dataplane: bool,
    /// Gossip (UDP) and sync (TCP) address. Default: 0.0.0.0:7946.
    #[arg(long)]
    pub bind: Option<SocketAddr>,
    /// The address peers reach this host at.
    #[arg(long)]
    pub advertise: Option<SocketAddr>,
    /// Seeds to join, HOST:PORT[,...]; retried until one answers.
    #[arg(long, value_delimiter = ',')]
    pub join: Vec<String>,
    /// Cluster key (base64, from `mesh keygen`); adds to [cluster] keys.
    #[arg(long, env = "MESH_CLUSTER_KEY", hide_env_values = true)]
    pub cluster_key: Option<String>,
    /// Accept peers without a cluster key: plaintext, unauthenticated. Without a key
    /// and without this, the agent runs alone.
    #[arg(long)]
    pub insecure: bool,
}

#[derive(Args)]
pub struct DemoArgs {
    /// The published port.
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// The DNS port on 127.0.0.1.
    #[arg(long, default_value_t = 5353)]
    pub dns_port: u16,
}

#[derive(Subcommand)]
pub enum ServiceCommand {
    /// Create a service.
    Create(Box<CreateArgs>),
    /// Change some settings of a service; the others stay as they are.
    Update(Box<UpdateArgs>),
    /// List services.
    #[command(visible_alias = "list")]
    Ls(ListArgs),
    /// Show a service in full (JSON).
    Inspect {
        /// The service.
        name: String,
    },
    /// Remove a service; its connections drain for its drain_timeout.
    #[command(visible_alias = "remove")]
    Rm {
        /// The service.
        name: String,
    },
    /// List the tasks of a service.
    Ps {
        /// The service.
        name: String,
        #[command(flatten)]
        list: ListArgs,
    },
}

#[derive(Args)]
pub struct CreateArgs {
    /// The service's name: a DNS label (lowercase letters, digits, '-').
    pub name: String,
    /// A port: [PUBLISHED:]TARGET[/udp], or published=P,target=T[,protocol=udp]
    /// [,mode=ingress][,name=NAME] (NAME is the SRV name). Repeat for several.
    #[arg(short = 'p', long = "publish", required = true)]
    pub ports: Vec<String>,
    #[command(flatten)]
    pub settings: ServiceSettings,
}

#[derive(Args)]
pub struct UpdateArgs {
    /// The service.
    pub name: String,
    /// Replaces every port, written as for `service create`. Repeat for several.
    #[arg(short = 'p', long = "publish")]
    pub ports: Vec<String>,
    #[command(flatten)]
    pub settings: ServiceSettings,
}

/// The settings `service create` and `service update` share. Each is optional: create
/// starts from the service defaults (written once, in `ServiceSpec`), update from the
/// service as it is.
#[derive(Args)]
pub struct ServiceSettings {
    /// vip (default) or dnsrr.
    #[arg(long, visible_alias = "endpoint-mode", value_parser = ["vip", "dnsrr"])]
    pub mode: Option<String>,
    /// round-robin (default) or least-conn.
    #[arg(long, value_parser = ["round-robin", "least-conn"])]
    pub balance: Option<String>,
    /// tcp, http:/PATH or none. Default: tcp (none for UDP-only services).
    #[arg(long)]
    pub health: Option<String>,
    /// Probe interval, e.g. 2s (default).
    #[arg(long)]
    pub health_interval: Option<String>,
    /// off (default), v1 or v2.
    #[arg(long, value_parser = ["off", "v1", "v2"])]
    pub proxy_protocol: Option<String>,
    /// keep: only this host's tasks take its connections, and they see the client's
    /// address (needs the nftables plane). any (default): tasks on every host.
    #[arg(long, value_parser = ["any", "keep"])]
    pub client_ip: Option<String>,
    /// e.g. 30s (default).
    #[arg(long)]
    pub drain_timeout: Option<String>,
    /// e.g. 10m, or none (default).
    #[arg(long)]
    pub idle_timeout: Option<String>,
    /// Per published port on each host. Default: no limit.
    #[arg(long)]
    pub max_connections: Option<u32>,
}

#[derive(Subcommand)]
pub enum TaskCommand {
    /// Register a task on this host: IP, IP:PORT or [IPv6]:PORT.
    Add {
        /// The service.
        service: String,
        /// IP, IP:PORT or [IPv6]:PORT; without a port, the service's target port.
        address: String,
        /// The task's id. Default: <service>.<host>.<n>, unique in the cluster.
        #[arg(long)]
        id: Option<String>,
    },
    /// Remove a task; its connections drain for the service's drain_timeout.
    #[command(visible_alias = "remove")]
    Rm {
        /// The service.
        service: String,
        /// The task's id.
        id: String,
    },
    /// Stop sending new connections to a task; existing ones may finish.
    Drain {
        /// The service.
        service: String,
        /// The task's id.
        id: String,
    },
    /// Send new connections to a drained task again.
    Undrain {
        /// The service.
        service: String,
        /// The task's id.
        id: String,
    },
}
