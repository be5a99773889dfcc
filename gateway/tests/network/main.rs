//! End to end, networking: the real `ember serve` with `[network]` on, real
//! VMs, real nftables and dnsmasq, in network namespaces this test makes and
//! removes. Nothing here touches the root namespace:
//!
//! ```text
//!  embtest-inet (the "internet")      embtest-h (where ember serve runs)     embt (Ember's own)
//!  203.0.113.10 :8080 :9090 :7000     203.0.113.1 (uplink) :8081 "host"  ==  up0 <- tapN <- VMs
//!  203.0.113.20 :8080                 em-embt (the link) ---------------------/  198.18.0.0/16
//!  203.0.113.53 dnsmasq: allowed.test -> .10, other.test -> .20
//! ```
//!
//! `cargo test --test network -- NAME` runs the cases whose name holds NAME.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test fixtures

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use ember_testkit::{EmberServe, Report, ServeOptions};
use serde_json::{json, Value};

const HOST_NS: &str = "embtest-h";
const INET_NS: &str = "embtest-inet";
/// Ember's namespace (the `[network] namespace` of the test's config).
const EMBER_NS: &str = "embt";
const STATE_DIR: &str = "ember-nettest-state";

fn sh(script: &str) -> anyhow::Result<String> {
    let out = Command::new("bash").args(["-c", script]).output().context("running bash")?;
    ensure!(
        out.status.success(),
        "{script}\nfailed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn namespaces() -> Vec<String> {
    sh("ip netns list")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(String::from)
        .collect()
}

/// Kill every process in a test namespace, then remove it.
fn remove_ns(ns: &str) {
    let _ = sh(&format!("for p in $(ip netns pids {ns} 2>/dev/null); do kill -9 $p; done; ip netns del {ns} 2>/dev/null; true"));
}

/// The two namespaces of the test and their servers; removed on drop.
struct World {
    dir: tempfile::TempDir,
}

impl World {
    fn build() -> anyhow::Result<Self> {
        for ns in [HOST_NS, INET_NS, EMBER_NS] {
            remove_ns(ns);
        }
        let dir = tempfile::tempdir()?;
        for (name, body) in
            [("ten", "ten\n"), ("twenty", "twenty\n"), ("ten9090", "ten-9090\n"), ("host", "host\n")]
        {
            std::fs::create_dir_all(dir.path().join(name))?;
            std::fs::write(dir.path().join(name).join("index.html"), body)?;
        }
        let d = dir.path().display();
        sh(&format!(
            "set -e
             ip netns add {HOST_NS}; ip netns add {INET_NS}
             ip -n {HOST_NS} link set lo up; ip -n {INET_NS} link set lo up
             ip link add up-h netns {HOST_NS} type veth peer name up-inet netns {INET_NS}
             ip -n {HOST_NS} addr add 203.0.113.1/24 dev up-h; ip -n {HOST_NS} link set up-h up
             ip -n {INET_NS} addr add 203.0.113.10/24 dev up-inet
             ip -n {INET_NS} addr add 203.0.113.20/24 dev up-inet
             ip -n {INET_NS} addr add 203.0.113.53/24 dev up-inet
             ip -n {INET_NS} link set up-inet up
             ip netns exec {INET_NS} busybox httpd -p 203.0.113.10:8080 -h {d}/ten
             ip netns exec {INET_NS} busybox httpd -p 203.0.113.20:8080 -h {d}/twenty
             ip netns exec {INET_NS} busybox httpd -p 203.0.113.10:9090 -h {d}/ten9090
             ip netns exec {HOST_NS} busybox httpd -p 203.0.113.1:8081 -h {d}/host
             (ip netns exec {INET_NS} busybox nc -ll -p 7000 -e cat </dev/null >/dev/null 2>&1 &)
             ip netns exec {INET_NS} dnsmasq --no-resolv --no-hosts --listen-address=203.0.113.53 --bind-interfaces \
                 --address=/allowed.test/203.0.113.10 --address=/other.test/203.0.113.20 \
                 --pid-file={d}/inet-dns.pid"
        ))?;
        Ok(Self { dir })
    }

    /// The server's configuration: `pool` is `[limits]` and `[pool]`.
    fn config(&self, functions: &Path, pool: &str) -> anyhow::Result<PathBuf> {
        let cfg = self.dir.path().join("ember.toml");
        std::fs::write(
            &cfg,
            format!(
                r#"
[gateway]
functions_dir = "{}"
{pool}
[pool.sessions]
max = 3
[images]
build_on_start = false
[network]
enabled = true
namespace = "{EMBER_NS}"
subnet = "198.18.0.0/16"
uplink = "up-h"
dns_upstream = ["203.0.113.53"]
"#,
                functions.display()
            ),
        )?;
        Ok(cfg)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        for ns in [HOST_NS, INET_NS, EMBER_NS] {
            remove_ns(ns);
        }
    }
}

struct Server {
    serve: EmberServe,
}

impl Server {
    fn start(world: &World, log: &str, pool: &str) -> anyhow::Result<Self> {
        let images = images();
        let functions = world.dir.path().join("no-functions");
        std::fs::create_dir_all(&functions)?;
        let mut opts = ServeOptions::new(
            Path::new(env!("CARGO_BIN_EXE_ember")),
            &world.config(&functions, pool)?,
            &images,
            &std::env::temp_dir().join(STATE_DIR),
            &world.dir.path().join(log),
        );
        opts.netns = Some(HOST_NS.into());
        opts.echo = Some("    [ember] ".into());
        Ok(Self { serve: EmberServe::start(&opts)? })
    }

    /// curl in the serving namespace (where the server listens).
    fn curl(
        &self,
        method: &str,
        path: &str,
        headers: &[&str],
        body: Option<&Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", HOST_NS, "curl", "-sS", "-X", method, "-w", "\n%{http_code}"]);
        for h in headers {
            c.args(["-H", h]);
        }
        if let Some(b) = body {
            c.args(["-H", "content-type: application/json", "--data-binary", &b.to_string()]);
        }
        c.arg(format!("{}{path}", self.serve.url()));
        let out = c.stdout(Stdio::piped()).output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, status) = text.rsplit_once('\n').context("no status")?;
        let v = if body.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(body).with_context(|| format!("not JSON: {body}"))?
        };
        Ok((status.trim().parse()?, v))
    }

    fn run_in(&self, session: Option<&str>, body: Value) -> anyhow::Result<Value> {
        let h = session.map(|s| format!("x-ember-session: {s}"));
        let headers: Vec<&str> = h.iter().map(String::as_str).collect();
        let (status, v) = self.curl("POST", "/v1/run", &headers, Some(&body))?;
        ensure!(status == 200, "{body} -> {status} {v}");
        Ok(v)
    }

    fn run(&self, cmd: &str, network: Value) -> anyhow::Result<Value> {
        let mut body = json!({"cmd": cmd, "timeout": "25s"});
        if !network.is_null() {
            body["network"] = network;
        }
        self.run_in(None, body)
    }
}

