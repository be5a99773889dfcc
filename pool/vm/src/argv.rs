//! Command lines for QEMU and vhost-device-vsock, built by pure functions
//! so tests can assert the exact argv.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use super::Accel;

/// Guest RAM backing. Hybrid vsock needs RAM that the vhost-user daemon can
/// map (a shared memfd).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryBacking {
    Private,
    /// Private RAM under the id `mem` (a VM resumed from one whose RAM was
    /// a backend object: the migration stream names RAM blocks by id).
    Ram,
    SharedMemfd,
    /// RAM in a file: `shared` for a template (its RAM stays in the file
    /// when it is saved), private copy-on-write for a VM restored from it.
    File {
        path: PathBuf,
        shared: bool,
    },
}

/// How the agent channel is wired into the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelDevice {
    /// virtio-serial port on a Unix socket that QEMU listens on.
    Serial { socket: PathBuf },
    /// vhost-user vsock device whose back end listens on `vhost_socket`.
    HybridVsock { vhost_socket: PathBuf },
    /// Kernel vhost-vsock with a host-unique guest CID.
    Vsock { cid: u32 },
}

/// Everything that shapes one QEMU command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuArgs {
    pub name: String,
    pub accel: Accel,
    pub memory_mb: u32,
    pub vcpus: u32,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
    /// Shared read-only root image (raw ext4).
    pub rootfs: PathBuf,
    /// This VM's writable scratch disk.
    pub scratch: PathBuf,
    /// `qcow2` (an overlay) or `raw` (a copy).
    pub scratch_format: &'static str,
    /// The bulk lane's file (read-only to the guest; uploads come this way).
    pub lane: Option<PathBuf>,
    pub console_log: PathBuf,
    pub qmp_socket: PathBuf,
    pub channel: ChannelDevice,
    pub memory: MemoryBacking,
    /// Attach a NIC on an empty hub: lets `configure` be tested without any
    /// path for traffic to leave the VM.
    pub isolated_nic: bool,
    /// Attach a NIC on this TAP (in the namespace QEMU runs in).
    pub tap: Option<String>,
    /// Drop QEMU to this user once it has opened its files (`-runas`).
    pub run_as: Option<String>,
    /// Start paused, waiting for `migrate-incoming` (restore from a template).
    pub incoming: bool,
}

fn push(v: &mut Vec<OsString>, items: &[&str]) {
    v.extend(items.iter().map(OsString::from));
}

/// The program and arguments that run `program argv` inside network
/// namespace `ns` (`ip netns exec`), or as they are without one.
pub fn in_namespace(ns: Option<&str>, program: &Path, argv: Vec<OsString>) -> (PathBuf, Vec<OsString>) {
    match ns {
        None => (program.to_path_buf(), argv),
        Some(ns) => {
            let mut v: Vec<OsString> = vec!["netns".into(), "exec".into(), ns.into(), program.into()];
            v.extend(argv);
            (PathBuf::from("ip"), v)
        }
    }
}

/// The guest kernel command line.
///
/// `tsc_khz`: under TCG the guest's TSC is the host's, but the guest cannot
/// calibrate it against the emulated PIT when the host is busy (several VMs
/// booting at once); it then marks the TSC unstable and can hang for good.
/// Giving it the frequency skips that calibration.
pub fn kernel_cmdline(init_full: bool, tsc_khz: Option<u64>, user_namespaces: bool) -> String {
    let init = if init_full { "full" } else { "fast" };
    // panic=-1 + QEMU's -no-reboot: a guest that panics makes QEMU exit.
    let mut c = format!("console=ttyS0 quiet loglevel=3 panic=-1 reboot=t ember.init={init}");
    // The agent turns unprivileged user namespaces off unless this is set.
    if user_namespaces {
        c.push_str(" ember.userns=on");
    }
    if let Some(khz) = tsc_khz {
        c.push_str(&format!(" tsc_early_khz={khz}"));
    }
    c
}

/// `qemu-img rebase -u`: point `overlay` at `backing` without copying
/// (the new backing holds the same bytes as the old one).
pub fn qemu_img_repoint_args(overlay: &Path, backing: &Path, backing_format: &str) -> Vec<String> {
    qemu_img_qcow2_args(&["rebase", "-u"], backing, backing_format, overlay)
}

