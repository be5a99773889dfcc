//! Images on real VMs: every shipped image boots and has its tools; the
//! adversarial reset test on a second image; two images' pools under load
//! stay apart; a real build with a package that does not exist fails naming
//! it; a real root tarball imports and boots; a root with nothing but a
//! busybox `/bin/sh` imports, boots, and its files are served.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use ember_image::ImageSet;
use ember_image::{Catalog, ImageError, ImagesConfig};
use ember_pool::pool::MemoryBudget;
use ember_testkit::ensure_eq;
use ember_vm::VmConfig;
use ember_vm::{Vm, VmHost};

use super::{images_dir, py, stdout, VmPool};

/// A VM config for shipped image `name`, as `ember serve` makes it: the
/// recipe's memory and warm command.
pub fn config_for(name: &str, state_dir: &Path) -> anyhow::Result<VmConfig> {
    let dir = images_dir();
    let info =
        ember_image::read_info(&dir.join(name)).with_context(|| format!("image {name} is not built"))?;
    let mut c = VmConfig::with_images(ImageSet::for_image(&dir, name).map_err(anyhow::Error::msg)?);
    c.image = name.to_string();
    c.memory_mb = info.memory_mb.unwrap_or(c.memory_mb);
    c.warm = info.warm;
    c.state_dir = state_dir.to_path_buf();
    Ok(c)
}

pub async fn default_image_has_its_tools(vm: &Vm) -> anyhow::Result<()> {
    ensure_eq!(stdout(vm, "cat /etc/ember/image").await?, "default\n");
    for (cmd, expect) in [
        ("ps -o pid= -p 1", "1"),
        ("free -m | head -1", "total"),
        ("ip -V", "iproute2"),
        ("curl --version | head -1", "curl "),
        ("git --version", "git version"),
        ("jq --version", "jq-"),
        ("file --version | head -1", "file-"),
        ("sqlite3 --version", "3."),
        ("xz --version | head -1", "xz (XZ Utils)"),
        ("unzip -v | head -1", "UnZip"),
        ("less --version | head -1", "less "),
        ("python3 -m pip --version", "pip "),
        // Without pip: ensurepip alone takes longer than a test's 20 s under TCG.
        (
            "python3 -m venv --without-pip /tmp/v && /tmp/v/bin/python -c 'import sys; print(sys.prefix)'",
            "/tmp/v",
        ),
    ] {
        let out = stdout(vm, cmd).await?;
        ensure!(out.contains(expect), "{cmd:?} printed {out:?}, expected {expect:?}");
    }
    Ok(())
}

