//! The ssh transport: `snapfs sync SOURCE ssh://[USER@]HOST[:PORT]/PATH` runs
//! `snapfs receive PATH` on HOST through the system `ssh` client (its config, agent
//! and known_hosts as usual), and the session's frames go over the child's standard
//! input and output. ssh authenticates and encrypts; the frames carry no MAC.

use std::process::{Command, Stdio};

use super::relay::{End, Sink, collect_stderr};
use super::session::SyncError;

/// Where an `ssh://` destination points.
#[derive(Debug, PartialEq, Eq)]
pub struct Target {
    /// The user to log in as, if given.
    pub user: Option<String>,
    /// The host.
    pub host: String,
    /// The port, if given.
    pub port: Option<u16>,
    /// The store's path on the host.
    pub path: String,
}

/// Parses `ssh://[USER@]HOST[:PORT]/PATH` (HOST may be `[v6 address]`); PATH is
/// absolute, or relative to the remote home with `/~/PATH`.
pub fn parse(url: &str) -> Result<Target, SyncError> {
    let bad = |why: &str| SyncError::Protocol(format!("{url}: {why}"));
    let rest = url
        .strip_prefix("ssh://")
        .ok_or_else(|| bad("not an ssh:// address"))?;
    let slash = rest
        .find('/')
        .ok_or_else(|| bad("no path: ssh://[USER@]HOST[:PORT]/PATH"))?;
    let (auth, path) = rest.split_at(slash);
    let path = match path.strip_prefix("/~/") {
        Some(rel) => rel.to_string(),
        None => path.to_string(),
    };
    if path.is_empty() || path == "/" {
        return Err(bad("no path: ssh://[USER@]HOST[:PORT]/PATH"));
    }
    let (user, hostport) = match auth.rsplit_once('@') {
        Some((u, h)) => (Some(u.to_string()), h),
        None => (None, auth),
    };
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or_else(|| bad("an unclosed '['"))?;
        match after.strip_prefix(':') {
            Some(p) => (h, Some(p)),
            None if after.is_empty() => (h, None),
            None => return Err(bad("junk after the address")),
        }
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    let port = port
        .map(|p| {
            p.parse::<u16>()
                .map_err(|_| bad("the port is not a number"))
        })
        .transpose()?;
    // Neither may pass for an option of ssh's.
    let plain = |s: &str| {
        !s.is_empty()
            && !s.starts_with('-')
            && s.bytes()
                .all(|b| b.is_ascii_graphic() && b != b'\'' && b != b'"')
    };
    if !plain(host) {
        return Err(bad("not a host name"));
    }
    if user.as_deref().is_some_and(|u| !plain(u)) {
        return Err(bad("not a user name"));
    }
    Ok(Target {
        user,
        host: host.to_string(),
        port,
        path,
    })
}

/// Quotes `s` for a POSIX shell (the remote side runs the command through one).
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Starts `snapfs receive` on the target. `ssh`: the client and its options, split
/// on whitespace (`ssh -F cfg`); `remote`: the remote snapfs program.
pub fn connect(t: &Target, ssh: &str, remote: &str) -> Result<End, SyncError> {
    run_remote(
        t,
        ssh,
        &format!(
            "{} receive -- {}",
            shell_quote(remote),
            shell_quote(&t.path)
        ),
    )
}

/// Starts `snapfs send` on the target (the source of a restore), of snapshot `only`
/// alone if given.
pub fn connect_source(
    t: &Target,
    ssh: &str,
    remote: &str,
    only: Option<&str>,
) -> Result<End, SyncError> {
    let only = only.map_or(String::new(), |s| format!(" --snapshot={}", shell_quote(s)));
    run_remote(
        t,
        ssh,
        &format!(
            "{} send{only} -- {}",
            shell_quote(remote),
            shell_quote(&t.path)
        ),
    )
}

/// Runs `command` (for a POSIX shell) on the target, its stdin and stdout the end.
fn run_remote(t: &Target, ssh: &str, command: &str) -> Result<End, SyncError> {
    let mut words = ssh.split_whitespace();
    let prog = words
        .next()
        .ok_or_else(|| SyncError::Protocol("an empty ssh command".into()))?;
    let mut cmd = Command::new(prog);
    cmd.args(words);
    if let Some(p) = t.port {
        cmd.arg("-p").arg(p.to_string());
    }
    if let Some(u) = &t.user {
        cmd.arg("-l").arg(u);
    }
    cmd.arg("--").arg(&t.host).arg(command);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| SyncError::Protocol(format!("cannot run {prog}: {e}")))?;
    let (stdin, stdout, stderr) = (
        child.stdin.take().expect("piped"),
        child.stdout.take().expect("piped"),
        child.stderr.take().expect("piped"),
    );
    Ok(End {
        rfd: Some(std::os::fd::AsRawFd::as_raw_fd(&stdout)),
        r: Box::new(stdout),
        w: Sink::Child(Some(stdin)),
        task: None,
        child: Some((child, collect_stderr(stderr))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_hostile_ones_are_refused() {
        let t = parse("ssh://backup@host.example:2222/srv/replica").unwrap();
        assert_eq!(
            t,
            Target {
                user: Some("backup".into()),
                host: "host.example".into(),
                port: Some(2222),
                path: "/srv/replica".into()
            }
        );
        let t = parse("ssh://[::1]:22/~/r").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("::1", Some(22), "r")
        );
        assert_eq!(parse("ssh://h/x y").unwrap().path, "/x y");
        for bad in [
            "ssh://-oProxyCommand=x/p",
            "ssh://h",
            "ssh://h/",
            "ssh://h:port/p",
            "ssh://-l@h/p",
            "ssh://[::1/p",
            "tcp://h/p",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert_eq!(shell_quote("a'b"), r"'a'\''b'");
    }
}