/// `qemu-img convert` of a raw disk into a qcow2 file of its own (holes
/// stay holes). `-U`: the stopped VM's QEMU may still hold the raw file.
pub fn qemu_img_raw_to_qcow2_args(raw: &Path, qcow2: &Path) -> Vec<String> {
    let mut v: Vec<String> = ["convert", "-U", "-f", "raw", "-O", "qcow2"].map(String::from).into();
    v.push(raw.to_string_lossy().into_owned());
    v.push(qcow2.to_string_lossy().into_owned());
    v
}

/// `qemu-img create` of a VM's writable qcow2 layer over `backing`.
pub fn qemu_img_overlay_args(backing: &Path, backing_format: &str, overlay: &Path) -> Vec<String> {
    qemu_img_qcow2_args(&["create", "-q"], backing, backing_format, overlay)
}

/// `qemu-img` with `command`, on qcow2 `overlay` backed by `backing`.
fn qemu_img_qcow2_args(
    command: &[&str],
    backing: &Path,
    backing_format: &str,
    overlay: &Path,
) -> Vec<String> {
    let mut v: Vec<String> = command.iter().map(|s| s.to_string()).collect();
    v.extend(
        ["-f", "qcow2", "-F", backing_format, "-b", &backing.to_string_lossy(), &overlay.to_string_lossy()]
            .map(String::from),
    );
    v
}

