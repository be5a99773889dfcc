//! Networking on a real VM, in a namespace Ember makes (no uplink: nothing
//! leaves it, and the root namespace gets nothing): a guest whose root
//! changes its address is dropped from the first packet.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use ember_net::{NetConfig, Network, Policy};
use ember_testkit::ensure_eq;
use ember_vm::VmConfig;
use ember_vm::VmHost;
use ember_wire::{Configure, NetworkConfig};

use super::stdout;

/// A TCP connection to the VM's resolver (its gateway, port 53), from the
/// guest: "open" or "dropped".
fn probe(gateway: &str) -> String {
    format!(
        "python3 -c \"import socket\ntry:\n    socket.create_connection(('{gateway}', 53), timeout=2); print('open')\n\
         except OSError:\n    print('dropped')\""
    )
}

pub async fn a_spoofing_guest_gets_nothing_through(vm_cfg: VmConfig) -> anyhow::Result<()> {
    let state = tempfile::tempdir()?;
    let cfg = NetConfig {
        namespace: "embvmt".into(),
        subnet: "198.18.0.0/24".parse()?,
        uplink: None,
        dns_upstream: Vec::new(),
        state_dir: state.path().join("net"),
    };
    let runner = Arc::new(ember_storage::ProcessRunner { timeout: Duration::from_secs(30) });
    let net = Network::open(cfg, runner).await?;
    let host = VmHost::new(vm_cfg, false)?;
    host.attach_network(Arc::clone(&net));
    let checked = async {
        let vm = host.boot().await.context("booting a VM with a NIC")?;
        let checked = async {
            let tap = vm.tap().context("the VM has no TAP")?.tap().clone();
            let (guest, _) = net.connect(&tap, &Policy::Open).await?;
            vm.agent()
                .configure(Configure {
                    network: Some(NetworkConfig {
                        interface: "eth0".into(),
                        address: guest.address.clone(),
                        gateway: Some(guest.gateway.clone()),
                    }),
                    ..Default::default()
                })
                .await?;
            ensure_eq!(stdout(&vm, &probe(&guest.gateway)).await?, "open\n");
            // Root in the guest takes another address (the agent is root).
            vm.agent()
                .configure(Configure {
                    network: Some(NetworkConfig {
                        interface: "eth0".into(),
                        address: "198.18.0.9/24".into(),
                        gateway: Some(guest.gateway.clone()),
                    }),
                    ..Default::default()
                })
                .await?;
            ensure_eq!(stdout(&vm, &probe(&guest.gateway)).await?, "dropped\n");
            Ok::<_, anyhow::Error>(())
        }
        .await;
        vm.shutdown().await;
        checked
    }
    .await;
    host.close().await;
    net.close().await;
    let namespaces = std::process::Command::new("ip").args(["netns", "list"]).output()?;
    ensure!(!String::from_utf8_lossy(&namespaces.stdout).contains("embvmt"), "the namespace was left");
    checked
}
