//! VM tests: real QEMU microVMs, the real guest agent, real disks.
//! Needs the images from `make images` (EMBER_IMAGES); `make test` builds
//! them first. Run one case with `cargo test -p ember-pool --test vm -- NAME`.

#![allow(clippy::unwrap_used)] // test fixtures

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use ember_testkit::{ensure_eq, processes_mentioning, CaseFuture, Report};

mod agent;
mod images;
mod lifecycle;
mod network;
mod pause;
mod pools;
mod zfs;
use agent::*;
use ember_channel::ExecOutput;
use ember_channel::{AgentError, ChannelChoice, ExecEvent};
use ember_image::ImageSet;
use ember_vm::{wait_until, InitMode, VmConfig};
use ember_vm::{Vm, VmHost};
use ember_wire::{Command, Configure, ErrorCode, ExecRequest, FileSpec, NetworkConfig, MAX_FRAME_LEN};
use lifecycle::*;
use pools::*;
use zfs::*;

fn images_dir() -> PathBuf {
    std::env::var_os("EMBER_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/images"))
}

fn sh(cmd: &str) -> ExecRequest {
    let mut r = ExecRequest::new(Command::Shell(cmd.into()));
    r.timeout_ms = 20_000;
    r
}

async fn run(vm: &Vm, cmd: &str) -> anyhow::Result<ExecOutput> {
    vm.agent().run(sh(cmd)).await.with_context(|| format!("running {cmd:?}"))
}