/// The suite's server: more calls than VMs queue (admission by capacity
/// has its own cases).
const POOL: &str = r#"
[limits]
max_timeout = "30s"
max_queue_wait = "60s"
[pool]
min_size = 2
max_size = 4
target_free = 1
claim_timeout = "60s"
drain_timeout = "20s"
"#;

/// One VM and the default limits (`max_queue_wait`, `claim_timeout`).
const ONE_VM: &str = r#"
[limits]
max_timeout = "30s"
[pool]
min_size = 1
max_size = 1
target_free = 0
drain_timeout = "20s"
"#;

/// Issue 23: a client that sends one call after another to a pool of one
/// VM, each call with a network (so each return takes the network down,
/// then resets the VM, while the next call waits), is never refused.
fn a_sequential_client_on_a_one_vm_pool_with_a_network_gets_only_200s(s: &Server) -> anyhow::Result<()> {
    let network = json!({"egress": {"allow": ["203.0.113.10:8080"]}});
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    for i in 0..10 {
        let t = Instant::now();
        let body = json!({"cmd": format!("{FETCH}; fetch http://203.0.113.10:8080/"), "timeout": "25s", "network": network});
        let (status, v) = s.curl("POST", "/v1/run", &[], Some(&body))?;
        ensure!(status == 200, "call {i}: {status} {v}");
        ensure!(v["stdout"] == "ten\n", "call {i}: {v}");
        slowest = slowest.max(t.elapsed());
    }
    let (_, pool) = s.curl("GET", "/v1/pool", &[], None)?;
    ensure!(pool["counters"]["exhausted"] == 0, "{pool}");
    println!(
        "    10 sequential calls with a network on one VM: {:.1} s, slowest {} ms",
        started.elapsed().as_secs_f64(),
        slowest.as_millis()
    );
    Ok(())
}

