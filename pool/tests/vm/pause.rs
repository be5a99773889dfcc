//! Pause and resume on real VMs: the QEMU process goes and comes back, and
//! the guest's processes, files and clock carry on, five times in a row,
//! after the template it came from is gone, and from the record alone (as
//! after a restart). The figures are printed for docs/BENCHMARKS.md.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::ensure;
use ember_testkit::ensure_eq;
use ember_vm::vm::{processes_mentioning, Paused, VmHost};

use crate::{run, stdout};

fn counter() -> ember_wire::SpawnRequest {
    ember_wire::SpawnRequest {
        command: ember_wire::Command::Shell(
            "i=0; while :; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done".into(),
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

/// On the ZFS backend (a VM's disk is a raw file in its own clone): a fork
/// and a pause save the disk as a qcow2 file of their own (the paused form
/// is the same whatever the backend), the clone goes with the VM, and both
/// resume with the files and processes they had.
pub async fn zfs_a_vm_pauses_and_forks_off_its_clone(host: &Arc<VmHost>, parent: &str) -> anyhow::Result<()> {
    let vm = host.boot().await?;
    ensure_eq!(crate::warm_clones(parent)?.len(), 1);
    let pid = vm.agent().spawn(counter()).await?;
    run(&vm, "echo kept > ~/notes; sleep 0.3").await?;
    let dir = tempfile::tempdir()?;
    let t = Instant::now();
    let child_saved = vm.fork_into(&dir.path().join("child")).await?;
    let fork_ms = ms(t.elapsed());
    run(&vm, "echo after > ~/later").await?;
    let t = Instant::now();
    let paused = vm.pause(&dir.path().join("s")).await?;
    let pause_ms = ms(t.elapsed());
    ensure!(crate::warm_clones(parent)?.is_empty(), "the paused VM's clone is left");
    let t = Instant::now();
    let vm = host.resume(&paused).await?;
    let resume_ms = ms(t.elapsed());
    let child = host.resume(&child_saved).await?;
    ensure_eq!(stdout(&vm, "cat ~/notes ~/later").await?, "kept\nafter\n");
    ensure_eq!(stdout(&child, "cat ~/notes; ls ~/later 2>&1 | grep -c 'No such'").await?, "kept\n1\n");
    for v in [&vm, &child] {
        let a: u64 = stdout(v, "cat /tmp/count").await?.trim().parse()?;
        tokio::time::sleep(Duration::from_millis(400)).await;
        let b: u64 = stdout(v, "cat /tmp/count").await?.trim().parse()?;
        ensure!(b > a, "{}: the counter stopped ({a} -> {b})", v.id());
        ensure!(v.agent().processes().await?.iter().any(|p| p.pid == pid && p.exit.is_none()));
    }
    run(&child, "echo child > ~/notes").await?;
    ensure_eq!(stdout(&vm, "cat ~/notes").await?, "kept\n");
    println!(
        "    zfs: fork save {fork_ms} ms, pause {pause_ms} ms, resume {resume_ms} ms, paused files {} MB",
        paused.disk_bytes() / 1_000_000
    );
    vm.shutdown().await;
    child.shutdown().await;
    ensure!(crate::warm_clones(parent)?.is_empty());
    Ok(())
}
