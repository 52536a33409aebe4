//! Process limits a gateway needs raised: open files.
//!
//! A gateway holds two descriptors per VIP listener (the listener and the duplicate kept to
//! hand over to a successor, `handover.rs`), so 10,000 clusterset services with one port
//! each need over 20,000. The usual soft limit is far lower (1,024 under systemd, whose
//! hard limit is 524,288), so at start-up the soft limit is raised to the hard one, as the
//! Go runtime and nginx (`worker_rlimit_nofile`) do. The hard limit is the operator's to
//! set (`LimitNOFILE=`, the container runtime's `nofile` ulimit).

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// The soft limit on open files wanted for `current`: the hard limit (`None`: unlimited).
pub fn wanted_open_files(current: Rlimit) -> Option<Rlimit> {
    (current.current != current.maximum).then_some(Rlimit {
        current: current.maximum,
        maximum: current.maximum,
    })
}

/// Raises the soft limit on open files to the hard limit; logs what it did.
pub fn raise_open_files() {
    let current = getrlimit(Resource::Nofile);
    let Some(wanted) = wanted_open_files(current) else {
        tracing::debug!(limit = ?current.current, "open files limit already at its maximum");
        return;
    };
    match setrlimit(Resource::Nofile, wanted) {
        Ok(()) => tracing::info!(
            from = ?current.current,
            to = ?wanted.current,
            "raised the open files limit to its maximum (two descriptors per VIP listener)"
        ),
        Err(e) => tracing::warn!(
            limit = ?current.current,
            error = %e,
            "cannot raise the open files limit; VIP listeners beyond it will fail to bind"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_goes_up_to_the_hard_one() {
        let limit = |current, maximum| Rlimit { current, maximum };
        let cases = [
            (
                limit(Some(1024), Some(524_288)),
                Some(limit(Some(524_288), Some(524_288))),
            ),
            (limit(Some(1024), None), Some(limit(None, None))),
            (limit(Some(20_000), Some(20_000)), None),
            (limit(None, None), None),
        ];
        for (current, wanted) in cases {
            assert_eq!(wanted_open_files(current), wanted, "{current:?}");
        }
    }
}
