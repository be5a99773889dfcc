//! Cases on one booted VM, through its agent: commands, output, files,
//! limits, cancellation, hostile frames, configure, reset, Python, scrub.

use super::*;

pub(crate) async fn echo_and_exit_codes(vm: &Vm) -> anyhow::Result<()> {
    let out = run(vm, "echo hello; exit 3").await?;
    ensure_eq!(out.stdout, b"hello\n".to_vec());
    ensure_eq!(out.status.code, Some(3));
    let f = vm.agent().run(ExecRequest::new(Command::Argv(vec!["false".into()]))).await?;
    ensure_eq!(f.status.code, Some(1));
    Ok(())
}

pub(crate) async fn stderr_is_separate(vm: &Vm) -> anyhow::Result<()> {
    let out = run(vm, "echo out; echo err >&2").await?;
    ensure_eq!((out.stdout, out.stderr), (b"out\n".to_vec(), b"err\n".to_vec()));
    Ok(())
}

pub(crate) async fn stdin_is_delivered(vm: &Vm) -> anyhow::Result<()> {
    let mut req = sh("wc -c; head -c 3 /dev/null");
    req.stdin = vec![b'x'; 100_000];
    let out = vm.agent().run(req).await?;
    ensure_eq!(String::from_utf8(out.stdout)?.trim(), "100000");
    Ok(())
}

pub(crate) async fn env_and_defaults(vm: &Vm) -> anyhow::Result<()> {
    let mut req = sh("echo \"$MY_VAR|$HOME|$USER|$(pwd)|$(id -u)\"");
    req.env.insert("MY_VAR".into(), "a b=c".into());
    let out = vm.agent().run(req).await?;
    ensure_eq!(String::from_utf8(out.stdout)?, "a b=c|/home/ember|ember|/home/ember|1000\n");
    Ok(())
}

pub(crate) async fn non_utf8_output_survives(vm: &Vm) -> anyhow::Result<()> {
    let out = run(vm, r"printf '\377\376\000\303('").await?;
    ensure_eq!(out.stdout, b"\xff\xfe\x00\xc3(".to_vec());
    Ok(())
}

pub(crate) async fn python3_runs(vm: &Vm) -> anyhow::Result<()> {
    let s = stdout(vm, "python3 -c 'import json; print(json.dumps({\"sum\": sum(range(10))}))'").await?;
    ensure_eq!(s, "{\"sum\": 45}\n");
    Ok(())
}

pub(crate) async fn timeout_kills_the_process_tree(vm: &Vm) -> anyhow::Result<()> {
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

pub(crate) async fn daemonized_processes_die_with_the_command(vm: &Vm) -> anyhow::Result<()> {
    // setsid + double fork escapes the process group, not the cgroup.
    run(vm, "setsid sh -c 'sleep 200 &' </dev/null >/dev/null 2>&1").await?;
    ensure_eq!(count_procs(vm, "sleep").await?, 0);
    Ok(())
}

pub(crate) async fn orphans_are_reaped(vm: &Vm) -> anyhow::Result<()> {
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

pub(crate) async fn output_cap(vm: &Vm) -> anyhow::Result<()> {
    let mut req = sh("head -c 5000000 /dev/zero; echo done >&2");
    req.output_limit = 10_000;
    let out = vm.agent().run(req).await?;
    ensure!(out.status.truncated);
    ensure_eq!(out.stdout.len() + out.stderr.len(), 10_000);
    ensure_eq!(out.status.code, Some(0));
    Ok(())
}

pub(crate) async fn write_files_and_read_back(vm: &Vm) -> anyhow::Result<()> {
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

pub(crate) async fn user_is_unprivileged_and_root_is_read_only(vm: &Vm) -> anyhow::Result<()> {
    let out = run(vm, "touch /etc/x 2>&1; touch /x 2>&1; echo ok > /tmp/t && echo ok > ~/t && echo writable")
        .await?;
    let s = String::from_utf8(out.stdout)?;
    ensure!(s.contains("Read-only file system") || s.contains("Permission denied"), "{s}");
    ensure!(s.ends_with("writable\n"), "{s}");
    Ok(())
}

/// A server a command starts is reachable on localhost inside the VM.
pub(crate) async fn localhost_reaches_a_server_in_the_vm(vm: &Vm) -> anyhow::Result<()> {
    let cmd = "mkdir -p /tmp/www && echo local > /tmp/www/index.html; busybox httpd -f -p 127.0.0.1:8123 -h /tmp/www & \
               p=$!; sleep 0.5; curl -s -m 5 http://127.0.0.1:8123/; kill $p";
    ensure_eq!(stdout(vm, cmd).await?, "local\n");
    Ok(())
}

/// The guest user may not make user namespaces unless the host allows it
/// (`[vm] user_namespaces`): `unshare --user` fails, the sysctl says 0.
pub(crate) async fn user_namespaces_are_off(vm: &Vm) -> anyhow::Result<()> {
    user_namespaces_are(vm, false).await
}

pub(crate) async fn user_namespaces_are(vm: &Vm, on: bool) -> anyhow::Result<()> {
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

pub(crate) async fn pids_limit_contains_a_fork_bomb(vm: &Vm) -> anyhow::Result<()> {
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

pub(crate) async fn requests_run_concurrently(vm: &Vm) -> anyhow::Result<()> {
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

pub(crate) async fn cancel_kills_the_command(vm: &Vm) -> anyhow::Result<()> {
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

pub(crate) async fn malformed_frames_are_survived(vm: &Vm) -> anyhow::Result<()> {
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

pub(crate) async fn configure_in_one_round_trip(vm: &Vm) -> anyhow::Result<()> {
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

pub(crate) async fn reset_leaves_nothing_behind(vm: &Vm) -> anyhow::Result<()> {
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

/// A Python script call (the pre-warmed server's path), with its file.
pub(crate) fn py(code: &str) -> ExecRequest {
    let mut r = ExecRequest::new(Command::Python(ember_wire::PythonScript {
        path: "/tmp/.ember/main.py".into(),
        args: vec!["a1".into()],
    }));
    r.files =
        vec![FileSpec { path: "/tmp/.ember/main.py".into(), content: code.as_bytes().to_vec(), mode: 0o644 }];
    r.timeout_ms = 20_000;
    r
}

pub(crate) async fn run_py(vm: &Vm, code: &str) -> anyhow::Result<ExecOutput> {
    vm.agent().run(py(code)).await.with_context(|| format!("running python {code:?}"))
}

/// The pid of the guest's Python fork server.
pub(crate) async fn fork_server_pid(vm: &Vm) -> anyhow::Result<String> {
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
pub(crate) async fn python_is_forked_warm_and_confined(vm: &Vm) -> anyhow::Result<()> {
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
pub(crate) async fn scrub_leaves_nothing_behind(vm: &Vm) -> anyhow::Result<()> {
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
