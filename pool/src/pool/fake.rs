//! A fake backend for unit tests: VMs are plain values with a "dirty" flag
//! and a kill switch; delays and failures are injectable.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{Backend, PoolError};

#[derive(Debug, Default)]
pub struct FakeState {
    next_id: AtomicU64,
    pub fail_creates: AtomicU32,
    pub fail_resets: AtomicU32,
    pub resets: AtomicU64,
    pub fail_scrubs: AtomicU32,
    pub scrubs: AtomicU64,
    alive: Mutex<HashSet<String>>,
    /// Paused VMs by directory (kept across pools that share this state,
    /// as files outlive a server).
    paused: Mutex<std::collections::HashMap<std::path::PathBuf, FakeVm>>,
    pub fail_pauses: AtomicU32,
}

#[derive(Debug, Clone)]
pub struct FakeBackend {
    pub state: Arc<FakeState>,
    pub create_delay: Duration,
    pub reset_delay: Duration,
    pub recycles: bool,
    pub scrub_delay: Duration,
    /// VMs made for a waiting claim serve only it (like a restore without a
    /// clean snapshot).
    pub single_use_claims: bool,
    /// The one-time preparation before the first creation (a template).
    pub prepare_delay: Duration,
    prepared: Arc<tokio::sync::OnceCell<()>>,
}

#[derive(Debug)]
pub struct FakeVm {
    pub id: String,
    /// Set by a user of the VM; a reset must clear it.
    pub dirty: bool,
    /// Whom the VM served since its last full reset (a scrub keeps it).
    pub served: Vec<String>,
    pub dead: Arc<AtomicBool>,
    /// Made for one claim only.
    pub single_use: bool,
}

impl FakeBackend {
    pub fn new(create_delay: Duration, reset_delay: Duration) -> Self {
        Self {
            state: Arc::default(),
            create_delay,
            reset_delay,
            recycles: true,
            scrub_delay: reset_delay / 10,
            single_use_claims: false,
            prepare_delay: Duration::ZERO,
            prepared: Arc::default(),
        }
    }

    /// VMs created and not yet destroyed.
    pub fn alive(&self) -> usize {
        self.state.alive.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_alive(&self, id: &str) -> bool {
        self.state.alive.lock().unwrap_or_else(|p| p.into_inner()).contains(id)
    }
}

impl Backend for FakeBackend {
    type Vm = FakeVm;

    async fn prepare(&self) {
        self.prepared.get_or_init(|| tokio::time::sleep(self.prepare_delay)).await;
    }

    fn pauses(&self) -> bool {
        true
    }

    async fn pause(&self, vm: FakeVm, dir: &std::path::Path) -> Result<(), PoolError> {
        tokio::time::sleep(self.reset_delay).await;
        self.state.alive.lock().unwrap_or_else(|p| p.into_inner()).remove(&vm.id);
        let fail = self.state.fail_pauses.load(Ordering::SeqCst);
        if fail > 0 {
            self.state.fail_pauses.store(fail - 1, Ordering::SeqCst);
            return Err(PoolError::Pause("injected failure".into()));
        }
        std::fs::write(dir.join("fake-vm"), &vm.id).map_err(|e| PoolError::Pause(e.to_string()))?;
        self.state.paused.lock().unwrap_or_else(|p| p.into_inner()).insert(dir.to_path_buf(), vm);
        Ok(())
    }

    async fn resume(&self, dir: &std::path::Path) -> Result<FakeVm, PoolError> {
        tokio::time::sleep(self.reset_delay).await;
        let vm = self.state.paused.lock().unwrap_or_else(|p| p.into_inner()).remove(dir);
        let mut vm = vm.ok_or_else(|| PoolError::Pause(format!("nothing paused in {}", dir.display())))?;
        vm.id = format!("fake-{}", self.state.next_id.fetch_add(1, Ordering::SeqCst));
        self.state.alive.lock().unwrap_or_else(|p| p.into_inner()).insert(vm.id.clone());
        Ok(vm)
    }

