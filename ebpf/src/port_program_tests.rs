//! The real `port_lb` ingress program run on built packets with `BPF_PROG_TEST_RUN`:
//! the hop's port rules, rewrites and checksums, one case at a time, without a
//! network. The kernel runs the program and returns its verdict and the packet it
//! left; a redirect is reported (TC_ACT_REDIRECT), not performed. Needs root.

use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;

use aya::maps::{Array, HashMap, MapData};
use aya::programs::{SchedClassifier, Xdp};

use super::OBJECT;
use crate::port_layout::{
    FlowKey, PortConfig, PortFrontend, PortKey, PortTask, ReservedPorts, Route, Snat, Unsnat, ticks,
};

const REDIRECT: i32 = 7;
const SHOT: i32 = 2;
const UNSPEC: i32 = -1;

const PUBLISHED: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const TASK: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
const SRC: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const LOCAL_TASK: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 3);
/// Where test_run's packets arrive: loopback, the only device it needs.
const LO: u32 = 1;

/// A pin directory on bpffs of this test's own, removed at the end; ones left by
/// dead test processes are removed first.
struct Pins(PathBuf);

impl Pins {
    fn new() -> Pins {
        const PREFIX: &str = "mesh-unit-";
        let root = PathBuf::from("/sys/fs/bpf");
        for entry in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            let pid = name
                .strip_prefix(PREFIX)
                .and_then(|r| r.split('-').next()?.parse::<u32>().ok());
            if pid.is_some_and(|p| !PathBuf::from(format!("/proc/{p}")).exists()) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = root.join(format!("{PREFIX}{}-{n}", std::process::id()));
        crate::mounts::ensure_bpffs(&dir).unwrap();
        Pins(dir)
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Program {
    ebpf: aya::Ebpf,
    _pins: Pins,
}

/// The program with one published port (8080, TCP and UDP) whose one task is on
/// another host, reached through loopback from SRC; ports 32768-60999 are the local
/// range, and 20001 is in use here.
fn program() -> Option<Program> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: running a BPF program needs root");
        return None;
    }
    let pins = Pins::new();
    let mut ebpf = aya::EbpfLoader::new()
        .default_map_pin_directory(&pins.0)
        .load(OBJECT)
        .unwrap();
    let prog: &mut SchedClassifier = ebpf
        .program_mut("mesh_port_ingress")
        .unwrap()
        .try_into()
        .unwrap();
    prog.load().unwrap();
    let xdp: &mut Xdp = ebpf
        .program_mut("mesh_port_xdp")
        .unwrap()
        .try_into()
        .unwrap();
    xdp.load().unwrap();
    let mut ports: HashMap<&mut MapData, PortKey, PortFrontend> =
        HashMap::try_from(ebpf.map_mut("mesh_ports").unwrap()).unwrap();
    for (published, task) in [(8080, remote_task()), (8081, local_task())] {
        let value = PortFrontend::build(std::slice::from_ref(&task)).unwrap();
        for proto in [mesh_core::Protocol::Tcp, mesh_core::Protocol::Udp] {
            ports
                .insert(PortKey::new(published, proto), *value, 0)
                .unwrap();
        }
    }
    let mut addrs: HashMap<&mut MapData, [u8; 4], u8> =
        HashMap::try_from(ebpf.map_mut("mesh_host_addrs").unwrap()).unwrap();
    addrs.insert(PUBLISHED.octets(), 1, 0).unwrap();
    route(&mut ebpf, true);
    let mut config: Array<&mut MapData, PortConfig> =
        Array::try_from(ebpf.map_mut("mesh_port_config").unwrap()).unwrap();
    config
        .set(0, PortConfig::around(32768, 60999, 1), 0)
        .unwrap();
    let mut reserved: Array<&mut MapData, ReservedPorts> =
        Array::try_from(ebpf.map_mut("mesh_port_reserved").unwrap()).unwrap();
    reserved.set(0, ReservedPorts::of([20001]), 0).unwrap();
    Some(Program { ebpf, _pins: pins })
}

/// The one task of port 8080, on another host.
fn remote_task() -> PortTask {
    PortTask {
        task: "web.2".into(),
        addr: (TASK, 9000).into(),
        local: false,
    }
}

