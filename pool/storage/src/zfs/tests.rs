//! The exact `zfs` commands of each step, with a fake runner.

use super::*;
use crate::FakeRunner;

struct Fixture {
    runner: Arc<FakeRunner>,
    tmp: tempfile::TempDir,
    clean: PathBuf,
}

const PARENT: &str = "tank/ember";

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let clean = tmp.path().join("scratch.ext4");
    std::fs::write(&clean, b"clean image").unwrap();
    std::fs::create_dir(tmp.path().join("base")).unwrap();
    Fixture { runner: Arc::default(), tmp, clean }
}

fn cfg(mode: ZfsMode) -> ZfsConfig {
    ZfsConfig { parent: PARENT.into(), mode }
}

impl Fixture {
    fn mount(&self) -> String {
        self.tmp.path().display().to_string()
    }

    /// Script the parent checks every open starts with.
    fn parent_ok(&self, children: &str) {
        self.runner
            .ok("zfs list -H -o type tank/ember", "filesystem\n")
            .ok("zfs get -H -o value mountpoint tank/ember", &format!("{}\n", self.mount()))
            .ok("zfs list -H -o name,ember:owner", children);
    }

    /// Script a base that is current, with its golden snapshot.
    fn base_current(&self) {
        let id = image_id(&self.clean).unwrap();
        self.runner
            .ok("zfs get -H -o value ember:image tank/ember/base", &format!("{id}\n"))
            .ok("zfs list -H -o name -t snapshot", "tank/ember/base@golden\n");
    }

    async fn open(&self, alive: &'static [&'static str]) -> Result<Arc<ZfsStorage>, StorageError> {
        let runner: Arc<dyn Runner> = self.runner.clone();
        let owner_alive = move |o: &str| alive.contains(&o);
        // Stands for the VM layer's records: a fork tagged with a directory
        // named `named` is kept if it is fork-b (vm::pause tests the real one).
        let paused_keeps = |dir: &Path, fork: &str| dir.ends_with("named") && fork == "tank/ember/fork-b";
        let survivors = Survivors { owner_alive: &owner_alive, paused_keeps: &paused_keeps };
        ZfsStorage::open(runner, &cfg(ZfsMode::Dataset), "default", &self.clean, "me".into(), None, survivors)
            .await
            .map(Arc::new)
    }

    /// Storage opened on a parent with a current base, call log cleared.
    async fn opened(&self) -> Arc<ZfsStorage> {
        self.parent_ok(CHILDREN_NONE);
        self.base_current();
        let z = self.open(&[]).await.unwrap();
        self.runner.clear();
        z
    }
}

const CHILDREN_NONE: &str = "tank/ember\t-\n";

#[tokio::test]
async fn a_fresh_parent_gets_a_base_and_golden_snapshot() {
    let f = fixture();
    f.parent_ok(CHILDREN_NONE);
    f.runner.fail("zfs get -H -o value ember:image", "cannot open 'tank/ember/base': dataset does not exist");
    f.runner.ok("zfs get -H -o value mountpoint tank/ember/base", &format!("{}/base\n", f.mount()));
    f.open(&[]).await.unwrap();
    let id = image_id(&f.clean).unwrap();
    assert_eq!(
        f.runner.calls(),
        [
            "zfs list -H -o type tank/ember".to_string(),
            "zfs get -H -o value mountpoint tank/ember".to_string(),
            "zfs list -H -o name,ember:owner,ember:paused -t filesystem,volume -r -d 1 tank/ember".into(),
            "zfs get -H -o value ember:image tank/ember/base".into(),
            "zfs create tank/ember/base".into(),
            "zfs get -H -o value mountpoint tank/ember/base".into(),
            format!("zfs set ember:image={id} tank/ember/base"),
            "zfs snapshot tank/ember/base@golden".into(),
        ]
    );
    assert_eq!(std::fs::read(f.tmp.path().join("base/disk.raw")).unwrap(), b"clean image");
}

#[tokio::test]
async fn a_current_base_is_reused_and_a_stale_one_rebuilt() {
    let f = fixture();
    f.parent_ok(CHILDREN_NONE);
    f.base_current();
    f.open(&[]).await.unwrap();
    assert!(!f.runner.calls().iter().any(|c| c.starts_with("zfs create") || c.starts_with("zfs destroy")));

    let f = fixture();
    f.parent_ok(CHILDREN_NONE);
    f.runner.ok("zfs get -H -o value ember:image tank/ember/base", "/old/image:1:2\n");
    f.runner.ok("zfs get -H -o value mountpoint tank/ember/base", &format!("{}/base\n", f.mount()));
    f.open(&[]).await.unwrap();
    let calls = f.runner.calls();
    let destroy =
        calls.iter().position(|c| c == "zfs destroy -r tank/ember/base").expect("stale base destroyed");
    let create = calls.iter().position(|c| c == "zfs create tank/ember/base").expect("base recreated");
    assert!(destroy < create);
}

