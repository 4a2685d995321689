//! A backend process for tests: answers every HTTP request (or bare TCP connection)
//! with its name. `mesh-test-backend NAME [PORT]` prints the bound port on stdout.
//! `mesh-test-backend --get ADDR` is the matching client: it prints the answer's body,
//! so tests can run it inside a network namespace.
//! `mesh-test-backend --udp NAME PORT [IP]` answers each datagram with `NAME:<payload>`;
//! `mesh-test-backend --udp-ask ADDR COUNT` sends COUNT datagrams from as many sockets
//! (flows), each retried until answered, and prints the answers.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;

fn get(addr: &str) -> ! {
    use std::io::Read;
    let result = (|| -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect(addr)?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
        write!(
            s,
            "GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
        )?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok(text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.trim().to_string())
            .unwrap_or_default())
    })();
    match result {
        Ok(body) => {
            println!("{body}");
            std::process::exit(0)
        }
        Err(e) => {
            eprintln!("{addr}: {e}");
            std::process::exit(1)
        }
    }
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

fn main() {
    let mut args = std::env::args().skip(1);
    let name = args
        .next()
        .expect("usage: mesh-test-backend NAME [PORT] | --get ADDR");
    if name == "--get" {
        get(&args.next().expect("--get ADDR"));
    }
    if name == "--udp" {
        let name = args.next().expect("--udp NAME PORT [IP]");
        let port: u16 = args.next().map(|p| p.parse().expect("PORT")).unwrap_or(0);
        let ip = args.next().unwrap_or_else(|| "127.0.0.1".into());
        udp_echo(&name, &ip, port);
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
            let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(10)));
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
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        });
    }
}
