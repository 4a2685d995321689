//! [`Ports`]: published ports at the TC hook. Loads `port_lb.bpf.o`, attaches its two
//! programs through tcx to each configured interface (ingress and egress), and with
//! `ebpf.port_hook = "xdp"` a third at XDP ahead of them; pins the links, and keeps
//! `mesh_ports` equal to the plan's published frontends.
//!
//! This is a fast path beside the plane that serves a published port (userspace or
//! nftables), not a replacement: a flow whose Maglev pick is this host's task is
//! taken to it in the kernel, with the client's address kept; a flow whose pick is
//! another host's task is sent to it from this host's address, when the route to the
//! task is through an attached interface (kept in `mesh_port_routes`). Any other
//! packet goes on to that plane, which also serves this host's own clients (their
//! packets never cross an interface's TC hook).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;

use aya::maps::{Array, HashMap, MapData, PerCpuArray, PerCpuHashMap};
use mesh_core::error::chain;
use mesh_core::plan::Features;
use mesh_core::{Listen, Plan};

use crate::config::PortHook;
use crate::port_layout::{
    FlowKey, PickKey, PortConfig, PortFrontend, PortKey, PortTask, ReservedPorts, Route, Snat,
    Unsnat, ticks,
};
use crate::programs::{find_program, over_cpus, pin_link, take_map};
use crate::routes::{RouteLookup, ifindex};
use crate::sockets::SockDiag;

/// The programs, by function name, and what each does.
pub const PORT_PROGRAMS: [(&str, &str); 2] = [
    (
        "mesh_port_ingress",
        "a published port's flow goes to its Maglev pick: a task on this host by DNAT, another host's by SNAT and DNAT out of the route's interface; replies from other hosts go back to the client",
    ),
    (
        "mesh_port_egress",
        "a host task's reply leaves from the published port",
    ),
];

/// With `ebpf.port_hook` "xdp": the program at the XDP hook. Its link is pinned as
/// `mesh_port_xdp@INTERFACE`.
pub const PORT_XDP: (&str, &str) = (
    "mesh_port_xdp",
    "at XDP, ahead of tcx: a published port's flow whose Maglev pick is a task on this host goes to it by DNAT; the rest goes on to mesh_port_ingress",
);

/// The link directory: one pin per program and interface, `NAME@INTERFACE`.
pub const PORT_LINKS: &str = "port-links";

#[cfg(feature = "bpf")]
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/port_lb.bpf.o"));

pub struct Ports {
    /// Holds the programs' file descriptors for as long as the plane runs.
    _ebpf: aya::Ebpf,
    ports: HashMap<MapData, PortKey, PortFrontend>,
    picks: PerCpuHashMap<MapData, PickKey, u64>,
    /// This host's IPv4 addresses, which the programs take published-port traffic for.
    host_addrs: HashMap<MapData, [u8; 4], u8>,
    /// What `host_addrs` holds.
    addrs: BTreeSet<Ipv4Addr>,
    /// The plan's VIPs: addresses of this host, but not published ports'. `None`
    /// before the first sync, when the addresses are left as a previous run wrote
    /// them (none, on a first start).
    vips: Option<BTreeSet<Ipv4Addr>>,
    interfaces: Vec<String>,
    hook: PortHook,
    /// Packets mesh_port_xdp took, per CPU (it counts only with an XDP hook).
    xdp_took: PerCpuArray<MapData, u64>,
    /// The interfaces' indexes when the programs were attached: a route through an
    /// interface that has since been replaced (a new index) has no program of ours.
    attached: BTreeSet<u32>,
    /// The way to each other host's task that the programs may hop flows to.
    routes: HashMap<MapData, [u8; 4], Route>,
    /// What `routes` holds.
    routed: BTreeMap<Ipv4Addr, Route>,
    /// The ports hopped flows are bound to, and what the map holds.
    config: Array<MapData, PortConfig>,
    port_config: Option<PortConfig>,
    /// Kept across restarts (read back from the pinned map).
    seed: u32,
    reserved: Array<MapData, ReservedPorts>,
    /// What `reserved` holds.
    reserved_now: Option<Box<ReservedPorts>>,
    /// The ports of this host's tasks and its published ports, of the last sync.
    plan_ports: BTreeSet<u16>,
    /// Lists this namespace's bound ports; opened at the first refresh.
    diag: Option<SockDiag>,
    /// The bound ports it listed last.
    bound: BTreeSet<u16>,
    /// Opened at the first refresh; `None` again after an error, to be reopened.
    lookup: Option<RouteLookup>,
    /// The IPv4 addresses of other hosts' tasks of the installed ports.
    remote: BTreeSet<Ipv4Addr>,
    /// The hopped flows and their bound ports, swept of ended flows every
    /// [`SWEEP_EVERY`] (the programs reclaim a port only when they bind it again).
    snat: HashMap<MapData, FlowKey, Snat>,
    unsnat: HashMap<MapData, FlowKey, Unsnat>,
    swept_at: std::time::Instant,
    /// What `mesh_ports` holds, by key: the tasks of each published port.
    installed: BTreeMap<PortKey, Vec<PortTask>>,
    /// Each task's count last read, for the deltas added to the metrics.
    seen: BTreeMap<(PortKey, SocketAddr), u64>,
    /// The service and task each count is reported under.
    labels: BTreeMap<(PortKey, SocketAddr), (String, String)>,
}

