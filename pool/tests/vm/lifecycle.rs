//! A VM's life: template restore, crash detection, power-off on shutdown.

use super::*;

pub(crate) async fn template_restore(host: &Arc<VmHost>) -> anyhow::Result<()> {
    let t = Instant::now();
    let template = host.make_template().await?;
    println!("    template made in {} ms", t.elapsed().as_millis());
    let mut restored = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let vm = host.restore(&template).await?;
        println!(
            "    restored {} in {} ms (boot_ms {})",
            vm.id(),
            t.elapsed().as_millis(),
            vm.timings().boot_ms
        );
        restored.push(vm);
    }
    let cold = host.boot().await?;
    for vm in &restored {
        ensure_eq!(stdout(vm, "echo ok; cat /proc/1/comm").await?, "ok\nember-agent\n");
        ensure!(
            vm.timings().total_ms * 2 < cold.timings().total_ms,
            "restore ({} ms) not clearly faster than a cold boot ({} ms)",
            vm.timings().total_ms,
            cold.timings().total_ms
        );
        let guest: i64 = stdout(vm, "date +%s").await?.trim().parse()?;
        let host_now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() as i64;
        ensure!((guest - host_now).abs() <= 1, "restored clock {guest} vs {host_now}");
    }
    // Clones share nothing writable.
    run(&restored[0], "echo mine > ~/f; echo mine > /tmp/g").await?;
    ensure_eq!(stdout(&restored[1], "cat ~/f /tmp/g 2>&1 | grep -c 'No such' ").await?.trim(), "2");
    // A restored VM can itself be snapshotted and reset (the pool does).
    let mut vm = restored.pop().context("no VM")?;
    vm.save_snapshot("s").await?;
    run(&vm, "echo x > ~/later").await?;
    let mut steps = vm.steps();
    vm.load_snapshot("s", Duration::from_secs(20), &mut steps).await?;
    assert_eq!(steps.finish().len(), 3);
    ensure_eq!(stdout(&vm, "ls -A ~ | wc -l").await?.trim(), "0");
    vm.shutdown().await;
    for vm in restored {
        vm.shutdown().await;
    }
    cold.shutdown().await;
    Ok(())
}

// ------------------------------------------------- cases with their own VM

pub(crate) async fn crash_is_detected(host: &Arc<VmHost>) -> anyhow::Result<()> {
    let mut vm = host.boot().await?;
    let dir = vm.dir().to_path_buf();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(vm.qemu_pid() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let r = tokio::time::timeout(Duration::from_secs(5), vm.agent().hello(1)).await?;
    ensure!(matches!(r, Err(AgentError::Disconnected)), "{r:?}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    ensure!(wait_until(deadline, Duration::from_millis(10), || (!vm.is_running()).then_some(()))
        .await
        .is_some());
    drop(vm);
    ensure!(!dir.exists(), "VM dir {} left behind", dir.display());
    Ok(())
}

pub(crate) async fn agent_shutdown_powers_off(host: &Arc<VmHost>, init: &str) -> anyhow::Result<()> {
    let mut vm = host.boot().await?;
    ensure_eq!(stdout(&vm, "cat /proc/1/comm").await?.trim(), init);
    ensure_eq!(stdout(&vm, "echo ok").await?, "ok\n");
    vm.agent().shutdown().await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    ensure!(
        wait_until(deadline, Duration::from_millis(20), || (!vm.is_running()).then_some(())).await.is_some(),
        "QEMU still runs after the guest powered off"
    );
    vm.shutdown().await;
    Ok(())
}
