//! VM tests: real QEMU microVMs, the real guest agent, real disks.
//! Needs the images from `make images` (EMBER_IMAGES); `make test` builds
//! them first. Run one case with `cargo test -p ember-pool --test vm -- NAME`.

#![allow(clippy::unwrap_used)] // test fixtures

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use ember_testkit::{ensure_eq, processes_mentioning, CaseFuture, Report};

mod images;
mod network;
mod pause;
use ember_vm::channel::ExecOutput;
use ember_vm::vm::{wait_until, ImageSet, InitMode, VmConfig};
use ember_vm::{AgentError, ChannelChoice, ExecEvent, Vm, VmHost};
use ember_wire::{Command, Configure, ErrorCode, ExecRequest, FileSpec, NetworkConfig, MAX_FRAME_LEN};

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

async fn echo_and_exit_codes(vm: &Vm) -> anyhow::Result<()> {
    let out = run(vm, "echo hello; exit 3").await?;
    ensure_eq!(out.stdout, b"hello\n".to_vec());
    ensure_eq!(out.status.code, Some(3));
    let f = vm.agent().run(ExecRequest::new(Command::Argv(vec!["false".into()]))).await?;
    ensure_eq!(f.status.code, Some(1));
    Ok(())
}

async fn stderr_is_separate(vm: &Vm) -> anyhow::Result<()> {
    let out = run(vm, "echo out; echo err >&2").await?;
    ensure_eq!((out.stdout, out.stderr), (b"out\n".to_vec(), b"err\n".to_vec()));
    Ok(())
}

async fn stdin_is_delivered(vm: &Vm) -> anyhow::Result<()> {
    let mut req = sh("wc -c; head -c 3 /dev/null");
    req.stdin = vec![b'x'; 100_000];
    let out = vm.agent().run(req).await?;
    ensure_eq!(String::from_utf8(out.stdout)?.trim(), "100000");
    Ok(())
}

async fn env_and_defaults(vm: &Vm) -> anyhow::Result<()> {
    let mut req = sh("echo \"$MY_VAR|$HOME|$USER|$(pwd)|$(id -u)\"");
    req.env.insert("MY_VAR".into(), "a b=c".into());
    let out = vm.agent().run(req).await?;
    ensure_eq!(String::from_utf8(out.stdout)?, "a b=c|/home/ember|ember|/home/ember|1000\n");
    Ok(())
}

async fn non_utf8_output_survives(vm: &Vm) -> anyhow::Result<()> {
    let out = run(vm, r"printf '\377\376\000\303('").await?;
    ensure_eq!(out.stdout, b"\xff\xfe\x00\xc3(".to_vec());
    Ok(())
}

async fn python3_runs(vm: &Vm) -> anyhow::Result<()> {
    let s = stdout(vm, "python3 -c 'import json; print(json.dumps({\"sum\": sum(range(10))}))'").await?;
    ensure_eq!(s, "{\"sum\": 45}\n");
    Ok(())
}

async fn timeout_kills_the_process_tree(vm: &Vm) -> anyhow::Result<()> {
    let mut req = sh("sleep 100 & sleep 100");
    req.timeout_ms = 1000;
    let t = Instant::now();
    let out = vm.agent().run(req).await?;
    ensure!(out.status.timed_out, "not timed out: {:?}", out.status);
    ensure_eq!(out.status.signal, Some(9));
    ensure!(t.elapsed() < Duration::from_secs(5), "took {:?}", t.elapsed());
    ensure_eq!(count_procs(vm, "sleep").await?, 0);
    // Only the cgroup of the command now running remains.
    ensure_eq!(stdout(vm, "ls -d /sys/fs/cgroup/ember/*/ | wc -l").await?.trim(), "1");
    Ok(())
}

