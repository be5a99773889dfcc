//! The configuration file: `[pool]` and `[vm]` (see `ember_pool::config`)
//! plus the gateway's own `[gateway]` and `[limits]`. Two layers as in the
//! pool crate: raw TOML with every key optional, then a validated
//! [`Config`]; every problem is reported at once, and defaults live here.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ember_pool::config::{RawConfig as RawPoolFile, RawPool, RawStorage, RawVm};
use serde::Deserialize;

pub use ember_service::Limits;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub pool: RawPool,
    #[serde(default)]
    pub vm: RawVm,
    #[serde(default)]
    pub storage: RawStorage,
    #[serde(default)]
    pub gateway: RawGateway,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub images: RawImages,
    #[serde(default)]
    pub network: RawNetwork,
    #[serde(default)]
    pub auth: RawAuth,
    #[serde(default)]
    pub e2b: RawE2b,
    #[serde(default)]
    pub mcp: RawMcp,
    #[serde(default)]
    pub cluster: RawCluster,
    /// Quotas of a key that sets none of its own.
    #[serde(default)]
    pub quotas: ember_service::quotas::Quotas,
}

/// `[e2b]`: the E2B-compatible API on Ember's listener.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawE2b {
    /// On by default: it costs nothing while no E2B client calls.
    pub enabled: Option<bool>,
    /// What sandboxes say their `domain` is (the SDK's `get_host` builds
    /// `<port>-<id>.<domain>`); default `localhost:<the listening port>`.
    pub domain: Option<String>,
    /// Template names → image names, besides `base` → `base-sudo`.
    #[serde(default)]
    pub templates: std::collections::BTreeMap<String, String>,
}

/// `[cluster]`: many hosts as one Ember, on etcd. Absent (or `enabled =
/// false`): single-host, exactly as without it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    /// On when the section names `etcd` endpoints, unless this says false.
    pub enabled: Option<bool>,
    /// This node's name (default: the host name).
    pub node: Option<String>,
    /// The address peers reach this node at, `host:port` (default: the
    /// listen address).
    pub advertise: Option<String>,
    /// etcd's client endpoints, `http://host:port`.
    #[serde(default)]
    pub etcd: Vec<String>,
    /// The node's lease (default 5s); a lost node is gone about this long after.
    #[serde(default, with = "humantime_serde")]
    pub lease_ttl: Option<Duration>,
    /// A file holding the secret node-to-node requests are signed with.
    pub secret_file: Option<PathBuf>,
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn host_name() -> String {
    nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "ember".into())
}

/// `[mcp]`: the MCP endpoint (`/mcp`) on Ember's listener.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMcp {
    /// On by default: it costs nothing while no MCP client calls.
    pub enabled: Option<bool>,
    /// Host names (or `host:port`) MCP requests may carry besides loopback
    /// ones; `[gateway] allowed_hosts` count too.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Browser origins allowed to call `/mcp` (`https://app.example[:port]`);
    /// a request with any other `Origin` is a 403.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// The most bytes of output one tool result carries (default 32768).
    pub max_result_bytes: Option<usize>,
    /// The idle timeout of sessions opened through MCP that name none
    /// (default "30m"; "off" with a timeout is allowed as for any session).
    pub session_idle_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    /// The keys file `ember keys` writes (default: beside the paused
    /// sessions, `/var/lib/ember/keys.json`; `EMBER_KEYS` overrides).
    pub keys_file: Option<PathBuf>,
}

