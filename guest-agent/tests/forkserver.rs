//! Component tests of the pre-warmed Python: the real agent session, the
//! real `forkserver.py` (run by the host's python3 as the current user: no
//! cgroups, no uid switch) and the real host client over a duplex. Only
//! benign scripts; the confinement (uid, cgroup, pids limit) is tested in
//! real VMs (`pool/tests/vm`).

#![allow(clippy::unwrap_used)] // test fixtures

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ember_channel::AgentClient;
use ember_guest_agent::{Agent, ForkServer, GuestLayout, ReapMode, Reaper};
use ember_wire::{Command, ExecRequest, FileSpec, PythonScript};

struct Harness {
    client: AgentClient,
    dir: tempfile::TempDir,
    server_pid: Option<i32>,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../initrd/overlay-rootfs/usr/lib/ember/forkserver.py")
}

async fn start(with_server: bool) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let sockets = dir.path().join("sock");
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let mut layout = GuestLayout::guest();
    layout.workspace = work.clone();
    layout.scratch_dirs = vec![work];
    layout.user = None;
    // As an image's recipe would set them (/etc/ember/env, /etc/ember/preload).
    layout.image_env.insert("EMBER_IMAGE_VAR".into(), "from the image".into());
    layout.preload = vec!["wave".into()];
    let reaper = Reaper::start(ReapMode::Registered).unwrap();
    let forkserver = if with_server {
        let s = ForkServer::start(&reaper, Path::new("/usr/bin/python3"), &script(), &sockets, &layout).await;
        let s = s.expect("the fork server starts with the host's python3");
        assert!(s.wait_ready(std::time::Duration::from_secs(30)).await, "the fork server got ready");
        Some(s)
    } else {
        None
    };
    let server_pid = forkserver.as_ref().map(|s| s.pid());
    let agent = Arc::new(Agent {
        layout,
        reaper,
        cgroups: None,
        power_off_on_shutdown: false,
        forkserver,
        baseline: None,
        processes: Default::default(),
        lane: Default::default(),
    });
    let (host, guest) = tokio::io::duplex(1 << 16);
    tokio::spawn(ember_guest_agent::serve(agent, guest));
    Harness { client: AgentClient::new(host), dir, server_pid }
}

fn py(code: &str, args: &[&str]) -> ExecRequest {
    let mut r = ExecRequest::new(Command::Python(PythonScript {
        path: "main.py".into(),
        args: args.iter().map(|a| a.to_string()).collect(),
    }));
    r.files = vec![FileSpec { path: "main.py".into(), content: code.as_bytes().to_vec(), mode: 0o644 }];
    r.timeout_ms = 10_000;
    r
}

/// The pid of the process that ran the script and its parent.
const WHO: &str = "import os; print(os.getpid(), os.getppid())";

#[tokio::test]
async fn a_python_call_is_forked_from_the_server() {
    let h = start(true).await;
    let out = h.client.run(py(WHO, &[])).await.unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let ppid: i32 = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert_eq!(Some(ppid), h.server_pid, "the child's parent is the server");
    // Without a server the same request starts an interpreter.
    let plain = start(false).await;
    let out = plain.client.run(py(WHO, &[])).await.unwrap();
    assert_eq!(out.status.code, Some(0));
    assert_ne!(String::from_utf8(out.stdout).unwrap().split_whitespace().nth(1).map(str::to_string), None);
}

#[tokio::test]
async fn main_argv_path_stdin_env_and_cwd_are_as_python3_gives_them() {
    let h = start(true).await;
    let code = "import sys, os\n\
                print(__name__, sys.argv, os.path.basename(__file__))\n\
                print(sys.path[0] == os.getcwd(), os.environ['GREETING'], os.environ['HOME'] != '')\n\
                print(repr(sys.stdin.read()))\n\
                import json; print(json.dumps({'a': 1}))\n";
    let mut req = py(code, &["x", "y z"]);
    req.stdin = b"line one\nline two\n".to_vec();
    req.env.insert("GREETING".into(), "hi".into());
    let out = h.client.run(req).await.unwrap();
    assert_eq!(out.status.code, Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "__main__ ['main.py', 'x', 'y z'] main.py\nTrue hi True\n'line one\\nline two\\n'\n{\"a\": 1}\n"
    );
}

#[tokio::test]
async fn the_image_env_reaches_every_call_and_its_modules_are_preloaded() {
    let h = start(true).await;
    let code = "import os, sys; print(os.environ['EMBER_IMAGE_VAR'], 'wave' in sys.modules)";
    let out = h.client.run(py(code, &[])).await.unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "from the image True\n");
    // The request's own environment wins over the image's.
    let mut req = py(code, &[]);
    req.env.insert("EMBER_IMAGE_VAR".into(), "from the call".into());
    let out = h.client.run(req).await.unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "from the call True\n");
    // A command sees the image's environment too.
    let out = h.client.run(ExecRequest::new(Command::Shell("echo $EMBER_IMAGE_VAR".into()))).await.unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "from the image\n");
}

