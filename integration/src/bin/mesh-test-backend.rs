//! A backend process for tests: answers every HTTP request (or bare TCP connection)
//! with its name. `mesh-test-backend NAME [PORT]` prints the bound port on stdout.
//! `mesh-test-backend --get ADDR` is the matching client: it prints the answer's body,
//! so tests can run it inside a network namespace. Each answer carries an `X-Client`
//! header with the address the backend saw, and `X-Client-Port` with the port; `--who
//! ADDR` prints the body and the address. `--who-from ADDR FIRST COUNT` makes one GET
//! from each of COUNT client ports from FIRST, and prints each port, body, address
//! and port seen.
//! `mesh-test-backend --udp NAME PORT [IP]` answers each datagram with `NAME:<payload>`;
//! `mesh-test-backend --udp-ask ADDR COUNT` sends COUNT datagrams from as many sockets
//! (flows), each retried until answered, and prints the answers.
//! `mesh-test-backend --held ADDR SECS|stdin` opens a connection, sends the first line
//! of a request, prints `connected`, waits SECS (or for a line on stdin) and sends the
//! rest: an established connection held across an event. It then prints `ok <answer>` or `fail <why>`.
//! `mesh-test-backend --udp-flow ADDR [sendto]` is one UDP flow (one socket, one source port)
//! driven from stdin: for each line it sends a datagram, retried until answered, and
//! prints which task answered (`none` after 5 tries). With `sendto` the socket is not
//! connected, and each line also shows the address the answer came from.
//! `--who-peer ADDR` is `--who` plus the peer address the client's socket reports.
//! `mesh-test-backend --load ADDR RATE [udp|dns NAME]` sends RATE requests a second
//! (HTTP GETs, datagrams or DNS queries answered within 1 s) until killed, each from its own connection or
//! socket, and prints `<unix ms> sent <n>` as request n goes and, when it ends,
//! `<unix ms sent> ok <answer> <latency ms> <n>` or `<unix ms sent> fail <why> <latency ms> <n>`.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;

use integration::load::unix_ms;

/// One GET of `addr`: the answer's head and body, and the peer address the socket
/// reports.
fn fetch(addr: &str) -> std::io::Result<(String, String, std::net::SocketAddr)> {
    exchange(std::net::TcpStream::connect(addr)?)
}

/// `fetch` from a chosen client port.
fn fetch_from(addr: &str, port: u16) -> std::io::Result<(String, String, std::net::SocketAddr)> {
    let target: std::net::SocketAddr = addr
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&std::net::SocketAddr::from(([0, 0, 0, 0], port)).into())?;
    socket.connect_timeout(&target.into(), std::time::Duration::from_secs(30))?;
    exchange(socket.into())
}

fn exchange(mut s: std::net::TcpStream) -> std::io::Result<(String, String, std::net::SocketAddr)> {
    use std::io::Read;
    let peer = s.peer_addr()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Ok((head.to_string(), body.trim().to_string(), peer))
}

/// What `get` prints besides the body.
#[derive(PartialEq)]
enum Show {
    Body,
    /// The client address the task saw.
    Client,
    /// That, and the peer address the client's socket reports (`getpeername`).
    ClientAndPeer,
}

/// `--get ADDR` prints the answer's body; `--who ADDR` also the client address the
/// task saw; `--who-peer ADDR` also the peer the client's socket reports.
fn get(addr: &str, show: Show) -> ! {
    match fetch(addr) {
        Ok((head, body, peer)) => {
            let client = head
                .lines()
                .find_map(|l| l.strip_prefix("X-Client: "))
                .unwrap_or("?");
            if show == Show::ClientAndPeer {
                println!("{body} {client} {peer}");
            } else if show == Show::Client {
                println!("{body} {client}");
            } else {
                println!("{body}");
            }
            std::process::exit(0)
        }
        Err(e) => {
            eprintln!("{addr}: {e}");
            std::process::exit(1)
        }
    }
}

/// How long a held connection waits before the rest of its request.
enum Cue {
    After(u64),
    /// Until a line arrives on stdin.
    Stdin,
}

