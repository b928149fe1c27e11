//! Extended attributes: `user.`, `trusted.`, `security.` names and the two POSIX ACLs.

use super::*;

/// `setxattr` flag: fail if the attribute exists.
const XATTR_CREATE: i32 = 1;
/// `setxattr` flag: fail if the attribute does not exist.
const XATTR_REPLACE: i32 = 2;

fn check_xattr_name(name: &[u8]) -> FsResult<()> {
    if name.len() > 255 {
        return err(libc::ERANGE);
    }
    let ok = [&b"user."[..], b"trusted.", b"security."]
        .iter()
        .any(|p| name.starts_with(p) && name.len() > p.len())
        || name == acl::ACCESS.as_bytes()
        || name == acl::DEFAULT.as_bytes();
    if ok { Ok(()) } else { err(libc::EOPNOTSUPP) }
}

impl Inner {
    fn xattr_get(&mut self, ino: u64, name: &[u8]) -> FsResult<Option<Vec<u8>>> {
        self.xattr_get_at(self.store.live_epoch, ino, name)
    }

    fn xattr_get_at(&mut self, epoch: u64, ino: u64, name: &[u8]) -> FsResult<Option<Vec<u8>>> {
        if epoch == self.store.live_epoch && self.store.xattr_free(ino) {
            return Ok(None);
        }
        let txn = self.store.read_txn()?;
        let t = txn.versions();
        Ok(crate::store::visible(t, RecKey::xattr(ino, name), epoch)?)
    }

    /// The value of xattr `name`.
    pub fn getxattr(&mut self, fino: u64, name: &[u8]) -> FsResult<Vec<u8>> {
        check_xattr_name(name)?;
        if node(fino) == Node::SnapDir {
            return err(libc::ENODATA);
        }
        let (epoch, ino) = self.at(fino)?;
        self.inode_at(epoch, ino)?;
        self.xattr_get_at(epoch, ino, name)?
            .ok_or(FsError::Errno(libc::ENODATA))
    }

    /// Sets xattr `name` (with XATTR_CREATE / XATTR_REPLACE `flags`).
    pub fn setxattr(
        &mut self,
        ino: u64,
        name: &[u8],
        value: &[u8],
        flags: i32,
        caller: Option<Caller>,
    ) -> FsResult<()> {
        let ino = self.live(ino)?;
        check_xattr_name(name)?;
        self.refuse_flagged(ino, FS_IMMUTABLE_FL | FS_APPEND_FL)?;
        if value.len() > 65536 {
            return err(libc::E2BIG);
        }
        let mut rec = self.inode(ino)?;
        let exists = self.xattr_get(ino, name)?.is_some();
        if flags & XATTR_CREATE != 0 && exists {
            return err(libc::EEXIST);
        }
        if flags & XATTR_REPLACE != 0 && !exists {
            return err(libc::ENODATA);
        }
        let mut store_value = Some(value);
        if name == acl::ACCESS.as_bytes() {
            let (mode, extended) = acl::mode_of(value)?;
            rec.perm = (rec.perm & !0o777) | mode;
            // As Linux's posix_acl_update_mode: a caller outside the file's group
            // and without CAP_FSETID loses set-group-id by setting an ACL.
            if let Some(c) = caller
                && rec.perm & libc::S_ISGID != 0
                && !c.in_group(rec.gid)
                && !c.has_fsetid()
            {
                rec.perm &= !libc::S_ISGID;
            }
            if !extended {
                store_value = None;
            }
        } else if name == acl::DEFAULT.as_bytes() {
            if rec.kind != FileKind::Dir {
                return err(libc::EACCES);
            }
            if value.is_empty() {
                store_value = None;
            } else {
                acl::check(value)?;
            }
        }
        rec.ctime = Ts::now();
        self.store.write(false, |w| {
            w.put(RecKey::xattr(ino, name), store_value)?;
            put_inode(w, ino, &rec)
        })?;
        self.settle(&[ino]);
        Ok(())
    }

    /// Names of all xattrs, each followed by a NUL.
    pub fn listxattr(&mut self, fino: u64) -> FsResult<Vec<u8>> {
        if node(fino) == Node::SnapDir {
            return Ok(Vec::new());
        }
        let (epoch, ino) = self.at(fino)?;
        self.inode_at(epoch, ino)?;
        let mut out = Vec::new();
        if epoch == self.store.live_epoch && self.store.xattr_free(ino) {
            return Ok(out);
        }
        let txn = self.store.read_txn()?;
        let t = txn.versions();
        scan_visible(t, ino, KIND_XATTR, 0..=0, epoch, |_, name, _| {
            out.extend_from_slice(name);
            out.push(0);
            Ok(true)
        })?;
        Ok(out)
    }

    /// Removes xattr `name`.
    pub fn removexattr(&mut self, ino: u64, name: &[u8]) -> FsResult<()> {
        let ino = self.live(ino)?;
        check_xattr_name(name)?;
        self.refuse_flagged(ino, FS_IMMUTABLE_FL | FS_APPEND_FL)?;
        let mut rec = self.inode(ino)?;
        if self.xattr_get(ino, name)?.is_none() {
            return err(libc::ENODATA);
        }
        rec.ctime = Ts::now();
        self.store.write(false, |w| {
            w.put(RecKey::xattr(ino, name), None)?;
            put_inode(w, ino, &rec)
        })?;
        self.settle(&[ino]);
        Ok(())
    }

    /// Keeps the access ACL in step with a chmod to `perm`.
    pub(super) fn chmod_acl(&mut self, ino: u64, perm: u32) -> FsResult<()> {
        let key = acl::ACCESS.as_bytes();
        if let Some(a) = self.xattr_get(ino, key)? {
            let new = acl::chmod(&a, perm)?;
            self.store
                .write(false, |w| Ok(w.put(RecKey::xattr(ino, key), Some(&new))?))?;
        }
        Ok(())
    }

    /// The default ACL of directory `dir`, if any.
    pub(super) fn default_acl(&mut self, dir: u64) -> FsResult<Option<Vec<u8>>> {
        self.xattr_get(dir, acl::DEFAULT.as_bytes())
    }
}
