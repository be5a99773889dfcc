//! The warm pool over real VMs: resets leave nothing behind, scrubbed
//! VMs serve only their function, sessions, crashes, destroy mode.

use super::*;

pub(crate) type VmPool = ember_pool::pool::Pool<ember_pool::pool::VmBackend>;

/// The guest's userspace processes (kernel threads have no command line
/// and rename themselves after their current work), without this query's.
pub(crate) async fn process_names(vm: &Vm) -> anyhow::Result<Vec<String>> {
    let s = stdout(
        vm,
        "for p in /proc/[0-9]*; do [ \"${p#/proc/}\" = $$ ] && continue; \
         c=$(tr '\\0' ' ' < $p/cmdline 2>/dev/null); [ -n \"$c\" ] && echo \"$c\"; done; true",
    )
    .await?;
    let mut v: Vec<String> =
        s.lines().map(|l| l.trim().to_owned()).filter(|l| !l.starts_with("tr ")).collect();
    v.sort();
    Ok(v)
}

/// Everything a user can leave behind, attempted; then the VM is returned
/// and claimed again, and must look exactly like it did fresh.
pub(crate) async fn pool_reset_leaves_nothing_behind(pool: &VmPool) -> anyhow::Result<()> {
    pool_leaves_nothing_behind(pool, None).await
}

/// The same, for calls of one function: the VM is scrubbed back into its
/// warm set, and the function's next call gets it.
pub(crate) async fn pool_scrub_leaves_nothing_behind(pool: &VmPool) -> anyhow::Result<()> {
    let scrubs = pool.status().counters.scrubs;
    pool_leaves_nothing_behind(pool, Some("adversary")).await?;
    // Both releases (the dirty call and the check) scrubbed.
    ensure_eq!(pool.status().counters.scrubs, scrubs + 2);
    Ok(())
}

pub(crate) async fn claim(
    pool: &VmPool,
    function: Option<&str>,
) -> anyhow::Result<ember_pool::pool::Lease<ember_pool::pool::VmBackend>> {
    Ok(match function {
        Some(f) => pool.claim_for(f).await?,
        None => pool.claim().await?,
    })
}

pub(crate) async fn pool_leaves_nothing_behind(pool: &VmPool, function: Option<&str>) -> anyhow::Result<()> {
    // Destroy mode replaces the VM; the other modes hand the same one back.
    let same_vm = pool.backend().mode() != ember_pool::config::ResetMode::Destroy;
    // The wait of a claim (these pools' claim_timeout): the python-data
    // pool resets by destroy (its host's channel is hybrid-vsock here), so
    // a VM released just before comes back as a cold boot plus the image's
    // 8.5-10 s numpy warm command: 32.6 s on an idle host, over 60 s once
    // with both host cores busy building.
    let t = tokio::time::Instant::now();
    let deadline = t + Duration::from_secs(120);
    ensure!(wait_until(deadline, Duration::from_millis(20), || (pool.status().ready >= 1).then_some(()))
        .await
        .is_some());
    println!("    a VM ready after {} ms", t.elapsed().as_millis());
    let lease = claim(pool, function).await?;
    let id = lease.id().to_string();
    let fresh_procs = process_names(&lease).await?;
    // The agent and its Python server (with the image's preloads), nothing else.
    ensure_eq!(fresh_procs.len(), 2);
    ensure!(
        fresh_procs[0]
            .starts_with("/usr/bin/python3 /usr/lib/ember/forkserver.py /run/ember-agent/python.sock")
            && fresh_procs[1] == "/usr/sbin/ember-agent",
        "{fresh_procs:?}"
    );
    let fresh_listing =
        stdout(&lease, "ls -la /tmp /var/tmp /dev/shm ~ | sed 's/ [A-Z][a-z][a-z] .*:.. / /'").await?;
    let mut dirty = sh("echo a > /tmp/a; echo b > ~/b; mkdir -p ~/.hidden && echo c > ~/.hidden/c; \
         echo d > /var/tmp/d; echo e > /dev/shm/e; mkfifo /tmp/fifo; ln -s /etc/passwd ~/link; \
         setsid sh -c 'sleep 1000 &' </dev/null >/dev/null 2>&1; \
         nohup python3 -c 'x = bytearray(64 << 20); import time; time.sleep(1000)' >/dev/null 2>&1 & \
         (trap '' TERM HUP; exec sleep 999) >/dev/null 2>&1 &");
    dirty.kill_leftovers = false;
    lease.agent().run(dirty).await?;
    lease
        .agent()
        .write_files(vec![FileSpec { path: "planted.txt".into(), content: b"x".to_vec(), mode: 0o644 }])
        .await?;
    lease
        .agent()
        .configure(Configure {
            hostname: Some("dirty".into()),
            dns: vec!["192.0.2.53".into()],
            ..Default::default()
        })
        .await?;
    ensure!(count_procs(&lease, "sleep").await? >= 2, "the test failed to leave processes behind");
    lease.release().await;

    // The snapshot is older now; the guest clock must not be.
    tokio::time::sleep(Duration::from_secs(3)).await;
    if !same_vm {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        ensure!(wait_until(deadline, Duration::from_millis(20), || (pool.status().ready >= 1).then_some(()))
            .await
            .is_some());
    }
    let again = claim(pool, function).await?;
    ensure_eq!(again.id() == id, same_vm);
    let guest: i64 = stdout(&again, "date +%s").await?.trim().parse()?;
    let host = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() as i64;
    ensure!((guest - host).abs() <= 1, "guest clock {guest} vs host {host} after the snapshot reset");
    ensure_eq!(process_names(&again).await?, fresh_procs);
    let probe = "python3 -c 'import ctypes; c = ctypes.CDLL(None); print(c.shmget(0x454d42, 0, 0), c.msgget(0x454d43, 0))'";
    ensure_eq!(stdout(&again, probe).await?, "-1 -1\n");
    ensure_eq!(
        stdout(&again, "ls -la /tmp /var/tmp /dev/shm ~ | sed 's/ [A-Z][a-z][a-z] .*:.. / /'").await?,
        fresh_listing
    );
    ensure_eq!(
        stdout(&again, "hostname; cat /etc/resolv.conf 2>/dev/null || echo no-resolv").await?,
        "ember\nno-resolv\n"
    );
    again.release().await;
    Ok(())
}

