//! The HTTP/1 server under the router: a task per connection, a cap on open
//! connections, and a deadline for every request head. hyper starts that
//! deadline whenever a connection waits for its next request, so it also
//! closes idle keep-alive connections and clients that send their headers a
//! byte at a time. A connection past the cap is answered 503 and closed
//! without reading it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Limits of the connections themselves (below any request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// A connection that has not sent a whole request head this long after
    /// it opened or after its last response is closed.
    pub header_read_timeout: Duration,
    /// Connections open at once; more are answered 503 and closed.
    pub max_connections: usize,
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self { header_read_timeout: Duration::from_secs(10), max_connections: 1024 }
    }
}

/// Serve `app` on `listener` until `stop`; then stop accepting, let every
/// open connection finish its request in flight, and return. Connections
/// may switch protocols (the port proxy's WebSockets); hyper-util's
/// `GracefulShutdown` takes no upgradeable HTTP/1 connection, so each
/// connection's task watches a token and shuts itself down gracefully.
pub async fn serve_http(
    listener: TcpListener,
    app: Router,
    limits: ConnLimits,
    tls: Option<TlsAcceptor>,
    stop: impl Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let stopping = CancellationToken::new();
    let tracker = TaskTracker::new();
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    tokio::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors, say: wait rather than spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            tracing::debug!(%peer, limit = limits.max_connections, "too many connections; refusing one");
            tokio::spawn(refuse(stream, limits.max_connections));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (app, builder, stopping, tls) = (app.clone(), builder.clone(), stopping.clone(), tls.clone());
        tracker.spawn(async move {
            match tls {
                None => serve_connection(&builder, stream, app, stopping, peer).await,
                Some(acceptor) => {
                    // The handshake shares the head's deadline: a client
                    // that opens and waits holds a permit no longer.
                    match tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => serve_connection(&builder, tls, app, stopping, peer).await,
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
            drop(permit);
        });
    }
    drop(listener);
    stopping.cancel();
    tracker.close();
    tracker.wait().await;
}

/// One connection until it ends, or until `stopping` (then gracefully).
async fn serve_connection<I>(
    builder: &http1::Builder,
    io: I,
    app: Router,
    stopping: CancellationToken,
    peer: std::net::SocketAddr,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(app);
    let conn = builder.serve_connection(TokioIo::new(io), service).with_upgrades();
    tokio::pin!(conn);
    let ended = tokio::select! {
        r = conn.as_mut() => r,
        () = stopping.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = ended {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// Answer a connection over the cap without reading from it.
async fn refuse(mut stream: TcpStream, limit: usize) {
    let body = crate::error::ApiError::new(
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        "too_many_connections",
        format!("{limit} connections are open, the limit (gateway.max_connections)"),
    )
    .to_json()
    .to_string();
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(answer.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use ember_pool::config::PoolConfig;
    use ember_pool::pool::Pool;
    use tokio::io::AsyncReadExt as _;

    use super::*;
    use crate::config::Limits;
    use crate::functions::Functions;
    use crate::state::AppState;
    use crate::testing::FakeAgents;

    async fn start(limits: ConnLimits) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
        start_with(limits, None).await
    }

    async fn start_with(
        limits: ConnLimits,
        tls: Option<TlsAcceptor>,
    ) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let cfg = PoolConfig {
            min_size: 1,
            max_size: 2,
            target_free: 1,
            max_host_cpu: None,
            ..PoolConfig::default()
        };
        let pool = Pool::start(FakeAgents::default(), cfg, 256);
        let state = AppState::new(crate::pools::Pools::single(pool), Limits::default(), Functions::default());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(crate::serve::serve(listener, state, Default::default(), limits, tls, async move {
            let _ = rx.await;
        }));
        (addr, tx)
    }

    /// One whole request on its own connection; the answer's status line and body.
    async fn request(addr: SocketAddr, head_and_body: &str) -> (String, String) {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(head_and_body.as_bytes()).await.unwrap();
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut answer)).await.unwrap().unwrap();
        let status = answer.lines().next().unwrap_or_default().to_string();
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
        (status, body)
    }

    /// A client that sends its request head one header line every 100 ms,
    /// never finishing it; returns how long the server kept it open.
    async fn slow_client(addr: SocketAddr) -> Duration {
        let t = tokio::time::Instant::now();
        let mut s = TcpStream::connect(addr).await.unwrap();
        if s.write_all(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n").await.is_err() {
            return t.elapsed();
        }
        let mut buf = [0u8; 512];
        loop {
            tokio::select! {
                r = s.read(&mut buf) => if matches!(r, Ok(0) | Err(_)) { return t.elapsed() },
                () = tokio::time::sleep(Duration::from_millis(100)) => {
                    if s.write_all(b"x-slow: 1\r\n").await.is_err() {
                        return t.elapsed();
                    }
                }
            }
            if t.elapsed() > Duration::from_secs(20) {
                return t.elapsed();
            }
        }
    }

    #[tokio::test]
    async fn slow_clients_are_cut_off_while_real_calls_still_answer() {
        let limits = ConnLimits { header_read_timeout: Duration::from_secs(2), max_connections: 64 };
        let (addr, _stop) = start(limits).await;
        let slow: Vec<_> = (0..40).map(|_| tokio::spawn(slow_client(addr))).collect();
        tokio::time::sleep(Duration::from_millis(500)).await;
        // While forty clients dribble their headers, the server answers.
        let (status, _) =
            request(addr, "GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n").await;
        assert!(status.contains(" 200 "), "{status}");
        let body = r#"{"cmd":"echo hi"}"#;
        let run = format!(
            "POST /v1/run HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
             connection: close\r\n\r\n{body}",
            body.len()
        );
        let (status, answer) = request(addr, &run).await;
        assert!(status.contains(" 200 "), "{status} {answer}");
        assert!(answer.contains("hi"), "{answer}");
        // Each slow client is closed at its header deadline, none held for long.
        for s in slow {
            let held = s.await.unwrap();
            assert!(held >= Duration::from_millis(1500) && held < Duration::from_secs(5), "held {held:?}");
        }
    }

    #[tokio::test]
    async fn connections_past_the_cap_get_a_503_and_the_cap_frees_up() {
        let limits = ConnLimits { header_read_timeout: Duration::from_secs(1), max_connections: 4 };
        let (addr, _stop) = start(limits).await;
        let held: Vec<_> = (0..4).map(|_| tokio::spawn(slow_client(addr))).collect();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (status, body) = request(addr, "GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n").await;
        assert!(status.contains(" 503 "), "{status}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["code"], "too_many_connections");
        for h in held {
            h.await.unwrap();
        }
        // Their slots are free again.
        let (status, _) =
            request(addr, "GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n").await;
        assert!(status.contains(" 200 "), "{status}");
    }

    #[tokio::test]
    async fn an_idle_keep_alive_connection_is_closed_after_the_header_deadline() {
        let limits = ConnLimits { header_read_timeout: Duration::from_secs(1), max_connections: 8 };
        let (addr, _stop) = start(limits).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n").await.unwrap();
        let t = tokio::time::Instant::now();
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        // Then nothing: the server hangs up about a second later.
        let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.expect("closed in time");
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
        assert!(t.elapsed() >= Duration::from_millis(900), "{:?}", t.elapsed());
    }

    /// `curl --cacert CA https://127.0.0.1:PORT/healthz`: the status, or
    /// curl's exit code as a negative number when no answer came.
    async fn curl_tls(addr: SocketAddr, ca: &std::path::Path) -> i32 {
        let out = tokio::process::Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", "--cacert"])
            .arg(ca)
            .arg(format!("https://127.0.0.1:{}/healthz", addr.port()))
            .output()
            .await
            .expect("curl (make test-deps installs it)");
        match out.status.code() {
            Some(0) => String::from_utf8_lossy(&out.stdout).parse().unwrap_or(0),
            c => -c.unwrap_or(1),
        }
    }

    #[tokio::test]
    async fn https_serves_and_a_rotated_certificate_is_taken_without_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let live = crate::tls::tests::self_signed(dir.path(), "live");
        let first_ca = dir.path().join("first-ca.crt");
        std::fs::copy(&live.cert, &first_ca).unwrap();
        let cert = crate::tls::ReloadingCert::open(live.clone()).unwrap();
        let _watch = cert.watch(Duration::from_millis(100));
        let (addr, _stop) =
            start_with(ConnLimits::default(), Some(crate::tls::acceptor(cert).unwrap())).await;
        assert_eq!(curl_tls(addr, &first_ca).await, 200);
        // Plain HTTP to the HTTPS port gets no answer.
        let (status, _) = request(addr, "GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n").await;
        assert!(!status.starts_with("HTTP/1.1 200"), "{status}");

        // Rotate: a new pair written over the files (as certbot renews).
        let next = crate::tls::tests::self_signed(dir.path(), "next");
        std::fs::copy(&next.key, &live.key).unwrap();
        std::fs::copy(&next.cert, &live.cert).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while curl_tls(addr, &next.cert).await != 200 {
            assert!(tokio::time::Instant::now() < deadline, "the new certificate was not taken");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(curl_tls(addr, &first_ca).await < 0, "the old certificate is no longer served");

        // A broken pair keeps the one before.
        std::fs::write(&live.cert, "garbage").unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(curl_tls(addr, &next.cert).await, 200);
    }
}