/// The one task of port 8081, on this host.
fn local_task() -> PortTask {
    PortTask {
        task: "api.1".into(),
        addr: (LOCAL_TASK, 9001).into(),
        local: true,
    }
}

fn route(ebpf: &mut aya::Ebpf, on: bool) {
    let mut routes: HashMap<&mut MapData, [u8; 4], Route> =
        HashMap::try_from(ebpf.map_mut("mesh_port_routes").unwrap()).unwrap();
    if on {
        let r = Route {
            ifindex: LO,
            src: SRC.octets(),
        };
        routes.insert(TASK.octets(), r, 0).unwrap();
    } else {
        routes.remove(&TASK.octets()).unwrap();
    }
}

/// The ones' complement sum of `data`, folded.
fn sum(data: &[u8], mut acc: u32) -> u16 {
    for chunk in data.chunks(2) {
        acc += u32::from(u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]));
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

fn pseudo(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u32 {
    let mut p = Vec::new();
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&[0, proto]);
    p.extend_from_slice(&(len as u16).to_be_bytes());
    u32::from(sum(&p, 0))
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const TCP: u8 = 6;
const UDP: u8 = 17;

/// An Ethernet frame with an IPv4 TCP segment (`flags`) or UDP datagram (`udp_csum`
/// false: a zero checksum), with correct checksums.
fn packet(
    proto: u8,
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    flags: u8,
    udp_csum: bool,
) -> Vec<u8> {
    let payload = b"hello";
    let l4_len = if proto == TCP { 20 } else { 8 } + payload.len();
    let mut l4 = Vec::new();
    l4.extend_from_slice(&src.1.to_be_bytes());
    l4.extend_from_slice(&dst.1.to_be_bytes());
    if proto == TCP {
        l4.extend_from_slice(&1000u32.to_be_bytes());
        l4.extend_from_slice(&0u32.to_be_bytes());
        l4.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    } else {
        l4.extend_from_slice(&(l4_len as u16).to_be_bytes());
        l4.extend_from_slice(&[0, 0]);
    }
    l4.extend_from_slice(payload);
    let at = if proto == TCP { 16 } else { 6 };
    if proto == TCP || udp_csum {
        let c = !sum(&l4, pseudo(src.0, dst.0, proto, l4_len));
        l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
    }
    let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0, 0, 64, proto, 0, 0];
    ip[2..4].copy_from_slice(&((20 + l4_len) as u16).to_be_bytes());
    ip.extend_from_slice(&src.0.octets());
    ip.extend_from_slice(&dst.0.octets());
    let c = !sum(&ip, 0);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut frame = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00];
    frame.extend(ip);
    frame.extend(l4);
    frame
}

/// What a frame carries: (source, destination), after checking both checksums (a
/// zero UDP checksum passes: none was computed).
fn read(frame: &[u8]) -> ((Ipv4Addr, u16), (Ipv4Addr, u16), u16) {
    let ip = &frame[14..34];
    assert_eq!(sum(ip, 0), 0xffff, "IP checksum of {frame:?}");
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let l4 = &frame[34..];
    let at = if ip[9] == TCP { 16 } else { 6 };
    let csum = u16::from_be_bytes([l4[at], l4[at + 1]]);
    if ip[9] == TCP || csum != 0 {
        assert_eq!(
            sum(l4, pseudo(src, dst, ip[9], l4.len())),
            0xffff,
            "L4 checksum of {frame:?}"
        );
    }
    let port = |i: usize| u16::from_be_bytes([l4[i], l4[i + 1]]);
    ((src, port(0)), (dst, port(2)), csum)
}

/// `BPF_PROG_TEST_RUN` of the tcx ingress program on `frame`: its verdict and the
/// frame it left.
fn run(p: &Program, frame: &[u8]) -> (i32, Vec<u8>) {
    run_program(p, "mesh_port_ingress", frame)
}

