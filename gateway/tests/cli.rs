//! End-to-end tests of the `ember` binary: real VMs, called as a user would.
#![allow(clippy::unwrap_used)] // test fixtures

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn images() -> PathBuf {
    std::env::var_os("EMBER_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/images"))
}

/// Whether the VM cases can run here (else each says SKIP and passes).
fn vms() -> bool {
    ember_testkit::vms_can_run("cli", &images())
}

/// `ember` with images and a per-test state dir (fixed, so a killed run is
/// reaped by the next).
fn ember(state: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ember"));
    c.env("EMBER_IMAGES", images()).env("EMBER_STATE_DIR", std::env::temp_dir().join(state));
    c
}

fn run(state: &str, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = ember(state)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn output_and_exit_code_pass_through() {
    if !vms() {
        return;
    }
    let out = run("ember-cli-a", &["vm", "run", "--", "sh", "-c", "echo hi; echo err >&2; exit 3"], b"");
    assert_eq!(out.stdout, b"hi\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("err"));
    assert_eq!(out.status.code(), Some(3));
}

#[test]
fn stdin_env_and_python() {
    if !vms() {
        return;
    }
    let out = run(
        "ember-cli-b",
        &[
            "vm",
            "run",
            "-e",
            "N=6",
            "--",
            "python3",
            "-c",
            "import os,sys; print(len(sys.stdin.read()) * int(os.environ['N']))",
        ],
        b"1234567",
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "42\n",
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn timeout_exits_124() {
    if !vms() {
        return;
    }
    let t = Instant::now();
    let out = run("ember-cli-c", &["vm", "run", "--timeout", "1s", "--", "sleep", "60"], b"");
    assert_eq!(out.status.code(), Some(124), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(t.elapsed() < Duration::from_secs(30));
}

#[test]
fn usage_errors_are_clear() {
    let out = ember("ember-cli-d").args(["vm", "run", "--channel", "tcp", "--", "true"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown channel"));
    let out =
        ember("ember-cli-d").args(["vm", "run", "--images", "/nonexistent", "--", "true"]).output().unwrap();
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("vmlinuz") && err.contains("make images"), "{err}");
}

fn alive(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    !stat.is_empty() && !stat.contains(") Z")
}

fn wait_for<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kill `ember` hard while its VM runs: QEMU (its own process group)
/// survives, and the next ember start must find and kill it.
#[test]
fn a_crashed_run_is_reaped_by_the_next() {
    if !vms() {
        return;
    }
    let state = std::env::temp_dir().join("ember-cli-crash");
    let mut first = ember("ember-cli-crash")
        .args(["vm", "run", "--", "sleep", "600"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let owner = format!("{}-", first.id());
    let pids_file = wait_for("the VM to record its pids", || {
        let owners = std::fs::read_dir(state.join("owners")).ok()?;
        let mine = owners.flatten().find(|e| e.file_name().to_string_lossy().starts_with(&owner))?;
        let vm = std::fs::read_dir(mine.path().join("vms")).ok()?.flatten().next()?;
        let pids = vm.path().join("pids");
        pids.exists().then_some(pids)
    });
    let qemu: i32 = wait_for("the qemu pid", || {
        std::fs::read_to_string(&pids_file).ok()?.lines().next()?.trim().parse().ok()
    });
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(alive(qemu), "qemu died with its owner; the test proves nothing");

    let out = run("ember-cli-crash", &["vm", "run", "--", "true"], b"");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for("the orphaned qemu to die", || (!alive(qemu)).then_some(()));
    assert!(!pids_file.exists(), "the dead owner's state was not removed");
}

/// `ember vm bench` on the serial channel, cold and template-restored, with
/// idle gaps: JSON with every figure, and nothing left in its state dir.
#[test]
fn vm_bench_measures_cold_and_restored_vms() {
    if !vms() {
        return;
    }
    let state = std::env::temp_dir().join("ember-cli-bench");
    let out = run(
        "ember-cli-bench",
        &[
            "vm",
            "bench",
            "--boots",
            "1",
            "--execs",
            "3",
            "--init-modes",
            "fast",
            "--channels",
            "serial",
            "--restored",
            "--gap",
            "50ms",
            "--json",
        ],
        b"",
    );
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let execs = report["execs"].as_array().unwrap();
    let starts: Vec<&str> = execs.iter().map(|e| e["start"].as_str().unwrap()).collect();
    assert_eq!(starts, ["cold", "restored"]);
    for e in execs {
        let (rtt, guest) =
            (e["true_round_trip"]["p50_ms"].as_f64().unwrap(), e["in_guest"]["p50_ms"].as_f64().unwrap());
        assert!(guest > 0.0 && guest < rtt, "in-guest {guest} ms must be inside the round trip {rtt} ms");
        assert_eq!(e["idle_hello"]["n"], 3, "{e}");
        assert!(e["around_exec"]["p50_ms"].as_f64().unwrap() > 0.0);
    }
    let owners = std::fs::read_dir(state.join("owners")).map(|d| d.count()).unwrap_or(0);
    assert_eq!(owners, 0, "vm bench left an owner directory behind");
}

/// `ember` finds its recipes, scripts and images wherever it is run from:
/// the checkout's binary run from `/`, and a copy installed under a prefix
/// (`PREFIX/bin/ember`, `PREFIX/share/ember/{initrd,images}`), with no
/// `EMBER_IMAGES` to help.
#[test]
fn the_binary_finds_its_home_from_anywhere() {
    if !vms() {
        return;
    }
    let names = |exe: &Path| {
        let out = Command::new(exe)
            .args(["images", "list", "--json"])
            .current_dir("/")
            .env_remove("EMBER_IMAGES")
            .env_remove("EMBER_HOME")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{}: {}", exe.display(), String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|l| l["state"] == "built")
            .map(|l| l["name"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert!(names(Path::new(env!("CARGO_BIN_EXE_ember"))).contains(&"default".to_string()));
    let prefix = tempfile::tempdir().unwrap();
    let (bin, share) = (prefix.path().join("bin"), prefix.path().join("share/ember"));
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&share).unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_ember"), bin.join("ember")).unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().unwrap();
    std::os::unix::fs::symlink(repo.join("initrd"), share.join("initrd")).unwrap();
    // The installed images: the shared parts and `default` only, so a
    // listing without python-data shows the install's own were read.
    let images_dir = share.join("images");
    std::fs::create_dir_all(&images_dir).unwrap();
    for entry in std::fs::read_dir(images()).unwrap().flatten() {
        let name = entry.file_name();
        if name == "python-data" || entry.path().canonicalize().is_err() {
            continue;
        }
        std::os::unix::fs::symlink(entry.path().canonicalize().unwrap(), images_dir.join(&name)).unwrap();
    }
    let installed = names(&bin.join("ember"));
    assert!(installed.contains(&"default".to_string()), "{installed:?}");
    assert!(
        !installed.contains(&"python-data".to_string()),
        "the checkout's images were read: {installed:?}"
    );
}

/// `ember images list` knows both shipped images (built by `make images`),
/// `build` of a current image reuses the cache, and errors name the problem.
#[test]
fn images_list_build_and_their_errors() {
    if !vms() {
        return;
    }
    let out = ember("ember-cli-img").args(["images", "list", "--json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let names: Vec<&str> = lines.iter().map(|l| l["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"default") && names.contains(&"python-data"), "{names:?}");
    for l in &lines {
        assert_eq!(l["state"], "built", "{l}");
        assert!(l["image"]["rootfs_bytes"].as_u64().unwrap() > 100_000_000, "{l}");
    }
    // Current in the cache: a rebuild is a no-op that says so.
    let t = Instant::now();
    let out = ember("ember-cli-img").args(["images", "build", "default"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("default: up to date"));
    assert!(t.elapsed() < Duration::from_secs(30), "an up-to-date build took {:?}", t.elapsed());
    let out = ember("ember-cli-img").args(["images", "build", "no-such"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown image \"no-such\"") && err.contains("default, python-data"), "{err}");
}

/// `ember images import` refuses a tarball that would write outside its
/// root, naming the member, and leaves nothing behind.
#[test]
fn images_import_refuses_an_escaping_tarball() {
    if !vms() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tarball = dir.path().join("evil.tar");
    let status = Command::new("sh")
        .current_dir(dir.path())
        .args(["-c", "mkdir -p r/bin && cp /bin/busybox r/bin/sh && ln -s /etc r/escape && tar -C r -cf evil.tar bin escape && mkdir -p x/escape && echo owned > x/escape/ember-test-owned && tar -C x -rf evil.tar escape/ember-test-owned"])
        .status()
        .unwrap();
    assert!(status.success());
    let out = ember("ember-cli-img")
        .env("EMBER_CACHE", dir.path().join("cache"))
        .args(["images", "import", "evil", tarball.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(err.contains("escape/ember-test-owned") && err.contains("through the symlink escape"), "{err}");
    assert!(!Path::new("/etc/ember-test-owned").exists(), "the import wrote into the host's /etc");
    let left: Vec<_> = std::fs::read_dir(dir.path().join("cache/images"))
        .map(|d| {
            d.flatten().map(|e| e.file_name()).filter(|n| n.to_string_lossy().contains(".tmp.")).collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Beyond loopback only with keys: without any, `ember serve` refuses to
/// start (exit 64) and says how to make one; with a key it starts (here it
/// stops at the image check, past the refusal). Nothing boots either way.
#[test]
fn serve_refuses_a_network_address_without_keys() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.json");
    let serve = |extra: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_ember"));
        c.args(["serve", "--listen", "0.0.0.0:0"])
            .args(extra)
            .env("EMBER_KEYS", &keys)
            .env("EMBER_IMAGES", dir.path().join("no-images"))
            .env("EMBER_STATE_DIR", dir.path().join("state"))
            .env("EMBER_SESSIONS_DIR", dir.path().join("sessions"))
            .output()
            .unwrap()
    };
    let out = serve(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("without API keys") && err.contains("ember keys create"), "{err}");

    let key = Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(["keys", "create", "ops", "--admin", "--keys-file"])
        .arg(&keys)
        .output()
        .unwrap();
    assert!(key.status.success(), "{}", String::from_utf8_lossy(&key.stderr));
    for extra in [&[][..], &["--insecure-no-auth"][..]] {
        let out = serve(extra);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("without API keys"), "{extra:?}: {err}");
    }
    std::fs::remove_file(&keys).unwrap();
    let out = serve(&["--insecure-no-auth"]);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("without API keys"));
}

/// `ember keys`: a key printed once, its name listed (never its secret),
/// bad names and double names refused with exit 64, revoked by name.
#[test]
fn keys_are_created_listed_and_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.json");
    let ember_keys = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_ember"))
            .arg("keys")
            .args(args)
            .arg("--keys-file")
            .arg(&keys)
            .output()
            .unwrap()
    };
    let out = ember_keys(&["create", "team-a", "--sessions", "3", "--calls-per-second", "2.5"]);
    assert!(out.status.success());
    let secret = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(secret.starts_with("ember_") && secret.len() >= 40, "{secret}");
    let listed = ember_keys(&["list"]);
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(
        text.contains("team-a") && text.contains("\"sessions\":3") && !text.contains(&secret[6..]),
        "{text}"
    );
    for bad in [&["create", "Team A"][..], &["create", "team-a"][..], &["revoke", "nobody"][..]] {
        let out = ember_keys(bad);
        assert_eq!(out.status.code(), Some(64), "{bad:?}");
        assert!(!out.stderr.is_empty());
    }
    assert!(ember_keys(&["revoke", "team-a"]).status.success());
    assert!(!String::from_utf8_lossy(&ember_keys(&["list"]).stdout).contains("team-a"));
}
