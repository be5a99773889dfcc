//! nftables rulesets as text for `nft -f -`, built by pure functions so the
//! exact rules are tested without root.
//!
//! In Ember's namespace, one table `inet ember`:
//! - `forward` (policy drop): replies to VMs pass; a VM never reaches
//!   another; every packet from a TAP (new or not, so a policy change holds
//!   for live connections) jumps to its VM's chain through the `egress` map;
//!   a TAP with no entry (a VM without a network) reaches nothing.
//! - `input` (policy drop): a VM reaches its own resolver (DNS on its
//!   gateway address) and nothing else of the namespace.
//! - `postrouting`: VM traffic leaving through the uplink is masqueraded.
//! - Per VM `vm_<tap>` (egress) and `vm_<tap>_in` (input) chains, and sets of
//!   the addresses its resolver gave it for allowed names.
//!
//! In the namespace `ember serve` runs in, one small table masquerades the
//! link out of the uplink, lets it go nowhere else, and keeps the host's own
//! addresses out of reach.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use super::policy::{Policy, Rule};

/// The table in Ember's namespace.
pub const TABLE: &str = "ember";

/// A VM's network identity in the namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmNet {
    pub tap: String,
    /// The VM's address (a /30 of the subnet: gateway .1, VM .2).
    pub addr: Ipv4Addr,
    pub gateway: Ipv4Addr,
}

/// The base table of Ember's namespace. `subnet` holds every VM; `host`
/// are addresses no VM may reach (the serving namespace's own, the link);
/// `uplink` is the namespace's end of the link (none: VMs reach nothing
/// outside).
pub fn base_table(subnet: Ipv4Net, host: &[Ipv4Net], uplink: Option<&str>) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "table inet {TABLE} {{");
    let _ = writeln!(s, "\tmap egress {{ type ifname : verdict; }}");
    let _ = writeln!(s, "\tmap ingress {{ type ifname : verdict; }}");
    let _ = writeln!(s, "\tset host {{ type ipv4_addr; flags interval; }}");
    let _ = writeln!(s, "\tchain forward {{");
    let _ = writeln!(s, "\t\ttype filter hook forward priority filter; policy drop;");
    let _ = writeln!(s, "\t\toifname \"tap*\" ct state established,related accept");
    let _ = writeln!(s, "\t\tiifname \"tap*\" oifname \"tap*\" drop");
    let _ = writeln!(s, "\t\tiifname vmap @egress");
    let _ = writeln!(s, "\t}}");
    let _ = writeln!(s, "\tchain input {{");
    let _ = writeln!(s, "\t\ttype filter hook input priority filter; policy drop;");
    let _ = writeln!(s, "\t\tiif lo accept");
    let _ = writeln!(s, "\t\tiifname != \"tap*\" ct state established,related accept");
    let _ = writeln!(s, "\t\tiifname vmap @ingress");
    let _ = writeln!(s, "\t}}");
    if let Some(up) = uplink {
        let _ = writeln!(s, "\tchain postrouting {{");
        let _ = writeln!(s, "\t\ttype nat hook postrouting priority srcnat;");
        let _ = writeln!(s, "\t\toifname \"{up}\" ip saddr {subnet} masquerade");
        let _ = writeln!(s, "\t}}");
    }
    let _ = writeln!(s, "}}");
    if !host.is_empty() {
        let list: Vec<String> = host.iter().map(ToString::to_string).collect();
        let _ = writeln!(s, "add element inet {TABLE} host {{ {} }}", list.join(", "));
    }
    s
}

/// The chain name of a VM's egress rules.
fn chain(tap: &str) -> String {
    format!("vm_{tap}")
}

/// The set of addresses resolved for allowed names on `port` (any port:
/// `None`).
pub fn name_set(tap: &str, port: Option<u16>) -> String {
    match port {
        Some(p) => format!("vm_{tap}_names_{p}"),
        None => format!("vm_{tap}_names"),
    }
}

fn ports(port: Option<u16>) -> String {
    port.map(|p| format!(" meta l4proto {{ tcp, udp }} th dport {p}")).unwrap_or_default()
}

