//! A small HTTP/1.1 client for what oha does not do: sampling `/v1/pool`
//! and `/metrics`, session clients with a key each, probes.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;

#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_slice(&self.body).context("answer is not JSON")
    }

    /// One metric's `dur` (ms) from the `Server-Timing` header.
    pub fn server_timing(&self, name: &str) -> Option<f64> {
        let value = self.headers.get("server-timing")?.to_str().ok()?;
        value.split(',').find_map(|metric| {
            let mut parts = metric.trim().split(';');
            (parts.next()? == name).then_some(())?;
            parts.find_map(|p| p.strip_prefix("dur="))?.parse().ok()
        })
    }
}

/// One request on a fresh connection, within `timeout`.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
    timeout: Duration,
) -> anyhow::Result<Answer> {
    let call = async {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let driver = tokio::spawn(conn);
        let mut req = hyper::Request::builder().method(method).uri(path).header("host", addr.to_string());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(Bytes::from(body.to_string())))?;
        let resp = sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await?.to_bytes();
        driver.abort();
        Ok::<_, anyhow::Error>(Answer { status, headers, body })
    };
    tokio::time::timeout(timeout, call).await.with_context(|| format!("{method} {path} timed out"))?
}

pub async fn get_json(addr: SocketAddr, path: &str) -> anyhow::Result<serde_json::Value> {
    request(addr, "GET", path, &[], "", Duration::from_secs(10)).await?.json()
}

/// A counter or gauge from a Prometheus text page (first sample).
/// A metric's value summed over its label sets (every image's pool), or
/// `None` if the text has no sample of it.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    let values: Vec<f64> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split([' ', '{']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

pub async fn metrics(addr: SocketAddr) -> anyhow::Result<String> {
    let a = request(addr, "GET", "/metrics", &[], "", Duration::from_secs(10)).await?;
    Ok(String::from_utf8_lossy(&a.body).into_owned())
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_a_metric_by_exact_name() {
        let text = "# HELP x\nember_warm_hits_total{image=\"a\"} 12\nember_warm_hits_total{image=\"b\"} 1\nember_warm_hits_total_other 3\nember_pool_vms{state=\"ready\"} 2\n";
        assert_eq!(super::metric(text, "ember_warm_hits_total"), Some(13.0), "summed over images");
        assert_eq!(super::metric(text, "ember_pool_vms"), Some(2.0));
        assert_eq!(super::metric(text, "nope"), None);
    }

    #[test]
    fn reads_server_timing_by_exact_name() {
        let mut headers = hyper::HeaderMap::new();
        headers.insert(
            "server-timing",
            hyper::header::HeaderValue::from_static(
                "claim;dur=0.012;desc=\"a, b\", vm;dur=48.5, vmx;dur=1, run;desc=\"x\";dur=47.25",
            ),
        );
        let a = super::Answer { status: 200, headers, body: Default::default() };
        assert_eq!(a.server_timing("vm"), Some(48.5));
        assert_eq!(a.server_timing("run"), Some(47.25));
        assert_eq!(a.server_timing("nope"), None);
    }
}