    async fn fork(&self, vm: &FakeVm, dir: &std::path::Path) -> Result<(), PoolError> {
        let copy = FakeVm {
            id: format!("fake-{}", self.state.next_id.fetch_add(1, Ordering::SeqCst)),
            dirty: vm.dirty,
            served: vm.served.clone(),
            dead: Arc::default(),
            single_use: false,
        };
        std::fs::write(dir.join("fake-vm"), &copy.id).map_err(|e| PoolError::Pause(e.to_string()))?;
        self.state.paused.lock().unwrap_or_else(|p| p.into_inner()).insert(dir.to_path_buf(), copy);
        Ok(())
    }

    async fn copy_paused(&self, from: &std::path::Path, to: &std::path::Path) -> Result<(), PoolError> {
        let mut paused = self.state.paused.lock().unwrap_or_else(|p| p.into_inner());
        let vm = paused.get(from).ok_or_else(|| PoolError::Pause("nothing paused there".into()))?;
        let copy = FakeVm {
            id: vm.id.clone(),
            dirty: vm.dirty,
            served: vm.served.clone(),
            dead: Arc::default(),
            single_use: false,
        };
        paused.insert(to.to_path_buf(), copy);
        Ok(())
    }

    fn can_resume(&self, dir: &std::path::Path) -> bool {
        self.state.paused.lock().unwrap_or_else(|p| p.into_inner()).contains_key(dir)
    }

    async fn create(&self) -> Result<FakeVm, PoolError> {
        tokio::time::sleep(self.create_delay).await;
        let fail = self.state.fail_creates.load(Ordering::SeqCst);
        if fail > 0 {
            self.state.fail_creates.store(fail - 1, Ordering::SeqCst);
            return Err(PoolError::Create("injected failure".into()));
        }
        let id = format!("fake-{}", self.state.next_id.fetch_add(1, Ordering::SeqCst));
        self.state.alive.lock().unwrap_or_else(|p| p.into_inner()).insert(id.clone());
        Ok(FakeVm { id, dirty: false, served: Vec::new(), dead: Arc::default(), single_use: false })
    }

    async fn create_for_claim(&self) -> Result<FakeVm, PoolError> {
        let mut vm = self.create().await?;
        vm.single_use = self.single_use_claims;
        Ok(vm)
    }

    fn keeps(&self, vm: &FakeVm) -> bool {
        !vm.single_use
    }

    fn recycles(&self) -> bool {
        self.recycles
    }

    async fn reset(&self, vm: &mut FakeVm) -> Result<(), PoolError> {
        tokio::time::sleep(self.reset_delay).await;
        self.state.resets.fetch_add(1, Ordering::SeqCst);
        let fail = self.state.fail_resets.load(Ordering::SeqCst);
        if fail > 0 {
            self.state.fail_resets.store(fail - 1, Ordering::SeqCst);
            return Err(PoolError::Reset { vm: vm.id.clone(), reason: "injected failure".into() });
        }
        vm.dirty = false;
        vm.served.clear();
        Ok(())
    }

    fn scrubs(&self) -> bool {
        self.recycles
    }

    async fn scrub(&self, vm: &mut FakeVm) -> Result<(), PoolError> {
        tokio::time::sleep(self.scrub_delay).await;
        self.state.scrubs.fetch_add(1, Ordering::SeqCst);
        let fail = self.state.fail_scrubs.load(Ordering::SeqCst);
        if fail > 0 {
            self.state.fail_scrubs.store(fail - 1, Ordering::SeqCst);
            return Err(PoolError::Reset { vm: vm.id.clone(), reason: "injected scrub failure".into() });
        }
        vm.dirty = false;
        Ok(())
    }

    async fn destroy(&self, vm: FakeVm) {
        self.state.alive.lock().unwrap_or_else(|p| p.into_inner()).remove(&vm.id);
    }

    fn healthy(&self, vm: &mut FakeVm) -> bool {
        !vm.dead.load(Ordering::SeqCst)
    }

    fn vm_id(vm: &FakeVm) -> &str {
        &vm.id
    }
}