pub async fn python_data_has_numpy_pandas_and_plots(vm: &Vm) -> anyhow::Result<()> {
    ensure_eq!(stdout(vm, "cat /etc/ember/image").await?, "python-data\n");
    // Forked from the pre-warmed Python: the modules are already imported.
    let code = "import sys\nwarm = 'pandas' in sys.modules\nimport numpy, pandas\n\
                print(numpy.__version__, pandas.__version__, warm)";
    let t = Instant::now();
    let out = vm.agent().run(py(code)).await?;
    let took = t.elapsed();
    ensure!(out.status.code == Some(0), "{:?} {}", out.status, String::from_utf8_lossy(&out.stderr));
    ensure_eq!(String::from_utf8(out.stdout)?, "1.26.4 2.2.3 True\n");
    println!("    numpy + pandas import, forked from the warm interpreter: {took:?}");
    // A plot to PNG, headless, without a warning on stderr.
    let plot = "import io, matplotlib.pyplot as p\np.plot([1, 3, 2])\nb = io.BytesIO()\n\
                p.savefig(b, format='png')\nprint(b.getvalue()[:4] == b'\\x89PNG', len(b.getvalue()) > 1000)";
    let out = vm.agent().run(py(plot)).await?;
    ensure_eq!(String::from_utf8(out.stdout)?, "True True\n");
    ensure!(out.stderr.is_empty(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    // A fresh interpreter finds the image's environment and caches too.
    let out = stdout(vm, "python3 -c 'import matplotlib; print(matplotlib.get_backend())' 2>&1").await?;
    ensure_eq!(out.trim().to_ascii_lowercase(), "agg");
    Ok(())
}

/// Two images' pools sharing one budget, claimed at once from both: each
/// VM runs its own image, no VM changes pools, and the budget holds; shut
/// down, they give every MiB back.
pub async fn two_images_keep_their_pools_apart(
    default: &VmPool,
    data: &VmPool,
    budget: &MemoryBudget,
) -> anyhow::Result<()> {
    let mut seen: [Vec<String>; 2] = Default::default();
    let started = Instant::now();
    for round in 0..3 {
        let (la, lb) = tokio::join!(default.claim(), data.claim());
        println!("    round {round}: both claimed at {:?}", started.elapsed());
        let (la, lb) = (la?, lb?);
        let (ia, ib) = tokio::join!(stdout(&la, "cat /etc/ember/image"), stdout(&lb, "cat /etc/ember/image"));
        ensure_eq!(
            (ia?.trim().to_string(), ib?.trim().to_string()),
            ("default".to_string(), "python-data".to_string())
        );
        ensure!(
            budget.used_mb() <= budget.limit_mb(),
            "round {round}: the budget is overdrawn: {} MiB",
            budget.used_mb()
        );
        seen[0].push(la.id().to_string());
        seen[1].push(lb.id().to_string());
        tokio::join!(la.release(), lb.release());
    }
    ensure!(seen[0].iter().all(|id| !seen[1].contains(id)), "a VM served both images: {seen:?}");
    println!("    rounds done at {:?}", started.elapsed());
    tokio::join!(default.shutdown(), data.shutdown());
    println!("    shut down at {:?}", started.elapsed());
    // A creation still running at shutdown is destroyed when it ends, and
    // gives its memory back then.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let freed =
        ember_vm::wait_until(deadline, Duration::from_millis(50), || (budget.used_mb() == 0).then_some(()))
            .await;
    ensure!(freed.is_some(), "{} MiB still held after shutdown", budget.used_mb());
    Ok(())
}

/// A catalog over a throw-away cache and images dir that share the real
/// kernel, initrd, base and agent.
fn scratch_catalog(recipes: &Path, work: &Path) -> anyhow::Result<Catalog> {
    let out = work.join("images");
    std::fs::create_dir_all(&out)?;
    for shared in ["vmlinuz", "initrd.img", "base.tar", "ember-agent"] {
        let real =
            images_dir().join(shared).canonicalize().with_context(|| format!("{shared} (make images)"))?;
        std::os::unix::fs::symlink(real, out.join(shared))?;
    }
    let mut cfg = ImagesConfig::new(&out);
    cfg.cache = work.join("cache");
    cfg.recipe_dirs = vec![recipes.to_path_buf()];
    Catalog::load(cfg).map_err(|p| anyhow::anyhow!("{}", p.join("; ")))
}

pub async fn a_recipe_with_a_missing_package_fails_naming_it() -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    let recipes = work.path().join("recipes");
    std::fs::create_dir_all(recipes.join("broken"))?;
    std::fs::write(recipes.join("broken/image.toml"), "packages = [\"jq\", \"ember-no-such-package\"]\n")?;
    let catalog = scratch_catalog(&recipes, work.path())?;
    let err = catalog.build("broken").await.err().context("a build with a missing package succeeded")?;
    let text = err.to_string();
    ensure!(matches!(err, ImageError::Build { .. }), "{text}");
    ensure!(text.contains("image broken") && text.contains("install packages"), "{text}");
    ensure!(text.contains("Unable to locate package ember-no-such-package"), "{text}");
    // Nothing half-made is left: no cache entry, no work dir, no mount.
    let cache: Vec<String> = std::fs::read_dir(work.path().join("cache/images"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".lock") && !n.ends_with(".failed.log"))
        .collect();
    ensure!(cache.is_empty(), "left in the cache: {cache:?}");
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    ensure!(!mounts.contains(&*work.path().to_string_lossy()), "a build mount was left");
    Ok(())
}

/// `ember images import` of a real root (the debootstrap base every recipe
/// starts from, as a user's `docker export` would be): Ember adds its init,
/// agent and user, and the image boots.
pub async fn an_imported_root_boots(state_dir: &Path) -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    let recipes = work.path().join("recipes");
    std::fs::create_dir_all(&recipes)?;
    let catalog = scratch_catalog(&recipes, work.path())?;
    let tarball: PathBuf = images_dir().join("base.tar").canonicalize()?;
    let info = catalog.import("mine", &tarball).await?;
    ensure_eq!(catalog.names(), vec!["mine".to_string()]);
    ensure!(info.rootfs_bytes > 0);
    let again = catalog.import("mine", &tarball).await?;
    ensure_eq!(again.hash, info.hash);
    let mut c = VmConfig::with_images(catalog.image_set("mine").map_err(anyhow::Error::msg)?);
    c.state_dir = state_dir.to_path_buf();
    c.image = "mine".into();
    let host = VmHost::new(c, false)?;
    let vm = host.boot().await.context("booting the imported image")?;
    let checked = async {
        ensure_eq!(
            stdout(&vm, "cat /etc/ember/image; id -u; . /etc/os-release; echo $ID").await?,
            "mine\n1000\ndebian\n"
        );
        Ok(())
    }
    .await;
    vm.shutdown().await;
    host.close().await;
    checked?;
    // A name a recipe has, a bad name, a tarball that is not one.
    let e = catalog.import("Bad/Name", &tarball).await.err().context("a bad name was taken")?;
    ensure!(e.to_string().contains("cannot name an image"), "{e}");
    let junk = work.path().join("junk.tar");
    std::fs::write(&junk, b"not a tarball at all")?;
    let e = catalog.import("junk", &junk).await.err().context("junk was imported")?;
    ensure!(e.to_string().contains("importing image junk"), "{e}");
    Ok(())
}

