//! Users and groups from /etc/passwd and /etc/group.
//!
//! envd is a static glibc binary, which has no NSS: `getpwnam` would not work, so envd parses
//! the two files itself. Only the local files count (no LDAP, no systemd-userdb), which is
//! what a sandbox image has.

#![forbid(unsafe_code)]

use std::fmt;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::limits::{ACCOUNT_FILE_LEN_MAX, SUPPLEMENTARY_GROUPS_MAX};

/// A resolved user: what a child process or a file operation needs to act as it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
    pub shell: PathBuf,
    /// Supplementary groups, the primary group included, sorted, without duplicates.
    pub groups: Vec<u32>,
}

#[derive(Debug)]
pub enum Error {
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    TooLarge {
        path: PathBuf,
    },
    UnknownUser {
        name: String,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Read { path, .. } => write!(f, "read {}", path.display()),
            Error::TooLarge { path } => write!(
                f,
                "{} is larger than {ACCOUNT_FILE_LEN_MAX} bytes",
                path.display()
            ),
            Error::UnknownUser { name } => write!(f, "unknown user {name:?}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Read { source, .. } => Some(source),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
    shell: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct GroupEntry {
    name: String,
    gid: u32,
    members: Vec<String>,
}

/// The parsed account files. Lines that do not parse are skipped, as glibc's files backend
/// does.
#[derive(Clone, Debug, Default)]
pub struct Db {
    users: Vec<PasswdEntry>,
    groups: Vec<GroupEntry>,
}

impl Db {
    /// Reads `<root>/etc/passwd` and `<root>/etc/group`; a missing file counts as empty
    /// (a minimal image may have neither; then only numeric users resolve).
    pub fn load(root: &Path) -> Result<Db, Error> {
        let passwd = read_bounded(&root.join("etc/passwd"))?;
        let group = read_bounded(&root.join("etc/group"))?;
        Ok(Db::parse(&passwd, &group))
    }

    /// Parses the contents of the two files.
    pub fn parse(passwd: &str, group: &str) -> Db {
        Db {
            users: passwd.lines().filter_map(parse_passwd_line).collect(),
            groups: group.lines().filter_map(parse_group_line).collect(),
        }
    }

    /// Resolves a user name, or a decimal uid. A uid without a passwd entry resolves to
    /// itself with gid = uid, home `/` and shell `/bin/sh` (as `docker run -u 1234` does).
    pub fn user(&self, name: &str) -> Result<User, Error> {
        let entry = match self.users.iter().find(|u| u.name == name) {
            Some(e) => e.clone(),
            None => match name.parse::<u32>() {
                Ok(uid) => match self.users.iter().find(|u| u.uid == uid) {
                    Some(e) => e.clone(),
                    None => PasswdEntry {
                        name: name.to_string(),
                        uid,
                        gid: uid,
                        home: "/".into(),
                        shell: "/bin/sh".into(),
                    },
                },
                // A minimal image may have no /etc/passwd at all; root must still work.
                Err(_) if name == "root" => PasswdEntry {
                    name: "root".into(),
                    uid: 0,
                    gid: 0,
                    home: "/root".into(),
                    shell: "/bin/sh".into(),
                },
                Err(_) => {
                    return Err(Error::UnknownUser {
                        name: name.to_string(),
                    })
                }
            },
        };
        let mut groups = vec![entry.gid];
        for g in &self.groups {
            if groups.len() >= SUPPLEMENTARY_GROUPS_MAX {
                break;
            }
            if g.members.contains(&entry.name) {
                groups.push(g.gid);
            }
        }
        groups.sort_unstable();
        groups.dedup();
        Ok(User {
            name: entry.name,
            uid: entry.uid,
            gid: entry.gid,
            home: PathBuf::from(entry.home),
            shell: PathBuf::from(entry.shell),
            groups,
        })
    }
}

/// The unprivileged account of the images `wrenn image rootfs` builds (uid 1000, home
/// `/home/user`): the default user of processes and file operations when it exists.
pub const DEFAULT_USER: &str = "user";

/// The user a call runs as when neither it nor Init names one: [`DEFAULT_USER`] when
/// /etc/passwd has that account, else `root` (images built before it existed, or others).
pub fn default_user(db: &Db) -> &'static str {
    if db.has_user(DEFAULT_USER) {
        DEFAULT_USER
    } else {
        "root"
    }
}

impl Db {
    /// Whether /etc/passwd has an account of this name (a numeric uid does not count).
    pub fn has_user(&self, name: &str) -> bool {
        self.users.iter().any(|u| u.name == name)
    }

    /// The name of a uid, if /etc/passwd has one.
    pub fn user_name(&self, uid: u32) -> Option<&str> {
        self.users
            .iter()
            .find(|u| u.uid == uid)
            .map(|u| u.name.as_str())
    }

    /// The name of a gid, if /etc/group has one.
    pub fn group_name(&self, gid: u32) -> Option<&str> {
        self.groups
            .iter()
            .find(|g| g.gid == gid)
            .map(|g| g.name.as_str())
    }
}

/// Fuzz entry point (`fuzz/fuzz_targets/envd_accounts.rs`): the guest's own users write
/// /etc/passwd and /etc/group, so envd (PID 1) parses untrusted text. The input is split at
/// its first NUL into the two files; every lookup answers without panicking, and a user
/// found by name has that name.
pub fn fuzz_accounts(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (passwd, group) = text.split_once('\0').unwrap_or((&text, ""));
    let db = Db::parse(passwd, group);
    for name in [
        "root",
        "user",
        "nobody",
        "0",
        "1000",
        "4294967295",
        "4294967296",
        "",
    ] {
        if let Ok(u) = db.user(name) {
            assert!(u.groups.len() <= SUPPLEMENTARY_GROUPS_MAX);
            assert!(u.groups.windows(2).all(|w| w[0] < w[1]));
        }
    }
    for e in &db.users {
        let u = db.user(&e.name).expect("a listed user resolves");
        assert_eq!(u.name, e.name);
        let _ = db.user_name(e.uid);
    }
    for g in &db.groups {
        let _ = db.group_name(g.gid);
    }
}

/// The last parsed account files, reused while neither file changed: every process start
/// and file call resolves a user, and re-reading both files each time cost about 40 µs of
/// a ~1 ms exec here.
#[derive(Default)]
pub struct Cache {
    last: Mutex<Option<(CacheKey, Arc<Db>)>>,
}

/// What identifies a version of the two files: device, inode, size, mtime and ctime of each
/// (a rewrite by rename changes the inode; an edit in place, the times or the size).
/// `None` for a missing file.
type CacheKey = [Option<(u64, u64, u64, i64, i64, i64, i64)>; 2];

impl Cache {
    /// The accounts of `root` (as [`Db::load`]), parsed again only when a file changed.
    pub fn load(&self, root: &Path) -> Result<Arc<Db>, Error> {
        let key = [
            file_key(&root.join("etc/passwd")),
            file_key(&root.join("etc/group")),
        ];
        if let Some((k, db)) = &*self.lock() {
            if *k == key {
                return Ok(db.clone());
            }
        }
        let db = Arc::new(Db::load(root)?);
        *self.lock() = Some((key, db.clone()));
        Ok(db)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(CacheKey, Arc<Db>)>> {
        // A panic elsewhere cannot leave the cached value half-written: recover it.
        self.last.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn file_key(path: &Path) -> Option<(u64, u64, u64, i64, i64, i64, i64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
    ))
}

fn read_bounded(path: &Path) -> Result<String, Error> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(String::new()),
        Err(source) => {
            return Err(Error::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let mut bytes = Vec::new();
    file.take(ACCOUNT_FILE_LEN_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?;
    if bytes.len() as u64 > ACCOUNT_FILE_LEN_MAX {
        return Err(Error::TooLarge {
            path: path.to_path_buf(),
        });
    }
    // Non-UTF-8 bytes only spoil the lines that hold them; those then fail to match.
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// `name:password:uid:gid:gecos:home:shell`
fn parse_passwd_line(line: &str) -> Option<PasswdEntry> {
    if line.starts_with('#') {
        return None;
    }
    let f: Vec<&str> = line.split(':').collect();
    if f.len() != 7 || f[0].is_empty() {
        return None;
    }
    Some(PasswdEntry {
        name: f[0].to_string(),
        uid: f[2].parse().ok()?,
        gid: f[3].parse().ok()?,
        home: f[5].to_string(),
        shell: f[6].to_string(),
    })
}

/// `name:password:gid:member,member`
fn parse_group_line(line: &str) -> Option<GroupEntry> {
    if line.starts_with('#') {
        return None;
    }
    let f: Vec<&str> = line.split(':').collect();
    if f.len() != 4 || f[0].is_empty() {
        return None;
    }
    Some(GroupEntry {
        name: f[0].to_string(),
        gid: f[2].parse().ok()?,
        members: f[3]
            .split(',')
            .filter(|m| !m.is_empty())
            .map(str::to_string)
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_reloads_only_after_a_change() {
        let dir = std::env::temp_dir().join(format!("envd-passwd-cache-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("etc")).unwrap();
        std::fs::write(dir.join("etc/passwd"), PASSWD).unwrap();
        std::fs::write(dir.join("etc/group"), GROUP).unwrap();
        let cache = Cache::default();
        let a = cache.load(&dir).unwrap();
        let b = cache.load(&dir).unwrap();
        assert!(Arc::ptr_eq(&a, &b), "unchanged files are not parsed again");
        assert!(a.user("newbie").is_err());
        // A rewrite by rename (what useradd does) is a new inode.
        let tmp = dir.join("etc/passwd.new");
        std::fs::write(
            &tmp,
            format!("{PASSWD}newbie:x:1001:1001::/home/newbie:/bin/sh\n"),
        )
        .unwrap();
        std::fs::rename(&tmp, dir.join("etc/passwd")).unwrap();
        let c = cache.load(&dir).unwrap();
        assert_eq!(c.user("newbie").unwrap().uid, 1001);
        // An edit in place that changes the size.
        std::fs::write(
            dir.join("etc/group"),
            format!("{GROUP}newbies:x:2000:newbie\n"),
        )
        .unwrap();
        assert_eq!(
            cache.load(&dir).unwrap().user("newbie").unwrap().groups,
            vec![1001, 2000]
        );
        // A removed file counts as empty again.
        std::fs::remove_file(dir.join("etc/passwd")).unwrap();
        assert!(cache.load(&dir).unwrap().user("newbie").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The committed fuzz corpus keeps being replayed by `cargo test`.
    #[test]
    fn fuzz_corpus_replays() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/envd_accounts");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).expect("corpus directory") {
            fuzz_accounts(&std::fs::read(e.unwrap().path()).unwrap());
            n += 1;
        }
        assert!(n > 0);
        // The seed named `typical` resolves as a real image's files do.
        let typical = std::fs::read(dir.join("typical")).unwrap();
        let text = String::from_utf8(typical).unwrap();
        let (p, g) = text.split_once('\0').unwrap();
        let u = Db::parse(p, g).user("user").unwrap();
        assert_eq!((u.uid, u.gid, u.groups), (1000, 1000, vec![4, 27, 1000]));
    }

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
        # comment\n\
        daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
        broken line\n\
        bad:x:notanumber:1::/:/bin/sh\n\
        user:x:1000:1000:A User,,,:/home/user:/bin/bash\n\
        nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n";
    const GROUP: &str = "root:x:0:\nadm:x:4:user,daemon\nsudo:x:27:user\n\
        user:x:1000:\nnogroup:x:65534:\nweird:x:zz:user\n";

    #[test]
    fn resolves_names_and_groups() {
        let db = Db::parse(PASSWD, GROUP);
        let u = db.user("user").unwrap();
        assert_eq!((u.uid, u.gid), (1000, 1000));
        assert_eq!(u.home, PathBuf::from("/home/user"));
        assert_eq!(u.shell, PathBuf::from("/bin/bash"));
        assert_eq!(u.groups, vec![4, 27, 1000]);
        let r = db.user("root").unwrap();
        assert_eq!(r.groups, vec![0]);
        assert_eq!(db.user_name(1000), Some("user"));
        assert_eq!(db.group_name(27), Some("sudo"));
        assert_eq!(db.group_name(12345), None);
        let n = db.user("nobody").unwrap();
        assert_eq!(
            (n.uid, n.gid, n.groups.clone()),
            (65534, 65534, vec![65534])
        );
    }

    #[test]
    fn the_default_user_is_user_when_the_image_has_it() {
        assert_eq!(default_user(&Db::parse(PASSWD, GROUP)), "user");
        // Older images (or any without the account) keep root.
        let old = PASSWD.replace("user:x:1000", "other:x:1000");
        assert_eq!(default_user(&Db::parse(&old, GROUP)), "root");
        assert_eq!(default_user(&Db::parse("", "")), "root");
        // A group called `user` is not an account.
        assert_eq!(default_user(&Db::parse("", "user:x:1000:\n")), "root");
    }

    #[test]
    fn numeric_users() {
        let db = Db::parse(PASSWD, GROUP);
        assert_eq!(db.user("1000").unwrap().name, "user");
        let u = db.user("4321").unwrap();
        assert_eq!((u.uid, u.gid), (4321, 4321));
        assert_eq!(u.home, PathBuf::from("/"));
    }

    #[test]
    fn bad_lines_and_unknown_users() {
        let db = Db::parse(PASSWD, GROUP);
        assert!(matches!(db.user("bad"), Err(Error::UnknownUser { .. })));
        assert!(matches!(db.user("ghost"), Err(Error::UnknownUser { .. })));
        assert!(matches!(db.user(""), Err(Error::UnknownUser { .. })));
        let empty = Db::parse("", "");
        let root = empty.user("root").unwrap();
        assert_eq!((root.uid, root.gid, root.groups.clone()), (0, 0, vec![0]));
        assert!(empty.user("user").is_err());
        assert_eq!(empty.user("0").unwrap().uid, 0);
    }

    #[test]
    fn loads_from_a_root_and_tolerates_missing_files() {
        let dir = std::env::temp_dir().join(format!("envd-passwd-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("etc")).unwrap();
        std::fs::write(dir.join("etc/passwd"), PASSWD).unwrap();
        let db = Db::load(&dir).unwrap();
        assert_eq!(db.user("user").unwrap().groups, vec![1000]);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(Db::load(&dir).unwrap().user("user").is_err());
    }

    #[test]
    fn loads_this_machine() {
        let db = Db::load(Path::new("/")).unwrap();
        assert_eq!(db.user("root").unwrap().uid, 0);
    }
}