impl Ports {
    /// Loads the programs and attaches them to `interfaces`, pinning maps in
    /// `maps_dir` and links in `pin_dir`/[`PORT_LINKS`]. What a previous run left
    /// there is replaced without a gap: each new link is in place before the old one
    /// goes, and the pinned maps (their flows) are kept.
    pub fn open(
        pin_dir: &Path,
        maps_dir: &Path,
        interfaces: &[String],
        hook: PortHook,
    ) -> Result<Ports, String> {
        #[cfg(feature = "bpf")]
        {
            Self::load(OBJECT, pin_dir, maps_dir, interfaces, hook)
        }
        #[cfg(not(feature = "bpf"))]
        {
            let _ = (pin_dir, maps_dir, interfaces, hook);
            Err(crate::programs::NOT_BUILT.to_string())
        }
    }

    #[cfg_attr(not(feature = "bpf"), allow(dead_code))]
    fn load(
        object: &[u8],
        pin_dir: &Path,
        maps_dir: &Path,
        interfaces: &[String],
        hook: PortHook,
    ) -> Result<Ports, String> {
        use aya::programs::{SchedClassifier, TcAttachType};

        let links_dir = pin_dir.join(PORT_LINKS);
        std::fs::create_dir_all(&links_dir)
            .map_err(|e| format!("cannot create {}: {e}", links_dir.display()))?;
        let mut ebpf = aya::EbpfLoader::new()
            .default_map_pin_directory(maps_dir)
            .load(object)
            .map_err(|e| format!("loading the eBPF object port_lb: {}", chain(&e)))?;
        let mut wanted = Vec::new();
        let mut attached = BTreeSet::new();
        for (name, hook) in [
            (PORT_PROGRAMS[0].0, TcAttachType::Ingress),
            (PORT_PROGRAMS[1].0, TcAttachType::Egress),
        ] {
            let program: &mut SchedClassifier = find_program(&mut ebpf, name)?;
            program
                .load()
                .map_err(|e| format!("the kernel refused {name}: {}", chain(&e)))?;
            for interface in interfaces {
                // tcx (Linux 6.6): a link per program, which a pin keeps attached.
                let id = program.attach(interface, hook).map_err(|e| {
                    format!(
                        "attaching {name} to interface {interface} (ebpf.interfaces): {}",
                        chain(&e)
                    )
                })?;
                let pin_name = format!("{name}@{interface}");
                pin_as_link(
                    program.take_link(id),
                    &links_dir.join(&pin_name),
                    "tcx",
                    "6.6",
                )?;
                wanted.push(pin_name);
                attached.extend(ifindex(interface));
            }
        }
        wanted.extend(attach_xdp(&mut ebpf, &links_dir, interfaces, hook)?);
        // Interfaces no longer configured lose their programs.
        for entry in std::fs::read_dir(&links_dir)
            .into_iter()
            .flatten()
            .flatten()
        {
            if !wanted.iter().any(|w| entry.file_name().to_str() == Some(w)) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let ports: HashMap<MapData, PortKey, PortFrontend> = take_map(&mut ebpf, "mesh_ports")?;
        let picks = take_map(&mut ebpf, "mesh_port_picks")?;
        let host_addrs = take_map(&mut ebpf, "mesh_host_addrs")?;
        let routes: HashMap<MapData, [u8; 4], Route> = take_map(&mut ebpf, "mesh_port_routes")?;
        let config: Array<MapData, PortConfig> = take_map(&mut ebpf, "mesh_port_config")?;
        let reserved = take_map(&mut ebpf, "mesh_port_reserved")?;
        let snat = take_map(&mut ebpf, "mesh_port_snat")?;
        let unsnat = take_map(&mut ebpf, "mesh_port_unsnat")?;
        let xdp_took = take_map(&mut ebpf, "mesh_port_xdp_took")?;
        // A previous run's seed is kept, so a client keeps getting the port it had.
        let seed = match config.get(&0, 0) {
            Ok(c) if c.seed != 0 => c.seed,
            _ => random_seed()?,
        };
        // What a previous run wrote: kept until the first sync's refresh.
        let routed = routes
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (Ipv4Addr::from(k), v))
            .collect();
        // What a previous run installed: kept until the first sync rewrites it.
        let installed = ports
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| {
                let tasks = v
                    .tasks()
                    .map(|(addr, local)| PortTask {
                        task: String::new(),
                        addr,
                        local,
                    })
                    .collect();
                (k, tasks)
            })
            .collect();
        let mut ports = Ports {
            _ebpf: ebpf,
            ports,
            picks,
            host_addrs,
            addrs: BTreeSet::new(),
            vips: None,
            interfaces: interfaces.to_vec(),
            hook,
            xdp_took,
            routes,
            routed,
            attached,
            config,
            port_config: None,
            seed,
            reserved,
            reserved_now: None,
            plan_ports: BTreeSet::new(),
            diag: None,
            bound: BTreeSet::new(),
            lookup: None,
            remote: BTreeSet::new(),
            snat,
            unsnat,
            swept_at: std::time::Instant::now(),
            installed,
            seen: BTreeMap::new(),
            labels: BTreeMap::new(),
        };
        ports.seen = ports.read_picks();
        ports.addrs = ports
            .host_addrs
            .keys()
            .filter_map(Result::ok)
            .map(Ipv4Addr::from)
            .collect();
        Ok(ports)
    }

    /// Makes `mesh_ports` hold the plan's published TCP and UDP ports. Returns the
    /// first write that failed; the next sync tries everything again.
    pub fn sync(&mut self, plan: &Plan) -> Result<(), String> {
        self.vips = Some(
            plan.frontends
                .keys()
                .filter_map(|k| match k.listen {
                    Listen::Vip(IpAddr::V4(ip)) => Some(ip),
                    _ => None,
                })
                .collect(),
        );
        let mut wanted: BTreeMap<PortKey, Vec<PortTask>> = BTreeMap::new();
        self.labels.clear();
        for (key, f) in &plan.frontends {
            // A service that asks for PROXY headers, a connection limit, an idle
            // timeout or least-conn is the userspace plane's alone: the kernel path
            // would skip what it asked for.
            if key.listen != Listen::Published || f.policy.needs() != Features::NONE {
                continue;
            }
            let port = PortKey::new(key.port, key.protocol);
            let tasks = f
                .backends
                .iter()
                .map(|b| {
                    self.labels
                        .insert((port, b.addr), (f.service.clone(), b.task.clone()));
                    PortTask {
                        task: b.task.clone(),
                        addr: b.addr,
                        local: b.local,
                    }
                })
                .collect();
            wanted.insert(port, tasks);
        }
        self.plan_ports = wanted
            .iter()
            .flat_map(|(key, tasks)| {
                std::iter::once(u16::from_be_bytes(key.port))
                    .chain(tasks.iter().filter(|t| t.local).map(|t| t.addr.port()))
            })
            .collect();
        self.remote = wanted
            .values()
            .flatten()
            .filter(|t| !t.local)
            .filter_map(|t| match t.addr.ip() {
                IpAddr::V4(ip) if !ip.is_loopback() && !ip.is_unspecified() => Some(ip),
                _ => None,
            })
            .collect();
        let mut result = self.refresh();
        for (key, tasks) in &wanted {
            if self.installed.get(key) == Some(tasks) {
                continue;
            }
            let write = match PortFrontend::build(tasks) {
                Some(value) => self
                    .ports
                    .insert(key, *value, 0)
                    .map_err(|e| format!("writing port {} to mesh_ports: {e}", port(key))),
                None => remove(&mut self.ports, key),
            };
            match write {
                Ok(()) => {
                    self.installed.insert(*key, tasks.clone());
                }
                Err(e) => {
                    self.installed.remove(key);
                    result = result.and(Err(e));
                }
            }
        }
        let gone: Vec<PortKey> = self
            .installed
            .keys()
            .filter(|k| !wanted.contains_key(k))
            .copied()
            .collect();
        for key in gone {
            match remove(&mut self.ports, &key) {
                Ok(()) => {
                    self.installed.remove(&key);
                }
                Err(e) => result = result.and(Err(e)),
            }
        }
        result
    }

    /// Brings what the programs read from this host's network set-up up to date: its
    /// addresses, the routes to other hosts' tasks, and the ports free to bind.
    /// Called at every sync and every few seconds, so a change is followed within
    /// that time. Returns the first error; the rest is still done.
    pub fn refresh(&mut self) -> Result<(), String> {
        let addresses = self.refresh_addresses();
        let routes = self.refresh_routes();
        if self.swept_at.elapsed() >= SWEEP_EVERY {
            self.swept_at = std::time::Instant::now();
            let swept = sweep(&mut self.unsnat, &mut self.snat, ticks());
            if swept > 0 {
                tracing::debug!(swept, "removed ended hopped flows");
            }
        }
        addresses.and(routes)
    }

    /// Makes `mesh_host_addrs` hold this host's IPv4 addresses now.
    fn refresh_addresses(&mut self) -> Result<(), String> {
        let Some(vips) = &self.vips else {
            return Ok(());
        };
        // Loopback addresses cannot come from outside (a packet that claims one is
        // spoofed), and a VIP:port is the VIP's, even where a port of the same
        // number is published.
        let now: BTreeSet<Ipv4Addr> = host_ipv4s()
            .map_err(|e| format!("listing this host's addresses: {e}"))?
            .into_iter()
            .filter(|ip| !ip.is_loopback() && !vips.contains(ip))
            .collect();
        for ip in now.difference(&self.addrs) {
            self.host_addrs
                .insert(ip.octets(), 1, 0)
                .map_err(|e| format!("writing {ip} to mesh_host_addrs: {e}"))?;
        }
        for ip in self.addrs.difference(&now) {
            match self.host_addrs.remove(&ip.octets()) {
                Ok(()) => {}
                Err(e) if crate::programs::not_found(&e) => {}
                Err(e) => return Err(format!("removing {ip} from mesh_host_addrs: {e}")),
            }
        }
        self.addrs = now;
        Ok(())
    }

    /// Makes `mesh_port_config` hold the ports outside the kernel's local port range,
    /// `mesh_port_reserved` the ports in use here, and `mesh_port_routes` the way to
    /// each other host's task whose route is through an attached interface (its
    /// replies come back there). A task reached any other way is left to the other
    /// plane.
    fn refresh_routes(&mut self) -> Result<(), String> {
        if self.vips.is_none() {
            return Ok(());
        }
        let (low, high) = local_port_range()?;
        let config = PortConfig::around(low, high, self.seed);
        if self.port_config != Some(config) {
            self.config
                .set(0, config, 0)
                .map_err(|e| format!("writing mesh_port_config: {e}"))?;
            self.port_config = Some(config);
        }
        let mut result = self.refresh_reserved();
        // No route before the ports in use are known: a bound port could be one.
        if self.reserved_now.is_none() {
            return result;
        }
        let attached = &self.attached;
        let lookup = match self.lookup.as_mut() {
            Some(l) => l,
            None => self.lookup.insert(
                RouteLookup::open().map_err(|e| format!("opening an rtnetlink socket: {e}"))?,
            ),
        };
        let mut want = BTreeMap::new();
        for ip in &self.remote {
            match lookup.get(*ip) {
                Ok(Some(r)) if attached.contains(&r.ifindex) => {
                    want.insert(
                        *ip,
                        Route {
                            ifindex: r.ifindex,
                            src: r.src.octets(),
                        },
                    );
                }
                Ok(_) => {}
                Err(e) => {
                    // What is installed stays for this refresh; the socket is opened
                    // anew at the next, rather than each address waiting for it.
                    let kept: Vec<(Ipv4Addr, Route)> = self
                        .routed
                        .iter()
                        .filter(|(ip, _)| self.remote.contains(ip) && !want.contains_key(ip))
                        .map(|(ip, r)| (*ip, *r))
                        .collect();
                    want.extend(kept);
                    self.lookup = None;
                    result = result.and(Err(e));
                    break;
                }
            }
        }
        for (ip, route) in &want {
            if self.routed.get(ip) == Some(route) {
                continue;
            }
            match self.routes.insert(ip.octets(), *route, 0) {
                Ok(()) => {
                    self.routed.insert(*ip, *route);
                }
                Err(e) => {
                    result = result.and(Err(format!("writing {ip} to mesh_port_routes: {e}")))
                }
            }
        }
        let gone: Vec<Ipv4Addr> = self
            .routed
            .keys()
            .filter(|ip| !want.contains_key(ip))
            .copied()
            .collect();
        for ip in gone {
            match self.routes.remove(&ip.octets()) {
                Ok(()) => {
                    self.routed.remove(&ip);
                }
                Err(e) if crate::programs::not_found(&e) => {
                    self.routed.remove(&ip);
                }
                Err(e) => {
                    result = result.and(Err(format!("removing {ip} from mesh_port_routes: {e}")))
                }
            }
        }
        result
    }

    /// Makes `mesh_port_reserved` hold the ports in use on this host: its listening
    /// and UDP sockets' (sock_diag), and its tasks' and published ports.
    fn refresh_reserved(&mut self) -> Result<(), String> {
        let diag = match self.diag.as_mut() {
            Some(d) => d,
            None => self
                .diag
                .insert(SockDiag::open().map_err(|e| format!("opening a sock_diag socket: {e}"))?),
        };
        // On an error the ports listed last time stay, with the plan's ports of now.
        let result = match diag.bound_ports() {
            Ok(b) => {
                self.bound = b;
                Ok(())
            }
            Err(e) => {
                self.diag = None;
                Err(format!("listing this host's bound ports: {e}"))
            }
        };
        if result.is_err() && self.reserved_now.is_none() {
            return result;
        }
        let now = Box::new(ReservedPorts::of(
            self.bound.iter().chain(&self.plan_ports).copied(),
        ));
        if self.reserved_now.as_ref() != Some(&now) {
            self.reserved
                .set(0, *now, 0)
                .map_err(|e| format!("writing mesh_port_reserved: {e}"))?;
            self.reserved_now = Some(now);
        }
        result
    }

    /// The flows taken since the last call, by service and task (of the last sync).
    pub fn new_flows(&mut self) -> Vec<(&(String, String), u64)> {
        let now = self.read_picks();
        let out = now
            .iter()
            .filter_map(|(key, n)| {
                // Less than before: the LRU forgot the task's count and began again.
                let before = self.seen.get(key).copied().unwrap_or(0);
                let delta = if *n >= before { n - before } else { *n };
                let labels = self.labels.get(key)?;
                (delta > 0).then_some((labels, delta))
            })
            .collect();
        self.seen = now;
        out
    }

    fn read_picks(&self) -> BTreeMap<(PortKey, SocketAddr), u64> {
        self.picks
            .iter()
            .filter_map(Result::ok)
            .map(|(k, values)| (k.parts(), over_cpus(&values)))
            .collect()
    }

    /// The packets mesh_port_xdp took, over all CPUs.
    pub fn xdp_took(&self) -> Option<u64> {
        let values = self.xdp_took.get(&0, 0).ok()?;
        Some(over_cpus(&values))
    }

    /// For `mesh status`.
    pub fn detail(&self) -> String {
        let routed = self
            .remote
            .iter()
            .filter(|ip| self.routed.contains_key(ip))
            .count();
        let hops = match self.port_config {
            Some(c) if c.span == 0 => {
                "no flow goes to other hosts' tasks in the kernel: ip_local_port_range leaves no port to bind".to_string()
            }
            _ => format!(
                "{routed} of {} other hosts' task addresses routed through these interfaces (mesh_port_routes), flows to them bound to {} ports (mesh_port_snat, mesh_port_unsnat)",
                self.remote.len(),
                self.port_config.map_or(0, |c| c.span),
            ),
        };
        let (at, programs) = match self.hook {
            PortHook::Tcx => ("tcx", PORT_PROGRAMS.map(|(n, _)| n).join(", ")),
            PortHook::Xdp => (
                "XDP (native) and tcx",
                format!(
                    "{}, {}; XDP had taken {} packets at this apply (mesh_port_xdp_took)",
                    PORT_XDP.0,
                    PORT_PROGRAMS.map(|(n, _)| n).join(", "),
                    self.xdp_took().unwrap_or(0)
                ),
            ),
        };
        format!(
            "published ports at {at} on {} ({programs}): mesh_ports {}/{}, mesh_port_flows and mesh_port_revnat (LRU, {} each); {hops}",
            self.interfaces.join(", "),
            // A port with no IPv4 task is remembered here but not in the map.
            self.installed
                .values()
                .filter(|tasks| tasks.iter().any(|t| t.addr.is_ipv4()))
                .count(),
            crate::port_layout::MAX_PORTS,
            crate::port_layout::MAX_PORT_FLOWS,
        )
    }
}