/// The same of program `name`. For XDP, the frame it left begins with the metadata
/// the program put before it.
fn run_program(p: &Program, name: &str, frame: &[u8]) -> (i32, Vec<u8>) {
    let fd = p
        .ebpf
        .program(name)
        .unwrap()
        .fd()
        .unwrap()
        .as_fd()
        .as_raw_fd();
    let mut out = vec![0u8; frame.len() + 256];
    // union bpf_attr, as BPF_PROG_TEST_RUN reads it.
    let mut attr = [0u8; 80];
    attr[0..4].copy_from_slice(&(fd as u32).to_ne_bytes());
    attr[8..12].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
    attr[12..16].copy_from_slice(&(out.len() as u32).to_ne_bytes());
    attr[16..24].copy_from_slice(&(frame.as_ptr() as u64).to_ne_bytes());
    attr[24..32].copy_from_slice(&(out.as_mut_ptr() as u64).to_ne_bytes());
    attr[32..36].copy_from_slice(&1u32.to_ne_bytes());
    // SAFETY: attr is a bpf_attr for BPF_PROG_TEST_RUN whose buffers outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            10, // BPF_PROG_TEST_RUN
            attr.as_mut_ptr(),
            attr.len() as u32,
        )
    };
    assert_eq!(
        rc,
        0,
        "BPF_PROG_TEST_RUN: {}",
        std::io::Error::last_os_error()
    );
    let retval = i32::from_ne_bytes(attr[4..8].try_into().unwrap());
    let len = u32::from_ne_bytes(attr[12..16].try_into().unwrap()) as usize;
    out.truncate(len);
    (retval, out)
}

fn unsnat(p: &mut Program) -> HashMap<&mut MapData, FlowKey, Unsnat> {
    HashMap::try_from(p.ebpf.map_mut("mesh_port_unsnat").unwrap()).unwrap()
}

fn bound_key(port: u16) -> FlowKey {
    FlowKey {
        saddr: TASK.octets(),
        daddr: SRC.octets(),
        sport: 9000u16.to_be_bytes(),
        dport: port.to_be_bytes(),
        proto: TCP,
        pad: [0; 3],
    }
}

fn client(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, n)
}

fn local_range(port: u16) -> bool {
    (32768..=60999).contains(&port)
}

