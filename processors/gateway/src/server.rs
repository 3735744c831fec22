//! The public listener. `axum::serve` sets no timer and no limits, so a client could hold a
//! connection forever by sending half a request; this accept loop serves each connection
//! with hyper's HTTP/1 builder and the bounds from the `[gateway]` section:
//!
//! - a header-read timeout (hyper's timer starts whenever the connection waits for a
//!   request, so it also closes a connection that never sends one and a keep-alive
//!   connection idle between requests);
//! - an idle timeout for what the header timer does not see: a connection with no bytes in
//!   either direction for that long, mid-response, is shut down gracefully and dropped if
//!   it does not finish within another header timeout (a client that stopped reading its
//!   stream);
//! - a cap on a connection's read buffer (`max_header_bytes`): a larger header is refused;
//! - a cap on open connections: beyond it a new connection is closed at once and counted;
//! - on Linux, `TCP_USER_TIMEOUT` of two stream keep-alive intervals: a peer that vanished
//!   without a word (no FIN, no RST) is noticed when a keep-alive comment goes unacknowledged,
//!   instead of after the kernel's retransmissions (about 15 minutes).
//!
//! HTTP/1.1 only: browsers reach the gateway over HTTP/1.1 or through a proxy that
//! terminates TLS and HTTP/2.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use presence_core::config::GatewayConfig;
use presence_core::Shutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::metrics::Metrics;

/// The bounds the listener enforces (from [`GatewayConfig`]).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub max_header_bytes: usize,
    /// Written data unacknowledged this long aborts the connection.
    pub unacknowledged_timeout: Duration,
}

impl Limits {
    pub fn of(c: &GatewayConfig) -> Limits {
        Limits {
            header_read_timeout: c.header_read_timeout,
            idle_timeout: c.idle_timeout,
            max_connections: c.max_connections,
            max_header_bytes: c.max_header_bytes,
            unacknowledged_timeout: c.stream_keep_alive * 2,
        }
    }
}

/// How long shutdown waits for open connections to finish their requests.
const DRAIN: Duration = Duration::from_secs(10);

/// Binds `addr` and serves `router` within `limits` until `shutdown`.
pub async fn serve(
    addr: SocketAddr,
    router: Router,
    limits: Limits,
    metrics: Metrics,
    shutdown: Shutdown,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen on {addr}: {e}; set gateway.listen to a free address"),
        )
    })?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(accept_loop(listener, router, limits, metrics, shutdown));
    Ok((bound, task))
}

async fn accept_loop(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    metrics: Metrics,
    shutdown: Shutdown,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(limits.max_header_bytes)
        .max_buf_size(limits.max_header_bytes);
    let http = Arc::new(http);
    loop {
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::warn!(error = %e, "accepting a connection failed; pausing 100 ms");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.wait() => break,
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            metrics.connections_refused.inc();
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        #[cfg(any(target_os = "linux", target_os = "android"))]
        let _ = socket2::SockRef::from(&stream)
            .set_tcp_user_timeout(Some(limits.unacknowledged_timeout));
        let (router, http, metrics, shutdown) = (
            router.clone(),
            Arc::clone(&http),
            metrics.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            metrics.connections.inc();
            connection(stream, router, &http, limits, shutdown).await;
            metrics.connections.dec();
            drop(slot);
        });
    }
    // Every open connection holds a slot: all of them back means all are closed.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(DRAIN, slots.acquire_many(all)).await;
}

/// Serves one connection until it ends, goes idle, or shutdown; see the module doc.
async fn connection(
    stream: TcpStream,
    router: Router,
    http: &hyper::server::conn::http1::Builder,
    limits: Limits,
    shutdown: Shutdown,
) {
    let epoch = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let io = TokioIo::new(Watched {
        inner: stream,
        epoch,
        last: Arc::clone(&last),
    });
    let conn = http.serve_connection(io, TowerToHyperService::new(router));
    tokio::pin!(conn);
    let mut check = tokio::time::interval((limits.idle_timeout / 4).max(Duration::from_millis(50)));
    let mut closing: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection closed with an error");
                }
                return;
            }
            _ = shutdown.wait(), if closing.is_none() => {
                conn.as_mut().graceful_shutdown();
                closing = Some(tokio::time::Instant::now() + DRAIN);
            }
            _ = check.tick() => {
                let now = tokio::time::Instant::now();
                match closing {
                    Some(deadline) if now >= deadline => return,
                    Some(_) => {}
                    None => {
                        let quiet_ms = (epoch.elapsed().as_millis() as u64).saturating_sub(last.load(Ordering::Relaxed));
                        if Duration::from_millis(quiet_ms) >= limits.idle_timeout {
                            conn.as_mut().graceful_shutdown();
                            closing = Some(now + limits.header_read_timeout);
                        }
                    }
                }
            }
        }
    }
}

/// A TCP stream that records when bytes last moved, for the idle timeout.
struct Watched {
    inner: TcpStream,
    epoch: Instant,
    /// Milliseconds after `epoch` of the last read or write that moved a byte.
    last: Arc<AtomicU64>,
}

impl Watched {
    fn touch(&self) {
        self.last
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