/// Claim (for `function`, if given) once a ready VM waits, and check the
/// claim got it: a VM made for a waiting claim is single-use.
pub(crate) async fn claim_a_kept_vm(
    pool: &VmPool,
    function: Option<&str>,
) -> anyhow::Result<ember_pool::pool::Lease<ember_pool::pool::VmBackend>> {
    // A VM made for a claim that another VM served first waits as ready
    // too, and is still single-use: hand such ones back and claim again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let ready =
            wait_until(deadline, Duration::from_millis(50), || (pool.status().ready >= 1).then_some(()))
                .await;
        ensure!(ready.is_some(), "no ready VM to claim: {:?}", pool.status());
        let lease = match function {
            Some(f) => pool.claim_for(f).await?,
            None => pool.claim().await?,
        };
        if ember_pool::pool::Backend::keeps(pool.backend(), &lease) {
            return Ok(lease);
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "only single-use VMs were claimed: {:?}",
            pool.status()
        );
        lease.release().await;
    }
}

/// A VM scrubbed for one function goes back to it; a general call gets
/// another VM, or the same one only after a full (snapshot) reset.
pub(crate) async fn pool_a_scrubbed_vm_serves_only_its_function(pool: &VmPool) -> anyhow::Result<()> {
    // Only a ready VM is kept after its call: one made for a waiting claim
    // is single-use and destroyed, never scrubbed into a warm set.
    let f = claim_a_kept_vm(pool, Some("marker")).await?;
    let id = f.id().to_string();
    stdout(&f, "echo planted > ~/marker").await?;
    f.release().await;
    ensure_eq!(pool.status().warm_sets.get("marker"), Some(&1));
    let resets = pool.status().counters.resets;
    let g = pool.claim().await?;
    let other = g.id() != id;
    ensure!(other || pool.status().counters.resets > resets, "a general call got the scrubbed VM unreset");
    ensure_eq!(stdout(&g, "ls ~").await?, "");
    g.release().await;
    Ok(())
}