/// Everything of one VM's network: its chains, name sets and map entries,
/// for `policy`. Replacing a live policy is [`vm_teardown`] then this, in
/// one `nft -f` transaction: no packet sees a half-made rule set.
pub fn vm_rules(vm: &VmNet, subnet: Ipv4Net, policy: &Policy) -> String {
    let tap = &vm.tap;
    let c = chain(tap);
    let mut s = String::new();
    let _ = writeln!(s, "add chain inet {TABLE} {c}");
    let _ = writeln!(s, "add chain inet {TABLE} {c}_in");
    let mut name_ports = Vec::new();
    if let Policy::Egress { allow, .. } = policy {
        for r in allow {
            if let Rule::Name { port, .. } = r {
                if !name_ports.contains(port) {
                    name_ports.push(*port);
                }
            }
        }
    }
    for p in &name_ports {
        let _ = writeln!(s, "add set inet {TABLE} {} {{ type ipv4_addr; }}", name_set(tap, *p));
    }
    let rule = |s: &mut String, r: &str| {
        let _ = writeln!(s, "add rule inet {TABLE} {c} {r}");
    };
    // Whatever the policy: its own address only, DNS only to its resolver,
    // never the host, link-local (metadata), or the other VMs.
    rule(&mut s, &format!("ip saddr != {} drop", vm.addr));
    rule(&mut s, "meta l4proto { tcp, udp } th dport 53 drop");
    rule(&mut s, "ip daddr @host drop");
    rule(&mut s, "ip daddr 169.254.0.0/16 drop");
    rule(&mut s, &format!("ip daddr {subnet} drop"));
    match policy {
        Policy::None => rule(&mut s, "drop"),
        Policy::Open => rule(&mut s, "accept"),
        Policy::Egress { allow, deny } => {
            for r in deny {
                // Denied names never resolve (see the resolver); addresses
                // are dropped here.
                if let Rule::Net { net, port } = r {
                    rule(&mut s, &format!("ip daddr {net}{} drop", ports(*port)));
                }
            }
            if allow.is_empty() {
                rule(&mut s, "accept");
            } else {
                for r in allow {
                    if let Rule::Net { net, port } = r {
                        rule(&mut s, &format!("ip daddr {net}{} accept", ports(*port)));
                    }
                }
                for p in &name_ports {
                    rule(&mut s, &format!("ip daddr @{}{} accept", name_set(tap, *p), ports(*p)));
                }
                rule(&mut s, "drop");
            }
        }
    }
    let in_rule = |s: &mut String, r: &str| {
        let _ = writeln!(s, "add rule inet {TABLE} {c}_in {r}");
    };
    in_rule(&mut s, &format!("ip saddr != {} drop", vm.addr));
    if policy.connected() {
        in_rule(&mut s, &format!("ip daddr {} meta l4proto {{ tcp, udp }} th dport 53 accept", vm.gateway));
    }
    in_rule(&mut s, "drop");
    let _ = writeln!(s, "add element inet {TABLE} egress {{ \"{tap}\" : jump {c} }}");
    let _ = writeln!(s, "add element inet {TABLE} ingress {{ \"{tap}\" : jump {c}_in }}");
    s
}

/// Remove one VM's map entries, chains and sets (`sets`: the name sets
/// [`vm_rules`] made).
pub fn vm_teardown(tap: &str, sets: &[String]) -> String {
    let c = chain(tap);
    let mut s = String::new();
    let _ = writeln!(s, "delete element inet {TABLE} egress {{ \"{tap}\" }}");
    let _ = writeln!(s, "delete element inet {TABLE} ingress {{ \"{tap}\" }}");
    let _ = writeln!(s, "delete chain inet {TABLE} {c}");
    let _ = writeln!(s, "delete chain inet {TABLE} {c}_in");
    for set in sets {
        let _ = writeln!(s, "delete set inet {TABLE} {set}");
    }
    s
}

/// The name sets `policy` makes for `tap`.
pub fn name_sets(tap: &str, policy: &Policy) -> Vec<String> {
    let mut out = Vec::new();
    if let Policy::Egress { allow, .. } = policy {
        for r in allow {
            if let Rule::Name { port, .. } = r {
                let n = name_set(tap, *port);
                if !out.contains(&n) {
                    out.push(n);
                }
            }
        }
    }
    out
}

