//! What a restore applies besides content, and the options that restrict it.
//!
//! The defaults follow tar and restic: run as root, a restore applies the snapshot's owners,
//! the setuid/setgid/sticky bits, device nodes and extended attributes (ACLs and file
//! capabilities included), so a system restores as it was. Run as anyone else, it cannot
//! change owners (files belong to the user running it), cannot create device nodes, and
//! skips the xattrs the kernel refuses (one warning per kind). The options switch each of
//! these off, for restoring an untrusted snapshot as root, say.

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct RestorePolicy {
    /// Apply the snapshot's owners (only possible as root). `--no-owner` turns it off: files
    /// then belong to the user running the restore.
    pub owners: bool,
    /// Keep setuid and setgid bits. `--no-setid` strips them.
    pub setid: bool,
    /// Create character and block device nodes. `--no-devices` skips them.
    pub devices: bool,
    /// Set extended attributes (ACLs, capabilities, user xattrs). `--no-xattrs` skips them.
    pub xattrs: bool,
    /// Whether this process may change owners; set by the restore from its effective uid.
    #[serde(skip)]
    pub(crate) as_root: bool,
}

impl Default for RestorePolicy {
    fn default() -> Self {
        RestorePolicy {
            owners: true,
            setid: true,
            devices: true,
            xattrs: true,
            as_root: false,
        }
    }
}

impl RestorePolicy {
    /// This policy for the current process.
    pub(crate) fn for_this_process(self) -> Self {
        RestorePolicy {
            as_root: rustix::process::geteuid().is_root(),
            ..self
        }
    }

    pub fn apply_owners(&self) -> bool {
        self.owners && self.as_root
    }

    /// The permission bits to set for a snapshot `mode`.
    pub fn mode(&self, mode: u32) -> u32 {
        let mode = mode & 0o7777;
        if self.setid {
            mode
        } else {
            mode & !0o6000
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_setid_strips_setuid_and_setgid_but_keeps_sticky() {
        let p = RestorePolicy {
            setid: false,
            ..RestorePolicy::default()
        };
        assert_eq!(p.mode(0o4755), 0o755);
        assert_eq!(p.mode(0o2750), 0o750);
        assert_eq!(p.mode(0o1777), 0o1777);
        assert_eq!(RestorePolicy::default().mode(0o104755), 0o4755);
    }

    #[test]
    fn owners_need_root_and_the_option() {
        let root = RestorePolicy {
            as_root: true,
            ..RestorePolicy::default()
        };
        assert!(root.apply_owners());
        assert!(!RestorePolicy {
            owners: false,
            ..root
        }
        .apply_owners());
        assert!(!RestorePolicy::default().apply_owners());
    }
}
