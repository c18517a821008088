//! GPU usage (placeholder, filled in below).