/// The table of the serving namespace: the link masqueraded out of the
/// uplink and nowhere else; nothing from the link reaches the host itself.
pub fn uplink_table(table: &str, veth: &str, link: Ipv4Net, uplink: &str) -> String {
    format!(
        "table ip {table} {{\n\
         \tchain postrouting {{\n\t\ttype nat hook postrouting priority srcnat;\n\
         \t\tip saddr {link} oifname \"{uplink}\" masquerade\n\t}}\n\
         \tchain forward {{\n\t\ttype filter hook forward priority filter; policy accept;\n\
         \t\tiifname \"{veth}\" oifname != \"{uplink}\" drop\n\t}}\n\
         \tchain input {{\n\t\ttype filter hook input priority filter; policy accept;\n\
         \t\tiifname \"{veth}\" ct state established,related accept\n\
         \t\tiifname \"{veth}\" drop\n\t}}\n\
         }}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::RawPolicy;

    fn vm() -> VmNet {
        VmNet {
            tap: "tap5".into(),
            addr: "198.18.0.22".parse().unwrap(),
            gateway: "198.18.0.21".parse().unwrap(),
        }
    }

    fn subnet() -> Ipv4Net {
        "198.18.0.0/16".parse().unwrap()
    }

    fn policy(j: &str) -> Policy {
        serde_json::from_str::<RawPolicy>(j).unwrap().check(16).unwrap()
    }

    #[test]
    fn the_base_table_drops_by_default_and_masquerades_the_uplink() {
        let t = base_table(subnet(), &["198.19.255.252/30".parse().unwrap()], Some("up0"));
        for line in [
            "type filter hook forward priority filter; policy drop;",
            "oifname \"tap*\" ct state established,related accept",
            "iifname \"tap*\" oifname \"tap*\" drop",
            "iifname vmap @egress",
            "type filter hook input priority filter; policy drop;",
            "oifname \"up0\" ip saddr 198.18.0.0/16 masquerade",
            "add element inet ember host { 198.19.255.252/30 }",
        ] {
            assert!(t.contains(line), "missing {line:?} in\n{t}");
        }
        assert!(!base_table(subnet(), &[], None).contains("masquerade"), "no uplink, no NAT");
    }

    #[test]
    fn an_allow_list_admits_its_addresses_ports_and_resolved_names_only() {
        let p = policy(
            r#"{"egress": {"allow": ["203.0.113.10:8080", "allowed.test", "api.test:443"], "deny": ["203.0.113.10/32:22"]}}"#,
        );
        let r = vm_rules(&vm(), subnet(), &p);
        let expected = "\
add chain inet ember vm_tap5
add chain inet ember vm_tap5_in
add set inet ember vm_tap5_names { type ipv4_addr; }
add set inet ember vm_tap5_names_443 { type ipv4_addr; }
add rule inet ember vm_tap5 ip saddr != 198.18.0.22 drop
add rule inet ember vm_tap5 meta l4proto { tcp, udp } th dport 53 drop
add rule inet ember vm_tap5 ip daddr @host drop
add rule inet ember vm_tap5 ip daddr 169.254.0.0/16 drop
add rule inet ember vm_tap5 ip daddr 198.18.0.0/16 drop
add rule inet ember vm_tap5 ip daddr 203.0.113.10/32 meta l4proto { tcp, udp } th dport 22 drop
add rule inet ember vm_tap5 ip daddr 203.0.113.10/32 meta l4proto { tcp, udp } th dport 8080 accept
add rule inet ember vm_tap5 ip daddr @vm_tap5_names accept
add rule inet ember vm_tap5 ip daddr @vm_tap5_names_443 meta l4proto { tcp, udp } th dport 443 accept
add rule inet ember vm_tap5 drop
add rule inet ember vm_tap5_in ip saddr != 198.18.0.22 drop
add rule inet ember vm_tap5_in ip daddr 198.18.0.21 meta l4proto { tcp, udp } th dport 53 accept
add rule inet ember vm_tap5_in drop
add element inet ember egress { \"tap5\" : jump vm_tap5 }
add element inet ember ingress { \"tap5\" : jump vm_tap5_in }
";
        assert_eq!(r, expected);
        assert_eq!(name_sets("tap5", &p), ["vm_tap5_names", "vm_tap5_names_443"]);
        let down = vm_teardown("tap5", &name_sets("tap5", &p));
        assert!(
            down.contains("delete chain inet ember vm_tap5_in")
                && down.contains("delete set inet ember vm_tap5_names_443")
        );
    }

    #[test]
    fn open_none_and_deny_only() {
        let open = vm_rules(&vm(), subnet(), &Policy::Open);
        assert!(open.ends_with("add rule inet ember vm_tap5 accept\nadd rule inet ember vm_tap5_in ip saddr != 198.18.0.22 drop\nadd rule inet ember vm_tap5_in ip daddr 198.18.0.21 meta l4proto { tcp, udp } th dport 53 accept\nadd rule inet ember vm_tap5_in drop\nadd element inet ember egress { \"tap5\" : jump vm_tap5 }\nadd element inet ember ingress { \"tap5\" : jump vm_tap5_in }\n"), "{open}");
        // The host, link-local and other VMs are dropped before the accept.
        let host_drop = open.find("@host drop").unwrap();
        assert!(host_drop < open.find("vm_tap5 accept").unwrap());
        let none = vm_rules(&vm(), subnet(), &Policy::None);
        assert!(
            none.contains("add rule inet ember vm_tap5 drop") && !none.contains("dport 53 accept"),
            "{none}"
        );
        let deny_only = vm_rules(&vm(), subnet(), &policy(r#"{"egress": {"deny": ["203.0.113.20"]}}"#));
        assert!(
            deny_only.contains("ip daddr 203.0.113.20/32 drop\nadd rule inet ember vm_tap5 accept"),
            "{deny_only}"
        );
    }

    #[test]
    fn the_uplink_table_keeps_the_host_out_of_reach() {
        let t = uplink_table("ember_uplink", "ember-ns", "198.19.255.252/30".parse().unwrap(), "eth0");
        assert!(t.contains("ip saddr 198.19.255.252/30 oifname \"eth0\" masquerade"));
        assert!(t.contains("iifname \"ember-ns\" oifname != \"eth0\" drop"));
        assert!(t.contains("iifname \"ember-ns\" drop"));
    }
}
