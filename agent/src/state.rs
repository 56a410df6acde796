//! The sandbox state machine, as one table (the states are wrenn.sandbox.v1.SandboxState).
//!
//! ```text
//! pending ─Start─> starting ─Started─> running ─Pause─> pausing ─Paused─> paused
//!                                        ^  └────────────Abort<──┘          │
//!                                        └──Resumed── resuming <─Resume─────┘
//!                                                        └─Abort─> paused
//! {pending, running, paused, error} ─Stop─> stopping ─Stopped─> stopped
//! {starting, running, pausing, resuming, paused, stopping} ─Fail─> error
//! ```
//! `Abort` is a failed pause or resume that left the sandbox as it was (the VM still runs
//! after a failed snapshot; the chain is intact after a failed restore). `Fail` is anything
//! that leaves it unusable: the reason goes with the record.

use std::fmt;

/// A lifecycle state: the shared `wrenn.sandbox.v1.SandboxState` (names, wire numbers and
/// `is_transient` live in `proto::sandbox`). UNSPECIFIED has no transitions.
pub use proto::sandbox::SandboxState as State;

/// What happens to a sandbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Event {
    /// Create begins.
    Start,
    /// The VM runs and envd is initialized.
    Started,
    /// A pause (or a template snapshot) begins.
    Pause,
    /// The snapshot is written and the VM is gone.
    Paused,
    /// A resume begins.
    Resume,
    /// The VM runs again and envd is initialized.
    Resumed,
    /// A pause or resume failed and left the sandbox as before.
    Abort,
    /// Destroy begins.
    Stop,
    /// Everything is removed.
    Stopped,
    /// Something failed and the sandbox is unusable.
    Fail,
}

/// A VM process is expected to exist in this state.
pub fn has_vm(s: State) -> bool {
    matches!(
        s,
        State::Starting | State::Running | State::Pausing | State::Resuming
    )
}

/// A transition the table does not have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IllegalTransition {
    pub from: State,
    pub event: Event,
}

impl fmt::Display for IllegalTransition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} is not allowed in state {}", self.event, self.from)
    }
}

impl std::error::Error for IllegalTransition {}

/// Every legal transition. Anything not listed is illegal.
pub const TRANSITIONS: &[(State, Event, State)] = &[
    (State::Pending, Event::Start, State::Starting),
    (State::Starting, Event::Started, State::Running),
    (State::Running, Event::Pause, State::Pausing),
    (State::Pausing, Event::Paused, State::Paused),
    (State::Pausing, Event::Abort, State::Running),
    (State::Paused, Event::Resume, State::Resuming),
    (State::Resuming, Event::Resumed, State::Running),
    (State::Resuming, Event::Abort, State::Paused),
    (State::Pending, Event::Stop, State::Stopping),
    (State::Running, Event::Stop, State::Stopping),
    (State::Paused, Event::Stop, State::Stopping),
    (State::Error, Event::Stop, State::Stopping),
    (State::Stopping, Event::Stopped, State::Stopped),
    (State::Starting, Event::Fail, State::Error),
    (State::Running, Event::Fail, State::Error),
    (State::Pausing, Event::Fail, State::Error),
    (State::Paused, Event::Fail, State::Error),
    (State::Resuming, Event::Fail, State::Error),
    (State::Stopping, Event::Fail, State::Error),
];

/// The state after `event` in `from`, or the refusal.
pub fn next(from: State, event: Event) -> Result<State, IllegalTransition> {
    TRANSITIONS
        .iter()
        .find(|(f, e, _)| *f == from && *e == event)
        .map(|(_, _, to)| *to)
        .ok_or(IllegalTransition { from, event })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVENTS: [Event; 10] = [
        Event::Start,
        Event::Started,
        Event::Pause,
        Event::Paused,
        Event::Resume,
        Event::Resumed,
        Event::Abort,
        Event::Stop,
        Event::Stopped,
        Event::Fail,
    ];

    #[test]
    fn the_happy_path_of_design_3() {
        let mut s = State::Pending;
        for e in [
            Event::Start,
            Event::Started,
            Event::Pause,
            Event::Paused,
            Event::Resume,
            Event::Resumed,
            Event::Stop,
            Event::Stopped,
        ] {
            s = next(s, e).unwrap();
        }
        assert_eq!(s, State::Stopped);
    }

    #[test]
    fn exactly_the_table_is_legal() {
        let mut legal = 0;
        for from in State::ALL {
            for e in EVENTS {
                let listed = TRANSITIONS.iter().any(|(f, ev, _)| *f == from && *ev == e);
                assert_eq!(next(from, e).is_ok(), listed, "{from} {e:?}");
                legal += listed as usize;
            }
        }
        assert_eq!(legal, TRANSITIONS.len(), "no duplicate rows");
    }

    #[test]
    fn chosen_illegal_transitions() {
        for (from, e) in [
            (State::Paused, Event::Pause),
            (State::Running, Event::Resume),
            (State::Running, Event::Start),
            (State::Stopped, Event::Start),
            (State::Stopped, Event::Stop),
            (State::Stopped, Event::Fail),
            (State::Stopping, Event::Stop),
            (State::Pausing, Event::Stop),
            (State::Starting, Event::Pause),
            (State::Error, Event::Resume),
            (State::Pending, Event::Started),
        ] {
            let err = next(from, e).unwrap_err();
            assert_eq!(err, IllegalTransition { from, event: e });
            assert!(err.to_string().contains(from.name()));
        }
    }

    #[test]
    fn stopped_is_terminal_and_error_only_stops() {
        for e in EVENTS {
            assert!(next(State::Stopped, e).is_err());
            assert_eq!(next(State::Error, e).is_ok(), e == Event::Stop);
        }
    }

    #[test]
    fn every_state_reaches_stopped() {
        for from in State::ALL {
            // Breadth-first over the table.
            let mut seen = vec![from];
            let mut i = 0;
            while i < seen.len() {
                for (f, _, to) in TRANSITIONS {
                    if *f == seen[i] && !seen.contains(to) {
                        seen.push(*to);
                    }
                }
                i += 1;
            }
            assert!(
                seen.contains(&State::Stopped),
                "{from} cannot reach stopped"
            );
        }
    }
}