async fn stdout(vm: &Vm, cmd: &str) -> anyhow::Result<String> {
    let out = run(vm, cmd).await?;
    ensure!(
        out.status.code == Some(0),
        "{cmd:?} failed: {:?}, stderr {:?}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// Number of processes named `name` in the guest.
async fn count_procs(vm: &Vm, name: &str) -> anyhow::Result<usize> {
    let s = stdout(vm, &format!("cat /proc/[0-9]*/comm 2>/dev/null | grep -cx {name} || true")).await?;
    Ok(s.trim().parse()?)
}

// ---------------------------------------------------------------- cases

type VmCase = for<'a> fn(&'a Vm) -> CaseFuture<'a>;

macro_rules! vm_cases {
    ($($name:ident),* $(,)?) => { &[$((stringify!($name), |vm| Box::pin($name(vm)))),*] };
}

const VM_CASES: &[(&str, VmCase)] = vm_cases![
    echo_and_exit_codes,
    stderr_is_separate,
    stdin_is_delivered,
    env_and_defaults,
    non_utf8_output_survives,
    python3_runs,
    timeout_kills_the_process_tree,
    daemonized_processes_die_with_the_command,
    orphans_are_reaped,
    output_cap,
    write_files_and_read_back,
    user_is_unprivileged_and_root_is_read_only,
    user_namespaces_are_off,
    localhost_reaches_a_server_in_the_vm,
    pids_limit_contains_a_fork_bomb,
    requests_run_concurrently,
    cancel_kills_the_command,
    malformed_frames_are_survived,
    reset_leaves_nothing_behind,
    python_is_forked_warm_and_confined,
    scrub_leaves_nothing_behind,
];

/// A pool of 256 MiB VMs over `host`, reset by `mode`, replenished as the
/// channel allows.
pub(crate) fn start_pool(
    host: &Arc<VmHost>,
    mode: ember_pool::config::ResetMode,
    cfg: ember_pool::config::PoolConfig,
) -> anyhow::Result<VmPool> {
    use ember_pool::config::ReplenishMode;
    let backend = ember_pool::pool::VmBackend::new(Arc::clone(host), mode, ReplenishMode::Auto)
        .map_err(anyhow::Error::msg)?;
    Ok(ember_pool::pool::Pool::start(backend, cfg, 256))
}

async fn suite(report: &mut Report) -> anyhow::Result<()> {
    let images = ImageSet::for_image(&images_dir(), "default").map_err(anyhow::Error::msg)?;
    // A fixed path, so a run that was killed is reaped by the next one.
    let state_dir = std::env::temp_dir().join("ember-vmtest-state");
    let state_path = state_dir.to_string_lossy().into_owned();
    let config = |channel, init_mode, nic| {
        let mut c = VmConfig::with_images(images.clone());
        c.state_dir = state_dir.clone();
        c.channel = channel;
        c.init_mode = init_mode;
        c.isolated_nic = nic;
        c
    };
    {
        let serial = VmHost::new(config(ChannelChoice::Serial, InitMode::Fast, true), false)?;
        let hybrid = VmHost::new(config(ChannelChoice::HybridVsock, InitMode::Fast, false), false)?;
        let full = VmHost::new(config(ChannelChoice::Serial, InitMode::Full, false), false)?;
        let full_hybrid = VmHost::new(config(ChannelChoice::HybridVsock, InitMode::Full, false), false)?;
        // Probe acceleration once before booting in parallel.
        let accel = serial.accel().await;
        println!("acceleration: {}", accel.name());
        // The two shared VMs, booted only for the cases that use them.
        let shared_vm_cases = VM_CASES
            .iter()
            .flat_map(|(name, _)| [format!("{name} [serial]"), format!("{name} [hybrid-vsock]")])
            .chain(
                [
                    "parallel_boots [serial]",
                    "configure_in_one_round_trip [serial]",
                    "image_default_has_its_tools",
                ]
                .map(String::from),
            );
        if report.wants_any(shared_vm_cases) {
            // Two serial VMs booted in parallel on purpose: a loaded host once
            // made TCG guests hang in TSC calibration (see kernel_cmdline).
            let (s, spare) = tokio::join!(serial.boot(), serial.boot());
            let s = s.context("booting the serial VM")?;
            report
                .run("parallel_boots [serial]", Box::pin(async { spare.map(|_| ()).map_err(Into::into) }))
                .await;
            let h = hybrid.boot().await.context("booting the hybrid-vsock VM")?;
            let vms = [s, h];
            for vm in &vms {
                println!("booted {} ({}) in {} ms", vm.id(), vm.channel(), vm.timings().total_ms);
                for (name, case) in VM_CASES {
                    report.run(&format!("{name} [{}]", vm.channel()), case(vm)).await;
                }
            }
            report
                .run("configure_in_one_round_trip [serial]", Box::pin(configure_in_one_round_trip(&vms[0])))
                .await;
            report
                .run("image_default_has_its_tools", Box::pin(images::default_image_has_its_tools(&vms[0])))
                .await;
            for vm in vms {
                vm.shutdown().await;
            }
        }
        let userns = {
            let mut c = config(ChannelChoice::Serial, InitMode::Fast, false);
            c.user_namespaces = true;
            VmHost::new(c, false)?
        };
        let allowed = async {
            let vm = userns.boot().await.context("booting a VM with user namespaces on")?;
            let checked = user_namespaces_are(&vm, true).await;
            vm.shutdown().await;
            checked
        };
        report.run("user_namespaces_when_allowed [serial]", Box::pin(allowed)).await;
        report.run("crash_is_detected [serial]", Box::pin(crash_is_detected(&serial))).await;
        report.run("crash_is_detected [hybrid-vsock]", Box::pin(crash_is_detected(&hybrid))).await;
        report
            .run(
                "agent_shutdown_powers_off [fast init]",
                Box::pin(agent_shutdown_powers_off(&serial, "ember-agent")),
            )
            .await;
        report
            .run(
                "agent_shutdown_powers_off [full init]",
                Box::pin(agent_shutdown_powers_off(&full, "systemd")),
            )
            .await;
        report
            .run(
                "agent_shutdown_powers_off [full init, hybrid-vsock]",
                Box::pin(agent_shutdown_powers_off(&full_hybrid, "systemd")),
            )
            .await;

        report.run("template_restore [serial]", Box::pin(template_restore(&serial))).await;
        report
            .run(
                "pause_and_resume_carry_processes_files_and_the_clock [serial]",
                Box::pin(pause::pause_and_resume_carry_processes_files_and_the_clock(&serial)),
            )
            .await;
        report
            .run(
                "pause_a_fork_starts_where_its_parent_was_and_diverges [serial]",
                Box::pin(pause::a_fork_starts_where_its_parent_was_and_diverges(&serial)),
            )
            .await;
        report
            .run(
                "network_a_guest_that_changes_its_address_gets_nothing_through",
                Box::pin(network::a_spoofing_guest_gets_nothing_through(config(
                    ChannelChoice::Serial,
                    InitMode::Fast,
                    false,
                ))),
            )
            .await;

        // A second image: its tools, the adversarial reset test on its
        // pool, and two images' pools side by side under one budget (one
        // template each, shared by these cases).
        let image_pools = [
            "image_python_data_has_numpy_pandas_and_plots",
            "pool_reset_leaves_nothing_behind [image python-data]",
            "images_two_pools_keep_apart_under_one_budget",
        ];
        if report.wants_any(image_pools) {
            let data_host = VmHost::new(images::config_for("python-data", &state_dir)?, false)?;
            let budget = Arc::new(ember_pool::pool::MemoryBudget::new(2048));
            let image_pool = |host: &Arc<VmHost>| -> anyhow::Result<VmPool> {
                use ember_pool::config::{PoolConfig, ReplenishMode, ResetMode};
                let cfg = PoolConfig {
                    min_size: 1,
                    max_size: 2,
                    target_free: 0,
                    claim_timeout: Duration::from_secs(120),
                    drain_timeout: Duration::from_secs(5),
                    max_host_cpu: None,
                    ..PoolConfig::default()
                };
                let backend =
                    ember_pool::pool::VmBackend::new(Arc::clone(host), ResetMode::Auto, ReplenishMode::Auto)
                        .map_err(anyhow::Error::msg)?;
                let mem = host.config().memory_mb;
                Ok(ember_pool::pool::Pool::start_sharing(backend, cfg, mem, Arc::clone(&budget)))
            };
            let (default_pool, data_pool) = (image_pool(&serial)?, image_pool(&data_host)?);
            let data_vm = async {
                let lease = data_pool.claim().await?;
                let checked = images::python_data_has_numpy_pandas_and_plots(&lease).await;
                lease.release().await;
                checked
            };
            report.run("image_python_data_has_numpy_pandas_and_plots", Box::pin(data_vm)).await;
            report
                .run(
                    "pool_reset_leaves_nothing_behind [image python-data]",
                    Box::pin(pool_reset_leaves_nothing_behind(&data_pool)),
                )
                .await;
            report
                .run(
                    "images_two_pools_keep_apart_under_one_budget",
                    Box::pin(images::two_images_keep_their_pools_apart(&default_pool, &data_pool, &budget)),
                )
                .await;
            data_host.close().await;
        }
        report
            .run(
                "image_build_with_a_missing_package_names_it",
                Box::pin(images::a_recipe_with_a_missing_package_fails_naming_it()),
            )
            .await;
        report
            .run("image_import_of_a_real_root_boots", Box::pin(images::an_imported_root_boots(&state_dir)))
            .await;
        report
            .run(
                "image_busybox_only_root_serves_its_files",
                Box::pin(images::a_busybox_only_root_serves_its_files(&state_dir)),
            )
            .await;
        report
            .run(
                "image_writable_root_is_reset_with_the_vm",
                Box::pin(images::a_writable_root_is_reset_with_the_vm(&state_dir)),
            )
            .await;

        let pool_cases = [
            "pool_reset_leaves_nothing_behind [snapshot]",
            "pool_reset_leaves_nothing_behind [scrub, function]",
            "pool_snapshot_resets_reseed_the_guest_rng",
            "pool_a_scrubbed_vm_serves_only_its_function",
            "pool_sessions_keep_state_and_are_isolated",
            "pool_crashed_claimed_vm_is_replaced",
            "pool_destroy_mode_and_exhaustion [hybrid-vsock]",
            "pool_reset_leaves_nothing_behind [destroy]",
            "pool_reset_leaves_nothing_behind [rollback]",
        ];
        if report.wants_any(pool_cases) {
            // Rollback: the same adversarial test, with the writable layer
            // rolled back under a running VM instead of a memory snapshot.
            let mut raw = config(ChannelChoice::HybridVsock, InitMode::Fast, false);
            raw.scratch = ember_vm::ScratchKind::RawCopy;
            let raw_host = VmHost::new(raw, false)?;

            // The warm pool over real VMs.
            use ember_pool::config::{PoolConfig, ResetMode};
            let snap_cfg = PoolConfig {
                min_size: 1,
                max_size: 3,
                target_free: 0,
                max_sessions: 2,
                claim_timeout: Duration::from_secs(60),
                ..PoolConfig::default()
            };
            let snap = start_pool(&serial, ResetMode::Auto, snap_cfg)?;
            ensure_eq!(snap.backend().mode(), ResetMode::Snapshot);
            ensure!(snap.backend().restores(), "serial pools restore from a template");
            report
                .run(
                    "pool_reset_leaves_nothing_behind [snapshot]",
                    Box::pin(pool_reset_leaves_nothing_behind(&snap)),
                )
                .await;
            report
                .run(
                    "pool_reset_leaves_nothing_behind [scrub, function]",
                    Box::pin(pool_scrub_leaves_nothing_behind(&snap)),
                )
                .await;
            report
                .run(
                    "pool_snapshot_resets_reseed_the_guest_rng",
                    Box::pin(pool_snapshot_resets_reseed_the_guest_rng(&snap)),
                )
                .await;
            report
                .run(
                    "pool_a_scrubbed_vm_serves_only_its_function",
                    Box::pin(pool_a_scrubbed_vm_serves_only_its_function(&snap)),
                )
                .await;
            report
                .run(
                    "pool_sessions_keep_state_and_are_isolated",
                    Box::pin(pool_sessions_keep_state_and_are_isolated(&snap)),
                )
                .await;
            report
                .run(
                    "pool_crashed_claimed_vm_is_replaced",
                    Box::pin(pool_crashed_claimed_vm_is_replaced(&snap)),
                )
                .await;
            let destroy_cfg = PoolConfig {
                min_size: 1,
                max_size: 1,
                target_free: 0,
                claim_timeout: Duration::from_secs(1),
                ..PoolConfig::default()
            };
            let destroy = start_pool(&hybrid, ResetMode::Auto, destroy_cfg)?;
            ensure_eq!(destroy.backend().mode(), ResetMode::Destroy);
            ensure!(!destroy.backend().restores(), "hybrid-vsock cannot restore");
            report
                .run(
                    "pool_destroy_mode_and_exhaustion [hybrid-vsock]",
                    Box::pin(pool_destroy_mode_and_exhaustion(&destroy)),
                )
                .await;
            report
                .run(
                    "pool_reset_leaves_nothing_behind [destroy]",
                    Box::pin(pool_reset_leaves_nothing_behind(&destroy)),
                )
                .await;
            let rollback_cfg = PoolConfig {
                min_size: 1,
                max_size: 1,
                target_free: 0,
                claim_timeout: Duration::from_secs(60),
                ..PoolConfig::default()
            };
            let rollback = start_pool(&raw_host, ResetMode::Rollback, rollback_cfg)?;
            report
                .run(
                    "pool_reset_leaves_nothing_behind [rollback]",
                    Box::pin(pool_reset_leaves_nothing_behind(&rollback)),
                )
                .await;
            snap.shutdown().await;
            destroy.shutdown().await;
            rollback.shutdown().await;
        }

        // ZFS: the rollback pool again, on clones of a real (zfs-fuse)
        // dataset, in its own throw-away zpool.
        let zfs_cases = [
            "zfs_orphans_are_reaped",
            "zfs_a_vm_pauses_and_forks_off_its_clone",
            "zfs_sessions_fork_and_leave_nothing",
            "zfs_a_clone_per_vm_kept_through_claims",
            "pool_reset_leaves_nothing_behind [zfs rollback]",
            "zfs_resets_stay_bounded_after_plant_and_probes",
            "pool_crashed_claimed_vm_is_replaced [zfs]",
            "zfs_shutdown_leaves_no_clone",
        ];
        if report.wants_any(zfs_cases) {
            use ember_pool::config::{PoolConfig, ResetMode};
            let parent = zfs_test_pool("up").context("setting up the test zpool")?;
            let mut zc = config(ChannelChoice::HybridVsock, InitMode::Fast, false);
            zc.scratch = ember_vm::ScratchKind::RawCopy;
            zc.storage = ember_storage::StorageConfig::Zfs(ember_storage::ZfsConfig {
                parent: parent.clone(),
                mode: ember_storage::ZfsMode::Dataset,
            });
            report.run("zfs_orphans_are_reaped", Box::pin(zfs_orphans_are_reaped(zc.clone(), &parent))).await;
            // Pause and fork need a channel that survives a migration: serial.
            let zfs_serial = VmHost::new(VmConfig { channel: ChannelChoice::Serial, ..zc.clone() }, false)?;
            report
                .run(
                    "zfs_a_vm_pauses_and_forks_off_its_clone",
                    Box::pin(pause::zfs_a_vm_pauses_and_forks_off_its_clone(&zfs_serial, &parent)),
                )
                .await;
            report
                .run(
                    "zfs_sessions_fork_and_leave_nothing",
                    Box::pin(pause::zfs_sessions_fork_and_leave_nothing(&zfs_serial, &parent)),
                )
                .await;
            zfs_serial.close().await;
            drop(zfs_serial);
            let zfs_host = VmHost::new(zc, false)?;
            zfs_host.open_storage().await?;
            let zfs_cfg = PoolConfig {
                min_size: 1,
                max_size: 2,
                target_free: 0,
                claim_timeout: Duration::from_secs(60),
                ..PoolConfig::default()
            };
            let zfs_pool = start_pool(&zfs_host, ResetMode::Auto, zfs_cfg)?;
            ensure_eq!(zfs_pool.backend().mode(), ResetMode::Rollback);
            report
                .run(
                    "zfs_a_clone_per_vm_kept_through_claims",
                    Box::pin(zfs_a_clone_per_vm(&zfs_pool, &parent)),
                )
                .await;
            report
                .run(
                    "pool_reset_leaves_nothing_behind [zfs rollback]",
                    Box::pin(pool_reset_leaves_nothing_behind(&zfs_pool)),
                )
                .await;
            report
                .run(
                    "zfs_resets_stay_bounded_after_plant_and_probes",
                    Box::pin(zfs_resets_stay_bounded_after_plant_and_probes(&zfs_pool)),
                )
                .await;
            report
                .run(
                    "pool_crashed_claimed_vm_is_replaced [zfs]",
                    Box::pin(pool_crashed_claimed_vm_is_replaced(&zfs_pool)),
                )
                .await;
            zfs_pool.shutdown().await;
            zfs_host.close().await;
            let none_left = async {
                let left = warm_clones(&parent)?;
                ensure!(left.is_empty(), "clones left after shutdown: {left:?}");
                Ok(())
            };
            report.run("zfs_shutdown_leaves_no_clone", Box::pin(none_left)).await;
            drop(zfs_pool);
            drop(zfs_host);
            zfs_test_pool("down").context("destroying the test zpool")?;
        }
    }
    // Every host and VM is gone: nothing may be left.
    let leak = async {
        let procs = processes_mentioning(&state_path);
        ensure!(procs.is_empty(), "processes left behind: {procs:#?}");
        let owners: Vec<_> =
            std::fs::read_dir(state_dir.join("owners"))?.flatten().map(|e| e.path()).collect();
        ensure!(owners.is_empty(), "state left behind: {owners:?}");
        Ok(())
    };
    report.run("nothing_is_left_behind", Box::pin(leak)).await;
    Ok(())
}

fn main() {
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("EMBER_LOG") {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    if !ember_testkit::vms_can_run("vm", &images_dir()) {
        return;
    }
    let mut report = Report::new();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    if let Err(e) = rt.block_on(suite(&mut report)) {
        report.fail("suite setup", e);
    }
    drop(rt);
    std::process::exit(report.finish());
}