async fn daemonized_processes_die_with_the_command(vm: &Vm) -> anyhow::Result<()> {
    // setsid + double fork escapes the process group, not the cgroup.
    run(vm, "setsid sh -c 'sleep 200 &' </dev/null >/dev/null 2>&1").await?;
    ensure_eq!(count_procs(vm, "sleep").await?, 0);
    Ok(())
}

async fn orphans_are_reaped(vm: &Vm) -> anyhow::Result<()> {
    // The double-forked sleep is reparented to the agent (PID 1 or a
    // subreaper) when its parent exits; once it exits it must not linger.
    let mut req = sh("sh -c 'sleep 0.3 &'; true");
    req.kill_leftovers = false;
    vm.agent().run(req).await?;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let zombies = stdout(vm, "grep -l '^[0-9]* ([^)]*) Z' /proc/[0-9]*/stat 2>/dev/null | wc -l").await?;
    ensure_eq!(zombies.trim(), "0");
    // Its emptied cgroup was swept when that last command finished: only
    // the cgroup of the command now running is left.
    ensure_eq!(stdout(vm, "ls -d /sys/fs/cgroup/ember/*/ | wc -l").await?.trim(), "1");
    Ok(())
}

async fn output_cap(vm: &Vm) -> anyhow::Result<()> {
    let mut req = sh("head -c 5000000 /dev/zero; echo done >&2");
    req.output_limit = 10_000;
    let out = vm.agent().run(req).await?;
    ensure!(out.status.truncated);
    ensure_eq!(out.stdout.len() + out.stderr.len(), 10_000);
    ensure_eq!(out.status.code, Some(0));
    Ok(())
}

async fn write_files_and_read_back(vm: &Vm) -> anyhow::Result<()> {
    vm.agent()
        .write_files(vec![
            FileSpec { path: "src/main.py".into(), content: b"print('from file')\n".to_vec(), mode: 0o644 },
            FileSpec { path: "/tmp/data.bin".into(), content: vec![0, 255, 1], mode: 0o600 },
        ])
        .await?;
    ensure_eq!(
        stdout(vm, "python3 src/main.py; od -An -tu1 /tmp/data.bin; stat -c '%U %a' /tmp/data.bin").await?,
        "from file\n   0 255   1\nember 600\n"
    );
    for bad in ["../../etc/passwd", "/etc/motd", "/usr/bin/x"] {
        let r =
            vm.agent().write_files(vec![FileSpec { path: bad.into(), content: vec![], mode: 0o644 }]).await;
        ensure!(
            matches!(r, Err(AgentError::Remote(ref e)) if e.code == ErrorCode::BadRequest),
            "{bad}: {r:?}"
        );
    }
    // A symlink the user planted must not let the root agent write elsewhere.
    run(vm, "ln -sf /mnt/scratch/evil /home/ember/link").await?;
    let r = vm
        .agent()
        .write_files(vec![FileSpec { path: "link".into(), content: b"x".to_vec(), mode: 0o644 }])
        .await;
    ensure!(r.is_err(), "write through a symlink succeeded");
    Ok(())
}

async fn user_is_unprivileged_and_root_is_read_only(vm: &Vm) -> anyhow::Result<()> {
    let out = run(vm, "touch /etc/x 2>&1; touch /x 2>&1; echo ok > /tmp/t && echo ok > ~/t && echo writable")
        .await?;
    let s = String::from_utf8(out.stdout)?;
    ensure!(s.contains("Read-only file system") || s.contains("Permission denied"), "{s}");
    ensure!(s.ends_with("writable\n"), "{s}");
    Ok(())
}

/// A server a command starts is reachable on localhost inside the VM.
async fn localhost_reaches_a_server_in_the_vm(vm: &Vm) -> anyhow::Result<()> {
    let cmd = "mkdir -p /tmp/www && echo local > /tmp/www/index.html; busybox httpd -f -p 127.0.0.1:8123 -h /tmp/www & \
               p=$!; sleep 0.5; curl -s -m 5 http://127.0.0.1:8123/; kill $p";
    ensure_eq!(stdout(vm, cmd).await?, "local\n");
    Ok(())
}

