//! Error codes and statuses carried by `ERROR` frames (the gRPC code set).

use std::fmt;

/// A status code. The numeric values are the wire values (u16 in an `ERROR` frame) and match
/// gRPC's, so clients in other languages can map them directly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Code {
    Ok = 0,
    Cancelled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    AlreadyExists = 6,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Aborted = 10,
    OutOfRange = 11,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    DataLoss = 15,
    Unauthenticated = 16,
}

impl Code {
    pub const ALL: [Code; 17] = [
        Code::Ok,
        Code::Cancelled,
        Code::Unknown,
        Code::InvalidArgument,
        Code::DeadlineExceeded,
        Code::NotFound,
        Code::AlreadyExists,
        Code::PermissionDenied,
        Code::ResourceExhausted,
        Code::FailedPrecondition,
        Code::Aborted,
        Code::OutOfRange,
        Code::Unimplemented,
        Code::Internal,
        Code::Unavailable,
        Code::DataLoss,
        Code::Unauthenticated,
    ];

    /// Maps a wire value; unknown values become `Unknown` (a newer peer may add codes).
    pub fn from_u16(v: u16) -> Code {
        Code::ALL.get(v as usize).copied().unwrap_or(Code::Unknown)
    }

    /// The stable snake-case name used in JSON error bodies and logs.
    pub const fn name(self) -> &'static str {
        match self {
            Code::Ok => "ok",
            Code::Cancelled => "cancelled",
            Code::Unknown => "unknown",
            Code::InvalidArgument => "invalid_argument",
            Code::DeadlineExceeded => "deadline_exceeded",
            Code::NotFound => "not_found",
            Code::AlreadyExists => "already_exists",
            Code::PermissionDenied => "permission_denied",
            Code::ResourceExhausted => "resource_exhausted",
            Code::FailedPrecondition => "failed_precondition",
            Code::Aborted => "aborted",
            Code::OutOfRange => "out_of_range",
            Code::Unimplemented => "unimplemented",
            Code::Internal => "internal",
            Code::Unavailable => "unavailable",
            Code::DataLoss => "data_loss",
            Code::Unauthenticated => "unauthenticated",
        }
    }

    /// Parses [`Code::name`] back.
    pub fn from_name(s: &str) -> Option<Code> {
        Code::ALL.iter().copied().find(|c| c.name() == s)
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A failed call: a code and a human-readable message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    pub code: Code,
    pub message: String,
}

impl Status {
    pub fn new(code: Code, message: impl Into<String>) -> Status {
        Status {
            code,
            message: message.into(),
        }
    }
    pub fn invalid_argument(m: impl Into<String>) -> Status {
        Status::new(Code::InvalidArgument, m)
    }
    pub fn not_found(m: impl Into<String>) -> Status {
        Status::new(Code::NotFound, m)
    }
    pub fn internal(m: impl Into<String>) -> Status {
        Status::new(Code::Internal, m)
    }
    pub fn unavailable(m: impl Into<String>) -> Status {
        Status::new(Code::Unavailable, m)
    }
    pub fn failed_precondition(m: impl Into<String>) -> Status {
        Status::new(Code::FailedPrecondition, m)
    }
    pub fn permission_denied(m: impl Into<String>) -> Status {
        Status::new(Code::PermissionDenied, m)
    }
    pub fn unauthenticated(m: impl Into<String>) -> Status {
        Status::new(Code::Unauthenticated, m)
    }
    pub fn unimplemented(m: impl Into<String>) -> Status {
        Status::new(Code::Unimplemented, m)
    }
    pub fn resource_exhausted(m: impl Into<String>) -> Status {
        Status::new(Code::ResourceExhausted, m)
    }
    pub fn already_exists(m: impl Into<String>) -> Status {
        Status::new(Code::AlreadyExists, m)
    }
    pub fn cancelled(m: impl Into<String>) -> Status {
        Status::new(Code::Cancelled, m)
    }
    pub fn deadline_exceeded(m: impl Into<String>) -> Status {
        Status::new(Code::DeadlineExceeded, m)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for Status {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for (i, c) in Code::ALL.iter().enumerate() {
            assert_eq!(*c as u16 as usize, i);
            assert_eq!(Code::from_u16(i as u16), *c);
            assert_eq!(Code::from_name(c.name()), Some(*c));
        }
        assert_eq!(Code::from_u16(999), Code::Unknown);
    }
}
