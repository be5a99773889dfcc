//! Ember's network namespace and everything in it: the link to the uplink,
//! one TAP per VM (made with the VM, before any claim), each VM's rules and
//! its resolver (made on a claim with a network, removed after it). Commands
//! run through the [`Runner`] (`ip`, `nft`), so every failure keeps its
//! command and stderr.
//!
//! ```text
//!  serving namespace                 | Ember's namespace (cfg.namespace)
//!  uplink <- masquerade - veth  ====== up0 <- masquerade - tapN (gw .1/30) == VM eth0 (.2/30)
//! ```

use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;

use super::nft::{self, VmNet};
use super::policy::{Policy, Rule};
use ember_sys::OwnedProcess;
use ember_sys::Runner;

/// What `[network]` says, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The namespace Ember creates and owns (`ip netns` name).
    pub namespace: String,
    /// Every VM's address comes from here (a /30 each); its last /30 is the
    /// link to the serving namespace.
    pub subnet: Ipv4Net,
    /// An interface of the serving namespace VMs reach the world through.
    pub uplink: Option<String>,
    /// Resolvers the VMs' names are looked up at, through the uplink.
    pub dns_upstream: Vec<Ipv4Addr>,
    /// Rulesets, resolver configurations and pid files.
    pub state_dir: PathBuf,
}

impl NetConfig {
    /// Every problem at once.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut p = Vec::new();
        let ns_ok = !self.namespace.is_empty()
            && self.namespace.len() <= 12
            && self.namespace.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ns_ok {
            p.push(format!("network.namespace {:?}: 1-12 of a-z, 0-9 and '-'", self.namespace));
        }
        if self.subnet.prefix_len() > 24 {
            p.push(format!(
                "network.subnet {} is too small: a /24 or larger (each VM takes a /30)",
                self.subnet
            ));
        }
        if self.subnet.network() != self.subnet.addr() {
            p.push(format!("network.subnet {} has host bits set", self.subnet));
        }
        if let Some(u) = &self.uplink {
            if u.is_empty() || u.len() > 15 || u.contains(['/', ' ']) {
                p.push(format!("network.uplink {u:?} is not an interface name"));
            }
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(p)
        }
    }

    /// The serving namespace's end of the link (at most 15 characters).
    fn veth(&self) -> String {
        format!("em-{}", self.namespace)
    }

    /// The table in the serving namespace.
    fn uplink_table(&self) -> String {
        format!("ember_{}", self.namespace.replace('-', "_"))
    }

    /// The last /30 of the subnet: serving end .1, Ember's end .2.
    fn link(&self) -> Ipv4Net {
        let last = u32::from(self.subnet.broadcast()) & !3;
        Ipv4Net::new(Ipv4Addr::from(last), 30).unwrap_or(self.subnet)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("network: {0}")]
    Setup(String),
    #[error("network: {command}: {detail}")]
    Command { command: String, detail: String },
    #[error("network: no address left in {0} (one /30 per VM)")]
    Exhausted(Ipv4Net),
}

/// The /30 blocks of the subnet: block `i` is `subnet + 4i`.
#[derive(Debug)]
struct Blocks {
    subnet: Ipv4Net,
    count: u32,
    used: BTreeSet<u32>,
}

impl Blocks {
    fn new(subnet: Ipv4Net) -> Self {
        // The last block is the link.
        let count = (1u64 << (32 - subnet.prefix_len())) as u32 / 4 - 1;
        Self { subnet, count, used: BTreeSet::new() }
    }

    fn take(&mut self) -> Option<u32> {
        let free = (0..self.count).find(|i| !self.used.contains(i))?;
        self.used.insert(free);
        Some(free)
    }

    fn give_back(&mut self, i: u32) {
        self.used.remove(&i);
    }

    fn addrs(&self, i: u32) -> (Ipv4Addr, Ipv4Addr) {
        let base = u32::from(self.subnet.network()) + 4 * i;
        (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2))
    }
}

/// A VM's TAP and addresses; given back to the network by [`Network::remove_tap`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tap {
    pub net: VmNet,
    block: u32,
}

