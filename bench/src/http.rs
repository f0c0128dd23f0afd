//! A bare HTTP/1.1 client connection (hyper's low-level API): one TCP connection per load
//! worker, requests sent one after another on it, reconnecting after an error. Cheaper per
//! request than a pooled client, and the number of connections is exactly what was asked.

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use tokio::net::TcpStream;

/// A request body as the load generator sends it.
pub type Req = Request<Full<Bytes>>;

/// Opens a TCP connection with Nagle off and does the HTTP/1.1 handshake.
pub async fn connect<B>(addr: SocketAddr) -> anyhow::Result<SendRequest<B>>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// One keep-alive connection to `addr`.
pub struct Conn {
    addr: SocketAddr,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Conn {
    /// A connection opened on first use.
    pub fn new(addr: SocketAddr) -> Self {
        Self { addr, sender: None }
    }

    /// Sends `req` and reads the whole answer.
    pub async fn send(&mut self, req: Req) -> anyhow::Result<(StatusCode, Bytes)> {
        let result = self.try_send(req).await;
        if result.is_err() {
            self.sender = None;
        }
        result
    }

    async fn try_send(&mut self, req: Req) -> anyhow::Result<(StatusCode, Bytes)> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            self.sender = Some(connect(self.addr).await?);
        }
        let sender = self.sender.as_mut().expect("connected above");
        sender.ready().await?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }
}

/// Where the gateway (or simulator) is, and the API key to use.
#[derive(Clone)]
pub struct Target {
    /// Socket address.
    pub addr: SocketAddr,
    /// `Host` header value.
    pub host: HeaderValue,
    /// `Bearer …` header value.
    pub bearer: Option<HeaderValue>,
}

impl Target {
    /// Parses `http://host:port` (no path).
    pub fn parse(base: &str, api_key: Option<&str>) -> anyhow::Result<Self> {
        let hostport = base
            .strip_prefix("http://")
            .context("only http:// targets are supported")?
            .trim_end_matches('/');
        let addr: SocketAddr = hostport
            .parse()
            .with_context(|| format!("'{hostport}' is not an IP:port (the benchmark is loopback only)"))?;
        Ok(Self {
            addr,
            host: HeaderValue::from_str(hostport)?,
            bearer: api_key
                .map(|k| HeaderValue::from_str(&format!("Bearer {k}")))
                .transpose()?,
        })
    }

    /// A request with `Host` (and the API key, when there is one).
    pub fn request(&self, method: Method, path: &str, content_type: Option<&'static str>, body: Bytes) -> Req {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, self.host.clone());
        if let Some(b) = &self.bearer {
            req = req.header(AUTHORIZATION, b.clone());
        }
        if let Some(ct) = content_type {
            req = req.header(CONTENT_TYPE, ct);
        }
        req.body(Full::new(body)).expect("valid request")
    }

    /// `GET path`.
    pub fn get(&self, path: &str) -> Req {
        self.request(Method::GET, path, None, Bytes::new())
    }

    /// Sends one request on a fresh connection (for control calls, not for load).
    pub async fn call(&self, req: Req) -> anyhow::Result<(StatusCode, Bytes)> {
        Conn::new(self.addr).send(req).await
    }
}