/// Where the keys file is when the config names none.
pub fn default_keys_file() -> PathBuf {
    if let Some(p) = std::env::var_os("EMBER_KEYS") {
        return PathBuf::from(p);
    }
    ember_pool::config::default_session_dir()
        .parent()
        .map_or_else(|| "/var/lib/ember".into(), Path::to_path_buf)
        .join("keys.json")
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNetwork {
    /// Give every VM a NIC in Ember's own network namespace (default false).
    pub enabled: Option<bool>,
    /// The namespace Ember creates and owns.
    pub namespace: Option<String>,
    /// The VMs' addresses (a /30 each).
    pub subnet: Option<String>,
    /// An interface of this namespace that VMs reach the world through
    /// (NAT); unset: they reach nothing outside.
    pub uplink: Option<String>,
    /// Resolvers the VMs' lookups go to (through the uplink).
    #[serde(default)]
    pub dns_upstream: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawImages {
    /// More recipe directories (each holds `<name>/image.toml`), after the
    /// shipped `initrd/images`.
    #[serde(default)]
    pub dirs: Vec<PathBuf>,
    /// Largest root tarball `ember images import` takes (and the most its
    /// members may unpack to).
    pub max_import_bytes: Option<u64>,
    /// A build that takes longer is killed.
    #[serde(default, with = "humantime_serde")]
    pub build_timeout: Option<Duration>,
    /// `ember serve` builds images it knows a recipe of but finds unbuilt
    /// or stale (else it names the command and serves the others).
    pub build_on_start: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGateway {
    pub listen: Option<SocketAddr>,
    /// Directory of function directories (each with a `function.toml`).
    pub functions_dir: Option<PathBuf>,
    #[serde(default, with = "humantime_serde")]
    pub header_read_timeout: Option<Duration>,
    pub max_connections: Option<usize>,
    /// Host names besides loopback ones an open server (no keys) answers.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Origins (`scheme://host[:port]`) a browser may call an open server from.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// Serve HTTPS with this certificate chain (PEM), reloaded on change.
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    pub tls_key: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub max_body_bytes: Option<usize>,
    pub max_output_bytes: Option<u64>,
    #[serde(default, with = "humantime_serde")]
    pub default_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub max_timeout: Option<Duration>,
    pub max_concurrent_requests: Option<usize>,
    pub max_pids: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    pub max_queue_wait: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub busy_delay: Option<Duration>,
    pub max_network_rules: Option<usize>,
    pub process_output_buffer: Option<u64>,
    pub max_processes: Option<u32>,
    pub max_upload_bytes: Option<u64>,
    pub max_watched_dirs: Option<u32>,
}

/// Where the gateway listens and what it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayConfig {
    pub listen: SocketAddr,
    pub functions_dir: PathBuf,
    /// Whether `functions_dir` was named in the file (then it must exist).
    pub functions_dir_explicit: bool,
    /// Deadline of a request head (and of an idle connection), and the cap
    /// on open connections.
    pub conn_limits: crate::http_server::ConnLimits,
    pub allowed_hosts: Vec<String>,
    pub allowed_origins: Vec<String>,
    /// `tls_cert` and `tls_key`: HTTPS instead of HTTP.
    pub tls: Option<crate::tls::TlsFiles>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            functions_dir: ember_image::Home::find().functions(),
            functions_dir_explicit: false,
            conn_limits: crate::http_server::ConnLimits::default(),
            allowed_hosts: Vec::new(),
            allowed_origins: Vec::new(),
            tls: None,
        }
    }
}

/// The validated configuration of `ember serve`.
#[derive(Debug, Clone)]
pub struct Config {
    pub pool: ember_pool::config::PoolConfig,
    pub vm: ember_vm::VmConfig,
    /// `[pool.images.NAME]`: each image's pool beside the defaults.
    pub image_pools: std::collections::BTreeMap<String, ember_pool::config::ImagePool>,
    pub gateway: GatewayConfig,
    pub limits: Limits,
    pub images: ember_image::ImagesConfig,
    pub build_on_start: bool,
    /// `[network]`, when enabled.
    pub network: Option<ember_net::NetConfig>,
    /// `[auth] keys_file`.
    pub keys_file: PathBuf,
    /// `[quotas]`: of a key that sets none of its own.
    pub quotas: ember_service::quotas::Quotas,
    /// `[e2b]`, when enabled.
    pub e2b: Option<ember_e2b::control::E2bConfig>,
    /// `[mcp]`, when enabled.
    pub mcp: Option<ember_mcp::McpConfig>,
    /// `[cluster]`, when on.
    pub cluster: Option<ember_cluster::ClusterConfig>,
}

