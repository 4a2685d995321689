//! The agent daemon and its CLI, as a library: the `mesh` binary is `main` below, and
//! the fuzz targets reach the parsers (config, API bodies) through it.

mod api;
mod cli;
mod client;
mod cluster_metrics;
mod commands;
pub mod config;
mod daemon;
mod demo;
mod events;
pub mod fuzzing;
mod json_log;
mod listing;
mod paths;
mod prober;
mod store;
mod table;

use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use cli::{AgentArgs, Cli, Command};
use client::{Client, Endpoint};
use config::{AgentConfig, LogFormat};

pub use mesh_core::error::chain as error_chain;

fn init_logging(format: LogFormat) {
    // hyper and axum log every connection at debug; keep them quiet unless asked.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,hyper=warn,axum=warn"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Json => builder.event_format(json_log::JsonLines).init(),
        LogFormat::Text => builder.init(),
    }
}

/// The `mesh` binary.
pub fn main() -> ExitCode {
    let cli = cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let json = cli.format == cli::Format::Json;
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the context chain joined, as the CLI promises; with
            // `--format json`, a JSON object a script can read.
            let message = format!("{e:#}").replace('\n', " ");
            if json {
                eprintln!("{}", serde_json::json!({ "error": message }));
            } else {
                eprintln!("error: {message}");
            }
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let client = || -> Result<Client> {
        let endpoint = match &cli.api {
            Some(a) => Endpoint::parse(a)?,
            None => Endpoint::Unix(paths::default_socket()),
        };
        Ok(Client {
            endpoint,
            token: cli.token.clone(),
        })
    };
    match cli.command {
        Command::Agent(ref args) => agent(&cli, args).await,
        Command::Demo(ref args) => {
            init_logging(LogFormat::Text);
            demo::run(args.port, args.dns_port, cli.api.clone()).await
        }
        Command::Service(cmd) => commands::service(&client()?, &cli.format, cmd).await,
        Command::Task(cmd) => commands::task(&client()?, &cli.format, cmd).await,
        Command::Status => commands::status(&client()?, &cli.format).await,
        Command::Node(cli::NodeCommand::Ls(ref list)) => {
            commands::nodes(&client()?, &cli.format, list).await
        }
        Command::Keygen => {
            println!("{}", mesh_gossip::crypto::generate_key());
            Ok(())
        }
        // Both are made in memory first: clap_complete panics on a failed write, and
        // a closed pipe (`| head`) is not worth a panic.
        Command::Completions { shell } => {
            let mut command = cli::command();
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut command, "mesh", &mut out);
            print_bytes(&out)
        }
        Command::Man => {
            let command = cli::command();
            let mut out = Vec::new();
            clap_mangen::Man::new(command)
                .render(&mut out)
                .context("rendering the man page")?;
            print_bytes(&out)
        }
    }
}

/// Writes `bytes` to stdout; a reader that went away early is not an error.
fn print_bytes(bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("writing to stdout"),
        _ => Ok(()),
    }
}

async fn agent(cli: &Cli, args: &AgentArgs) -> Result<()> {
    // Caught first thing, so that a SIGTERM during start-up is a clean stop after it.
    let signals = daemon::Termination::catch().context("cannot catch SIGTERM and SIGINT")?;
    let config = match &args.config {
        Some(path) => AgentConfig::load(path)?,
        None => AgentConfig::default(),
    };
    let log_format = config.log_format;
    let mut socket = config
        .api
        .socket
        .clone()
        .unwrap_or_else(paths::default_socket);
    let mut tcp_api = config.api.tcp;
    match cli.api.as_deref().map(Endpoint::parse).transpose()? {
        Some(Endpoint::Unix(p)) => socket = p,
        Some(Endpoint::Tcp(a)) => {
            tcp_api = Some(a.parse().with_context(|| {
                format!("--api http://{a}: expected http://IP:PORT to listen on")
            })?)
        }
        None => {}
    }
    let token = match (&cli.token, &config.api.token, &config.api.token_file) {
        (Some(t), _, _) | (None, Some(t), _) => Some(t.clone()),
        (None, None, Some(f)) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("api.token_file {}", f.display()))?
                .trim()
                .to_string(),
        ),
        _ => None,
    };
    if token.as_deref().is_some_and(|t| t.trim().is_empty()) {
        bail!(
            "the API token is empty or blank; use a long random string (e.g. from `mesh keygen`)"
        );
    }
    let node_name = args
        .node_name
        .clone()
        .or(config.node_name.clone())
        .unwrap_or_else(paths::hostname);
    mesh_core::name::check_task_id("--node-name", &node_name)?;
    let docker = config.docker.clone();
    let mut settings = daemon::Settings {
        node_name,
        data_dir: args
            .data_dir
            .clone()
            .or(config.data_dir.clone())
            .unwrap_or_else(paths::default_data_dir),
        socket,
        tcp_api,
        token,
        metrics: args.metrics.or(config.metrics.listen),
        proxy: {
            let mut proxy = config.proxy;
            if let Some(d) = args.dataplane {
                proxy.dataplane = d;
            }
            proxy.keep_dataplane |= args.keep_dataplane;
            proxy
        },
        dns: {
            let mut dns = config.dns;
            dns.listen.extend(args.dns.iter().copied());
            dns
        },
        vip: {
            let mut vip = config.vip;
            vip.manage &= !args.no_vips;
            vip
        },
        cluster: {
            let mut c = config.cluster;
            if let Some(b) = args.bind {
                c.bind = b;
            }
            if args.advertise.is_some() {
                c.advertise = args.advertise;
            }
            c.join.extend(args.join.iter().cloned());
            if let Some(k) = &args.cluster_key {
                c.keys.insert(0, k.clone());
            }
            c.insecure |= args.insecure;
            c
        },
        services: config.service.into_iter().map(|s| s.into_inner()).collect(),
        tasks: config.task.into_iter().map(|t| t.into_inner()).collect(),
        docker: None,
        ebpf: config.ebpf,
    };
    settings.docker = docker_target(&docker, &settings.cluster);
    // Everything the agent would refuse at start is refused here too, flags included.
    daemon::check(&settings)?;
    if args.check_config {
        let what = args
            .config
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "(no --config)".into());
        println!(
            "{what}: ok ({} services, {} tasks)",
            settings.services.len(),
            settings.tasks.len()
        );
        return Ok(());
    }
    init_logging(args.log_format.or(log_format).unwrap_or(LogFormat::Text));

    let running = daemon::start(settings).await?;
    signals.wait().await;
    running.shutdown().await;
    Ok(())
}

/// The Docker source's target, when `[docker] enabled`: the engine from the config or
/// `DOCKER_HOST`, and this host's address from the config or the cluster's.
fn docker_target(
    docker: &mesh_docker::DockerConfig,
    cluster: &config::ClusterConfig,
) -> Option<mesh_docker::Target> {
    if !docker.enabled {
        return None;
    }
    let cluster_ip = cluster
        .advertise
        .map(|a| a.ip())
        .or(Some(cluster.bind.ip()))
        .filter(|ip| !ip.is_unspecified());
    Some(mesh_docker::Target {
        host: docker.endpoint(std::env::var("DOCKER_HOST").ok().as_deref()),
        settings: mesh_docker::Settings {
            address: docker.address,
            compose: docker.compose,
            network: docker.network.clone(),
            host_ip: docker.host_address.or(cluster_ip),
        },
    })
}