/// An imported root with nothing but `/bin/sh` (a static busybox, with no
/// applet links): it boots, and every file operation works on it, since
/// the agent does them with its own system calls, no tool of the image.
pub async fn a_busybox_only_root_serves_its_files(state_dir: &Path) -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    let recipes = work.path().join("recipes");
    std::fs::create_dir_all(&recipes)?;
    let catalog = scratch_catalog(&recipes, work.path())?;
    let root = work.path().join("root");
    std::fs::create_dir_all(root.join("bin"))?;
    std::fs::copy("/bin/busybox", root.join("bin/sh")).context("a static busybox (busybox-static)")?;
    // And a directory only root may enter.
    std::fs::create_dir_all(root.join("secret"))?;
    std::fs::write(root.join("secret/x"), b"x")?;
    std::fs::set_permissions(root.join("secret"), std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    let tarball = work.path().join("tiny.tar");
    let tar = std::process::Command::new("tar")
        .args([
            "--owner=0",
            "--group=0",
            "-C",
            &root.to_string_lossy(),
            "-cf",
            &tarball.to_string_lossy(),
            "bin",
            "secret",
        ])
        .status()?;
    ensure!(tar.success(), "tar failed: {tar}");
    catalog.import("tiny", &tarball).await?;
    let mut c = VmConfig::with_images(catalog.image_set("tiny").map_err(anyhow::Error::msg)?);
    c.state_dir = state_dir.to_path_buf();
    c.image = "tiny".into();
    let host = VmHost::new(c, false)?;
    let vm = host.boot().await.context("booting the busybox-only image")?;
    let checked = files_on_a_bare_root(&vm).await;
    vm.shutdown().await;
    host.close().await;
    checked
}