/// `curl` from inside the VM: the page, or "blocked".
const FETCH: &str = "fetch() { curl -s -m 3 \"$1\" || echo blocked; }";

fn none_means_no_address_and_nothing_leaves(s: &Server) -> anyhow::Result<()> {
    for network in [Value::Null, json!("none")] {
        let r = s.run(
            &format!("{FETCH}; ip -4 -o addr show dev eth0; ip route; fetch http://203.0.113.10:8080/"),
            network,
        )?;
        ensure!(r["stdout"] == "blocked\n", "{r}");
    }
    Ok(())
}

fn an_allowed_address_and_port_only(s: &Server) -> anyhow::Result<()> {
    let r = s.run(
        &format!(
            "{FETCH}; fetch http://203.0.113.10:8080/; fetch http://203.0.113.20:8080/; \
             fetch http://203.0.113.10:9090/; getent hosts allowed.test || echo no-name"
        ),
        json!({"egress": {"allow": ["203.0.113.10:8080"]}}),
    )?;
    ensure!(r["stdout"] == "ten\nblocked\nblocked\nno-name\n", "{r}");
    Ok(())
}

fn allowed_names_resolve_and_raw_addresses_do_not_walk_around_them(s: &Server) -> anyhow::Result<()> {
    let r = s.run(
        &format!(
            "{FETCH}; getent hosts allowed.test | cut -d' ' -f1; getent hosts other.test || echo no-name; \
             fetch http://allowed.test:8080/; fetch http://203.0.113.10:9090/; fetch http://203.0.113.20:8080/"
        ),
        json!({"egress": {"allow": ["allowed.test"]}}),
    )?;
    ensure!(r["stdout"] == "203.0.113.10\nno-name\nten\nten-9090\nblocked\n", "{r}");
    // A denied name does not resolve, even under an open policy.
    let r = s.run(
        "getent hosts other.test || echo no-name; getent hosts allowed.test | cut -d' ' -f1",
        json!({"egress": {"deny": ["other.test"]}}),
    )?;
    ensure!(r["stdout"] == "no-name\n203.0.113.10\n", "{r}");
    Ok(())
}

fn open_reaches_the_world_but_not_the_host_or_metadata(s: &Server) -> anyhow::Result<()> {
    let r = s.run(
        &format!(
            "{FETCH}; fetch http://203.0.113.10:8080/; fetch http://203.0.113.20:8080/; \
             fetch http://203.0.113.1:8081/; fetch http://169.254.169.254/; fetch http://198.18.255.253:8081/"
        ),
        json!("open"),
    )?;
    ensure!(r["stdout"] == "ten\ntwenty\nblocked\nblocked\nblocked\n", "{r}");
    Ok(())
}

fn two_vms_never_reach_each_other(s: &Server) -> anyhow::Result<()> {
    let a = s.run_in(
        Some("net-a"),
        json!({"cmd": "mkdir -p www && echo vm-a > www/index.html && (busybox httpd -p 8000 -h www &) && ip -4 -o addr show dev eth0", "network": "open"}),
    )?;
    let addr = a["stdout"]
        .as_str()
        .and_then(|o| o.split_whitespace().nth(3))
        .and_then(|a| a.split('/').next())
        .context("A's address")?
        .to_string();
    let own = s.run_in(
        Some("net-a"),
        json!({"cmd": format!("{FETCH}; fetch http://{addr}:8000/; fetch http://127.0.0.1:8000/")}),
    )?;
    ensure!(own["stdout"] == "vm-a\nvm-a\n", "A cannot reach its own server: {own}");
    let b = s.run_in(
        Some("net-b"),
        json!({"cmd": format!("{FETCH}; fetch http://{addr}:8000/"), "network": "open"}),
    )?;
    ensure!(b["stdout"] == "blocked\n", "B reached A: {b}");
    for k in ["net-a", "net-b"] {
        ensure!(s.curl("DELETE", &format!("/v1/sessions/{k}"), &[], None)?.0 == 204);
    }
    Ok(())
}