pub fn qemu_argv(a: &QemuArgs) -> Vec<OsString> {
    let mut v: Vec<OsString> = Vec::new();
    let mem = format!("{}M", a.memory_mb);
    // Keep the PIT: without it the TCG guest cannot calibrate its TSC and hangs.
    let mut machine = String::from("microvm,x-option-roms=off,rtc=on");
    match &a.memory {
        MemoryBacking::Private => {}
        MemoryBacking::Ram => {
            push(&mut v, &["-object", &format!("memory-backend-ram,id=mem,size={mem}")]);
            machine.push_str(",memory-backend=mem");
        }
        MemoryBacking::SharedMemfd => {
            push(&mut v, &["-object", &format!("memory-backend-memfd,id=mem,size={mem},share=on")]);
            machine.push_str(",memory-backend=mem");
        }
        MemoryBacking::File { path, shared } => {
            let share = if *shared { "on" } else { "off" };
            push(
                &mut v,
                &[
                    "-object",
                    &format!(
                        "memory-backend-file,id=mem,size={mem},mem-path={},share={share}",
                        path.display()
                    ),
                ],
            );
            machine.push_str(",memory-backend=mem");
        }
    }
    push(&mut v, &["-name", &a.name, "-M", &machine]);
    match a.accel {
        Accel::Kvm => push(&mut v, &["-accel", "kvm", "-cpu", "host"]),
        Accel::Tcg => push(&mut v, &["-accel", "tcg", "-cpu", "max"]),
    }
    push(&mut v, &["-m", &mem, "-smp", &a.vcpus.to_string()]);
    push(&mut v, &["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]);
    // seccomp. `-runas` needs setuid at start-up, hence elevateprivileges=allow
    // with it; once QEMU is that user it has no capabilities to regain root.
    let elevate = if a.run_as.is_some() { "allow" } else { "deny" };
    push(
        &mut v,
        &[
            "-sandbox",
            &format!("on,obsolete=deny,elevateprivileges={elevate},spawn=deny,resourcecontrol=deny"),
        ],
    );
    if let Some(user) = &a.run_as {
        push(&mut v, &["-runas", user]);
    }
    v.push("-kernel".into());
    v.push(a.kernel.clone().into());
    v.push("-initrd".into());
    v.push(a.initrd.clone().into());
    push(&mut v, &["-append", &a.cmdline]);
    push(
        &mut v,
        &["-chardev", &format!("file,id=con,path={}", a.console_log.display()), "-serial", "chardev:con"],
    );
    push(
        &mut v,
        &[
            "-drive",
            &format!("id=root,file={},format=raw,if=none,readonly=on", a.rootfs.display()),
            "-device",
            "virtio-blk-device,drive=root,serial=ember-root",
        ],
    );
    push(
        &mut v,
        &[
            "-drive",
            &format!(
                "id=scratch,file={},format={},if=none,discard=unmap",
                a.scratch.display(),
                a.scratch_format
            ),
            "-device",
            "virtio-blk-device,drive=scratch,serial=ember-scratch",
        ],
    );
    if let Some(lane) = &a.lane {
        push(
            &mut v,
            &[
                "-drive",
                &format!("id=lane,file={},format=raw,if=none,readonly=on", lane.display()),
                "-device",
                &format!("virtio-blk-device,drive=lane,serial={}", ember_wire::LANE_SERIAL),
            ],
        );
    }
    match &a.channel {
        ChannelDevice::Serial { socket } => push(
            &mut v,
            &[
                "-device",
                "virtio-serial-device,max_ports=2",
                "-chardev",
                &format!("socket,id=agent,path={},server=on,wait=off", socket.display()),
                "-device",
                &format!("virtserialport,chardev=agent,name={}", ember_wire::SERIAL_PORT_NAME),
            ],
        ),
        ChannelDevice::HybridVsock { vhost_socket } => push(
            &mut v,
            &[
                "-chardev",
                &format!("socket,id=vhost,path={}", vhost_socket.display()),
                "-device",
                "vhost-user-vsock-device,chardev=vhost",
            ],
        ),
        ChannelDevice::Vsock { cid } => {
            push(&mut v, &["-device", &format!("vhost-vsock-device,guest-cid={cid}")])
        }
    }
    if let Some(tap) = &a.tap {
        push(
            &mut v,
            &[
                "-netdev",
                &format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
                "-device",
                "virtio-net-device,netdev=n0",
            ],
        );
    } else if a.isolated_nic {
        push(&mut v, &["-netdev", "hubport,id=n0,hubid=0", "-device", "virtio-net-device,netdev=n0"]);
    }
    push(&mut v, &["-qmp", &format!("unix:{},server=on,wait=off", a.qmp_socket.display())]);
    if a.incoming {
        push(&mut v, &["-incoming", "defer"]);
    }
    v
}

/// vhost-device-vsock serving one VM: QEMU connects to `vhost_socket`, the
/// host reaches the guest through `uds`.
pub fn vhost_vsock_argv(
    guest_cid: u32,
    vhost_socket: &std::path::Path,
    uds: &std::path::Path,
) -> Vec<OsString> {
    vec![
        "--guest-cid".into(),
        guest_cid.to_string().into(),
        "--socket".into(),
        vhost_socket.into(),
        "--uds-path".into(),
        uds.into(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(channel: ChannelDevice, memory: MemoryBacking) -> QemuArgs {
        QemuArgs {
            name: "ember-vm1".into(),
            accel: Accel::Tcg,
            memory_mb: 256,
            vcpus: 1,
            kernel: "/img/vmlinuz".into(),
            initrd: "/img/initrd.img".into(),
            cmdline: kernel_cmdline(false, None, false),
            rootfs: "/img/rootfs.ext4".into(),
            scratch: "/run/vm1/scratch.qcow2".into(),
            scratch_format: "qcow2",
            lane: Some("/run/vm1/lane.raw".into()),
            console_log: "/run/vm1/console.log".into(),
            qmp_socket: "/run/vm1/qmp.sock".into(),
            channel,
            memory,
            isolated_nic: false,
            tap: None,
            run_as: None,
            incoming: false,
        }
    }

    fn joined(v: &[OsString]) -> String {
        v.iter().map(|s| s.to_string_lossy().into_owned()).collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn serial_vm_argv_is_exact() {
        let v = qemu_argv(&args(
            ChannelDevice::Serial { socket: "/run/vm1/agent.sock".into() },
            MemoryBacking::Private,
        ));
        assert_eq!(
            joined(&v),
            "-name ember-vm1 -M microvm,x-option-roms=off,rtc=on -accel tcg -cpu max \
             -m 256M -smp 1 -nodefaults -no-user-config -nographic -no-reboot \
             -sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny \
             -kernel /img/vmlinuz -initrd /img/initrd.img \
             -append console=ttyS0 quiet loglevel=3 panic=-1 reboot=t ember.init=fast \
             -chardev file,id=con,path=/run/vm1/console.log -serial chardev:con \
             -drive id=root,file=/img/rootfs.ext4,format=raw,if=none,readonly=on \
             -device virtio-blk-device,drive=root,serial=ember-root \
             -drive id=scratch,file=/run/vm1/scratch.qcow2,format=qcow2,if=none,discard=unmap \
             -device virtio-blk-device,drive=scratch,serial=ember-scratch \
             -drive id=lane,file=/run/vm1/lane.raw,format=raw,if=none,readonly=on \
             -device virtio-blk-device,drive=lane,serial=ember-lane \
             -device virtio-serial-device,max_ports=2 \
             -chardev socket,id=agent,path=/run/vm1/agent.sock,server=on,wait=off \
             -device virtserialport,chardev=agent,name=org.ember.agent \
             -qmp unix:/run/vm1/qmp.sock,server=on,wait=off"
        );
    }

    #[test]
    fn hybrid_vsock_shares_guest_memory_and_has_no_network() {
        let v = joined(&qemu_argv(&args(
            ChannelDevice::HybridVsock { vhost_socket: "/run/vm1/vhost.sock".into() },
            MemoryBacking::SharedMemfd,
        )));
        assert!(v.starts_with(
            "-object memory-backend-memfd,id=mem,size=256M,share=on -name ember-vm1 -M microvm,"
        ));
        assert!(v.contains(",memory-backend=mem "));
        assert!(v.contains(
            "-chardev socket,id=vhost,path=/run/vm1/vhost.sock -device vhost-user-vsock-device,chardev=vhost"
        ));
        assert!(!v.contains("netdev") && !v.contains("virtio-net"), "no NIC unless asked for");
    }

    #[test]
    fn a_tap_nic_and_the_namespace_prefix() {
        let mut a =
            args(ChannelDevice::Serial { socket: "/run/vm1/agent.sock".into() }, MemoryBacking::Private);
        a.tap = Some("tap7".into());
        let v = joined(&qemu_argv(&a));
        assert!(v.contains(
            "-netdev tap,id=n0,ifname=tap7,script=no,downscript=no -device virtio-net-device,netdev=n0"
        ));
        let (program, argv) =
            in_namespace(Some("ember"), Path::new("/usr/bin/qemu-system-x86_64"), qemu_argv(&a));
        assert_eq!(program, Path::new("ip"));
        assert_eq!(joined(&argv[..4]), "netns exec ember /usr/bin/qemu-system-x86_64");
        let (program, argv) = in_namespace(None, Path::new("/q"), vec!["-x".into()]);
        assert_eq!((program, argv.len()), (PathBuf::from("/q"), 1));
    }

    #[test]
    fn kernel_vsock_kvm_and_isolated_nic() {
        let mut a = args(ChannelDevice::Vsock { cid: 7 }, MemoryBacking::Private);
        a.accel = Accel::Kvm;
        a.isolated_nic = true;
        a.run_as = Some("nobody".into());
        let v = joined(&qemu_argv(&a));
        assert!(v.contains("-sandbox on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny -runas nobody "));
        assert!(v.contains("-accel kvm -cpu host"));
        assert!(v.contains("-device vhost-vsock-device,guest-cid=7"));
        assert!(v.contains("-netdev hubport,id=n0,hubid=0 -device virtio-net-device,netdev=n0"));
        assert!(kernel_cmdline(true, None, false).ends_with("ember.init=full"));
        assert!(
            kernel_cmdline(false, Some(2596100), false).ends_with("ember.init=fast tsc_early_khz=2596100")
        );
        assert!(kernel_cmdline(false, None, true).ends_with("ember.init=fast ember.userns=on"));
        assert_eq!(
            qemu_img_overlay_args(Path::new("/c/t.qcow2"), "qcow2", Path::new("/r/vm/scratch.qcow2"))
                .join(" "),
            "create -q -f qcow2 -F qcow2 -b /c/t.qcow2 /r/vm/scratch.qcow2"
        );
        assert_eq!(
            qemu_img_repoint_args(Path::new("/p/disk.qcow2"), Path::new("/p/base.qcow2"), "qcow2").join(" "),
            "rebase -u -f qcow2 -F qcow2 -b /p/base.qcow2 /p/disk.qcow2"
        );
    }

    #[test]
    fn template_and_restored_vm_memory() {
        let mut a = args(
            ChannelDevice::Serial { socket: "/s".into() },
            MemoryBacking::File { path: "/t/mem".into(), shared: true },
        );
        let v = joined(&qemu_argv(&a));
        assert!(v.starts_with("-object memory-backend-file,id=mem,size=256M,mem-path=/t/mem,share=on -name"));
        assert!(!v.contains("-incoming"));
        a.memory = MemoryBacking::File { path: "/t/mem".into(), shared: false };
        a.incoming = true;
        let v = joined(&qemu_argv(&a));
        assert!(v.contains("mem-path=/t/mem,share=off"));
        assert!(v.ends_with("-incoming defer"));
    }

    #[test]
    fn vhost_device_argv() {
        let v = vhost_vsock_argv(3, "/d/vhost.sock".as_ref(), "/d/vsock.sock".as_ref());
        assert_eq!(joined(&v), "--guest-cid 3 --socket /d/vhost.sock --uds-path /d/vsock.sock");
    }
}