/// The guest user may not make user namespaces unless the host allows it
/// (`[vm] user_namespaces`): `unshare --user` fails, the sysctl says 0.
async fn user_namespaces_are_off(vm: &Vm) -> anyhow::Result<()> {
    user_namespaces_are(vm, false).await
}

async fn user_namespaces_are(vm: &Vm, on: bool) -> anyhow::Result<()> {
    let out =
        run(vm, "cat /proc/sys/user/max_user_namespaces; id -u; unshare --user --map-root-user id -u 2>&1")
            .await?;
    let s = String::from_utf8(out.stdout)?;
    let mut lines = s.lines();
    let max = lines.next().unwrap_or_default();
    ensure!(lines.next() == Some("1000"), "{s}");
    if on {
        ensure!(max != "0", "{s}");
        ensure!(lines.next() == Some("0"), "root inside its own user namespace: {s}");
        ensure!(out.status.code == Some(0), "{s}");
    } else {
        ensure!(max == "0", "{s}");
        ensure!(out.status.code != Some(0), "unshare --user worked: {s}");
    }
    Ok(())
}

async fn pids_limit_contains_a_fork_bomb(vm: &Vm) -> anyhow::Result<()> {
    let mut req = sh("b() { b | b & }; b; sleep 2; echo survived");
    req.pids_limit = Some(64);
    req.timeout_ms = 10_000;
    let out = vm.agent().run(req).await?;
    ensure!(!out.status.timed_out, "{:?}", out.status);
    ensure!(String::from_utf8_lossy(&out.stderr).to_lowercase().contains("fork"), "no fork failures seen");
    // Everything was killed and the guest answers normally.
    ensure_eq!(count_procs(vm, "sh").await?, 1);
    ensure_eq!(stdout(vm, "echo fine").await?, "fine\n");
    Ok(())
}

async fn requests_run_concurrently(vm: &Vm) -> anyhow::Result<()> {
    let t = Instant::now();
    let (a, b, c, d) = tokio::join!(
        run(vm, "sleep 1; echo a"),
        run(vm, "sleep 1; echo b"),
        run(vm, "sleep 1; echo c"),
        run(vm, "sleep 1; echo d")
    );
    for (o, want) in [(a?, "a\n"), (b?, "b\n"), (c?, "c\n"), (d?, "d\n")] {
        ensure_eq!(String::from_utf8(o.stdout)?, want);
    }
    ensure!(t.elapsed() < Duration::from_secs(3), "4 x sleep 1 took {:?}", t.elapsed());
    Ok(())
}

async fn cancel_kills_the_command(vm: &Vm) -> anyhow::Result<()> {
    let mut h = vm.agent().exec(sh("echo started; sleep 60 & sleep 60")).await?;
    ensure!(matches!(h.next().await?, ExecEvent::Output { .. }));
    h.cancel().await?;
    match h.next().await? {
        ExecEvent::Exit(st) => ensure!(st.cancelled && st.signal == Some(9), "{st:?}"),
        other => anyhow::bail!("expected exit, got {other:?}"),
    }
    ensure_eq!(count_procs(vm, "sleep").await?, 0);
    Ok(())
}

async fn malformed_frames_are_survived(vm: &Vm) -> anyhow::Result<()> {
    let body = b"{\"id\":";
    let mut junk = (body.len() as u32).to_be_bytes().to_vec();
    junk.extend(body);
    vm.agent().send_raw(junk).await?;
    ensure_eq!(vm.agent().next_stray_error(Duration::from_secs(10)).await?.code, ErrorCode::BadFrame);
    let len = MAX_FRAME_LEN + 1;
    let mut big = (len as u32).to_be_bytes().to_vec();
    big.resize(4 + len, b'z');
    vm.agent().send_raw(big).await?;
    ensure_eq!(vm.agent().next_stray_error(Duration::from_secs(60)).await?.code, ErrorCode::FrameTooLarge);
    ensure_eq!(vm.agent().hello(77).await?.nonce, 77);
    ensure_eq!(stdout(vm, "echo alive").await?, "alive\n");
    Ok(())
}