async fn files_on_a_bare_root(vm: &Vm) -> anyhow::Result<()> {
    use ember_channel::AgentError;
    let agent = vm.shared_agent();
    // The root has no coreutils: what the routes once ran cannot start.
    let mut find = ember_wire::ExecRequest::new(ember_wire::Command::Argv(vec!["find".into(), ".".into()]));
    find.timeout_ms = 10_000;
    match agent.run(find).await {
        Err(AgentError::Remote(e)) if e.code == ember_wire::ErrorCode::SpawnFailed => {}
        other => anyhow::bail!("find ran on a busybox-only root: {other:?}"),
    }
    let dir = agent.mkdir("data/sub", true).await?;
    ensure_eq!(
        (dir.kind, dir.path.as_str(), dir.owner.as_str()),
        (ember_wire::FileKind::Directory, "/home/ember/data/sub", "ember")
    );
    let mut up = agent.write_file("data/a.txt").await?;
    up.write(b"hello from the host").await?;
    up.finish().await?;
    let f = agent.stat("data/a.txt").await?;
    ensure_eq!(
        (f.kind, f.size, f.mode_octal(), f.group.as_str()),
        (ember_wire::FileKind::File, 19, "644".to_string(), "ember")
    );
    let mut read = agent.read_file("data/a.txt").await?;
    let mut back = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut read, &mut back).await?;
    ensure_eq!(back, b"hello from the host".to_vec());
    let moved = agent.rename("data/a.txt", "data/sub/b.txt", false).await?;
    ensure_eq!(moved.path.as_str(), "/home/ember/data/sub/b.txt");
    // Across filesystems (the workspace to /tmp's tmpfs): a copy, then the source goes.
    let across = agent.rename("data/sub/b.txt", "/tmp/b.txt", false).await?;
    ensure_eq!((across.size, across.path.as_str()), (19, "/tmp/b.txt"));
    agent.rename("/tmp/b.txt", "data/sub/b.txt", false).await?;
    let listing = agent.list("data", 2, 100).await?;
    let paths: Vec<&str> = listing.entries.iter().map(|e| e.path.as_str()).collect();
    ensure_eq!(paths, vec!["/home/ember/data/sub", "/home/ember/data/sub/b.txt"]);
    // The guest's permissions decide, and the errno says why.
    use std::io::ErrorKind;
    let kind = |e: Option<AgentError>| match e {
        Some(AgentError::Remote(ember_wire::ErrorReply { errno: Some(n), .. })) => {
            Some(std::io::Error::from_raw_os_error(n).kind())
        }
        _ => None,
    };
    ensure_eq!(kind(agent.stat("/secret/x").await.err()), Some(ErrorKind::PermissionDenied));
    // The root is read-only (the API answers EROFS as 403 too).
    ensure_eq!(kind(agent.mkdir("/etc/x", false).await.err()), Some(ErrorKind::ReadOnlyFilesystem));
    ensure_eq!(kind(agent.remove("data", false, false).await.err()), Some(ErrorKind::DirectoryNotEmpty));
    ensure_eq!(kind(agent.stat("data/none").await.err()), Some(ErrorKind::NotFound));
    // A watch is the agent binary itself: it works here too.
    let mut w = agent.watch("data", false, 16, Duration::from_secs(30)).await?;
    let ready = w.next().await.context("no ready line")?;
    ensure!(String::from_utf8_lossy(&ready).contains("\"ready\""), "{ready:?}");
    agent.mkdir("data/new", false).await?;
    let event = tokio::time::timeout(Duration::from_secs(10), w.next()).await?.context("the watch ended")?;
    ensure!(String::from_utf8_lossy(&event).contains("new"), "{:?}", String::from_utf8_lossy(&event));
    drop(w);
    agent.remove("data", true, false).await?;
    ensure!(agent.stat("data").await.is_err(), "data was not removed");
    Ok(())
}