impl Tap {
    pub fn name(&self) -> &str {
        &self.net.tap
    }
}

/// A VM's TAP, removed with it.
#[derive(Debug)]
pub struct OwnedTap {
    net: Arc<Network>,
    tap: Option<Tap>,
}

impl OwnedTap {
    pub fn tap(&self) -> &Tap {
        match &self.tap {
            Some(t) => t,
            None => unreachable!("an OwnedTap holds its TAP until removed"),
        }
    }

    pub fn network(&self) -> &Arc<Network> {
        &self.net
    }

    /// Remove it (rules, resolver, TAP), waiting for the commands.
    pub async fn remove(mut self) {
        if let Some(t) = self.tap.take() {
            self.net.remove_tap(&t).await;
        }
    }
}

impl Drop for OwnedTap {
    fn drop(&mut self) {
        if let Some(t) = self.tap.take() {
            self.net.remove_tap_now(&t);
        }
    }
}

/// What the guest is told on a claim with a network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestNet {
    /// `addr/30`.
    pub address: String,
    pub gateway: String,
    pub dns: Vec<String>,
}

/// How long each step of connecting a VM took (the benchmark's split).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ConnectTimings {
    pub rules: Duration,
    pub resolver: Duration,
}

/// A VM's live network: its rule sets and resolver.
#[derive(Debug)]
struct Live {
    sets: Vec<String>,
    /// Killed (the whole process group) when dropped.
    _resolver: Option<OwnedProcess>,
}

#[derive(Debug)]
pub struct Network {
    cfg: NetConfig,
    /// Says this process owns the namespace; `close` removes only what it owns.
    owner_file: PathBuf,
    runner: Arc<dyn Runner>,
    blocks: Mutex<Blocks>,
    live: Mutex<HashMap<String, Live>>,
    /// The serving namespace's `ip_forward` before Ember set it.
    forward_was: Option<String>,
    next_tap: std::sync::atomic::AtomicU64,
}

const IP: &str = "ip";

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Where the owner of each namespace Ember makes is recorded (`pid-start`),
/// whatever state directory that Ember uses.
const OWNERS: &str = "/run/ember-net";

/// This process, as `owner_alive` reads it.
fn me() -> String {
    ember_sys::procfs::own_identity()
}

impl Network {
    /// Reap what a crashed run left under this namespace's name, then make
    /// the namespace, its base rules and the link to the uplink. A namespace
    /// a live Ember owns is never taken: that is an error.
    pub async fn open(cfg: NetConfig, runner: Arc<dyn Runner>) -> Result<Arc<Self>, NetError> {
        Self::open_owned(cfg, runner, Path::new(OWNERS)).await
    }

