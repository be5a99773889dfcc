//! The one place that decides how VMs are made and recycled from the
//! configuration: which writable disk they get, whether the channel must be
//! migratable, the reset mode `auto` stands for, and whether new VMs are
//! restored from a template. Config validation, `ember serve` and the real
//! backend all ask it; its table test covers every combination.

use crate::config::{ReplenishMode, ResetMode};
use ember_channel::ChannelKind;
use ember_vm::ScratchKind;

/// The storage backend, as far as the plan cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disks {
    /// qcow2 overlays or raw copies of the clean image (files).
    File,
    /// Raw clones of a ZFS dataset.
    Zfs,
}

impl From<&ember_storage::StorageConfig> for Disks {
    fn from(s: &ember_storage::StorageConfig) -> Self {
        match s {
            ember_storage::StorageConfig::File => Disks::File,
            ember_storage::StorageConfig::Zfs(_) => Disks::Zfs,
        }
    }
}

/// What is known before the channel is chosen (config validation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Before {
    /// The writable disk VMs get.
    pub scratch: ScratchKind,
    /// Whether the channel must survive a snapshot (serial or vsock).
    pub need_migratable: bool,
}

/// The whole plan, once the channel is known (the backend).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Never `auto`.
    pub reset: ResetMode,
    /// New VMs are restored from a template instead of booted.
    pub restore: bool,
    pub scratch: ScratchKind,
}

/// The first half: what the configuration alone decides, or why it cannot work.
pub fn before_channel(reset: ResetMode, replenish: ReplenishMode, disks: Disks) -> Result<Before, String> {
    let zfs = disks == Disks::Zfs;
    if zfs && reset == ResetMode::Snapshot {
        return Err(
            "pool.reset = \"snapshot\" needs storage.backend = \"file\"; ZFS disks reset by rollback".into(),
        );
    }
    if zfs && replenish == ReplenishMode::Restore {
        return Err("pool.replenish = \"restore\" needs storage.backend = \"file\"".into());
    }
    if reset == ResetMode::Rollback && replenish == ReplenishMode::Restore {
        return Err(
            "pool.replenish = \"restore\" needs qcow2 overlays; pool.reset = \"rollback\" uses raw copies"
                .into(),
        );
    }
    // Rollback needs a raw writable disk; ZFS only makes raw disks.
    let scratch =
        if reset == ResetMode::Rollback || zfs { ScratchKind::RawCopy } else { ScratchKind::Overlay };
    let need_migratable = matches!(reset, ResetMode::Snapshot) || (reset == ResetMode::Auto && !zfs);
    Ok(Before { scratch, need_migratable })
}