fn held(addr: &str, cue: Cue) -> ! {
    use std::io::Read;
    let result = (|| -> std::io::Result<String> {
        let target: std::net::SocketAddr = addr
            .parse()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let mut s =
            std::net::TcpStream::connect_timeout(&target, std::time::Duration::from_secs(30))?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
        write!(s, "GET / HTTP/1.1\r\n")?;
        println!("connected");
        std::io::stdout().flush()?;
        match cue {
            Cue::After(secs) => std::thread::sleep(std::time::Duration::from_secs(secs)),
            Cue::Stdin => {
                let mut line = String::new();
                std::io::stdin().read_line(&mut line)?;
            }
        }
        write!(s, "Host: held\r\nConnection: close\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        match text.split_once("\r\n\r\n") {
            Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.trim().to_string()),
            _ => Ok(String::new()),
        }
    })();
    match result {
        Ok(body) if !body.is_empty() => println!("ok {body}"),
        Ok(_) => println!("fail no-answer"),
        Err(e) => println!("fail {}", e.kind().to_string().replace(' ', "_")),
    }
    std::process::exit(0)
}

/// `--udp-flow ADDR`: one socket, connected, printing the task that answered each
/// line's datagram. With `sendto` the socket is not connected (sendto and recvfrom
/// each time), and each line also shows the address the answer came from.
fn udp_flow(addr: &str, connected: bool) -> ! {
    let target: std::net::SocketAddr = addr.parse().expect("ADDR");
    let any = if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let socket = std::net::UdpSocket::bind(any).expect("bind");
    if connected {
        socket.connect(target).expect("connect");
    }
    socket
        .set_read_timeout(Some(std::time::Duration::from_secs(1)))
        .expect("timeout");
    let mut buf = [0u8; 2048];
    for (n, line) in std::io::stdin().lines().enumerate() {
        if line.is_err() {
            break;
        }
        let mut answer = if connected { "none" } else { "none -" }.to_string();
        for _ in 0..5 {
            let payload = format!("f{n}");
            let got = if connected {
                let _ = socket.send(payload.as_bytes());
                socket.recv(&mut buf).map(|got| (got, None))
            } else {
                let _ = socket.send_to(payload.as_bytes(), target);
                socket
                    .recv_from(&mut buf)
                    .map(|(got, from)| (got, Some(from)))
            };
            if let Ok((got, from)) = got {
                let text = String::from_utf8_lossy(&buf[..got]);
                let task = text.split(':').next().unwrap_or("");
                answer = match from {
                    Some(from) => format!("{task} {from}"),
                    None => task.to_string(),
                };
                break;
            }
        }
        println!("{answer}");
        std::io::stdout().flush().expect("stdout");
    }
    std::process::exit(0)
}

fn udp_echo(name: &str, ip: &str, port: u16) -> ! {
    let socket = std::net::UdpSocket::bind((ip, port)).expect("bind");
    println!("{}", socket.local_addr().expect("addr").port());
    std::io::stdout().flush().expect("stdout");
    let mut buf = [0u8; 2048];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let mut answer = format!("{name}:").into_bytes();
        answer.extend_from_slice(&buf[..n]);
        let _ = socket.send_to(&answer, from);
    }
}

fn udp_ask(addr: &str, count: usize) -> ! {
    let mut answered = 0;
    for i in 0..count {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
        socket.connect(addr).expect("connect");
        socket
            .set_read_timeout(Some(std::time::Duration::from_millis(200)))
            .expect("timeout");
        let mut buf = [0u8; 2048];
        // UDP may drop: resend until answered, within a generous bound.
        for _ in 0..150 {
            let _ = socket.send(format!("q{i}").as_bytes());
            if let Ok(n) = socket.recv(&mut buf) {
                println!("{}", String::from_utf8_lossy(&buf[..n]));
                answered += 1;
                break;
            }
        }
    }
    std::process::exit(if answered == count { 0 } else { 1 })
}