    async fn open_owned(
        cfg: NetConfig,
        runner: Arc<dyn Runner>,
        owners: &Path,
    ) -> Result<Arc<Self>, NetError> {
        cfg.validate().map_err(|p| NetError::Setup(p.join("; ")))?;
        std::fs::create_dir_all(owners)
            .map_err(|e| NetError::Setup(format!("creating {}: {e}", owners.display())))?;
        let owner_file = owners.join(format!("{}.owner", cfg.namespace));
        let owner = std::fs::read_to_string(&owner_file).unwrap_or_default();
        let owner = owner.trim();
        if !owner.is_empty() && owner != me() && ember_sys::procfs::identity_alive(owner) {
            return Err(NetError::Setup(format!(
                "namespace {:?} belongs to a running ember (pid {}); give this one another [network] namespace",
                cfg.namespace,
                owner.split('-').next().unwrap_or("?")
            )));
        }
        std::fs::write(&owner_file, me())
            .map_err(|e| NetError::Setup(format!("writing {}: {e}", owner_file.display())))?;
        std::fs::create_dir_all(&cfg.state_dir)
            .map_err(|e| NetError::Setup(format!("creating {}: {e}", cfg.state_dir.display())))?;
        let mut me = Self {
            owner_file,
            blocks: Mutex::new(Blocks::new(cfg.subnet)),
            cfg,
            runner,
            live: Mutex::default(),
            forward_was: None,
            next_tap: std::sync::atomic::AtomicU64::new(0),
        };
        me.reap().await;
        let ns = me.cfg.namespace.clone();
        me.run(IP, &args(&["netns", "add", &ns])).await?;
        me.ip_batch(&["link set lo up".to_string()]).await?;
        me.in_ns(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]).await?;
        let link = me.cfg.link();
        let hosts = me.host_addresses(link).await?;
        if let Some(up) = me.cfg.uplink.clone() {
            let (serve_end, ns_end) = link_addrs(link);
            let veth = me.cfg.veth();
            me.run(IP, &args(&["link", "add", &veth, "type", "veth", "peer", "name", "up0", "netns", &ns]))
                .await?;
            me.run(IP, &args(&["addr", "add", &format!("{serve_end}/30"), "dev", &veth])).await?;
            me.run(IP, &args(&["link", "set", &veth, "up"])).await?;
            me.ip_batch(&[
                format!("addr add {ns_end}/30 dev up0"),
                "link set up0 up".to_string(),
                format!("route add default via {serve_end} dev up0"),
            ])
            .await?;
            let table = nft::uplink_table(&me.cfg.uplink_table(), &veth, link, &up);
            me.nft_here(&table).await?;
            // Through the runner like every other change, so that a test
            // with a fake runner never touches the host.
            me.forward_was = me.run("sysctl", &args(&["-n", "net.ipv4.ip_forward"])).await.ok();
            me.run("sysctl", &args(&["-qw", "net.ipv4.ip_forward=1"])).await?;
        }
        let base = nft::base_table(me.cfg.subnet, &hosts, me.cfg.uplink.as_ref().map(|_| "up0"));
        me.nft_in_ns(&base).await?;
        tracing::info!(namespace = %ns, subnet = %me.cfg.subnet, uplink = ?me.cfg.uplink, "network ready");
        Ok(Arc::new(me))
    }

    pub fn config(&self) -> &NetConfig {
        &self.cfg
    }

    /// Addresses no VM may reach: the serving namespace's own and the link.
    async fn host_addresses(&self, link: Ipv4Net) -> Result<Vec<Ipv4Net>, NetError> {
        let out = self.run(IP, &args(&["-4", "-o", "addr", "show"])).await?;
        let mut nets = vec![link];
        for line in out.lines() {
            let mut words = line.split_whitespace();
            if let Some(a) = words.by_ref().skip_while(|w| *w != "inet").nth(1) {
                if let Ok(net) = a.parse::<Ipv4Net>() {
                    if !net.addr().is_loopback() {
                        nets.push(Ipv4Net::from(net.addr()));
                    }
                }
            }
        }
        Ok(nets)
    }

    /// Remove what a run of this namespace left: its resolvers, the
    /// namespace (and every TAP in it), the link and the serving
    /// namespace's table. Errors are logged: nothing may be there.
    async fn reap(&self) {
        for e in std::fs::read_dir(&self.cfg.state_dir).into_iter().flatten().flatten() {
            if e.path().extension().is_some_and(|x| x == "pid") {
                if let Some(pid) =
                    std::fs::read_to_string(e.path()).ok().and_then(|s| s.trim().parse::<i32>().ok())
                {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            let _ = std::fs::remove_file(e.path());
        }
        let ns = self.cfg.namespace.clone();
        let list = self.run(IP, &args(&["netns", "list"])).await.unwrap_or_default();
        if list.lines().any(|l| l.split_whitespace().next() == Some(ns.as_str())) {
            tracing::warn!(namespace = %ns, "removing the network namespace a crashed run left");
            if let Err(e) = self.run(IP, &args(&["netns", "del", &ns])).await {
                tracing::warn!(error = %e, "cannot remove the old namespace");
            }
        }
        let veth = self.cfg.veth();
        if self.run(IP, &args(&["link", "show", &veth])).await.is_ok() {
            let _ = self.run(IP, &args(&["link", "del", &veth])).await;
        }
        let table = self.cfg.uplink_table();
        let _ = self.run("nft", &args(&["delete", "table", "ip", &table])).await;
    }

    /// Remove everything: resolvers, the namespace with its TAPs, the
    /// link, the serving namespace's table; `ip_forward` as it was.
    pub async fn close(&self) {
        let live: Vec<Live> =
            self.live.lock().unwrap_or_else(|p| p.into_inner()).drain().map(|(_, l)| l).collect();
        drop(live);
        let owner = std::fs::read_to_string(&self.owner_file).unwrap_or_default();
        if owner.trim() != me() {
            tracing::error!(namespace = %self.cfg.namespace, "another ember owns the namespace now; leaving it");
            return;
        }
        self.reap().await;
        let _ = std::fs::remove_file(&self.owner_file);
        if let Some(was) = self.forward_was.as_deref().map(str::trim).filter(|w| *w == "0") {
            let _ = self.run("sysctl", &args(&["-qw", &format!("net.ipv4.ip_forward={was}")])).await;
        }
        tracing::info!(namespace = %self.cfg.namespace, "network removed");
    }

    async fn run(&self, program: &str, a: &[String]) -> Result<String, NetError> {
        self.runner.run(program, a).await.map_err(|e| NetError::Command {
            command: ember_sys::command_line(program, a),
            detail: e.to_string(),
        })
    }

    async fn in_ns(&self, cmd: &[&str]) -> Result<String, NetError> {
        let mut a = args(&["netns", "exec", &self.cfg.namespace]);
        a.extend(cmd.iter().map(|s| s.to_string()));
        self.run(IP, &a).await
    }

    /// `ip -n NS -batch FILE`: several changes in one process.
    async fn ip_batch(&self, lines: &[String]) -> Result<(), NetError> {
        let file = self.scratch_file("ip", &(lines.join("\n") + "\n"))?;
        let r = self.run(IP, &args(&["-n", &self.cfg.namespace, "-batch", &file])).await;
        let _ = std::fs::remove_file(&file);
        r.map(drop)
    }

    async fn nft_in_ns(&self, ruleset: &str) -> Result<(), NetError> {
        let file = self.scratch_file("nft", ruleset)?;
        let r = self.in_ns(&["nft", "-f", &file]).await;
        let _ = std::fs::remove_file(&file);
        r.map(drop)
    }

    async fn nft_here(&self, ruleset: &str) -> Result<(), NetError> {
        let file = self.scratch_file("nft", ruleset)?;
        let r = self.run("nft", &args(&["-f", &file])).await;
        let _ = std::fs::remove_file(&file);
        r.map(drop)
    }

    fn scratch_file(&self, kind: &str, text: &str) -> Result<String, NetError> {
        let p = self.cfg.state_dir.join(format!("{kind}-{}.txt", uuid::Uuid::new_v4().simple()));
        std::fs::write(&p, text).map_err(|e| NetError::Setup(format!("writing {}: {e}", p.display())))?;
        Ok(p.to_string_lossy().into_owned())
    }

    /// The namespace for a VM's QEMU (`ip netns exec NS`).
    pub fn namespace(&self) -> &str {
        &self.cfg.namespace
    }

    /// A TAP for a new VM, with its gateway address and route; packets from
    /// it reach nothing until [`Self::connect`].
    pub async fn add_tap(&self) -> Result<Tap, NetError> {
        let block = self
            .blocks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or(NetError::Exhausted(self.cfg.subnet))?;
        let (gateway, addr) = self.blocks.lock().unwrap_or_else(|p| p.into_inner()).addrs(block);
        let n = self.next_tap.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tap = format!("tap{n}");
        let made = self
            .ip_batch(&[
                format!("tuntap add dev {tap} mode tap"),
                format!("addr add {gateway}/30 dev {tap}"),
                format!("link set {tap} up"),
            ])
            .await;
        if let Err(e) = made {
            self.blocks.lock().unwrap_or_else(|p| p.into_inner()).give_back(block);
            let _ = self.ip_batch(&[format!("link del {tap}")]).await;
            return Err(e);
        }
        Ok(Tap { net: VmNet { tap, addr, gateway }, block })
    }

    /// A TAP owned by a VM: removed by [`OwnedTap::remove`], or when dropped.
    pub async fn add_owned_tap(self: &Arc<Self>) -> Result<OwnedTap, NetError> {
        let tap = self.add_tap().await?;
        Ok(OwnedTap { net: Arc::clone(self), tap: Some(tap) })
    }

    /// [`Self::remove_tap`] without a runtime (a dropped VM): the resolver
    /// is killed, the rules and the TAP removed by blocking commands.
    fn remove_tap_now(&self, tap: &Tap) {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner()).remove(tap.name());
        let ns = &self.cfg.namespace;
        if let Some(live) = live {
            if let Ok(file) = self.scratch_file("nft", &nft::vm_teardown(tap.name(), &live.sets)) {
                let _ =
                    std::process::Command::new(IP).args(["netns", "exec", ns, "nft", "-f", &file]).output();
                let _ = std::fs::remove_file(file);
            }
        }
        let _ = std::process::Command::new(IP).args(["-n", ns, "link", "del", tap.name()]).output();
        self.blocks.lock().unwrap_or_else(|p| p.into_inner()).give_back(tap.block);
    }

    /// Remove a VM's TAP (its rules and resolver first) and give its
    /// addresses back.
    pub async fn remove_tap(&self, tap: &Tap) {
        self.disconnect(tap).await;
        if let Err(e) = self.ip_batch(&[format!("link del {}", tap.name())]).await {
            tracing::warn!(tap = tap.name(), error = %e, "cannot remove a TAP");
        }
        self.blocks.lock().unwrap_or_else(|p| p.into_inner()).give_back(tap.block);
    }

    /// Give the VM behind `tap` the network `policy` allows (replacing what
    /// it had, in one transaction), and its resolver. Returns what the
    /// guest must be told.
    pub async fn connect(&self, tap: &Tap, policy: &Policy) -> Result<(GuestNet, ConnectTimings), NetError> {
        let t = Instant::now();
        let old = self.live.lock().unwrap_or_else(|p| p.into_inner()).remove(tap.name());
        let mut ruleset = String::new();
        if let Some(old) = &old {
            ruleset.push_str(&nft::vm_teardown(tap.name(), &old.sets));
        }
        ruleset.push_str(&nft::vm_rules(&tap.net, self.cfg.subnet, policy));
        self.nft_in_ns(&ruleset).await?;
        let rules = t.elapsed();
        drop(old);
        let t = Instant::now();
        let resolver = if policy.connected() { Some(self.start_resolver(tap, policy)?) } else { None };
        let timings = ConnectTimings { rules, resolver: t.elapsed() };
        let sets = nft::name_sets(tap.name(), policy);
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(tap.name().to_string(), Live { sets, _resolver: resolver });
        let guest = GuestNet {
            address: format!("{}/30", tap.net.addr),
            gateway: tap.net.gateway.to_string(),
            dns: vec![tap.net.gateway.to_string()],
        };
        Ok((guest, timings))
    }

    /// Take the VM's rules and resolver away: its TAP reaches nothing.
    pub async fn disconnect(&self, tap: &Tap) {
        let old = self.live.lock().unwrap_or_else(|p| p.into_inner()).remove(tap.name());
        if let Some(old) = old {
            if let Err(e) = self.nft_in_ns(&nft::vm_teardown(tap.name(), &old.sets)).await {
                tracing::error!(tap = tap.name(), error = %e, "cannot remove a VM's rules");
            }
            let pid_file = self.cfg.state_dir.join(format!("dns-{}.pid", tap.name()));
            let _ = std::fs::remove_file(pid_file);
            drop(old);
        }
    }

    /// The VM's resolver: dnsmasq on its gateway address, answering only the
    /// names its policy allows (from the upstream resolvers), and adding the
    /// addresses it gives out for them to the VM's name sets.
    fn start_resolver(&self, tap: &Tap, policy: &Policy) -> Result<OwnedProcess, NetError> {
        let conf = resolver_conf(tap, policy, &self.cfg.dns_upstream);
        let path = self.cfg.state_dir.join(format!("dns-{}.conf", tap.name()));
        std::fs::write(&path, conf)
            .map_err(|e| NetError::Setup(format!("writing {}: {e}", path.display())))?;
        let argv: Vec<std::ffi::OsString> = [
            "netns".into(),
            "exec".into(),
            self.cfg.namespace.clone().into(),
            "dnsmasq".into(),
            "--keep-in-foreground".into(),
            format!("--conf-file={}", path.display()).into(),
        ]
        .into();
        let log = self.cfg.state_dir.join(format!("dns-{}.log", tap.name()));
        let p = OwnedProcess::spawn("dnsmasq", std::path::Path::new(IP), &argv, &log)
            .map_err(|e| NetError::Setup(format!("starting the resolver of {}: {e}", tap.name())))?;
        let pid_file = self.cfg.state_dir.join(format!("dns-{}.pid", tap.name()));
        let _ = std::fs::write(pid_file, p.pid().to_string());
        Ok(p)
    }
}