async fn configure_in_one_round_trip(vm: &Vm) -> anyhow::Result<()> {
    let cfg = Configure {
        hostname: Some("worker-7".into()),
        // Documentation addresses; the NIC hangs off an empty QEMU hub, so
        // nothing can leave the VM.
        network: Some(NetworkConfig {
            interface: "eth0".into(),
            address: "192.0.2.10/24".into(),
            gateway: Some("192.0.2.1".into()),
        }),
        network_off: false,
        dns: vec!["192.0.2.53".into()],
        clock_unix_ms: Some(1_893_456_000_000), // 2030-01-01T00:00:00Z
        entropy: vec![7; 32],
    };
    vm.agent().configure(cfg).await?;
    let t: u64 = stdout(vm, "date +%s").await?.trim().parse()?;
    ensure!((1_893_456_000..1_893_456_005).contains(&t), "guest clock {t}");
    let s = stdout(vm, "hostname; cat /etc/resolv.conf; /bin/busybox ip -4 addr show eth0 | grep -o '192.0.2.10/24'; /bin/busybox ip route | grep default").await?;
    ensure!(s.starts_with("worker-7\nnameserver 192.0.2.53\n192.0.2.10/24\ndefault via 192.0.2.1"), "{s}");
    let bad = Configure { hostname: Some("bad host".into()), ..Default::default() };
    ensure!(
        matches!(vm.agent().configure(bad).await, Err(AgentError::Remote(e)) if e.code == ErrorCode::BadRequest)
    );
    // `network_off` (a session whose policy became "none"): no address, no
    // route, no resolver left.
    vm.agent().configure(Configure { network_off: true, ..Default::default() }).await?;
    let s = stdout(
        vm,
        "ip -4 -o addr show dev eth0 | wc -l; ip route | wc -l; cat /etc/resolv.conf 2>/dev/null | wc -l",
    )
    .await?;
    ensure_eq!(s, "0\n0\n0\n");
    Ok(())
}

async fn reset_leaves_nothing_behind(vm: &Vm) -> anyhow::Result<()> {
    let mut keep =
        sh("echo x > /tmp/a; echo y > ~/b; mkdir -p ~/.cache/d; echo z > /var/tmp/c; echo w > /dev/shm/d; \
         setsid sh -c 'sleep 300 &' </dev/null >/dev/null 2>&1; nohup sleep 301 >/dev/null 2>&1 &");
    keep.kill_leftovers = false;
    vm.agent().run(keep).await?;
    vm.agent().configure(Configure { hostname: Some("dirty".into()), ..Default::default() }).await?;
    ensure!(count_procs(vm, "sleep").await? >= 2, "the test did not manage to leave processes behind");
    vm.agent().reset().await?;
    ensure_eq!(count_procs(vm, "sleep").await?, 0);
    ensure_eq!(
        stdout(vm, "ls -A /tmp ~ /var/tmp /dev/shm | tr -d '\\n'; hostname").await?,
        "/dev/shm:/home/ember:/tmp:/var/tmp:ember\n"
    );
    Ok(())
}

// ----------------------------------------------------------- pool cases

type VmPool = ember_pool::pool::Pool<ember_pool::pool::VmBackend>;