/// With an XDP `hook`, attaches `mesh_port_xdp` to each of `interfaces` and pins its
/// links; returns their pin names. A previous run's XDP links go first, all of them:
/// an interface has one XDP program, and a pin's name may name an interface that has
/// since been renamed. That is never a gap: mesh_port_ingress, attached already, does
/// the whole job without XDP.
#[cfg_attr(not(feature = "bpf"), allow(dead_code))]
fn attach_xdp(
    ebpf: &mut aya::Ebpf,
    links_dir: &Path,
    interfaces: &[String],
    hook: PortHook,
) -> Result<Vec<String>, String> {
    use aya::programs::{Xdp, XdpMode};

    remove_xdp_links(links_dir);
    if hook == PortHook::Tcx {
        return Ok(Vec::new());
    }
    let name = PORT_XDP.0;
    let program: &mut Xdp = find_program(ebpf, name)?;
    program.load().map_err(|e| {
        format!(
            "the kernel refused {name} (ebpf.port_hook {:?}; \"tcx\" needs no XDP): {}",
            hook.name(),
            chain(&e)
        )
    })?;
    let mut wanted = Vec::new();
    for interface in interfaces {
        let id = program.attach(interface, XdpMode::Driver).map_err(|e| {
            format!(
                "attaching {name} to interface {interface} (ebpf.port_hook {:?}): {}; it needs a driver with XDP and no other XDP program on the interface, and \"tcx\" needs neither",
                hook.name(),
                chain(&e)
            )
        })?;
        let pin_name = format!("{name}@{interface}");
        pin_as_link(
            program.take_link(id),
            &links_dir.join(&pin_name),
            "an XDP link",
            "5.9",
        )?;
        wanted.push(pin_name);
    }
    Ok(wanted)
}

