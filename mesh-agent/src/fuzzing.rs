//! Entry points for the fuzz targets (in `fuzz/`) and the mutation tests that run in
//! every CI: a config file and API request bodies, through the real parsers and the
//! real write path. Nothing here may panic, and every error must name where it is.

use mesh_api::NewTask;
use mesh_core::{Replica, ReplicaConfig, ServiceSpec, TaskSource, TaskSpec, VipPool};

use crate::api::error::parse;
use crate::config::AgentConfig;
use crate::table::write::{Write, apply};

/// A config file's text: accepted, or refused with an error that names the file.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = AgentConfig::parse(text, "fuzz.toml") {
        let message = e.to_string();
        assert!(message.starts_with("fuzz.toml"), "{message}");
    }
}

/// An API request body: the first byte picks the endpoint (create a service, update
/// one, add a task), the rest is the body, parsed as the API parses it and written
/// through the table's write path into a table that already has a service.
pub fn api_body(data: &[u8]) {
    let Some((kind, body)) = data.split_first() else {
        return;
    };
    let body = axum::body::Bytes::copy_from_slice(body);
    let mut replica = Replica::new("fuzz", 1, VipPool::default(), ReplicaConfig::default());
    let web = ServiceSpec::new("web", vec![mesh_core::PortSpec::tcp(Some(8080), 80)]);
    let _ = apply(&mut replica, &mut None, Write::CreateService(web), 1);
    let write = match kind % 3 {
        0 => parse::<ServiceSpec>(&body).map(Write::CreateService),
        1 => parse::<ServiceSpec>(&body).map(Write::UpdateService),
        _ => parse::<NewTask>(&body).map(|t| Write::AddTask {
            task: TaskSpec {
                service: "web".into(),
                id: t.id,
                ip: t.ip,
                port: t.port,
                state: t.state,
                observed: None,
            },
            source: TaskSource::Api,
        }),
    };
    if let Ok(write) = write {
        let _ = apply(&mut replica, &mut None, write, 2);
    }
    let _ = replica.snapshot();
}

/// Valid configs and bodies to start from.
pub fn config_seeds() -> Vec<Vec<u8>> {
    [
        "node_name = \"h1\"\n[api]\ntcp = \"127.0.0.1:7947\"\ntoken = \"secret\"\n[proxy]\nconnect_timeout = \"500ms\"\n[[service]]\nname = \"web\"\nports = [{ published = 8080, target = 80 }]\nhealth = { check = \"http\", path = \"/healthz\" }\n[[task]]\nservice = \"web\"\nid = \"web.1\"\nip = \"10.0.0.1\"\n",
        "[dns]\nlisten = [\"127.0.0.1:5353\"]\nallow = [\"10.0.0.0/8\"]\n[vip]\nipv6_cidr = \"none\"\nipv4_cidr = \"10.9.0.0/16\"\n[cluster]\nprobe_period = \"1s\"\njoin = [\"10.0.0.2:7946\"]\n",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

pub fn api_seeds() -> Vec<Vec<u8>> {
    [
        (0u8, r#"{"name":"api","ports":[{"published":9090,"target":80,"protocol":"tcp","name":"http"}],"mode":"vip","balance":"least-conn","health":{"check":"http","path":"/","interval":"2s"},"drain_timeout":"5s","idle_timeout":"none","max_connections":10}"#),
        (1, r#"{"name":"web","ports":[{"target":80},{"target":53,"protocol":"udp"}],"mode":"dnsrr"}"#),
        (2, r#"{"ip":"10.0.0.5","port":8080,"id":"web.1","state":"draining"}"#),
        (2, r#"{"ip":"fd00::5"}"#),
    ]
    .iter()
    .map(|(k, s)| [vec![*k], s.as_bytes().to_vec()].concat())
    .collect()
}

#[cfg(test)]
mod tests {
    use mesh_core::mutate::Mutator;

    use super::*;

    /// Writes the seeds where `scripts/fuzz.sh` starts the fuzzers from
    /// (`MESH_FUZZ_SEEDS`); does nothing without it.
    #[test]
    #[ignore = "run by scripts/fuzz.sh"]
    fn write_fuzz_seeds() {
        mesh_core::mutate::write_seeds("config_toml", &config_seeds()).unwrap();
        mesh_core::mutate::write_seeds("api_body", &api_seeds()).unwrap();
    }

    #[test]
    fn mutated_configs_never_panic() {
        let seeds = config_seeds();
        for s in &seeds {
            let text = std::str::from_utf8(s).unwrap();
            AgentConfig::parse(text, "fuzz.toml").expect("the seeds are valid");
        }
        let mut m = Mutator::new(17);
        for _ in 0..20_000 {
            config(&m.mutate(&seeds));
        }
    }

    #[test]
    fn mutated_api_bodies_never_panic() {
        let seeds = api_seeds();
        let mut m = Mutator::new(19);
        for _ in 0..20_000 {
            api_body(&m.mutate(&seeds));
        }
    }
}