#[test]
fn a_hop_binds_a_free_port_and_its_replies_go_back_to_the_client() {
    let Some(mut p) = program() else { return };
    let published = (PUBLISHED, 8080);

    // The client's own port, outside the local range and free, is kept.
    let (verdict, out) = run(&p, &packet(TCP, (client(1), 20000), published, SYN, true));
    assert_eq!(verdict, REDIRECT);
    let (src, dst, _) = read(&out);
    assert_eq!((src, dst), ((SRC, 20000), (TASK, 9000)));

    // The task's reply, arriving through the route's interface, goes to the client
    // from the published address and port.
    let (verdict, out) = run(
        &p,
        &packet(TCP, (TASK, 9000), (SRC, 20000), SYN | ACK, true),
    );
    assert_eq!(verdict, REDIRECT);
    let (src, dst, _) = read(&out);
    assert_eq!((src, dst), (published, (client(1), 20000)));

    // Another client with the same port, while that connection is open: another port.
    let (_, out) = run(&p, &packet(TCP, (client(2), 20000), published, SYN, true));
    let ((_, port), _, _) = read(&out);
    assert!(
        port != 20000 && port >= 1024 && !local_range(port),
        "{port}"
    );

    // A port in use on this host is never bound, nor one in the local range.
    for (n, own) in [(3, 20001), (4, 40000)] {
        let (verdict, out) = run(&p, &packet(TCP, (client(n), own), published, SYN, true));
        assert_eq!(verdict, REDIRECT);
        let ((ip, port), _, _) = read(&out);
        assert_eq!(ip, SRC);
        assert!(
            port != own && port != 20001 && port >= 1024 && !local_range(port),
            "client port {own} got {port}"
        );
    }

    // A reply to a port nobody holds is not ours.
    let (verdict, _) = run(&p, &packet(TCP, (TASK, 9000), (SRC, 1999), ACK, true));
    assert_eq!(verdict, UNSPEC);

    // UDP: a datagram without a checksum keeps none; one with a checksum gets a
    // correct one (read() checks).
    for (n, with) in [(5, false), (6, true)] {
        let (verdict, out) = run(
            &p,
            &packet(UDP, (client(n), 21000 + u16::from(n)), published, 0, with),
        );
        assert_eq!(verdict, REDIRECT);
        let (src, dst, csum) = read(&out);
        assert_eq!((src.0, dst), (SRC, (TASK, 9000)));
        assert_eq!(csum == 0, !with, "checksum {csum:#x}");
    }

    // The first connection ended long ago (both FINs): another client with the same
    // own port takes the port, and the ended flow's entry goes with it; a late
    // packet of the ended flow is dropped.
    let a = unsnat(&mut p).get(&bound_key(20000), 0).unwrap();
    let ended = Unsnat {
        closed: 1 | 2,
        seen: ticks().wrapping_sub(1000),
        ..a
    };
    unsnat(&mut p).insert(bound_key(20000), ended, 0).unwrap();
    let (verdict, out) = run(&p, &packet(TCP, (client(7), 20000), published, SYN, true));
    assert_eq!(verdict, REDIRECT);
    assert_eq!(
        read(&out).0,
        (SRC, 20000),
        "the ended flow's port is reused"
    );
    assert!(
        snat_of(&mut p, client(1), 20000).is_none(),
        "the ended flow's entry went"
    );
    assert_eq!(
        run(&p, &packet(TCP, (client(1), 20000), published, ACK, true)).0,
        SHOT
    );

    // Another client took the port of a live flow (as only a bug could): the rest of
    // that flow is dropped, never sent on a port whose replies go elsewhere, and a new
    // connection from its client binds anew.
    let b = unsnat(&mut p).get(&bound_key(20000), 0).unwrap();
    assert_eq!(b.client_ip, client(7).octets());
    let stolen = Unsnat {
        client_ip: client(9).octets(),
        ..b
    };
    unsnat(&mut p).insert(bound_key(20000), stolen, 0).unwrap();
    let ack = packet(TCP, (client(7), 20000), published, ACK, true);
    assert_eq!(run(&p, &ack).0, SHOT);
    assert_eq!(run(&p, &ack).0, SHOT, "and the next one too");
    let (verdict, out) = run(&p, &packet(TCP, (client(7), 20000), published, SYN, true));
    assert_eq!(verdict, REDIRECT);
    assert_ne!(read(&out).0.1, 20000, "client 9 holds 20000");

    // A hopped connection whose Maglev pick the LRU forgot goes on to the task it
    // was bound to.
    let mut flows: HashMap<&mut MapData, FlowKey, crate::port_layout::PortBackend> =
        HashMap::try_from(p.ebpf.map_mut("mesh_port_flows").unwrap()).unwrap();
    let key = to_published(TCP, client(2), 20000);
    flows.remove(&key).unwrap();
    let (verdict, out) = run(&p, &packet(TCP, (client(2), 20000), published, ACK, true));
    assert_eq!(verdict, REDIRECT);
    let ((_, port2), task, _) = read(&out);
    assert_eq!(task, (TASK, 9000));

    // A flow whose port entry is missing is dropped, as one whose port was taken.
    unsnat(&mut p).remove(&bound_key(port2)).unwrap();
    assert_eq!(
        run(&p, &packet(TCP, (client(2), 20000), published, ACK, true)).0,
        SHOT
    );
}

/// The key of a client's flow to PUBLISHED:8080, as the programs' maps hold it.
fn to_published(proto: u8, ip: Ipv4Addr, port: u16) -> FlowKey {
    FlowKey {
        saddr: ip.octets(),
        daddr: PUBLISHED.octets(),
        sport: port.to_be_bytes(),
        dport: 8080u16.to_be_bytes(),
        proto,
        pad: [0; 3],
    }
}

/// The `mesh_port_snat` entry of the client's flow to the published port, if any.
fn snat_of(p: &mut Program, ip: Ipv4Addr, port: u16) -> Option<Snat> {
    let map: HashMap<&mut MapData, FlowKey, Snat> =
        HashMap::try_from(p.ebpf.map_mut("mesh_port_snat").unwrap()).unwrap();
    let key = to_published(TCP, ip, port);
    map.get(&key, 0).ok()
}

#[test]
fn a_flow_without_a_route_stays_with_the_other_plane() {
    let Some(mut p) = program() else { return };
    let published = (PUBLISHED, 8080);
    route(&mut p.ebpf, false);
    let syn = packet(TCP, (client(1), 20000), published, SYN, true);
    assert_eq!(run(&p, &syn).0, UNSPEC, "no route: left to the other plane");
    // The route appears: the flow already begun stays where it is, retransmitted
    // SYN and all, while a new one is hopped.
    route(&mut p.ebpf, true);
    assert_eq!(
        run(&p, &packet(TCP, (client(1), 20000), published, ACK, true)).0,
        UNSPEC
    );
    assert_eq!(run(&p, &syn).0, UNSPEC);
    let (verdict, out) = run(&p, &packet(TCP, (client(2), 20000), published, SYN, true));
    assert_eq!(verdict, REDIRECT);
    assert_eq!(read(&out).1, (TASK, 9000));
}

