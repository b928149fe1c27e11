//! POSIX ACLs in their xattr form (`system.posix_acl_access` / `_default`).
//!
//! With FUSE_POSIX_ACL the kernel enforces ACLs, but the filesystem keeps the mode and
//! the ACL in step (as the kernel's own `posix_acl_*` helpers do for local
//! filesystems): setting an access ACL sets the mode, chmod rewrites the ACL, and a
//! new inode inherits its parent's default ACL.
//!
//! Layout: u32 version (2), then 8-byte entries `tag u16, perm u16, id u32`, all LE.

use super::{FsResult, err};

/// The access ACL xattr.
pub const ACCESS: &str = "system.posix_acl_access";
/// The default ACL xattr (directories).
pub const DEFAULT: &str = "system.posix_acl_default";

const VERSION: u32 = 2;
const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const GROUP: u16 = 0x08;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;

#[derive(Clone, Copy, Debug)]
struct Entry {
    tag: u16,
    perm: u16,
    id: u32,
}

fn parse(b: &[u8]) -> FsResult<Vec<Entry>> {
    if b.len() < 4 || !(b.len() - 4).is_multiple_of(8) {
        return err(libc::EINVAL);
    }
    if u32::from_le_bytes([b[0], b[1], b[2], b[3]]) != VERSION {
        return err(libc::EOPNOTSUPP);
    }
    let entries: Vec<Entry> = b[4..]
        .chunks_exact(8)
        .map(|c| Entry {
            tag: u16::from_le_bytes([c[0], c[1]]),
            perm: u16::from_le_bytes([c[2], c[3]]),
            id: u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
        })
        .collect();
    let count = |t: u16| entries.iter().filter(|e| e.tag == t).count();
    let named = count(USER) + count(GROUP);
    let valid_tags = entries.iter().all(|e| {
        matches!(e.tag, USER_OBJ | USER | GROUP_OBJ | GROUP | MASK | OTHER) && e.perm & !7 == 0
    });
    if !valid_tags
        || count(USER_OBJ) != 1
        || count(GROUP_OBJ) != 1
        || count(OTHER) != 1
        || count(MASK) > 1
        || (named > 0 && count(MASK) == 0)
    {
        return err(libc::EINVAL);
    }
    Ok(entries)
}

fn encode(entries: &[Entry]) -> Vec<u8> {
    let mut out = VERSION.to_le_bytes().to_vec();
    for e in entries {
        out.extend_from_slice(&e.tag.to_le_bytes());
        out.extend_from_slice(&e.perm.to_le_bytes());
        out.extend_from_slice(&e.id.to_le_bytes());
    }
    out
}

/// For an access ACL being set: the permission bits it implies (`0o777` part), and
/// whether it says more than the mode can (so it must be kept as an xattr).
pub fn mode_of(acl: &[u8]) -> FsResult<(u32, bool)> {
    let entries = parse(acl)?;
    let mut mode = 0u32;
    let mut extended = false;
    for e in &entries {
        let p = e.perm as u32;
        match e.tag {
            USER_OBJ => mode |= p << 6,
            GROUP_OBJ if !entries.iter().any(|m| m.tag == MASK) => mode |= p << 3,
            MASK => {
                mode |= p << 3;
                extended = true;
            }
            OTHER => mode |= p,
            USER | GROUP => extended = true,
            _ => {}
        }
    }
    Ok((mode, extended))
}

/// Validates a default ACL (an empty value removes it).
pub fn check(acl: &[u8]) -> FsResult<()> {
    parse(acl).map(|_| ())
}

/// Rewrites an access ACL after chmod to `perm`.
pub fn chmod(acl: &[u8], perm: u32) -> FsResult<Vec<u8>> {
    let mut entries = parse(acl)?;
    let has_mask = entries.iter().any(|e| e.tag == MASK);
    for e in &mut entries {
        match e.tag {
            USER_OBJ => e.perm = ((perm >> 6) & 7) as u16,
            MASK => e.perm = ((perm >> 3) & 7) as u16,
            GROUP_OBJ if !has_mask => e.perm = ((perm >> 3) & 7) as u16,
            OTHER => e.perm = (perm & 7) as u16,
            _ => {}
        }
    }
    Ok(encode(&entries))
}

/// Inheritance on create: masks the parent's default ACL with the requested `perm`
/// (updating `perm` to match, as the kernel's `posix_acl_create_masq`), and returns the
/// access ACL to store, or `None` when the mode says it all.
pub fn create_masq(default: &[u8], perm: &mut u32) -> FsResult<Option<Vec<u8>>> {
    let mut entries = parse(default)?;
    let mut mode = *perm;
    let mut not_equiv = false;
    let mut group_obj = None;
    let mut mask = None;
    for (i, e) in entries.iter_mut().enumerate() {
        match e.tag {
            USER_OBJ => {
                e.perm &= ((mode >> 6) & 7) as u16;
                mode &= ((e.perm as u32) << 6) | !0o700;
            }
            USER | GROUP => not_equiv = true,
            GROUP_OBJ => group_obj = Some(i),
            OTHER => {
                e.perm &= (mode & 7) as u16;
                mode &= e.perm as u32 | !0o007;
            }
            MASK => {
                mask = Some(i);
                not_equiv = true;
            }
            _ => {}
        }
    }
    let g = mask.or(group_obj).expect("parse checked GROUP_OBJ");
    entries[g].perm &= ((mode >> 3) & 7) as u16;
    mode &= ((entries[g].perm as u32) << 3) | !0o070;
    *perm = mode;
    Ok(not_equiv.then(|| encode(&entries)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
        encode(
            &entries
                .iter()
                .map(|&(tag, perm, id)| Entry { tag, perm, id })
                .collect::<Vec<_>>(),
        )
    }

    #[test]
    fn masq_applies_mask_and_mode() {
        let def = acl(&[
            (USER_OBJ, 7, 0),
            (USER, 7, 1000),
            (GROUP_OBJ, 5, 0),
            (MASK, 7, 0),
            (OTHER, 5, 0),
        ]);
        let mut perm = 0o640;
        let out = create_masq(&def, &mut perm)
            .unwrap()
            .expect("extended ACL kept");
        assert_eq!(perm, 0o640);
        let (mode, extended) = mode_of(&out).unwrap();
        assert!(extended);
        assert_eq!(mode, 0o640);
    }

    #[test]
    fn minimal_acl_is_the_mode() {
        let def = acl(&[(USER_OBJ, 7, 0), (GROUP_OBJ, 5, 0), (OTHER, 0, 0)]);
        let mut perm = 0o777;
        assert!(create_masq(&def, &mut perm).unwrap().is_none());
        assert_eq!(perm, 0o750);
    }

    #[test]
    fn invalid_acl_is_einval() {
        assert!(
            parse(&acl(&[
                (USER_OBJ, 7, 0),
                (USER, 7, 1),
                (GROUP_OBJ, 5, 0),
                (OTHER, 0, 0)
            ]))
            .is_err()
        );
        assert!(parse(&[2, 0, 0, 0, 1]).is_err());
    }
}