fn link_addrs(link: Ipv4Net) -> (Ipv4Addr, Ipv4Addr) {
    let base = u32::from(link.network());
    (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2))
}

/// dnsmasq's configuration for one VM.
pub fn resolver_conf(tap: &Tap, policy: &Policy, upstream: &[Ipv4Addr]) -> String {
    let mut c = format!(
        "no-resolv\nno-hosts\nno-poll\nbind-interfaces\ninterface={}\nlisten-address={}\nexcept-interface=lo\n\
         cache-size=256\nlocal-ttl=1\n",
        tap.name(),
        tap.net.gateway
    );
    let server = |c: &mut String, domain: Option<&str>| {
        for u in upstream {
            match domain {
                Some(d) => c.push_str(&format!("server=/{d}/{u}\n")),
                None => c.push_str(&format!("server={u}\n")),
            }
        }
    };
    let pattern = |name: &str, wildcard: bool| if wildcard { format!("*.{name}") } else { name.to_string() };
    match policy.resolvable() {
        None => server(&mut c, None),
        Some(names) => {
            // Everything else: no such domain.
            c.push_str("address=/#/\n");
            for r in names {
                if let Rule::Name { name, wildcard, port } = r {
                    let d = pattern(name, *wildcard);
                    server(&mut c, Some(&d));
                    let set = nft::name_set(tap.name(), *port);
                    c.push_str(&format!("nftset=/{d}/4#inet#{}#{set}\n", nft::TABLE));
                }
            }
        }
    }
    if let Policy::Egress { deny, .. } = policy {
        for r in deny {
            if let Rule::Name { name, wildcard, .. } = r {
                c.push_str(&format!("address=/{}/\n", pattern(name, *wildcard)));
            }
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::RawPolicy;
    use ember_sys::FakeRunner;

    fn cfg() -> NetConfig {
        NetConfig {
            namespace: "embt".into(),
            subnet: "198.18.0.0/24".parse().unwrap(),
            uplink: Some("eth9".into()),
            dns_upstream: vec!["203.0.113.53".parse().unwrap()],
            state_dir: tempfile::tempdir().unwrap().keep(),
        }
    }

    #[test]
    fn blocks_skip_the_link_and_come_back() {
        let mut b = Blocks::new("198.18.0.0/24".parse().unwrap());
        assert_eq!(b.count, 63, "64 /30s, the last is the link");
        let i = b.take().unwrap();
        assert_eq!(b.addrs(i), ("198.18.0.1".parse().unwrap(), "198.18.0.2".parse().unwrap()));
        let j = b.take().unwrap();
        assert_eq!(b.addrs(j).1, "198.18.0.6".parse::<Ipv4Addr>().unwrap());
        b.give_back(i);
        assert_eq!(b.take(), Some(i), "the lowest free block first");
        let mut all = Blocks::new("198.18.0.0/24".parse().unwrap());
        assert_eq!((0..100).filter_map(|_| all.take()).count(), 63);
        assert_eq!(cfg().link(), "198.18.0.252/30".parse().unwrap());
    }

    #[test]
    fn config_problems_are_named() {
        let mut c = cfg();
        c.namespace = "Bad Name".into();
        c.subnet = "198.18.0.1/28".parse().unwrap();
        c.uplink = Some("a/b".into());
        let p = c.validate().unwrap_err().join("\n");
        for needle in ["network.namespace", "too small", "host bits", "network.uplink"] {
            assert!(p.contains(needle), "{needle}: {p}");
        }
    }

    #[test]
    fn a_resolver_answers_allowed_names_only_and_fills_their_sets() {
        let tap = Tap {
            net: VmNet {
                tap: "tap3".into(),
                addr: "198.18.0.14".parse().unwrap(),
                gateway: "198.18.0.13".parse().unwrap(),
            },
            block: 3,
        };
        let up = ["203.0.113.53".parse().unwrap()];
        let p = serde_json::from_str::<RawPolicy>(
            r#"{"egress": {"allow": ["allowed.test", "*.wild.test:443", "203.0.113.10"], "deny": ["bad.wild.test"]}}"#,
        )
        .unwrap()
        .check(8)
        .unwrap();
        let c = resolver_conf(&tap, &p, &up);
        for line in [
            "interface=tap3",
            "listen-address=198.18.0.13",
            "address=/#/",
            "server=/allowed.test/203.0.113.53",
            "nftset=/allowed.test/4#inet#ember#vm_tap3_names",
            "server=/*.wild.test/203.0.113.53",
            "nftset=/*.wild.test/4#inet#ember#vm_tap3_names_443",
            "address=/bad.wild.test/",
        ] {
            assert!(c.lines().any(|l| l == line), "missing {line:?} in\n{c}");
        }
        let open = resolver_conf(&tap, &Policy::Open, &up);
        assert!(open.contains("server=203.0.113.53\n") && !open.contains("address=/#/"), "{open}");
    }

    #[tokio::test]
    async fn a_namespace_a_live_ember_owns_is_never_taken() {
        let owners = tempfile::tempdir().unwrap();
        // pid 1 is alive: an owner with its start time is a live Ember.
        let init = format!("1-{}", ember_sys::procfs::start_time(1).unwrap());
        std::fs::write(owners.path().join("embt.owner"), &init).unwrap();
        let runner = Arc::new(FakeRunner::default());
        let e = Network::open_owned(cfg(), runner.clone(), owners.path()).await.unwrap_err().to_string();
        assert!(e.contains("belongs to a running ember (pid 1)"), "{e}");
        assert!(runner.calls().is_empty(), "nothing was touched: {:?}", runner.calls());
        // A dead owner's namespace is reaped and taken.
        std::fs::write(owners.path().join("embt.owner"), "999999-1").unwrap();
        let net = Network::open_owned(cfg(), runner.clone(), owners.path()).await.unwrap();
        assert_eq!(std::fs::read_to_string(owners.path().join("embt.owner")).unwrap(), me());
        net.close().await;
        assert!(!owners.path().join("embt.owner").exists());
    }

    #[tokio::test]
    async fn open_builds_the_namespace_the_link_and_the_tables() {
        let runner = Arc::new(FakeRunner::default());
        let owners = tempfile::tempdir().unwrap();
        let net = Network::open_owned(cfg(), runner.clone(), owners.path()).await.unwrap();
        let calls = runner.calls();
        let has =
            |needle: &str| assert!(calls.iter().any(|c| c.contains(needle)), "no {needle:?} in {calls:#?}");
        has("ip netns add embt");
        has("ip netns exec embt sysctl -qw net.ipv4.ip_forward=1");
        has("ip link add em-embt type veth peer name up0 netns embt");
        has("ip addr add 198.18.0.253/30 dev em-embt");
        has("ip netns exec embt nft -f ");
        has("sysctl -qw net.ipv4.ip_forward=1");
        let tap = net.add_tap().await.unwrap();
        assert_eq!((tap.name(), tap.net.addr.to_string()), ("tap0", "198.18.0.2".to_string()));
        runner.clear();
        net.remove_tap(&tap).await;
        assert!(runner.calls().iter().any(|c| c.starts_with("ip -n embt -batch")));
    }
}
