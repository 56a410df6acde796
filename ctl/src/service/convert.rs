//! Rows to messages.
