//! The entry point of the `docker_labels` fuzz target (in `fuzz/`) and of the
//! mutation test every CI runs: what a container engine hands the source, through
//! the real code. Nothing may panic, and every container skipped is named with the
//! label that made it so.

use std::collections::{BTreeMap, BTreeSet};

use mesh_core::{Replica, ReplicaConfig, TaskSource, VipPool};

use crate::container::{Container, NetworkAddress};
use crate::observe::{AddressMode, Settings, observe};

/// The first byte picks what the rest is:
/// - even: containers' labels, one `key=value` per line, a blank line between
///   containers; observed in both address modes, with Compose on or off, and the
///   result written into a table as the agent writes it;
/// - odd: an engine's answer to `GET /containers/{id}/json`, turned into a container.
pub fn engine_input(data: &[u8]) {
    let Some((kind, rest)) = data.split_first() else {
        return;
    };
    if kind % 2 == 1 {
        let _ = crate::engine::container_from_json(rest);
        return;
    }
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let containers: BTreeMap<String, Container> = text
        .split("\n\n")
        .take(64)
        .enumerate()
        .map(|(i, block)| {
            let labels = block
                .lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let c = Container {
                id: format!("{i:064x}"),
                name: format!("c{i}"),
                labels,
                running: true,
                networks: BTreeMap::from([(
                    "bridge".to_string(),
                    NetworkAddress {
                        v4: Some(std::net::IpAddr::from([172, 17, 0, 2 + i as u8])),
                        v6: None,
                    },
                )]),
                ..Container::default()
            };
            (c.id.clone(), c)
        })
        .collect();
    let stopping: BTreeSet<String> = containers.keys().step_by(3).cloned().collect();
    for address in [AddressMode::Container, AddressMode::HostPort] {
        for compose in [false, true] {
            let settings = Settings {
                address,
                compose,
                network: None,
                host_ip: Some([10, 0, 0, 1].into()),
            };
            let o = observe(&containers, &stopping, &settings);
            for skip in &o.skipped {
                let line = skip.to_string();
                assert!(
                    line.starts_with(&format!("container {}: ", skip.container)),
                    "{line}"
                );
                assert!(line.contains(&skip.error.label), "{line}");
            }
            let mut replica = Replica::new("fuzz", 1, VipPool::default(), ReplicaConfig::default());
            for wanted in o.services.values() {
                let _ = replica.create_service(wanted.spec.clone(), 1);
            }
            let out = replica.replace_source(TaskSource::Docker, o.tasks.clone(), 2);
            let _ = (out, replica.snapshot());
        }
    }
}

/// Inputs to start from: containers with every label, good and bad, and an engine's
/// answer as Docker 20.10 writes it.
pub fn seeds() -> Vec<Vec<u8>> {
    let labels = "mesh.service=web\nmesh.port=80\nmesh.publish=8080:80\nmesh.health=http:/ok\nmesh.mode=vip\n\nmesh.service=web\nmesh.port=eighty\n\ncom.docker.compose.service=api\nmesh.publish=9090:90/udp\n\nmesh.service=db\nmesh.mode=dnsrr\nmesh.network=back\n\nmesh.prot=1\n";
    let inspect = r#"{"Id":"1d9f509250bb2f5c0f1e6c1c3f2b4a8f5e7d9c0b1a2f3e4d5c6b7a8f9e0d1c2b","Name":"/web-1","State":{"Status":"running","Running":true,"Paused":false,"Health":{"Status":"healthy","FailingStreak":0,"Log":[]}},"Config":{"Labels":{"mesh.service":"web"},"ExposedPorts":{"80/tcp":{}},"StopSignal":"SIGQUIT"},"NetworkSettings":{"Ports":{"80/tcp":[{"HostIp":"0.0.0.0","HostPort":"18080"},{"HostIp":"::","HostPort":"18080"}]},"Networks":{"bridge":{"IPAddress":"172.17.0.2","GlobalIPv6Address":"","IPPrefixLen":16}}}}"#;
    vec![
        [vec![0u8], labels.as_bytes().to_vec()].concat(),
        [vec![1u8], inspect.as_bytes().to_vec()].concat(),
    ]
}

#[cfg(test)]
mod tests {
    use mesh_core::mutate::Mutator;

    use super::*;

    /// Writes the seeds where `scripts/fuzz.sh` starts the fuzzer from
    /// (`MESH_FUZZ_SEEDS`); does nothing without it.
    #[test]
    #[ignore = "run by scripts/fuzz.sh"]
    fn write_fuzz_seeds() {
        mesh_core::mutate::write_seeds("docker_labels", &seeds()).unwrap();
    }

    #[test]
    fn the_seeds_mean_what_they_say() {
        let inspect = &seeds()[1][1..];
        let c = crate::engine::container_from_json(inspect).unwrap();
        assert_eq!((c.name.as_str(), c.short_id()), ("web-1", "1d9f509250bb"));
        assert_eq!(c.health, Some(mesh_core::Health::Healthy));
        assert_eq!(c.exposed, [(80, mesh_core::Protocol::Tcp)]);
        assert_eq!(c.published.len(), 2);
        assert!(
            c.published
                .iter()
                .all(|p| p.host_ip.unwrap().is_unspecified())
        );
        assert_eq!(c.networks["bridge"].v4, Some([172, 17, 0, 2].into()));
        assert_eq!(c.stop_signal.as_deref(), Some("SIGQUIT"));
    }

    #[test]
    fn mutated_engine_input_never_panics() {
        let seeds = seeds();
        let mut m = Mutator::new(23);
        for _ in 0..20_000 {
            engine_input(&m.mutate(&seeds));
        }
    }
}
