//! End to end, the cluster: a real etcd (Debian's, single member, data on
//! tmpfs) and three `ember serve` nodes on loopback, each PID 1 of a PID
//! namespace of its own so that "losing its host" kills its QEMUs with it.
//! Small pools: on a 2-core TCG host more would measure the host.
//! `cargo test -p ember-gateway --test cluster -- NAME` runs the cases whose
//! name holds NAME (the nodes are shared; later cases stop and kill them).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test fixtures

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use ember_testkit::{EmberServe, Report, ServeOptions};
use serde_json::Value;

/// The lease of the test's nodes: a lost node is gone about this long after.
const TTL_SECS: u64 = 3;
const STATE_DIR: &str = "ember-clustertest-state";

fn images() -> PathBuf {
    std::env::var_os("EMBER_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/images"))
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A single-member etcd on free loopback ports, its data on tmpfs; killed
/// and removed on drop.
struct Etcd {
    child: Child,
    data: PathBuf,
    endpoint: String,
}

impl Etcd {
    fn start() -> anyhow::Result<Self> {
        let (client, peer) = (free_port()?, free_port()?);
        let data = Path::new("/dev/shm").join(format!("ember-clustertest-etcd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data);
        let endpoint = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new("etcd")
            .args(["--name", "e1", "--data-dir"])
            .arg(&data)
            .args(["--listen-client-urls", &endpoint, "--advertise-client-urls", &endpoint])
            .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("e1={peer_url}"), "--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting etcd (Debian's etcd-server; make test-deps installs it)")?;
        let etcd = Self { child, data, endpoint };
        let until = Instant::now() + Duration::from_secs(20);
        while etcd.ctl(&["endpoint", "health"]).is_err() {
            ensure!(Instant::now() < until, "etcd did not become healthy within 20 s");
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(etcd)
    }

    fn ctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.endpoint, "--command-timeout=2s"])
            .args(args)
            .output()
            .context("running etcdctl")?;
        ensure!(out.status.success(), "etcdctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// etcd's revision: every write moves it.
    fn revision(&self) -> anyhow::Result<i64> {
        let v: Value =
            serde_json::from_str(&self.ctl(&["get", "/", "--prefix", "--keys-only", "-w", "json"])?)?;
        v["header"]["revision"].as_i64().context("no revision")
    }

    /// The keys under Ember's root.
    fn keys(&self) -> anyhow::Result<Vec<String>> {
        Ok(self
            .ctl(&["get", "/ember/v1/", "--prefix", "--keys-only"])?
            .lines()
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect())
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

struct Node {
    name: String,
    serve: Option<EmberServe>,
    url: String,
}

fn start_node(etcd: &Etcd, dir: &Path, name: &str) -> anyhow::Result<Node> {
    let config = dir.join(format!("{name}.toml"));
    let secret = dir.join("cluster.key");
    std::fs::write(&secret, "a test cluster's shared secret\n")?;
    let functions = Path::new(env!("CARGO_MANIFEST_DIR")).join("../functions-examples").canonicalize()?;
    let text = format!(
        "[gateway]\nfunctions_dir = \"{}\"\n[pool]\nmin_size = 1\nmax_size = 2\ntarget_free = 1\n[images]\nbuild_on_start = false\n\
         [cluster]\nnode = \"{name}\"\netcd = [\"{}\"]\nlease_ttl = \"{TTL_SECS}s\"\nsecret_file = \"{}\"\n",
        functions.display(),
        etcd.endpoint,
        secret.display()
    );
    std::fs::write(&config, text)?;
    let state = std::env::temp_dir().join(STATE_DIR).join(name);
    let mut opts = ServeOptions::new(
        Path::new(env!("CARGO_BIN_EXE_ember")),
        &config,
        &images(),
        &state,
        &dir.join(format!("{name}.log")),
    );
    opts.pid_namespace = true;
    opts.ready_within = Duration::from_secs(180);
    let serve = EmberServe::start(&opts)?;
    let url = serve.url();
    Ok(Node { name: name.into(), serve: Some(serve), url })
}

fn get(url: &str) -> anyhow::Result<Value> {
    let out = Command::new("curl").args(["-sS", "--max-time", "10", url]).output()?;
    ensure!(out.status.success(), "curl {url}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn run_true(url: &str) -> anyhow::Result<u16> {
    Ok(run_on(url)?.0)
}

fn curl(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("curl").args(["-sS", "--max-time", "60"]).args(args).output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A `true` call sent to `url`: its status and the node it ran on.
fn run_on(url: &str) -> anyhow::Result<(u16, String)> {
    call_on(&format!("{url}/v1/run"), r#"{"cmd":"true"}"#)
}

/// A POST of `body` to `url`: its status and the node it ran on.
fn call_on(url: &str, body: &str) -> anyhow::Result<(u16, String)> {
    let text = curl(&["-o", "/dev/null", "-D", "-", "-w", "%{http_code}", "--json", body, url])?;
    let node = text
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("x-ember-node:").map(|v| v.trim().to_string()))
        .unwrap_or_default();
    let code = text.lines().last().and_then(|l| l.trim().parse().ok()).unwrap_or(0);
    Ok((code, node))
}

fn post(url: &str, body: &str) -> anyhow::Result<u16> {
    Ok(curl(&["-o", "/dev/null", "-w", "%{http_code}", "--json", body, url])?.trim().parse().unwrap_or(0))
}

fn delete(url: &str) -> anyhow::Result<u16> {
    Ok(curl(&["-o", "/dev/null", "-w", "%{http_code}", "-X", "DELETE", url])?.trim().parse().unwrap_or(0))
}

/// The member names `url`'s node lists.
fn members(url: &str) -> anyhow::Result<Vec<String>> {
    let v = get(&format!("{url}/v1/cluster"))?;
    Ok(v["members"]
        .as_array()
        .context("members")?
        .iter()
        .filter_map(|m| m["node"].as_str())
        .map(String::from)
        .collect())
}

/// Wait until every node in `urls` lists exactly `want`; how long it took.
fn until_members(urls: &[&str], want: &[&str], within: Duration) -> anyhow::Result<Duration> {
    let t = Instant::now();
    loop {
        let mut all = true;
        for u in urls {
            all &= members(u)? == want;
        }
        if all {
            return Ok(t.elapsed());
        }
        ensure!(t.elapsed() < within, "members not {want:?} within {within:?}: {:?}", members(urls[0]));
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The Kubernetes manifests against Kubernetes' schemas, offline and
/// strict (kubernetes-validate, pinned, in a venv by `sdk.sh`); a broken
/// copy (a string where a boolean goes, a misspelt field) is refused.
fn the_manifests_validate_offline() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let k8s = root.join("deploy/k8s");
    let out = Command::new(root.join("tests/e2b/sdk.sh")).arg(k8s.join("requirements.txt")).output()?;
    ensure!(out.status.success(), "sdk.sh: {}", String::from_utf8_lossy(&out.stderr));
    let python = PathBuf::from(String::from_utf8(out.stdout)?.trim()).join("bin/python");
    let validate = |files: &[PathBuf]| -> anyhow::Result<(bool, String)> {
        let out = Command::new(&python)
            .args(["-m", "kubernetes_validate", "--strict", "-k", "1.32.0"])
            .args(files)
            .output()?;
        Ok((
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        ))
    };
    let files = vec![k8s.join("ember.yaml"), k8s.join("etcd.yaml")];
    let (ok, text) = validate(&files)?;
    ensure!(ok && text.matches("passed").count() == 7, "{text}");
    let dir = tempfile::tempdir()?;
    let original = std::fs::read_to_string(&files[0])?;
    for (from, to) in
        [("hostNetwork: true", "hostNetwork: \"yes\""), ("privileged: true", "priviledged: true")]
    {
        ensure!(original.contains(from), "{from} not in ember.yaml");
        let broken = dir.path().join("broken.yaml");
        std::fs::write(&broken, original.replace(from, to))?;
        let (ok, text) = validate(&[broken])?;
        ensure!(!ok, "a broken manifest ({to}) passed: {text}");
    }
    Ok(())
}

fn suite(report: &mut Report) -> anyhow::Result<()> {
    report.run_sync("the_manifests_validate_offline", the_manifests_validate_offline);
    let node_cases = [
        "every_node_lists_every_member_within_2_s",
        "one_shot_calls_cost_no_etcd_operation",
        "calls_run_where_they_arrive_when_a_vm_is_ready",
        "a_busy_node_forwards_to_a_member_with_room",
        "a_functions_calls_gather_where_it_is_warm",
        "a_node_that_stops_leaves_the_cluster_at_once",
        "a_lost_host_is_dropped_within_the_lease",
        "the_last_node_leaves_nothing_in_etcd",
    ];
    if !report.wants_any(node_cases) {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let etcd = Etcd::start()?;
    let mut nodes = Vec::new();
    for name in ["n1", "n2", "n3"] {
        nodes.push(start_node(&etcd, dir.path(), name)?);
    }
    let last_ready = Instant::now();
    let urls: Vec<String> = nodes.iter().map(|n| n.url.clone()).collect();
    let all: Vec<&str> = urls.iter().map(String::as_str).collect();

    report.run_sync("every_node_lists_every_member_within_2_s", || {
        until_members(&all, &["n1", "n2", "n3"], Duration::from_secs(2))?;
        println!("    3 members on every node {:?} after the last ready line", last_ready.elapsed());
        let v = get(&format!("{}/v1/cluster", urls[0]))?;
        ensure!(v["enabled"] == true && v["node"] == "n1" && v["fenced"] == false, "{v}");
        let n2 = v["members"].as_array().and_then(|m| m.iter().find(|x| x["node"] == "n2")).context("n2")?;
        ensure!(n2["addr"] == nodes[1].url.trim_start_matches("http://"), "{n2}");
        ensure!(n2["load"]["images"]["default"]["ready"].is_number(), "no load published: {n2}");
        Ok(())
    });

    report.run_sync("one_shot_calls_cost_no_etcd_operation", || {
        let (r0, t) = (etcd.revision()?, Instant::now());
        let calls = 30;
        for i in 0..calls {
            let code = run_true(&urls[i % 3])?;
            ensure!(code == 200, "call {i}: {code}");
        }
        let (grew, secs) = (etcd.revision()? - r0, t.elapsed().as_secs_f64());
        // Load records only: at most one write a second per node.
        let bound = (3.0 * secs.ceil()) as i64 + 3;
        println!("    {calls} calls in {secs:.1} s: etcd revision +{grew} (load records; bound {bound})");
        ensure!(grew <= bound, "etcd grew by {grew} for {calls} calls in {secs:.1} s");
        Ok(())
    });

    report.run_sync("calls_run_where_they_arrive_when_a_vm_is_ready", || {
        let (mut here, mut total) = (0, 0);
        for i in 0..15 {
            let (code, node) = run_on(&urls[i % 3])?;
            ensure!(code == 200, "call {i}: {code}");
            total += 1;
            here += usize::from(node == format!("n{}", i % 3 + 1));
            std::thread::sleep(Duration::from_millis(300));
        }
        println!("    {here}/{total} calls ran on the node they were sent to");
        ensure!(here * 10 >= total * 8, "only {here} of {total} ran where they arrived");
        Ok(())
    });

    report.run_sync("a_busy_node_forwards_to_a_member_with_room", || {
        // n1's two VMs held by two sessions (session calls stay where they are).
        for k in ["hold-1", "hold-2"] {
            let code = post(&format!("{}/v1/sessions", urls[0]), &format!(r#"{{"key": "{k}"}}"#))?;
            ensure!(code == 201, "opening {k} on n1: {code}");
        }
        // The load n1 publishes says so within about a second.
        std::thread::sleep(Duration::from_millis(1500));
        let mut ran = std::collections::BTreeMap::<String, usize>::new();
        let t = Instant::now();
        for i in 0..8 {
            let (code, node) = run_on(&urls[0])?;
            ensure!(code == 200, "call {i} to the busy n1: {code}");
            *ran.entry(node).or_default() += 1;
        }
        println!("    8 calls to a busy n1 ran on {ran:?} in {:.1} s", t.elapsed().as_secs_f64());
        ensure!(ran.get("n1").copied().unwrap_or(0) == 0, "a call ran on the full n1: {ran:?}");
        ensure!(ran.keys().all(|n| n == "n2" || n == "n3"), "{ran:?}");
        for k in ["hold-1", "hold-2"] {
            ensure!(delete(&format!("{}/v1/sessions/{k}", urls[0]))? == 204);
        }
        Ok(())
    });

    report.run_sync("a_functions_calls_gather_where_it_is_warm", || {
        // Each call's VM is scrubbed back warm for the function where it
        // ran; a node without one sends the next call to a node with one.
        let mut ran = std::collections::BTreeMap::<String, usize>::new();
        let (mut warm, mut counted) = (0, 0);
        for i in 0..12 {
            let url = format!("{}/v1/functions/wordfreq", urls[i % 3]);
            let text = curl(&["-D", "-", "-w", "\n%{http_code}", "--json", "a b a", &url])?;
            let mut lines: Vec<&str> = text.lines().collect();
            let code: u16 = lines.pop().and_then(|l| l.trim().parse().ok()).unwrap_or(0);
            let body: Value = serde_json::from_str(lines.pop().unwrap_or("{}")).unwrap_or_default();
            ensure!(code == 200, "wordfreq call {i}: {code} {body}");
            let node = lines
                .iter()
                .find_map(|l| {
                    l.to_ascii_lowercase().strip_prefix("x-ember-node:").map(|v| v.trim().to_string())
                })
                .unwrap_or_default();
            *ran.entry(node).or_default() += 1;
            if i >= 4 {
                counted += 1;
                warm += usize::from(body["warm"] == true);
            }
            std::thread::sleep(Duration::from_millis(400));
        }
        println!(
            "    12 wordfreq calls sent round-robin ran on {ran:?}; {warm}/{counted} of the last were warm"
        );
        ensure!(warm * 10 >= counted * 7, "only {warm} of {counted} function calls found a warm VM: {ran:?}");
        Ok(())
    });

    report.run_sync("a_node_that_stops_leaves_the_cluster_at_once", || {
        let node = nodes[2].serve.take().context("n3")?;
        let t = Instant::now();
        node.stop(Duration::from_secs(60))?;
        let took = until_members(&all[..2], &["n1", "n2"], Duration::from_secs(2))?;
        println!("    n3 stopped in {:?}; gone for the others {took:?} later", t.elapsed() - took);
        Ok(())
    });

    report.run_sync("a_lost_host_is_dropped_within_the_lease", || {
        let mut node = nodes[1].serve.take().context("n2")?;
        let state = node.state_dir.clone();
        let t = Instant::now();
        node.kill_host()?;
        let took = until_members(&all[..1], &["n1"], Duration::from_secs(TTL_SECS + 1))?;
        println!("    n2's host lost: n1 dropped it after {:?} (lease {TTL_SECS} s)", took);
        let _ = t;
        // Its QEMUs died with it; n1 still serves.
        let left = ember_testkit::processes_mentioning(&state.to_string_lossy());
        ensure!(left.is_empty(), "the lost host left processes: {left:?}");
        ensure!(run_true(&urls[0])? == 200, "n1 stopped serving");
        drop(node);
        Ok(())
    });

    report.run_sync("the_last_node_leaves_nothing_in_etcd", || {
        let node = nodes[0].serve.take().context("n1")?;
        node.stop(Duration::from_secs(60))?;
        let keys = etcd.keys()?;
        ensure!(keys.is_empty(), "left in etcd: {keys:?}");
        Ok(())
    });
    for n in &mut nodes {
        if let Some(s) = n.serve.take() {
            let _ = s.stop(Duration::from_secs(60));
        }
        let _ = &n.name;
    }
    Ok(())
}

fn main() {
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("EMBER_LOG") {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    if !ember_testkit::vms_can_run("cluster", &images()) {
        return;
    }
    let mut report = Report::new();
    if let Err(e) = suite(&mut report) {
        report.fail("suite setup", e);
    }
    std::process::exit(report.finish());
}