fn one_http(addr: &str) -> Result<String, String> {
    use std::io::Read;
    // As patient as a browser or curl: under packet loss TCP doubles its
    // retransmission timeout with each loss of one segment (and starts at 1 s for a
    // SYN), so a healthy request can take over 10 s. Slow requests are counted apart;
    // a failure is a refusal, a reset, a wrong answer or a minute without one.
    let timeout = std::time::Duration::from_secs(60);
    let target: std::net::SocketAddr = addr.parse().map_err(|e| format!("{e}"))?;
    let mut s =
        std::net::TcpStream::connect_timeout(&target, timeout).map_err(|e| e.kind().to_string())?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: load\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.kind().to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text)
        .map_err(|e| e.kind().to_string())?;
    match text.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.trim().to_string()),
        _ => Err("bad-answer".into()),
    }
}

fn one_datagram(addr: &str, n: u64) -> Result<String, String> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    socket.connect(addr).map_err(|e| e.to_string())?;
    socket
        .set_read_timeout(Some(std::time::Duration::from_secs(1)))
        .map_err(|e| e.to_string())?;
    socket
        .send(format!("q{n}").as_bytes())
        .map_err(|e| e.kind().to_string())?;
    let mut buf = [0u8; 2048];
    let got = socket.recv(&mut buf).map_err(|e| e.kind().to_string())?;
    Ok(String::from_utf8_lossy(&buf[..got])
        .split(':')
        .next()
        .unwrap_or("")
        .to_string())
}

/// A DNS query for `name` (A, recursion desired), and whether `answer` answers it
/// with NOERROR and at least one record.
fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.').filter(|l| !l.is_empty()) {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

fn one_dns(addr: &str, n: u64, name: &str) -> Result<String, String> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    socket.connect(addr).map_err(|e| e.to_string())?;
    socket
        .set_read_timeout(Some(std::time::Duration::from_secs(1)))
        .map_err(|e| e.to_string())?;
    let id = n as u16;
    socket
        .send(&dns_query(id, name))
        .map_err(|e| e.kind().to_string())?;
    let mut buf = [0u8; 2048];
    let got = socket.recv(&mut buf).map_err(|e| e.kind().to_string())?;
    let a = &buf[..got];
    if got < 12 || a[..2] != id.to_be_bytes() {
        return Err("bad-answer".into());
    }
    let rcode = a[3] & 0x0f;
    let answers = u16::from_be_bytes([a[6], a[7]]);
    if rcode != 0 || answers == 0 {
        return Err(format!("rcode{rcode}-answers{answers}"));
    }
    Ok("dns".into())
}

enum Kind {
    Http,
    Udp,
    Dns(String),
}