#[tokio::test]
async fn start_up_destroys_only_clones_of_dead_owners() {
    let f = fixture();
    f.parent_ok(
        "tank/ember\t-\n\
         tank/ember/base\t-\n\
         tank/ember/warm-a\tdead-1\n\
         tank/ember/warm-b\tlive-1\n\
         tank/ember/warm-c\t-\n\
         tank/ember/keep\tdead-1\n",
    );
    f.base_current();
    f.open(&["live-1"]).await.unwrap();
    let destroys: Vec<String> =
        f.runner.calls().into_iter().filter(|c| c.starts_with("zfs destroy")).collect();
    assert_eq!(destroys, ["zfs destroy -r tank/ember/warm-a", "zfs destroy -r tank/ember/warm-c"]);
}

#[tokio::test]
async fn a_missing_or_wrong_parent_is_a_clear_error() {
    let f = fixture();
    f.runner.fail("zfs list -H -o type", "cannot open 'tank/ember': dataset does not exist");
    let e = f.open(&[]).await.unwrap_err().to_string();
    assert!(e.contains("tank/ember") && e.contains("dataset does not exist"), "{e}");
    assert_eq!(f.runner.calls().len(), 1, "nothing else was tried");

    let f = fixture();
    f.runner.ok("zfs list -H -o type", "volume\n");
    let e = f.open(&[]).await.unwrap_err().to_string();
    assert!(e.contains("not a filesystem"), "{e}");

    for bad in ["", "/tank", "tank/", "tank//x", "tank/a b", "tank/$(x)"] {
        let f = fixture();
        let runner: Arc<dyn Runner> = f.runner.clone();
        let cfg = ZfsConfig { parent: bad.into(), mode: ZfsMode::Dataset };
        let e = ZfsStorage::open(
            runner,
            &cfg,
            "default",
            &f.clean,
            "me".into(),
            None,
            Survivors::owners_only(&|_| false),
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("not a dataset name"), "{bad:?}: {e}");
        assert!(f.runner.calls().is_empty(), "{bad:?} reached zfs");
    }
}

#[tokio::test]
async fn create_recycle_and_destroy_a_clone() {
    let f = fixture();
    let z = f.opened().await;

    let clone = z.clone_for_vm().await.unwrap();
    let name = clone.name().to_string();
    assert!(name.starts_with("tank/ember/warm-") && name.len() == "tank/ember/warm-".len() + 32, "{name}");
    assert_eq!(
        f.runner.calls(),
        [
            format!("zfs clone -o ember:owner=me tank/ember/base@golden {name}"),
            format!("zfs snapshot {name}@clean"),
        ]
    );
    let leaf = name.rsplit('/').next().unwrap();
    assert_eq!(clone.disk_path(), f.tmp.path().join(leaf).join("disk.raw"));
    assert_eq!(z.live_clones(), std::slice::from_ref(&name));

    // Claiming a VM does not touch its clone; recycling rolls it back.
    f.runner.clear();
    z.rollback(&name).await.unwrap();
    assert_eq!(f.runner.calls(), [format!("zfs rollback -r {name}@clean")]);

    f.runner.clear();
    clone.destroy().await;
    assert_eq!(f.runner.calls(), [format!("zfs destroy -r {name}")]);
    assert!(z.live_clones().is_empty());
}

#[tokio::test]
async fn failures_half_way_leave_no_clone() {
    let f = fixture();
    let z = f.opened().await;
    f.runner.fail("zfs snapshot", "out of space");
    let e = z.clone_for_vm().await.unwrap_err();
    assert!(e.to_string().contains("out of space"), "{e}");
    let calls = f.runner.calls();
    assert_eq!(calls.len(), 3, "{calls:?}");
    assert!(calls[2].starts_with("zfs destroy -r tank/ember/warm-"), "{calls:?}");
    assert!(z.live_clones().is_empty());

    // A failed rollback is an error with zfs's words in it.
    f.runner.clear();
    f.runner.fail("zfs rollback", "cannot rollback: dataset is busy");
    let e = z.rollback("tank/ember/warm-x").await.unwrap_err();
    assert!(e.to_string().contains("dataset is busy"), "{e}");
}