/// An image with a writable root and passwordless sudo (`base-sudo`, the
/// E2B front end's `base`): the user becomes root with `sudo`; root writes
/// anywhere, deletes a file of the image and installs a package; the next
/// claim of the same VM (a snapshot reset) finds none of it. The pool
/// refuses `rollback` for such an image (it would detach the disk the root
/// lives on) and never scrubs its VMs (a scrub would leave the root dirty).
pub async fn a_writable_root_is_reset_with_the_vm(state_dir: &Path) -> anyhow::Result<()> {
    use ember_pool::config::{PoolConfig, ReplenishMode, ResetMode};
    use ember_pool::pool::{Backend as _, Pool, VmBackend};
    use std::sync::Arc;
    let mut c = config_for("base-sudo", state_dir)?;
    c.channel = ember_channel::ChannelChoice::Serial;
    ensure!(c.images.writable_root, "base-sudo's image.json does not say writable_root");
    let memory_mb = c.memory_mb;
    let host = VmHost::new(c, false)?;
    let refused =
        VmBackend::new(Arc::clone(&host), ResetMode::Rollback, ReplenishMode::Boot).err().unwrap_or_default();
    ensure!(refused.contains("its root is writable"), "rollback was not refused: {refused:?}");
    // Booted, not restored from a template: a VM restored from the shared
    // template is used once, and this case wants the same VM back reset.
    let backend = VmBackend::new(Arc::clone(&host), ResetMode::Auto, ReplenishMode::Boot)
        .map_err(anyhow::Error::msg)?;
    ensure!(backend.mode() == ResetMode::Snapshot, "reset mode {:?}", backend.mode());
    ensure!(!backend.scrubs(), "a writable root's VMs must not be scrubbed");
    let cfg = PoolConfig {
        min_size: 1,
        max_size: 1,
        target_free: 0,
        claim_timeout: Duration::from_secs(120),
        drain_timeout: Duration::from_secs(5),
        max_host_cpu: None,
        ..PoolConfig::default()
    };
    let pool = Pool::start(backend, cfg, memory_mb);
    let checked = async {
        let lease = pool.claim().await?;
        let first = lease.id().to_string();
        ensure_eq!(stdout(&lease, "id -u; sudo -n id -u").await?, "1000\n0\n");
        let root = stdout(&lease, "grep ' / ' /proc/mounts").await?;
        ensure!(root.starts_with("overlay / overlay "), "the root is not the overlay: {root}");
        let denied = super::run(&lease, "touch /usr/local/bin/mine 2>&1").await?;
        ensure!(denied.status.code != Some(0), "the user (not root) wrote to /usr/local/bin");
        // A package built here and installed with dpkg: what `sudo apt-get
        // install` does once it has downloaded (the tests stay offline).
        let install = "set -e; mkdir -p /tmp/p/DEBIAN /tmp/p/usr/bin\n\
            printf 'Package: hello-ember\\nVersion: 1.0\\nArchitecture: all\\nMaintainer: t <t@t>\\nDescription: t\\n' >/tmp/p/DEBIAN/control\n\
            printf '#!/bin/sh\\necho hello from a package\\n' >/tmp/p/usr/bin/hello-ember\n\
            chmod 755 /tmp/p/usr/bin/hello-ember\n\
            dpkg-deb --build --root-owner-group /tmp/p /tmp/h.deb >/dev/null\n\
            sudo dpkg -i /tmp/h.deb >/dev/null\n\
            hello-ember\n\
            sudo sh -c 'echo dirty >/etc/marker && rm /usr/bin/jq'\n\
            cat /etc/marker; command -v jq || echo no jq";
        ensure_eq!(stdout(&lease, install).await?, "hello from a package\ndirty\nno jq\n");
        lease.release().await;
        let lease = pool.claim().await?;
        ensure_eq!(lease.id(), first.as_str());
        let after = "for f in /etc/marker /usr/bin/hello-ember; do test -e $f && echo left $f; done\n\
            command -v jq; dpkg -s hello-ember >/dev/null 2>&1 && echo still installed; true";
        ensure_eq!(stdout(&lease, after).await?, "/usr/bin/jq\n");
        lease.release().await;
        Ok(())
    }
    .await;
    pool.shutdown().await;
    host.close().await;
    checked
}