/// The guest's userspace processes (kernel threads have no command line
/// and rename themselves after their current work), without this query's.
async fn process_names(vm: &Vm) -> anyhow::Result<Vec<String>> {
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
async fn pool_reset_leaves_nothing_behind(pool: &VmPool) -> anyhow::Result<()> {
    pool_leaves_nothing_behind(pool, None).await
}

/// The same, for calls of one function: the VM is scrubbed back into its
/// warm set, and the function's next call gets it.
async fn pool_scrub_leaves_nothing_behind(pool: &VmPool) -> anyhow::Result<()> {
    let scrubs = pool.status().counters.scrubs;
    pool_leaves_nothing_behind(pool, Some("adversary")).await?;
    // Both releases (the dirty call and the check) scrubbed.
    ensure_eq!(pool.status().counters.scrubs, scrubs + 2);
    Ok(())
}

async fn claim(
    pool: &VmPool,
    function: Option<&str>,
) -> anyhow::Result<ember_pool::pool::Lease<ember_pool::pool::VmBackend>> {
    Ok(match function {
        Some(f) => pool.claim_for(f).await?,
        None => pool.claim().await?,
    })
}

async fn pool_leaves_nothing_behind(pool: &VmPool, function: Option<&str>) -> anyhow::Result<()> {
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
async fn claim_a_kept_vm(
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
async fn pool_a_scrubbed_vm_serves_only_its_function(pool: &VmPool) -> anyhow::Result<()> {
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
async fn pool_snapshot_resets_reseed_the_guest_rng(pool: &VmPool) -> anyhow::Result<()> {
    let mut seen = Vec::new();
    for _ in 0..2 {
        let l = pool.claim().await?;
        seen.push((l.id().to_string(), stdout(&l, "head -c 16 /dev/urandom | od -An -tx1").await?));
        l.release().await;
    }
    ensure!(seen[0] != seen[1], "two callers drew the same random bytes: {seen:?}");
    Ok(())
}

async fn pool_sessions_keep_state_and_are_isolated(pool: &VmPool) -> anyhow::Result<()> {
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

async fn pool_crashed_claimed_vm_is_replaced(pool: &VmPool) -> anyhow::Result<()> {
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

async fn pool_destroy_mode_and_exhaustion(pool: &VmPool) -> anyhow::Result<()> {
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

async fn template_restore(host: &Arc<VmHost>) -> anyhow::Result<()> {
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

async fn crash_is_detected(host: &Arc<VmHost>) -> anyhow::Result<()> {
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

async fn agent_shutdown_powers_off(host: &Arc<VmHost>, init: &str) -> anyhow::Result<()> {
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

/// `initrd/zfs-test-pool.sh up|down`; `up` prints the parent dataset.
fn zfs_test_pool(action: &str) -> anyhow::Result<String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../initrd/zfs-test-pool.sh");
    let out = std::process::Command::new(script).arg(action).output()?;
    ensure!(out.status.success(), "zfs-test-pool.sh {action}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `(name, ember:owner)` of the `warm-*` clones under `parent`.
fn warm_clones(parent: &str) -> anyhow::Result<Vec<(String, String)>> {
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

fn zfs(args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("zfs").args(args).output()?;
    ensure!(out.status.success(), "zfs {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// A clone whose owner is dead is destroyed when a host opens the storage;
/// a live owner's clone is left alone.
async fn zfs_orphans_are_reaped(cfg: VmConfig, parent: &str) -> anyhow::Result<()> {
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

fn proc_start_time() -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    let after = stat.rsplit_once(')').context("stat")?.1;
    after.split_whitespace().nth(19).context("starttime")?.parse().context("starttime")
}

/// A call that plants daemons and files, then three calls of ~120 short
/// processes each: every rollback reset after them ends within a bound
/// (issue 13 saw one re-attach take 14.1 s on zfs-fuse, so that a claim
/// waited out its 10 s).
async fn zfs_resets_stay_bounded_after_plant_and_probes(pool: &VmPool) -> anyhow::Result<()> {
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
async fn zfs_a_clone_per_vm(pool: &VmPool, parent: &str) -> anyhow::Result<()> {
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

/// A Python script call (the pre-warmed server's path), with its file.
fn py(code: &str) -> ExecRequest {
    let mut r = ExecRequest::new(Command::Python(ember_wire::PythonScript {
        path: "/tmp/.ember/main.py".into(),
        args: vec!["a1".into()],
    }));
    r.files =
        vec![FileSpec { path: "/tmp/.ember/main.py".into(), content: code.as_bytes().to_vec(), mode: 0o644 }];
    r.timeout_ms = 20_000;
    r
}

async fn run_py(vm: &Vm, code: &str) -> anyhow::Result<ExecOutput> {
    vm.agent().run(py(code)).await.with_context(|| format!("running python {code:?}"))
}

/// The pid of the guest's Python fork server.
async fn fork_server_pid(vm: &Vm) -> anyhow::Result<String> {
    let s = stdout(
        vm,
        "for p in /proc/[0-9]*; do [ \"$(cat $p/comm 2>/dev/null)\" = python3 ] && \
         grep -qs forkserver.py $p/cmdline && echo ${p#/proc/}; done; true",
    )
    .await?;
    ensure!(s.lines().count() == 1, "expected one fork server, found {s:?}");
    Ok(s.trim().to_string())
}

/// Python calls are forked from the pre-warmed server, confined like any
/// command (user, cgroup and pids limit, own IPC namespace), with python3's
/// semantics, and much faster than starting an interpreter.
async fn python_is_forked_warm_and_confined(vm: &Vm) -> anyhow::Result<()> {
    // A boot does not wait for the server's imports; a pool does.
    vm.wait_python_ready(Duration::from_secs(60)).await?;
    let server = fork_server_pid(vm).await?;
    let who = "import os, sys\n\
               print(os.getppid(), os.getuid(), os.getgid(), os.getgroups(), __name__, sys.argv[1:])\n\
               cg = open('/proc/self/cgroup').read().strip().split(':')[-1]\n\
               print(cg.startswith('/ember/exec-'), open('/sys/fs/cgroup' + cg + '/pids.max').read().strip())\n";
    let out = run_py(vm, who).await?;
    ensure!(out.status.code == Some(0), "{:?} {}", out.status, String::from_utf8_lossy(&out.stderr));
    ensure_eq!(String::from_utf8(out.stdout)?, format!("{server} 1000 1000 [] __main__ ['a1']\nTrue 1024\n"));
    // SysV IPC objects live in the call's own namespace and die with it.
    let ipc = "import ctypes; c = ctypes.CDLL(None); print(c.shmget(0x454d44, 4096, 0o1600) >= 0)";
    ensure_eq!(run_py(vm, ipc).await?.stdout, b"True\n".to_vec());
    ensure_eq!(stdout(vm, "cat /proc/sysvipc/shm | wc -l").await?, "1\n");
    // Exit codes, exceptions, syntax errors, stdin, non-UTF-8 output.
    ensure_eq!(run_py(vm, "import sys; sys.exit(3)").await?.status.code, Some(3));
    let e = run_py(vm, "raise KeyError('k')").await?;
    ensure!(e.status.code == Some(1) && String::from_utf8_lossy(&e.stderr).ends_with("KeyError: 'k'\n"));
    let e = run_py(vm, "def (:").await?;
    ensure!(e.status.code == Some(1) && String::from_utf8_lossy(&e.stderr).contains("SyntaxError"));
    let mut r = py("import sys; print(sys.stdin.read().upper(), end='')");
    r.stdin = b"shout".to_vec();
    ensure_eq!(vm.agent().run(r).await?.stdout, b"SHOUT".to_vec());
    ensure_eq!(
        run_py(vm, "import sys; sys.stdout.buffer.write(bytes([0xff, 0, 0xfe]))").await?.stdout,
        vec![0xff, 0, 0xfe]
    );
    // The output cap holds.
    let mut r = py("import sys\nfor _ in range(100): sys.stdout.write('x' * 10000)");
    r.output_limit = 5000;
    let out = vm.agent().run(r).await?;
    ensure!(out.status.truncated && out.stdout.len() == 5000, "{:?} {}", out.status, out.stdout.len());
    // A timeout kills the forked child and what it started.
    let mut r = py("import subprocess, time\nsubprocess.Popen(['sleep', '300'])\nsubprocess.Popen('setsid sleep 301 &', shell=True)\ntime.sleep(300)");
    r.timeout_ms = 2000;
    let out = vm.agent().run(r).await?;
    ensure!(out.status.timed_out, "{:?}", out.status);
    ensure_eq!(count_procs(vm, "sleep").await?, 0);
    // Interpreter state does not carry over from call to call.
    run_py(vm, "import json, builtins; json.dumps = None; builtins.LEAK = 1").await?;
    ensure_eq!(
        run_py(vm, "import json, builtins; print(json.dumps([1]), hasattr(builtins, 'LEAK'))").await?.stdout,
        b"[1] False\n".to_vec()
    );
    // Faster than starting an interpreter (informational figures).
    let mut forked = Vec::new();
    let mut executed = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        run_py(vm, "import json; print(json.dumps([1]))").await?;
        forked.push(t.elapsed());
        let t = Instant::now();
        stdout(vm, "python3 -c 'import json; print(json.dumps([1]))'").await?;
        executed.push(t.elapsed());
    }
    forked.sort();
    executed.sort();
    println!("    python one-liner: forked p50 {:?}, fresh interpreter p50 {:?}", forked[2], executed[2]);
    ensure!(
        forked[2] < executed[2],
        "forking ({:?}) should beat a fresh interpreter ({:?})",
        forked[2],
        executed[2]
    );
    ensure_eq!(fork_server_pid(vm).await?, server);
    Ok(())
}

/// Scrub: everything a user can leave is removed, the fork server stays,
/// and the VM is what it was, without a memory or disk reset.
async fn scrub_leaves_nothing_behind(vm: &Vm) -> anyhow::Result<()> {
    // Earlier cases left files (e.g. /tmp/.ember): start from a scrubbed VM.
    vm.agent().scrub().await?;
    let before = process_names(vm).await?;
    let listing = "ls -la /tmp /var/tmp /dev/shm ~ | sed 's/ [A-Z][a-z][a-z] .*:.. / /'";
    let fresh = stdout(vm, listing).await?;
    let mut dirty =
        sh("echo a > /tmp/a; echo b > ~/b; mkdir -p ~/.hidden && echo c > ~/.hidden/c; chmod 700 ~; \
         echo d > /var/tmp/d; echo e > /dev/shm/e; mkfifo /tmp/fifo; ln -s /etc/passwd ~/link; \
         setsid sh -c 'sleep 1000 &' </dev/null >/dev/null 2>&1; \
         (trap '' TERM HUP; exec sleep 999) >/dev/null 2>&1 &");
    dirty.kill_leftovers = false;
    vm.agent().run(dirty).await?;
    vm.agent()
        .configure(Configure {
            hostname: Some("dirty".into()),
            dns: vec!["192.0.2.53".into()],
            ..Default::default()
        })
        .await?;
    ensure!(count_procs(vm, "sleep").await? >= 2, "the test failed to leave processes behind");
    let t = Instant::now();
    vm.agent().scrub().await?;
    println!("    scrub took {:?}", t.elapsed());
    ensure_eq!(process_names(vm).await?, before);
    ensure_eq!(stdout(vm, listing).await?, fresh);
    ensure_eq!(
        stdout(vm, "hostname; cat /etc/resolv.conf 2>/dev/null || echo no-resolv").await?,
        "ember\nno-resolv\n"
    );
    Ok(())
}

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
            raw.scratch = ember_vm::vm::ScratchKind::RawCopy;
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
            zc.scratch = ember_vm::vm::ScratchKind::RawCopy;
            zc.storage = ember_vm::storage::StorageConfig::Zfs(ember_vm::storage::ZfsConfig {
                parent: parent.clone(),
                mode: ember_vm::storage::ZfsMode::Dataset,
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
