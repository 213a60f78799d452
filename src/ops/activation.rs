//! systemd socket activation (`meterd.socket`): when `LISTEN_FDS=1` and `LISTEN_PID` is this process, fd 3 is
//! the ingest listener, already bound by systemd (TCP or unix, stream). See `sd_listen_fds(3)`.
//!
//! Only one fd is supported: meterd has one listener. With `LISTEN_FDS` greater than 1 meterd refuses to start
//! rather than guess. The fd is taken at most once per process.

use std::collections::BTreeMap;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

/// The first passed fd (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: i32 = 3;

static TAKEN: AtomicBool = AtomicBool::new(false);

/// A listener handed over by systemd.
#[derive(Debug)]
pub enum Activated {
    /// A TCP listening socket.
    Tcp(std::net::TcpListener),
    /// A unix stream listening socket and its path, if it has one.
    Unix(std::os::unix::net::UnixListener, Option<std::path::PathBuf>),
}

/// Whether the environment passes a listener to this process, and how many: `Ok(None)` when socket activation
/// is not in use (no `LISTEN_FDS`, or `LISTEN_PID` names another process).
pub fn passed_fds(env: &BTreeMap<String, String>) -> Result<Option<u32>, String> {
    let Some(fds) = env.get("LISTEN_FDS") else {
        return Ok(None);
    };
    if let Some(pid) = env.get("LISTEN_PID") {
        match pid.trim().parse::<u32>() {
            Ok(p) if p == std::process::id() => {}
            Ok(_) => return Ok(None),
            Err(_) => return Err(format!("LISTEN_PID={pid} is not a process id")),
        }
    } else {
        // sd_listen_fds(3) requires LISTEN_PID; without it the variables were inherited, not meant for us.
        return Ok(None);
    }
    let n: u32 = fds
        .trim()
        .parse()
        .map_err(|_| format!("LISTEN_FDS={fds} is not a number"))?;
    match n {
        0 => Ok(None),
        1 => Ok(Some(1)),
        n => Err(format!(
            "socket activation passed {n} sockets; meterd takes exactly one (one ListenStream= in meterd.socket)"
        )),
    }
}

/// Takes fd 3 when systemd passed it to this process (see [`passed_fds`]); `Ok(None)` otherwise.
pub fn take_listener(env: &BTreeMap<String, String>) -> Result<Option<Activated>, String> {
    if passed_fds(env)?.is_none() {
        return Ok(None);
    }
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Ok(None);
    }
    // SAFETY: systemd guarantees fd 3 is open and handed to this process (LISTEN_PID checked above); the
    // `TAKEN` flag makes sure it is wrapped, and so owned and closed, exactly once.
    let passed = unsafe { OwnedFd::from_raw_fd(LISTEN_FDS_START) };
    // systemd passes the fd without FD_CLOEXEC; a duplicate (F_DUPFD_CLOEXEC) has it, and fd 3 is closed.
    let fd = passed
        .try_clone()
        .map_err(|e| format!("socket activation: cannot use fd 3: {e}"))?;
    drop(passed);
    let tcp = std::net::TcpListener::from(fd);
    if tcp.local_addr().is_ok() {
        tcp.set_nonblocking(true)
            .map_err(|e| format!("socket activation: cannot set fd 3 non-blocking: {e}"))?;
        return Ok(Some(Activated::Tcp(tcp)));
    }
    let unix = std::os::unix::net::UnixListener::from(OwnedFd::from(tcp));
    match unix.local_addr() {
        Ok(addr) => {
            unix.set_nonblocking(true)
                .map_err(|e| format!("socket activation: cannot set fd 3 non-blocking: {e}"))?;
            Ok(Some(Activated::Unix(
                unix,
                addr.as_pathname().map(|p| p.to_path_buf()),
            )))
        }
        Err(e) => Err(format!(
            "socket activation: fd 3 is neither a TCP nor a unix stream socket ({e}); check ListenStream= in meterd.socket"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, String)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    #[test]
    fn only_for_this_process() {
        let me = std::process::id().to_string();
        assert_eq!(passed_fds(&env(&[])), Ok(None));
        assert_eq!(passed_fds(&env(&[("LISTEN_FDS", "1".into())])), Ok(None));
        assert_eq!(
            passed_fds(&env(&[
                ("LISTEN_FDS", "1".into()),
                ("LISTEN_PID", "1".into())
            ])),
            Ok(None)
        );
        assert_eq!(
            passed_fds(&env(&[
                ("LISTEN_FDS", "1".into()),
                ("LISTEN_PID", me.clone())
            ])),
            Ok(Some(1))
        );
        assert!(passed_fds(&env(&[("LISTEN_FDS", "2".into()), ("LISTEN_PID", me)])).is_err());
    }
}