#[tokio::test]
async fn a_busy_destroy_is_retried_and_a_dropped_clone_is_destroyed() {
    let f = fixture();
    let z = f.opened().await;
    let clone = z.clone_for_vm().await.unwrap();
    let name = clone.name().to_string();
    f.runner.clear();
    f.runner.fail("zfs destroy", "cannot destroy: dataset is busy").fail("zfs destroy", "dataset is busy");
    clone.destroy().await;
    assert_eq!(f.runner.calls(), vec![format!("zfs destroy -r {name}"); 3]);

    let dropped = z.clone_for_vm().await.unwrap();
    let name = dropped.name().to_string();
    f.runner.clear();
    drop(dropped);
    for _ in 0..100 {
        if !z.live_clones().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    assert_eq!(f.runner.calls(), [format!("zfs destroy -r {name}")]);
    assert!(z.live_clones().is_empty());
}

#[tokio::test]
async fn a_fork_is_a_snapshot_and_a_clone_owned_once_adopted() {
    let f = fixture();
    let z = f.opened().await;
    let paused = f.tmp.path().join("sessions/child");

    let fork = z.fork("tank/ember/warm-a", &paused).await.unwrap();
    let id = fork.name.strip_prefix("tank/ember/fork-").unwrap().to_string();
    assert_eq!(id.len(), 32, "{}", fork.name);
    assert_eq!(
        f.runner.calls(),
        [
            format!("zfs snapshot tank/ember/warm-a@fork-{id}"),
            format!(
                "zfs clone -o ember:paused={} tank/ember/warm-a@fork-{id} {}",
                paused.display(),
                fork.name
            ),
        ]
    );
    assert_eq!(fork.disk, f.tmp.path().join(format!("fork-{id}")).join("disk.raw"));
    assert!(z.live_clones().is_empty(), "a paused VM's fork is nobody's clone yet");

    // Only clones under the parent fork; nothing reaches zfs otherwise.
    f.runner.clear();
    for bad in ["tank/other/warm-a", "tank/ember/base", "tank/ember/warm-a@clean", "tank/ember/x/warm-a"] {
        assert!(z.fork(bad, &paused).await.is_err(), "{bad}");
        assert!(z.adopt(bad).await.is_err(), "{bad}");
    }
    z.discard_fork("tank/ember/warm-a").await;
    assert!(f.runner.calls().is_empty(), "{:?}", f.runner.calls());

    // A VM resumed on it owns it; it goes with the VM, its origin too.
    let clone = z.adopt(&fork.name).await.unwrap();
    assert_eq!(clone.disk_path(), fork.disk);
    assert_eq!(z.live_clones(), std::slice::from_ref(&fork.name));
    f.runner.clear();
    f.runner.ok("zfs get -H -o value origin", &format!("tank/ember/warm-a@fork-{id}\n"));
    clone.destroy().await;
    assert_eq!(
        f.runner.calls(),
        [
            format!("zfs get -H -o value origin {}", fork.name),
            format!("zfs destroy -r {}", fork.name),
            format!("zfs destroy tank/ember/warm-a@fork-{id}"),
        ]
    );
    assert!(z.live_clones().is_empty());
}

#[tokio::test]
async fn a_paused_vm_keeps_its_clone_renamed_a_fork_and_nobodys() {
    let f = fixture();
    let z = f.opened().await;
    let paused = f.tmp.path().join("sessions/s");
    let clone = z.clone_for_vm().await.unwrap();
    let name = clone.name().to_string();
    f.runner.clear();
    let fork = clone.keep(&paused).await.unwrap();
    let id = fork.name.strip_prefix("tank/ember/fork-").unwrap().to_string();
    assert_eq!(id.len(), 32, "{}", fork.name);
    assert_eq!(
        f.runner.calls(),
        [
            format!("zfs set ember:paused={} {name}", paused.display()),
            format!("zfs inherit ember:owner {name}"),
            format!("zfs rename {name} {}", fork.name),
        ]
    );
    assert_eq!(fork.disk, f.tmp.path().join(format!("fork-{id}")).join("disk.raw"));
    assert!(z.live_clones().is_empty(), "a paused VM's disk is nobody's clone");

    // A VM resumed on it that pauses again keeps it under its name.
    let adopted = z.adopt(&fork.name).await.unwrap();
    f.runner.clear();
    let again = adopted.keep(&paused).await.unwrap();
    assert_eq!(again, fork);
    assert_eq!(
        f.runner.calls(),
        [
            format!("zfs set ember:paused={} {}", paused.display(), fork.name),
            format!("zfs inherit ember:owner {}", fork.name),
        ]
    );
    assert!(z.live_clones().is_empty());

    // A rename zfs-fuse calls busy (the VM's QEMU has just closed the
    // disk) is retried.
    let clone = z.clone_for_vm().await.unwrap();
    let name = clone.name().to_string();
    f.runner.clear();
    f.runner.fail("zfs rename", "cannot rename: dataset is busy").fail("zfs rename", "dataset is busy");
    let kept = clone.keep(&paused).await.unwrap();
    let renames: Vec<_> = f.runner.calls().into_iter().filter(|c| c.starts_with("zfs rename")).collect();
    assert_eq!(renames, vec![format!("zfs rename {name} {}", kept.name); 3]);
    z.discard_fork(&kept.name).await;

    // A failed rename destroys the clone under its old name.
    let clone = z.clone_for_vm().await.unwrap();
    let name = clone.name().to_string();
    f.runner.clear();
    f.runner.fail("zfs rename", "out of space");
    let e = clone.keep(&paused).await.unwrap_err();
    assert!(e.to_string().contains("out of space"), "{e}");
    assert_eq!(f.runner.calls().last(), Some(&format!("zfs destroy -r {name}")));
    assert!(z.live_clones().is_empty());
}

#[tokio::test]
async fn a_failed_fork_leaves_no_snapshot() {
    let f = fixture();
    let z = f.opened().await;
    f.runner.fail("zfs clone", "out of space");
    let e = z.fork("tank/ember/warm-a", Path::new("/s/c")).await.unwrap_err();
    assert!(e.to_string().contains("out of space"), "{e}");
    let calls = f.runner.calls();
    assert_eq!(calls.len(), 3, "{calls:?}");
    assert!(calls[2].starts_with("zfs destroy tank/ember/warm-a@fork-"), "{calls:?}");
}

#[tokio::test]
async fn a_dataset_with_forks_promotes_them_before_it_goes() {
    let f = fixture();
    let z = f.opened().await;
    let clone = z.clone_for_vm().await.unwrap();
    let name = clone.name().to_string();
    f.runner.clear();
    f.runner
        .fail(&format!("zfs destroy -r {name}"), "cannot destroy: filesystem has dependent clones")
        .ok(
            "zfs list -H -o name,origin",
            &format!(
                "tank/ember\t-\ntank/ember/fork-b\t{name}@fork-b\ntank/ember/warm-y\ttank/ember/base@golden\n"
            ),
        )
        .fail(&format!("zfs destroy -r {name}"), "cannot destroy: dataset is busy")
        .ok("zfs list -H -o name -t snapshot", "tank/ember/fork-b@clean\ntank/ember/fork-b@fork-b\n")
        .fail("zfs destroy tank/ember/fork-b@fork-b", "snapshot has dependent clones");
    clone.destroy().await;
    assert_eq!(
        f.runner.calls(),
        [
            format!("zfs destroy -r {name}"),
            "zfs list -H -o name,origin -t filesystem,volume -r -d 1 tank/ember".to_string(),
            "zfs promote tank/ember/fork-b".to_string(),
            format!("zfs destroy -r {name}"),
            format!("zfs destroy -r {name}"),
            "zfs list -H -o name -t snapshot -r -d 1 tank/ember/fork-b".to_string(),
            "zfs destroy tank/ember/fork-b@clean".to_string(),
            "zfs destroy tank/ember/fork-b@fork-b".to_string(),
        ]
    );
    assert!(z.live_clones().is_empty());

    // Clones that are not forks are never promoted: the destroy fails.
    f.runner.clear();
    f.runner
        .fail("zfs destroy -r tank/ember/warm-z", "filesystem has dependent clones")
        .ok("zfs list -H -o name,origin", "tank/ember/other\ttank/ember/warm-z@x\n");
    let e = z.destroy_dataset("tank/ember/warm-z").await.unwrap_err().to_string();
    assert!(e.contains("not forks"), "{e}");
    assert!(!f.runner.calls().iter().any(|c| c.contains("promote")), "{:?}", f.runner.calls());
}

#[tokio::test]
async fn start_up_keeps_forks_a_paused_vm_names_and_live_ones() {
    let f = fixture();
    let named = f.tmp.path().join("named");
    let other = f.tmp.path().join("other");
    f.parent_ok(&format!(
        "tank/ember\t-\t-\n\
         tank/ember/fork-a\tdead-1\t{named}\n\
         tank/ember/fork-b\t-\t{named}\n\
         tank/ember/fork-c\t-\t{other}\n\
         tank/ember/fork-d\tlive-1\t-\n\
         tank/ember/fork-e\t-\t-\n\
         tank/ember/fork-f\t-\t{gone}\n",
        named = named.display(),
        other = other.display(),
        gone = f.tmp.path().join("gone").display(),
    ));
    f.base_current();
    f.open(&["live-1"]).await.unwrap();
    let destroys: Vec<String> =
        f.runner.calls().into_iter().filter(|c| c.starts_with("zfs destroy")).collect();
    assert_eq!(
        destroys,
        [
            "zfs destroy -r tank/ember/fork-a",
            "zfs destroy -r tank/ember/fork-c",
            "zfs destroy -r tank/ember/fork-e",
            "zfs destroy -r tank/ember/fork-f",
        ]
    );
}