/// Pins a program's link, taken from aya, at `pin` (its name `PROGRAM@INTERFACE`): a
/// pin keeps it attached. aya falls back to netlink, whose attachments cannot be
/// pinned, on kernels older than `since`, which have no `kind` links.
fn pin_as_link<L>(
    link: Result<L, aya::programs::ProgramError>,
    pin: &Path,
    kind: &str,
    since: &str,
) -> Result<(), String>
where
    L: TryInto<aya::programs::links::FdLink>,
{
    let what = pin.file_name().unwrap_or_default().to_string_lossy();
    let link = link
        .map_err(|e| format!("{what}: {}", chain(&e)))?
        .try_into()
        .map_err(|_| {
            format!("{what} was attached through netlink, not as {kind}: the kernel is older than {since}")
        })?;
    pin_link(link, pin)
}

/// Unpins (so detaches) every XDP link in `links_dir`.
pub fn remove_xdp_links(links_dir: &Path) {
    for entry in std::fs::read_dir(links_dir).into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().starts_with(PORT_XDP.0) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// How often ended hopped flows are swept from `mesh_port_unsnat` and `mesh_port_snat`.
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// Removes the hopped flows that ended (by the programs' reuse rules, at `now` in their
/// ticks) from both maps, so the maps make room for new flows, whatever ports those
/// are given. Returns how many went.
///
/// A port the programs give to a new flow between the listing and the removal would
/// lose its entry (that flow's next packet is then dropped): each entry is read again
/// just before it is removed, which narrows that to a moment. A flow's entry in
/// `mesh_port_snat` is removed only while it still names the port swept.
pub fn sweep<T, U>(
    unsnat: &mut HashMap<T, FlowKey, Unsnat>,
    snat: &mut HashMap<U, FlowKey, Snat>,
    now: u32,
) -> usize
where
    T: std::borrow::BorrowMut<MapData>,
    U: std::borrow::BorrowMut<MapData>,
{
    let ended: Vec<FlowKey> = unsnat
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, u)| u.ended(now, k.proto))
        .map(|(k, _)| k)
        .collect();
    let mut swept = 0;
    for key in ended {
        let Ok(u) = unsnat.get(&key, 0) else {
            continue;
        };
        if !u.ended(now, key.proto) || unsnat.remove(&key).is_err() {
            continue;
        }
        swept += 1;
        let owner = u.owner(key.proto);
        if let Ok(s) = snat.get(&owner, 0)
            && (s.task_ip, s.task_port, s.ip, s.port)
                == (key.saddr, key.sport, key.daddr, key.dport)
        {
            let _ = snat.remove(&owner);
        }
    }
    swept
}

