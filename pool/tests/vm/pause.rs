//! Pause and resume on real VMs: the QEMU process goes and comes back, and
//! the guest's processes, files and clock carry on, five times in a row,
//! after the template it came from is gone, and from the record alone (as
//! after a restart). The figures are printed for docs/BENCHMARKS.md.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use ember_testkit::ensure_eq;
use ember_vm::{processes_mentioning, Paused, VmHost};

use crate::{run, stdout};

fn counter() -> ember_wire::SpawnRequest {
    ember_wire::SpawnRequest {
        command: ember_wire::Command::Shell(
            "i=0; while :; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.1; done".into(),
        ),
        env: Default::default(),
        cwd: None,
        stdin: false,
        tag: Some("counter".into()),
        buffer_bytes: 4096,
        pids_limit: None,
        max_processes: 4,
        pty: None,
    }
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

pub async fn pause_and_resume_carry_processes_files_and_the_clock(host: &Arc<VmHost>) -> anyhow::Result<()> {
    let template = host.make_template().await?;
    let vm = host.restore(&template).await?;
    let pid = vm.agent().spawn(counter()).await?;
    run(&vm, "echo kept > ~/notes; sleep 0.5").await?;
    let dir = tempfile::tempdir()?;
    let paused_dir = dir.path().join("s");
    let first_id = vm.id().to_string();

    let (mut pauses, mut resumes) = (Vec::new(), Vec::new());
    let t = Instant::now();
    let mut paused = vm.pause(&paused_dir).await?;
    pauses.push(t.elapsed());
    ensure!(processes_mentioning(&first_id).is_empty(), "the paused VM's QEMU still runs");
    // The template may go: the paused VM needs nothing of it.
    drop(template);
    let mut before = 0u64;
    for round in 0..5 {
        let t = Instant::now();
        let vm = host.resume(&paused).await?;
        resumes.push(t.elapsed());
        ensure_eq!(stdout(&vm, "cat ~/notes").await?, "kept\n");
        let a: u64 = stdout(&vm, "cat /tmp/count").await?.trim().parse()?;
        tokio::time::sleep(Duration::from_millis(600)).await;
        let b: u64 = stdout(&vm, "cat /tmp/count").await?.trim().parse()?;
        ensure!(b > a && a > before, "round {round}: the counter did not carry on ({before} -> {a} -> {b})");
        before = b;
        let procs = vm.agent().processes().await?;
        ensure!(procs.iter().any(|p| p.pid == pid && p.exit.is_none()), "round {round}: {procs:?}");
        let guest: i64 = stdout(&vm, "date +%s").await?.trim().parse()?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() as i64;
        ensure!((guest - now).abs() <= 1, "round {round}: the guest's clock {guest} vs {now}");
        run(&vm, &format!("echo {round} >> ~/rounds")).await?;
        let id = vm.id().to_string();
        let t = Instant::now();
        paused = vm.pause(&paused_dir).await?;
        pauses.push(t.elapsed());
        ensure!(processes_mentioning(&id).is_empty(), "round {round}: QEMU still runs");
    }
    // From the record alone, as a restarted server finds it.
    let loaded = Paused::load(&paused_dir)?;
    ensure_eq!(loaded, paused);
    let vm = host.resume(&loaded).await?;
    ensure_eq!(stdout(&vm, "cat ~/rounds | tr '\\n' ' '").await?, "0 1 2 3 4 ");
    let on_disk = loaded.disk_bytes();
    vm.shutdown().await;
    pauses.sort();
    resumes.sort();
    println!(
        "    pause ms: {:?} (median {}), resume ms: {:?} (median {}), paused files {} MB",
        pauses.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
        ms(pauses[pauses.len() / 2]),
        resumes.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
        ms(resumes[resumes.len() / 2]),
        on_disk / 1_000_000
    );
    drop(dir);
    Ok(())
}

/// A fork: the running VM is saved without ending it, and the copy resumes
/// as a second VM that starts from the same files and processes; writes in
/// one are invisible in the other. A paused VM's copy resumes too.
pub async fn a_fork_starts_where_its_parent_was_and_diverges(host: &Arc<VmHost>) -> anyhow::Result<()> {
    let template = host.make_template().await?;
    let parent = host.restore(&template).await?;
    let pid = parent.agent().spawn(counter()).await?;
    run(&parent, "echo before > ~/shared; sleep 0.3").await?;
    let dir = tempfile::tempdir()?;
    let mut forks = Vec::new();
    let t = Instant::now();
    let saved = parent.fork_into(&dir.path().join("child")).await?;
    forks.push(t.elapsed());
    let t = Instant::now();
    let child = host.resume(&saved).await?;
    let fork_total = forks[0] + t.elapsed();
    // Both see the state at the fork, and both go on counting.
    for vm in [&parent, &child] {
        ensure_eq!(stdout(vm, "cat ~/shared").await?, "before\n");
        let a: u64 = stdout(vm, "cat /tmp/count").await?.trim().parse()?;
        tokio::time::sleep(Duration::from_millis(400)).await;
        let b: u64 = stdout(vm, "cat /tmp/count").await?.trim().parse()?;
        ensure!(b > a, "{}: the counter stopped ({a} -> {b})", vm.id());
        ensure!(vm.agent().processes().await?.iter().any(|p| p.pid == pid && p.exit.is_none()));
    }
    // Then they diverge.
    run(&parent, "echo parent > ~/mine").await?;
    run(&child, "echo child > ~/mine; rm ~/shared").await?;
    ensure_eq!(stdout(&parent, "cat ~/mine ~/shared").await?, "parent\nbefore\n");
    ensure_eq!(stdout(&child, "cat ~/mine; ls ~/shared 2>&1 | grep -c 'No such'").await?, "child\n1\n");
    // A paused VM's copy resumes as its own VM too.
    let paused = child.pause(&dir.path().join("child")).await?;
    drop(template);
    let copy = paused.copy_to(host, &dir.path().join("grandchild")).await?;
    let grandchild = host.resume(&copy).await?;
    ensure_eq!(stdout(&grandchild, "cat ~/mine").await?, "child\n");
    let resumed = host.resume(&paused).await?;
    run(&resumed, "echo changed > ~/mine").await?;
    ensure_eq!(stdout(&grandchild, "cat ~/mine").await?, "child\n");
    println!("    fork: save {} ms, save + resume {} ms", ms(forks[0]), ms(fork_total));
    for vm in [parent, grandchild, resumed] {
        vm.shutdown().await;
    }
    Ok(())
}

/// On ZFS a fork is copy-on-write: its disk is a clone of the running VM's
/// clone (a snapshot and a clone, whatever the disk holds), not a copy. A
/// paused VM keeps its clone (renamed a fork), not a converted copy; a paused
/// fork forks again the same way; a start-up keeps a fork a paused VM's
/// record names; a VM resumed on a fork owns it; and once every VM and
/// paused directory is gone no clone or snapshot of theirs is left.
pub async fn zfs_a_vm_pauses_and_forks_off_its_clone(host: &Arc<VmHost>, parent: &str) -> anyhow::Result<()> {
    let vm = host.boot().await?;
    let warm = crate::warm_clones(parent)?;
    ensure_eq!(warm.len(), 1);
    let warm = warm[0].0.clone();
    let pid = vm.agent().spawn(counter()).await?;
    run(&vm, "echo kept > ~/notes; sleep 0.3").await?;
    let dir = tempfile::tempdir()?;
    let t = Instant::now();
    let child_saved = vm.fork_into(&dir.path().join("child")).await?;
    let fork_ms = ms(t.elapsed());
    let fork = child_saved.dataset.clone().context("the fork's disk is not a ZFS clone")?;
    ensure!(fork.name.starts_with(&format!("{parent}/fork-")), "{}", fork.name);
    let origin = zfs_get("origin", &fork.name)?;
    ensure!(origin.starts_with(&format!("{warm}@fork-")), "the fork is not a clone of {warm}: {origin}");
    ensure!(!dir.path().join("child/disk.qcow2").exists(), "the fork's disk was copied");
    // A paused VM's fork is nobody's clone.
    ensure_eq!(zfs_get("ember:owner", &fork.name)?, "-");
    run(&vm, "echo after > ~/later").await?;
    let t = Instant::now();
    let paused = vm.pause(&dir.path().join("s")).await?;
    let pause_ms = ms(t.elapsed());
    // The paused VM keeps its clone, renamed a fork and nobody's, with
    // the snapshot the child was cloned from: nothing was copied.
    ensure!(crate::warm_clones(parent)?.is_empty(), "the paused VM's clone is still a VM's");
    let kept = paused.dataset.clone().context("the paused VM's disk is not its clone")?;
    ensure!(kept.name.starts_with(&format!("{parent}/fork-")), "{}", kept.name);
    ensure_eq!(zfs_get("origin", &kept.name)?, format!("{parent}/base@golden"));
    ensure_eq!(zfs_get("ember:owner", &kept.name)?, "-");
    ensure_eq!(zfs_get("ember:paused", &kept.name)?, dir.path().join("s").display().to_string());
    ensure!(zfs_get("origin", &fork.name)?.starts_with(&format!("{}@fork-", kept.name)));
    ensure!(!dir.path().join("s/disk.qcow2").exists(), "the paused VM's disk was converted");
    // A start-up keeps a fork that a paused VM's record names.
    let other = VmHost::new(host.config().clone(), false)?;
    other.open_storage().await?;
    ensure!(zfs_get("origin", &fork.name).is_ok(), "a start-up destroyed a paused VM's fork");
    // A paused fork forks again, copy-on-write.
    let grand_saved =
        Paused::load(&dir.path().join("child"))?.copy_to(host, &dir.path().join("grand")).await?;
    let grand = grand_saved.dataset.clone().context("the paused fork was copied, not forked")?;
    ensure!(zfs_get("origin", &grand.name)?.starts_with(&format!("{}@fork-", fork.name)));
    let t = Instant::now();
    let vm = host.resume(&paused).await?;
    let resume_ms = ms(t.elapsed());
    let child = host.resume(&Paused::load(&dir.path().join("child"))?).await?;
    let grandchild = host.resume(&grand_saved).await?;
    ensure!(zfs_get("ember:owner", &fork.name)? != "-", "the VM resumed on the fork does not own it");
    ensure_eq!(stdout(&vm, "cat ~/notes ~/later").await?, "kept\nafter\n");
    ensure_eq!(stdout(&child, "cat ~/notes; ls ~/later 2>&1 | grep -c 'No such'").await?, "kept\n1\n");
    for v in [&vm, &child, &grandchild] {
        let a: u64 = stdout(v, "cat /tmp/count").await?.trim().parse()?;
        tokio::time::sleep(Duration::from_millis(400)).await;
        let b: u64 = stdout(v, "cat /tmp/count").await?.trim().parse()?;
        ensure!(b > a, "{}: the counter stopped ({a} -> {b})", v.id());
        ensure!(v.agent().processes().await?.iter().any(|p| p.pid == pid && p.exit.is_none()));
    }
    run(&child, "echo child > ~/notes; sync").await?;
    ensure_eq!(stdout(&vm, "cat ~/notes").await?, "kept\n");
    ensure_eq!(stdout(&grandchild, "cat ~/notes").await?, "kept\n");
    println!(
        "    zfs: fork save {fork_ms} ms (copy-on-write), pause {pause_ms} ms, resume {resume_ms} ms, \
         paused files {} MB",
        paused.disk_bytes() / 1_000_000
    );
    // The child goes first: its fork (the grandchild's origin) is promoted
    // away, the grandchild runs on.
    child.shutdown().await;
    ensure_eq!(stdout(&grandchild, "cat ~/notes").await?, "kept\n");
    vm.shutdown().await;
    grandchild.shutdown().await;
    for d in ["child", "grand", "s"] {
        host.remove_paused(&dir.path().join(d)).await;
        ensure!(!dir.path().join(d).exists(), "{d} is left");
    }
    other.close().await;
    ensure!(crate::warm_clones(parent)?.is_empty());
    let left = zfs_names(parent)?;
    ensure!(
        left.iter().all(|n| !n.contains("/fork-") && !n.contains("/warm-") && !n.contains("@fork-")),
        "left behind: {left:?}"
    );
    Ok(())
}

/// Property `prop` of dataset `name`.
fn zfs_get(prop: &str, name: &str) -> anyhow::Result<String> {
    let out = std::process::Command::new("zfs").args(["get", "-H", "-o", "value", prop, name]).output()?;
    ensure!(out.status.success(), "zfs get {prop} {name}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Every dataset and snapshot under `parent`.
fn zfs_names(parent: &str) -> anyhow::Result<Vec<String>> {
    let out = std::process::Command::new("zfs")
        .args(["list", "-H", "-o", "name", "-t", "all", "-r", parent])
        .output()?;
    ensure!(out.status.success(), "zfs list: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect())
}

/// Sessions on ZFS through the pool: a fork is a copy-on-write clone; a
/// fork left paused (no room to run it) survives a restart of the pool and
/// resumes with its parent's files; ending every session, running or
/// paused, leaves no clone, snapshot or directory of theirs.
pub async fn zfs_sessions_fork_and_leave_nothing(host: &Arc<VmHost>, parent: &str) -> anyhow::Result<()> {
    use ember_pool::config::{PoolConfig, ResetMode};
    let sessions = tempfile::tempdir()?;
    let cfg = PoolConfig {
        min_size: 1,
        max_size: 3,
        target_free: 0,
        max_sessions: 2,
        session_dir: Some(sessions.path().to_path_buf()),
        claim_timeout: Duration::from_secs(60),
        ..PoolConfig::default()
    };
    let forks = || -> anyhow::Result<Vec<String>> {
        Ok(zfs_names(parent)?.into_iter().filter(|n| n.contains("/fork-") && !n.contains('@')).collect())
    };
    let pool = crate::start_pool(host, ResetMode::Auto, cfg.clone())?;
    run(&*pool.session("parent").await?, "echo kept > ~/notes; sync").await?;
    pool.fork_session("parent", "child").await?;
    ensure!(forks()?.len() == 1, "the child does not run on a fork of its parent's clone: {:?}", forks()?);
    ensure_eq!(
        stdout(&*pool.session("child").await?, "cat ~/notes; echo child > ~/notes; sync").await?,
        "kept\n"
    );
    ensure_eq!(stdout(&*pool.session("parent").await?, "cat ~/notes").await?, "kept\n");
    // Two sessions run: the grandchild waits paused, on a fork of the fork.
    let grand = pool.fork_session("child", "grand").await?;
    ensure_eq!(grand.state, "paused");
    ensure_eq!(forks()?.len(), 2);
    ensure!(!sessions.path().join("grand/disk.qcow2").exists(), "the paused fork's disk was copied");
    pool.shutdown().await;
    ensure!(forks()?.len() == 1, "not just the paused fork is left: {:?}", forks()?);

    // The next pool finds it paused and resumes it where it was.
    let pool = crate::start_pool(host, ResetMode::Auto, cfg)?;
    let names: Vec<String> = pool.sessions().into_iter().map(|s| s.key).collect();
    ensure_eq!(names, vec!["grand".to_string()]);
    ensure_eq!(stdout(&*pool.session("grand").await?, "cat ~/notes").await?, "child\n");
    pool.fork_session("grand", "great").await?;
    pool.pause_session("great").await?;
    ensure!(pool.end_session("grand").await && pool.end_session("great").await);
    pool.shutdown().await;
    ensure!(forks()?.is_empty(), "left: {:?}", forks()?);
    let left = zfs_names(parent)?;
    ensure!(left.iter().all(|n| !n.contains("/warm-") && !n.contains("@fork-")), "left behind: {left:?}");
    let dirs: Vec<_> = std::fs::read_dir(sessions.path())?
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name())
        .collect();
    ensure!(dirs.is_empty(), "sessions' directories left: {dirs:?}");
    Ok(())
}