/// The whole plan for `channel` (chosen by [`ember_channel::choose`] with
/// [`Before::need_migratable`]).
pub fn with_channel(
    reset: ResetMode,
    replenish: ReplenishMode,
    disks: Disks,
    channel: ChannelKind,
) -> Result<Plan, String> {
    let before = before_channel(reset, replenish, disks)?;
    let zfs = disks == Disks::Zfs;
    let reset = match reset {
        // ZFS disks are raw clones: recycled by rolling the clone back.
        ResetMode::Auto if zfs => ResetMode::Rollback,
        ResetMode::Auto if channel.migratable() => ResetMode::Snapshot,
        ResetMode::Auto => ResetMode::Destroy,
        ResetMode::Snapshot if !channel.migratable() => {
            return Err(format!(
                "pool.reset = \"snapshot\" needs a migratable channel; {channel} is not (use serial)"
            ))
        }
        m => m,
    };
    let restore = match replenish {
        // A rolled-back layer is a raw copy, not an overlay of a template.
        _ if reset == ResetMode::Rollback || zfs => false,
        ReplenishMode::Boot => false,
        ReplenishMode::Auto => channel == ChannelKind::Serial,
        ReplenishMode::Restore if channel == ChannelKind::Serial => true,
        ReplenishMode::Restore => {
            return Err(format!("pool.replenish = \"restore\" needs the serial channel, not {channel}"))
        }
    };
    Ok(Plan { reset, restore, scratch: before.scratch })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ChannelKind::{HybridVsock, Serial, Vsock};
    use Disks::{File, Zfs};
    use ReplenishMode as Rp;
    use ResetMode as R;
    use ScratchKind::{Overlay, RawCopy};

    /// Every combination: (reset, replenish, disks, channel) → the plan, or
    /// a word the refusal must contain.
    #[test]
    fn every_combination() {
        let ok = |reset, restore, scratch| Ok::<_, &str>(Plan { reset, restore, scratch });
        type Case = (R, Rp, Disks, ChannelKind, Result<Plan, &'static str>);
        let cases: Vec<Case> = vec![
            // file storage, auto reset: snapshot where the channel allows it
            (R::Auto, Rp::Auto, File, Serial, ok(R::Snapshot, true, Overlay)),
            (R::Auto, Rp::Auto, File, Vsock, ok(R::Snapshot, false, Overlay)),
            (R::Auto, Rp::Auto, File, HybridVsock, ok(R::Destroy, false, Overlay)),
            (R::Auto, Rp::Boot, File, Serial, ok(R::Snapshot, false, Overlay)),
            (R::Auto, Rp::Restore, File, Serial, ok(R::Snapshot, true, Overlay)),
            (R::Auto, Rp::Restore, File, Vsock, Err("serial channel")),
            (R::Auto, Rp::Restore, File, HybridVsock, Err("serial channel")),
            // snapshot asked for
            (R::Snapshot, Rp::Auto, File, Serial, ok(R::Snapshot, true, Overlay)),
            (R::Snapshot, Rp::Auto, File, Vsock, ok(R::Snapshot, false, Overlay)),
            (R::Snapshot, Rp::Auto, File, HybridVsock, Err("migratable")),
            (R::Snapshot, Rp::Boot, File, Serial, ok(R::Snapshot, false, Overlay)),
            (R::Snapshot, Rp::Auto, Zfs, Serial, Err("storage.backend = \"file\"")),
            // rollback: raw copies, never a template
            (R::Rollback, Rp::Auto, File, Serial, ok(R::Rollback, false, RawCopy)),
            (R::Rollback, Rp::Auto, File, HybridVsock, ok(R::Rollback, false, RawCopy)),
            (R::Rollback, Rp::Boot, File, Vsock, ok(R::Rollback, false, RawCopy)),
            (R::Rollback, Rp::Restore, File, Serial, Err("raw copies")),
            (R::Rollback, Rp::Auto, Zfs, HybridVsock, ok(R::Rollback, false, RawCopy)),
            // destroy: any channel; templates where serial allows
            (R::Destroy, Rp::Auto, File, Serial, ok(R::Destroy, true, Overlay)),
            (R::Destroy, Rp::Auto, File, HybridVsock, ok(R::Destroy, false, Overlay)),
            (R::Destroy, Rp::Restore, File, Vsock, Err("serial channel")),
            (R::Destroy, Rp::Auto, Zfs, Serial, ok(R::Destroy, false, RawCopy)),
            // ZFS: auto means rollback, on any channel; no templates
            (R::Auto, Rp::Auto, Zfs, Serial, ok(R::Rollback, false, RawCopy)),
            (R::Auto, Rp::Auto, Zfs, HybridVsock, ok(R::Rollback, false, RawCopy)),
            (R::Auto, Rp::Boot, Zfs, Vsock, ok(R::Rollback, false, RawCopy)),
            (R::Auto, Rp::Restore, Zfs, Serial, Err("storage.backend = \"file\"")),
        ];
        for (reset, replenish, disks, channel, want) in cases {
            let got = with_channel(reset, replenish, disks, channel);
            match (&got, want) {
                (Ok(p), Ok(w)) => assert_eq!(*p, w, "{reset:?} {replenish:?} {disks:?} {channel}"),
                (Err(e), Err(word)) => {
                    assert!(e.contains(word), "{reset:?} {replenish:?} {disks:?} {channel}: {e}")
                }
                _ => panic!("{reset:?} {replenish:?} {disks:?} {channel}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn the_first_half_says_which_channel_is_needed() {
        let need = |r, d| before_channel(r, Rp::Auto, d).unwrap().need_migratable;
        assert!(need(R::Auto, File) && need(R::Snapshot, File));
        assert!(!need(R::Auto, Zfs) && !need(R::Rollback, File) && !need(R::Destroy, File));
    }
}