/// Every snapshot reset resumes the guest's random generator where it was
/// saved; the reset reseeds it from the host, so two callers in a row never
/// draw the same bytes.
pub(crate) async fn pool_snapshot_resets_reseed_the_guest_rng(pool: &VmPool) -> anyhow::Result<()> {
    let mut seen = Vec::new();
    for _ in 0..2 {
        let l = pool.claim().await?;
        seen.push((l.id().to_string(), stdout(&l, "head -c 16 /dev/urandom | od -An -tx1").await?));
        l.release().await;
    }
    ensure!(seen[0] != seen[1], "two callers drew the same random bytes: {seen:?}");
    Ok(())
}

pub(crate) async fn pool_sessions_keep_state_and_are_isolated(pool: &VmPool) -> anyhow::Result<()> {
    let mut keep = sh("echo one > ~/notes; sleep 1000 >/dev/null 2>&1 &");
    keep.kill_leftovers = false;
    let (vm_a, vm_b) = {
        let a = pool.session("alice").await?;
        a.agent().run(keep.clone()).await?;
        let b = pool.session("bob").await?;
        (a.id().to_string(), b.id().to_string())
    };
    ensure!(vm_a != vm_b, "two sessions share VM {vm_a}");
    let a = pool.session("alice").await?;
    ensure_eq!(a.id(), vm_a.as_str());
    ensure_eq!(stdout(&a, "cat ~/notes").await?, "one\n");
    ensure_eq!(count_procs(&a, "sleep").await?, 1);
    drop(a);
    let b = pool.session("bob").await?;
    ensure_eq!(stdout(&b, "ls -A ~ | wc -l").await?.trim(), "0");
    drop(b);
    let names: Vec<String> = pool.sessions().into_iter().map(|s| s.key).collect();
    ensure_eq!(names, vec!["alice".to_string(), "bob".to_string()]);
    ensure!(pool.end_session("alice").await && pool.end_session("bob").await);
    ensure!(processes_mentioning(&vm_a).is_empty(), "the ended session's VM still runs");
    Ok(())
}

pub(crate) async fn pool_crashed_claimed_vm_is_replaced(pool: &VmPool) -> anyhow::Result<()> {
    // Claim a ready VM (plain, or stolen from a function's warm set): one
    // made for a waiting claim is single-use and is destroyed after its call
    // without the reset whose failure this case waits for.
    let before = pool.status().counters;
    let lease = claim_a_kept_vm(pool, None).await?;
    let id = lease.id().to_string();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(lease.qemu_pid() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let r = lease.agent().run(sh("true")).await;
    ensure!(r.is_err(), "exec on a dead VM succeeded");
    drop(lease);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let replaced = wait_until(deadline, Duration::from_millis(50), || {
        let s = pool.status();
        (s.counters.reset_failures > before.reset_failures && s.ready >= 1).then_some(())
    })
    .await;
    ensure!(replaced.is_some(), "not replaced: {:?}", pool.status());
    let next = pool.claim().await?;
    ensure!(next.id() != id, "the crashed VM was handed out again");
    ensure_eq!(stdout(&next, "echo ok").await?, "ok\n");
    next.release().await;
    Ok(())
}

pub(crate) async fn pool_destroy_mode_and_exhaustion(pool: &VmPool) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    ensure!(wait_until(deadline, Duration::from_millis(20), || (pool.status().ready == 1).then_some(()))
        .await
        .is_some());
    let first = pool.claim().await?;
    ensure!(first.warm());
    let id = first.id().to_string();
    let t = Instant::now();
    let err = pool.claim().await.err().context("a second claim beyond max_size succeeded")?;
    ensure!(matches!(err, ember_pool::pool::PoolError::Exhausted { .. }), "{err}");
    ensure!(t.elapsed() >= Duration::from_millis(900), "did not wait claim_timeout");
    first.release().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let gone = wait_until(deadline, Duration::from_millis(20), || {
        processes_mentioning(&id).is_empty().then_some(())
    })
    .await;
    ensure!(gone.is_some(), "destroy mode kept the VM");
    // The replacement boots in the background.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    ensure!(wait_until(deadline, Duration::from_millis(20), || (pool.status().ready == 1).then_some(()))
        .await
        .is_some());
    let second = pool.claim().await?;
    ensure!(second.warm(), "the replacement was not warm");
    ensure!(second.id() != id);
    ensure_eq!(stdout(&second, "find /tmp ~ -mindepth 1 | wc -l").await?.trim(), "0");
    second.release().await;
    Ok(())
}