fn a_reused_vm_has_no_network_left(s: &Server) -> anyhow::Result<()> {
    let first = s.run("ip -4 -o addr show dev eth0 | wc -l", json!("open"))?;
    ensure!(first["stdout"] == "1\n", "{first}");
    let vm = first["vm_id"].clone();
    for _ in 0..12 {
        let r = s.run(&format!("{FETCH}; ip -4 -o addr show dev eth0 | wc -l; ip route | wc -l; fetch http://203.0.113.10:8080/"), Value::Null)?;
        if r["vm_id"] == vm {
            ensure!(r["stdout"] == "0\n0\nblocked\n", "the VM kept its network: {r}");
            return Ok(());
        }
    }
    bail!("the networked VM {vm} never came back in 12 calls")
}

/// A connection opened under one policy is cut at its next packet when the
/// session's policy changes.
fn a_policy_change_holds_for_live_connections(s: &Server) -> anyhow::Result<()> {
    let k = "net-live";
    let script = "import socket, time\n\
                  out = open('/tmp/live.log', 'w', buffering=1)\n\
                  c = socket.create_connection(('203.0.113.10', 7000), timeout=1)\n\
                  for i in range(600):\n    \
                      try:\n        c.sendall(b'x\\n'); ok = c.recv(8) == b'x\\n'\n    \
                      except Exception:\n        ok = False\n    \
                      out.write('ok\\n' if ok else 'fail\\n'); time.sleep(0.1)\n";
    // Started in the background; wait (bounded) for its first exchanges.
    let r = s.run_in(
        Some(k),
        json!({"cmd": "cat > live.py && (nohup python3 live.py >/tmp/live.err 2>&1 &) && \
                       for i in $(seq 100); do [ \"$(wc -l < /tmp/live.log 2>/dev/null)\" -ge 3 ] && break; sleep 0.2; done; \
                       sort -u /tmp/live.log; cat /tmp/live.err",
               "stdin": script,
               "network": {"egress": {"allow": ["203.0.113.10:7000"]}}}),
    )?;
    ensure!(r["stdout"] == "ok\n", "the connection did not work before the change: {r}");
    let (status, v) = s.curl(
        "PUT",
        &format!("/v1/sessions/{k}/network"),
        &[],
        Some(&json!({"egress": {"allow": ["203.0.113.20:8080"]}})),
    )?;
    ensure!(status == 200, "{status} {v}");
    // Lines written after the change only (each failed exchange takes ~1.1 s).
    let r = s.run_in(Some(k), json!({"cmd": "sleep 4; tail -n 2 /tmp/live.log | sort -u"}))?;
    ensure!(r["stdout"] == "fail\n", "the live connection still works after the change: {r}");
    ensure!(s.curl("DELETE", &format!("/v1/sessions/{k}"), &[], None)?.0 == 204);
    Ok(())
}

fn errors(s: &Server) -> anyhow::Result<()> {
    let (status, v) = s.curl(
        "POST",
        "/v1/run",
        &[],
        Some(&json!({"cmd": "true", "network": {"egress": {"allow": ["203.0.113.0/33"]}}})),
    )?;
    ensure!(
        status == 400 && v["error"]["message"].as_str().is_some_and(|m| m.contains("203.0.113.0/33")),
        "{status} {v}"
    );
    let (status, _) = s.curl("PUT", "/v1/sessions/nobody/network", &[], Some(&json!("open")))?;
    ensure!(status == 404);
    Ok(())
}

type Case = fn(&Server) -> anyhow::Result<()>;

