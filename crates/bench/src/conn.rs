//! One HTTP/1.1 connection per worker (hyper's low-level client): the number
//! of connections a workload uses is exactly its concurrency, and there is no
//! pool bookkeeping on the hot path.

use std::net::SocketAddr;

use anyhow::{anyhow, Context, Result};
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Method, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

pub struct Conn {
    addr: SocketAddr,
    host: String,
    tx: Option<SendRequest<Full<Bytes>>>,
}

/// A fully read response.
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

pub fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

impl Conn {
    pub fn new(addr: SocketAddr) -> Self {
        Conn {
            addr,
            host: addr.to_string(),
            tx: None,
        }
    }

    async fn sender(&mut self) -> Result<&mut SendRequest<Full<Bytes>>> {
        let alive = match &mut self.tx {
            Some(tx) => tx.ready().await.is_ok(),
            None => false,
        };
        if !alive {
            let stream = TcpStream::connect(self.addr)
                .await
                .with_context(|| format!("connect {}", self.addr))?;
            stream.set_nodelay(true)?;
            let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            self.tx = Some(tx);
        }
        self.tx.as_mut().ok_or_else(|| anyhow!("no connection"))
    }

    /// Sends a request and returns the response head with its streaming body.
    pub async fn send(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<Response<Incoming>> {
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.host.as_str());
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(Full::new(body))?;
        let tx = self.sender().await?;
        match tx.send_request(req).await {
            Ok(r) => Ok(r),
            Err(e) => {
                self.tx = None;
                Err(e.into())
            }
        }
    }

    /// Sends a request and reads the whole body.
    pub async fn call(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<Resp> {
        let resp = self.send(method, path, headers, body).await?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Resp {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        })
    }

    pub async fn get(&mut self, path: &str) -> Result<Resp> {
        self.call(Method::GET, path, &[], Bytes::new()).await
    }
}

/// Reads a whole body frame by frame, handing each data frame to `f`.
pub async fn for_each_frame(
    mut body: Incoming,
    mut f: impl FnMut(&[u8]) -> Result<()>,
) -> Result<u64> {
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        if let Ok(data) = frame.into_data() {
            n += data.len() as u64;
            f(&data)?;
        }
    }
    Ok(n)
}

/// Percent-encodes an offset token for a query string (tokens are normally
/// already URL-safe; this is for safety with other implementations).
pub fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Incremental Server-Sent Events parser (CR characters are dropped, so
/// `\r\n` framing works too).
#[derive(Default)]
pub struct SseParser {
    buf: BytesMut,
}

pub struct SseEvent {
    pub event: String,
    pub data: String,
}

impl SseParser {
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<SseEvent>) {
        if chunk.contains(&b'\r') {
            self.buf
                .extend(chunk.iter().copied().filter(|&b| b != b'\r'));
        } else {
            self.buf.extend_from_slice(chunk);
        }
        while let Some(pos) = self.buf.windows(2).position(|w| w == b"\n\n") {
            let raw = self.buf.split_to(pos + 2);
            let text = String::from_utf8_lossy(&raw[..pos]);
            let mut ev = SseEvent {
                event: "message".into(),
                data: String::new(),
            };
            let mut first = true;
            for line in text.split('\n') {
                if let Some(v) = line.strip_prefix("event:") {
                    ev.event = v.strip_prefix(' ').unwrap_or(v).to_string();
                } else if let Some(v) = line.strip_prefix("data:") {
                    if !first {
                        ev.data.push('\n');
                    }
                    first = false;
                    ev.data.push_str(v.strip_prefix(' ').unwrap_or(v));
                }
            }
            if !(text.is_empty() || text.starts_with(':') && first) {
                out.push(ev);
            }
        }
    }
}