/// A steady stream of requests, one thread each so a slow one never delays the next.
fn load(addr: &str, rate: u64, kind: Kind) -> ! {
    let kind = std::sync::Arc::new(kind);
    let period = std::time::Duration::from_micros(1_000_000 / rate.max(1));
    let out = std::sync::Arc::new(std::sync::Mutex::new(std::io::stdout()));
    let mut next = std::time::Instant::now();
    for n in 0.. {
        next += period;
        let addr = addr.to_string();
        let out = out.clone();
        let kind = kind.clone();
        let sent = unix_ms();
        {
            // Logged before the request goes, so a request that never ends is seen.
            let mut out = out.lock().unwrap_or_else(|p| p.into_inner());
            let _ = writeln!(out, "{sent} sent {n}");
            let _ = out.flush();
        }
        std::thread::spawn(move || {
            let started = std::time::Instant::now();
            let result = match kind.as_ref() {
                Kind::Http => one_http(&addr),
                Kind::Udp => one_datagram(&addr, n),
                Kind::Dns(name) => one_dns(&addr, n, name),
            };
            let ms = started.elapsed().as_millis();
            let line = match result {
                Ok(answer) => format!("{sent} ok {answer} {ms} {n}\n"),
                Err(why) => format!("{sent} fail {} {ms} {n}\n", why.replace(' ', "_")),
            };
            let mut out = out.lock().unwrap_or_else(|p| p.into_inner());
            let _ = out.write_all(line.as_bytes());
            let _ = out.flush();
        });
        std::thread::sleep(next.saturating_duration_since(std::time::Instant::now()));
    }
    unreachable!()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let name = args
        .next()
        .expect("usage: mesh-test-backend NAME [PORT] | --get ADDR");
    if name == "--get" {
        get(&args.next().expect("--get ADDR"), Show::Body);
    }
    if name == "--who" {
        get(&args.next().expect("--who ADDR"), Show::Client);
    }
    if name == "--who-peer" {
        get(&args.next().expect("--who-peer ADDR"), Show::ClientAndPeer);
    }
    if name == "--who-from" {
        // One GET from each of COUNT client ports from FIRST: "PORT TASK CLIENT
        // CLIENT_PORT" lines, the last two as the task saw them.
        let addr = args.next().expect("--who-from ADDR FIRST COUNT");
        let first: u16 = args.next().expect("FIRST").parse().expect("FIRST");
        let count: u16 = args.next().expect("COUNT").parse().expect("COUNT");
        for port in first..first + count {
            match fetch_from(&addr, port) {
                Ok((head, body, _)) => {
                    let header = |name: &str| {
                        head.lines()
                            .find_map(|l| l.strip_prefix(name))
                            .unwrap_or("?")
                            .to_string()
                    };
                    let (client, seen_port) = (header("X-Client: "), header("X-Client-Port: "));
                    println!("{port} {body} {client} {seen_port}");
                }
                Err(e) => {
                    eprintln!("{addr} from port {port}: {e}");
                    std::process::exit(1)
                }
            }
        }
        std::process::exit(0)
    }
    if name == "--held" {
        let addr = args.next().expect("--held ADDR SECS|stdin");
        let cue = match args.next().as_deref() {
            Some("stdin") => Cue::Stdin,
            Some(secs) => Cue::After(secs.parse().expect("SECS")),
            None => Cue::After(3),
        };
        held(&addr, cue);
    }
    if name == "--udp-flow" {
        let addr = args.next().expect("--udp-flow ADDR [sendto]");
        let connected = args.next().as_deref() != Some("sendto");
        udp_flow(&addr, connected);
    }
    if name == "--udp" {
        let name = args.next().expect("--udp NAME PORT [IP]");
        let port: u16 = args.next().map(|p| p.parse().expect("PORT")).unwrap_or(0);
        let ip = args.next().unwrap_or_else(|| "127.0.0.1".into());
        udp_echo(&name, &ip, port);
    }
    if name == "--load" {
        let addr = args.next().expect("--load ADDR RATE [udp]");
        let rate: u64 = args.next().map(|r| r.parse().expect("RATE")).unwrap_or(20);
        let kind = match args.next().as_deref() {
            Some("udp") => Kind::Udp,
            Some("dns") => Kind::Dns(args.next().unwrap_or_else(|| "chaos.test".into())),
            _ => Kind::Http,
        };
        load(&addr, rate, kind);
    }
    if name == "--udp-ask" {
        let addr = args.next().expect("--udp-ask ADDR COUNT");
        let count: usize = args.next().map(|c| c.parse().expect("COUNT")).unwrap_or(1);
        udp_ask(&addr, count);
    }
    let port: u16 = args.next().map(|p| p.parse().expect("PORT")).unwrap_or(0);
    let ip = args.next().unwrap_or_else(|| "127.0.0.1".into());
    let listener = TcpListener::bind((ip.as_str(), port)).expect("bind");
    println!("{}", listener.local_addr().expect("addr").port());
    std::io::stdout().flush().expect("stdout");
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let name = name.clone();
        std::thread::spawn(move || {
            // As patient as nginx's client_header_timeout (60 s) and as the load
            // client: under packet loss a request can take over 10 s to arrive.
            let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(60)));
            // Read the request head if one comes; health checks and clients both send one.
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut line = String::new();
            while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                if line == "\r\n" || line == "\n" {
                    break;
                }
                line.clear();
            }
            let body = format!("{name}\n");
            // The address and port the connection came from, as the task sees them.
            let peer = stream.peer_addr().ok();
            let client = peer.map(|a| a.ip().to_string()).unwrap_or_default();
            let port = peer.map(|a| a.port()).unwrap_or_default();
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nX-Client: {client}\r\nX-Client-Port: {port}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        });
    }
}
