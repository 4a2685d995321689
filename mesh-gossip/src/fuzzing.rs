//! Entry points for the fuzz targets (in `fuzz/`) and the mutation tests that run in
//! every CI: what anyone on the network can send, through the real code. Nothing here
//! may panic, whatever the bytes.

use std::time::Duration;

use mesh_core::{
    Health, PortSpec, Replica, ReplicaConfig, ServiceSpec, TaskSource, TaskSpec, VipPool,
};

use crate::anti_entropy::{self, Back, Hello, Reply};
use crate::crypto::Keyring;
use crate::identity::NodeIdentity;
use crate::node::{GossipConfig, GossipNode};
use crate::transport::frame;
use crate::versions::VersionNote;

fn identity(name: &str, port: u16) -> NodeIdentity {
    NodeIdentity {
        name: name.into(),
        addr: ([127, 0, 0, 1], port).into(),
        generation: 1,
    }
}

fn config() -> GossipConfig {
    GossipConfig {
        probe_period: Duration::from_millis(200),
        probe_rtt: Duration::from_millis(100),
        ..GossipConfig::default()
    }
}

/// A gossip node and a keyring, fed datagrams as the transport would: first the
/// envelope is opened, then (for plaintext) foca decodes the message and the custom
/// broadcasts in it.
pub struct Datagrams {
    node: GossipNode,
    keyring: Keyring,
}

impl Default for Datagrams {
    fn default() -> Self {
        let key = crate::crypto::generate_key();
        let mut node = GossipNode::new(identity("a", 1), &config(), 1);
        node.start(&[]);
        let _ = node.take_outbox();
        Self {
            node,
            keyring: Keyring::new("fuzz", &[key]).expect("a generated key"),
        }
    }
}

impl Datagrams {
    pub fn feed(&mut self, data: &[u8]) {
        let _ = self.keyring.open(data);
        let _ = self.node.handle_data(data);
        // What a node wants done is bounded by what it was given; drop it.
        let _ = self.node.take_outbox();
    }

    /// Real datagrams: two nodes meeting, and a delta broadcast.
    pub fn seeds() -> Vec<Vec<u8>> {
        let mut a = GossipNode::new(identity("a", 1), &config(), 1);
        let mut b = GossipNode::new(identity("b", 2), &config(), 2);
        let mut seeds = Vec::new();
        b.start(&[identity("a", 1).addr]);
        let mut replica = sample_replica("b");
        let deltas = replica
            .create_service(ServiceSpec::new("x", vec![PortSpec::tcp(Some(9), 9)]), 1)
            .unwrap_or_default();
        for round in 0..4 {
            if round == 1 {
                // Once the two have met: a host alone gossips nothing.
                b.publish(&deltas);
            }
            for (_, data) in b.take_outbox().sends {
                let _ = a.handle_data(&data);
                seeds.push(data);
            }
            for (_, data) in a.take_outbox().sends {
                let _ = b.handle_data(&data);
                seeds.push(data);
            }
        }
        seeds
    }
}

/// A replica with services and tasks, so sync items have something to meet.
pub fn sample_replica(node: &str) -> Replica {
    let mut r = Replica::new(node, 1, VipPool::default(), ReplicaConfig::default());
    for (name, port) in [("web", 8080), ("db", 5432)] {
        let _ = r.create_service(
            ServiceSpec::new(name, vec![PortSpec::tcp(Some(port), 80)]),
            1,
        );
        for i in 0..3 {
            let task = TaskSpec::new(
                name,
                &format!("{name}.{i}"),
                format!("10.0.0.{i}").parse().expect("ip"),
            );
            let _ = r.add_task(task, TaskSource::Api, 2);
            r.set_health(name, &format!("{name}.{i}"), Health::Healthy, 3);
        }
    }
    r
}

/// One anti-entropy frame (after the envelope was opened): the first byte picks which
/// of the three it claims to be, the rest is its encoding (with the hosts' versions
/// after it, `transport::frame`). It runs through the step that would take
/// it, against `replica`, which must stay consistent.
pub fn sync_frame(replica: &mut Replica, data: &[u8]) {
    let Some((kind, body)) = data.split_first() else {
        return;
    };
    match kind % 3 {
        0 => {
            if let Ok(hello) = frame::decode::<Hello>(body) {
                let _ = anti_entropy::reply(replica, &hello.message, Vec::new());
            }
        }
        1 => {
            if let Ok(reply) = frame::decode::<Reply>(body) {
                let _ = anti_entropy::absorb_reply(replica, reply.message, 10);
            }
        }
        _ => {
            if let Ok(back) = frame::decode::<Back>(body) {
                anti_entropy::absorb(replica, back.message, 10);
            }
        }
    }
    // Debug builds (fuzzing, tests) check the snapshot against a rebuilt one here.
    let _ = replica.snapshot();
}

/// Real frames of each kind, between two replicas that differ.
pub fn sync_seeds() -> Vec<Vec<u8>> {
    let a = sample_replica("a");
    let mut b = Replica::new("b", 1, VipPool::default(), ReplicaConfig::default());
    let _ = b.create_service(ServiceSpec::new("api", vec![PortSpec::tcp(None, 81)]), 1);
    let hello = anti_entropy::hello(&b, Vec::new());
    let reply = anti_entropy::reply(&a, &hello, Vec::new());
    let back = b.sync_for(&reply.digest);
    let versions = [VersionNote {
        host: "b".into(),
        generation: 1,
        version: "0.1.0".into(),
    }];
    let seed = |kind: u8, body: Vec<u8>| [vec![kind], body].concat();
    vec![
        seed(0, frame::encode(&hello, &versions).expect("encode")),
        seed(1, frame::encode(&reply, &versions).expect("encode")),
        seed(2, frame::encode(&back, &[]).expect("encode")),
    ]
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
        mesh_core::mutate::write_seeds("gossip_datagram", &Datagrams::seeds()).unwrap();
        mesh_core::mutate::write_seeds("sync_frame", &sync_seeds()).unwrap();
    }

    /// The fuzz targets' deterministic stand-in, run in every CI.
    #[test]
    fn mutated_datagrams_never_panic() {
        let seeds = Datagrams::seeds();
        assert!(seeds.len() >= 2, "real datagrams to start from");
        let mut target = Datagrams::default();
        for seed in &seeds {
            target.feed(seed);
        }
        assert!(
            !target.node.members().is_empty(),
            "the seeds reach foca: it learned a member"
        );
        let mut m = Mutator::new(11);
        for _ in 0..20_000 {
            target.feed(&m.mutate(&seeds));
        }
    }

    #[test]
    fn mutated_sync_frames_never_panic_or_corrupt_the_table() {
        let seeds = sync_seeds();
        let mut replica = sample_replica("x");
        let before = replica.version();
        for seed in &seeds {
            sync_frame(&mut replica, seed);
        }
        assert!(replica.version() > before, "the seeds reach the replica");
        let mut m = Mutator::new(13);
        for _ in 0..5_000 {
            sync_frame(&mut replica, &m.mutate(&seeds));
        }
    }
}