/// The maps `port_lb` pins, by name.
const PORT_MAPS: [&str; 12] = [
    "mesh_ports",
    "mesh_port_flows",
    "mesh_port_revnat",
    "mesh_host_addrs",
    "mesh_port_picks",
    "mesh_port_snat",
    "mesh_port_unsnat",
    "mesh_port_routes",
    "mesh_port_config",
    "mesh_port_reserved",
    "mesh_port_left",
    "mesh_port_xdp_took",
];

/// Detaches what a previous run with `ebpf.interfaces` left (its links), and frees
/// its maps: for an agent whose list is now empty.
pub fn remove_pins(pin_dir: &Path, maps_dir: &Path) {
    remove_xdp_links(&pin_dir.join(PORT_LINKS));
    let _ = std::fs::remove_dir_all(pin_dir.join(PORT_LINKS));
    for name in PORT_MAPS {
        let _ = std::fs::remove_file(maps_dir.join(name));
    }
}

fn port(key: &PortKey) -> String {
    let proto = if key.proto == 17 { "udp" } else { "tcp" };
    format!("{}/{proto}", u16::from_be_bytes(key.port))
}

fn remove(map: &mut HashMap<MapData, PortKey, PortFrontend>, key: &PortKey) -> Result<(), String> {
    match map.remove(key) {
        Ok(()) => Ok(()),
        Err(e) if crate::programs::not_found(&e) => Ok(()),
        Err(e) => Err(format!("removing port {} from mesh_ports: {e}", port(key))),
    }
}

