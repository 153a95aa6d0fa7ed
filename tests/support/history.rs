//! The history checker (filled in by the end-to-end tests).