const CASES: &[(&str, Case)] = &[
    ("none_means_no_address_and_nothing_leaves", none_means_no_address_and_nothing_leaves),
    ("an_allowed_address_and_port_only", an_allowed_address_and_port_only),
    (
        "allowed_names_resolve_and_raw_addresses_do_not_walk_around_them",
        allowed_names_resolve_and_raw_addresses_do_not_walk_around_them,
    ),
    (
        "open_reaches_the_world_but_not_the_host_or_metadata",
        open_reaches_the_world_but_not_the_host_or_metadata,
    ),
    ("two_vms_never_reach_each_other", two_vms_never_reach_each_other),
    ("a_reused_vm_has_no_network_left", a_reused_vm_has_no_network_left),
    ("a_policy_change_holds_for_live_connections", a_policy_change_holds_for_live_connections),
    ("errors", errors),
];

/// What a stopped (or killed) server may leave: nothing of its network.
fn network_leftovers() -> Vec<String> {
    let mut left = Vec::new();
    if namespaces().iter().any(|n| n == EMBER_NS) {
        left.push(format!("namespace {EMBER_NS}"));
    }
    let links = sh(&format!("ip -n {HOST_NS} -o link show")).unwrap_or_default();
    if links.contains("em-embt") {
        left.push("the link em-embt".into());
    }
    let tables = sh(&format!("ip netns exec {HOST_NS} nft list tables")).unwrap_or_default();
    if tables.contains("ember_embt") {
        left.push("the table ember_embt".into());
    }
    let state = std::env::temp_dir().join(STATE_DIR);
    left.extend(ember_testkit::processes_mentioning(&state.to_string_lossy()));
    left
}

fn images() -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    std::env::var_os("EMBER_IMAGES").map(PathBuf::from).unwrap_or_else(|| repo.join("target/images"))
}

fn main() {
    if !ember_testkit::vms_can_run("network", &images()) {
        return;
    }
    let mut report = Report::new();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let world = match World::build() {
            Ok(w) => w,
            Err(e) => return report.fail("test namespaces", e),
        };
        // A crashed server's network (namespace, link, resolvers) is reaped
        // by the next start.
        // The first server is a pool of one VM with the default limits.
        let first = match Server::start(&world, "crashed.log", ONE_VM) {
            Ok(s) => s,
            Err(e) => return report.fail("one-VM server start", e),
        };
        let sequential = async { a_sequential_client_on_a_one_vm_pool_with_a_network_gets_only_200s(&first) };
        report
            .run("a_sequential_client_on_a_one_vm_pool_with_a_network_gets_only_200s", Box::pin(sequential))
            .await;
        let crashed = async {
            let r = first.run(
                "getent hosts allowed.test | cut -d' ' -f1",
                json!({"egress": {"allow": ["allowed.test"]}}),
            )?;
            ensure!(r["stdout"] == "203.0.113.10\n", "{r}");
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(first.serve.pid() as i32),
                nix::sys::signal::Signal::SIGKILL,
            )?;
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::fs::read_to_string(format!("/proc/{}/stat", first.serve.pid()))
                .is_ok_and(|s| !s.contains(") Z"))
            {
                ensure!(Instant::now() < deadline, "ember serve did not die");
                std::thread::sleep(Duration::from_millis(50));
            }
            drop(first);
            Ok(())
        };
        report.run("a_crashed_servers_network_is_reaped_by_the_next [kill]", Box::pin(crashed)).await;
        let server = match Server::start(&world, "server.log", POOL) {
            Ok(s) => s,
            Err(e) => return report.fail("server start", e),
        };
        for (name, case) in CASES {
            report.run(name, Box::pin(async { case(&server) })).await;
        }
        let stopped = async {
            let Server { serve } = server;
            serve.stop(Duration::from_secs(90))?;
            let left = network_leftovers();
            ensure!(left.is_empty(), "left behind: {left:#?}");
            Ok(())
        };
        report.run("shutdown_removes_the_namespace_link_table_and_resolvers", Box::pin(stopped)).await;
        drop(world);
        let gone = async {
            let ns = namespaces();
            ensure!(!ns.iter().any(|n| [HOST_NS, INET_NS, EMBER_NS].contains(&n.as_str())), "{ns:?}");
            Ok(())
        };
        report.run("the_test_namespaces_are_gone", Box::pin(gone)).await;
    });
    std::process::exit(report.finish());
}