#[test]
fn the_agent_sweeps_ended_hopped_flows_and_only_those() {
    let Some(mut p) = program() else { return };
    let published = (PUBLISHED, 8080);
    for n in [1, 2] {
        let (verdict, _) = run(
            &p,
            &packet(TCP, (client(n), 20010 + u16::from(n)), published, SYN, true),
        );
        assert_eq!(verdict, REDIRECT);
    }
    // Client 1's connection ended (both FINs) long ago; client 2's is open.
    let key = bound_key(20011);
    let a = unsnat(&mut p).get(&key, 0).unwrap();
    let ended = Unsnat {
        closed: 1 | 2,
        seen: ticks().wrapping_sub(1000),
        ..a
    };
    unsnat(&mut p).insert(key, ended, 0).unwrap();
    let mut u: HashMap<aya::maps::MapData, FlowKey, Unsnat> =
        HashMap::try_from(p.ebpf.take_map("mesh_port_unsnat").unwrap()).unwrap();
    let mut s: HashMap<aya::maps::MapData, FlowKey, Snat> =
        HashMap::try_from(p.ebpf.take_map("mesh_port_snat").unwrap()).unwrap();
    assert_eq!(super::sweep(&mut u, &mut s, ticks()), 1);
    assert!(u.get(&key, 0).is_err(), "the ended flow's port is free");
    assert!(u.get(&bound_key(20012), 0).is_ok(), "the open one's is not");
    let flows: Vec<FlowKey> = s.keys().filter_map(Result::ok).collect();
    assert_eq!(flows.len(), 1, "only the open flow is left: {flows:?}");
    assert_eq!(flows[0].saddr, client(2).octets());
    assert_eq!(
        super::sweep(&mut u, &mut s, ticks()),
        0,
        "nothing more to sweep"
    );
}

const XDP_PASS: i32 = 2;

/// Packets mesh_port_xdp took, over all CPUs.
fn xdp_took(p: &Program) -> u64 {
    let map: aya::maps::PerCpuArray<&MapData, u64> =
        aya::maps::PerCpuArray::try_from(p.ebpf.map("mesh_port_xdp_took").unwrap()).unwrap();
    map.get(&0, 0).unwrap().iter().sum()
}

/// The ones' complement sum of `a`'s two 16-bit words as they lie in memory, as the
/// kernel sums a packet's bytes (csum_partial).
fn words(a: Ipv4Addr) -> u32 {
    let o = a.octets();
    u32::from(u16::from_ne_bytes([o[0], o[1]])) + u32::from(u16::from_ne_bytes([o[2], o[3]]))
}