impl Config {
    /// Image `name`'s pool and VM configuration (see
    /// [`ember_pool::config::Config::for_image`]).
    pub fn for_image(
        &self,
        name: &str,
        recipe_memory_mb: Option<u32>,
    ) -> Result<(ember_pool::config::PoolConfig, ember_vm::VmConfig), String> {
        let pool_level = ember_pool::config::Config {
            pool: self.pool.clone(),
            vm: self.vm.clone(),
            images_dir: self.images.out.clone(),
            image_pools: self.image_pools.clone(),
        };
        pool_level.for_image(name, recipe_memory_mb)
    }
}

impl RawConfig {
    pub fn parse(text: &str) -> Result<Self, Vec<String>> {
        ember_pool::config::parse_toml(text)
    }

    pub fn load(path: &Path) -> Result<Self, Vec<String>> {
        ember_pool::config::load_toml(path)
    }

    pub fn validate(self, images_default: &Path) -> Result<Config, Vec<String>> {
        let mut problems = Vec::new();
        let pool_file = RawPoolFile { pool: self.pool, vm: self.vm, storage: self.storage };
        let pool_vm = pool_file.validate(images_default).map_err(|p| problems.extend(p)).ok();
        let images_dir =
            pool_vm.as_ref().map_or_else(|| images_default.to_path_buf(), |pv| pv.images_dir.clone());
        let mut images = ember_image::ImagesConfig::new(&images_dir);
        images.recipe_dirs.extend(self.images.dirs.iter().cloned());
        for d in &self.images.dirs {
            if !d.is_dir() {
                problems.push(format!("images.dirs: {} is not a directory", d.display()));
            }
        }
        if let Some(b) = self.images.max_import_bytes {
            if b == 0 {
                problems.push("images.max_import_bytes must be at least 1".into());
            }
            images.import_limits.max_bytes = b;
        }
        if let Some(t) = self.images.build_timeout {
            if t < Duration::from_secs(10) {
                problems.push("images.build_timeout must be at least 10s".into());
            }
            images.build_timeout = t;
        }
        let build_on_start = self.images.build_on_start.unwrap_or(true);
        let state_dir = pool_vm.as_ref().map(|pv| pv.vm.state_dir.clone()).unwrap_or_default();
        let network =
            validate_network(self.network, &state_dir).map_err(|p| problems.extend(p)).ok().flatten();

        let dg = GatewayConfig::default();
        let gateway = GatewayConfig {
            listen: self.gateway.listen.unwrap_or(dg.listen),
            functions_dir_explicit: self.gateway.functions_dir.is_some(),
            functions_dir: self.gateway.functions_dir.unwrap_or(dg.functions_dir),
            conn_limits: crate::http_server::ConnLimits {
                header_read_timeout: self
                    .gateway
                    .header_read_timeout
                    .unwrap_or(dg.conn_limits.header_read_timeout),
                max_connections: self.gateway.max_connections.unwrap_or(dg.conn_limits.max_connections),
            },
            allowed_hosts: self.gateway.allowed_hosts,
            allowed_origins: self.gateway.allowed_origins,
            tls: match (self.gateway.tls_cert, self.gateway.tls_key) {
                (Some(cert), Some(key)) => Some(crate::tls::TlsFiles { cert, key }),
                (None, None) => None,
                _ => {
                    problems.push("gateway.tls_cert and gateway.tls_key go together".into());
                    None
                }
            },
        };
        for o in &gateway.allowed_origins {
            if !(o.starts_with("http://") || o.starts_with("https://")) || o.ends_with('/') {
                problems.push(format!(
                    "gateway.allowed_origins: {o:?} is not an origin like \"https://app.example\""
                ));
            }
        }
        let keys_file = self.auth.keys_file.unwrap_or_else(default_keys_file);
        let e2b = self.e2b.enabled.unwrap_or(true).then(|| {
            let mut e =
                ember_e2b::control::E2bConfig { domain: self.e2b.domain.clone(), ..Default::default() };
            e.templates.extend(self.e2b.templates.clone());
            e
        });
        if let Err(e) = self.quotas.check() {
            problems.push(format!("quotas: {e}"));
        }
        if gateway.conn_limits.header_read_timeout.is_zero() {
            problems.push("gateway.header_read_timeout must be more than 0".into());
        }
        if gateway.conn_limits.max_connections == 0 {
            problems.push("gateway.max_connections must be at least 1".into());
        }
        if gateway.functions_dir_explicit && !gateway.functions_dir.is_dir() {
            problems.push(format!(
                "gateway.functions_dir {} is not a directory",
                gateway.functions_dir.display()
            ));
        }

        let d = Limits::default();
        let l = self.limits;
        let limits = Limits {
            max_body_bytes: l.max_body_bytes.unwrap_or(d.max_body_bytes),
            max_output_bytes: l.max_output_bytes.unwrap_or(d.max_output_bytes),
            default_timeout: l.default_timeout.unwrap_or(d.default_timeout),
            max_timeout: l.max_timeout.unwrap_or(d.max_timeout),
            max_concurrent_requests: l.max_concurrent_requests.unwrap_or(d.max_concurrent_requests),
            max_pids: l.max_pids.unwrap_or(d.max_pids),
            max_queue_wait: l.max_queue_wait.unwrap_or(d.max_queue_wait),
            busy_delay: l.busy_delay.unwrap_or(d.busy_delay),
            max_network_rules: l.max_network_rules.unwrap_or(d.max_network_rules),
            process_output_buffer: l.process_output_buffer.unwrap_or(d.process_output_buffer),
            max_processes: l.max_processes.unwrap_or(d.max_processes),
            max_upload_bytes: l.max_upload_bytes.unwrap_or(d.max_upload_bytes),
            max_watched_dirs: l.max_watched_dirs.unwrap_or(d.max_watched_dirs),
        };
        if limits.max_watched_dirs == 0 || limits.max_watched_dirs > 65536 {
            problems.push("limits.max_watched_dirs must be between 1 and 65536".into());
        }
        if limits.process_output_buffer == 0 || limits.process_output_buffer > 64 << 20 {
            problems.push("limits.process_output_buffer must be between 1 and 67108864 bytes".into());
        }
        if limits.max_processes == 0 {
            problems.push("limits.max_processes must be at least 1".into());
        }
        if limits.max_network_rules == 0 || limits.max_network_rules > 4096 {
            problems.push("limits.max_network_rules must be between 1 and 4096".into());
        }
        if limits.busy_delay > Duration::from_secs(5) {
            problems.push("limits.busy_delay must be at most 5s".into());
        }
        if limits.max_body_bytes == 0 {
            problems.push("limits.max_body_bytes must be at least 1".into());
        }
        // Output is held in memory until the result is sent.
        if limits.max_output_bytes > 64 << 20 {
            problems.push(format!("limits.max_output_bytes ({}) exceeds 64 MiB", limits.max_output_bytes));
        }
        if limits.max_body_bytes > ember_wire::MAX_FRAME_LEN / 2 {
            problems.push(format!(
                "limits.max_body_bytes ({}) exceeds {} (half an agent frame, as base64 grows it)",
                limits.max_body_bytes,
                ember_wire::MAX_FRAME_LEN / 2
            ));
        }
        if limits.default_timeout.is_zero() || limits.max_timeout.is_zero() {
            problems.push("limits.default_timeout and limits.max_timeout must be above zero".into());
        }
        if limits.default_timeout > limits.max_timeout {
            problems.push(format!(
                "limits.default_timeout ({}) exceeds limits.max_timeout ({})",
                humantime::format_duration(limits.default_timeout),
                humantime::format_duration(limits.max_timeout)
            ));
        }
        if limits.max_concurrent_requests == 0 {
            problems.push("limits.max_concurrent_requests must be at least 1".into());
        }
        if limits.max_pids < 8 {
            problems.push("limits.max_pids must be at least 8".into());
        }
        let cluster = match self.cluster.enabled.unwrap_or(!self.cluster.etcd.is_empty()) {
            false => None,
            true => {
                let secret = match &self.cluster.secret_file {
                    None => None,
                    Some(f) => match std::fs::read_to_string(f) {
                        Ok(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
                        Ok(_) => {
                            problems.push(format!("cluster.secret_file {}: empty", f.display()));
                            None
                        }
                        Err(e) => {
                            problems.push(format!("cluster.secret_file {}: {e}", f.display()));
                            None
                        }
                    },
                };
                let c = ember_cluster::ClusterConfig {
                    // The file, else the environment (a DaemonSet's downward API), else defaults.
                    node: self
                        .cluster
                        .node
                        .clone()
                        .or_else(|| env_var("EMBER_NODE_NAME"))
                        .unwrap_or_else(host_name),
                    advertise: self
                        .cluster
                        .advertise
                        .clone()
                        .or_else(|| env_var("EMBER_ADVERTISE"))
                        .unwrap_or_default(),
                    etcd: self.cluster.etcd.clone(),
                    lease_ttl: self.cluster.lease_ttl.unwrap_or(Duration::from_secs(5)),
                    secret,
                };
                if let Err(p) = c.check() {
                    problems.extend(p);
                }
                Some(c)
            }
        };
        let mcp = self.mcp.enabled.unwrap_or(true).then(|| {
            let d = ember_mcp::McpConfig::default();
            ember_mcp::McpConfig {
                allowed_hosts: gateway.allowed_hosts.iter().chain(&self.mcp.allowed_hosts).cloned().collect(),
                allowed_origins: self.mcp.allowed_origins.clone(),
                max_result_bytes: self.mcp.max_result_bytes.unwrap_or(d.max_result_bytes),
                max_request_bytes: limits.max_body_bytes,
                session_idle_timeout: self.mcp.session_idle_timeout.clone().or(d.session_idle_timeout),
            }
        });
        if self.mcp.max_result_bytes.is_some_and(|b| b < 1024) {
            problems.push("mcp.max_result_bytes must be at least 1024".into());
        }
        for o in &self.mcp.allowed_origins {
            if !(o.starts_with("http://") || o.starts_with("https://")) || o.ends_with('/') {
                problems.push(format!(
                    "mcp.allowed_origins: {o:?} is not an origin like \"https://app.example\""
                ));
            }
        }
        match pool_vm {
            Some(pv) if problems.is_empty() => {
                let e2b = e2b.map(|e| ember_e2b::control::E2bConfig { cpu_count: pv.vm.vcpus, ..e });
                let pool =
                    ember_pool::config::PoolConfig { max_queue_wait: Some(limits.max_queue_wait), ..pv.pool };
                Ok(Config {
                    pool,
                    vm: pv.vm,
                    image_pools: pv.image_pools,
                    gateway,
                    limits,
                    images,
                    build_on_start,
                    network,
                    keys_file,
                    quotas: self.quotas,
                    e2b,
                    mcp,
                    cluster,
                })
            }
            _ => Err(problems),
        }
    }
}

/// `[network]`: `None` when off; every problem at once.
fn validate_network(raw: RawNetwork, state_dir: &Path) -> Result<Option<ember_net::NetConfig>, Vec<String>> {
    let mut problems = Vec::new();
    let enabled = raw.enabled.unwrap_or(false);
    let subnet = match raw.subnet.as_deref().unwrap_or("198.18.0.0/16").parse::<ipnet::Ipv4Net>() {
        Ok(s) => Some(s),
        Err(_) => {
            problems.push(format!("network.subnet {:?} is not an IPv4 CIDR", raw.subnet.unwrap_or_default()));
            None
        }
    };
    let mut upstream = Vec::new();
    for u in &raw.dns_upstream {
        match u.parse::<std::net::Ipv4Addr>() {
            Ok(a) => upstream.push(a),
            Err(_) => problems.push(format!("network.dns_upstream: {u:?} is not an IPv4 address")),
        }
    }
    let namespace = raw.namespace.unwrap_or_else(|| "ember".into());
    let cfg = subnet.map(|subnet| ember_net::NetConfig {
        state_dir: state_dir.join(format!("net-{namespace}")),
        namespace,
        subnet,
        uplink: raw.uplink,
        dns_upstream: upstream,
    });
    if let Some(c) = &cfg {
        if let Err(p) = c.validate() {
            problems.extend(p);
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(cfg.filter(|_| enabled))
}

/// Load `path` (or the defaults), then validate. Every problem is listed.
pub fn load(path: Option<&Path>, images_default: &Path) -> Result<Config, Vec<String>> {
    let raw = match path {
        Some(p) => RawConfig::load(p)?,
        None => RawConfig::default(),
    };
    raw.validate(images_default)
}

/// `load`, or print every problem and exit 64 (EX_USAGE).
pub fn load_or_exit(path: Option<&Path>, images_default: &Path) -> Config {
    match load(path, images_default) {
        Ok(c) => c,
        Err(problems) => {
            eprintln!("ember: invalid configuration:");
            for p in problems {
                eprintln!("  - {p}");
            }
            std::process::exit(64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use ember_pool::config::empty_image_dir as images;

    #[test]
    fn defaults_and_every_gateway_key() {
        let img = images();
        let c = RawConfig::parse("").unwrap().validate(img.path()).unwrap();
        assert_eq!(c.gateway, GatewayConfig::default());
        assert_eq!(c.limits, Limits::default());
        let text = r#"
            [gateway]
            listen = "127.0.0.1:9999"
            [limits]
            max_body_bytes = 1000
            max_output_bytes = 2000
            default_timeout = "2s"
            max_timeout = "1m"
            max_concurrent_requests = 3
            max_pids = 64
            max_queue_wait = "750ms"
            [pool]
            max_size = 4
            [pool.sessions]
            max = 2
        "#;
        let c = RawConfig::parse(text).unwrap().validate(img.path()).unwrap();
        assert_eq!(c.gateway.listen.port(), 9999);
        assert_eq!(
            c.limits,
            Limits {
                max_body_bytes: 1000,
                max_output_bytes: 2000,
                default_timeout: Duration::from_secs(2),
                max_timeout: Duration::from_secs(60),
                max_concurrent_requests: 3,
                max_pids: 64,
                max_queue_wait: Duration::from_millis(750),
                busy_delay: Duration::from_millis(250),
                max_network_rules: 64,
                process_output_buffer: 1 << 20,
                max_processes: 16,
                max_upload_bytes: 1 << 30,
                max_watched_dirs: 4096,
            }
        );
        assert_eq!((c.pool.max_size, c.pool.max_sessions), (4, 2));
        assert_eq!(c.pool.max_queue_wait, Some(Duration::from_millis(750)), "the pool admits by it");
    }

    #[test]
    fn network_is_off_by_default_and_checked_when_on() {
        let img = images();
        let c = RawConfig::parse("").unwrap().validate(img.path()).unwrap();
        assert!(c.network.is_none());
        let text = "[network]\nenabled = true\nuplink = \"eth0\"\ndns_upstream = [\"203.0.113.53\"]\n";
        let c = RawConfig::parse(text).unwrap().validate(img.path()).unwrap();
        let n = c.network.unwrap();
        assert_eq!((n.namespace.as_str(), n.subnet.to_string().as_str()), ("ember", "198.18.0.0/16"));
        assert_eq!(n.dns_upstream, ["203.0.113.53".parse::<std::net::Ipv4Addr>().unwrap()]);
        let bad = "[network]\nenabled = true\nsubnet = \"10.0.0.0/30\"\ndns_upstream = [\"x\"]\nnamespace = \"A B\"\n[limits]\nmax_network_rules = 0";
        let all = RawConfig::parse(bad).unwrap().validate(img.path()).unwrap_err().join("\n");
        for needle in ["too small", "dns_upstream: \"x\"", "network.namespace", "max_network_rules"] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
    }

    #[test]
    fn problems_of_every_section_are_reported_together() {
        let text = r#"
            [pool]
            max_uses = 0
            [gateway]
            functions_dir = "/nonexistent/functions"
            [limits]
            default_timeout = "10m"
            max_timeout = "1m"
            max_concurrent_requests = 0
            max_body_bytes = 0
            max_watched_dirs = 0
        "#;
        let img = images();
        let all = RawConfig::parse(text).unwrap().validate(img.path()).unwrap_err().join("\n");
        for needle in [
            "max_uses",
            "functions_dir",
            "default_timeout (10m) exceeds",
            "max_concurrent",
            "max_body",
            "max_watched_dirs",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        for (text, needle) in [
            ("[gateway]\nlisten_on = \"x\"", "listen_on"),
            ("[limits]\nmax_bodyy = 1", "max_bodyy"),
            ("[gateway]\nlisten = \"nowhere\"", "listen"),
            ("[other]\nx = 1", "other"),
        ] {
            let e = RawConfig::parse(text).unwrap_err().join("\n");
            assert!(e.contains(needle), "{text:?} -> {e}");
        }
    }
}
