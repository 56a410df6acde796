//! HTTP/JSON gateway (owned by the HTTP helper; see ARCHITECTURE-NOTES.md).