#[test]
fn at_xdp_a_local_pick_is_taken_with_whole_checksums_and_the_rest_is_left_to_tcx() {
    let Some(mut p) = program() else { return };
    // The tcx program knows an XDP-taken packet by this metadata before the frame:
    // the magic, then the change in the sum of the packet's bytes (PUBLISHED's
    // words out, LOCAL_TASK's in), which it adds to a driver's CHECKSUM_COMPLETE.
    let magic = 0x6d65_7368u32.to_ne_bytes();
    let diff = sum(&[], words(PUBLISHED) + (0x1fffe - words(LOCAL_TASK)));
    let mut taken = 0;
    for (proto, udp_csum, port) in [(TCP, true, 30000), (UDP, true, 30001), (UDP, false, 30002)] {
        let frame = packet(proto, (client(1), port), (PUBLISHED, 8081), SYN, udp_csum);
        let (verdict, out) = run_program(&p, "mesh_port_xdp", &frame);
        assert_eq!(verdict, XDP_PASS);
        assert_eq!(out.len(), frame.len() + 8, "marked for the tcx program");
        assert_eq!(out[..4], magic);
        let got = u32::from_ne_bytes(out[4..8].try_into().unwrap());
        assert_eq!(sum(&[], got), diff, "the sum's change");
        // read() checks both checksums as a receiver that verifies them would.
        let (from, to, csum) = read(&out[8..]);
        assert_eq!(from, (client(1), port), "the client's address is kept");
        assert_eq!(to, (LOCAL_TASK, 9001));
        assert_eq!(
            csum == 0,
            proto == UDP && !udp_csum,
            "a zero UDP checksum stays zero"
        );
        taken += 1;
        assert_eq!(xdp_took(&p), taken);
    }
    // A checksum left for the device to finish (CHECKSUM_PARTIAL: only the
    // pseudo-header's sum) is tcx's to update: unchanged and unmarked.
    let mut partial = packet(TCP, (client(1), 30005), (PUBLISHED, 8081), SYN, true);
    let seed = !sum(&[], pseudo(client(1), PUBLISHED, TCP, partial.len() - 34)) ^ 0xffff;
    partial[34 + 16..34 + 18].copy_from_slice(&seed.to_be_bytes());
    let (verdict, out) = run_program(&p, "mesh_port_xdp", &partial);
    assert_eq!((verdict, &out), (XDP_PASS, &partial), "left to tcx");
    assert_eq!(xdp_took(&p), taken);
    // A pick on another host: unchanged and unmarked, for the tcx program, which
    // finds XDP's pick in mesh_port_flows and hops the flow to it.
    let frame = packet(TCP, (client(2), 30003), (PUBLISHED, 8080), SYN, true);
    let (verdict, out) = run_program(&p, "mesh_port_xdp", &frame);
    assert_eq!((verdict, &out), (XDP_PASS, &frame));
    let flows: HashMap<&mut MapData, FlowKey, [u8; 8]> =
        HashMap::try_from(p.ebpf.map_mut("mesh_port_flows").unwrap()).unwrap();
    let key = to_published(TCP, client(2), 30003);
    let picked = flows.get(&key, 0).expect("XDP recorded the pick");
    assert_eq!(picked[..4], TASK.octets());
    let (verdict, out) = run(&p, &frame);
    assert_eq!(verdict, REDIRECT);
    assert_eq!(read(&out).1, (TASK, 9000));
    // Not a published port, or not this host's address: untouched.
    for frame in [
        packet(TCP, (client(3), 30004), (PUBLISHED, 8082), SYN, true),
        packet(TCP, (client(3), 30004), (SRC, 8081), SYN, true),
    ] {
        assert_eq!(run_program(&p, "mesh_port_xdp", &frame), (XDP_PASS, frame));
    }
    assert_eq!(xdp_took(&p), taken);
}

/// A hopped UDP flow keeps the client's own port, 22000, as its bound port; 22000 is
/// then published here with a local task. The hopped task's replies are still the
/// hop's (tcx translates them back), not a new flow for XDP to take.
#[test]
fn at_xdp_a_reply_to_a_hop_is_left_to_tcx_even_on_a_published_port() {
    let Some(mut p) = program() else { return };
    let hop = packet(UDP, (client(7), 22000), (PUBLISHED, 8080), 0, true);
    let (verdict, out) = run(&p, &hop);
    assert_eq!(verdict, REDIRECT);
    assert_eq!(read(&out).0, (SRC, 22000), "the client's port is kept");
    let mut ports: HashMap<&mut MapData, PortKey, PortFrontend> =
        HashMap::try_from(p.ebpf.map_mut("mesh_ports").unwrap()).unwrap();
    let value = PortFrontend::build(std::slice::from_ref(&local_task())).unwrap();
    ports
        .insert(PortKey::new(22000, mesh_core::Protocol::Udp), *value, 0)
        .unwrap();
    let mut addrs: HashMap<&mut MapData, [u8; 4], u8> =
        HashMap::try_from(p.ebpf.map_mut("mesh_host_addrs").unwrap()).unwrap();
    addrs.insert(SRC.octets(), 1, 0).unwrap();
    let reply = packet(UDP, (TASK, 9000), (SRC, 22000), 0, true);
    let (verdict, out) = run_program(&p, "mesh_port_xdp", &reply);
    assert_eq!(
        (verdict, &out),
        (XDP_PASS, &reply),
        "unchanged and unmarked"
    );
    assert_eq!(xdp_took(&p), 0);
    let (verdict, out) = run(&p, &reply);
    assert_eq!(verdict, REDIRECT);
    assert_eq!(
        read(&out),
        ((PUBLISHED, 8080), (client(7), 22000), read(&out).2)
    );
}
