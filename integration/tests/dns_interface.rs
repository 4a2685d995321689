//! `[dns] listen` naming an interface, as for a Docker bridge (`listen = ["docker0"]`):
//! inside a network namespace the agent serves DNS on the bridge's address, answers a
//! "container" on the bridge's subnet (another namespace, attached by a veth), and
//! still refuses clients outside it. An interface that is missing or has no usable
//! address stops the agent at start, with an error naming `dns.listen` and the
//! interface.

use std::process::Command;

use integration::*;

const BRIDGE: &str = "mdbr0";
const BRIDGE_IP: &str = "10.66.0.1";

fn have_dig() -> bool {
    Command::new("dig").arg("-v").output().is_ok()
}

/// Runs `ip ARGS` inside `ns`, failing the test if it fails.
fn ip(ns: &Netns, args: &[&str]) {
    let out = Command::new("ip")
        .args(["-n", &ns.name])
        .args(args)
        .output()
        .expect("run ip (iproute2)");
    assert!(
        out.status.success(),
        "ip -n {} {}: {}",
        ns.name,
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A bridge `name` in `ns`, up, with `addr` (CIDR notation) on it, if given.
fn bridge(ns: &Netns, name: &str, addr: Option<&str>) {
    ip(ns, &["link", "add", name, "type", "bridge"]);
    if let Some(addr) = addr {
        ip(ns, &["addr", "add", addr, "dev", name]);
    }
    ip(ns, &["link", "set", name, "up"]);
}

/// `dig @10.66.0.1 -p PORT ARGS` inside `ns`: its whole output (not `+short`, so that
/// the status can be read).
fn dig(ns: &Netns, port: u16, args: &[&str]) -> String {
    let port = port.to_string();
    let mut all = vec![
        "@10.66.0.1",
        "-p",
        &port,
        "+time=2",
        "+tries=2",
        "+nocomments",
        "+nostats",
        "+nocmd",
    ];
    all.extend_from_slice(args);
    let out = ns.command("dig").args(&all).output().expect("run dig");
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The address in the answer section of `dig` output for `name`, if any.
fn answer(output: &str, name: &str) -> Option<String> {
    output
        .lines()
        .filter(|l| !l.starts_with(';'))
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().last())
        .map(str::to_string)
}

#[test]
fn dns_serves_on_a_bridge_named_in_listen_and_allows_its_subnet() {
    if skip_unless_root("dns_serves_on_a_bridge_named_in_listen_and_allows_its_subnet") {
        return;
    }
    if !have_dig() {
        eprintln!(
            "SKIPPED dns_serves_on_a_bridge_named_in_listen_and_allows_its_subnet: dig is not installed (apt-get install bind9-dnsutils)"
        );
        return;
    }
    // The host, with a bridge like docker0, and a "container" attached to it.
    let host = Netns::new();
    let container = Netns::new();
    bridge(&host, BRIDGE, Some(&format!("{BRIDGE_IP}/24")));
    host.add_veth("mdveth0", &container, "eth0").unwrap();
    ip(&host, &["link", "set", "mdveth0", "master", BRIDGE, "up"]);
    ip(&container, &["addr", "add", "10.66.0.2/24", "dev", "eth0"]);
    // A second address outside the bridge's subnet, routed back through the bridge,
    // for a client that must be refused.
    ip(&container, &["addr", "add", "10.77.0.2/24", "dev", "eth0"]);
    ip(&container, &["link", "set", "eth0", "up"]);
    ip(&host, &["route", "add", "10.77.0.0/24", "dev", BRIDGE]);

    let port = 5353;
    let config = format!("[dns]\nlisten = [\"{BRIDGE}:{port}\"]\nupstreams = []\n");
    let agent = Agent::start_in(&host, Some(&config), &[]);
    assert_ok(agent.cli(&[
        "service", "create", "web", "-p", "8080:80", "--health", "none",
    ]));
    let (_, service) = agent.http("GET", "/v1/services/web", None);
    let vip = service["vips"]["v4"]
        .as_str()
        .expect("a v4 VIP")
        .to_string();

    // The agent serves on the bridge's address, and says so.
    let status = agent.cli_json(&["status"]);
    assert_eq!(
        status["dns"],
        json!([format!("{BRIDGE_IP}:{port}")]),
        "{status}"
    );
    let log = agent.log();
    let line = log
        .lines()
        .find(|l| l.contains("DNS serves on the interface"))
        .unwrap_or_else(|| panic!("no line for the interface:\n{log}"));
    assert!(
        line.contains(&format!("interface={BRIDGE}"))
            && line.contains(&format!("{BRIDGE_IP}:{port}"))
            && line.contains("allowed=10.66.0.0/24"),
        "{line}"
    );

    // From the host itself (source 10.66.0.1) and from the container (10.66.0.2):
    // both are in the bridge's subnet, which `allow` (loopback by default) now has.
    let from_host = eventually("DNS on the bridge answers web.mesh", || {
        let out = dig(&host, port, &["web.mesh"]);
        answer(&out, "web.mesh.").filter(|a| *a == vip).map(|_| out)
    });
    assert!(from_host.contains(&vip), "{from_host}");
    let from_container = dig(&container, port, &["web.mesh"]);
    assert_eq!(
        answer(&from_container, "web.mesh.").as_deref(),
        Some(vip.as_str()),
        "{from_container}"
    );
    // Over TCP too.
    let tcp = dig(&container, port, &["+tcp", "web.mesh"]);
    assert_eq!(
        answer(&tcp, "web.mesh.").as_deref(),
        Some(vip.as_str()),
        "{tcp}"
    );

    // A client outside the subnet is still refused: the subnet was added, not "any".
    let outside = dig(
        &container,
        port,
        &["-b", "10.77.0.2", "+comments", "web.mesh"],
    );
    assert!(outside.contains("status: REFUSED"), "{outside}");

    // Nothing is served on the host's other addresses.
    let loopback = host
        .command("dig")
        .args(["@127.0.0.1", "-p", &port.to_string(), "+time=1", "+tries=1"])
        .arg("web.mesh")
        .output()
        .unwrap();
    let loopback = String::from_utf8_lossy(&loopback.stdout);
    assert!(
        !loopback.contains("status:") && answer(&loopback, "web.mesh.").is_none(),
        "{loopback}"
    );
}

/// Runs `mesh agent` with `config` inside `ns`, expecting it to refuse to start;
/// returns its stderr.
fn refuses_in(ns: &Netns, config: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mesh.toml");
    std::fs::write(&path, config).unwrap();
    let api = format!("unix:{}", dir.path().join("mesh.sock").display());
    let data = dir.path().join("data");
    let err = agent_refuses_in(
        ns,
        &[
            "--config",
            path.to_str().unwrap(),
            "--api",
            &api,
            "--data-dir",
            data.to_str().unwrap(),
            "--no-vips",
            "--bind",
            "127.0.0.1:0",
        ],
    );
    assert!(
        !err.contains("mesh agent started"),
        "it refused before starting: {err}"
    );
    err
}

#[test]
fn an_interface_in_dns_listen_that_is_missing_or_has_no_address_stops_the_agent() {
    if skip_unless_root(
        "an_interface_in_dns_listen_that_is_missing_or_has_no_address_stops_the_agent",
    ) {
        return;
    }
    let ns = Netns::new();
    let err = refuses_in(&ns, "[dns]\nlisten = [\"127.0.0.1:5353\", \"mdnone0\"]\n");
    let line = err
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line: {err}"));
    assert!(
        line.contains("dns.listen: interface \"mdnone0\" does not exist on this host"),
        "{line}"
    );

    // A bridge with no address of its own: at most a link-local IPv6 address, which
    // is not served on.
    bridge(&ns, "mdbr1", None);
    let err = refuses_in(&ns, "[dns]\nlisten = [\"mdbr1:5353\"]\n");
    let line = err
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line: {err}"));
    assert!(
        line.contains("dns.listen: interface \"mdbr1\" has no IPv4 or global IPv6 address"),
        "{line}"
    );

    // A name Linux would refuse is refused with the config, naming the entry.
    let err = refuses_in(&ns, "[dns]\nlisten = [\"127.0.0.1:53\", \"dock er0\"]\n");
    assert!(
        err.contains("listen[1]: \"dock er0\" is neither an address:port nor an interface name"),
        "{err}"
    );
}
