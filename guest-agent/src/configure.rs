//! `configure`: hostname, network and DNS in one round trip.

use ember_wire::{Configure, ErrorCode, ErrorReply};

use crate::Agent;

const MAX_ENTROPY: usize = 512;

/// Mix `bytes` into the kernel's input pool (a write to /dev/urandom
/// credits nothing but is mixed in) and reseed the generator from it.
fn reseed(bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut f = std::fs::OpenOptions::new().write(true).open("/dev/urandom")?;
    f.write_all(bytes)?;
    crate::sys::reseed_crng(&f)
}

pub async fn configure(agent: &Agent, cfg: Configure) -> Result<(), ErrorReply> {
    let bad = |m: String| ErrorReply::new(ErrorCode::BadRequest, m);
    if let Some(name) = &cfg.hostname {
        validate_hostname(name).map_err(bad)?;
    }
    for ns in &cfg.dns {
        ns.parse::<std::net::IpAddr>().map_err(|_| bad(format!("invalid nameserver {ns:?}")))?;
    }
    if let Some(net) = &cfg.network {
        validate_interface(&net.interface).map_err(bad)?;
        let (addr, prefix) = net
            .address
            .split_once('/')
            .ok_or_else(|| bad(format!("address {:?} needs a /prefix", net.address)))?;
        let ip: std::net::IpAddr = addr.parse().map_err(|_| bad(format!("invalid address {addr:?}")))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        match prefix.parse::<u8>() {
            Ok(p) if p <= max => {}
            _ => return Err(bad(format!("invalid prefix length {prefix:?}"))),
        }
        if let Some(gw) = &net.gateway {
            gw.parse::<std::net::IpAddr>().map_err(|_| bad(format!("invalid gateway {gw:?}")))?;
        }
    }

    if cfg.entropy.len() > MAX_ENTROPY {
        return Err(bad(format!("at most {MAX_ENTROPY} bytes of entropy")));
    }
    if !cfg.entropy.is_empty() {
        reseed(&cfg.entropy).map_err(|e| internal(format!("reseeding the random generator: {e}")))?;
    }
    if let Some(ms) = cfg.clock_unix_ms {
        let ts = nix::sys::time::TimeSpec::new((ms / 1000) as i64, ((ms % 1000) * 1_000_000) as i64);
        nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts)
            .map_err(|e| internal(format!("setting the clock: {e}")))?;
    }
    if let Some(name) = &cfg.hostname {
        nix::unistd::sethostname(name).map_err(|e| internal(format!("sethostname: {e}")))?;
    }
    if cfg.network_off {
        clear_network(agent).await?;
        // /etc/resolv.conf is a link into /run (the root is read-only):
        // empty what it points to.
        std::fs::write(&agent.layout.resolv_conf, "")
            .map_err(|e| internal(format!("emptying {}: {e}", agent.layout.resolv_conf.display())))?;
    }
    if let Some(net) = &cfg.network {
        // Checked above: an address with a prefix, a gateway that parses.
        let (addr, prefix) = net.address.split_once('/').unwrap_or((&net.address, "32"));
        let addr: std::net::IpAddr = addr.parse().map_err(|_| bad(format!("invalid address {addr:?}")))?;
        let prefix: u8 = prefix.parse().map_err(|_| bad(format!("invalid prefix {prefix:?}")))?;
        let gw =
            net.gateway.as_deref().map(str::parse).transpose().map_err(|_| bad("invalid gateway".into()))?;
        crate::nic::configure(&net.interface, addr, prefix, gw).await.map_err(internal)?;
    }
    if !cfg.dns.is_empty() {
        let text: String = cfg.dns.iter().map(|ns| format!("nameserver {ns}\n")).collect();
        std::fs::write(&agent.layout.resolv_conf, text)
            .map_err(|e| internal(format!("writing {}: {e}", agent.layout.resolv_conf.display())))?;
    }
    Ok(())
}

/// Interfaces but `lo`.
fn nics() -> Vec<String> {
    std::fs::read_dir("/sys/class/net")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "lo")
        .collect()
}

/// Take every address and route off the guest's NICs and bring them down:
/// a VM goes back to its next caller with no network (a snapshot reset does
/// this by itself; a scrub and a rollback call this). Callers make sure they
/// run in a guest (PID 1): on a host this would take its network down.
pub async fn clear_network(agent: &Agent) -> Result<(), ErrorReply> {
    if std::process::id() != 1 {
        return Ok(());
    }
    let _ = agent;
    crate::nic::clear(&nics()).await.map_err(internal)
}

/// Whether no NIC has an IPv4 address or a route (what [`clear_network`]
/// leaves), or what is left.
pub fn network_is_clear() -> Result<(), String> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| format!("listing addresses: {e}"))?;
    for a in addrs.filter(|a| a.interface_name != "lo") {
        if let Some(sin) = a.address.as_ref().and_then(|x| x.as_sockaddr_in()) {
            return Err(format!("{} still has {}", a.interface_name, sin.ip()));
        }
    }
    let routes = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
    if let Some(r) = routes.lines().skip(1).find(|l| !l.trim().is_empty() && !l.starts_with("lo")) {
        return Err(format!(
            "a route is left: {}",
            r.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
        ));
    }
    Ok(())
}

fn internal(m: String) -> ErrorReply {
    ErrorReply::new(ErrorCode::Internal, m)
}

pub fn validate_hostname(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.split('.').all(|l| {
            !l.is_empty() && !l.starts_with('-') && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(format!("invalid hostname {name:?}"))
    }
}

fn validate_interface(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() < 16
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!("invalid interface name {name:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames_are_validated() {
        assert!(validate_hostname("ember-1.local").is_ok());
        for bad in ["", "-x", "a..b", "a b", "x;reboot", &"a".repeat(65)] {
            assert!(validate_hostname(bad).is_err(), "{bad}");
        }
    }
}