#[tokio::test]
async fn exit_codes_exceptions_and_syntax_errors() {
    let h = start(true).await;
    let out = h.client.run(py("import sys; print('bye'); sys.exit(3)", &[])).await.unwrap();
    assert_eq!((out.status.code, out.stdout), (Some(3), b"bye\n".to_vec()));
    let out = h.client.run(py("import sys; sys.exit('fatal: no input')", &[])).await.unwrap();
    assert_eq!((out.status.code, out.stderr), (Some(1), b"fatal: no input\n".to_vec()));

    let out = h.client.run(py("def f():\n    raise ValueError('boom')\nf()\n", &[])).await.unwrap();
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code, Some(1));
    assert!(err.starts_with("Traceback (most recent call last):\n  File \"main.py\", line 3"), "{err}");
    assert!(err.ends_with("ValueError: boom\n"), "{err}");
    assert!(!err.contains("forkserver"), "the server's own frames are hidden: {err}");

    let out = h.client.run(py("def (:\n", &[])).await.unwrap();
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code, Some(1));
    assert!(err.contains("File \"main.py\", line 1") && err.contains("SyntaxError"), "{err}");
}

#[tokio::test]
async fn output_is_flushed_binary_safe_and_capped() {
    let h = start(true).await;
    let out = h
        .client
        .run(py("import sys; sys.stdout.write('a'); sys.stdout.flush(); sys.stdout.buffer.write(b'\\xff\\x00'); print('b', file=sys.stderr)", &[]))
        .await
        .unwrap();
    assert_eq!(out.stdout, b"a\xff\x00");
    assert_eq!(out.stderr, b"b\n");
    let mut req = py("print('x' * 100000)", &[]);
    req.output_limit = 1000;
    let out = h.client.run(req).await.unwrap();
    assert!(out.status.truncated);
    assert_eq!(out.stdout.len(), 1000);
}

#[tokio::test]
async fn interpreter_state_does_not_leak_between_calls() {
    let h = start(true).await;
    let mutate = "import json, sys\n\
                  json.dumps = lambda *a, **k: 'patched'\n\
                  sys.modules['leaked'] = sys\n\
                  import builtins; builtins.LEAK = 1\n\
                  print(json.dumps(1))\n";
    let out = h.client.run(py(mutate, &[])).await.unwrap();
    assert_eq!(out.stdout, b"patched\n");
    let check = "import json, sys, builtins\n\
                 print(json.dumps(1), 'leaked' in sys.modules, hasattr(builtins, 'LEAK'))\n";
    let out = h.client.run(py(check, &[])).await.unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "1 False False\n");
    // Each call draws its own random numbers.
    let rnd = "import random; print(random.random())";
    let a = h.client.run(py(rnd, &[])).await.unwrap().stdout;
    let b = h.client.run(py(rnd, &[])).await.unwrap().stdout;
    assert_ne!(a, b);
}

#[tokio::test]
async fn a_timeout_kills_the_forked_tree() {
    let h = start(true).await;
    let marker = h.dir.path().join("work/child-pid");
    let code = format!(
        "import os, time, subprocess\n\
         p = subprocess.Popen(['sleep', '60'])\n\
         open({:?}, 'w').write(str(p.pid))\n\
         print('started', flush=True)\n\
         time.sleep(60)\n",
        marker.display().to_string()
    );
    let mut req = py(&code, &[]);
    req.timeout_ms = 1500;
    let started = std::time::Instant::now();
    let out = h.client.run(req).await.unwrap();
    assert!(out.status.timed_out);
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    let pid: i32 = std::fs::read_to_string(&marker).unwrap().parse().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while Path::new(&format!("/proc/{pid}")).exists() {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.contains(") Z ") {
            break; // killed, waiting for its reaper
        }
        assert!(std::time::Instant::now() < deadline, "grandchild {pid} survived the timeout");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // The server still serves.
    let out = h.client.run(py("print(1)", &[])).await.unwrap();
    assert_eq!(out.stdout, b"1\n");
}

#[tokio::test]
async fn interpreter_start_up_settings_fall_back_to_a_fresh_interpreter() {
    let h = start(true).await;
    let mut req = py(WHO, &[]);
    req.env.insert("PYTHONHASHSEED".into(), "0".into());
    let out = h.client.run(req).await.unwrap();
    let ppid: i32 =
        String::from_utf8(out.stdout).unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    assert_ne!(Some(ppid), h.server_pid, "PYTHON* variables need a fresh interpreter");
}
