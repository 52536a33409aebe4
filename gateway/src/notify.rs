//! Service-manager notifications: systemd's `Type=notify` protocol (`sd_notify(3)`).
//!
//! Under systemd (`$NOTIFY_SOCKET` set), the gateway says `READY=1` when `/ready` turns 200
//! (identity loaded, first catalog sync applied), so `systemctl start` returns and units
//! ordered after it start only then; `RELOADING=1` then `READY=1` around a SIGHUP reload
//! (`systemctl reload` waits for the reload to be applied or refused); `STOPPING=1` when
//! SIGTERM starts the drain. Without `$NOTIFY_SOCKET` every call does nothing.
//!
//! A notification that cannot be sent is logged and otherwise ignored: the gateway serves
//! the same either way, and systemd's start timeout reports a gateway that never said ready.

use sd_notify::NotifyState;

/// Every registered start-up task has finished: the gateway serves (`READY=1`).
pub fn ready() {
    send("ready", &[NotifyState::Ready, NotifyState::Status("ready")]);
}

/// A SIGHUP reload starts (`RELOADING=1`, with the monotonic time newer systemd wants).
pub fn reloading() {
    let mut states = vec![NotifyState::Reloading];
    if let Ok(now) = NotifyState::monotonic_usec_now() {
        states.push(now);
    }
    send("reloading", &states);
}

/// SIGTERM: the drain starts (`STOPPING=1`).
pub fn stopping() {
    send(
        "stopping",
        &[NotifyState::Stopping, NotifyState::Status("draining")],
    );
}

fn send(what: &str, states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    match sd_notify::notify(states) {
        Ok(()) => tracing::debug!(state = what, "told the service manager"),
        Err(e) => {
            tracing::warn!(state = what, error = %e, "cannot notify the service manager ($NOTIFY_SOCKET)")
        }
    }
}