/// The kernel's `net.ipv4.ip_local_port_range`: the ports this host's own sockets
/// are given.
fn local_port_range() -> Result<(u16, u16), String> {
    const PATH: &str = "/proc/sys/net/ipv4/ip_local_port_range";
    let text = std::fs::read_to_string(PATH).map_err(|e| format!("reading {PATH}: {e}"))?;
    let mut parts = text.split_whitespace().map(str::parse::<u16>);
    match (parts.next(), parts.next()) {
        (Some(Ok(low)), Some(Ok(high))) => Ok((low, high)),
        _ => Err(format!("{PATH} holds {:?}, not two ports", text.trim())),
    }
}

fn random_seed() -> Result<u32, String> {
    let mut seed = [0u8; 4];
    getrandom::fill(&mut seed).map_err(|e| format!("getrandom for the port seed: {e}"))?;
    Ok(u32::from_ne_bytes(seed).max(1))
}

/// Whether `name` is an Ethernet interface of this network namespace, as an error
/// that names the setting. The program reads an Ethernet header first: on a layer-3
/// device (WireGuard, tun, ipip) or loopback it would read the wrong bytes.
pub fn check_interface(name: &str) -> Result<(), String> {
    if name.contains('\0') {
        return Err(format!(
            "ebpf.interfaces: {name:?} is not an interface name"
        ));
    }
    if ifindex(name).is_none() {
        return Err(format!(
            "ebpf.interfaces names {name:?}, which is not an interface here ({})",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: a plain socket, closed by OwnedFd.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!(
            "ebpf.interfaces: cannot ask about {name:?}: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: a descriptor just opened and owned by nothing else.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR fills ifr_hwaddr of a valid ifreq.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            libc::SIOCGIFHWADDR,
            &mut req,
        )
    };
    if rc != 0 {
        return Err(format!(
            "ebpf.interfaces: cannot ask about {name:?}: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: the union member SIOCGIFHWADDR wrote.
    let family = unsafe { req.ifr_ifru.ifru_hwaddr.sa_family };
    if family != libc::ARPHRD_ETHER {
        return Err(format!(
            "ebpf.interfaces names {name:?}, which is not an Ethernet interface (link type {family}); the TC path reads Ethernet frames"
        ));
    }
    Ok(())
}

/// The IPv4 addresses of this network namespace's interfaces (getifaddrs(3)).
fn host_ipv4s() -> std::io::Result<BTreeSet<Ipv4Addr>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list`, freed below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = BTreeSet::new();
    let mut at = list;
    while !at.is_null() {
        // SAFETY: a node of the list getifaddrs returned, not yet freed.
        let entry = unsafe { &*at };
        if !entry.ifa_addr.is_null()
            // SAFETY: ifa_addr points to a sockaddr whose family says its type.
            && i32::from(unsafe { (*entry.ifa_addr).sa_family }) == libc::AF_INET
        {
            // SAFETY: an AF_INET address is a sockaddr_in.
            let sin = unsafe { &*(entry.ifa_addr as *const libc::sockaddr_in) };
            out.insert(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
        }
        at = entry.ifa_next;
    }
    // SAFETY: the list getifaddrs returned, freed once.
    unsafe { libc::freeifaddrs(list) };
    Ok(out)
}

#[cfg(all(test, feature = "bpf"))]
#[path = "port_program_tests.rs"]
mod program_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ethernet_interfaces_that_exist_are_accepted() {
        let lo = check_interface("lo").unwrap_err();
        assert!(
            lo.contains("\"lo\"") && lo.contains("not an Ethernet interface"),
            "{lo}"
        );
        let missing = check_interface("mesh-nope0").unwrap_err();
        assert!(missing.contains("not an interface here"), "{missing}");
    }

    #[test]
    fn this_hosts_addresses_include_loopback() {
        // The listing the map is filtered from: it sees at least 127.0.0.1.
        assert!(host_ipv4s().unwrap().contains(&Ipv4Addr::LOCALHOST));
    }
}
