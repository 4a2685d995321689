//! The CLI's HTTP client for the agent API, over a unix socket or TCP.

use std::path::PathBuf;

use anyhow::{Context, Result, anyhow, bail};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use mesh_api::ErrorBody;
use serde::Serialize;
use serde::de::DeserializeOwned;

#[derive(Debug, Clone)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(String),
}

impl Endpoint {
    /// `unix:/path`, a bare absolute path, `http://host:port` or `host:port`.
    pub fn parse(s: &str) -> Result<Self> {
        if let Some(path) = s.strip_prefix("unix:") {
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        if s.starts_with('/') {
            return Ok(Self::Unix(PathBuf::from(s)));
        }
        if s.starts_with("https://") {
            bail!("--api {s:?}: https is not supported; use http://HOST:PORT or unix:PATH");
        }
        let hostport = s.strip_prefix("http://").unwrap_or(s).trim_end_matches('/');
        if !hostport.contains(':') {
            bail!("--api {s:?}: expected unix:PATH or http://HOST:PORT");
        }
        Ok(Self::Tcp(hostport.to_string()))
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "http://{a}"),
        }
    }
}

pub struct Client {
    pub endpoint: Endpoint,
    pub token: Option<String>,
}

impl Client {
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes)> {
        let unreachable = |e: std::io::Error| {
            anyhow!(
                "cannot reach the mesh agent at {}: {e} (is `mesh agent` running? set --api or MESH_API)",
                self.endpoint
            )
        };
        let body = body.map(Bytes::from).unwrap_or_default();
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "mesh")
            .header("content-type", "application/json");
        if let Some(token) = &self.token {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        let req = req.body(Full::new(body))?;
        let fut = async {
            let resp = match &self.endpoint {
                Endpoint::Unix(p) => {
                    let io = TokioIo::new(
                        tokio::net::UnixStream::connect(p)
                            .await
                            .map_err(unreachable)?,
                    );
                    let (mut tx, conn) = hyper::client::conn::http1::handshake(io).await?;
                    tokio::spawn(conn);
                    tx.send_request(req).await?
                }
                Endpoint::Tcp(a) => {
                    let io = TokioIo::new(
                        tokio::net::TcpStream::connect(a)
                            .await
                            .map_err(unreachable)?,
                    );
                    let (mut tx, conn) = hyper::client::conn::http1::handshake(io).await?;
                    tokio::spawn(conn);
                    tx.send_request(req).await?
                }
            };
            let status = resp.status();
            let bytes = resp.into_body().collect().await?.to_bytes();
            Ok::<_, anyhow::Error>((status, bytes))
        };
        tokio::time::timeout(std::time::Duration::from_secs(30), fut)
            .await
            .map_err(|_| {
                anyhow!(
                    "the mesh agent at {} did not answer within 30s",
                    self.endpoint
                )
            })?
    }

    /// A request without a body.
    pub async fn request<T: DeserializeOwned>(&self, method: Method, path: &str) -> Result<T> {
        self.call::<(), T>(method, path, None).await
    }

    /// Sends a request with a typed body and decodes a 2xx answer; any other status
    /// becomes the agent's own error message.
    pub async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T> {
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .context("cannot encode the request")?;
        let (status, bytes) = self.send(method, path, body).await?;
        if !status.is_success() {
            return Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(e) => anyhow!("{}", e.detail),
                Err(_) => anyhow!(
                    "agent answered {status}: {}",
                    String::from_utf8_lossy(&bytes).trim()
                ),
            });
        }
        if bytes.is_empty() {
            return serde_json::from_str("null").context("empty answer");
        }
        serde_json::from_slice(&bytes)
            .with_context(|| format!("unexpected answer from the agent to {path}"))
    }
}
