//! The benchmark's backend: TCP echo, UDP echo and a tiny HTTP/1.1 responder, on one
//! thread so it costs the shared load CPU as little as possible.

use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

pub const ECHO_PORT: u16 = 9000;
pub const HTTP_PORT: u16 = 9080;

/// Exactly 64 bytes, so an HTTP transaction is the same size as an echo one.
const HTTP_RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Length: 25\r\n\r\nmesh-bench http backend\r\n";

pub fn run(ip: IpAddr) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let echo = TcpListener::bind(SocketAddr::new(ip, ECHO_PORT))
            .await
            .with_context(|| format!("bind {ip}:{ECHO_PORT}"))?;
        let http = TcpListener::bind(SocketAddr::new(ip, HTTP_PORT))
            .await
            .with_context(|| format!("bind {ip}:{HTTP_PORT}"))?;
        let udp = Rc::new(UdpSocket::bind(SocketAddr::new(ip, ECHO_PORT)).await?);
        tokio::task::spawn_local(udp_echo(udp));
        tokio::task::spawn_local(accept(http, true));
        accept(echo, false).await;
        Ok(())
    })
}

async fn accept(listener: TcpListener, http: bool) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        if http {
            tokio::task::spawn_local(http_conn(stream));
        } else {
            tokio::task::spawn_local(echo_conn(stream));
        }
    }
}

async fn echo_conn(mut s: TcpStream) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Answers every request (a header block ending in a blank line) with a fixed 200;
/// keep-alive until the client closes.
async fn http_conn(mut s: TcpStream) {
    let mut buf = vec![0u8; 8 * 1024];
    let mut have = 0;
    loop {
        if have == buf.len() {
            return; // a header block larger than we serve
        }
        match s.read(&mut buf[have..]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => have += n,
        }
        while let Some(end) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") {
            if s.write_all(HTTP_RESPONSE).await.is_err() {
                return;
            }
            buf.copy_within(end + 4..have, 0);
            have -= end + 4;
        }
    }
}

async fn udp_echo(sock: Rc<UdpSocket>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if let Ok((n, from)) = sock.recv_from(&mut buf).await {
            let _ = sock.send_to(&buf[..n], from).await;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn http_response_is_64_bytes() {
        assert_eq!(super::HTTP_RESPONSE.len(), 64);
    }
}
