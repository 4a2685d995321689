//! N hosts on one bridge, each in its own network namespace with its own address,
//! plus a client namespace. The bridge lives in a "switch" namespace, so nothing
//! touches the host's own network, and parallel tests never share a link name.

use std::process::Command;

use crate::netns::Netns;

pub struct Host {
    pub ns: Netns,
    pub ip: String,
    /// The switch-side veth of this host, for cutting its link.
    pub port: String,
}

pub struct Cluster {
    pub switch: Netns,
    pub hosts: Vec<Host>,
    pub client: Host,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn attach(switch: &Netns, ns: Netns, index: usize, addr: &str) -> Host {
    let port = format!("p{index}");
    switch
        .add_veth(&port, &ns, "eth0")
        .unwrap_or_else(|e| panic!("{e}"));
    ip(&[
        "-n",
        &switch.name,
        "link",
        "set",
        &port,
        "master",
        "br0",
        "up",
    ]);
    ip(&[
        "-n",
        &ns.name,
        "addr",
        "add",
        &format!("{addr}/24"),
        "dev",
        "eth0",
    ]);
    ip(&["-n", &ns.name, "link", "set", "eth0", "up"]);
    Host {
        ns,
        ip: addr.to_string(),
        port,
    }
}

impl Cluster {
    /// Hosts get 10.77.0.1.. and the client 10.77.0.200.
    pub fn new(hosts: usize) -> Cluster {
        let switch = Netns::new();
        ip(&["-n", &switch.name, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &switch.name, "link", "set", "br0", "up"]);
        let hosts = (0..hosts)
            .map(|i| attach(&switch, Netns::new(), i, &format!("10.77.0.{}", i + 1)))
            .collect();
        let client = attach(&switch, Netns::new(), 200, "10.77.0.200");
        Cluster {
            switch,
            hosts,
            client,
        }
    }

    /// Takes host `i`'s link down (a partition) or back up.
    pub fn link(&self, i: usize, up: bool) {
        ip(&[
            "-n",
            &self.switch.name,
            "link",
            "set",
            &self.hosts[i].port,
            if up { "up" } else { "down" },
        ]);
    }

    /// The `[cluster]` section of host `i`'s config: gossip on its address, joining
    /// through host 0, sealed with `key`.
    pub fn cluster_config(&self, i: usize, key: &str) -> String {
        let me = &self.hosts[i].ip;
        let join = if i == 0 {
            String::new()
        } else {
            format!("join = [\"{}:7946\"]\n", self.hosts[0].ip)
        };
        format!(
            "[cluster]\nbind = \"{me}:7946\"\n{join}keys = [\"{key}\"]\nanti_entropy = \"2s\"\n"
        )
    }

    /// GET / from the client namespace; the body, or None on failure.
    pub fn get(&self, addr: &str) -> Option<String> {
        self.client_run("--get", addr)
    }

    /// GET / from the client namespace: the task that answered and the client address
    /// it saw. Panics on failure.
    pub fn who(&self, addr: &str) -> (String, String) {
        let line = self
            .client_run("--who", addr)
            .unwrap_or_else(|| panic!("GET {addr} from the client failed"));
        let (task, client) = line
            .split_once(' ')
            .unwrap_or_else(|| panic!("GET {addr}: {line:?}"));
        (task.to_string(), client.to_string())
    }

    /// The test client `mesh-test-backend MODE ADDR` in the client namespace; its
    /// output, or None on failure.
    fn client_run(&self, mode: &str, addr: &str) -> Option<String> {
        let out = self
            .client
            .ns
            .command(crate::backend_bin())
            .args([mode, addr])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}
