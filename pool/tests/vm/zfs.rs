//! ZFS on a throw-away zfs-fuse pool: clones per VM, orphan reaping,
//! bounded resets.

use super::*;

/// `initrd/zfs-test-pool.sh up|down`; `up` prints the parent dataset.
pub(crate) fn zfs_test_pool(action: &str) -> anyhow::Result<String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../initrd/zfs-test-pool.sh");
    let out = std::process::Command::new(script).arg(action).output()?;
    ensure!(out.status.success(), "zfs-test-pool.sh {action}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `(name, ember:owner)` of the `warm-*` clones under `parent`.
pub(crate) fn warm_clones(parent: &str) -> anyhow::Result<Vec<(String, String)>> {
    let out = std::process::Command::new("zfs")
        .args(["list", "-H", "-o", "name,ember:owner", "-r", "-d", "1", parent])
        .output()?;
    ensure!(out.status.success(), "zfs list: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .filter(|(n, _)| n.starts_with(&format!("{parent}/warm-")))
        .map(|(n, o)| (n.to_string(), o.to_string()))
        .collect())
}

pub(crate) fn zfs(args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("zfs").args(args).output()?;
    ensure!(out.status.success(), "zfs {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// A clone whose owner is dead is destroyed when a host opens the storage;
/// a live owner's clone is left alone.
pub(crate) async fn zfs_orphans_are_reaped(cfg: VmConfig, parent: &str) -> anyhow::Result<()> {
    let first = VmHost::new(cfg.clone(), false)?;
    first.open_storage().await?; // makes base@golden
    let golden = format!("{parent}/base@golden");
    let orphan = format!("{parent}/warm-0rphan");
    let foreign = format!("{parent}/warm-f0reign");
    zfs(&["clone", "-o", "ember:owner=1-1-0", &golden, &orphan])?;
    // "Alive": this very process, as another host in it would tag it.
    let me = format!("{}-{}-99", std::process::id(), proc_start_time()?);
    zfs(&["clone", "-o", &format!("ember:owner={me}"), &golden, &foreign])?;
    let second = VmHost::new(cfg, false)?;
    second.open_storage().await?;
    let left: Vec<String> = warm_clones(parent)?.into_iter().map(|(n, _)| n).collect();
    ensure_eq!(left, vec![foreign.clone()]);
    // zfs-fuse calls a fresh clone busy for a moment.
    let deadline = Instant::now() + Duration::from_secs(15);
    while let Err(e) = zfs(&["destroy", "-r", &foreign]) {
        ensure!(Instant::now() < deadline, "{e:#}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(())
}

pub(crate) fn proc_start_time() -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    let after = stat.rsplit_once(')').context("stat")?.1;
    after.split_whitespace().nth(19).context("starttime")?.parse().context("starttime")
}

/// A call that plants daemons and files, then three calls of ~120 short
/// processes each: every rollback reset after them ends within a bound
/// (issue 13 saw one re-attach take 14.1 s on zfs-fuse, so that a claim
/// waited out its 10 s).
pub(crate) async fn zfs_resets_stay_bounded_after_plant_and_probes(pool: &VmPool) -> anyhow::Result<()> {
    let plant = "for i in $(seq 20); do head -c 1M /dev/urandom > f$i; done; mkdir -p d; \
                 for i in $(seq 200); do echo x > d/$i; done; (setsid sleep 1000 &); \
                 nohup sleep 999 >/dev/null 2>&1 & echo planted";
    let probe = "for i in $(seq 120); do /bin/true; done; echo probed";
    let bound = Duration::from_secs(10);
    for (i, cmd) in [plant, probe, probe, probe].into_iter().enumerate() {
        let lease = pool.claim().await?;
        let out = lease.agent().run(sh(cmd)).await?;
        ensure!(out.status.code == Some(0), "call {i}: {:?}", out.status);
        let t = tokio::time::Instant::now();
        lease.release().await;
        let deadline = t + Duration::from_secs(60);
        let back = wait_until(deadline, Duration::from_millis(20), || {
            let s = pool.status();
            (s.resetting == 0 && s.ready >= 1).then_some(())
        })
        .await;
        ensure!(back.is_some(), "call {i}: the VM never came back: {:?}", pool.status());
        ensure!(t.elapsed() < bound, "call {i}: the reset took {:?} (bound {bound:?})", t.elapsed());
    }
    ensure_eq!(pool.status().counters.reset_failures, 0);
    Ok(())
}

/// Each VM has its own clone, tagged with its owner, under the parent;
/// claiming it neither renames nor replaces the clone.
pub(crate) async fn zfs_a_clone_per_vm(pool: &VmPool, parent: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    ensure!(wait_until(deadline, Duration::from_millis(20), || (pool.status().ready >= 1).then_some(()))
        .await
        .is_some());
    let before = warm_clones(parent)?;
    ensure!(!before.is_empty(), "no clone for the ready VM");
    ensure!(before.iter().all(|(_, owner)| owner.contains('-')), "untagged clones: {before:?}");
    let lease = pool.claim().await?;
    ensure_eq!(stdout(&lease, "mountpoint -q ~ && echo mounted").await?, "mounted\n");
    let during = warm_clones(parent)?;
    ensure!(before.iter().all(|c| during.contains(c)), "claiming renamed a clone: {before:?} -> {during:?}");
    lease.release().await;
    Ok(())
}
